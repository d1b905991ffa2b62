"""The workflow engine's entry point: every policy of a run goes create -> ready -> circuit
breaker on its own, as soon as it can, whatever the other policies do.

Plain Python over the state store and the Policy API (no Dagster). One run of the engine has
``max_concurrency`` call workers and one writer:

- the workers take whichever call is due next (a create, a status poll, a circuit-breaker
  call) from one schedule, so at most ``max_concurrency`` calls are in flight for the whole run,
  and a slow or failing policy only ever occupies the worker of its own call;
- the writer commits what the answers taught, in batches (group commit): whatever has
  gathered since the last write, at most ``flush_seconds`` apart. A batch is a few statements
  whatever the number of policies in it, so statements per run grow with its duration, not
  with its number of policies. As each write commits, the policies it moved go on to their
  next call at once, and ``on_progress`` hears of each policy passing (or failing) each step.

The original rules hold per policy: the intent is committed before the create call, the
circuit breaker is called only after the state row says ``policy_ready`` (the API said so,
and a conditional update agreed) and after a conditional claim, and a failure in one step
keeps the steps before it recorded. A recoverable failure is recorded so that a later run
resumes the same execution (same ``policy_id``, same idempotency keys).

A policy that has waited ``PollingSettings.wait_handoff_seconds`` for readiness is handed off: the
run lets it go (waiting, not failed) and `progress.py` polls it outside any run.

Serves the three workflow assets. This module holds `PolicyWorkflow` and the run that ties
the other engine modules together (the writer's loop, entering policies, passing and failing
steps). Each step's rules are in the module named after its asset:

- ``policy_created`` -> `policy_created.py`
- ``policy_ready`` -> `policy_ready.py`
- ``circuit_breaker_activation`` -> `circuit_breaker_activation.py`

and the machinery they share: `scheduling.py` (call queue, priorities, workers), `leases.py`
(acquire/renew/take over), `auditing.py` (`AttemptRecorder`, audit events), `run_state.py`
(each policy's track, the pending writes), `steps.py` (what a run reports). The settings
(`PollingSettings`, `LeaseSettings`) are `core/settings.py`'s; the step names and the state
machine are `core/domain.py`'s.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Collection, Mapping, Sequence

from policy_pipeline.core.domain import (
    RESUME_FROM,
    STEP_CIRCUIT,
    STEP_CREATE,
    STEP_READY,
    STEPS,
    ExecutionStatus,
    PolicyDefinition,
)
from policy_pipeline.core.engine.auditing import warning_event
from policy_pipeline.core.engine.circuit_breaker_activation import CircuitBreakerActivationStep
from policy_pipeline.core.engine.guard import ApiGuard
from policy_pipeline.core.engine.leases import Leases
from policy_pipeline.core.engine.policy_created import PolicyCreatedStep
from policy_pipeline.core.engine.policy_ready import PolicyReadyStep
from policy_pipeline.core.engine.run_state import Logger, Track, Writes
from policy_pipeline.core.engine.scheduling import Scheduler
from policy_pipeline.core.engine.steps import (
    Progress,
    RunReport,
    StepFailed,
    StepOutcome,
    StepReport,
)
from policy_pipeline.core.liveness import certainly_gone
from policy_pipeline.core.policy_api import PolicyApiClient
from policy_pipeline.core.policy_api_types import ApiResponse
from policy_pipeline.core.settings import LeaseSettings, PollingSettings
from policy_pipeline.core.store.connection import WarehouseUnavailable
from policy_pipeline.core.store.state_store import ExecutionRow, StateStore

# Per-policy log lines only for small runs; a thousand-policy run logs summaries.
DETAILED_LOG_LIMIT = 25
# Writes wait at most this long to be batched with others (each batch is a few statements).
FLUSH_SECONDS = 0.5
# How often the writer re-reads the shared API guard (another process may have opened it).
GUARD_REFRESH_SECONDS = 2.0
# How soon a batch that found no warehouse is tried again (at most a third of the lease TTL),
# and after how many lease TTLs without one the run gives up.
WAREHOUSE_RETRY_SECONDS = 2.0
WAREHOUSE_GIVE_UP_TTLS = 10
# The API refuses our credentials: a configuration error, the same for every policy. (A 403
# may be about one policy only, so it fails just that policy, resumable like any poll error.)
AUTH_STATUSES = frozenset({401})


class PolicyWorkflow:
    """The three steps for any number of policies, each policy on its own."""

    def __init__(
        self,
        store: StateStore,
        api: PolicyApiClient,
        owner: str,
        log: Logger,
        lease: LeaseSettings | None = None,
        max_concurrency: int = 16,
        flush_seconds: float = FLUSH_SECONDS,
        holder_gone: Callable[[str], bool] = certainly_gone,
        guard: ApiGuard | None = None,
    ) -> None:
        self.store = store
        self.api = api
        self.owner = owner
        self.log = log
        self.lease = lease or LeaseSettings()
        self.max_concurrency = max(1, max_concurrency)
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
        polling: PollingSettings | None = None,
        force_new: bool = False,
        recreate_failed: bool = True,
        on_progress: Callable[[Progress], None] | None = None,
        stop: threading.Event | None = None,
    ) -> RunReport:
        """Take every named policy through the chosen steps (in the workflow's order).

        ``definitions`` are what the create step creates (the catalog's content; an active
        execution of other content is superseded). A policy whose current content has
        already completed is not created again (the same content is one policy), unless
        ``force_new`` asks for a new execution. With ``recreate_failed`` off (an automatic
        retry of a run), a policy whose current content finally failed is not created again:
        automation resumes what it can and starts nothing over. Setting ``stop`` ends the run
        early: calls in flight are answered and written, and nothing new starts."""
        unknown = set(steps) - set(STEPS)
        if unknown:
            raise ValueError(f"unknown workflow steps: {sorted(unknown)}")
        # A policy without a definition (its catalog file was deleted) goes on only from what
        # its execution stored; the create step creates nothing for it (`policy_created.py`).
        definitions = definitions or {}
        return _Run(
            self,
            list(dict.fromkeys(names)),
            [step for step in STEPS if step in steps],
            definitions,
            polling or PollingSettings(),
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

    def wait_until_ready(self, names: Sequence[str], polling: PollingSettings) -> StepReport:
        return self.run(names, [STEP_READY], polling=polling).step(STEP_READY)

    def activate_circuit_breakers(self, names: Sequence[str]) -> StepReport:
        return self.run(names, [STEP_CIRCUIT]).step(STEP_CIRCUIT)

    def activate_circuit_breaker(self, policy_name: str) -> StepOutcome:
        """One policy (the operator CLI); raises StepFailed."""
        report = self.activate_circuit_breakers([policy_name])
        if policy_name in report.failures:
            raise StepFailed(policy_name, STEP_CIRCUIT, report.failures[policy_name])
        return report.outcomes[policy_name]


class _Run:
    """One call of `PolicyWorkflow.run`: the writer (the calling thread), the call workers
    (`Scheduler`), the leases, every policy's track, and the rules of each step. It is the
    `RunContext` the step rules work through."""

    def __init__(
        self,
        workflow: PolicyWorkflow,
        names: list[str],
        steps: list[str],
        definitions: Mapping[str, PolicyDefinition],
        polling: PollingSettings,
        force_new: bool,
        recreate_failed: bool,
        on_progress: Callable[[Progress], None],
        stop: threading.Event,
    ) -> None:
        self.wf = workflow
        self.store = workflow.store
        self.api = workflow.api
        self.guard = workflow.guard
        self.log = workflow.log
        self.names = names
        self.steps = steps
        self.on_progress = on_progress
        self.stop = stop
        self.verbose = len(names) <= DETAILED_LOG_LIMIT
        self.report = RunReport()
        self.tracks = {name: Track(name, list(steps)) for name in names}
        self.unfinished = len(names)
        self.creation = PolicyCreatedStep(self, definitions, force_new, recreate_failed)
        self.readiness = PolicyReadyStep(self, polling)
        self.circuit = CircuitBreakerActivationStep(self)
        self.rules: dict[
            str, PolicyCreatedStep | PolicyReadyStep | CircuitBreakerActivationStep
        ] = {
            STEP_CREATE: self.creation,
            STEP_READY: self.readiness,
            STEP_CIRCUIT: self.circuit,
        }
        # Shared with the workers; guards everything below.
        self.changed = threading.Condition()
        calls = {rules.call: rules for rules in self.rules.values()}
        self.scheduler = Scheduler(self.changed, stop, workflow.guard, calls)
        self.writes = Writes()
        # The writer's own.
        self.next_flush = 0.0
        self.leases = Leases(
            self.store,
            workflow.owner,
            workflow.lease,
            workflow.holder_gone,
            workflow.log,
            self.changed,
        )
        self.lost: set[str] = set()  # policies whose lease another run acquired meanwhile
        # While the warehouse cannot be reached: no batch is tried before this (monotonic).
        self.unreachable_until = 0.0
        self.unreachable_since: float | None = None
        self.guard_refresh_at = 0.0
        self.halted: str | None = None  # why the run stopped starting calls (credentials)

    # --- the writer ----------------------------------------------------------------------------

    def execute(self) -> RunReport:
        if not self.names:
            return self.report
        workers = self.scheduler.workers(min(self.wf.max_concurrency, len(self.names)))
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
                    if self.scheduler.worker_error is not None:
                        raise self.scheduler.worker_error
                    if self._finished():
                        break
                    stopping = self.stop.is_set() and self.scheduler.in_flight == 0
                    # Counted from this batch's start: a batch that took longer than the
                    # interval is followed at once by the next (group commit).
                    self.next_flush = time.monotonic() + self.wf.flush_seconds
                try:
                    self._batch()
                except WarehouseUnavailable as exc:
                    self._unreachable(exc)
                    continue
                self._refresh_guard()  # outside the batch: the guard takes its own lock first
                if stopping:
                    self.log.warning(
                        f"the run was stopped: {self.unfinished} policies left where they are; "
                        "a later run resumes them"
                    )
                    if self.halted is not None:
                        with self.changed:
                            for track in self.tracks.values():
                                if track.steps:
                                    self.fail(track, track.steps[0], f"not run: {self.halted}")
                    break
        finally:
            self.scheduler.close()
            for worker in workers:
                if worker.is_alive():
                    worker.join()
            try:
                with self.store.batch():
                    self.store.flush()
                    self.leases.release_all()
            except WarehouseUnavailable as exc:
                # The leases lapse within the TTL; the audit events of this last batch are lost.
                self.log.warning(f"the run's leases could not be released: {exc}")
        return self.report

    def _batch(self) -> None:
        """One connection per batch: renew the leases when due (first, so that what follows
        is written under leases just confirmed), claim the leases waited for, and write what
        the answers taught. Opening the connection is the one wait on the warehouse; if it
        fails nothing was written and the batch is tried again."""
        with self.store.batch():
            now = time.monotonic()
            if self.leases.renewal_due(now):
                lost = self.leases.renew()
                with self.changed:
                    self.scheduler.unpark(lost)  # the calls it confirmed go on
                self._lost(lost)
            if self.leases.retry_due(now):
                self.leases.retry(self._enter, self._give_up)
            with self.changed:
                writes, self.writes = self.writes, Writes()
            if self.lost:
                writes = writes.without(self.lost)
            self._write(writes)
        if self.unreachable_since is not None:
            self.log.warning(
                f"the warehouse answers again after {time.monotonic() - self.unreachable_since:.0f}"
                f"s; the run goes on with the {len(self.leases.held)} policies it still holds"
            )
            self.unreachable_since = None

    def _unreachable(self, exc: WarehouseUnavailable) -> None:
        """The batch found no warehouse: its writes wait, no call starts past a lease's fence
        meanwhile (`scheduling.py`), and the batch is tried again shortly."""
        now = time.monotonic()
        if self.unreachable_since is None:
            self.unreachable_since = now
            self.log.warning(
                f"the warehouse cannot be reached ({exc}); no API call starts for a policy "
                "whose lease is not confirmed, and the run keeps trying"
            )
        elif now - self.unreachable_since > WAREHOUSE_GIVE_UP_TTLS * self.wf.lease.ttl_seconds:
            # Its leases lapsed long ago: whoever resumes the policies (the progress sensor,
            # another run) holds them now. The run ends; what it did not write, they redo.
            raise WarehouseUnavailable(
                f"the warehouse could not be reached for {now - self.unreachable_since:.0f}s; "
                "the run ends and leaves its policies as the warehouse last recorded them "
                f"(resumable): {exc}"
            ) from exc
        self.unreachable_until = now + min(WAREHOUSE_RETRY_SECONDS, self.wf.lease.renew_seconds)

    def _lost(self, lost: set[str]) -> None:
        """Another run acquired these policies' leases after they lapsed: stop them here,
        writing nothing more for them (the state is theirs now; it stays resumable)."""
        if not lost:
            return
        self.lost |= lost
        self.log.warning(
            f"{len(lost)} leases were taken by another run after they lapsed "
            f"({', '.join(sorted(lost)[:10])}{', ...' if len(lost) > 10 else ''}): "
            "this run stops working on them and leaves them to it"
        )
        with self.changed:
            for name in sorted(lost):
                track = self.tracks[name]
                if track.steps:
                    self.fail(
                        track,
                        track.steps[0],
                        "this run's lease lapsed while the warehouse could not be reached and "
                        "another run took the policy over; left to that run",
                    )

    def _wake(self) -> bool:
        return (
            self.scheduler.worker_error is not None
            or self._finished()
            or self._timer_due()
            # The answers in flight first.
            or (self.stop.is_set() and self.scheduler.in_flight == 0)
        )

    def _finished(self) -> bool:
        return self.unfinished == 0 and self.scheduler.in_flight == 0 and not self.writes

    def _timer_due(self) -> bool:
        now = time.monotonic()
        if now < self.unreachable_until:
            return False
        if self.writes and now >= self.next_flush:
            return True
        return self.leases.timer_due(now)

    def _next_timer(self) -> float:
        timers = [self.leases.next_timer()]
        if self.writes:
            timers.append(self.next_flush)
        return max(min(timers), self.unreachable_until)

    def _start(self) -> None:
        """Fail everything at once while the guard is open; otherwise claim the leases and
        set every policy on its way."""
        guard = self.guard
        reason = guard.blocks_calls() if guard is not None else None
        if reason is not None:
            self.log.warning(reason)
            for track in self.tracks.values():
                self.fail(track, track.steps[0], reason)
            return
        held = self.leases.acquire(self.names, self.tracks)
        self.guard_refresh_at = time.monotonic() + GUARD_REFRESH_SECONDS
        self._enter(held)
        with self.changed:
            writes, self.writes = self.writes, Writes()
        self._write(writes)

    def _write(self, writes: Writes) -> None:
        """One batch: each kind of write is one statement (and its read-back) for all the
        policies in it, in this order (a claim follows the writes that passed it). As a write
        commits, its policies go on at once."""
        store = self.store
        for message in writes.warnings:
            self.log.warning(message)
        if writes.intents:
            self.creation.write_intents(writes.intents)
        if writes.polls:
            self.readiness.write_polls(writes.polls)
        if writes.handoffs:
            self.readiness.write_handoffs(writes.handoffs, writes.claims)
        if writes.created:
            self.creation.write_created(writes.created, writes.claims)
        if writes.ready:
            self.readiness.write_ready(writes.ready, writes.claims)
        if writes.claims:
            self.circuit.write_claims(writes.claims)
        if writes.completed:
            self.circuit.write_completed(writes.completed)
        for column, kept in writes.kept.items():
            store.set_responses(column, [(t.execution, body) for t, body in kept.items()])
        if writes.failed:
            store.mark_errors(
                [(f.track.execution, f.error, f.step, f.resumable) for f in writes.failed]
            )
            with self.changed:
                for failure in writes.failed:
                    self.fail(failure.track, failure.step, failure.error)
        self.leases.release()
        store.flush()  # the audit events no state change above wrote

    def _refresh_guard(self) -> None:
        now = time.monotonic()
        if self.guard is not None and now >= self.guard_refresh_at:
            self.guard.refresh()
            self.guard_refresh_at = now + GUARD_REFRESH_SECONDS

    def _give_up(self, refused: list[tuple[Track, str]]) -> None:
        """Policies whose lease another run kept beyond the lease wait."""
        with self.changed:
            for track, error in refused:
                self.fail(track, track.steps[0], error)

    # --- entering and passing steps ----------------------------------------------------------

    def _enter(self, tracks: list[Track]) -> None:
        """Read the policies' executions (reopening recoverable errors of the chosen steps)
        and set each on its first step. Called by the writer, without ``changed`` held."""
        if not tracks:
            return
        current = self.store.current_executions([t.name for t in tracks])
        current = self._resume_errors(current)
        self.creation.read(tracks, current)
        with self.changed:
            for track in tracks:
                track.row = current.get(track.name)
                track.resumed = True
                self.begin(track, self.writes.claims)

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
                self.detail(f"policy '{row.policy_name}': resuming after {row.error_message}")
        return current

    # The methods below (the `RunContext` the step rules use) are called with ``changed`` held.

    def begin(self, track: Track, claims: list[Track]) -> None:
        """Start the track's next step: a call, a write, or (when the state is already past
        it) passing it at once."""
        if track.recorder is not None:
            track.calls_before = track.recorder.calls
            track.latency_before = track.recorder.latency_ms
        self.rules[track.steps[0]].begin(track, claims)

    def passed(self, track: Track, message: str, claims: list[Track]) -> None:
        step = track.steps.pop(0)
        assert track.row is not None
        outcome = track.outcome(message)
        self.report.outcomes[step][track.name] = outcome
        self.on_progress(Progress(track.name, step, outcome=outcome))
        if track.steps:
            track.resumed = True
            self.begin(track, claims)
        else:
            self.finish(track)

    def fail(self, track: Track, step: str, error: str) -> None:
        self.report.failures[track.name] = (step, error)
        self.on_progress(Progress(track.name, step, error=error))
        self.finish(track)

    def finish(self, track: Track) -> None:
        track.steps = []
        self.unfinished -= 1
        self.leases.finished(track.name)  # another run may take it from now on

    def schedule(self, call: str, track: Track, delay: float = 0.0) -> None:
        self.scheduler.schedule(call, track, delay)

    def refused_credentials(self, response: ApiResponse) -> bool:
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

    def warn(self, track: Track, message: str) -> None:
        self.writes.warnings.append(f"policy '{track.name}': {message}")
        self.store.audit(
            warning_event(track.row.execution_id if track.row else None, track.name, message)
        )

    def detail(self, message: str) -> None:
        if self.verbose:
            self.log.info(message)
