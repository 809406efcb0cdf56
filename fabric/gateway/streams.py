"""Server-sent events for streamed completions.

One SSE event per chunk (``data: {json}`` and a blank line), ``data: [DONE]`` at the end, as
OpenAI does. With ``n`` > 1 the choices' streams run at once and their chunks interleave, each
chunk naming its choice ``index``. A client that goes away cancels the generation at the server
(the streams are closed when the response's generator is). When the gateway shuts down
(``OpenStreams.stop``), each open stream ends at once with a ``GatewayStopping`` error event
(retryable) and its generation is cancelled; the connection then closes without the server
having to cancel the response's task.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from fabric.aio import AsyncFabric, AsyncStream
from fabric.errors import FabricError
from fabric.gateway.errors import GatewayStopping, error_body

__all__ = ["OpenStreams", "Piece", "guarded", "open_streams", "pieces", "sse", "sse_error"]

DONE = "data: [DONE]\n\n"


def sse(data: dict[str, Any]) -> str:
    """One SSE event."""
    return f"data: {json.dumps(data, separators=(',', ':'))}\n\n"


def sse_error(exc: FabricError) -> str:
    """The event that tells an OpenAI client the stream failed (it raises ``APIError``)."""
    return sse(error_body(exc))


@dataclass
class Piece:
    """A chunk of choice ``index`` with the tokens that came with it; ``text`` None: the
    choice's stream has ended (``stream.result`` holds its result)."""

    index: int
    text: str | None
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    tops: list[list[tuple[int, float]]] = field(default_factory=list)


async def open_streams(client: AsyncFabric, calls: Sequence[dict[str, Any]]) -> list[AsyncStream]:
    """Open one stream per keyword set, all at once; if one fails, close the others."""
    opened = await asyncio.gather(*(client.stream(**kw) for kw in calls),
                                  return_exceptions=True)
    streams = [s for s in opened if isinstance(s, AsyncStream)]
    for failure in opened:
        if isinstance(failure, BaseException):
            for s in streams:
                s.close_soon()
            raise failure
    return streams


async def pieces(streams: list[AsyncStream]) -> AsyncIterator[Piece]:
    """Every stream's chunks as they come, interleaved; errors propagate."""
    if len(streams) == 1:
        # The usual case (n=1, one prompt): read the stream here. A pump task and a queue
        # would put two more event-loop turns between a token's arrival and its SSE event,
        # each behind every other ready callback (32 busy streams: ~1-2 ms each).
        stream = streams[0]
        try:
            async for chunk in stream:
                yield Piece(0, chunk, stream.last_token_ids, stream.last_logprobs,
                            stream.last_tops)
            yield Piece(0, None)
        finally:
            stream.close_soon()  # a client that went away: cancel at the server
        return
    queue: asyncio.Queue[Piece | BaseException] = asyncio.Queue()

    async def pump(index: int, stream: AsyncStream) -> None:
        try:
            async for chunk in stream:
                queue.put_nowait(Piece(index, chunk, stream.last_token_ids,
                                       stream.last_logprobs, stream.last_tops))
            queue.put_nowait(Piece(index, None))
        except BaseException as exc:
            queue.put_nowait(exc)

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        left = len(streams)
        while left:
            item = await queue.get()
            if isinstance(item, BaseException):
                raise item
            if item.text is None:
                left -= 1
            yield item
    finally:
        for task in tasks:
            task.cancel()
        for stream in streams:
            stream.close_soon()


class OpenStreams:
    """The tasks sending SSE responses, while they wait for their next event (one per app)."""

    def __init__(self) -> None:
        self.waiting: set[asyncio.Task[Any]] = set()
        self.stopping = False

    def stop(self) -> None:
        """End every open stream with a ``GatewayStopping`` event (call on the event loop, as
        the server's shutdown begins). A task waiting for its next event is woken at once; one
        busy sending ends before it asks for the next."""
        self.stopping = True
        for task in list(self.waiting):
            task.cancel(STOPPING)


STOPPING = "the gateway is stopping"


async def guarded(events: AsyncGenerator[str, None],
                  live: OpenStreams | None = None) -> AsyncIterator[str]:
    """``events`` then ``[DONE]``; a fabric error mid-stream becomes an error event instead,
    and so does the gateway's shutdown (``live.stop``)."""
    task = asyncio.current_task()
    try:
        while True:
            if live is not None and live.stopping:
                yield sse_error(GatewayStopping(f"{STOPPING}: send the request again"))
                return
            if live is not None and task is not None:
                live.waiting.add(task)
            try:
                event = await anext(events)
            except StopAsyncIteration:
                break
            except FabricError as exc:
                yield sse_error(exc)
                return
            except asyncio.CancelledError:
                if live is None or not live.stopping or task is None:
                    raise
                if task.uncancel():  # cancelled for another reason too
                    raise
                continue  # the top of the loop ends it
            finally:
                if live is not None and task is not None:
                    live.waiting.discard(task)
            yield event
    finally:
        with contextlib.suppress(Exception):
            await events.aclose()  # cancels the generations at the server if not ended yet
    yield DONE
