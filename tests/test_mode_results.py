"""How the science modes' results are put together, without a model server: captures folded over
prefill chunks (``result_maps.accumulate``), pooling, the layers and positions a hidden-states
result names (``result_maps.build``), a batched embed request's members folded into one result
(``embed_batches.Batch``) and ``Fabric.embed``'s split of texts into tasks (``EmbedPlan``)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fabric.client.embedding import EMBED_CHUNK, EmbedPlan
from fabric.engine.embed_batches import Batch, split_member
from fabric.engine.result_maps import accumulate, build, pool
from fabric.engine.sequence import CaptureSpec, Sequence
from fabric.protocol import InferenceRequest
from fabric.wire.arrays import decode_array, encode_array

IDENTITY = {"name": "m", "version": "v1", "sha256": "0" * 64}
N_LAYERS = 4


def _seq(mode: str, **fields: object) -> Sequence:
    req = InferenceRequest(model="m", prompt="x", **fields)  # type: ignore[arg-type]
    seq = Sequence(request=req, prompt_ids=[5, 6, 7, 8, 9], reserve=5)
    seq.capture = CaptureSpec([N_LAYERS], mode)
    return seq


def test_a_mean_over_prefill_chunks_counts_every_chunk() -> None:
    """A prompt prefilled in two steps: each step gives (sum, count); the mean is over all."""
    rows = torch.arange(10, dtype=torch.float32).reshape(5, 2)
    seq = _seq("mean", kind="embed")
    accumulate(seq, {N_LAYERS: (rows[:3].sum(0), 3)})
    accumulate(seq, {N_LAYERS: (rows[3:].sum(0), 2)})
    assert pool(seq.captures[N_LAYERS], "mean", False) == rows.mean(0).tolist()


def test_all_rows_over_prefill_chunks_keep_their_order() -> None:
    rows = torch.arange(10, dtype=torch.float32).reshape(5, 2)
    seq = _seq("all", kind="embed", pooling="last")
    accumulate(seq, {N_LAYERS: rows[:3]})
    accumulate(seq, {N_LAYERS: rows[3:]})
    assert pool(seq.captures[N_LAYERS], "last", False) == rows[-1].tolist()
    assert pool(seq.captures[N_LAYERS], "first", False) == rows[0].tolist()
    assert pool(seq.captures[N_LAYERS], "mean", False) == rows.mean(0).tolist()
    normed = pool(seq.captures[N_LAYERS], "last", True)
    assert np.linalg.norm(normed) == pytest.approx(1.0)
    assert normed == pytest.approx((rows[-1] / rows[-1].norm()).tolist())


def test_first_token_capture_keeps_the_first_chunks_row() -> None:
    seq = _seq("first", kind="embed", pooling="first")
    accumulate(seq, {N_LAYERS: torch.tensor([1.0, 2.0])})
    accumulate(seq, {N_LAYERS: torch.tensor([3.0, 4.0])})  # a later chunk's first row
    assert pool(seq.captures[N_LAYERS], "first", False) == [1.0, 2.0]


def test_hidden_states_without_positions_name_every_token() -> None:
    seq = _seq("all", kind="hidden_states", layers=[-1])
    accumulate(seq, {N_LAYERS: torch.ones(5, 2)})
    result = build(seq, "stop", IDENTITY, "", N_LAYERS)
    assert result["positions"] == [0, 1, 2, 3, 4]
    assert decode_array(result["layers"]["-1"]).shape == (5, 2)
    at = _seq("all", kind="hidden_states", layers=[-1], positions=[0, -1])
    accumulate(at, {N_LAYERS: torch.arange(10, dtype=torch.float32).reshape(5, 2)})
    result = build(at, "stop", IDENTITY, "", N_LAYERS)
    assert result["positions"] == [0, -1]
    assert decode_array(result["layers"]["-1"]).tolist() == [[0.0, 1.0], [8.0, 9.0]]


# -- a batched embed request ------------------------------------------------------------------

def _member(vec: list[float], tokens: int, total_s: float) -> dict[str, object]:
    return {"layers": {"-1": vec}, "usage": {"prompt_tokens": tokens},
            "timings": {"queue_s": 0.0, "prefill_s": total_s / 2, "decode_s": 0.0,
                        "total_s": total_s}, "model": IDENTITY}


def test_a_batch_sums_usage_keeps_the_slowest_timings_and_counts_each_member_once() -> None:
    batch = Batch("r", 3)
    batch.add(2, _member([3.0, 3.0], 4, 0.5))
    batch.add(0, _member([1.0, 1.0], 2, 2.0))
    batch.add(0, _member([9.0, 9.0], 2, 9.0))  # a repeat of member 0 (a re-sent reply)
    assert not batch.done
    batch.add(1, _member([2.0, 2.0], 3, 1.0))
    assert batch.done
    result = batch.result()
    assert result["usage"] == {"prompt_tokens": 9, "completion_tokens": 0}
    assert result["timings"]["total_s"] == 2.0 and result["timings"]["prefill_s"] == 1.0
    assert decode_array(result["embeddings"]).tolist() == [[1, 1], [2, 2], [3, 3]]


def test_only_a_member_id_splits() -> None:
    assert split_member("abc#12") == ("abc", 12)
    assert split_member("a#b#3") == ("a#b", 3)
    assert split_member("plain") is None
    assert split_member("user#tag") is None  # a caller's own '#', not a member index


# -- Fabric.embed's tasks ---------------------------------------------------------------------

def test_embed_plan_sends_longest_texts_first_and_returns_the_callers_order() -> None:
    texts = ["a" * (i % 7 + 1) + str(i) for i in range(EMBED_CHUNK + 5)]
    plan = EmbedPlan.of(texts, -1)
    lengths = [len(texts[i]) for i in plan.order]
    assert lengths == sorted(lengths, reverse=True)
    assert [len(c) for c in plan.chunks] == [EMBED_CHUNK, 5]
    assert sorted(i for c in plan.chunks for i in c) == list(range(len(texts)))
    # Each task answers its texts' vectors in its own order; the caller gets its own order.
    results = [{"layers": {"-1": _wire(np.array([[float(i)] for i in chunk], np.float32))}}
               for chunk in plan.chunks]
    vectors = plan.assemble(results)
    assert vectors[:, 0].tolist() == [float(i) for i in range(len(texts))]
    single = EmbedPlan.of("one text", -1)
    assert single.assemble([{"layers": {"-1": _wire(np.array([[0.5, 2.0]], np.float32))}}]
                           ).tolist() == [0.5, 2.0]


def _wire(array: np.ndarray) -> dict[str, object]:
    return encode_array(array)
