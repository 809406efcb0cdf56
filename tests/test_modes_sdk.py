"""The science modes through the SDK on a real local site: embeddings, hidden states, logprobs,
and per-request hooks, each checked against the same weights run in-process with transformers.

The site (``local_site``) is the production path: a site process whose GlobusComputeEngine
request workers run the endpoint functions, and a model server launched as a job serving the
tiny random Llama in fp32. Engine-level equivalence (pp/tp plans, every bad hook) lives in
``tests/test_engine_*.py``; this module checks what a scientist sees through ``Fabric``.

Where the SDK has no argument for a request field yet (several ``layers`` in one embed request,
``hooks`` on generate), the test builds the ``InferenceRequest`` itself and runs the endpoint
function ``run_request`` through the same transport the SDK uses.
"""

from __future__ import annotations

import concurrent.futures as cf
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from fabric import Fabric
from fabric.client.decoding import decode_tensors
from fabric.endpoint.functions import run_request
from fabric.errors import ContextLengthExceeded, InvalidHook, InvalidRequest
from fabric.protocol import InferenceRequest
from tests.plugins.globus_offline import OfflineGlobus
from tests.plugins.site import TINY_MODEL

pytestmark = pytest.mark.slow  # a site process, a model server job, Parsl workers

TEXTS = [
    "The mitochondria is the powerhouse of the cell.",
    "Proteins fold into shapes that decide what they do.",
    "Tensor parallel splits each layer",
    "The quick brown fox",
]
TOL = 1e-5


# -- reference: the same weights in-process ----------------------------------------------------

class Reference:
    """transformers' LlamaForCausalLM on the tiny checkpoint, fp32."""

    def __init__(self, folder: Path) -> None:
        from transformers import AutoTokenizer, LlamaForCausalLM

        self.tok = AutoTokenizer.from_pretrained(folder)
        self.model = LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        self.n_layers = int(self.model.config.num_hidden_layers)
        self.hidden = int(self.model.config.hidden_size)

    def ids(self, text: str) -> list[int]:
        return [int(t) for t in self.tok(text).input_ids]

    @torch.no_grad()
    def hidden_states(self, ids: list[int]) -> tuple[torch.Tensor, ...]:
        out = self.model(torch.tensor([ids]), output_hidden_states=True)
        return tuple(h[0] for h in out.hidden_states)

    def embed(self, text: str, layer: int, pooling: str, normalize: bool) -> np.ndarray:
        rows = self.hidden_states(self.ids(text))[layer]
        vec = {"mean": rows.mean(0), "last": rows[-1], "first": rows[0]}[pooling]
        if normalize:
            vec = torch.nn.functional.normalize(vec, dim=-1)
        return vec.numpy()

    @torch.no_grad()
    def logprobs(self, prompt: str, continuation: str) -> tuple[list[int], np.ndarray]:
        first = self.ids(prompt)
        cont = [int(t) for t in self.tok(continuation, add_special_tokens=False).input_ids]
        full = first + cont
        logits = self.model(torch.tensor([full])).logits[0].float()
        lp = torch.log_softmax(logits, -1)
        rows = range(len(first) - 1, len(full) - 1)
        return cont, np.array([float(lp[j, full[j + 1]]) for j in rows])

    @torch.no_grad()
    def greedy(self, text: str, n: int) -> list[int]:
        ids = torch.tensor([self.ids(text)])
        out = self.model.generate(ids, max_new_tokens=n, do_sample=False,
                                  eos_token_id=self.tok.eos_token_id,
                                  pad_token_id=self.tok.pad_token_id)
        return [int(t) for t in out[0, ids.shape[1]:]]


@pytest.fixture(scope="module")
def ref(tiny_llama_dir: Path) -> Reference:
    return Reference(tiny_llama_dir)


@pytest.fixture
def fab(site_transport: Any) -> Iterator[Fabric]:
    with Fabric(transport=site_transport, on_status=None) as client:
        yield client


def raw(fab: Fabric, **fields: Any) -> dict[str, Any]:
    """Run one ``InferenceRequest`` through the SDK's transport (fields the SDK lacks)."""
    req = InferenceRequest(model=TINY_MODEL, **fields)
    return dict(fab.transport.submit(run_request, req.model_dump(mode="json"), None)
                .result(timeout=300))


