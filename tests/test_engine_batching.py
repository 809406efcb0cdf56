"""Continuous batching: a request's output does not depend on what shares its batch."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.plugins.servers import ServerHandle, hf_greedy

TEXT = ("The mitochondria is the powerhouse of the cell. Tensor parallel splits each layer; "
        "pipeline parallel splits the stack of layers. Scientists call models through a "
        "federated fabric of supercomputer sites. Proteins fold into shapes.")
WORDS = TEXT.split(" ")


@pytest.fixture(scope="module")
def server(model_server: Any, tiny_llama_dir: Path) -> ServerHandle:
    return model_server(tiny_llama_dir, name="tiny_llama")


def _params(i: int) -> dict[str, Any]:
    """Request i of 32: a prompt of its own length and one of several sampling set-ups."""
    prompt = " ".join(WORDS[: 1 + (i * 7) % len(WORDS)])
    kind = i % 4
    sampling: dict[str, Any] = {"max_tokens": 4 + (i * 5) % 21}
    if kind == 1:
        sampling.update(temperature=0.9, top_p=0.9, seed=1000 + i)
    elif kind == 2:
        sampling.update(temperature=1.3, top_k=20, seed=2000 + i, logprobs=True)
    elif kind == 3:
        sampling.update(temperature=0.7, top_k=50, top_p=0.8, seed=3000 + i)
    if i % 5 == 0:
        sampling["logprobs"] = True
    return {"prompt": prompt, "sampling": sampling}


def _same(a: dict[str, Any], b: dict[str, Any]) -> None:
    assert a["token_ids"] == b["token_ids"]
    assert a["text"] == b["text"]
    assert a["finish_reason"] == b["finish_reason"]
    if a["logprobs"] is None:
        assert b["logprobs"] is None
    else:
        np.testing.assert_allclose(a["logprobs"], b["logprobs"], atol=1e-5, rtol=0)


def test_32_concurrent_requests_equal_each_run_alone(server: ServerHandle,
                                                     tiny_llama_dir: Path) -> None:
    params = [_params(i) for i in range(32)]
    alone = [server.run(**p) for p in params]
    client = server.client()
    reqs = [server.request(**p) for p in params]
    streamed = {r.request_id for i, r in enumerate(reqs) if i % 3 == 0}
    for r in reqs:
        client.submit(r, server.ticket, stream=r.request_id in streamed)
    together: list[dict[str, Any]] = []
    for r in reqs:
        if r.request_id in streamed:
            events = list(client.events(r.request_id, 120))
            done = events[-1]
            assert done["op"] == "done"
            res = dict(done["result"])
            steps = [e for e in events[:-1] if e["token_ids"]]
            assert [t for e in steps for t in e["token_ids"]] == res["token_ids"]
            assert "".join(e["text"] for e in events[:-1]) == res["text"]
            together.append(res)
        else:
            together.append(client.result(r.request_id, 120))
    for p, a, b in zip(params, alone, together, strict=True):
        _same(a, b)
        assert len(b["token_ids"]) <= p["sampling"]["max_tokens"]
        if b["finish_reason"] == "length":
            assert len(b["token_ids"]) == p["sampling"]["max_tokens"]
        assert (b["logprobs"] is not None) == bool(p["sampling"].get("logprobs"))
        if b["logprobs"] is not None:
            assert len(b["logprobs"]) == len(b["token_ids"])
            assert all(lp <= 0.0 for lp in b["logprobs"])
        assert b["usage"]["completion_tokens"] == len(b["token_ids"])
        assert b["usage"]["prompt_tokens"] > 0
        t = b["timings"]
        assert {"queue_s", "prefill_s", "decode_s", "total_s"} <= set(t)
        assert all(v >= 0 for v in t.values())
        assert t["total_s"] >= t["queue_s"]
    # Greedy ones are transformers' tokens too.
    for p, b in zip(params, together, strict=True):
        if not p["sampling"].get("temperature"):
            assert b["token_ids"] == hf_greedy(tiny_llama_dir, p["prompt"],
                                               p["sampling"]["max_tokens"])
    # The sampled ones really sampled: not all equal to greedy decoding.
    sampled = [(p, b) for p, b in zip(params, together, strict=True)
               if p["sampling"].get("temperature")]
    assert any(b["token_ids"] != hf_greedy(tiny_llama_dir, p["prompt"],
                                           p["sampling"]["max_tokens"])
               for p, b in sampled)


def test_same_seed_same_output(server: ServerHandle) -> None:
    sampling = {"max_tokens": 24, "temperature": 1.5, "top_p": 0.95, "seed": 7}
    prompt = "Scientists call models"
    client = server.client()
    reqs = [server.request(prompt=prompt, sampling=sampling) for _ in range(3)]
    reqs.append(server.request(prompt=prompt, sampling={**sampling, "seed": 8}))
    for r in reqs:
        client.submit(r, server.ticket)
    out = [client.result(r.request_id, 60)["token_ids"] for r in reqs]
    assert out[0] == out[1] == out[2]
    assert out[3] != out[0]  # another seed, another draw (24 tokens at temperature 1.5)
    again = server.run(prompt=prompt, sampling=sampling)
    assert again["token_ids"] == out[0]


def test_stop_strings_end_text_before_the_stop(server: ServerHandle,
                                               tiny_llama_dir: Path) -> None:
    from tests.plugins.servers import hf_tokenizer

    tok = hf_tokenizer(tiny_llama_dir)
    prompts = ["The quick brown", "Proteins fold", "The mitochondria is the"]
    scored = {"logprobs": True, "top_logprobs": 2}
    checked = 0
    for prompt in prompts:
        free = server.run(prompt=prompt, sampling={"max_tokens": 24, **scored})
        text = free["text"]
        # A stop string taken from the free-running text, a few characters in.
        for start in range(3, len(text) - 2):
            stop = text[start:start + 2]
            if stop.strip() and text.find(stop) == start:
                break
        else:
            continue
        res = server.run(prompt=prompt, sampling={"max_tokens": 24, "stop": [stop, "@@@@"],
                                                  **scored})
        assert res["finish_reason"] == "stop"
        assert res["text"] == text[:start]
        assert stop not in res["text"]
        kept = len(res["token_ids"])
        assert res["token_ids"] == free["token_ids"][:kept]
        # The tokens (and their scores) are those of the returned text, not of the stop
        # string after it: the fewest whose decoding covers the text.
        decode = lambda ids: tok.decode(ids, skip_special_tokens=True)  # noqa: E731
        assert decode(res["token_ids"]).startswith(res["text"])
        assert kept == 0 or len(decode(res["token_ids"][:-1])) < len(res["text"])
        assert res["logprobs"] == free["logprobs"][:kept]
        assert res["top_logprobs"] == free["top_logprobs"][:kept]
        assert res["usage"]["completion_tokens"] >= kept  # the stop string's count too
        # Streaming: the events never leak any part of the stop string.
        client = server.client()
        req = server.request(prompt=prompt, sampling={"max_tokens": 24, "stop": [stop]})
        client.submit(req, server.ticket, stream=True)
        events = list(client.events(req.request_id, 60))
        assert "".join(e.get("text", "") for e in events[:-1]) == text[:start]
        checked += 1
    assert checked >= 2


def test_chunked_prefill_matches_transformers(model_server: Any, tiny_llama_dir: Path) -> None:
    """Prompts split over many 5-token steps still give transformers' tokens, scores, vectors."""
    import torch

    from tests.plugins.servers import hf_model, hf_tokenizer

    server = model_server(tiny_llama_dir, name="tiny_llama", max_batch_tokens=5)
    prompts = [" ".join(WORDS[:n]) for n in (3, 11, 19, 34)]
    client = server.client()
    gen = [server.request(prompt=p, sampling={"max_tokens": 10}) for p in prompts]
    score = [server.request(kind="logprobs", prompt=p) for p in prompts[1:]]
    embed = [server.request(kind="embed", prompt=p, pooling=pooling, layers=[-1, 2])
             for p in prompts[1:] for pooling in ("mean", "last", "first")]
    for r in gen + score + embed:
        client.submit(r, server.ticket)
    tok, model = hf_tokenizer(tiny_llama_dir), hf_model(tiny_llama_dir)
    for p, r in zip(prompts, gen, strict=True):
        assert client.result(r.request_id, 60)["token_ids"] == hf_greedy(tiny_llama_dir, p, 10)
    for r in score + embed:
        res = client.result(r.request_id, 60)
        ids = tok(r.prompt).input_ids
        with torch.no_grad():
            out = model(torch.tensor([ids]), output_hidden_states=True)
        if r.kind == "logprobs":
            logp = torch.log_softmax(out.logits[0].float(), -1)
            want = [float(logp[j - 1, ids[j]]) for j in range(1, len(ids))]
            np.testing.assert_allclose(res["logprobs"], want, atol=1e-4, rtol=0)
            continue
        for layer in (-1, 2):
            rows = out.hidden_states[layer][0]
            vec = {"mean": rows.mean(0), "last": rows[-1], "first": rows[0]}[r.pooling]
            np.testing.assert_allclose(res["layers"][str(layer)],
                                       torch.nn.functional.normalize(vec, dim=-1).numpy(),
                                       atol=1e-5, rtol=1e-5)
