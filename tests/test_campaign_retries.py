"""Campaign retries without a site: ``resume --retry-failed``, the attempt refunds (runner
crash, cancel/stop, unreachable site), smaller shards for retried inputs, and a failing site's
backoff. Uses ``test_campaign_unit``'s fake transport (shards answered in a thread pool)."""

from __future__ import annotations

import concurrent.futures as cf
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from fabric.campaign import dispatch, store
from fabric.campaign.dispatch import CampaignRunner
from fabric.campaign.ledger import Ledger
from fabric.client.sitestate import SiteState
from fabric.errors import EndpointError
from tests.test_campaign_unit import FakeTransport, check_invariant, manifest, run


def _ledger_rows(folder: Path, sql: str, *args: Any) -> list[tuple[Any, ...]]:
    ledger = Ledger(folder / store.LEDGER)
    try:
        return list(ledger.conn.execute(sql, args).fetchall())
    finally:
        ledger.close()


def _until(cond: Any, what: str, timeout: float = 20.0) -> None:
    """Wait for ``cond()`` (a generous bound: it only guards against a hang)."""
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"never happened: {what}"
        time.sleep(0.01)


class Blocking(FakeTransport):
    """Takes shards and never answers them (they stay in flight until given back)."""

    def __init__(self, site: str = "fake") -> None:
        super().__init__(site)
        self.submitted = 0

    def submit(self, fn: Any, shard: dict[str, Any], auth: Any = None) -> cf.Future[Any]:
        self.submitted += 1
        return cf.Future()


class Counting(FakeTransport):
    """Counts the shards submitted to it."""

    def __init__(self, **kw: Any) -> None:
        super().__init__(**kw)
        self.submitted = 0

    def submit(self, fn: Any, shard: dict[str, Any], auth: Any = None) -> cf.Future[Any]:
        self.submitted += 1
        return super().submit(fn, shard, auth)


class Unreachable(FakeTransport):
    """A site whose every submit fails at once (nothing runs)."""

    def __init__(self, site: str) -> None:
        super().__init__(site)
        self.submitted = 0

    def submit(self, fn: Any, shard: dict[str, Any], auth: Any = None) -> cf.Future[Any]:
        self.submitted += 1
        raise EndpointError(f"site {self.site} is unreachable")


# -- resume --retry-failed --------------------------------------------------------------------

