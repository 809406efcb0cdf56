"""The rendezvous host of a multi-node job: the first node's Slurm NodeAddr (a node name need
not resolve), read from recorded ``scontrol show node -o`` output."""

from __future__ import annotations

from fabric.engine.dist import node_addr

# Recorded from the namespace test cluster (fabric.testing.netns_cluster), Slurm 22.05.8.
SHOWN = ("NodeName=compute1 Arch=x86_64 CoresPerSocket=1 CPUAlloc=0 CPUEfctv=4 CPUTot=4 "
         "CPULoad=0.50 AvailableFeatures=(null) ActiveFeatures=(null) Gres=(null) "
         "NodeAddr=198.18.16.11 NodeHostName=compute1 Version=22.05.8 OS=Linux "
         "RealMemory=1 AllocMem=0 FreeMem=N/A Sockets=4 Boards=1 State=IDLE ThreadsPerCore=1 "
         "TmpDisk=0 Weight=1 Owner=N/A MCS_label=N/A Partitions=debug")


def test_node_addr_is_read_from_scontrol() -> None:
    assert node_addr(SHOWN) == "198.18.16.11"


def test_no_node_addr_gives_none() -> None:
    assert node_addr("") is None
    assert node_addr("NodeName=x NodeAddr= State=IDLE") is None
