"""The registry's SQLite file and state machine, on a real file."""

from __future__ import annotations

import sqlite3
import time

import pytest

from server.catalog import Catalog
from server.registry.db import MIGRATIONS, connect
from server.registry.store import (
    MAX_ATTEMPTS,
    AlreadyExists,
    IllegalTransition,
    ModelRecord,
    NotFound,
    Registry,
    VariantState,
)

S = VariantState


def _model(name: str = "m") -> ModelRecord:
    return ModelRecord(name, "hf", "/src", "ab" * 32, "/src", "LlamaForCausalLM", 0.3, time.time())


@pytest.fixture
def registry(tmp_path) -> Registry:
    reg = Registry(tmp_path / "registry.sqlite3")
    reg.add_model(_model(), [("bf16", "base", 16, {}), ("int8", "int8", 8, {"smoothing_strength": 0.8})])
    return reg


def test_file_is_wal_and_migrated(tmp_path) -> None:
    conn = connect(tmp_path / "r.sqlite3")
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert conn.execute("PRAGMA user_version").fetchone()[0] == len(MIGRATIONS)
    connect(tmp_path / "r.sqlite3")  # migrating again is a no-op


def test_model_and_variants_round_trip(registry: Registry, tmp_path) -> None:
    again = Registry(tmp_path / "registry.sqlite3")  # a second connection sees committed data
    assert [m.name for m in again.models()] == ["m"]
    variants = again.variants("m")
    assert [(v.id, v.state) for v in variants] == [("m@bf16", S.PENDING), ("m@int8", S.PENDING)]
    assert variants[1].config == {"smoothing_strength": 0.8}


def test_duplicate_model_is_refused_and_adds_nothing(registry: Registry) -> None:
    with pytest.raises(AlreadyExists):
        registry.add_model(_model(), [("bf16", "base", 16, {})])
    assert len(registry.variants()) == 2


def test_next_pending_is_the_base_first(registry: Registry) -> None:
    assert registry.next_pending().id == "m@bf16"
    assert registry.pending_queue() == ["m@bf16", "m@int8"]
    registry.transition("m@bf16", S.EVALUATING)
    assert registry.next_pending().id == "m@int8"
    assert registry.pending_queue() == ["m@int8"]


@pytest.mark.parametrize(
    ("path", "allowed"),
    [
        ([S.COMPRESSING, S.EVALUATING, S.READY], True),
        ([S.COMPRESSING, S.EVALUATING, S.REJECTED], True),
        ([S.COMPRESSING, S.FAILED, S.PENDING], True),
        ([S.READY], False),
        ([S.COMPRESSING, S.READY], False),
        ([S.EVALUATING, S.COMPRESSING], False),
        ([S.FAILED, S.READY], False),
    ],
)
def test_transitions(registry: Registry, path: list[VariantState], allowed: bool) -> None:
    def walk() -> None:
        for state in path:
            registry.transition("m@int8", state)

    if allowed:
        walk()
        assert registry.variant("m@int8").state is path[-1]
    else:
        with pytest.raises(IllegalTransition):
            walk()


def test_transition_updates_fields_atomically(registry: Registry) -> None:
    registry.transition("m@int8", S.COMPRESSING, artifact_key="k")
    record = registry.transition("m@int8", S.EVALUATING, engine_args=["--x", "1"], size_bytes=10)
    assert (record.artifact_key, record.engine_args, record.size_bytes) == ("k", ("--x", "1"), 10)


def test_recover_puts_interrupted_work_back_to_pending_then_fails_it(registry: Registry) -> None:
    job = registry.start_job("m@int8", "compressing")
    registry.transition("m@int8", S.COMPRESSING)
    for attempt in range(1, MAX_ATTEMPTS):
        (touched,) = registry.recover()
        assert (touched.state, touched.attempts) == (S.PENDING, attempt)
        assert "interrupted while compressing" in touched.reason
        registry.transition("m@int8", S.COMPRESSING)
    assert registry.job(job).state == "interrupted"
    (touched,) = registry.recover()
    assert touched.state is S.FAILED
    assert f"interrupted {MAX_ATTEMPTS} times" in touched.reason


def test_a_conversion_is_a_base_state_the_recovery_retries(registry: Registry) -> None:
    # A GGUF source's base is `converting` while the builder writes its checkpoint (issue 15: registration
    # answers before converting); a crash there puts it back to pending, and the builder converts again.
    registry.start_job("m@bf16", "converting")
    registry.transition("m@bf16", S.CONVERTING)
    (touched,) = registry.recover()
    assert (touched.id, touched.state) == ("m@bf16", S.PENDING)
    assert touched.reason == "interrupted while converting; retrying"
    registry.transition("m@bf16", S.CONVERTING)
    assert registry.transition("m@bf16", S.EVALUATING).state is S.EVALUATING
    with pytest.raises(IllegalTransition):
        registry.transition("m@bf16", S.CONVERTING)  # converted once; evaluating never goes back to it


