"""OpenAI's request and response shapes, and how they map onto the SDK's calls.

Requests are pydantic models that *tolerate* unknown fields (clients send many we have no use
for: ``user``, ``presence_penalty``, ``parallel_tool_calls``...). The fabric's own modes are
extension fields: ``top_k``, ``hooks`` and ``timeout`` on text calls; ``continuation`` on
completions (score a continuation); ``layer``/``layers``, ``pooling`` (``mean``, ``first``,
``last``, or ``none`` for every token's hidden state) and ``normalize`` on embeddings.

Token strings are not known at the gateway (the tokenizer lives with the model server), so a
token in ``logprobs`` is written ``token_id:<id>``, the convention vLLM uses for the same case.
"""

from __future__ import annotations

import base64
import time
from collections.abc import Sequence
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from fabric.openai_messages import plain_messages
from fabric.protocol import GenerationResult
from fabric.wire.arrays import float32_floats

__all__ = [
    "ChatRequest",
    "CompletionRequest",
    "EmbeddingRequest",
    "chat_chunk",
    "chat_response",
    "completion_response",
    "embedding_response",
    "finish_reason",
    "model_card",
    "sampling_kwargs",
]

class _Tolerant(BaseModel):
    model_config = ConfigDict(extra="allow")


class _TextRequest(_Tolerant):
    model: str
    max_tokens: int | None = Field(None, ge=0)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    seed: int | None = None
    stop: str | list[str] | None = None
    n: int = Field(1, ge=1, le=128)
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    # fabric extensions
    top_k: int = Field(0, ge=0)
    hooks: list[dict[str, Any]] | None = None
    timeout: float | None = Field(None, gt=0)

    @property
    def include_usage(self) -> bool:
        """Whether a stream ends with a usage chunk."""
        return bool((self.stream_options or {}).get("include_usage"))


class ChatRequest(_TextRequest):
    """``POST /v1/chat/completions``."""

    messages: list[dict[str, Any]]
    tool_choice: str | dict[str, Any] | None = None
    """The models served here call no tools: ``none`` or ``auto`` (then ``tools`` are ignored
    and the answer is text); ``required`` or a named function is refused."""
    response_format: dict[str, Any] | None = None
    """Only ``{"type": "text"}``: structured output (JSON) is refused, not silently ignored."""
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)

    @field_validator("messages")
    @classmethod
    def _messages(cls, value: list[dict[str, Any]]) -> list[dict[str, Any]]:
        if not value:
            raise ValueError("messages is empty: give at least one message")
        return value

    @model_validator(mode="after")
    def _top_needs_logprobs(self) -> ChatRequest:
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        return self

    @field_validator("tool_choice")
    @classmethod
    def _tool_choice(cls, value: Any) -> Any:
        if value not in (None, "none", "auto"):
            raise ValueError(f"{value!r} is not served: these models call no tools; use "
                             "'none' or 'auto' (tools are then ignored, the answer is text)")
        return value

    @field_validator("response_format")
    @classmethod
    def _response_format(cls, value: Any) -> Any:
        if value is not None and value.get("type", "text") != "text":
            raise ValueError(f"type {value.get('type')!r} is not served: structured output is "
                             "not supported; use {'type': 'text'}")
        return value

    def plain_messages(self) -> list[dict[str, str]]:
        """``{"role", "content"}`` with the content as one string (``openai_messages``)."""
        return plain_messages(self.messages)

    def token_limit(self) -> int:
        """``max_completion_tokens``, else ``max_tokens``, else 128."""
        for limit in (self.max_completion_tokens, self.max_tokens):
            if limit is not None:
                return limit
        return 128


class CompletionRequest(_TextRequest):
    """``POST /v1/completions`` (``echo`` with ``max_tokens: 0`` scores the prompt)."""

    prompt: str | list[str]
    max_tokens: int = Field(16, ge=0)
    """16 when not given or ``null``, as OpenAI's; 0 scores the prompt (with ``echo``)."""
    logprobs: int | None = Field(None, ge=0, le=5)
    echo: bool = False
    continuation: str | None = None
    """Extension: score this text after ``prompt`` (its tokens' log-probabilities)."""

    @field_validator("max_tokens", mode="before")
    @classmethod
    def _default_tokens(cls, value: Any) -> Any:
        return 16 if value is None else value

    @field_validator("prompt", mode="before")
    @classmethod
    def _prompt(cls, value: Any) -> Any:
        return _texts(value)

    def prompts(self) -> list[str]:
        """The prompts as a list."""
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)


