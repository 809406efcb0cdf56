"""The exposition format, histograms, engine statistics, site events and the usage report,
without a site: what ``/metrics`` and ``fabric usage`` are built from."""

from __future__ import annotations

import csv
import json
import math
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest

from fabric.endpoint import policy, site_events
from fabric.endpoint.usage_report import parse_since, table, usage_rows, write_csv
from fabric.errors import (
    DeadlineExceeded,
    FunctionNotAllowed,
    InvalidRequest,
    Overloaded,
    QuotaExceeded,
    UnknownModel,
)
from fabric.metrics import Family, Histogram, LabelledCounter, record_routing, render


def _samples(text: str) -> dict[str, float]:
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def test_histogram_buckets_are_cumulative_and_end_at_inf() -> None:
    h = Histogram((0.1, 1.0, 10.0))
    for v in (0.05, 0.1, 0.5, 3.0, 50.0):
        h.observe(v)
    # le is inclusive: 0.1 falls in the 0.1 bucket
    assert h.cumulative() == [(0.1, 2), (1.0, 3), (10.0, 4), (math.inf, 5)]
    assert h.count == 5 and h.sum == pytest.approx(53.65)
    again = Histogram.from_dict(h.to_dict())
    assert again.cumulative() == h.cumulative() and again.sum == h.sum


def test_render_escapes_labels_and_writes_histograms() -> None:
    fam = Family("fabric_x_seconds", "histogram", "help with\nnewline")
    h = Histogram((1.0,))
    h.observe(0.5)
    h.observe(2.0)
    fam.add({"model_name": 'a"b\\c\nd'}, h)
    gauge = Family("fabric_g", "gauge", "g")
    gauge.add({}, 0.25)
    text = render([fam, gauge])
    assert "# HELP fabric_x_seconds help with\\nnewline" in text
    assert "# TYPE fabric_x_seconds histogram" in text
    samples = _samples(text)
    label = 'model_name="a\\"b\\\\c\\nd"'
    assert samples[f'fabric_x_seconds_bucket{{{label},le="1"}}'] == 1
    assert samples[f'fabric_x_seconds_bucket{{{label},le="+Inf"}}'] == 2
    assert samples[f"fabric_x_seconds_sum{{{label}}}"] == 2.5
    assert samples[f"fabric_x_seconds_count{{{label}}}"] == 2
    assert samples["fabric_g"] == 0.25
    assert text.endswith("\n")


def test_render_merges_families_of_one_name() -> None:
    a, b = Family("fabric_c_total", "counter", "c"), Family("fabric_c_total", "counter", "c")
    a.add({"x": "1"}, 1)
    b.add({"x": "2"}, 2)
    text = render([a, b])
    assert text.count("# TYPE fabric_c_total counter") == 1
    assert _samples(text) == {'fabric_c_total{x="1"}': 1, 'fabric_c_total{x="2"}': 2}


def test_labelled_counter_checks_its_labels() -> None:
    c = LabelledCounter("fabric_t_total", "t", ("a", "b"))
    c.inc(a="1", b="2")
    c.inc(2, a="1", b="2")
    assert c.value(a="1", b="2") == 3
    with pytest.raises(ValueError):
        c.inc(a="1")
    with pytest.raises(ValueError):
        c.inc(-1, a="1", b="2")


def test_record_routing_counts_by_model_site_and_reason() -> None:
    from fabric.metrics import ROUTING_DECISIONS

    before = ROUTING_DECISIONS.value(model_name="m", site="s1", reason="warm")
    record_routing("m", "s1", "warm")
    record_routing("m", "s1", "warm")
    record_routing("m", "s2", "failover")
    assert ROUTING_DECISIONS.value(model_name="m", site="s1", reason="warm") == before + 2
    assert 'site="s2",reason="failover"' in render([ROUTING_DECISIONS.family()])


def test_refusal_rules() -> None:
    assert site_events.refusal_rule(QuotaExceeded("q")) == "quota"
    assert site_events.refusal_rule(FunctionNotAllowed("f")) == "policy"
    assert site_events.refusal_rule(UnknownModel("u")) == "validation"
    assert site_events.refusal_rule(Overloaded("o")) == "overloaded"
    assert site_events.refusal_rule(DeadlineExceeded("d")) is None


