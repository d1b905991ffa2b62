"""The three workflow steps for one policy, as plain Python over the state store and the API.

Each step holds the policy's lease while it works, moves the execution only through conditional
updates, and audits every API attempt. A step that cannot finish raises `StepFailed` after
recording why in the state table; a recoverable failure is left for the next run to resume.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, NoReturn, Protocol

from policy_pipeline import sql
from policy_pipeline.api_types import ApiAttempt, ApiResponse, AttemptCallback, PolicyApiError
from policy_pipeline.domain import (
    TRIGGER_REASON,
    ApiPolicyStatus,
    ExecutionStatus,
    PolicyDefinition,
    circuit_idempotency_key,
    classify_api_status,
    create_idempotency_key,
)
from policy_pipeline.state import AuditEvent, ExecutionRow, StateStore

STEP_CREATE = "policy_created"
STEP_READY = "policy_ready"
STEP_CIRCUIT = "circuit_breaker_activation"

# Where a recoverable failure in a step goes back to when a later run resumes it.
RESUME_FROM = {
    STEP_CREATE: ExecutionStatus.PENDING,
    STEP_READY: ExecutionStatus.POLICY_CREATED,
    STEP_CIRCUIT: ExecutionStatus.POLICY_READY,
}


class StepFailed(Exception):
    """A step could not complete for one policy; the state table says why."""

    def __init__(self, policy_name: str, step: str, message: str) -> None:
        super().__init__(f"{step} failed for policy '{policy_name}': {message}")
        self.policy_name = policy_name
        self.step = step
        self.reason = message


class Logger(Protocol):
    def info(self, msg: str) -> None: ...

    def warning(self, msg: str) -> None: ...


class PolicyApi(Protocol):
    """What the steps need from the Policy API client (`PolicyApiResource`)."""

    def create_policy(
        self, payload: dict[str, Any], idempotency_key: str, on_attempt: AttemptCallback
    ) -> ApiResponse: ...

    def get_policy_status(self, policy_id: str, on_attempt: AttemptCallback) -> ApiResponse: ...

    def trigger_circuit_breaker(
        self,
        policy_id: str,
        execution_id: str,
        trigger_reason: str,
        idempotency_key: str,
        on_attempt: AttemptCallback,
    ) -> ApiResponse: ...


@dataclass(frozen=True)
class PollingPolicy:
    """How step 2 polls. The seed's behaviour is ``max_polls=3`` with a fixed interval."""

    initial_interval_seconds: float = 1.0
    max_interval_seconds: float = 30.0
    backoff_multiplier: float = 2.0
    max_polls: int = 60
    deadline_seconds: float = 900.0

    def interval(self, poll_number: int) -> float:
        base = min(
            self.max_interval_seconds,
            self.initial_interval_seconds * self.backoff_multiplier ** (poll_number - 1),
        )
        # "Equal jitter": never zero, never more than the computed interval.
        return base / 2 + random.uniform(0, base / 2)


@dataclass(frozen=True)
class LeasePolicy:
    ttl_seconds: int = 300
    wait_seconds: float = 60.0


@dataclass
class StepOutcome:
    policy_name: str
    execution_id: str
    policy_id: str | None
    status: str
    poll_count: int
    resumed: bool = False
    api_calls: int = 0
    api_latency_ms: float = 0.0
    message: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


