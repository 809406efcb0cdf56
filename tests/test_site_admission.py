"""``fabric.endpoint.admission.admit_many``: one ``ensure`` per model per batch.

Each ``ensure`` of a warm server pings its health over a new connection (and may write its
last use): done per request, a batch of 32 admissions cost 32 pings. Here the deployment
manager is a counting stand-in, so the rule is seen exactly; the real manager and real
batches are exercised on the local site in ``tests/test_handoff.py``.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from fabric import serverclient
from fabric.client.checks import build_request, sampling
from fabric.endpoint import admission, relay
from fabric.endpoint.admission import admit_many
from fabric.endpoint.context import SiteContext
from fabric.endpoint.deployments import Deployment
from fabric.errors import DeploymentError, FabricError, InvalidRequest, UnknownModel
from fabric.sites import SiteConfig


class CountingManager:
    """Hands out one ready deployment per model; counts ``ensure`` calls. ``fail_first``:
    the first ``ensure`` of that model fails (a cold start that died)."""

    def __init__(self, fail_first: str | None = None) -> None:
        self.ensured: list[str] = []
        self.fail_first = fail_first

    def ensure(self, entry: Any) -> Deployment:
        self.ensured.append(entry.name)
        if entry.name == self.fail_first and self.ensured.count(entry.name) == 1:
            raise DeploymentError(f"the server of {entry.name} died while loading")
        return Deployment(id=f"d-{entry.name}", model=entry.name, version=entry.version,
                          state="ready", address="tcp://198.18.0.2:5555", public_key="k",
                          created=time.time(), last_used=time.time())

    def ticket_key(self) -> bytes:
        return b"k" * 32

    def collect_usage(self, dep: Deployment) -> int:
        return 0


def _context(tmp_path: Path, manager: CountingManager) -> SiteContext:
    ctx = SiteContext(SiteConfig.model_validate({"name": "local"}), tmp_path)
    ctx.__dict__["manager"] = manager  # the cached_property's slot
    return ctx


def _item(model: str, prompt: str = "The cell") -> dict[str, Any]:
    request = build_request("generate", model=model, version=None, prompt=prompt,
                            sampling=sampling(8, 0.0, 1.0, 0, None, (), False),
                            timeout=None, hooks=None)
    return {"request": request.model_dump(mode="json"), "mode": "direct"}


def test_a_batch_ensures_each_model_once(tmp_path: Path) -> None:
    manager = CountingManager()
    items = ([_item("smollm2-135m", f"prompt {i}") for i in range(5)] + [_item("no-such")]
             + [_item("minilm-l6", "a text"), _item("smollm2-135m", "last")])
    answers = admit_many(_context(tmp_path, manager), items, None)
    assert sorted(manager.ensured) == ["minilm-l6", "smollm2-135m"]
    assert isinstance(FabricError.from_dict(answers[5]["error"]), UnknownModel)
    infos = [a["info"] for i, a in enumerate(answers) if i != 5]
    assert [i["request_id"] for i in infos] == [it["request"]["request_id"]
                                                for k, it in enumerate(items) if k != 5]
    assert len({i["ticket"] for i in infos}) == len(infos)  # each request its own ticket
    assert [i["deployment_id"] for i in infos] == ["d-smollm2-135m"] * 5 + [
        "d-minilm-l6", "d-smollm2-135m"]


def test_a_failed_ensure_is_not_kept_for_the_rest_of_the_batch(tmp_path: Path) -> None:
    manager = CountingManager(fail_first="smollm2-135m")
    answers = admit_many(_context(tmp_path, manager),
                         [_item("smollm2-135m", f"p{i}") for i in range(3)], None)
    assert isinstance(FabricError.from_dict(answers[0]["error"]), DeploymentError)
    assert [a["info"]["deployment_id"] for a in answers[1:]] == ["d-smollm2-135m"] * 2
    assert manager.ensured == ["smollm2-135m"] * 2


def test_open_streams_refuses_more_than_max_batch(tmp_path: Path) -> None:
    manager = CountingManager()
    items = [_item("smollm2-135m", f"p{i}") for i in range(admission.MAX_BATCH + 1)]
    with pytest.raises(InvalidRequest, match="open_streams"):
        admit_many(_context(tmp_path, manager), items, None)
    assert manager.ensured == []  # refused before any admission
    answers = admit_many(_context(tmp_path, manager), items[:admission.MAX_BATCH], None)
    assert all("info" in a for a in answers) and len(answers) == admission.MAX_BATCH


class HoldingClient:
    """A stand-in ``ServerClient``: accepts the submit, records each poll's wait, and answers
    the request done."""

    waits: list[float] = []

    def __init__(self, address: str, public_key: str) -> None:
        pass

    def submit(self, *args: Any, **kwargs: Any) -> None:
        pass

    def poll(self, request_id: str, ticket: str, cursor: int, wait_s: float,
             final: bool = False) -> dict[str, Any]:
        HoldingClient.waits.append(wait_s)
        return {"cursor": 1, "done": True, "result": {"text": "x"}, "error": None}

    def close(self) -> None:
        pass


def test_open_stream_hold_is_clamped_to_max_hold(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(serverclient, "ServerClient", HoldingClient)
    monkeypatch.setattr(HoldingClient, "waits", [])
    item = _item("smollm2-135m")
    info = admission.admit_one(_context(tmp_path, CountingManager()), item["request"], None,
                               "poll", hold_s=3600.0, first_events=False)
    assert info["done"] is True
    assert len(HoldingClient.waits) == 1
    assert 0 < HoldingClient.waits[0] <= admission.MAX_HOLD_S


def test_poll_many_refuses_more_than_max_polls(tmp_path: Path) -> None:
    polls = [{"model": "m", "request_id": f"r{i}", "ticket": "t", "cursor": 0}
             for i in range(relay.MAX_POLLS + 1)]
    with pytest.raises(InvalidRequest, match="at most"):
        relay.poll_many(_context(tmp_path, CountingManager()), "me", polls, 0.0)


def test_poll_many_clamps_its_wait_to_max_wait(tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    deadlines: list[float] = []

    def start(ctx: Any, identity: str, key: bytes, poll: dict[str, Any], clients: Any,
              replies: dict[str, Any], deadline: float) -> None:
        deadlines.append(deadline)
        replies[poll["request_id"]] = {"events": [], "cursor": 0, "done": True}

    monkeypatch.setattr(relay, "_start", start)
    polls = [{"model": "m", "request_id": "r1", "ticket": "t", "cursor": 0}]
    out = relay.poll_many(_context(tmp_path, CountingManager()), "me", polls, 3600.0)
    assert list(out["replies"]) == ["r1"]
    assert len(deadlines) == 1 and deadlines[0] <= time.monotonic() + relay.MAX_WAIT_S