# -- embeddings --------------------------------------------------------------------------------

@pytest.mark.parametrize(("layer", "pooling", "normalize"), [
    (-1, "mean", True), (2, "mean", False), (0, "last", True), (-2, "first", False),
    (4, "last", False),
])
def test_embed_equals_transformers(fab: Fabric, ref: Reference, layer: int, pooling: str,
                                   normalize: bool) -> None:
    got = fab.embed(TEXTS, model=TINY_MODEL, layer=layer, pooling=pooling, normalize=normalize)
    assert isinstance(got, np.ndarray) and got.dtype == np.float32
    assert got.shape == (len(TEXTS), ref.hidden)
    want = np.stack([ref.embed(t, layer, pooling, normalize) for t in TEXTS])
    np.testing.assert_allclose(got, want, atol=TOL, rtol=0)
    one = fab.embed(TEXTS[0], model=TINY_MODEL, layer=layer, pooling=pooling,
                    normalize=normalize)
    assert one.shape == (ref.hidden,)
    np.testing.assert_allclose(one, want[0], atol=TOL, rtol=0)


def test_embed_many_texts_in_batches_keeps_their_order(fab: Fabric, ref: Reference) -> None:
    """More texts than one task's batch, lengths shuffled: the SDK sorts them by length into
    batched requests, several layers at once, and must hand every row back to its own text."""
    from fabric.client.embedding import EMBED_CHUNK

    words = TEXTS[1].split()
    texts = [" ".join(words[: 1 + (7 * i) % len(words)]) + f" ({i})"
             for i in range(EMBED_CHUNK + 22)]
    got = fab.embed(texts, model=TINY_MODEL, layer=[-1, 2], pooling="mean")
    assert set(got) == {-1, 2}
    for layer in (-1, 2):
        assert got[layer].shape == (len(texts), ref.hidden)
        want = np.stack([ref.embed(t, layer, "mean", True) for t in texts])
        np.testing.assert_allclose(got[layer], want, atol=TOL, rtol=0)


def test_embed_bad_text_in_a_batch_is_named_as_given(fab: Fabric) -> None:
    """A text over the context fails the call naming the caller's index (not its place in
    the length-sorted batch: being longest, it went first), and what is accepted."""
    texts = ["a short one", "another short text", "word " * 900, "fine"]
    with pytest.raises(ContextLengthExceeded,
                       match=r"^texts\[2\]: prompt has \d+ tokens; the model's context is 512"):
        fab.embed(texts, model=TINY_MODEL)
    with pytest.raises(ContextLengthExceeded, match=r"^text: prompt has \d+ tokens"):
        fab.embed("word " * 900, model=TINY_MODEL)
    with pytest.raises(InvalidRequest, match=r"texts\[1\] is empty"):
        fab.embed(["fine", " "], model=TINY_MODEL)


def test_embed_several_layers_in_one_request(fab: Fabric, ref: Reference) -> None:
    """``layers=[...]`` pools each asked layer from one forward pass, keyed as asked."""
    layers = [0, 2, -1]
    result = raw(fab, kind="embed", prompt=TEXTS[1], layers=layers, pooling="mean")
    assert set(result["layers"]) == {"0", "2", "-1"}
    for layer in layers:
        np.testing.assert_allclose(np.asarray(result["layers"][str(layer)]),
                                   ref.embed(TEXTS[1], layer, "mean", True), atol=TOL, rtol=0)
    np.testing.assert_allclose(result["embedding"], result["layers"]["0"], atol=0)


# -- hidden states and logprobs ------------------------------------------------------------------

def test_hidden_states_equal_transformers(fab: Fabric, ref: Reference) -> None:
    text = TEXTS[0]
    want = ref.hidden_states(ref.ids(text))
    out = fab.hidden_states(text, model=TINY_MODEL, layers=[0, 1, 3, -1])
    assert out["token_ids"] == ref.ids(text)
    assert out["positions"] == list(range(len(ref.ids(text))))
    assert set(out["layers"]) == {"0", "1", "3", "-1"}
    for key, index in (("0", 0), ("1", 1), ("3", 3), ("-1", ref.n_layers)):
        got = out["layers"][key]
        assert isinstance(got, torch.Tensor) and got.dtype == torch.float32
        assert got.shape == want[index].shape
        torch.testing.assert_close(got, want[index], atol=TOL, rtol=0)
    # Chosen positions, negative ones counting from the end.
    some = fab.hidden_states(text, model=TINY_MODEL, layers=[2], positions=[0, -1])
    assert some["positions"] == [0, -1]
    torch.testing.assert_close(some["layers"]["2"], want[2][[0, -1]], atol=TOL, rtol=0)


