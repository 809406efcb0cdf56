"""A user function's capability and the model server's stream usage ledger, as units.

The end-to-end checks (a real site, a real model server, a user function's own process) are in
``tests/chaos/test_user_function_sandbox.py``.
"""

from __future__ import annotations

import base64
import json
import time

import pytest

from fabric import tickets
from fabric.endpoint.capability import CapabilityGuard
from fabric.engine.usage_ledger import UsageLedger
from fabric.errors import CapabilityDenied, Overloaded


def guard(**limits: float) -> CapabilityGuard:
    kw = {"max_requests": 3, "max_tokens": 100, "ttl_s": 60.0, **limits}
    return CapabilityGuard(identity="alice", model="tiny-llama", version=None,
                           max_requests=int(kw["max_requests"]),
                           max_tokens=int(kw["max_tokens"]), ttl_s=kw["ttl_s"])


def rule(exc: pytest.ExceptionInfo[CapabilityDenied]) -> str:
    return str(exc.value.details["rule"])


def test_requests_and_tokens_are_counted_to_their_limits() -> None:
    g = guard()
    token = g.token()
    for _ in range(3):
        g.admit(token, model="tiny-llama", version=None, requests=1, tokens=10)
    with pytest.raises(CapabilityDenied) as err:
        g.admit(token, model="tiny-llama", version=None, requests=1, tokens=1)
    assert rule(err) == "capability.requests" and err.value.details["used"] == 3
    g2 = guard(max_requests=100)
    t2 = g2.token()
    g2.admit(t2, model="tiny-llama", version=None, requests=1, tokens=90)
    g2.settle(90, 40)  # the request really used 40: 60 left
    g2.admit(t2, model="tiny-llama", version=None, requests=1, tokens=60)
    with pytest.raises(CapabilityDenied) as err:
        g2.admit(t2, model="tiny-llama", version=None, requests=1, tokens=1)
    assert rule(err) == "capability.tokens" and g2.tokens == 100


def test_another_model_or_version_is_refused() -> None:
    g = guard()
    token = g.token()
    for model, version in (("smollm2-135m", None), ("tiny-llama", "other"), (None, None)):
        with pytest.raises(CapabilityDenied) as err:
            g.admit(token, model=model, version=version, requests=1, tokens=1)
        assert rule(err) == "capability.model"
    assert g.requests == 0  # nothing charged for a refusal


def test_forged_tampered_and_expired_tokens_are_refused() -> None:
    g = guard(ttl_s=0.2)
    token = g.token()
    raw, sig = token.rsplit(".", 1)
    body = json.loads(base64.urlsafe_b64decode(raw))
    body["model"], body["mxr"] = "smollm2-135m", 10**9
    tampered = base64.urlsafe_b64encode(json.dumps(body).encode()).decode() + "." + sig
    other = guard().token()  # another run's genuine token
    for bad in (tampered, other, "", None, 42, "x" * 5000, "é.é"):
        with pytest.raises(CapabilityDenied) as err:
            g.admit(bad, model="tiny-llama", version=None, requests=1, tokens=1)
        assert rule(err) == "capability.invalid"
    time.sleep(0.3)
    with pytest.raises(CapabilityDenied) as err:
        g.admit(token, model="tiny-llama", version=None, requests=1, tokens=1)
    assert rule(err) == "capability.expired"


def test_ledger_counts_only_accounted_tickets_whatever_the_ending() -> None:
    key = b"k" * 32
    acc = tickets.authenticate(key, tickets.issue(key, model="m", subject="bob", account=True),
                               model="m")
    plain = tickets.authenticate(key, tickets.issue(key, model="m", subject="bob"), model="m")
    ledger = UsageLedger(capacity=3)
    ledger.start("done", acc, 5)
    ledger.start("quiet", plain, 5)  # the worker records these itself: not here
    ledger.start("cut", acc, 7)
    for rid in ("done", "quiet", "cut"):
        ledger.add(rid, 2)
    ledger.add("cut", 1)
    ledger.finish("done", {"op": "done", "result": {
        "usage": {"prompt_tokens": 5, "completion_tokens": 4}}})
    ledger.finish("quiet", {"op": "done", "result": {}})
    ledger.finish("cut", {"op": "error", "error": {"kind": "Cancelled"}})
    ledger.finish("cut")  # a second ending adds nothing
    got = {e["request_id"]: (e["subject"], e["tokens"]) for e in ledger.take()}
    assert got == {"done": ("bob", 9), "cut": ("bob", 10)}
    assert ledger.take() == []
    for i in range(3):
        ledger.start(f"r{i}", acc, 1)
    with pytest.raises(Overloaded):
        ledger.check_room(acc)
    ledger.check_room(plain)  # unaccounted requests are not held up
