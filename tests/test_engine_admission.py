"""Admission control: exact queue limits, fast typed ``Overloaded``, KV budget waits."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pytest

from fabric.errors import ContextLengthExceeded, FabricError, Overloaded
from tests.plugins.servers import ServerHandle, hf_tokenizer, no_eos_prompts

QUEUE_REQUESTS = 5
QUEUE_TOKENS = 50


@pytest.fixture(scope="module")
def busy_server(model_server: Any, tiny_llama_dir: Path) -> ServerHandle:
    """One request runs at a time, so a long one keeps the others waiting."""
    return model_server(tiny_llama_dir, name="tiny_llama", max_running=1,
                        max_queue_requests=QUEUE_REQUESTS, max_queue_tokens=QUEUE_TOKENS,
                        max_batch_tokens=1)


def _text_of(weights: Path, n: int) -> str:
    """A prompt of exactly ``n`` tokens."""
    tok = hf_tokenizer(weights)
    base = "The mitochondria is the powerhouse of the cell. Proteins fold into shapes. " * 40
    for cut in range(len(base)):
        if len(tok(base[:cut]).input_ids) == n:
            return base[:cut]
    raise AssertionError(f"no prefix of {n} tokens")


def _occupy(server: ServerHandle, weights: Path) -> tuple[Any, str]:
    """Start a long request (400 greedy tokens, no EOS) and wait until health shows it running."""
    client = server.client()
    long = server.request(prompt=no_eos_prompts(weights, 400)[0], sampling={"max_tokens": 400})
    client.submit(long, server.ticket)
    deadline = time.monotonic() + 30
    while server.health()["running"] != 1:
        assert time.monotonic() < deadline, "long request never started"
        time.sleep(0.01)
    return client, long.request_id


def _submit_at_once(server: ServerHandle, prompts: list[str]) -> list[tuple[str, float, Any]]:
    """Submit from one thread per request at the same instant; (outcome, seconds, detail)."""
    clients = [server.client() for _ in prompts]
    for c in clients:
        c.health()  # connected and CURVE handshake done before the clock starts
    barrier = threading.Barrier(len(prompts))
    out: list[tuple[str, float, Any]] = [("", 0.0, None)] * len(prompts)

    def one(i: int) -> None:
        req = server.request(prompt=prompts[i], sampling={"max_tokens": 2})
        barrier.wait()
        t0 = time.perf_counter()
        try:
            clients[i].submit(req, server.ticket)
            out[i] = ("accepted", time.perf_counter() - t0, (clients[i], req.request_id))
        except FabricError as exc:
            out[i] = (type(exc).__name__, time.perf_counter() - t0, exc)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    return out


def _finish(server: ServerHandle, long_client: Any, long_id: str,
            outcomes: list[tuple[str, float, Any]]) -> None:
    assert long_client.cancel(long_id, server.ticket) == "running"
    for kind, _, detail in outcomes:
        if kind == "accepted":
            client, rid = detail
            assert client.result(rid, 60)["finish_reason"] in ("length", "eos")
    h = server.wait_idle()
    assert (h["running"], h["queue_depth"], h["kv_used_tokens"]) == (0, 0, 0)


def test_request_queue_limit_is_exact_and_fast(busy_server: ServerHandle,
                                               tiny_llama_dir: Path) -> None:
    long_client, long_id = _occupy(busy_server, tiny_llama_dir)
    outcomes = _submit_at_once(busy_server, ["The"] * 10)  # 1 token each: far below 50
    assert busy_server.health()["running"] == 1  # the long one was still running throughout
    kinds = [k for k, _, _ in outcomes]
    assert kinds.count("accepted") == QUEUE_REQUESTS, kinds
    assert kinds.count("Overloaded") == 10 - QUEUE_REQUESTS, kinds
    for kind, seconds, detail in outcomes:
        assert seconds < 0.1, (kind, seconds)
        if kind == "Overloaded":
            assert isinstance(detail, Overloaded)
            assert detail.details.get("retry_after", 0) > 0
    _finish(busy_server, long_client, long_id, outcomes)


def test_zero_queue_admits_exactly_the_free_running_places(model_server: Any,
                                                           tiny_llama_dir: Path) -> None:
    """``max_queue_requests=0``: a request is admitted only if it can join the running batch
    now. One long request holds 1 of 3 places (and, with 1 token per step, keeps the others
    from prefilling, so they hold their places), so of 6 arriving together exactly 2 get in."""
    server = model_server(tiny_llama_dir, name="tiny_llama", max_running=3,
                          max_queue_requests=0, max_batch_tokens=1)
    long_client, long_id = _occupy(server, tiny_llama_dir)
    outcomes = _submit_at_once(server, ["The"] * 6)
    kinds = [k for k, _, _ in outcomes]
    assert kinds.count("accepted") == 2, kinds
    assert kinds.count("Overloaded") == 4, kinds
    deadline = time.monotonic() + 10  # the accepted two join the batch at the next step
    while server.health()["running"] != 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert server.health()["running"] == 3
    assert max(s for _, s, _ in outcomes) < 0.1
    _finish(server, long_client, long_id, outcomes)


def test_submit_many_sends_all_then_reads_each_answer(busy_server: ServerHandle,
                                                      tiny_llama_dir: Path) -> None:
    """``ServerClient.submit_many``: one burst, one answer per request, in order: the queue's
    first QUEUE_REQUESTS are accepted, the rest refused with ``Overloaded``."""
    long_client, long_id = _occupy(busy_server, tiny_llama_dir)
    client = busy_server.client()
    reqs = [busy_server.request(prompt="The", sampling={"max_tokens": 2}) for _ in range(8)]
    answers = client.submit_many([(r, busy_server.ticket) for r in reqs])
    assert answers[:QUEUE_REQUESTS] == [None] * QUEUE_REQUESTS
    assert all(isinstance(a, Overloaded) for a in answers[QUEUE_REQUESTS:]), answers
    outcomes = [("accepted", 0.0, (client, r.request_id)) for r in reqs[:QUEUE_REQUESTS]]
    _finish(busy_server, long_client, long_id, outcomes)


def test_bulk_refusal_policy() -> None:
    """What a refused request of a bulk submit does (``ServerSession``): a hard refusal is that
    input's error; backpressure is sent again once one of ours has finished; with none of ours
    in flight (e.g. a draining server refusing all) a single request's refusal stands."""
    from fabric.endpoint.session import retry_pause
    from fabric.errors import InvalidRequest
    from fabric.protocol import validate_request

    busy, bad = Overloaded("full", retry_after=1.0), InvalidRequest("bad")
    req = validate_request({"model": "m", "prompt": "a"})
    far = time.monotonic() + 60
    assert retry_pause(bad, req, True, True, far) is None
    assert retry_pause(busy, req, True, False, far) == 0.0  # resend after one of ours
    assert retry_pause(busy, req, False, False, far) is None  # none of ours got in: give up


