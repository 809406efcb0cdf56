"""Campaigns without a site: manifest, inputs, cron, ledger and runner (a fake transport).

The fake transport answers shards in a thread pool the way ``run_shard`` does, so the runner's
exactly-once bookkeeping (settle order, retries, crash recovery, late replies) is tested in
milliseconds; ``test_campaign_site.py`` runs the same paths against a real site and model.
"""

from __future__ import annotations

import concurrent.futures as cf
import datetime as dt
import json
import threading
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import yaml

from fabric.campaign import store
from fabric.campaign.api import Campaign
from fabric.campaign.cron import CronSpec
from fabric.campaign.dispatch import CampaignRunner
from fabric.campaign.inputs import read_inputs
from fabric.campaign.ledger import Ledger
from fabric.campaign.manifest import load_manifest
from fabric.campaign.site_scheduler import CampaignScheduler
from fabric.errors import EndpointError, InvalidManifest, InvalidRequest, UnknownModel


class FakeTransport:
    """Answers ``run_shard`` like a site would; ``fail(shard) -> bool`` loses whole shards,
    ``poison`` custom_ids always fail alone."""

    can_reach_servers = True

    def __init__(self, site: str = "fake", fail: Any = None, poison: set[str] | None = None,
                 delay: float = 0.0) -> None:
        self.site = site
        self.delay = delay
        self.fail = fail
        self.poison = poison or set()
        self.pool = cf.ThreadPoolExecutor(2)
        self.executions: Counter[str] = Counter()
        self.lock = threading.Lock()

    def submit(self, fn: Any, shard: dict[str, Any], auth: Any = None) -> cf.Future[Any]:
        return self.pool.submit(self._run, shard)

    def _run(self, shard: dict[str, Any]) -> dict[str, Any]:
        time.sleep(self.delay)
        if self.fail is not None and self.fail(shard):
            raise EndpointError("worker lost")
        results = []
        for item in shard["items"]:
            nonce = uuid.uuid4().hex
            with self.lock:
                self.executions[item["custom_id"]] += 1
            if item["custom_id"] in self.poison:
                results.append({"custom_id": item["custom_id"], "ok": False, "nonce": nonce,
                                "retryable": False, "error": {
                                    "kind": "ContextLengthExceeded", "message": "too long",
                                    "details": {}}})
                continue
            results.append({"custom_id": item["custom_id"], "ok": True, "nonce": nonce,
                            "result": {"request_id": nonce, "text": "ok " + item["custom_id"],
                                       "finish_reason": "length", "token_ids": [1, 2],
                                       "model": {"name": "m", "version": "v", "sha256": "0" * 64},
                                       "usage": {"prompt_tokens": 3, "completion_tokens": 2}}})
        return {"shard_id": shard["shard_id"], "nonce": uuid.uuid4().hex, "site": self.site,
                "pid": 0, "model": {"name": "m", "version": "v", "sha256": "0" * 64},
                "results": results}

    def close(self) -> None:
        self.pool.shutdown(wait=False)


def write_inputs(path: Path, n: int, extra: list[str] | None = None) -> Path:
    lines = [json.dumps({"custom_id": f"r{i}", "prompt": f"Prompt {i}"}) for i in range(n)]
    path.write_text("\n".join(lines + (extra or [])) + "\n")
    return path


def manifest(tmp: Path, n: int = 40, **fields: Any) -> Path:
    write_inputs(tmp / "in.jsonl", n, fields.pop("extra_lines", None))
    data = {"name": fields.pop("name", "c1"), "model": "smollm2-135m",
            "input": {"path": "in.jsonl"}, "output": "out", "shard_size": 8,
            "sites": [{"name": "local", "max_in_flight": 3}], **fields}
    (tmp / "m.yaml").write_text(yaml.safe_dump(data))
    return tmp / "m.yaml"


