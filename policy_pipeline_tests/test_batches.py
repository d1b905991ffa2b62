"""Batch statements: rows bound as one JSON array, statement counts that do not grow with the
number of policies, the current-execution query, and the catalog's parse cache."""

from __future__ import annotations

import json
import os
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from policy_devtools.simulator import PolicyApiSimulator, SimulatorConfig
from policy_pipeline.core.catalog import CatalogError, load_catalog
from policy_pipeline.core.domain import PolicyDefinition
from policy_pipeline.core.engine.workflow import FLUSH_SECONDS, PolicyWorkflow
from policy_pipeline.core.settings import PollingSettings, Settings
from policy_pipeline.core.store import batches as store_batches
from policy_pipeline.core.store.connection import Params, Session, WarehouseConnection
from policy_pipeline.core.store.dialect import Statement
from policy_pipeline.core.store.state_store import AuditEvent, StateStore
from policy_pipeline.resources import open_state
from policy_pipeline.resources.policy_api import PolicyApiResource
from policy_pipeline_tests.conftest import RecordingLog, Workspace

# --- bind_rows ------------------------------------------------------------------------------


def test_bind_rows_packs_rows_by_count_and_by_bytes(monkeypatch: pytest.MonkeyPatch) -> None:
    rows = [{"execution_id": f"e{i}", "message": "x" * 20, "policy_id": None} for i in range(7)]
    monkeypatch.setattr(store_batches, "MAX_BATCH", 3)
    batches = store_batches.bind_rows(rows)
    assert [len(json.loads(b)) for b in batches] == [3, 3, 1]
    # None is left out (a JSON null would be a VARIANT null on Snowflake, not NULL).
    assert all("policy_id" not in row for b in batches for row in json.loads(b))

    monkeypatch.setattr(store_batches, "MAX_BATCH", 1000)
    one_row = len(json.dumps(json.loads(batches[0])[0], separators=(",", ":")))
    monkeypatch.setattr(store_batches, "MAX_BATCH_BYTES", 2 * one_row + 3)
    batches = store_batches.bind_rows(rows)
    assert [len(json.loads(b)) for b in batches] == [2, 2, 2, 1]
    assert all(len(b) <= store_batches.MAX_BATCH_BYTES for b in batches)
    assert [r["execution_id"] for b in batches for r in json.loads(b)] == [
        f"e{i}" for i in range(7)
    ]

    # A row larger than the limit still goes, alone.
    monkeypatch.setattr(store_batches, "MAX_BATCH_BYTES", 10)
    assert [len(json.loads(b)) for b in store_batches.bind_rows(rows[:2])] == [1, 1]
    assert store_batches.bind_rows([]) == []


class _CountingWarehouse(WarehouseConnection):
    """Counts the statements (by name) and the connections the product opens."""

    def __init__(self, warehouse: WarehouseConnection) -> None:
        super().__init__(warehouse.dialect, warehouse._connect)
        self.statements: Counter[str] = Counter()
        self.texts: dict[str, set[str]] = {}
        self.connections = 0
        connect = self._connect

        @contextmanager
        def counted() -> Iterator[Any]:
            self.connections += 1
            with connect() as connection:
                yield connection

        self._connect = counted

    def _wrap(self, session: Session) -> Session:
        outer = self

        class Counting:
            def rows(self, statement: Statement, params: Params = ()) -> list[tuple[Any, ...]]:
                outer._count(statement)
                return session.rows(statement, params)

            def rowcount(self, statement: Statement, params: Params = ()) -> int:
                outer._count(statement)
                return session.rowcount(statement, params)

        return Counting()

    def _count(self, statement: Statement) -> None:
        self.statements[statement.name] += 1
        self.texts.setdefault(statement.name, set()).add(statement.render(self.dialect))


@contextmanager
def _store(workspace: Workspace) -> Iterator[tuple[StateStore, _CountingWarehouse]]:
    with open_state(Settings.from_env()) as state:
        warehouse = _CountingWarehouse(state.warehouse())
        yield StateStore(warehouse, run_id="test-run"), warehouse


