"""The kernel probe (server/engines/probe.py): forced answers, the reason users see, CUDA."""

from __future__ import annotations

from pathlib import Path

import pytest

from server.engines.probe import FORCE_ENV, KernelProbe, probe


def test_a_forced_answer_is_used_and_named_in_the_reason(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(FORCE_ENV, '{"w4a16": false}')
    answer = probe("cpu", tmp_path)
    assert answer.source == "forced" and answer.kernels == {"w4a16": False, "w8a8": True, "w4a16-torchao": True}
    assert not answer.supports("w4a16") and answer.supports("w8a8") and answer.supports(None)
    reason = answer.reason("w4a16")
    assert reason.startswith("unsupported on this host") and "cpu_gemm_wna16" in reason and FORCE_ENV in reason
    assert answer.cpu_model in reason
    assert not list(tmp_path.iterdir()), "a forced answer is not cached"


@pytest.mark.parametrize("value", ["not json", "[1, 2]", '"w4a16"'])
def test_a_malformed_forced_answer_is_refused(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, value: str) -> None:
    monkeypatch.setenv(FORCE_ENV, value)
    with pytest.raises(ValueError, match=FORCE_ENV):
        probe("cpu", tmp_path)


def test_cuda_hosts_are_not_asked_about_cpu_ops(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv(FORCE_ENV, raising=False)
    answer = probe("cuda", tmp_path)
    assert answer.source == "cuda" and all(answer.kernels.values())


def test_the_torchao_kernels_reason_names_torchao_too() -> None:
    answer = KernelProbe(device="cpu", kernels={"w4a16-torchao": False}, library="_C_AVX2")
    assert "aten._weight_int4pack_mm_for_cpu or torchao" in answer.reason("w4a16-torchao")


def test_this_hosts_engine_is_asked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The real probe, in the engine's python: every kernel answered; asked once, then cached."""
    monkeypatch.delenv(FORCE_ENV, raising=False)
    monkeypatch.setattr("server.engines.probe._ANSWERED", {})
    answer = probe("cpu", tmp_path)
    assert answer.source == "probe", answer.detail
    assert set(answer.kernels) == {"w4a16", "w8a8", "w4a16-torchao"} and answer.library.startswith("_C")
    assert answer.kernels["w4a16-torchao"], "ATen's CPU int4 GEMM and torchao come with the engine environment"
    monkeypatch.setattr("server.engines.probe._ANSWERED", {})
    assert probe("cpu", tmp_path).source == "cache"


def test_an_unknown_kernel_is_assumed_present() -> None:
    answer = KernelProbe(device="cpu", kernels={"w4a16": False})
    assert answer.supports("fp8") and not answer.supports("w4a16")
