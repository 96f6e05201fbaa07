"""Models merged from registered ones (optimizers/merge.py): the recipe, and the job that writes the checkpoint.

A merged model registers at once, like a GGUF source: its recipe (parents' checkpoints and digests, method, t or
weights) is written under the home's `merges/` and is the model's `source_path`; its checkpoint is written by
its base variant's job (state `converting`, phase "merging the parents"), in a process of its own, then every
rung is built, evaluated and gated like any model's. Its base, which no base of its own can judge, is judged
against the better of its parents (judge_merge): a merge that answers worse than the parent it came from is
rejected like a rung that answers worse than its base.
"""

from __future__ import annotations

import hashlib
import json
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from optimizers.chat_quality import ChatGate, ChatScore, judge
from server.jobs.compress import last_event, run_events
from server.registry.store import ModelRecord, Registry


class MergeFailed(RuntimeError):
    pass


@dataclass(frozen=True)
class MergeRecipe:
    parents: tuple[str, ...]  # model names, as registered when the merge was asked for
    checkpoints: tuple[str, ...]  # their checkpoint directories
    digests: tuple[str, ...]  # their source digests: the recipe's identity
    method: str
    t: Any = None  # slerp: a number or mergekit's schedule
    weights: tuple[float, ...] | None = None  # linear

    def digest(self) -> str:
        payload = {"method": self.method, "t": self.t, "weights": self.weights, "parents": self.digests}
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()

    def argv(self, python: str, out: Path) -> list[str]:
        argv = [python, "-m", "optimizers.merge", *self.checkpoints, "--out", str(out), "--method", self.method]
        if self.method == "slerp":
            argv += ["--t", json.dumps(self.t)]
        if self.weights is not None:
            argv += ["--weights", json.dumps(list(self.weights))]
        return argv

    def write(self, merges_dir: Path, name: str) -> Path:
        merges_dir.mkdir(parents=True, exist_ok=True)
        path = merges_dir / f"{name}-{self.digest()[:24]}.json"
        path.write_text(json.dumps(asdict(self), indent=1))
        return path

    @classmethod
    def read(cls, path: Path) -> MergeRecipe:
        data = json.loads(path.read_text())
        return cls(parents=tuple(data["parents"]), checkpoints=tuple(data["checkpoints"]),
                   digests=tuple(data["digests"]), method=data["method"], t=data.get("t"),
                   weights=tuple(data["weights"]) if data.get("weights") is not None else None)  # fmt: skip


def merged_checkpoint_dir(checkpoints_dir: Path, recipe: MergeRecipe) -> Path:
    return checkpoints_dir / f"merge-{recipe.digest()[:24]}"


async def run_merge(recipe: MergeRecipe, target: Path, log_path: Path, python: str = sys.executable,
                    on_event: Callable[[dict], None] = lambda event: None,
                    on_start: Callable[[int], None] = lambda pid: None) -> dict:  # fmt: skip
    """Write the merged checkpoint into `target` (whole or not at all: optimizers/merge.py renames a finished
    temp dir). Cancellable: the job's process group is killed and its temp dir removed (run_events)."""
    if (target / "config.json").is_file():
        return {"cached": True}
    returncode, events = await run_events(recipe.argv(python, target), log_path, None, target, on_event, on_start)
    done = last_event(events, "done")
    if returncode != 0 or done is None:
        error = last_event(events, "error")
        message = error.get("message") if error else f"exit {returncode}; see {log_path}"
        raise MergeFailed(f"merging {', '.join(recipe.parents)} failed: {message}")
    return done


@dataclass(frozen=True)
class ParentScore:
    """A parent's base as measured by the registry: the reference a merged model is judged against."""

    name: str
    ppl: float
    chat: ChatScore


def parent_scores(registry: Registry, model: ModelRecord) -> list[ParentScore]:
    """The measured bases of a merged model's parents that are still registered."""
    scores = []
    for name in MergeRecipe.read(Path(model.source_path)).parents:
        base = next((v for v in registry.variants(name) if v.method == "base"), None)
        chat = ChatScore.stored(base.chat) if base is not None else None
        if base is not None and base.ppl and chat is not None:
            scores.append(ParentScore(name, base.ppl, chat))
    return scores


def judge_merge(ppl: float, chat: ChatScore, parents: list[ParentScore], max_ppl_delta: float,
                gate: ChatGate) -> tuple[str | None, ParentScore | None]:  # fmt: skip
    """A merged model's base against the better parent (the lowest perplexity): its perplexity within the
    model's floor of that parent's, then its chat answers within the gate's margins of that parent's, as a rung
    is judged against its base. (None, None) when no parent has been measured (nothing to judge against)."""
    if not parents:
        return None, None
    best = min(parents, key=lambda p: p.ppl)
    delta = ppl / best.ppl - 1
    if delta > max_ppl_delta:
        return (f"ppl delta {delta:+.1%} against its parent {best.name} exceeds the model's floor of "
                f"{max_ppl_delta:+.1%}"), best  # fmt: skip
    reason = judge(chat, best.chat, gate)
    return (f"against its parent {best.name}: {reason}" if reason else None), best
