"""``/metrics`` of a real site and of the gateway, scraped by a real Prometheus server
(Debian ``prometheus``), and ``fabric usage`` on the same site's database.

The site (its own, with ``metrics.enabled`` on port 0) serves the tiny random Llama; the test
makes requests through the SDK (one-shot and a direct stream) and the gateway (the ``openai``
client), then asks Prometheus' HTTP API for the fabric's series and compares them with what
the requests returned: tokens, request counts, latency observations, the cold start, a
refusal, the deployment's state, the gateway's answers and a routing decision.
"""

from __future__ import annotations

import getpass
import json
import os
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from fabric import AsyncFabric, Fabric
from fabric.errors import TicketInvalid, UnknownModel
from fabric.gateway import GatewayConfig, create_app
from tests.plugins.site import REPO_ROOT, TINY_MODEL, wait_until, write_site
from tests.prometheus.server import require_prometheus, running_prometheus
from tests.test_gateway_unit import running_server

pytestmark = pytest.mark.slow

SITE = "test-metrics"


@pytest.fixture(scope="module")
def metrics_site(tmp_path_factory: pytest.TempPathFactory,
                 tiny_llama_dir: Path) -> Iterator[tuple[Path, Path, str]]:
    """A site with ``/metrics`` on (site dir, state dir, host:port of the listener)."""
    from fabric.client.local import start_site, stop_site

    require_prometheus()  # before starting anything
    folder = write_site(tmp_path_factory.mktemp("metrics-site"), name=SITE,
                        model_dir=tiny_llama_dir, metrics={"enabled": True, "port": 0})
    state = folder / "state"
    old = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), old) if p)
    try:
        start_site(str(folder), state, timeout_s=300)
    finally:
        if old is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = old
    try:
        info = wait_until(lambda: _read_json(state / "metrics.json"), 60, "metrics.json")
        yield folder, state, f"{info['host']}:{info['port']}"
    finally:
        stop_site(str(folder), state, all=True, timeout_s=60)


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return dict(json.loads(path.read_text()))
    except (OSError, ValueError):
        return None


@pytest.fixture(scope="module")
def fab(metrics_site: tuple[Path, Path, str]) -> Iterator[Fabric]:
    from fabric.client.local import LocalTransport

    folder, state, _ = metrics_site
    transport = LocalTransport(site=str(folder), state_dir=state, autostart=False)
    with Fabric(site=str(folder), transport=transport, on_status=None) as client:
        yield client


def test_prometheus_scrapes_the_site_and_the_gateway(
        metrics_site: tuple[Path, Path, str], fab: Fabric, tmp_path: Path) -> None:
    from fabric.metrics import record_routing

    _, _, site_target = metrics_site
    prompt = completion = requests = ttft = itl = 0

    def count(usage: Any) -> None:
        nonlocal prompt, completion, requests, ttft, itl
        prompt += usage.prompt_tokens
        completion += usage.completion_tokens
        requests += 1
        ttft += usage.completion_tokens > 0
        itl += max(0, usage.completion_tokens - 1)

    for max_tokens in (3, 5, 8):  # the first one launches the server: the cold start
        count(fab.generate("The mitochondria is", model=TINY_MODEL, max_tokens=max_tokens).usage)
    with fab.stream("Proteins are", model=TINY_MODEL, max_tokens=6) as stream:
        pieces = list(stream)
    assert stream.result is not None and pieces
    count(stream.result.usage)
    with pytest.raises(UnknownModel):
        fab.generate("x", model="no-such-model", max_tokens=2)

    config = GatewayConfig(site=fab.site, home=tmp_path / "gateway", rate=0)
    with running_server(create_app(config, AsyncFabric(fabric=fab))) as url:
        with openai.OpenAI(base_url=f"{url}/v1", api_key="EMPTY", max_retries=0) as client:
            for n in (2, 4):
                reply = client.chat.completions.create(
                    model=TINY_MODEL, max_tokens=n,
                    messages=[{"role": "user", "content": "What do proteins do?"}])
                assert reply.usage is not None
                count(reply.usage)
        record_routing(TINY_MODEL, SITE, "warm")
        gateway_target = url.removeprefix("http://")
        assert httpx.get(f"{url}/metrics", timeout=10).status_code == 200
        with running_prometheus({"site": site_target, "gateway": gateway_target},
                                tmp_path / "prometheus") as prom:
            model = f'model_name="{TINY_MODEL}"'
            # Every figure is for the one deployment, so sum() over it is its value.
            prom.wait_for(f"sum(fabric_generation_tokens_total{{{model}}})",
                          lambda v: v == completion, 60)
            assert prom.scalar(f"sum(fabric_prompt_tokens_total{{{model}}})") == prompt
            assert prom.scalar(f"sum(fabric_e2e_request_latency_seconds_count{{{model}}})") \
                == requests
            assert prom.scalar(
                f"sum(fabric_time_to_first_token_seconds_count{{{model}}})") == ttft
            assert prom.scalar(
                f"sum(fabric_inter_token_latency_seconds_count{{{model}}})") == itl
            le_inf = prom.scalar(
                f'sum(fabric_e2e_request_latency_seconds_bucket{{{model},le="+Inf"}})')
            assert le_inf == requests
            assert prom.scalar(f"sum(fabric_request_success_total{{{model}}})") == requests
            assert prom.scalar(f"sum(fabric_num_requests_running{{{model}}})") == 0
            assert prom.scalar(f"sum(fabric_num_requests_waiting{{{model}}})") == 0
            assert prom.scalar(f"sum(fabric_kv_cache_usage_perc{{{model}}})") == 0
            assert prom.scalar(f'fabric_deployments{{{model},state="ready"}}') == 1
            assert prom.scalar(f'fabric_deployments{{{model},state="loading"}}') == 0
            assert prom.scalar(f"fabric_cold_starts_total{{{model}}}") == 1
            assert prom.scalar(f"fabric_cold_start_duration_seconds_count{{{model}}}") == 1
            cold = prom.scalar(f"fabric_cold_start_duration_seconds_sum{{{model}}}")
            assert cold is not None and 0 < cold < 300
            assert prom.scalar('fabric_refusals_total{model_name="no-such-model",'
                               'rule="validation",error="UnknownModel"}') == 1
            assert prom.scalar(f"sum(fabric_model_server_up{{{model}}})") == 1
            chat = 'route="/v1/chat/completions",method="POST",code="200"'
            prom.wait_for(f"fabric_gateway_requests_total{{{chat}}}", lambda v: v == 2, 30)
            assert prom.scalar('fabric_gateway_request_duration_seconds_count'
                               '{route="/v1/chat/completions"}') == 2
            assert prom.scalar(f'fabric_routing_decisions_total{{{model},site="{SITE}",'
                               'reason="warm"}') == 1
            assert prom.scalar('up{job="site"}') == 1 and prom.scalar('up{job="gateway"}') == 1


