"""One site's request path after admission: hand-off, results, and cold-start status.

A request worker only admits a request (``open_stream``) and hands it off; what happens next
depends on whether this client can reach the site's model servers::

    client --open_stream task--> request worker (policy, warm server, ticket)
       |  direct (local site): client --zmq--> model server --result--> client  (DirectResults)
       |  poll (remote site):  site submits; the client's one long-poll brings it (Poller)

While a call waits on a cold server, ``RequestPath.wait`` asks for the deployment's state now
and then (a control message on the embedded site, a status watch folded into the long-poll
elsewhere) and hands it to ``on_status``.
"""

from __future__ import annotations

import concurrent.futures as cf
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

from fabric.catalog import HASH_PREFIX_MIN
from fabric.client.admission import Admissions
from fabric.client.direct import DirectResults
from fabric.client.liveness import EndpointLiveness
from fabric.client.poller import LOST_AFTER_S, Poller
from fabric.client.status import StatusCallback
from fabric.client.transport import Transport, chain, settle
from fabric.errors import DeadlineExceeded, FabricError
from fabric.protocol import InferenceRequest

log = logging.getLogger("fabric.client")


class RequestPath:
    """The hand-off plumbing of one single-site ``Fabric``: its poller, its direct
    connections, and the status watch of calls waiting on a cold start."""

    def __init__(self, transport: Callable[[], Transport], auth: Any,
                 on_status: StatusCallback | None, status_interval_s: float,
                 handoff: bool) -> None:
        """``transport`` opens (or returns) the site's transport; the rest as ``Fabric``'s
        arguments of the same names."""
        self._transport = transport
        self.auth = auth
        self.on_status = on_status
        self.status_interval_s = status_interval_s
        self.handoff = handoff
        self._last_state: dict[str, Any] = {}
        self._lock = threading.Lock()
        self._poller: Poller | None = None
        self._direct: DirectResults | None = None
        self._admissions: Admissions | None = None
        self._shared: RequestPath | None = None

    def share(self, other: RequestPath) -> None:
        """Use ``other``'s direct connections and admission queue (a ``with_auth`` twin):
        one I/O thread, one admission thread and one socket per server for every identity
        a gateway serves, not two threads each. Admissions still carry this path's auth
        (never mixed in one task); the long-poll, which polls with it, stays this path's."""
        self._shared = other

    def poller(self) -> Poller:
        """The long-poll multiplexer for this client's open requests (sites it cannot reach)."""
        transport = self._transport()
        with self._lock:
            if self._poller is None:
                self._poller = Poller(
                    transport, self.auth,
                    interval_s=float(getattr(transport, "poll_interval_s", 0.0)),
                    lost_after_s=float(getattr(transport, "poll_lost_after_s", LOST_AFTER_S)))
            return self._poller

    def admit(self, body: dict[str, Any], mode: str, hold_s: float = 0.0,
              first_events: bool = False) -> Future[dict[str, Any]]:
        """Admit the request ``body`` with this path's auth (``Admissions.admit``)."""
        return self.admissions().admit(body, mode, hold_s, first_events, auth=self.auth)

    def admissions(self) -> Admissions:
        """The queue this client's admissions go through (few tasks for many requests)."""
        if self._shared is not None:
            return self._shared.admissions()
        transport = self._transport()
        with self._lock:
            if self._admissions is None:
                self._admissions = Admissions(
                    transport, self.auth,
                    slots=int(getattr(transport, "admission_slots", 4)),
                    window_s=float(getattr(transport, "admission_window_s", 0.0)),
                    batches=bool(getattr(transport, "admission_batches", True)))
            return self._admissions

    def direct(self) -> DirectResults:
        """The direct connections to model servers (sites whose servers it can reach)."""
        if self._shared is not None:
            return self._shared.direct()
        with self._lock:
            if self._direct is None:
                self._direct = DirectResults()
            return self._direct

    def close(self) -> None:
        """Stop the poller and close the direct connections (idempotent; shared ones are
        left to their owner)."""
        with self._lock:
            poller, self._poller = self._poller, None
            direct, self._direct = self._direct, None
            admissions, self._admissions = self._admissions, None
        for part in (admissions, poller, direct):
            if part is not None:
                part.close()

    def future(self, request: InferenceRequest) -> Future[dict[str, Any]]:
        """Run one built request; its result's dict (or typed error) as a future.

        Non-blocking at the site: a request worker only admits the request (``open_stream``:
        policy, a warm server, a ticket) and hands it off. Where the client reaches the
        model server (the local site) it submits the request itself and the server answers
        it directly (``DirectResults``); elsewhere the site submits it and the client's one
        long-poll brings the result (``Poller``). With ``handoff=False`` a worker serves it
        whole (``run_request``), as before.

        Cancelling the future (``Future.cancel``) cancels the request at the server: a cancel
        over the client's connection to it, or a ``cancel_request`` task through the site;
        one cancelled before its admission came back is not sent at all (direct) or
        cancelled as soon as it is admitted (poll). With ``handoff=False`` it stops only the
        wait (the worker serving it holds no ticket to cancel with).
        """
        from fabric.wire.functions import run_request

        transport = self._transport()
        body = request.model_dump(mode="json")
        out: Future[dict[str, Any]] = Future()
        if not self.handoff:
            chain(transport.submit(run_request, body, self.auth), out)
            return out
        mode = "direct" if transport.can_reach_servers else "poll"
        # A lone request (nothing else of ours open to poll for) may wait for its result at
        # the site a little: a short one then costs one task instead of two.
        hold = 0.0 if mode == "direct" or self.poller().busy else HOLD_S
        admitted = self.admit(body, mode, hold)
        lock = threading.Lock()  # between the hand-off and a cancel from another thread
        stop: list[Callable[[], None]] = []  # how to cancel it once it is at its server

        def handed_off(f: Future[Any]) -> None:
            try:
                info = dict(f.result())
                if info.get("done"):  # it finished while the site held it
                    if info.get("error"):
                        raise FabricError.from_dict(info["error"])
                    settle(out, dict(info.get("result") or {}))
                    return
                with lock:
                    if out.cancelled():  # before its admission came back
                        if mode == "poll":  # the site has submitted it: cancel it there
                            self._cancel_polled(transport, info, request.model)
                        return
                    if mode == "direct":
                        direct = self.direct()  # the one it went through, even once closed
                        inner = direct.submit(info, request)
                        stop.append(lambda: direct.withdraw(info, request))
                    else:
                        inner = self.poller().track(info, request.model, events=False).future
                        stop.append(lambda: self._cancel_polled(transport, info, request.model))
            except BaseException as exc:
                settle(out, exc=exc)
                return
            chain(inner, out)

        def cancelled(f: Future[Any]) -> None:
            if not f.cancelled():
                return
            with lock:
                todo = list(stop)
            for cancel in todo:
                try:
                    cancel()
                except Exception as exc:  # a closed client: nothing runs for it any more
                    log.debug("cancelling %s: %s", request.request_id, exc)

        out.add_done_callback(cancelled)
        admitted.add_done_callback(handed_off)
        return out

    def _cancel_polled(self, transport: Transport, info: dict[str, Any], model: str) -> None:
        """Stop following a polled request and cancel it through the site (a task round trip,
        so on a thread of its own: this runs where a task was cancelled)."""
        from fabric.client.transport import submit_or_fail
        from fabric.wire.functions import cancel_request

        rid = str(info["request_id"])
        with self._lock:
            poller = self._poller
        if poller is not None:
            poller.forget(rid)

        def send() -> None:
            done = submit_or_fail(transport, cancel_request, model, rid,
                                  str(info["ticket"]), self.auth)
            try:
                done.result()
            except Exception as exc:
                log.debug("cancel of %s at the site failed: %s", rid, exc)

        threading.Thread(target=send, daemon=True, name="fabric-cancel").start()

    def wait(self, future: Future[Any], model: str, version: str | None) -> Any:
        """``future.result()``, reporting the deployment's state to ``on_status`` while slow.

        Status is asked for only once the call has waited a while, one query at a time, and
        no more once the server is ready, so warm calls cost nothing extra. At a site behind
        Globus Compute a wait that goes on also watches the endpoint's heartbeat
        (``fabric.client.liveness``), with or without ``on_status``: a dead endpoint's
        call ends with a retryable ``EndpointError`` instead of waiting for ever. A server found
        ready at once is not reported (a call that is merely slow has nothing to explain);
        "ready" after a reported cold start is.
        """
        liveness = self._liveness()
        if self.on_status is None and liveness is None:
            return future.result()
        status_future: Future[Any] | None = None
        reported = False
        # No deployment status is asked for without ``on_status`` to tell it to.
        next_query = time.monotonic() + (min(1.0, self.status_interval_s)
                                         if self.on_status is not None else float("inf"))
        while True:
            waiting: list[Future[Any]] = [future]
            if status_future is not None:
                waiting.append(status_future)
            wake = min(next_query, liveness.next_at if liveness else next_query)
            cf.wait(waiting, timeout=max(0.05, wake - time.monotonic()),
                    return_when=cf.FIRST_COMPLETED)
            if future.done():
                return future.result()
            if liveness is not None:
                # Raises at a dead endpoint. The task already sent stays queued at the
                # service: should the endpoint come back, it runs, and its answer is dropped.
                liveness.check_due()
            if status_future is not None and status_future.done():
                done, status_future = status_future, None
                try:
                    status = dict(done.result())
                except FabricError as exc:
                    log.debug("deployment status query failed: %s", exc)
                    status = {}
                if self.on_status and status and (reported or status.get("state") != "ready"):
                    self.on_status({"model": model, **status})
                    reported = True
                if status.get("state") == "ready":
                    return future.result()
                next_query = time.monotonic() + self.status_interval_s
            if status_future is None and time.monotonic() >= next_query:
                status_future = self.query_status(model, version)

    def _liveness(self) -> EndpointLiveness | None:
        """A watch of the endpoint's heartbeat for a site behind Globus Compute (its
        transport reports one: ``endpoint_status``); None elsewhere."""
        transport = self._transport()
        status = getattr(transport, "endpoint_status", None)
        if not callable(status):
            return None
        return EndpointLiveness(status, float(getattr(transport, "offline_check_s", 30.0)),
                                transport.site)

    def query_status(self, model: str, version: str | None) -> Future[Any]:
        """The deployment's state, as a future.

        The embedded site answers a control message from its own process: a status *task*
        could sit behind the very requests that are waiting for the server (every request
        worker can be busy waiting on a cold start). Elsewhere it is a ``deployment_status``
        task (remote endpoints scale their workers).
        """
        transport = self._transport()
        control = getattr(transport, "control", None)
        if not callable(control):
            return self.watch_status(model, version)
        future: Future[Any] = Future()
        try:
            reply = control("status", timeout_s=5.0, health=False)
            records = [d for d in reply.get("deployments") or []
                       if d.get("model") == model and d.get("state") != "dead"
                       and names_version(d, version)]
            if not records and model not in reply.get("models", [model]):
                future.set_result({})  # not served here: nothing to say, the call's error comes
                return future
            # Newest first; a missing record means the request is about to launch one.
            future.set_result(records[0] if records else {"state": "absent", "model": model})
        except FabricError as exc:
            future.set_exception(exc)
        except cf.TimeoutError:  # a busy site: the call goes on, only its status line waits
            future.set_exception(DeadlineExceeded("the site's status did not come within 5 s"))
        return future

    def watch_status(self, model: str, version: str | None) -> Future[Any]:
        """The deployment's next state, folded into the client's long-poll (the site holds
        it until the state differs from the last one reported), as a future."""
        future: Future[Any] = Future()
        poller = self.poller()
        last = self._last_state.get(model)

        def heard(status: dict[str, Any]) -> None:
            poller.unwatch(key)
            self._last_state[model] = status.get("state")
            if not future.done():
                future.set_result(status)

        key = poller.watch(model, version, heard, state=last)
        return future


HOLD_S = 1.0
"""How long a site may hold a lone request's admission for its result (poll mode only)."""


def names_version(deployment: dict[str, Any], version: str | None) -> bool:
    """Whether ``version`` (None: any; a version name; or a weights-hash pin, ``sha256:<hex>``
    or bare hex, as ``provenance.rerun()`` pins) names ``deployment``'s."""
    if version is None or deployment.get("version") == version:
        return True
    hexes = version.removeprefix("sha256:").lower()
    return (len(hexes) >= HASH_PREFIX_MIN and all(c in "0123456789abcdef" for c in hexes)
            and str(deployment.get("sha256") or "").startswith(hexes))
