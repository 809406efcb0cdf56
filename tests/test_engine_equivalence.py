"""Model servers for every pp x tp plan give transformers' outputs: tokens, logprobs, states.

Each plan runs as a real job (Parsl LocalProvider, one process per rank); references are
computed in this process with transformers on the same weights.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from fabric.errors import ContextLengthExceeded
from fabric.wire.arrays import decode_array
from tests.plugins.servers import ServerHandle, hf_greedy, hf_model, hf_tokenizer

PROMPTS = [
    "The",
    "The mitochondria is the powerhouse",
    "Scientists call models through a federated fabric",
    "Tensor parallel splits each layer; pipeline parallel splits the stack of layers. "
    "Proteins fold into shapes that decide what they do. The quick brown fox",
]
MAX_NEW = 12
PLANS = [(1, 1), (2, 1), (1, 2), (2, 2)]
MODELS = ["tiny_llama_dir", "tiny_llama_odd_dir"]
FAMILIES = ["tiny_qwen2_dir", "tiny_qwen3_dir", "tiny_mistral_dir"]
"""The other dense families (biases, qk-norm, sliding windows): their pp=1 tp=1 runs are
covered in-process by test_families, so every server plan of theirs is in the slow tier. They
are served at pp=1 tp=1 and pp=2 tp=2 only: what differs by family is inside a layer (biases
and qk-norm split with the heads, windows per layer), which pp=2 tp=2 runs through both the
tp split and the stage hand-off at once; the Llamas keep the whole matrix."""
FAMILY_PLANS = [(1, 1), (2, 2)]


@pytest.fixture(scope="module", params=[
    # Multi-rank servers take a minute or more to start on 2 busy cores: marked slow.
    pytest.param((m, pp, tp), marks=[pytest.mark.slow] if pp * tp > 1 or m in FAMILIES else [],
                 id=f"{m.removesuffix('_dir')}-pp{pp}-tp{tp}")
    for m in MODELS + FAMILIES for pp, tp in (FAMILY_PLANS if m in FAMILIES else PLANS)])
def served(request: pytest.FixtureRequest, model_server: Any) -> tuple[ServerHandle, Path]:
    name, pp, tp = request.param
    weights: Path = request.getfixturevalue(name)
    return model_server(weights, pp=pp, tp=tp, name=name.removesuffix("_dir")), weights


def _hidden(weights: Path, text: str) -> tuple[list[int], tuple[torch.Tensor, ...]]:
    tok, model = hf_tokenizer(weights), hf_model(weights)
    ids = tok(text).input_ids
    with torch.no_grad():
        out = model(torch.tensor([ids]), output_hidden_states=True)
    return ids, out.hidden_states


def test_greedy_tokens_equal_transformers(served: tuple[ServerHandle, Path]) -> None:
    server, weights = served
    client = server.client()
    reqs = [server.request(prompt=p, sampling={"max_tokens": MAX_NEW}) for p in PROMPTS]
    for r in reqs:  # all in flight at once: they share the batch
        client.submit(r, server.ticket)
    results = [client.result(r.request_id, 120) for r in reqs]
    tok = hf_tokenizer(weights)
    for prompt, res in zip(PROMPTS, results, strict=True):
        want = hf_greedy(weights, prompt, MAX_NEW)
        assert res["token_ids"] == want, prompt
        assert res["usage"] == {"prompt_tokens": len(tok(prompt).input_ids),
                                "completion_tokens": len(want)}
        eos = tok.convert_tokens_to_ids("<|im_end|>")
        assert res["finish_reason"] == ("eos" if want[-1] == eos else "length")


def test_logprobs_equal_transformers(served: tuple[ServerHandle, Path]) -> None:
    server, weights = served
    client = server.client()
    tok, model = hf_tokenizer(weights), hf_model(weights)
    cases = [("The mitochondria is", " the powerhouse of the cell."),
             ("Proteins fold into shapes that decide what they do.", None)]
    reqs = [server.request(kind="logprobs", prompt=p, continuation=c) for p, c in cases]
    for r in reqs:
        client.submit(r, server.ticket)
    for (prompt, cont), req in zip(cases, reqs, strict=True):
        res = client.result(req.request_id, 120)
        ids = tok(prompt).input_ids
        first = len(ids)
        if cont is not None:
            ids = ids + tok(cont, add_special_tokens=False).input_ids
        else:
            first = 1
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)
        want = [float(logp[j - 1, ids[j]]) for j in range(first, len(ids))]
        assert res["token_ids"] == ids[first:]
        np.testing.assert_allclose(res["logprobs"], want, atol=1e-4, rtol=0)
        assert res["total"] == pytest.approx(sum(want), abs=1e-3)


def test_hidden_states_equal_transformers(served: tuple[ServerHandle, Path]) -> None:
    server, weights = served
    text = "Tensor parallel splits each layer; pipeline parallel splits the stack."
    ids, hs = _hidden(weights, text)
    n = len(hs) - 1
    layers = [0, 1, n // 2, n - 1, -1]
    positions = [0, 3, -1]
    res = server.run(kind="hidden_states", prompt=text, layers=layers, positions=positions)
    assert res["token_ids"] == ids
    assert set(res["layers"]) == {str(x) for x in layers}
    for layer in layers:
        got = decode_array(res["layers"][str(layer)])
        want = hs[layer][0, [p % len(ids) for p in positions]].numpy()
        assert got.shape == want.shape
        # 1e-5 relative to the layer's scale: a tp all-reduce adds the partial sums in another
        # order than one matmul does, which moves near-zero elements by ~1e-5 in absolute terms.
        np.testing.assert_allclose(got, want, atol=1e-5 * _scale(want), rtol=1e-5)
    # Without positions: every token's state.
    full = server.run(kind="hidden_states", prompt=text, layers=[n // 2])
    want_full = hs[n // 2][0].numpy()
    np.testing.assert_allclose(decode_array(full["layers"][str(n // 2)]), want_full,
                               atol=1e-5 * _scale(want_full), rtol=1e-5)


def _scale(array: np.ndarray) -> float:
    """The largest magnitude in ``array`` (at least 1): the unit of a scale-aware tolerance."""
    return max(1.0, float(np.abs(array).max()))


@pytest.mark.parametrize("pooling", ["mean", "last", "first"])
def test_embeddings_equal_transformers(served: tuple[ServerHandle, Path], pooling: str) -> None:
    server, weights = served
    texts = ["The quick brown fox", "Proteins fold into shapes that decide what they do."]
    client = server.client()
    reqs = [server.request(kind="embed", prompt=t, layers=[-1, 2], pooling=pooling,
                           normalize=norm) for t in texts for norm in (True, False)]
    for r in reqs:
        client.submit(r, server.ticket)
    for req in reqs:
        res = client.result(req.request_id, 120)
        _, hs = _hidden(weights, str(req.prompt))
        for layer in (-1, 2):
            rows = hs[layer][0]
            vec = {"mean": rows.mean(0), "last": rows[-1], "first": rows[0]}[pooling]
            if req.normalize:
                vec = torch.nn.functional.normalize(vec, dim=-1)
            np.testing.assert_allclose(res["layers"][str(layer)], vec.numpy(), atol=1e-5,
                                       rtol=1e-5)
        assert res["embedding"] == res["layers"]["-1"]


@pytest.mark.slow
@pytest.mark.parametrize("tp", [1, 2, 3])  # 9 heads / 3 KV heads: tp=2 splits unevenly
def test_smollm2_greedy_tokens_equal_transformers(model_server: Any, smollm2_dir: Path,
                                                  tp: int) -> None:
    server = model_server(smollm2_dir, tp=tp, name="smollm2-135m")
    prompts = ["The mitochondria is", "Write a haiku about the ocean.",
               "List three prime numbers:"]
    client = server.client(timeout_s=120)
    reqs = [server.request(prompt=p, sampling={"max_tokens": 16}) for p in prompts]
    for r in reqs:
        client.submit(r, server.ticket)
    for prompt, r in zip(prompts, reqs, strict=True):
        assert client.result(r.request_id, 300)["token_ids"] == hf_greedy(smollm2_dir, prompt,
                                                                           16), prompt


@pytest.mark.parametrize("pooling", ["mean", "first"])
def test_minilm_embeddings_equal_transformers(model_server: Any, pooling: str) -> None:
    from transformers import AutoModel, AutoTokenizer

    from fabric.catalog import Catalog
    from fabric.weights import prepare

    folder = prepare(Catalog().get("minilm-l6")).path
    server = model_server(folder, name="minilm-l6", family="embedding")
    texts = ["A cat sits on the mat.", "Proteins fold into shapes that decide what they do, "
             "and misfolded ones cause disease.", "Hello"]
    # More texts than one encoder sub-batch, lengths shuffled: the server sorts each step by
    # length into sub-batches and must hand every vector back to its own request.
    words = ["the", "cell", "membrane", "keeps", "ions", "out", "while", "pumps", "move",
             "them", "back", "in"]
    texts += [" ".join(words[: 1 + (7 * i) % len(words)]) + f" ({i})" for i in range(37)]
    client = server.client()
    reqs = [server.request(kind="embed", prompt=t, pooling=pooling) for t in texts]
    for r in reqs:  # batched together, padded to the longest
        client.submit(r, server.ticket)
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModel.from_pretrained(folder, dtype=torch.float32).eval()
    for text, r in zip(texts, reqs, strict=True):
        got = client.result(r.request_id, 60)["embedding"]
        enc = tok(text, return_tensors="pt")
        with torch.no_grad():
            hidden = model(**enc).last_hidden_state[0]
        mask = enc["attention_mask"][0].unsqueeze(-1).float()
        vec = (hidden * mask).sum(0) / mask.sum() if pooling == "mean" else hidden[0]
        want = torch.nn.functional.normalize(vec, dim=-1)
        assert len(got) == 384
        np.testing.assert_allclose(got, want.numpy(), atol=1e-5, rtol=0)
    if pooling != "mean":
        return
    # Its recipe embeds 256 tokens at most (sentence_bert_config.json): a longer text would
    # get a vector sentence-transformers never gives (it cuts there), so it is refused.
    at_limit, over = "cell " * 254, "cell " * 255  # [CLS] + n + [SEP] tokens
    assert [len(tok(t).input_ids) for t in (at_limit, over)] == [256, 257]
    fits = server.request(kind="embed", prompt=at_limit)
    client.submit(fits, server.ticket)
    assert len(client.result(fits.request_id, 60)["embedding"]) == 384
    with pytest.raises(ContextLengthExceeded, match="257 tokens; the model's context is 256"):
        client.submit(server.request(kind="embed", prompt=over), server.ticket)


def test_encoder_step_sub_batches_keep_each_request_its_vector() -> None:
    """One encoder step with more prompts than a sub-batch, in no length order: the runner
    sorts them into length-similar sub-batches, and each output must still be its own
    prompt's pooled vector (as encoding it alone gives)."""
    from transformers import AutoTokenizer

    from fabric.catalog import Catalog
    from fabric.engine.encoder import SUB_BATCH, EncoderExecutor
    from fabric.engine.steps import SeqWork, StepPlan
    from fabric.weights import prepare

    folder = prepare(Catalog().get("minilm-l6")).path
    runner = EncoderExecutor(folder, torch.float32)
    tok = AutoTokenizer.from_pretrained(folder)
    words = ["a", "protein", "folds", "into", "the", "shape", "that", "decides", "what", "it",
             "does", "in", "the", "cell"]
    texts = [" ".join(words[: 1 + (5 * i) % len(words)]) for i in range(SUB_BATCH + 9)]
    seqs = [SeqWork(f"s{i}", 0, tok(t).input_ids, 0) for i, t in enumerate(texts)]
    runner.launch(StepPlan(1, seqs))
    outputs = runner.collect()
    assert [o.seq_id for o in outputs] == [s.seq_id for s in seqs]
    layer = runner.config.num_hidden_layers
    for seq, out in zip(seqs, outputs, strict=True):
        runner.launch(StepPlan(2, [seq]))
        alone = runner.collect()[0].captures[layer]
        total, count = out.captures[layer]
        assert count == seq.n
        np.testing.assert_allclose((total / count).numpy(), (alone[0] / alone[1]).numpy(),
                                   atol=1e-5, rtol=0)


