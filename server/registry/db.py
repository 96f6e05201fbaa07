"""The registry's SQLite file: WAL mode, foreign keys, and migrations kept in code.

Migrations are append-only: `PRAGMA user_version` records how many have run. One that rebuilds a table (SQLite
cannot alter a CHECK constraint) starts with `REBUILD`: it runs with foreign keys off, as SQLite's documented
procedure for schema changes says (dropping `models` with them on would delete every variant through ON DELETE
CASCADE), and the foreign keys are checked before it commits.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

REBUILD = "-- rebuild\n"

MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE models (
        name            TEXT PRIMARY KEY,
        source_kind     TEXT NOT NULL CHECK (source_kind IN ('hf', 'gguf')),
        source_path     TEXT NOT NULL,
        source_sha256   TEXT NOT NULL,
        checkpoint_path TEXT NOT NULL,
        architecture    TEXT NOT NULL,
        max_ppl_delta   REAL NOT NULL,
        created_at      REAL NOT NULL
    );
    CREATE TABLE variants (
        id               TEXT PRIMARY KEY,
        model            TEXT NOT NULL REFERENCES models(name) ON DELETE CASCADE,
        name             TEXT NOT NULL,
        method           TEXT NOT NULL,
        bits             INTEGER NOT NULL,
        config_json      TEXT NOT NULL,
        artifact_key     TEXT,
        model_path       TEXT,
        engine_args_json TEXT NOT NULL DEFAULT '[]',
        state            TEXT NOT NULL,
        reason           TEXT,
        size_bytes       INTEGER,
        seconds_to_make  REAL,
        ppl              REAL,
        ppl_delta        REAL,
        sanity           TEXT,
        log_path         TEXT,
        attempts         INTEGER NOT NULL DEFAULT 0,
        created_at       REAL NOT NULL,
        updated_at       REAL NOT NULL
    );
    CREATE INDEX variants_by_state ON variants(state, created_at);
    CREATE TABLE jobs (
        id          INTEGER PRIMARY KEY AUTOINCREMENT,
        variant_id  TEXT NOT NULL REFERENCES variants(id) ON DELETE CASCADE,
        state       TEXT NOT NULL CHECK (state IN ('running', 'succeeded', 'failed', 'interrupted')),
        stage       TEXT NOT NULL DEFAULT '',
        pid         INTEGER,
        error       TEXT,
        started_at  REAL NOT NULL,
        finished_at REAL
    );
    """,
    # Latency priors from the profiling run when a variant becomes ready (JSON, see routing.predictor).
    "ALTER TABLE variants ADD COLUMN latency_json TEXT;",
    # Greedy answers to the chat set and their score (optimizers/chat_quality.py), as JSON.
    "ALTER TABLE variants ADD COLUMN chat_json TEXT;",
    # vLLM's tool-call parser for the model's engines (`--tool-call-parser`); NULL: the model takes no tools.
    "ALTER TABLE models ADD COLUMN tool_call_parser TEXT;",
    # Next-token agreement with the base on the chat windows (optimizers/next_token.py Agreement), as JSON.
    "ALTER TABLE variants ADD COLUMN next_token_json TEXT;",
    # Calibration windows the compression used: fewer than its profile's when it had to fit its time budget.
    "ALTER TABLE variants ADD COLUMN calibration_samples INTEGER;",
    # A model merged from others (optimizers/merge.py): source_path is its recipe (server/registry/merging.py).
    REBUILD + """
    CREATE TABLE models_new (
        name             TEXT PRIMARY KEY,
        source_kind      TEXT NOT NULL CHECK (source_kind IN ('hf', 'gguf', 'merge')),
        source_path      TEXT NOT NULL,
        source_sha256    TEXT NOT NULL,
        checkpoint_path  TEXT NOT NULL,
        architecture     TEXT NOT NULL,
        max_ppl_delta    REAL NOT NULL,
        created_at       REAL NOT NULL,
        tool_call_parser TEXT
    );
    INSERT INTO models_new (name, source_kind, source_path, source_sha256, checkpoint_path, architecture,
                            max_ppl_delta, created_at, tool_call_parser)
        SELECT name, source_kind, source_path, source_sha256, checkpoint_path, architecture, max_ppl_delta,
               created_at, tool_call_parser FROM models;
    DROP TABLE models;
    ALTER TABLE models_new RENAME TO models;
    """,
)


def connect(path: Path) -> sqlite3.Connection:
    """Open (creating and migrating if needed) the registry database."""
    path.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=10.0)
    conn.row_factory = sqlite3.Row
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA foreign_keys=ON")
    conn.execute("PRAGMA synchronous=NORMAL")
    migrate(conn)
    return conn


def migrate(conn: sqlite3.Connection) -> None:
    version = conn.execute("PRAGMA user_version").fetchone()[0]
    for number, script in enumerate(MIGRATIONS[version:], start=version + 1):
        if not script.startswith(REBUILD):
            conn.executescript(f"BEGIN; {script}; PRAGMA user_version = {number}; COMMIT;")
            continue
        conn.execute("PRAGMA foreign_keys=OFF")  # a no-op inside a transaction: set before BEGIN
        try:
            conn.executescript(f"BEGIN; {script};")
            broken = conn.execute("PRAGMA foreign_key_check").fetchall()
            if broken:
                conn.execute("ROLLBACK")
                raise sqlite3.IntegrityError(f"migration {number} would break {len(broken)} foreign keys")
            conn.execute(f"PRAGMA user_version = {number}")  # not executescript: it would commit first
            conn.execute("COMMIT")
        finally:
            conn.execute("PRAGMA foreign_keys=ON")
