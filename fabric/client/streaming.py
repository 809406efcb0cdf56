"""``Fabric.stream``: text chunks as the model server produces them.

Two ways to get the events, chosen by the transport:

* **direct**: the client can reach the model server (the local site, a tunnel), so it sends
  the request over its CURVE-encrypted ZMQ connection to that server (one per server for all
  its requests, ``fabric.client.direct``) and the server pushes each step's tokens as they are
  decoded;
* **poll**: the server is behind a site's firewall (no inbound ports), so the client long-polls
  the server's per-request event buffer through the transport (the client's one poller,
  ``fabric.client.poller``: one ``poll_requests`` task for all its open requests).

Either way a ``Stream`` is an iterator of ``str`` chunks; closing or cancelling it before the
end tells the server to stop generating (it frees the request's KV memory within one step). A
stream dropped unfinished (``for chunk in fab.stream(...): break``, no ``with``) is cancelled
the same way when it is garbage-collected, without waiting for the server's answer.
"""

from __future__ import annotations

import contextlib
import threading
import weakref
from collections.abc import Iterator
from types import TracebackType
from typing import TYPE_CHECKING, Any, Protocol

from fabric.client.decoding import parse_generation
from fabric.client.direct import PING_S, SILENCE_S
from fabric.errors import Cancelled, FabricError
from fabric.protocol import GenerationResult, InferenceRequest

if TYPE_CHECKING:
    from fabric.client.direct import DirectResults
    from fabric.client.poller import Poller
    from fabric.client.transport import Transport

__all__ = ["DirectSource", "EventSource", "PollSource", "Stream"]


class EventSource(Protocol):
    """Where a stream's events come from (direct ZMQ or long-poll)."""

    request_id: str

    def events(self) -> Iterator[dict[str, Any]]:
        """Event maps (``op`` "event"), then one ``{"op": "done", "result"}``; errors raise."""
        ...

    def cancel(self) -> str:
        """Ask the server to stop this request; returns what it was (queued/running/done)."""
        ...

    def close(self) -> None:
        """Release the connection (does not cancel by itself)."""
        ...

    def abandon(self) -> None:
        """Its ``Stream`` was dropped unfinished: cancel and release without waiting (run by
        a finalizer, so it must not block or take a lock its caller may hold)."""
        ...


class DirectSource:
    """Events pushed by the model server, over the client's one connection to it
    (``DirectResults``: one socket per server for all of the client's streams)."""

    site: str = ""
    """The site whose model server this is (set by the SDK)."""

    def __init__(self, info: dict[str, Any], request: InferenceRequest, direct: DirectResults,
                 silence_s: float = SILENCE_S, probe_timeout_s: float = PING_S) -> None:
        self._direct = direct
        self._feed = direct.open_stream(info, request, silence_s, probe_timeout_s)
        self.request_id = self._feed.request_id
        try:
            first = self._next()  # the server answers a submit before any event
            if first["op"] == "error":
                raise FabricError.from_dict(first["error"])
        except BaseException:
            self.close()
            raise

    @property
    def silence_s(self) -> float:
        """How long a silence is taken without asking whether the server still answers."""
        return self._feed.silence_s

    def relax(self) -> None:
        """Back to the default patience (a federation tightens it until the first token)."""
        self._feed.silence_s, self._feed.probe_s = SILENCE_S, PING_S

    def _next(self) -> dict[str, Any]:
        item = self._feed.queue.get()
        if isinstance(item, BaseException):
            raise item
        return item

    def events(self) -> Iterator[dict[str, Any]]:
        """Events as the server pushes them. A long silence is normal (queued behind others,
        a long prefill), a dead server is not: the connection's thread asks a silent server
        for its health and ends the stream with ``ModelServerUnavailable`` if it does not
        answer."""
        while True:
            msg = self._next()
            if msg["op"] == "error":
                raise FabricError.from_dict(msg["error"])
            if msg["op"] not in ("event", "done"):
                continue
            yield msg
            if msg["op"] == "done":
                return

    def cancel(self) -> str:
        """Cancel over the client's connection to the server (safe from any thread: the
        connection's own thread sends it)."""
        return self._direct.cancel(self._feed).result()

    def close(self) -> None:
        """Stop following the request (its later messages are dropped)."""
        self._direct.forget(self._feed)

    def abandon(self) -> None:
        """Cancel over the connection and stop following, answering no one."""
        self._direct.abandon(self._feed)


