"""``fabric.client.admission.Admissions``: when admissions go alone, together, or wait.

The site's side (``open_streams`` answering each admission on its own) is tested on the real
local site in ``tests/test_handoff.py`` and through the real Globus Compute pair in
``tests/test_globus_real.py``; here a transport that holds every task until the test settles
it shows the queueing rules exactly.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

import pytest

from fabric.client.admission import Admissions
from fabric.errors import EndpointError, FabricError, UnknownModel


class HeldTransport:
    """Records each task and leaves it pending until ``settle``."""

    site = "held"
    can_reach_servers = True

    def __init__(self) -> None:
        self.tasks: list[tuple[str, tuple[Any, ...], Future[Any]]] = []
        self.sent = threading.Condition()

    def submit(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Future[Any]:
        fut: Future[Any] = Future()
        with self.sent:
            self.tasks.append((fn.__name__, args, fut))
            self.sent.notify_all()
        return fut

    def wait_tasks(self, n: int, timeout_s: float = 5.0) -> None:
        with self.sent:
            assert self.sent.wait_for(lambda: len(self.tasks) >= n, timeout_s), self.tasks

    def settle(self, i: int) -> None:
        """Answer task ``i`` as the site would: an info per admission."""
        name, args, fut = self.tasks[i]
        if name == "open_stream":
            fut.set_result({"request_id": args[0]["request_id"]})
        else:
            fut.set_result([{"info": {"request_id": item["request"]["request_id"]}}
                            for item in args[0]])

    def close(self) -> None:
        pass


def body(i: int, model: str = "m") -> dict[str, Any]:
    return {"model": model, "version": None, "request_id": f"r{i}"}


def test_a_lone_admission_goes_at_once_alone() -> None:
    t = HeldTransport()
    adm = Admissions(t, None, slots=2)
    fut = adm.admit(body(0), "direct")
    t.wait_tasks(1)
    assert t.tasks[0][0] == "open_stream" and t.tasks[0][1][2:] == ("direct", 0.0)
    t.settle(0)
    assert fut.result(5)["request_id"] == "r0"
    adm.close()


def test_what_queues_while_the_slots_are_taken_goes_in_one_task() -> None:
    t = HeldTransport()
    adm = Admissions(t, None, slots=1)
    first = adm.admit(body(0), "direct")
    t.wait_tasks(1)
    rest = [adm.admit(body(i), "direct") for i in range(1, 6)]
    time.sleep(0.1)
    assert len(t.tasks) == 1  # the one slot is taken: the others wait
    t.settle(0)
    t.wait_tasks(2)
    name, args, _ = t.tasks[1]
    assert name == "open_streams" and [i["request"]["request_id"] for i in args[0]] == \
        [f"r{i}" for i in range(1, 6)]
    t.settle(1)
    assert [f.result(5)["request_id"] for f in [first, *rest]] == [f"r{i}" for i in range(6)]
    assert adm.tasks == 2
    adm.close()


def test_each_freed_slot_takes_its_share_and_keys_stay_apart() -> None:
    """With 2 slots taken, 6 queued admissions go as slots free, each taking its share of
    what waits (3, then 2 of the 3 left, then the last): the site's workers admit a burst side
    by side. Another model (or mode) queues apart, since one cold model must not hold up a
    warm one's admissions."""
    t = HeldTransport()
    adm = Admissions(t, None, slots=2)
    first = [adm.admit(body(i), "poll", 5.0, True) for i in (0, 1)]
    t.wait_tasks(2)
    futs = [adm.admit(body(i), "poll", 5.0, True) for i in range(2, 8)]
    other = adm.admit(body(9, model="other"), "poll", 5.0, True)
    time.sleep(0.05)
    assert len(t.tasks) == 2
    for i in range(4):
        t.settle(i)
        t.wait_tasks(i + 3)
    sent = [(name, [a["request"]["request_id"] for a in args[0]] if name == "open_streams"
             else [args[0]["request_id"]]) for name, args, _ in t.tasks[2:]]
    assert sent == [("open_streams", ["r2", "r3", "r4"]), ("open_streams", ["r5", "r6"]),
                    ("open_stream", ["r7"]), ("open_stream", ["r9"])], sent
    batch = t.tasks[2][1][0]
    assert {(i["mode"], i["hold_s"], i["first_events"]) for i in batch} == {("poll", 5.0, True)}
    for i in (4, 5):
        t.settle(i)
    assert [f.result(5)["request_id"] for f in [*first, *futs]] == [f"r{i}" for i in range(8)]
    assert other.result(5)["request_id"] == "r9"
    adm.close()