def test_two_numbers_for_one_layer_each_come_back(fab: Fabric, ref: Reference) -> None:
    """-1 and L name the last layer, 0 and -(L+1) the embeddings: each number asked comes
    back under itself (one was dropped, and ``embed`` raised KeyError on the other)."""
    n = ref.n_layers
    want = ref.hidden_states(ref.ids(TEXTS[0]))
    out = fab.hidden_states(TEXTS[0], model=TINY_MODEL, layers=[-1, n, 0, -(n + 1)])
    assert set(out["layers"]) == {"-1", str(n), "0", str(-(n + 1))}
    for key, index in (("-1", n), (str(n), n), ("0", 0), (str(-(n + 1)), 0)):
        torch.testing.assert_close(out["layers"][key], want[index], atol=TOL, rtol=0)
    vectors = fab.embed(TEXTS[:2], model=TINY_MODEL, layer=[n, -1], pooling="mean")
    assert set(vectors) == {n, -1}
    for layer in (n, -1):
        np.testing.assert_allclose(np.asarray(vectors[layer][1]),
                                   ref.embed(TEXTS[1], -1, "mean", True), atol=TOL, rtol=0)


def test_logprobs_equal_transformers(fab: Fabric, ref: Reference) -> None:
    prompt, continuation = "The mitochondria is", " the powerhouse of the cell."
    out = fab.logprobs(prompt, continuation, model=TINY_MODEL)
    ids, want = ref.logprobs(prompt, continuation)
    assert out["token_ids"] == ids
    assert out["tokens"] == [ref.tok.decode([t]) for t in ids]
    np.testing.assert_allclose(np.asarray(out["logprobs"]), want, atol=TOL, rtol=0)
    assert out["total"] == pytest.approx(float(want.sum()), abs=1e-4)
    assert np.all(np.asarray(out["logprobs"]) <= 0)


def _top(logp: torch.Tensor, k: int) -> list[tuple[int, float]]:
    values, ids = torch.topk(logp, k)
    return list(zip(ids.tolist(), values.tolist(), strict=True))


def _same_tops(got: list[list[tuple[int, float]]] | None,
               want: list[list[tuple[int, float]]]) -> None:
    assert got is not None and len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        assert [t for t, _ in g] == [t for t, _ in w]
        np.testing.assert_allclose([v for _, v in g], [v for _, v in w], atol=TOL, rtol=0)


def test_top_logprobs_are_transformers_most_likely_tokens(fab: Fabric, ref: Reference) -> None:
    """``top_logprobs=k``: at each generated position, and at each scored one, the model's k
    most likely tokens with their log-probabilities, as transformers computes them (greedy:
    the chosen token is the first); a stream carries the same as its result."""
    k, n = 3, 5
    result = fab.generate(TEXTS[0], model=TINY_MODEL, max_tokens=n, temperature=0,
                          top_logprobs=k)
    ids = ref.ids(TEXTS[0]) + result.token_ids
    with torch.no_grad():
        logp = torch.log_softmax(ref.model(torch.tensor([ids])).logits[0].float(), -1)
    start = len(ref.ids(TEXTS[0])) - 1
    want = [_top(logp[start + i], k) for i in range(len(result.token_ids))]
    _same_tops(result.top_logprobs, want)
    assert result.logprobs is not None  # top_logprobs asks for logprobs too
    assert [top[0][0] for top in want] == result.token_ids
    with fab.stream(TEXTS[0], model=TINY_MODEL, max_tokens=n, top_logprobs=k) as stream:
        "".join(stream)
    assert stream.result is not None
    _same_tops(stream.tops, want)
    _same_tops(stream.result.top_logprobs, want)
    scored = fab.logprobs(TEXTS[0], model=TINY_MODEL, top_logprobs=2)
    text_ids = ref.ids(TEXTS[0])
    _same_tops([[(int(t), float(v)) for t, v in top] for top in scored["top_logprobs"]],
               [_top(logp[j], 2) for j in range(len(text_ids) - 1)])
    assert scored["context_ids"] == text_ids[:1]
    with pytest.raises(InvalidRequest, match="top_logprobs"):
        fab.generate(TEXTS[0], model=TINY_MODEL, top_logprobs=21)


