"""KV storage of one rank: every live sequence's cache, and the static slot cache.

Two kinds of storage, one interface (``KVStore.caches``):

* with a slot cache (single-rank stages with the decode fast path on), every layer's KV is one
  tensor ``[slots, kv_heads, slot_tokens, head_dim]``; a sequence that fits gets the lowest free
  slot for its life and its cache is views into that slot, so the eager path (prefill, hooks,
  captures, scoring) and the fast path read and write the same memory and nothing is copied
  when a sequence moves between the two;
* any other sequence (no slot cache, none free, or it may grow past a slot) gets tensors of its
  own, sized by its ``capacity``; on a layer with a sliding window shorter than that, a ring of
  ``window`` columns (``fabric.engine.attention``), so its memory stops growing at the window.

Invariants: a sequence's cache is allocated the first time a step names it and lives until
``drop`` (the scheduler's ``StepPlan.free``); a slot has at most one owner; the slot cache's
last column is never any sequence's (padding rows of the fast path write there).
"""

from __future__ import annotations

import heapq

import torch

from fabric.engine.attention import SeqCache
from fabric.engine.model import KVLayout
from fabric.engine.steps import SeqWork


class SlotCache:
    """Per-layer K/V tensors ``[slots, kv_heads, slot_tokens, head_dim]`` and who owns which
    slot (lowest free first, so a step's slots stay packed near 0)."""

    def __init__(self, layout: KVLayout, slots: int, slot_tokens: int) -> None:
        shape = (slots, layout.kv_heads, slot_tokens, layout.head_dim)
        v_shape = (*shape[:-1], layout.value_dim or layout.head_dim)
        self.k = [torch.zeros(shape, dtype=layout.dtype, device=layout.device)
                  for _ in range(layout.layers)]
        self.v = [torch.zeros(v_shape, dtype=layout.dtype, device=layout.device)
                  for _ in range(layout.layers)]
        self.size = slots
        self.scratch = slot_tokens - 1
        """The last column: padding rows write there, so sequences use only the ones before."""
        self._free = list(range(slots))
        self.owner: dict[str, int] = {}

    def bind(self, seq: SeqWork) -> SeqCache | None:
        """Give ``seq`` a slot and return its per-layer cache views, or ``None`` (no slot
        free, or the sequence may grow past a slot): it then keeps its own cache."""
        if seq.capacity > self.scratch or not self._free:
            return None
        slot = heapq.heappop(self._free)
        self.owner[seq.seq_id] = slot
        return [(k[slot], v[slot]) for k, v in zip(self.k, self.v, strict=True)]

    def release(self, seq_id: str) -> None:
        """Return a finished sequence's slot."""
        slot = self.owner.pop(seq_id, None)
        if slot is not None:
            heapq.heappush(self._free, slot)


class KVStore:
    """Every live sequence's KV cache on this rank, keyed by sequence id."""

    def __init__(self, layout: KVLayout, slots: SlotCache | None = None) -> None:
        self.layout, self.slots = layout, slots
        self._caches: dict[str, SeqCache] = {}

    def __len__(self) -> int:
        """Live sequences (caches not yet dropped)."""
        return len(self._caches)

    def ids(self) -> set[str]:
        """Ids of the live sequences."""
        return set(self._caches)

    def caches(self, seqs: list[SeqWork]) -> list[SeqCache]:
        """The caches of a step's sequences, in order; a sequence seen for the first time gets
        a slot if one fits, else tensors of its own (``capacity`` positions)."""
        return [self._caches[s.seq_id] if s.seq_id in self._caches else self._allocate(s)
                for s in seqs]

    def slot_of(self, seq_id: str) -> int | None:
        """The slot ``seq_id`` lives in, if it has one."""
        return None if self.slots is None else self.slots.owner.get(seq_id)

    def drop(self, seq_id: str) -> None:
        """Forget a finished sequence's cache and give back its slot (unknown ids: nothing)."""
        self._caches.pop(seq_id, None)
        if self.slots is not None:
            self.slots.release(seq_id)

    def _allocate(self, seq: SeqWork) -> SeqCache:
        cache = self.slots.bind(seq) if self.slots is not None else None
        if cache is None:
            lay = self.layout
            windows = lay.windows or (None,) * lay.layers
            shapes = [(lay.kv_heads, seq.capacity if w is None else min(w, seq.capacity),
                       lay.head_dim) for w in windows]
            v_dim = lay.value_dim or lay.head_dim  # differs for latent attention
            cache = [(torch.empty(shape, dtype=lay.dtype, device=lay.device),
                      torch.empty((*shape[:-1], v_dim), dtype=lay.dtype, device=lay.device))
                     for shape in shapes]
        self._caches[seq.seq_id] = cache
        return cache