class EmbeddingRequest(_Tolerant):
    """``POST /v1/embeddings``."""

    model: str
    input: str | list[str]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = None
    # fabric extensions
    layer: int = -1
    layers: list[int] | None = None
    pooling: Literal["mean", "first", "last", "none"] = "mean"
    normalize: bool = True
    positions: list[int] | None = None
    hooks: list[dict[str, Any]] | None = None

    @field_validator("input", mode="before")
    @classmethod
    def _input(cls, value: Any) -> Any:
        return _texts(value)

    def texts(self) -> list[str]:
        """The inputs as a list of strings."""
        return [self.input] if isinstance(self.input, str) else list(self.input)


def _texts(value: Any) -> Any:
    """``value`` if it is a string or a non-empty list of strings: token ids are refused, the
    gateway has no tokenizer (the model server has)."""
    if isinstance(value, str) or (isinstance(value, list) and value
                                  and all(isinstance(v, str) for v in value)):
        return value
    raise ValueError("must be a string or a non-empty list of strings (token ids are not "
                     "accepted: the tokenizer lives with the model server)")


def sampling_kwargs(req: _TextRequest, max_tokens: int, logprobs: bool,
                    choice: int = 0, top: int = 0) -> dict[str, Any]:
    """Keyword arguments for ``generate``/``chat``/``stream`` (``top``: the most likely tokens
    to return per position). Choice ``k`` of ``n`` gets seed ``seed + k`` so that sampled
    choices differ yet stay reproducible."""
    stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    return {"model": req.model, "max_tokens": max_tokens, "temperature": req.temperature,
            "top_p": req.top_p, "top_k": req.top_k,
            "seed": None if req.seed is None else req.seed + choice, "stop": stop,
            "logprobs": logprobs, "top_logprobs": top if logprobs else 0,
            "timeout": req.timeout, "hooks": req.hooks}


def finish_reason(reason: str | None) -> str | None:
    """The fabric's finish reason in OpenAI's words (``eos`` and ``stop`` are both "stop")."""
    return {"eos": "stop", "cancelled": "stop", "deadline": "length"}.get(
        reason or "", reason)


def token_name(token_id: int) -> str:
    """A token as OpenAI's ``token`` field (see the module docstring)."""
    return f"token_id:{token_id}"


Tops = Sequence[Sequence[tuple[int, float]]] | None
"""Per token, the most likely tokens at its position (``GenerationResult.top_logprobs``)."""


def chat_logprobs(token_ids: list[int], logprobs: list[float] | None,
                  tops: Tops = None) -> dict[str, Any]:
    """Chat ``logprobs.content``: each chosen token and, asked with ``top_logprobs``, the most
    likely tokens at its position."""
    content = []
    for i, (tid, lp) in enumerate(zip(token_ids, logprobs or [], strict=False)):
        top = tops[i] if tops is not None and i < len(tops) else []
        content.append({"token": token_name(tid), "logprob": lp, "bytes": None,
                        "top_logprobs": [{"token": token_name(t), "logprob": v, "bytes": None}
                                         for t, v in top]})
    return {"content": content}


def _usage(prompt: int, completion: int) -> dict[str, int]:
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion}


def fingerprint(model: Any) -> str | None:
    """``system_fingerprint``: exactly which weights answered (a result's ``model``, as a
    ``ModelIdentity`` or its dict); None when it does not say."""
    m = model.model_dump() if hasattr(model, "model_dump") else dict(model or {})
    if not {"name", "version", "sha256"} <= set(m):
        return None
    return f"{m['name']}:{m['version']}:{str(m['sha256'])[:12]}"


def _extensions(result: GenerationResult) -> dict[str, Any]:
    out: dict[str, Any] = {"token_ids": result.token_ids}
    if result.site:
        out["site"] = result.site  # which site of a federation served this choice
    if result.captures:
        out["captures"] = {k: v.tolist() if hasattr(v, "tolist") else v
                           for k, v in result.captures.items()}
    return out


def chat_response(model: str, results: list[GenerationResult],
                  logprobs: bool) -> dict[str, Any]:
    """A ``chat.completion`` from one result per choice."""
    first = results[0]
    return {
        "id": f"chatcmpl-{first.request_id}", "object": "chat.completion",
        "created": int(time.time()), "model": model, "system_fingerprint": fingerprint(first.model),
        "choices": [{
            "index": i, "message": {"role": "assistant", "content": r.text},
            "finish_reason": finish_reason(r.finish_reason),
            "logprobs": chat_logprobs(r.token_ids, r.logprobs, r.top_logprobs) if logprobs
            else None,
            **_extensions(r),
        } for i, r in enumerate(results)],
        "usage": _usage(first.usage.prompt_tokens,
                        sum(r.usage.completion_tokens for r in results)),
    }