def test_bad_layer_is_typed(fab: Fabric, ref: Reference) -> None:
    with pytest.raises(InvalidRequest, match="out of range"):
        fab.hidden_states(TEXTS[0], model=TINY_MODEL, layers=[ref.n_layers + 5])
    with pytest.raises(InvalidHook, match="hidden size"):
        raw(fab, prompt=TEXTS[0], sampling={"max_tokens": 2},
            hooks=[{"kind": "steer", "layer": 1, "vector": [1.0, 2.0]}])
    assert fab.embed("still serving", model=TINY_MODEL).shape == (ref.hidden,)


# -- hooks: isolation inside a batch -------------------------------------------------------------

def _steer(ref: Reference, scale: float = 8.0) -> list[dict[str, Any]]:
    vector = torch.Generator().manual_seed(7)
    v = torch.randn(ref.hidden, generator=vector)
    return [{"kind": "steer", "layer": 1, "vector": [float(x) for x in v], "scale": scale}]


def test_steered_and_unsteered_in_one_batch(fab: Fabric, ref: Reference) -> None:
    prompt, n = "The mitochondria is", 24
    plain = fab.generate(prompt, model=TINY_MODEL, max_tokens=n)
    assert plain.token_ids == ref.greedy(prompt, n)[: len(plain.token_ids)]
    hooks = _steer(ref)
    fields = {"prompt": prompt, "sampling": {"max_tokens": n}}
    # In flight together through two request workers: the server batches them.
    with cf.ThreadPoolExecutor(4) as pool:
        jobs = [pool.submit(raw, fab, **fields, hooks=hooks if i % 2 else []) for i in range(4)]
        results = [j.result() for j in jobs]
    for i, result in enumerate(results):
        if i % 2:
            assert result["token_ids"] != plain.token_ids, "the steering vector did nothing"
        else:
            assert result["token_ids"] == plain.token_ids
    assert results[1]["token_ids"] == results[3]["token_ids"]


def batch_with_and_without_hooks(handle: Any, prompt: str, n: int,
                                 hooks: list[dict[str, Any]]) -> list[list[int]]:
    """A user function: sends both requests at once on one connection (one batch)."""
    out = handle.request_many([
        {"kind": "generate", "prompt": prompt, "sampling": {"max_tokens": n}},
        {"kind": "generate", "prompt": prompt, "sampling": {"max_tokens": n}, "hooks": hooks},
        {"kind": "generate", "prompt": prompt, "sampling": {"max_tokens": n}},
    ])
    return [list(r["token_ids"]) for r in out]


def test_hook_isolation_same_connection(fab: Fabric, ref: Reference) -> None:
    prompt, n = "Proteins fold into", 24
    plain = fab.generate(prompt, model=TINY_MODEL, max_tokens=n).token_ids
    before, steered, after = fab.submit(batch_with_and_without_hooks, prompt, n, _steer(ref),
                                        model=TINY_MODEL).result(timeout=300)
    assert before == after == plain
    assert steered != plain


def test_capture_hook_on_generate(fab: Fabric, ref: Reference) -> None:
    """A capture hook at decoder layer l returns hidden_states[l + 1] for every token run."""
    prompt = TEXTS[1]
    result = raw(fab, prompt=prompt, sampling={"max_tokens": 4},
                 hooks=[{"kind": "capture", "layer": 1}])
    captures = decode_tensors(result["captures"])
    assert set(captures) == {"2"}  # keyed by hidden-state index: decoder layer 1 -> 2
    rows = captures["2"]
    n_prompt = len(ref.ids(prompt))
    # Prompt rows plus one per decode step that ran the model (the last token is not fed).
    assert rows.shape[1] == ref.hidden and rows.shape[0] >= n_prompt
    want = ref.hidden_states(ref.ids(prompt))[2]
    torch.testing.assert_close(rows[:n_prompt], want, atol=TOL, rtol=0)


# -- the same calls over Globus Compute (the real Executor and endpoint daemon, offline) ---------

