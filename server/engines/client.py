"""HTTP to engines: one shared httpx.AsyncClient, upstream errors mapped to gateway errors."""

from __future__ import annotations

import json
import logging
from typing import Any

import httpx

from server.errors import ContextLengthExceeded, EngineUnavailable, GatewayError, InvalidRequest, UpstreamError

logger = logging.getLogger(__name__)


def build_http_client(connect_timeout_s: float, read_timeout_s: float, max_connections: int) -> httpx.AsyncClient:
    limits = httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections,
                          keepalive_expiry=30.0)
    timeout = httpx.Timeout(connect=connect_timeout_s, read=read_timeout_s, write=30.0, pool=connect_timeout_s)
    # trust_env=False: a proxy configured for the host must not capture loopback engine traffic.
    return httpx.AsyncClient(limits=limits, timeout=timeout, trust_env=False)


def upstream_error(variant_id: str, status: int, content: bytes) -> GatewayError:
    """Turn an engine's error response into the gateway's typed error."""
    message, param = f"engine for {variant_id} answered HTTP {status}", None
    try:
        payload = json.loads(content)
        err = payload.get("error", payload) if isinstance(payload, dict) else {}
        if isinstance(err, dict) and err.get("message"):
            message, param = str(err["message"]), err.get("param")
    except ValueError:
        pass
    if status == 400:
        if "maximum context length" in message or param == "input_tokens":
            return ContextLengthExceeded(message, param="messages" if param == "input_tokens" else param)
        return InvalidRequest(message, param=param)
    if status == 404 or status >= 500:
        return EngineUnavailable(f"engine for {variant_id} failed: {message}")
    return UpstreamError(status, message, param=param)


class EngineClient:
    def __init__(self, http: httpx.AsyncClient) -> None:
        self._http = http

    async def post_json(self, variant_id: str, url: str, body: dict[str, Any]) -> dict[str, Any]:
        try:
            response = await self._http.post(url, json=body)
        except httpx.HTTPError as exc:
            raise EngineUnavailable(f"engine for {variant_id} unreachable: {type(exc).__name__}") from exc
        if response.status_code != 200:
            raise upstream_error(variant_id, response.status_code, response.content)
        return response.json()

    async def open_stream(self, variant_id: str, url: str, body: dict[str, Any]) -> httpx.Response:
        """Send a streaming request; returns the open 200 response (caller must aclose it)."""
        request = self._http.build_request("POST", url, json=body)
        try:
            response = await self._http.send(request, stream=True)
        except httpx.HTTPError as exc:
            raise EngineUnavailable(f"engine for {variant_id} unreachable: {type(exc).__name__}") from exc
        if response.status_code != 200:
            content = await response.aread()
            await response.aclose()
            raise upstream_error(variant_id, response.status_code, content)
        return response
