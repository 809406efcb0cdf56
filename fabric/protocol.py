"""Wire contract between the SDK, the endpoint functions and the model server.

This module is a leaf: it imports neither the engine nor Globus, so every layer can share it.
Requests and results are pydantic models validated on construction; a validation failure is
turned into ``InvalidRequest`` naming the field and what is accepted. On the wire (ZMQ) every
message is one msgpack map; tensors travel as ``{"dtype", "shape", "data": bytes}``.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Any, Literal

import msgpack
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from fabric.errors import FabricError, InvalidRequest
from fabric.provenance import Provenance

RequestKind = Literal["generate", "embed", "hidden_states", "logprobs"]
Pooling = Literal["mean", "last", "first"]
FinishReason = Literal["length", "stop", "eos", "cancelled", "deadline", "error"]


MAX_BATCH_TEXTS = 4096
"""Most texts in one batched embed request (``prompts``)."""
QUEUE_FULL = "queue_full"
"""``Overloaded.details['reason']`` when the server's queue limits refused a request (the
others: "loading", "draining")."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=False)


class SamplingParams(_Strict):
    """How to pick each next token. Defaults are greedy decoding of up to 64 tokens."""

    max_tokens: int = Field(64, gt=0, description="Most tokens to generate (> 0).")
    temperature: float = Field(0.0, ge=0.0, le=100.0, description="0 means greedy.")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="Nucleus sampling mass in (0, 1].")
    top_k: int = Field(0, ge=0, description="Keep only the k most likely tokens; 0 keeps all.")
    seed: int | None = Field(None, description="Same seed, same prompt, same output.")
    stop: list[str] = Field(default_factory=list, description="Stop before any of these strings.")
    logprobs: bool = Field(False, description="Return the log-probability of each chosen token.")


class Hook(_Strict):
    """A declarative, per-request intervention on one decoder layer's output (residual stream).

    ``capture`` returns the layer's output; ``steer`` adds ``scale * vector`` to it;
    ``ablate_heads`` zeroes the named attention heads' contributions; ``ablate_neurons`` zeroes
    the named MLP neurons. Layers count from 0; negative layers count from the end.
    """

    kind: Literal["capture", "steer", "ablate_heads", "ablate_neurons"]
    layer: int
    vector: list[float] | None = None
    scale: float = 1.0
    heads: list[int] = Field(default_factory=list)
    neurons: list[int] = Field(default_factory=list)


class InferenceRequest(_Strict):
    """One unit of work for a model server."""

    request_id: str = Field(default_factory=lambda: uuid.uuid4().hex)
    model: str
    version: str | None = None
    kind: RequestKind = "generate"
    prompt: str | None = None
    prompts: list[str] | None = Field(
        None, description="A batch of texts (kind 'embed' only): one request, one result whose "
        "'embeddings' is an (n, dim) float32 array.")
    messages: list[dict[str, str]] | None = None
    continuation: str | None = Field(None, description="Text to score (logprobs kind).")
    sampling: SamplingParams = Field(default_factory=SamplingParams)
    layers: list[int] = Field(default_factory=lambda: [-1])
    pooling: Pooling = "mean"
    normalize: bool = True
    positions: list[int] | None = None
    hooks: list[Hook] = Field(default_factory=list)
    timeout: float | None = Field(None, gt=0, description="Seconds until the request expires.")

    @model_validator(mode="after")
    def _has_input(self) -> InferenceRequest:
        if self.prompts is not None:
            return self._check_batch()
        if self.messages is None and not isinstance(self.prompt, str):
            raise ValueError("prompt must be a string (or give messages for chat)")
        if self.messages is None and self.prompt is not None and not self.prompt.strip():
            raise ValueError("prompt is empty: give at least one non-blank character")
        if self.messages is not None and not self.messages:
            raise ValueError("messages is empty: give at least one {'role', 'content'} message")
        return self

    def _check_batch(self) -> InferenceRequest:
        assert self.prompts is not None
        if self.kind != "embed":
            raise ValueError(f"prompts (a batch of texts) is for kind 'embed' only, not "
                             f"{self.kind!r}; send one request per prompt")
        if self.prompt is not None or self.messages is not None:
            raise ValueError("give either prompts (a batch) or prompt/messages, not both")
        if not 0 < len(self.prompts) <= MAX_BATCH_TEXTS:
            raise ValueError(f"prompts has {len(self.prompts)} texts; a batch holds 1 to "
                             f"{MAX_BATCH_TEXTS}")
        for i, text in enumerate(self.prompts):
            if not text.strip():
                raise ValueError(f"prompts[{i}] is empty: give at least one non-blank character")
        return self

    @property
    def batch_size(self) -> int:
        """Texts in this request: ``len(prompts)`` for a batch, else 1."""
        return 1 if self.prompts is None else len(self.prompts)


class Usage(_Strict):
    """Token counts of one request."""

    prompt_tokens: int = 0
    completion_tokens: int = 0


class Timings(_Strict):
    """Seconds spent in each phase at the model server (queue, prefill, decode) and in total."""

    queue_s: float = 0.0
    prefill_s: float = 0.0
    decode_s: float = 0.0
    total_s: float = 0.0


class ModelIdentity(_Strict):
    """Exactly which weights produced a result."""

    name: str
    version: str
    sha256: str


class GenerationResult(_Strict):
    """The outcome of a ``generate``/``chat`` request."""

    request_id: str
    model: ModelIdentity
    text: str
    token_ids: list[int]
    finish_reason: FinishReason
    usage: Usage
    timings: Timings
    logprobs: list[float] | None = None
    captures: dict[str, Any] = Field(default_factory=dict)
    provenance: Provenance | None = None
    """Model, version, weights hash, plan, fabric version, seed and sampling (fabric.provenance)."""


def validate_request(data: dict[str, Any]) -> InferenceRequest:
    """Build an ``InferenceRequest`` or raise ``InvalidRequest`` naming each bad field."""
    try:
        return InferenceRequest.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or 'request'}: {err['msg']}"
            for err in exc.errors()
        )
        raise InvalidRequest(f"invalid request: {problems}", errors=problems) from None


def renumber_text_error(exc: FabricError, index_of: Callable[[int], int | None],
                        field: str = "texts") -> FabricError:
    """``exc`` about text ``i`` of a batch (``details['index']``) re-said about the caller's
    ``field[index_of(i)]`` (a client that reordered or split its texts; ``None``: the caller
    gave one text, named ``field``); other errors unchanged."""
    index, problem = exc.details.get("index"), exc.details.get("problem")
    if not isinstance(index, int) or not isinstance(problem, str):
        return exc
    new = index_of(index)
    where = field if new is None else f"{field}[{new}]"
    return type(exc)(f"{where}: {problem}", **{**exc.details, "index": new or 0})


def pack(message: dict[str, Any]) -> bytes:
    """Encode one wire message."""
    return msgpack.packb(message, use_bin_type=True)


def unpack(frame: bytes) -> dict[str, Any]:
    """Decode one wire message."""
    out = msgpack.unpackb(frame, raw=False, strict_map_key=False)
    if not isinstance(out, dict):
        raise InvalidRequest("wire message must be a map")
    return out
