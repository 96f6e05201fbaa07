"""Device groups (engines that share a GPU or this host's cores) and the admission settings."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from server.engines.local import LocalEngine, LocalEngineConfig
from server.engines.remote import RemoteEngine, remote_device
from server.settings import RemoteEngineSpec


def test_remote_engines_share_a_device_by_host_unless_their_spec_names_one() -> None:
    a = RemoteEngine("m@bf16", "http://127.0.0.1:8001/")
    b = RemoteEngine("m@int8", "http://127.0.0.1:8002")
    pod = RemoteEngine("m@int4", "http://quantgate-engine-int4:8000")
    named = RemoteEngine("m@fp8", "http://127.0.0.1:8003", device="gpu-1")
    assert a.device == b.device == remote_device("http://127.0.0.1:9") == "remote:127.0.0.1"
    assert pod.device == "remote:quantgate-engine-int4" and named.device == "gpu-1"
    assert a.status().device == a.device and named.status().device == "gpu-1"


def test_local_engines_share_the_hosts_device(tmp_path: Path) -> None:
    config = LocalEngineConfig("m@bf16", tmp_path, "cpu", "float32", 2048, tmp_path)
    engine = LocalEngine(config)
    assert engine.device == "local:cpu" == engine.status().device


@pytest.mark.parametrize("fields", [{"device": ""}, {"max_in_flight": 0}, {"max_in_flight": "many"}])
def test_bad_remote_specs_are_refused(fields: dict) -> None:
    with pytest.raises(ValidationError):
        RemoteEngineSpec(url="http://127.0.0.1:8001", **fields)


def test_children_get_the_environment_less_the_gateway_s_secrets(monkeypatch) -> None:
    from server.process import child_environment

    monkeypatch.setenv("QUANTGATE_API_KEYS", "k" * 24)
    monkeypatch.setenv("QUANTGATE_ADMIN_KEY", "a" * 24)
    monkeypatch.setenv("QUANTGATE_CALIBRATION_DTYPE", "float32")  # read by the compression job
    monkeypatch.setenv("PATH", "/usr/bin")
    env = child_environment({"HF_HUB_OFFLINE": "1"})
    assert "QUANTGATE_API_KEYS" not in env and "QUANTGATE_ADMIN_KEY" not in env
    assert env["QUANTGATE_CALIBRATION_DTYPE"] == "float32" and env["PATH"] == "/usr/bin" and env["HF_HUB_OFFLINE"] == "1"
    engine = LocalEngineConfig("m@bf16", Path("/m"), "cpu", "bfloat16", 2048, Path("/logs")).environment("k")
    assert "QUANTGATE_API_KEYS" not in engine and "QUANTGATE_ADMIN_KEY" not in engine
    assert engine["HF_HUB_OFFLINE"] == "1" and engine["PATH"] == "/usr/bin"
