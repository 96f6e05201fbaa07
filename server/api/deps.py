"""FastAPI dependencies: the app's components (each on `app.state`, each with its own alias, so no
route reaches through one object to get another), and API/admin key checks (constant-time)."""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable
from typing import Annotated, Any

from fastapi import Depends, Request

from server.catalog import Catalog
from server.engines.supervisor import EngineSupervisor
from server.errors import AuthenticationFailed, GatewayError
from server.gateway import Gateway
from server.metrics import GatewayMetrics
from server.registry.service import ModelService
from server.routing.predictor import LatencyBook
from server.settings import Settings
from server.telemetry.engine_load import EngineLoadScraper

_LOOPBACK = {"127.0.0.1", "::1", "localhost"}


def _host_name(host_header: str) -> str:
    """The name of a Host header without its port: "127.0.0.1:8000" -> "127.0.0.1", "[::1]:80" -> "::1"."""
    host = host_header.strip().lower()
    if host.startswith("["):
        return host[1:host.find("]")] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


class AdminForbidden(GatewayError):
    status_code = 403
    error_type = "permission_error"
    default_code = "admin_only"


# Dependencies are `async def`: FastAPI runs plain `def` ones in a worker thread, a thread hop per
# dependency per request that cost more CPU than the rest of the request path together.
def _from_state(name: str) -> Callable[[Request], Awaitable[Any]]:
    async def component(request: Request) -> Any:
        return getattr(request.app.state, name)

    component.__name__ = f"get_{name}"
    return component


GatewayDep = Annotated[Gateway, Depends(_from_state("gateway"))]
SettingsDep = Annotated[Settings, Depends(_from_state("settings"))]
ModelsDep = Annotated[ModelService, Depends(_from_state("models"))]
CatalogDep = Annotated[Catalog, Depends(_from_state("catalog"))]
SupervisorDep = Annotated[EngineSupervisor, Depends(_from_state("supervisor"))]
BookDep = Annotated[LatencyBook, Depends(_from_state("book"))]
MetricsDep = Annotated[GatewayMetrics, Depends(_from_state("metrics"))]
LoadDep = Annotated[EngineLoadScraper, Depends(_from_state("load"))]


def _bearer(request: Request) -> str | None:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


def _matches_any(token: str, keys: tuple[str, ...]) -> bool:
    # Compare against every key so the time taken says nothing about which one matched.
    found = False
    for key in keys:
        found |= hmac.compare_digest(token.encode(), key.encode())
    return found


def check_api_key(request: Request, settings: Settings) -> None:
    """Called by the completion handlers themselves: FastAPI's dependency solving was ~5% of the gateway's
    CPU on the request path (cProfile over the FakeEngine: loadtests/results/2026-12-05/overhead-fake-cpu.md)."""
    keys = settings.api_keys
    if not keys:
        return
    token = _bearer(request)
    if token is None:
        raise AuthenticationFailed("missing API key: send 'Authorization: Bearer <key>'")
    if not _matches_any(token, keys):
        raise AuthenticationFailed("invalid API key")


async def require_api_key(request: Request, settings: SettingsDep) -> None:
    check_api_key(request, settings)


async def require_admin(request: Request, settings: SettingsDep) -> None:
    """With QUANTGATE_ADMIN_KEY set, that key is required; without it, only loopback clients that name a
    loopback host: a web page the user opens can reach 127.0.0.1 under a name of its own that resolves
    there (DNS rebinding), and its requests then carry that name in Host."""
    admin_key = settings.admin_key
    if admin_key is None:
        client = request.client.host if request.client else ""
        if client not in _LOOPBACK:
            raise AdminForbidden("admin endpoints need QUANTGATE_ADMIN_KEY when called from another host")
        if _host_name(request.headers.get("host", "")) not in _LOOPBACK:
            raise AdminForbidden("without QUANTGATE_ADMIN_KEY, admin endpoints answer only requests addressed to a "
                                 "loopback name (localhost, 127.0.0.1, [::1])")
        return
    token = _bearer(request)
    if token is None or not _matches_any(token, (admin_key,)):
        raise AuthenticationFailed("missing or invalid admin key")
