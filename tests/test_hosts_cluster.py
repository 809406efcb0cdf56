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

(A walltime expiry in the middle of a campaign is not here yet: commit c1a47b1 of the branch
`cluster` has a version whose expiry, in its one run, landed only after the campaign ended.)

The laptop reaches the site through the site's Unix socket (the hosts share a file system);
what crosses the network from the laptop is nothing at all, which is the point checked.
"""

from __future__ import annotations

import json
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
from tests.plugins.site import REPO_ROOT, TINY_MODEL, write_site
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
          tiny: Path | None = None, walltime: str = "00:20:00") -> ClusterSite:
    write_site(folder, name="hosts-test", workers=2, model_dir=tiny,
               jobs={"provider": {"type": "SlurmProvider", "partition": slurm.partition,
                                  "exclusive": False, "cmd_timeout": 30},
                     "launcher": {"type": "SrunLauncher"}, "walltime": walltime},
               server={"idle_timeout_s": 900, "ready_timeout_s": 300,
                       "kv_budget_tokens": 4096, "threads_per_rank": 1,
                       "network": {"advertise": SUBNET}},
               models=[{"name": TINY_MODEL if tiny else MODEL, "plan": plan}])
    return ClusterSite(folder, folder / "state", slurm)


@pytest.fixture
def login_sites(slurm: SlurmCluster, tmp_path: Path) -> Iterator[Any]:
    """Starts site endpoints on the login host (``login_sites(plan)``); stops them (and their
    servers) and cancels every job afterwards."""
    hosts = slurm.hosts
    assert hosts is not None
    started: list[ClusterSite] = []

    def start(plan: dict[str, Any], tiny: Path | None = None,
              walltime: str = "00:20:00") -> ClusterSite:
        site = _site(slurm, tmp_path / f"site{len(started)}", plan, tiny, walltime)
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


def hf_greedy_text(folder: Path, prompt: str, n: int) -> str:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    ids = tok(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=n, do_sample=False)
    return str(tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True))


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
