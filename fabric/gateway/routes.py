"""``/v1/models``, ``/v1/chat/completions``, ``/v1/completions`` and ``/v1/embeddings``.

Each route checks the body (OpenAI's shape, extension fields allowed), calls the SDK through
the caller's ``AsyncFabric`` and answers in OpenAI's shape; ``n`` choices run concurrently. A
client that hangs up stops its generations at the server, streamed or not
(``fabric.gateway.streams``, ``fabric.gateway.hangups``).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Iterable, Sequence
from typing import Any, NamedTuple, TypeVar

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ValidationError

from fabric.aio import AsyncFabric
from fabric.errors import InvalidRequest
from fabric.gateway import shapes
from fabric.gateway.hangups import unless_hung_up
from fabric.gateway.shapes import ChatRequest, CompletionRequest, EmbeddingRequest
from fabric.gateway.state import Who, read_body
from fabric.gateway.streams import Piece, guarded, open_streams, pieces, sse
from fabric.protocol import GenerationResult
from fabric.wire.arrays import float32_floats

__all__ = ["parse_body", "router"]

router = APIRouter(prefix="/v1")
M = TypeVar("M", bound=BaseModel)
T = TypeVar("T")
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
OFF_LOOP_BYTES = 1 << 20
"""Bodies larger than this are parsed in a thread, not on the event loop."""


async def parse_body(request: Request, model: type[M]) -> M:
    """The JSON body as ``model``, or ``InvalidRequest`` naming the bad field (400)."""
    body = await read_body(request)
    try:
        if len(body) > OFF_LOOP_BYTES:  # seconds of parsing: not on the loop everyone shares
            return await asyncio.to_thread(model.model_validate_json, body)
        return model.model_validate_json(body)
    except ValidationError as exc:
        err = exc.errors()[0]
        param = field_path(err["loc"])
        message = str(err["msg"]).removeprefix("Value error, ")
        raise InvalidRequest(f"{param or 'body'}: {message}", param=param or None) from None


def field_path(loc: Sequence[int | str]) -> str:
    """A pydantic error location as the client wrote the field: ``messages[0].role``; the
    union member tried (``str``, ``list[str]``) is not a field and is left out."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif "[" not in part and part not in ("str", "int", "float", "bool", "dict", "list"):
            out += f".{part}" if out else part
    return out


@router.get("/models")
async def list_models(who: Who) -> dict[str, Any]:
    """The site's catalog as OpenAI ``model`` objects (a federation's: one per model, owned by
    the first site listing it, with every site hosting it in ``sites``)."""
    records = shapes.merge_sites(await who.client.models())
    return {"object": "list", "data": [shapes.model_card(r, who.client.site) for r in records]}


@router.get("/models/{model}")
async def get_model(model: str, who: Who) -> dict[str, Any]:
    """One catalog entry (404 if the site does not serve it)."""
    for record in shapes.merge_sites(await who.client.models()):
        if record.get("name") == model:
            return shapes.model_card(record, who.client.site)
    from fabric.errors import UnknownModel

    raise UnknownModel(f"model {model!r} is not in the site's catalog", param="model")


# -- chat ------------------------------------------------------------------------------------


@router.post("/chat/completions", response_model=None)
async def chat_completions(request: Request,
                           who: Who) -> dict[str, Any] | StreamingResponse:
    """A chat completion, or its SSE stream."""
    req = await parse_body(request, ChatRequest)
    messages = req.plain_messages()
    calls = [{"messages": messages, **shapes.sampling_kwargs(
        req, req.token_limit(), req.logprobs, k, req.top_logprobs or 0)} for k in range(req.n)]
    if req.stream:
        streams = await open_streams(who.client, calls)
        return StreamingResponse(guarded(_chat_events(req, streams), request.app.state.streams),
                                 media_type="text/event-stream", headers=SSE_HEADERS)
    # A client that hangs up first cancels the generations at the server.
    results = await unless_hung_up(request, _all(who.client.chat(**kw) for kw in calls))
    return shapes.chat_response(req.model, list(results), req.logprobs)


async def _chat_events(req: ChatRequest, streams: list[Any]) -> Any:
    rid = streams[0].request_id
    for i in range(len(streams)):
        yield sse(shapes.chat_chunk(rid, req.model, i, {"role": "assistant", "content": ""}))
    async for piece in pieces(streams):
        if piece.text is None:
            result = streams[piece.index].result
            yield sse(shapes.chat_chunk(rid, req.model, piece.index, {},
                                        shapes.finish_reason(result.finish_reason)))
            continue
        lp = shapes.chat_logprobs(piece.token_ids, piece.logprobs, piece.tops) \
            if req.logprobs else None
        yield sse(shapes.chat_chunk(rid, req.model, piece.index, {"content": piece.text},
                                    None, lp))
    if req.include_usage:
        yield sse(shapes.chat_chunk(rid, req.model, 0, {}, usage=_stream_usage(streams, req.n)))


def _stream_usage(streams: list[Any], n: int) -> dict[str, int]:
    """Usage of ``n`` choices per prompt: each prompt counted once, every choice's tokens."""
    results: list[GenerationResult] = [s.result for s in streams]
    prompt = sum(r.usage.prompt_tokens for r in results[::n])
    completion = sum(r.usage.completion_tokens for r in results)
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion}


