"""The workflow engine: every policy of a run goes create -> ready -> circuit breaker on its
own, as soon as it can, whatever the other policies do.

Plain Python over the state store and the Policy API (no Dagster). One run of the engine has
``concurrency`` call workers and one writer:

- the workers take whichever call is due next (a create, a status poll, a circuit-breaker
  call) from one schedule, so at most ``concurrency`` calls are in flight for the whole run,
  and a slow or failing policy only ever occupies the worker of its own call;
- the writer commits what the answers taught, in batches (group commit): whatever has
  gathered since the last write, at most ``flush_seconds`` apart. A batch is a few statements
  whatever the number of policies in it, so statements per run grow with its duration, not
  with its number of policies. As each write commits, the policies it moved go on to their
  next call at once, and ``on_progress`` hears of each policy passing (or failing) each step.

The seed's rules hold per policy: the intent is committed before the create call, the
circuit breaker is called only after the state row says ``policy_ready`` (the API said so,
and a conditional update agreed) and after a conditional claim, and a failure in one step
keeps the steps before it recorded. A recoverable failure is recorded so that a later run
resumes the same execution (same ``policy_id``, same idempotency keys).

A policy that has waited ``PollingPolicy.handoff_seconds`` for readiness is handed off: the
run lets it go (waiting, not failed) and `progress.py` polls it outside any run.
"""

from __future__ import annotations

import heapq
import itertools
import math
import random
import re
import threading
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from policy_pipeline.core.domain import (
    TRIGGER_REASON,
    ApiPolicyStatus,
    ExecutionStatus,
    PolicyDefinition,
    circuit_idempotency_key,
    classify_api_status,
)
from policy_pipeline.core.engine.guard import ApiGuard, GuardOpen
from policy_pipeline.core.failpoints import failpoint
from policy_pipeline.core.liveness import Holder
from policy_pipeline.core.policy_api_types import (
    ApiAttempt,
    ApiResponse,
    AttemptCallback,
    PolicyApiError,
)
from policy_pipeline.core.store import sql as sql
from policy_pipeline.core.store.state_store import AuditEvent, ExecutionRow, StateStore

STEP_CREATE = "policy_created"
STEP_READY = "policy_ready"
STEP_CIRCUIT = "circuit_breaker_activation"
STEPS = (STEP_CREATE, STEP_READY, STEP_CIRCUIT)

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
# Per-policy log lines only for small runs; a thousand-policy run logs summaries.
DETAILED_LOG_LIMIT = 25
# The kinds of call, most urgent first (see `_Run._next_due`).
CALL_ORDER = ("circuit", "poll", "create")
# Writes wait at most this long to be batched with others (each batch is a few statements).
FLUSH_SECONDS = 0.5
# How often the writer re-reads the shared API guard (another process may have opened it).
GUARD_REFRESH_SECONDS = 2.0
# A policy_id goes into a URL path and into the state table: an identifier, nothing else.
POLICY_ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")
# The API refuses our credentials: a configuration error, the same for every policy. (A 403
# may be about one policy only, so it fails just that policy, resumable like any poll error.)
AUTH_STATUSES = frozenset({401})


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
    """What the engine needs from the Policy API client (`PolicyApiResource`)."""

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
    """How a policy is polled until ready: the first poll one initial interval after it
    entered the step, then growing intervals. The seed's behaviour is ``max_polls=3`` with a
    fixed interval. The limits are per policy: one policy's exhausted polls end only its own
    wait."""

    initial_interval_seconds: float = 1.0
    max_interval_seconds: float = 30.0
    backoff_multiplier: float = 2.0
    max_polls: int = 60
    deadline_seconds: float = 900.0
    # A policy still not ready after this long in the step is handed off (0: never): the
    # run lets it go, and the progress sensor polls it every ``handoff_poll_seconds``.
    handoff_seconds: float = 0.0
    handoff_poll_seconds: float = 300.0

    def interval(self, poll_number: int) -> float:
        base = min(
            self.max_interval_seconds,
            self.initial_interval_seconds * self.backoff_multiplier ** min(poll_number - 1, 64),
        )
        # "Equal jitter": never zero, never more than the computed interval.
        return base / 2 + random.uniform(0, base / 2)


@dataclass(frozen=True)
class LeasePolicy:
    """A run renews its leases every third of the TTL, so a crashed run's policies are free
    within the TTL; a holder known to be gone (``holder_gone``) is taken over at once."""

    ttl_seconds: int = 30
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
    """What one step did for each policy."""

    outcomes: dict[str, StepOutcome] = field(default_factory=dict)
    failures: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Progress:
    """One policy passed one step (``outcome``) or failed at it (``error``), just now: the
    state row already says so."""

    policy_name: str
    step: str
    outcome: StepOutcome | None = None
    error: str | None = None
    waiting: str | None = None  # handed off: waiting for readiness outside the run


@dataclass
class RunReport:
    """What a run did: per step, the policies that passed it; per policy, where it failed."""

    outcomes: dict[str, dict[str, StepOutcome]] = field(
        default_factory=lambda: {step: {} for step in STEPS}
    )
    failures: dict[str, tuple[str, str]] = field(default_factory=dict)  # name -> (step, why)
    waiting: dict[str, str] = field(default_factory=dict)  # handed off: name -> message

    def step(self, step: str) -> StepReport:
        return StepReport(
            outcomes=dict(self.outcomes[step]),
            failures={name: why for name, (_step, why) in self.failures.items()},
        )


