"""``ServerSession`` against real tiny-model servers launched by a real deployment manager:
a poison input fails alone, a full queue is backpressure, and a server that dies mid-run is not
resent what it had accepted (only what it never took goes to the server relaunched once)."""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from fabric import env, tickets
from fabric.endpoint.context import SiteContext
from fabric.endpoint.session import Outcome, ServerSession
from fabric.errors import ContextLengthExceeded, ModelServerUnavailable
from fabric.protocol import InferenceRequest
from fabric.serverclient import ServerClient
from fabric.sites import load_site
from tests.plugins.site import TINY_MODEL, write_site

QUEUE = 2
"""Requests the test servers queue beside the one they run."""


@pytest.fixture(scope="module")
def ctx(tmp_path_factory: pytest.TempPathFactory, tiny_llama_dir: Path) -> Iterator[SiteContext]:
    """A site whose servers run one request at a time and queue ``QUEUE`` more."""
    folder = write_site(tmp_path_factory.mktemp("session-site"), model_dir=tiny_llama_dir,
                        server={"idle_timeout_s": 300.0, "ready_timeout_s": 300,
                                "kv_budget_tokens": 4096, "threads_per_rank": 1,
                                "max_running": 1, "max_queue_requests": QUEUE})
    context = SiteContext(load_site(folder), folder / "state")
    try:
        yield context
    finally:
        mgr = context.manager
        for dep in mgr.db.query(states=("queued", "loading", "ready", "draining")):
            mgr.undeploy(dep.id, drain_wait_s=2.0)


def request(text: str = "The cell", max_tokens: int = 3) -> InferenceRequest:
    return InferenceRequest(model=TINY_MODEL, prompt=text,
                            sampling={"max_tokens": max_tokens, "temperature": 0.0})


def session(ctx: SiteContext, **kw: Any) -> ServerSession:
    return ServerSession(ctx, ctx.entry(TINY_MODEL), "tester", timeout_s=300.0, **kw)


def test_a_poison_input_fails_alone(ctx: SiteContext) -> None:
    s = session(ctx, window=2, patient=True)
    try:
        out = s.run([request(), request("word " * 900), request("Another")])
    finally:
        s.close()
    assert out[0].result and out[2].result and out[1].result is None
    assert isinstance(out[1].error, ContextLengthExceeded)
    assert s.served_by is not None
    health = ctx.manager.health(s.served_by)
    assert health is not None and health["state"] == "ready"


def test_a_full_queue_is_backpressure(ctx: SiteContext) -> None:
    """Eight requests at once to a server that runs one and queues two: the refused ones are
    sent again as ours finish, and every one ends with a result."""
    reqs = [request(f"Prompt {i}", max_tokens=8) for i in range(8)]
    s = session(ctx)  # no window: all eight go at once
    try:
        out = s.run(reqs)
    finally:
        s.close()
    assert all(o.error is None and o.result for o in out), [o.error for o in out]
    assert [o.request_id for o in out] == [r.request_id for r in reqs]  # no fresh ids asked


def _kill(pid: int) -> None:
    """SIGKILL and wait until it is gone (or a zombie its launcher has yet to reap)."""
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            return
        if stat.rsplit(")", 1)[1].split()[0] == "Z":
            return
        time.sleep(0.05)


