"""A local `quantgate serve` for the benchmark scripts: its own QUANTGATE_HOME sharing the test home's
content-addressed stores (converted checkpoints and built variants are reused), started and waited for."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx

from server.engines.local import LocalEngine, LocalEngineConfig
from server.settings import Settings

REPO = Path(__file__).resolve().parents[1]
STORES = REPO / ".cache" / "test-home"


@contextlib.asynccontextmanager
async def local_engine(settings: Settings, variant_id: str, model_dir: Path, engine_args: tuple[str, ...] = ()
                       ) -> AsyncIterator[tuple[LocalEngine, LocalEngineConfig]]:
    """One variant's vLLM engine, started with the gateway's own config and waited for; stopped on exit."""
    from server.bootstrap import local_engine_config
    from server.engines.base import EngineState
    from server.engines.hardware import detect

    config = local_engine_config(settings, detect(settings.engine_device), variant_id, model_dir, engine_args)
    engine = LocalEngine(config)
    await engine.start()
    try:
        while engine.status().state is not EngineState.READY:
            if engine.status().state is EngineState.FAILED:
                raise RuntimeError(f"{variant_id} failed to start; see {engine.log_path}")
            await asyncio.sleep(1)
        yield engine, config
    finally:
        await engine.stop()


def bench_home(name: str) -> Path:
    home = REPO / ".cache" / "bench-home" / name
    shutil.rmtree(home, ignore_errors=True)
    home.mkdir(parents=True)
    for store in ("checkpoints", "artifacts", "cache"):
        (STORES / store).mkdir(parents=True, exist_ok=True)
        (home / store).symlink_to(STORES / store)
    return home


def start(home: Path, port: int, variants: str, profile_to: Path | None = None, **extra_env: str) -> subprocess.Popen:
    """`quantgate serve` in its own session; with `profile_to`, under cProfile (written when it exits)."""
    env = {**os.environ, "QUANTGATE_HOME": str(home), "QUANTGATE_PORT": str(port), "QUANTGATE_REGISTRY_PROFILE": "fast",
           "QUANTGATE_DEFAULT_VARIANTS": variants, "QUANTGATE_MAX_PPL_DELTA": "1.0", **extra_env}  # fmt: skip
    log = open(home / "serve.log", "ab")  # noqa: SIM115 - lives as long as the gateway
    profiled = ["-m", "cProfile", "-o", str(profile_to)] if profile_to else []
    return subprocess.Popen([sys.executable, *profiled, "-m", "server", "serve"], stdout=log, stderr=subprocess.STDOUT,
                            env=env, cwd=REPO, start_new_session=True)  # fmt: skip


def wait_built(http: httpx.Client, proc: subprocess.Popen, timeout_s: float) -> list[dict]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            models = http.get("/admin/models").json()["models"]
            variants = [v for m in models for v in m["variants"]]
            if variants and all(v["state"] in ("ready", "rejected", "failed", "unsupported") for v in variants):
                return variants
        except (httpx.HTTPError, KeyError, ValueError):
            pass
        time.sleep(3)
    raise SystemExit(f"variants not built in {timeout_s:.0f} s; see the gateway's serve.log")


def wait_ready(url: str, proc: subprocess.Popen, timeout_s: float) -> None:
    """Until GET /ready is 200 (every configured model has a serving variant)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if httpx.get(f"{url}/ready", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise SystemExit(f"gateway at {url} not ready in {timeout_s:.0f} s; see its serve.log")


@contextlib.contextmanager
def local_gateway(name: str, port: int, variants: str) -> Iterator[tuple[str, list[dict]]]:
    """`quantgate serve` with the bundled model and `variants` in bench_home(name): yields its URL and
    its built variants once every one is ready, rejected or failed; stopped on exit."""
    proc = start(bench_home(name), port, variants)
    url = f"http://127.0.0.1:{port}"
    try:
        with httpx.Client(base_url=url, timeout=60, trust_env=False) as http:
            built = wait_built(http, proc, 3600)
        yield url, built
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=120)
