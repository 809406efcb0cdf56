"""Which address a model server binds and advertises, resolved on the node it runs on.

A site's ``server.network.advertise`` (``fabric.sites.NetworkConfig``) names the network its
request workers reach compute nodes on, in one of three forms; each rank resolves it when it
starts, on its own node, because only the node knows its addresses:

- an interface name (``hsn0``: Slingshot on Polaris, Perlmutter and Aurora): that interface's
  IPv4 address;
- a CIDR (``198.18.0.0/15``): this node's address inside it;
- a literal address (``127.0.0.1``, the local site's default): itself, if this node has it.

No match raises ``AddressNotFound`` listing what the node has. Addresses are read with the
``SIOCGIFADDR`` ioctl (the primary IPv4 address of each interface: what ``ip addr`` shows
first), so nothing outside the standard library is needed on a compute node.
"""

from __future__ import annotations

import fcntl
import ipaddress
import socket
import struct
from collections.abc import Sequence
from dataclasses import dataclass

from fabric.errors import DeploymentError
from fabric.sites import NetworkConfig, network_kind

_SIOCGIFADDR = 0x8915  # linux/sockios.h
_SIOCGIFNETMASK = 0x891B


class AddressNotFound(DeploymentError):
    """This node has no address matching the site's ``server.network`` setting (no such
    interface, or none inside the CIDR). ``details['available']`` lists the node's interfaces
    and addresses; fix the site definition. A relaunch on the same kind of node fails alike."""

    retryable = False


@dataclass(frozen=True)
class Interface:
    """One network interface of this node with its (primary) IPv4 address."""

    name: str
    address: ipaddress.IPv4Address
    network: ipaddress.IPv4Network
    """The attached subnet (address and netmask)."""

    def __str__(self) -> str:
        return f"{self.name} {self.address}/{self.network.prefixlen}"


def _ioctl_ipv4(sock: socket.socket, request: int, name: str) -> ipaddress.IPv4Address:
    # struct ifreq: 16-byte name, then a sockaddr_in whose address sits at bytes 20..24
    result = fcntl.ioctl(sock.fileno(), request, struct.pack("256s", name.encode()[:15]))
    return ipaddress.IPv4Address(result[20:24])


def interfaces() -> list[Interface]:
    """This node's interfaces that have an IPv4 address (down or IPv6-only ones are left out)."""
    found = []
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        for _, name in socket.if_nameindex():
            try:
                address = _ioctl_ipv4(sock, _SIOCGIFADDR, name)
                mask = _ioctl_ipv4(sock, _SIOCGIFNETMASK, name)
            except OSError:  # EADDRNOTAVAIL: no IPv4 address on it
                continue
            network = ipaddress.IPv4Network(f"{address}/{mask}", strict=False)
            found.append(Interface(name, address, network))
    return found


def resolve(setting: str, available: Sequence[Interface] | None = None) -> Interface:
    """The interface (and its address) of this node that ``setting`` names.

    ``available`` defaults to ``interfaces()``; tests pass their own. Raises
    ``AddressNotFound`` when nothing matches, listing what the node has.
    """
    have = list(interfaces() if available is None else available)
    kind = network_kind(setting)
    if kind == "interface":
        match = [i for i in have if i.name == setting]
        wanted = f"interface {setting!r}"
    elif kind == "cidr":
        net = ipaddress.IPv4Network(setting, strict=False)
        match = [i for i in have if i.address in net]
        wanted = f"an address in {net}"
    else:
        addr = ipaddress.IPv4Address(setting)
        match = [i for i in have if i.address == addr]
        wanted = f"address {addr}"
    if not match:
        listed = [str(i) for i in have]
        raise AddressNotFound(
            f"server.network.advertise={setting!r}: this node ({socket.gethostname()}) has no "
            f"{wanted}; it has {', '.join(listed) or 'no IPv4 address'}",
            setting=setting, host=socket.gethostname(), available=listed)
    return match[0]


@dataclass(frozen=True)
class FrontDoor:
    """Where the head rank's ROUTER listens and the address it advertises."""

    bind: str
    advertise: str
    interface: str
    """The advertised address's interface (gloo/nccl use it across nodes)."""


def front_door(network: NetworkConfig, available: Sequence[Interface] | None = None) -> FrontDoor:
    """Resolve ``network`` on this node: bind on the chosen address (or on every interface with
    ``bind: all``) and advertise the chosen address."""
    chosen = resolve(network.advertise, available)
    address = str(chosen.address)
    return FrontDoor(bind="0.0.0.0" if network.bind == "all" else address, advertise=address,
                     interface=chosen.name)


def is_local(host: str) -> bool:
    """True when ``host`` (an address) is one of this node's addresses (loopback included)."""
    try:
        addr = ipaddress.ip_address(host)
    except ValueError:
        return False
    return addr.is_loopback or any(i.address == addr for i in interfaces())
