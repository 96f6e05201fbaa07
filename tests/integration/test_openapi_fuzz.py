"""schemathesis against a live `quantgate serve` over FakeEngines (a process boundary): every check of the
fuzzer (no 5xx, status codes, content types, headers and bodies as /openapi.json documents them,
schema-valid data accepted and schema-invalid data refused, the Allow header), over /v1/*, /admin/*
and the ops routes; the one exception is in tests/integration/schemathesis.toml, with its reason."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from tests.fakes.fleet import fake_fleet

CONFIG = Path(__file__).with_name("schemathesis.toml")
FAKES = {"fuzz@bf16": {"tpot_ms": 1, "ttft_ms": 2, "max_running": 64,
                       "spec": {"method": "base", "bits": 16, "ppl_delta": 0.0}},
         "fuzz@int8": {"tpot_ms": 1, "ttft_ms": 1, "max_running": 64,
                       "spec": {"method": "int8", "bits": 8, "ppl_delta": 0.01}}}  # fmt: skip


def test_schemathesis_finds_nothing_in_over_a_thousand_cases() -> None:
    # No API keys: the fuzzer reaches every route (admin without a key is for loopback clients: this one).
    with fake_fleet(FAKES, "openapi-fuzz", QUANTGATE_API_KEYS="", QUANTGATE_ADMIN_KEY="") as (gateway, _):
        run = subprocess.run([sys.executable, "-m", "schemathesis.cli", "--no-color", "--config-file", str(CONFIG),
                              "run", f"{gateway.url}/openapi.json", "--max-examples", "60", "--seed", "20261206",
                              "--request-timeout", "30", "--max-failures", "20"],
                             capture_output=True, text=True, timeout=900, check=False)  # fmt: skip
        log = gateway.log_tail(400)
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-2000:]
    generated = re.search(r"(\d+) generated, (\d+) passed", run.stdout)
    assert generated, run.stdout[-3000:]
    assert int(generated.group(1)) >= 1000 and generated.group(1) == generated.group(2), generated.group(0)
    assert "unhandled error" not in log, log
