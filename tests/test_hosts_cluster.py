"""A pp=2 SmolLM2 server across two namespace hosts, launched through Parsl's SlurmProvider.

The site endpoint runs on the ``login`` host (its network namespace), the server's two stages
on ``compute1`` and ``compute2`` (one slurmd each; gloo over their ``hsn0``), and the site's
``server.network`` names the cluster's subnet, so the head advertises its compute address.
Checked: greedy answers equal transformers'; a client on ``login`` connects to the compute node
directly; the ``laptop`` (whose only route is to ``login``) streams through the long-poll path
and its process never opens a connection to a compute node (Python's ``socket.connect``
audit events and its own TCP sockets in ``/proc/net/tcp``, ZMQ's included); and a compute
node that dies mid-stream gives the client a typed error, the deployment turns dead and the
next request relaunches it on the node that remains.

A walltime expiry in the middle of a campaign: the server's job gets its time limit cut below
its elapsed time (``scontrol update``) once the campaign has written some results, so Slurm's own
time-limit check ends it as ``TIMEOUT`` while the campaign still has most of its work to do.

The laptop reaches the site through the site's Unix socket (the hosts share a file system);
what crosses the network from the laptop is nothing at all, which is the point checked.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from fabric.endpoint.state import Deployment, StateDB
from fabric.testing.netns_cluster import COMPUTE_ADDRS, LOGIN_ADDR, SUBNET, Host
from tests.plugins.servers import hf_greedy_text
from tests.plugins.site import REPO_ROOT, TINY_MODEL, wait_until, write_site
from tests.plugins.slurm import SlurmCluster

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

MODEL = "smollm2-135m"
PROMPT = "The mitochondria is"
TOKENS = 12
CLIENT_TIMEOUT_S = 420


@dataclass
class ClusterSite:
    """The site endpoint running on the login host."""

    folder: Path
    state_dir: Path
    slurm: SlurmCluster

    def env(self) -> dict[str, str]:
        path = os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH")) if p)
        return {**os.environ, "PYTHONPATH": path, "SLURM_CONF": str(self.slurm.conf),
                "OMP_NUM_THREADS": "1"}

    def client(self, host: Host, mode: str, prompt: str = PROMPT,
               tokens: int = TOKENS) -> dict[str, Any]:
        """Run ``tests.hosts_client`` on ``host``; its JSON report."""
        proc = host.run([sys.executable, "-m", "tests.hosts_client", str(self.folder),
                         str(self.state_dir), mode, prompt, str(tokens)],
                        timeout=CLIENT_TIMEOUT_S, env=self.env())
        assert proc.returncode == 0, proc.stderr[-3000:]
        return dict(json.loads(proc.stdout.strip().splitlines()[-1]))

    @property
    def site_dir(self) -> Path:
        return self.folder

    def deployments(self, model: str = MODEL) -> list[Deployment]:
        return StateDB(self.state_dir).query(model=model)


def _site(slurm: SlurmCluster, folder: Path, plan: dict[str, Any],
          tiny: Path | None = None, walltime: str = "00:20:00",
          server: dict[str, Any] | None = None) -> ClusterSite:
    write_site(folder, name="hosts-test", workers=2, model_dir=tiny,
               jobs={"provider": {"type": "SlurmProvider", "partition": slurm.partition,
                                  "exclusive": False, "cmd_timeout": 30},
                     "launcher": {"type": "SrunLauncher"}, "walltime": walltime},
               server={"idle_timeout_s": 900, "ready_timeout_s": 300,
                       "kv_budget_tokens": 4096, "threads_per_rank": 1,
                       "network": {"advertise": SUBNET}, **(server or {})},
               models=[{"name": TINY_MODEL if tiny else MODEL, "plan": plan}])
    return ClusterSite(folder, folder / "state", slurm)


@pytest.fixture
def login_sites(slurm: SlurmCluster, tmp_path: Path) -> Iterator[Any]:
    """Starts site endpoints on the login host (``login_sites(plan)``); stops them (and their
    servers) and cancels every job afterwards."""
    hosts = slurm.hosts
    assert hosts is not None
    started: list[ClusterSite] = []

    def start(plan: dict[str, Any], tiny: Path | None = None, walltime: str = "00:20:00",
              server: dict[str, Any] | None = None) -> ClusterSite:
        site = _site(slurm, tmp_path / f"site{len(started)}", plan, tiny, walltime, server)
        started.append(site)
        code = ("from fabric.client.local import start_site; import sys; "
                "start_site(sys.argv[1], sys.argv[2], timeout_s=240)")
        proc = hosts.login.run([sys.executable, "-c", code, str(site.folder),
                                str(site.state_dir)], timeout=300, env=site.env())
        assert proc.returncode == 0, proc.stderr[-3000:]
        return site

    try:
        yield start
    finally:
        from fabric.client.local import stop_site

        try:
            for site in started:
                stop_site(str(site.folder), site.state_dir, all=True, timeout_s=60)
        finally:
            slurm.cancel_all()


def _inet(connects: list[str]) -> list[str]:
    """The IPv4 destinations among recorded connects (Unix sockets are paths)."""
    return [c for c in connects if c.startswith("(")]


def _host(address: str | None) -> str:
    return (address or "").removeprefix("tcp://").rpartition(":")[0]


def test_pp2_across_two_compute_nodes(login_sites: Any, slurm: SlurmCluster,
                                      smollm2_dir: Path) -> None:
    assert slurm.hosts is not None
    login_site = login_sites({"pp": 2, "nodes": 2})
    expected = hf_greedy_text(smollm2_dir, PROMPT, TOKENS)
    # laptop first: its request deploys the model (a 2-node Slurm job) and streams by poll
    laptop = login_site.client(slurm.hosts.laptop, "poll")
    assert laptop["error"] is None, laptop
    assert laptop["text"] == expected
    # no TCP at all from the laptop (let alone to a compute node), from Python or from ZMQ
    assert _inet(laptop["connects"]) == [] and laptop["peers"] == [], laptop
    route = slurm.hosts.laptop.run(["ip", "route", "get", COMPUTE_ADDRS["compute1"]])
    assert route.returncode != 0 and "unreachable" in route.stderr.lower()

    [dep] = [d for d in login_site.deployments() if d.state == "ready"]
    assert dep.plan["pp"] == 2 and dep.plan["nodes"] == 2
    assert _host(dep.address) in COMPUTE_ADDRS.values(), dep.address
    nodes = slurm.squeue("-h", "-j", str(dep.job_id), "-o", "%N").strip()
    assert nodes == "compute[1-2]", nodes
    # the rendezvous port was bound by rank 0 on the first compute node, not guessed on login
    run = Path(dep.info_path).parent
    rdv = json.loads((run / "rendezvous.json").read_text())
    launch = json.loads((run / "launch.json").read_text())
    assert launch["master_port"] == 0 and rdv["token"] == launch["rendezvous_token"], rdv
    assert rdv["addr"] == COMPUTE_ADDRS["compute1"] and 0 < rdv["port"] < 65536, rdv
    # one rank (a python process) in each compute node's namespace
    for host in slurm.hosts.computes:
        cmds = [Path(f"/proc/{p}/cmdline").read_bytes() for p in host.pids()
                if Path(f"/proc/{p}/cmdline").exists()]
        assert any(b"fabric.engine" in c for c in cmds), (host.name, cmds)

    login = login_site.client(slurm.hosts.login, "direct")
    assert login["error"] is None, login
    assert login["text"] == expected
    server = _host(dep.address)
    assert server in login["peers"], login  # ZMQ straight to the compute node
    assert server != LOGIN_ADDR


def test_a_compute_node_dies_mid_stream(login_sites: Any, slurm: SlurmCluster,
                                        smollm2_dir: Path) -> None:
    """Both stages on one node; that node's processes (slurmd, the ranks) are killed while a
    long answer streams: typed error within seconds, deployment dead, and the next request
    runs on the other node."""
    assert slurm.hosts is not None
    login_site = login_sites({"pp": 2, "nodes": 1})
    expected = hf_greedy_text(smollm2_dir, PROMPT, TOKENS)
    first = login_site.client(slurm.hosts.login, "direct")
    assert first["error"] is None and first["text"] == expected, first
    [dep] = [d for d in login_site.deployments() if d.state == "ready"]
    victim = slurm.squeue("-h", "-j", str(dep.job_id), "-o", "%N").strip()
    assert victim in COMPUTE_ADDRS, victim
    survivor = next(n for n in COMPUTE_ADDRS if n != victim)

    try:
        proc = subprocess.Popen(
            [*slurm.hosts.login.prefix(), sys.executable, "-m", "tests.hosts_client",
             str(login_site.folder), str(login_site.state_dir), "poll", PROMPT, "2000"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=login_site.env())
        try:
            time.sleep(8.0)  # the stream is under way (2000 tokens take minutes)
            assert proc.poll() is None, proc.communicate()
            killed_at = time.monotonic()
            assert slurm.hosts.kill_host(victim)
            out, err = proc.communicate(timeout=60)
            assert out.strip(), err[-3000:]
            waited = time.monotonic() - killed_at
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        report = json.loads(out.strip().splitlines()[-1])
        assert report["error"], report
        assert report["error"].split(":")[0] in ("ModelServerUnavailable", "DeploymentError",
                                                  "ModelServerError"), report
        assert waited < 30, waited

        # Slurm notices the node is gone (SlurmdTimeout=10 s), ends the job (JobRequeue=0), and a
        # worker asking the scheduler about the job id marks the deployment dead
        from fabric.endpoint.deployments import DeploymentManager
        from fabric.sites import load_site

        site = load_site(login_site.folder)
        mgr = DeploymentManager(site, login_site.state_dir)
        deadline, seen = time.monotonic() + 90, dep
        while time.monotonic() < deadline:
            seen = mgr.refresh(mgr.db.get(dep.id) or dep)
            if seen.state == "dead" and \
                    slurm.hosts.node_states().get(victim, "").startswith(("down", "drain")):
                break
            time.sleep(2.0)
        assert seen.state == "dead", (seen, slurm.hosts.node_states())
        assert slurm.hosts.node_states()[victim].startswith(("down", "drain"))
        again = login_site.client(slurm.hosts.login, "direct")
        assert again["error"] is None and again["text"] == expected, again
        [new] = [d for d in login_site.deployments() if d.state == "ready"]
        assert new.id != dep.id
        assert slurm.squeue("-h", "-j", str(new.job_id), "-o", "%N").strip() == survivor
    finally:  # give the node back for later tests
        slurm.hosts.start_slurmd(victim)
        deadline = time.monotonic() + 60
        while not slurm.hosts.node_states().get(victim, "").startswith("idle") \
                and time.monotonic() < deadline:
            time.sleep(1.0)


def _elapsed_s(slurm: SlurmCluster, job: str) -> int:
    """A running job's elapsed time from squeue (``%M``: [[D-]H:]M:SS), 0 when not running."""
    text = slurm.squeue("-h", "-t", "R", "-j", job, "-o", "%M").strip()
    if not text:
        return 0
    days, _, clock = text.rpartition("-")
    seconds = 0
    for part in clock.split(":"):
        seconds = seconds * 60 + int(part)
    return seconds + int(days or 0) * 86400


