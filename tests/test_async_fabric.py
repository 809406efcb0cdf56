"""``AsyncFabric`` against the session's local site: the same answers as ``Fabric``, many
calls in flight at once, and an event loop that keeps running while they wait."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

from fabric import AsyncFabric, Fabric, FabricError, InvalidRequest, UnknownModel
from fabric.serverclient import ServerClient
from tests.plugins.site import (
    LONG_TOKENS,
    TINY_MODEL,
    assert_stopped_early,
    server_idle,
    server_pid,
    wait_until,
)
from tests.plugins.throttle import throttle_process

pytestmark = pytest.mark.slow

PROMPT = "The mitochondria is"


def add_one(handle: Any, x: int) -> int:
    """A user function (shipped by reference: module level)."""
    return x + 1


@pytest.fixture
def fab(site_transport: Any) -> Iterator[Fabric]:
    with Fabric(transport=site_transport, on_status=None) as client:
        yield client


def test_same_answers_as_fabric(fab: Fabric) -> None:
    expected = fab.generate(PROMPT, model=TINY_MODEL, max_tokens=8)
    chat = fab.chat([{"role": "user", "content": "Hi"}], model=TINY_MODEL, max_tokens=4)
    vectors = fab.embed(["a cat", "a dog"], model=TINY_MODEL)

    async def main() -> None:
        async with AsyncFabric(fabric=fab) as afab:
            result = await afab.generate(PROMPT, model=TINY_MODEL, max_tokens=8)
            assert result.token_ids == expected.token_ids
            reply = await afab.chat([{"role": "user", "content": "Hi"}], model=TINY_MODEL,
                                    max_tokens=4)
            assert reply.text == chat.text
            got = await afab.embed(["a cat", "a dog"], model=TINY_MODEL)
            assert np.allclose(got, vectors, atol=1e-5)
            scored = await afab.logprobs("The cell is", " alive", model=TINY_MODEL)
            assert len(scored["logprobs"]) >= 1
            states = await afab.hidden_states("The cell", model=TINY_MODEL, layers=[0])
            assert "0" in states["layers"]
            assert await afab.submit(add_one, 41, model=TINY_MODEL) == 42
            assert TINY_MODEL in {m["name"] for m in await afab.models()}
            assert any(d["model"] == TINY_MODEL for d in await afab.deployments())
            stream = await afab.stream(PROMPT, model=TINY_MODEL, max_tokens=8)
            chunks = [c async for c in stream]
            assert "".join(chunks) == expected.text and stream.result is not None
            with pytest.raises(UnknownModel):
                await afab.generate(PROMPT, model="no-such-model")
            with pytest.raises(InvalidRequest):
                await afab.generate(PROMPT, model=TINY_MODEL, max_tokens=0)

    asyncio.run(main())
    assert fab.generate(PROMPT, model=TINY_MODEL, max_tokens=1).token_ids  # fab still open


def test_concurrent_calls_do_not_block_the_loop(fab: Fabric) -> None:
    expected = fab.generate(PROMPT, model=TINY_MODEL, max_tokens=16).text

    async def main() -> tuple[list[str], list[float]]:
        ticks: list[float] = []
        done = asyncio.Event()

        async def ticker() -> None:
            while not done.is_set():
                ticks.append(time.monotonic())
                await asyncio.sleep(0.01)

        async with AsyncFabric(fabric=fab, max_concurrency=16) as afab:
            tick = asyncio.create_task(ticker())

            async def streamed() -> str:
                async with await afab.stream(PROMPT, model=TINY_MODEL, max_tokens=16) as s:
                    return "".join([c async for c in s])

            texts = await asyncio.gather(
                *(afab.generate(PROMPT, model=TINY_MODEL, max_tokens=16) for _ in range(16)),
                *(streamed() for _ in range(8)))
            done.set()
            await tick
        return [t if isinstance(t, str) else t.text for t in texts], ticks

    texts, ticks = asyncio.run(main())
    assert texts == [expected] * 24
    gaps = np.diff(ticks)
    assert len(ticks) > 5 and float(gaps.max()) < 0.5  # the loop never stalled


def test_leaving_a_stream_early_cancels_it(fab: Fabric, long_prompt: str) -> None:
    pid = server_pid(fab)

    async def main() -> Any:
        async with AsyncFabric(fabric=fab) as afab:
            # A prompt the tiny model does not end early, and the server slowed while we
            # leave: it must still be generating when the cancel comes.
            stream = await afab.stream(long_prompt, model=TINY_MODEL, max_tokens=LONG_TOKENS)
            async with stream:
                async for _ in stream:
                    break
            return stream

    before = server_idle(fab)["tokens_total"]
    with throttle_process(pid):
        stream = asyncio.run(main())
    assert stream.finished and stream.cancelled and stream.result is None
    assert_stopped_early(fab, before)  # the cancel reached the server, not only the client
    assert fab.generate(PROMPT, model=TINY_MODEL, max_tokens=2).token_ids


def test_a_dropped_async_stream_is_cancelled(fab: Fabric, long_prompt: str) -> None:
    """``break`` out of ``async for`` with no ``async with``: the dropped stream's reader
    thread still holds the ``Stream``, so the ``AsyncStream`` closes it (the request was
    generating to its end for nobody before)."""
    pid = server_pid(fab)

    async def finished(stream: Any) -> None:
        while not stream.finished:
            await asyncio.sleep(0.05)

    async def main() -> Any:
        async with AsyncFabric(fabric=fab) as afab:
            stream = await afab.stream(long_prompt, model=TINY_MODEL, max_tokens=LONG_TOKENS)
            async for _ in stream:
                break
            inner = stream.stream
            del stream
            await asyncio.wait_for(finished(inner), 60)
            return inner

    before = server_idle(fab)["tokens_total"]
    with throttle_process(pid):
        inner = asyncio.run(main())
    # Closed by a cancel the server answered, before the request's own end.
    assert inner.cancelled and inner.result is None
    assert len(inner.token_ids) < LONG_TOKENS
    assert_stopped_early(fab, before)


def test_open_streams_do_not_hold_the_pool(fab: Fabric, long_prompt: str) -> None:
    """With every pool thread taken (``max_concurrency=1``, its one thread held here), an open
    stream is still read and still cancelled. When the pool read streams, the reader and the
    cancel waited for a pool thread (and a reader held one for its stream's whole life, so a
    further admission or any cancel waited for a whole generation). The pool is held by the
    test, not by a long generation: under load the tiny server could finish first."""
    pid = server_pid(fab)

    async def main() -> tuple[Any, str]:
        async with AsyncFabric(fabric=fab, max_concurrency=1) as afab:
            first = await afab.stream(long_prompt, model=TINY_MODEL, max_tokens=LONG_TOKENS)
            held = threading.Event()
            afab._pool.submit(held.wait)
            try:  # bounded only so that the old code fails instead of hanging
                chunk = await asyncio.wait_for(first.__anext__(), 60)
                await asyncio.wait_for(first.aclose(), 60)
            finally:
                held.set()
            with pytest.raises(FabricError):  # closed early: no result to wait for
                await first.wait()
            return first, chunk

    with throttle_process(pid):
        first, chunk = asyncio.run(main())
    assert chunk and first.cancelled and first.result is None


def test_direct_streams_are_read_by_the_event_loop(fab: Fabric) -> None:
    """On the local site a stream costs no thread: eight streams opened at once, with the
    pool's one thread held, are admitted and read with no thread started meanwhile (each had
    a pool thread for its admission and a reader thread before), and give ``Fabric``'s text."""
    expected = fab.generate(PROMPT, model=TINY_MODEL, max_tokens=12)

    async def main() -> tuple[list[str], list[str]]:
        async with AsyncFabric(fabric=fab, max_concurrency=1) as afab:
            held = threading.Event()
            afab._pool.submit(held.wait)
            before = {t.ident for t in threading.enumerate()}
            try:  # bounded only so that the old code fails instead of hanging
                streams = await asyncio.wait_for(asyncio.gather(*(
                    afab.stream(PROMPT, model=TINY_MODEL, max_tokens=12) for _ in range(8))),
                    60)
                texts = await asyncio.wait_for(asyncio.gather(*(
                    _read_all(s) for s in streams)), 60)
                started = [t.name for t in threading.enumerate() if t.ident not in before]
            finally:
                held.set()
            return texts, started

    texts, started = asyncio.run(main())
    assert texts == [expected.text] * 8
    assert started == []