class _AttemptRecorder:
    """Audits every API attempt of one execution and keeps the figures for metadata."""

    def __init__(self, store: StateStore, row: ExecutionRow) -> None:
        self.store = store
        self.row = row
        self.calls = 0
        self.latency_ms = 0.0

    def __call__(self, attempt: ApiAttempt) -> None:
        self.calls += 1
        self.latency_ms += attempt.latency_ms
        self.store.audit(
            AuditEvent(
                execution_id=self.row.execution_id,
                policy_name=self.row.policy_name,
                event_type="api_call",
                message=f"{attempt.method} {attempt.path} attempt {attempt.attempt}: "
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


class PolicyWorkflow:
    """The seed's three steps, one policy at a time (callers run many concurrently)."""

    def __init__(
        self,
        store: StateStore,
        api: PolicyApi,
        owner: str,
        log: Logger,
        lease: LeasePolicy | None = None,
        sleep: Callable[[float], None] = time.sleep,
        owner_finished: Callable[[str], bool] = lambda owner: False,
    ) -> None:
        self.store = store
        self.api = api
        self.owner = owner
        self.log = log
        self.lease = lease or LeasePolicy()
        self.sleep = sleep
        self.owner_finished = owner_finished

    # --- step 1 ---------------------------------------------------------------------------------

    def create_policy(self, policy: PolicyDefinition) -> StepOutcome:
        """Create the policy, or resume the execution that is still active for it."""
        name = policy.policy_name
        with self._lease(name, STEP_CREATE):
            active = self.store.active_executions(name)
            if len(active) > 1:
                self.log.warning(
                    f"policy '{name}' has {len(active)} active executions; resuming the newest"
                )
            row = active[0] if active else None
            resumed = row is not None
            if row is not None and row.status is ExecutionStatus.ERROR:
                row = self._reopen(row, RESUME_FROM[row.error_step or STEP_CREATE])
            if row is not None and row.status is not ExecutionStatus.PENDING:
                self.log.info(
                    f"policy '{name}': resuming execution {row.execution_id} "
                    f"({row.status}, policy_id {row.policy_id}); no new policy is created"
                )
                return self._outcome(row, resumed=True, message="resumed active execution")
            if row is None:
                row = self.store.start_execution(policy)
            return self._post_create(row, resumed)

    def _post_create(self, row: ExecutionRow, resumed: bool) -> StepOutcome:
        name = row.policy_name
        create_key = row.create_idempotency_key or create_idempotency_key(row.execution_id)
        payload = {**self._stored_policy_data(row), "execution_id": row.execution_id}
        recorder = _AttemptRecorder(self.store, row)
        response = self._call(
            row,
            STEP_CREATE,
            lambda: self.api.create_policy(payload, create_key, recorder),
            recoverable=True,
        )
        if not response.ok:
            self._fail(row, STEP_CREATE, f"{response.describe()}: {_excerpt(response)}", False)
        policy_id = response.field("policy_id")
        if not isinstance(policy_id, str) or not policy_id.strip():
            self.store.set_api_response(row, response.recorded_body)
            # An unreadable body may hide a created policy: a later run re-sends the same
            # idempotency key and gets the original answer. JSON without the field is final.
            unreadable = response.data is None
            self._fail(row, STEP_CREATE, _missing_field(response, "policy_id"), unreadable)
        if not self.store.mark_created(row, policy_id, response.recorded_body):
            self.log.warning(f"policy '{name}': execution {row.execution_id} moved concurrently")
        # The seed's "verify database storage" before going on.
        stored = self.store.get(row.execution_id)
        if stored.policy_id != policy_id or stored.status is ExecutionStatus.PENDING:
            self._fail(
                stored,
                STEP_CREATE,
                f"state row for execution {row.execution_id} does not hold policy_id "
                f"{policy_id} after the write (found {stored.policy_id}, {stored.status})",
                False,
            )
        self.log.info(f"policy '{name}': created {policy_id} (execution {row.execution_id})")
        return self._outcome(
            stored, resumed=resumed, recorder=recorder, message=f"created {policy_id}"
        )

    # --- step 2 ---------------------------------------------------------------------------------

    def wait_until_ready(self, policy_name: str, polling: PollingPolicy) -> StepOutcome:
        with self._lease(policy_name, STEP_READY):
            row = self._current(policy_name, STEP_READY)
            if row.status in (ExecutionStatus.POLICY_READY, ExecutionStatus.COMPLETED):
                return self._outcome(row, resumed=True, message="already ready")
            if row.status is not ExecutionStatus.POLICY_CREATED:
                self._refuse(row, STEP_READY, "materialize policy_created first")
            return self._poll(row, polling)

    def _poll(self, row: ExecutionRow, polling: PollingPolicy) -> StepOutcome:
        policy_id = row.policy_id
        assert policy_id is not None
        name = row.policy_name
        recorder = _AttemptRecorder(self.store, row)
        started = time.monotonic()
        last_status: object = None
        for poll_number in range(1, polling.max_polls + 1):
            response = self._call(
                row,
                STEP_READY,
                lambda: self.api.get_policy_status(policy_id, recorder),
                recoverable=True,
            )
            if not response.ok:
                self.store.record_poll(row, response.recorded_body, response.describe())
                self._fail(row, STEP_READY, f"{response.describe()}: {_excerpt(response)}", False)
            last_status = response.field("status")
            verdict = classify_api_status(last_status)
            self.store.record_poll(
                row,
                response.recorded_body,
                f"Poll {poll_number}: API status {last_status!r}",
            )
            if verdict is ApiPolicyStatus.READY:
                return self._confirm_ready(row, last_status, recorder, poll_number)
            if verdict is ApiPolicyStatus.FAILED:
                self._fail(
                    row,
                    STEP_READY,
                    f"Policy API reported status {last_status!r} for policy {row.policy_id}",
                    False,
                )
            if verdict is ApiPolicyStatus.UNKNOWN:
                self._warn(row, _unknown_status(response, last_status))
            elapsed = time.monotonic() - started
            wait = polling.interval(poll_number)
            if poll_number == polling.max_polls or elapsed + wait > polling.deadline_seconds:
                break
            self._renew_lease(name)
            self.sleep(wait)
        elapsed = time.monotonic() - started
        self._fail(
            row,
            STEP_READY,
            f"policy {row.policy_id} not ready after {poll_number} polls in {elapsed:.1f}s "
            f"(last status {last_status!r}); a later run resumes polling the same policy",
            True,
        )

    def _confirm_ready(
        self, row: ExecutionRow, api_status: object, recorder: _AttemptRecorder, polls: int
    ) -> StepOutcome:
        # The seed's dual validation: the API says ready AND the state row agrees.
        stored = self.store.get(row.execution_id)
        if stored.status is not ExecutionStatus.POLICY_CREATED or stored.policy_id != row.policy_id:
            self._refuse(stored, STEP_READY, "state row changed while polling")
        message = f"Step 2 complete: API status {api_status!r} after {polls} polls"
        self.store.mark_ready(stored, message)
        ready = self.store.get(row.execution_id)
        if ready.status is not ExecutionStatus.POLICY_READY:
            self._refuse(ready, STEP_READY, "state row did not reach policy_ready")
        self.log.info(f"policy '{row.policy_name}': {row.policy_id} ready after {polls} polls")
        return self._outcome(ready, recorder=recorder, message=message)

    # --- step 3 ---------------------------------------------------------------------------------

    def activate_circuit_breaker(self, policy_name: str) -> StepOutcome:
        with self._lease(policy_name, STEP_CIRCUIT):
            row = self._current(policy_name, STEP_CIRCUIT)
            if row.status is ExecutionStatus.COMPLETED:
                return self._outcome(row, resumed=True, message="circuit breaker already done")
            if row.status is not ExecutionStatus.POLICY_READY:
                self._refuse(row, STEP_CIRCUIT, "the policy has not reached policy_ready")
            assert row.policy_id is not None
            key = circuit_idempotency_key(row.execution_id)
            if not self.store.claim_circuit_breaker(row, key, TRIGGER_REASON):
                row = self.store.get(row.execution_id)
                if row.circuit_breaker_completed:
                    return self._outcome(row, resumed=True, message="completed concurrently")
                # Initiated earlier by a run that crashed or failed: we hold the lease, so
                # nobody else is calling; the same idempotency key makes the retry safe.
                key = row.circuit_idempotency_key or key
                self.log.info(f"policy '{policy_name}': retrying the circuit breaker call")
            recorder = _AttemptRecorder(self.store, row)
            policy_id = row.policy_id
            assert policy_id is not None
            response = self._call(
                row,
                STEP_CIRCUIT,
                lambda: self.api.trigger_circuit_breaker(
                    policy_id, row.execution_id, TRIGGER_REASON, key, recorder
                ),
                recoverable=True,
            )
            if not response.ok:
                self.store.set_circuit_response(row, response.recorded_body)
                self._fail(row, STEP_CIRCUIT, f"{response.describe()}: {_excerpt(response)}", True)
            self.store.mark_completed(row, response.recorded_body)
            done = self.store.get(row.execution_id)
            if done.status is not ExecutionStatus.COMPLETED:
                self._refuse(done, STEP_CIRCUIT, "state row did not reach completed")
            self.log.info(f"policy '{policy_name}': circuit breaker triggered; completed")
            return self._outcome(done, recorder=recorder, message="circuit breaker triggered")

    # --- helpers --------------------------------------------------------------------------------

    def _current(self, policy_name: str, step: str) -> ExecutionRow:
        active = self.store.active_executions(policy_name)
        row = active[0] if active else self.store.latest_execution(policy_name)
        if row is None:
            raise StepFailed(policy_name, step, "no execution exists; materialize policy_created")
        if row.status is ExecutionStatus.ERROR and row.resumable and row.error_step == step:
            row = self._reopen(row, RESUME_FROM[step])
        return row

    def _reopen(self, row: ExecutionRow, target: ExecutionStatus) -> ExecutionRow:
        self.store.reopen(row, target)
        self.log.info(
            f"policy '{row.policy_name}': resuming execution {row.execution_id} from {target} "
            f"after: {row.error_message}"
        )
        return self.store.get(row.execution_id)

    def _stored_policy_data(self, row: ExecutionRow) -> dict[str, Any]:
        # Re-sending the stored body (not the catalog's current one) keeps the idempotency key
        # valid when the create is retried after a crash.
        text = self.store.policy_data(row.execution_id)
        data = json.loads(text) if isinstance(text, str) else text
        if not isinstance(data, dict):
            raise StepFailed(row.policy_name, STEP_CREATE, "stored policy_data is not an object")
        return data

    def _call(
        self, row: ExecutionRow, step: str, call: Callable[[], ApiResponse], recoverable: bool
    ) -> ApiResponse:
        try:
            return call()
        except PolicyApiError as exc:
            self._fail(row, step, str(exc), recoverable)
        finally:
            self.store.flush()

    def _fail(self, row: ExecutionRow, step: str, message: str, resumable: bool) -> NoReturn:
        self.store.mark_error(row, message, step, resumable)
        raise StepFailed(row.policy_name, step, message)

    def _refuse(self, row: ExecutionRow, step: str, why: str) -> NoReturn:
        raise StepFailed(
            row.policy_name,
            step,
            f"execution {row.execution_id} is '{row.status}'"
            + (f" ({row.error_message})" if row.error_message else "")
            + f": {why}",
        )

    def _warn(self, row: ExecutionRow, message: str) -> None:
        self.log.warning(f"policy '{row.policy_name}': {message}")
        self.store.audit(
            AuditEvent(
                execution_id=row.execution_id,
                policy_name=row.policy_name,
                event_type="warning",
                message=message,
            )
        )

    @contextmanager
    def _lease(self, policy_name: str, step: str) -> Iterator[None]:
        deadline = time.monotonic() + self.lease.wait_seconds
        delay = 0.2
        while not self._try_lease(policy_name):
            if time.monotonic() > deadline:
                holder = self.store.lease_holder(policy_name)
                who = f"run {holder[0]} until {holder[1]}" if holder else "another run"
                raise StepFailed(
                    policy_name, step, f"the policy is being processed by {who}; try again later"
                )
            self.sleep(delay * (0.5 + random.random()))
            delay = min(delay * 2, 5.0)
        try:
            yield
        finally:
            self.store.release_lease(policy_name, self.owner)

    def _try_lease(self, policy_name: str) -> bool:
        ttl = self.lease.ttl_seconds
        if self.store.acquire_lease(policy_name, self.owner, ttl):
            return True
        holder = self.store.lease_holder(policy_name)
        # A run that has already finished (failed, crashed and marked so) holds nothing.
        if holder is not None and self.owner_finished(holder[0]):
            self.log.warning(f"policy '{policy_name}': taking over the lease of {holder[0]}")
            return self.store.take_over_lease(policy_name, self.owner, holder[0], ttl)
        return False

    def _renew_lease(self, policy_name: str) -> None:
        self.store.acquire_lease(policy_name, self.owner, self.lease.ttl_seconds)

    def _outcome(
        self,
        row: ExecutionRow,
        resumed: bool = False,
        recorder: _AttemptRecorder | None = None,
        message: str = "",
    ) -> StepOutcome:
        return StepOutcome(
            policy_name=row.policy_name,
            execution_id=row.execution_id,
            policy_id=row.policy_id,
            status=row.status.value,
            poll_count=row.poll_count,
            resumed=resumed,
            api_calls=recorder.calls if recorder else 0,
            api_latency_ms=round(recorder.latency_ms, 3) if recorder else 0.0,
            message=message,
        )


def _excerpt(response: ApiResponse, limit: int = 300) -> str:
    text = response.text.strip()
    if not text:
        return "(empty body)"
    return text[:limit] + ("..." if len(text) > limit else "")


def _missing_field(response: ApiResponse, name: str) -> str:
    if response.data is None:
        what = "an empty body" if not response.text.strip() else "a body that is not JSON"
    elif not isinstance(response.data, dict):
        what = f"a JSON {type(response.data).__name__}, not an object"
    elif name not in response.data:
        what = "JSON without it"
    else:
        what = f"{name}={response.data[name]!r}, which is not a non-empty string"
    return (
        f"field '{name}' missing from the response of {response.method} {response.path} "
        f"(HTTP {response.http_status}, {what}); raw response kept in {sql.STATE_TABLE}"
    )


def _unknown_status(response: ApiResponse, status: object) -> str:
    if status is None:
        return (
            f"{response.method} {response.path} returned no 'status' field "
            f"({_excerpt(response, 120)}); still treated as pending"
        )
    return f"unknown status {status!r} from {response.method} {response.path}; still pending"
