"""An idle client connection outlives the clients' keep-alive expiry (`quantgate serve`, a real uvicorn)."""

from __future__ import annotations

import socket
import time

from server.engines.local import free_loopback_port
from tests.integration.gateway_process import shared_home, start_gateway

REQUEST = b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: keep-alive\r\n\r\n"


def _response(sock: socket.socket) -> bytes:
    """One whole response to GET /health (its body is small: headers and body arrive together)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(4096)
        if not chunk:
            return data
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                  if line.lower().startswith(b"content-length"))  # fmt: skip
    while len(body) < length:
        body += sock.recv(4096)
    return data


def test_an_idle_connection_stays_open_past_the_clients_keep_alive_expiry() -> None:
    # httpx (and so the OpenAI clients) keeps an idle connection for 5 s, as uvicorn did: a request sent on it
    # as the gateway closed it ended in a ReadError with no status (an H100 bench cell,
    # loadtests/results/2026-12-07/router-h100-c0a0c38.md).
    gateway = start_gateway(free_loopback_port(), home=shared_home("keep-alive", share=()),
                            QUANTGATE_EMBEDDED_MODEL="false")  # fmt: skip
    try:
        gateway.wait_serving()
        with socket.create_connection(("127.0.0.1", gateway.port), timeout=10) as sock:
            sock.sendall(REQUEST)
            assert _response(sock).startswith(b"HTTP/1.1 200")
            time.sleep(6)  # idle past 5 s
            sock.sendall(REQUEST)
            assert _response(sock).startswith(b"HTTP/1.1 200")  # the same connection, still open
    finally:
        gateway.stop()
