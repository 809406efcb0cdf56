"""``ServerSession``: the one way endpoint code drives a model server for a caller.

``run_request``, ``run_requests``, a user function's ``ModelHandle`` and a campaign's
``run_shard`` are thin callers of it:

.. code:: text

    run(requests) --ensure--> warm deployment of the model (launched if need be)
        submit in a bounded window, each with its own single-use ticket (this exact request)
            refused for a full queue -> backpressure: sent again once one of ours finished,
                                        or after a pause (batches, patient callers), by the deadline
            refused otherwise         -> that input's typed error (a poison input fails alone)
        wait for each result; silence -> health ping: alive = keep waiting (till the deadline)
        server dead -> inputs it had accepted: ModelServerUnavailable each, never resent (one
                       of them may have killed it), unless its job hit its walltime (the
                       scheduler killed it: they are resent); inputs not yet answered or
                       not yet sent: sent to a server relaunched once
    <-- one Outcome per input, in order: its result, or its typed error

A resent input (after a refusal, or to the relaunched server) keeps its request id unless the
session gives every execution a fresh one (``fresh_ids``: a campaign's per-execution nonce).
"""

from __future__ import annotations

import collections
import contextlib
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from fabric.errors import FabricError, ModelServerUnavailable, Overloaded

if TYPE_CHECKING:
    from fabric.catalog import CatalogEntry
    from fabric.endpoint.context import SiteContext
    from fabric.endpoint.state import Deployment
    from fabric.protocol import InferenceRequest
    from fabric.serverclient import ServerClient

ROOM_RETRY_S = 0.5
"""Longest pause before a request refused for a full queue is sent again."""
LISTEN_S = 10.0
"""How long a wait listens before it pings the server's health."""
TICKET_TTL_S = 300.0
"""Life of a request's ticket: the server checks it when the request arrives."""


def token_estimate(req: InferenceRequest) -> int:
    """Most tokens a request may use, for quota admission (~4 characters per token): its
    prompt, messages and batched prompts, one per batch item, plus the new tokens it asks for."""
    text = (req.prompt or "") + "".join(m.get("content", "") for m in req.messages or [])
    text += "".join(req.prompts or [])
    new = req.sampling.max_tokens if req.kind == "generate" else 0
    return len(text) // 4 + req.batch_size + new


def retry_pause(refusal: FabricError, req: InferenceRequest, ours_in_flight: bool,
                patient: bool, deadline: float) -> float | None:
    """Seconds to wait before sending a refused request again, or None if its refusal stands.

    Only ``Overloaded`` is backpressure. While requests of ours are in flight, room comes back
    as they finish (0: send again after the next one). With none in flight, a full queue is
    waited out by batches (admitted whole or not at all: several callers' batches can fill a
    queue each alone fits) and by patient callers (a campaign shard), up to ``deadline``; a
    draining or loading server, or an impatient single request, gets its refusal.
    """
    from fabric.protocol import QUEUE_FULL

    if not isinstance(refusal, Overloaded):
        return None
    if ours_in_flight:
        return 0.0
    if refusal.details.get("reason") != QUEUE_FULL or not (patient or req.prompts is not None):
        return None
    pause = min(float(refusal.details.get("retry_after") or ROOM_RETRY_S), ROOM_RETRY_S)
    return pause if time.monotonic() + pause <= deadline else None


@dataclass
class Outcome:
    """What one input came to: its result, or its typed error (``request_id``: the id of its
    last execution)."""

    request_id: str
    result: dict[str, Any] | None = None
    error: FabricError | None = None


class _Outcomes:
    """One slot per input, filled once; a listener hears each as it is filled."""

    def __init__(self, n: int, listener: Callable[[int, Outcome], None] | None) -> None:
        self._slots: list[Outcome | None] = [None] * n
        self._listener = listener
        self.resent_from: dict[int, str] = {}
        """Inputs resent after a walltime: the deployment that had accepted them."""

    def __setitem__(self, i: int, outcome: Outcome) -> None:
        provenance = (outcome.result or {}).get("provenance")
        if i in self.resent_from and isinstance(provenance, dict):
            # The result says it is a rerun, and of which server's interrupted execution.
            provenance["resent_from"] = self.resent_from[i]
        self._slots[i] = outcome
        if self._listener is not None:
            self._listener(i, outcome)

    def done(self) -> list[Outcome]:
        missing = [i for i, o in enumerate(self._slots) if o is None]
        assert not missing, f"inputs without an outcome: {missing}"  # a bug in the session
        return [o for o in self._slots if o is not None]


