"""The namespace cluster's plan, without building it: every address in 198.18.0.0/15, the laptop
off the compute network, one slurmd per compute node at its own address (the cluster itself is
exercised by every Slurm test: ``tests/plugins/slurm.py``)."""

from __future__ import annotations

import ipaddress
from pathlib import Path

from fabric.testing import netns_cluster as nc


def test_addresses_are_in_the_benchmarking_range_and_the_laptop_is_apart() -> None:
    bench = ipaddress.ip_network("198.18.0.0/15")
    subnet, lan = ipaddress.ip_network(nc.SUBNET), ipaddress.ip_network(nc.LAN)
    addrs = [nc.HOST_ADDR, nc.LOGIN_ADDR, nc.LOGIN_LAN_ADDR, nc.LAPTOP_ADDR,
             *nc.COMPUTE_ADDRS.values()]
    assert all(ipaddress.ip_address(a) in bench for a in addrs)
    assert subnet.subnet_of(bench) and lan.subnet_of(bench)  # type: ignore[arg-type]
    assert ipaddress.ip_address(nc.LAPTOP_ADDR) not in subnet
    assert all(ipaddress.ip_address(a) in subnet for a in nc.COMPUTE_ADDRS.values())
    assert len(set(addrs)) == len(addrs)


def test_conf_gives_each_compute_node_its_own_address(tmp_path: Path) -> None:
    conf = nc._write_conf(tmp_path, cpus=4).read_text()
    nodes = {}
    for line in conf.splitlines():
        if line.startswith("NodeName="):
            fields = dict(f.split("=", 1) for f in line.split())
            nodes[fields["NodeName"]] = fields["NodeAddr"]
    assert nodes == nc.COMPUTE_ADDRS
    assert f"SlurmctldHost=login({nc.LOGIN_ADDR})" in conf
    assert "SlurmdPidFile=" in conf and "%n" in conf.split("SlurmdPidFile=")[1].split()[0]
    assert "JobRequeue=0" in conf  # a dead node's job ends; the fabric relaunches, not Slurm
    # every job's end is logged, so `sacct -c` (no slurmdbd here) can say how it ended
    assert "JobCompType=jobcomp/filetxt" in conf and f"JobCompLoc={tmp_path}/log/" in conf


def test_host_prefix_enters_the_namespace_with_its_hostname() -> None:
    argv = nc.Host("compute1", "fabcl-compute1", "198.18.16.11").prefix()
    assert argv[:2] == ["nsenter", "--net=/run/netns/fabcl-compute1"]
    assert "hostname compute1" in " ".join(argv)
