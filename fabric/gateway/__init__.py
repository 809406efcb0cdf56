"""``fabric serve``: an OpenAI-compatible HTTP gateway in front of one site.

Modules: ``config`` (options, the bind rule), ``keys`` (API keys), ``auth`` (who calls, rate
limits), ``errors`` (fabric errors as OpenAI errors), ``shapes`` (OpenAI request/response
shapes), ``streams`` (SSE), ``routes`` (models, chat, completions, embeddings), ``files`` and
``batches`` (batch jobs as campaigns), ``state`` (what the routes share), ``app`` (the app and
the server). Requires the ``fastapi`` and ``uvicorn`` packages.
"""

from __future__ import annotations

from fabric.gateway.app import create_app, serve
from fabric.gateway.config import GatewayConfig

__all__ = ["GatewayConfig", "create_app", "serve"]