def test_stats_needs_an_operator_ticket(metrics_site: tuple[Path, Path, str],
                                        fab: Fabric) -> None:
    from fabric import tickets
    from fabric.endpoint.deployments import DeploymentManager
    from fabric.serverclient import ServerClient
    from fabric.sites import load_site

    folder, state, _ = metrics_site
    fab.generate("warm", model=TINY_MODEL, max_tokens=1)
    mgr = DeploymentManager(load_site(str(folder)), state)
    (dep,) = mgr.db.query(states=("ready",))
    assert dep.address and dep.public_key
    user = tickets.issue(mgr.ticket_key(), model=dep.model, subject="someone", ttl_s=60)
    operator = tickets.issue(mgr.ticket_key(), model=dep.model, subject="op", ttl_s=60,
                             admin=True)
    with ServerClient(dep.address, dep.public_key, timeout_s=10) as c:
        with pytest.raises(TicketInvalid):
            c.stats(user)
        with pytest.raises(TicketInvalid):
            c.stats("forged")
        stats = c.stats(operator)
    assert stats["generation_tokens"] >= 1 and stats["kv_budget_tokens"] == 4096


def test_fabric_usage_reads_the_site_database(metrics_site: tuple[Path, Path, str],
                                              fab: Fabric, tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    from fabric.cli.main import main

    folder, state, _ = metrics_site
    since = datetime.fromtimestamp(time.time(), UTC).isoformat()
    results = [fab.generate("Cells divide", model=TINY_MODEL, max_tokens=n) for n in (2, 7)]
    results.append(fab.chat([{"role": "user", "content": "Hi"}], model=TINY_MODEL,
                            max_tokens=4))
    prompt = sum(r.usage.prompt_tokens for r in results)
    generated = sum(r.usage.completion_tokens for r in results)
    args = ["usage", "--site", str(folder), "--state-dir", str(state), "--since", since]

    def read(extra: list[str]) -> list[dict[str, Any]]:
        capsys.readouterr()
        assert main([*args, *extra, "--json"]) == 0
        return list(json.loads(capsys.readouterr().out))

    # Admissions are written by the workers within a second (policy._UsageWriter); the tokens
    # when the site collects the servers' tallies (the local site's reaper, every 15 s).
    rows = wait_until(lambda: [r for r in read([]) if r["requests"] == len(results)
                               and r["total_tokens"] == prompt + generated] or None,
                      60, "the usage rows of three requests and their tokens")
    assert rows == [{"identity": getpass.getuser(), "model": TINY_MODEL,
                     "requests": len(results), "prompt_tokens": prompt,
                     "generation_tokens": generated, "total_tokens": prompt + generated}]
    assert read(["--by", "model"])[0]["identity"] == "*"
    assert main([*args, "--csv", str(tmp_path / "usage.csv")]) == 0
    lines = (tmp_path / "usage.csv").read_text().splitlines()
    assert lines[0] == "identity,model,requests,prompt_tokens,generation_tokens,total_tokens"
    assert lines[1:] == [f"{getpass.getuser()},{TINY_MODEL},{len(results)},{prompt},"
                         f"{generated},{prompt + generated}"]
    capsys.readouterr()
    assert main([*args, "--by", "identity"]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split() == ["IDENTITY", "MODEL", "REQUESTS", "PROMPT", "GENERATION", "TOTAL"]
    assert table[1].split() == [getpass.getuser(), "*", str(len(results)), str(prompt),
                                str(generated), str(prompt + generated)]
    assert main([*args[:-1], "tomorrow"]) == 2  # a bad --since is a typed error