def test_a_server_that_dies_is_not_resent_what_it_accepted(ctx: SiteContext) -> None:
    reqs = [request(f"Prompt {i}", max_tokens=200 if i == 1 else 3) for i in range(6)]
    s = session(ctx, window=2, listen_s=2.0)
    killed: dict[str, Any] = {}

    def on_outcome(i: int, outcome: Outcome) -> None:
        # Input 0 is done; input 1 (accepted, 200 tokens to go) is in the server: kill it.
        if i == 0 and not killed:
            dep = s.served_by
            assert dep is not None
            killed["dep"] = dep
            _kill(int(json.loads(Path(dep.info_path).read_text())["pid"]))

    try:
        out = s.run(reqs, on_outcome=on_outcome)
    finally:
        s.close()
    first, second = killed["dep"], s.served_by
    assert second is not None and second.id != first.id  # relaunched once
    assert out[0].result is not None
    assert isinstance(out[1].error, ModelServerUnavailable), out[1]
    assert "not resent" in out[1].error.message
    assert out[1].request_id == reqs[1].request_id
    assert all(o.result is not None for o in out[2:]), [o.error for o in out[2:]]
    # The relaunched server never saw the accepted request.
    ticket = tickets.issue(ctx.ticket_key(), model=TINY_MODEL, request_id=reqs[1].request_id)
    with ServerClient(str(second.address), str(second.public_key)) as client:
        assert client.cancel(reqs[1].request_id, ticket) == "unknown"
    assert ctx.manager.db.get(first.id).state == "dead"  # type: ignore[union-attr]


def test_the_shard_gives_one_line_per_input(ctx: SiteContext,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """``run_shard`` (a thin caller of the session): a result or an error per input, in order,
    a fresh nonce per execution; an invalid and a poison input fail alone."""
    from fabric.endpoint.campaign_shard import run_shard
    from fabric.wire import gcwire

    # FABRIC_SITE names the site's definition folder
    monkeypatch.setenv(env.FABRIC_SITE.name, str(ctx.state_dir.parent))
    monkeypatch.setenv(env.FABRIC_STATE_DIR.name, str(ctx.state_dir))
    good = {"model": TINY_MODEL, "prompt": "The cell", "sampling": {"max_tokens": 2}}
    items = [{"custom_id": "a", "request": good},
             {"custom_id": "bad", "request": {"model": TINY_MODEL, "prompt": "  "}},
             {"custom_id": "poison", "request": {**good, "prompt": "word " * 900}},
             {"custom_id": "b", "request": good},
             {"custom_id": "e", "request": {"model": TINY_MODEL, "kind": "embed",
                                            "prompt": "a cat"}}]
    reply = gcwire.unwrap(run_shard({"shard_id": "s1", "model": TINY_MODEL, "items": items,
                                     "concurrency": 2}))
    lines = reply["results"]
    assert [r["custom_id"] for r in lines] == ["a", "bad", "poison", "b", "e"]
    assert [r["ok"] for r in lines] == [True, False, False, True, True]
    # An embedding is written once (no ``layers`` repeating it), as float32 numbers.
    embedded = lines[4]["result"]
    assert "layers" not in embedded and len(embedded["embedding"]) == 64
    assert lines[1]["error"]["kind"] == "InvalidRequest"
    assert lines[2]["error"]["kind"] == "ContextLengthExceeded"
    nonces = [r["nonce"] for r in lines]
    assert len(set(nonces)) == 5 and all(r["result"]["request_id"] == r["nonce"]
                                         for r in lines if r["ok"])
    assert reply["model"]["name"] == TINY_MODEL and len(reply["model"]["sha256"]) == 64


def test_a_quota_counts_the_new_tokens_a_request_asks_for() -> None:
    """A request for 10,000 new tokens must not pass a 100-token daily quota on the strength
    of its short prompt: the estimate admission checks holds both (an embedding makes none)."""
    from fabric.endpoint.session import token_estimate
    from fabric.protocol import InferenceRequest

    asks = InferenceRequest(model="m", prompt="Hi there", sampling={"max_tokens": 10_000})
    assert token_estimate(asks) >= 10_000 + len("Hi there") // 4
    short = InferenceRequest(model="m", prompt="Hi there", sampling={"max_tokens": 4})
    assert token_estimate(short) < 100
    embed = InferenceRequest(model="m", kind="embed", prompt="Hi there",
                             sampling={"max_tokens": 10_000})
    assert token_estimate(embed) < 100
