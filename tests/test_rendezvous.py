"""The torch.distributed rendezvous port is chosen by rank 0 where it runs
(``fabric.engine.rendezvous``), not probed on the submitting host."""

from __future__ import annotations

import json
import multiprocessing as mp
import socket
import threading
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import torch.distributed as dist

from fabric.engine import rendezvous
from fabric.engine.dist import RankInfo, init_groups, is_loopback, resolve_master, socket_interface
from fabric.errors import InvalidPlan, RendezvousTimeout


def _rank(rank: int, path: str, token: str, out: Any) -> None:
    import torch

    init_groups(RankInfo(rank=rank, world=2, pp=2, tp=1), "127.0.0.1", 0, "gloo",
                rendezvous_file=Path(path), token=token, timeout=timedelta(seconds=60))
    t = torch.tensor([float(rank + 1)])
    dist.all_reduce(t)
    out.put((rank, float(t.item())))
    dist.destroy_process_group()


def test_two_ranks_meet_on_the_port_rank0_bound(tmp_path: Path) -> None:
    """Rank 1 starts first and waits; a file left by another launch (other token, a dead port)
    is ignored; rank 0 binds port 0 and publishes the port it got; gloo then works."""
    path = tmp_path / "rendezvous.json"
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]
    rendezvous.publish(path, "other-launch", "127.0.0.1", dead)
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_rank, args=(r, str(path), "this-launch", out)) for r in (1, 0)]
    try:
        for p in procs:
            p.start()
        got = dict(out.get(timeout=120) for _ in procs)
        assert got == {0: 3.0, 1: 3.0}
        published = json.loads(path.read_text())
        assert published["token"] == "this-launch" and published["addr"] == "127.0.0.1"
        assert published["port"] not in (0, dead)
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    assert [p.exitcode for p in procs] == [0, 0]


def test_a_stale_port_of_this_launch_is_read_again(tmp_path: Path) -> None:
    """A requeued job's rank may read the previous run's port: it fails to connect and rereads
    the file once the new rank 0 has published."""
    path = tmp_path / "rendezvous.json"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]
    rendezvous.publish(path, "tok", "127.0.0.1", dead)
    stores: list[Any] = []
    timer = threading.Timer(1.5, lambda: stores.append(rendezvous.master_store(
        path, "tok", "127.0.0.1", 2, timedelta(seconds=30))))
    timer.start()
    try:
        addr, client = rendezvous.client_store(path, "tok", 2, timedelta(seconds=30),
                                               connect_s=0.5)
        assert addr == "127.0.0.1"
        client.set("k", "v")
        assert stores and stores[0].get("k") == b"v"
        assert rendezvous.read(path, "tok") == ("127.0.0.1", stores[0].port) != (addr, dead)
    finally:
        timer.cancel()


def test_no_rank0_is_a_typed_timeout(tmp_path: Path) -> None:
    path = tmp_path / "rendezvous.json"
    rendezvous.publish(path, "someone-else", "127.0.0.1", 1)
    with pytest.raises(RendezvousTimeout) as err:
        rendezvous.client_store(path, "mine", 2, timedelta(seconds=0.6))
    assert err.value.retryable and str(path) in err.value.message
    assert rendezvous.read(tmp_path / "missing.json", "mine") is None


def test_port_zero_needs_a_file() -> None:
    with pytest.raises(ValueError):
        init_groups(RankInfo(rank=1, world=2, pp=2, tp=1), "127.0.0.1", 0, "gloo")


def test_auto_outside_a_job_is_refused_not_loopback(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SLURM_JOB_NODELIST", raising=False)
    monkeypatch.delenv("PBS_NODEFILE", raising=False)
    with pytest.raises(InvalidPlan):
        resolve_master("auto")
    assert resolve_master("198.18.0.2") == "198.18.0.2"


def test_any_loopback_rendezvous_uses_lo() -> None:
    assert is_loopback("127.0.0.2") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("198.18.0.2") and not is_loopback("node01")
    assert socket_interface("127.0.0.5", None) == "lo"