def check_invariant(folder: Path, n: int) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    out = list(store.read_records(folder))
    err = list(store.read_records(folder, errors=True))
    ids = [r["custom_id"] for r in out + err]
    assert len(ids) == len(set(ids)) == n, Counter(ids).most_common(3)
    # Nothing past the committed offsets either: the files are exactly the committed lines.
    m = store.load(folder)
    assert len((Path(m.output) / store.RESULTS).read_text().splitlines()) == len(out)
    return out, err


def run(folder: Path, transport: Any, **kw: Any) -> str:
    return CampaignRunner(folder, transports={"local": transport}, poll_s=0.05, **kw).run()


# -- manifest, cron, inputs -------------------------------------------------------------------

def test_cron_matches_and_next() -> None:
    spec = CronSpec.parse("*/15 2 * * 1-5")
    monday = dt.datetime(2026, 11, 23, 1, 50, tzinfo=dt.UTC).timestamp()
    nxt = dt.datetime.fromtimestamp(spec.next_after(monday), dt.UTC)
    assert (nxt.hour, nxt.minute, nxt.weekday()) == (2, 0, 0)
    saturday = dt.datetime(2026, 11, 28, 3, 0, tzinfo=dt.UTC).timestamp()
    assert dt.datetime.fromtimestamp(spec.next_after(saturday), dt.UTC).day == 30
    assert CronSpec.parse("0 0 1 * 0").matches(dt.datetime(2026, 11, 29, 0, 0))  # Sunday
    for bad in ("* * * *", "61 * * * *", "a * * * *", "*/0 * * * *"):
        with pytest.raises(ValueError):
            CronSpec.parse(bad)


def test_manifest_unknown_keys_and_bad_values(tmp_path: Path) -> None:
    path = manifest(tmp_path)
    m = load_manifest(path)
    assert m.input.path == str(tmp_path / "in.jsonl") and m.output == str(tmp_path / "out")
    data = yaml.safe_load(path.read_text())
    for bad, match in (({"max_attemps": 3}, "max_attemps"),
                       ({"kind": "translate"}, "kind"),
                       ({"schedule": {"every": "* * *"}}, "5 fields"),
                       ({"shard_size": 0}, "shard_size"),
                       ({"name": "a b"}, "name")):
        with pytest.raises(InvalidManifest, match=match):
            load_manifest({**data, **bad}, base=tmp_path)
    with pytest.raises(InvalidManifest, match="line"):
        load_manifest("name: x\n  bad: [\n")


def test_audit_is_the_sites_file_and_cannot_be_forged(tmp_path: Path) -> None:
    """No caller-chosen path: ``audit_log`` is refused naming ``audit: true``; the site writes
    its own file, one JSON line per execution, so a newline in a custom_id forges nothing."""
    from fabric.endpoint.campaign_shard import _audit, audit_path

    data = yaml.safe_load(manifest(tmp_path).read_text())
    with pytest.raises(InvalidManifest, match="audit: true"):
        load_manifest({**data, "audit_log": str(tmp_path / "authorized_keys")}, base=tmp_path)
    assert load_manifest({**data, "audit": True}, base=tmp_path).audit is True
    state = tmp_path / "state"
    path = audit_path(state, {"campaign": "c1"})
    assert path == state / "campaigns" / "audit" / "c1.jsonl"
    for bad in ("../../x", "a/b", "", None, ".hidden"):
        with pytest.raises(InvalidRequest, match="audit file"):
            audit_path(state, {"campaign": bad})
    _audit(path, "x\nssh-rsa AAAA evil", "n1")
    _audit(path, "ok", "n2")
    lines = path.read_text().splitlines()
    assert [json.loads(line) for line in lines] == [
        {"custom_id": "x\nssh-rsa AAAA evil", "nonce": "n1"}, {"custom_id": "ok", "nonce": "n2"}]