def test_token_queue_limit_is_exact(busy_server: ServerHandle, tiny_llama_dir: Path) -> None:
    prompt = _text_of(tiny_llama_dir, 12)  # 4 x 12 = 48 <= 50 < 5 x 12: the 5th is refused
    long_client, long_id = _occupy(busy_server, tiny_llama_dir)
    outcomes = _submit_at_once(busy_server, [prompt] * 8)
    assert busy_server.health()["running"] == 1
    kinds = [k for k, _, _ in outcomes]
    assert kinds.count("accepted") == QUEUE_TOKENS // 12, kinds
    assert kinds.count("Overloaded") == 8 - QUEUE_TOKENS // 12, kinds
    assert max(s for _, s, _ in outcomes) < 0.1
    _finish(busy_server, long_client, long_id, outcomes)


def test_kv_budget_makes_requests_wait_not_fail(model_server: Any, tiny_llama_dir: Path) -> None:
    budget = 120
    server = model_server(tiny_llama_dir, name="tiny_llama", kv_budget_tokens=budget)
    tok = hf_tokenizer(tiny_llama_dir)
    prompt = "The mitochondria is the powerhouse of the cell."
    need = len(tok(prompt).input_ids) + 40
    assert 2 * need <= budget < 3 * need  # two fit at once, not three
    client = server.client()
    reqs = [server.request(prompt=prompt, sampling={"max_tokens": 40, "temperature": 1.0,
                                                    "seed": i}) for i in range(6)]
    for r in reqs:
        client.submit(r, server.ticket)
    peak_running, saw_waiting = 0, False
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        h = server.health()
        assert h["kv_used_tokens"] <= budget
        peak_running = max(peak_running, h["running"])
        saw_waiting |= h["queue_depth"] > 0 and h["running"] > 0
        if h["running"] == 0 and h["queue_depth"] == 0:
            break
        time.sleep(0.005)
    results = [client.result(r.request_id, 60) for r in reqs]
    assert all(len(r["token_ids"]) <= 40 and r["finish_reason"] in ("length", "eos")
               for r in results)
    assert peak_running <= 2
    assert saw_waiting or any(r["timings"]["queue_s"] > 0.001 for r in results)
    h = server.wait_idle()
    assert h["kv_used_tokens"] == 0
    with pytest.raises(ContextLengthExceeded, match="budget"):
        client.submit(server.request(prompt=prompt, sampling={"max_tokens": budget}),
                      server.ticket)
    # ... and the server still serves.
    assert server.run(prompt=prompt, sampling={"max_tokens": 3})["usage"]["completion_tokens"]


