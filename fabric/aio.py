"""``AsyncFabric``: the SDK for asyncio code (notebooks' event loops, agents, the gateway).

Every method of ``Fabric`` is here as a coroutine (``await fab.generate(...)``) and ``stream``
is an async iterator of text chunks. Nothing blocks the event loop:

* ``submit`` (a user function at the site) awaits the transport's own ``concurrent.futures``
  future through ``asyncio.wrap_future``: no thread waits for it;
* the other calls run the synchronous ``Fabric`` method in a bounded thread pool
  (``max_concurrency`` threads), since ``Fabric`` hands out finished values rather than
  futures for them. The pool bounds how many calls are in flight at once; more wait their turn.

A stream on the local site (a direct stream) uses no thread: its admission's future is awaited
and its events come to the event loop from the client's connection thread
(``fabric.client.loopfeed``). Elsewhere its admission is a call like the others and its chunks
are read by a thread of its own. Its ``cancel``/``aclose`` run on threads of their own: nothing
of a stream waits for a pool thread. (Readers in the pool held one thread each for a stream's
whole life, so with ``max_concurrency`` streams open a further stream could not be admitted,
nor any stream cancelled, until one of them ended.) ``aclose`` (or ``async with``) cancels the
request at the server, as closing a ``Stream`` does; a stream left by ``break`` is cancelled
once it is closed or collected.

Cancelling a task that awaits ``generate``, ``chat``, ``logprobs`` or ``hidden_states``
(``asyncio.wait_for``, ``task.cancel()``, a failing ``TaskGroup``, a gateway client that hung
up) cancels its request at the server too: the call runs in a ``CallScope``
(``fabric.client.callscope``) that cancels the request's future, which sends the server a
cancel (``RequestPath.future``), and its pool thread is free at once. That costs no thread and
no round trip while nobody cancels. Other calls (``embed``, ``submit``, deployments) still run
to their end; ``timeout=`` bounds a call at the server whoever waits for it.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import threading
import weakref
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from types import TracebackType
from typing import TYPE_CHECKING, Any, TypeVar

from fabric.client.callscope import CallScope
from fabric.errors import EndpointError, FabricError, InvalidRequest

if TYPE_CHECKING:
    from fabric.client.loopfeed import LoopDirectSource
    from fabric.client.streaming import Stream
    from fabric.protocol import GenerationResult
    from fabric.sdk import Fabric

__all__ = ["AsyncFabric", "AsyncStream"]

T = TypeVar("T")

DEFAULT_CONCURRENCY = 64
"""Calls in flight at once per ``AsyncFabric`` (threads in its pool)."""


def _in_thread(fn: Callable[[], T], name: str) -> Future[T]:
    """``fn()`` on a new daemon thread of its own; its outcome in the returned future. For
    work that must not queue behind the pool's calls (a stream's reader, a cancel)."""
    future: Future[T] = Future()

    def run() -> None:
        if not future.set_running_or_notify_cancel():
            return
        try:
            future.set_result(fn())
        except BaseException as exc:
            future.set_exception(exc)

    threading.Thread(target=run, daemon=True, name=name).start()
    return future


def _close_dropped(stream: Stream) -> None:
    """Close ``stream`` off the finalizer's thread unless it has ended (its ``AsyncStream``
    was dropped while its reader ran)."""
    if not stream.finished:
        _in_thread(stream.close, "async-fabric-dropped")


class AsyncFabric:
    """``Fabric`` for asyncio: the same methods, awaitable.

    >>> async with AsyncFabric() as fab:
    ...     result = await fab.generate("The mitochondria is", max_tokens=24)
    ...     async for chunk in await fab.stream("Tell me a story"):
    ...         print(chunk, end="")

    Arguments are those of ``Fabric`` (``site`` or ``sites``, ``transport``, ``auth``,
    ``on_status``, ``routing``...),
    or pass an existing ``fabric=`` to share its transport. ``max_concurrency`` bounds the
    calls in flight at once (a stream on the local site takes none of them); ``executor``
    shares another client's pool instead (it is then not shut down by ``close``).
    """

    def __init__(self, site: str | None = None, *, fabric: Fabric | None = None,
                 max_concurrency: int = DEFAULT_CONCURRENCY,
                 executor: ThreadPoolExecutor | None = None, **kwargs: Any) -> None:
        if not isinstance(max_concurrency, int) or max_concurrency < 1:
            raise InvalidRequest(f"max_concurrency must be an int >= 1, got {max_concurrency!r}")
        if fabric is None:
            from fabric.sdk import Fabric

            fabric = Fabric(site, **kwargs)
            self._owns_fabric = True
        else:
            self._owns_fabric = False
        self.fabric = fabric
        """The synchronous client underneath (its transport, site and auth)."""
        self.max_concurrency = max_concurrency
        self._owns_pool = executor is None
        self._pool = executor or ThreadPoolExecutor(max_concurrency,
                                                    thread_name_prefix="async-fabric")

    @property
    def site(self) -> str:
        """Name of the site this client reaches (a federation's first site)."""
        return self.fabric.site

    @property
    def sites(self) -> list[str]:
        """The sites this client routes among."""
        return self.fabric.sites

    async def _call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """``fn(*args, **kwargs)`` in the pool; the event loop keeps running meanwhile.

        Cancelling the awaiting task (``asyncio.wait_for``, ``task.cancel()``) cancels the
        request the call waits on at the server, and its thread is free at once (the call
        runs in a ``CallScope``: see ``fabric.client.callscope``); a call still queued for a
        thread never runs. A call still queued for a pool thread when the client closes
        fails with ``EndpointError``, as later calls do."""
        loop = asyncio.get_running_loop()
        scope = CallScope()
        try:
            running = loop.run_in_executor(self._pool, functools.partial(
                scope.run, fn, *args, **kwargs))
        except RuntimeError:  # the pool was shut down
            raise EndpointError("this AsyncFabric is closed; make a new one") from None
        try:
            return await running
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is None or task.cancelling():
                scope.cancel()  # the caller cancelled it: so is its request, at the server
                raise
            raise EndpointError("the client was closed while this call waited for a "
                                "thread") from None

    # -- the methods of Fabric ------------------------------------------------------------

    async def generate(self, prompt: str, **kwargs: Any) -> GenerationResult:
        """``Fabric.generate``, awaitable."""
        return await self._call(self.fabric.generate, prompt, **kwargs)

    async def chat(self, messages: Sequence[dict[str, str]], **kwargs: Any) -> GenerationResult:
        """``Fabric.chat``, awaitable."""
        return await self._call(self.fabric.chat, messages, **kwargs)

    async def stream(self, prompt: str | None = None, **kwargs: Any) -> AsyncStream:
        """``Fabric.stream``: awaits the request's admission, then returns an ``AsyncStream``
        (``async for chunk in stream``).

        Where the client reaches the model servers (the local site), no thread serves the
        stream: its admission is awaited and its events come to this event loop from the
        connection's I/O thread (``fabric.client.loopfeed``), and it takes no pool slot.
        Elsewhere (a federation, a remote site, the first call, which may start the site)
        it is opened in the pool and read by a thread of its own."""
        fab = self.fabric
        request = fab.stream_request(prompt, **kwargs)
        started = fab.direct_admission(request)
        if started is None:
            return AsyncStream(await self._call(fab.stream, prompt, **kwargs), self)
        admitted, direct = started
        if fab.on_status is None:
            info: dict[str, Any] = await asyncio.wrap_future(admitted)
        else:  # the cold-start status watch blocks: it waits in the pool
            info = await self._call(fab.admission, admitted, request)
        from fabric.client.loopfeed import LoopDirectSource
        from fabric.client.streaming import Stream

        source = await LoopDirectSource.open(info, request, direct)
        source.site = fab.transport.site
        return AsyncStream(Stream(source), self, source)

    async def embed(self, texts: str | Sequence[str], **kwargs: Any) -> Any:
        """``Fabric.embed``, awaitable."""
        return await self._call(self.fabric.embed, texts, **kwargs)

    async def hidden_states(self, text: str, **kwargs: Any) -> dict[str, Any]:
        """``Fabric.hidden_states``, awaitable."""
        return await self._call(self.fabric.hidden_states, text, **kwargs)

    async def logprobs(self, text: str, continuation: str | None = None,
                       **kwargs: Any) -> dict[str, Any]:
        """``Fabric.logprobs``, awaitable."""
        return await self._call(self.fabric.logprobs, text, continuation, **kwargs)

    async def submit(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """``Fabric.submit``: awaits the user function's value (its future is wrapped, so no
        thread waits for it)."""
        future = await self._call(self.fabric.submit, fn, *args, **kwargs)
        return await asyncio.wrap_future(future)

    async def models(self) -> list[dict[str, Any]]:
        """``Fabric.models``, awaitable."""
        return await self._call(self.fabric.models)

    async def deploy(self, model: str, **kwargs: Any) -> dict[str, Any]:
        """``Fabric.deploy``, awaitable."""
        return await self._call(self.fabric.deploy, model, **kwargs)

    async def wait_ready(self, model: str, **kwargs: Any) -> dict[str, Any]:
        """``Fabric.wait_ready``, awaitable."""
        return await self._call(self.fabric.wait_ready, model, **kwargs)

    async def deployments(self) -> list[dict[str, Any]]:
        """``Fabric.deployments``, awaitable."""
        return await self._call(self.fabric.deployments)

    async def undeploy(self, deployment_id: str) -> dict[str, Any]:
        """``Fabric.undeploy``, awaitable."""
        return await self._call(self.fabric.undeploy, deployment_id)

    async def campaign(self, manifest: Any, **kwargs: Any) -> Any:
        """``Fabric.campaign`` (validation reads the whole input file, so it runs in the pool)."""
        return await self._call(self.fabric.campaign, manifest, **kwargs)

    # -- lifetime -------------------------------------------------------------------------

    async def aclose(self) -> None:
        """Wait for the pool's calls to end, then close the ``Fabric`` if this client made it."""
        await asyncio.get_running_loop().run_in_executor(None, self.close)

    def close(self) -> None:
        """Synchronous close (from outside an event loop)."""
        if self._owns_pool:
            self._pool.shutdown(wait=True, cancel_futures=True)
        if self._owns_fabric:
            self.fabric.close()

    async def __aenter__(self) -> AsyncFabric:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.aclose()


Chunk = tuple[str, list[int], list[float], list[list[tuple[int, float]]]]
"""A chunk of text and what came with it: its token ids, their logprobs and top tokens."""


def _chunk(stream: Stream, text: str, seen: int) -> Chunk:
    """``text`` with the tokens ``stream`` received after the first ``seen``."""
    return (text, list(stream.token_ids[seen:]), list(stream.logprobs[seen:]),
            list(stream.tops[seen:]))


class AsyncStream:
    """An async iterator of text chunks over a ``Stream`` (its ``text``, ``token_ids``,
    ``logprobs`` and ``result`` are the same attributes).

    With a ``LoopDirectSource`` (``source``) the event loop reads the events itself. Else a
    thread of its own (not the pool's: see the module doc) reads the stream from the first
    ``__anext__`` to its end and hands each chunk to the event loop (``call_soon_threadsafe``).
    ``last_token_ids``/``last_logprobs``/``last_tops`` are the tokens that came with the chunk
    just returned (a reader thread may already be ahead of it).
    """

    def __init__(self, stream: Stream, owner: AsyncFabric,
                 source: LoopDirectSource | None = None) -> None:
        self.stream = stream
        self._owner = owner
        self._source = source
        self._queue: asyncio.Queue[Chunk | BaseException | None]
        self._reader: Future[None] | None = None
        self._seen = 0
        self._end: BaseException | None = None
        self.last_token_ids: list[int] = []
        self.last_logprobs: list[float] = []
        self.last_tops: list[list[tuple[int, float]]] = []
        if source is not None:  # dropped unfinished, as in ``_start``: the stream may outlive it
            weakref.finalize(self, _close_dropped, stream).atexit = False

    def __getattr__(self, name: str) -> Any:
        # text, token_ids, logprobs, result, request_id, finished, cancelled
        return getattr(self.stream, name)

    def __aiter__(self) -> AsyncIterator[str]:
        return self

    def _start(self) -> None:
        loop = asyncio.get_running_loop()
        queue = self._queue = asyncio.Queue()
        stream = self.stream

        def put(item: Any) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, item)

        def read() -> None:
            seen = 0
            try:
                for chunk in stream:
                    put(_chunk(stream, chunk, seen))
                    seen = len(stream.token_ids)
                put(None)
            except RuntimeError:  # the event loop is closed: nobody reads any more
                with contextlib.suppress(FabricError):  # e.g. the client closed first
                    stream.close()
            except BaseException as exc:
                with contextlib.suppress(RuntimeError):
                    put(exc)

        self._reader = _in_thread(read, f"async-fabric-stream-{stream.request_id}")
        # The reader holds the stream, so the stream's own finalizer cannot fire: dropped
        # unfinished, this one closes it (a cancel at the server; the reader then ends).
        weakref.finalize(self, _close_dropped, stream).atexit = False

    async def _read_here(self) -> str:
        """The next chunk, read on this event loop (a ``LoopDirectSource``)."""
        assert self._source is not None
        stream = self.stream
        while not stream.finished:
            try:
                with stream.reading():
                    event = await self._source.next_event()
            except FabricError as exc:
                try:
                    stream.end(exc)  # quiet if we cancelled it
                except FabricError as failure:
                    self._end = failure
                    raise
                break
            chunk = stream.absorb(event)
            if chunk:
                _, self.last_token_ids, self.last_logprobs, self.last_tops = \
                    _chunk(stream, chunk, self._seen)
                self._seen = len(stream.token_ids)
                return chunk
        if self._end is not None:  # every later call ends the same way
            raise self._end
        raise StopAsyncIteration

    async def __anext__(self) -> str:
        if self._source is not None:
            return await self._read_here()
        if self._reader is None:
            self._start()
        item = await self._queue.get()
        if item is None or isinstance(item, BaseException):
            self._queue.put_nowait(item)  # every later call ends the same way
            if item is None:
                raise StopAsyncIteration
            raise item
        chunk, self.last_token_ids, self.last_logprobs, self.last_tops = item
        return chunk

    async def wait(self) -> GenerationResult:
        """Read the rest and return the final result (``FabricError`` if the stream was
        closed or cancelled before it finished, as ``Stream.wait``)."""
        # Through this iterator, not ``Stream.wait`` in a thread: the reader may already be
        # inside the stream, and a generator cannot be run by two threads at once.
        async for _ in self:
            pass
        if self.stream.result is None:
            raise FabricError(f"stream {self.stream.request_id} was closed before it finished")
        return self.stream.result

    async def cancel(self) -> str:
        """Stop the request at the server; returns what it was."""
        return await asyncio.wrap_future(_in_thread(self.stream.cancel, "async-fabric-cancel"))

    async def aclose(self) -> None:
        """Stop reading; cancels the request if it is still going (and waits for the reader
        to see the end)."""
        await asyncio.wrap_future(_in_thread(self._stop, "async-fabric-close"))
        if self._reader is not None:
            with contextlib.suppress(BaseException):
                await asyncio.wrap_future(self._reader)

    def close_soon(self) -> None:
        """Close (and so cancel) from code that must not await, e.g. a cancelled task's
        cleanup: the close runs on a thread of its own."""
        if not self.stream.finished:
            _in_thread(self._stop, "async-fabric-close")

    def _stop(self) -> None:
        # While a reader (a thread, or the loop's) waits for the server's last message, only
        # cancel: the reader sees that message and closes the stream. Otherwise close it
        # here (a loop reader that begins to wait after all is woken by the close).
        if (self._reader is not None and not self._reader.done()) or (
                self._source is not None and self.stream.is_read):
            self.stream.cancel()
        else:
            self.stream.close()

    async def __aenter__(self) -> AsyncStream:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.aclose()