def test_openai_batch_lines_are_read(tmp_path: Path) -> None:
    lines = [
        {"custom_id": "a", "method": "POST", "url": "/v1/chat/completions",
         "body": {"model": "gpt-x", "messages": [{"role": "user", "content": "Hi"}],
                  "max_tokens": 7, "temperature": 0}},
        {"custom_id": "b", "prompt": "Hello", "max_completion_tokens": 5, "stop": "\n"},
    ]
    (tmp_path / "in.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n\n")
    m = load_manifest({"name": "x", "model": "smollm2-135m", "kind": "chat",
                       "input": {"path": "in.jsonl"}, "output": "o",
                       "sampling": {"max_tokens": 3}}, base=tmp_path)
    items, bad = read_inputs(m)
    assert not bad and [i.custom_id for i in items] == ["a", "b"]
    assert items[0].request["messages"][0]["content"] == "Hi"
    assert items[0].request["sampling"]["max_tokens"] == 7
    assert items[1].request["messages"] == [{"role": "user", "content": "Hello"}]
    assert items[1].request["sampling"]["stop"] == ["\n"]


def test_bad_lines_are_rejected_with_line_numbers(tmp_path: Path) -> None:
    extra = ["{not json", json.dumps({"prompt": "no id"}),
             json.dumps({"custom_id": "x1", "text": "wrong field"}),
             json.dumps({"custom_id": "x2", "prompt": "y" * 300})]
    path = manifest(tmp_path, n=3, extra_lines=extra, input={"path": "in.jsonl",
                                                               "max_line_bytes": 200})
    with pytest.raises(InvalidManifest) as info:
        store.create(path, tmp_path / "home")
    assert info.value.details["lines"] == [4, 5, 6, 7]
    for text in ("line 4: not valid JSON", "line 5: custom_id", "line 6: unsupported",
                 "line 7: line is"):
        assert text in info.value.message
    assert not (tmp_path / "home" / "c1").exists()  # nothing was created


def test_duplicates_and_unknown_model_fail_before_running(tmp_path: Path) -> None:
    path = manifest(tmp_path, n=3, extra_lines=[json.dumps({"custom_id": "r1", "prompt": "x"})])
    with pytest.raises(InvalidManifest, match="'r1' on lines 2 and 4"):
        store.create(path, tmp_path / "home")
    path = manifest(tmp_path, n=3, model="no-such-model")
    with pytest.raises(UnknownModel, match="no-such-model"):
        store.create(path, tmp_path / "home")


def test_bad_lines_recorded_when_asked(tmp_path: Path) -> None:
    path = manifest(tmp_path, n=10, on_bad_line="record",
                    extra_lines=["[1, 2]", json.dumps({"custom_id": "e1"})])
    folder = store.create(path, tmp_path / "home")
    assert run(folder, FakeTransport()) == "done"
    out, err = check_invariant(folder, 12)
    assert len(out) == 10
    assert {(e["custom_id"], e["line"], e["attempts"]) for e in err} == {
        ("@line:11", 11, 0), ("e1", 12, 0)}


# -- runner -----------------------------------------------------------------------------------

@pytest.mark.slow  # ~4 s
def test_runner_exactly_once_with_poison_and_lost_shards(tmp_path: Path) -> None:
    lost = Counter[str]()

    def fail(shard: dict[str, Any]) -> bool:  # the first three shards' workers "die"
        lost["n"] += 1
        return lost["n"] <= 3

    fake = FakeTransport(fail=fail, poison={"r7", "r33"})
    folder = store.create(manifest(tmp_path, n=60, max_attempts=3), tmp_path / "home")
    assert run(folder, fake) == "done"
    out, err = check_invariant(folder, 60)
    assert sorted(e["custom_id"] for e in err) == ["r33", "r7"]
    assert all(e["attempts"] == 3 and e["error"]["kind"] == "ContextLengthExceeded"
               for e in err)
    assert all(r["response"]["text"] == "ok " + r["custom_id"] for r in out)
    assert all(len(r["model"]["sha256"]) == 64 and r["usage"]["prompt_tokens"] == 3
               for r in out)
    status = store.status(folder)
    assert status["done"] == 58 and status["errors_by_kind"] == {"ContextLengthExceeded": 2}
    assert status["sites"]["fake"]["shards"]["failed"] == 3


