"""Every SQL statement of the project, written once.

Statements are written in strict Snowflake SQL with ``?`` placeholders (bound parameters only,
JSON through ``SELECT PARSE_JSON(?)``, never ``VALUES (PARSE_JSON(...))``). ``render`` gives the
text for each warehouse: for Snowflake the source itself with pyformat placeholders, for DuckDB
the sqlglot translation with Snowflake's types mapped to DuckDB's.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from enum import StrEnum

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
)

_READ = ", ".join(f'"{c}"' for c in EXECUTION_READ_COLUMNS)

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


TABLE_COLUMNS = Statement(
    "table_columns",
    "SELECT LOWER(column_name) FROM information_schema.columns "
    "WHERE LOWER(table_name) = LOWER(?) AND LOWER(table_schema) = LOWER(CURRENT_SCHEMA())",
)

# --- Batches ------------------------------------------------------------------------------------
# A step works on many policies at once, so the statements below take a list: one round trip
# per chunk of up to MAX_BATCH policies, not one per policy. Each factory is cached by size.

MAX_BATCH = 500


def _placeholders(count: int) -> str:
    return ", ".join("?" for _ in range(count))


def _values(rows: int, columns: tuple[str, ...]) -> str:
    """``(VALUES (?, ?), (?, ?)) AS v (a, b)``: a table of bound rows to join or insert from."""
    row = f"({_placeholders(len(columns))})"
    return f"(VALUES {', '.join(row for _ in range(rows))}) AS v ({', '.join(columns)})"


def _update_from_values(
    name: str, rows: int, columns: tuple[str, ...], assignments: str, condition: str
) -> Statement:
    """UPDATE the state rows named by ``v_execution_id`` with per-row values, if ``condition``
    still holds for them (the conditional move that decides who wins)."""
    return Statement(
        f"{name}_{rows}",
        f'UPDATE {STATE_TABLE} SET {assignments}, "updated_time" = CURRENT_TIMESTAMP() '
        f"FROM (SELECT * FROM {_values(rows, ('v_execution_id', *columns))}) AS v "
        f'WHERE {STATE_TABLE}."execution_id" = v.v_execution_id AND {condition}',
    )


# --- Per-policy lease: at most one run works on a policy at a time ------------------------------


@functools.cache
def ensure_lock_rows(rows: int) -> Statement:
    # MERGE, not INSERT ... WHERE NOT EXISTS: Snowflake runs concurrent INSERTs side by side,
    # while MERGEs on one table take turns, so two first-time callers cannot both insert.
    return Statement(
        f"ensure_lock_rows_{rows}",
        f"MERGE INTO {LOCKS_TABLE} USING (SELECT * FROM {_values(rows, ('v_policy_name',))}) "
        f'AS s ON {LOCKS_TABLE}."policy_name" = s.v_policy_name WHEN NOT MATCHED THEN '
        f'INSERT ("policy_name", "updated_time") VALUES (s.v_policy_name, CURRENT_TIMESTAMP())',
    )


@functools.cache
def acquire_leases(rows: int) -> Statement:
    """Params: owner, ttl seconds, names..., owner. Free, expired or already ours."""
    return Statement(
        f"acquire_leases_{rows}",
        f'UPDATE {LOCKS_TABLE} SET "lease_owner" = ?, '
        f'"lease_expires_at" = DATEADD(second, ?, CURRENT_TIMESTAMP()), '
        f'"updated_time" = CURRENT_TIMESTAMP() '
        f'WHERE "policy_name" IN ({_placeholders(rows)}) AND ("lease_owner" IS NULL '
        f'OR "lease_owner" = ? OR "lease_expires_at" < CURRENT_TIMESTAMP())',
    )


@functools.cache
def take_over_leases(rows: int) -> Statement:
    """Params: owner, ttl seconds, names..., previous owner (a run known to have finished)."""
    return Statement(
        f"take_over_leases_{rows}",
        f'UPDATE {LOCKS_TABLE} SET "lease_owner" = ?, '
        f'"lease_expires_at" = DATEADD(second, ?, CURRENT_TIMESTAMP()), '
        f'"updated_time" = CURRENT_TIMESTAMP() '
        f'WHERE "policy_name" IN ({_placeholders(rows)}) AND "lease_owner" = ?',
    )


@functools.cache
def release_leases(rows: int) -> Statement:
    """Params: names..., owner."""
    return Statement(
        f"release_leases_{rows}",
        f'UPDATE {LOCKS_TABLE} SET "lease_owner" = NULL, "lease_expires_at" = NULL, '
        f'"updated_time" = CURRENT_TIMESTAMP() '
        f'WHERE "policy_name" IN ({_placeholders(rows)}) AND "lease_owner" = ?',
    )


@functools.cache
def lease_holders(rows: int) -> Statement:
    return Statement(
        f"lease_holders_{rows}",
        f'SELECT "policy_name", "lease_owner", "lease_expires_at" FROM {LOCKS_TABLE} '
        f'WHERE "policy_name" IN ({_placeholders(rows)}) AND "lease_owner" IS NOT NULL '
        f'AND "lease_expires_at" >= CURRENT_TIMESTAMP()',
    )


# --- Executions ---------------------------------------------------------------------------------

_NEW_EXECUTION = (
    "v_execution_id",
    "v_policy_name",
    "v_policy_content_hash",
    "v_policy_data",
    "v_create_idempotency_key",
    "v_message",
    "v_dagster_run_id",
)


@functools.cache
def insert_executions(rows: int) -> Statement:
    """The intents: committed before any create call is made."""
    return Statement(
        f"insert_executions_{rows}",
        f'INSERT INTO {STATE_TABLE} ("execution_id", "policy_name", "policy_content_hash", '
        f'"policy_data", "create_idempotency_key", "message", "dagster_run_id", "status", '
        f'"poll_count", "completed", "requires_circuit_breaker", "circuit_breaker_initiated", '
        f'"circuit_breaker_completed", "resumable", "resume_count", "start_time", '
        f'"updated_time") '
        f"SELECT v_execution_id, v_policy_name, v_policy_content_hash, PARSE_JSON(v_policy_data), "
        f"v_create_idempotency_key, v_message, v_dagster_run_id, 'pending', 0, FALSE, FALSE, "
        f"FALSE, FALSE, FALSE, 0, CURRENT_TIMESTAMP(), CURRENT_TIMESTAMP() "
        f"FROM {_values(rows, _NEW_EXECUTION)}",
    )


@functools.cache
def current_executions(rows: int) -> Statement:
    """Each policy's active execution, or else its latest."""
    return Statement(
        f"current_executions_{rows}",
        f'SELECT {_READ} FROM {STATE_TABLE} WHERE "policy_name" IN ({_placeholders(rows)}) '
        f'QUALIFY ROW_NUMBER() OVER (PARTITION BY "policy_name" '
        f'ORDER BY CASE WHEN {ACTIVE} THEN 0 ELSE 1 END, "start_time" DESC, '
        f'"execution_id" DESC) = 1',
    )


