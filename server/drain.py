"""Graceful shutdown: on SIGTERM (or Ctrl-C) stop taking work, let what is in flight finish, then exit.

uvicorn on its own closes the listening socket at the signal and cancels whatever is still running
after its graceful timeout: 10 streams of 200 tokens, SIGTERM, 0 completed, no error chunk, no
`[DONE]` (issue 15). Here, at the first signal, `/ready` turns 503 (so a load balancer stops sending)
while the socket stays open and every new `/v1` request is a 503 with `Retry-After`; requests in
flight finish within `QUANTGATE_DRAIN_GRACE_S` (60 s, below Kubernetes' 90 s termination grace in
k8s/base/gateway-deployment.yaml); a stream still open at the end gets an error chunk and `[DONE]`.
A second signal exits at once.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from collections.abc import Callable
from types import FrameType

import uvicorn

logger = logging.getLogger(__name__)

CUT_WAIT_S = 2.0  # after the grace: time for cut streams to send their last chunk


class Drain:
    """The gateway's shutdown state, shared by the routes (refuse new work), the stream relay (end
    early) and the server (wait for in-flight work)."""

    def __init__(self) -> None:
        self.draining = False
        self.cut = asyncio.Event()  # set when the grace is over: streams end with an error chunk

    def begin(self) -> None:
        if not self.draining:
            self.draining = True
            logger.warning("draining: new requests get 503, requests in flight may finish")

    async def wait(self, in_flight: Callable[[], int], grace_s: float) -> None:
        """Until nothing is in flight or the grace is over; then cut the streams left."""
        self.begin()
        deadline = time.monotonic() + grace_s
        while in_flight() > 0 and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        left = in_flight()
        if left:
            logger.warning("drain grace of %.0f s over: ending %d request(s) still in flight", grace_s, left)
            self.cut.set()
            deadline = time.monotonic() + CUT_WAIT_S
            while in_flight() > 0 and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
        else:
            logger.info("drained: nothing in flight")


class DrainingServer(uvicorn.Server):
    """uvicorn, with the first SIGTERM/SIGINT starting a drain instead of closing the socket."""

    def __init__(self, config: uvicorn.Config, drain: Drain, in_flight: Callable[[], int],
                 grace_s: float) -> None:  # fmt: skip
        super().__init__(config)
        self.drain = drain
        self._in_flight = in_flight
        self._grace_s = grace_s
        self._task: asyncio.Task[None] | None = None
        self._signalled = False

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self._signalled or sig not in (signal.SIGTERM, signal.SIGINT):
            super().handle_exit(sig, frame)  # a second signal: exit now (uvicorn's own behaviour)
            return
        self._signalled = True
        self._captured_signals.append(sig)  # re-raised after shutdown, as uvicorn does
        self.drain.draining = True  # at once, from the signal handler: the next request sees it

    async def on_tick(self, counter: int) -> bool:
        if self._signalled and self._task is None:
            self._task = asyncio.create_task(self.drain.wait(self._in_flight, self._grace_s), name="drain")
        if self._task is not None and self._task.done():
            self.should_exit = True
        return await super().on_tick(counter)