def _seq(n: int, computed: int = 0) -> Any:
    from fabric.engine.sequence import Sequence
    from fabric.protocol import InferenceRequest

    return Sequence(request=InferenceRequest(model="m", prompt="x"), prompt_ids=[1] * n,
                    reserve=n + 4, computed=computed)


def test_prefill_backlog_bounds_admission_exactly() -> None:
    """``max_prefill_tokens`` counts prompt tokens not yet prefilled: waiting ones and the
    unfinished remainder of running ones; the boundary is exact and the refusal says why."""
    from fabric.engine.engine import Engine
    from fabric.engine.frontend import Frontend
    from fabric.engine.scheduler import Limits
    from fabric.sites import ServerConfig

    engine = Engine(None, None, Limits(10_000, 4, 8), {}, set(), 2,  # type: ignore[arg-type]
                    emit=lambda rid, msg: None)

    def front(**cfg: Any) -> Frontend:
        return Frontend(engine, None, ServerConfig(**cfg), b"k", "m", {})  # type: ignore[arg-type]

    bounded = front(max_prefill_tokens=30)
    bounded._admit(200)  # an idle server takes a prompt longer than the bound
    sched = engine.scheduler
    for seq in (_seq(20, computed=8), _seq(7, computed=7)):  # 12 tokens left; 0 (decoding)
        sched.running[seq.request_id] = seq
    sched.waiting.append(_seq(6))
    engine.post("add", _seq(4))
    q = engine.queued()
    assert (q.waiting, q.waiting_tokens, q.free, q.prefill_tokens) == (2, 10, 6, 22)
    bounded._admit(8)  # 22 + 8 = 30: exactly the bound
    with pytest.raises(Overloaded, match=r"prefill backlog is full \(22 .*limit 30\)") as info:
        bounded._admit(9)
    assert info.value.details["retry_after"] > 0
    front()._admit(9)  # no bound configured: admitted
    sched.running.clear()
    with pytest.raises(Overloaded):  # the waiting ones alone still count
        bounded._admit(21)
    bounded._admit(20)


def test_retry_after_is_the_time_to_prefill_what_is_ahead() -> None:
    """A refusal's ``retry_after`` is the prompt tokens ahead over the server's recent prefill
    (or embedding) rate, within 0.5-30 s; the rate counts prompt tokens, not decode tokens."""
    from collections import deque

    from fabric.engine.engine import RATE_WINDOW_S, Engine
    from fabric.engine.frontend import retry_after
    from fabric.engine.scheduler import Limits
    from fabric.engine.steps import SeqOutput, SeqWork, StepPlan

    assert retry_after(1000, 100.0) == 10.0
    assert retry_after(1000, 1e6) == 0.5 and retry_after(10**7, 10.0) == 30.0
    assert retry_after(500, 0.0) == 1.0  # no recent rate: ask again soon

    class Executor:
        outputs: deque[list[SeqOutput]] = deque()

        def collect(self) -> list[SeqOutput]:
            return self.outputs.popleft()

    runner = Executor()
    engine = Engine(runner, None, Limits(10_000, 4, 8), {}, set(), 2,  # type: ignore[arg-type]
                    emit=lambda rid, msg: None)
    long, short = _seq(40), _seq(30, computed=20)
    for seq in (long, short):
        engine.scheduler.running[seq.request_id] = seq
    plan = StepPlan(1, [SeqWork(long.request_id, 0, [1] * 16, 44),
                        SeqWork(short.request_id, 20, [1] * 8, 34)])  # two prefill chunks
    runner.outputs.append([SeqOutput(long.request_id), SeqOutput(short.request_id)])
    engine._launched.append(plan)
    engine._collect_one()
    assert engine.prefill_tokens_per_s == pytest.approx(24 / RATE_WINDOW_S)
    assert engine.tokens_per_s == 0.0  # no token was sampled
    assert long.computed == 16 and short.computed == 28


def test_step_counts_prompt_tokens_apart_from_generated_ones() -> None:
    import threading

    from fabric.engine.scheduler import Limits, Scheduler
    from fabric.engine.steps import SampleSpec, SeqOutput, SeqWork, StepPlan

    sched = Scheduler(Limits(10_000, 4, 8), lambda seq, out: None, lambda *a: None,
                      threading.RLock())
    decoding, ending = _seq(7, computed=7), _seq(30, computed=26)
    for seq in (decoding, ending):
        sched.running[seq.request_id] = seq
    plan = StepPlan(1, [SeqWork(decoding.request_id, 7, [3], 0, sample=SampleSpec()),
                        SeqWork(ending.request_id, 26, [1] * 6, 0, sample=SampleSpec())])
    outputs = [SeqOutput(decoding.request_id, token=4), SeqOutput(ending.request_id, token=5)]
    # 2 sampled tokens; prompt tokens: 0 of the decode, 4 of the chunk that ran past its prompt
    assert sched.update(plan, outputs) == (2, 4)