class AttemptRecorder:
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
    """The seed's three steps for any number of policies, each policy on its own."""

    def __init__(
        self,
        store: StateStore,
        api: PolicyApi,
        owner: str,
        log: Logger,
        lease: LeasePolicy | None = None,
        concurrency: int = 16,
        flush_seconds: float = FLUSH_SECONDS,
        holder_gone: Callable[[str], bool] = lambda owner: Holder.parse(owner).certainly_dead(),
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
        # Whether a lease holder has certainly stopped (a finished run, a process gone): its
        # policies are taken over at once rather than when its lease lapses.
        self.holder_gone = holder_gone
        self.guard = guard

    def run(
        self,
        names: Sequence[str],
        steps: Collection[str] = STEPS,
        *,
        definitions: Mapping[str, PolicyDefinition] | None = None,
        polling: PollingPolicy | None = None,
        force_new: bool = False,
        recreate_failed: bool = True,
        on_progress: Callable[[Progress], None] | None = None,
        stop: threading.Event | None = None,
    ) -> RunReport:
        """Take every named policy through the chosen steps (in the workflow's order).

        ``definitions`` are needed for the create step. A policy whose current content has
        already completed is not created again (the same content is one policy), unless
        ``force_new`` asks for a new execution. With ``recreate_failed`` off (an automatic
        retry of a run), a policy whose current content finally failed is not created again:
        automation resumes what it can and starts nothing over. Setting ``stop`` ends the run
        early: calls in flight are answered and written, and nothing new starts."""
        unknown = set(steps) - set(STEPS)
        if unknown:
            raise ValueError(f"unknown workflow steps: {sorted(unknown)}")
        definitions = definitions or {}
        if STEP_CREATE in steps:
            missing = [name for name in names if name not in definitions]
            if missing:
                raise ValueError(f"no policy definition for {missing}")
        return _Run(
            self,
            list(dict.fromkeys(names)),
            [step for step in STEPS if step in steps],
            definitions,
            polling or PollingPolicy(),
            force_new,
            recreate_failed,
            on_progress or (lambda progress: None),
            stop or threading.Event(),
        ).execute()

    # --- one step at a time (the operator CLI, tests) ------------------------------------------

    def create_policies(
        self, policies: Sequence[PolicyDefinition], force_new: bool = False
    ) -> StepReport:
        definitions = {policy.policy_name: policy for policy in policies}
        report = self.run(
            list(definitions), [STEP_CREATE], definitions=definitions, force_new=force_new
        )
        return report.step(STEP_CREATE)

    def wait_until_ready(self, names: Sequence[str], polling: PollingPolicy) -> StepReport:
        return self.run(names, [STEP_READY], polling=polling).step(STEP_READY)

    def activate_circuit_breakers(self, names: Sequence[str]) -> StepReport:
        return self.run(names, [STEP_CIRCUIT]).step(STEP_CIRCUIT)

    def activate_circuit_breaker(self, policy_name: str) -> StepOutcome:
        """One policy (the operator CLI); raises StepFailed."""
        report = self.activate_circuit_breakers([policy_name])
        if policy_name in report.failures:
            raise StepFailed(policy_name, STEP_CIRCUIT, report.failures[policy_name])
        return report.outcomes[policy_name]


@dataclass(eq=False)
class _Track:
    """One policy's way through this run."""

    name: str
    steps: list[str]  # the chosen steps still ahead of it, in order
    row: ExecutionRow | None = None
    resumed: bool = False  # it entered its current step with work already done
    body: Any = None  # the create request's body
    recorder: AttemptRecorder | None = None
    polls: int = 0  # in this run
    polling_since: float = 0.0
    calls_before: int = 0  # API calls and latency before its current step (step figures)
    latency_before: float = 0.0

    @property
    def execution(self) -> ExecutionRow:
        assert self.row is not None, f"policy '{self.name}' has no execution yet"
        return self.row


@dataclass
class _Writes:
    """What the workers learnt and the writer has not written yet."""

    intents: list[_Track] = field(default_factory=list)
    polls: dict[str, list[Any]] = field(default_factory=dict)  # id -> [polls, body, message, t]
    created: list[tuple[_Track, str, Any]] = field(default_factory=list)
    ready: list[tuple[_Track, str]] = field(default_factory=list)
    handoffs: list[tuple[_Track, float]] = field(default_factory=list)  # and next poll in
    claims: list[_Track] = field(default_factory=list)
    completed: list[tuple[_Track, Any]] = field(default_factory=list)
    kept: dict[str, list[tuple[_Track, Any]]] = field(default_factory=dict)  # column -> bodies
    failed: list[tuple[_Track, str, str, bool]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)  # logged by the writer, not the workers

    def __bool__(self) -> bool:
        return any(
            (self.intents, self.polls, self.created, self.ready, self.claims, self.completed)
        ) or any((self.handoffs, self.kept, self.failed, self.warnings))


class _Run:
    """One call of `PolicyWorkflow.run`: the call workers, the writer (the calling thread),
    and every policy's track."""

    def __init__(
        self,
        workflow: PolicyWorkflow,
        names: list[str],
        steps: list[str],
        definitions: Mapping[str, PolicyDefinition],
        polling: PollingPolicy,
        force_new: bool,
        recreate_failed: bool,
        on_progress: Callable[[Progress], None],
        stop: threading.Event,
    ) -> None:
        self.wf = workflow
        self.store = workflow.store
        self.names = names
        self.steps = steps
        self.definitions = definitions
        self.polling = polling
        self.force_new = force_new
        self.recreate_failed = recreate_failed
        self.on_progress = on_progress
        self.stop = stop
        self.verbose = len(names) <= DETAILED_LOG_LIMIT
        self.report = RunReport()
        self.tracks = {name: _Track(name, list(steps)) for name in names}
        self.unfinished = len(names)
        # Shared with the workers; guards everything below.
        self.changed = threading.Condition()
        # Per kind of call, the calls by due time: (when, seq, track).
        self.due: dict[str, list[tuple[float, int, _Track]]] = {call: [] for call in CALL_ORDER}
        self.counter = itertools.count()
        self.in_flight = 0
        self.closed = False
        self.worker_error: BaseException | None = None
        self.writes = _Writes()
        # The writer's own.
        self.next_flush = 0.0
        self.held: set[str] = set()
        self.released: list[str] = []
        self.waiting: dict[str, _Track] = {}  # for a lease another run holds
        self.lease_deadline = 0.0
        self.lease_retry_at = 0.0
        self.lease_delay = 0.2
        self.renew_at = 0.0
        self.guard_refresh_at = 0.0
        self.bodies: dict[str, Any] = {}  # stored create bodies of resumed intents
        # Completed executions by policy and content hash, archived ones included.
        self.completed: dict[str, dict[str, ExecutionRow]] = {}
        self.halted: str | None = None  # why the run stopped starting calls (credentials)

    # --- the writer ----------------------------------------------------------------------------

    def execute(self) -> RunReport:
        if not self.names:
            return self.report
        workers = [
            threading.Thread(target=self._work, name=f"policy-call-{i}", daemon=True)
            for i in range(min(self.wf.concurrency, len(self.names)))
        ]
        try:
            with self.store.batch():  # one connection for the leases, reads and intents
                self._start()
            for worker in workers:
                worker.start()
            while True:
                with self.changed:
                    while not self._wake():  # the next timer may change with every answer
                        timer = self._next_timer()
                        self.changed.wait(
                            None if timer == math.inf else max(0.0, timer - time.monotonic())
                        )
                    if self.worker_error is not None:
                        raise self.worker_error
                    if self._finished():
                        break
                    stopping = self.stop.is_set() and self.in_flight == 0
                    # Counted from this batch's start: a batch that took longer than the
                    # interval is followed at once by the next (group commit).
                    self.next_flush = time.monotonic() + self.wf.flush_seconds
                with self.store.batch():  # one connection per batch of writes
                    if self.waiting and time.monotonic() >= self.lease_retry_at:
                        self._retry_leases()
                    with self.changed:
                        writes, self.writes = self.writes, _Writes()
                    self._write(writes)
                self._refresh_guard()  # outside the batch: the guard takes its own lock first
                if stopping:
                    self.wf.log.warning(
                        f"the run was stopped: {self.unfinished} policies left where they are; "
                        "a later run resumes them"
                    )
                    if self.halted is not None:
                        with self.changed:
                            for track in self.tracks.values():
                                if track.steps:
                                    self._fail(track, track.steps[0], f"not run: {self.halted}")
                    break
        finally:
            with self.changed:
                self.closed = True
                self.changed.notify_all()
            for worker in workers:
                if worker.is_alive():
                    worker.join()
            with self.store.batch():
                self.store.flush()
                self.store.release_leases([*self.held], self.wf.owner)
        return self.report

    def _wake(self) -> bool:
        return (
            self.worker_error is not None
            or self._finished()
            or self._timer_due()
            or (self.stop.is_set() and self.in_flight == 0)  # the answers in flight first
        )

    def _finished(self) -> bool:
        return self.unfinished == 0 and self.in_flight == 0 and not self.writes

    def _timer_due(self) -> bool:
        now = time.monotonic()
        if self.writes and now >= self.next_flush:
            return True
        if self.waiting and now >= self.lease_retry_at:
            return True
        return bool(self.held) and now >= self.renew_at

    def _next_timer(self) -> float:
        timers = [self.renew_at if self.held else math.inf]
        if self.writes:
            timers.append(self.next_flush)
        if self.waiting:
            timers.append(self.lease_retry_at)
        return min(timers)

    def _start(self) -> None:
        """Fail everything at once while the guard is open; otherwise claim the leases and
        set every policy on its way."""
        guard = self.wf.guard
        reason = guard.blocks_calls() if guard is not None else None
        if reason is not None:
            self.wf.log.warning(reason)
            for track in self.tracks.values():
                self._fail(track, track.steps[0], reason)
            return
        ttl = self.wf.lease.ttl_seconds
        self.held = self.store.acquire_leases(self.names, self.wf.owner, ttl)
        now = time.monotonic()
        self.renew_at = now + ttl / 3
        self.guard_refresh_at = now + GUARD_REFRESH_SECONDS
        self.waiting = {n: t for n, t in self.tracks.items() if n not in self.held}
        self.lease_deadline = now + self.wf.lease.wait_seconds
        self.lease_retry_at = now + self.lease_delay
        self._enter([t for n, t in self.tracks.items() if n in self.held])
        with self.changed:
            writes, self.writes = self.writes, _Writes()
        self._write(writes)

    def _write(self, writes: _Writes) -> None:
        """One batch: each kind of write is one statement (and its read-back) for all the
        policies in it. As a write commits, its policies go on at once."""
        store = self.store
        now = time.monotonic()
        for message in writes.warnings:
            self.wf.log.warning(message)
        if writes.intents:
            tracks = writes.intents
            started = store.start_executions([self.definitions[t.name] for t in tracks])
            failpoint("after_intents")
            with self.changed:
                for track, row in zip(tracks, started, strict=True):
                    track.row = row
                    track.body = self.definitions[track.name].payload()
                    self._call("create", track)
        if writes.polls:
            store.record_polls(
                [
                    (t.execution, count, body, message, None)
                    for count, body, message, t in writes.polls.values()
                ]
            )
        if writes.handoffs:
            self._hand_off(writes.handoffs, writes.claims)
        if writes.created:
            self._created(writes.created, writes.claims)
        if writes.ready:
            self._ready(writes.ready, writes.claims)
        if writes.claims:
            self._claim(writes.claims)
        if writes.completed:
            self._completed(writes.completed)
        for column, kept in writes.kept.items():
            store.set_responses(column, [(t.execution, body) for t, body in kept])
        if writes.failed:
            store.mark_errors(
                [(t.execution, error, step, res) for t, error, step, res in writes.failed]
            )
            with self.changed:
                for track, error, step, _resumable in writes.failed:
                    self._fail(track, step, error)
        if self.released:
            store.release_leases(self.released, self.wf.owner)
            self.held.difference_update(self.released)
            self.released = []
        if self.held and now >= self.renew_at:
            store.renew_leases(sorted(self.held), self.wf.owner, self.wf.lease.ttl_seconds)
            self.renew_at = now + self.wf.lease.ttl_seconds / 3
        store.flush()  # the audit events no state change above wrote

    def _refresh_guard(self) -> None:
        now = time.monotonic()
        if self.wf.guard is not None and now >= self.guard_refresh_at:
            self.wf.guard.refresh()
            self.guard_refresh_at = now + GUARD_REFRESH_SECONDS

    def _created(self, created: list[tuple[_Track, str, Any]], claims: list[_Track]) -> None:
        # One policy_id per execution: within this batch the first keeps it; against the
        # table, the conditional update refuses a policy_id another execution holds.
        first: dict[str, _Track] = {}
        unique = [c for c in created if first.setdefault(c[1], c[0]) is c[0]]
        after = self.store.mark_created(
            [(t.execution, policy_id, body) for t, policy_id, body in unique]
        )
        failpoint("after_created")
        refused = [
            (t, p)
            for t, p, _b in created
            if after.get(t.execution.execution_id) is None
            or after[t.execution.execution_id].policy_id != p
        ]
        holders = self.store.policy_id_holders(sorted({p for _t, p in refused})) if refused else {}
        with self.changed:
            for track, policy_id, _body in created:
                assert track.row is not None
                # The seed's "verify database storage" before going on.
                stored = after.get(track.row.execution_id)
                others = [
                    (e, n) for e, n in holders.get(policy_id, []) if e != track.row.execution_id
                ]
                if first[policy_id] is not track:
                    others.append((first[policy_id].execution.execution_id, first[policy_id].name))
                if others and (stored is None or stored.policy_id != policy_id):
                    execution, name = others[0]
                    error = (
                        f"POST /createpolicy returned policy_id {policy_id}, which is already "
                        f"bound to execution {execution} (policy '{name}'): the Policy API "
                        "handed one policy_id to two creates (does it ignore Idempotency-Key?); "
                        "refused before any circuit breaker"
                    )
                    self.wf.log.warning(f"policy '{track.name}': {error}")
                    self.writes.failed.append((track, error, STEP_CREATE, False))
                    continue
                if stored is None or stored.policy_id != policy_id:
                    self._fail(
                        track,
                        STEP_CREATE,
                        f"state row for execution {track.row.execution_id} does not hold "
                        f"policy_id {policy_id} after the write",
                    )
                    continue
                track.row = stored
                self._detail(f"policy '{track.name}': created {policy_id}")
                self._passed(track, f"created {policy_id}", claims)

    def _ready(self, ready: list[tuple[_Track, str]], claims: list[_Track]) -> None:
        # Moves only the rows still 'policy_created' with the policy_id the API called ready.
        after = self.store.mark_ready([(t.execution, message) for t, message in ready])
        failpoint("after_ready")
        with self.changed:
            for track, _message in ready:
                assert track.row is not None
                done = after.get(track.row.execution_id)
                # Already ready (or further) for the same policy_id is fine: the progress
                # sensor may have polled a handed-off policy at the same moment.
                if (
                    done is None
                    or done.status not in (ExecutionStatus.POLICY_READY, ExecutionStatus.COMPLETED)
                    or done.policy_id != track.row.policy_id
                ):
                    now = f"'{done.status}'" if done is not None else "gone"
                    self._fail(
                        track,
                        STEP_READY,
                        f"state row changed while polling: execution {track.row.execution_id} "
                        f"is {now}, not 'policy_created' with policy_id {track.row.policy_id}",
                    )
                    continue
                track.row = done
                self._detail(f"policy '{track.name}': {done.policy_id} ready")
                self._passed(track, f"ready after {done.poll_count} polls", claims)

    def _hand_off(self, handoffs: list[tuple[_Track, float]], claims: list[_Track]) -> None:
        """Let long waits go: the progress sensor polls them from now on, outside any run."""
        after = self.store.hand_off(
            [
                (
                    t.execution,
                    delay,
                    f"Handed off after {t.polls} polls in this run: waiting for readiness "
                    f"outside any run (next poll in {delay:.0f}s)",
                )
                for t, delay in handoffs
            ]
        )
        with self.changed:
            for track, _delay in handoffs:
                now = after.get(track.execution.execution_id)
                if (
                    now is not None
                    and now.handed_off
                    and now.status is ExecutionStatus.POLICY_CREATED
                ):
                    track.row = now
                    message = f"waiting for readiness outside the run ({now.poll_count} polls)"
                    self._detail(f"policy '{track.name}': {message}")
                    self.report.waiting[track.name] = message
                    self.on_progress(Progress(track.name, STEP_READY, waiting=message))
                    self._finish(track)
                elif now is not None:
                    # It moved meanwhile (ready, polled by the sensor): go on from there.
                    track.row = now
                    self._begin(track, claims)
                else:
                    self._fail(track, STEP_READY, "state row is gone")

    def _claim(self, claims: list[_Track]) -> None:
        """The exactly-once gate: only a claimed ``policy_ready`` execution is called for."""
        rows = [t.row for t in claims if t.row is not None]
        after = self.store.claim_circuit_breakers(
            [(row, circuit_idempotency_key(row.execution_id)) for row in rows], TRIGGER_REASON
        )
        failpoint("after_claim")
        with self.changed:
            for track in claims:
                assert track.row is not None
                now = after[track.row.execution_id]
                track.row = now
                if now.circuit_breaker_completed:
                    self._passed(track, "done", [])
                elif now.circuit_breaker_initiated and now.status is ExecutionStatus.POLICY_READY:
                    # Initiated now, or by a run that crashed: we hold the lease, so nobody
                    # else is calling, and the stored idempotency key makes a repeat safe.
                    self._call("circuit", track)
                else:
                    self._fail(track, STEP_CIRCUIT, _refusal(now, "it changed while claiming"))

    def _completed(self, completed: list[tuple[_Track, Any]]) -> None:
        after = self.store.mark_completed([(t.execution, body) for t, body in completed])
        failpoint("after_completed")
        with self.changed:
            for track, _body in completed:
                assert track.row is not None
                done = after.get(track.row.execution_id)
                if done is None or done.status is not ExecutionStatus.COMPLETED:
                    self._fail(track, STEP_CIRCUIT, "state row did not reach completed")
                    continue
                track.row = done
                self._detail(f"policy '{track.name}': circuit breaker triggered")
                self._passed(track, "circuit breaker triggered", [])

    def _retry_leases(self) -> None:
        """Policies another run holds: take over a finished run's leases, claim the free
        ones, and set those on their way; give up on the rest after the lease wait."""
        store, owner, ttl = self.store, self.wf.owner, self.wf.lease.ttl_seconds
        waiting = sorted(self.waiting)
        holders = store.lease_holders(waiting)
        for previous in {holder for holder, _until in holders.values()}:
            # A run that has finished, or whose process is gone, holds nothing: take its
            # policies over at once.
            if previous != owner and self.wf.holder_gone(previous):
                taken = [n for n, (holder, _u) in holders.items() if holder == previous]
                self.wf.log.warning(f"taking over {len(taken)} leases of {previous}")
                store.take_over_leases(taken, owner, previous, ttl)
        got = store.acquire_leases(waiting, owner, ttl)
        self.held |= got
        late = [self.waiting.pop(name) for name in waiting if name in got]
        self._enter(late)
        now = time.monotonic()
        if now > self.lease_deadline and self.waiting:
            holders = store.lease_holders(sorted(self.waiting))
            with self.changed:
                for name, track in sorted(self.waiting.items()):
                    holder = holders.get(name)
                    who = f"{holder[0]} (until {holder[1]})" if holder else "another run"
                    self._fail(
                        track,
                        track.steps[0],
                        f"the policy is being processed by {who}; try again later",
                    )
                self.waiting.clear()
        self.lease_delay = min(self.lease_delay * 2, 5.0)
        self.lease_retry_at = now + self.lease_delay * (0.5 + random.random())

    # --- entering and passing steps ----------------------------------------------------------

    def _enter(self, tracks: list[_Track]) -> None:
        """Read the policies' executions (reopening recoverable errors of the chosen steps)
        and set each on its first step. Called by the writer, without ``changed`` held."""
        if not tracks:
            return
        current = self.store.current_executions([t.name for t in tracks])
        current = self._resume_errors(current)
        if STEP_CREATE in self.steps and not self.force_new:
            for done in self.store.completed_executions([t.name for t in tracks]):
                if done.policy_content_hash is not None:
                    by_hash = self.completed.setdefault(done.policy_name, {})
                    by_hash.setdefault(done.policy_content_hash, done)
        if STEP_CREATE in self.steps:
            # A resumed intent re-sends exactly the body it stored.
            pending = [
                r.execution_id for r in current.values() if r.status is ExecutionStatus.PENDING
            ]
            self.bodies.update(self.store.policy_data(pending) if pending else {})
        with self.changed:
            for track in tracks:
                track.row = current.get(track.name)
                track.resumed = True
                self._begin(track, self.writes.claims)

    # The methods below are called with ``changed`` held.

    def _begin(self, track: _Track, claims: list[_Track]) -> None:
        """Start the track's next step: a call, a write, or (when the state is already past
        it) passing it at once."""
        step, row = track.steps[0], track.row
        if track.recorder is not None:
            track.calls_before = track.recorder.calls
            track.latency_before = track.recorder.latency_ms
        if step == STEP_CREATE:
            definition = self.definitions[track.name]
            if (
                row is not None
                and row.status is ExecutionStatus.COMPLETED
                and not self.force_new
                and row.policy_content_hash == definition.content_hash()
            ):
                self._detail(f"policy '{track.name}': this content completed as {row.policy_id}")
                self._passed(track, "already completed for this content", claims)
            elif (
                (row is None or row.status is ExecutionStatus.COMPLETED)
                and not self.force_new
                and definition.content_hash() in self.completed.get(track.name, {})
            ):
                # Completed before, and archived since (or superseded by other content that
                # has now come back): still one policy per content.
                track.row = self.completed[track.name][definition.content_hash()]
                self._detail(
                    f"policy '{track.name}': this content completed as "
                    f"{track.row.policy_id} (archived)"
                )
                self._passed(track, "already completed for this content (archived)", claims)
            elif (
                row is not None
                and row.status is ExecutionStatus.ERROR
                and not self.recreate_failed
                and not self.force_new
                and row.policy_content_hash == definition.content_hash()
            ):
                self._fail(
                    track,
                    step,
                    _refusal(row, "an automatic retry does not create a failed policy again"),
                )
            elif row is None or row.status not in ACTIVE_STATUSES:
                track.resumed = False
                self.writes.intents.append(track)
            elif row.status is ExecutionStatus.PENDING:
                # Intent recorded, create never confirmed: re-send it with the same key.
                track.body = self.bodies.get(row.execution_id)
                if isinstance(track.body, dict):
                    self._call("create", track)
                else:
                    problem = "stored policy_data is not a JSON object"
                    self.writes.failed.append((track, problem, STEP_CREATE, False))
            else:
                self._detail(f"policy '{track.name}': resuming {row.execution_id} ({row.status})")
                self._passed(track, "resumed", claims)
        elif step == STEP_READY:
            if row is None:
                self._fail(track, step, "no execution exists; materialize policy_created first")
            elif row.status in (ExecutionStatus.POLICY_READY, ExecutionStatus.COMPLETED):
                self._passed(track, "ready", claims)
            elif row.status is not ExecutionStatus.POLICY_CREATED:
                self._fail(track, step, _refusal(row, "materialize policy_created first"))
            else:
                track.polls, track.polling_since = 0, time.monotonic()
                track.resumed = False
                # A policy just created is not ready yet: the first poll waits one interval.
                self._call("poll", track, self.polling.interval(1))
        elif row is None:
            self._fail(track, step, "no execution exists; materialize policy_created first")
        elif row.status is ExecutionStatus.COMPLETED:
            self._passed(track, "done", claims)
        elif row.status is not ExecutionStatus.POLICY_READY:
            self._fail(track, step, _refusal(row, "the policy has not reached policy_ready"))
        else:
            track.resumed = False
            claims.append(track)

    def _passed(self, track: _Track, message: str, claims: list[_Track]) -> None:
        step = track.steps.pop(0)
        assert track.row is not None
        outcome = self._outcome(track, message)
        self.report.outcomes[step][track.name] = outcome
        self.on_progress(Progress(track.name, step, outcome=outcome))
        if track.steps:
            track.resumed = True
            self._begin(track, claims)
        else:
            self._finish(track)

    def _fail(self, track: _Track, step: str, error: str) -> None:
        self.report.failures[track.name] = (step, error)
        self.on_progress(Progress(track.name, step, error=error))
        self._finish(track)

    def _finish(self, track: _Track) -> None:
        track.steps = []
        self.unfinished -= 1
        if track.name in self.held:
            self.released.append(track.name)  # another run may take it from now on

    def _call(self, call: str, track: _Track, delay: float = 0.0) -> None:
        heapq.heappush(self.due[call], (time.monotonic() + delay, next(self.counter), track))
        self.changed.notify_all()  # the writer waits on the same condition

    def _resume_errors(self, current: dict[str, ExecutionRow]) -> dict[str, ExecutionRow]:
        """Reopen the recoverable errors of the chosen steps (of any step when the run creates)
        so that this run goes on with the same execution."""
        groups: dict[ExecutionStatus, list[ExecutionRow]] = {}
        for row in current.values():
            if row.status is ExecutionStatus.ERROR and row.resumable:
                failed_step = row.error_step or STEP_CREATE
                if STEP_CREATE in self.steps or failed_step in self.steps:
                    target = RESUME_FROM.get(failed_step, ExecutionStatus.PENDING)
                    groups.setdefault(target, []).append(row)
        for target, rows in groups.items():
            after = self.store.reopen(rows, target)
            for row in rows:
                current[row.policy_name] = after[row.execution_id]
                self._detail(f"policy '{row.policy_name}': resuming after {row.error_message}")
        return current

    # --- the call workers -----------------------------------------------------------------------

    def _work(self) -> None:
        """One worker: make whichever call is due next, until the run closes."""
        calls: dict[str, Callable[[_Track], ApiResponse]] = {
            "create": self._post_create,
            "poll": self._get_status,
            "circuit": self._post_circuit,
        }
        answers = {"create": self._on_create, "poll": self._on_poll, "circuit": self._on_circuit}
        try:
            while True:
                with self.changed:
                    while self.stop.is_set() or (next_call := self._next_due()) is None:
                        if self.closed:
                            return
                        waits = [queue[0][0] for queue in self.due.values() if queue]
                        self.changed.wait(
                            max(0.0, min(waits) - time.monotonic()) if waits else None
                        )
                    if self.closed:
                        return
                    call, track = next_call
                    self.in_flight += 1
                response = self._guarded(calls[call], track)
                with self.changed:
                    self.in_flight -= 1
                    answers[call](track, response)
                    self.changed.notify_all()
        except BaseException as exc:  # a bug: fail the run rather than hang it
            with self.changed:
                self.worker_error = self.worker_error or exc
                self.changed.notify_all()

    def _next_due(self) -> tuple[str, _Track] | None:
        """The most urgent call that is due: one that finishes a policy before one that moves
        it on, before one that starts a new policy. When the API's limit is the bottleneck,
        ready policies get their circuit breaker first and new ones wait their turn."""
        now = time.monotonic()
        for call in CALL_ORDER:
            queue = self.due[call]
            if queue and queue[0][0] <= now:
                return call, heapq.heappop(queue)[2]
        return None

    def _guarded(
        self, call: Callable[[_Track], ApiResponse], track: _Track
    ) -> ApiResponse | PolicyApiError:
        try:
            if self.wf.guard is not None:
                self.wf.guard.before_call()  # raises GuardOpen (a PolicyApiError): no call made
            return call(track)
        except PolicyApiError as exc:
            return exc

    def _recorder(self, track: _Track) -> AttemptRecorder:
        assert track.row is not None
        if track.recorder is None or track.recorder.row.execution_id != track.row.execution_id:
            track.recorder = AttemptRecorder(self.store, track.row, self.wf.guard)
            track.calls_before, track.latency_before = 0, 0.0
        return track.recorder

    def _post_create(self, track: _Track) -> ApiResponse:
        assert track.row is not None and isinstance(track.body, dict)
        key = track.row.create_idempotency_key or ""
        response = self.wf.api.create_policy(
            {**track.body, "execution_id": track.row.execution_id}, key, self._recorder(track)
        )
        failpoint("after_create_call")
        return response

    def _get_status(self, track: _Track) -> ApiResponse:
        assert track.row is not None and track.row.policy_id is not None
        response = self.wf.api.get_policy_status(track.row.policy_id, self._recorder(track))
        failpoint("after_poll_call")
        return response

    def _post_circuit(self, track: _Track) -> ApiResponse:
        row = track.row
        assert row is not None and row.policy_id is not None
        key = row.circuit_idempotency_key or circuit_idempotency_key(row.execution_id)
        response = self.wf.api.trigger_circuit_breaker(
            row.policy_id, row.execution_id, TRIGGER_REASON, key, self._recorder(track)
        )
        failpoint("after_circuit_call")
        return response

    # --- answers (called with ``changed`` held) ------------------------------------------------

    def _on_create(self, track: _Track, response: ApiResponse | PolicyApiError) -> None:
        writes = self.writes
        if isinstance(response, PolicyApiError):
            writes.failed.append((track, str(response), STEP_CREATE, response.transient))
            return
        if not response.ok:
            problem = f"{response.describe()}: {_excerpt(response)}"
            writes.failed.append((track, problem, STEP_CREATE, self._auth(response)))
            return
        policy_id = response.field("policy_id")
        if not isinstance(policy_id, str) or not policy_id.strip():
            writes.kept.setdefault("api_response", []).append((track, response.recorded_body))
            # An unreadable body may hide a created policy: a later run re-sends the same
            # idempotency key and gets the original answer. JSON without the field is final.
            unreadable = response.data is None
            problem = _missing_field(response, "policy_id")
            writes.failed.append((track, problem, STEP_CREATE, unreadable))
            return
        invalid = _invalid_policy_id(policy_id)
        if invalid is not None:
            # Refused before it reaches a URL or the table; the whole answer stays in the
            # audit trail (the attempt's event) and in api_response.
            writes.kept.setdefault("api_response", []).append((track, response.recorded_body))
            problem = f"{response.describe()} with {invalid}"
            writes.failed.append((track, problem, STEP_CREATE, False))
            return
        writes.created.append((track, policy_id, response.recorded_body))

    def _on_poll(self, track: _Track, response: ApiResponse | PolicyApiError) -> None:
        writes = self.writes
        assert track.row is not None
        if isinstance(response, GuardOpen):  # no call was made: not a poll
            writes.failed.append((track, str(response), STEP_READY, True))
            return
        track.polls += 1
        count = track.polls
        record = writes.polls.setdefault(track.row.execution_id, [0, None, "", track])
        record[0] += 1
        status: object = None
        if isinstance(response, PolicyApiError):
            # The client already retried; a poll that got no answer is still a poll.
            record[1] = {"error": str(response)}
            record[2] = f"Poll {count}: no answer ({response})"
        elif not response.ok:
            # An HTTP error for a policy we created is no proof that it is gone (a 404 from
            # a proxy, a redirect, an auth error): the execution stays resumable, and a later
            # run polls the same policy_id rather than creating a second policy.
            self._auth(response)
            record[1], record[2] = response.recorded_body, response.describe()
            problem = f"{response.describe()}: {_excerpt(response)}"
            writes.failed.append((track, problem, STEP_READY, True))
            return
        else:
            status = response.field("status")
            record[1], record[2] = response.recorded_body, f"Poll {count}: API status {status!r}"
            verdict = classify_api_status(status)
            if verdict is ApiPolicyStatus.READY:
                message = f"Step 2 complete: API status {status!r} after {count} polls"
                writes.ready.append((track, message))
                return
            if verdict is ApiPolicyStatus.FAILED:
                error = f"Policy API reported status {status!r} for policy {track.row.policy_id}"
                writes.failed.append((track, error, STEP_READY, False))
                return
            if verdict is ApiPolicyStatus.UNKNOWN:
                self._warn(track, _unknown_status(response, status))
        wait_seconds = self.polling.interval(count)
        elapsed = time.monotonic() - track.polling_since
        handoff = self.polling.handoff_seconds
        if handoff > 0 and elapsed >= handoff:
            # A long wait holds no run: the progress sensor polls it from now on.
            next_in = max(wait_seconds, self.polling.handoff_poll_seconds)
            writes.handoffs.append((track, next_in))
            return
        if (
            count >= self.polling.max_polls
            or elapsed + wait_seconds > self.polling.deadline_seconds
        ):
            writes.failed.append(
                (
                    track,
                    f"policy {track.row.policy_id} not ready after {count} polls in "
                    f"{elapsed:.1f}s (last status {status!r}); a later run resumes polling the "
                    "same policy",
                    STEP_READY,
                    True,
                )
            )
            return
        self._call("poll", track, wait_seconds)

    def _on_circuit(self, track: _Track, response: ApiResponse | PolicyApiError) -> None:
        # Steps 1 and 2 stay recorded; the next run retries the same call with its key.
        writes = self.writes
        if isinstance(response, PolicyApiError):
            writes.failed.append((track, str(response), STEP_CIRCUIT, True))
        elif not response.ok:
            self._auth(response)
            writes.kept.setdefault("circuit_breaker_response", []).append(
                (track, response.recorded_body)
            )
            problem = f"{response.describe()}: {_excerpt(response)}"
            writes.failed.append((track, problem, STEP_CIRCUIT, True))
        elif not isinstance(response.data, dict):
            # A 2xx whose body cannot be read (an HTML page from a proxy, an empty body) is no
            # confirmation that the breaker fired: record it and let the next run repeat the
            # call with the same idempotency key.
            writes.kept.setdefault("circuit_breaker_response", []).append(
                (track, response.recorded_body)
            )
            problem = f"{response.describe()} without a readable confirmation"
            writes.failed.append((track, f"{problem}: {_excerpt(response)}", STEP_CIRCUIT, True))
        else:
            writes.completed.append((track, response.recorded_body))

    def _auth(self, response: ApiResponse) -> bool:
        """An answer refusing our credentials stops the run from starting calls: every other
        policy would get the same. Returns whether it was one (the failure stays resumable)."""
        if response.http_status not in AUTH_STATUSES:
            return False
        if self.halted is None:
            self.halted = (
                f"the Policy API refused our credentials ({response.describe()}); check "
                "POLICY_API_KEY. The executions stay resumable"
            )
            self.writes.warnings.append(self.halted)
            self.stop.set()
        return True

    # --- reporting ------------------------------------------------------------------------------

    def _warn(self, track: _Track, message: str) -> None:
        self.writes.warnings.append(f"policy '{track.name}': {message}")
        self.store.audit(
            AuditEvent(
                execution_id=track.row.execution_id if track.row else None,
                policy_name=track.name,
                event_type="warning",
                message=message,
            )
        )

    def _detail(self, message: str) -> None:
        if self.verbose:
            self.wf.log.info(message)

    def _outcome(self, track: _Track, message: str) -> StepOutcome:
        row = track.row
        assert row is not None
        recorder = track.recorder
        return StepOutcome(
            policy_name=row.policy_name,
            execution_id=row.execution_id,
            policy_id=row.policy_id,
            status=row.status.value,
            poll_count=row.poll_count,
            resumed=track.resumed,
            api_calls=recorder.calls - track.calls_before if recorder else 0,
            api_latency_ms=round(recorder.latency_ms - track.latency_before, 3)
            if recorder
            else 0.0,
            message=message,
        )


def _invalid_policy_id(value: str) -> str | None:
    """Why a policy_id is not an identifier, or None."""
    if POLICY_ID_PATTERN.fullmatch(value) and ".." not in value:
        return None
    shown = repr(value[:40]) + ("..." if len(value) > 40 else "")
    return (
        f"policy_id {shown} ({len(value)} characters), which is not an identifier: 1 to 128 "
        "letters, digits, '.', '_', ':' or '-', starting with a letter or digit, no '..'"
    )


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
