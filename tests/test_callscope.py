"""Cancelling a call's request (``fabric.client.callscope``, ``RequestPath.future``) with
stand-ins for the site and the server connections: what is sent, and when, whichever of the
admission and the cancel comes first. ``AsyncFabric``'s part (a cancelled task cancels its
call's scope) is here too; the real local site and gateway are in ``tests/test_async_fabric.py``
and ``tests/test_gateway.py``."""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import CancelledError, Future
from typing import Any

import pytest

from fabric import AsyncFabric, Fabric
from fabric.client.callscope import CallScope, start
from fabric.client.handoff import RequestPath
from fabric.protocol import InferenceRequest
from tests.test_admission import HeldTransport as Held


class HeldTransport(Held):
    """``tests.test_admission``'s held transport, reaching the servers or not; the test
    answers the admissions."""

    def __init__(self, reach: bool) -> None:
        super().__init__()
        self.can_reach_servers = reach

    def named(self, name: str, n: int = 1) -> list[tuple[Any, ...]]:
        with self.sent:
            assert self.sent.wait_for(
                lambda: len([t for t in self.tasks if t[0] == name]) >= n, 5.0), self.tasks
            return [args for task, args, _ in self.tasks if task == name]

    def admit(self, info: dict[str, Any]) -> None:
        """Answer the admission (``open_stream``) with ``info``."""
        self.named("open_stream")
        (fut,) = [f for name, _, f in self.tasks if name == "open_stream"]
        fut.set_result(info)


class FakeDirect:
    """``DirectResults`` as the hand-off uses it: submits and withdrawals recorded."""

    def __init__(self) -> None:
        self.submitted: dict[str, Future[dict[str, Any]]] = {}
        self.withdrawn: list[str] = []

    def submit(self, info: dict[str, Any], request: InferenceRequest) -> Future[dict[str, Any]]:
        fut: Future[dict[str, Any]] = Future()
        self.submitted[request.request_id] = fut
        return fut

    def withdraw(self, info: dict[str, Any], request: InferenceRequest) -> None:
        self.withdrawn.append(request.request_id)

    def close(self) -> None:
        pass


class FakePoller:
    """``Poller`` as the hand-off uses it: tracked and forgotten requests recorded."""

    busy = True  # no hold at the site

    def __init__(self) -> None:
        self.tracked: list[str] = []
        self.forgotten: list[str] = []

    def track(self, info: dict[str, Any], model: str, *, events: bool) -> Any:
        self.tracked.append(str(info["request_id"]))
        return type("Tracked", (), {"future": Future()})()

    def forget(self, request_id: str) -> None:
        self.forgotten.append(request_id)

    def close(self) -> None:
        pass


def _path(reach: bool) -> tuple[RequestPath, HeldTransport, FakeDirect, FakePoller]:
    t = HeldTransport(reach)
    path = RequestPath(lambda: t, "AUTH", None, 1.0, True)
    direct, poller = FakeDirect(), FakePoller()
    path._direct, path._poller = direct, poller  # type: ignore[assignment]
    return path, t, direct, poller


def _request() -> InferenceRequest:
    return Fabric(transport=HeldTransport(True), on_status=None).stream_request(
        "Hello", model="m", max_tokens=8)


def _info(request: InferenceRequest) -> dict[str, Any]:
    return {"request_id": request.request_id, "address": "tcp://x:1", "public_key": "k",
            "ticket": "T"}


def test_direct_cancelled_before_its_admission_is_never_sent() -> None:
    path, t, direct, _ = _path(True)
    request = _request()
    out = path.future(request)
    assert out.cancel()
    t.admit(_info(request))
    assert direct.submitted == {} and direct.withdrawn == []
    path.close()


def test_direct_cancelled_at_its_server_is_withdrawn_there() -> None:
    """After the hand-off the cancel goes over the client's connection to the server, and
    the server's late answer (its "cancelled" error) is dropped, not raised in a thread."""
    path, t, direct, _ = _path(True)
    request = _request()
    out = path.future(request)
    t.admit(_info(request))
    inner = direct.submitted[request.request_id]
    assert not out.done() and direct.withdrawn == []
    assert out.cancel()
    assert direct.withdrawn == [request.request_id]
    inner.set_exception(RuntimeError("cancelled"))  # the server's last word: nobody's
    assert out.cancelled()
    path.close()


def test_a_result_is_unchanged_and_cancels_nothing() -> None:
    path, t, direct, _ = _path(True)
    request = _request()
    out = path.future(request)
    t.admit(_info(request))
    direct.submitted[request.request_id].set_result({"text": "hi"})
    assert out.result(5) == {"text": "hi"} and not out.cancel()
    assert direct.withdrawn == []
    path.close()


@pytest.mark.parametrize("before_admission", [True, False])
def test_polled_cancel_goes_through_the_site(before_admission: bool) -> None:
    """The site submitted a polled request itself: cancelled before its admission came back
    or after, it is cancelled there with its ticket and no longer polled for."""
    path, t, _, poller = _path(False)
    request = _request()
    out = path.future(request)
    if before_admission:
        assert out.cancel()
    t.admit(_info(request))
    if not before_admission:
        assert poller.tracked == [request.request_id]
        assert out.cancel()
    (args,) = t.named("cancel_request")
    assert args == ("m", request.request_id, "T", "AUTH")
    assert poller.tracked == ([] if before_admission else [request.request_id])
    assert poller.forgotten == [request.request_id]
    path.close()


def test_a_scope_cancels_what_its_call_started() -> None:
    scope = CallScope()
    started: list[Future[Any]] = []
    go = threading.Event()

    def call() -> Any:
        fut: Future[Any] = start(lambda: Future())
        started.append(fut)
        go.set()
        return fut.result(10)

    outcome: list[BaseException] = []

    def run() -> None:
        try:
            scope.run(call)
        except BaseException as exc:
            outcome.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    assert go.wait(5)
    scope.cancel()
    thread.join(5)
    assert started[0].cancelled() and isinstance(outcome[0], CancelledError)
    # Cancelled already: nothing more is made (a federation tries no further site).
    with pytest.raises(CancelledError):
        scope.run(start, lambda: pytest.fail("made in a cancelled scope"))
    plain: Future[Any] = Future()
    assert start(lambda: plain) is plain and not plain.cancelled()  # no scope: untouched


def test_a_cancelled_task_cancels_its_calls_request() -> None:
    """``AsyncFabric``: cancelling the awaiting task cancels the request its pool thread
    waits on, and frees that thread (the only one here) at once."""
    made: list[Future[Any]] = []

    class Waiting:
        def generate(self, prompt: str, **kwargs: Any) -> Any:
            fut: Future[Any] = start(lambda: Future())
            made.append(fut)
            return fut.result(30)

    async def main() -> None:
        client = AsyncFabric(fabric=Waiting(), max_concurrency=1)  # type: ignore[arg-type]
        task = asyncio.ensure_future(client.generate("a"))
        while not made:
            await asyncio.sleep(0.01)
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(task, 0.05)
        assert made[0].cancelled()
        loop = asyncio.get_running_loop()
        assert await asyncio.wait_for(loop.run_in_executor(client._pool, int), 5) == 0
        await client.aclose()

    asyncio.run(main())