def test_recover_leaves_finished_states_alone(registry: Registry) -> None:
    registry.transition("m@bf16", S.EVALUATING)
    registry.transition("m@bf16", S.READY, ppl=11.3)
    assert registry.recover() == []
    assert registry.variant("m@bf16").ppl == 11.3


def test_remove_model_cascades(registry: Registry, tmp_path) -> None:
    registry.start_job("m@int8", "compressing")
    removed = registry.remove_model("m")
    assert [v.id for v in removed] == ["m@bf16", "m@int8"]
    assert registry.variants() == [] and registry.jobs() == []
    with pytest.raises(NotFound):
        registry.remove_model("m")


def test_check_constraint_guards_the_file(registry: Registry) -> None:
    with pytest.raises(sqlite3.IntegrityError):
        registry._db.execute("INSERT INTO jobs (variant_id, state, started_at) VALUES ('m@int8', 'weird', 0)")


def test_chat_answers_are_stored_with_the_verdict_and_after_the_fact(registry: Registry) -> None:
    chat = {"answers": ["The capital of France is Paris."], "correct": 1, "loops": 0, "prompts": 1}
    registry.transition("m@bf16", S.EVALUATING)
    record = registry.transition("m@bf16", S.READY, ppl=11.3, ppl_delta=0.0, chat=chat)
    assert record.chat == chat and Registry(registry.path).variant("m@bf16").chat == chat
    assert registry.variant("m@int8").chat is None
    registry.set_chat("m@int8", {**chat, "correct": 0})  # a base measured before the chat gate existed
    assert registry.variant("m@int8").chat["correct"] == 0


def test_a_rung_the_host_cannot_run_is_registered_unsupported_and_never_built(tmp_path) -> None:
    registry = Registry(tmp_path / "r.sqlite3")
    registry.add_model(_model("u"), [("bf16", "base", 16, {}), ("awq", "awq", 4, {})],
                       unsupported={"awq": "unsupported on this host: no cpu_gemm_wna16"})  # fmt: skip
    awq = registry.variant("u@awq")
    assert awq.state is S.UNSUPPORTED and "cpu_gemm_wna16" in awq.reason
    assert registry.next_pending().id == "u@bf16"
    registry.transition("u@bf16", S.EVALUATING)
    assert registry.next_pending() is None  # nothing left to build
    with pytest.raises(IllegalTransition):
        registry.transition("u@awq", S.COMPRESSING)


def _states(catalog) -> dict[str, str]:
    return {v.id: v.state.value for m in catalog.models() for v in m.variants}


def test_the_catalog_follows_every_committed_write(registry: Registry, tmp_path) -> None:
    catalog = Catalog()
    catalog.follow(registry)  # what is registered already
    assert _states(catalog) == {"m@bf16": "pending", "m@int8": "pending"}
    registry.transition("m@int8", S.COMPRESSING)  # written by the registry only; the catalog is told
    registry.transition("m@int8", S.EVALUATING, ppl=10.0, ppl_delta=0.02)
    _, int8 = catalog.resolve("m@int8")
    assert (int8.state, int8.ppl_delta) == (S.EVALUATING, 0.02)
    registry.add_model(_model("n"), [("bf16", "base", 16, {}), ("int4", "int4-gptq", 4, {})],
                       {"int4": "no kernel"})
    _, int4 = catalog.resolve("n@int4")
    assert (int4.state, int4.reason, int4.withdrawn) == (S.UNSUPPORTED, "no kernel", True)
    registry.remove_model("m")
    assert [m.name for m in catalog.models()] == ["n"]


def test_a_rolled_back_write_is_never_published(registry: Registry) -> None:
    catalog = Catalog()
    catalog.follow(registry)
    with pytest.raises(AlreadyExists):  # its variants' inserts are rolled back with the model's
        registry.add_model(_model(), [("bf16", "base", 16, {}), ("w4", "awq", 4, {})])
    assert _states(catalog) == {"m@bf16": "pending", "m@int8": "pending"}


