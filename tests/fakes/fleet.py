"""A gateway in front of FakeEngine processes (remote engines), for router tests and load-test smoke runs."""

from __future__ import annotations

import contextlib
import json
import signal
import subprocess
import sys
from collections.abc import Iterator

from server.engines.local import free_loopback_port
from tests.integration.gateway_process import (
    REPO,
    GatewayProcess,
    admin,
    shared_home,
    start_gateway,
    wait_for,
)


def start_fake(variant_id: str, port: int, options: dict) -> subprocess.Popen:
    args = [f"--{k.replace('_', '-')}={v}" for k, v in options.items() if k != "spec"]
    return subprocess.Popen([sys.executable, "-m", "tests.fakes.fake_engine", "--model", variant_id,
                             f"--port={port}", *args], cwd=REPO, stdin=subprocess.DEVNULL)  # fmt: skip


@contextlib.contextmanager
def fake_fleet(fakes: dict[str, dict], home_name: str, **env: str) -> Iterator[tuple[GatewayProcess, dict[str, str]]]:
    """Start one FakeEngine per variant (options as FakeEngine's flags, plus `spec`: the remote engine's
    declared method/bits/ppl_delta) and a gateway routing across them; yields once every variant is
    profiled."""
    ports = {variant_id: free_loopback_port() for variant_id in fakes}
    procs = [start_fake(v, ports[v], options) for v, options in fakes.items()]
    urls = {v: f"http://127.0.0.1:{port}" for v, port in ports.items()}
    # each FakeEngine its own simulated device (they share no compute) unless its spec names one
    remotes = {v: {"url": urls[v], "priority_scheduling": True, "device": f"fake:{v}", **fakes[v]["spec"]}
               for v in fakes}
    model = next(iter(fakes)).split("@")[0]
    gateway = start_gateway(free_loopback_port(), home=shared_home(home_name, share=()),
                            QUANTGATE_EMBEDDED_MODEL="false", QUANTGATE_REMOTE_ENGINES=json.dumps(remotes), **env)
    try:
        gateway.wait_ready(timeout_s=120)
        profiled = lambda: all(r["priors"] for r in admin(gateway, "GET", f"/admin/routing/{model}").json()["variants"])
        assert wait_for(profiled, 60, 0.5), gateway.log_tail()
        yield gateway, urls
    finally:
        gateway.stop(signal.SIGTERM)
        for proc in procs:
            proc.terminate()
            proc.wait(timeout=10)
