"""Chat messages at the model server's door: the roles an agent's loop sends (``tool``), and a
model whose chat template refuses a conversation answering a typed error (in process, the tiny
Llama's tokenizer and a copy of it with a stricter template)."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest

from fabric.engine.prepare import ModelLimits, Preparer
from fabric.errors import InvalidRequest
from fabric.protocol import validate_request
from tests.plugins.servers import hf_tokenizer

AGENT_TURNS = [
    {"role": "system", "content": "You can look things up."},
    {"role": "user", "content": "How heavy is a mitochondrion?"},
    {"role": "assistant", "content": ""},
    {"role": "tool", "content": "about 1e-12 g"},
]
STRICT = ("{% for m in messages %}{% if m['role'] not in ['user', 'assistant'] %}"
          "{{ raise_exception('Conversation roles must be user or assistant') }}{% endif %}"
          "{{ m['content'] }}{% endfor %}")


def _preparer(tok: object) -> Preparer:
    return Preparer(tok, ModelLimits(2, 64, 4, 128, 512, 4096))


def test_a_tool_turn_is_rendered_by_the_models_template(tiny_llama_dir: Path) -> None:
    tok = hf_tokenizer(tiny_llama_dir)
    seq = _preparer(tok).prepare(validate_request(
        {"model": "m", "kind": "generate", "messages": AGENT_TURNS}))
    rendered = tok.apply_chat_template(AGENT_TURNS, add_generation_prompt=True, tokenize=True)
    ids = list(rendered["input_ids"] if hasattr(rendered, "keys") else rendered)
    assert seq.prompt_ids == ids
    assert "<|im_start|>tool" in tok.decode(seq.prompt_ids)


def test_a_template_that_refuses_the_messages_is_a_typed_error(tiny_llama_dir: Path) -> None:
    strict = copy.deepcopy(hf_tokenizer(tiny_llama_dir))
    strict.chat_template = STRICT
    prep = _preparer(strict)
    with pytest.raises(InvalidRequest, match=r"chat template refused.*user or assistant") as err:
        prep.prepare(validate_request({"model": "m", "kind": "generate",
                                       "messages": AGENT_TURNS}))
    assert err.value.details["param"] == "messages"
    ok = prep.prepare(validate_request({"model": "m", "kind": "generate",
                                        "messages": AGENT_TURNS[1:2]}))
    assert ok.prompt_ids  # the same preparer serves the next request


def test_roles_outside_the_protocol_are_refused_naming_the_accepted() -> None:
    with pytest.raises(InvalidRequest, match="'robot' is not accepted: use 'system', 'user', "
                                         "'assistant', 'tool'"):
        validate_request({"model": "m", "kind": "generate",
                          "messages": [{"role": "robot", "content": "x"}]})