class _ServerLost(Exception):
    """The server died under the session: what it had accepted, what it never answered."""

    def __init__(self, cause: FabricError, accepted: list[int], unanswered: list[int]) -> None:
        super().__init__(cause.message)
        self.cause = cause
        self.accepted = accepted
        self.unanswered = unanswered


class ServerSession:
    """Requests of one caller (``identity``) to one model's warm server.

    ``timeout_s`` bounds a ``run``; ``window`` caps requests in flight (None: all at once);
    ``patient`` waits out a full queue for single requests too; ``fresh_ids`` gives every
    execution a new request id; ``listen_s`` is how long a wait listens before it pings the
    server's health. Not thread-safe: one per thread (``ModelHandle`` locks).
    """

    def __init__(self, context: SiteContext, entry: CatalogEntry, identity: str, *,
                 timeout_s: float = 600.0, window: int | None = None, patient: bool = False,
                 fresh_ids: bool = False, listen_s: float = LISTEN_S) -> None:
        self.ctx = context
        self.entry = entry
        self.identity = identity
        self.timeout_s = timeout_s
        self.window = None if window is None else max(1, int(window))
        self.patient = patient
        self.fresh_ids = fresh_ids
        self.listen_s = listen_s
        self.deployment: Deployment | None = None
        """The server in use (None before the first run and after it died)."""
        self.served_by: Deployment | None = None
        """The last server this session used."""
        self._client: ServerClient | None = None

    # -- the one verb -----------------------------------------------------------------------

    def run(self, requests: Sequence[InferenceRequest],
            on_outcome: Callable[[int, Outcome], None] | None = None) -> list[Outcome]:
        """Serve ``requests``; one ``Outcome`` per request, in order (see the module doc);
        ``on_outcome(index, outcome)`` hears each as it comes. Raises only what stops every
        input: the deployment cannot be had (``DeploymentError``)."""
        deadline = time.monotonic() + self.timeout_s
        reqs = list(requests)
        outcomes = _Outcomes(len(reqs), on_outcome)
        todo = collections.deque(range(len(reqs)))
        relaunched = False
        while todo:
            client, dep = self._connect()
            try:
                self._drive(client, dep, reqs, todo, outcomes, deadline)
            except _ServerLost as lost:
                expired = self._drop()
                if expired and not relaunched:
                    # The scheduler ended the server at its walltime: no input killed it, so
                    # what it had accepted goes to the relaunched server with the rest.
                    outcomes.resent_from.update((i, dep.id) for i in lost.accepted)
                    todo.extendleft(reversed(sorted([*lost.accepted, *lost.unanswered])))
                    relaunched = True
                    continue
                for i in lost.accepted:
                    outcomes[i] = Outcome(reqs[i].request_id, error=_lost(lost.cause, dep))
                if relaunched:  # a second death: the rest fail rather than sink more servers
                    for i in (*lost.unanswered, *todo):
                        outcomes[i] = Outcome(reqs[i].request_id, error=_lost(lost.cause, dep))
                    todo.clear()
                else:
                    todo.extendleft(reversed(lost.unanswered))
                    relaunched = True
        if self.deployment is not None:
            self.ctx.manager.db.touch(self.deployment.id)
        return outcomes.done()

    def close(self) -> None:
        """Release the connection to the server."""
        if self._client is not None:
            self._client.close()
            self._client = None

    # -- driving ----------------------------------------------------------------------------

    def _drive(self, client: ServerClient, dep: Deployment, reqs: list[InferenceRequest],
               todo: collections.deque[int], outcomes: _Outcomes,
               deadline: float) -> None:
        flight: collections.deque[int] = collections.deque()
        while todo or flight:
            pause = self._submit(client, dep, reqs, todo, flight, outcomes, deadline)
            if flight:
                self._collect(client, dep, reqs, flight, outcomes, deadline)
            elif pause:
                time.sleep(pause)

    def _submit(self, client: ServerClient, dep: Deployment, reqs: list[InferenceRequest],
                todo: collections.deque[int], flight: collections.deque[int],
                outcomes: _Outcomes, deadline: float) -> float:
        """Send what the window has room for (one round trip for the lot); returns the pause
        before refused ones may go again."""
        from fabric import tickets

        room = len(todo) if self.window is None else max(0, self.window - len(flight))
        batch = [todo.popleft() for _ in range(min(room, len(todo)))]
        key = self.ctx.ticket_key()
        for i in batch:
            if self.fresh_ids:  # every execution its own id (a campaign's output nonce)
                reqs[i] = reqs[i].model_copy(update={"request_id": uuid.uuid4().hex})
            # Bound to exactly this execution and spent on its submit (a resend gets its own).
            client.send_submit(reqs[i], tickets.issue_for_request(
                key, reqs[i], model=dep.model, subject=self.identity, ttl_s=TICKET_TTL_S))
        refused: list[tuple[int, FabricError]] = []
        for k, i in enumerate(batch):
            try:
                refusal = self._admission(client, dep, reqs[i].request_id, deadline)
            except _ServerLost as lost:
                raise _ServerLost(lost.cause, list(flight), batch[k:]) from None
            if refusal is None:
                flight.append(i)
            else:
                refused.append((i, refusal))
        pause, again = 0.0, []
        for i, refusal in refused:
            wait = retry_pause(refusal, reqs[i], bool(flight), self.patient, deadline)
            if wait is None:
                outcomes[i] = Outcome(reqs[i].request_id, error=refusal)
            else:
                again.append(i)
                pause = max(pause, wait)
        todo.extendleft(reversed(again))
        return pause

    def _admission(self, client: ServerClient, dep: Deployment, rid: str,
                   deadline: float) -> FabricError | None:
        while True:
            try:
                return client.admission(rid, self.listen_s)
            except ModelServerUnavailable as exc:
                if not exc.details.get("silent"):
                    return exc
                if self.ctx.manager.health(dep) is None:
                    raise _ServerLost(exc, [], []) from None
                if time.monotonic() > deadline:  # alive, but took nothing in time
                    return ModelServerUnavailable(
                        f"the model server for {dep.model} did not take the request within "
                        f"{self.timeout_s:.0f} s", model=dep.model, deployment=dep.id)

    def _collect(self, client: ServerClient, dep: Deployment, reqs: list[InferenceRequest],
                 flight: collections.deque[int], outcomes: _Outcomes,
                 deadline: float) -> None:
        """Wait for the oldest request in flight; silence is fine while the server is alive
        and busy (with our other requests, or others'), until ``deadline``."""
        i = flight.popleft()
        rid = reqs[i].request_id
        while True:
            try:
                listen = min(self.listen_s, max(0.1, deadline - time.monotonic()))
                outcomes[i] = Outcome(rid, result=client.result(rid, timeout_s=listen))
                return
            except ModelServerUnavailable as exc:
                if not exc.details.get("silent"):
                    outcomes[i] = Outcome(rid, error=exc)
                    return
                if self.ctx.manager.health(dep) is None:
                    raise _ServerLost(exc, [i, *flight], []) from None
                if time.monotonic() > deadline:
                    outcomes[i] = Outcome(rid, error=ModelServerUnavailable(
                        f"no result from the model server for {dep.model} within "
                        f"{self.timeout_s:.0f} s; it is alive but busy", model=dep.model,
                        deployment=dep.id))
                    return
            except FabricError as exc:
                outcomes[i] = Outcome(rid, error=exc)
                return

    # -- connection -------------------------------------------------------------------------

    def _connect(self) -> tuple[ServerClient, Deployment]:
        from fabric.serverclient import ServerClient

        if self._client is None or self.deployment is None:
            self.deployment = self.served_by = self.ctx.manager.ensure(self.entry)
            self._client = ServerClient(str(self.deployment.address),
                                        str(self.deployment.public_key), timeout_s=30.0)
        return self._client, self.deployment

    def _drop(self) -> bool:
        """Forget a server that died: the next ``_connect`` relaunches (``ensure`` does once
        the record says dead). True when its job ended at its walltime."""
        self.close()
        expired = False
        if self.deployment is not None:
            with contextlib.suppress(FabricError):
                expired = bool(self.ctx.manager.walltime_reached(self.deployment))
                self.ctx.manager.refresh(self.deployment)
        self.deployment = None
        return expired


def _lost(cause: FabricError, dep: Deployment) -> ModelServerUnavailable:
    return ModelServerUnavailable(
        f"the model server for {dep.model} ({dep.id}) died with this request in it; it is not "
        f"resent to a relaunched server, in case it is what killed it ({cause.message})",
        model=dep.model, deployment=dep.id)


def raise_first(outcomes: list[Outcome]) -> list[dict[str, Any]]:
    """The results in order, or the first input's typed error (callers that fail whole)."""
    for o in outcomes:
        if o.error is not None:
            raise o.error
    return [dict(o.result or {}) for o in outcomes]