def test_resume_retry_failed_requeues_failures_but_not_bad_lines(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """``fabric campaign resume --retry-failed``: an input that failed (its attempts spent)
    runs again and its old error line goes; a recorded bad line (no request to run) stays
    failed with its error line, and the runner does not trip over it."""
    from fabric.cli.main import main

    home = tmp_path / "home"
    folder = store.create(manifest(tmp_path, n=10, max_attempts=2, on_bad_line="record",
                                   extra_lines=["[1, 2]"]), home)
    fake = FakeTransport(poison={"r3"})
    assert run(folder, fake) == "done"
    _, err = check_invariant(folder, 11)
    assert sorted(e["custom_id"] for e in err) == ["@line:11", "r3"]
    assert fake.executions["r3"] == 2

    fake.poison = set()  # whatever made r3 fail is fixed
    monkeypatch.setattr(CampaignRunner, "_transport", lambda self, spec: fake)
    assert main(["campaign", "resume", "c1", "--home", str(home), "--here", "--retry-failed",
                 "--json"]) == 0
    capsys.readouterr()
    status = store.status(folder)
    assert status["status"] == "done" and status["done"] == 10 and status["failed"] == 1
    out, err = check_invariant(folder, 11)
    assert [(e["custom_id"], e["line"]) for e in err] == [("@line:11", 11)]
    r3 = [r for r in out if r["custom_id"] == "r3"]
    assert len(r3) == 1 and r3[0]["attempt"] == 1  # fresh attempts, not the spent ones
    assert fake.executions["r3"] == 3
    assert all(fake.executions[f"r{i}"] == 1 for i in range(10) if i != 3)
    assert _ledger_rows(folder, "SELECT state, request FROM items WHERE custom_id='@line:11'") \
        == [("failed", None)]


def test_mark_resumable_without_retry_failed_leaves_failures_alone(tmp_path: Path) -> None:
    folder = store.create(manifest(tmp_path, n=6, max_attempts=1), tmp_path / "home")
    fake = FakeTransport(poison={"r2"})
    assert run(folder, fake) == "done"
    fake.poison = set()
    store.mark_resumable(folder)
    assert run(folder, fake) == "done"
    _, err = check_invariant(folder, 6)
    assert [e["custom_id"] for e in err] == ["r2"] and fake.executions["r2"] == 1
    store.mark_resumable(folder, retry_failed=True)
    assert run(folder, fake) == "done"
    out, err = check_invariant(folder, 6)
    assert err == [] and len(out) == 6 and fake.executions["r2"] == 2


# -- attempts refunded when it was not the input's fault --------------------------------------

def test_a_runner_crash_costs_no_attempt(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                         ) -> None:
    """Inputs left running by a dead runner are requeued with their attempt refunded: each
    input's result line says attempt 1 however often the runner died under it."""
    folder = store.create(manifest(tmp_path, n=40, max_attempts=1), tmp_path / "home")
    real = Ledger.settle
    calls = Counter[str]()

    def crashing(self: Ledger, *a: Any, **kw: Any) -> None:
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt("the runner dies with shards in flight")
        real(self, *a, **kw)

    monkeypatch.setattr(Ledger, "settle", crashing)
    fake = FakeTransport()
    with pytest.raises(KeyboardInterrupt):
        run(folder, fake)
    monkeypatch.setattr(Ledger, "settle", real)
    running = _ledger_rows(folder, "SELECT attempts FROM items WHERE state='running'")
    assert running and all(a == 1 for (a,) in running)  # the crash left claimed inputs
    assert run(folder, fake) == "done"
    out, err = check_invariant(folder, 40)
    assert err == [] and len(out) == 40
    assert Counter(r["attempt"] for r in out) == {1: 40}
    assert any(n > 1 for n in fake.executions.values())  # some inputs did run twice


def _run_in_background(folder: Path, transport: Any
                       ) -> tuple[threading.Event, threading.Thread, list[str]]:
    """A runner on ``folder`` in a thread: its stop event, the thread, and (once it returns)
    its result."""
    stop = threading.Event()
    runner = CampaignRunner(folder, transports={"local": transport}, poll_s=0.02, stop=stop)
    result: list[str] = []
    thread = threading.Thread(target=lambda: result.append(runner.run()), daemon=True)
    thread.start()
    return stop, thread, result


@pytest.mark.parametrize("how", ["stop", "cancel"])
def test_shards_given_back_on_stop_or_cancel_cost_no_attempt(tmp_path: Path, how: str) -> None:
    """Stopping the runner (site shutdown) or cancelling abandons the shards in flight: their
    inputs go back to pending with the attempt they had, so the next run starts at attempt 1
    even with ``max_attempts: 1``."""
    folder = store.create(manifest(tmp_path, n=40, max_attempts=1), tmp_path / "home")
    blocking = Blocking()
    stop, thread, result = _run_in_background(folder, blocking)
    try:
        # max_in_flight 3 x shard_size 8: 24 inputs claimed (attempt 1) and never answered
        _until(lambda: store.status(folder)["running"] == 24, "24 inputs in flight")
        assert {a for (a,) in _ledger_rows(
            folder, "SELECT attempts FROM items WHERE state='running'")} == {1}
    finally:
        if how == "stop":
            stop.set()
        else:
            assert store.cancel(folder) == "cancelling"
        thread.join(30)
    assert not thread.is_alive()
    assert result == (["queued"] if how == "stop" else ["cancelled"])
    rows = _ledger_rows(folder, "SELECT state, attempts FROM items")
    assert Counter(rows) == {("pending", 0): 40}
    assert _ledger_rows(folder, "SELECT state, COUNT(*) FROM shards GROUP BY state") == [
        ("lost", blocking.submitted)]
    if how == "cancel":
        store.mark_resumable(folder)
    fake = FakeTransport()
    assert run(folder, fake) == "done"
    out, err = check_invariant(folder, 40)
    assert err == [] and Counter(r["attempt"] for r in out) == {1: 40}


def test_an_unreachable_member_site_costs_no_attempt(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """Over several sites, a member that cannot be reached gives its shard back (nothing
    ran there) and the other site runs those inputs at attempt 1."""
    monkeypatch.setattr(store, "check_model", lambda m: None)  # sites "a", "b": no catalogs
    monkeypatch.setattr(dispatch, "probe", lambda transport, auth, timeout_s: SiteState(
        transport.site, True))  # both answer their status call (cold: no deployments)
    folder = store.create(manifest(tmp_path, n=16, max_attempts=1, sites=[
        {"name": "a", "max_in_flight": 1}, {"name": "b", "max_in_flight": 2}]),
        tmp_path / "home")
    down, up = Unreachable("a"), FakeTransport("b")
    assert CampaignRunner(folder, transports={"a": down, "b": up}, poll_s=0.05).run() == "done"
    assert down.submitted >= 1  # the first shard went to "a" (first among equals)
    out, err = check_invariant(folder, 16)
    assert err == [] and {r["site"] for r in out} == {"b"}
    assert Counter(r["attempt"] for r in out) == {1: 16}
    lost = _ledger_rows(folder, "SELECT site, state FROM shards WHERE site='a'")
    assert lost and set(lost) == {("a", "lost")}


# -- retried inputs go in smaller shards ------------------------------------------------------

def test_inputs_retried_after_a_lost_shard_go_in_halving_shards(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An input that kills its worker (r0) sinks its shard-mates once; their retries go in
    shards of ``shard_size >> attempts`` (8, 4, 2, 1), so r0 ends up alone and the others
    succeed."""
    monkeypatch.setattr(dispatch, "MAX_BACKOFF_S", 0.0)  # each failure would pause the site
    sizes: list[int] = []
    lock = threading.Lock()

    def kills_its_worker(shard: dict[str, Any]) -> bool:
        ids = [i["custom_id"] for i in shard["items"]]
        if "r0" in ids:
            with lock:
                sizes.append(len(ids))
            return True
        return False

    fake = FakeTransport(fail=kills_its_worker)
    folder = store.create(manifest(tmp_path, n=40, max_attempts=5), tmp_path / "home")
    assert run(folder, fake) == "done"
    out, err = check_invariant(folder, 40)
    assert [e["custom_id"] for e in err] == ["r0"] and err[0]["attempts"] == 5
    assert sizes == [8, 4, 2, 1, 1]
    failed = _ledger_rows(folder, "SELECT n FROM shards WHERE state='failed' ORDER BY started")
    assert sorted((n for (n,) in failed), reverse=True) == [8, 4, 2, 1, 1]
    # r0's first shard-mates r1..r7 were retried once, twice or three times, never more
    attempts = {r["custom_id"]: r["attempt"] for r in out}
    assert [attempts[f"r{i}"] for i in range(1, 8)] == [4, 3, 3, 2, 2, 2, 2]
    assert all(attempts[f"r{i}"] == 1 for i in range(8, 40))


# -- a failing site backs off -----------------------------------------------------------------

def test_a_site_that_keeps_failing_is_retried_with_backoff(tmp_path: Path) -> None:
    """Every shard is lost: after the second failure in a row the site is paused (2 s, then
    4 s...), so in the first 1.5 s it sees at most a few submissions, not one per loop."""
    fake = Counting(fail=lambda shard: True)
    folder = store.create(manifest(tmp_path, n=1, max_attempts=20), tmp_path / "home")
    stop, thread, result = _run_in_background(folder, fake)
    try:
        _until(lambda: fake.submitted >= 2, "two submissions")
        time.sleep(1.5)
    finally:
        stop.set()
        thread.join(30)
    assert not thread.is_alive()
    # Without backoff the 20 attempts are spent in well under a second and the campaign ends.
    assert fake.submitted <= 4 and result == ["queued"], (fake.submitted, result)
    status = store.status(folder)
    assert status["pending"] == 1 and "worker lost" in (status["last_error"] or "")
    assert sum(status["sites"]["fake"]["shards"].values()) == fake.submitted


def test_an_output_lost_while_the_campaign_ran_is_refused_not_reported_done(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Results written and committed, then the output file is cut (or removed) and the
    campaign resumed: it must say so, typed, not pad the file with NUL bytes up to the
    committed length and report every input done (a user saw 501 inputs' lines gone under
    a "done"). The same holds mid-run, when the next shard's lines are written."""
    from fabric.campaign.ledger import Ledger
    from fabric.errors import CampaignOutputLost

    folder = store.create(manifest(tmp_path, n=40), tmp_path / "home")
    real = Ledger.settle
    calls = {"n": 0}

    def stop_after_two(self: Ledger, *a: Any, **kw: Any) -> None:
        real(self, *a, **kw)
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt("the runner stops with two shards committed")

    monkeypatch.setattr(Ledger, "settle", stop_after_two)
    with pytest.raises(KeyboardInterrupt):
        run(folder, FakeTransport())
    monkeypatch.setattr(Ledger, "settle", real)
    results = Path(store.load(folder).output) / store.RESULTS
    whole = results.read_bytes()
    assert whole.count(b"\n") == 16
    results.write_bytes(whole[:len(whole) // 2])
    with pytest.raises(CampaignOutputLost, match="where the campaign's ledger committed"):
        run(folder, FakeTransport())
    assert b"\0" not in results.read_bytes()
    # Mid-run: the settle of the next shard finds the file gone.
    results.write_bytes(whole)
    lose = {"done": False}

    def lose_it_once(self: Ledger, *a: Any, **kw: Any) -> None:
        if not lose["done"]:
            lose["done"] = True
            results.unlink()
        real(self, *a, **kw)

    monkeypatch.setattr(Ledger, "settle", lose_it_once)
    with pytest.raises(CampaignOutputLost):
        run(folder, FakeTransport())
