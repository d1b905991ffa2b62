"""The three workflow steps, each over a batch of policies, as plain Python over the state
store and the Policy API.

A step claims its policies' leases, reads their executions in one query, makes its API calls
concurrently (at most ``concurrency`` in flight) and writes what it learnt in batches: in
``FLUSH_PARTS`` parts per step (so writing overlaps the calls still in flight, and the
number of statements does not depend on the number of policies), at most ``flush_rows``
answers and ``flush_seconds`` apart. The warehouse sees a few statements per flush, not a few
per policy. Every
move of an execution is a conditional update; a recoverable failure is recorded so that the
next run resumes the same execution (same ``policy_id``, same idempotency keys).
"""

from __future__ import annotations

import heapq
import itertools
import math
import queue
import random
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Protocol

from policy_pipeline import sql
from policy_pipeline.api_types import ApiAttempt, ApiResponse, AttemptCallback, PolicyApiError
from policy_pipeline.domain import (
    TRIGGER_REASON,
    ApiPolicyStatus,
    ExecutionStatus,
    PolicyDefinition,
    circuit_idempotency_key,
    classify_api_status,
)
from policy_pipeline.failpoints import failpoint
from policy_pipeline.guard import ApiGuard, GuardOpen
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
ACTIVE_STATUSES = (
    ExecutionStatus.PENDING,
    ExecutionStatus.POLICY_CREATED,
    ExecutionStatus.POLICY_READY,
)
# A step's answers are written in about this many parts: all but the last while calls are
# still in flight.
FLUSH_PARTS = 4
# Per-policy log lines only for small batches; a thousand-policy run logs summaries.
DETAILED_LOG_LIMIT = 25


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
            self.initial_interval_seconds * self.backoff_multiplier ** min(poll_number - 1, 64),
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


@dataclass
class StepReport:
    """What a step did for each policy of its batch."""

    outcomes: dict[str, StepOutcome] = field(default_factory=dict)
    failures: dict[str, str] = field(default_factory=dict)

    def fail(self, name: str, reason: str) -> None:
        self.failures[name] = reason
        self.outcomes.pop(name, None)


class _AttemptRecorder:
    """Audits every API attempt of one execution, keeps the figures for metadata, and tells
    the guard."""

    def __init__(self, store: StateStore, row: ExecutionRow, guard: ApiGuard | None) -> None:
        self.store = store
        self.row = row
        self.guard = guard
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
        if self.guard is not None:
            self.guard.observe(attempt)
            self.guard.stop_retrying(attempt)


