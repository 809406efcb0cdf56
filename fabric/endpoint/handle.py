"""``ModelHandle``: what a user's function gets as its first argument at the site.

``fab.submit(fn, data, model="smollm2-135m")`` runs ``fn(handle, data)`` inside a request worker,
next to the warm model server; the handle sends that server requests with tickets the endpoint
signed for the caller, so a user function can do no more than the caller could from the SDK.
"""

from __future__ import annotations

import contextlib
import functools
import operator
import threading
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from fabric.errors import FabricError, InvalidRequest, ModelServerUnavailable, Overloaded

if TYPE_CHECKING:
    from fabric.endpoint.context import SiteContext


class ModelHandle:
    """Requests to one model's warm server, from inside a user function."""

    def __init__(self, context: SiteContext, model: str | None, version: str | None = None, *,
                 identity: str = "", timeout_s: float = 600.0) -> None:
        self._ctx = context
        self.model = model
        self.version = version
        self.identity = identity
        self.timeout_s = timeout_s
        self._lock = threading.Lock()
        self._client: Any = None
        self._dep: Any = None

    # -- the user's API -------------------------------------------------------------------

    def generate(self, prompt: str | None = None, *, messages: list[dict[str, str]] | None = None,
                 max_tokens: int = 64, temperature: float = 0.0, top_p: float = 1.0,
                 top_k: int = 0, seed: int | None = None, stop: Sequence[str] = (),
                 logprobs: bool = False, hooks: list[dict[str, Any]] | None = None) -> Any:
        """Generate text (a ``GenerationResult`` with ``.text``, ``.token_ids``...)."""
        from fabric.protocol import GenerationResult

        result = self.request({
            "kind": "generate", "prompt": prompt, "messages": messages,
            "sampling": {"max_tokens": max_tokens, "temperature": temperature, "top_p": top_p,
                         "top_k": top_k, "seed": seed, "stop": list(stop),
                         "logprobs": logprobs},
            "hooks": hooks or [],
        })
        return GenerationResult.model_validate(result)

    def chat(self, messages: list[dict[str, str]], **kwargs: Any) -> Any:
        """Generate a reply to chat ``messages`` (the model's chat template is applied)."""
        return self.generate(messages=messages, **kwargs)

    def embed(self, texts: str | Sequence[str], *, layer: int = -1, pooling: str = "mean",
              normalize: bool = True) -> Any:
        """Embedding vectors (numpy): ``(dim,)`` for one string, ``(n, dim)`` for a list."""
        from fabric.client.results import embeddings_from_results
        from fabric.protocol import MAX_BATCH_TEXTS, renumber_text_error

        single = isinstance(texts, str)
        items = [texts] if isinstance(texts, str) else list(texts)
        results = []
        # One batched request (one message, one array) per MAX_BATCH_TEXTS texts.
        for start in range(0, len(items), MAX_BATCH_TEXTS):
            req = {"kind": "embed", "prompts": items[start:start + MAX_BATCH_TEXTS],
                   "layers": [layer], "pooling": pooling, "normalize": normalize}
            try:
                results.append(self.request(req))
            except FabricError as exc:
                raise renumber_text_error(exc, functools.partial(operator.add, start)) from None
        vectors = embeddings_from_results(results)
        return vectors[0] if single else vectors

    def hidden_states(self, text: str, *, layers: Sequence[int] = (-1,),
                      positions: Sequence[int] | None = None) -> dict[str, Any]:
        """The residual stream after each of ``layers`` (torch tensors)."""
        from fabric.client.results import decode_tensors

        return dict(decode_tensors(self.request({
            "kind": "hidden_states", "prompt": text, "layers": list(layers),
            "positions": None if positions is None else list(positions)})))

    def logprobs(self, text: str, continuation: str) -> dict[str, Any]:
        """Log-probability of each token of ``continuation`` given ``text``."""
        from fabric.client.results import decode_tensors

        return dict(decode_tensors(self.request({
            "kind": "logprobs", "prompt": text, "continuation": continuation})))

    # -- plumbing -------------------------------------------------------------------------

    def request(self, fields: dict[str, Any]) -> dict[str, Any]:
        """Send one raw request (``InferenceRequest`` fields; model filled in); its result."""
        return self.request_many([fields])[0]

    def request_many(self, many: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Send several requests at once (the server batches them); results in order."""
        if self.model is None:
            raise InvalidRequest("this function was submitted with model=None: the handle has "
                                 "no model; pass model=... to fab.submit")
        from fabric.protocol import validate_request

        reqs = [validate_request({"model": self.model, "version": self.version, **f})
                for f in many]
        with self._lock:
            try:
                return self._send(reqs)
            except ModelServerUnavailable:
                # The server died between calls: drop it and let ensure() relaunch once.
                self._reset()
                return self._send(reqs)

    def _send(self, reqs: list[Any]) -> list[dict[str, Any]]:
        from fabric import tickets

        client, dep, manager = self._connect()
        key = manager.ticket_key()
        results: dict[str, dict[str, Any]] = {}
        pending = list(reqs)
        deadline = time.monotonic() + self.timeout_s
        while pending:
            items = [(r, tickets.issue(key, model=dep.model, request_id=r.request_id,
                                       subject=self.identity, ttl_s=self.timeout_s))
                     for r in pending]
            refusals = client.submit_many(items)
            fatal = _fatal([e for e in refusals if e is not None], len(pending))
            if fatal is not None and _wait_for_room(fatal, pending, deadline):
                continue
            if fatal is not None:
                raise fatal
            for req, err in zip(pending, refusals, strict=True):
                if err is None:
                    results[req.request_id] = client.result(req.request_id, self.timeout_s)
            # A full server queue is backpressure, not failure: what it refused is sent again
            # once what it took has finished (bulk calls send more than a queue holds).
            pending = [r for r, err in zip(pending, refusals, strict=True) if err is not None]
        manager.db.touch(dep.id)
        return [results[r.request_id] for r in reqs]

    def _connect(self) -> tuple[Any, Any, Any]:
        from fabric.serverclient import ServerClient

        manager = self._ctx.manager
        if self._client is None:
            entry = self._ctx.entry(str(self.model), self.version)
            self._dep = manager.ensure(entry)
            self._client = ServerClient(self._dep.address, self._dep.public_key,
                                        timeout_s=30.0)
        return self._client, self._dep, manager

    def _reset(self) -> None:
        if self._client is not None:
            self._client.close()
        if self._dep is not None:
            with contextlib.suppress(FabricError):
                self._ctx.manager.refresh(self._dep)
        self._client = None
        self._dep = None

    def close(self) -> None:
        """Release the connection to the server."""
        with self._lock:
            if self._client is not None:
                self._client.close()
                self._client = None

    def __repr__(self) -> str:
        return f"ModelHandle(model={self.model!r}, version={self.version!r})"


def _wait_for_room(refusal: FabricError, pending: list[Any], deadline: float) -> bool:
    """Sleep and say True if every request was refused for a full queue and all are batches:
    several workers' batches can fill a queue that each alone fits, and a batch is admitted
    whole or not at all, so it waits for room (till ``deadline``) instead of failing."""
    from fabric.protocol import QUEUE_FULL

    if not (isinstance(refusal, Overloaded) and refusal.details.get("reason") == QUEUE_FULL
            and all(r.prompts is not None for r in pending)):
        return False
    pause = min(float(refusal.details.get("retry_after") or 0.5), BATCH_RETRY_S)
    if time.monotonic() + pause > deadline:
        return False
    time.sleep(pause)
    return True


BATCH_RETRY_S = 0.5
"""Longest pause before a batch refused for a full queue is sent again."""


def _fatal(errors: list[FabricError], sent: int) -> FabricError | None:
    """The refusal to raise from a bulk submit, if any: one that is not backpressure, or any
    when nothing was accepted (a draining server refuses all with ``Overloaded``; retrying it
    would never end)."""
    hard = [e for e in errors if not isinstance(e, Overloaded)]
    if hard:
        return hard[0]
    return errors[0] if errors and len(errors) == sent else None