class PollSource:
    """Events fetched through the client's ``Poller``: one long-poll task at a time serves
    every open stream and request of the client (``fabric.client.poller``)."""

    site: str = ""
    """The site polled (set by the SDK)."""

    def __init__(self, transport: Transport, info: dict[str, Any], model: str, auth: Any,
                 poller: Poller) -> None:
        self.request_id = str(info["request_id"])
        self._transport = transport
        self._ticket = str(info["ticket"])
        self._model = model
        self._auth = auth
        self._poller = poller
        self._tracked = poller.track(info, model, events=True)

    def events(self) -> Iterator[dict[str, Any]]:
        """Events in order, as the poller brings them."""
        while True:
            item = self._tracked.queue.get()
            if isinstance(item, BaseException):
                raise item
            yield item
            if item.get("op") == "done":
                return

    def cancel(self) -> str:
        """Cancel through the endpoint (which forwards to the server)."""
        from fabric.wire.functions import cancel_request

        # Still followed: the server's final word (cancelled) reaches a blocked reader.
        return str(self._transport.submit(
            cancel_request, self._model, self.request_id, self._ticket, self._auth
        ).result())

    def close(self) -> None:
        """Stop following the request."""
        self._poller.forget(self.request_id)

    def abandon(self) -> None:
        """Cancel through the endpoint (a task round trip, so off the caller's thread), then
        stop following."""
        cancel_in_background(self, close=True)


def cancel_in_background(source: EventSource, close: bool = False) -> None:
    """Cancel ``source`` on a thread of its own (and close it after, if ``close``), whatever
    fails: for a stream nobody reads any more, without making its caller wait."""
    def run() -> None:
        with contextlib.suppress(Exception):
            source.cancel()
        if close:
            with contextlib.suppress(Exception):
                source.close()

    threading.Thread(target=run, daemon=True, name="fabric-background-cancel").start()