def _policy(name: str, description: str = "a test policy") -> PolicyDefinition:
    return PolicyDefinition(
        policy_name=name,
        policy_type="access",
        description=description,
        priority="low",
        parameters={"note": description},
    )


# --- values survive the trip, on both warehouses --------------------------------------------

AWKWARD = 'it\'s 100% "quoted" \\ back\\slash, new\nline, ünïcødé ✓, %s %(x)s ?'


@pytest.mark.both_warehouses
def test_batch_values_round_trip_exactly(workspace: Workspace) -> None:
    """Quotes, backslashes, percent signs, placeholders, newlines and non-ASCII text, NULLs,
    booleans, numbers and JSON go in through one JSON parameter and come back unchanged."""
    with _store(workspace) as (store, _warehouse):
        policy = _policy("awkward", AWKWARD)
        [row] = store.start_executions([policy])
        response = {"policy_id": "p-1", "note": AWKWARD, "nested": [1, None, True]}
        after = store.mark_created([(row, "p-1", response)])
        assert after[row.execution_id].policy_id == "p-1"
        store.mark_errors([(after[row.execution_id], AWKWARD, "policy_ready", True)])
        store.audit(
            AuditEvent(
                execution_id=row.execution_id,
                policy_name="awkward",
                event_type="api_call",
                message=AWKWARD,
                http_status=200,
                latency_ms=12.5,
                attempt=2,
                detail={"body": AWKWARD},
            )
        )
        store.flush()
    [(error, step, resumable, stored_response)] = workspace.query(
        'SELECT "error_message", "error_step", "resumable", "api_response" '
        'FROM policy_execution_state WHERE "execution_id" = ?',
        [row.execution_id],
    )
    assert (error, step, bool(resumable)) == (AWKWARD, "policy_ready", True)
    assert json.loads(stored_response) == response
    [(message, status, latency, attempt, detail, endpoint)] = workspace.query(
        'SELECT "message", "http_status", "latency_ms", "attempt", "detail", "endpoint" '
        "FROM policy_execution_events WHERE \"event_type\" = 'api_call'"
    )
    assert (message, int(status), float(latency), int(attempt)) == (AWKWARD, 200, 12.5, 2)
    assert json.loads(detail) == {"body": AWKWARD}
    assert endpoint is None  # left out of the JSON row: NULL, not a JSON null


def test_statement_text_and_count_do_not_depend_on_the_batch_size(workspace: Workspace) -> None:
    """One statement text per kind for 1, 30 and 1200 rows, and one statement per batch."""
    with _store(workspace) as (store, warehouse):
        for size in (1, 30, 1200):
            policies = [_policy(f"size{size}-{i}") for i in range(size)]
            before = warehouse.statements.copy()
            rows = store.start_executions(policies)
            store.mark_created([(row, f"pid-{row.execution_id}", {"ok": 1}) for row in rows])
            store.current_executions([p.policy_name for p in policies])
            added = warehouse.statements - before
            assert added == Counter(
                {
                    "insert_executions": 1,
                    "insert_events": 2,  # the intents' events, then the moves'
                    "mark_created": 1,
                    "executions_by_id": 1,  # the read-back of the move
                    "current_executions": 1,
                }
            ), size
    assert all(len(texts) == 1 for texts in warehouse.texts.values()), warehouse.texts


# --- the current execution ------------------------------------------------------------------


@pytest.mark.both_warehouses
def test_current_execution_prefers_the_active_one_then_the_latest(workspace: Workspace) -> None:
    with _store(workspace) as (store, _warehouse):
        store.warehouse.ensure_schema()

    def add(name: str, status: str, minutes_ago: int, resumable: bool = False) -> str:
        execution_id = str(uuid.uuid4())
        workspace.query(
            'INSERT INTO policy_execution_state ("execution_id", "policy_name", "status", '
            '"resumable", "poll_count", "completed", "requires_circuit_breaker", '
            '"circuit_breaker_initiated", "circuit_breaker_completed", "start_time") '
            "SELECT ?, ?, ?, ?, 0, FALSE, FALSE, FALSE, FALSE, "
            "DATEADD(minute, ?, CURRENT_TIMESTAMP())",
            [execution_id, name, status, resumable, -minutes_ago],
        )
        return execution_id

    add("finished", "completed", 300)
    latest = add("finished", "error", 10)
    add("finished", "completed", 200)
    active = add("active-older", "policy_created", 500)
    add("active-older", "completed", 5)
    resumable = add("resumable", "error", 400, resumable=True)
    add("resumable", "error", 3, resumable=False)
    with _store(workspace) as (store, _warehouse):
        current = store.current_executions(["finished", "active-older", "resumable", "never"])
    assert {name: row.execution_id for name, row in current.items()} == {
        "finished": latest,
        "active-older": active,
        "resumable": resumable,
    }


