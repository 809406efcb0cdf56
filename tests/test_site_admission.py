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

from fabric.client.checks import build_request, sampling
from fabric.endpoint.admission import admit_many
from fabric.endpoint.context import SiteContext
from fabric.endpoint.deployments import Deployment
from fabric.errors import DeploymentError, FabricError, UnknownModel
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
