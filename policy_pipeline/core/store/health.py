"""Health checks and operator reports over the warehouse: the original health, success-rate and
diagnostic queries, and the state machine's invariants. Read-only.

Every figure is computed by SQL in the warehouse; only the (limited) result rows come back.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from policy_pipeline.core.store.connection import WarehouseConnection
from policy_pipeline.core.store.statements import health as sql_health

ROW_LIMIT = 100


def _dicts(columns: tuple[str, ...], rows: list[tuple[Any, ...]]) -> list[dict[str, Any]]:
    return [dict(zip(columns, row, strict=True)) for row in rows]


@dataclass(frozen=True)
class SuccessRate:
    total: int
    successful: int
    failed: int
    rate_percent: float | None  # None when there were no executions in the window


class HealthReport:
    """The read-only queries of the health checks and the operator CLI."""

    def __init__(self, warehouse: WarehouseConnection) -> None:
        # Nothing runs here: the warehouse creates the schema before its first statement.
        self.warehouse = warehouse

    def stuck_executions(
        self, older_than_minutes: int, limit: int = ROW_LIMIT
    ) -> list[dict[str, Any]]:
        with self.warehouse.session() as session:
            rows = session.rows(sql_health.STUCK_EXECUTIONS, [-older_than_minutes, limit])
        columns = ("execution_id", "policy_name", "status", "start_time", "message", "error")
        return _dicts(columns, rows)

    def stuck_count(self, older_than_minutes: int) -> int:
        with self.warehouse.session() as session:
            return int(session.rows(sql_health.STUCK_EXECUTION_COUNT, [-older_than_minutes])[0][0])

    def success_rate(self, window_hours: int = 24) -> SuccessRate:
        with self.warehouse.session() as session:
            total, successful, failed, rate = session.rows(
                sql_health.SUCCESS_RATE, [-window_hours]
            )[0]
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
            rows = session.rows(sql_health.CONSISTENCY_VIOLATIONS, [max_polls, limit])
        return _dicts(("violation", "execution_id", "policy_name", "status"), rows)

    def executions(
        self, policy: str | None = None, status: str | None = None, limit: int = 20
    ) -> list[dict[str, Any]]:
        with self.warehouse.session() as session:
            rows = session.rows(
                sql_health.FILTERED_EXECUTIONS, [policy, policy, status, status, limit]
            )
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
            rows = session.rows(sql_health.FAILED_EXECUTIONS, [-window_hours, limit])
        columns = ("execution_id", "policy_name", "error_step", "error_message", "resumable")
        return _dicts((*columns, "updated_time"), rows)

    def last_api_calls(self, limit: int = 10) -> list[dict[str, Any]]:
        with self.warehouse.session() as session:
            rows = session.rows(sql_health.LAST_API_CALLS, [limit])
        columns = ("event_time", "policy_name", "method", "endpoint", "http_status", "attempt")
        return _dicts((*columns, "outcome", "latency_ms"), rows)

    def guard_events(self, limit: int = 5) -> list[dict[str, Any]]:
        with self.warehouse.session() as session:
            rows = session.rows(sql_health.GUARD_EVENTS, [limit])
        return _dicts(("event_time", "message"), rows)

    def ping(self) -> None:
        with self.warehouse.session() as session:
            session.rows(sql_health.PING)
