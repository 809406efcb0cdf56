"""Running a user function outside the request worker, behind a capability.

.. code:: text

    request worker (holds the site: ticket key, state DB, caller's token)
      authorize the caller for the model -> CapabilityGuard (identity, model, limits, expiry)
      take   this worker's spare process (fabric.endpoint.userchild: python -m
             fabric.endpoint.userproc FD, started before the call, imports done, waiting):
             clean env, cwd a private temp dir, umask 077, only FD inherited, own session,
             the site's user_functions.run_as user; a new one if there is no spare
      send   the caller's pickled (fn, args, kwargs), the capability token     (never opened here)
      serve  each "request" from it: capability (identity, model, counts, tokens, expiry)
             -> the site's policy (quotas; one request counted) -> ServerSession -> usage
             recorded against the caller: one row per request, its tokens
      until  "return" (the value, still serialised for the caller) / "raised" / death / expiry
      kill   its whole process group, remove the temp dir; start the next spare (background)

The worker never unpickles anything the child sends: requests are msgpack data it validates
again, the returned value travels on to the SDK as the string the child made.
"""

from __future__ import annotations

import select
import socket
import time
import uuid
from typing import TYPE_CHECKING, Any

from fabric.endpoint import userproc
from fabric.endpoint.capability import CapabilityGuard
from fabric.endpoint.userchild import SPARES, STARTUP_S, UserChild, clean_env
from fabric.errors import CapabilityDenied, DeadlineExceeded, FabricError, UserFunctionError

if TYPE_CHECKING:
    from fabric.endpoint.context import SiteContext
    from fabric.endpoint.session import ServerSession

GRACE_S = 5.0
"""How long a user function may still take to hand back its value after its capability
expired, before its process is killed."""


def run_user_call(ctx: SiteContext, call: str, *, model: str | None, version: str | None,
                  identity: str, auth: Any) -> bytes:
    """Run the caller's packed ``(fn, args, kwargs)`` in a process of its own (this worker's
    spare); the value it returned, pickled for the caller (never unpickled here), or its
    typed error."""
    limits = ctx.site.user_functions
    child: UserChild | None = None
    server: _Server | None = None
    try:
        child = SPARES.take(limits.run_as)
        # The capability's life starts with its call, not with the spare.
        guard = CapabilityGuard(identity=identity, model=model, version=version,
                                max_requests=limits.max_requests,
                                max_tokens=limits.max_tokens, ttl_s=limits.timeout_s)
        server = _Server(ctx, guard, auth)
        child.sock.settimeout(STARTUP_S)
        userproc.send(child.sock, {"op": "call", "call": call, "capability": guard.token(),
                                   "model": model, "version": version, "identity": identity})
        return server.serve(child.sock, child)
    finally:
        if server is not None:
            server.close()
        if child is not None:
            SPARES.finish(child, limits.run_as)  # killed now; the next spare in the background
        else:
            SPARES.refill(limits.run_as)


class _Server:
    """The worker's side of one user function's channel."""

    def __init__(self, ctx: SiteContext, guard: CapabilityGuard, auth: Any) -> None:
        self.ctx = ctx
        self.guard = guard
        self._auth = auth
        self._session: ServerSession | None = None

    def serve(self, sock: socket.socket, child: UserChild) -> bytes:
        """Answer the child's requests until it returns, raises, dies or runs out of time."""
        deadline = self.guard.capability.expires + GRACE_S
        while True:
            left = deadline - time.time()
            if left <= 0:
                raise DeadlineExceeded(
                    f"the user function ran past its capability's expiry (the site's "
                    f"user_functions.timeout_s = {self.ctx.site.user_functions.timeout_s:.0f} s)"
                    "; it was killed", timeout_s=self.ctx.site.user_functions.timeout_s)
            readable, _, _ = select.select([sock], [], [], min(left, 1.0))
            if not readable:
                continue  # a function may think a long time between requests
            sock.settimeout(60.0)  # a message once begun arrives whole (sendall)
            try:
                msg = userproc.receive(sock)
            except (userproc.ChannelClosed, OSError):
                code = child.proc.wait(10)
                raise UserFunctionError(
                    f"the user function's process exited (code {code}) without a result",
                    exit_code=code) from None
            op = msg.get("op")
            if op == "return":
                value = msg.get("value")
                if not isinstance(value, bytes):
                    raise UserFunctionError("the user function's process sent no value")
                return value
            if op == "raised":
                raise FabricError.from_dict(dict(msg.get("error") or {}))
            if op != "request":
                raise UserFunctionError(f"the user function's process sent {op!r}")
            userproc.send(sock, self._answer(msg))

    def _answer(self, msg: dict[str, Any]) -> dict[str, Any]:
        try:
            return {"op": "results", "results": self._requests(msg)}
        except FabricError as err:
            return {"op": "error", "error": err.to_dict()}

    def _requests(self, msg: dict[str, Any]) -> list[dict[str, Any]]:
        from fabric.endpoint.session import ServerSession, raise_first, token_estimate
        from fabric.errors import InvalidRequest
        from fabric.protocol import validate_request

        raw = msg.get("requests")
        if not isinstance(raw, list) or not raw or not all(isinstance(r, dict) for r in raw):
            raise InvalidRequest("a handle request carries a non-empty list of requests")
        cap = self.guard.verify(msg.get("capability"))
        # The worker names the requests (a child cannot take another request's id).
        reqs = [validate_request({**r, "model": msg.get("model"), "version": msg.get("version"),
                                  "request_id": uuid.uuid4().hex}) for r in raw]
        estimate = sum(token_estimate(r) for r in reqs)
        self.guard.admit(msg.get("capability"), model=msg.get("model"),
                         version=msg.get("version"), requests=len(reqs), tokens=estimate)
        used = 0
        try:
            # The site's own policy too: the caller may have lost access, or used its quota.
            self.ctx.authorize(self._auth, str(cap.model), estimate)
            if self._session is None:
                self._session = ServerSession(
                    self.ctx, self.ctx.entry(str(cap.model), cap.version), cap.identity,
                    timeout_s=max(1.0, cap.expires - time.time()))
            outcomes = self._session.run(reqs)
            for req, outcome in zip(reqs, outcomes, strict=True):
                if outcome.result is not None:
                    tokens = _tokens(outcome.result)
                    used += tokens
                    self.ctx.record_usage(cap.identity, str(cap.model), tokens, req.request_id)
            return raise_first(outcomes)
        finally:
            self.guard.settle(estimate, used)

    def close(self) -> None:
        """Release the connection to the model server."""
        if self._session is not None:
            self._session.close()


def _tokens(result: dict[str, Any]) -> int:
    usage = result.get("usage") or {}
    return int(usage.get("prompt_tokens", 0)) + int(usage.get("completion_tokens", 0))


__all__ = ["CapabilityDenied", "clean_env", "run_user_call"]
