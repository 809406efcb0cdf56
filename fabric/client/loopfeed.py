"""``LoopDirectSource``: a direct stream read on an asyncio event loop, with no thread of its own.

``DirectSource`` is read by a thread that blocks on its feed's queue. ``AsyncFabric`` gave each
stream such a thread, and each admission a pool thread that waited for it, so every token
crossed two threads on its way to the event loop, and 32 open streams were 64 threads
contending for the GIL with the loop that serves them (the gateway's). Here the connection's
I/O thread hands each message to the loop itself::

    DirectResults' I/O thread --feed.put--> loop.call_soon_threadsafe --> await next_event()

The stream's admission is awaited the same way (the admissions queue's future, wrapped), so
opening and reading a stream costs the event loop callbacks, not threads. ``Stream`` keeps the
stream's state (text, tokens, result, cancel): this source only delivers its events.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from fabric.client.direct import Item
from fabric.errors import Cancelled, FabricError, InvalidRequest

if TYPE_CHECKING:
    from fabric.client.direct import DirectResults, StreamFeed
    from fabric.protocol import InferenceRequest

__all__ = ["LoopDirectSource"]


class LoopDirectSource:
    """The events of one direct stream, delivered to the event loop that opened it."""

    site: str = ""
    """The site whose model server this is (set by the SDK)."""

    def __init__(self, feed: StreamFeed, direct: DirectResults,
                 items: asyncio.Queue[Item]) -> None:
        """Use ``open``."""
        self._feed = feed
        self._direct = direct
        self._items = items
        self._loop = asyncio.get_running_loop()
        self.request_id = feed.request_id

    @classmethod
    async def open(cls, info: dict[str, Any], request: InferenceRequest,
                   direct: DirectResults) -> LoopDirectSource:
        """Send the admitted ``request`` (``info``: its admission) to its server and wait
        for the server's answer; raises the server's typed refusal."""
        loop = asyncio.get_running_loop()
        items: asyncio.Queue[Item] = asyncio.Queue()

        def sink(item: Item) -> None:
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody reads
                loop.call_soon_threadsafe(items.put_nowait, item)

        source = cls(direct.open_stream(info, request, sink=sink), direct, items)
        try:
            first = await source._next()  # the server answers a submit before any event
        except FabricError:
            source.close()
            raise
        except BaseException:  # the caller went away: the server must not generate for nobody
            source.abandon()
            raise
        if first["op"] == "error":
            source.close()
            raise FabricError.from_dict(first["error"])
        return source

    async def _next(self) -> dict[str, Any]:
        if asyncio.get_running_loop() is not self._loop:  # its events go to that loop only
            raise InvalidRequest(f"stream {self.request_id} is read on the event loop that "
                                 "opened it; this is another one (read it where it was opened, "
                                 "or open it on this loop)")
        item = await self._items.get()
        if isinstance(item, BaseException):
            raise item
        return item

    async def next_event(self) -> dict[str, Any]:
        """The next "event" message, or the final "done"; the server's error raises. A dead
        server ends it with ``ModelServerUnavailable`` (the connection's health check)."""
        while True:
            msg = await self._next()
            if msg["op"] == "error":
                raise FabricError.from_dict(msg["error"])
            if msg["op"] in ("event", "done"):
                return msg

    def events(self) -> Iterator[dict[str, Any]]:
        """Not for threads: this stream's events go to its event loop."""
        raise InvalidRequest(f"stream {self.request_id} is read on its event loop "
                             "(async for chunk in stream), not iterated")
        yield {}  # a generator, as ``Stream`` expects: the error comes at the first read

    def cancel(self) -> str:
        """Ask the server to stop the request; its answer (blocks: call it off the loop)."""
        return self._direct.cancel(self._feed).result()

    def close(self) -> None:
        """Stop following the request. A reader waiting on the loop ends as cancelled (its
        later messages are dropped, so it would otherwise wait for ever)."""
        self._direct.forget(self._feed)
        self._feed.put(Cancelled(f"stream {self.request_id} was closed"))

    def abandon(self) -> None:
        """Cancel and stop following, answering no one (a dropped stream's finalizer)."""
        self._direct.abandon(self._feed)
