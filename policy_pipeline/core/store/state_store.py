"""The execution state table, the audit trail and the per-policy leases, over a
`WarehouseConnection`.

Every method takes a batch: a step over a thousand policies makes a few round trips, not a few
thousand (each costs tens of milliseconds on Snowflake). Every state change is a conditional
UPDATE, re-read afterwards, so two processes racing on one execution cannot both move it
(Snowflake enforces no unique keys), and only moves that happened are audited.
"""

from __future__ import annotations

import dataclasses
import json
import threading
import uuid
from collections.abc import Mapping, Sequence
from contextlib import AbstractContextManager
from datetime import datetime
from typing import Any

from policy_pipeline.core.domain import (
    ExecutionStatus,
    PolicyDefinition,
    check_transition,
    create_idempotency_key,
)
from policy_pipeline.core.store.batches import bind_rows, bind_values
from policy_pipeline.core.store.connection import Session, WarehouseConnection
from policy_pipeline.core.store.dialect import Statement
from policy_pipeline.core.store.rows import MAX_DETAIL_CHARS, AuditEvent, ExecutionRow, to_json
from policy_pipeline.core.store.schema import STATE
from policy_pipeline.core.store.statements import executions as sql_executions
from policy_pipeline.core.store.statements import leases as sql_leases
from policy_pipeline.core.store.statements import progress as sql_progress

# The row types live in `rows` (beside the tables they are checked against); importers of the
# store get them here.
__all__ = ["MAX_DETAIL_CHARS", "AuditEvent", "ExecutionRow", "StateStore", "has_retired", "to_json"]


def has_retired(now: ExecutionRow | None, error: str) -> bool:
    """Whether `StateStore.retire` retired the execution (``now``) with this error."""
    return (
        now is not None
        and now.status is ExecutionStatus.ERROR
        and not now.resumable
        and now.error_message == error[:MAX_DETAIL_CHARS]
    )


