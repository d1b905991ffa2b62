"""The execution state table, the audit trail and the per-policy lease, over any `Warehouse`.

Every state change is a conditional UPDATE whose row count says whether it happened, so two
processes racing on one execution cannot both move it (Snowflake enforces no unique keys).
"""

from __future__ import annotations

import json
import threading
import uuid
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from policy_pipeline import sql
from policy_pipeline.domain import (
    ExecutionStatus,
    PolicyDefinition,
    check_transition,
    create_idempotency_key,
)
from policy_pipeline.warehouse import Session, Warehouse

# Audit details are truncated so a huge or hostile response cannot bloat the table.
MAX_DETAIL_CHARS = 4_000
EVENT_BATCH_ROWS = 200


@dataclass(frozen=True)
class ExecutionRow:
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

    @classmethod
    def from_row(cls, row: tuple[Any, ...]) -> ExecutionRow:
        values = dict(zip(sql.EXECUTION_READ_COLUMNS, row, strict=True))
        values["status"] = ExecutionStatus(values["status"])
        values["poll_count"] = int(values["poll_count"] or 0)
        for flag in (
            "completed",
            "requires_circuit_breaker",
            "circuit_breaker_initiated",
            "circuit_breaker_completed",
            "resumable",
        ):
            values[flag] = bool(values[flag])
        return cls(**values)


def to_json(value: Any, limit: int | None = None) -> str:
    text = json.dumps(value, default=str, ensure_ascii=False)
    if limit is not None and len(text) > limit:
        # Keep valid JSON: a truncated body is stored as a string with its original size.
        text = json.dumps({"truncated": True, "size": len(text), "head": text[:limit]})
    return text


@dataclass
class AuditEvent:
    execution_id: str | None  # None for events about a run rather than an execution
    policy_name: str
    event_type: str  # "api_call" | "transition" | "lease" | "warning"
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

    def params(self, run_id: str | None) -> list[Any]:
        return [
            self.event_id,
            self.execution_id,
            self.policy_name,
            self.event_type,
            self.endpoint,
            self.http_method,
            self.http_status,
            self.latency_ms,
            self.attempt,
            self.outcome,
            self.from_status,
            self.to_status,
            self.message[:MAX_DETAIL_CHARS],
            None if self.detail is None else to_json(self.detail, MAX_DETAIL_CHARS),
            run_id,
        ]


