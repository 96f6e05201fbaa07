"""The fault drills' figures (issue 15): each drill test records what it measured, and the report under the
test home (drills.md, from drills.jsonl) is rewritten after every record, so a run of the suite leaves the
figures of every drill it ran beside its pass/fail."""

from __future__ import annotations

import datetime as dt
import json
import os
from typing import Any

from tests.integration.gateway_process import TEST_HOME

REPORT = TEST_HOME / "drills.md"
RECORDS = TEST_HOME / "drills.jsonl"


def record(drill: str, **figures: Any) -> None:
    """Append one drill's figures and rewrite the report."""
    RECORDS.parent.mkdir(parents=True, exist_ok=True)
    entry = {"at": dt.datetime.now().isoformat(timespec="seconds"), "drill": drill, "test": os.environ.get(
        "PYTEST_CURRENT_TEST", "").split(" ")[0], "figures": figures}  # fmt: skip
    print(f"drill {drill}: {figures}")
    with RECORDS.open("a") as out:
        out.write(json.dumps(entry) + "\n")
    lines = ["# Fault drills (tests/integration/drills.py)", "",
             "Each row: one run of a drill test, with what it measured. Written by the tests themselves.", "",
             "| when | drill | figures | test |", "|---|---|---|---|"]  # fmt: skip
    for line in RECORDS.read_text().splitlines():
        row = json.loads(line)
        figures_text = ", ".join(f"{k} {v}" for k, v in row["figures"].items())
        lines.append(f"| {row['at']} | {row['drill']} | {figures_text} | `{row['test']}` |")
    REPORT.write_text("\n".join(lines) + "\n")
