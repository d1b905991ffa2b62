"""A persistent guard for the Policy API: the resilience circuit-breaker pattern (not to be
confused with the workflow's own ``/circuit`` step).

After ``failure_threshold`` consecutive transient failures the guard opens: runs fail fast,
making no calls. After ``cooldown_seconds`` one process may probe (half-open): one call; success
closes the guard, failure opens it again. The state lives in the warehouse, so it holds across
runs, processes and machines, and every change is audited.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum

from policy_pipeline.core.policy_api_types import ApiAttempt, PolicyApiError
from policy_pipeline.core.settings import GuardSettings
from policy_pipeline.core.store.state_store import AuditEvent, StateStore
from policy_pipeline.core.store.statements import guard as sql_guard

GUARD_NAME = "policy_api"


class GuardState(StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


class GuardOpen(PolicyApiError):
    """The guard is open: no call was made (a transient failure: a later run resumes)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, transient=True)


@dataclass(frozen=True)
class GuardStatus:
    state: GuardState
    consecutive_failures: int
    opened_at: datetime | None
    probe_owner: str | None
    last_error: str | None


def read_guard(store: StateStore) -> GuardStatus:
    """The shared state, read only: a guard whose row no writer has created yet never opened,
    so it reads as closed."""
    with store.warehouse.session() as session:
        rows = session.rows(sql_guard.READ_GUARD, [GUARD_NAME])
    if not rows:
        return GuardStatus(GuardState.CLOSED, 0, None, None, None)
    state, failures, opened_at, probe_owner, last_error = rows[0]
    return GuardStatus(GuardState(state), int(failures or 0), opened_at, probe_owner, last_error)


class ApiGuard:
    """One run's view of the guard. Thread-safe: the workflow's call threads share it."""

    def __init__(self, store: StateStore, owner: str, settings: GuardSettings) -> None:
        self.store = store
        self.owner = owner
        self.settings = settings
        self._lock = threading.Lock()
        self._settled = threading.Condition(self._lock)
        self._streak = 0
        self._probing = False  # this process holds the half-open probe
        self._probe_sent = False
        self._state = GuardState.CLOSED
        self._last_error = ""
        self.refresh()

    # --- called by the workflow -----------------------------------------------------------------

    def refresh(self) -> None:
        """Re-read the shared state (another process may have opened the guard) and, if the
        cool-down is over, try to become the one process that probes."""
        status = read_guard(self.store)
        with self._lock:
            if self._probing:
                return
            self._state = status.state
            self._last_error = status.last_error or ""
        if status.state is GuardState.CLOSED:
            return
        with self.store.warehouse.session() as session:
            claimed = (
                session.rowcount(
                    sql_guard.CLAIM_GUARD_PROBE,
                    [
                        self.owner,
                        GUARD_NAME,
                        -self.settings.cooldown_seconds,
                        -self.settings.probe_timeout_seconds,
                    ],
                )
                == 1
            )
        if claimed:
            with self._lock:
                self._probing, self._probe_sent, self._state = True, False, GuardState.HALF_OPEN
            self._audit(f"guard half-open: {self.owner} probes the Policy API with one call")

    def before_call(self) -> None:
        """Raise GuardOpen unless a call may be made now. While this process probes, the first
        caller makes the probe and the others wait for its outcome."""
        with self._lock:
            while True:
                if self._probing and not self._probe_sent:
                    self._probe_sent = True
                    return
                if self._probing:
                    self._settled.wait(timeout=1.0)
                    continue
                if self._state is GuardState.CLOSED:
                    return
                raise GuardOpen(
                    f"the Policy API guard is {self._state} after repeated transient failures "
                    f"({self._last_error or 'no detail'}); no call was made. It lets one probe "
                    f"through {self.settings.cooldown_seconds}s after opening"
                )

    def observe(self, attempt: ApiAttempt) -> None:
        """Every API attempt's outcome: transient failures count, any answer resets."""
        transient = attempt.http_status is None or attempt.http_status == 429
        transient = transient or (attempt.http_status or 0) >= 500
        with self._lock:
            if not transient:
                self._streak = 0
                if self._probing:
                    self._settle(success=True)
                return
            self._streak += 1
            self._last_error = (
                f"{attempt.method} {attempt.path}: {attempt.http_status or attempt.error}"
            )
            if self._probing:
                self._settle(success=False)
                return
            if (
                self._state is not GuardState.CLOSED
                or self._streak < self.settings.failure_threshold
            ):
                return
            self._state = GuardState.OPEN
            streak, error = self._streak, self._last_error
        with self.store.warehouse.session() as session:
            # Opening is the one move that may find no row (the guard never left closed): the
            # writer creates it. The others start from open or half-open, so the row exists.
            session.rowcount(sql_guard.ENSURE_GUARD, [GUARD_NAME])
            opened = session.rowcount(sql_guard.OPEN_GUARD, [streak, error[:2000], GUARD_NAME]) == 1
        if opened:
            self._audit(f"guard opened after {streak} consecutive transient failures ({error})")

    def blocks_calls(self) -> str | None:
        """Why no call may be made at all now (open and not probing), or None."""
        with self._lock:
            if self._state is GuardState.CLOSED or self._probing:
                return None
        try:
            self.before_call()
        except GuardOpen as exc:
            return str(exc)
        return None

    def stops_retry(self, attempt: ApiAttempt) -> GuardOpen | None:
        """Called after ``observe``: the error that ends a call's remaining retries once the
        guard is open, or None."""
        with self._lock:
            opened = self._state is not GuardState.CLOSED and not self._probing
            if attempt.outcome == "retry" and opened:
                return GuardOpen(f"the Policy API guard opened ({self._last_error})")
        return None

    # --- internals ------------------------------------------------------------------------------

    def _settle(self, success: bool) -> None:
        # Called with the lock held.
        self._probing = False
        self._state = GuardState.CLOSED if success else GuardState.OPEN
        self._settled.notify_all()
        statement = sql_guard.CLOSE_GUARD if success else sql_guard.REOPEN_GUARD
        params = (
            [GUARD_NAME, self.owner]
            if success
            else [self._last_error[:2000], GUARD_NAME, self.owner]
        )
        with self.store.warehouse.session() as session:
            session.rowcount(statement, params)
        self._audit(
            "guard closed: the probe succeeded"
            if success
            else f"guard re-opened: the probe failed ({self._last_error})"
        )

    def _audit(self, message: str) -> None:
        self.store.audit(
            AuditEvent(execution_id=None, policy_name="", event_type="guard", message=message)
        )