def test_site_events_count_cold_starts_once_per_deployment(tmp_path: Path) -> None:
    site_events.record_cold_start(tmp_path, "m", "d-1", 3.5)
    site_events.record_cold_start(tmp_path, "m", "d-1", 9.0)  # a second worker noticed it too
    site_events.record_cold_start(tmp_path, "m", "d-2", 1.5)
    site_events.record_refusal(tmp_path, "m", QuotaExceeded("q"))
    site_events.record_refusal(tmp_path, "m", QuotaExceeded("q"))
    site_events.record_refusal(tmp_path, "m", DeadlineExceeded("not a refusal"))
    assert site_events.cold_starts(tmp_path) == {"m": [3.5, 1.5]}
    assert site_events.refusals(tmp_path) == {("m", "quota", "QuotaExceeded"): 2}


def test_parse_since() -> None:
    now = 1_800_000_000.0
    assert parse_since("90s", now) == now - 90
    assert parse_since("24h", now) == now - 86400
    assert parse_since("7d", now) == now - 7 * 86400
    assert parse_since("2026-12-01", now) == datetime(2026, 12, 1, tzinfo=UTC).timestamp()
    assert parse_since("2026-12-01T08:00+01:00", now) == \
        datetime(2026, 12, 1, 7, tzinfo=UTC).timestamp()
    with pytest.raises(InvalidRequest):
        parse_since("yesterday", now)
    assert parse_since("-5m", now) == now - 300  # "5 minutes ago", as journalctl writes it


