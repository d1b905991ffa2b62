"""The store's derivations, checked without a warehouse or Dagster: each table's columns, the
row types and the INSERT lists agree; every status guard says what the domain's state machine
says; constructors run nothing."""

from __future__ import annotations

import dataclasses
import re
from contextlib import AbstractContextManager
from typing import Any

import pytest

from policy_pipeline.core import domain
from policy_pipeline.core.domain import ExecutionStatus as S
from policy_pipeline.core.domain import allowed_sources, is_active, is_terminal, step_source
from policy_pipeline.core.engine.guard import read_guard
from policy_pipeline.core.store import predicates, schema
from policy_pipeline.core.store.archiver import Archiver
from policy_pipeline.core.store.connection import WarehouseConnection
from policy_pipeline.core.store.dialect import SqlDialect, Statement
from policy_pipeline.core.store.health import HealthReport
from policy_pipeline.core.store.rows import EXECUTION_READ_COLUMNS, AuditEvent, ExecutionRow
from policy_pipeline.core.store.state_store import StateStore
from policy_pipeline.core.store.statements import archive, executions, progress


def _ddl_columns(statement: Statement) -> list[str]:
    return re.findall(r'"(\w+)" [A-Z_]+', statement.source)


def _insert_columns(statement: Statement) -> list[str]:
    listed = re.match(r"INSERT INTO \w+ \(([^)]*)\)", statement.source)
    assert listed is not None
    return re.findall(r'"(\w+)"', listed.group(1))


def _guard_statuses(condition: str) -> set[S]:
    """The statuses a ``"status" = 'x'`` / ``"status" IN ('x', ...)`` guard lets through."""
    found = re.findall(r"\"status\" (?:= '(\w+)'|IN \(([^)]*)\))", condition)
    assert len(found) == 1, condition
    single, several = found[0]
    return {S(v) for v in ([single] if single else re.findall(r"'(\w+)'", several))}


def _where(statement: Statement) -> str:
    return statement.source.split(" WHERE ", 1)[1]


# --- columns ------------------------------------------------------------------------------


@pytest.mark.parametrize("table", schema.TABLES, ids=lambda t: t.name)
def test_the_ddl_creates_exactly_the_declared_columns(table: schema.Table) -> None:
    assert _ddl_columns(schema.create_table(table)) == list(table.names)


def test_a_migrated_column_gets_no_default() -> None:
    # Snowflake refuses non-constant defaults on ALTER; the INSERTs write defaults out instead.
    added = schema.add_column(schema.STATE, schema.STATE.column("start_time")).source
    assert added.endswith('ADD COLUMN IF NOT EXISTS "start_time" TIMESTAMP_NTZ')


def test_execution_row_fields_are_the_columns_read_and_are_state_columns() -> None:
    fields = [f.name for f in dataclasses.fields(ExecutionRow)]
    assert list(EXECUTION_READ_COLUMNS) == fields
    assert set(fields) <= set(schema.STATE.names)
    select = executions.EXECUTIONS_BY_ID.source.split(" FROM ", 1)[0]
    assert re.findall(r'"(\w+)"', select) == fields


def test_audit_event_rows_are_the_event_insert_columns() -> None:
    row = AuditEvent(execution_id="e", policy_name="p", event_type="t", message="m").row("run")
    assert list(row) == [c.name for c in schema.EVENT_INSERT_COLUMNS]
    assert set(row) | {"event_time"} == set(schema.EVENTS.names)
    assert _insert_columns(executions.INSERT_EVENTS) == [*row, "event_time"]


def test_inserts_write_every_default_out() -> None:
    inserted = _insert_columns(executions.INSERT_EXECUTIONS)
    supplied = [c.name for c in schema.NEW_EXECUTION_COLUMNS]
    defaulted = [c.name for c in schema.STATE.with_defaults()]
    assert inserted == supplied + defaulted
    assert "'pending'" in executions.INSERT_EXECUTIONS.source


def test_a_new_execution_row_starts_at_the_declared_defaults() -> None:
    row = ExecutionRow.new({"execution_id": "e", "policy_name": "p", "message": "m"})
    assert row.status is domain.INITIAL_STATUS
    assert (row.poll_count, row.completed, row.resumable, row.handed_off) == (
        0,
        False,
        False,
        False,
    )
    assert row.start_time is None  # filled in by the warehouse, not read back


@pytest.mark.parametrize(
    ("statement", "history"),
    [
        (archive.ARCHIVE_EXECUTIONS, schema.STATE_HISTORY),
        (archive.ARCHIVE_EVENTS, schema.EVENTS_HISTORY),
        (archive.ARCHIVE_RUN_EVENTS, schema.EVENTS_HISTORY),
    ],
)
def test_archiving_copies_every_column(statement: Statement, history: schema.Table) -> None:
    assert _insert_columns(statement) == list(history.names)


# --- the state machine --------------------------------------------------------------------