@functools.cache
def active_execution_counts(rows: int) -> Statement:
    return Statement(
        f"active_execution_counts_{rows}",
        f'SELECT "policy_name", COUNT(*) FROM {STATE_TABLE} '
        f'WHERE "policy_name" IN ({_placeholders(rows)}) AND {ACTIVE} GROUP BY "policy_name"',
    )


@functools.cache
def executions_by_id(rows: int) -> Statement:
    return Statement(
        f"executions_by_id_{rows}",
        f'SELECT {_READ} FROM {STATE_TABLE} WHERE "execution_id" IN ({_placeholders(rows)})',
    )


@functools.cache
def policy_data_by_id(rows: int) -> Statement:
    return Statement(
        f"policy_data_by_id_{rows}",
        f'SELECT "execution_id", "policy_data" FROM {STATE_TABLE} '
        f'WHERE "execution_id" IN ({_placeholders(rows)})',
    )


@functools.cache
def reopen_executions(rows: int) -> Statement:
    """Params: target status, message, ids... A resumable error goes back to where its step
    starts."""
    return Statement(
        f"reopen_executions_{rows}",
        f'UPDATE {STATE_TABLE} SET "status" = ?, "message" = ?, "resumable" = FALSE, '
        f'"error_message" = NULL, "error_step" = NULL, '
        f'"resume_count" = COALESCE("resume_count", 0) + 1, "updated_time" = CURRENT_TIMESTAMP() '
        f'WHERE "execution_id" IN ({_placeholders(rows)}) AND "status" = \'error\' '
        f'AND "resumable" = TRUE',
    )


