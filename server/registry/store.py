"""Registry records and their persisted state machine.

    pending -> compressing -> evaluating -> ready | rejected | failed(reason)

(the base variant skips compressing). Every transition is checked against TRANSITIONS and
written in one statement, so a crash leaves each variant in exactly one recorded state;
`recover()` turns the states a crash interrupts back into pending (or failed after
MAX_ATTEMPTS), so nothing stays half-built.
"""

from __future__ import annotations

import enum
import json
import sqlite3
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

from server.registry.db import connect

MAX_ATTEMPTS = 3


class VariantState(enum.StrEnum):
    PENDING = "pending"
    CONVERTING = "converting"  # a GGUF source's base: its checkpoint being written (models/embedded.py)
    COMPRESSING = "compressing"
    EVALUATING = "evaluating"
    READY = "ready"
    REJECTED = "rejected"  # measured, but below the model's quality floor: kept, not served
    FAILED = "failed"
    UNSUPPORTED = "unsupported"  # this host's engine lacks the kernel it needs (server/engines/probe.py): not built


S = VariantState
TRANSITIONS: dict[VariantState, frozenset[VariantState]] = {
    S.PENDING: frozenset({S.CONVERTING, S.COMPRESSING, S.EVALUATING, S.FAILED}),
    S.CONVERTING: frozenset({S.EVALUATING, S.FAILED, S.PENDING}),
    S.COMPRESSING: frozenset({S.EVALUATING, S.FAILED, S.PENDING}),
    S.EVALUATING: frozenset({S.READY, S.REJECTED, S.FAILED, S.PENDING}),
    S.READY: frozenset({S.PENDING}),
    S.REJECTED: frozenset({S.PENDING}),
    S.FAILED: frozenset({S.PENDING}),
    S.UNSUPPORTED: frozenset({S.PENDING}),
}
INTERRUPTIBLE = (S.CONVERTING, S.COMPRESSING, S.EVALUATING)


class RegistryError(Exception):
    pass


class NotFound(RegistryError):
    pass


class AlreadyExists(RegistryError):
    pass


class IllegalTransition(RegistryError):
    pass


class NotReady(RegistryError):
    """What was asked of a model or variant needs a state it has not reached (e.g. its checkpoint written)."""


@dataclass(frozen=True)
class ModelRecord:
    name: str
    source_kind: str
    source_path: str
    source_sha256: str
    checkpoint_path: str
    architecture: str
    max_ppl_delta: float
    created_at: float
    tool_call_parser: str | None = None  # vLLM's parser for its tool calls; None: it takes no tools


@dataclass(frozen=True)
class VariantRecord:
    id: str
    model: str
    name: str
    method: str
    bits: int
    config: dict[str, Any]
    artifact_key: str | None
    model_path: str | None
    engine_args: tuple[str, ...]
    state: VariantState
    reason: str | None
    size_bytes: int | None
    seconds_to_make: float | None
    ppl: float | None
    ppl_delta: float | None
    sanity: str | None
    log_path: str | None
    attempts: int
    created_at: float
    updated_at: float
    latency: dict[str, Any] | None = None
    chat: dict[str, Any] | None = None  # optimizers.chat_quality.ChatScore, as a dict
    next_token: dict[str, Any] | None = None  # optimizers.next_token.Agreement (kld, top1, positions), as a dict
    calibration_samples: int | None = None  # windows calibrated on (optimizers/job.py: calibration_budget_s)

    @classmethod
    def from_row(cls, row: sqlite3.Row) -> VariantRecord:
        data = dict(row)
        data["config"] = json.loads(data.pop("config_json"))
        data["engine_args"] = tuple(json.loads(data.pop("engine_args_json")))
        data["state"] = VariantState(data["state"])
        latency = data.pop("latency_json", None)
        data["latency"] = json.loads(latency) if latency else None
        chat = data.pop("chat_json", None)
        data["chat"] = json.loads(chat) if chat else None
        next_token = data.pop("next_token_json", None)
        data["next_token"] = json.loads(next_token) if next_token else None
        return cls(**data)


@dataclass(frozen=True)
class JobRecord:
    id: int
    variant_id: str
    state: str
    stage: str
    pid: int | None
    error: str | None
    started_at: float
    finished_at: float | None


class RegistryWatcher(Protocol):
    """Told of every committed write to a variant (its record as now stored) and of every removed model."""

    def variant_written(self, record: VariantRecord, model: ModelRecord) -> None: ...

    def model_removed(self, name: str) -> None: ...


