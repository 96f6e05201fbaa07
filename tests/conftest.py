"""Shared test helpers: GPU skipping and ports."""

from __future__ import annotations

import shutil

import pytest

from server.engines.local import free_loopback_port


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if shutil.which("nvidia-smi"):
        return
    skip_gpu = pytest.mark.skip(reason="needs an NVIDIA GPU")
    for item in items:
        if item.get_closest_marker("gpu") is not None:  # the marker, not a parameter that happens to say "gpu"
            item.add_marker(skip_gpu)


@pytest.fixture
def free_port() -> int:
    return free_loopback_port()