# -- completions -----------------------------------------------------------------------------


@router.post("/completions", response_model=None)
async def completions(request: Request,
                      who: Who) -> dict[str, Any] | StreamingResponse:
    """A text completion (several prompts, ``n`` each), a scored prompt (``echo`` with
    ``max_tokens: 0``, or the ``continuation`` extension), or an SSE stream."""
    req = await parse_body(request, CompletionRequest)
    prompts = req.prompts()
    if req.stream:
        if req.echo or req.continuation is not None or not req.max_tokens:
            raise InvalidRequest("stream cannot be combined with echo, continuation or "
                                 "max_tokens 0: those score text, which returns at once",
                                 param="stream")
        calls = [{"prompt": p, **shapes.sampling_kwargs(req, req.max_tokens,
                                                       req.logprobs is not None, k,
                                                       req.logprobs or 0)}
                 for p in prompts for k in range(req.n)]
        streams = await open_streams(who.client, calls)
        return StreamingResponse(guarded(_completion_events(req, streams),
                                         request.app.state.streams),
                                 media_type="text/event-stream", headers=SSE_HEADERS)
    jobs = [_one_completion(who.client, req, p, k) for p in prompts for k in range(req.n)]
    done = await unless_hung_up(request, _all(jobs))
    choices = [{"index": i, **d.choice} for i, d in enumerate(done)]
    prompt_tokens = sum(d.prompt_tokens for i, d in enumerate(done) if i % req.n == 0)
    completion_tokens = sum(d.completion_tokens for d in done)
    rid = next((d.request_id for d in done if d.request_id), "none")
    fingerprint = next((d.fingerprint for d in done if d.fingerprint), None)
    return shapes.completion_response(req.model, choices, prompt_tokens, completion_tokens, rid,
                                      fingerprint)


async def _all(calls: Iterable[Awaitable[T]]) -> list[T]:
    """Every call's outcome, run at once; when one fails the others are cancelled (so are
    their requests, at the server: nobody will read their answers) and its error is raised."""
    tasks = [asyncio.ensure_future(c) for c in calls]
    try:
        return list(await asyncio.gather(*tasks))
    except BaseException:
        for task in tasks:
            task.cancel()
        raise


class Done(NamedTuple):
    """One completion choice and what the response's totals need of it."""

    choice: dict[str, Any]
    prompt_tokens: int
    completion_tokens: int
    request_id: str
    fingerprint: str | None = None
    """Exactly which weights answered (``system_fingerprint``)."""


