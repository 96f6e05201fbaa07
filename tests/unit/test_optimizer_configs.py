"""Method configs: typed, frozen, versioned; refused early with the reason."""

from __future__ import annotations

import json

import pytest

from optimizers.base import InvalidConfig, ModelInfo, UnsupportedHere
from optimizers.data import PROFILES, Profile, split
from optimizers.groups import resolve_group_size
from optimizers.registry import CONFIGS, METHODS, handler_for, make_config

SMOLLM2 = ModelInfo("LlamaForCausalLM", hidden_size=576, intermediate_size=1536, num_layers=30,
                    tie_word_embeddings=True)
LLAMA8B = ModelInfo("LlamaForCausalLM", hidden_size=4096, intermediate_size=14336, num_layers=32,
                    tie_word_embeddings=False)


@pytest.mark.parametrize("method", sorted(CONFIGS))
def test_config_round_trip_and_fingerprint(method: str) -> None:
    config = make_config(method)
    again = make_config(method, config.model_dump())
    assert again == config
    assert again.fingerprint() == config.fingerprint()
    assert make_config(method, {"version": config.version + 1}).fingerprint() != config.fingerprint()


def test_configs_are_frozen() -> None:
    config = make_config("int8")
    with pytest.raises(Exception, match="frozen"):
        config.smoothing_strength = 0.5  # type: ignore[misc]


def test_every_servable_method_has_a_handler() -> None:
    for config_type in METHODS:
        config = config_type(steps={"distill": {}, "int8": {}}) if config_type.__name__ == "ChainConfig" else config_type()
        assert handler_for(config) is METHODS[config_type]


@pytest.mark.parametrize(
    ("method", "fields", "fragment"),
    [
        ("int4-gptq", {"group_sise": 64}, "group_sise: Extra inputs are not permitted"),
        ("int8", {"smoothing_strength": 1.5}, "less than or equal to 1"),
        ("awq", {"n_grid": 1}, "greater than or equal to 2"),
        ("int4-ao", {"group_size": 48}, "group_size: Input should be 32, 64, 128 or 256"),
        ("int3", {}, "unknown method 'int3'; known: awq, bnb-int8, bnb-nf4, distill, drill-broken, fp8, int4-ao, int4-gptq, "
                           "int4-gptq-ao, int8, int8-wo"),
    ],
)
def test_bad_configs_fail_with_the_reason(method: str, fields: dict, fragment: str) -> None:
    with pytest.raises(InvalidConfig, match=fragment.replace("(", r"\(")):
        make_config(method, fields)


@pytest.mark.parametrize(("model", "expected"), [(SMOLLM2, 64), (LLAMA8B, 128)])
def test_group_size_auto_divides_every_width(model: ModelInfo, expected: int) -> None:
    assert resolve_group_size(None, model, "int4-gptq") == expected


@pytest.mark.parametrize("method", ["int4-gptq", "awq"])
def test_impossible_group_size_is_refused_before_work(method: str) -> None:
    config = make_config(method, {"group_size": 128})
    with pytest.raises(InvalidConfig, match=r"group_size=128 does not divide .*\[576\].*use one of \[64, 32\]"):
        config.check(SMOLLM2, "cpu")
    make_config(method, {"group_size": 128}).check(LLAMA8B, "cpu")


@pytest.mark.parametrize(("method", "fragment"), [
    ("fp8", "fp8 is refused on CPU"),
    ("bnb-nf4", "bnb-nf4 is refused on CPU"),
    ("bnb-int8", "bnb-int8 is refused on CPU"),
])  # fmt: skip
def test_methods_unsupported_on_cpu_are_refused(method: str, fragment: str) -> None:
    with pytest.raises(UnsupportedHere, match=fragment):
        make_config(method).check(SMOLLM2, "cpu")


def test_fp8_and_nf4_are_offered_on_gpus() -> None:
    make_config("fp8").check(LLAMA8B, "cuda")
    make_config("bnb-nf4").check(LLAMA8B, "cuda")
    with pytest.raises(UnsupportedHere, match="not implemented"):
        make_config("bnb-int8").check(LLAMA8B, "cuda")


def test_on_load_methods_produce_engine_args(tmp_path) -> None:
    artifact = handler_for(make_config("fp8"))(make_config("fp8"), tmp_path, tmp_path / "out", [])
    assert artifact.on_load and artifact.model_path == tmp_path
    assert artifact.engine_args == ("--quantization", "fp8")