class Stream:
    """An iterator of text chunks from one generation.

    Use it as a context manager (or call ``close``) so that leaving early stops the server::

        with fab.stream("Tell me about tides", max_tokens=200) as s:
            for chunk in s:
                print(chunk, end="", flush=True)
        print(s.result.finish_reason)

    ``text``, ``token_ids`` and ``logprobs`` accumulate as chunks arrive (at the end they are
    the result's: a stop string's tokens, streamed before the stop was seen whole, are dropped);
    ``result`` is the full ``GenerationResult`` once the stream has finished (``None`` before, or
    if closed early).
    """

    def __init__(self, source: EventSource) -> None:
        self._source = source
        self._events = source.events()
        self._lock = threading.Lock()
        self._finished = False
        self._reading = 0  # threads inside __next__ (they close the source at the end)
        self.request_id = source.request_id
        """The request's id at the server."""
        self.text = ""
        """Text received so far."""
        self.token_ids: list[int] = []
        """Token ids received so far."""
        self.logprobs: list[float] = []
        """Log-probabilities of the received tokens (when requested)."""
        self.tops: list[list[tuple[int, float]]] = []
        """Each received token's position's most likely tokens (``top_logprobs``)."""
        self.result: GenerationResult | None = None
        """The final result, set when the server says the request is done."""
        self.cancelled = False
        """True once ``close``/``cancel`` stopped the request before it finished."""
        self._cancel_asked = False
        # Dropped unfinished: the server stops generating what nobody will read. Not at
        # interpreter exit (the connections are going then).
        self._dropped = weakref.finalize(self, source.abandon)
        self._dropped.atexit = False

    @property
    def site(self) -> str | None:
        """The site serving the stream (a federation's choice; fixed once tokens came)."""
        site = getattr(self._source, "site", None)
        return str(site) if site else None

    def __iter__(self) -> Iterator[str]:
        return self

    def __next__(self) -> str:
        with self.reading():
            while not self._finished:
                try:
                    event = next(self._events)
                except BaseException as exc:
                    self.end(None if isinstance(exc, StopIteration) else exc)
                    break
                chunk = self.absorb(event)
                if chunk:
                    return chunk
            raise StopIteration

    @contextlib.contextmanager
    def reading(self) -> Iterator[None]:
        """Around a wait for the source's next event: a ``cancel`` meanwhile leaves the
        stream open for the reader, who then gets the server's final message and ends it."""
        with self._lock:
            self._reading += 1
        try:
            yield
        finally:
            with self._lock:
                self._reading -= 1

    @property
    def is_read(self) -> bool:
        """True while a reader waits for the source's next event (inside ``reading``)."""
        with self._lock:
            return self._reading > 0

    def end(self, exc: BaseException | None) -> None:
        """The source stopped with ``exc`` (``None``: with no result): the stream is finished.
        Returns quietly when this client cancelled it, else raises the error."""
        self._finish()
        if self._cancel_asked and (exc is None or isinstance(exc, Cancelled)):
            return  # we asked for it: end quietly
        if exc is None:
            raise FabricError(f"stream {self.request_id} ended without a result") from None
        raise exc

    def absorb(self, event: dict[str, Any]) -> str:
        """Take one event from the source (``__next__``, or a reader on an event loop): its
        chunk of text ("" for none); the final "done" sets ``result`` and finishes."""
        if event.get("op") == "done":
            self.result = parse_generation(event["result"])
            if self.result.site is None:
                self.result.site = self.site
            # Tokens of a stop string streamed before it was seen whole: the result lists
            # only the returned text's (the text never held them).
            if self.result.finish_reason == "stop":
                keep = len(self.result.token_ids)
                del self.token_ids[keep:], self.logprobs[keep:], self.tops[keep:]
            self._finish()
            return ""
        self.token_ids.extend(int(t) for t in event.get("token_ids") or [])
        if event.get("logprobs"):
            self.logprobs.extend(float(x) for x in event["logprobs"])
        for top in event.get("top_logprobs") or []:
            self.tops.append([(int(t), float(lp)) for t, lp in top])
        chunk = str(event.get("text") or "")
        self.text += chunk
        return chunk

    def _finish(self) -> None:
        with self._lock:
            if self._finished:
                return
            self._finished = True
        self._dropped.detach()
        self._source.close()

    @property
    def finished(self) -> bool:
        """True once the stream has ended (done, failed, closed or cancelled)."""
        return self._finished

    def wait(self) -> GenerationResult:
        """Read the rest of the stream and return the final result."""
        for _ in self:
            pass
        if self.result is None:
            raise FabricError(f"stream {self.request_id} was closed before it finished")
        return self.result

    def cancel(self) -> str:
        """Stop the request at the server now; returns what it was (queued/running/done/...).

        Safe to call from another thread while one is iterating.
        """
        if self._finished and not self.cancelled:
            return "done"
        # Marked before asking: the server's "cancelled" can reach a reading thread before
        # its answer to us does, and that reader must end quietly, not raise Cancelled.
        self._cancel_asked = True
        was = self._source.cancel()
        self.cancelled = True
        # A reader blocked in __next__ waits for the server's final message and closes the
        # source when it comes; closing it here first would drop that message (or, polled,
        # stop fetching it) and leave the reader waiting.
        if not self.is_read:
            self._finish()
        return was

    def close(self) -> None:
        """Stop reading; if the request is still going, cancel it so the server frees it."""
        if not self._finished:
            try:
                self.cancel()
            finally:
                self._finish()

    def __enter__(self) -> Stream:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
