"""Running `quantgate serve` as a real subprocess for integration tests."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import psutil

REPO = Path(__file__).resolve().parents[2]
# Persisted between local runs so the bundled model is converted once; fresh in CI.
TEST_HOME = REPO / ".cache" / "test-home"
API_KEY = "test-api-key-0123456789abcdef"
ADMIN_KEY = "test-admin-key-0123456789abcdef"
TERMINAL = ("ready", "rejected", "failed", "unsupported")  # variant states the builder leaves alone


@dataclass
class GatewayProcess:
    proc: subprocess.Popen
    port: int
    log_path: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def engines(self) -> list[dict]:
        response = httpx.get(f"{self.url}/admin/engines", headers={"Authorization": f"Bearer {ADMIN_KEY}"})
        response.raise_for_status()
        return response.json()["engines"]

    def wait_ready(self, timeout_s: float = 900) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"gateway exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                if httpx.get(f"{self.url}/ready", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(1)
        raise TimeoutError(f"gateway not ready after {timeout_s:.0f} s:\n{self.log_tail()}")

    def wait_serving(self, timeout_s: float = 300) -> None:
        """Wait until the HTTP server answers (for gateways with nothing to be ready for). Start-up asks
        the engine's python once (kernel probe, vLLM's architectures): seconds, up to a minute on slow boxes."""
        ok = wait_for(lambda: self.proc.poll() is None and httpx.get(f"{self.url}/health").status_code == 200,
                      timeout_s)  # fmt: skip
        if not ok:
            raise RuntimeError(f"gateway not serving:\n{self.log_tail()}")

    def wait_built(self, timeout_s: float = 900) -> None:
        """Wait until every registered variant is ready, rejected or failed (the builder is idle)."""

        def built() -> bool:
            models = admin(self, "GET", "/admin/models").json()["models"]
            return all(v["state"] in TERMINAL for m in models for v in m["variants"])

        if not wait_for(built, timeout_s, 1):
            raise TimeoutError(f"variants still building after {timeout_s:.0f} s:\n{self.log_tail()}")

    def descendants(self) -> list[psutil.Process]:
        return psutil.Process(self.proc.pid).children(recursive=True)

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 60) -> int:
        self.proc.send_signal(sig)
        return self.proc.wait(timeout=timeout_s)


def start_gateway(port: int, home: Path = TEST_HOME, **env: str) -> GatewayProcess:
    home.mkdir(parents=True, exist_ok=True)
    log_path = home / f"gateway-{port}.log"
    full_env = {
        **os.environ,
        "QUANTGATE_HOME": str(home),
        "QUANTGATE_PORT": str(port),
        "QUANTGATE_API_KEYS": API_KEY,
        "QUANTGATE_ADMIN_KEY": ADMIN_KEY,
        # The bundled model alone unless a test asks for more: variants are built by the tests
        # that need them, with the fast profile.
        "QUANTGATE_DEFAULT_VARIANTS": "",
        "QUANTGATE_REGISTRY_PROFILE": "fast",
        **env,
    }
    with open(log_path, "wb") as log:
        # Own session: a signal meant for pytest must not reach the gateway, and vice versa.
        proc = subprocess.Popen([sys.executable, "-m", "server", "serve"], stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, env=full_env, cwd=REPO, start_new_session=True)
    return GatewayProcess(proc, port, log_path)


def shared_home(name: str, share: tuple[str, ...] = ("checkpoints", "artifacts", "cache")) -> Path:
    """A fresh QUANTGATE_HOME of its own (registry, logs) that shares TEST_HOME's
    content-addressed stores, so converted checkpoints and built variants are reused."""
    home = TEST_HOME / name
    shutil.rmtree(home, ignore_errors=True)
    home.mkdir(parents=True)
    for store in share:
        (TEST_HOME / store).mkdir(parents=True, exist_ok=True)
        (home / store).symlink_to(TEST_HOME / store)
    return home


def admin(gateway: GatewayProcess, method: str, path: str, **kwargs: object) -> httpx.Response:
    return httpx.request(method, f"{gateway.url}{path}", headers={"Authorization": f"Bearer {ADMIN_KEY}"},
                         timeout=600, **kwargs)


def alive(processes: list[psutil.Process]) -> list[psutil.Process]:
    still = []
    for process in processes:
        try:
            if process.is_running() and process.status() != psutil.STATUS_ZOMBIE:
                still.append(process)
        except psutil.NoSuchProcess:
            pass
    return still


def engine_headers(engine: dict) -> dict[str, str]:
    """The key the gateway gave this local engine (a row of GET /admin/engines), read from the engine
    process's environment as any process of the same user could (server/engines/engine_guard.py)."""
    key = psutil.Process(engine["pid"]).environ()["VLLM_API_KEY"]
    return {"Authorization": f"Bearer {key}"}


def engine_gauge(metrics_url: str, name: str, headers: dict[str, str]) -> float:
    text = httpx.get(metrics_url, timeout=5, headers=headers).text
    match = re.search(rf"^{re.escape(name)}\{{[^}}]*\}} ([0-9.eE+-]+)$", text, re.MULTILINE)
    if match is None:
        raise AssertionError(f"{name} not in {metrics_url}")
    return float(match.group(1))


def wait_for(predicate, timeout_s: float, interval_s: float = 0.2) -> bool:
    """Poll `predicate` until true; a connection error counts as "not yet"."""

    def check() -> bool:
        try:
            return bool(predicate())
        except httpx.HTTPError:
            return False

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(interval_s)
    return check()