async def _one_completion(client: AsyncFabric, req: CompletionRequest, prompt: str,
                          choice: int) -> Done:
    """One choice, or the prompt scored."""
    want_lp = req.logprobs is not None
    top = req.logprobs or 0
    if req.continuation is not None:
        scored = await client.logprobs(prompt, req.continuation, model=req.model,
                                       hooks=req.hooks, top_logprobs=top)
        text = prompt + req.continuation if req.echo else req.continuation
        return _scored_choice(text, scored, want_lp, req.echo)
    if not req.max_tokens:
        if not req.echo:
            return Done({"text": "", "finish_reason": "length", "logprobs": None}, 0, 0, "")
        scored = await client.logprobs(prompt, model=req.model, hooks=req.hooks,
                                       top_logprobs=top)
        return _scored_choice(prompt, scored, want_lp, True)
    kwargs = shapes.sampling_kwargs(req, req.max_tokens, want_lp, choice, top)
    if req.echo and want_lp:
        scored, result = await asyncio.gather(
            client.logprobs(prompt, model=req.model, hooks=req.hooks, top_logprobs=top),
            client.generate(prompt, **kwargs))
        ids, lps, tops = _echoed(scored)
        logprobs: dict[str, Any] | None = shapes.completion_logprobs(
            ids + result.token_ids, lps + list(result.logprobs or []),
            tops + list(result.top_logprobs or [None] * len(result.token_ids)))
    else:
        result = await client.generate(prompt, **kwargs)
        logprobs = shapes.completion_logprobs(result.token_ids, list(result.logprobs or []),
                                              result.top_logprobs) if want_lp else None
    text = prompt + result.text if req.echo else result.text
    choice_out = {"text": text, "finish_reason": shapes.finish_reason(result.finish_reason),
                  "logprobs": logprobs, "token_ids": result.token_ids}
    if result.site:
        choice_out["site"] = result.site  # which site of a federation served it
    return Done(choice_out, result.usage.prompt_tokens, result.usage.completion_tokens,
                result.request_id, shapes.fingerprint(result.model))


Echoed = tuple[list[int], list[float | None], list[list[tuple[int, float]] | None]]
"""Tokens, their log-probabilities and their positions' most likely tokens."""


def _echoed(scored: dict[str, Any]) -> Echoed:
    """Every token of a scored text, its log-probability and top tokens, as OpenAI echoes a
    prompt: the tokens with no score (the first; a continuation's prompt) listed with
    ``None``, so that ``token_logprobs[len(context):]`` is what follows the context (lm-eval
    slices so, and compares each with the most likely token's for ``is_greedy``)."""
    context = [int(t) for t in scored.get("context_ids") or []]
    ids = [int(t) for t in scored.get("token_ids") or []]
    lps: list[float | None] = [float(x) for x in scored.get("logprobs") or []]
    tops: list[list[tuple[int, float]] | None] = [
        [(int(t), float(v)) for t, v in top] for top in scored.get("top_logprobs") or []]
    none: list[None] = [None] * len(context)
    return (context + ids, [*none, *lps], [*none, *(tops or [None] * len(ids))])


def _scored_choice(text: str, scored: dict[str, Any], want_lp: bool,
                   echo: bool) -> Done:
    """A choice whose tokens were scored, not generated (nothing new: zero completion);
    ``echo``: ``text`` holds the prompt too, and so do the logprobs (unscored: ``None``)."""
    scores = [float(x) for x in scored.get("logprobs") or []]
    ids, lps, tops = _echoed(scored)
    if not echo:  # the scored tokens only (a continuation's)
        cut = len(ids) - len(scores)
        ids, lps, tops = ids[cut:], lps[cut:], tops[cut:]
    usage = scored.get("usage") or {}
    choice = {"text": text, "finish_reason": "length",
              "logprobs": shapes.completion_logprobs(ids, lps, tops) if want_lp else None,
              "token_ids": ids, "total_logprob": float(sum(scores))}
    return Done(choice, int(usage.get("prompt_tokens", len(ids))), 0,
                str(scored.get("request_id", "")), shapes.fingerprint(scored.get("model")))


