"""optimizers/onnx_export.py in the compression environment, on a tiny Llama (tests/unit/tiny_llamas.py: 4 layers,
a 256-word vocabulary, so its decoder weights, not its embedding, make up the file): the ONNX Runtime GenAI model
(KV cache, incremental decoding) against the PyTorch model, and an INT8 file smaller than the FP32 one. The
embedding stays in float32 in every precision (the builder quantizes the MatMuls, lm_head among them), so on the
session's tiny Llama of SmolLM2's 49,152-word vocabulary the INT8 file is the larger. SmolLM2's figures are
loadtests/results/2026-12-08/onnx-smollm2.md's."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from server.jobs.compress import default_compress_python
from tests.unit.tiny_llamas import checkpoint  # noqa: F401 - a fixture

REPO = Path(__file__).resolve().parents[2]


def _export(source: Path, out: Path, *args: str) -> tuple[int, dict]:
    python = default_compress_python()
    if not Path(python).exists():
        pytest.fail(f"compression environment missing at {python}: run `make install`")
    result = subprocess.run([python, "-m", "optimizers.onnx_export", str(source), str(out), *args], cwd=REPO,
                            capture_output=True, text=True, timeout=900, check=False)  # fmt: skip
    lines = result.stdout.strip().splitlines()
    assert lines, result.stderr[-3000:]
    return result.returncode, json.loads(lines[-1])


def test_fp32_onnx_decodes_as_pytorch_does_and_int8_is_smaller(checkpoint: Path, tmp_path: Path) -> None:  # noqa: F811
    tiny = checkpoint
    code, fp32 = _export(tiny, tmp_path / "fp32", "--precision", "fp32", "--check-steps", "12", "--speed-runs", "1")
    assert code == 0, fp32
    parity = fp32["parity"]["short"]
    # Same weights, same arithmetic up to kernel order: identical greedy tokens, logits within 1e-4 of their scale.
    assert parity["identical_tokens"] and parity["steps"] >= 1, parity
    assert parity["logits_max_abs_diff"] <= 1e-4 * max(parity["logits_scale"], 1.0), parity
    assert (tmp_path / "fp32" / "genai_config.json").is_file()
    genai = json.loads((tmp_path / "fp32" / "genai_config.json").read_text())
    assert genai["model"]["decoder"]["inputs"].get("past_key_names"), "no KV cache inputs: no incremental decoding"
    code, int8 = _export(tiny, tmp_path / "int8", "--precision", "int8", "--check-steps", "4", "--speed-runs", "1")
    assert code == 0, int8
    assert int8["onnx_bytes"] < 0.5 * fp32["onnx_bytes"], (int8["onnx_bytes"], fp32["onnx_bytes"])
    assert len(int8["onnx"]["long"]["tokens"]) >= 1


def test_a_directory_without_a_checkpoint_is_refused(tmp_path: Path) -> None:
    code, event = _export(tmp_path, tmp_path / "out", "--precision", "int4")
    assert code == 2 and event["event"] == "error" and "no config.json" in event["message"]
    assert not (tmp_path / "out").exists()


@pytest.mark.full
def test_smollm2_exports_with_parity_and_a_smaller_int8(tmp_path: Path) -> None:
    """The bundled model (loadtests/results/2026-12-08/onnx-smollm2.md): FP32 decodes the two fixed prompts as
    PyTorch does; INT8 is under half of FP32's bytes (its embedding stays in float32)."""
    from server.models.embedded import ensure_checkpoint, find_bundled_gguf
    from tests.integration.gateway_process import TEST_HOME

    smollm2 = ensure_checkpoint(find_bundled_gguf(), TEST_HOME / "checkpoints", TEST_HOME / "logs")
    code, fp32 = _export(smollm2, tmp_path / "fp32", "--precision", "fp32", "--check-steps", "32", "--speed-runs", "1")
    assert code == 0, fp32
    for prompt in ("short", "long"):
        assert fp32["parity"][prompt]["identical_tokens"], fp32["parity"]
        assert fp32["parity"][prompt]["logits_max_abs_diff"] < 1e-3, fp32["parity"]
    code, int8 = _export(smollm2, tmp_path / "int8", "--precision", "int8", "--check-steps", "0")
    assert code == 0, int8
    assert int8["onnx_bytes"] < 0.55 * fp32["onnx_bytes"], (int8["onnx_bytes"], fp32["onnx_bytes"])