def _job_state(slurm: SlurmCluster, job: str) -> str:
    return slurm.squeue("-h", "-t", "all", "-j", job, "-o", "%T").strip()


def _lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


WALLTIME_WORK_S = 200.0
"""Serving time the campaign is sized for (at the rate measured just before): Slurm ends the
job ~35 s after its limit is cut (time limits are checked every 30 s, then KillWait), more on a
busy machine, and the campaign itself, sending whole shards at once, serves up to about twice
the warm-up's rate. At 100 s a clean CI run saw the campaign's 180 inputs all written before
the job ended (the expiry then came after the campaign, not in it)."""
SHARD_WORK_S = 20.0
"""Serving time of one shard (at that rate): four times KillWait (5 s)."""


def _long_inputs(folder: Path) -> None:
    """Give each input of ``folder/in.jsonl`` its own length, 200-480 new tokens, so shards do
    not end together."""
    path = folder / "in.jsonl"
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    for i, line in enumerate(lines):
        line["max_tokens"] = 200 + (i * 37) % 281
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))


def test_walltime_expiry_mid_campaign_loses_nothing(login_sites: Any, slurm: SlurmCluster,
                                                    tmp_path: Path, tiny_llama_dir: Path) -> None:
    """The tiny model's server runs as a Slurm job on a compute node. (The one walltime
    test on Slurm: it also checks what the launcher and the deployment record say of the
    expired job.) A campaign with
    ``max_attempts: 1`` (an input's failure is final) runs against it; once it has written
    some results, the job's time limit is cut below its elapsed time, and Slurm ends it as
    TIMEOUT at its next check (SIGTERM, then SIGKILL after KillWait), cutting requests
    mid-generation. Checked on what the campaign wrote and what Slurm says: the job timed out
    while the campaign ran (results from the expired server and from its relaunch), every
    input has exactly one output line and none an error line, and the requests the expired
    server had accepted were resent to its relaunch, not failed (their provenance names the
    expired deployment as ``resent_from``)."""
    from fabric.campaign import store
    from fabric.campaign.api import Campaign
    from fabric.endpoint.deployments import DeploymentManager
    from fabric.sites import load_site
    from tests.test_campaign_site import audit_counts, invariant, make_campaign

    # One request at a time, first come first served: the server's queue always holds the
    # other shard in flight (SHARD_WORK_S of work), so it is busy from Slurm's SIGTERM to its
    # SIGKILL (KillWait, 5 s) and dies holding requests it had accepted.
    site = login_sites({"pp": 1}, tiny=tiny_llama_dir, server={"max_running": 1})
    config = load_site(site.folder)
    mgr = DeploymentManager(config, site.state_dir)  # a worker of the same site (state dir)
    first = mgr.ensure(config.extra_models[0], wait_s=240)
    assert first.job_id
    shape: dict[str, Any] = {"shard_size": 20, "max_attempts": 1,
                             "sampling": {"max_tokens": 200, "temperature": 0.0}}
    # Slurm counts limits in whole minutes: the job must have run more than one before its
    # limit can be cut below its elapsed time. A warm-up campaign of the same shape fills
    # that minute and measures the rate the real one is sized by.
    (tmp_path / "warm").mkdir()
    started = time.monotonic()
    warm_manifest = make_campaign(tmp_path / "warm", site, 40, name="warm", **shape)
    _long_inputs(tmp_path / "warm")  # before create, which reads the inputs
    warm = store.create(warm_manifest, tmp_path / "home")
    warm_run = Campaign(warm).start()
    try:
        assert warm_run.wait(timeout=150)["status"] == "done"
    finally:
        warm_run.stop()  # on failure too: a runner left going would restart the stopped site
    rate = 40 / (time.monotonic() - started)
    deadline = time.monotonic() + 90
    while _elapsed_s(slurm, first.job_id) < 62:
        assert time.monotonic() < deadline, slurm.squeue("-t", "all")
        time.sleep(0.5)

    size = max(20, math.ceil(rate * SHARD_WORK_S))
    # two shards in flight, each sent whole: within the server's queue (256)
    assert 2 * size <= 256, f"the tiny model serves {rate:.1f} inputs/s: too fast to size for"
    n = max(4 * size, min(2000, math.ceil(rate * WALLTIME_WORK_S / size) * size))
    shape.update(shard_size=size, concurrency=size)
    manifest = make_campaign(tmp_path, site, n, name="wall", **shape)
    _long_inputs(tmp_path)
    folder = store.create(manifest, tmp_path / "home")
    results = Path(store.load(folder).output) / store.RESULTS
    campaign = Campaign(folder).start()
    try:
        wait_until(lambda: len(_lines(results)) >= 20, 150, "the campaign's first results")
        before = len(_lines(results))
        cut_at = time.monotonic()
        # below its elapsed time: Slurm's next time-limit check (within 30 s) ends the job
        proc = subprocess.run(["scontrol", "update", f"JobId={first.job_id}", "TimeLimit=1"],
                              capture_output=True, text=True, check=False,
                              env={**os.environ, "SLURM_CONF": str(slurm.conf)})
        assert proc.returncode == 0, proc.stderr
        wait_until(lambda: _job_state(slurm, first.job_id) == "TIMEOUT", 75,
                   "Slurm to end the job at its (cut) time limit")
        ended_s = time.monotonic() - cut_at
        at_expiry = len(_lines(results))
        status = campaign.wait(timeout=300)
    finally:
        campaign.stop()
    assert status["status"] == "done", status

    # Slurm's record: squeue (MinJobAge keeps it) and sacct's job completion log
    assert _job_state(slurm, first.job_id) == "TIMEOUT"
    acct = subprocess.run(["sacct", "-c", "-n", "-P", "-j", first.job_id, "-o", "JobID,State"],
                          capture_output=True, text=True, check=False,
                          env={**os.environ, "SLURM_CONF": str(slurm.conf)})
    assert f"{first.job_id}|TIMEOUT" in acct.stdout.split(), (acct.stdout, acct.stderr)
    # ... and what the site's launcher (a fresh Parsl SlurmProvider, as another request
    # worker would hold) reads of it
    from fabric.endpoint.jobs import JobState

    job = DeploymentManager(config, site.state_dir).launcher().status([first.job_id])
    assert job[first.job_id].state is JobState.TIMEOUT, job

    # exactly one line per input, all outputs, none an error
    out, err = invariant(folder, n)
    assert not err, [(e["custom_id"], e["error"]) for e in err[:3]]
    assert len(out) == n
    # the expiry came mid-campaign: results before it and after it, from both servers
    assert 20 <= before <= at_expiry < n, (before, at_expiry, n)
    by_dep: dict[str, set[str]] = {}
    for rec in out:
        by_dep.setdefault(rec["provenance"]["deployment_id"], set()).add(rec["custom_id"])
    assert first.id in by_dep and len(by_dep) >= 2, {k: len(v) for k, v in by_dep.items()}
    # the expired deployment is dead; its successor ran in another job
    deps = {d.id: d for d in site.deployments(TINY_MODEL)}
    assert deps[first.id].state == "dead", deps[first.id]
    later = [deps[d] for d in by_dep if d != first.id]
    assert all(d.job_id and d.job_id != first.job_id for d in later), later
    # the expiry cut requests: those the expired server had accepted were run again, whole,
    # by its relaunch in the same shard and attempt, and their provenance says so
    resent = [r for r in out if r["provenance"].get("resent_from") == first.id]
    shards: dict[str, set[str]] = {}
    for rec in out:
        shards.setdefault(rec["shard"], set()).add(rec["provenance"]["deployment_id"])
    cut = [s for s, d in shards.items() if len(d) > 1 and first.id in d]
    print(json.dumps({"inputs": n, "shard_size": size, "results_at_cut": before,
                      "results_at_timeout": at_expiry, "timeout_after_cut_s": round(ended_s, 1),
                      "campaign_s": status["elapsed_s"], "shards_split": len(cut),
                      "inputs_resent": len(resent)}))
    assert resent, {s: sorted(d) for s, d in shards.items()}
    assert all(r["provenance"]["deployment_id"] not in ("", first.id) for r in resent)
    assert {r["provenance"].get("resent_from") for r in out} <= {None, first.id}
    assert all(rec["attempt"] == 1 for rec in out)
    # and the site ran each input once (its own audit file)
    assert set(audit_counts(site.state_dir, "wall").values()) == {1}