async def _completion_events(req: CompletionRequest, streams: list[Any]) -> Any:
    rid = streams[0].request_id
    async for piece in pieces(streams):
        yield sse(_completion_piece(req, rid, streams, piece))
    if req.include_usage:
        yield sse(shapes.completion_chunk(rid, req.model, 0, "",
                                          usage=_stream_usage(streams, req.n)))


def _completion_piece(req: CompletionRequest, rid: str, streams: list[Any],
                      piece: Piece) -> dict[str, Any]:
    if piece.text is None:
        reason = shapes.finish_reason(streams[piece.index].result.finish_reason)
        return shapes.completion_chunk(rid, req.model, piece.index, "", reason)
    lp = shapes.completion_logprobs(piece.token_ids, list(piece.logprobs), piece.tops) \
        if req.logprobs is not None else None
    return shapes.completion_chunk(rid, req.model, piece.index, piece.text, None, lp)


# -- embeddings ------------------------------------------------------------------------------


@router.post("/embeddings")
async def embeddings(request: Request, who: Who) -> dict[str, Any]:
    """Pooled vectors (one per input), or every token's hidden state with ``pooling: none``."""
    req = await parse_body(request, EmbeddingRequest)
    texts = req.texts()
    if req.pooling == "none":
        # Every token's raw hidden state: what shapes a pooled vector does not apply.
        for field in ("dimensions", "normalize"):
            if field in req.model_fields_set and (field != "normalize" or req.normalize):
                raise InvalidRequest(f"{field} applies to pooled vectors, not to pooling "
                                     "'none' (every token's raw hidden state)", param=field)
        return await _hidden_states(who.client, req, texts)
    if req.positions is not None:
        raise InvalidRequest(f"positions picks tokens with pooling 'none'; pooling "
                             f"{req.pooling!r} pools every token", param="positions")
    layers = req.layers or [req.layer]
    out = await who.client.embed(texts, model=req.model, layer=layers if req.layers else req.layer,
                                 pooling=req.pooling, normalize=req.normalize, hooks=req.hooks)
    first = out[layers[0]] if req.layers else out
    vectors = [_shorten(v, req.dimensions, req.normalize) for v in first]
    extra = [{"layers": {str(k): float32_floats(_shorten(v[i], req.dimensions, req.normalize))
                         for k, v in out.items()}}
             for i in range(len(texts))] if req.layers else None
    return shapes.embedding_response(req.model, vectors, req.encoding_format, extra)


async def _hidden_states(client: AsyncFabric, req: EmbeddingRequest,
                         texts: list[str]) -> dict[str, Any]:
    layers = req.layers or [req.layer]
    states = await _all(client.hidden_states(
        t, model=req.model, layers=layers, positions=req.positions, hooks=req.hooks)
        for t in texts)
    vectors = [s["layers"][str(layers[0])].float().numpy() for s in states]
    extra = [{"token_ids": s["token_ids"], "positions": s["positions"],
              **({"layers": {k: float32_floats(v) for k, v in s["layers"].items()}}
                 if req.layers else {})} for s in states]
    return shapes.embedding_response(req.model, vectors, req.encoding_format, extra)


def _shorten(vector: Any, dimensions: int | None, normalize: bool) -> Any:
    """OpenAI's ``dimensions``: keep the first ones (renormalised, as OpenAI does)."""
    import numpy as np

    if dimensions is None or dimensions == len(vector):
        return vector
    if not 0 < dimensions < len(vector):
        raise InvalidRequest(f"dimensions must be between 1 and {len(vector)} for this model",
                             param="dimensions")
    short = np.asarray(vector[:dimensions], dtype=np.float32)
    norm = float(np.linalg.norm(short))
    return short / norm if normalize and norm > 0 else short
