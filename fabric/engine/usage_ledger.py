"""The model server's count of the tokens it delivered on streams, for the site's usage DB.

A stream's client talks to the server itself (direct) or leaves its events buffered (poll),
and may disconnect at any time: the site cannot count its tokens from the client side. So the
server does. A ticket with the ``acc`` claim (``tickets.issue(account=True)``: what
``open_stream`` issues) opens a tally for its request: its prompt tokens, then every token
the engine emits for it; when the request ends (done, failed, cancelled, its client gone,
its buffer expired) the tally becomes an entry ``{request_id, subject, tokens,
prompt_tokens, completion_tokens, ts}``: the
``usage`` reply (operator ticket) hands the entries to the site, which records them against
the subject, the identity the site bound into the ticket.

Memory is bounded: with ``capacity`` tallies and entries held, new accounted submits are
refused with ``Overloaded`` (retry later) rather than serving tokens nobody would count.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from fabric.errors import Overloaded


@dataclass
class _Tally:
    subject: str
    prompt_tokens: int
    completion_tokens: int = 0


class UsageLedger:
    """Tallies of accounted requests in flight and entries of finished ones."""

    def __init__(self, capacity: int = 100_000) -> None:
        self.capacity = capacity
        self._open: dict[str, _Tally] = {}
        self._done: list[dict[str, Any]] = []

    def check_room(self, claims: dict[str, Any]) -> None:
        """``Overloaded`` if an accounted request could not be counted now."""
        if claims.get("acc") and len(self._open) + len(self._done) >= self.capacity:
            raise Overloaded("model server holds too much uncollected usage; retry shortly",
                             retry_after=5.0, reason="usage")

    def start(self, request_id: str, claims: dict[str, Any], prompt_tokens: int) -> None:
        """Open a tally for ``request_id`` if its ticket asks for server-side accounting."""
        if claims.get("acc"):
            self._open[request_id] = _Tally(str(claims.get("sub") or ""), int(prompt_tokens))

    def add(self, request_id: str, tokens: int) -> None:
        """Count ``tokens`` new tokens delivered for ``request_id``."""
        tally = self._open.get(request_id)
        if tally is not None:
            tally.completion_tokens += int(tokens)

    def finish(self, request_id: str, final: dict[str, Any] | None = None) -> None:
        """Close ``request_id``'s tally: the usage its "done" reports, else what was counted
        (failed, cancelled, abandoned)."""
        tally = self._open.pop(request_id, None)
        if tally is None:
            return
        prompt, completion = tally.prompt_tokens, tally.completion_tokens
        if final is not None and final.get("op") == "done":
            usage = (final.get("result") or {}).get("usage") or {}
            if usage:
                prompt = int(usage.get("prompt_tokens", 0))
                completion = int(usage.get("completion_tokens", 0))
        self._done.append({"request_id": request_id, "subject": tally.subject,
                           "tokens": prompt + completion, "prompt_tokens": prompt,
                           "completion_tokens": completion, "ts": time.time()})

    def take(self) -> list[dict[str, Any]]:
        """The finished entries, forgotten here (the site records them)."""
        out, self._done = self._done, []
        return out

    def close(self) -> list[dict[str, Any]]:
        """Every entry, open tallies closed as they stand: what the server leaves in its
        epitaph when it exits (the site records them, ``DeploymentManager._mark_dead``)."""
        for request_id in list(self._open):
            self.finish(request_id)
        return self.take()

    def __len__(self) -> int:
        return len(self._open) + len(self._done)