def test_recovery_is_published_once_committed(registry: Registry) -> None:
    registry.transition("m@int8", S.COMPRESSING)
    seen: list[tuple[str, str]] = []

    class Watcher:
        def variant_written(self, record, model) -> None:
            # told after COMMIT: a second connection already sees what the watcher is told
            seen.append((record.id, Registry(registry.path).variant(record.id).state.value))

        def model_removed(self, name: str) -> None:
            raise AssertionError(name)

    catalog = Catalog()
    catalog.follow(registry)
    registry.watch(Watcher())
    registry.recover()
    assert seen == [("m@int8", "pending")]
    assert _states(catalog)["m@int8"] == "pending"


def test_a_models_tool_call_parser_is_kept_and_the_catalog_says_who_takes_tools(tmp_path) -> None:
    registry = Registry(tmp_path / "registry.sqlite3")
    registry.add_model(_model("plain"), [("bf16", "base", 16, {})])
    tools = ModelRecord("tools", "hf", "/src", "cd" * 32, "/src", "LlamaForCausalLM", 0.3, time.time(), "hermes")
    registry.add_model(tools, [("bf16", "base", 16, {})])
    assert registry.model("tools").tool_call_parser == "hermes" and registry.model("plain").tool_call_parser is None
    catalog = Catalog()
    catalog.follow(Registry(registry.path))  # from the file, as a restarted gateway loads it
    plain, _ = catalog.resolve("plain")
    assert "without a tool_call_parser" in (plain.tools_refused or "") and '"none"' in plain.tools_refused
    assert catalog.resolve("tools@bf16")[0].tools_refused is None


def _file_before(path, fragment: str) -> sqlite3.Connection:
    """A registry file as it was before the first migration whose script has `fragment`."""
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA foreign_keys=ON")
    before = next(i for i, script in enumerate(MIGRATIONS) if fragment in script)
    for number, script in enumerate(MIGRATIONS[:before], start=1):
        conn.executescript(f"BEGIN; {script}; PRAGMA user_version = {number}; COMMIT;")
    return conn


def test_a_registry_file_from_before_tool_call_parsers_migrates(tmp_path) -> None:
    path = tmp_path / "old.sqlite3"
    conn = _file_before(path, "tool_call_parser")
    conn.execute("INSERT INTO models VALUES ('old', 'hf', '/s', 'ab', '/s', 'LlamaForCausalLM', 0.3, 1.0)")
    conn.execute("INSERT INTO variants (id, model, name, method, bits, config_json, state, created_at, updated_at) "
                 "VALUES ('old@bf16', 'old', 'bf16', 'base', 16, '{}', 'ready', 1.0, 1.0)")
    conn.commit()
    conn.close()
    registry = Registry(path)
    assert registry.model("old").tool_call_parser is None
    assert registry.variant("old@bf16").next_token is None  # measured when it is next evaluated


def test_the_merge_source_kind_migration_keeps_every_variant_and_job(tmp_path) -> None:
    """Migration 7 rebuilds `models` (a CHECK constraint cannot be altered): with foreign keys on, dropping the
    old table would have deleted every variant through ON DELETE CASCADE."""
    path = tmp_path / "old.sqlite3"
    conn = _file_before(path, "'merge'")
    conn.execute("INSERT INTO models VALUES ('old', 'gguf', '/s', 'ab', '/s', 'LlamaForCausalLM', 0.3, 1.0, 'hermes')")
    conn.execute("INSERT INTO variants (id, model, name, method, bits, config_json, state, created_at, updated_at) "
                 "VALUES ('old@bf16', 'old', 'bf16', 'base', 16, '{}', 'ready', 1.0, 1.0)")
    conn.execute("INSERT INTO jobs (variant_id, state, started_at) VALUES ('old@bf16', 'succeeded', 1.0)")
    conn.commit()
    conn.close()
    registry = Registry(path)
    assert registry.model("old").source_kind == "gguf" and registry.model("old").tool_call_parser == "hermes"
    assert registry.variant("old@bf16").state is S.READY and len(registry.jobs()) == 1
    registry.add_model(ModelRecord("merged", "merge", "/r.json", "cd" * 32, "/c", "LlamaForCausalLM", 0.3, 2.0),
                       [("bf16", "base", 16, {})])
    with pytest.raises(sqlite3.IntegrityError):  # the constraint is still there, with the new kind
        registry._db.execute("UPDATE models SET source_kind = 'weird' WHERE name = 'old'")
    registry.remove_model("old")  # the foreign keys still cascade
    assert [v.id for v in registry.variants()] == ["merged@bf16"] and registry.jobs() == []
    assert sqlite3.connect(path).execute("PRAGMA user_version").fetchone()[0] == len(MIGRATIONS)