def test_a_window_gathers_a_burst_into_one_task() -> None:
    """With a window (remote sites) a burst that arrives within it goes whole, in one task,
    though slots are free; a lone admission waits the window and goes alone."""
    t = HeldTransport()
    adm = Admissions(t, None, slots=8, window_s=0.2)
    futs = [adm.admit(body(i), "poll", 5.0, True) for i in range(5)]
    t.wait_tasks(1)
    time.sleep(0.1)
    assert len(t.tasks) == 1 and t.tasks[0][0] == "open_streams" and len(t.tasks[0][1][0]) == 5
    t.settle(0)
    assert [f.result(5)["request_id"] for f in futs] == [f"r{i}" for i in range(5)]
    t0 = time.monotonic()
    lone = adm.admit(body(7), "poll", 5.0, True)
    t.wait_tasks(2)
    assert time.monotonic() - t0 >= 0.15 and t.tasks[1][0] == "open_stream"
    t.settle(1)
    assert lone.result(5)["request_id"] == "r7"
    adm.close()


def test_each_admission_gets_its_own_answer_or_error() -> None:
    t = HeldTransport()
    adm = Admissions(t, None, slots=1)
    adm.admit(body(0), "direct")
    t.wait_tasks(1)
    good, bad = adm.admit(body(1), "direct"), adm.admit(body(2), "direct")
    t.settle(0)
    t.wait_tasks(2)
    t.tasks[1][2].set_result([{"info": {"request_id": "r1"}},
                              {"error": UnknownModel("no model 'x'", model="x").to_dict()}])
    assert good.result(5)["request_id"] == "r1"
    with pytest.raises(UnknownModel):
        bad.result(5)
    # A reply of the wrong length fails every admission of that task, typed.
    adm.admit(body(3), "direct")
    t.wait_tasks(3)
    adm.admit(body(4), "direct")
    a3 = adm.admit(body(5), "direct")
    t.settle(2)
    t.wait_tasks(4)
    t.tasks[3][2].set_result([])
    with pytest.raises(FabricError, match="answered 0 admissions"):
        a3.result(5)
    adm.close()


def test_a_cancelled_admission_leaves_the_others_answered() -> None:
    """An asyncio caller that goes away cancels its admission's future (``asyncio.wrap_future``
    passes the cancel on). The others of its task, and the next tasks, are still answered:
    setting the cancelled future raised in the task's callback, before the rest were set."""
    t = HeldTransport()
    adm = Admissions(t, None, slots=1)
    lone = adm.admit(body(0), "direct")
    t.wait_tasks(1)
    first, gone, last = (adm.admit(body(i), "direct") for i in (1, 2, 3))
    assert lone.cancel() and gone.cancel()
    t.settle(0)  # the lone one, cancelled
    t.wait_tasks(2)
    t.settle(1)  # r1, r2 (cancelled), r3 in one task
    assert first.result(5)["request_id"] == "r1"
    assert last.result(5)["request_id"] == "r3"
    assert gone.cancelled() and lone.cancelled()
    after = adm.admit(body(4), "direct")
    t.wait_tasks(3)
    t.settle(2)
    assert after.result(5)["request_id"] == "r4"
    adm.close()


