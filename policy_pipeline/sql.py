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

TABLES: dict[str, tuple[tuple[str, str], ...]] = {
    STATE_TABLE: STATE_COLUMNS,
    EVENTS_TABLE: EVENT_COLUMNS,
    LOCKS_TABLE: LOCK_COLUMNS,
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

# --- Per-policy lease: at most one run works on a policy at a time ------------------------------

ENSURE_LOCK_ROW = Statement(
    "ensure_lock_row",
    f'INSERT INTO {LOCKS_TABLE} ("policy_name", "updated_time") '
    f"SELECT ?, CURRENT_TIMESTAMP() "
    f'WHERE NOT EXISTS (SELECT 1 FROM {LOCKS_TABLE} WHERE "policy_name" = ?)',
)

ACQUIRE_LEASE = Statement(
    "acquire_lease",
    f'UPDATE {LOCKS_TABLE} SET "lease_owner" = ?, '
    f'"lease_expires_at" = DATEADD(second, ?, CURRENT_TIMESTAMP()), '
    f'"updated_time" = CURRENT_TIMESTAMP() '
    f'WHERE "policy_name" = ? AND ("lease_owner" IS NULL OR "lease_owner" = ? '
    f'OR "lease_expires_at" < CURRENT_TIMESTAMP())',
)

# Taking over the lease of a run that is known to have finished (crashed or failed).
TAKE_OVER_LEASE = Statement(
    "take_over_lease",
    f'UPDATE {LOCKS_TABLE} SET "lease_owner" = ?, '
    f'"lease_expires_at" = DATEADD(second, ?, CURRENT_TIMESTAMP()), '
    f'"updated_time" = CURRENT_TIMESTAMP() WHERE "policy_name" = ? AND "lease_owner" = ?',
)

RELEASE_LEASE = Statement(
    "release_lease",
    f'UPDATE {LOCKS_TABLE} SET "lease_owner" = NULL, "lease_expires_at" = NULL, '
    f'"updated_time" = CURRENT_TIMESTAMP() WHERE "policy_name" = ? AND "lease_owner" = ?',
)

LEASE_HOLDER = Statement(
    "lease_holder",
    f'SELECT "lease_owner", "lease_expires_at" FROM {LOCKS_TABLE} '
    f'WHERE "policy_name" = ? AND "lease_owner" IS NOT NULL '
    f'AND "lease_expires_at" >= CURRENT_TIMESTAMP()',
)

# --- Executions ---------------------------------------------------------------------------------

INSERT_EXECUTION = Statement(
    "insert_execution",
    f'INSERT INTO {STATE_TABLE} ("execution_id", "policy_name", "policy_content_hash", '
    f'"policy_data", "create_idempotency_key", "status", "poll_count", "completed", '
    f'"requires_circuit_breaker", "circuit_breaker_initiated", "circuit_breaker_completed", '
    f'"resumable", "message", "dagster_run_id", "start_time", "updated_time") '
    f"SELECT ?, ?, ?, PARSE_JSON(?), ?, 'pending', 0, FALSE, FALSE, FALSE, FALSE, FALSE, ?, ?, "
    f"CURRENT_TIMESTAMP(), CURRENT_TIMESTAMP()",
)

GET_EXECUTION = Statement(
    "get_execution", f'SELECT {_READ} FROM {STATE_TABLE} WHERE "execution_id" = ?'
)

GET_POLICY_DATA = Statement(
    "get_policy_data", f'SELECT "policy_data" FROM {STATE_TABLE} WHERE "execution_id" = ?'
)

ACTIVE_EXECUTIONS_FOR_POLICY = Statement(
    "active_executions_for_policy",
    f'SELECT {_READ} FROM {STATE_TABLE} WHERE "policy_name" = ? AND {ACTIVE} '
    f'ORDER BY "start_time" DESC, "execution_id" DESC',
)

LATEST_EXECUTION_FOR_POLICY = Statement(
    "latest_execution_for_policy",
    f'SELECT {_READ} FROM {STATE_TABLE} WHERE "policy_name" = ? '
    f'ORDER BY "start_time" DESC, "execution_id" DESC LIMIT 1',
)

MARK_POLICY_CREATED = Statement(
    "mark_policy_created",
    f'UPDATE {STATE_TABLE} SET "status" = \'policy_created\', "policy_id" = ?, '
    f'"api_response" = PARSE_JSON(?), "message" = ?, '
    f'"policy_created_time" = CURRENT_TIMESTAMP(), "updated_time" = CURRENT_TIMESTAMP() '
    f'WHERE "execution_id" = ? AND "status" = \'pending\'',
)

RECORD_POLL = Statement(
    "record_poll",
    f'UPDATE {STATE_TABLE} SET "poll_count" = "poll_count" + 1, '
    f'"last_poll_time" = CURRENT_TIMESTAMP(), "policy_status_response" = PARSE_JSON(?), '
    f'"message" = ?, "updated_time" = CURRENT_TIMESTAMP() '
    f'WHERE "execution_id" = ? AND "status" = \'policy_created\'',
)

MARK_POLICY_READY = Statement(
    "mark_policy_ready",
    f"UPDATE {STATE_TABLE} SET \"status\" = 'policy_ready', "
    f'"requires_circuit_breaker" = TRUE, "message" = ?, '
    f'"policy_ready_time" = CURRENT_TIMESTAMP(), "updated_time" = CURRENT_TIMESTAMP() '
    f'WHERE "execution_id" = ? AND "status" = \'policy_created\' '
    f'AND "policy_id" IS NOT NULL',
)

# The exactly-once gate for the circuit breaker: only one caller sees a row count of 1.
CLAIM_CIRCUIT_BREAKER = Statement(
    "claim_circuit_breaker",
    f'UPDATE {STATE_TABLE} SET "circuit_breaker_initiated" = TRUE, '
    f'"circuit_idempotency_key" = ?, "trigger_reason" = ?, "message" = ?, '
    f'"updated_time" = CURRENT_TIMESTAMP() '
    f'WHERE "execution_id" = ? AND "status" = \'policy_ready\' '
    f'AND "circuit_breaker_initiated" = FALSE',
)

MARK_COMPLETED = Statement(
    "mark_completed",
    f'UPDATE {STATE_TABLE} SET "status" = \'completed\', "completed" = TRUE, '
    f'"circuit_breaker_completed" = TRUE, "circuit_breaker_response" = PARSE_JSON(?), '
    f'"message" = ?, "error_message" = NULL, "completed_time" = CURRENT_TIMESTAMP(), '
    f'"updated_time" = CURRENT_TIMESTAMP() '
    f'WHERE "execution_id" = ? AND "status" = \'policy_ready\' '
    f'AND "circuit_breaker_initiated" = TRUE AND "circuit_breaker_completed" = FALSE',
)

MARK_ERROR = Statement(
    "mark_error",
    f'UPDATE {STATE_TABLE} SET "status" = \'error\', "error_message" = ?, '
    f'"error_step" = ?, "resumable" = ?, "message" = ?, "updated_time" = CURRENT_TIMESTAMP() '
    f"WHERE \"execution_id\" = ? AND \"status\" IN ('pending', 'policy_created', 'policy_ready')",
)

# A resumable error goes back to the state its step starts from; the row count says who won.
REOPEN_EXECUTION = Statement(
    "reopen_execution",
    f'UPDATE {STATE_TABLE} SET "status" = ?, "resumable" = FALSE, "error_message" = NULL, '
    f'"error_step" = NULL, "message" = ?, "updated_time" = CURRENT_TIMESTAMP() '
    f'WHERE "execution_id" = ? AND "status" = \'error\' AND "resumable" = TRUE',
)

SET_CIRCUIT_RESPONSE = Statement(
    "set_circuit_response",
    f'UPDATE {STATE_TABLE} SET "circuit_breaker_response" = PARSE_JSON(?), '
    f'"updated_time" = CURRENT_TIMESTAMP() WHERE "execution_id" = ?',
)

SET_API_RESPONSE = Statement(
    "set_api_response",
    f'UPDATE {STATE_TABLE} SET "api_response" = PARSE_JSON(?), '
    f'"updated_time" = CURRENT_TIMESTAMP() WHERE "execution_id" = ?',
)

# The seed's "View recent executions" query, with the policy name added.
RECENT_EXECUTIONS = Statement(
    "recent_executions",
    f'SELECT "policy_name", "execution_id", "policy_id", "status", "poll_count", '
    f'"circuit_breaker_completed", "message", "start_time" '
    f'FROM {STATE_TABLE} ORDER BY "start_time" DESC, "policy_name" LIMIT ?',
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
    aliases = [f"v_{c}" for c in EVENT_INSERT_COLUMNS]
    select = ", ".join(f"PARSE_JSON({a})" if a == "v_detail" else a for a in aliases)
    placeholders = "(" + ", ".join("?" for _ in EVENT_INSERT_COLUMNS) + ")"
    values = ", ".join(placeholders for _ in range(rows))
    columns = ", ".join(f'"{c}"' for c in EVENT_INSERT_COLUMNS)
    return Statement(
        f"insert_events_{rows}",
        f'INSERT INTO {EVENTS_TABLE} ({columns}, "event_time") '
        f"SELECT {select}, CURRENT_TIMESTAMP() "
        f"FROM VALUES {values} AS v ({', '.join(aliases)})",
    )


# --- Rendering ----------------------------------------------------------------------------------


@functools.cache
def _render(source: str, dialect: Dialect) -> str:
    if dialect is Dialect.SNOWFLAKE:
        return _snowflake_pyformat(source)
    tree = sqlglot.parse_one(source, read="snowflake")
    return tree.transform(_duckdb_types).sql(dialect="duckdb")


def _snowflake_pyformat(source: str) -> str:
    """The source itself, with ``?`` as ``%s`` and literal ``%`` doubled (pyformat binding)."""
    out: list[str] = []
    cursor = 0
    for token in sqlglot.tokenize(source, read="snowflake"):
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
