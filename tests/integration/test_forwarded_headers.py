"""Forwarded headers are believed only from configured proxies (`quantgate serve`, a real uvicorn)."""

from __future__ import annotations

import time

import httpx
import pytest

from server.engines.local import free_loopback_port
from tests.integration.gateway_process import GatewayProcess, shared_home, start_gateway


def _admin_status(gateway: GatewayProcess, **headers: str) -> int:
    return httpx.get(f"{gateway.url}/admin/models", headers=headers, timeout=10).status_code


def _started(**env: str) -> GatewayProcess:
    gateway = start_gateway(free_loopback_port(), home=shared_home("forwarded", share=()), QUANTGATE_ADMIN_KEY="",
                            QUANTGATE_EMBEDDED_MODEL="false", **env)  # fmt: skip
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            httpx.get(f"{gateway.url}/health", timeout=2).raise_for_status()
            return gateway
        except httpx.HTTPError:
            time.sleep(0.2)
    gateway.stop()
    pytest.fail(f"gateway did not start: {gateway.log_path.read_text()[-2000:]}")


def test_forwarded_for_is_ignored_unless_its_sender_is_a_configured_proxy() -> None:
    # Without a key, admin is for loopback clients. uvicorn believed X-Forwarded-For from any loopback peer,
    # so the client's address was whatever a local process (or a proxy passing the header on) wrote there.
    gateway = _started()
    try:
        assert _admin_status(gateway) == 200
        assert _admin_status(gateway, **{"x-forwarded-for": "203.0.113.9"}) == 200  # not believed: still loopback
    finally:
        gateway.stop()
    gateway = _started(QUANTGATE_TRUSTED_PROXIES="127.0.0.1")
    try:  # a configured proxy says the request came from elsewhere: believed
        assert _admin_status(gateway, **{"x-forwarded-for": "203.0.113.9"}) == 403
    finally:
        gateway.stop()
