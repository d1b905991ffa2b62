"""The warehouse's tables, each column declared once: the DDL, the migrations, the INSERT column
lists and the row types (`rows.py`) are all derived from these declarations.

Quoted lower-case names, so the original monitoring queries run verbatim on Snowflake. Types
are Snowflake's (the dialect translator maps them for DuckDB).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum

from policy_pipeline.core.domain import INITIAL_STATUS
from policy_pipeline.core.store.dialect import Statement


class Now(Enum):
    """The default ``SYSDATE()``: the time the row is written, by the warehouse's clock, in UTC.

    Every time the store writes or compares is ``SYSDATE()`` (UTC, TIMESTAMP_NTZ), never the
    session's or the process's local time, so runs under any ``TZ`` agree on it."""

    NOW = "SYSDATE()"


NOW = Now.NOW

Default = str | bool | int | Now | None


def sql_literal(value: str | bool | int | Now) -> str:
    if isinstance(value, Now):
        return value.value
    if isinstance(value, bool):  # before int: a bool is an int
        return "TRUE" if value else "FALSE"
    if isinstance(value, int):
        return str(value)
    return "'" + value.replace("'", "''") + "'"


@dataclass(frozen=True)
class Column:
    """A column, or a per-row value of a batch parameter (see ``batches.rows_source``)."""

    name: str
    sql_type: str
    # The value a new row starts with. Written out by the INSERTs too, because a column added
    # to an existing table later has no DEFAULT (see ``add_column``).
    default: Default = None

    @property
    def quoted(self) -> str:
        return f'"{self.name}"'

    @property
    def ddl_default(self) -> str:
        if self.default is None:
            raise ValueError(f"{self.name} has no default")
        return sql_literal(self.default)

    def ddl(self, with_default: bool = True) -> str:
        if self.default is None or not with_default:
            return f"{self.quoted} {self.sql_type}"
        return f"{self.quoted} {self.sql_type} DEFAULT {self.ddl_default}"


@dataclass(frozen=True)
class Table:
    name: str
    columns: tuple[Column, ...]

    def __post_init__(self) -> None:
        if len(set(self.names)) != len(self.columns):
            raise ValueError(f"{self.name}: a column is declared twice")

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(column.name for column in self.columns)

    def column(self, name: str) -> Column:
        for column in self.columns:
            if column.name == name:
                return column
        raise KeyError(f"{self.name} has no column {name!r}")

    def pick(self, *names: str) -> tuple[Column, ...]:
        """These columns, as declared (a KeyError at import for a name that is not one)."""
        return tuple(self.column(name) for name in names)

    def with_defaults(self) -> tuple[Column, ...]:
        return tuple(column for column in self.columns if column.default is not None)

    def quoted_names(self, columns: Sequence[Column] | None = None) -> str:
        return ", ".join(column.quoted for column in (self.columns if columns is None else columns))


def _table(name: str, *columns: Column) -> Table:
    return Table(name, columns)


# The original DDL, column for column, then what this project adds.
STATE = _table(
    "policy_execution_state",
    Column("execution_id", "VARCHAR"),
    Column("policy_id", "VARCHAR"),
    Column("poll_count", "NUMBER", 0),
    Column("status", "VARCHAR", INITIAL_STATUS.value),
    Column("start_time", "TIMESTAMP_NTZ", NOW),
    Column("last_poll_time", "TIMESTAMP_NTZ"),
    Column("completed", "BOOLEAN", False),
    Column("requires_circuit_breaker", "BOOLEAN", False),
    Column("circuit_breaker_initiated", "BOOLEAN", False),
    Column("circuit_breaker_completed", "BOOLEAN", False),
    Column("error_message", "VARCHAR"),
    Column("message", "VARCHAR"),
    Column("api_response", "VARIANT"),
    Column("policy_data", "VARIANT"),
    Column("policy_status_response", "VARIANT"),
    Column("circuit_breaker_response", "VARIANT"),
    # Added by this project.
    Column("policy_name", "VARCHAR"),
    Column("policy_content_hash", "VARCHAR"),
    Column("create_idempotency_key", "VARCHAR"),
    Column("circuit_idempotency_key", "VARCHAR"),
    Column("trigger_reason", "VARCHAR"),
    Column("policy_created_time", "TIMESTAMP_NTZ"),
    Column("policy_ready_time", "TIMESTAMP_NTZ"),
    Column("completed_time", "TIMESTAMP_NTZ"),
    Column("updated_time", "TIMESTAMP_NTZ", NOW),
    Column("error_step", "VARCHAR"),
    Column("resumable", "BOOLEAN", False),
    Column("resume_count", "NUMBER", 0),
    Column("dagster_run_id", "VARCHAR"),
    # Waiting without a held run (`policy_progress_sensor` polls it from then on).
    Column("handed_off", "BOOLEAN", False),
    Column("next_poll_time", "TIMESTAMP_NTZ"),
    # Automatic resumption: how many, when the last, and which sensor tick claimed it.
    Column("auto_resume_count", "NUMBER", 0),
    Column("last_resume_time", "TIMESTAMP_NTZ"),
    Column("progress_claim", "VARCHAR"),
)

EVENTS = _table(
    "policy_execution_events",
    Column("event_id", "VARCHAR"),
    Column("execution_id", "VARCHAR"),
    Column("policy_name", "VARCHAR"),
    Column("event_time", "TIMESTAMP_NTZ", NOW),
    Column("event_type", "VARCHAR"),
    Column("endpoint", "VARCHAR"),
    Column("http_method", "VARCHAR"),
    Column("http_status", "NUMBER"),
    Column("latency_ms", "FLOAT"),
    Column("attempt", "NUMBER"),
    Column("outcome", "VARCHAR"),
    Column("from_status", "VARCHAR"),
    Column("to_status", "VARCHAR"),
    Column("message", "VARCHAR"),
    Column("detail", "VARIANT"),
    Column("dagster_run_id", "VARCHAR"),
)

LOCKS = _table(
    "policy_execution_locks",
    Column("policy_name", "VARCHAR"),
    Column("lease_owner", "VARCHAR"),
    Column("lease_expires_at", "TIMESTAMP_NTZ"),
    Column("updated_time", "TIMESTAMP_NTZ", NOW),
)

# What a history table adds to the table it archives.
ARCHIVED_COLUMNS = (Column("archived_time", "TIMESTAMP_NTZ"), Column("archive_run_id", "VARCHAR"))

STATE_HISTORY = Table("policy_execution_history", STATE.columns + ARCHIVED_COLUMNS)
EVENTS_HISTORY = Table("policy_execution_events_history", EVENTS.columns + ARCHIVED_COLUMNS)

ARCHIVE_RUNS = _table(
    "policy_archive_runs",
    Column("archive_run_id", "VARCHAR"),
    Column("started_time", "TIMESTAMP_NTZ", NOW),
    Column("finished_time", "TIMESTAMP_NTZ"),
    Column("retention_days", "NUMBER"),
    Column("status", "VARCHAR"),
    Column("batches", "NUMBER", 0),
    Column("executions_archived", "NUMBER", 0),
    Column("events_archived", "NUMBER", 0),
    Column("error_message", "VARCHAR"),
    Column("dagster_run_id", "VARCHAR"),
)

GUARD = _table(
    "policy_api_guard",
    Column("guard_name", "VARCHAR"),
    Column("state", "VARCHAR", "closed"),
    Column("consecutive_failures", "NUMBER", 0),
    Column("opened_at", "TIMESTAMP_NTZ"),
    Column("probe_owner", "VARCHAR"),
    Column("last_error", "VARCHAR"),
    Column("updated_time", "TIMESTAMP_NTZ", NOW),
)

TABLES: tuple[Table, ...] = (
    STATE,
    EVENTS,
    LOCKS,
    STATE_HISTORY,
    EVENTS_HISTORY,
    ARCHIVE_RUNS,
    GUARD,
)

# The values a new execution's intent carries (the rest start at their defaults).
NEW_EXECUTION_COLUMNS = STATE.pick(
    "execution_id",
    "policy_name",
    "policy_content_hash",
    "policy_data",
    "create_idempotency_key",
    "message",
    "dagster_run_id",
)

# The values an audit event carries: all but the columns the warehouse fills in (event_time).
EVENT_INSERT_COLUMNS = tuple(column for column in EVENTS.columns if column.default is None)


def create_table(table: Table) -> Statement:
    columns = ", ".join(column.ddl() for column in table.columns)
    return Statement(f"create_{table.name}", f"CREATE TABLE IF NOT EXISTS {table.name} ({columns})")


def add_column(table: Table, column: Column) -> Statement:
    # A column added later gets no DEFAULT: Snowflake refuses non-constant defaults on ALTER.
    return Statement(
        f"add_{table.name}_{column.name}",
        f"ALTER TABLE {table.name} ADD COLUMN IF NOT EXISTS {column.ddl(with_default=False)}",
    )


SCHEMA_COLUMNS = Statement(
    "schema_columns",
    "SELECT LOWER(table_name), LOWER(column_name) FROM information_schema.columns "
    "WHERE LOWER(table_schema) = LOWER(CURRENT_SCHEMA())",
)
