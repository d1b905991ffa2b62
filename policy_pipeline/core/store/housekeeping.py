"""Monitoring and archiving over the warehouse: the seeds' health, success-rate and diagnostic
queries, the state machine's invariants, and the archive that replaces the manual DELETE.

Every figure is computed by SQL in the warehouse; only the (limited) result rows come back.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from policy_pipeline.core.store import sql as sql
from policy_pipeline.core.store.connection import Warehouse

ROW_LIMIT = 100


def _dicts(columns: tuple[str, ...], rows: list[tuple[Any, ...]]) -> list[dict[str, Any]]:
    return [dict(zip(columns, row, strict=True)) for row in rows]


@dataclass(frozen=True)
class SuccessRate:
    total: int
    successful: int
    failed: int
    rate_percent: float | None  # None when there were no executions in the window


@dataclass
class ArchiveResult:
    archive_run_id: str
    batches: int = 0
    executions: int = 0
    events: int = 0
    archived_ids: list[str] = field(default_factory=list)


class Monitor:
    def __init__(self, warehouse: Warehouse) -> None:
        self.warehouse = warehouse
        warehouse.ensure_schema()

    def stuck_executions(
        self, older_than_minutes: int, limit: int = ROW_LIMIT
    ) -> list[dict[str, Any]]:
        with self.warehouse.session() as session:
            rows = session.rows(sql.STUCK_EXECUTIONS, [-older_than_minutes, limit])
        columns = ("execution_id", "policy_name", "status", "start_time", "message", "error")
        return _dicts(columns, rows)

    def stuck_count(self, older_than_minutes: int) -> int:
        with self.warehouse.session() as session:
            return int(session.rows(sql.STUCK_EXECUTION_COUNT, [-older_than_minutes])[0][0])

    def success_rate(self, window_hours: int = 24) -> SuccessRate:
        with self.warehouse.session() as session:
            total, successful, failed, rate = session.rows(sql.SUCCESS_RATE, [-window_hours])[0]
        return SuccessRate(
            total=int(total or 0),
            successful=int(successful or 0),
            failed=int(failed or 0),
            rate_percent=None if rate is None else float(rate),
        )

    def consistency_violations(
        self, max_polls: int, limit: int = ROW_LIMIT
    ) -> list[dict[str, Any]]:
        with self.warehouse.session() as session:
            rows = session.rows(sql.CONSISTENCY_VIOLATIONS, [max_polls, limit])
        return _dicts(("violation", "execution_id", "policy_name", "status"), rows)

    def executions(
        self, policy: str | None = None, status: str | None = None, limit: int = 20
    ) -> list[dict[str, Any]]:
        with self.warehouse.session() as session:
            rows = session.rows(sql.FILTERED_EXECUTIONS, [policy, policy, status, status, limit])
        columns = (
            "policy_name",
            "execution_id",
            "policy_id",
            "status",
            "poll_count",
            "circuit_breaker_completed",
            "message",
            "start_time",
            "error_message",
        )
        return _dicts(columns, rows)

    def failed_executions(self, window_hours: int = 24, limit: int = 20) -> list[dict[str, Any]]:
        with self.warehouse.session() as session:
            rows = session.rows(sql.FAILED_EXECUTIONS, [-window_hours, limit])
        columns = ("execution_id", "policy_name", "error_step", "error_message", "resumable")
        return _dicts((*columns, "updated_time"), rows)

    def last_api_calls(self, limit: int = 10) -> list[dict[str, Any]]:
        with self.warehouse.session() as session:
            rows = session.rows(sql.LAST_API_CALLS, [limit])
        columns = ("event_time", "policy_name", "method", "endpoint", "http_status", "attempt")
        return _dicts((*columns, "outcome", "latency_ms"), rows)

    def guard_events(self, limit: int = 5) -> list[dict[str, Any]]:
        with self.warehouse.session() as session:
            rows = session.rows(sql.GUARD_EVENTS, [limit])
        return _dicts(("event_time", "message"), rows)

    def ping(self) -> None:
        with self.warehouse.session() as session:
            session.rows(sql.PING)

    # --- archiving ------------------------------------------------------------------------------

    def interrupt_dead_archive_runs(self, alive: Callable[[str | None], bool]) -> list[str]:
        """Mark 'interrupted' the archive runs still 'running' whose Dagster run is not alive
        (killed mid-way): their row keeps the counts of the batches they committed."""
        with self.warehouse.session() as session:
            rows = session.rows(sql.RUNNING_ARCHIVE_RUNS)
            dead = [str(archive_id) for archive_id, run_id in rows if not alive(run_id)]
            for archive_id in dead:
                session.rowcount(
                    sql.INTERRUPT_ARCHIVE_RUN,
                    [
                        "its run stopped before it finished (killed?); the batches it "
                        "committed are counted",
                        archive_id,
                    ],
                )
        return dead

    def archive(
        self, retention_days: int, batch_size: int = 500, run_id: str | None = None
    ) -> ArchiveResult:
        """Move terminal executions older than the retention, and their events, to the history
        tables: one transaction per batch, and the archive run itself recorded."""
        result = ArchiveResult(archive_run_id=str(uuid.uuid4()))
        with self.warehouse.session() as session:
            session.rowcount(sql.START_ARCHIVE_RUN, [result.archive_run_id, retention_days, run_id])
        try:
            while True:
                with self.warehouse.session() as session:
                    rows = session.rows(sql.ARCHIVE_CANDIDATES, [-retention_days, batch_size])
                ids = [str(row[0]) for row in rows]
                if not ids:
                    break
                with self.warehouse.transaction() as session:
                    for batch in sql.bind_values("execution_id", ids):
                        run = result.archive_run_id
                        result.events += session.rowcount(sql.ARCHIVE_EVENTS, [run, batch])
                        session.rowcount(sql.ARCHIVE_EXECUTIONS, [run, batch])
                        session.rowcount(sql.DELETE_ARCHIVED_EVENTS, [batch])
                        deleted = session.rowcount(sql.DELETE_ARCHIVED_EXECUTIONS, [batch])
                        result.executions += deleted
                result.batches += 1
                result.archived_ids.extend(ids)
                with self.warehouse.session() as session:
                    session.rowcount(
                        sql.ARCHIVE_RUN_PROGRESS,
                        [result.batches, result.executions, result.events, result.archive_run_id],
                    )
                if len(ids) < batch_size:
                    break
            # The events about runs (no execution), by the same retention.
            with self.warehouse.transaction() as session:
                result.events += session.rowcount(
                    sql.ARCHIVE_RUN_EVENTS, [result.archive_run_id, -retention_days]
                )
                session.rowcount(sql.DELETE_ARCHIVED_RUN_EVENTS, [-retention_days])
        except Exception as exc:
            self._finish_archive(result, "failed", f"{type(exc).__name__}: {exc}"[:2000])
            raise
        self._finish_archive(result, "succeeded", None)
        return result

    def _finish_archive(self, result: ArchiveResult, status: str, error: str | None) -> None:
        with self.warehouse.session() as session:
            session.rowcount(
                sql.FINISH_ARCHIVE_RUN,
                [
                    status,
                    result.batches,
                    result.executions,
                    result.events,
                    error,
                    result.archive_run_id,
                ],
            )