class PolicyWorkflow:
    """The seed's three steps, for a batch of policies at a time."""

    def __init__(
        self,
        store: StateStore,
        api: PolicyApi,
        owner: str,
        log: Logger,
        lease: LeasePolicy | None = None,
        concurrency: int = 16,
        flush_seconds: float = 10.0,
        flush_rows: int = 2_000,
        sleep: Callable[[float], None] = time.sleep,
        owner_finished: Callable[[str], bool] = lambda owner: False,
        guard: ApiGuard | None = None,
    ) -> None:
        self.store = store
        self.api = api
        self.owner = owner
        self.log = log
        self.lease = lease or LeasePolicy()
        self.concurrency = max(1, concurrency)
        # What a crash can lose: answers not yet written, which a re-run gets again by
        # re-sending the same idempotency keys (or polling again).
        self.flush_seconds = flush_seconds
        self.flush_rows = max(1, flush_rows)
        self.sleep = sleep
        self.owner_finished = owner_finished
        self.guard = guard
        self._recorders: dict[str, _AttemptRecorder] = {}
        self._verbose = True

    # --- step 1 ---------------------------------------------------------------------------------

    def create_policies(
        self, policies: Sequence[PolicyDefinition], force_new: bool = False
    ) -> StepReport:
        """Create each policy, or resume the execution still active for it.

        A policy whose current content already completed is not created again (the same
        content is one policy), unless ``force_new`` asks for a new execution."""
        by_name = {policy.policy_name: policy for policy in policies}
        report = StepReport()
        with self._leased(list(by_name), STEP_CREATE, report) as held:
            with self.store.batch():  # one connection for the reads and the intents
                if self._guard_blocks(held, report):
                    return report
                current = self._resume_errors(self.store.current_executions(held), None)
                to_post: list[ExecutionRow] = []
                for name in held:
                    row = current.get(name)
                    if row is None:
                        continue
                    if (
                        row.status is ExecutionStatus.COMPLETED
                        and not force_new
                        and row.policy_content_hash == by_name[name].content_hash()
                    ):
                        self._detail(f"policy '{name}': this content completed as {row.policy_id}")
                        report.outcomes[name] = self._outcome(
                            row, resumed=True, message="already completed for this content"
                        )
                    elif row.status not in ACTIVE_STATUSES:
                        continue
                    elif row.status is ExecutionStatus.PENDING:
                        to_post.append(row)  # intent recorded, create never confirmed: re-send
                    else:
                        self._detail(f"policy '{name}': resuming {row.execution_id} ({row.status})")
                        report.outcomes[name] = self._outcome(row, resumed=True, message="resumed")
                resumed_ids = {row.execution_id for row in to_post}
                posting = {row.policy_name for row in to_post}
                fresh = [
                    by_name[name]
                    for name in held
                    if name not in report.outcomes and name not in posting
                ]
                # A resumed intent re-sends exactly the body it stored; a new one what it stores.
                bodies = self.store.policy_data([row.execution_id for row in to_post])
                started = self.store.start_executions(fresh)
                for row, policy in zip(started, fresh, strict=True):
                    bodies[row.execution_id] = policy.payload()
                to_post.extend(started)
            failpoint("after_intents")
            self._post_creates(to_post, bodies, resumed_ids, report)
        return report

    def _post_creates(
        self,
        rows: list[ExecutionRow],
        bodies: dict[str, Any],
        resumed_ids: set[str],
        report: StepReport,
    ) -> None:
        created: list[tuple[ExecutionRow, str, Any]] = []
        failed: list[tuple[ExecutionRow, str, str, bool]] = []
        kept: list[tuple[ExecutionRow, Any]] = []

        def post(row: ExecutionRow) -> ApiResponse:
            body = bodies.get(row.execution_id)
            if not isinstance(body, dict):
                raise PolicyApiError("stored policy_data is not a JSON object", transient=False)
            key = row.create_idempotency_key or ""
            response = self.api.create_policy(
                {**body, "execution_id": row.execution_id}, key, self._recorder(row)
            )
            failpoint("after_create_call")
            return response

        def on_result(row: ExecutionRow, response: ApiResponse | PolicyApiError) -> None:
            if isinstance(response, PolicyApiError):
                failed.append((row, str(response), STEP_CREATE, response.transient))
                return
            if not response.ok:
                problem = f"{response.describe()}: {_excerpt(response)}"
                failed.append((row, problem, STEP_CREATE, False))
                return
            policy_id = response.field("policy_id")
            if not isinstance(policy_id, str) or not policy_id.strip():
                kept.append((row, response.recorded_body))
                # An unreadable body may hide a created policy: a later run re-sends the same
                # idempotency key and gets the original answer. JSON without the field is final.
                unreadable = response.data is None
                failed.append((row, _missing_field(response, "policy_id"), STEP_CREATE, unreadable))
                return
            created.append((row, policy_id, response.recorded_body))

        def flush() -> None:
            batch, created[:] = list(created), []
            if batch:
                after = self.store.mark_created(batch)
                failpoint("after_created")
                for row, policy_id, _body in batch:
                    # The seed's "verify database storage" before going on.
                    stored = after.get(row.execution_id)
                    if stored is None or stored.policy_id != policy_id:
                        report.fail(
                            row.policy_name,
                            f"state row for execution {row.execution_id} does not hold "
                            f"policy_id {policy_id} after the write",
                        )
                        continue
                    self._detail(f"policy '{row.policy_name}': created {policy_id}")
                    report.outcomes[row.policy_name] = self._outcome(
                        stored,
                        resumed=row.execution_id in resumed_ids,
                        message=f"created {policy_id}",
                    )
            self._flush_failures(failed, kept, "api_response", report)

        self._fan_out(rows, post, on_result, flush)

    # --- step 2 ---------------------------------------------------------------------------------

    def wait_until_ready(self, names: Sequence[str], polling: PollingPolicy) -> StepReport:
        """Poll every created policy on one shared schedule until each is ready or done."""
        report = StepReport()
        with self._leased(names, STEP_READY, report) as held:
            with self.store.batch():
                if self._guard_blocks(held, report):
                    return report
                current = self._resume_errors(self.store.current_executions(held), STEP_READY)
            to_poll: list[ExecutionRow] = []
            for name in held:
                row = current.get(name)
                if row is None:
                    report.fail(name, "no execution exists; materialize policy_created first")
                elif row.status in (ExecutionStatus.POLICY_READY, ExecutionStatus.COMPLETED):
                    report.outcomes[name] = self._outcome(row, resumed=True, message="ready")
                elif row.status is not ExecutionStatus.POLICY_CREATED:
                    report.fail(name, _refusal(row, "materialize policy_created first"))
                else:
                    to_poll.append(row)
            if to_poll:
                _Poller(self, to_poll, polling, report, held).run()
        return report

    # --- step 3 ---------------------------------------------------------------------------------

    def activate_circuit_breakers(self, names: Sequence[str]) -> StepReport:
        """Trigger the circuit breaker, exactly once, for every ready policy."""
        report = StepReport()
        with self._leased(names, STEP_CIRCUIT, report) as held:
            with self.store.batch():  # one connection for the reads and the claim
                if self._guard_blocks(held, report):
                    return report
                current = self._resume_errors(self.store.current_executions(held), STEP_CIRCUIT)
                ready: list[ExecutionRow] = []
                for name in held:
                    row = current.get(name)
                    if row is None:
                        report.fail(name, "no execution exists; materialize policy_created first")
                    elif row.status is ExecutionStatus.COMPLETED:
                        report.outcomes[name] = self._outcome(row, resumed=True, message="done")
                    elif row.status is not ExecutionStatus.POLICY_READY:
                        report.fail(name, _refusal(row, "the policy has not reached policy_ready"))
                    else:
                        ready.append(row)
                after = self.store.claim_circuit_breakers(
                    [(row, circuit_idempotency_key(row.execution_id)) for row in ready],
                    TRIGGER_REASON,
                )
            failpoint("after_claim")
            to_call: list[ExecutionRow] = []
            for row in ready:
                now = after[row.execution_id]
                if now.circuit_breaker_completed:
                    report.outcomes[row.policy_name] = self._outcome(now, message="done")
                elif now.circuit_breaker_initiated and now.status is ExecutionStatus.POLICY_READY:
                    # Initiated now, or by a run that crashed: we hold the lease, so nobody else
                    # is calling, and the stored idempotency key makes a repeat safe.
                    to_call.append(now)
                else:
                    report.fail(row.policy_name, _refusal(now, "it changed while claiming"))
            self._post_circuits(to_call, report)
        return report

    def activate_circuit_breaker(self, policy_name: str) -> StepOutcome:
        """One policy (the operator CLI); raises StepFailed."""
        report = self.activate_circuit_breakers([policy_name])
        if policy_name in report.failures:
            raise StepFailed(policy_name, STEP_CIRCUIT, report.failures[policy_name])
        return report.outcomes[policy_name]

    def _post_circuits(self, rows: list[ExecutionRow], report: StepReport) -> None:
        completed: list[tuple[ExecutionRow, Any]] = []
        failed: list[tuple[ExecutionRow, str, str, bool]] = []
        kept: list[tuple[ExecutionRow, Any]] = []

        def post(row: ExecutionRow) -> ApiResponse:
            assert row.policy_id is not None
            key = row.circuit_idempotency_key or circuit_idempotency_key(row.execution_id)
            response = self.api.trigger_circuit_breaker(
                row.policy_id, row.execution_id, TRIGGER_REASON, key, self._recorder(row)
            )
            failpoint("after_circuit_call")
            return response

        def on_result(row: ExecutionRow, response: ApiResponse | PolicyApiError) -> None:
            # Steps 1 and 2 stay recorded; the next run retries the same call with its key.
            if isinstance(response, PolicyApiError):
                failed.append((row, str(response), STEP_CIRCUIT, True))
            elif not response.ok:
                kept.append((row, response.recorded_body))
                failed.append(
                    (row, f"{response.describe()}: {_excerpt(response)}", STEP_CIRCUIT, True)
                )
            elif not isinstance(response.data, dict):
                # A 2xx whose body cannot be read (an HTML page from a proxy, an empty body) is
                # no confirmation that the breaker fired: record it and let the next run repeat
                # the call with the same idempotency key.
                kept.append((row, response.recorded_body))
                problem = f"{response.describe()} without a readable confirmation"
                failed.append((row, f"{problem}: {_excerpt(response)}", STEP_CIRCUIT, True))
            else:
                completed.append((row, response.recorded_body))

        def flush() -> None:
            batch, completed[:] = list(completed), []
            if batch:
                after = self.store.mark_completed(batch)
                failpoint("after_completed")
                for row, _body in batch:
                    done = after.get(row.execution_id)
                    if done is None or done.status is not ExecutionStatus.COMPLETED:
                        report.fail(row.policy_name, "state row did not reach completed")
                        continue
                    self._detail(f"policy '{row.policy_name}': circuit breaker triggered")
                    report.outcomes[row.policy_name] = self._outcome(
                        done, message="circuit breaker triggered"
                    )
            self._flush_failures(failed, kept, "circuit_breaker_response", report)

        self._fan_out(rows, post, on_result, flush)

    # --- shared machinery -----------------------------------------------------------------------

    def _fan_out(
        self,
        items: Sequence[ExecutionRow],
        call: Callable[[ExecutionRow], ApiResponse],
        on_result: Callable[[ExecutionRow, ApiResponse | PolicyApiError], None],
        flush: Callable[[], None],
    ) -> None:
        """Make one call per item, ``concurrency`` at a time, flushing results periodically."""
        if not items:
            return
        # Finished calls arrive on a queue: `wait()` over thousands of futures would cost
        # O(pending) per answer.
        finished: queue.SimpleQueue[Future[ApiResponse]] = queue.SimpleQueue()
        with ThreadPoolExecutor(max_workers=min(self.concurrency, len(items))) as pool:
            pending: dict[Future[ApiResponse], ExecutionRow] = {}
            for item in items:
                future = pool.submit(self._guarded, call, item)
                pending[future] = item
                future.add_done_callback(finished.put)
            next_flush = time.monotonic() + self.flush_seconds
            per_flush = self._answers_per_flush(len(items))
            answered = 0
            while pending:
                done = _drain(finished, timeout=max(0.0, next_flush - time.monotonic()))
                for future in done:
                    on_result(pending.pop(future), _result(future))
                answered += len(done)
                if pending and (answered >= per_flush or time.monotonic() >= next_flush):
                    answered = 0
                    with self.store.batch():  # one connection per flush
                        flush()  # its state changes write the pending audit events too
                        self._refresh_guard()
                    next_flush = time.monotonic() + self.flush_seconds
        with self.store.batch():
            flush()
            self.store.flush()

    def _answers_per_flush(self, policies: int) -> int:
        return max(1, min(self.flush_rows, math.ceil(policies / FLUSH_PARTS)))

    def _guarded(
        self, call: Callable[[ExecutionRow], ApiResponse], row: ExecutionRow
    ) -> ApiResponse:
        if self.guard is not None:
            self.guard.before_call()  # raises GuardOpen (a PolicyApiError): no call made
        return call(row)

    def _refresh_guard(self) -> None:
        if self.guard is not None:
            self.guard.refresh()

    def _guard_blocks(self, names: Sequence[str], report: StepReport) -> bool:
        """Fail the whole batch at once, before any write or call, while the guard is open."""
        reason = self.guard.blocks_calls() if self.guard is not None else None
        if reason is None:
            return False
        for name in names:
            report.fail(name, reason)
        self.log.warning(reason)
        return True

    def _flush_failures(
        self,
        failed: list[tuple[ExecutionRow, str, str, bool]],
        kept: list[tuple[ExecutionRow, Any]],
        column: str,
        report: StepReport,
    ) -> None:
        if kept:
            batch, kept[:] = list(kept), []
            self.store.set_responses(column, batch)
        if failed:
            batch_failed, failed[:] = list(failed), []
            self.store.mark_errors(batch_failed)
            for row, error, _step, _resumable in batch_failed:
                report.fail(row.policy_name, error)

    def _resume_errors(
        self, current: dict[str, ExecutionRow], step: str | None
    ) -> dict[str, ExecutionRow]:
        """Reopen recoverable errors (of ``step``, or of any step when None) so this run goes
        on with the same execution."""
        groups: dict[ExecutionStatus, list[ExecutionRow]] = {}
        for row in current.values():
            if row.status is ExecutionStatus.ERROR and row.resumable:
                failed_step = row.error_step or STEP_CREATE
                if step is None or failed_step == step:
                    groups.setdefault(RESUME_FROM.get(failed_step, ExecutionStatus.PENDING), [])
                    groups[RESUME_FROM.get(failed_step, ExecutionStatus.PENDING)].append(row)
        for target, rows in groups.items():
            after = self.store.reopen(rows, target)
            for row in rows:
                current[row.policy_name] = after[row.execution_id]
                self._detail(f"policy '{row.policy_name}': resuming after {row.error_message}")
        return current

    @contextmanager
    def _leased(self, names: Sequence[str], step: str, report: StepReport) -> Iterator[list[str]]:
        """Claim the policies' leases (waiting a while for other runs); yields the names held
        and reports the others as failed."""
        names = list(dict.fromkeys(names))
        self._verbose = len(names) <= DETAILED_LOG_LIMIT
        ttl = self.lease.ttl_seconds
        held = self.store.acquire_leases(names, self.owner, ttl)
        deadline = time.monotonic() + self.lease.wait_seconds
        delay = 0.2
        while len(held) < len(names):
            waiting = [name for name in names if name not in held]
            holders = self.store.lease_holders(waiting)
            for previous in {owner for owner, _until in holders.values()}:
                # A run that has already finished (failed, or crashed and marked so) holds
                # nothing: take its policies over at once.
                if previous != self.owner and self.owner_finished(previous):
                    taken = [n for n, (owner, _u) in holders.items() if owner == previous]
                    self.log.warning(f"taking over {len(taken)} leases of {previous}")
                    self.store.take_over_leases(taken, self.owner, previous, ttl)
            held |= self.store.acquire_leases(waiting, self.owner, ttl)
            if len(held) == len(names) or time.monotonic() > deadline:
                break
            self.sleep(delay * (0.5 + random.random()))
            delay = min(delay * 2, 5.0)
        for name in names:
            if name not in held:
                holder = self.store.lease_holders([name]).get(name)
                who = f"{holder[0]} (until {holder[1]})" if holder else "another run"
                report.fail(name, f"the policy is being processed by {who}; try again later")
        ordered = [name for name in names if name in held]
        try:
            yield ordered
        finally:
            with self.store.batch():
                self.store.flush()
                self.store.release_leases(ordered, self.owner)

    def _status_call(self, row: ExecutionRow) -> ApiResponse:
        assert row.policy_id is not None
        response = self.api.get_policy_status(row.policy_id, self._recorder(row))
        failpoint("after_poll_call")
        return response

    def _recorder(self, row: ExecutionRow) -> _AttemptRecorder:
        recorder = self._recorders.get(row.execution_id)
        if recorder is None:
            recorder = _AttemptRecorder(self.store, row, self.guard)
            self._recorders[row.execution_id] = recorder
        return recorder

    def _detail(self, message: str) -> None:
        if self._verbose:
            self.log.info(message)

    def _outcome(self, row: ExecutionRow, resumed: bool = False, message: str = "") -> StepOutcome:
        recorder = self._recorders.get(row.execution_id)
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