def test_crash_between_output_and_ledger_is_not_duplicated(tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch
                                                           ) -> None:
    folder = store.create(manifest(tmp_path, n=40), tmp_path / "home")
    real = Ledger.settle
    calls = Counter[str]()

    def crashing(self: Ledger, *a: Any, **kw: Any) -> None:
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt("crash after the lines were written")
        real(self, *a, **kw)

    monkeypatch.setattr(Ledger, "settle", crashing)
    fake = FakeTransport()
    with pytest.raises(KeyboardInterrupt):
        run(folder, fake)
    results = Path(store.load(folder).output) / store.RESULTS
    committed = list(store.read_records(folder))
    assert len(results.read_text().splitlines()) > len(committed)  # uncommitted tail exists
    before = {r["custom_id"]: r["nonce"] for r in committed}
    monkeypatch.setattr(Ledger, "settle", real)
    assert store.status(folder)["status"] == "interrupted"
    assert run(folder, fake) == "done"
    out, _ = check_invariant(folder, 40)
    after = {r["custom_id"]: r["nonce"] for r in out}
    assert all(after[c] == n for c, n in before.items())  # committed lines untouched
    done_first = set(before)
    assert all(fake.executions[c] == 1 for c in done_first)  # and never re-executed


def test_a_runner_ending_while_status_is_read_is_not_taken_for_dead(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The status and the runner's lock are read one after the other. A runner that wrote
    "done" and let its lock go between the two reads looked interrupted (CI: ``wait``
    returned "interrupted" for a campaign done a moment before)."""
    folder = store.create(manifest(tmp_path, n=4), tmp_path / "home")
    ledger = Ledger(folder / store.LEDGER)
    ledger.set(status="running")

    def finishing(_: Path) -> None:  # the runner commits its end, then lets the lock go
        ledger.set(status="done")

    monkeypatch.setattr(store, "runner_pid", finishing)
    try:
        assert store.status(folder)["status"] == "done"
        ledger.set(status="running")  # and one that died without a word is interrupted
        monkeypatch.setattr(store, "runner_pid", lambda _: None)
        assert store.status(folder)["status"] == "interrupted"
    finally:
        ledger.close()


def test_wait_raises_the_error_of_a_runner_that_fails_while_status_is_read(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = store.create(manifest(tmp_path, n=4), tmp_path / "home")
    go = threading.Event()

    class Breaking(FakeTransport):
        def submit(self, fn: Any, shard: dict[str, Any], auth: Any = None) -> cf.Future[Any]:
            go.wait(10)
            raise RuntimeError("the runner broke")

    c = Campaign(folder).start(transports={"local": Breaking()})
    real = Campaign.status

    def status_while_it_fails(self: Campaign) -> dict[str, Any]:
        go.set()
        assert self._thread is not None
        self._thread.join(10)
        return real(self)

    monkeypatch.setattr(Campaign, "status", status_while_it_fails)
    with pytest.raises(RuntimeError, match="the runner broke"):
        c.wait(timeout=10)


def test_cancel_and_resume(tmp_path: Path) -> None:
    fake = FakeTransport(delay=0.1)
    folder = store.create(manifest(tmp_path, n=200, shard_size=4), tmp_path / "home")
    c = Campaign(folder).start(transports={"local": fake})
    while store.status(folder)["done"] < 8:
        time.sleep(0.02)
    assert c.cancel() == "cancelling"
    assert c.wait(timeout=30)["status"] == "cancelled"
    fake.delay = 0.0
    store.mark_resumable(folder)
    assert run(folder, fake) == "done"
    check_invariant(folder, 200)


def test_scheduler_runs_due_and_recurring(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                          ) -> None:
    fake = FakeTransport()
    monkeypatch.setattr(CampaignRunner, "_transport", lambda self, spec: fake)
    home = tmp_path / "home"
    now = dt.datetime(2026, 11, 26, 1, 59, tzinfo=dt.UTC).timestamp()
    later = store.create(manifest(tmp_path, n=5, name="later"), home, runner="site",
                         schedule={"at": "2026-11-26T03:00:00Z"}, now=now)
    nightly = store.create(manifest(tmp_path, n=5, name="nightly", output="nightly"), home,
                           runner="site", schedule={"every": "0 2 * * *"}, now=now)
    here = store.create(manifest(tmp_path, n=5, name="here", output="h"), home, runner="here")
    sched = CampaignScheduler(home, poll_s=0.05)
    assert sched.tick(now) == []
    two = dt.datetime(2026, 11, 26, 2, 0, tzinfo=dt.UTC).timestamp()
    sched.tick(two)  # fires nightly: a new queued campaign
    child = home / "nightly-20261126T0200"
    assert store.status(child)["status"] == "queued"
    assert store.status(nightly)["next_run"] > two + 86000
    assert sched.tick(two) == ["nightly-20261126T0200"]
    sched.threads["nightly-20261126T0200"].join(30)
    assert store.status(child)["status"] == "done"
    assert store.status(later)["status"] == "scheduled"
    assert store.status(here)["status"] == "queued"  # runner "here": not the site's job


def test_cli_status_json_and_results(tmp_path: Path, capsys: pytest.CaptureFixture[str]
                                     ) -> None:
    from fabric.cli.main import main

    folder = store.create(manifest(tmp_path, n=6), tmp_path / "home")
    run(folder, FakeTransport())
    assert main(["campaign", "status", "c1", "--home", str(tmp_path / "home"), "--json"]) == 0
    status = json.loads(capsys.readouterr().out)
    assert status["done"] == 6 and status["status"] == "done" and status["eta_s"] == 0.0
    assert main(["campaign", "results", "c1", "--home", str(tmp_path / "home")]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 6
    assert main(["campaign", "list", "--home", str(tmp_path / "home")]) == 0
    assert "c1" in capsys.readouterr().out
    assert main(["campaign", "status", "nope", "--home", str(tmp_path / "home")]) == 2


@pytest.mark.parametrize(("flag", "value", "field"), [
    ("--every", "0 25 * * *", "schedule.every: Value error, cron hour field '25'"),
    ("--every", "every day", "schedule.every: Value error, cron expression 'every day' needs 5"),
    ("--at", "tomorrow", "schedule.at: Value error, 'tomorrow' is not an ISO 8601 time")])
def test_submit_with_a_bad_every_or_at_is_a_typed_error(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], flag: str, value: str, field: str
) -> None:
    """The same bad schedule as the manifest's own ``schedule:`` gives: exit 2, one line."""
    from fabric.cli.main import main

    home = tmp_path / "home"
    with pytest.raises(InvalidManifest, match="invalid manifest: schedule"):
        store.create(manifest(tmp_path, n=2), home, schedule={flag[2:]: value})
    assert main(["campaign", "submit", str(manifest(tmp_path, n=2)), flag, value,
                 "--home", str(home)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: invalid manifest: " + field) and "Traceback" not in err
    assert not (home / "c1").exists()


def test_python_api_campaign_helper(tmp_path: Path) -> None:
    """``campaign(fab, manifest)``: what ``Fabric.campaign`` does, with ``fab``'s transport."""
    from types import SimpleNamespace

    from fabric.campaign.api import campaign

    fab = SimpleNamespace(site="local", transport=FakeTransport(), auth=None)
    c = campaign(fab, manifest(tmp_path, n=30, max_attempts=1),
                 home=tmp_path / "home")
    final = c.wait(timeout=60)
    assert final["status"] == "done" and final["done"] == 30
    assert sorted(r["custom_id"] for r in c.results()) == sorted(f"r{i}" for i in range(30))
    assert list(c.errors()) == []
    assert c.cancel() == "done"  # a finished campaign stays done


def test_fabric_campaign_method(tmp_path: Path) -> None:
    """``fabric.Fabric`` (the SDK's composition root, ``fabric.sdk``) starts campaigns through
    its own transport, although the client layer never imports the campaign package."""
    from fabric import Fabric

    fab = Fabric(site="local", transport=FakeTransport(), on_status=None)
    c = fab.campaign(manifest(tmp_path, n=5, max_attempts=1), home=tmp_path / "home")
    assert c.wait(timeout=60)["done"] == 5


def test_run_at_site_needs_an_embedded_site(tmp_path: Path) -> None:
    """``run="site"`` hands the campaign to the embedded site's scheduler, started through the
    caller's own transport; a transport without a site process to start (Globus Compute) is
    refused before any ledger is written."""
    from types import SimpleNamespace

    from fabric.campaign.api import campaign

    fab = SimpleNamespace(site="local", transport=FakeTransport(), auth=None)
    with pytest.raises(InvalidRequest, match="embedded site's scheduler"):
        campaign(fab, manifest(tmp_path, n=3), run="site", home=tmp_path / "home")
    assert not (tmp_path / "home").exists()
    pings: list[str] = []
    fab.transport.control = lambda op: pings.append(op) or {"op": op}
    c = campaign(fab, manifest(tmp_path, n=3), run="site", home=tmp_path / "home")
    assert pings == ["ping"] and c.status()["status"] == "queued"


def test_csv_input_and_embed_score_kinds(tmp_path: Path) -> None:
    (tmp_path / "in.csv").write_text("id,text,continuation\n1,first text, a\n2,second, b\n,"
                                     "no id, c\n")
    base = {"model": "smollm2-135m", "output": "o",
            "input": {"path": "in.csv", "column": "text", "id_column": "id"}}
    m = load_manifest({**base, "name": "e", "kind": "embed", "on_bad_line": "record"},
                      base=tmp_path)
    items, bad = read_inputs(m)
    assert [(i.custom_id, i.line, i.request["kind"], i.request["prompt"]) for i in items] == [
        ("1", 2, "embed", "first text"), ("2", 3, "embed", "second")]
    assert [(b.line, b.custom_id) for b in bad] == [(4, None)]
    m = load_manifest({**base, "name": "s", "kind": "score", "on_bad_line": "record"},
                      base=tmp_path)
    items, _ = read_inputs(m)
    assert items[0].request["kind"] == "logprobs" and items[0].request["continuation"] == " a"


def test_a_shard_item_takes_the_shards_model_and_may_not_name_another() -> None:
    from fabric.endpoint.campaign_shard import _in_shard
    from fabric.errors import InvalidRequest

    assert _in_shard({"prompt": "x"}, "m1", "n1") == {"prompt": "x", "model": "m1",
                                                       "request_id": "n1"}
    assert _in_shard({"prompt": "x", "model": "m1"}, "m1", "n2")["model"] == "m1"
    with pytest.raises(InvalidRequest, match="shard serves 'm1'"):
        _in_shard({"prompt": "x", "model": "m2"}, "m1", "n3")
    with pytest.raises(InvalidRequest, match="must be an object"):
        _in_shard(["x"], "m1", "n4")


def test_an_embed_line_holds_its_vector_once_and_short_without_losing_float32() -> None:
    """A 384-dim embedding's output line was ~17 KB: the vector twice (``embedding`` and
    ``layers["-1"]``), each number a float32's full double expansion."""
    import numpy as np

    from fabric.endpoint.campaign_shard import line_result
    from fabric.protocol import InferenceRequest

    vec = np.random.default_rng(0).standard_normal(384).astype(np.float32) * 0.05
    engine = {"request_id": "r", "usage": {"prompt_tokens": 6, "completion_tokens": 0},
              "embedding": vec.tolist(), "layers": {"-1": vec.tolist()}}
    req = InferenceRequest(model="m", kind="embed", prompt="a cat")
    line = json.loads(json.dumps(line_result(req, engine)))
    assert "layers" not in line and line["usage"]["prompt_tokens"] == 6
    assert np.array_equal(np.asarray(line["embedding"], dtype=np.float32), vec)
    assert len(json.dumps(line["embedding"])) < 6000  # was ~7,900 for this vector
    two = InferenceRequest(model="m", kind="embed", prompt="a cat", layers=[-1, 0])
    asked = line_result(two, {**engine, "layers": {"-1": vec.tolist(), "0": vec.tolist()}})
    assert set(asked["layers"]) == {"-1", "0"}  # asked for: kept
    assert np.array_equal(np.asarray(asked["layers"]["0"], dtype=np.float32), vec)


def test_the_status_line_labels_its_counts_and_drops_the_eta_once_ended() -> None:
    """``fabric campaign status`` printed ``running  failed 0  running 5`` (the state, then an
    unlabelled count of the same word) and an ETA for a cancelled campaign."""
    from fabric.campaign.progress import describe

    base = {"failed": 1, "running": 5, "tokens_per_s": 120.0, "inputs_per_s": 2.5,
            "eta_s": 75.0}
    line = describe({**base, "status": "running"})
    assert line.startswith("running: 1 failed, 5 in flight, ") and line.endswith("ETA 1:15")
    assert "prompt + completion" in line
    for ended in ("done", "cancelled", "failed"):
        assert "ETA" not in describe({**base, "status": ended}), ended
    assert "in flight" not in describe({**base, "status": "done"}, counts=False)


# -- inputs: OpenAI batch lines, line sizes; cron fields ----------------------------------------

def _read(tmp: Path, lines: list[str], kind: str = "generate", end: str = "\n",
          **input_spec: Any) -> tuple[list[Any], list[Any]]:
    """``read_inputs`` of these lines (bad lines recorded, not fatal)."""
    (tmp / "in.jsonl").write_text("\n".join(lines) + end)
    m = load_manifest({"name": "x", "model": "smollm2-135m", "kind": kind, "output": "o",
                       "on_bad_line": "record", "input": {"path": "in.jsonl", **input_spec}},
                      base=tmp)
    return read_inputs(m)


def _batch_line(cid: str, url: str, **body: Any) -> str:
    return json.dumps({"custom_id": cid, "method": "POST", "url": url,
                       "body": {"model": "gpt-x", **body}})


def test_openai_batch_line_asking_for_several_choices_is_refused(tmp_path: Path) -> None:
    """One result per custom_id: ``n: 2`` would silently lose a choice, so it is a bad line."""
    chat = [{"role": "user", "content": "Hi"}]
    items, bad = _read(tmp_path, [
        _batch_line("one", "/v1/chat/completions", messages=chat, n=1),
        _batch_line("two", "/v1/chat/completions", messages=chat, n=2),
        json.dumps({"custom_id": "top", "prompt": "Hi", "n": 3})], kind="chat")
    assert [i.custom_id for i in items] == ["one"]
    assert [(b.line, b.custom_id) for b in bad] == [(2, "two"), (3, "top")]
    assert all("n must be 1" in b.message for b in bad)


def test_openai_batch_line_for_another_endpoint_is_refused(tmp_path: Path) -> None:
    items, bad = _read(tmp_path, [
        _batch_line("emb", "/v1/embeddings", input="Hi"),
        _batch_line("chat", "/v1/chat/completions", messages=[{"role": "user", "content": "x"}]),
        _batch_line("elsewhere", "/v1/moderations", input="Hi")], kind="chat")
    assert [i.custom_id for i in items] == ["chat"]
    assert [b.custom_id for b in bad] == ["emb", "elsewhere"]
    assert "'/v1/embeddings' does not fit a chat campaign" in bad[0].message
    # The same embeddings line is what an embed campaign runs.
    items, bad = _read(tmp_path, [_batch_line("emb", "/v1/embeddings", input="Hi")],
                       kind="embed")
    assert not bad and items[0].request["kind"] == "embed" and items[0].request["prompt"] == "Hi"


@pytest.mark.parametrize("count", [0, 1, 5])
def test_completions_logprobs_count_becomes_top_logprobs(tmp_path: Path, count: int) -> None:
    """``/v1/completions``' ``logprobs: k`` asks for the chosen tokens' log-probabilities
    and the k most likely at each position."""
    items, bad = _read(tmp_path, [_batch_line("c", "/v1/completions", prompt="Hi",
                                              logprobs=count)])
    assert not bad
    sampling = items[0].request["sampling"]
    assert sampling["logprobs"] is True and sampling["top_logprobs"] == count


def test_a_last_line_without_newline_is_held_to_the_same_limit(tmp_path: Path) -> None:
    """``max_line_bytes`` counts a line without its newline: a last line with no newline
    and one byte over the limit is as oversize as the same line with its newline."""
    limit = 120

    def sized(cid: str, size: int) -> str:
        empty = json.dumps({"custom_id": cid, "prompt": ""})
        line = json.dumps({"custom_id": cid, "prompt": "x" * (size - len(empty))})
        assert len(line.encode()) == size
        return line

    for end in ("", "\n"):
        items, bad = _read(tmp_path, [sized("fits", limit), sized("over", limit + 1)], end=end,
                           max_line_bytes=limit)
        assert [i.custom_id for i in items] == ["fits"], repr(end)
        assert [(b.line, b.kind) for b in bad] == [(2, "OversizeLine")], repr(end)
        assert f"the limit is {limit}" in bad[0].message
        # At the limit exactly, a last line fits with or without its newline.
        items, bad = _read(tmp_path, [sized("a", limit - 5), sized("b", limit)], end=end,
                           max_line_bytes=limit)
        assert not bad and [i.custom_id for i in items] == ["a", "b"], repr(end)


def test_cron_day_of_week_seven_is_sunday() -> None:
    spec = CronSpec.parse("0 0 * * 7")
    start = dt.datetime(2026, 3, 2, tzinfo=dt.UTC)  # any fortnight: every weekday twice
    days = [start + dt.timedelta(days=i) for i in range(14)]
    assert [d.day for d in days if spec.matches(d)] == \
        [d.day for d in days if d.isoweekday() == 7]
    assert spec == CronSpec.parse("0 0 * * 0")
    fired = dt.datetime.fromtimestamp(spec.next_after(start.timestamp()), dt.UTC)
    assert fired.isoweekday() == 7 and (fired.hour, fired.minute) == (0, 0)


def test_cron_start_with_step_runs_to_the_end_of_the_field() -> None:
    """``a/n`` is ``a-max/n`` (Vixie cron): ``5/15`` fires at 5, 20, 35 and 50."""
    spec = CronSpec.parse("5/15 * * * *")
    assert spec.minutes == frozenset(range(5, 60, 15))
    hour = dt.datetime(2026, 3, 2, 7, 0, tzinfo=dt.UTC)
    fired = [m for m in range(60) if spec.matches(hour.replace(minute=m))]
    assert fired == list(range(5, 60, 15))
    assert CronSpec.parse("* 20/2 * * *").hours == frozenset(range(20, 24, 2))


def test_ctrl_c_on_campaign_run_says_how_to_resume(tmp_path: Path, monkeypatch: Any,
                                                   capsys: Any) -> None:
    """Ctrl-C while ``fabric campaign run`` watches: the runner is stopped (resumable) and
    the user is told the command that continues it, not only "interrupted"."""
    import argparse
    import threading

    import fabric.campaign.dispatch as dispatch
    import fabric.campaign.progress as progress
    from fabric.cli import campaign as cli

    class Runner:
        def __init__(self, folder: Path) -> None:
            self.stop = threading.Event()

        def run(self) -> None:
            self.stop.wait(30)

    def ctrl_c(folder: Path, until: Any) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(dispatch, "CampaignRunner", Runner)
    monkeypatch.setattr(progress, "watch", ctrl_c)
    folder = tmp_path / "nightly-run"
    with pytest.raises(KeyboardInterrupt):
        cli._run_here(folder, argparse.Namespace(quiet=False, json=False))
    assert "fabric campaign resume nightly-run" in capsys.readouterr().err