def test_usage_since_takes_a_leading_minus_as_its_value(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``--since -5m``: argparse took ``-5m`` for an option ("expected one argument")."""
    from fabric.cli.main import main

    policy.record_usage(tmp_path, "alice", "m1", 30, "r1", prompt_tokens=10,
                        completion_tokens=20)
    for argv in (["--since", "-5m"], ["--since=-5m"], ["--since", "5m"]):
        assert main(["usage", "--state-dir", str(tmp_path), "--json", *argv]) == 0
        assert json.loads(capsys.readouterr().out)[0]["total_tokens"] == 30
    assert main(["usage", "--state-dir", str(tmp_path), "--since", "-5x"]) == 2
    assert "--since '-5x': give a duration" in capsys.readouterr().err


def test_usage_report_groups_and_exports(tmp_path: Path) -> None:
    policy.record_usage(tmp_path, "alice", "m1", 30, "r1", prompt_tokens=10,
                        completion_tokens=20)
    policy.record_usage(tmp_path, "alice", "m2", 7, "r2", prompt_tokens=5, completion_tokens=2)
    policy.record_usage(tmp_path, "bob", "m1", 4, "r3", prompt_tokens=3, completion_tokens=1)
    rows = usage_rows(tmp_path)
    assert [(r.identity, r.model, r.prompt_tokens, r.generation_tokens, r.total_tokens)
            for r in rows] == [("alice", "m1", 10, 20, 30), ("alice", "m2", 5, 2, 7),
                               ("bob", "m1", 3, 1, 4)]
    by_model = {r.model: r for r in usage_rows(tmp_path, by="model")}
    assert by_model["m1"].prompt_tokens == 13 and by_model["m1"].identity == "*"
    by_id = {r.identity: r for r in usage_rows(tmp_path, by="identity")}
    assert by_id["alice"].generation_tokens == 22
    assert usage_rows(tmp_path, since=time.time() + 60) == []
    write_csv(rows, tmp_path / "u.csv")
    with (tmp_path / "u.csv").open() as fh:
        exported = list(csv.DictReader(fh))
    assert exported[2] == {"identity": "bob", "model": "m1", "requests": "0",
                           "prompt_tokens": "3", "generation_tokens": "1", "total_tokens": "4"}
    assert table(rows).splitlines()[-1].split() == ["total", "0", "18", "23", "41"]
    with pytest.raises(InvalidRequest):
        usage_rows(tmp_path, by="site")  # type: ignore[arg-type]
    with pytest.raises(InvalidRequest, match="cannot write the CSV to"):
        write_csv(rows, tmp_path / "no-such-dir" / "u.csv")
    # ``--csv -``: standard output, not a file named "-".
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "fabric.cli.main", "usage", "--state-dir",
                          str(tmp_path), "--csv", "-"], capture_output=True, text=True,
                         cwd=tmp_path, check=True).stdout
    assert list(csv.DictReader(out.splitlines())) == exported
    assert not (tmp_path / "-").exists()


def test_usage_table_made_before_the_split_gains_its_columns(tmp_path: Path) -> None:
    import sqlite3

    old = sqlite3.connect(tmp_path / "usage.sqlite")
    old.execute("CREATE TABLE usage (ts REAL NOT NULL, identity TEXT NOT NULL, model TEXT NOT"
                " NULL, requests INTEGER NOT NULL, tokens INTEGER NOT NULL, request_id TEXT)")
    old.execute("INSERT INTO usage VALUES (?, 'carol', 'm', 1, 12, NULL)", (time.time(),))
    old.commit()
    old.close()
    (row,) = usage_rows(tmp_path)  # read-only: an old table reads without the split
    assert (row.requests, row.prompt_tokens, row.total_tokens) == (1, 0, 12)
    policy.record_usage(tmp_path, "carol", "m", 5, prompt_tokens=4, completion_tokens=1)
    (row,) = usage_rows(tmp_path)
    assert (row.prompt_tokens, row.generation_tokens, row.total_tokens) == (4, 1, 17)


def test_gateway_metrics_need_auth_where_callers_do_and_count_answers(tmp_path: Path) -> None:
    import httpx

    from fabric.gateway import GatewayConfig, create_app
    from fabric.gateway.keys import KeyStore
    from tests.test_gateway_unit import running_server

    key, _ = KeyStore(tmp_path).create("prometheus")
    config = GatewayConfig(home=tmp_path, require_auth=True, rate=0)
    with running_server(create_app(config)) as url, httpx.Client(base_url=url, timeout=30) as h:
        auth = {"Authorization": f"Bearer {key}"}
        assert h.get("/metrics").status_code == 401
        for _ in range(3):
            assert h.post("/v1/chat/completions", json={"model": "m"}, headers=auth
                          ).status_code == 400
        assert h.get("/v1/nothing", headers=auth).status_code == 404
        reply = h.get("/metrics", headers=auth)
    assert reply.status_code == 200
    assert reply.headers["content-type"].startswith("text/plain; version=0.0.4")
    samples = _samples(reply.text)
    chat = 'route="/v1/chat/completions",method="POST"'
    assert samples[f'fabric_gateway_requests_total{{{chat},code="400"}}'] == 3
    assert samples['fabric_gateway_requests_total{route="/metrics",method="GET",code="401"}'] == 1
    assert samples['fabric_gateway_requests_total{route="unmatched",method="GET",code="404"}'] == 1
    assert samples['fabric_gateway_request_duration_seconds_count'
                   '{route="/v1/chat/completions"}'] == 3


def test_gateway_scrapes_spend_no_rate_budget(tmp_path: Path) -> None:
    """Prometheus scrapes every few seconds as the same identity as local callers: a scrape
    neither takes a request from that budget nor is refused by it."""
    import httpx

    from fabric.gateway import GatewayConfig, create_app
    from tests.test_gateway_unit import running_server

    config = GatewayConfig(home=tmp_path, rate=0.01, burst=2)  # ~no refill during the test
    with running_server(create_app(config)) as url, httpx.Client(base_url=url, timeout=30) as h:
        for _ in range(5):
            assert h.get("/metrics").status_code == 200
        # The budget of 2 is whole after five scrapes, and spent by two calls.
        assert [h.post("/v1/chat/completions", json={}).status_code for _ in range(3)] == \
            [400, 400, 429]
        assert h.get("/metrics").status_code == 200  # still scraped once it is spent


def test_fabric_metrics_serves_a_site_from_its_state_dir(tmp_path: Path) -> None:
    """A remote site's operator runs ``fabric metrics`` beside the Globus Compute endpoint."""
    import json
    import signal
    import subprocess
    import sys

    import httpx

    from tests.plugins.site import wait_until, write_site

    folder = write_site(tmp_path / "site", name="remote-ish")
    state = folder / "state"
    state.mkdir()
    site_events.record_refusal(state, "big-model", QuotaExceeded("over"))
    site_events.record_cold_start(state, "big-model", "d-1", 42.0)
    proc = subprocess.Popen(
        [sys.executable, "-c", "import sys; from fabric.cli.main import main; "
         "sys.exit(main(sys.argv[1:]))", "metrics", "--site", str(folder), "--port", "0"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        info = wait_until(lambda: (state / "metrics.json").exists()
                          and json.loads((state / "metrics.json").read_text()), 30,
                          "fabric metrics to listen")
        samples = _samples(httpx.get(info["url"], timeout=10).text)
        assert samples['fabric_refusals_total{model_name="big-model",rule="quota",'
                       'error="QuotaExceeded"}'] == 1
        assert samples['fabric_cold_starts_total{model_name="big-model"}'] == 1
        assert samples['fabric_cold_start_duration_seconds_bucket'
                       '{model_name="big-model",le="60"}'] == 1
        assert samples['fabric_cold_start_duration_seconds_bucket'
                       '{model_name="big-model",le="30"}'] == 0
        assert httpx.get(info["url"].replace("/metrics", "/other"), timeout=10
                         ).status_code == 404
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0
        assert not (state / "metrics.json").exists()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)


def test_a_federations_routing_decisions_reach_the_metrics() -> None:
    """The router's own counters feed ``fabric_routing_decisions_total`` (no manual call)."""
    from fabric.client.routing import Ranked, RoutingStats
    from fabric.metrics import ROUTING_DECISIONS

    warm = ROUTING_DECISIONS.value(model_name="rm", site="a", reason="warm")
    moved = ROUTING_DECISIONS.value(model_name="rm", site="a", reason="failover")
    stats = RoutingStats()
    stats.decided("rm", Ranked(site="a", tier="warm"))
    stats.failed_over("rm", "a", "Overloaded")
    assert ROUTING_DECISIONS.value(model_name="rm", site="a", reason="warm") == warm + 1
    assert ROUTING_DECISIONS.value(model_name="rm", site="a", reason="failover") == moved + 1


def test_parse_since_knows_every_unit() -> None:
    now = 1_800_000_000.0
    assert parse_since("30m", now) == now - 30 * 60
    assert parse_since("2w", now) == now - 14 * 86400
    assert parse_since("1.5h", now) == now - 5400
    assert parse_since(" 45s ", now) == now - 45


def test_usage_of_a_site_that_recorded_none_is_empty_and_creates_nothing(tmp_path: Path
                                                                         ) -> None:
    assert usage_rows(tmp_path) == []
    assert list(tmp_path.iterdir()) == []
    assert table([]).split() == ["IDENTITY", "MODEL", "REQUESTS", "PROMPT", "GENERATION",
                                 "TOTAL"]


def test_usage_table_right_aligns_the_numbers() -> None:
    from fabric.endpoint.usage_report import UsageRow

    rows = [UsageRow("alice", "m", 1, 10, 200, 210), UsageRow("bob", "model-two", 12, 3, 4, 7)]
    # Names left-aligned, counts right-aligned: the digits of a column end in one place.
    assert table(rows).splitlines() == [
        "IDENTITY  MODEL      REQUESTS  PROMPT  GENERATION  TOTAL",
        "alice     m                 1      10         200    210",
        "bob       model-two        12       3           4      7",
        "total                      13      13         204    217"]


def test_histogram_buckets_may_be_given_in_any_order() -> None:
    h = Histogram((10.0, 0.1, 1.0))
    for v in (0.05, 0.5, 5.0):
        h.observe(v)
    assert h.cumulative() == [(0.1, 1), (1.0, 2), (10.0, 3), (math.inf, 3)]


def test_render_writes_infinities_and_nan_as_prometheus_does() -> None:
    gauge = Family("fabric_g", "gauge", "g")
    gauge.add({"s": "lo"}, float("-inf"))
    gauge.add({"s": "hi"}, float("inf"))
    gauge.add({"s": "nan"}, float("nan"))
    gauge.add({"s": "big"}, 1e15)
    gauge.add({"s": "int"}, 3.0)
    lines = render([gauge]).splitlines()[2:]
    assert lines == ['fabric_g{s="lo"} -Inf', 'fabric_g{s="hi"} +Inf', 'fabric_g{s="nan"} NaN',
                     'fabric_g{s="big"} 1000000000000000.0', 'fabric_g{s="int"} 3']


def test_gateway_counts_a_request_that_raised_as_a_500() -> None:
    """A route that raises never starts its answer itself (the server's error handler answers
    outside the counting middleware): it is counted as the 500 the caller gets."""
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from fabric.gateway.metrics import install

    app = FastAPI()
    metrics = install(app)

    @app.get("/boom")
    async def boom() -> None:
        raise RuntimeError("a bug")

    with TestClient(app, raise_server_exceptions=False) as client:
        assert client.get("/boom").status_code == 500
    assert metrics.requests.value(route="/boom", method="GET", code=500) == 1
    assert metrics.requests.value(route="/boom", method="GET", code=200) == 0


def test_site_metrics_series_from_records_and_server_stats(tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch
                                                          ) -> None:
    """What a scrape makes of the deployment records and each live server's ``stats`` (asked
    here of a stand-in): draining servers still report, ``eos`` is a success, an empty KV budget
    is no division by zero, and the cold-start count is the number of starts."""
    import json
    import urllib.error
    import urllib.request

    from fabric.endpoint.site_metrics import MetricsServer, SiteMetrics
    from fabric.endpoint.state import Deployment
    from fabric.metrics import E2E_BUCKETS, ITL_BUCKETS, TTFT_BUCKETS
    from fabric.sites import load_site

    metrics = SiteMetrics(load_site("local"), tmp_path)
    for i, state in enumerate(("ready", "draining", "queued", "dead")):
        metrics.manager.db.insert(Deployment(id=f"d-{i}", model="m", version="1", state=state,
                                             address=f"tcp://127.0.0.1:{9000 + i}",
                                             public_key="k"))
    stats = {"time_to_first_token_seconds": Histogram(TTFT_BUCKETS).to_dict(),
             "inter_token_latency_seconds": Histogram(ITL_BUCKETS).to_dict(),
             "e2e_request_latency_seconds": Histogram(E2E_BUCKETS).to_dict(),
             "prompt_tokens": 11, "generation_tokens": 5,
             "finished": {"eos": 2, "length": 1, "Overloaded": 3},
             "num_requests_running": 1, "num_requests_waiting": 0,
             "kv_budget_tokens": 0, "kv_used_tokens": 0}
    monkeypatch.setattr(metrics, "_stats", lambda dep: json.loads(json.dumps(stats)))
    site_events.record_cold_start(tmp_path, "m", "d-0", 3.0)
    site_events.record_cold_start(tmp_path, "m", "d-1", 4.0)
    samples = _samples(metrics.render())
    metrics.close()
    for dep in ("d-0", "d-1"):
        labels = f'model_name="m",deployment="{dep}"'
        assert samples[f"fabric_model_server_up{{{labels}}}"] == 1
        assert samples[f'fabric_request_success_total{{{labels},finished_reason="eos"}}'] == 2
        assert samples[f'fabric_request_failure_total{{{labels},error="Overloaded"}}'] == 3
        assert samples[f"fabric_kv_cache_usage_perc{{{labels}}}"] == 0
    assert 'deployment="d-2"' not in "".join(samples)  # queued: no server to ask yet
    assert samples['fabric_deployments{model_name="m",state="draining"}'] == 1
    assert samples['fabric_deployments{model_name="m",state="loading"}'] == 0
    assert samples['fabric_cold_starts_total{model_name="m"}'] == 2
    # The listener answers /metrics, with or without a query string, and nothing else.
    server = MetricsServer(SiteMetrics(load_site("local"), tmp_path / "empty"), "127.0.0.1", 0)
    server.start()
    try:
        base = f"http://127.0.0.1:{server.port}"
        with urllib.request.urlopen(f"{base}/metrics?x=1", timeout=10) as reply:
            assert reply.status == 200 and b"fabric_deployments" in reply.read()
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(f"{base}/other", timeout=10)
        assert err.value.code == 404
    finally:
        server.stop()


def test_fabric_usage_reads_since_a_date_and_refuses_a_missing_state_dir(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import json

    from fabric.cli.main import main

    policy.record_usage(tmp_path, "alice", "m1", 30, "r1", prompt_tokens=10,
                        completion_tokens=20)
    policy.flush_usage()
    assert main(["usage", "--state-dir", str(tmp_path), "--json"]) == 0
    assert [r["total_tokens"] for r in json.loads(capsys.readouterr().out)] == [30]
    assert main(["usage", "--state-dir", str(tmp_path), "--since", "2999-01-01"]) == 0
    assert capsys.readouterr().out == "no usage recorded since then\n"
    missing = tmp_path / "no-such-state"
    assert main(["usage", "--state-dir", str(missing)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: state dir {missing} of site 'local' does not exist"), err
    assert not missing.exists()