class _Poller:
    """Step 2's single schedule: a heap of policies by next due time, at most ``concurrency``
    status calls in flight, and the run asleep until the next policy is due."""

    def __init__(
        self,
        workflow: PolicyWorkflow,
        rows: list[ExecutionRow],
        polling: PollingPolicy,
        report: StepReport,
        held: list[str],
    ) -> None:
        self.wf = workflow
        self.polling = polling
        self.report = report
        self.held = held
        self.rows = {row.execution_id: row for row in rows}
        self.polls: dict[str, int] = dict.fromkeys(self.rows, 0)
        self.unwritten: dict[str, list[Any]] = {}  # id -> [polls since flush, body, message]
        self.ready: list[tuple[ExecutionRow, str]] = []
        self.failed: list[tuple[ExecutionRow, str, str, bool]] = []
        self.last_status: dict[str, object] = {}
        self.started = time.monotonic()
        self.counter = itertools.count()
        self.due: list[tuple[float, int, str]] = [
            (self.started, next(self.counter), execution_id) for execution_id in self.rows
        ]
        # Shared by the workers and the writing thread; guards everything above.
        self.changed = threading.Condition()
        self.in_flight = 0
        self.answered = 0  # since the last flush
        self.workers_left = min(workflow.concurrency, len(rows))
        self.finished = False

    def run(self) -> None:
        """``concurrency`` workers take the next due policy from the shared schedule; this
        thread only writes, so a slow warehouse never holds up a poll."""
        wf = self.wf
        workers = min(wf.concurrency, len(self.rows))
        with ThreadPoolExecutor(max_workers=workers) as pool:
            running = [pool.submit(self._work) for _ in range(workers)]
            next_flush = time.monotonic() + wf.flush_seconds
            next_renewal = time.monotonic() + wf.lease.ttl_seconds / 3
            per_flush = wf._answers_per_flush(len(self.rows))
            while True:
                with self.changed:
                    self.changed.wait_for(
                        lambda: self.finished or self.answered >= per_flush,
                        timeout=max(0.0, min(next_flush, next_renewal) - time.monotonic()),
                    )
                    if self.finished:
                        break
                if self.answered >= per_flush or time.monotonic() >= next_flush:
                    with wf.store.batch():  # one connection per flush
                        self._flush()
                        wf._refresh_guard()
                    next_flush = time.monotonic() + wf.flush_seconds
                if time.monotonic() >= next_renewal:
                    wf.store.renew_leases(self.held, wf.owner, wf.lease.ttl_seconds)
                    next_renewal = time.monotonic() + wf.lease.ttl_seconds / 3
            for worker in running:
                worker.result()  # a worker's own failure (a bug) fails the step
        with wf.store.batch():
            self._flush()

    def _work(self) -> None:
        """One worker: poll whichever policy is due next, until none is left."""
        wf = self.wf
        try:
            while True:
                with self.changed:
                    while True:
                        if not self.due:
                            if self.in_flight == 0:
                                return  # nothing due, nothing that could add a poll
                            self.changed.wait()
                            continue
                        wait_seconds = self.due[0][0] - time.monotonic()
                        if wait_seconds <= 0:
                            break
                        self.changed.wait(wait_seconds)
                    _due, _seq, execution_id = heapq.heappop(self.due)
                    self.in_flight += 1
                response: ApiResponse | PolicyApiError | None = None
                try:
                    response = _result_of(wf._guarded, wf._status_call, self.rows[execution_id])
                finally:
                    with self.changed:
                        self.in_flight -= 1
                        self.answered += 1
                        self.changed.notify_all()
                        if response is not None:
                            self._handle(execution_id, response)
        finally:
            with self.changed:
                self.workers_left -= 1
                self.finished = self.workers_left == 0
                self.changed.notify_all()

    def _handle(self, execution_id: str, response: ApiResponse | PolicyApiError) -> None:
        row = self.rows[execution_id]
        if isinstance(response, GuardOpen):  # no call was made: not a poll
            self.failed.append((row, str(response), STEP_READY, True))
            return
        self.polls[execution_id] += 1
        count = self.polls[execution_id]
        record = self.unwritten.setdefault(execution_id, [0, None, ""])
        record[0] += 1
        if isinstance(response, PolicyApiError):
            # The client already retried; a poll that got no answer is still a poll.
            record[1] = {"error": str(response)}
            record[2] = f"Poll {count}: no answer ({response})"
            status: object = None
        elif not response.ok:
            record[1], record[2] = response.recorded_body, response.describe()
            self.failed.append(
                (row, f"{response.describe()}: {_excerpt(response)}", STEP_READY, False)
            )
            return
        else:
            status = response.field("status")
            record[1], record[2] = response.recorded_body, f"Poll {count}: API status {status!r}"
            verdict = classify_api_status(status)
            if verdict is ApiPolicyStatus.READY:
                message = f"Step 2 complete: API status {status!r} after {count} polls"
                self.ready.append((row, message))
                return
            if verdict is ApiPolicyStatus.FAILED:
                error = f"Policy API reported status {status!r} for policy {row.policy_id}"
                self.failed.append((row, error, STEP_READY, False))
                return
            if verdict is ApiPolicyStatus.UNKNOWN:
                self._warn(row, _unknown_status(response, status))
        self.last_status[execution_id] = status
        wait_seconds = self.polling.interval(count)
        elapsed = time.monotonic() - self.started
        if (
            count >= self.polling.max_polls
            or elapsed + wait_seconds > self.polling.deadline_seconds
        ):
            self.failed.append(
                (
                    row,
                    f"policy {row.policy_id} not ready after {count} polls in {elapsed:.1f}s "
                    f"(last status {status!r}); a later run resumes polling the same policy",
                    STEP_READY,
                    True,
                )
            )
            return
        heapq.heappush(
            self.due, (time.monotonic() + wait_seconds, next(self.counter), execution_id)
        )

    def _warn(self, row: ExecutionRow, message: str) -> None:
        self.wf.log.warning(f"policy '{row.policy_name}': {message}")
        self.wf.store.audit(
            AuditEvent(
                execution_id=row.execution_id,
                policy_name=row.policy_name,
                event_type="warning",
                message=message,
            )
        )

    def _flush(self) -> None:
        store = self.wf.store
        with self.changed:  # take what the workers have gathered; they go on meanwhile
            polls, self.unwritten = self.unwritten, {}
            ready, self.ready = self.ready, []
            failed, self.failed = self.failed, []
            self.answered = 0
        if polls:
            store.record_polls(
                [
                    (self.rows[i], count, body, message)
                    for i, (count, body, message) in polls.items()
                ]
            )
        if ready:
            # Moves only the rows still 'policy_created' with the policy_id the API called ready.
            after = store.mark_ready(ready)
            failpoint("after_ready")
            for row, _message in ready:
                done = after.get(row.execution_id)
                if done is not None and done.status is ExecutionStatus.POLICY_READY:
                    self.wf._detail(f"policy '{row.policy_name}': {row.policy_id} ready")
                    self.report.outcomes[row.policy_name] = self.wf._outcome(
                        done, message=f"ready after {done.poll_count} polls"
                    )
                else:
                    now = f"'{done.status}'" if done is not None else "gone"
                    self.report.fail(
                        row.policy_name,
                        f"state row changed while polling: execution {row.execution_id} is "
                        f"{now}, not 'policy_created' with policy_id {row.policy_id}",
                    )
        self.wf._flush_failures(failed, [], "api_response", self.report)
        store.flush()  # the polls' audit events, if no state change above wrote them


def _drain(finished: queue.SimpleQueue[Future[ApiResponse]], timeout: float) -> list[Future[Any]]:
    """The calls finished so far, waiting up to ``timeout`` for the first."""
    try:
        done = [finished.get(timeout=timeout)]
    except queue.Empty:
        return []
    while True:
        try:
            done.append(finished.get_nowait())
        except queue.Empty:
            return done


def _result_of(
    guarded: Callable[[Callable[[ExecutionRow], ApiResponse], ExecutionRow], ApiResponse],
    call: Callable[[ExecutionRow], ApiResponse],
    row: ExecutionRow,
) -> ApiResponse | PolicyApiError:
    try:
        return guarded(call, row)
    except PolicyApiError as exc:
        return exc


def _result(future: Future[ApiResponse]) -> ApiResponse | PolicyApiError:
    try:
        return future.result()
    except PolicyApiError as exc:
        return exc


def _refusal(row: ExecutionRow, why: str) -> str:
    detail = f" ({row.error_message})" if row.error_message else ""
    return f"execution {row.execution_id} is '{row.status}'{detail}: {why}"


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
