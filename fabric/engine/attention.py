"""Attention of a packed step: each sequence's queries against its own KV cache.

A layer with a sliding ``window`` (``fabric.engine.families``) lets a query at position ``p`` see
keys ``p - window < j <= p`` only. Its cache may then be a ring of ``window`` columns (key ``p``
in column ``p % window``): the runner's KV store allocates one when a sequence may outgrow the
window (``fabric.engine.kv``), so a long Mistral generation holds ``window`` keys per layer, not
its whole length. A cache at least as long as the sequence is read as it lies (columns are
positions), whether its layer slides or not; the two layouts give the same attention.

Invariants: ``attend`` writes the step's keys and values into the caches before it returns;
it reads no column a query may not see, and a ring's columns are overwritten only after the
step's queries have read what they held.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fabric.engine.steps import StepPlan

SeqCache = list[tuple[torch.Tensor, torch.Tensor]]
"""One sequence's KV cache on this rank: (keys, values) per local layer, each
``[kv_heads, columns, head_dim]`` (views into a slot cache, or tensors of its own; ``columns``
is the sequence's capacity, or its layer's window for a ring)."""


def attend(local: int, plan: StepPlan, caches: list[SeqCache], q: torch.Tensor,
           k: torch.Tensor, v: torch.Tensor, window: int | None) -> torch.Tensor:
    """Packed queries ``q`` ``[T, heads, d]`` against each sequence's cache for local layer
    ``local``, after writing the step's keys ``k`` and values ``v`` ``[T, kv_heads, d]``."""
    out = torch.empty_like(q)
    kv_heads, d = k.shape[1], q.shape[2]
    group = q.shape[1] // kv_heads
    scale = d**-0.5
    offset = 0
    for s, cache in zip(plan.seqs, caches, strict=True):
        rows = slice(offset, offset + s.n)
        kc, vc = cache[local]
        end = s.start + s.n
        lo = 0 if window is None else max(0, s.start + 1 - window)
        nk, nv = k[rows].transpose(0, 1), v[rows].transpose(0, 1)
        if end <= kc.shape[1]:  # columns are positions
            kc[:, s.start:end], vc[:, s.start:end] = nk, nv
            keys, vals = kc[:, lo:end], vc[:, lo:end]
        elif s.n == 1:  # a full ring: after this write, it holds exactly the window
            assert window is not None and kc.shape[1] == window
            kc[:, s.start % window], vc[:, s.start % window] = nk[:, 0], nv[:, 0]
            keys, vals = kc, vc  # in ring order: attention does not depend on key order
        else:
            assert window is not None and kc.shape[1] == window
            old = torch.arange(lo, s.start, device=kc.device) % window
            keys, vals = torch.cat([kc[:, old], nk], 1), torch.cat([vc[:, old], nv], 1)
            keep = torch.arange(max(s.start, end - window), end, device=kc.device)
            kc[:, keep % window] = nk[:, keep - s.start]
            vc[:, keep % window] = nv[:, keep - s.start]
        if s.n == 1:
            # Decode: the query heads sharing a KV head form one bmm against the cache as
            # it lies; SDPA's GQA path would copy the whole cache once per query head.
            scores = torch.bmm(q[offset].view(kv_heads, group, d), keys.transpose(1, 2))
            probs = (scores * scale).softmax(-1)
            out[offset] = torch.bmm(probs, vals).view(-1, d)
        else:
            mask = None
            if s.start > 0 or window is not None:
                # keys are positions lo..end-1: causal, and not before the window
                mask = torch.ones(s.n, end - lo, dtype=torch.bool, device=q.device).tril(
                    diagonal=s.start - lo)
                if window is not None:
                    mask &= ~mask.tril(diagonal=s.start - lo - window)
            o = F.scaled_dot_product_attention(
                q[rows].transpose(0, 1)[None], keys[None], vals[None], attn_mask=mask,
                is_causal=mask is None, scale=scale, enable_gqa=group > 1)
            out[rows] = o[0].transpose(0, 1)
        offset += s.n
    return out