# --- a whole run: statements do not grow with the number of policies -------------------------


def _run_all(workspace: Workspace, count: int) -> tuple[Counter[str], float]:
    """One engine run of all three steps over ``count`` policies: its statements, its time."""
    config = SimulatorConfig(api_key="k-" + uuid.uuid4().hex, ready_after_polls=0)
    policies = {f"n{count}-{i:04d}": _policy(f"n{count}-{i:04d}") for i in range(count)}
    with (
        PolicyApiSimulator(config) as sim,
        PolicyApiResource(
            endpoint=sim.base_url, api_key=config.api_key or ""
        ).process_config_and_initialize_cm() as api,
        _store(workspace) as (store, warehouse),
    ):
        workflow = PolicyWorkflow(
            store, api.get_client(), owner=f"test-{count}", log=RecordingLog()
        )
        polling = PollingSettings(initial_interval_seconds=0.05, backoff_multiplier=1.0)
        before = warehouse.statements.copy()
        started = time.monotonic()
        report = workflow.run(list(policies), definitions=policies, polling=polling)
        elapsed = time.monotonic() - started
        assert not report.failures, report.failures
        assert sim.counts()["circuits_triggered"] == count
        return warehouse.statements - before, elapsed


WRITES = ("insert_executions", "mark_created", "mark_ready", "claim_circuit_breakers")


def test_statements_per_run_do_not_grow_with_the_number_of_policies(
    workspace: Workspace,
) -> None:
    """Writes are batched (group commit, at most one batch per flush interval): a run of 400
    policies makes about as many statements as a run of 8, not fifty times as many. Each kind
    of write is one statement per batch, so its count is bounded by the run's duration."""
    small, small_seconds = _run_all(workspace, 8)
    large, large_seconds = _run_all(workspace, 400)
    for statements, seconds in ((small, small_seconds), (large, large_seconds)):
        batches = seconds / FLUSH_SECONDS + 2
        for write in (*WRITES, "mark_completed"):
            assert 1 <= statements[write] <= batches, (write, seconds, statements)
    assert sum(large.values()) <= 3 * sum(small.values()) + 40, (small, large)


# --- the catalog's parse cache ----------------------------------------------------------------


def _write(path: Path, name: str, description: str) -> None:
    path.write_text(
        f"policy_name: {name}\npolicy_type: access\ndescription: {description}\npriority: low\n",
        encoding="utf-8",
    )


def test_catalog_reparses_only_changed_files(tmp_path: Path) -> None:
    a, b = tmp_path / "a.yaml", tmp_path / "b.yaml"
    _write(a, "a", "first")
    _write(b, "b", "first")
    first = load_catalog(tmp_path)
    second = load_catalog(tmp_path)
    assert second["a"].policy is first["a"].policy  # unchanged: not parsed again

    _write(a, "a", "second, same size")
    _write(b, "b", "second")
    os.utime(b, ns=(time.time_ns(), first["b"].path.stat().st_mtime_ns))  # same mtime
    third = load_catalog(tmp_path)
    assert third["a"].policy.description == "second, same size"
    assert third["b"].policy.description == "second"  # same mtime, other size: re-read

    b.write_text("policy_name: [not, a, name\n", encoding="utf-8")
    for _ in range(2):  # a bad file is reported every time, not cached
        with pytest.raises(CatalogError, match=r"b\.yaml: not valid YAML"):
            load_catalog(tmp_path)
    b.unlink()
    assert set(load_catalog(tmp_path)) == {"a"}