def test_encoder_pools_each_request_as_it_asked_over_its_own_tokens() -> None:
    """In one padded sub-batch, ``first``, ``last`` and ``mean`` pool each prompt's real tokens
    (``last`` is its own last token, [SEP] here, not the batch's padding)."""
    from transformers import AutoModel, AutoTokenizer

    from fabric.catalog import Catalog
    from fabric.engine.encoder import EncoderExecutor
    from fabric.engine.sequence import CaptureSpec
    from fabric.engine.steps import SeqWork, StepPlan
    from fabric.weights import prepare

    folder = prepare(Catalog().get("minilm-l6")).path
    runner = EncoderExecutor(folder, torch.float32)
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModel.from_pretrained(folder, dtype=torch.float32).eval()
    layer = runner.config.num_hidden_layers
    texts = ["a cell", "the membrane keeps ions out while pumps move them back"]
    for mode in ("first", "last", "mean"):
        seqs = [SeqWork(f"{mode}{i}", 0, tok(t).input_ids, 0, capture=CaptureSpec([layer], mode))
                for i, t in enumerate(texts)]
        runner.launch(StepPlan(1, seqs))
        for text, out in zip(texts, runner.collect(), strict=True):
            with torch.no_grad():
                hidden = model(**tok(text, return_tensors="pt")).last_hidden_state[0]
            got = out.captures[layer]
            got = got[0] / got[1] if mode == "mean" else got
            want = {"first": hidden[0], "last": hidden[-1], "mean": hidden.mean(0)}[mode]
            np.testing.assert_allclose(got.numpy(), want.numpy(), atol=1e-5, rtol=0)
