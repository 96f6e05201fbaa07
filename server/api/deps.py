"""FastAPI dependencies: the app's Gateway, and API/admin key checks (constant-time)."""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Depends, Request

from server.errors import AuthenticationFailed, GatewayError
from server.gateway import Gateway

_LOOPBACK = {"127.0.0.1", "::1", "localhost"}


class AdminForbidden(GatewayError):
    status_code = 403
    error_type = "permission_error"
    default_code = "admin_only"


# Dependencies are `async def`: FastAPI runs plain `def` ones in a worker thread, a thread hop per
# dependency per request that cost more CPU than the rest of the request path together.
async def get_gateway(request: Request) -> Gateway:
    return request.app.state.gateway


GatewayDep = Annotated[Gateway, Depends(get_gateway)]


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


async def require_api_key(request: Request, gateway: GatewayDep) -> None:
    keys = gateway.settings.api_keys
    if not keys:
        return
    token = _bearer(request)
    if token is None:
        raise AuthenticationFailed("missing API key: send 'Authorization: Bearer <key>'")
    if not _matches_any(token, keys):
        raise AuthenticationFailed("invalid API key")


async def require_admin(request: Request, gateway: GatewayDep) -> None:
    """With QUANTGATE_ADMIN_KEY set, that key is required; without it, only loopback clients."""
    admin_key = gateway.settings.admin_key
    if admin_key is None:
        client = request.client.host if request.client else ""
        if client not in _LOOPBACK:
            raise AdminForbidden("admin endpoints need QUANTGATE_ADMIN_KEY when called from another host")
        return
    token = _bearer(request)
    if token is None or not _matches_any(token, (admin_key,)):
        raise AuthenticationFailed("missing or invalid admin key")