async def _read_all(stream: Any) -> str:
    return "".join([chunk async for chunk in stream])


def test_cancel_while_the_loop_reads(fab: Fabric, long_prompt: str) -> None:
    """``cancel`` from one task while another waits in ``async for``: the reader ends quietly
    with what it had (it must not hang on a stream nobody feeds, nor raise ``Cancelled``);
    a refused stream raises the site's typed error."""
    pid = server_pid(fab)

    async def main() -> tuple[Any, str, str]:
        async with AsyncFabric(fabric=fab) as afab:
            with pytest.raises(UnknownModel):
                await afab.stream(PROMPT, model="no-such-model")
            with pytest.raises(InvalidRequest, match="max_tokens"):
                await afab.stream(PROMPT, model=TINY_MODEL, max_tokens=0)
            stream = await afab.stream(long_prompt, model=TINY_MODEL, max_tokens=LONG_TOKENS)
            first = await asyncio.wait_for(stream.__anext__(), 60)
            reader = asyncio.create_task(_read_all(stream))
            await asyncio.sleep(0.05)  # the reader is waiting for the next event
            was = await asyncio.wait_for(stream.cancel(), 60)
            rest = await asyncio.wait_for(reader, 60)
            return stream, first + rest, was

    before = server_idle(fab)["tokens_total"]
    with throttle_process(pid):
        stream, text, was = asyncio.run(main())
    assert was == "running"
    assert stream.cancelled and stream.finished and stream.result is None
    assert text == stream.text and len(stream.token_ids) < LONG_TOKENS
    assert_stopped_early(fab, before)


