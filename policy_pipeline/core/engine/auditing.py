"""The audit trail a run writes: one event per API attempt (with the figures a step's
metadata reports) and one per warning about an answer.

Serves all three workflow assets (``policy_created``, ``policy_ready``,
``circuit_breaker_activation``) and the progress sensor (`progress.py`), which audits its polls
of handed-off policies with the same `AttemptRecorder`.
"""

from __future__ import annotations

from collections.abc import Callable

from policy_pipeline.core.engine.guard import ApiGuard
from policy_pipeline.core.policy_api_types import ApiAttempt, PolicyApiError
from policy_pipeline.core.store.state_store import AuditEvent, ExecutionRow, StateStore


class LeaseFenced(PolicyApiError):
    """A call's retries stop: the run cannot be sure it still holds the policy's lease. The
    call is made again once a renewal confirms the lease (`driver.py`)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, transient=True)


class AttemptRecorder:
    """Audits every API attempt of one execution, keeps the figures for metadata, tells the
    guard, and ends a call's retries once the guard opens or past its lease's fence
    (``fenced`` says why, or None) by returning the error the client then raises
    (`AttemptCallback`)."""

    def __init__(
        self,
        store: StateStore,
        row: ExecutionRow,
        guard: ApiGuard | None,
        fenced: Callable[[], str | None] | None = None,
    ) -> None:
        self.store = store
        self.row = row
        self.guard = guard
        self.fenced = fenced
        self.calls = 0
        self.latency_ms = 0.0

    def __call__(self, attempt: ApiAttempt) -> PolicyApiError | None:
        self.calls += 1
        self.latency_ms += attempt.latency_ms
        self.store.audit(
            AuditEvent.about(
                self.row,
                "api_call",
                f"{attempt.method} {attempt.path} attempt {attempt.attempt}: "
                f"{attempt.http_status or attempt.error}",
                endpoint=attempt.endpoint,
                http_method=attempt.method,
                http_status=attempt.http_status,
                latency_ms=round(attempt.latency_ms, 3),
                attempt=attempt.attempt,
                outcome=attempt.outcome,
                detail={"body": attempt.body, "error": attempt.error},
            )
        )
        if self.guard is not None:
            self.guard.observe(attempt)
            guard_open = self.guard.stops_retry(attempt)
            if guard_open is not None:
                return guard_open
        if attempt.outcome == "retry" and self.fenced is not None:
            reason = self.fenced()
            if reason is not None:
                return LeaseFenced(reason)
        return None


def warning_event(execution_id: str | None, policy_name: str, message: str) -> AuditEvent:
    """The audit event of a warning about one policy (an answer the engine did not expect)."""
    return AuditEvent(
        execution_id=execution_id,
        policy_name=policy_name,
        event_type="warning",
        message=message,
    )
