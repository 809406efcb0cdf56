"""Batched embed requests (``InferenceRequest.prompts``) at a real model server: one message in,
one ``(n, dim)`` float32 array out, equal to the per-text requests; a bad text named by its
index; admission as one arrival; cancel and timeout of a whole batch."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fabric.client.decoding import embeddings_from_results
from fabric.errors import (
    Cancelled,
    ContextLengthExceeded,
    DeadlineExceeded,
    InvalidRequest,
    Overloaded,
)
from fabric.protocol import renumber_text_error, validate_request
from tests.plugins.servers import ServerHandle, hf_tokenizer
from tests.test_engine_admission import _occupy

QUEUE_REQUESTS = 5
QUEUE_TOKENS = 60
TEXTS = ["The cell", "Proteins fold into shapes that decide what they do.", "Hello",
         "The mitochondria is the powerhouse of the cell, or so they say in school."]


@pytest.fixture(scope="module")
def busy_server(model_server: Any, tiny_llama_dir: Path) -> ServerHandle:
    """One request runs at a time, so a long one keeps the others waiting."""
    return model_server(tiny_llama_dir, name="tiny_llama", max_running=1,
                        max_queue_requests=QUEUE_REQUESTS, max_queue_tokens=QUEUE_TOKENS,
                        max_batch_tokens=1)


def test_batch_equals_one_request_per_text(model_server: Any) -> None:
    """MiniLM: a batch of texts (more than one sub-batch, lengths mixed) gives, row by row, the
    vectors of separate requests; one message, one float32 array per asked layer."""
    from fabric.catalog import Catalog
    from fabric.weights import prepare

    folder = prepare(Catalog().get("minilm-l6")).path
    server = model_server(folder, name="minilm-l6", family="embedding")
    words = ["the", "cell", "membrane", "keeps", "ions", "out", "while", "pumps", "move",
             "them", "back", "in"]
    texts = TEXTS + [" ".join(words[: 1 + (5 * i) % len(words)]) + f" {i}" for i in range(41)]
    client = server.client()
    singles = [server.request(kind="embed", prompt=t) for t in texts]
    batch = server.request(kind="embed", prompts=texts)
    for r in [*singles, batch]:
        client.submit(r, server.ticket)
    want = embeddings_from_results([client.result(r.request_id, 120) for r in singles])
    result = client.result(batch.request_id, 120)
    assert result["count"] == len(texts) and set(result["layers"]) == {"-1"}
    assert result["embeddings"]["dtype"] == "float32"
    assert result["embeddings"]["shape"] == [len(texts), 384]
    got = embeddings_from_results([result])
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
    assert result["usage"]["prompt_tokens"] > 2 * len(texts)
    assert server.wait_idle()["queue_depth"] == 0


def test_bad_text_in_a_batch_is_named_by_index(busy_server: ServerHandle) -> None:
    """A text over the context refuses the whole batch, naming that text; nothing is queued.
    Blank or non-string texts are refused by the protocol, also by index."""
    client = busy_server.client()
    texts = ["fine", "word " * 900, "also fine"]
    with pytest.raises(ContextLengthExceeded, match=r"^prompts\[1\]: prompt has \d+ tokens") as e:
        client.submit(busy_server.request(kind="embed", prompts=texts), busy_server.ticket)
    assert e.value.details["index"] == 1
    # The SDK re-says it about the caller's own numbering (it may have reordered the texts).
    renamed = renumber_text_error(e.value, [7, 3, 5].__getitem__)
    assert isinstance(renamed, ContextLengthExceeded)
    assert renamed.message.startswith("texts[3]: prompt has") and renamed.details["index"] == 3
    assert busy_server.health()["queue_depth"] == 0
    for bad, msg in ((["a", "  "], r"prompts\[1\] is empty"),
                     (["a", "b", 3], r"prompts\.2: Input should be a valid string"),
                     ([], "prompts has 0 texts"),):
        with pytest.raises(InvalidRequest, match=msg):
            validate_request({"model": "m", "kind": "embed", "prompts": bad})
    with pytest.raises(InvalidRequest, match="for kind 'embed' only"):
        validate_request({"model": "m", "kind": "generate", "prompts": ["a"]})


def test_batch_is_admitted_as_one_arrival(busy_server: ServerHandle, tiny_llama_dir: Path) -> None:
    """With 4 single requests waiting (limit 5), a 3-text batch still gets in (one arrival);
    then its texts count: 7 wait, and the next single request is refused. A batch whose tokens
    would pass the token limit is refused whole; one that could never fit says so."""
    long_client, long_id = _occupy(busy_server, tiny_llama_dir)
    client = busy_server.client()
    singles = [busy_server.request(kind="embed", prompt="The") for _ in range(4)]
    assert client.submit_many([(r, busy_server.ticket) for r in singles]) == [None] * 4
    batch = busy_server.request(kind="embed", prompts=["The", "The cell", "The"])
    client.submit(batch, busy_server.ticket)
    assert busy_server.health()["queue_depth"] == 7
    with pytest.raises(Overloaded):
        client.submit(busy_server.request(kind="embed", prompt="The"), busy_server.ticket)
    # 7 waiting -> still over the request limit: a batch is refused like a single request.
    with pytest.raises(Overloaded) as full:
        client.submit(busy_server.request(kind="embed", prompts=["The"]), busy_server.ticket)
    assert full.value.details["reason"] == "queue_full"
    with pytest.raises(InvalidRequest, match="send fewer texts per batch") as e:
        client.submit(busy_server.request(kind="embed", prompts=["word " * 40] * 3),
                      busy_server.ticket)
    assert e.value.details["max_queue_tokens"] == QUEUE_TOKENS
    assert long_client.cancel(long_id, busy_server.ticket) == "running"
    results = [client.result(r.request_id, 60) for r in [*singles, batch]]
    assert embeddings_from_results(results).shape == (7, 64)
    h = busy_server.wait_idle()
    assert (h["running"], h["queue_depth"], h["kv_used_tokens"]) == (0, 0, 0)


def test_token_limit_counts_the_whole_batch(busy_server: ServerHandle,
                                            tiny_llama_dir: Path) -> None:
    text = "The cell"
    n = len(hf_tokenizer(tiny_llama_dir)(text).input_ids)
    fits = QUEUE_TOKENS // n - 1  # fits * n <= 60 < (fits + 2) * n
    assert fits >= 1
    long_client, long_id = _occupy(busy_server, tiny_llama_dir)
    client = busy_server.client()
    first = busy_server.request(kind="embed", prompts=[text] * fits)
    client.submit(first, busy_server.ticket)
    with pytest.raises(Overloaded):
        client.submit(busy_server.request(kind="embed", prompts=[text] * 2), busy_server.ticket)
    assert busy_server.health()["queue_depth"] == fits
    assert long_client.cancel(long_id, busy_server.ticket) == "running"
    assert client.result(first.request_id, 60)["count"] == fits
    busy_server.wait_idle()


def test_cancel_and_timeout_end_the_whole_batch(busy_server: ServerHandle,
                                                tiny_llama_dir: Path) -> None:
    long_client, long_id = _occupy(busy_server, tiny_llama_dir)
    client = busy_server.client()
    batch = busy_server.request(kind="embed", prompts=["The", "The cell"])
    client.submit(batch, busy_server.ticket)
    assert client.cancel(batch.request_id, busy_server.ticket) == "queued"
    with pytest.raises(Cancelled):
        client.result(batch.request_id, 30)
    late = busy_server.request(kind="embed", prompts=["The", "The cell"], timeout=0.2)
    client.submit(late, busy_server.ticket)
    with pytest.raises(DeadlineExceeded):
        client.result(late.request_id, 30)
    assert busy_server.health()["queue_depth"] == 0
    assert long_client.cancel(long_id, busy_server.ticket) == "running"
    h = busy_server.wait_idle()
    assert (h["running"], h["queue_depth"], h["kv_used_tokens"]) == (0, 0, 0)


def test_a_batch_expires_whole_and_leaves_the_queue_before_it_is_answered(
        tiny_llama_dir: Path) -> None:
    """In process: a batch's members share one arrival, so one deadline; and when expired
    members are reaped, all leave the queue before the first is reported, so a client told
    its batch timed out never finds a member still queued (CI saw ``queue_depth`` 1 once)."""
    import threading

    from fabric.engine.prepare import ModelLimits, Preparer
    from fabric.engine.scheduler import Limits, Scheduler

    prep = Preparer(hf_tokenizer(tiny_llama_dir), ModelLimits(2, 64, 4, 128, 512, 4096))
    members = prep.prepare_batch(validate_request(
        {"model": "m", "kind": "embed", "prompts": ["The", "The cell", "Hello"],
         "timeout": 0.05}))
    assert len({m.deadline for m in members}) == 1
    queued_at_report: list[int] = []
    sched = Scheduler(Limits(10_000, 64, 8), lambda seq, out: None,
                      lambda *a: queued_at_report.append(len(sched.waiting)),
                      threading.RLock())
    for member in members:
        sched.add(member)
    time.sleep(0.1)
    sched.schedule()
    assert queued_at_report == [0, 0, 0]


def test_a_batch_refused_for_a_full_queue_waits_for_room() -> None:
    """The session's policy: batches refused for a full queue are sent again after a pause (an
    admitted batch frees room as it runs), single requests too for a patient caller (a
    campaign shard); other single requests, a draining server or a passed deadline refuse."""
    from fabric.endpoint.session import ROOM_RETRY_S, retry_pause

    full = Overloaded("full", retry_after=30.0, reason="queue_full")
    batch = validate_request({"model": "m", "kind": "embed", "prompts": ["a", "b"]})
    single = validate_request({"model": "m", "kind": "embed", "prompt": "a"})
    far = time.monotonic() + 60
    assert retry_pause(full, batch, False, False, far) == ROOM_RETRY_S
    assert retry_pause(full, single, False, False, far) is None
    assert retry_pause(full, single, False, True, far) == ROOM_RETRY_S
    assert retry_pause(Overloaded("draining", retry_after=1.0, reason="draining"), batch,
                       False, True, far) is None
    assert retry_pause(full, batch, False, False, time.monotonic() + 0.01) is None