def test_the_workflow_steps_guard_on_their_source_status() -> None:
    for statement, target in [
        (executions.MARK_CREATED, S.POLICY_CREATED),
        (executions.MARK_READY, S.POLICY_READY),
        (executions.CLAIM_CIRCUIT_BREAKERS, S.COMPLETED),
        (executions.MARK_COMPLETED, S.COMPLETED),
        (executions.SKIP_CIRCUIT_BREAKER, S.COMPLETED),
        (progress.CLAIM_CIRCUIT_REQUESTS, S.COMPLETED),
    ]:
        assert _guard_statuses(_where(statement)) == {step_source(target)}, statement.name
        assert step_source(target) in allowed_sources(target)


def test_the_other_moves_guard_on_every_source_the_domain_allows() -> None:
    for statement, target in [
        (executions.MARK_ERRORS, S.ERROR),
        (executions.FORCE_READY, S.POLICY_READY),
        (executions.FORCE_SKIP_CIRCUIT_BREAKER, S.COMPLETED),
    ]:
        assert _guard_statuses(_where(statement)) == allowed_sources(target), statement.name


def test_polling_and_handing_off_guard_on_the_status_readiness_starts_from() -> None:
    for statement in (executions.RECORD_POLLS, executions.HAND_OFF):
        assert _guard_statuses(_where(statement)) == {step_source(S.POLICY_READY)}


def test_resume_from_goes_back_to_where_each_step_starts() -> None:
    assert domain.RESUME_FROM == {
        domain.STEP_CREATE: S.PENDING,
        domain.STEP_READY: S.POLICY_CREATED,
        domain.STEP_CIRCUIT: S.POLICY_READY,
    }
    assert domain.ACTIVE_STATUSES == (S.PENDING, S.POLICY_CREATED, S.POLICY_READY)
    assert all(target in domain.TRANSITIONS[S.ERROR] for target in domain.RESUME_FROM.values())


def _evaluate(condition: str, status: S, resumable: bool | None) -> bool:
    """The SQL condition on one row, as DuckDB evaluates it (NULL included) after translation."""
    duckdb = pytest.importorskip("duckdb")
    query = Statement(
        "t",
        f'SELECT COALESCE({condition}, FALSE) FROM (SELECT CAST(? AS VARCHAR) AS "status", '
        'CAST(? AS BOOLEAN) AS "resumable")',
    ).render(SqlDialect.DUCKDB)
    row = duckdb.execute(query, [status.value, resumable]).fetchone()
    assert row is not None
    return bool(row[0])


@pytest.mark.parametrize("status", list(S))
@pytest.mark.parametrize("resumable", [True, False])
def test_active_and_terminal_sql_agree_with_the_domain(status: S, resumable: bool) -> None:
    assert _evaluate(predicates.ACTIVE, status, resumable) is is_active(status, resumable)
    assert _evaluate(predicates.TERMINAL, status, resumable) is is_terminal(status, resumable)
    assert is_active(status, resumable) is not is_terminal(status, resumable)


def test_an_error_without_a_resumable_flag_is_neither_active_nor_terminal() -> None:
    assert not _evaluate(predicates.ACTIVE, S.ERROR, None)
    assert not _evaluate(predicates.TERMINAL, S.ERROR, None)


def test_statements_use_the_generated_fragments() -> None:
    assert predicates.ACTIVE in executions.CURRENT_EXECUTIONS.source
    assert predicates.TERMINAL in archive.ARCHIVE_CANDIDATES.source
    assert predicates.active(schema.STATE.name) in progress.CLAIM_RESUMES.source


# --- no work in constructors --------------------------------------------------------------


class _NoConnection:
    def __init__(self) -> None:
        self.opened = 0

    def __call__(self) -> AbstractContextManager[Any]:
        self.opened += 1
        raise AssertionError("a constructor connected")


def test_constructors_run_no_statement() -> None:
    connect = _NoConnection()
    warehouse = WarehouseConnection(SqlDialect.DUCKDB, connect)
    StateStore(warehouse, run_id="r")
    HealthReport(warehouse)
    Archiver(warehouse)
    assert connect.opened == 0


def test_the_schema_is_created_once_before_the_first_statement_and_reads_do_not_write() -> None:
    duckdb = pytest.importorskip("duckdb")
    database = duckdb.connect(":memory:")

    class _Shared:
        def __enter__(self) -> Any:
            return database

        def __exit__(self, *exc: object) -> None:
            return None

    seen: list[str] = []
    original = WarehouseConnection._wrap

    class _Watching(WarehouseConnection):
        def _wrap(self, session: Any) -> Any:
            inner = original(self, session)

            class _Session:
                def rows(self, statement: Statement, params: Any = ()) -> Any:
                    seen.append(statement.name)
                    return inner.rows(statement, params)

                def rowcount(self, statement: Statement, params: Any = ()) -> int:
                    seen.append(statement.name)
                    return int(inner.rowcount(statement, params))

            return _Session()

    store = StateStore(_Watching(SqlDialect.DUCKDB, _Shared))
    status = read_guard(store)  # the first statement: the schema exists by then
    assert status.state.value == "closed" and seen == ["read_guard"]
    assert database.execute("SELECT COUNT(*) FROM policy_api_guard").fetchone() == (0,)
    listed = database.execute("SELECT table_name FROM information_schema.tables").fetchall()
    tables = {row[0] for row in listed}
    assert tables == {table.name for table in schema.TABLES}
    store.warehouse.ensure_schema()  # idempotent, and nothing to do any more
    assert seen == ["read_guard"]
