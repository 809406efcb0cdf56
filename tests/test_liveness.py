"""A call waiting on a remote site watches its endpoint's heartbeat (``fabric.client.liveness``).

The site is a scripted transport whose admissions never come back (a dead endpoint: Globus
Compute accepts the task and nothing runs it) and whose ``endpoint_status`` answers from a
script. The real daemon's case (killed, its heartbeats stop, the fake service reports it
offline) is ``test_globus_real.py::test_a_call_to_a_site_whose_endpoint_died_...``.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

import pytest

from fabric.client.handoff import RequestPath
from fabric.client.liveness import OFFLINE_CHECKS, EndpointLiveness
from fabric.errors import EndpointError


class SilentSite:
    """Accepts every task and answers none; ``endpoint_status`` plays ``script`` (then its
    last answer for ever)."""

    can_reach_servers = False
    site = "silent"
    offline_check_s = 0.05

    def __init__(self, script: list[str | None]) -> None:
        self.script = list(script)
        self.asked = 0
        self.futures: list[Future[Any]] = []

    def submit(self, fn: Callable[..., Any], *args: Any) -> Future[Any]:
        fut: Future[Any] = Future()
        self.futures.append(fut)
        return fut

    def endpoint_status(self) -> str | None:
        self.asked += 1
        return self.script.pop(0) if len(self.script) > 1 else self.script[0]

    def close(self) -> None:
        pass


def path_to(site: SilentSite, on_status: Any = None) -> RequestPath:
    return RequestPath(lambda: site, None, on_status, 60.0, True)


def test_an_endpoint_reported_offline_twice_in_a_row_ends_the_wait() -> None:
    checks: list[str | None] = ["offline", "online", None, "offline", "degraded", "offline",
                                "offline"]
    answers = iter(checks)
    live = EndpointLiveness(lambda: next(answers), 0.0, "s")
    for _ in range(6):
        live.next_at = 0.0
        live.check_due()  # one offline at a time is not enough
    live.next_at = 0.0
    with pytest.raises(EndpointError, match="reports its endpoint offline") as err:
        live.check_due()
    assert err.value.retryable and err.value.details["site"] == "s"
    assert OFFLINE_CHECKS == 2


def test_no_check_is_made_before_it_is_due() -> None:
    asked: list[int] = []
    live = EndpointLiveness(lambda: asked.append(1) or "offline", 30.0, "s")
    live.check_due()
    live.check_due()
    assert asked == []


@pytest.mark.parametrize("on_status", [None, lambda status: None])
def test_a_call_at_a_dead_endpoint_fails_typed(on_status: Any) -> None:
    """With or without ``on_status``: the admission never comes back, the service says the
    endpoint is offline, the call ends."""
    site = SilentSite(["online", "offline", "offline"])
    t0 = time.monotonic()
    with pytest.raises(EndpointError, match="offline"):
        path_to(site, on_status).wait(Future(), "m", None)
    assert site.asked == 3 and time.monotonic() - t0 < 5


def test_a_live_endpoint_does_not_end_a_long_wait() -> None:
    """A cold start at a live site: the admission takes long, the endpoint beats, the call
    gets its answer."""
    site = SilentSite(["online"])
    future: Future[Any] = Future()
    threading.Timer(0.6, future.set_result, ({"ok": 1},)).start()
    assert path_to(site).wait(future, "m", None) == {"ok": 1}
    assert site.asked >= 5  # it was watched all along


def test_a_wait_that_ends_at_once_asks_nothing() -> None:
    site = SilentSite(["offline"])
    done: Future[Any] = Future()
    done.set_result({"ok": 1})
    assert path_to(site).wait(done, "m", None) == {"ok": 1}
    assert site.asked == 0


class StatusSite:
    """The embedded site's ``control("status")`` with these deployments (no tasks)."""

    can_reach_servers = False
    site = "status"

    def __init__(self, deployments: list[dict[str, Any]]) -> None:
        self.deployments = deployments

    def control(self, op: str, **kwargs: Any) -> dict[str, Any]:
        assert op == "status"
        return {"deployments": self.deployments, "models": ["m"]}


def test_the_status_of_a_waiting_call_names_its_version_or_weights_hash() -> None:
    """A call pinned by version name or weights hash (``sha256:<hex>`` or bare hex of at least
    ``HASH_PREFIX_MIN`` digits, any case, as ``provenance.rerun()`` pins) is told about the
    server of those weights only; a prefix too short or not hex names none."""
    from fabric.catalog import HASH_PREFIX_MIN
    from fabric.client.handoff import names_version

    sha = "ab12" * 16
    v1 = {"model": "m", "version": "v1", "sha256": sha, "state": "ready"}
    v2 = {"model": "m", "version": "v2", "sha256": "cd34" * 16, "state": "loading"}
    for pin in (None, "v1", f"sha256:{sha[:HASH_PREFIX_MIN]}", sha[:16], sha.upper(),
                f"sha256:{sha}"):
        assert names_version(v1, pin), pin
    for pin in ("v2", "v", sha[:HASH_PREFIX_MIN - 1], f"sha256:{sha[:HASH_PREFIX_MIN - 1]}",
                "sha256:" + "0" * HASH_PREFIX_MIN, sha[:15] + "g", "sha256:"):
        assert not names_version(v1, pin), pin
    assert not names_version({"model": "m", "version": "v3"}, "0" * HASH_PREFIX_MIN)
    path = RequestPath(lambda: StatusSite([v1, v2]), None, None, 60.0, True)  # type: ignore[arg-type]
    assert path.query_status("m", sha[:16]).result(5)["version"] == "v1"
    assert path.query_status("m", "v2").result(5)["state"] == "loading"
    assert path.query_status("m", "sha256:" + "0" * 12).result(5) == {"state": "absent",
                                                                     "model": "m"}