@pytest.fixture(scope="module")
def globus_fab(globus_offline: OfflineGlobus, tmp_path_factory: pytest.TempPathFactory
               ) -> Iterator[Fabric]:
    """``Fabric`` over the real pair (``tests/plugins/globus_offline.py``): its site serves the
    same tiny checkpoint from a model server of its own; undeployed at the end."""
    from fabric.wire import functions

    t = globus_offline.transport(tmp_path_factory.mktemp("home"))
    with Fabric(site=str(globus_offline.site_dir), transport=t, on_status=None) as client:
        try:
            yield client
        finally:
            for dep in t.submit(functions.list_deployments, None, None).result(timeout=120):
                t.submit(functions.undeploy, dep["id"], None).result(timeout=120)


@pytest.mark.globus
def test_globus_transport_matches_local(fab: Fabric, globus_fab: Fabric) -> None:
    """Embed, hidden states, logprobs and chat through Globus Compute give what the local
    site gives (same weights, fp32, one thread per rank: the same numbers)."""
    assert globus_fab.transport.can_reach_servers is False
    local = fab.embed(TEXTS[:2], model=TINY_MODEL, layer=2, pooling="mean")
    remote = globus_fab.embed(TEXTS[:2], model=TINY_MODEL, layer=2, pooling="mean")
    np.testing.assert_array_equal(remote, local)
    a = fab.hidden_states(TEXTS[2], model=TINY_MODEL, layers=[1, -1])
    b = globus_fab.hidden_states(TEXTS[2], model=TINY_MODEL, layers=[1, -1])
    assert set(b["layers"]) == set(a["layers"]) and len(a["layers"]) == 2
    for key, value in a["layers"].items():
        torch.testing.assert_close(b["layers"][key], value, atol=0, rtol=0)
    prompt, continuation = "The quick brown", " fox jumps"
    a = fab.logprobs(prompt, continuation, model=TINY_MODEL)
    b = globus_fab.logprobs(prompt, continuation, model=TINY_MODEL)
    assert b["token_ids"] == a["token_ids"] and b["logprobs"] == a["logprobs"]
    messages = [{"role": "user", "content": "Name an organelle."}]
    here = fab.chat(messages, model=TINY_MODEL, max_tokens=6)
    there = globus_fab.chat(messages, model=TINY_MODEL, max_tokens=6)
    assert there.token_ids == here.token_ids and len(here.token_ids) >= 1


def test_hooks_on_hidden_states_and_logprobs(fab: Fabric, ref: Reference) -> None:
    """A steer hook at decoder layer l shifts hidden state l + 1 by exactly scale * vector at
    every position and leaves hidden state l alone (and embed pools the steered states); an
    ablation changes a score."""
    text = TEXTS[0]
    hooks = _steer(ref, scale=2.0)
    vector = torch.tensor(hooks[0]["vector"])
    plain = decode_tensors(raw(fab, kind="hidden_states", prompt=text, layers=[1, 2]))
    steered = decode_tensors(raw(fab, kind="hidden_states", prompt=text, layers=[1, 2],
                                 hooks=hooks))
    torch.testing.assert_close(steered["layers"]["1"], plain["layers"]["1"], atol=0, rtol=0)
    shift = steered["layers"]["2"] - plain["layers"]["2"]
    torch.testing.assert_close(shift, (2.0 * vector).expand_as(shift), atol=1e-5, rtol=0)
    # embed pools the hooked forward pass too.
    vec = raw(fab, kind="embed", prompt=text, layers=[2], pooling="last", normalize=False,
              hooks=hooks)["embedding"]
    torch.testing.assert_close(torch.tensor(vec), steered["layers"]["2"][-1], atol=1e-5, rtol=0)
    prompt, continuation = "The quick brown", " fox jumps"
    base = raw(fab, kind="logprobs", prompt=prompt, continuation=continuation)
    ablated = raw(fab, kind="logprobs", prompt=prompt, continuation=continuation,
                  hooks=[{"kind": "ablate_heads", "layer": 0, "heads": [0, 1]},
                         {"kind": "ablate_neurons", "layer": 2, "neurons": list(range(32))}])
    assert ablated["token_ids"] == base["token_ids"]
    assert ablated["logprobs"] != base["logprobs"]
    again = fab.logprobs(prompt, continuation, model=TINY_MODEL)
    assert again["logprobs"] == base["logprobs"]  # nothing lingers after a hooked request
