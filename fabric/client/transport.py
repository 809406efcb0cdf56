"""How the SDK reaches a site: the ``Transport`` protocol.

A transport runs one of the fabric's endpoint functions at a site, inside a request worker of
that site's Globus Compute engine, and hands back a ``concurrent.futures.Future``. The local
site and a remote Globus Compute endpoint differ only here.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, Protocol, runtime_checkable


@runtime_checkable
class Transport(Protocol):
    """Runs endpoint functions at one site."""

    site: str
    """Name of the site this transport reaches."""

    can_reach_servers: bool
    """True when the client can open ZMQ connections to the site's model servers directly
    (the local site, a tunnel); otherwise streaming falls back to long-poll."""

    def submit(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Future[Any]:
        """Run ``fn(*args, **kwargs)`` in a request worker at the site."""
        ...

    def close(self) -> None:
        """Release sockets and threads."""
        ...
