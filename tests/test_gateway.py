"""``fabric serve`` as users call it: the real ``openai`` client (sync and async) and ``curl``
against a real uvicorn server on 127.0.0.1, in front of the session's local site serving the
tiny random Llama. What comes back must be what the SDK gives for the same request.
"""

from __future__ import annotations

import asyncio
import base64
import json
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import openai
import pytest

from fabric import AsyncFabric, Fabric
from fabric.gateway import GatewayConfig, create_app
from fabric.serverclient import ServerClient
from tests.plugins.servers import hf_model, hf_tokenizer
from tests.plugins.site import (
    LONG_TOKENS,
    TINY_MODEL,
    assert_stopped_early,
    server_idle,
    server_pid,
    wait_until,
)
from tests.plugins.throttle import throttle_process
from tests.test_gateway_unit import running_server

pytestmark = pytest.mark.slow

PROMPT = "The mitochondria is"
MESSAGES = [{"role": "system", "content": "Be brief."},
            {"role": "user", "content": "What do proteins do?"}]


@pytest.fixture(scope="module")
def fab(local_site: Any) -> Iterator[Fabric]:
    transport = local_site.transport()
    with Fabric(site=str(local_site.site_dir), transport=transport, on_status=None) as client:
        client.generate(PROMPT, model=TINY_MODEL, max_tokens=1)  # warm the server
        yield client


