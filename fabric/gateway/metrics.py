"""The gateway's ``GET /metrics`` (Prometheus text format) and what it counts.

Per route (the route's template, so ``/v1/models/{model}`` is one series), method and status
code: requests answered and the time until the answer started (for a stream that is the time
to its first bytes, not to its end). Beside them, the routing decisions of this process
(``fabric.metrics.ROUTING_DECISIONS``, counted by whatever router chooses a site here).
``/metrics`` is authenticated like every other route where the gateway requires callers to
authenticate (give Prometheus an API key: ``authorization: {credentials: ...}``), but a scrape
spends nothing of the caller's rate budget (``--rate``): with no key, every local caller is one
identity, and a scrape refused with 429 would leave a gap in the series.
"""

from __future__ import annotations

import threading
import time
from typing import Any

from fastapi import FastAPI, Response

from fabric.gateway.state import Known
from fabric.metrics import (
    CONTENT_TYPE,
    E2E_BUCKETS,
    PREFIX,
    ROUTING_DECISIONS,
    Family,
    Histogram,
    LabelledCounter,
    render,
)

__all__ = ["GatewayMetrics", "install"]


class GatewayMetrics:
    """Counters and histograms of one gateway app."""

    def __init__(self) -> None:
        self.requests = LabelledCounter(
            PREFIX + "gateway_requests_total", "HTTP requests the gateway answered.",
            ("route", "method", "code"))
        self._latency: dict[str, Histogram] = {}
        self._lock = threading.Lock()

    def observe(self, route: str, method: str, code: int, seconds: float) -> None:
        """Count one answered request."""
        self.requests.inc(route=route, method=method, code=code)
        with self._lock:
            hist = self._latency.setdefault(route, Histogram(E2E_BUCKETS))
            hist.observe(seconds)

    def families(self) -> list[Family]:
        """Every series now."""
        latency = Family(PREFIX + "gateway_request_duration_seconds", "histogram",
                         "Time from a request's arrival at the gateway to the start of its "
                         "answer, by route.")
        with self._lock:
            for route, hist in sorted(self._latency.items()):
                copy = Histogram.from_dict(hist.to_dict())
                latency.add({"route": route}, copy)
        return [self.requests.family(), latency, ROUTING_DECISIONS.family()]


class _Count:
    """Pure ASGI middleware (a stream passes through untouched): times each HTTP request to the
    start of its answer and counts it by route template, method and status."""

    def __init__(self, app: Any, metrics: GatewayMetrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.monotonic()
        seen: dict[str, Any] = {}

        async def sending(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start" and not seen:
                seen["code"] = message["status"]
                seen["seconds"] = time.monotonic() - start
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            # The router put the matched route in the scope (``None``: no route matched).
            route = getattr(scope.get("route"), "path", None) or "unmatched"
            self.metrics.observe(route, scope.get("method", ""), seen.get("code", 500),
                                 seen.get("seconds", time.monotonic() - start))


def install(app: FastAPI) -> GatewayMetrics:
    """Count every request of ``app`` and serve ``GET /metrics``."""
    metrics = GatewayMetrics()
    app.state.metrics = metrics
    app.add_middleware(_Count, metrics=metrics)

    @app.get("/metrics", include_in_schema=False)
    async def scrape(who: Known) -> Response:
        return Response(render(metrics.families()), media_type=None,
                        headers={"Content-Type": CONTENT_TYPE})

    return metrics
