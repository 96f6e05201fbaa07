"""The ladder a host gets (server/registry/service.py: variant_configs, host_ladder): the rungs asked for,
named and with their own fields where given; rungs its engine cannot run are kept as `unsupported` with
the reason, and the 4-bit ones get torchao's CPU int4 rung in their place; and the pieces that let vLLM
serve that rung (server/engines/vllm_plugin.py, the engine's env and dtype)."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

from optimizers.base import InvalidConfig
from optimizers.registry import make_config
from server.bootstrap import local_engine_config
from server.engines.hardware import Hardware
from server.engines.local import LocalEngineConfig
from server.engines.probe import KernelProbe
from server.engines.vllm_plugin import TORCHAO_ENV, TORCHAO_INT4_MODULE, register
from server.registry.ingest import IngestError
from server.registry.service import VariantSpec, host_ladder, variant_configs
from server.settings import Settings
from tests.unit.test_optimizer_configs import LLAMA8B, SMOLLM2

AVX2 = KernelProbe(device="cpu", kernels={"w4a16": False, "w8a8": True, "w4a16-torchao": True}, library="_C_AVX2",
                   cpu_model="AMD EPYC 7551", cpu_flags=("avx2",))  # fmt: skip
AVX512 = KernelProbe(device="cpu", kernels={"w4a16": True, "w8a8": True, "w4a16-torchao": True}, library="_C")


def _ladder(methods: list[str], kernels: KernelProbe, device: str = "cpu") -> tuple[list[str], dict[str, str]]:
    named, unsupported = host_ladder([(m, make_config(m)) for m in methods], kernels, SMOLLM2, device)
    assert all(name == config.method for name, config in named)
    return [name for name, _ in named], unsupported


def test_rungs_are_named_by_their_method_or_by_their_own_name_with_their_own_fields() -> None:
    named = variant_configs(["int8", VariantSpec("prune-structured", {"drop_layers": 1}, "pruned-1"), "int8"])
    assert [(name, config.method) for name, config in named] == [("int8", "int8"), ("pruned-1", "prune-structured")]
    pruned = named[1][1].model_dump()
    assert (pruned["drop_layers"], pruned["mlp_keep"]) == (1, 0.75)  # the rest are the method's defaults
    two = variant_configs([VariantSpec("int8", {"smoothing_strength": 0.5}, "int8-light"), "int8"])
    assert [name for name, _ in two] == ["int8-light", "int8"]


@pytest.mark.parametrize(("specs", "error", "fragment"), [
    ([VariantSpec("int8", name="bf16")], IngestError, "base variant's"),
    ([VariantSpec("int8", name="a@b")], IngestError, "must match"),
    (["int8", VariantSpec("int8", {"smoothing_strength": 0.5})], IngestError, "twice with different fields"),
    ([VariantSpec("prune-structured", {"drop_layers": "many"})], InvalidConfig, "drop_layers"),
    ([VariantSpec("int8", {"nope": 1})], InvalidConfig, "nope"),
    ([VariantSpec("distill+int8", {"steps": {"distill": [1, 2]}})], InvalidConfig, "distill+int8"),
    ([VariantSpec("int3", name="x")], InvalidConfig, "unknown method 'int3'"),
])  # fmt: skip
def test_a_rung_with_a_bad_name_or_fields_is_refused_with_the_reason(specs: list, error: type,
                                                                     fragment: str) -> None:  # fmt: skip
    with pytest.raises(error, match=re.escape(fragment)):
        variant_configs(specs)


def test_a_named_rung_the_host_cannot_run_keeps_its_name_and_gets_the_substitute() -> None:
    named = [("gptq-act", make_config("int4-gptq")), ("int8", make_config("int8"))]
    ladder, unsupported = host_ladder(named, AVX2, SMOLLM2, "cpu")
    assert [name for name, _ in ladder] == ["gptq-act", "int8", "int4-ao"]
    assert set(unsupported) == {"gptq-act"} and unsupported["gptq-act"].endswith("int4-ao is built in its place")


def test_without_a_w4a16_gemm_the_4bit_rungs_are_unsupported_and_int4_ao_takes_their_place() -> None:
    methods, unsupported = _ladder(["int8", "int4-gptq", "awq"], AVX2)
    assert methods == ["int8", "int4-gptq", "awq", "int4-ao"]  # added once, for both
    assert set(unsupported) == {"int4-gptq", "awq"}
    for reason in unsupported.values():
        assert "_C_AVX2 has no _C.cpu_gemm_wna16" in reason and "AMD EPYC 7551" in reason
        assert reason.endswith("int4-ao is built in its place")


def test_a_host_that_runs_every_rung_gets_the_ladder_asked_for() -> None:
    assert _ladder(["int8", "int4-gptq", "awq"], AVX512) == (["int8", "int4-gptq", "awq"], {})


def test_int4_ao_asked_for_is_not_added_twice() -> None:
    methods, unsupported = _ladder(["int4-ao", "int4-gptq"], AVX2)
    assert methods == ["int4-ao", "int4-gptq"] and unsupported["int4-gptq"].endswith("built in its place")


def test_no_substitute_where_the_host_cannot_run_it_either() -> None:
    bare = KernelProbe(device="cpu", kernels={"w4a16": False, "w4a16-torchao": False})
    methods, unsupported = _ladder(["int8", "awq"], bare)
    assert methods == ["int8", "awq"] and "in its place" not in unsupported["awq"]


def test_no_substitute_where_its_config_does_not_fit_the_model() -> None:
    named, unsupported = host_ladder([("awq", make_config("awq"))], AVX2, LLAMA8B, "cuda")  # int4-ao is CPU only
    assert [n for n, _ in named] == ["awq"] and "in its place" not in unsupported["awq"]


def test_the_plugin_lets_vllm_read_the_cpu_int4_config_only_in_torchao_engines(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from torchao.core.config import ALLOWED_AO_MODULES, config_from_dict

    monkeypatch.setattr("torchao.core.config.ALLOWED_AO_MODULES", set(ALLOWED_AO_MODULES) - {TORCHAO_INT4_MODULE})
    from torchao.core import config as ao_config

    monkeypatch.delenv(TORCHAO_ENV, raising=False)
    register()
    assert TORCHAO_INT4_MODULE not in ao_config.ALLOWED_AO_MODULES
    wanted = make_config("int4-ao").torchao_config(SMOLLM2)
    with pytest.raises(ValueError, match="PrototypeInt4WeightOnlyConfig"):
        config_from_dict(wanted)
    monkeypatch.setenv(TORCHAO_ENV, "1")
    register()
    built = config_from_dict(wanted)
    assert type(built).__name__ == "PrototypeInt4WeightOnlyConfig" and built.group_size == 64


def test_torchao_engines_get_the_plugins_env_and_the_variants_dtype(tmp_path: Path) -> None:
    settings = Settings(home=tmp_path, engine_dtype="float32")
    artifact_args = ("--quantization", "torchao", "--hf-overrides", "{}", "--dtype", "bfloat16")
    config = local_engine_config(settings, Hardware("cpu", False), "m@int4-ao", tmp_path, artifact_args)
    assert config.dtype == "bfloat16" and config.environment("k")[TORCHAO_ENV] == "1"
    plain = LocalEngineConfig("m@int8", tmp_path, "cpu", "float32", 2048, tmp_path, python=sys.executable)
    assert plain.environment("k").get(TORCHAO_ENV) != "1"


def test_a_substitute_the_host_cannot_run_either_is_not_claimed() -> None:
    bare = KernelProbe(device="cpu", kernels={"w4a16": False, "w4a16-torchao": False})
    methods, unsupported = _ladder(["int4-ao", "awq"], bare)
    assert methods == ["int4-ao", "awq"] and set(unsupported) == {"int4-ao", "awq"}
    assert "in its place" not in unsupported["awq"] and "or torchao" in unsupported["int4-ao"]


def test_a_chain_ending_in_a_4bit_rung_gets_the_chain_ending_in_int4_ao_in_its_place() -> None:
    methods, unsupported = _ladder(["distill+int4-gptq"], AVX2)
    assert methods == ["distill+int4-gptq", "distill+int4-ao"]
    assert unsupported["distill+int4-gptq"].endswith("distill+int4-ao is built in its place")
    assert _ladder(["distill+int4-gptq"], AVX512) == (["distill+int4-gptq"], {})


def test_a_chain_whose_last_step_this_device_cannot_run_is_refused_at_registration() -> None:
    from optimizers.base import UnsupportedHere

    with pytest.raises(UnsupportedHere, match="fp8"):
        make_config("distill+fp8").check(SMOLLM2, "cpu")
    with pytest.raises(UnsupportedHere, match="int4-ao"):
        make_config("prune-structured+int4-ao").check(LLAMA8B, "cuda")


def test_the_cli_s_variant_option_is_the_admin_api_s_variant_object() -> None:
    import typer

    from server.cli_models import parse_variant

    assert parse_variant('p1=prune-structured:{"drop_layers": 1, "mlp_keep": 0.875}') == {
        "name": "p1", "method": "prune-structured", "config": {"drop_layers": 1, "mlp_keep": 0.875}}
    assert parse_variant("light=int8") == {"name": "light", "method": "int8", "config": {}}
    for bad in ("int8", "=int8", "x=", "x=int8:{", "x=int8:[1]"):
        with pytest.raises(typer.BadParameter):
            parse_variant(bad)
