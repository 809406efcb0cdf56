"""The model server's ``stats`` op counts what it served: tokens, latencies, how requests ended
(a fresh server, so its counters start at zero)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from fabric import tickets
from fabric.errors import Cancelled
from fabric.metrics import Histogram
from tests.plugins.servers import ServerHandle, no_eos_prompts

pytestmark = pytest.mark.slow

LONG = 40


@pytest.fixture(scope="module")
def server(model_server: Any, tiny_llama_dir: Path) -> ServerHandle:
    return model_server(tiny_llama_dir, name="tiny_stats", max_running=4)


def test_stats_count_tokens_latencies_and_endings(server: ServerHandle,
                                                  tiny_llama_dir: Path) -> None:
    (prompt,) = no_eos_prompts(tiny_llama_dir, LONG, want=1)
    operator = tickets.issue(server.key, model=server.name, admin=True, ttl_s=600)
    client = server.client(timeout_s=120)
    before = client.stats(operator)
    assert before["generation_tokens"] == 0 and before["finished"] == {}
    results = [server.run(client, prompt=prompt, sampling={"max_tokens": n}) for n in (3, 5, 8)]
    # One stream cancelled after its first token: it counts as Cancelled, with what it made.
    doomed = server.request(prompt=prompt, sampling={"max_tokens": LONG})
    client.submit(doomed, server.ticket, stream=True)
    events = client.events(doomed.request_id, 120)
    assert next(events)["op"] == "event"
    client.cancel(doomed.request_id, server.ticket)
    with pytest.raises(Cancelled):
        list(events)
    server.wait_idle()
    stats = client.stats(operator)
    completed = sum(len(r["token_ids"]) for r in results)
    made = stats["generation_tokens"] - completed  # by the cancelled stream: 1 to LONG - 1
    assert 1 <= made < LONG
    assert stats["finished"] == {"length": 3, "Cancelled": 1}
    assert stats["prompt_tokens"] == 4 * results[0]["usage"]["prompt_tokens"]
    ttft = Histogram.from_dict(stats["time_to_first_token_seconds"])
    itl = Histogram.from_dict(stats["inter_token_latency_seconds"])
    e2e = Histogram.from_dict(stats["e2e_request_latency_seconds"])
    assert ttft.count == 4 and e2e.count == 4
    # every generated token but each request's first is one inter-token gap
    assert itl.count == stats["generation_tokens"] - 4
    slowest = max(r["timings"]["total_s"] for r in results)
    assert e2e.sum >= slowest and ttft.sum > 0 and itl.sum > 0
    assert (stats["num_requests_running"], stats["num_requests_waiting"],
            stats["kv_used_tokens"]) == (0, 0, 0)


def test_requests_refused_as_they_arrive_count_by_error_class(server: ServerHandle) -> None:
    """A request the server refuses before it runs (too long for the context, a hook out of
    range) counts in ``finished`` by its error class, the site's
    ``fabric_request_failure_total``: a client that submits straight to the server (the local
    site, a tunnel) leaves no other trace of it. Before, such refusals were counted nowhere."""
    from fabric.errors import ContextLengthExceeded, InvalidHook

    operator = tickets.issue(server.key, model=server.name, admin=True, ttl_s=600)
    client = server.client(timeout_s=120)
    before = dict(client.stats(operator)["finished"])
    with pytest.raises(ContextLengthExceeded):
        server.run(client, prompt="The cell", sampling={"max_tokens": 1_000_000})
    with pytest.raises(InvalidHook):
        server.run(client, prompt="The cell", sampling={"max_tokens": 2},
                   hooks=[{"kind": "capture", "layer": 999}])
    finished = client.stats(operator)["finished"]
    for error in ("ContextLengthExceeded", "InvalidHook"):
        assert finished.get(error, 0) == before.get(error, 0) + 1
