"""Turn a finished ``Sequence`` into the result map sent to the client."""

from __future__ import annotations

import time
from typing import Any

import torch

from fabric.engine.sequence import Sequence
from fabric.provenance import for_request
from fabric.wire.arrays import encode_array


def timings(seq: Sequence) -> dict[str, float]:
    """Queue, prefill, decode and total seconds of a sequence."""
    now = time.monotonic()
    admitted = seq.admitted or now
    prefill_end = seq.prefill_done or now
    return {"queue_s": admitted - seq.arrived, "prefill_s": max(0.0, prefill_end - admitted),
            "decode_s": max(0.0, now - prefill_end), "total_s": now - seq.arrived}


def usage(seq: Sequence) -> dict[str, int]:
    """Prompt and completion token counts."""
    return {"prompt_tokens": len(seq.prompt_ids), "completion_tokens": len(seq.generated)}


def build(seq: Sequence, reason: str, identity: dict[str, Any], text: str,
          hidden_layers: int) -> dict[str, Any]:
    """The result map for one finished request of any kind.

    ``identity`` is the server's: name, version, sha256 and, from a model server, the
    ``provenance`` record built once at start (``fabric.provenance.server_record``), to which
    the request's own settings are added."""
    req = seq.request
    base: dict[str, Any] = {"request_id": seq.request_id,
                            "model": {k: v for k, v in identity.items() if k != "provenance"},
                            "usage": usage(seq), "timings": timings(seq)}
    if identity.get("provenance") is not None:
        base["provenance"] = for_request(identity["provenance"], req, seq.seed)
    if req.kind == "generate":
        base.update(text=text, token_ids=list(seq.generated), finish_reason=reason,
                    logprobs=list(seq.logprobs) if req.sampling.logprobs else None,
                    top_logprobs=[list(map(list, t)) for t in seq.tops]
                    if req.sampling.top_logprobs else None,
                    captures={str(k): encode_array(_all_rows(v))
                              for k, v in seq.captures.items()})
        return base
    if req.kind == "logprobs":
        scored = [t for t in (seq.score_targets or []) if t >= 0]
        # The tokens before the first scored one (the text's first token, or the whole
        # prompt before a continuation) have no score: named so a caller can list them.
        base.update(token_ids=scored, logprobs=list(seq.scores), total=float(sum(seq.scores)),
                    context_ids=list(seq.prompt_ids[:len(seq.prompt_ids) - len(scored)]))
        if req.sampling.top_logprobs:
            base["top_logprobs"] = [list(map(list, t)) for t in seq.tops]
        return base
    if req.kind == "hidden_states":
        positions = req.positions
        layers = {}
        for key, v in _keyed(seq.captures, req.layers, hidden_layers).items():
            rows = _all_rows(v)
            if positions is not None:
                rows = rows[torch.tensor([p % rows.shape[0] for p in positions])]
            layers[key] = encode_array(rows)
        base.update(layers=layers, token_ids=list(seq.prompt_ids),
                    positions=positions if positions is not None
                    else list(range(len(seq.prompt_ids))))
        return base
    vectors = {key: pool(v, req.pooling, req.normalize)
               for key, v in _keyed(seq.captures, req.layers, hidden_layers).items()}
    first = str(req.layers[0])
    base.update(embedding=vectors.get(first, next(iter(vectors.values()), [])),
                layers=vectors)
    return base


def keep_returned(result: dict[str, Any], keep: int) -> None:
    """After a stop string: ``token_ids``, ``logprobs`` and ``top_logprobs`` describe the
    returned text, its first ``keep`` tokens, as OpenAI scores only what it returns (summing
    the logprobs then scores that text). ``usage`` still counts every token generated."""
    for key in ("token_ids", "logprobs", "top_logprobs"):
        if result.get(key) is not None:
            result[key] = result[key][:keep]


def _keyed(captures: dict[int, Any], asked: list[int], n: int) -> dict[str, Any]:
    """Each asked layer's capture under the number the caller used (-1, not ``n``; two
    numbers naming one layer, such as -1 and ``n``, each get it), then any other capture (a
    capture hook's) under its hidden-state index."""
    out: dict[str, Any] = {}
    for layer in asked:
        if layer % (n + 1) in captures:
            out[str(layer)] = captures[layer % (n + 1)]
    named = {layer % (n + 1) for layer in asked}
    out.update({str(index): v for index, v in captures.items() if index not in named})
    return out


def _all_rows(value: Any) -> torch.Tensor:
    if isinstance(value, list):
        return torch.cat(value, 0)
    return value if isinstance(value, torch.Tensor) else torch.as_tensor(value)


def pool(value: Any, pooling: str, normalize: bool) -> list[float]:
    """A pooled (and optionally unit-length) vector from an accumulated capture."""
    if isinstance(value, tuple):
        vec = value[0] / value[1]
    elif isinstance(value, list):
        rows = torch.cat(value, 0)
        vec = {"mean": rows.mean(0), "last": rows[-1], "first": rows[0]}[pooling]
    else:
        vec = value
    vec = vec.float()
    if normalize:
        vec = torch.nn.functional.normalize(vec, dim=-1)
    return list(vec.tolist())


def accumulate(seq: Sequence, captures: dict[int, Any]) -> None:
    """Fold one step's captures into the sequence's running captures."""
    for k, v in captures.items():
        old = seq.captures.get(k)
        if isinstance(v, tuple):  # mean pooling: (sum, count)
            seq.captures[k] = v if old is None else (old[0] + v[0], old[1] + v[1])
        elif seq.capture is not None and seq.capture.mode == "all":
            seq.captures.setdefault(k, []).append(v)
        elif seq.capture is not None and seq.capture.mode == "first":
            seq.captures.setdefault(k, v)
        else:
            seq.captures[k] = v
