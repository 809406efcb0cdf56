"""The gateway's FastAPI app (``create_app``) and its server (``serve``).

Every error leaves as OpenAI's error shape: typed fabric errors with their mapped status (and
``Retry-After`` when retrying helps), a malformed body as 400, an unknown route as 404, and any
bug as a 500 that says so without a traceback.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from fabric.aio import AsyncFabric
from fabric.errors import FabricError, InvalidRequest
from fabric.gateway.auth import Authenticator
from fabric.gateway.config import GatewayConfig
from fabric.gateway.errors import error_body, retry_after, status_of
from fabric.gateway.files import FileStore
from fabric.gateway.keys import KeyStore
from fabric.gateway.state import Gateway
from fabric.gateway.streams import OpenStreams

__all__ = ["build_gateway", "create_app", "serve"]

log = logging.getLogger("fabric.gateway")

KEEP_ALIVE_S = 75
"""How long an idle client connection stays open (uvicorn's default is 5 s). A client that
pools its connections (the ``openai`` client does) and sends a burst of streams after a quiet
spell otherwise opens every connection anew, all at once: ~20-40 ms added to the burst's time
to first token on 2 cores (``benchmarks/gateway.py``). 75 s is nginx's default."""


def build_gateway(config: GatewayConfig, client: AsyncFabric | None = None) -> Gateway:
    """The gateway's state; raises ``AuthError`` when the bind needs authentication that
    nothing could check (no API key issued, no Globus policy at the site)."""
    policy = _site_policy(config.sites[0] if config.sites else config.site)
    gateway_home = config.home
    keys = KeyStore(gateway_home)
    config.check_bind(keys.active(), policy is not None)
    if client is None:
        if config.sites:
            client = AsyncFabric(sites=config.sites, max_concurrency=config.max_concurrency,
                                 on_status=None)
        else:
            client = AsyncFabric(config.site, max_concurrency=config.max_concurrency,
                                 on_status=None)
    authenticator = Authenticator(require=config.auth_required, keys=keys, policy=policy,
                                  site=client.site)
    return Gateway(config, client, authenticator)


def _site_policy(site: str) -> Any:
    from fabric.sites import load_site

    return load_site(site).policy


def create_app(config: GatewayConfig | None = None, client: AsyncFabric | None = None,
               gateway: Gateway | None = None) -> FastAPI:
    """The OpenAI-compatible app over ``client`` (default: an ``AsyncFabric`` of the site)."""
    config = config or GatewayConfig()
    gw = gateway or build_gateway(config, client)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        if client is None and gateway is None:  # ours to close
            gw.close()

    app = FastAPI(title="tpm-fabric gateway", version="1", lifespan=lifespan,
                  docs_url=None, redoc_url=None)
    app.state.gateway = gw
    app.state.files = FileStore(gw.home / "files")
    app.state.streams = OpenStreams()
    from fabric.gateway import batches, files, metrics, routes

    app.include_router(routes.router)
    app.include_router(files.router)
    app.include_router(batches.router)
    metrics.install(app)
    _handlers(app)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "site": gw.client.site, "sites": gw.client.sites}

    return app


def fabric_error_response(exc: FabricError) -> JSONResponse:
    """The OpenAI error response for a fabric error."""
    status, _, _ = status_of(exc)
    wait = retry_after(exc) if status in (429, 503) else None
    headers = {"Retry-After": str(wait)} if wait is not None else None
    if status >= 500:
        log.warning("%s: %s", type(exc).__name__, exc.message)
    return JSONResponse(error_body(exc), status_code=status, headers=headers)


def _handlers(app: FastAPI) -> None:
    async def on_fabric(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, FabricError)
        return fabric_error_response(exc)

    async def on_validation(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        first = exc.errors()[0] if exc.errors() else {}
        param = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        return fabric_error_response(InvalidRequest(f"{param}: {first.get('msg')}",
                                                    param=param or None))

    async def on_http(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, HTTPException)
        kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
        return JSONResponse({"error": {"message": f"{request.method} {request.url.path}: "
                                       f"{exc.detail}", "type": kind, "param": None,
                                       "code": None}}, status_code=exc.status_code)

    async def on_bug(request: Request, exc: Exception) -> JSONResponse:
        log.exception("gateway bug on %s %s", request.method, request.url.path)
        return JSONResponse({"error": {"message": f"internal error: {type(exc).__name__}: "
                                       f"{exc}", "type": "server_error", "param": None,
                                       "code": None}}, status_code=500)

    app.add_exception_handler(FabricError, on_fabric)
    app.add_exception_handler(RequestValidationError, on_validation)
    app.add_exception_handler(HTTPException, on_http)
    app.add_exception_handler(Exception, on_bug)


def serve(config: GatewayConfig, client: AsyncFabric | None = None) -> None:
    """Run the gateway with uvicorn until interrupted (checks the bind first). uvicorn picks
    ``httptools`` and ``uvloop`` (dependencies of the package) when they import. ``client``:
    as ``create_app``'s (``benchmarks/gateway_floor.py`` serves a stand-in that answers at
    once, to measure what HTTP and the ``openai`` client cost by themselves)."""
    import uvicorn

    app = create_app(config, client)
    streams: OpenStreams = app.state.streams

    class Server(uvicorn.Server):
        async def shutdown(self, sockets: Any = None) -> None:
            streams.stop()  # open streams end with an error event, not cancelled mid-response
            await super().shutdown(sockets)

    server = Server(uvicorn.Config(app, host=config.host, port=config.port, log_level="info",
                                   timeout_graceful_shutdown=5,
                                   timeout_keep_alive=KEEP_ALIVE_S))
    with contextlib.suppress(KeyboardInterrupt):  # uvicorn re-raises the Ctrl-C it handled
        server.run()
    if not server.started:  # as uvicorn.run: the bind or the startup failed
        raise SystemExit(3)