def test_each_task_carries_one_auth() -> None:
    """``with_auth`` twins share one ``Admissions`` and pass their own credentials: queued
    at the same time, two identities' admissions still go in separate tasks, each sent with
    its own auth (one task with both would admit one caller as the other)."""
    t = HeldTransport()
    adm = Admissions(t, {"token": "owner"}, slots=1)
    adm.admit(body(0), "direct")
    t.wait_tasks(1)
    alice, bob = {"token": "alice"}, {"token": "bob"}
    a1 = adm.admit(body(1), "direct", auth=alice)
    b1 = adm.admit(body(2), "direct", auth=bob)
    a2 = adm.admit(body(3), "direct", auth=alice)
    assert t.tasks[0][1][1] == {"token": "owner"}  # open_stream(body, auth, ...)
    t.settle(0)
    t.wait_tasks(2)
    t.settle(1)
    t.wait_tasks(3)
    t.settle(2)
    sent = {t.tasks[i][1][1]["token"]: t.tasks[i][1][0] if t.tasks[i][0] == "open_streams"
            else [{"request": t.tasks[i][1][0]}] for i in (1, 2)}
    assert {k: [item["request"]["request_id"] for item in v] for k, v in sent.items()} == {
        "alice": ["r1", "r3"], "bob": ["r2"]}
    assert [f.result(5)["request_id"] for f in (a1, b1, a2)] == ["r1", "r2", "r3"]
    adm.close()


def test_without_batches_every_admission_is_its_own_task_and_close_fails_the_queued() -> None:
    t = HeldTransport()
    adm = Admissions(t, None, slots=1, batches=False)
    for i in range(3):
        adm.admit(body(i), "direct")
    assert [name for name, _, _ in t.tasks] == ["open_stream"] * 3
    queued = Admissions(t, None, slots=1)
    queued.admit(body(7), "direct")
    t.wait_tasks(4)
    waiting = queued.admit(body(8), "direct")
    queued.close()
    with pytest.raises(EndpointError):
        waiting.result(5)
    with pytest.raises(EndpointError):
        queued.admit(body(9), "direct")


def test_a_transport_that_raises_fails_that_admission_and_the_next_still_goes() -> None:
    """A transport's submit raising something untyped (a bug, a library error) fails that
    admission; it must not end the admission thread, which would leave every later call
    waiting for ever."""

    class Flaky(HeldTransport):
        def __init__(self) -> None:
            super().__init__()
            self.fail_next = True

        def submit(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Future[Any]:
            if self.fail_next:
                self.fail_next = False
                raise RuntimeError("the transport broke")
            return super().submit(fn, *args, **kwargs)

    t = Flaky()
    adm = Admissions(t, None, slots=1)
    with pytest.raises(RuntimeError, match="the transport broke"):
        adm.admit(body(0), "direct").result(5)
    later = adm.admit(body(1), "direct")
    t.wait_tasks(1)
    t.settle(0)
    assert later.result(5)["request_id"] == "r1"
    adm.close()


def test_a_long_queue_goes_in_tasks_of_at_most_max_batch() -> None:
    """100 admissions queued behind the one slot go as 64 (what the site takes), then 36."""
    from fabric.client.admission import MAX_BATCH

    t = HeldTransport()
    adm = Admissions(t, None, slots=1)
    first = adm.admit(body(0), "direct")
    t.wait_tasks(1)
    rest = [adm.admit(body(i), "direct") for i in range(1, 101)]
    t.settle(0)
    t.wait_tasks(2)
    t.settle(1)
    t.wait_tasks(3)
    t.settle(2)
    sizes = [len(args[0]) for name, args, _ in t.tasks[1:] if name == "open_streams"]
    assert sizes == [MAX_BATCH, 100 - MAX_BATCH] and len(t.tasks) == 3
    assert [f.result(5)["request_id"] for f in [first, *rest]] == [f"r{i}" for i in range(101)]
    adm.close()
