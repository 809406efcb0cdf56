"""How ``Fabric.embed`` splits texts into endpoint tasks and puts the answers back together.

Texts go longest first, as sentence-transformers sends them: each task's texts (and so each of
the server's length-sorted sub-batches) are of similar length, with little padding. A task
carries ``EMBED_CHUNK`` texts as one batched request; the vectors come back in that order and
are returned in the caller's.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from fabric.client.checks import check_int, check_ints, check_prompt
from fabric.client.decoding import embeddings_from_results
from fabric.errors import FabricError, InvalidRequest
from fabric.protocol import renumber_text_error

EMBED_CHUNK = 128
"""Texts per endpoint task (one batched request) in ``Fabric.embed``."""


@dataclass(frozen=True)
class EmbedPlan:
    """One ``embed`` call's texts, checked, and their order across tasks."""

    texts: list[str]
    single: bool
    """One string was given (the result is one vector, errors name ``text``)."""
    layers: list[int]
    many_layers: bool
    """A list of layers was given (the result is ``{layer: vectors}``)."""
    order: list[int]
    """Text indices, longest text first."""
    chunks: list[list[int]]
    """``order`` cut into tasks of ``EMBED_CHUNK``."""

    @classmethod
    def of(cls, texts: str | Sequence[str], layer: int | Sequence[int]) -> EmbedPlan:
        """Check ``texts`` and ``layer`` as ``Fabric.embed`` takes them; raise
        ``InvalidRequest`` naming what is wrong."""
        single = isinstance(texts, str)
        items = [texts] if single else texts
        many_layers = not isinstance(layer, int)
        layers = check_ints(layer, "layer") if many_layers else [check_int(layer, "layer")]
        if not isinstance(items, Sequence) or isinstance(items, bytes) or not items:
            raise InvalidRequest("texts must be a string or a non-empty list of strings")
        checked = [check_prompt(t, field=f"texts[{i}]" if not single else "text")
                   for i, t in enumerate(items)]
        order = sorted(range(len(checked)), key=lambda i: -len(checked[i]))
        chunks = [order[i:i + EMBED_CHUNK] for i in range(0, len(order), EMBED_CHUNK)]
        return cls(checked, single, layers, many_layers, order, chunks)

    def chunk_texts(self) -> list[list[str]]:
        """Each task's texts."""
        return [[self.texts[i] for i in chunk] for chunk in self.chunks]

    def renumber(self, exc: FabricError, chunk: list[int]) -> FabricError:
        """A task's error about its ``k``-th text, renamed to the caller's own index."""
        return renumber_text_error(exc, (lambda i: None) if self.single else chunk.__getitem__,
                                   "text" if self.single else "texts")

    def assemble(self, results: list[dict[str, Any]]) -> Any:
        """The tasks' results (in task order) as ``Fabric.embed`` returns them."""
        per_layer = {layer: _unsort(embeddings_from_results(
            [{"embeddings": r["layers"][str(layer)]} for r in results]), self.order)
            for layer in self.layers}
        if self.many_layers:
            return {k: (v[0] if self.single else v) for k, v in per_layer.items()}
        vectors = per_layer[self.layers[0]]
        return vectors[0] if self.single else vectors


def _unsort(rows: Any, order: list[int]) -> Any:
    """``rows`` (row ``k`` belongs to text ``order[k]``) back in the texts' own order."""
    out = rows.copy()
    out[order] = rows
    return out