@pytest.mark.parametrize("mode", ["direct", "poll"])
def test_a_cancelled_generate_stops_at_the_server(fab: Fabric, long_prompt: str,
                                                  mode: str) -> None:
    """The task awaiting ``generate`` (or ``chat``) is cancelled (``wait_for`` gave up, a
    ``TaskGroup`` failed, a gateway client hung up) once its request runs at the server: the
    server stops it early and frees its slot and KV memory, and the call's pool thread is free
    at once. It generated all its tokens for nobody before, its thread held meanwhile.
    ``poll``: the transport cannot reach the servers, so the cancel goes through the site."""
    pid = server_pid(fab)
    before = server_idle(fab)["tokens_total"]
    (dep,) = [d for d in fab.deployments() if d["model"] == TINY_MODEL and d.get("health")]

    async def main(server: ServerClient) -> None:
        async with AsyncFabric(fabric=fab, max_concurrency=1) as afab:
            calls = [afab.generate(long_prompt, model=TINY_MODEL, max_tokens=LONG_TOKENS),
                     afab.chat([{"role": "user", "content": long_prompt}], model=TINY_MODEL,
                               max_tokens=LONG_TOKENS)]
            for call in calls:
                task = asyncio.ensure_future(call)
                # Asked of the server itself: the site might find a server at 5% slow.
                await asyncio.to_thread(wait_until, lambda: server.health(60)["running"], 60,
                                        "the request to run at the server")
                with pytest.raises(asyncio.TimeoutError):
                    await asyncio.wait_for(task, 0.01)
                await asyncio.to_thread(wait_until, lambda: not server.health(60)["running"],
                                        60, "the cancelled request to end at the server")
                # Its one pool thread is free for the next call (bounded: the old code held
                # it for the whole generation).
                loop = asyncio.get_running_loop()
                assert await asyncio.wait_for(loop.run_in_executor(afab._pool, int), 30) == 0

    fab.transport.can_reach_servers = mode == "direct"
    try:
        with throttle_process(pid), ServerClient(dep["address"], dep["public_key"],
                                                 timeout_s=60) as server:
            asyncio.run(main(server))
    finally:
        fab.transport.can_reach_servers = True
    # Two requests of LONG_TOKENS each: together fewer tokens than one of them alone.
    assert_stopped_early(fab, before)
    assert fab.generate(PROMPT, model=TINY_MODEL, max_tokens=2).token_ids


def test_wait_after_reading_part_of_a_stream(fab: Fabric) -> None:
    """``wait`` after some chunks were read returns the whole result (the reader thread is
    still inside the stream: ``wait`` must not iterate it from a second thread)."""
    expected = fab.generate(PROMPT, model=TINY_MODEL, max_tokens=24)

    async def main() -> Any:
        async with AsyncFabric(fabric=fab) as afab:
            stream = await afab.stream(PROMPT, model=TINY_MODEL, max_tokens=24)
            first = await stream.__anext__()
            result = await stream.wait()
            return first, result

    first, result = asyncio.run(main())
    assert result.token_ids == expected.token_ids
    assert expected.text.startswith(first) and result.text == expected.text


def test_bad_concurrency() -> None:
    with pytest.raises(InvalidRequest):
        AsyncFabric(max_concurrency=0)


def test_calls_queued_when_the_client_closes_fail_typed() -> None:
    """``aclose`` with one call running and one waiting for a pool thread: the running one
    finishes, the waiting one fails with ``EndpointError`` (it ended in a bare
    ``CancelledError`` that no one asked for), and so does a call after the close (a raw
    ``RuntimeError`` from the pool before); a caller's own cancel stays a cancel."""
    from fabric.errors import EndpointError

    release = threading.Event()

    class Slow:
        def generate(self, prompt: str, **kwargs: Any) -> str:
            release.wait(10)
            return prompt

    async def main() -> None:
        client = AsyncFabric(fabric=Slow(), max_concurrency=1)  # type: ignore[arg-type]
        first = asyncio.create_task(client.generate("a"))
        queued = asyncio.create_task(client.generate("b"))
        mine = asyncio.create_task(client.generate("c"))
        await asyncio.sleep(0.1)
        mine.cancel()
        with pytest.raises(asyncio.CancelledError):
            await mine
        closing = asyncio.create_task(client.aclose())
        await asyncio.sleep(0.1)
        release.set()
        await closing
        assert await first == "a"
        with pytest.raises(EndpointError, match="closed while this call waited"):
            await queued
        with pytest.raises(EndpointError, match="closed"):
            await client.generate("d")

    asyncio.run(main())


def test_a_stream_read_on_another_event_loop_says_so(fab: Fabric) -> None:
    """A direct stream's events go to the loop that opened it: read on another (a second
    ``asyncio.run``), it is a typed error naming that, not a raw ``RuntimeError`` from a
    queue bound to another loop."""
    client = AsyncFabric(fabric=fab)

    async def open_one() -> Any:
        return await client.stream("Scientists call models", model=TINY_MODEL, max_tokens=4)

    async def read(stream: Any) -> str:
        return "".join([chunk async for chunk in stream])

    stream = asyncio.run(open_one())
    try:
        with pytest.raises(InvalidRequest, match="read on the event loop that opened it"):
            asyncio.run(read(stream))
    finally:
        stream.stream.close()
