"""A federation of three real local sites (``fabric.testing.federation``), each with a warm
tiny-Llama server: routing spreads calls and says who served them, the gateway and
``AsyncFabric`` route the same way, a campaign keeps exactly one line per input when one site
is killed under it, and calls fail over when the busiest site is killed under load.

The tests share one federation (started once, about 25 s on two cores) and run in file order:
the campaign kills one site, the last test another.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import yaml

from fabric import Stream
from fabric.aio import AsyncFabric
from fabric.campaign import store
from fabric.campaign.api import Campaign
from fabric.errors import FabricError
from fabric.sdk import Fabric
from fabric.testing.federation import TINY_MODEL, LocalFederation, wait_until_dead
from tests.test_campaign_site import invariant, wait_for

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def sites(tmp_path_factory: pytest.TempPathFactory, tiny_llama_dir: Path
          ) -> Iterator[LocalFederation]:
    fed = LocalFederation(tmp_path_factory.mktemp("federation"), tiny_llama_dir, 3)
    try:
        fed.start()
        fed.warm()
        yield fed
    finally:
        fed.close()


@pytest.fixture
def fab(sites: LocalFederation) -> Iterator[Fabric]:
    with Fabric(sites=sites.refs, on_status=None,
                routing={"status_ttl_s": 0.5, "down_ttl_s": 5}) as client:
        yield client


def test_concurrent_calls_spread_over_warm_sites_and_say_where(fab: Fabric) -> None:
    assert fab.sites == ["fed-0", "fed-1", "fed-2"]
    ranking = fab.federation.ranking(TINY_MODEL)  # type: ignore[union-attr]
    assert [r.tier for r in ranking] == ["warm"] * 3

    def one(i: int) -> Any:
        return fab.generate(f"Prompt {i}: the cell", model=TINY_MODEL, max_tokens=16)

    with ThreadPoolExecutor(9) as pool:
        results = list(pool.map(one, range(27)))
    served = Counter(r.site for r in results)
    assert set(served) <= set(fab.sites) and len(served) >= 2, served
    assert all(r.provenance is not None and r.provenance.site == r.site for r in results)
    stats = fab.federation.stats.snapshot()  # type: ignore[union-attr]
    assert sum(row["count"] for row in stats["served"]) == 27
    with fab.stream("Tell me", model=TINY_MODEL, max_tokens=6) as stream:
        text = "".join(stream)
    assert stream.site in fab.sites and stream.result is not None
    assert stream.result.site == stream.site and stream.result.text == text
    rows = fab.deployments()
    assert {r["site"] for r in rows if r["state"] == "ready"} == set(fab.sites)


def test_async_fabric_and_gateway_route_over_the_sites(sites: LocalFederation,
                                                       tmp_path: Path) -> None:
    from fabric.gateway import GatewayConfig, create_app
    from tests.test_gateway_unit import running_server

    async def go() -> tuple[set[str | None], str | None]:
        async with AsyncFabric(sites=sites.refs, on_status=None) as client:
            assert client.sites == ["fed-0", "fed-1", "fed-2"]
            results = await asyncio.gather(*[
                client.generate(f"q{i}", model=TINY_MODEL, max_tokens=8) for i in range(6)])
            stream = await client.stream("Hi", model=TINY_MODEL, max_tokens=4)
            async for _ in stream:
                pass
            return {r.site for r in results}, stream.site

    served, streamed = asyncio.run(go())
    assert served <= {"fed-0", "fed-1", "fed-2"} and None not in served
    assert streamed in {"fed-0", "fed-1", "fed-2"}

    import openai

    config = GatewayConfig(sites=sites.refs, home=tmp_path / "gw", rate=0)
    with running_server(create_app(config)) as url, \
            openai.OpenAI(base_url=f"{url}/v1", api_key="EMPTY", max_retries=0) as oa:
        reply = oa.chat.completions.create(model=TINY_MODEL, max_tokens=4, messages=[
            {"role": "user", "content": "Hello"}])
        assert reply.choices[0].model_extra is not None
        assert reply.choices[0].model_extra["site"] in {"fed-0", "fed-1", "fed-2"}
        models = {m.id: m for m in oa.models.list()}
        assert models[TINY_MODEL].model_extra is not None
        assert sorted(models[TINY_MODEL].model_extra["sites"]) == ["fed-0", "fed-1", "fed-2"]


def campaign_manifest(tmp: Path, sites: LocalFederation, n: int) -> Path:
    lines = [json.dumps({"custom_id": f"id-{i:04d}", "prompt": f"Prompt {i}: the cell"})
             for i in range(n)]
    (tmp / "in.jsonl").write_text("\n".join(lines) + "\n")
    data = {"name": "fed", "model": TINY_MODEL, "kind": "generate",
            "sampling": {"max_tokens": 3, "temperature": 0.0},
            "input": {"path": "in.jsonl"}, "output": "out", "shard_size": 10,
            "max_attempts": 3, "audit": True,
            "sites": [{"name": s.ref, "max_in_flight": 2} for s in sites.sites]}
    (tmp / "m.yaml").write_text(yaml.safe_dump(data))
    return tmp / "m.yaml"


def test_campaign_over_three_sites_survives_one_dying(sites: LocalFederation,
                                                      tmp_path: Path) -> None:
    n = 1000
    folder = store.create(campaign_manifest(tmp_path, sites, n), tmp_path / "home")
    c = Campaign(folder).start()
    wait_for(lambda: int(store.status(folder)["done"]) >= 40, 300, "40 inputs")
    per_site = {name: v["shards"] for name, v in store.status(folder)["sites"].items()}
    assert len(per_site) >= 2, per_site  # spread, not one site doing it all
    victim = sites.sites[0]
    # Counted once it is dead: finding its processes takes a while on a loaded machine, and
    # the shards it finishes meanwhile are its own.
    assert wait_until_dead(sites.kill(victim.name))
    killed_at = int(store.status(folder)["done"])
    status = c.wait(timeout=600)
    assert status["status"] == "done", status
    out, err = invariant(folder, n)  # exactly one line per input, none missing
    assert len(out) == n and not err
    assert killed_at < n // 2, killed_at  # it died early in the campaign
    after = [r for r in out if r["site"] != victim.name]
    assert len(after) >= n - killed_at  # what was left was done elsewhere
    assert {r["site"] for r in out} - {victim.name}  # by the other sites


def test_busiest_site_killed_under_load_calls_fail_over(sites: LocalFederation,
                                                        fab: Fabric) -> None:
    """Eight threads each loop streams; kill the site serving most; every stream that fails
    had already streamed and failed with a typed error, every later call is served, and
    the first token after the kill comes from another site well within 2 s."""
    stop = threading.Event()
    lock = threading.Lock()
    events: list[tuple[float, str, str, int]] = []  # (first token time, site, outcome, tokens)
    killed_at: list[float] = []

    def worker(k: int) -> None:
        i = 0
        deadline = time.monotonic() + 90
        while not stop.is_set() and time.monotonic() < deadline and i < 400:
            i += 1
            first = None
            stream: Stream | None = None
            try:
                stream = fab.stream(f"Worker {k} request {i}", model=TINY_MODEL, max_tokens=24)
                with stream:
                    for _ in stream:
                        if first is None:
                            first = time.monotonic()
                outcome = "ok"
            except FabricError as exc:
                outcome = type(exc).__name__
            except Exception as exc:  # untyped: a bug, reported by the assertion below
                outcome = f"untyped {type(exc).__name__}"
            # Counted from the stream, not from the text chunks seen: a random model's first
            # tokens may decode to no text yet (part of a UTF-8 character), and a stream
            # that delivered token ids has produced output, so it stays where it is.
            tokens = len(stream.token_ids) if stream is not None else 0
            site = (stream.site or "-") if stream is not None else "-"
            with lock:
                events.append((first or time.monotonic(), site, outcome, tokens))

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    try:
        wait_for(lambda: len(events) >= 40, 120, "40 streams before the kill")
        with lock:
            busiest = Counter(site for _, site, _, _ in events).most_common(1)[0][0]
        # Timed from the signals (finding the site's processes first takes a while on a
        # loaded machine, and its streams go on meanwhile).
        pids = sites.kill(busiest)
        killed_at.append(time.monotonic())
        assert wait_until_dead(pids)
        wait_for(lambda: sum(1 for e in list(events) if e[0] > killed_at[0] and
                             e[2] == "ok") >= 40, 120, "40 streams after the kill")
    finally:
        stop.set()
        for t in threads:
            t.join(60)
    failed = [e for e in events if e[2] != "ok"]
    assert all(not e[2].startswith("untyped") for e in failed), failed
    # Only streams that already had tokens may fail (nothing else was in flight there).
    assert all(e[3] > 0 for e in failed), failed
    after = sorted(e for e in events if e[0] > killed_at[0] and e[2] == "ok")
    # A stream the killed site had already served whole may be read (its first token timed)
    # only after the kill, on a loaded machine: at most one per thread, as with the failures.
    assert after and all(e[1] != busiest for e in after[len(threads):]), after[:10]
    first_elsewhere = next(e[0] for e in after if e[1] != busiest)
    assert first_elsewhere - killed_at[0] < 2.0
    # Only what was in flight on the killed site when it died may fail: at most one stream
    # per thread, each one that site had started serving.
    assert len(failed) <= len(threads) and all(e[1] == busiest for e in failed), failed
    stats = fab.federation.stats.snapshot()  # type: ignore[union-attr]
    assert {row["site"] for row in stats["served"]} > {busiest}  # the others served too
