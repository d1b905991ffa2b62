"""Every SQL statement of the project, written once.

Statements are written in strict Snowflake SQL with ``?`` placeholders (bound parameters only,
JSON through ``SELECT PARSE_JSON(?)``, never ``VALUES (PARSE_JSON(...))``; a batch of rows as
one JSON-array parameter, see ``bind_rows``). ``render`` gives the text for each warehouse: for
Snowflake the source itself with pyformat placeholders, for DuckDB the sqlglot translation with
Snowflake's types mapped to DuckDB's.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import sqlglot
from sqlglot import exp
from sqlglot.tokenizer_core import TokenType


class Dialect(StrEnum):
    DUCKDB = "duckdb"
    SNOWFLAKE = "snowflake"


STATE_TABLE = "policy_execution_state"
EVENTS_TABLE = "policy_execution_events"
LOCKS_TABLE = "policy_execution_locks"

# The second seed's DDL, column for column, then what this project adds. Quoted lower-case names
# so the seed's own monitoring queries run verbatim on Snowflake.
STATE_COLUMNS: tuple[tuple[str, str], ...] = (
    ("execution_id", "VARCHAR"),
    ("policy_id", "VARCHAR"),
    ("poll_count", "NUMBER DEFAULT 0"),
    ("status", "VARCHAR DEFAULT 'pending'"),
    ("start_time", "TIMESTAMP_NTZ DEFAULT CURRENT_TIMESTAMP()"),
    ("last_poll_time", "TIMESTAMP_NTZ"),
    ("completed", "BOOLEAN DEFAULT FALSE"),
    ("requires_circuit_breaker", "BOOLEAN DEFAULT FALSE"),
    ("circuit_breaker_initiated", "BOOLEAN DEFAULT FALSE"),
    ("circuit_breaker_completed", "BOOLEAN DEFAULT FALSE"),
    ("error_message", "VARCHAR"),
    ("message", "VARCHAR"),
    ("api_response", "VARIANT"),
    ("policy_data", "VARIANT"),
    ("policy_status_response", "VARIANT"),
    ("circuit_breaker_response", "VARIANT"),
    # Added by this project.
    ("policy_name", "VARCHAR"),
    ("policy_content_hash", "VARCHAR"),
    ("create_idempotency_key", "VARCHAR"),
    ("circuit_idempotency_key", "VARCHAR"),
    ("trigger_reason", "VARCHAR"),
    ("policy_created_time", "TIMESTAMP_NTZ"),
    ("policy_ready_time", "TIMESTAMP_NTZ"),
    ("completed_time", "TIMESTAMP_NTZ"),
    ("updated_time", "TIMESTAMP_NTZ DEFAULT CURRENT_TIMESTAMP()"),
    ("error_step", "VARCHAR"),
    ("resumable", "BOOLEAN DEFAULT FALSE"),
    ("resume_count", "NUMBER DEFAULT 0"),
    ("dagster_run_id", "VARCHAR"),
    # Waiting without a held run (`policy_progress_sensor` polls it from then on).
    ("handed_off", "BOOLEAN DEFAULT FALSE"),
    ("next_poll_time", "TIMESTAMP_NTZ"),
    # Automatic resumption: how many, when the last, and which sensor tick claimed it.
    ("auto_resume_count", "NUMBER DEFAULT 0"),
    ("last_resume_time", "TIMESTAMP_NTZ"),
    ("progress_claim", "VARCHAR"),
)

EVENT_COLUMNS: tuple[tuple[str, str], ...] = (
    ("event_id", "VARCHAR"),
    ("execution_id", "VARCHAR"),
    ("policy_name", "VARCHAR"),
    ("event_time", "TIMESTAMP_NTZ DEFAULT CURRENT_TIMESTAMP()"),
    ("event_type", "VARCHAR"),
    ("endpoint", "VARCHAR"),
    ("http_method", "VARCHAR"),
    ("http_status", "NUMBER"),
    ("latency_ms", "FLOAT"),
    ("attempt", "NUMBER"),
    ("outcome", "VARCHAR"),
    ("from_status", "VARCHAR"),
    ("to_status", "VARCHAR"),
    ("message", "VARCHAR"),
    ("detail", "VARIANT"),
    ("dagster_run_id", "VARCHAR"),
)

LOCK_COLUMNS: tuple[tuple[str, str], ...] = (
    ("policy_name", "VARCHAR"),
    ("lease_owner", "VARCHAR"),
    ("lease_expires_at", "TIMESTAMP_NTZ"),
    ("updated_time", "TIMESTAMP_NTZ DEFAULT CURRENT_TIMESTAMP()"),
)

STATE_HISTORY_TABLE = "policy_execution_history"
EVENTS_HISTORY_TABLE = "policy_execution_events_history"
ARCHIVE_RUNS_TABLE = "policy_archive_runs"

_ARCHIVED = (("archived_time", "TIMESTAMP_NTZ"), ("archive_run_id", "VARCHAR"))

ARCHIVE_RUN_COLUMNS: tuple[tuple[str, str], ...] = (
    ("archive_run_id", "VARCHAR"),
    ("started_time", "TIMESTAMP_NTZ DEFAULT CURRENT_TIMESTAMP()"),
    ("finished_time", "TIMESTAMP_NTZ"),
    ("retention_days", "NUMBER"),
    ("status", "VARCHAR"),
    ("batches", "NUMBER DEFAULT 0"),
    ("executions_archived", "NUMBER DEFAULT 0"),
    ("events_archived", "NUMBER DEFAULT 0"),
    ("error_message", "VARCHAR"),
    ("dagster_run_id", "VARCHAR"),
)

GUARD_TABLE = "policy_api_guard"

GUARD_COLUMNS: tuple[tuple[str, str], ...] = (
    ("guard_name", "VARCHAR"),
    ("state", "VARCHAR DEFAULT 'closed'"),
    ("consecutive_failures", "NUMBER DEFAULT 0"),
    ("opened_at", "TIMESTAMP_NTZ"),
    ("probe_owner", "VARCHAR"),
    ("last_error", "VARCHAR"),
    ("updated_time", "TIMESTAMP_NTZ DEFAULT CURRENT_TIMESTAMP()"),
)

TABLES: dict[str, tuple[tuple[str, str], ...]] = {
    STATE_TABLE: STATE_COLUMNS,
    EVENTS_TABLE: EVENT_COLUMNS,
    LOCKS_TABLE: LOCK_COLUMNS,
    STATE_HISTORY_TABLE: STATE_COLUMNS + _ARCHIVED,
    EVENTS_HISTORY_TABLE: EVENT_COLUMNS + _ARCHIVED,
    ARCHIVE_RUNS_TABLE: ARCHIVE_RUN_COLUMNS,
    GUARD_TABLE: GUARD_COLUMNS,
}

# Columns read back into `ExecutionRow` (the JSON columns stay in the warehouse).
EXECUTION_READ_COLUMNS = (
    "execution_id",
    "policy_name",
    "policy_id",
    "status",
    "poll_count",
    "completed",
    "requires_circuit_breaker",
    "circuit_breaker_initiated",
    "circuit_breaker_completed",
    "error_message",
    "error_step",
    "resumable",
    "message",
    "create_idempotency_key",
    "circuit_idempotency_key",
    "policy_content_hash",
    "start_time",
    "last_poll_time",
    "handed_off",
    "auto_resume_count",
)

_READ = ", ".join(f'"{c}"' for c in EXECUTION_READ_COLUMNS)

# Handed off by its run: waiting for readiness, polled by the progress sensor, not stuck.
WAITING = '("status" = \'policy_created\' AND COALESCE("handed_off", FALSE) = TRUE)'

# An execution that a later run continues rather than replaces.
ACTIVE = (
    "(\"status\" IN ('pending', 'policy_created', 'policy_ready') "
    'OR ("status" = \'error\' AND "resumable" = TRUE))'
)


@dataclass(frozen=True)
class Statement:
    name: str
    source: str

    def render(self, dialect: Dialect) -> str:
        return _render(self.source, dialect)


def create_table(table: str) -> Statement:
    columns = ", ".join(f'"{name}" {ddl}' for name, ddl in TABLES[table])
    return Statement(f"create_{table}", f"CREATE TABLE IF NOT EXISTS {table} ({columns})")


def add_column(table: str, column: str) -> Statement:
    ddl = dict(TABLES[table])[column]
    return Statement(
        f"add_{table}_{column}",
        f'ALTER TABLE {table} ADD COLUMN IF NOT EXISTS "{column}" {_strip_default(ddl)}',
    )


def _strip_default(ddl: str) -> str:
    # A column added later gets no DEFAULT: Snowflake refuses non-constant defaults on ALTER.
    return ddl.split(" DEFAULT ")[0]


SCHEMA_COLUMNS = Statement(
    "schema_columns",
    "SELECT LOWER(table_name), LOWER(column_name) FROM information_schema.columns "
    "WHERE LOWER(table_schema) = LOWER(CURRENT_SCHEMA())",
)

# --- Batches ------------------------------------------------------------------------------------
# A step works on many policies at once, so the statements below take a whole batch of rows as
# ONE bound parameter: a JSON array of objects, unpacked into a table by ``_rows`` (Snowflake's
# FLATTEN; DuckDB's unnest, see ``_duckdb_dialect``). The text is the same for every batch size,
# so it is rendered once, and the warehouse binds one value rather than rows x columns
# placeholders. ``bind_rows`` packs the rows: at most MAX_BATCH rows and MAX_BATCH_BYTES of JSON
# per statement.

MAX_BATCH = 10_000
# Snowflake asks for statements, bound values included, under 1 MB.
MAX_BATCH_BYTES = 900_000

Column = tuple[str, str]


def _rows(columns: Sequence[Column]) -> str:
    """``(SELECT f.value:a::VARCHAR AS v_a, ... FROM LATERAL FLATTEN(...) AS f)``: the rows of
    the JSON-array parameter as a table. A key a row leaves out (a None) reads as NULL; a
    VARIANT column is the JSON value itself (no PARSE_JSON of a string, per row)."""
    select = ", ".join(
        f"f.value:{key} AS v_{key}" if type_ == "VARIANT" else f"f.value:{key}::{type_} AS v_{key}"
        for key, type_ in columns
    )
    return f"(SELECT {select} FROM LATERAL FLATTEN(INPUT => PARSE_JSON(?)) AS f)"


_NAMES = _rows((("policy_name", "VARCHAR"),))
_IDS = _rows((("execution_id", "VARCHAR"),))


class JsonText(str):
    """Text that is already JSON (``state.to_json``): a row embeds it as a value, not a string."""


def _json(value: Any) -> str:
    if isinstance(value, JsonText):
        return str(value)
    return json.dumps(value, default=str, ensure_ascii=False, separators=(",", ":"))


def bind_rows(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """The rows as JSON-array parameters, one per statement to run. None values are left out
    (a JSON null would be a VARIANT null on Snowflake, not NULL)."""
    batches: list[str] = []
    current: list[str] = []
    size = 2  # the brackets
    for row in rows:
        fields = (f"{_json(key)}:{_json(value)}" for key, value in row.items() if value is not None)
        item = "{" + ",".join(fields) + "}"
        if current and (len(current) >= MAX_BATCH or size + 1 + len(item) > MAX_BATCH_BYTES):
            batches.append(f"[{','.join(current)}]")
            current, size = [], 2
        size += len(item) + (1 if current else 0)  # and a comma before all but the first
        current.append(item)
    if current:
        batches.append(f"[{','.join(current)}]")
    return batches


def bind_values(key: str, values: Sequence[Any]) -> list[str]:
    """``bind_rows`` for a list of single values (names, ids) read as ``v_<key>``."""
    return bind_rows([{key: value} for value in values])


def _update_from_rows(
    name: str, columns: Sequence[Column], assignments: str, condition: str
) -> Statement:
    """UPDATE the state rows named by ``v_execution_id`` with per-row values, if ``condition``
    still holds for them (the conditional move that decides who wins)."""
    return Statement(
        name,
        f'UPDATE {STATE_TABLE} SET {assignments}, "updated_time" = CURRENT_TIMESTAMP() '
        f"FROM {_rows((('execution_id', 'VARCHAR'), *columns))} AS v "
        f'WHERE {STATE_TABLE}."execution_id" = v.v_execution_id AND {condition}',
    )


# --- Per-policy lease: at most one run works on a policy at a time ------------------------------

# MERGE, not INSERT ... WHERE NOT EXISTS: Snowflake runs concurrent INSERTs side by side, while
# MERGEs on one table take turns, so two first-time callers cannot both insert. Params: names.
ENSURE_LOCK_ROWS = Statement(
    "ensure_lock_rows",
    f'MERGE INTO {LOCKS_TABLE} USING {_NAMES} AS s ON {LOCKS_TABLE}."policy_name" = '
    f's.v_policy_name WHEN NOT MATCHED THEN INSERT ("policy_name", "updated_time") '
    f"VALUES (s.v_policy_name, CURRENT_TIMESTAMP())",
)

_LEASE_TO = (
    f'UPDATE {LOCKS_TABLE} SET "lease_owner" = ?, '
    f'"lease_expires_at" = DATEADD(second, ?, CURRENT_TIMESTAMP()), '
    f'"updated_time" = CURRENT_TIMESTAMP() '
    f'WHERE "policy_name" IN (SELECT v_policy_name FROM {_NAMES}) '
)

# Params: owner, ttl seconds, names, owner. Free, expired or already ours.
ACQUIRE_LEASES = Statement(
    "acquire_leases",
    _LEASE_TO + """AND ("lease_owner" IS NULL OR "lease_owner" = ? """
    """OR "lease_expires_at" < CURRENT_TIMESTAMP())""",
)

# Params: owner, ttl seconds, names, previous owner (a run known to have finished).
TAKE_OVER_LEASES = Statement("take_over_leases", _LEASE_TO + 'AND "lease_owner" = ?')

# Params: names, owner.
RELEASE_LEASES = Statement(
    "release_leases",
    f'UPDATE {LOCKS_TABLE} SET "lease_owner" = NULL, "lease_expires_at" = NULL, '
    f'"updated_time" = CURRENT_TIMESTAMP() '
    f'WHERE "policy_name" IN (SELECT v_policy_name FROM {_NAMES}) AND "lease_owner" = ?',
)

LEASE_HOLDERS = Statement(
    "lease_holders",
    f'SELECT "policy_name", "lease_owner", "lease_expires_at" FROM {LOCKS_TABLE} '
    f'WHERE "policy_name" IN (SELECT v_policy_name FROM {_NAMES}) '
    f'AND "lease_owner" IS NOT NULL AND "lease_expires_at" >= CURRENT_TIMESTAMP()',
)

# --- Executions ---------------------------------------------------------------------------------

NEW_EXECUTION_COLUMNS: tuple[Column, ...] = (
    ("execution_id", "VARCHAR"),
    ("policy_name", "VARCHAR"),
    ("policy_content_hash", "VARCHAR"),
    ("policy_data", "VARIANT"),
    ("create_idempotency_key", "VARCHAR"),
    ("message", "VARCHAR"),
    ("dagster_run_id", "VARCHAR"),
)

# The intents: committed before any create call is made.
INSERT_EXECUTIONS = Statement(
    "insert_executions",
    f'INSERT INTO {STATE_TABLE} ("execution_id", "policy_name", "policy_content_hash", '
    f'"policy_data", "create_idempotency_key", "message", "dagster_run_id", "status", '
    f'"poll_count", "completed", "requires_circuit_breaker", "circuit_breaker_initiated", '
    f'"circuit_breaker_completed", "resumable", "resume_count", "start_time", "updated_time", '
    f'"handed_off", "auto_resume_count") '
    f"SELECT v_execution_id, v_policy_name, v_policy_content_hash, v_policy_data, "
    f"v_create_idempotency_key, v_message, v_dagster_run_id, 'pending', 0, FALSE, FALSE, "
    f"FALSE, FALSE, FALSE, 0, CURRENT_TIMESTAMP(), CURRENT_TIMESTAMP(), FALSE, 0 "
    f"FROM {_rows(NEW_EXECUTION_COLUMNS)}",
)

# Each policy's active execution, or else its latest. A long history stays cheap: a hash
# aggregate finds each policy's latest start, the window orders only the candidates (active,
# latest or without a start time) on narrow columns, and only the chosen rows are read whole.
CURRENT_EXECUTIONS = Statement(
    "current_executions",
    f'WITH named AS (SELECT "policy_name", "execution_id", "start_time", '
    f"CASE WHEN {ACTIVE} THEN 0 ELSE 1 END AS inactive FROM {STATE_TABLE} "
    f'WHERE "policy_name" IN (SELECT v_policy_name FROM {_NAMES})), '
    f'latest AS (SELECT "policy_name", MAX("start_time") AS latest_start FROM named '
    f'GROUP BY "policy_name"), '
    f'chosen AS (SELECT n."execution_id" FROM named AS n JOIN latest AS l '
    f'ON n."policy_name" = l."policy_name" WHERE n.inactive = 0 '
    f'OR n."start_time" = l.latest_start OR n."start_time" IS NULL '
    f'QUALIFY ROW_NUMBER() OVER (PARTITION BY n."policy_name" '
    f'ORDER BY n.inactive, n."start_time" DESC, n."execution_id" DESC) = 1) '
    f"SELECT {_READ} FROM {STATE_TABLE} "
    f'WHERE "execution_id" IN (SELECT "execution_id" FROM chosen)',
)

EXECUTIONS_BY_ID = Statement(
    "executions_by_id",
    f"SELECT {_READ} FROM {STATE_TABLE} "
    f'WHERE "execution_id" IN (SELECT v_execution_id FROM {_IDS})',
)

POLICY_DATA_BY_ID = Statement(
    "policy_data_by_id",
    f'SELECT "execution_id", "policy_data" FROM {STATE_TABLE} '
    f'WHERE "execution_id" IN (SELECT v_execution_id FROM {_IDS})',
)

# Params: target status, message, ids. A resumable error goes back to where its step starts.
REOPEN_EXECUTIONS = Statement(
    "reopen_executions",
    f'UPDATE {STATE_TABLE} SET "status" = ?, "message" = ?, "resumable" = FALSE, '
    f'"error_message" = NULL, "error_step" = NULL, "handed_off" = FALSE, '
    f'"resume_count" = COALESCE("resume_count", 0) + 1, "updated_time" = CURRENT_TIMESTAMP() '
    f'WHERE "execution_id" IN (SELECT v_execution_id FROM {_IDS}) AND "status" = \'error\' '
    f'AND "resumable" = TRUE',
)

# The moves below take rows of execution_id plus the columns named.
# A policy_id already bound to another execution (live or archived) is refused: an API that
# hands one policy_id to several creates must not get two executions completed under it.
MARK_CREATED = _update_from_rows(
    "mark_created",
    (("policy_id", "VARCHAR"), ("response", "VARIANT"), ("message", "VARCHAR")),
    '"status" = \'policy_created\', "policy_id" = v.v_policy_id, '
    '"api_response" = v.v_response, "message" = v.v_message, '
    '"policy_created_time" = CURRENT_TIMESTAMP()',
    f"{STATE_TABLE}.\"status\" = 'pending' "
    f"AND NOT EXISTS (SELECT 1 FROM {STATE_TABLE} AS other "
    f'WHERE other."policy_id" = v.v_policy_id AND other."execution_id" <> v.v_execution_id) '
    f"AND NOT EXISTS (SELECT 1 FROM {STATE_HISTORY_TABLE} AS archived "
    f'WHERE archived."policy_id" = v.v_policy_id)',
)

# Params: policy ids. Which executions (live or archived) hold these policy_ids.
POLICY_ID_HOLDERS = Statement(
    "policy_id_holders",
    f'SELECT "policy_id", "execution_id", "policy_name" FROM {STATE_TABLE} '
    f'WHERE "policy_id" IN (SELECT v_policy_id FROM {_rows((("policy_id", "VARCHAR"),))}) '
    f'UNION ALL SELECT "policy_id", "execution_id", "policy_name" FROM {STATE_HISTORY_TABLE} '
    f'WHERE "policy_id" IN (SELECT v_policy_id FROM {_rows((("policy_id", "VARCHAR"),))})',
)

# Params: names, names. The completed executions of these policies, archived ones included:
# "the same content is one policy" holds after archiving too.
COMPLETED_EXECUTIONS = Statement(
    "completed_executions",
    f"SELECT {_READ} FROM {STATE_TABLE} WHERE \"status\" = 'completed' "
    f'AND "policy_name" IN (SELECT v_policy_name FROM {_NAMES}) '
    f"UNION ALL SELECT {_READ} FROM {STATE_HISTORY_TABLE} WHERE \"status\" = 'completed' "
    f'AND "policy_name" IN (SELECT v_policy_name FROM {_NAMES})',
)

# ``next_in`` (seconds) is when the progress sensor polls a handed-off policy next (NULL in a
# run, which schedules its own polls).
RECORD_POLLS = _update_from_rows(
    "record_polls",
    (("polls", "NUMBER"), ("response", "VARIANT"), ("message", "VARCHAR"), ("next_in", "NUMBER")),
    '"poll_count" = COALESCE("poll_count", 0) + v.v_polls, '
    '"last_poll_time" = CURRENT_TIMESTAMP(), '
    '"policy_status_response" = v.v_response, "message" = v.v_message, '
    '"next_poll_time" = DATEADD(second, v.v_next_in, CURRENT_TIMESTAMP())',
    f"{STATE_TABLE}.\"status\" = 'policy_created'",
)

# A run hands a long wait off: the row stays 'policy_created', flagged, with its next poll due.
# Any earlier sensor claim is cleared, so the tick that finds it ready can claim it.
HAND_OFF = _update_from_rows(
    "hand_off",
    (("next_in", "NUMBER"), ("message", "VARCHAR")),
    '"handed_off" = TRUE, "next_poll_time" = DATEADD(second, v.v_next_in, CURRENT_TIMESTAMP()), '
    '"progress_claim" = NULL, "message" = v.v_message',
    f"{STATE_TABLE}.\"status\" = 'policy_created'",
)

# The seed's dual validation: the API said ready for this policy_id AND the row still agrees.
MARK_READY = _update_from_rows(
    "mark_ready",
    (("policy_id", "VARCHAR"), ("message", "VARCHAR")),
    '"status" = \'policy_ready\', "requires_circuit_breaker" = TRUE, '
    '"message" = v.v_message, "policy_ready_time" = CURRENT_TIMESTAMP()',
    f'{STATE_TABLE}."status" = \'policy_created\' AND {STATE_TABLE}."policy_id" = v.v_policy_id',
)

# The exactly-once gate: only a ready execution whose breaker is not yet initiated moves.
CLAIM_CIRCUIT_BREAKERS = _update_from_rows(
    "claim_circuit_breakers",
    (("key", "VARCHAR"), ("reason", "VARCHAR"), ("message", "VARCHAR")),
    '"circuit_breaker_initiated" = TRUE, "circuit_idempotency_key" = v.v_key, '
    '"trigger_reason" = v.v_reason, "message" = v.v_message',
    f"{STATE_TABLE}.\"status\" = 'policy_ready' "
    f'AND {STATE_TABLE}."circuit_breaker_initiated" = FALSE',
)

MARK_COMPLETED = _update_from_rows(
    "mark_completed",
    (("response", "VARIANT"), ("message", "VARCHAR")),
    '"status" = \'completed\', "completed" = TRUE, "circuit_breaker_completed" = TRUE, '
    '"circuit_breaker_response" = v.v_response, "message" = v.v_message, '
    '"error_message" = NULL, "completed_time" = CURRENT_TIMESTAMP()',
    f"{STATE_TABLE}.\"status\" = 'policy_ready' "
    f'AND {STATE_TABLE}."circuit_breaker_initiated" = TRUE '
    f'AND {STATE_TABLE}."circuit_breaker_completed" = FALSE',
)

MARK_ERRORS = _update_from_rows(
    "mark_errors",
    (
        ("error", "VARCHAR"),
        ("step", "VARCHAR"),
        ("resumable", "BOOLEAN"),
        ("message", "VARCHAR"),
    ),
    '"status" = \'error\', "error_message" = v.v_error, "error_step" = v.v_step, '
    '"resumable" = v.v_resumable, "message" = v.v_message',
    f"{STATE_TABLE}.\"status\" IN ('pending', 'policy_created', 'policy_ready')",
)


@functools.cache
def set_responses(column: str) -> Statement:
    """Keep a raw API response (``api_response`` or ``circuit_breaker_response``)."""
    assert column in ("api_response", "circuit_breaker_response")
    return _update_from_rows(
        f"set_{column}",
        (("response", "VARIANT"),),
        f'"{column}" = v.v_response',
        "TRUE",
    )


# Operator overrides (`policy-pipeline override`): conditional like every other move.
FORCE_READY = Statement(
    "force_ready",
    f'UPDATE {STATE_TABLE} SET "status" = \'policy_ready\', "requires_circuit_breaker" = TRUE, '
    f'"resumable" = FALSE, "error_message" = NULL, "error_step" = NULL, "message" = ?, '
    f'"policy_ready_time" = COALESCE("policy_ready_time", CURRENT_TIMESTAMP()), '
    f'"updated_time" = CURRENT_TIMESTAMP() '
    f"WHERE \"execution_id\" = ? AND \"status\" IN ('policy_created', 'error') "
    f'AND "policy_id" IS NOT NULL AND "circuit_breaker_completed" = FALSE',
)

# Params: status, error, step, resumable, message, id. An operator's forced policy_ready whose
# circuit breaker never started goes back to where it was.
UNDO_FORCE_READY = Statement(
    "undo_force_ready",
    f'UPDATE {STATE_TABLE} SET "status" = ?, "error_message" = ?, "error_step" = ?, '
    f'"resumable" = ?, "requires_circuit_breaker" = FALSE, "message" = ?, '
    f'"updated_time" = CURRENT_TIMESTAMP() '
    f"WHERE \"execution_id\" = ? AND \"status\" IN ('policy_ready', 'error') "
    f'AND "circuit_breaker_initiated" = FALSE AND "circuit_breaker_completed" = FALSE',
)

SKIP_CIRCUIT_BREAKER = Statement(
    "skip_circuit_breaker",
    f'UPDATE {STATE_TABLE} SET "status" = \'completed\', "completed" = TRUE, '
    f'"requires_circuit_breaker" = FALSE, "resumable" = FALSE, "error_message" = NULL, '
    f'"message" = ?, "completed_time" = CURRENT_TIMESTAMP(), '
    f'"updated_time" = CURRENT_TIMESTAMP() '
    f'WHERE "execution_id" = ? AND "status" IN (?, ?, ?) '
    f'AND "circuit_breaker_initiated" = FALSE',
)

# --- The Policy API guard (closed -> open -> half_open -> closed), one row, shared by all runs --

ENSURE_GUARD = Statement(
    "ensure_guard",
    f"MERGE INTO {GUARD_TABLE} USING (SELECT ? AS v_name) AS s "
    f'ON {GUARD_TABLE}."guard_name" = s.v_name WHEN NOT MATCHED THEN '
    f'INSERT ("guard_name", "state", "consecutive_failures", "updated_time") '
    f"VALUES (s.v_name, 'closed', 0, CURRENT_TIMESTAMP())",
)

READ_GUARD = Statement(
    "read_guard",
    f'SELECT "state", "consecutive_failures", "opened_at", "probe_owner", "last_error" '
    f'FROM {GUARD_TABLE} WHERE "guard_name" = ?',
)

# Params: failures, last error, name. From closed only: the first process to trip it wins.
OPEN_GUARD = Statement(
    "open_guard",
    f'UPDATE {GUARD_TABLE} SET "state" = \'open\', "consecutive_failures" = ?, '
    f'"last_error" = ?, "opened_at" = CURRENT_TIMESTAMP(), "probe_owner" = NULL, '
    f'"updated_time" = CURRENT_TIMESTAMP() WHERE "guard_name" = ? AND "state" = \'closed\'',
)

# Params: owner, name, cool-down seconds (negative), probe timeout seconds (negative).
CLAIM_GUARD_PROBE = Statement(
    "claim_guard_probe",
    f'UPDATE {GUARD_TABLE} SET "state" = \'half_open\', "probe_owner" = ?, '
    f'"updated_time" = CURRENT_TIMESTAMP() WHERE "guard_name" = ? AND ('
    f'("state" = \'open\' AND "opened_at" <= DATEADD(second, ?, CURRENT_TIMESTAMP())) '
    f'OR ("state" = \'half_open\' AND "updated_time" <= DATEADD(second, ?, CURRENT_TIMESTAMP())))',
)

# Params: name, owner. Only the probing process settles the probe.
CLOSE_GUARD = Statement(
    "close_guard",
    f'UPDATE {GUARD_TABLE} SET "state" = \'closed\', "consecutive_failures" = 0, '
    f'"opened_at" = NULL, "probe_owner" = NULL, "last_error" = NULL, '
    f'"updated_time" = CURRENT_TIMESTAMP() '
    f'WHERE "guard_name" = ? AND "state" = \'half_open\' AND "probe_owner" = ?',
)

# Params: last error, name, owner.
REOPEN_GUARD = Statement(
    "reopen_guard",
    f'UPDATE {GUARD_TABLE} SET "state" = \'open\', "opened_at" = CURRENT_TIMESTAMP(), '
    f'"last_error" = ?, "probe_owner" = NULL, "updated_time" = CURRENT_TIMESTAMP() '
    f'WHERE "guard_name" = ? AND "state" = \'half_open\' AND "probe_owner" = ?',
)

GUARD_EVENTS = Statement(
    "guard_events",
    f'SELECT "event_time", "message" FROM {EVENTS_TABLE} '
    f'WHERE "event_type" = \'guard\' ORDER BY "event_time" DESC LIMIT ?',
)

# --- Progress outside runs (`policy_progress_sensor`) -------------------------------------------
# A handful of statements per tick however many policies wait: the due ones are read with a
# LIMIT, and each kind of write is one statement for the whole batch.

# Params: lead seconds, limit. The handed-off policies whose next poll is due (or due within
# the lead), earliest first, and how long each has waited since it was created.
DUE_WAITS = Statement(
    "due_waits",
    f'SELECT {_READ}, DATEDIFF(second, "policy_created_time", CURRENT_TIMESTAMP()) '
    f"FROM {STATE_TABLE} WHERE {WAITING} "
    f'AND "next_poll_time" <= DATEADD(second, ?, CURRENT_TIMESTAMP()) '
    f'ORDER BY "next_poll_time" LIMIT ?',
)

# How many wait, and in how many seconds the next one is due (for the tick's cursor).
WAIT_SUMMARY = Statement(
    "wait_summary",
    f'SELECT COUNT(*), DATEDIFF(second, CURRENT_TIMESTAMP(), MIN("next_poll_time")) '
    f"FROM {STATE_TABLE} WHERE {WAITING}",
)

# Params: limit. What nothing is moving: an active execution that no live lease holds (its run
# crashed, stopped or failed around it) and is not handed off, or a resumable error; with the
# seconds since it last moved or was last resumed (the backoff is applied by the caller).
RESUME_CANDIDATES = Statement(
    "resume_candidates",
    f"SELECT {_READ}, "
    f'DATEDIFF(second, COALESCE("last_resume_time", "updated_time"), CURRENT_TIMESTAMP()) '
    f"FROM {STATE_TABLE} "
    f"WHERE ((\"status\" IN ('pending', 'policy_created', 'policy_ready') AND NOT {WAITING}) "
    f'OR ("status" = \'error\' AND "resumable" = TRUE)) '
    f'AND "policy_name" NOT IN (SELECT "policy_name" FROM {LOCKS_TABLE} '
    f'WHERE "lease_owner" IS NOT NULL AND "lease_expires_at" >= CURRENT_TIMESTAMP()) '
    f'ORDER BY COALESCE("last_resume_time", "updated_time") LIMIT ?',
)

_RESUMABLE = (
    f"({STATE_TABLE}.\"status\" IN ('pending', 'policy_created', 'policy_ready') "
    f'OR ({STATE_TABLE}."status" = \'error\' AND {STATE_TABLE}."resumable" = TRUE))'
)
_COUNT_UNCHANGED = f'COALESCE({STATE_TABLE}."auto_resume_count", 0) = v.v_count'

# A tick claims a resumption: one tick wins per (execution, count); its token says which.
CLAIM_RESUMES = _update_from_rows(
    "claim_resumes",
    (("count", "NUMBER"), ("token", "VARCHAR")),
    '"auto_resume_count" = v.v_count + 1, "last_resume_time" = CURRENT_TIMESTAMP(), '
    '"progress_claim" = v.v_token',
    f"{_RESUMABLE} AND {_COUNT_UNCHANGED}",
)

# A tick claims the circuit-breaker run of an execution that turned ready outside a run.
CLAIM_CIRCUIT_REQUESTS = _update_from_rows(
    "claim_circuit_requests",
    (("token", "VARCHAR"),),
    '"progress_claim" = v.v_token',
    f"{STATE_TABLE}.\"status\" = 'policy_ready' "
    f'AND {STATE_TABLE}."circuit_breaker_initiated" = FALSE '
    f'AND {STATE_TABLE}."progress_claim" IS NULL',
)

# The resume budget is spent (or a handed-off wait passed its deadline): error for good.
GIVE_UP = _update_from_rows(
    "give_up",
    (("count", "NUMBER"), ("token", "VARCHAR"), ("step", "VARCHAR"), ("error", "VARCHAR")),
    '"status" = \'error\', "resumable" = FALSE, "handed_off" = FALSE, '
    '"error_message" = v.v_error, "error_step" = v.v_step, "message" = v.v_error, '
    '"progress_claim" = v.v_token',
    f"{_RESUMABLE} AND {_COUNT_UNCHANGED}",
)

# Params: token, ids. Which of these executions the tick with this token claimed.
CLAIMED_BY = Statement(
    "claimed_by",
    f'SELECT "execution_id" FROM {STATE_TABLE} WHERE "progress_claim" = ? '
    f'AND "execution_id" IN (SELECT v_execution_id FROM {_IDS})',
)


# --- Monitoring: the seeds' queries, as checks and the operator CLI run them -------------------

# The seed's health check ("not completed and started more than an hour ago"), limited to
# executions still in flight: a failed execution is reported as failed, not as stuck.
STUCK_EXECUTIONS = Statement(
    "stuck_executions",
    f'SELECT "execution_id", "policy_name", "status", "start_time", "message", "error_message" '
    f'FROM {STATE_TABLE} WHERE "completed" = FALSE AND {ACTIVE} AND NOT {WAITING} '
    f'AND "start_time" < DATEADD(minute, ?, CURRENT_TIMESTAMP()) '
    f'ORDER BY "start_time" LIMIT ?',
)

STUCK_EXECUTION_COUNT = Statement(
    "stuck_execution_count",
    f'SELECT COUNT(*) FROM {STATE_TABLE} WHERE "completed" = FALSE AND {ACTIVE} '
    f'AND NOT {WAITING} AND "start_time" < DATEADD(minute, ?, CURRENT_TIMESTAMP())',
)

# The seed's 24-hour success rate, over finished executions (an execution still polling is not
# a failure), with NULLIF so a window with none finished is no division by zero.
SUCCESS_RATE = Statement(
    "success_rate",
    "SELECT COUNT(*) AS total_executions, "
    "SUM(CASE WHEN \"status\" = 'completed' THEN 1 ELSE 0 END) AS successful, "
    "SUM(CASE WHEN \"status\" = 'error' THEN 1 ELSE 0 END) AS failed, "
    "ROUND(100.0 * SUM(CASE WHEN \"status\" = 'completed' THEN 1 ELSE 0 END) "
    "/ NULLIF(SUM(CASE WHEN \"status\" IN ('completed', 'error') THEN 1 ELSE 0 END), 0), 2) "
    "AS success_rate_percent "
    f'FROM {STATE_TABLE} WHERE "start_time" >= DATEADD(hour, ?, CURRENT_TIMESTAMP())',
)

_VIOLATION = '"execution_id", "policy_name", "status"'

# The state machine's invariants; every row returned is one violation.
CONSISTENCY_VIOLATIONS = Statement(
    "consistency_violations",
    f"SELECT 'completed_without_circuit_breaker' AS violation, {_VIOLATION} FROM {STATE_TABLE} "
    f'WHERE "completed" = TRUE AND "circuit_breaker_completed" = FALSE '
    f'AND "requires_circuit_breaker" = TRUE '
    f"UNION ALL SELECT 'completed_flag_disagrees_with_status', {_VIOLATION} FROM {STATE_TABLE} "
    f'WHERE ("status" = \'completed\') <> "completed" '
    f"UNION ALL SELECT 'missing_policy_id', {_VIOLATION} FROM {STATE_TABLE} "
    f"WHERE \"status\" IN ('policy_created', 'policy_ready', 'completed') "
    f'AND "policy_id" IS NULL '
    f"UNION ALL SELECT 'circuit_breaker_completed_without_initiation', {_VIOLATION} "
    f'FROM {STATE_TABLE} WHERE "circuit_breaker_completed" = TRUE '
    f'AND "circuit_breaker_initiated" = FALSE '
    f"UNION ALL SELECT 'poll_count_over_maximum', {_VIOLATION} FROM {STATE_TABLE} "
    f'WHERE "poll_count" > ? * (COALESCE("resume_count", 0) + 1) '
    f"UNION ALL SELECT 'several_active_executions', NULL, \"policy_name\", NULL "
    f'FROM {STATE_TABLE} WHERE {ACTIVE} GROUP BY "policy_name" HAVING COUNT(*) > 1 '
    f"ORDER BY 1, 3 LIMIT ?",
)

# The seed's "View recent executions" query, with the policy name and optional filters.
FILTERED_EXECUTIONS = Statement(
    "filtered_executions",
    f'SELECT "policy_name", "execution_id", "policy_id", "status", "poll_count", '
    f'"circuit_breaker_completed", "message", "start_time", "error_message" '
    f"FROM {STATE_TABLE} "
    f'WHERE (CAST(? AS VARCHAR) IS NULL OR "policy_name" = ?) '
    f'AND (CAST(? AS VARCHAR) IS NULL OR "status" = ?) '
    f'ORDER BY "start_time" DESC, "policy_name" LIMIT ?',
)

FAILED_EXECUTIONS = Statement(
    "failed_executions",
    f'SELECT "execution_id", "policy_name", "error_step", "error_message", "resumable", '
    f'"updated_time" FROM {STATE_TABLE} WHERE "status" = \'error\' '
    f'AND "start_time" >= DATEADD(hour, ?, CURRENT_TIMESTAMP()) '
    f'ORDER BY "updated_time" DESC LIMIT ?',
)

LAST_API_CALLS = Statement(
    "last_api_calls",
    f'SELECT "event_time", "policy_name", "http_method", "endpoint", "http_status", '
    f'"attempt", "outcome", "latency_ms" FROM {EVENTS_TABLE} '
    f'WHERE "event_type" = \'api_call\' ORDER BY "event_time" DESC LIMIT ?',
)

PING = Statement("ping", "SELECT 1")

# Which policy contents have already been executed (so the catalog sensor never launches the
# same content twice, even with a lost cursor). Archived executions count too.
EXECUTED_CONTENT = Statement(
    "executed_content",
    f'SELECT DISTINCT "policy_name", "policy_content_hash" FROM {STATE_TABLE} '
    f'UNION SELECT DISTINCT "policy_name", "policy_content_hash" FROM {STATE_HISTORY_TABLE}',
)

# --- Archiving: terminal executions move to history tables, one transaction per batch ---------

TERMINAL = '("status" = \'completed\' OR ("status" = \'error\' AND "resumable" = FALSE))'

BEGIN = Statement("begin", "BEGIN")
COMMIT = Statement("commit", "COMMIT")
ROLLBACK = Statement("rollback", "ROLLBACK")

ARCHIVE_CANDIDATES = Statement(
    "archive_candidates",
    f'SELECT "execution_id" FROM {STATE_TABLE} WHERE {TERMINAL} '
    f'AND COALESCE("completed_time", "updated_time", "start_time") '
    f"< DATEADD(day, ?, CURRENT_TIMESTAMP()) "
    f'ORDER BY "start_time", "execution_id" LIMIT ?',
)


def _names(columns: tuple[tuple[str, str], ...]) -> str:
    return ", ".join(f'"{name}"' for name, _ in columns)


def _archive_batch() -> tuple[Statement, Statement, Statement, Statement]:
    """Copy a batch of executions (ids bound as one JSON array) and their events to history,
    then delete them. Every statement re-checks that the execution is terminal, so an
    in-progress row is never moved."""
    terminal_ids = (
        f'SELECT "execution_id" FROM {STATE_TABLE} '
        f'WHERE "execution_id" IN (SELECT v_execution_id FROM {_IDS}) AND {TERMINAL}'
    )
    state, events = _names(STATE_COLUMNS), _names(EVENT_COLUMNS)
    return (
        Statement(
            "archive_events",
            f'INSERT INTO {EVENTS_HISTORY_TABLE} ({events}, "archived_time", "archive_run_id") '
            f"SELECT {events}, CURRENT_TIMESTAMP(), ? FROM {EVENTS_TABLE} "
            f'WHERE "execution_id" IN ({terminal_ids})',
        ),
        Statement(
            "archive_executions",
            f'INSERT INTO {STATE_HISTORY_TABLE} ({state}, "archived_time", "archive_run_id") '
            f"SELECT {state}, CURRENT_TIMESTAMP(), ? FROM {STATE_TABLE} "
            f'WHERE "execution_id" IN ({terminal_ids})',
        ),
        Statement(
            "delete_archived_events",
            f'DELETE FROM {EVENTS_TABLE} WHERE "execution_id" IN ({terminal_ids})',
        ),
        Statement(
            "delete_archived_executions",
            f'DELETE FROM {STATE_TABLE} WHERE "execution_id" IN '
            f"(SELECT v_execution_id FROM {_IDS}) AND {TERMINAL}",
        ),
    )


ARCHIVE_EVENTS, ARCHIVE_EXECUTIONS, DELETE_ARCHIVED_EVENTS, DELETE_ARCHIVED_EXECUTIONS = (
    _archive_batch()
)

# Events about a run rather than an execution (a failed run, the guard) have no execution_id:
# they are archived by age. Params: archive run id, days (negative) / days (negative).
_RUN_EVENTS = '"execution_id" IS NULL AND "event_time" < DATEADD(day, ?, CURRENT_TIMESTAMP())'
ARCHIVE_RUN_EVENTS = Statement(
    "archive_run_events",
    f'INSERT INTO {EVENTS_HISTORY_TABLE} ({_names(EVENT_COLUMNS)}, "archived_time", '
    f'"archive_run_id") SELECT {_names(EVENT_COLUMNS)}, CURRENT_TIMESTAMP(), ? '
    f"FROM {EVENTS_TABLE} WHERE {_RUN_EVENTS}",
)
DELETE_ARCHIVED_RUN_EVENTS = Statement(
    "delete_archived_run_events", f"DELETE FROM {EVENTS_TABLE} WHERE {_RUN_EVENTS}"
)

START_ARCHIVE_RUN = Statement(
    "start_archive_run",
    f'INSERT INTO {ARCHIVE_RUNS_TABLE} ("archive_run_id", "started_time", "retention_days", '
    f'"status", "batches", "executions_archived", "events_archived", "dagster_run_id") '
    f"SELECT ?, CURRENT_TIMESTAMP(), ?, 'running', 0, 0, 0, ?",
)

# Params: batches, executions, events, archive run id. Progress after each batch: a run that
# is killed shows how far it got.
ARCHIVE_RUN_PROGRESS = Statement(
    "archive_run_progress",
    f'UPDATE {ARCHIVE_RUNS_TABLE} SET "batches" = ?, "executions_archived" = ?, '
    f'"events_archived" = ? WHERE "archive_run_id" = ? AND "status" = \'running\'',
)

RUNNING_ARCHIVE_RUNS = Statement(
    "running_archive_runs",
    f'SELECT "archive_run_id", "dagster_run_id" FROM {ARCHIVE_RUNS_TABLE} '
    f"WHERE \"status\" = 'running'",
)

# Params: error, archive run id. A run found dead while its row still says running.
INTERRUPT_ARCHIVE_RUN = Statement(
    "interrupt_archive_run",
    f"UPDATE {ARCHIVE_RUNS_TABLE} SET \"status\" = 'interrupted', "
    f'"finished_time" = CURRENT_TIMESTAMP(), "error_message" = ? '
    f'WHERE "archive_run_id" = ? AND "status" = \'running\'',
)

FINISH_ARCHIVE_RUN = Statement(
    "finish_archive_run",
    f'UPDATE {ARCHIVE_RUNS_TABLE} SET "finished_time" = CURRENT_TIMESTAMP(), "status" = ?, '
    f'"batches" = ?, "executions_archived" = ?, "events_archived" = ?, "error_message" = ? '
    f'WHERE "archive_run_id" = ?',
)

# --- Audit events -------------------------------------------------------------------------------

EVENT_INSERT_COLUMNS: tuple[Column, ...] = (
    ("event_id", "VARCHAR"),
    ("execution_id", "VARCHAR"),
    ("policy_name", "VARCHAR"),
    ("event_type", "VARCHAR"),
    ("endpoint", "VARCHAR"),
    ("http_method", "VARCHAR"),
    ("http_status", "NUMBER"),
    ("latency_ms", "FLOAT"),
    ("attempt", "NUMBER"),
    ("outcome", "VARCHAR"),
    ("from_status", "VARCHAR"),
    ("to_status", "VARCHAR"),
    ("message", "VARCHAR"),
    ("detail", "VARIANT"),
    ("dagster_run_id", "VARCHAR"),
)

_EVENT_VALUES = ", ".join(f"v_{c}" for c, _ in EVENT_INSERT_COLUMNS)

# A batch of audit events: one round trip per flush, not per event.
INSERT_EVENTS = Statement(
    "insert_events",
    f'INSERT INTO {EVENTS_TABLE} ({_names(EVENT_INSERT_COLUMNS)}, "event_time") '
    f"SELECT {_EVENT_VALUES}, CURRENT_TIMESTAMP() FROM {_rows(EVENT_INSERT_COLUMNS)}",
)


# --- Rendering ----------------------------------------------------------------------------------


@functools.cache
def _render(source: str, dialect: Dialect) -> str:
    if dialect is Dialect.SNOWFLAKE:
        return _snowflake_pyformat(source)
    tree = sqlglot.parse_one(source, read="snowflake")
    return tree.transform(_duckdb_dialect).sql(dialect="duckdb")


def _snowflake_pyformat(source: str) -> str:
    """The source itself, with ``?`` as ``%s`` and literal ``%`` doubled (pyformat binding).

    A statement without parameters is sent as is: the connector only interpolates (and so
    only un-doubles ``%%``) when there are parameters."""
    tokens = sqlglot.tokenize(source, read="snowflake")
    if not any(t.token_type == TokenType.PLACEHOLDER and t.text == "?" for t in tokens):
        return source
    out: list[str] = []
    cursor = 0
    for token in tokens:
        if token.token_type == TokenType.PLACEHOLDER and token.text == "?":
            out.append(source[cursor : token.start].replace("%", "%%"))
            out.append("%s")
            cursor = token.end + 1
    out.append(source[cursor:].replace("%", "%%"))
    return "".join(out)


# DuckDB's form of ``_rows``' table source: the JSON array parameter, one row per element.
_DUCKDB_ROWS = sqlglot.parse_one("SELECT UNNEST(CAST(? AS JSON[])) AS value", read="duckdb")


def _duckdb_dialect(node: exp.Expression) -> exp.Expression:
    """What sqlglot does not translate: FLATTEN over a parameter, ``value:key::TYPE`` extraction
    (text, not JSON, before the cast) and Snowflake's types."""
    if isinstance(node, (exp.Lateral, exp.TableFromRows)) and isinstance(node.this, exp.Explode):
        alias = node.args.get("alias")  # FLATTEN's alias also names its columns: keep the name
        name = exp.TableAlias(this=alias.this.copy()) if alias is not None else None
        return exp.Subquery(this=_DUCKDB_ROWS.copy(), alias=name)
    if (
        isinstance(node, exp.Cast)
        and isinstance(node.this, exp.JSONExtract)
        and node.this.args.get("variant_extract")
    ):
        # ``value:key::TYPE`` casts the text of the value; ``value:key`` alone stays JSON.
        scalar = exp.JSONExtractScalar(this=node.this.this, expression=node.this.expression)
        return exp.Cast(this=scalar, to=node.args["to"])
    if isinstance(node, exp.DataType):
        if node.this == exp.DataType.Type.VARIANT:
            return exp.DataType.build("JSON")
        if node.this == exp.DataType.Type.DECIMAL and node.sql() in ("DECIMAL", "DECIMAL(38, 0)"):
            # Snowflake's bare NUMBER is an integer; DuckDB's DECIMAL(38,0) would be slow.
            return exp.DataType.build("BIGINT")
    return node