class StateStore:
    """The workflow's reads and writes. Audit events are buffered and written in batches, in the
    same connection as the state change that follows them."""

    def __init__(self, warehouse: Warehouse, run_id: str | None = None) -> None:
        self.warehouse = warehouse
        self.run_id = run_id
        self._pending_events: list[AuditEvent] = []
        self._events_lock = threading.Lock()
        warehouse.ensure_schema()

    # --- audit ----------------------------------------------------------------------------------

    def audit(self, event: AuditEvent) -> None:
        with self._events_lock:
            self._pending_events.append(event)

    def flush(self, session: Session | None = None) -> None:
        with self._events_lock:
            events, self._pending_events = self._pending_events, []
        if not events:
            return
        if session is None:
            with self.warehouse.session() as own:
                self._write_events(own, events)
        else:
            self._write_events(session, events)

    def _write_events(self, session: Session, events: list[AuditEvent]) -> None:
        for start in range(0, len(events), EVENT_BATCH_ROWS):
            batch = events[start : start + EVENT_BATCH_ROWS]
            params: list[Any] = []
            for event in batch:
                params.extend(event.params(self.run_id))
            session.rowcount(sql.insert_events(len(batch)), params)

    def _transition(
        self,
        session: Session,
        statement: sql.Statement,
        params: list[Any],
        row: ExecutionRow,
        target: ExecutionStatus,
        message: str,
    ) -> bool:
        """Run a conditional update and audit it if it took effect, in one connection."""
        check_transition(row.status, target)
        changed = session.rowcount(statement, params) == 1
        if changed:
            self.audit(
                AuditEvent(
                    execution_id=row.execution_id,
                    policy_name=row.policy_name,
                    event_type="transition",
                    message=message,
                    from_status=row.status.value,
                    to_status=target.value,
                )
            )
        self.flush(session)
        return changed

    # --- lease ----------------------------------------------------------------------------------

    def acquire_lease(self, policy_name: str, owner: str, ttl_seconds: int) -> bool:
        with self.warehouse.session() as session:
            session.rowcount(sql.ENSURE_LOCK_ROW, [policy_name, policy_name])
            return (
                session.rowcount(sql.ACQUIRE_LEASE, [owner, ttl_seconds, policy_name, owner]) >= 1
            )

    def take_over_lease(
        self, policy_name: str, owner: str, previous_owner: str, ttl_seconds: int
    ) -> bool:
        with self.warehouse.session() as session:
            return (
                session.rowcount(
                    sql.TAKE_OVER_LEASE, [owner, ttl_seconds, policy_name, previous_owner]
                )
                >= 1
            )

    def release_lease(self, policy_name: str, owner: str) -> None:
        with self.warehouse.session() as session:
            session.rowcount(sql.RELEASE_LEASE, [policy_name, owner])

    def lease_holder(self, policy_name: str) -> tuple[str, datetime] | None:
        with self.warehouse.session() as session:
            rows = session.rows(sql.LEASE_HOLDER, [policy_name])
        return (str(rows[0][0]), rows[0][1]) if rows else None

    # --- reads ----------------------------------------------------------------------------------

    def get(self, execution_id: str) -> ExecutionRow:
        with self.warehouse.session() as session:
            rows = session.rows(sql.GET_EXECUTION, [execution_id])
        if not rows:
            raise LookupError(f"no execution {execution_id} in {sql.STATE_TABLE}")
        return ExecutionRow.from_row(rows[0])

    def active_executions(self, policy_name: str) -> list[ExecutionRow]:
        with self.warehouse.session() as session:
            rows = session.rows(sql.ACTIVE_EXECUTIONS_FOR_POLICY, [policy_name])
        return [ExecutionRow.from_row(row) for row in rows]

    def latest_execution(self, policy_name: str) -> ExecutionRow | None:
        with self.warehouse.session() as session:
            rows = session.rows(sql.LATEST_EXECUTION_FOR_POLICY, [policy_name])
        return ExecutionRow.from_row(rows[0]) if rows else None

    def executed_content(self) -> set[tuple[str, str]]:
        """(policy_name, content hash) of every content ever executed, archived ones included."""
        with self.warehouse.session() as session:
            rows = session.rows(sql.EXECUTED_CONTENT)
        return {(str(name), str(digest)) for name, digest in rows if digest is not None}

    def recent_executions(self, limit: int = 50) -> list[dict[str, Any]]:
        with self.warehouse.session() as session:
            rows = session.rows(sql.RECENT_EXECUTIONS, [limit])
        keys = (
            "policy_name",
            "execution_id",
            "policy_id",
            "status",
            "poll_count",
            "circuit_breaker_completed",
            "message",
            "start_time",
        )
        return [dict(zip(keys, row, strict=True)) for row in rows]

    # --- writes ---------------------------------------------------------------------------------

    def start_execution(self, policy: PolicyDefinition) -> ExecutionRow:
        """Commit the intent (execution id, idempotency key, policy data) before any API call."""
        execution_id = str(uuid.uuid4())
        message = "Execution started; creating policy"
        with self.warehouse.session() as session:
            session.rowcount(
                sql.INSERT_EXECUTION,
                [
                    execution_id,
                    policy.policy_name,
                    policy.content_hash(),
                    to_json(policy.payload()),
                    create_idempotency_key(execution_id),
                    message,
                    self.run_id,
                ],
            )
            self.audit(
                AuditEvent(
                    execution_id=execution_id,
                    policy_name=policy.policy_name,
                    event_type="transition",
                    message=message,
                    to_status=ExecutionStatus.PENDING.value,
                )
            )
            self.flush(session)
        return self.get(execution_id)

    def mark_created(self, row: ExecutionRow, policy_id: str, response: Any) -> bool:
        message = f"Step 1 complete: policy {policy_id} created"
        with self.warehouse.session() as session:
            return self._transition(
                session,
                sql.MARK_POLICY_CREATED,
                [policy_id, to_json(response, MAX_DETAIL_CHARS), message, row.execution_id],
                row,
                ExecutionStatus.POLICY_CREATED,
                message,
            )

    def record_poll(self, row: ExecutionRow, response: Any, message: str) -> bool:
        with self.warehouse.session() as session:
            changed = (
                session.rowcount(
                    sql.RECORD_POLL,
                    [to_json(response, MAX_DETAIL_CHARS), message, row.execution_id],
                )
                == 1
            )
            self.flush(session)
        return changed

    def mark_ready(self, row: ExecutionRow, message: str) -> bool:
        with self.warehouse.session() as session:
            return self._transition(
                session,
                sql.MARK_POLICY_READY,
                [message, row.execution_id],
                row,
                ExecutionStatus.POLICY_READY,
                message,
            )

    def claim_circuit_breaker(self, row: ExecutionRow, key: str, reason: str) -> bool:
        """The exactly-once gate: True for the one caller that moved the flag."""
        message = "Step 3: circuit breaker initiated"
        with self.warehouse.session() as session:
            claimed = (
                session.rowcount(
                    sql.CLAIM_CIRCUIT_BREAKER, [key, reason, message, row.execution_id]
                )
                == 1
            )
            if claimed:
                self.audit(
                    AuditEvent(
                        execution_id=row.execution_id,
                        policy_name=row.policy_name,
                        event_type="transition",
                        message=message,
                        from_status=row.status.value,
                        to_status=row.status.value,
                        detail={"circuit_breaker_initiated": True},
                    )
                )
            self.flush(session)
        return claimed

    def mark_completed(self, row: ExecutionRow, response: Any) -> bool:
        message = "Workflow completed: circuit breaker triggered"
        with self.warehouse.session() as session:
            return self._transition(
                session,
                sql.MARK_COMPLETED,
                [to_json(response, MAX_DETAIL_CHARS), message, row.execution_id],
                row,
                ExecutionStatus.COMPLETED,
                message,
            )

    def mark_error(self, row: ExecutionRow, error: str, step: str, resumable: bool) -> bool:
        message = f"{step} failed" + (" (a later run resumes it)" if resumable else "")
        with self.warehouse.session() as session:
            return self._transition(
                session,
                sql.MARK_ERROR,
                [error[:MAX_DETAIL_CHARS], step, resumable, message, row.execution_id],
                row,
                ExecutionStatus.ERROR,
                f"{message}: {error[:500]}",
            )

    def reopen(self, row: ExecutionRow, target: ExecutionStatus) -> bool:
        message = f"Resumed after a recoverable error in {row.error_step}"
        with self.warehouse.session() as session:
            return self._transition(
                session,
                sql.REOPEN_EXECUTION,
                [target.value, message, row.execution_id],
                row,
                target,
                message,
            )

    def policy_data(self, execution_id: str) -> Any:
        with self.warehouse.session() as session:
            rows = session.rows(sql.GET_POLICY_DATA, [execution_id])
        return rows[0][0] if rows else None

    def set_api_response(self, row: ExecutionRow, response: Any) -> None:
        with self.warehouse.session() as session:
            session.rowcount(
                sql.SET_API_RESPONSE, [to_json(response, MAX_DETAIL_CHARS), row.execution_id]
            )
            self.flush(session)

    def force_ready(self, row: ExecutionRow, message: str) -> bool:
        with self.warehouse.session() as session:
            return self._transition(
                session,
                sql.FORCE_READY,
                [message, row.execution_id],
                row,
                ExecutionStatus.POLICY_READY,
                message,
            )

    def skip_circuit_breaker(self, row: ExecutionRow, message: str, force: bool) -> bool:
        allowed = ["policy_ready", "policy_created", "error"] if force else ["policy_ready"] * 3
        with self.warehouse.session() as session:
            return self._transition(
                session,
                sql.SKIP_CIRCUIT_BREAKER,
                [message, row.execution_id, *allowed],
                row,
                ExecutionStatus.COMPLETED,
                message,
            )

    def set_circuit_response(self, row: ExecutionRow, response: Any) -> None:
        with self.warehouse.session() as session:
            session.rowcount(
                sql.SET_CIRCUIT_RESPONSE,
                [to_json(response, MAX_DETAIL_CHARS), row.execution_id],
            )
            self.flush(session)
