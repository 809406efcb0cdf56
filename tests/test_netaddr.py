"""The bind/advertise resolver (``fabric.engine.netaddr``) against this host's real interfaces."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest

from fabric.engine import netaddr
from fabric.engine.dist import socket_interface
from fabric.engine.netaddr import AddressNotFound, Interface, front_door, resolve
from fabric.errors import InvalidSiteConfig
from fabric.sites import NetworkConfig, ServerConfig, load_site


def iface(name: str, cidr: str) -> Interface:
    net = ipaddress.IPv4Interface(cidr)
    return Interface(name, net.ip, net.network)


def test_loopback_by_name_cidr_and_address() -> None:
    lo = resolve("lo")
    assert str(lo.address) == "127.0.0.1" and lo.network.prefixlen == 8
    assert resolve("127.0.0.0/8").name == "lo"
    assert resolve("127.0.0.1").name == "lo"
    door = front_door(NetworkConfig())
    assert (door.bind, door.advertise, door.interface) == ("127.0.0.1", "127.0.0.1", "lo")
    assert front_door(NetworkConfig(bind="all")).bind == "0.0.0.0"


def test_a_matching_cidr_picks_the_address_inside_it() -> None:
    have = [iface("lo", "127.0.0.1/8"), iface("eth0", "198.19.4.7/24"),
            iface("hsn0", "198.18.3.9/16")]
    assert resolve("198.18.0.0/16", have) == have[2]
    assert resolve("198.18.0.0/15", have) == have[1]  # first in the kernel's order
    assert resolve("hsn0", have).address == ipaddress.IPv4Address("198.18.3.9")
    door = front_door(NetworkConfig(advertise="198.18.0.0/16"), have)
    assert (door.bind, door.advertise, door.interface) == ("198.18.3.9", "198.18.3.9", "hsn0")


def test_no_match_is_a_typed_error_listing_the_host() -> None:
    with pytest.raises(AddressNotFound) as err:
        resolve("198.18.0.0/15", [iface("lo", "127.0.0.1/8")])
    assert "198.18.0.0/15" in str(err.value) and "lo 127.0.0.1/8" in str(err.value)
    assert err.value.details["available"] == ["lo 127.0.0.1/8"]
    assert not err.value.retryable
    real = [str(i) for i in netaddr.interfaces()]
    with pytest.raises(AddressNotFound) as err:
        resolve("hsn9")  # no such interface here
    assert err.value.details["available"] == real and "lo 127.0.0.1/8" in real
    with pytest.raises(AddressNotFound, match=r"address 198\.18\.0\.9"):
        resolve("198.18.0.9")


def test_site_schema_validates_the_setting() -> None:
    assert ServerConfig().network.advertise == "127.0.0.1"
    for good in ("hsn0", "198.18.0.0/15", "198.18.0.2", "bond0.100"):
        assert NetworkConfig(advertise=good).advertise == good
    for bad in ("198.18.0.0/33", "fd00::1", "hsn0; rm -rf /", "", "bind all"):
        with pytest.raises(ValueError):
            NetworkConfig(advertise=bad)
    with pytest.raises(ValueError):
        NetworkConfig(advertise="lo", bind="everything")  # type: ignore[arg-type]
    for site in ("polaris", "perlmutter", "aurora"):
        assert load_site(site).server.network.advertise == "hsn0"
    assert load_site("local").server.network == NetworkConfig()


def test_is_local_knows_this_hosts_addresses() -> None:
    assert netaddr.is_local("127.0.0.1") and netaddr.is_local("127.0.0.5")
    assert all(netaddr.is_local(str(i.address)) for i in netaddr.interfaces())
    assert not netaddr.is_local("198.18.255.254") and not netaddr.is_local("node07")


def test_invalid_setting_in_a_site_file_is_invalid_site_config(tmp_path: Path) -> None:
    (tmp_path / "fabric.yaml").write_text(
        "name: t\nserver:\n  network: {advertise: '198.18.0.0/99'}\n")
    with pytest.raises(InvalidSiteConfig, match="CIDR"):
        load_site(tmp_path)


def test_ranks_sockets_follow_the_network_setting_across_nodes() -> None:
    assert socket_interface("127.0.0.1", None) == "lo"
    assert socket_interface("127.0.0.1", NetworkConfig(advertise="hsn9")) == "lo"  # one node
    assert socket_interface("node01", None) is None
    assert socket_interface("node01", NetworkConfig()) is None  # loopback: libraries choose
    for i in netaddr.interfaces():
        if not i.address.is_loopback:
            assert socket_interface("node01", NetworkConfig(advertise=f"{i.network}")) == i.name
    with pytest.raises(AddressNotFound):
        socket_interface("node01", NetworkConfig(advertise="198.19.254.0/24"))
