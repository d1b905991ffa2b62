"""The row types read from and written to the tables of ``schema``: their fields are checked
against the table's columns at import, and the column lists the statements use are derived
from them, so a column is named and typed in one place.
"""

from __future__ import annotations

import dataclasses
import json
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from policy_pipeline.core.domain import ExecutionStatus
from policy_pipeline.core.store.batches import JsonText
from policy_pipeline.core.store.schema import (
    EVENT_INSERT_COLUMNS,
    EVENTS,
    NOW,
    STATE,
    Column,
    Table,
)

# Audit details are truncated so a huge or hostile response cannot bloat the table.
MAX_DETAIL_CHARS = 4_000


def to_json(value: Any, limit: int | None = None) -> JsonText:
    text = json.dumps(value, default=str, ensure_ascii=False)
    if limit is not None and len(text) > limit:
        # Keep valid JSON: a truncated body is stored as a string with its original size.
        text = json.dumps({"truncated": True, "size": len(text), "head": text[:limit]})
    return JsonText(text)


# The Python type a field must have for a column of each SQL type (None: not checked).
_FIELD_TYPES = {"BOOLEAN": "bool", "NUMBER": "int"}


def _check_fields(row_type: type, table: Table, extra: frozenset[str] = frozenset()) -> None:
    """Fail at import when a row type names a column its table does not declare, or types a
    BOOLEAN/NUMBER column as anything but bool/int."""
    for f in dataclasses.fields(row_type):
        if f.name in extra:
            continue
        column = table.column(f.name)  # KeyError: not a column
        expected = _FIELD_TYPES.get(column.sql_type)
        if expected is not None and str(f.type).removesuffix(" | None") != expected:
            raise TypeError(f"{row_type.__name__}.{f.name} is {f.type}, not {expected}")


@dataclass(frozen=True)
class ExecutionRow:
    """An execution as the workflow reads it: every field is a column of ``schema.STATE`` of the
    same name, and exactly these columns are read (the JSON columns stay in the warehouse)."""

    execution_id: str
    policy_name: str
    policy_id: str | None
    status: ExecutionStatus
    poll_count: int
    completed: bool
    requires_circuit_breaker: bool
    circuit_breaker_initiated: bool
    circuit_breaker_completed: bool
    error_message: str | None
    error_step: str | None
    resumable: bool
    message: str | None
    create_idempotency_key: str | None
    circuit_idempotency_key: str | None
    policy_content_hash: str | None
    start_time: datetime | None
    last_poll_time: datetime | None
    handed_off: bool = False  # waiting for readiness outside any run
    auto_resume_count: int = 0

    @classmethod
    def from_row(cls, row: tuple[Any, ...]) -> ExecutionRow:
        """From a row of ``EXECUTION_READ_COLUMNS``: NULL flags read as False, NULL counts as 0."""
        values = dict(zip(EXECUTION_READ_COLUMNS, row, strict=True))
        for column in _READ:
            if column.sql_type == "BOOLEAN":
                values[column.name] = bool(values[column.name])
            elif column.sql_type == "NUMBER":
                values[column.name] = int(values[column.name] or 0)
        values["status"] = ExecutionStatus(values["status"])
        return cls(**values)

    @classmethod
    def new(cls, values: Mapping[str, Any]) -> ExecutionRow:
        """A row as just inserted with ``values``: every other column at its declared default
        (no read-back for what this process wrote itself; a time the warehouse fills in, None)."""
        row = []
        for column in _READ:
            if column.name in values:
                row.append(values[column.name])
            else:
                row.append(None if column.default is NOW else column.default)
        return cls.from_row(tuple(row))


_check_fields(ExecutionRow, STATE)
_READ: tuple[Column, ...] = STATE.pick(*(f.name for f in dataclasses.fields(ExecutionRow)))
# Columns read back into `ExecutionRow`, in its field order.
EXECUTION_READ_COLUMNS: tuple[str, ...] = tuple(column.name for column in _READ)


@dataclass
class AuditEvent:
    """An audit event: every field is a column of ``schema.EVENTS``; with the run's id it is
    one row of ``EVENT_INSERT_COLUMNS``."""

    execution_id: str | None  # None for events about a run rather than an execution
    policy_name: str
    # "api_call" | "transition" | "warning" | "handoff" | "resume" | "alert" | "guard" | ...
    event_type: str
    message: str
    endpoint: str | None = None
    http_method: str | None = None
    http_status: int | None = None
    latency_ms: float | None = None
    attempt: int | None = None
    outcome: str | None = None
    from_status: str | None = None
    to_status: str | None = None
    detail: Any = None
    event_id: str = field(default_factory=lambda: uuid.uuid4().hex)

    @classmethod
    def about(cls, row: ExecutionRow, event_type: str, message: str, **fields: Any) -> AuditEvent:
        """An event about this execution."""
        return cls(row.execution_id, row.policy_name, event_type, message, **fields)

    def row(self, run_id: str | None) -> dict[str, Any]:
        """The event as a row of ``statements.executions.INSERT_EVENTS``."""
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        values["message"] = self.message[:MAX_DETAIL_CHARS]
        if self.detail is not None:
            values["detail"] = to_json(self.detail, MAX_DETAIL_CHARS)
        values[_RUN_ID] = run_id
        return {column.name: values[column.name] for column in EVENT_INSERT_COLUMNS}


# The run that wrote an event is the store's, not the event's.
_RUN_ID = "dagster_run_id"


def _check_events() -> None:
    _check_fields(AuditEvent, EVENTS)
    fields = {f.name for f in dataclasses.fields(AuditEvent)} | {_RUN_ID}
    columns = {column.name for column in EVENT_INSERT_COLUMNS}
    if fields != columns:
        raise TypeError(f"AuditEvent and the event columns differ on {sorted(fields ^ columns)}")


_check_events()
