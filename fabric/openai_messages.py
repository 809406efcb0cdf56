"""OpenAI chat messages as the fabric serves them, for the gateway's live routes and the batch
lines of a campaign alike (one reading, so that a line that works live works in a batch).

OpenAI messages carry more than a role and text: ``developer`` (read as ``system``), content as
a list of text parts, an assistant turn that only called tools (``content: null``,
``tool_calls``), a tool's answer (``tool_call_id``). The fabric's requests take
``{"role", "content": str}`` with the protocol's roles; this turns one into the other, or
raises ``InvalidRequest`` naming the message and what is accepted.
"""

from __future__ import annotations

from typing import Any

from fabric.errors import InvalidRequest

__all__ = ["OPENAI_ROLES", "plain_messages"]

OPENAI_ROLES = ("system", "developer", "user", "assistant", "tool")
"""The roles accepted (``developer`` becomes ``system``)."""


def plain_messages(messages: Any) -> list[dict[str, str]]:
    """``{"role", "content"}`` for each message, the content as one string (text parts
    joined, ``null`` empty); other keys (``name``, ``tool_calls``, ``tool_call_id``) dropped."""
    if not isinstance(messages, list) or not messages:
        raise InvalidRequest("messages must be a non-empty list of messages", param="messages")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise InvalidRequest(f"messages[{i}] must be an object with role and content",
                                 param=f"messages[{i}]")
        role = m.get("role")
        if role not in OPENAI_ROLES:
            raise InvalidRequest(f"messages[{i}].role must be one of {list(OPENAI_ROLES)}, "
                                 f"got {role!r}", param=f"messages[{i}].role")
        out.append({"role": "system" if role == "developer" else str(role),
                    "content": _content(m.get("content"), i)})
    return out


def _content(value: Any, i: int) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, list):  # [{"type": "text", "text": ...}, ...]
        parts = [p.get("text") for p in value if isinstance(p, dict)]
        if all(isinstance(p, str) for p in parts) and all(
                isinstance(p, dict) and p.get("type") == "text" for p in value):
            return "".join(str(p) for p in parts)
        raise InvalidRequest(f"messages[{i}].content: only text parts are supported",
                             param=f"messages[{i}].content")
    if value is None:
        return ""
    raise InvalidRequest(f"messages[{i}].content must be a string or a list of text parts",
                         param=f"messages[{i}].content")