def chat_chunk(request_id: str, model: str, index: int, delta: dict[str, Any],
               reason: str | None = None, logprobs: dict[str, Any] | None = None,
               usage: dict[str, int] | None = None) -> dict[str, Any]:
    """One ``chat.completion.chunk`` (``usage`` set: the final, choice-less usage chunk)."""
    choices = [] if usage is not None else [
        {"index": index, "delta": delta, "finish_reason": reason, "logprobs": logprobs}]
    return {"id": f"chatcmpl-{request_id}", "object": "chat.completion.chunk",
            "created": int(time.time()), "model": model, "choices": choices, "usage": usage}


def completion_chunk(request_id: str, model: str, index: int, text: str,
                     reason: str | None = None, logprobs: dict[str, Any] | None = None,
                     usage: dict[str, int] | None = None) -> dict[str, Any]:
    """One streamed ``text_completion``."""
    choices = [] if usage is not None else [
        {"index": index, "text": text, "finish_reason": reason, "logprobs": logprobs}]
    return {"id": f"cmpl-{request_id}", "object": "text_completion",
            "created": int(time.time()), "model": model, "choices": choices, "usage": usage}


def completion_logprobs(token_ids: Sequence[int], logprobs: Sequence[float | None],
                        tops: Sequence[Sequence[tuple[int, float]] | None] | None = None
                        ) -> dict[str, Any]:
    """Legacy ``logprobs``: parallel lists of tokens, their log-probabilities and, per
    position, ``{token: logprob}`` of the most likely tokens (``logprobs: k``) with the chosen
    one (as vLLM does; only the chosen one for ``logprobs: 0``); ``None`` where a token has no
    log-probability (an echoed prompt's first)."""
    top: list[dict[str, float] | None] = []
    for i, (t, lp) in enumerate(zip(token_ids, logprobs, strict=False)):
        alternatives = tops[i] if tops is not None and i < len(tops) else None
        if lp is None:
            top.append(None)
            continue
        entry = {token_name(a): v for a, v in alternatives or []}
        entry.setdefault(token_name(t), lp)
        top.append(entry)
    return {"tokens": [token_name(t) for t in token_ids], "token_logprobs": list(logprobs),
            "top_logprobs": top, "text_offset": None}


def completion_response(model: str, choices: list[dict[str, Any]], prompt_tokens: int,
                        completion_tokens: int, request_id: str,
                        fingerprint_: str | None = None) -> dict[str, Any]:
    """A ``text_completion`` from prepared choices (``index``, ``text``, ...)."""
    return {"id": f"cmpl-{request_id}", "object": "text_completion",
            "created": int(time.time()), "model": model, "system_fingerprint": fingerprint_,
            "choices": choices, "usage": _usage(prompt_tokens, completion_tokens)}


def encode_vector(vector: Any, encoding: str) -> Any:
    """A float32 vector as a JSON list (each number with the digits that read back as the same
    float32: ``float32_floats``), or base64 of its little-endian bytes."""
    import numpy as np

    arr = np.asarray(vector, dtype="<f4")
    if encoding == "base64":
        return base64.b64encode(arr.tobytes()).decode()
    return float32_floats(arr)


def embedding_response(model: str, vectors: list[Any], encoding: str,
                       extra: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """An embedding ``list`` (token counts are not reported by the SDK's embed: zero)."""
    extras = extra or [{}] * len(vectors)
    return {"object": "list", "model": model, "usage": _usage(0, 0),
            "data": [{"object": "embedding", "index": i,
                      "embedding": encode_vector(v, encoding), **extras[i]}
                     for i, v in enumerate(vectors)]}


def model_card(record: dict[str, Any], site: str) -> dict[str, Any]:
    """One ``model`` object of ``GET /v1/models`` (catalog fields kept as extensions)."""
    return {"id": record.get("name"), "object": "model", "created": 0,
            "owned_by": record.get("site") or site,
            **{k: v for k, v in record.items() if k not in {"id", "object"}}}


def merge_sites(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Catalog rows with one row per model name: the first site's, with ``sites`` listing
    every site that has the model (a federation lists a model once per site)."""
    out: dict[str, dict[str, Any]] = {}
    for record in records:
        name = str(record.get("name"))
        row = out.setdefault(name, {**record, "sites": []})
        if record.get("site") and record["site"] not in row["sites"]:
            row["sites"].append(record["site"])
    return list(out.values())
