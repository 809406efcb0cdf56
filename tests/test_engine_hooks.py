"""Declarative per-request hooks: isolation inside a batch, transformers equivalence, validation.

References apply the same intervention to an in-process transformers model with PyTorch
forward hooks: steering adds to a decoder layer's output, head ablation zeroes the head's
slice of ``o_proj``'s input, neuron ablation zeroes columns of ``down_proj``'s input.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from fabric.errors import InvalidHook
from fabric.wire.arrays import decode_array
from tests.plugins.servers import ServerHandle, hf_model, hf_tokenizer

PROMPT = "The mitochondria is the powerhouse of the cell."


@contextlib.contextmanager
def hf_hooks(model: Any, hooks: list[dict[str, Any]]) -> Iterator[None]:
    """Apply fabric hook specs to a transformers Llama with PyTorch hooks."""
    cfg = model.config
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    handles = []
    for h in hooks:
        layer = model.model.layers[h["layer"]]
        if h["kind"] == "steer":
            vec = torch.tensor(h["vector"]) * h.get("scale", 1.0)

            def steer(_m: Any, _i: Any, out: Any, vec: torch.Tensor = vec) -> Any:
                if isinstance(out, tuple):
                    return (out[0] + vec, *out[1:])
                return out + vec

            handles.append(layer.register_forward_hook(steer))
        elif h["kind"] == "ablate_heads":
            cols = [c for head in h["heads"] for c in range(head * head_dim, (head + 1) * head_dim)]

            def zero_heads(_m: Any, args: Any, cols: list[int] = cols) -> Any:
                x = args[0].clone()
                x[..., cols] = 0
                return (x, *args[1:])

            handles.append(layer.self_attn.o_proj.register_forward_pre_hook(zero_heads))
        elif h["kind"] == "ablate_neurons":
            neurons = list(h["neurons"])

            def zero_neurons(_m: Any, args: Any, neurons: list[int] = neurons) -> Any:
                x = args[0].clone()
                x[..., neurons] = 0
                return (x, *args[1:])

            handles.append(layer.mlp.down_proj.register_forward_pre_hook(zero_neurons))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def hf_states(weights: Path, text: str, hooks: list[dict[str, Any]]) -> list[torch.Tensor]:
    """transformers' hidden states (0 = embeddings, n = final norm) under ``hooks``.

    Recorded with our own forward hooks registered after the interventions, so a steered
    layer's recorded output includes the steering (``output_hidden_states`` records through
    hooks of its own whose order relative to ours is not guaranteed).
    """
    model, tok = hf_model(weights), hf_tokenizer(weights)
    inner = model.model
    n = len(inner.layers)
    states: list[Any] = [None] * (n + 1)

    def keep(k: int) -> Any:
        def hook(_m: Any, _i: Any, out: Any) -> None:
            states[k] = (out[0] if isinstance(out, tuple) else out)[0].detach().clone()
        return hook

    with torch.no_grad(), hf_hooks(model, hooks):
        recorders = [inner.embed_tokens.register_forward_hook(keep(0)),
                     inner.norm.register_forward_hook(keep(n))]
        recorders += [inner.layers[i].register_forward_hook(keep(i + 1)) for i in range(n - 1)]
        try:
            model(torch.tensor([tok(text).input_ids]))
        finally:
            for r in recorders:
                r.remove()
    return states


def hf_generate(weights: Path, text: str, hooks: list[dict[str, Any]], n: int) -> list[int]:
    model, tok = hf_model(weights), hf_tokenizer(weights)
    ids = torch.tensor([tok(text).input_ids])
    with torch.no_grad(), hf_hooks(model, hooks):
        out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                             max_new_tokens=n, pad_token_id=tok.pad_token_id)
    return [int(t) for t in out[0, ids.shape[1]:]]


def _steer_vector(hidden: int, seed: int = 0) -> list[float]:
    g = torch.Generator().manual_seed(seed)
    return [float(v) for v in torch.randn(hidden, generator=g)]


@pytest.fixture(scope="module")
def server(model_server: Any, tiny_llama_dir: Path) -> ServerHandle:
    return model_server(tiny_llama_dir, name="tiny_llama")


def test_steering_applies_only_to_its_request(server: ServerHandle,
                                              tiny_llama_dir: Path) -> None:
    hidden = hf_model(tiny_llama_dir).config.hidden_size
    steer = [{"kind": "steer", "layer": 1, "vector": _steer_vector(hidden), "scale": 4.0}]
    alone = server.run(prompt=PROMPT, sampling={"max_tokens": 16})
    client = server.client()
    plain = server.request(prompt=PROMPT, sampling={"max_tokens": 16})
    steered = server.request(prompt=PROMPT, sampling={"max_tokens": 16}, hooks=steer)
    others = [server.request(prompt=PROMPT, sampling={"max_tokens": 16}, hooks=[
        {"kind": "ablate_neurons", "layer": 0, "neurons": list(range(64))}]),
        server.request(prompt=PROMPT, sampling={"max_tokens": 16}, hooks=[
            {"kind": "ablate_heads", "layer": 0, "heads": [0, 1, 2]}])]
    for r in (steered, plain, *others):
        client.submit(r, server.ticket)
    got_steered = client.result(steered.request_id, 60)
    got_plain = client.result(plain.request_id, 60)
    for r in others:
        client.result(r.request_id, 60)
    assert got_plain["token_ids"] == alone["token_ids"]
    assert got_steered["token_ids"] != alone["token_ids"]
    assert got_steered["token_ids"] == hf_generate(tiny_llama_dir, PROMPT, steer, 16)


def test_capture_hook_returns_the_layer_output(server: ServerHandle,
                                               tiny_llama_dir: Path) -> None:
    layer = 2
    res = server.run(prompt=PROMPT, sampling={"max_tokens": 6},
                     hooks=[{"kind": "capture", "layer": layer}])
    text_ids = hf_tokenizer(tiny_llama_dir)(PROMPT).input_ids + res["token_ids"][:-1]
    model = hf_model(tiny_llama_dir)
    with torch.no_grad():
        hs = model(torch.tensor([text_ids]), output_hidden_states=True).hidden_states
    captured = decode_array(res["captures"][str(layer + 1)])  # keyed as hidden_states index
    np.testing.assert_allclose(captured, hs[layer + 1][0].numpy(), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("hooks", [
    [{"kind": "ablate_neurons", "layer": 1, "neurons": [0, 5, 17, 40, 99, 127]}],
    [{"kind": "ablate_heads", "layer": 0, "heads": [1]}],
    [{"kind": "ablate_heads", "layer": 3, "heads": [0, 3]},
     {"kind": "ablate_neurons", "layer": 2, "neurons": list(range(0, 128, 3))}],
], ids=["neurons", "head", "heads+neurons"])
def test_ablation_matches_transformers_with_forward_hooks(
        server: ServerHandle, tiny_llama_dir: Path, hooks: list[dict[str, Any]]) -> None:
    n = hf_model(tiny_llama_dir).config.num_hidden_layers
    plain = server.run(kind="hidden_states", prompt=PROMPT, layers=[-1])
    ablated = server.run(kind="hidden_states", prompt=PROMPT, layers=list(range(n + 1)),
                         hooks=hooks)
    want = hf_states(tiny_llama_dir, PROMPT, hooks)
    for k in range(n + 1):
        np.testing.assert_allclose(decode_array(ablated["layers"][str(k)]), want[k].numpy(),
                                   atol=1e-5, rtol=1e-5)
    changed = decode_array(ablated["layers"][str(n)])
    assert not np.allclose(changed, decode_array(plain["layers"]["-1"]), atol=1e-4)
    gen = server.run(prompt=PROMPT, sampling={"max_tokens": 10}, hooks=hooks)
    assert gen["token_ids"] == hf_generate(tiny_llama_dir, PROMPT, hooks, 10)


@pytest.mark.slow  # two-rank servers
@pytest.mark.parametrize("pp,tp", [(1, 2), (2, 1)])
def test_hooks_across_stages_and_tp_ranks(model_server: Any, tiny_llama_odd_dir: Path,
                                          pp: int, tp: int) -> None:
    """9 heads over tp=2 split 6+3: ablating head 7 acts on tp rank 1; layer 4 is on stage 2."""
    server = model_server(tiny_llama_odd_dir, pp=pp, tp=tp, name="tiny_llama_odd")
    cfg = hf_model(tiny_llama_odd_dir).config
    hooks = [{"kind": "ablate_heads", "layer": 1, "heads": [2, 7]},
             {"kind": "ablate_neurons", "layer": 4, "neurons": [3, 80, 143]},
             {"kind": "steer", "layer": 3, "vector": _steer_vector(cfg.hidden_size, 1),
              "scale": 0.5}]
    res = server.run(kind="hidden_states", prompt=PROMPT, layers=[2, 4, -1], hooks=hooks)
    want = hf_states(tiny_llama_odd_dir, PROMPT, hooks)
    for layer in (2, 4, -1):
        np.testing.assert_allclose(decode_array(res["layers"][str(layer)]),
                                   want[layer].numpy(), atol=1e-5, rtol=1e-5)


BAD = {
    "layer out of range": ([{"kind": "steer", "layer": 4, "vector": [0.0] * 64}], "layer=4"),
    "negative layer out of range": ([{"kind": "capture", "layer": -5}], "layer=-5"),
    "wrong vector length": ([{"kind": "steer", "layer": 0, "vector": [1.0] * 63}], "63"),
    "no vector": ([{"kind": "steer", "layer": 0}], "length None"),
    "non-finite vector": ([{"kind": "steer", "layer": 0, "vector": [float("nan")] * 64}],
                          "finite"),
    "non-finite scale": ([{"kind": "steer", "layer": 0, "vector": [0.0] * 64,
                           "scale": float("inf")}], "finite"),
    "bad head": ([{"kind": "ablate_heads", "layer": 0, "heads": [4]}], "[4]"),
    "negative head": ([{"kind": "ablate_heads", "layer": 0, "heads": [-1]}], "[-1]"),
    "bad neuron": ([{"kind": "ablate_neurons", "layer": 0, "neurons": [3, 128]}], "[128]"),
    "empty heads": ([{"kind": "ablate_heads", "layer": 0, "heads": []}], "empty"),
    "empty neurons": ([{"kind": "ablate_neurons", "layer": 0}], "empty"),
    "too many hooks": ([{"kind": "capture", "layer": 0}] * 17, "at most"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_hook_specs_are_rejected(server: ServerHandle, case: str) -> None:
    hooks, needle = BAD[case]
    client = server.client()
    with pytest.raises(InvalidHook) as info:
        client.submit(server.request(prompt=PROMPT, hooks=hooks), server.ticket)
    assert needle in info.value.message, info.value.message
    # The server keeps serving.
    res = server.run(client=client, prompt=PROMPT, sampling={"max_tokens": 2})
    assert res["usage"]["completion_tokens"] >= 1
    assert server.health()["state"] == "ready"