class StateStore:
    """The workflow's reads and writes. Audit events are buffered and written in batches, in the
    same connection as the state change they accompany. Every method runs in one session (one
    connection); inside ``batch()`` several methods share one."""

    def __init__(self, warehouse: WarehouseConnection, run_id: str | None = None) -> None:
        # Nothing runs here: the warehouse creates the schema before its first statement.
        self.warehouse = warehouse
        self.run_id = run_id
        self._pending_events: list[AuditEvent] = []
        self._events_lock = threading.Lock()

    def batch(self) -> AbstractContextManager[Session]:
        """One connection for every call made inside (on this thread)."""
        return self.warehouse.session()

    def transaction(self) -> AbstractContextManager[Session]:
        """Every call made inside commits together or not at all."""
        return self.warehouse.transaction()

    # --- audit ----------------------------------------------------------------------------------

    def audit(self, event: AuditEvent) -> None:
        with self._events_lock:
            self._pending_events.append(event)

    def flush(self) -> None:
        """Write the buffered audit events: in the caller's session when there is one."""
        with self._events_lock:
            events, self._pending_events = self._pending_events, []
        if not events:
            return
        with self.warehouse.session() as session:
            for rows in bind_rows([event.row(self.run_id) for event in events]):
                session.rowcount(sql_executions.INSERT_EVENTS, [rows])

    # --- leases ---------------------------------------------------------------------------------

    def acquire_leases(self, names: Sequence[str], owner: str, ttl_seconds: int) -> set[str]:
        """Claim the free (or expired, or already ours) leases; returns the names now ours."""
        with self.warehouse.session() as session:
            for batch in bind_values("policy_name", names):
                session.rowcount(sql_leases.ENSURE_LOCK_ROWS, [batch])
                session.rowcount(sql_leases.ACQUIRE_LEASES, [owner, ttl_seconds, batch, owner])
            holders = self._holders(session, names)
        return {name for name, (holder, _until) in holders.items() if holder == owner}

    def lease_holders(self, names: Sequence[str]) -> dict[str, tuple[str, datetime]]:
        with self.warehouse.session() as session:
            return self._holders(session, names)

    def _holders(self, session: Session, names: Sequence[str]) -> dict[str, tuple[str, datetime]]:
        holders: dict[str, tuple[str, datetime]] = {}
        for batch in bind_values("policy_name", names):
            for name, holder, until in session.rows(sql_leases.LEASE_HOLDERS, [batch]):
                holders[str(name)] = (str(holder), until)
        return holders

    def take_over_leases(
        self, names: Sequence[str], owner: str, previous_owner: str, ttl_seconds: int
    ) -> None:
        with self.warehouse.session() as session:
            for batch in bind_values("policy_name", names):
                session.rowcount(
                    sql_leases.TAKE_OVER_LEASES, [owner, ttl_seconds, batch, previous_owner]
                )

    def renew_leases(self, names: Sequence[str], owner: str, ttl_seconds: int) -> set[str]:
        """Extend the leases still ours (no other run acquired them, even after a lapse);
        returns the names the warehouse confirmed."""
        with self.warehouse.session() as session:
            for batch in bind_values("policy_name", names):
                session.rowcount(sql_leases.TAKE_OVER_LEASES, [owner, ttl_seconds, batch, owner])
            holders = self._holders(session, names)
        return {name for name, (holder, _until) in holders.items() if holder == owner}

    def release_leases(self, names: Sequence[str], owner: str) -> None:
        with self.warehouse.session() as session:
            for batch in bind_values("policy_name", names):
                session.rowcount(sql_leases.RELEASE_LEASES, [batch, owner])

    # --- reads ----------------------------------------------------------------------------------

    def current_executions(self, names: Sequence[str]) -> dict[str, ExecutionRow]:
        """Each policy's active execution, or else its latest (absent: never executed)."""
        rows = self._executions(sql_executions.CURRENT_EXECUTIONS, "policy_name", names)
        return {row.policy_name: row for row in rows}

    def executions(self, ids: Sequence[str]) -> dict[str, ExecutionRow]:
        rows = self._executions(sql_executions.EXECUTIONS_BY_ID, "execution_id", ids)
        return {row.execution_id: row for row in rows}

    def _executions(
        self, statement: Statement, column: str, values: Sequence[str]
    ) -> list[ExecutionRow]:
        """The rows a statement reads for these values of ``column``, bound in batches."""
        with self.warehouse.session() as session:
            return [
                ExecutionRow.from_row(row)
                for batch in bind_values(column, values)
                for row in session.rows(statement, [batch])
            ]

    def get(self, execution_id: str) -> ExecutionRow:
        rows = self.executions([execution_id])
        if execution_id not in rows:
            raise LookupError(f"no execution {execution_id} in {STATE.name}")
        return rows[execution_id]

    def current_execution(self, policy_name: str) -> ExecutionRow | None:
        return self.current_executions([policy_name]).get(policy_name)

    def policy_data(self, ids: Sequence[str]) -> dict[str, Any]:
        """The stored create bodies: a retried create re-sends exactly what was sent."""
        data: dict[str, Any] = {}
        with self.warehouse.session() as session:
            for batch in bind_values("execution_id", ids):
                for execution_id, value in session.rows(sql_executions.POLICY_DATA_BY_ID, [batch]):
                    data[str(execution_id)] = json.loads(value) if isinstance(value, str) else value
        return data

    def completed_executions(self, names: Sequence[str]) -> list[ExecutionRow]:
        """Every completed execution of these policies, archived ones included."""
        found: list[ExecutionRow] = []
        with self.warehouse.session() as session:
            for batch in bind_values("policy_name", names):
                rows = session.rows(sql_executions.COMPLETED_EXECUTIONS, [batch, batch])
                found += [ExecutionRow.from_row(row) for row in rows]
        return found

    def policy_id_holders(self, policy_ids: Sequence[str]) -> dict[str, list[tuple[str, str]]]:
        """policy_id -> [(execution_id, policy_name)] of the executions (live or archived)
        that hold it."""
        holders: dict[str, list[tuple[str, str]]] = {}
        with self.warehouse.session() as session:
            for batch in bind_values("policy_id", policy_ids):
                for policy_id, execution_id, name in session.rows(
                    sql_executions.POLICY_ID_HOLDERS, [batch, batch]
                ):
                    holders.setdefault(str(policy_id), []).append((str(execution_id), str(name)))
        return holders

    def executed_content(self) -> set[tuple[str, str]]:
        """(policy_name, content hash) of every content ever executed, archived ones included."""
        with self.warehouse.session() as session:
            rows = session.rows(sql_executions.EXECUTED_CONTENT)
        return {(str(name), str(digest)) for name, digest in rows if digest is not None}

    # --- writes ---------------------------------------------------------------------------------

    def start_executions(
        self, policies: Sequence[PolicyDefinition], execution_ids: Sequence[str] | None = None
    ) -> list[ExecutionRow]:
        """Commit the intents (execution id, idempotency key, policy data) before any call.
        ``execution_ids`` are the new executions' ids when the caller needs them first (to
        name the execution that supersedes another); new ones otherwise."""
        message = "Execution started; creating policy"
        rows: list[dict[str, Any]] = []
        ids = list(execution_ids) if execution_ids is not None else []
        for index, policy in enumerate(policies):
            execution_id = ids[index] if index < len(ids) else str(uuid.uuid4())
            rows.append(
                {
                    "execution_id": execution_id,
                    "policy_name": policy.policy_name,
                    "policy_content_hash": policy.content_hash(),
                    "policy_data": to_json(policy.payload()),
                    "create_idempotency_key": create_idempotency_key(execution_id),
                    "message": message,
                    "dagster_run_id": self.run_id,
                }
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
            inserted = sum(
                session.rowcount(sql_executions.INSERT_EXECUTIONS, [batch])
                for batch in bind_rows(rows)
            )
            if inserted != len(rows):
                raise RuntimeError(
                    f"{STATE.name}: {inserted} of {len(rows)} new executions were stored"
                )
            self.flush()
        # The rows as just inserted: no read-back needed for what this process wrote itself.
        return [ExecutionRow.new(row) for row in rows]

    def _move(
        self,
        statement: Statement,
        rows: Sequence[tuple[ExecutionRow, Mapping[str, Any]]],
        target: ExecutionStatus | None,
        messages: Sequence[str] | None = None,
    ) -> dict[str, ExecutionRow]:
        """Apply a conditional per-row update to a batch, then read the rows back: the ones
        now in ``target`` are the moves that happened (and are audited). Returns every row as
        it is now. One connection: update, read-back and audit events."""
        for row, _values in rows:
            if target is not None and target is not row.status:
                check_transition(row.status, target)
        with self.warehouse.session() as session:
            values = [{"execution_id": row.execution_id, **columns} for row, columns in rows]
            for batch in bind_rows(values):
                session.rowcount(statement, [batch])
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
        ids = [row.execution_id for row in rows]
        with self.warehouse.session() as session:
            for batch in bind_values("execution_id", ids):
                session.rowcount(sql_executions.REOPEN_EXECUTIONS, [target.value, message, batch])
            after = self.executions(ids)
            for row in rows:
                if after[row.execution_id].status is target:
                    detail = f"{message} in {row.error_step}: {row.error_message}"
                    self._audit_move(row, target, detail)
            self.flush()
        return after

    def mark_created(
        self, results: Sequence[tuple[ExecutionRow, str, Any]]
    ) -> dict[str, ExecutionRow]:
        messages = [f"Step 1 complete: policy {policy_id} created" for _r, policy_id, _ in results]
        return self._move(
            sql_executions.MARK_CREATED,
            [
                (
                    row,
                    {
                        "policy_id": policy_id,
                        "response": to_json(response, MAX_DETAIL_CHARS),
                        "message": message,
                    },
                )
                for (row, policy_id, response), message in zip(results, messages, strict=True)
            ],
            ExecutionStatus.POLICY_CREATED,
            messages,
        )

    def record_polls(
        self, polls: Sequence[tuple[ExecutionRow, int, Any, str, float | None]]
    ) -> None:
        """Per execution: polls made since the last write, the last response, a message, and
        (for a handed-off policy) the seconds until its next poll. The polls' audit events go
        with the next flush (the caller's)."""
        rows = [
            {
                "execution_id": row.execution_id,
                "polls": count,
                "response": to_json(response, MAX_DETAIL_CHARS),
                "message": message,
                "next_in": None if next_in is None else max(0, round(next_in)),
            }
            for row, count, response, message, next_in in polls
        ]
        with self.warehouse.session() as session:
            for batch in bind_rows(rows):
                session.rowcount(sql_executions.RECORD_POLLS, [batch])

    def mark_ready(self, rows: Sequence[tuple[ExecutionRow, str]]) -> dict[str, ExecutionRow]:
        return self._move(
            sql_executions.MARK_READY,
            [(row, {"policy_id": row.policy_id, "message": message}) for row, message in rows],
            ExecutionStatus.POLICY_READY,
            [message for _row, message in rows],
        )

    def claim_circuit_breakers(
        self, rows: Sequence[tuple[ExecutionRow, str]], reason: str
    ) -> dict[str, ExecutionRow]:
        """The exactly-once gate. Afterwards, an execution with ``circuit_breaker_initiated``
        and this key is ours to call for (the caller holds its lease)."""
        message = "Step 3: circuit breaker initiated"
        with self.warehouse.session():  # the claim, its read-back and its audit together
            after = self._move(
                sql_executions.CLAIM_CIRCUIT_BREAKERS,
                [(row, {"key": key, "reason": reason, "message": message}) for row, key in rows],
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
            sql_executions.MARK_COMPLETED,
            [
                (row, {"response": to_json(response, MAX_DETAIL_CHARS), "message": message})
                for row, response in results
            ],
            ExecutionStatus.COMPLETED,
            [message] * len(results),
        )

    def mark_errors(
        self, failures: Sequence[tuple[ExecutionRow, str, str, bool]]
    ) -> dict[str, ExecutionRow]:
        """Per execution: the error, the step, and whether a later run resumes it."""
        rows: list[tuple[ExecutionRow, Mapping[str, Any]]] = []
        messages = []
        for row, error, step, resumable in failures:
            message = f"{step} failed" + (" (a later run resumes it)" if resumable else "")
            columns = {
                "error": error[:MAX_DETAIL_CHARS],
                "step": step,
                "resumable": resumable,
                "message": message,
            }
            rows.append((row, columns))
            messages.append(f"{message}: {error[:500]}")
        return self._move(sql_executions.MARK_ERRORS, rows, ExecutionStatus.ERROR, messages)

    def retire(
        self, retirements: Sequence[tuple[ExecutionRow, str, str, Mapping[str, Any]]]
    ) -> dict[str, ExecutionRow]:
        """Per execution: the step, why, and the audit detail. An execution whose catalog
        content changed (or whose file was deleted) before it was ready ends ``error`` for
        good, by a conditional update (`RETIRE_EXECUTIONS`); the caller holds the policy's
        lease. Returns every row as it is now; each retirement that happened is audited as a
        ``retired`` event."""
        rows = [
            {"execution_id": row.execution_id, "error": error[:MAX_DETAIL_CHARS], "step": step}
            for row, step, error, _detail in retirements
        ]
        with self.warehouse.session() as session:
            for batch in bind_rows(rows):
                session.rowcount(sql_executions.RETIRE_EXECUTIONS, [batch])
            after = self.executions([row.execution_id for row, *_rest in retirements])
            for row, _step, error, detail in retirements:
                if has_retired(after.get(row.execution_id), error):
                    self.audit(
                        AuditEvent.about(
                            row,
                            "retired",
                            error,
                            from_status=row.status.value,
                            to_status=ExecutionStatus.ERROR.value,
                            detail=dict(detail),
                        )
                    )
            self.flush()
        return after

    def set_responses(self, column: str, responses: Sequence[tuple[ExecutionRow, Any]]) -> None:
        self._move(
            sql_executions.set_responses(column),
            [
                (row, {"response": to_json(response, MAX_DETAIL_CHARS)})
                for row, response in responses
            ],
            None,
        )

    # --- waiting outside runs, automatic resumption (policy_progress_sensor) --------------------

    def hand_off(self, rows: Sequence[tuple[ExecutionRow, float, str]]) -> dict[str, ExecutionRow]:
        """Per execution: seconds until its next poll, a message. Afterwards a row with
        ``handed_off`` is the progress sensor's to poll."""
        after = self._move(
            sql_executions.HAND_OFF,
            [(row, {"next_in": max(0, round(delay)), "message": msg}) for row, delay, msg in rows],
            None,
        )
        for row, delay, message in rows:
            now = after.get(row.execution_id)
            if now is not None and now.handed_off and now.status is ExecutionStatus.POLICY_CREATED:
                self.audit(
                    AuditEvent.about(
                        row,
                        "handoff",
                        message,
                        detail={"next_poll_in_seconds": round(delay)},
                    )
                )
        self.flush()
        return after

    def due_waits(self, limit: int, lead_seconds: float = 0.0) -> list[tuple[ExecutionRow, int]]:
        """Handed-off executions whose next poll is due (or due within ``lead_seconds``), with
        the seconds each has waited since it was created."""
        with self.warehouse.session() as session:
            rows = session.rows(sql_progress.DUE_WAITS, [round(lead_seconds), limit])
        return [(ExecutionRow.from_row(row[:-1]), int(row[-1] or 0)) for row in rows]

    def wait_summary(self) -> tuple[int, int | None]:
        """How many executions wait outside runs, and in how many seconds the next is due."""
        with self.warehouse.session() as session:
            [(count, next_due)] = session.rows(sql_progress.WAIT_SUMMARY)
        return int(count or 0), None if next_due is None else int(next_due)

    def resume_candidates(self, limit: int) -> list[tuple[ExecutionRow, int]]:
        """Executions nothing is moving, with seconds since they last moved or were resumed."""
        with self.warehouse.session() as session:
            rows = session.rows(sql_progress.RESUME_CANDIDATES, [limit])
        return [(ExecutionRow.from_row(row[:-1]), int(row[-1] or 0)) for row in rows]

    def _claim(
        self, statement: Statement, rows: Sequence[Mapping[str, Any]], token: str
    ) -> set[str]:
        if not rows:
            return set()
        with self.warehouse.session() as session:
            for batch in bind_rows([{**row, "token": token} for row in rows]):
                session.rowcount(statement, [batch])
            claimed: set[str] = set()
            ids = [str(row["execution_id"]) for row in rows]
            for batch in bind_values("execution_id", ids):
                claimed.update(
                    str(r[0]) for r in session.rows(sql_progress.CLAIMED_BY, [token, batch])
                )
        return claimed

    def claim_resumes(self, rows: Sequence[ExecutionRow], token: str, why: str) -> set[str]:
        """One tick wins each resumption (execution, count); returns the ids this one won."""
        claimed = self._claim(
            sql_progress.CLAIM_RESUMES,
            [{"execution_id": r.execution_id, "count": r.auto_resume_count} for r in rows],
            token,
        )
        for row in rows:
            if row.execution_id in claimed:
                self.audit(
                    AuditEvent.about(
                        row,
                        "resume",
                        f"automatic resumption {row.auto_resume_count + 1} ({why}): "
                        f"{row.status}" + (f", {row.error_message}" if row.error_message else ""),
                    )
                )
        self.flush()
        return claimed

    def claim_circuit_requests(self, rows: Sequence[ExecutionRow], token: str) -> set[str]:
        """One tick wins the circuit-breaker run of an execution that turned ready."""
        return self._claim(
            sql_progress.CLAIM_CIRCUIT_REQUESTS,
            [{"execution_id": r.execution_id} for r in rows],
            token,
        )

    def give_up(self, failures: Sequence[tuple[ExecutionRow, str, str]], token: str) -> set[str]:
        """Per execution: the step and the error. It ends ``error`` for good; returns the ids
        this call moved (audited)."""
        claimed = self._claim(
            sql_progress.GIVE_UP,
            [
                {
                    "execution_id": row.execution_id,
                    "count": row.auto_resume_count,
                    "step": step,
                    "error": error[:MAX_DETAIL_CHARS],
                }
                for row, step, error in failures
            ],
            token,
        )
        for row, _step, error in failures:
            if row.execution_id in claimed:
                self._audit_move(row, ExecutionStatus.ERROR, error[:MAX_DETAIL_CHARS])
        self.flush()
        return claimed

    # --- operator overrides (one execution at a time) -------------------------------------------

    def force_ready(self, row: ExecutionRow, message: str) -> bool:
        check_transition(row.status, ExecutionStatus.POLICY_READY)
        with self.warehouse.session() as session:
            moved = session.rowcount(sql_executions.FORCE_READY, [message, row.execution_id]) == 1
            if moved:
                self._audit_move(row, ExecutionStatus.POLICY_READY, message)
                self.flush()
        return moved

    def undo_force_ready(self, before: ExecutionRow, message: str) -> bool:
        """Put a forced ``policy_ready`` back as ``before`` was, if its circuit breaker never
        started."""
        params = [
            before.status.value,
            before.error_message,
            before.error_step,
            before.resumable,
            message,
            before.execution_id,
        ]
        with self.warehouse.session() as session:
            moved = session.rowcount(sql_executions.UNDO_FORCE_READY, params) == 1
            if moved:
                forced = dataclasses.replace(before, status=ExecutionStatus.POLICY_READY)
                self._audit_move(forced, before.status, message)
                self.flush()
        return moved

    def skip_circuit_breaker(self, row: ExecutionRow, message: str, force: bool) -> bool:
        check_transition(row.status, ExecutionStatus.COMPLETED)
        statement = (
            sql_executions.FORCE_SKIP_CIRCUIT_BREAKER
            if force
            else sql_executions.SKIP_CIRCUIT_BREAKER
        )
        with self.warehouse.session() as session:
            moved = session.rowcount(statement, [message, row.execution_id]) == 1
            if moved:
                self._audit_move(row, ExecutionStatus.COMPLETED, message)
                self.flush()
        return moved

    def _audit_move(
        self, row: ExecutionRow, target: ExecutionStatus, message: str, detail: Any = None
    ) -> None:
        """Buffer the audit event of a move that happened (flushed with the next write)."""
        self.audit(
            AuditEvent.about(
                row,
                "transition",
                message,
                from_status=row.status.value,
                to_status=target.value,
                detail=detail,
            )
        )
