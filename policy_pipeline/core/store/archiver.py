"""Archiving: terminal executions older than the retention, and their events, move to the
history tables (instead of a manual DELETE), one transaction per batch, with every
archive run itself recorded.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

from policy_pipeline.core.store.batches import bind_values
from policy_pipeline.core.store.connection import WarehouseConnection
from policy_pipeline.core.store.statements import archive as sql_archive


@dataclass
class ArchiveResult:
    archive_run_id: str
    batches: int = 0
    executions: int = 0
    events: int = 0
    archived_ids: list[str] = field(default_factory=list)


class Archiver:
    """Moves finished executions to history; the only writer of the archive tables."""

    def __init__(self, warehouse: WarehouseConnection) -> None:
        # Nothing runs here: the warehouse creates the schema before its first statement.
        self.warehouse = warehouse

    def interrupt_dead_archive_runs(self, alive: Callable[[str | None], bool]) -> list[str]:
        """Mark 'interrupted' the archive runs still 'running' whose Dagster run is not alive
        (killed mid-way): their row keeps the counts of the batches they committed."""
        with self.warehouse.session() as session:
            rows = session.rows(sql_archive.RUNNING_ARCHIVE_RUNS)
            dead = [str(archive_id) for archive_id, run_id in rows if not alive(run_id)]
            for archive_id in dead:
                session.rowcount(
                    sql_archive.INTERRUPT_ARCHIVE_RUN,
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
            session.rowcount(
                sql_archive.START_ARCHIVE_RUN, [result.archive_run_id, retention_days, run_id]
            )
        try:
            while True:
                with self.warehouse.session() as session:
                    rows = session.rows(
                        sql_archive.ARCHIVE_CANDIDATES, [-retention_days, batch_size]
                    )
                ids = [str(row[0]) for row in rows]
                if not ids:
                    break
                with self.warehouse.transaction() as session:
                    for batch in bind_values("execution_id", ids):
                        run = result.archive_run_id
                        result.events += session.rowcount(sql_archive.ARCHIVE_EVENTS, [run, batch])
                        session.rowcount(sql_archive.ARCHIVE_EXECUTIONS, [run, batch])
                        session.rowcount(sql_archive.DELETE_ARCHIVED_EVENTS, [batch])
                        deleted = session.rowcount(sql_archive.DELETE_ARCHIVED_EXECUTIONS, [batch])
                        result.executions += deleted
                result.batches += 1
                result.archived_ids.extend(ids)
                with self.warehouse.session() as session:
                    session.rowcount(
                        sql_archive.ARCHIVE_RUN_PROGRESS,
                        [result.batches, result.executions, result.events, result.archive_run_id],
                    )
                if len(ids) < batch_size:
                    break
            # The events about runs (no execution), by the same retention.
            with self.warehouse.transaction() as session:
                result.events += session.rowcount(
                    sql_archive.ARCHIVE_RUN_EVENTS, [result.archive_run_id, -retention_days]
                )
                session.rowcount(sql_archive.DELETE_ARCHIVED_RUN_EVENTS, [-retention_days])
        except Exception as exc:
            self._finish_archive(result, "failed", f"{type(exc).__name__}: {exc}"[:2000])
            raise
        self._finish_archive(result, "succeeded", None)
        return result

    def _finish_archive(self, result: ArchiveResult, status: str, error: str | None) -> None:
        with self.warehouse.session() as session:
            session.rowcount(
                sql_archive.FINISH_ARCHIVE_RUN,
                [
                    status,
                    result.batches,
                    result.executions,
                    result.events,
                    error,
                    result.archive_run_id,
                ],
            )