class Registry:
    """The only writer of variant state. Watchers (the serving catalog, server/catalog.py) are told of
    each write once it is committed, so no other code keeps a copy in step by hand."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._db = connect(path)
        self._watchers: list[RegistryWatcher] = []
        self._unpublished: list[Callable[[RegistryWatcher], None]] = []  # the open transaction's

    def watch(self, watcher: RegistryWatcher) -> None:
        self._watchers.append(watcher)

    def _publish(self, event: Callable[[RegistryWatcher], None]) -> None:
        self._unpublished.append(event)
        if not self._db.in_transaction:
            self._flush(committed=True)

    def _flush(self, committed: bool) -> None:
        events, self._unpublished = self._unpublished, []
        if committed:
            for event in events:
                for watcher in self._watchers:
                    event(watcher)

    def _variant_written(self, variant_id: str) -> VariantRecord:
        record = self.variant(variant_id)
        model = self.model(record.model)
        self._publish(lambda watcher: watcher.variant_written(record, model))
        return record

    def close(self) -> None:
        self._db.close()

    # models
    def add_model(self, record: ModelRecord, variants: list[tuple[str, str, int, dict[str, Any]]],
                  unsupported: dict[str, str] | None = None) -> None:
        """Insert a model and its variants (name, method, bits, config) atomically: pending, or
        `unsupported` with the reason for the names in `unsupported` (never built on this host)."""
        unsupported = unsupported or {}
        now = time.time()
        try:
            with self._tx():
                row = asdict(record)
                self._db.execute(f"INSERT INTO models ({', '.join(row)}) VALUES ({', '.join('?' * len(row))})",
                                 tuple(row.values()))
                for name, method, bits, config in variants:
                    self._db.execute(
                        "INSERT INTO variants (id, model, name, method, bits, config_json, state, reason,"
                        " created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                        (f"{record.name}@{name}", record.name, name, method, bits, json.dumps(config),
                         (S.UNSUPPORTED if name in unsupported else S.PENDING).value, unsupported.get(name),
                         now, now),
                    )
                for name, *_ in variants:
                    self._variant_written(f"{record.name}@{name}")
        except sqlite3.IntegrityError as exc:
            raise AlreadyExists(f"model {record.name!r} is already registered") from exc

    def models(self) -> list[ModelRecord]:
        return [ModelRecord(**dict(r)) for r in self._db.execute("SELECT * FROM models ORDER BY created_at")]

    def model(self, name: str) -> ModelRecord:
        row = self._db.execute("SELECT * FROM models WHERE name = ?", (name,)).fetchone()
        if row is None:
            raise NotFound(f"no model named {name!r}")
        return ModelRecord(**dict(row))

    def remove_model(self, name: str) -> list[VariantRecord]:
        """Delete a model and its variants and jobs; returns the variants it had."""
        variants = self.variants(name)
        self.model(name)
        self._db.execute("DELETE FROM models WHERE name = ?", (name,))
        self._publish(lambda watcher: watcher.model_removed(name))
        return variants

    # variants
    def variants(self, model: str | None = None) -> list[VariantRecord]:
        query, args = "SELECT * FROM variants", ()
        if model is not None:
            query, args = query + " WHERE model = ?", (model,)
        return [VariantRecord.from_row(r) for r in self._db.execute(query + " ORDER BY created_at, id", args)]

    def variant(self, variant_id: str) -> VariantRecord:
        row = self._db.execute("SELECT * FROM variants WHERE id = ?", (variant_id,)).fetchone()
        if row is None:
            raise NotFound(f"no variant {variant_id!r}")
        return VariantRecord.from_row(row)

    _PENDING = "SELECT {} FROM variants WHERE state = 'pending' ORDER BY method != 'base', created_at, rowid"

    def next_pending(self) -> VariantRecord | None:
        """Oldest pending variant in the order asked for, base variants first (the reference ppl)."""
        row = self._db.execute(self._PENDING.format("*") + " LIMIT 1").fetchone()
        return VariantRecord.from_row(row) if row else None

    def pending_queue(self) -> list[str]:
        """Every pending variant's id, in the order the builder takes them (next_pending's)."""
        return [row[0] for row in self._db.execute(self._PENDING.format("id"))]

    def transition(self, variant_id: str, new: VariantState, **fields: Any) -> VariantRecord:
        """Move a variant to `new` (checked), updating the given columns in the same statement."""
        current = self.variant(variant_id).state
        if new not in TRANSITIONS[current]:
            raise IllegalTransition(f"{variant_id}: {current.value} -> {new.value} is not allowed")
        if "engine_args" in fields:
            fields["engine_args_json"] = json.dumps(list(fields.pop("engine_args")))
        if "chat" in fields:
            fields["chat_json"] = json.dumps(fields.pop("chat"))
        if "next_token" in fields:
            fields["next_token_json"] = json.dumps(fields.pop("next_token"))
        columns = {"state": new.value, "updated_at": time.time(), **fields}
        assignments = ", ".join(f"{name} = ?" for name in columns)
        cursor = self._db.execute(f"UPDATE variants SET {assignments} WHERE id = ? AND state = ?",
                                  (*columns.values(), variant_id, current.value))
        if cursor.rowcount != 1:
            raise IllegalTransition(f"{variant_id} changed state concurrently")
        return self._variant_written(variant_id)

    def set_latency(self, variant_id: str, latency: dict[str, Any] | None) -> None:
        """Store a variant's latency priors (measurements, not a state change)."""
        self._db.execute("UPDATE variants SET latency_json = ? WHERE id = ?",
                         (json.dumps(latency) if latency is not None else None, variant_id))
        self._variant_written(variant_id)

    def set_chat(self, variant_id: str, chat: dict[str, Any]) -> None:
        """Store a variant's chat answers measured after the fact (a base from before the chat gate)."""
        self._db.execute("UPDATE variants SET chat_json = ? WHERE id = ?", (json.dumps(chat), variant_id))
        self._variant_written(variant_id)

    def recover(self) -> list[VariantRecord]:
        """After a crash: interrupted variants back to pending (failed after MAX_ATTEMPTS), their
        running jobs marked interrupted. Returns the variants it touched."""
        touched = []
        with self._tx():
            self._db.execute("UPDATE jobs SET state = 'interrupted', finished_at = ? WHERE state = 'running'",
                             (time.time(),))
            for variant in self.variants():
                if variant.state not in INTERRUPTIBLE:
                    continue
                if variant.attempts + 1 >= MAX_ATTEMPTS:
                    reason = f"interrupted {variant.attempts + 1} times while {variant.state.value}"
                    touched.append(self.transition(variant.id, S.FAILED, reason=reason,
                                                   attempts=variant.attempts + 1))
                else:
                    touched.append(self.transition(variant.id, S.PENDING, attempts=variant.attempts + 1,
                                                   reason=f"interrupted while {variant.state.value}; retrying"))
        return touched

    # jobs
    def start_job(self, variant_id: str, stage: str) -> int:
        cursor = self._db.execute("INSERT INTO jobs (variant_id, state, stage, started_at) VALUES (?, 'running', ?, ?)",
                                  (variant_id, stage, time.time()))
        return int(cursor.lastrowid)

    def update_job(self, job_id: int, **fields: Any) -> None:
        if fields.get("state") in ("succeeded", "failed", "interrupted"):
            fields.setdefault("finished_at", time.time())
        assignments = ", ".join(f"{name} = ?" for name in fields)
        self._db.execute(f"UPDATE jobs SET {assignments} WHERE id = ?", (*fields.values(), job_id))

    def job(self, job_id: int) -> JobRecord:
        row = self._db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        if row is None:
            raise NotFound(f"no job {job_id}")
        return JobRecord(**dict(row))

    def jobs(self, variant_id: str | None = None) -> list[JobRecord]:
        query, args = "SELECT * FROM jobs", ()
        if variant_id is not None:
            query, args = query + " WHERE variant_id = ?", (variant_id,)
        return [JobRecord(**dict(r)) for r in self._db.execute(query + " ORDER BY id", args)]

    def counts(self) -> tuple[dict[tuple[str, str], int], dict[str, int]]:
        """(variants by (model, state), jobs by state), for the metrics scrape."""
        variants = {(r[0], r[1]): r[2] for r in
                    self._db.execute("SELECT model, state, COUNT(*) FROM variants GROUP BY model, state")}
        jobs = {r[0]: r[1] for r in self._db.execute("SELECT state, COUNT(*) FROM jobs GROUP BY state")}
        return variants, jobs

    def running_jobs(self) -> list[JobRecord]:
        return [JobRecord(**dict(r)) for r in self._db.execute("SELECT * FROM jobs WHERE state = 'running'")]

    def _tx(self) -> _Transaction:
        return _Transaction(self._db, self._flush)


class _Transaction:
    """BEGIN IMMEDIATE ... COMMIT, or ROLLBACK on error (nesting is flattened); then the watchers are
    told of what was committed, or nothing of what was rolled back."""

    def __init__(self, db: sqlite3.Connection, done: Callable[[bool], None]) -> None:
        self._db = db
        self._done = done
        self._outer = False

    def __enter__(self) -> None:
        if not self._db.in_transaction:
            self._db.execute("BEGIN IMMEDIATE")
            self._outer = True

    def __exit__(self, exc_type, exc, tb) -> None:
        if self._outer:
            self._db.execute("ROLLBACK" if exc_type else "COMMIT")
            self._done(exc_type is None)
