"""The execution state table, the audit trail and the per-policy leases, over any `Warehouse`.

Every method takes a batch: a step over a thousand policies makes a few round trips, not a few
thousand (each costs tens of milliseconds on Snowflake). Every state change is a conditional
UPDATE, re-read afterwards, so two processes racing on one execution cannot both move it
(Snowflake enforces no unique keys), and only moves that happened are audited.
"""

from __future__ import annotations

import functools
import json
import threading
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, TypeVar

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
EVENT_BATCH_ROWS = 1_000


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
    same connection as the state change they accompany."""

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
        for batch in _chunks(events, EVENT_BATCH_ROWS):
            params: list[Any] = []
            for event in batch:
                params.extend(event.params(self.run_id))
            session.rowcount(sql.insert_events(len(batch)), params)

    # --- leases ---------------------------------------------------------------------------------

    def acquire_leases(self, names: Sequence[str], owner: str, ttl_seconds: int) -> set[str]:
        """Claim the free (or expired, or already ours) leases; returns the names now ours."""
        with self.warehouse.session() as session:
            for chunk in _chunks(names):
                session.rowcount(sql.ensure_lock_rows(len(chunk)), chunk)
                session.rowcount(
                    sql.acquire_leases(len(chunk)), [owner, ttl_seconds, *chunk, owner]
                )
            holders = self._holders(session, names)
        return {name for name, (holder, _until) in holders.items() if holder == owner}

    def lease_holders(self, names: Sequence[str]) -> dict[str, tuple[str, datetime]]:
        with self.warehouse.session() as session:
            return self._holders(session, names)

    def _holders(self, session: Session, names: Sequence[str]) -> dict[str, tuple[str, datetime]]:
        holders: dict[str, tuple[str, datetime]] = {}
        for chunk in _chunks(names):
            for name, holder, until in session.rows(sql.lease_holders(len(chunk)), chunk):
                holders[str(name)] = (str(holder), until)
        return holders

    def take_over_leases(
        self, names: Sequence[str], owner: str, previous_owner: str, ttl_seconds: int
    ) -> None:
        with self.warehouse.session() as session:
            for chunk in _chunks(names):
                session.rowcount(
                    sql.take_over_leases(len(chunk)), [owner, ttl_seconds, *chunk, previous_owner]
                )

    def renew_leases(self, names: Sequence[str], owner: str, ttl_seconds: int) -> None:
        self.acquire_leases(names, owner, ttl_seconds)

    def release_leases(self, names: Sequence[str], owner: str) -> None:
        with self.warehouse.session() as session:
            for chunk in _chunks(names):
                session.rowcount(sql.release_leases(len(chunk)), [*chunk, owner])

    # --- reads ----------------------------------------------------------------------------------

    def current_executions(self, names: Sequence[str]) -> dict[str, ExecutionRow]:
        """Each policy's active execution, or else its latest (absent: never executed)."""
        found: dict[str, ExecutionRow] = {}
        with self.warehouse.session() as session:
            for chunk in _chunks(names):
                for row in session.rows(sql.current_executions(len(chunk)), chunk):
                    execution = ExecutionRow.from_row(row)
                    found[execution.policy_name] = execution
        return found

    def active_counts(self, names: Sequence[str]) -> dict[str, int]:
        counts: dict[str, int] = {}
        with self.warehouse.session() as session:
            for chunk in _chunks(names):
                for name, count in session.rows(sql.active_execution_counts(len(chunk)), chunk):
                    counts[str(name)] = int(count)
        return counts

    def executions(self, ids: Sequence[str]) -> dict[str, ExecutionRow]:
        found: dict[str, ExecutionRow] = {}
        with self.warehouse.session() as session:
            for chunk in _chunks(ids):
                for row in session.rows(sql.executions_by_id(len(chunk)), chunk):
                    execution = ExecutionRow.from_row(row)
                    found[execution.execution_id] = execution
        return found

    def get(self, execution_id: str) -> ExecutionRow:
        rows = self.executions([execution_id])
        if execution_id not in rows:
            raise LookupError(f"no execution {execution_id} in {sql.STATE_TABLE}")
        return rows[execution_id]

    def current_execution(self, policy_name: str) -> ExecutionRow | None:
        return self.current_executions([policy_name]).get(policy_name)

    def policy_data(self, ids: Sequence[str]) -> dict[str, Any]:
        """The stored create bodies: a retried create re-sends exactly what was sent."""
        data: dict[str, Any] = {}
        with self.warehouse.session() as session:
            for chunk in _chunks(ids):
                for execution_id, value in session.rows(sql.policy_data_by_id(len(chunk)), chunk):
                    data[str(execution_id)] = json.loads(value) if isinstance(value, str) else value
        return data

    def executed_content(self) -> set[tuple[str, str]]:
        """(policy_name, content hash) of every content ever executed, archived ones included."""
        with self.warehouse.session() as session:
            rows = session.rows(sql.EXECUTED_CONTENT)
        return {(str(name), str(digest)) for name, digest in rows if digest is not None}

    # --- writes ---------------------------------------------------------------------------------

    def start_executions(self, policies: Sequence[PolicyDefinition]) -> list[ExecutionRow]:
        """Commit the intents (execution id, idempotency key, policy data) before any call."""
        message = "Execution started; creating policy"
        params: list[list[Any]] = []
        for policy in policies:
            execution_id = str(uuid.uuid4())
            params.append(
                [
                    execution_id,
                    policy.policy_name,
                    policy.content_hash(),
                    to_json(policy.payload()),
                    create_idempotency_key(execution_id),
                    message,
                    self.run_id,
                ]
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
        with self.warehouse.session() as session:
            for chunk in _chunks(params):
                session.rowcount(sql.insert_executions(len(chunk)), _flat(chunk))
            self.flush(session)
        rows = self.executions([p[0] for p in params])
        return [rows[p[0]] for p in params]

    def _move(
        self,
        factory: Callable[[int], sql.Statement],
        rows: Sequence[tuple[ExecutionRow, Sequence[Any]]],
        target: ExecutionStatus | None,
        messages: Sequence[str] | None = None,
    ) -> dict[str, ExecutionRow]:
        """Apply a conditional per-row update to a batch, then read the rows back: the ones
        now in ``target`` are the moves that happened (and are audited). Returns every row as
        it is now."""
        for row, _values in rows:
            if target is not None and target is not row.status:
                check_transition(row.status, target)
        with self.warehouse.session() as session:
            for chunk in _chunks(list(rows)):
                params = _flat([[row.execution_id, *values] for row, values in chunk])
                session.rowcount(factory(len(chunk)), params)
        after = self.executions([row.execution_id for row, _ in rows])
        if target is not None:
            for index, (row, _values) in enumerate(rows):
                now = after.get(row.execution_id)
                if now is not None and now.status is target and row.status is not target:
                    message = messages[index] if messages else f"moved to {target}"
                    self._audit_move(row, target, message)
        self.flush()
        return after

    def reopen(
        self, rows: Sequence[ExecutionRow], target: ExecutionStatus
    ) -> dict[str, ExecutionRow]:
        message = "Resumed after a recoverable error"
        for row in rows:
            check_transition(row.status, target)
        with self.warehouse.session() as session:
            for chunk in _chunks([row.execution_id for row in rows]):
                session.rowcount(sql.reopen_executions(len(chunk)), [target.value, message, *chunk])
        after = self.executions([row.execution_id for row in rows])
        for row in rows:
            if after[row.execution_id].status is target:
                self._audit_move(row, target, f"{message} in {row.error_step}: {row.error_message}")
        self.flush()
        return after

    def mark_created(
        self, results: Sequence[tuple[ExecutionRow, str, Any]]
    ) -> dict[str, ExecutionRow]:
        messages = [f"Step 1 complete: policy {policy_id} created" for _r, policy_id, _ in results]
        return self._move(
            sql.mark_created,
            [
                (row, [policy_id, to_json(response, MAX_DETAIL_CHARS), message])
                for (row, policy_id, response), message in zip(results, messages, strict=True)
            ],
            ExecutionStatus.POLICY_CREATED,
            messages,
        )

    def record_polls(self, polls: Sequence[tuple[ExecutionRow, int, Any, str]]) -> None:
        """Per execution: polls made since the last write, the last response, a message."""
        with self.warehouse.session() as session:
            for chunk in _chunks(list(polls)):
                params = _flat(
                    [
                        [row.execution_id, count, to_json(response, MAX_DETAIL_CHARS), message]
                        for row, count, response, message in chunk
                    ]
                )
                session.rowcount(sql.record_polls(len(chunk)), params)
            self.flush(session)

    def mark_ready(self, rows: Sequence[tuple[ExecutionRow, str]]) -> dict[str, ExecutionRow]:
        return self._move(
            sql.mark_ready,
            [(row, [message]) for row, message in rows],
            ExecutionStatus.POLICY_READY,
            [message for _row, message in rows],
        )

    def claim_circuit_breakers(
        self, rows: Sequence[tuple[ExecutionRow, str]], reason: str
    ) -> dict[str, ExecutionRow]:
        """The exactly-once gate. Afterwards, an execution with ``circuit_breaker_initiated``
        and this key is ours to call for (the caller holds its lease)."""
        message = "Step 3: circuit breaker initiated"
        after = self._move(
            sql.claim_circuit_breakers,
            [(row, [key, reason, message]) for row, key in rows],
            None,
        )
        for row, key in rows:
            now = after.get(row.execution_id)
            if now and now.circuit_breaker_initiated and not row.circuit_breaker_initiated:
                detail = {"circuit_breaker_initiated": True, "idempotency_key": key}
                self._audit_move(row, row.status, message, detail)
        self.flush()
        return after

    def mark_completed(
        self, results: Sequence[tuple[ExecutionRow, Any]]
    ) -> dict[str, ExecutionRow]:
        message = "Workflow completed: circuit breaker triggered"
        return self._move(
            sql.mark_completed,
            [(row, [to_json(response, MAX_DETAIL_CHARS), message]) for row, response in results],
            ExecutionStatus.COMPLETED,
            [message] * len(results),
        )

    def mark_errors(
        self, failures: Sequence[tuple[ExecutionRow, str, str, bool]]
    ) -> dict[str, ExecutionRow]:
        """Per execution: the error, the step, and whether a later run resumes it."""
        rows = []
        messages = []
        for row, error, step, resumable in failures:
            message = f"{step} failed" + (" (a later run resumes it)" if resumable else "")
            rows.append((row, [error[:MAX_DETAIL_CHARS], step, resumable, message]))
            messages.append(f"{message}: {error[:500]}")
        return self._move(sql.mark_errors, rows, ExecutionStatus.ERROR, messages)

    def set_responses(self, column: str, responses: Sequence[tuple[ExecutionRow, Any]]) -> None:
        factory = functools.partial(sql.set_responses, column)
        self._move(
            factory,
            [(row, [to_json(response, MAX_DETAIL_CHARS)]) for row, response in responses],
            None,
        )

    # --- operator overrides (one execution at a time) -------------------------------------------

    def force_ready(self, row: ExecutionRow, message: str) -> bool:
        check_transition(row.status, ExecutionStatus.POLICY_READY)
        with self.warehouse.session() as session:
            moved = session.rowcount(sql.FORCE_READY, [message, row.execution_id]) == 1
        if moved:
            self._audit_move(row, ExecutionStatus.POLICY_READY, message)
            self.flush()
        return moved

    def skip_circuit_breaker(self, row: ExecutionRow, message: str, force: bool) -> bool:
        check_transition(row.status, ExecutionStatus.COMPLETED)
        allowed = ["policy_ready", "policy_created", "error"] if force else ["policy_ready"] * 3
        with self.warehouse.session() as session:
            moved = (
                session.rowcount(sql.SKIP_CIRCUIT_BREAKER, [message, row.execution_id, *allowed])
                == 1
            )
        if moved:
            self._audit_move(row, ExecutionStatus.COMPLETED, message)
            self.flush()
        return moved

    def _audit_move(
        self, row: ExecutionRow, target: ExecutionStatus, message: str, detail: Any = None
    ) -> None:
        """Buffer the audit event of a move that happened (flushed with the next write)."""
        self.audit(
            AuditEvent(
                execution_id=row.execution_id,
                policy_name=row.policy_name,
                event_type="transition",
                message=message,
                from_status=row.status.value,
                to_status=target.value,
                detail=detail,
            )
        )


T = TypeVar("T")


def _chunks(items: Sequence[T], size: int = sql.MAX_BATCH) -> list[Sequence[T]]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def _flat(rows: Sequence[Sequence[Any]]) -> list[Any]:
    return [value for row in rows for value in row]
