"""Relaying an engine's SSE stream to the client, timing it on the way."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from server.engines.client import UpstreamBroken, UpstreamStream
from server.errors import error_body

logger = logging.getLogger(__name__)


@dataclass
class StreamTiming:
    """What a relayed stream observed: first-chunk time, gaps between chunks, final usage."""

    started: float
    first_chunk: float | None = None
    gaps: list[float] = field(default_factory=list)
    usage: dict | None = None
    completed: bool = False
    on_first: Callable[[], None] | None = None  # called at the first chunk
    _last: float | None = None

    def chunk(self, now: float, data: bytes) -> None:
        if self.first_chunk is None:
            self.first_chunk = now
            if self.on_first is not None:
                self.on_first()
        elif self._last is not None:
            self.gaps.append(now - self._last)
        self._last = now
        # The usage chunk (stream_options.include_usage) has empty choices; parse only that one.
        if b'"usage":{' in data and b'"choices":[]' in data:
            self.usage = _parse_usage(data)
        if b"data: [DONE]" in data:
            self.completed = True


def _parse_usage(data: bytes) -> dict | None:
    for line in data.split(b"\n"):
        if line.startswith(b"data: {") and b'"usage"' in line:
            try:
                return json.loads(line[6:]).get("usage")
            except ValueError:
                return None
    return None


async def relay(
    upstream: UpstreamStream, timing: StreamTiming, on_close: Callable[[StreamTiming], None],
    cut: asyncio.Event | None = None,
) -> AsyncIterator[bytes]:
    """Yield the engine's bytes unchanged. If the client goes away the ASGI server cancels this
    generator and `finally` closes the upstream connection, which makes vLLM abort the request.
    When `cut` is set (the gateway's drain grace is over, server/drain.py) the stream ends after its
    next chunk with an error chunk and `[DONE]`, so the client knows it was cut short."""
    try:
        async for chunk in upstream.chunks():
            timing.chunk(time.perf_counter(), chunk)
            yield chunk
            if cut is not None and cut.is_set() and not timing.completed:
                logger.warning("stream cut short: the gateway is shutting down")
                body = error_body("the gateway is shutting down; the answer was cut short", "server_error",
                                  None, 503)
                yield f"data: {json.dumps(body)}\n\ndata: [DONE]\n\n".encode()
                return
    except UpstreamBroken as exc:
        # Bytes already reached the client: the status is sent, so report in-band as vLLM does.
        logger.warning("upstream stream broke: %s", exc)
        body = error_body(f"engine stream interrupted: {exc}", "server_error", None, 503)
        yield f"data: {json.dumps(body)}\n\ndata: [DONE]\n\n".encode()
    finally:
        await upstream.close()
        on_close(timing)
