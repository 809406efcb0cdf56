"""The gateway's OpenAI shapes (``fabric.gateway.shapes``) and the routes' ``n`` > 1 totals.

No site: the shape functions are called with ``GenerationResult`` objects built here, and the
routes run in-process (``httpx.ASGITransport``, no port) over ``Choices``, a stand-in for the
gateway's ``AsyncFabric`` whose choices differ in their token counts and finish reasons, so
every expected number below is derived from what the stand-in was told to answer.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import httpx
import pytest

from fabric.aio import AsyncStream
from fabric.errors import QuotaExceeded
from fabric.gateway import GatewayConfig, create_app, shapes
from fabric.protocol import GenerationResult, ModelIdentity, Timings, Usage

MODEL = "m"
SEED = 100
"""Requests send this seed: choice ``k`` of ``n`` then asks with seed ``SEED + k``."""
REASONS = ["length", "eos", "deadline", "stop"]
"""The finish reason the stand-in gives choice ``k`` (``REASONS[k]``)."""


def result(text: str, prompt_tokens: int, completion_tokens: int,
           finish: Any = "length", rid: str = "r1") -> GenerationResult:
    return GenerationResult(
        request_id=rid, model=ModelIdentity(name=MODEL, version="v", sha256="cd" * 32),
        text=text, token_ids=list(range(completion_tokens)), finish_reason=finish,
        usage=Usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens),
        timings=Timings())


# -- shapes ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("internal", "openai"), [
    ("eos", "stop"),  # the model ended its answer: OpenAI says "stop"
    ("stop", "stop"), ("cancelled", "stop"), ("deadline", "length"), ("length", "length"),
    ("error", "error"), (None, None)])
def test_finish_reason_in_openais_words(internal: str | None, openai: str | None) -> None:
    assert shapes.finish_reason(internal) == openai


def test_chat_response_of_several_choices() -> None:
    prompt = 9
    results = [result(f"answer {k}", prompt, 3 + 2 * k, REASONS[k]) for k in range(3)]
    body = shapes.chat_response(MODEL, results, logprobs=False)
    assert [c["index"] for c in body["choices"]] == [0, 1, 2]
    assert [c["message"]["content"] for c in body["choices"]] == [r.text for r in results]
    assert [c["finish_reason"] for c in body["choices"]] == \
        [shapes.finish_reason(r) for r in REASONS[:3]]
    assert "eos" not in {c["finish_reason"] for c in body["choices"]}
    completion = sum(r.usage.completion_tokens for r in results)  # every choice's tokens
    assert body["usage"] == {"prompt_tokens": prompt, "completion_tokens": completion,
                             "total_tokens": prompt + completion}


# -- routes ----------------------------------------------------------------------------------


def choice_of(kwargs: dict[str, Any]) -> int:
    """Which of the ``n`` choices a call is (from its seed, see ``SEED``)."""
    return int(kwargs["seed"]) - SEED


def prompt_tokens(prompt: str) -> int:
    return len(prompt.split())


class ChoiceStream(AsyncStream):
    """A stream of choice ``k``: ``k + 1`` chunks, then ``REASONS[k]``."""

    def __init__(self, k: int, prompt: str) -> None:  # no Stream underneath
        self.chunks = [f" w{k}.{i}" for i in range(k + 1)]
        self.request_id = f"s{k}"
        self.last_token_ids: list[int] = [k]
        self.last_logprobs: list[float] = []
        self.last_tops: list[list[tuple[int, float]]] = []
        self.result = result("".join(self.chunks), prompt_tokens(prompt), len(self.chunks),
                             REASONS[k], self.request_id)

    async def __anext__(self) -> str:
        if not self.chunks:
            raise StopAsyncIteration
        return self.chunks.pop(0)

    def close_soon(self) -> None:
        """Nothing runs anywhere to cancel."""


class Choices:
    """Stands in for the gateway's ``AsyncFabric``: choice ``k`` has ``k + 1`` tokens and
    finishes with ``REASONS[k]``; a prompt counts one token per word."""

    site = "stand-in"
    sites = ["stand-in"]

    async def generate(self, prompt: str, **kwargs: Any) -> GenerationResult:
        k = choice_of(kwargs)
        return result(f" c{k}", prompt_tokens(prompt), k + 1, REASONS[k])

    async def chat(self, messages: list[dict[str, str]], **kwargs: Any) -> GenerationResult:
        k = choice_of(kwargs)
        return result(f"c{k}", prompt_tokens(messages[-1]["content"]), k + 1, REASONS[k])

    async def stream(self, prompt: str | None = None, messages: Any = None,
                     **kwargs: Any) -> ChoiceStream:
        return ChoiceStream(choice_of(kwargs), prompt or messages[-1]["content"])

    def close(self) -> None:
        """Nothing to close."""


def post(tmp_path: Path, route: str, body: dict[str, Any]) -> httpx.Response:
    app = create_app(GatewayConfig(home=tmp_path, rate=0), Choices())  # type: ignore[arg-type]

    async def call() -> httpx.Response:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://gw") as http:
            return await http.post(route, json=body)

    response = asyncio.run(call())
    assert response.status_code == 200, response.text
    return response


def events(response: httpx.Response) -> list[dict[str, Any]]:
    lines = [line.removeprefix("data: ") for line in response.text.splitlines()
             if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return [json.loads(line) for line in lines[:-1]]


def test_chat_with_n_choices_sums_their_tokens(tmp_path: Path) -> None:
    n, content = 3, "three word question"
    body = post(tmp_path, "/v1/chat/completions", {
        "model": MODEL, "messages": [{"role": "user", "content": content}], "n": n,
        "seed": SEED}).json()
    assert [c["finish_reason"] for c in body["choices"]] == \
        [shapes.finish_reason(REASONS[k]) for k in range(n)]
    completion = sum(k + 1 for k in range(n))
    assert body["usage"] == {"prompt_tokens": prompt_tokens(content),
                             "completion_tokens": completion,
                             "total_tokens": prompt_tokens(content) + completion}


def test_completions_count_each_prompt_once_however_many_choices(tmp_path: Path) -> None:
    prompts, n = ["one two", "three four five six"], 3
    body = post(tmp_path, "/v1/completions", {
        "model": MODEL, "prompt": prompts, "n": n, "seed": SEED, "max_tokens": 4}).json()
    assert len(body["choices"]) == len(prompts) * n
    assert [c["index"] for c in body["choices"]] == list(range(len(prompts) * n))
    assert [c["text"] for c in body["choices"]] == [f" c{k}" for _ in prompts for k in range(n)]
    prompt = sum(prompt_tokens(p) for p in prompts)
    completion = len(prompts) * sum(k + 1 for k in range(n))
    assert body["usage"] == {"prompt_tokens": prompt, "completion_tokens": completion,
                             "total_tokens": prompt + completion}


def test_streamed_chat_finishes_each_choice_under_its_own_index(tmp_path: Path) -> None:
    n, content = 3, "a streamed question"
    chunks = events(post(tmp_path, "/v1/chat/completions", {
        "model": MODEL, "messages": [{"role": "user", "content": content}], "n": n,
        "seed": SEED, "stream": True, "stream_options": {"include_usage": True}}))
    finished: dict[int, list[str]] = {}
    text: dict[int, str] = {}
    for chunk in chunks[:-1]:
        (choice,) = chunk["choices"]
        if choice["finish_reason"] is not None:
            finished.setdefault(choice["index"], []).append(choice["finish_reason"])
        text[choice["index"]] = text.get(choice["index"], "") + \
            choice["delta"].get("content", "")
    # One finish chunk per choice, under that choice's index, with that choice's reason.
    assert finished == {k: [shapes.finish_reason(REASONS[k])] for k in range(n)}
    assert text == {k: "".join(f" w{k}.{i}" for i in range(k + 1)) for k in range(n)}
    usage = chunks[-1]
    assert usage["choices"] == []
    completion = sum(k + 1 for k in range(n))
    assert usage["usage"] == {"prompt_tokens": prompt_tokens(content),
                              "completion_tokens": completion,
                              "total_tokens": prompt_tokens(content) + completion}


def test_streamed_completions_finish_each_choice_under_its_own_index(tmp_path: Path) -> None:
    """Choice ``k`` of prompt ``p`` is index ``p * n + k``, as unstreamed; its final chunk
    names that index with that choice's reason."""
    prompts, n = ["one two", "three four five six"], 3
    chunks = events(post(tmp_path, "/v1/completions", {
        "model": MODEL, "prompt": prompts, "n": n, "seed": SEED, "max_tokens": 4,
        "stream": True, "stream_options": {"include_usage": True}}))
    finished: dict[int, list[str]] = {}
    text: dict[int, str] = {}
    for chunk in chunks[:-1]:
        (choice,) = chunk["choices"]
        assert not text.get(choice["index"], "").endswith("|")  # nothing after its finish
        text[choice["index"]] = text.get(choice["index"], "") + choice["text"]
        if choice["finish_reason"] is not None:
            finished.setdefault(choice["index"], []).append(choice["finish_reason"])
            text[choice["index"]] += "|"
    assert finished == {p * n + k: [shapes.finish_reason(REASONS[k])]
                        for p in range(len(prompts)) for k in range(n)}
    assert text == {p * n + k: "".join(f" w{k}.{i}" for i in range(k + 1)) + "|"
                    for p in range(len(prompts)) for k in range(n)}
    usage = chunks[-1]
    assert usage["choices"] == []
    prompt = sum(prompt_tokens(p) for p in prompts)  # each prompt once, as unstreamed
    completion = len(prompts) * sum(k + 1 for k in range(n))
    assert usage["usage"] == {"prompt_tokens": prompt, "completion_tokens": completion,
                              "total_tokens": prompt + completion}


