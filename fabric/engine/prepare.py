"""Turn a validated ``InferenceRequest`` into a ``Sequence``: tokens, limits, captures, hooks.

Everything a request can get wrong about the model (context length, KV budget, layer indices,
steering-vector sizes, head and neuron indices) is checked here, before it reaches the queue,
and raised as a typed error that names the bad value and what is accepted.
"""

from __future__ import annotations

import math
import secrets
import time
from dataclasses import dataclass
from typing import Any

import torch

from fabric.engine.sequence import Sequence
from fabric.engine.steps import CaptureSpec, HookSpec
from fabric.errors import ContextLengthExceeded, InvalidHook, InvalidRequest
from fabric.protocol import Hook, InferenceRequest

MAX_HOOKS = 16
MAX_CAPTURE_LAYERS = 64


@dataclass
class ModelLimits:
    """What the served model accepts."""

    n_layers: int
    hidden: int
    heads: int
    intermediate: int
    context: int
    kv_budget: int
    causal: bool = True
    kv_window: int | None = None
    """Every layer's sliding window, when they all slide (``scheduler.Limits.kv_window``)."""
    sparse_layers: frozenset[int] = frozenset()
    """Layers whose MLP is a mixture of experts (no single MLP whose neurons a hook could
    ablate)."""


class Preparer:
    """Tokenises and validates requests for one served model."""

    def __init__(self, tokenizer: Any, limits: ModelLimits) -> None:
        self.tok, self.limits = tokenizer, limits

    def prepare(self, req: InferenceRequest, stream: bool = False,
                ids: list[int] | None = None) -> Sequence:
        """A ready-to-queue ``Sequence`` or a typed error (``ids``: the prompt, tokenised)."""
        if not self.limits.causal and req.kind != "embed":
            raise InvalidRequest(
                f"model {req.model!r} is an embedding model: it serves kind 'embed' only, "
                f"not {req.kind!r}")
        if ids is None:
            ids = self._prompt_ids(req)
        targets = None
        if req.kind == "logprobs":
            ids, targets = self._scoring_ids(req, ids)
        new = req.sampling.max_tokens if req.kind == "generate" else 0
        self._check_length(len(ids), new)
        seq = Sequence(request=req, prompt_ids=ids, reserve=len(ids) + new, stream=stream,
                       seed=req.sampling.seed if req.sampling.seed is not None
                       else secrets.randbits(62),
                       score_targets=targets)
        seq.hooks, capture_layers = self._hooks(req.hooks)
        if req.positions is not None:
            bad = [p for p in req.positions if not -len(ids) <= p < len(ids)]
            if bad:
                raise InvalidRequest(f"positions {bad} are outside the prompt's {len(ids)} tokens "
                                     f"(0..{len(ids) - 1}, or -1..-{len(ids)} from the end)")
        if not self.limits.causal:
            if req.hooks:
                raise InvalidHook(f"embedding model {req.model!r} does not take hooks; use a "
                                  "causal LM (e.g. smollm2-135m) for hooks")
            if any(layer not in (-1, self.limits.n_layers) for layer in req.layers):
                raise InvalidRequest(f"embedding model {req.model!r} returns its final layer "
                                     f"only: use layers=[-1], not {req.layers}")
            seq.capture = CaptureSpec([self.limits.n_layers], req.pooling)
        elif req.kind in ("embed", "hidden_states"):
            capture_layers += [self._hs_index(layer) for layer in req.layers]
            mode = {"mean": "mean", "last": "last", "first": "first"}[req.pooling]
            seq.capture = CaptureSpec(sorted(set(capture_layers)),
                                      "all" if req.kind == "hidden_states" or req.hooks
                                      else mode)
        elif capture_layers:
            seq.capture = CaptureSpec(sorted(set(capture_layers)), "all")
        return seq

    def prepare_batch(self, req: InferenceRequest) -> list[Sequence]:
        """One ``Sequence`` per text of a batched embed request (``prompts``), tokenised in one
        call. Member ``i`` is request ``f"{req.request_id}#{i}"``; an error that concerns one
        text names it (``prompts[i]: ...``, ``details['index']``)."""
        assert req.prompts is not None
        texts = req.prompts
        arrived = time.monotonic()
        all_ids = self.tok(texts).input_ids
        seqs = []
        for i, (text, ids) in enumerate(zip(texts, all_ids, strict=True)):
            member = req.model_copy(update={"request_id": member_id(req.request_id, i),
                                            "prompt": text, "prompts": None})
            try:
                seq = self.prepare(member, ids=[int(t) for t in ids])
            except ContextLengthExceeded as exc:
                raise type(exc)(f"prompts[{i}]: {exc.message}", **{
                    **exc.details, "index": i, "problem": exc.message}) from None
            # One arrival for the batch: its members expire together (``timeout``), never one
            # by one while the batch has already been answered with the first one's error.
            seq.arrived = arrived
            seqs.append(seq)
        return seqs

    # --- pieces ------------------------------------------------------------------------------

    def _prompt_ids(self, req: InferenceRequest) -> list[int]:
        if req.messages is not None:
            for i, m in enumerate(req.messages):
                if set(m) - {"role", "content"} or not isinstance(m.get("content"), str):
                    raise InvalidRequest(
                        f"messages[{i}] must be {{'role': str, 'content': str}}, got {m!r}")
            try:
                out = self.tok.apply_chat_template(req.messages, add_generation_prompt=True,
                                                   tokenize=True)
            except Exception as exc:  # the template's own check (jinja raise_exception)
                raise InvalidRequest(f"the model's chat template refused these messages: "
                                     f"{exc}", param="messages") from None
            ids = out["input_ids"] if isinstance(out, dict) or hasattr(out, "keys") else out
            return [int(t) for t in ids]
        return [int(t) for t in self.tok(req.prompt).input_ids]

    def _scoring_ids(self, req: InferenceRequest, ids: list[int]
                     ) -> tuple[list[int], list[int]]:
        if req.continuation is None:
            full, first = ids, 1
        else:
            cont = self.tok(req.continuation, add_special_tokens=False).input_ids
            if not cont:
                raise InvalidRequest("continuation is empty: give text to score")
            full, first = ids + [int(t) for t in cont], len(ids)
        if len(full) < 2:
            raise InvalidRequest("text to score needs at least two tokens")
        # Row j's logits predict token j+1: score the tokens from ``first`` on.
        targets = [full[j + 1] if j + 1 >= first else -1 for j in range(len(full) - 1)] + [-1]
        return full, targets

    def _check_length(self, prompt: int, new: int) -> None:
        ctx = self.limits.context
        if prompt >= ctx + (0 if new else 1):
            raise ContextLengthExceeded(
                f"prompt has {prompt} tokens; the model's context is {ctx} tokens",
                prompt_tokens=prompt, context=ctx)
        if prompt + new > ctx:
            raise ContextLengthExceeded(
                f"max_tokens={new} does not fit: the prompt has {prompt} tokens and the "
                f"context is {ctx}, so max_tokens may be at most {ctx - prompt}",
                prompt_tokens=prompt, context=ctx)
        window = self.limits.kv_window
        needed = prompt + new if window is None else min(prompt + new, window)
        if needed > self.limits.kv_budget:
            raise ContextLengthExceeded(
                f"request needs {needed} KV-cache tokens; this server's budget is "
                f"{self.limits.kv_budget}", needed=needed, budget=self.limits.kv_budget)

    def _hs_index(self, layer: int) -> int:
        n = self.limits.n_layers
        if not -(n + 1) <= layer <= n:
            raise InvalidRequest(
                f"layer {layer} is out of range: hidden states are numbered 0 (embeddings) to "
                f"{n} (final output), or -1 to -{n + 1} from the end")
        return layer % (n + 1)

    def _hooks(self, hooks: list[Hook]) -> tuple[list[HookSpec], list[int]]:
        if len(hooks) > MAX_HOOKS:
            raise InvalidHook(f"{len(hooks)} hooks given; at most {MAX_HOOKS} per request")
        specs, captures = [], []
        for i, hook in enumerate(hooks):
            layer = self._layer(hook.layer, i)
            if hook.kind == "capture":
                captures.append(layer + 1)
                continue
            specs.append(self._hook_spec(hook, layer, i))
        if len(captures) > MAX_CAPTURE_LAYERS:
            raise InvalidHook(f"at most {MAX_CAPTURE_LAYERS} capture hooks per request")
        return specs, captures

    def _layer(self, layer: int, i: int) -> int:
        n = self.limits.n_layers
        if not -n <= layer < n:
            raise InvalidHook(f"hooks[{i}].layer={layer} is out of range: the model has {n} "
                              f"decoder layers (0..{n - 1}, or -1..-{n})")
        return layer % n

    def _hook_spec(self, hook: Hook, layer: int, i: int) -> HookSpec:
        lim = self.limits
        if hook.kind == "steer":
            if hook.vector is None or len(hook.vector) != lim.hidden:
                got = None if hook.vector is None else len(hook.vector)
                raise InvalidHook(f"hooks[{i}] steer vector has length {got}; the model's "
                                  f"hidden size is {lim.hidden}")
            if not all(math.isfinite(v) for v in hook.vector) or not math.isfinite(hook.scale):
                raise InvalidHook(f"hooks[{i}] steer vector and scale must be finite numbers")
            return HookSpec("steer", layer, torch.tensor(hook.vector), hook.scale)
        if hook.kind == "ablate_heads":
            _check_indices(hook.heads, lim.heads, f"hooks[{i}].heads", "attention heads")
            return HookSpec("ablate_heads", layer, heads=sorted(set(hook.heads)))
        if layer in lim.sparse_layers:
            raise InvalidHook(f"hooks[{i}]: layer {layer} is a mixture of experts; ablate_neurons "
                              "acts on dense MLP layers only (steer and capture work on every "
                              "layer)")
        _check_indices(hook.neurons, lim.intermediate, f"hooks[{i}].neurons", "MLP neurons")
        return HookSpec("ablate_neurons", layer, neurons=sorted(set(hook.neurons)))


def member_id(batch_id: str, index: int) -> str:
    """The request id of text ``index`` of batch ``batch_id`` inside the server."""
    return f"{batch_id}#{index}"


def _check_indices(values: list[int], size: int, where: str, what: str) -> None:
    if not values:
        raise InvalidHook(f"{where} is empty: name at least one of the {size} {what}")
    bad = [v for v in values if not 0 <= v < size]
    if bad:
        raise InvalidHook(f"{where} has {bad}: the layer has {size} {what} (0..{size - 1})")
