"""Wire contract between the SDK, the endpoint functions and the model server.

This module is a leaf: it imports neither the engine nor Globus, so every layer can share it.
Requests and results are pydantic models validated on construction; a validation failure is
turned into ``InvalidRequest`` naming the field and what is accepted. On the wire (ZMQ) every
message is one msgpack map; tensors travel as ``{"dtype", "shape", "data": bytes}``.
"""

from __future__ import annotations

import hashlib
import json
import math
import operator
import uuid
from collections.abc import Callable
from typing import Annotated, Any, Literal

import msgpack
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from fabric.errors import FabricError, InvalidHook, InvalidRequest
from fabric.provenance import Provenance

RequestKind = Literal["generate", "embed", "hidden_states", "logprobs"]
Pooling = Literal["mean", "last", "first"]
FinishReason = Literal["length", "stop", "eos", "cancelled", "deadline", "error"]


MAX_BATCH_TEXTS = 4096
"""Most texts in one batched embed request (``prompts``)."""
QUEUE_FULL = "queue_full"
"""``Overloaded.details['reason']`` when the server's queue limits refused a request (the
others: "loading", "draining")."""


MIN_TEMPERATURE = 1e-3
"""Smallest non-zero temperature: below it logits / temperature overflow float32 (NaN)."""
MAX_STEER = 1e6
"""Largest ``|scale| * max|vector|`` of a steer hook: far beyond any useful steering, and
finite through every layer in float32 and bfloat16."""
ROLES = ("system", "user", "assistant", "tool")
"""Chat message roles (``tool``: a tool's answer in an agent's loop); a model whose chat template
refuses one (some allow only alternating user and assistant turns) answers ``InvalidRequest``."""
MAX_TOP_LOGPROBS = 20
"""Most alternatives per position ``top_logprobs`` may ask for (OpenAI's bound)."""
MAX_LIST = 1 << 20
"""Most items in any list field (positions, heads, neurons, steer vector, messages)."""


def _utf8(text: str) -> str:
    """Refuse text that cannot travel as UTF-8 (a lone surrogate, e.g. from a bad decode)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(f"text holds a lone surrogate {text[exc.start]!r} (U+"
                         f"{ord(text[exc.start]):04X}) at index {exc.start}: not valid Unicode; "
                         "send well-formed (UTF-8 encodable) text") from None
    return text


Text = Annotated[str, AfterValidator(_utf8)]
"""A string that is valid Unicode (encodable as UTF-8, so it can be sent and tokenised)."""
Int64 = Annotated[int, Field(ge=-(2**63), le=2**63 - 1)]


def _index(value: Any) -> int:
    """An integer, or numpy's; not a string, a float or a bool read as one."""
    from pydantic_core import PydanticCustomError

    not_int = PydanticCustomError("int_type", "Input should be a valid integer")
    if isinstance(value, bool | str | bytes | float):
        raise not_int
    try:
        return operator.index(value)
    except TypeError:
        raise not_int from None


