"""Responses of the completion endpoints that watch for the client going away with one task.

Starlette's StreamingResponse does the same with an anyio task group per response (a cancel scope, a task
for the body and a task listening for the disconnect: uvicorn's httptools protocol states ASGI 2.3, so the
2.4 path that lets `send` raise is not taken). Here the handler's own task relays the body and one plain
asyncio task waits for `http.disconnect`; if the client goes first it cancels the handler's task, which
closes the upstream stream (vLLM then aborts the request) and ends the response quietly.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TypeVar

from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from server.errors import ClientDisconnected

T = TypeVar("T")


class _Watch:
    """While active, cancels `task` when the client disconnects; `gone` says whether that happened."""

    def __init__(self, receive: Receive) -> None:
        self.gone = False
        self._task = asyncio.current_task()
        self._watcher = asyncio.ensure_future(self._wait(receive))

    async def _wait(self, receive: Receive) -> None:
        # Once the body is read, the next ASGI message is the disconnect.
        while (await receive())["type"] != "http.disconnect":
            pass
        self.gone = True
        self._task.cancel()  # type: ignore[union-attr]

    def ours(self) -> bool:
        """After a CancelledError: was it this watch's (the client left), not the server's? Consumes it."""
        return self.gone and self._task.uncancel() == 0  # type: ignore[union-attr]

    def stop(self) -> None:
        self._watcher.cancel()


async def unless_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Await `work`, cancelling it (and so the upstream request) if the client disconnects first."""
    watch = _Watch(request.receive)
    try:
        return await work
    except asyncio.CancelledError:
        if watch.ours():
            raise ClientDisconnected() from None
        raise
    finally:
        watch.stop()


class RelayResponse(Response):
    """A streamed (SSE) response whose body is an async iterator of bytes, relayed as it comes."""

    media_type = "text/event-stream"

    def __init__(self, chunks: AsyncIterator[bytes], headers: dict[str, str]) -> None:
        self.chunks = chunks
        self.status_code = 200
        self.background = None
        self.init_headers(headers)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        watch = _Watch(receive)
        try:
            await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
            async for chunk in self.chunks:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except asyncio.CancelledError:
            if not watch.ours():
                raise
        finally:
            watch.stop()
            # The relay's own `finally` (upstream closed, the stream counted) runs now, not when collected.
            aclose: Callable[[], Awaitable[None]] | None = getattr(self.chunks, "aclose", None)
            if aclose is not None:
                await aclose()
