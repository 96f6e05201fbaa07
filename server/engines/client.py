"""HTTP to engines, upstream errors mapped to gateway errors.

The request path (completions, streamed or not) goes through one aiohttp session: its connection
pool hands out an idle connection in O(1), where httpx's scans every pooled connection (and polls
each idle socket) per request, which cost the gateway ~1-2 ms of CPU per request under load
(loadtests/overhead.py). The slow, off-path traffic (health polls, metric scrapes, profiling)
stays on the shared httpx.AsyncClient.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Mapping
from typing import Any

import aiohttp
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


class UpstreamBroken(Exception):
    """The engine's stream broke after it started (connection reset, timeout between chunks)."""


class UpstreamStream:
    """An open 200 streaming response from an engine: its raw bytes as they arrive, then close()."""

    def __init__(self, response: aiohttp.ClientResponse) -> None:
        self._response = response

    async def chunks(self) -> AsyncIterator[bytes]:
        try:
            async for chunk in self._response.content.iter_any():
                yield chunk
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise UpstreamBroken(type(exc).__name__) from exc

    async def close(self) -> None:
        """Closing before the end drops the connection, which makes vLLM abort the request."""
        self._response.close()


def build_upstream_session(connect_timeout_s: float, read_timeout_s: float, per_engine: int) -> aiohttp.ClientSession:
    """One session; its pool keeps up to `per_engine` connections to each engine (host:port), with no
    limit across engines, so one busy engine never starves another's requests of connections (on the
    H200 run one shared pool of 512 answered 778 requests with 503 at 1.5x load). The connect timeout
    is the TCP connect alone (`sock_connect`): waiting for a pooled connection is not a connect failure.
    The gateway admits at most `per_engine` requests to an engine (Gateway.decide), so that wait is short."""
    connector = aiohttp.TCPConnector(limit=0, limit_per_host=per_engine, keepalive_timeout=30.0, ttl_dns_cache=300)
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=connect_timeout_s, sock_read=read_timeout_s)
    # trust_env=False (the default): a proxy configured for the host must not capture engine traffic.
    return aiohttp.ClientSession(connector=connector, timeout=timeout, auto_decompress=False,
                                 json_serialize=json.dumps)  # fmt: skip


class EngineClient:
    def __init__(self, session: aiohttp.ClientSession) -> None:
        self._session = session

    async def post_json(self, variant_id: str, url: str, body: dict[str, Any],
                        headers: Mapping[str, str] | None = None) -> dict[str, Any]:  # fmt: skip
        try:
            async with self._session.post(url, json=body, headers=headers) as response:
                content = await response.read()
                status = response.status
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise EngineUnavailable(f"engine for {variant_id} unreachable: {type(exc).__name__}") from exc
        if status != 200:
            raise upstream_error(variant_id, status, content)
        return json.loads(content)

    async def open_stream(self, variant_id: str, url: str, body: dict[str, Any],
                          headers: Mapping[str, str] | None = None) -> UpstreamStream:  # fmt: skip
        """Send a streaming request; returns the open 200 stream (the caller must close it)."""
        try:
            response = await self._session.post(url, json=body, headers=headers)
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise EngineUnavailable(f"engine for {variant_id} unreachable: {type(exc).__name__}") from exc
        if response.status != 200:
            try:
                content = await response.read()
            except (aiohttp.ClientError, TimeoutError):
                content = b""
            response.release()
            raise upstream_error(variant_id, response.status, content)
        return UpstreamStream(response)

    async def aclose(self) -> None:
        await self._session.close()
