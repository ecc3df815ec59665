"""The OpenAI-compatible server (``guardrails serve``): :func:`create_app`, :class:`ServerConfig`.

Needs the ``server`` extra (fastapi, uvicorn, httpx, prometheus_client); imported lazily.
"""

from __future__ import annotations

from typing import Any

__all__ = ["ServerConfig", "create_app"]


def __getattr__(name: str) -> Any:
    if name == "create_app":
        from guardrails.server.app import create_app

        return create_app
    if name == "ServerConfig":
        from guardrails.server.config import ServerConfig

        return ServerConfig
    raise AttributeError(f"module 'guardrails.server' has no attribute {name!r}")