class OneFails(Choices):
    """Choice 0 fails at once; the others wait until cancelled (and say so)."""

    def __init__(self) -> None:
        self.cancelled: list[int] = []

    async def generate(self, prompt: str = "", **kwargs: Any) -> GenerationResult:
        k = choice_of(kwargs)
        if k == 0:
            raise QuotaExceeded("choice 0 is over the quota")
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            self.cancelled.append(k)
            raise
        raise AssertionError("a choice nobody will read ran to its end")

    async def chat(self, messages: Any = None, **kwargs: Any) -> GenerationResult:
        return await self.generate(**kwargs)


@pytest.mark.parametrize("route", ["/v1/completions", "/v1/chat/completions"])
def test_a_failed_choice_cancels_the_others(tmp_path: Path, route: str) -> None:
    """The answer is the error: the other choices' generations are cancelled (so are their
    requests, at the server), not left to run for nobody."""
    client = OneFails()
    app = create_app(GatewayConfig(home=tmp_path, rate=0), client)  # type: ignore[arg-type]
    body = {"model": MODEL, "n": 3, "seed": SEED, "max_tokens": 4, "prompt": "p",
            "messages": [{"role": "user", "content": "p"}]}

    async def call() -> tuple[httpx.Response, list[int]]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://gw") as http:
            response = await asyncio.wait_for(http.post(route, json=body), 30)
            await asyncio.sleep(0.1)  # the cancelled choices' handlers run
            # Read now: asyncio.run cancels whatever still runs once call() returns.
            return response, sorted(client.cancelled)

    response, cancelled = asyncio.run(call())
    assert response.status_code == 429, response.text
    assert "choice 0 is over the quota" in response.json()["error"]["message"]
    assert cancelled == [1, 2]