Index64 = Annotated[int, BeforeValidator(_index), Field(ge=-(2**63), le=2**63 - 1)]
"""``Int64`` that takes no string, float or bool for an integer (hook layers, heads, neurons)."""
"""An integer that fits the wire (msgpack) and torch: a signed 64-bit value."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=False)


class _Input(_Strict):
    """A request part: NaN and infinity are refused in every float."""

    model_config = ConfigDict(extra="forbid", frozen=False, allow_inf_nan=False)


class SamplingParams(_Input):
    """How to pick each next token. Defaults are greedy decoding of up to 64 tokens."""

    max_tokens: int = Field(64, gt=0, le=2**31 - 1, description="Most tokens to generate (> 0).")
    temperature: float = Field(0.0, ge=0.0, le=100.0, description=f"0 means greedy; else "
                               f"{MIN_TEMPERATURE} to 100.")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="Nucleus sampling mass in (0, 1].")
    top_k: int = Field(0, ge=0, le=2**31 - 1, description="Keep only the k most likely tokens; "
                       "0 keeps all.")
    seed: Int64 | None = Field(None, description="Same seed, same prompt, same output (a "
                               "signed 64-bit integer).")
    stop: list[Text] = Field(default_factory=list, max_length=64,
                             description="Stop before any of these strings (at most 64).")
    logprobs: bool = Field(False, description="Return the log-probability of each chosen token.")
    top_logprobs: int = Field(0, ge=0, le=MAX_TOP_LOGPROBS, description="With logprobs, also "
                              f"the k most likely tokens at each position (0 to "
                              f"{MAX_TOP_LOGPROBS}).")

    @model_validator(mode="after")
    def _top_needs_logprobs(self) -> SamplingParams:
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs=True")
        return self

    @field_validator("temperature")
    @classmethod
    def _not_tiny(cls, value: float) -> float:
        if 0.0 < value < MIN_TEMPERATURE:
            raise ValueError(f"temperature {value!r} is too small to sample with: use 0 for "
                             f"greedy decoding, or {MIN_TEMPERATURE} to 100")
        return value


class Hook(_Strict):
    """A declarative, per-request intervention on one decoder layer's output (residual stream).

    ``capture`` returns the layer's output; ``steer`` adds ``scale * vector`` to it;
    ``ablate_heads`` zeroes the named attention heads' contributions; ``ablate_neurons`` zeroes
    the named MLP neurons. Layers count from 0; negative layers count from the end. Layers,
    heads and neurons are integers (numpy's too): ``"layer": "1"`` or ``true`` is refused,
    not read as 1 (as the CLI refuses it).
    """

    kind: Literal["capture", "steer", "ablate_heads", "ablate_neurons"]
    layer: Index64
    vector: list[float] | None = Field(None, max_length=MAX_LIST)
    scale: float = 1.0
    heads: list[Index64] = Field(default_factory=list, max_length=MAX_LIST)
    neurons: list[Index64] = Field(default_factory=list, max_length=MAX_LIST)

    @model_validator(mode="after")
    def _bounded_steer(self) -> Hook:
        if self.kind == "steer" and self.vector:
            size = abs(self.scale) * max(abs(v) for v in self.vector)
            finite = math.isfinite(self.scale) and all(math.isfinite(v) for v in self.vector)
            # NaN and infinity are refused by the server's Preparer as InvalidHook ("finite")
            if finite and not size <= MAX_STEER:
                raise ValueError(f"steer hook adds up to {size:.3g} to the residual stream "
                                 f"(|scale| * max|vector|); at most {MAX_STEER:g} is accepted")
        return self


class InferenceRequest(_Input):
    """One unit of work for a model server."""

    request_id: Text = Field(default_factory=lambda: uuid.uuid4().hex, min_length=1,
                             max_length=256)
    model: Text = Field(max_length=256)
    version: Text | None = Field(None, max_length=256)
    kind: RequestKind = "generate"
    prompt: Text | None = None
    prompts: list[Text] | None = Field(
        None, description="A batch of texts (kind 'embed' only): one request, one result whose "
        "'embeddings' is an (n, dim) float32 array.")
    messages: list[dict[str, Text]] | None = Field(
        None, max_length=MAX_LIST, description="Chat messages, each {'role': one of "
        f"{', '.join(ROLES)}, 'content': str}}.")
    continuation: Text | None = Field(None, description="Text to score (logprobs kind).")
    sampling: SamplingParams = Field(default_factory=SamplingParams)
    layers: list[Int64] = Field(default_factory=lambda: [-1], max_length=1024)
    pooling: Pooling = "mean"
    normalize: bool = True
    positions: list[Int64] | None = Field(None, max_length=MAX_LIST)
    hooks: list[Hook] = Field(default_factory=list, max_length=1024)
    timeout: float | None = Field(None, gt=0, description="Seconds until the request expires.")

    @field_validator("messages")
    @classmethod
    def _chat_messages(cls, value: list[dict[str, str]] | None) -> list[dict[str, str]] | None:
        for i, message in enumerate(value or []):
            accepted = f"each message is {{'role': one of {', '.join(map(repr, ROLES))}, " \
                       "'content': str}"
            extra = set(message) - {"role", "content"}
            if extra:
                raise ValueError(f"messages[{i}] has unknown keys {sorted(extra)}: {accepted}")
            if "role" not in message or "content" not in message:
                missing = "role" if "role" not in message else "content"
                raise ValueError(f"messages[{i}] has no {missing!r}: {accepted}")
            if message["role"] not in ROLES:
                raise ValueError(f"messages[{i}] role {message['role']!r} is not accepted: "
                                 f"use {', '.join(map(repr, ROLES))}")
        return value

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
    top_logprobs: list[list[tuple[int, float]]] | None = None
    """With ``top_logprobs=k``: each position's k most likely ``(token id, log-probability)``,
    most likely first."""
    captures: dict[str, Any] = Field(default_factory=dict)
    provenance: Provenance | None = None
    """Model, version, weights hash, plan, fabric version, seed and sampling (fabric.provenance)."""
    site: str | None = None
    """The site that served it (set by the SDK: a federation's routing chose it)."""


def validate_request(data: Any) -> InferenceRequest:
    """Build an ``InferenceRequest`` or raise ``InvalidRequest`` naming each bad field
    (``InvalidHook`` when every problem is in ``hooks``)."""
    if not isinstance(data, dict):
        raise InvalidRequest(f"request must be a map of InferenceRequest fields, not "
                             f"{type(data).__name__}")
    try:
        return InferenceRequest.model_validate(data)
    except ValidationError as exc:
        errors = exc.errors()
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or 'request'}: {err['msg']}"
            for err in errors
        )
        hooks = all(err["loc"][:1] == ("hooks",) for err in errors)
        cls = InvalidHook if hooks else InvalidRequest
        raise cls(f"invalid request: {_printable(problems)}",
                  errors=_printable(problems)) from None


