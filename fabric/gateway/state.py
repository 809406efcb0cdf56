"""The gateway's shared state: the SDK client, who may call, how fast, and the per-call
``Caller`` every route receives (authenticated and rate-limited before the route runs)."""

from __future__ import annotations

import asyncio
import hashlib
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

from fastapi import Depends, Request

from fabric.aio import AsyncFabric
from fabric.gateway.auth import Authenticator, Identity, RateLimiter
from fabric.gateway.config import GatewayConfig
from fabric.gateway.errors import PayloadTooLarge
from fabric.gateway.keys import default_home

__all__ = ["Caller", "Gateway", "Known", "Who", "caller", "gateway_of", "identified", "read_body"]


@dataclass
class Caller:
    """An authenticated caller and the client that calls the site on their behalf."""

    identity: Identity
    client: AsyncFabric


class Gateway:
    """Everything the routes share."""

    def __init__(self, config: GatewayConfig, client: AsyncFabric,
                 authenticator: Authenticator) -> None:
        self.config = config
        self.client = client
        self.authenticator = authenticator
        self.limiter = RateLimiter(config.rate, config.burst)
        self.home = Path(config.home) if config.home is not None else default_home()
        self._clients: dict[str, AsyncFabric] = {}
        self._lock = threading.Lock()

    def client_for(self, identity: Identity) -> AsyncFabric:
        """The gateway's client, or for a Globus caller one that sends their token to the site
        (sharing the gateway's transport and thread pool)."""
        if identity.auth is None:
            return self.client
        key = hashlib.sha256(str(identity.auth.get("token")).encode()).hexdigest()
        with self._lock:
            # Most recently seen last. Tokens expire, so the least recently seen go first;
            # one forgotten holds no thread (its poller's ends when idle) and is not closed:
            # its streams in flight finish.
            client = self._clients.pop(key, None)
            if client is None:
                client = AsyncFabric(fabric=self.client.fabric.with_auth(identity.auth),
                                     executor=self.client._pool)
                while len(self._clients) >= self.config.callers_kept:
                    self._clients.pop(next(iter(self._clients)))
            self._clients[key] = client
            return client

    def close(self) -> None:
        """Close the SDK client (the per-caller ones share its transport and pool)."""
        self.client.close()


def gateway_of(request: Request) -> Gateway:
    """The ``Gateway`` of the app serving ``request``."""
    gateway: Gateway = request.app.state.gateway
    return gateway


async def read_body(request: Request, what: str = "request body") -> bytes:
    """The body, or ``PayloadTooLarge`` (413) once it passes ``max_body_bytes``. Counted as it
    arrives: a chunked body has no ``Content-Length`` to refuse it by, and must not be held
    whole in memory first."""
    limit = gateway_of(request).config.max_body_bytes
    too_large = PayloadTooLarge(f"the {what} is over the gateway's limit of {limit} bytes")
    if int(request.headers.get("content-length") or 0) > limit:
        raise too_large
    parts: list[bytes] = []
    size = 0
    async for part in request.stream():
        size += len(part)
        if size > limit:
            raise too_large
        parts.append(part)
    return b"".join(parts)


async def identified(request: Request) -> Identity:
    """FastAPI dependency: authenticate (the budget untouched)."""
    gateway = gateway_of(request)
    header = request.headers.get("authorization")
    if gateway.authenticator.policy is not None:  # may introspect over HTTP: off the loop
        return await asyncio.to_thread(gateway.authenticator.identify, header)
    return gateway.authenticator.identify(header)


async def caller(request: Request) -> Caller:
    """FastAPI dependency: authenticate, then spend one request of the caller's budget."""
    gateway = gateway_of(request)
    identity = await identified(request)
    gateway.limiter.take(identity.name)
    return Caller(identity, gateway.client_for(identity))


Who = Annotated[Caller, Depends(caller)]
"""A route parameter typed ``Who`` receives the authenticated, rate-limited ``Caller``."""

Known = Annotated[Identity, Depends(identified)]
"""A route parameter typed ``Known`` receives the authenticated caller's ``Identity``, with
no request taken from its rate budget (``/metrics``: a scrape every few seconds must neither
spend a user's budget nor be refused by it)."""
