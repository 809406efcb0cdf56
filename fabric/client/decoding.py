"""Turning the wire form of results into what a Python user expects.

Results travel as plain dicts (msgpack over ZMQ, or the Globus Compute serializer). Text results
become ``GenerationResult`` models; tensors travel as ``{"dtype", "shape", "data": bytes}`` and
become torch tensors here. torch is imported only when a tensor is actually decoded, so text-only
users of the SDK never pay for it.
"""

from __future__ import annotations

from typing import Any

from fabric.errors import FabricError
from fabric.protocol import GenerationResult
from fabric.provenance import Provenance

__all__ = [
    "GenerationResult",
    "decode_tensor",
    "decode_tensors",
    "embeddings_from_results",
    "is_encoded_tensor",
    "parse_generation",
    "provenance_of",
]

_TENSOR_KEYS = frozenset({"dtype", "shape", "data"})


def parse_generation(result: dict[str, Any] | GenerationResult) -> GenerationResult:
    """A ``GenerationResult`` from its wire dict (already-built results pass through)."""
    if isinstance(result, GenerationResult):
        return result
    if not isinstance(result, dict):
        raise FabricError(f"site returned {type(result).__name__}, expected a result dict")
    parsed = GenerationResult.model_validate(result)
    # Captured activations (capture hooks) arrive as encoded tensors: hand back torch tensors.
    parsed.captures = {k: decode_tensor(v) if is_encoded_tensor(v) else v
                       for k, v in parsed.captures.items()}
    return parsed


def provenance_of(result: dict[str, Any]) -> Provenance | None:
    """A result map's ``provenance`` as a ``Provenance`` (``None`` when it has none)."""
    record = result.get("provenance") if isinstance(result, dict) else None
    return Provenance.model_validate(record) if record else None


def is_encoded_tensor(value: Any) -> bool:
    """True for a ``{"dtype", "shape", "data": bytes}`` map."""
    return (
        isinstance(value, dict)
        and set(value) == _TENSOR_KEYS
        and isinstance(value["data"], bytes | bytearray | memoryview)
    )


def decode_tensor(value: dict[str, Any]) -> Any:
    """A torch tensor from its wire form (a copy: the message buffer may be reused)."""
    import torch

    dtype = getattr(torch, str(value["dtype"]).removeprefix("torch."), None)
    if not isinstance(dtype, torch.dtype):
        raise FabricError(f"unknown tensor dtype {value['dtype']!r} in result")
    shape = [int(n) for n in value["shape"]]
    data = bytes(value["data"])
    if not data:
        return torch.empty(shape, dtype=dtype)
    # frombuffer needs a writable buffer to avoid a warning; bytearray gives one we own.
    return torch.frombuffer(bytearray(data), dtype=dtype).reshape(shape)


def decode_tensors(value: Any) -> Any:
    """``value`` with every encoded tensor inside dicts/lists replaced by a torch tensor."""
    if is_encoded_tensor(value):
        return decode_tensor(value)
    if isinstance(value, dict):
        return {k: decode_tensors(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [decode_tensors(v) for v in value]
    return value


def embeddings_from_results(results: list[dict[str, Any]]) -> Any:
    """One float32 numpy array of shape ``(n, dim)`` from embed results, in order.

    Each result holds ``embedding`` (one vector: the request's text) or ``embeddings`` (a list
    of vectors); a vector is a list of floats or an encoded tensor.
    """
    import numpy as np

    rows: list[Any] = []
    for result in results:
        if not isinstance(result, dict):
            raise FabricError(f"embed result is a {type(result).__name__}, not a dict")
        vectors: Any
        if result.get("embedding") is not None:
            vectors = [result["embedding"]]
        elif result.get("embeddings") is not None:
            vectors = result["embeddings"]
        else:
            raise FabricError(f"embed result has no 'embedding': keys {sorted(result)}")
        if is_encoded_tensor(vectors):
            arr = decode_tensor(vectors).float().numpy()
            rows.extend(arr.reshape(-1, arr.shape[-1]))
            continue
        for vec in vectors:
            if is_encoded_tensor(vec):
                rows.append(decode_tensor(vec).float().numpy().reshape(-1))
            else:
                rows.append(np.asarray(vec, dtype=np.float32))
    if not rows:
        return np.zeros((0, 0), dtype=np.float32)
    return np.stack(rows).astype(np.float32, copy=False)