class SubmitMessage(_Input):
    """``submit``: queue ``request`` (validated after the ticket is checked)."""

    op: Literal["submit"]
    ticket: str
    request: dict[str, Any]
    stream: bool = False
    detach: bool = False


class PollMessage(_Input):
    """``poll``: buffered events of a request after ``cursor``, waiting up to ``wait`` s."""

    op: Literal["poll"]
    ticket: str
    request_id: Text = Field(max_length=300)
    cursor: int = Field(0, ge=0, le=2**31 - 1)
    wait: float = Field(0.0, ge=0.0, le=3600.0)
    final: bool = False
    """Wait only for the request's end (its result or error), not for each new event: a
    plain request handed off to a long-poll wants its result, not its tokens."""


class CancelMessage(_Input):
    """``cancel``: stop a request."""

    op: Literal["cancel"]
    ticket: str
    request_id: Text = Field(max_length=300)


class HealthMessage(_Input):
    """``health``: state and load figures (no ticket)."""

    op: Literal["health"]


class DrainMessage(_Input):
    """``drain`` (operator ticket): finish running requests, refuse new ones, exit."""

    op: Literal["drain"]
    ticket: str


class StatsMessage(_Input):
    """``stats`` (operator ticket): latency histograms, token counters and load since the
    server started (what the site's ``/metrics`` shows; its figures are the site's business,
    so unlike ``health`` it needs the site's ticket)."""

    op: Literal["stats"]
    ticket: str


class UsageMessage(_Input):
    """``usage`` (operator ticket): the tokens delivered on accounted tickets (streams) since
    the last ``usage``, for the site to record; the server forgets what it answers."""

    op: Literal["usage"]
    ticket: str


WireMessage = (SubmitMessage | PollMessage | CancelMessage | HealthMessage | DrainMessage
               | StatsMessage | UsageMessage)
MESSAGES: dict[str, type[WireMessage]] = {
    "submit": SubmitMessage, "poll": PollMessage, "cancel": CancelMessage,
    "health": HealthMessage, "drain": DrainMessage, "stats": StatsMessage,
    "usage": UsageMessage}
"""Every op the model server accepts, and the schema of its message."""


def parse_message(msg: dict[str, Any]) -> WireMessage:
    """The typed form of one wire message, or ``InvalidRequest`` naming what is wrong and
    what is accepted (an unknown op, a missing or extra field, a wrong type)."""
    schema = MESSAGES.get(msg["op"]) if isinstance(msg.get("op"), str) else None
    if schema is None:
        raise InvalidRequest(f"unknown op {_printable(repr(msg.get('op')))}; accepted: "
                             f"{', '.join(MESSAGES)}", accepted=list(MESSAGES))
    try:
        return schema.model_validate(msg)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}"
                             for err in exc.errors())
        fields = ", ".join(schema.model_fields)
        raise InvalidRequest(_printable(f"invalid {msg['op']} message: {problems} (fields: "
                                        f"{fields})"), errors=_printable(problems)) from None


def _printable(text: str) -> str:
    """``text`` with anything that cannot travel as UTF-8 escaped (error messages quote the
    caller's input, which may hold a lone surrogate)."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def request_digest(request: InferenceRequest) -> str:
    """A SHA-256 over everything a request asks for (its canonical JSON): a ticket that
    carries it authorises exactly this request (``tickets.issue(digest=...)``)."""
    body = json.dumps(request.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(body.encode()).hexdigest()


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
    """Decode one wire message (``InvalidRequest`` if it is not one msgpack map)."""
    try:
        out = msgpack.unpackb(frame, raw=False, strict_map_key=False)
    except Exception as exc:  # msgpack raises many types (ValueError, ExtraData, TypeError...)
        raise InvalidRequest(f"undecodable message ({type(exc).__name__}): send one msgpack "
                             "map with UTF-8 strings") from None
    if not isinstance(out, dict):
        raise InvalidRequest("wire message must be a map")
    return out