@functools.cache
def mark_created(rows: int) -> Statement:
    return _update_from_values(
        "mark_created",
        rows,
        ("v_policy_id", "v_response", "v_message"),
        '"status" = \'policy_created\', "policy_id" = v.v_policy_id, '
        '"api_response" = PARSE_JSON(v.v_response), "message" = v.v_message, '
        '"policy_created_time" = CURRENT_TIMESTAMP()',
        f"{STATE_TABLE}.\"status\" = 'pending'",
    )


@functools.cache
def record_polls(rows: int) -> Statement:
    return _update_from_values(
        "record_polls",
        rows,
        ("v_polls", "v_response", "v_message"),
        '"poll_count" = COALESCE("poll_count", 0) + v.v_polls, '
        '"last_poll_time" = CURRENT_TIMESTAMP(), '
        '"policy_status_response" = PARSE_JSON(v.v_response), "message" = v.v_message',
        f"{STATE_TABLE}.\"status\" = 'policy_created'",
    )


@functools.cache
def mark_ready(rows: int) -> Statement:
    return _update_from_values(
        "mark_ready",
        rows,
        ("v_message",),
        '"status" = \'policy_ready\', "requires_circuit_breaker" = TRUE, '
        '"message" = v.v_message, "policy_ready_time" = CURRENT_TIMESTAMP()',
        f'{STATE_TABLE}."status" = \'policy_created\' AND {STATE_TABLE}."policy_id" IS NOT NULL',
    )


@functools.cache
def claim_circuit_breakers(rows: int) -> Statement:
    """The exactly-once gate: only a ready execution whose breaker is not yet initiated moves."""
    return _update_from_values(
        "claim_circuit_breakers",
        rows,
        ("v_key", "v_reason", "v_message"),
        '"circuit_breaker_initiated" = TRUE, "circuit_idempotency_key" = v.v_key, '
        '"trigger_reason" = v.v_reason, "message" = v.v_message',
        f"{STATE_TABLE}.\"status\" = 'policy_ready' "
        f'AND {STATE_TABLE}."circuit_breaker_initiated" = FALSE',
    )


@functools.cache
def mark_completed(rows: int) -> Statement:
    return _update_from_values(
        "mark_completed",
        rows,
        ("v_response", "v_message"),
        '"status" = \'completed\', "completed" = TRUE, "circuit_breaker_completed" = TRUE, '
        '"circuit_breaker_response" = PARSE_JSON(v.v_response), "message" = v.v_message, '
        '"error_message" = NULL, "completed_time" = CURRENT_TIMESTAMP()',
        f"{STATE_TABLE}.\"status\" = 'policy_ready' "
        f'AND {STATE_TABLE}."circuit_breaker_initiated" = TRUE '
        f'AND {STATE_TABLE}."circuit_breaker_completed" = FALSE',
    )


@functools.cache
def mark_errors(rows: int) -> Statement:
    return _update_from_values(
        "mark_errors",
        rows,
        ("v_error", "v_step", "v_resumable", "v_message"),
        '"status" = \'error\', "error_message" = v.v_error, "error_step" = v.v_step, '
        '"resumable" = v.v_resumable, "message" = v.v_message',
        f"{STATE_TABLE}.\"status\" IN ('pending', 'policy_created', 'policy_ready')",
    )


