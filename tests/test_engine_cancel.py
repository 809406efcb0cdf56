"""Cancellation, vanished clients and deadlines free their slots and KV memory."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pytest

from fabric.errors import Cancelled, DeadlineExceeded
from fabric.serverclient import ServerClient
from tests.plugins.servers import ServerHandle, no_eos_prompts

SHORT, LONG = 8, 40


@pytest.fixture(scope="module")
def server(model_server: Any, tiny_llama_dir: Path) -> ServerHandle:
    return model_server(tiny_llama_dir, name="tiny_llama", max_running=4)


def _settled(server: ServerHandle) -> dict[str, Any]:
    h = server.wait_idle()
    assert (h["running"], h["queue_depth"], h["kv_used_tokens"]) == (0, 0, 0), h
    return h


def test_100_streams_with_drops_and_queued_cancels(server: ServerHandle,
                                                   tiny_llama_dir: Path) -> None:
    prompts = no_eos_prompts(tiny_llama_dir, LONG, want=4)
    before = _settled(server)["tokens_total"]
    main = server.client()
    # 80 streams that run to the end, and 10 behind them that are cancelled while queued.
    keep = [server.request(prompt=prompts[i % len(prompts)], sampling={"max_tokens": SHORT})
            for i in range(80)]
    doomed = [server.request(prompt=prompts[i % len(prompts)], sampling={"max_tokens": SHORT})
              for i in range(10)]
    for r in keep + doomed:
        main.submit(r, server.ticket, stream=True)
    was = [main.cancel(r.request_id, server.ticket) for r in doomed]
    assert was == ["queued"] * 10
    # 10 clients (one thread each) that vanish after their first token; they asked for LONG.
    firsts: list[dict[str, Any]] = []

    def drop(i: int) -> None:
        client = ServerClient(server.info["address"], server.info["public_key"], 120)
        req = server.request(prompt=prompts[i % len(prompts)], sampling={"max_tokens": LONG})
        client.submit(req, server.ticket, stream=True)
        firsts.append(next(iter(client.events(req.request_id, 120))))
        client.close()

    threads = [threading.Thread(target=drop, args=(i,)) for i in range(10)]
    for t in threads:
        t.start()
    generated = 0
    for r in keep:
        events = list(main.events(r.request_id, 120))
        result = events[-1]["result"]
        tokens = [t for e in events[:-1] for t in e["token_ids"]]
        assert len(result["token_ids"]) == SHORT == len(tokens)
        assert result["finish_reason"] == "length"
        generated += SHORT
    for t in threads:
        t.join(120)
    assert len(firsts) == 10
    assert all(f["op"] == "event" and len(f["token_ids"]) == 1 for f in firsts)
    for r in doomed:
        seen: list[dict[str, Any]] = []
        with pytest.raises(Cancelled):
            for msg in main.events(r.request_id, 30):
                seen.append(msg)
        assert seen == []  # not one token: it never reached the model
    after = _settled(server)["tokens_total"]
    extra = after - before - generated  # tokens the 10 dropped streams produced
    assert 10 <= extra < 10 * LONG // 2, extra


def test_deadline_ends_request_and_frees_kv(server: ServerHandle, tiny_llama_dir: Path) -> None:
    client = server.client()
    prompt = no_eos_prompts(tiny_llama_dir, 200)[0]
    req = server.request(prompt=prompt, sampling={"max_tokens": 200}, timeout=0.05)
    t0 = time.monotonic()
    client.submit(req, server.ticket, stream=True)
    with pytest.raises(DeadlineExceeded) as info:
        list(client.events(req.request_id, 30))
    assert time.monotonic() - t0 < 5
    assert info.value.details.get("timeout") == pytest.approx(0.05)
    # A request that expires while queued behind others also ends with the typed error.
    busy = [server.request(prompt="The", sampling={"max_tokens": 60}) for _ in range(8)]
    for r in busy:
        client.submit(r, server.ticket)
    late = server.request(prompt="The", sampling={"max_tokens": 5}, timeout=0.01)
    client.submit(late, server.ticket)
    with pytest.raises(DeadlineExceeded):
        client.result(late.request_id, 30)
    for r in busy:
        client.result(r.request_id, 60)
    _settled(server)


def test_cancel_mid_stream_stops_within_one_step(server: ServerHandle,
                                                 tiny_llama_dir: Path) -> None:
    prompt = no_eos_prompts(tiny_llama_dir, 200)[0]
    client = server.client()
    req = server.request(prompt=prompt, sampling={"max_tokens": 200})
    client.submit(req, server.ticket, stream=True)
    events = client.events(req.request_id, 30)
    got = [next(events) for _ in range(3)]
    assert client.cancel(req.request_id, server.ticket) == "running"
    # Everything the server had produced when it answered the cancel is now in our buffer.
    at_cancel = len(got) + len(client._pending.get(req.request_id, []))
    with pytest.raises(Cancelled):
        for msg in events:
            got.append(msg)
    assert len(got) - at_cancel <= 2, (len(got), at_cancel)
    assert len(got) < 200
    assert client.cancel(req.request_id, server.ticket) in ("unknown", "done")
    _settled(server)