@pytest.fixture(scope="module")
def base_url(fab: Fabric, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    config = GatewayConfig(site=fab.site, home=tmp_path_factory.mktemp("gateway"), rate=0)
    app = create_app(config, AsyncFabric(fabric=fab))
    with running_server(app) as url:
        yield f"{url}/v1"


@pytest.fixture
def client(base_url: str) -> Iterator[openai.OpenAI]:
    # A user's existing OpenAI code: only base_url changes (any key works on loopback).
    with openai.OpenAI(base_url=base_url, api_key="EMPTY", max_retries=0) as c:
        yield c


def test_models(client: openai.OpenAI) -> None:
    ids = {m.id for m in client.models.list()}
    assert {TINY_MODEL, "smollm2-135m"} <= ids
    assert client.models.retrieve(TINY_MODEL).id == TINY_MODEL


def test_chat_matches_the_sdk(client: openai.OpenAI, fab: Fabric) -> None:
    expected = fab.chat(MESSAGES, model=TINY_MODEL, max_tokens=8)
    reply = client.chat.completions.create(model=TINY_MODEL, messages=MESSAGES,  # type: ignore[arg-type]
                                           max_tokens=8, temperature=0, logprobs=True,
                                           top_logprobs=1)
    choice = reply.choices[0]
    assert choice.message.content == expected.text and choice.message.role == "assistant"
    assert choice.finish_reason in ("length", "stop")
    assert reply.usage is not None
    assert reply.usage.completion_tokens == len(expected.token_ids)
    assert reply.usage.prompt_tokens == expected.usage.prompt_tokens
    assert choice.logprobs is not None and choice.logprobs.content is not None
    tokens = [c.token for c in choice.logprobs.content]
    assert tokens == [f"token_id:{t}" for t in expected.token_ids]
    assert all(c.logprob <= 0 for c in choice.logprobs.content)
    assert reply.system_fingerprint and reply.system_fingerprint.startswith(f"{TINY_MODEL}:")


def test_chat_stream_and_n(client: openai.OpenAI, fab: Fabric) -> None:
    expected = fab.chat(MESSAGES, model=TINY_MODEL, max_tokens=12)
    chunks = list(client.chat.completions.create(
        model=TINY_MODEL, messages=MESSAGES, max_tokens=12, temperature=0,  # type: ignore[arg-type]
        stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == expected.text
    finals = [c.choices[0].finish_reason for c in chunks if c.choices
              and c.choices[0].finish_reason]
    assert len(finals) == 1
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == len(expected.token_ids)
    # n sampled choices, seeded: each differs by its seed, and the same seed repeats.
    many = client.chat.completions.create(model=TINY_MODEL, messages=MESSAGES,  # type: ignore[arg-type]
                                          max_tokens=10, temperature=1.0, seed=7, n=3)
    again = client.chat.completions.create(model=TINY_MODEL, messages=MESSAGES,  # type: ignore[arg-type]
                                           max_tokens=10, temperature=1.0, seed=7, n=3)
    texts = [c.message.content for c in many.choices]
    assert [c.index for c in many.choices] == [0, 1, 2]
    assert texts == [c.message.content for c in again.choices]
    assert len(set(texts)) > 1


def test_completions(client: openai.OpenAI, fab: Fabric) -> None:
    expected = fab.generate(PROMPT, model=TINY_MODEL, max_tokens=6, stop=["\n\n\n"])
    reply = client.completions.create(model=TINY_MODEL, prompt=[PROMPT, PROMPT], max_tokens=6,
                                      temperature=0, stop=["\n\n\n"], logprobs=1)
    assert [c.text for c in reply.choices] == [expected.text] * 2
    assert reply.system_fingerprint == \
        f"{TINY_MODEL}:{expected.model.version}:{expected.model.sha256[:12]}"
    lp = reply.choices[0].logprobs
    assert lp is not None and lp.tokens == [f"token_id:{t}" for t in expected.token_ids]
    assert lp.token_logprobs is not None and all(x is not None and x <= 0
                                                 for x in lp.token_logprobs)
    streamed = client.completions.create(model=TINY_MODEL, prompt=PROMPT, max_tokens=6,
                                         temperature=0, stop=["\n\n\n"], stream=True)
    assert "".join(c.choices[0].text for c in streamed if c.choices) == expected.text


def hf_scores(weights_dir: Path, ids: list[int]) -> list[float]:
    """transformers' log-probability of each of ``ids[1:]`` given the tokens before it."""
    import torch

    with torch.no_grad():
        logits = hf_model(weights_dir)(torch.tensor([ids])).logits[0]
    logp = torch.log_softmax(logits.float(), -1)
    return [float(logp[j, ids[j + 1]]) for j in range(len(ids) - 1)]


def test_echo_scores_a_continuation(client: openai.OpenAI, fab: Fabric,
                                    tiny_llama_dir: Path) -> None:
    """``echo`` lists every prompt token, the first with no log-probability (``None``), as
    OpenAI does: lm-eval's loglikelihood (``max_tokens: 1, echo, logprobs: 1``) sums
    ``token_logprobs[len(context):-1]``, so a list one short loses a continuation token."""
    text = "The cell is the powerhouse"
    ids = hf_tokenizer(tiny_llama_dir)(text).input_ids
    want = hf_scores(tiny_llama_dir, ids)
    reply = client.completions.create(model=TINY_MODEL, prompt=text, max_tokens=0, echo=True,
                                      logprobs=0)
    lp = reply.choices[0].logprobs
    assert reply.choices[0].text == text and lp is not None and lp.token_logprobs is not None
    assert reply.system_fingerprint and reply.system_fingerprint.startswith(f"{TINY_MODEL}:")
    assert lp.tokens == [f"token_id:{t}" for t in ids]
    assert lp.token_logprobs[0] is None and lp.top_logprobs is not None
    assert lp.top_logprobs[0] is None
    assert lp.token_logprobs[1:] == pytest.approx(want, abs=1e-4)
    # As lm-eval asks: the context's length in tokens, then the continuation's sum.
    context = hf_tokenizer(tiny_llama_dir)("The cell is").input_ids
    assert ids[:len(context)] == context
    asked = client.completions.create(model=TINY_MODEL, prompt=text, max_tokens=1, echo=True,
                                      logprobs=1, temperature=0)
    lp = asked.choices[0].logprobs
    assert lp is not None and lp.token_logprobs is not None
    assert len(lp.token_logprobs) == len(ids) + 1
    assert sum(lp.token_logprobs[len(context):-1]) == pytest.approx(
        sum(want[len(context) - 1:]), abs=1e-4)
    # is_greedy: each continuation token against the most likely one there (transformers').
    import torch

    with torch.no_grad():
        logp = torch.log_softmax(hf_model(tiny_llama_dir)(torch.tensor([ids])).logits[0], -1)
    assert lp.top_logprobs is not None
    for j in range(len(context), len(ids)):
        best = int(torch.argmax(logp[j - 1]))
        top = lp.top_logprobs[j]
        assert top is not None and f"token_id:{best}" in top
        assert max(top.values()) == pytest.approx(float(logp[j - 1, best]), abs=1e-4)
        assert (lp.token_logprobs[j] == max(top.values())) == (ids[j] == best)


def test_chat_top_logprobs_name_the_alternatives(client: openai.OpenAI, fab: Fabric) -> None:
    """``top_logprobs: 2`` lists the two most likely tokens at each position, as the SDK's
    result does (before, only the chosen token, whatever was asked)."""
    reply = client.chat.completions.create(model=TINY_MODEL, messages=MESSAGES,  # type: ignore[arg-type]
                                           max_tokens=4, temperature=0, logprobs=True,
                                           top_logprobs=2)
    want = fab.chat(MESSAGES, model=TINY_MODEL, max_tokens=4, temperature=0,  # type: ignore[arg-type]
                    top_logprobs=2)
    lp = reply.choices[0].logprobs
    assert lp is not None and lp.content is not None and want.top_logprobs is not None
    for got, top in zip(lp.content, want.top_logprobs, strict=True):
        assert [t.token for t in got.top_logprobs] == [f"token_id:{i}" for i, _ in top]
        assert [t.logprob for t in got.top_logprobs] == pytest.approx([v for _, v in top])
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=TINY_MODEL, messages=MESSAGES,  # type: ignore[arg-type]
                                       max_tokens=2, top_logprobs=2)
    # The extension field scores only the continuation, as fab.logprobs(text, continuation).
    pair = fab.logprobs("The cell is", " the powerhouse", model=TINY_MODEL)
    cont = client.completions.create(model=TINY_MODEL, prompt="The cell is", max_tokens=0,
                                     logprobs=0, extra_body={"continuation": " the powerhouse"})
    assert cont.choices[0].text == " the powerhouse"
    assert cont.choices[0].logprobs is not None
    assert cont.choices[0].logprobs.token_logprobs == pytest.approx(pair["logprobs"], abs=1e-5)
    extra = cont.choices[0].model_extra  # extension fields ride along
    assert extra is not None and extra["total_logprob"] == pytest.approx(pair["total"], abs=1e-4)


def test_embeddings(client: openai.OpenAI, fab: Fabric) -> None:
    expected = fab.embed(["a cat", "a dog"], model=TINY_MODEL)
    # The openai client asks for base64 by default and decodes it itself.
    reply = client.embeddings.create(model=TINY_MODEL, input=["a cat", "a dog"])
    got = np.array([d.embedding for d in reply.data], dtype=np.float32)
    assert got.shape == expected.shape and np.allclose(got, expected, atol=1e-5)
    floats = client.embeddings.create(model=TINY_MODEL, input="a cat", encoding_format="float",
                                      extra_body={"pooling": "last", "layer": 0})
    last0 = fab.embed("a cat", model=TINY_MODEL, pooling="last", layer=0)
    assert np.allclose(floats.data[0].embedding, last0, atol=1e-5)
    short = client.embeddings.create(model=TINY_MODEL, input="a cat", dimensions=8,
                                     encoding_format="float")
    first = np.asarray(fab.embed("a cat", model=TINY_MODEL), dtype=np.float32)[:8]
    assert np.allclose(short.data[0].embedding, first / np.linalg.norm(first), atol=1e-5)
    both = client.embeddings.create(model=TINY_MODEL, input="a cat", dimensions=8,
                                    encoding_format="float", extra_body={"layers": [0, -1]})
    extra = both.data[0].model_extra
    assert extra is not None and {len(v) for v in extra["layers"].values()} == {8}
    with pytest.raises(openai.BadRequestError) as unpooled:
        client.embeddings.create(model=TINY_MODEL, input="a cat", dimensions=8,
                                 extra_body={"pooling": "none"})
    assert unpooled.value.param == "dimensions"
    # What does not apply is refused, not ignored: normalize with raw states, positions
    # with a pooled vector (both were silently dropped).
    for body, param in (({"pooling": "none", "normalize": True}, "normalize"),
                        ({"pooling": "mean", "positions": [0]}, "positions"),
                        ({"positions": [99]}, "positions")):
        with pytest.raises(openai.BadRequestError) as ignored:
            client.embeddings.create(model=TINY_MODEL, input="a cat", extra_body=body)
        assert ignored.value.param == param
    # pooling "none": every token's hidden state, as fab.hidden_states gives it.
    states = fab.hidden_states("The cell", model=TINY_MODEL, layers=[-1])
    raw = client.embeddings.create(model=TINY_MODEL, input="The cell", encoding_format="float",
                                   extra_body={"pooling": "none"})
    rows = np.array(raw.data[0].embedding, dtype=np.float32)
    assert np.allclose(rows, states["layers"]["-1"].numpy(), atol=1e-4)
    assert raw.data[0].model_extra is not None
    assert raw.data[0].model_extra["token_ids"] == states["token_ids"]


def test_errors_are_openai_errors(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as missing:
        client.chat.completions.create(model="no-such-model", messages=MESSAGES)  # type: ignore[arg-type]
    assert missing.value.status_code == 404
    assert "no-such-model" in str(missing.value.message)
    with pytest.raises(openai.BadRequestError) as too_long:
        client.completions.create(model=TINY_MODEL, prompt="word " * 900, max_tokens=4)
    assert too_long.value.code == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=TINY_MODEL, prompt=PROMPT, temperature=9)
    # A chat asked for no tokens is refused, as OpenAI does (it ran to the default before).
    with pytest.raises(openai.BadRequestError) as none:
        client.chat.completions.create(model=TINY_MODEL, messages=MESSAGES, max_tokens=0)  # type: ignore[arg-type]
    assert none.value.param == "max_tokens"


def test_an_agents_tool_turn_is_served(client: openai.OpenAI, fab: Fabric) -> None:
    """An agent's second turn: the assistant's tool call (no content) and the tool's answer.
    Served as the SDK serves the same messages in plain form (it was refused: 'tool')."""
    turns = [{"role": "user", "content": "How heavy is a mitochondrion?"},
             {"role": "assistant", "content": None, "tool_calls": [
                 {"id": "c1", "type": "function",
                  "function": {"name": "lookup", "arguments": "{}"}}]},
             {"role": "tool", "tool_call_id": "c1", "content": "about 1e-12 g"}]
    reply = client.chat.completions.create(model=TINY_MODEL, messages=turns,  # type: ignore[arg-type]
                                           max_tokens=6, temperature=0)
    plain = [{"role": "user", "content": turns[0]["content"]},
             {"role": "assistant", "content": ""},
             {"role": "tool", "content": "about 1e-12 g"}]
    expected = fab.chat(plain, model=TINY_MODEL, max_tokens=6, temperature=0)
    assert reply.choices[0].message.content == expected.text
    assert reply.usage is not None
    assert reply.usage.prompt_tokens == expected.usage.prompt_tokens


def test_completion_max_tokens_null_is_the_default(client: openai.OpenAI, fab: Fabric) -> None:
    """``max_tokens: null`` is OpenAI's default of 16, not a request for nothing."""
    expected = fab.generate(PROMPT, model=TINY_MODEL, max_tokens=16, temperature=0)
    reply = client.completions.create(model=TINY_MODEL, prompt=PROMPT, temperature=0,
                                      extra_body={"max_tokens": None})
    assert reply.choices[0].text == expected.text and reply.choices[0].text
    assert reply.usage is not None
    assert reply.usage.completion_tokens == len(expected.token_ids)


def test_async_client_concurrent_streams(base_url: str, fab: Fabric) -> None:
    expected = fab.generate(PROMPT, model=TINY_MODEL, max_tokens=8).text

    async def one(client: openai.AsyncOpenAI) -> str:
        stream = await client.completions.create(model=TINY_MODEL, prompt=PROMPT, max_tokens=8,
                                                 temperature=0, stream=True)
        return "".join([c.choices[0].text async for c in stream if c.choices])

    async def main() -> list[str]:
        async with openai.AsyncOpenAI(base_url=base_url, api_key="EMPTY") as client:
            texts = await asyncio.gather(*(one(client) for _ in range(8)))
            emb = await client.embeddings.create(model=TINY_MODEL, input="a cat")
            assert len(emb.data[0].embedding) == 64
            return list(texts)

    assert asyncio.run(main()) == [expected] * 8


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_curl_sse_framing(base_url: str) -> None:
    body = json.dumps({"model": TINY_MODEL, "messages": MESSAGES, "max_tokens": 6,
                       "temperature": 0, "stream": True})
    out = subprocess.run(["curl", "-sN", f"{base_url}/chat/completions", "-H",
                          "Content-Type: application/json", "-d", body],
                         capture_output=True, text=True, timeout=120, check=True).stdout
    events = out.split("\n\n")
    assert events[-1] == "" and events[-2] == "data: [DONE]"
    for event in events[:-2]:
        assert event.startswith("data: ")
        chunk = json.loads(event[len("data: "):])
        assert chunk["object"] == "chat.completion.chunk"
    head = subprocess.run(["curl", "-sN", "-D", "-", "-o", "/dev/null",
                           f"{base_url}/chat/completions", "-H",
                           "Content-Type: application/json", "-d", body],
                          capture_output=True, text=True, timeout=120, check=True).stdout
    assert "content-type: text/event-stream" in head.lower()


def test_files_and_batches(client: openai.OpenAI, fab: Fabric, tmp_path: Path) -> None:
    lines = [{"custom_id": f"r{i}", "method": "POST", "url": "/v1/chat/completions",
              "body": {"model": TINY_MODEL, "max_tokens": 4, "temperature": 0,
                       "messages": [{"role": "user", "content": f"Count to {i}"}]}}
             for i in range(5)]
    # Read as the live route reads it: a developer message, fields the fabric does not use
    # (tolerated), logprobs asked for.
    live = {"custom_id": "live", "method": "POST", "url": "/v1/chat/completions",
            "body": {"model": TINY_MODEL, "max_tokens": 4, "temperature": 0, "logprobs": True,
                     "top_logprobs": 2, "presence_penalty": 0.5, "frobnicate": True,
                     "messages": [{"role": "developer", "content": "Be brief."},
                                  {"role": "user", "content": [{"type": "text",
                                                                "text": "Count to 3"}]}]}}
    bad = {"custom_id": "bad", "method": "POST", "url": "/v1/chat/completions",
           "body": {"model": TINY_MODEL, "messages": [{"role": "robot", "content": "x"}]}}
    path = tmp_path / "batch.jsonl"
    path.write_text("".join(json.dumps(x) + "\n" for x in [*lines, live, bad]))
    uploaded = client.files.create(file=path.open("rb"), purpose="batch")
    assert uploaded.bytes == path.stat().st_size
    assert client.files.content(uploaded.id).read() == path.read_bytes()
    batch = client.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions",
                                  completion_window="24h", metadata={"run": "test"})
    deadline = time.monotonic() + 180
    while batch.status not in ("completed", "failed", "cancelled"):
        assert time.monotonic() < deadline, batch
        time.sleep(0.5)
        batch = client.batches.retrieve(batch.id)
    assert batch.status == "completed", batch.errors
    assert batch.request_counts is not None
    assert (batch.request_counts.total, batch.request_counts.completed,
            batch.request_counts.failed) == (7, 6, 1)
    assert batch.output_file_id and batch.error_file_id
    out = [json.loads(x) for x in client.files.content(batch.output_file_id).text.splitlines()]
    assert sorted(o["custom_id"] for o in out) == ["live", *[f"r{i}" for i in range(5)]]
    (got,) = [o["response"]["body"]["choices"][0] for o in out if o["custom_id"] == "live"]
    want = fab.chat([{"role": "system", "content": "Be brief."},
                     {"role": "user", "content": "Count to 3"}], model=TINY_MODEL,
                    max_tokens=4, temperature=0, logprobs=True)
    assert got["message"]["content"] == want.text
    assert [c["logprob"] for c in got["logprobs"]["content"]] == pytest.approx(want.logprobs)
    for o in out:
        if o["custom_id"] == "live":
            continue
        i = int(o["custom_id"][1:])
        expected = fab.chat(lines[i]["body"]["messages"], model=TINY_MODEL, max_tokens=4)
        assert o["response"]["status_code"] == 200
        assert o["response"]["body"]["choices"][0]["message"]["content"] == expected.text
    errors = [json.loads(x) for x in client.files.content(batch.error_file_id).text.splitlines()]
    assert [e["custom_id"] for e in errors] == ["bad"]
    assert errors[0]["response"]["status_code"] == 400
    assert batch.id in [b.id for b in client.batches.list()]
    assert uploaded.id in [f.id for f in client.files.list()]


def test_a_cancelled_batch_says_cancelling_then_cancelled(client: openai.OpenAI, fab: Fabric,
                                                          tmp_path: Path) -> None:
    """OpenAI's states: ``cancelling`` from the cancel until the campaign has stopped, then
    ``cancelled``, with the lines done by then in the output file (each once)."""
    lines = [{"custom_id": f"c{i}", "method": "POST", "url": "/v1/completions",
              "body": {"model": TINY_MODEL, "prompt": f"Story {i}:", "max_tokens": 48}}
             for i in range(40)]
    path = tmp_path / "many.jsonl"
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    uploaded = client.files.create(file=path.open("rb"), purpose="batch")
    with throttle_process(server_pid(fab)):  # still running when the cancel comes
        batch = client.batches.create(input_file_id=uploaded.id, endpoint="/v1/completions",
                                      completion_window="24h")
        cancelled = client.batches.cancel(batch.id)
        assert cancelled.status in ("cancelling", "cancelled"), cancelled.status
        assert cancelled.cancelling_at is not None
    deadline = time.monotonic() + 180
    while cancelled.status != "cancelled":
        assert cancelled.status == "cancelling" and time.monotonic() < deadline, cancelled
        time.sleep(0.5)
        cancelled = client.batches.retrieve(batch.id)
    assert cancelled.cancelled_at is not None and cancelled.request_counts is not None
    assert cancelled.request_counts.completed < 40
    done = []
    if cancelled.output_file_id:
        done = [json.loads(x)["custom_id"]
                for x in client.files.content(cancelled.output_file_id).text.splitlines()]
    assert len(done) == len(set(done)) == cancelled.request_counts.completed


def test_embeddings_base64_and_float_give_the_same_float32(base_url: str) -> None:
    import httpx

    reply = httpx.post(f"{base_url}/embeddings", json={"model": TINY_MODEL, "input": "a cat",
                                                       "encoding_format": "base64"}, timeout=60)
    vec = np.frombuffer(base64.b64decode(reply.json()["data"][0]["embedding"]), dtype="<f4")
    assert vec.shape == (64,) and abs(float(np.linalg.norm(vec)) - 1.0) < 1e-4
    # encoding_format float: the same float32 numbers, each with at most 9 significant digits
    floats = httpx.post(f"{base_url}/embeddings", json={"model": TINY_MODEL, "input": "a cat"},
                        timeout=60)
    assert np.array_equal(np.asarray(floats.json()["data"][0]["embedding"], dtype="<f4"), vec)
    raw = floats.text[floats.text.index('"embedding"'):]
    raw = raw[raw.index("[") + 1:raw.index("]")].split(",")
    assert len(raw) == 64 and max(len(x.strip().lstrip("-").replace(".", "").lstrip("0")
                                      .split("e")[0]) for x in raw) <= 9


def test_fabric_serve_command_with_a_key(local_site: Any, fab: Fabric, tmp_path: Path) -> None:
    """`fabric serve --require-auth` as an operator runs it: a key works, none gets 401."""
    import os
    import sys
    import urllib.request

    from fabric.gateway.keys import KeyStore
    from tests.test_gateway_unit import free_port

    key, _ = KeyStore(tmp_path).create("erin")
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.Popen(
        [sys.executable, "-m", "fabric.cli.main", "serve", "--site", str(local_site.site_dir),
         "--port", str(port), "--home", str(tmp_path), "--require-auth"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1)
                break
            except OSError:
                time.sleep(0.2)
        url = f"http://127.0.0.1:{port}/v1"
        with openai.OpenAI(base_url=url, api_key=key, max_retries=0) as client:
            reply = client.completions.create(model=TINY_MODEL, prompt=PROMPT, max_tokens=4,
                                              temperature=0)
            expected = fab.generate(PROMPT, model=TINY_MODEL, max_tokens=4)
            assert reply.choices[0].text == expected.text
        with openai.OpenAI(base_url=url, api_key="EMPTY", max_retries=0) as client, \
                pytest.raises(openai.AuthenticationError):
            client.models.list()
    finally:
        proc.terminate()
        proc.wait(15)


class RecordingClient(AsyncFabric):
    """The gateway's client, keeping every stream it opens (to see how each one ended)."""

    def __init__(self, fabric: Fabric) -> None:
        super().__init__(fabric=fabric)
        self.opened: list[Any] = []

    async def stream(self, prompt: str | None = None, **kwargs: Any) -> Any:
        stream = await super().stream(prompt, **kwargs)
        self.opened.append(stream)
        return stream


def test_a_client_that_goes_away_stops_its_generation(fab: Fabric, long_prompt: str,
                                                      tmp_path: Path) -> None:
    """A user closes an SSE stream after its first chunk: the gateway cancels the request at
    the server, which stops before the end (the gateway reads the stream on its event loop;
    the disconnect must still reach the server, or it generates for nobody)."""
    recording = RecordingClient(fab)
    config = GatewayConfig(site=fab.site, home=tmp_path, rate=0)
    pid = server_pid(fab)
    before = server_idle(fab)["tokens_total"]
    with running_server(create_app(config, recording)) as url, \
            openai.OpenAI(base_url=f"{url}/v1", api_key="EMPTY", max_retries=0) as client, \
            throttle_process(pid):
        stream = client.completions.create(model=TINY_MODEL, prompt=long_prompt,
                                           max_tokens=LONG_TOKENS, temperature=0, stream=True)
        first = next(iter(stream))
        stream.close()
        (opened,) = recording.opened
        wait_until(lambda: opened.finished, 60, "the gateway to end the abandoned stream")
    assert first.id == f"cmpl-{opened.request_id}"
    assert opened.cancelled and opened.result is None
    assert len(opened.token_ids) < LONG_TOKENS
    assert_stopped_early(fab, before)  # the server stopped, not only the gateway's reader


@pytest.mark.parametrize("route", ["completions", "chat/completions"])
def test_a_client_that_hangs_up_on_a_completion_stops_it(fab: Fabric, long_prompt: str,
                                                         tmp_path: Path, route: str) -> None:
    """A user's HTTP client gives up on a non-stream completion (a timeout, Ctrl-C) while it
    is generating: the gateway cancels the request at the server, which stops before the end
    (the gateway awaited ``generate`` to its end for nobody before)."""
    config = GatewayConfig(site=fab.site, home=tmp_path, rate=0)
    pid = server_pid(fab)
    before = server_idle(fab)["tokens_total"]
    (dep,) = [d for d in fab.deployments() if d["model"] == TINY_MODEL and d.get("health")]
    body = {"model": TINY_MODEL, "max_tokens": LONG_TOKENS, "temperature": 0,
            **({"prompt": long_prompt} if route == "completions"
               else {"messages": [{"role": "user", "content": long_prompt}]})}
    data = json.dumps(body).encode()
    with running_server(create_app(config, AsyncFabric(fabric=fab))) as url, \
            throttle_process(pid), \
            ServerClient(dep["address"], dep["public_key"], timeout_s=60) as server:
        port = int(url.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
            sock.sendall(f"POST /v1/{route} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: "
                         f"application/json\r\nContent-Length: {len(data)}\r\n\r\n".encode()
                         + data)
            # Asked of the server itself: the site might find a server at 5% slow.
            wait_until(lambda: server.health(60)["running"], 60,
                       "the completion to run at the server")
        wait_until(lambda: not server.health(60)["running"], 60,
                   "the gateway to cancel the abandoned completion")
    assert_stopped_early(fab, before)  # the server stopped, not only the gateway's wait