@functools.cache
def set_responses(column: str, rows: int) -> Statement:
    """Keep a raw API response (``api_response`` or ``circuit_breaker_response``)."""
    assert column in ("api_response", "circuit_breaker_response")
    return _update_from_values(
        f"set_{column}", rows, ("v_response",), f'"{column}" = PARSE_JSON(v.v_response)', "TRUE"
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

# --- Monitoring: the seeds' queries, as checks and the operator CLI run them -------------------

# The seed's health check ("not completed and started more than an hour ago"), limited to
# executions still in flight: a failed execution is reported as failed, not as stuck.
STUCK_EXECUTIONS = Statement(
    "stuck_executions",
    f'SELECT "execution_id", "policy_name", "status", "start_time", "message", "error_message" '
    f'FROM {STATE_TABLE} WHERE "completed" = FALSE AND {ACTIVE} '
    f'AND "start_time" < DATEADD(minute, ?, CURRENT_TIMESTAMP()) '
    f'ORDER BY "start_time" LIMIT ?',
)

STUCK_EXECUTION_COUNT = Statement(
    "stuck_execution_count",
    f'SELECT COUNT(*) FROM {STATE_TABLE} WHERE "completed" = FALSE AND {ACTIVE} '
    f'AND "start_time" < DATEADD(minute, ?, CURRENT_TIMESTAMP())',
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


@functools.cache
def archive_batch(rows: int) -> tuple[Statement, Statement, Statement, Statement]:
    """Copy a batch of executions and their events to history, then delete them. Every
    statement re-checks that the execution is terminal, so an in-progress row is never moved."""
    ids = ", ".join("?" for _ in range(rows))
    terminal_ids = f'SELECT "execution_id" FROM {STATE_TABLE} WHERE "execution_id" IN ({ids}) '
    terminal_ids += f"AND {TERMINAL}"
    state, events = _names(STATE_COLUMNS), _names(EVENT_COLUMNS)
    return (
        Statement(
            f"archive_events_{rows}",
            f'INSERT INTO {EVENTS_HISTORY_TABLE} ({events}, "archived_time", "archive_run_id") '
            f"SELECT {events}, CURRENT_TIMESTAMP(), ? FROM {EVENTS_TABLE} "
            f'WHERE "execution_id" IN ({terminal_ids})',
        ),
        Statement(
            f"archive_executions_{rows}",
            f'INSERT INTO {STATE_HISTORY_TABLE} ({state}, "archived_time", "archive_run_id") '
            f"SELECT {state}, CURRENT_TIMESTAMP(), ? FROM {STATE_TABLE} "
            f'WHERE "execution_id" IN ({terminal_ids})',
        ),
        Statement(
            f"delete_archived_events_{rows}",
            f'DELETE FROM {EVENTS_TABLE} WHERE "execution_id" IN ({terminal_ids})',
        ),
        Statement(
            f"delete_archived_executions_{rows}",
            f'DELETE FROM {STATE_TABLE} WHERE "execution_id" IN ({ids}) AND {TERMINAL}',
        ),
    )


START_ARCHIVE_RUN = Statement(
    "start_archive_run",
    f'INSERT INTO {ARCHIVE_RUNS_TABLE} ("archive_run_id", "started_time", "retention_days", '
    f'"status", "batches", "executions_archived", "events_archived", "dagster_run_id") '
    f"SELECT ?, CURRENT_TIMESTAMP(), ?, 'running', 0, 0, 0, ?",
)

FINISH_ARCHIVE_RUN = Statement(
    "finish_archive_run",
    f'UPDATE {ARCHIVE_RUNS_TABLE} SET "finished_time" = CURRENT_TIMESTAMP(), "status" = ?, '
    f'"batches" = ?, "executions_archived" = ?, "events_archived" = ?, "error_message" = ? '
    f'WHERE "archive_run_id" = ?',
)

# --- Audit events -------------------------------------------------------------------------------

EVENT_INSERT_COLUMNS = (
    "event_id",
    "execution_id",
    "policy_name",
    "event_type",
    "endpoint",
    "http_method",
    "http_status",
    "latency_ms",
    "attempt",
    "outcome",
    "from_status",
    "to_status",
    "message",
    "detail",
    "dagster_run_id",
)


@functools.cache
def insert_events(rows: int) -> Statement:
    """One INSERT for a batch of audit events (a round trip per flush, not per event)."""
    aliases = tuple(f"v_{c}" for c in EVENT_INSERT_COLUMNS)
    select = ", ".join(f"PARSE_JSON({a})" if a == "v_detail" else a for a in aliases)
    columns = ", ".join(f'"{c}"' for c in EVENT_INSERT_COLUMNS)
    return Statement(
        f"insert_events_{rows}",
        f'INSERT INTO {EVENTS_TABLE} ({columns}, "event_time") '
        f"SELECT {select}, CURRENT_TIMESTAMP() FROM {_values(rows, aliases)}",
    )


# --- Rendering ----------------------------------------------------------------------------------


@functools.cache
def _render(source: str, dialect: Dialect) -> str:
    if dialect is Dialect.SNOWFLAKE:
        return _snowflake_pyformat(source)
    tree = sqlglot.parse_one(source, read="snowflake")
    return tree.transform(_duckdb_types).sql(dialect="duckdb")


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


def _duckdb_types(node: exp.Expression) -> exp.Expression:
    if isinstance(node, exp.DataType):
        if node.this == exp.DataType.Type.VARIANT:
            return exp.DataType.build("JSON")
        if node.this == exp.DataType.Type.DECIMAL and node.sql() in ("DECIMAL", "DECIMAL(38, 0)"):
            # Snowflake's bare NUMBER is an integer; DuckDB's DECIMAL(38,0) would be slow.
            return exp.DataType.build("BIGINT")
    return node
