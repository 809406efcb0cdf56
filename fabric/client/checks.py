"""Client-side checks of SDK arguments, so a typo fails at once with a clear typed error.

Each check names the argument and what is accepted (``max_tokens must be positive, got 0``)
before any round trip to a site; the protocol's own validation (``validate_request``) runs
after, and the server still validates what only it can know (context length, the catalog).
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from typing import Any

from fabric.errors import InvalidRequest
from fabric.protocol import ROLES, InferenceRequest, validate_request

__all__ = ["CHAT_ROLES", "build_request", "check_int", "check_ints", "check_messages",
           "check_name", "check_prompt", "sampling"]

CHAT_ROLES = ROLES
"""Roles a chat message may have (the protocol's)."""


def build_request(kind: str, *, model: str, sampling: dict[str, Any] | None = None,
                  **fields: Any) -> InferenceRequest:
    """A validated ``InferenceRequest``; ``None`` fields take the protocol's defaults."""
    data: dict[str, Any] = {"kind": kind, "model": check_name(model, "model")}
    if sampling is not None:
        data["sampling"] = sampling
    data.update({k: v for k, v in fields.items() if v is not None})
    if fields.get("version") is not None:
        check_name(fields["version"], "version")
    return validate_request(data)


def check_name(value: Any, field: str) -> str:
    """``value`` if it is a non-empty string."""
    if not isinstance(value, str) or not value.strip():
        raise InvalidRequest(f"{field} must be a non-empty string, got {value!r}", field=field)
    return value


def check_prompt(value: Any, field: str = "prompt") -> str:
    """``value`` if it is a string with at least one non-blank character."""
    if not isinstance(value, str):
        raise InvalidRequest(
            f"{field} must be a string, got {type(value).__name__}", field=field)
    if not value.strip():
        raise InvalidRequest(
            f"{field} is empty: give at least one non-blank character", field=field)
    return value


def check_int(value: Any, field: str, minimum: int | None = None) -> int:
    """``value`` as an int if it is an integer (not a bool) and at least ``minimum``."""
    # bool is an int subclass; max_tokens=True is a bug in the caller, not "1".
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise InvalidRequest(
            f"{field} must be an integer, got {type(value).__name__} {value!r}", field=field)
    if minimum is not None and value < minimum:
        word = "positive" if minimum == 1 else f">= {minimum}"
        raise InvalidRequest(f"{field} must be {word}, got {value}", field=field)
    return int(value)


def check_ints(values: Any, field: str) -> list[int]:
    """One integer or a non-empty list of them, as a list."""
    if isinstance(values, numbers.Integral) and not isinstance(values, bool):
        return [int(values)]
    if not isinstance(values, Sequence) or isinstance(values, str) or not values:
        raise InvalidRequest(f"{field} must be a non-empty list of integers", field=field)
    return [check_int(v, f"{field}[{i}]") for i, v in enumerate(values)]


def _check_number(value: Any, field: str, low: float, high: float,
                  low_open: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise InvalidRequest(
            f"{field} must be a number, got {type(value).__name__} {value!r}", field=field)
    number = float(value)
    bad_low = number <= low if low_open else number < low
    if bad_low or number > high:
        bracket = "(" if low_open else "["
        raise InvalidRequest(f"{field} must be in {bracket}{low}, {high}], got {value}",
                             field=field)
    return number


def sampling(max_tokens: Any, temperature: Any, top_p: Any, top_k: Any, seed: Any,
             stop: Any, logprobs: Any, top_logprobs: Any = 0) -> dict[str, Any]:
    """A checked ``SamplingParams`` dict (``stop`` may be one string; ``top_logprobs`` asks
    for ``logprobs`` too)."""
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, Sequence) or not all(isinstance(s, str) and s for s in stop):
        raise InvalidRequest("stop must be a string or a list of non-empty strings",
                             field="stop")
    if seed is not None:
        check_int(seed, "seed")
    if not isinstance(logprobs, bool):
        raise InvalidRequest(f"logprobs must be True or False, got {logprobs!r}",
                             field="logprobs")
    return {
        "max_tokens": check_int(max_tokens, "max_tokens", minimum=1),
        "temperature": _check_number(temperature, "temperature", 0.0, 100.0),
        "top_p": _check_number(top_p, "top_p", 0.0, 1.0, low_open=True),
        "top_k": check_int(top_k, "top_k", minimum=0),
        "seed": None if seed is None else int(seed),
        "stop": list(stop),
        "logprobs": logprobs or bool(top_logprobs),
        "top_logprobs": check_int(top_logprobs, "top_logprobs", minimum=0),
    }


def check_messages(messages: Any) -> list[dict[str, str]]:
    """Chat messages as plain ``{"role", "content"}`` dicts, each checked."""
    if isinstance(messages, str | bytes | dict) or not isinstance(messages, Sequence):
        raise InvalidRequest(
            "messages must be a list of {'role': ..., 'content': ...} dicts, got "
            f"{type(messages).__name__}", field="messages")
    if not messages:
        raise InvalidRequest(
            "messages is empty: give at least one {'role', 'content'} message", field="messages")
    out: list[dict[str, str]] = []
    for i, msg in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(msg, dict):
            raise InvalidRequest(
                f"{where} must be a dict with 'role' and 'content', got {type(msg).__name__}",
                field=where)
        extra = set(msg) - {"role", "content"}
        if extra:
            raise InvalidRequest(f"{where} has unknown keys {sorted(extra)}; "
                                 "a message has only 'role' and 'content'", field=where)
        role, content = msg.get("role"), msg.get("content")
        if role not in CHAT_ROLES:
            raise InvalidRequest(
                f"{where}.role must be one of {', '.join(CHAT_ROLES)}, got {role!r}",
                field=where)
        if not isinstance(content, str):
            raise InvalidRequest(
                f"{where}.content must be a string, got {type(content).__name__}", field=where)
        out.append({"role": str(role), "content": content})
    if not any(m["role"] == "user" and m["content"].strip() for m in out):
        raise InvalidRequest("messages has no non-empty 'user' message", field="messages")
    return out