def test_int4_ao_is_torchaos_cpu_int4_applied_on_load(tmp_path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "hidden_size": 576,
                                                      "intermediate_size": 1536}))
    config = make_config("int4-ao")
    config.check(SMOLLM2, "cpu")
    artifact = handler_for(config)(config, tmp_path, tmp_path / "out", [])
    assert artifact.on_load and artifact.model_path == tmp_path and not (tmp_path / "out").exists()
    args = dict(zip(artifact.engine_args[::2], artifact.engine_args[1::2], strict=True))
    assert args["--quantization"] == "torchao" and args["--dtype"] == "bfloat16"
    ao = json.loads(json.loads(args["--hf-overrides"])["quantization_config_dict_json"])
    # the class server/engines/vllm_plugin.py lets vLLM resolve; 576 is not a multiple of 128
    assert ao["_type"] == "PrototypeInt4WeightOnlyConfig"
    assert ao["_data"]["group_size"] == 64 and ao["_data"]["int4_choose_qparams_algorithm"] == "hqq"
    with pytest.raises(UnsupportedHere, match="CPU int4 kernel"):
        config.check(LLAMA8B, "cuda")


def test_int4_gptq_ao_is_calibrated_on_cpu_with_int4_ao_s_group_size() -> None:
    config = make_config("int4-gptq-ao")
    config.check(SMOLLM2, "cpu")
    assert (config.bits, config.needs_calibration, config.kernel) == (4, True, "w4a16-torchao")
    at_load = config.at_load()
    assert (at_load.method, at_load.group_size, at_load.qparams) == ("int4-ao", None, "hqq")
    with pytest.raises(UnsupportedHere, match="on CUDA use int4-gptq"):
        config.check(LLAMA8B, "cuda")
    with pytest.raises(InvalidConfig, match="actorder"):
        make_config("int4-gptq-ao", {"actorder": "group"})  # its groups must stay contiguous


def test_split_is_disjoint_and_fixed() -> None:
    ids = list(range(10_000))
    profile = Profile("t", calibration_samples=4, calibration_tokens=100, eval_windows=3, eval_tokens=200)
    result = split(ids, profile)
    assert [len(w) for w in result.calibration] == [100] * 4
    assert [len(w) for w in result.evaluation] == [200] * 3
    assert result.calibration[-1][-1] < result.evaluation[0][0]
    assert result.evaluation[-1][-1] == 9_999
    assert split(ids, profile) == result


def test_split_refuses_overlap() -> None:
    with pytest.raises(ValueError, match="needs 65536 calibration"):
        split(list(range(50_000)), PROFILES["full"])


@pytest.mark.parametrize(("offered", "wanted", "chat", "expected"), [
    (128, 32, False, list(range(0, 128, 4))),   # the full profile: 32 prose windows, spread
    (16, 32, False, list(range(0, 16, 2))),     # the fast profile: every prose window
    (128, 32, True, [0, 1, 8, 9, 16, 17, 24, 25, 32, 33, 40, 41, 48, 49, 56, 57, 64, 65, 72, 73, 80, 81, 88, 89,
                     96, 97, 104, 105, 112, 113, 120, 121]),  # prose and chat in pairs
    (16, 32, True, list(range(16))),
    (10, 3, True, [0, 1, 4]),
    (8, None, True, list(range(8))),
])  # fmt: skip
def test_awq_calibration_subset_is_spread(offered: int, wanted: int | None, chat: bool, expected: list[int]) -> None:
    from optimizers.data import spread

    assert [w[0] for w in spread([[i] for i in range(offered)], wanted, chat)] == expected


def test_a_forced_calibration_dtype_is_part_of_the_artifact_key(monkeypatch) -> None:
    from optimizers.job import calibration_tag
    from optimizers.registry import make_config

    config = make_config("int8")
    monkeypatch.setenv("QUANTGATE_CALIBRATION_BUDGET_S", "0")  # no budget: the tag is the data and dtype alone
    monkeypatch.setenv("QUANTGATE_CALIBRATION_DTYPE", "auto")
    default = calibration_tag(config, "fast")
    assert default == "fast/v" + default.split("/v")[1] and "/" not in default.split("/v")[1]
    assert calibration_tag(config, "fast") == default  # the checkpoint's own dtype: keys made before stay valid
    monkeypatch.setenv("QUANTGATE_CALIBRATION_DTYPE", "float32")
    assert calibration_tag(config, "fast") == default + "/float32"
    assert calibration_tag(make_config("int8-wo"), "fast") == "none"  # nothing calibrated, nothing to tell apart
