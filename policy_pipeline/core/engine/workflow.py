"""The workflow engine's entry point: every policy of a run goes create -> ready -> circuit
breaker on its own, as soon as it can, whatever the other policies do.

Plain Python over the state store and the Policy API (no Dagster). What happens to one policy
is `flow.policy_workflow`, read top to bottom; the driver (`driver.py`) runs every policy's
flow at once (the calls, at most ``max_concurrency`` in flight, most urgent first; the writes,
in batches). This module holds `PolicyWorkflow` and what a run adds to the driver:

- the leases (`leases.py`): acquired as the run starts, renewed every third of the TTL (a
  renewal that confirms fewer leases than the run holds stops those policies), retried for
  the policies another run holds, released as each policy finishes;
- what it reports: each policy passing (or failing) each step, to ``on_progress`` and in the
  `RunReport`;
- a warehouse that cannot be reached: the writes wait, no call starts past a lease's fence,
  the batch is tried again, and the run ends after ``WAREHOUSE_GIVE_UP_TTLS`` lease TTLs.

The original rules hold per policy: the intent is committed before the create call, the
circuit breaker is called only after the state row says ``policy_ready`` (the API said so,
and a conditional update agreed) and after a conditional claim, and a failure in one step
keeps the steps before it recorded. A recoverable failure is recorded so that a later run
resumes the same execution (same ``policy_id``, same idempotency keys).

A policy that has waited ``PollingSettings.wait_handoff_seconds`` for readiness is handed off:
the run lets it go (waiting, not failed) and `progress.py` polls it outside any run.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Collection, Mapping, Sequence

from policy_pipeline.core.domain import (
    STEP_CIRCUIT,
    STEP_CREATE,
    STEP_READY,
    STEPS,
    ExecutionStatus,
    PolicyDefinition,
)
from policy_pipeline.core.engine.driver import Batch, Driver
from policy_pipeline.core.engine.effects import Logger, Track
from policy_pipeline.core.engine.flow import RunPlan, policy_workflow
from policy_pipeline.core.engine.guard import ApiGuard
from policy_pipeline.core.engine.leases import Leases
from policy_pipeline.core.engine.steps import (
    Progress,
    RunReport,
    StepFailed,
    StepOutcome,
    StepReport,
)
from policy_pipeline.core.liveness import certainly_gone
from policy_pipeline.core.policy_api import PolicyApiClient
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
        # its execution stored; the create step creates nothing for it (`flow.create_policy`).
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


class _Run(Driver):
    """One call of `PolicyWorkflow.run`: the driver with the run's leases, its report, and
    the policies entering as their leases are acquired."""

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
        super().__init__(
            workflow.store,
            workflow.log,
            workflow.guard,
            workflow.max_concurrency,
            workflow.flush_seconds,
            stop,
        )
        self.wf = workflow
        self.names = names
        self.steps = steps
        self.on_progress = on_progress
        self.report = RunReport()
        self.plan = RunPlan(
            workflow.api,
            workflow.log,
            steps,
            definitions,
            polling,
            force_new,
            recreate_failed,
            verbose=len(names) <= DETAILED_LOG_LIMIT,
        )
        self.entering = {name: Track(name, step=steps[0]) for name in names}
        self.leases = Leases(
            self.store,
            workflow.owner,
            workflow.lease,
            workflow.holder_gone,
            workflow.log,
            self.changed,
        )
        self.lost: set[str] = set()  # policies whose lease another run acquired meanwhile
        self.guard_refresh_at = 0.0

    def execute(self) -> RunReport:
        if not self.names:
            return self.report
        reason = self.guard.blocks_calls() if self.guard is not None else None
        if reason is not None:
            self.log.warning(reason)
            with self.changed:
                for track in self.entering.values():
                    self.failed(track, track.step, reason, None)
            return self.report
        try:
            with self.changed:
                for track in self.entering.values():
                    self.add(track)
            with self.store.batch():  # one connection for the leases, reads and first writes
                held = self.leases.acquire(self.names, self.entering)
                self.guard_refresh_at = time.monotonic() + GUARD_REFRESH_SECONDS
                self._enter(held)
                self.write_batch()
            self.drive(len(self.names))
        finally:
            try:
                with self.store.batch():
                    self.store.flush()
                    self.leases.release_all()
            except WarehouseUnavailable as exc:
                # The leases lapse within the TTL; the audit events of this last batch are lost.
                self.log.warning(f"the run's leases could not be released: {exc}")
        return self.report

    def _enter(self, tracks: list[Track]) -> None:
        """Read what the policies' flows start from (their current executions; when the run
        creates, their completed content and the stored bodies of their intents) and set each
        flow going. Called by the writer in a batch, without ``changed`` held."""
        if not tracks:
            return
        names = [t.name for t in tracks]
        current = self.store.current_executions(names)
        plan = self.plan
        if STEP_CREATE in self.steps:
            if not plan.force_new:
                for done in self.store.completed_executions(names):
                    if done.policy_content_hash is not None:
                        by_hash = plan.completed.setdefault(done.policy_name, {})
                        by_hash.setdefault(done.policy_content_hash, done)
            # A resumed intent re-sends exactly the body it stored (a recoverable error of
            # the create step is reopened as an intent).
            intents = [
                row.execution_id
                for row in current.values()
                if row.status is ExecutionStatus.PENDING
                or (
                    row.status is ExecutionStatus.ERROR
                    and row.resumable
                    and (row.error_step or STEP_CREATE) == STEP_CREATE
                )
            ]
            plan.bodies.update(self.store.policy_data(intents) if intents else {})
        with self.changed:
            for track in tracks:
                track.row = current.get(track.name)
                self.start(track, policy_workflow(track, plan))

    # --- the driver's hooks ---------------------------------------------------------------------

    def passed(self, track: Track, step: str, message: str) -> None:
        outcome = track.outcome(message)
        self.report.outcomes[step][track.name] = outcome
        self.on_progress(Progress(track.name, step, outcome=outcome))
        track.resumed = True  # the next step starts from what is done

    def failed(self, track: Track, step: str, error: str, now: ExecutionRow | None) -> None:
        self.report.failures[track.name] = (step, error)
        self.on_progress(Progress(track.name, step, error=error))

    def handed_off(self, track: Track, message: str) -> None:
        self.report.waiting[track.name] = message
        self.on_progress(Progress(track.name, track.step, waiting=message))

    def finished(self, track: Track) -> None:
        self.leases.finished(track.name)  # another run may take it from the next batch

    def next_timer(self) -> float:
        return self.leases.next_timer()

    def before_writes(self) -> None:
        """Renew the leases when due (first, so that what follows is written under leases
        just confirmed), and claim the leases waited for."""
        now = time.monotonic()
        if self.leases.renewal_due(now):
            lost = self.leases.renew()
            with self.changed:
                self.unpark(lost)  # the calls it confirmed go on
            self._lost(lost)
        if self.leases.retry_due(now):
            self.leases.retry(self._enter, self._give_up)

    def kept_writes(self, batch: Batch) -> Batch:
        return batch.without(self.lost) if self.lost else batch

    def after_writes(self) -> None:
        self.leases.release()
        now = time.monotonic()
        if self.guard is not None and now >= self.guard_refresh_at:
            # The guard takes its own lock first: refreshed after the batch's statements.
            self.guard.refresh()
            self.guard_refresh_at = now + GUARD_REFRESH_SECONDS

    def stopped(self) -> None:
        self.log.warning(
            f"the run was stopped: {self.unfinished} policies left where they are; "
            "a later run resumes them"
        )
        if self.halted is not None:
            with self.changed:
                for track in list(self.tracks.values()):
                    if not track.done:
                        self.stop_track(track, f"not run: {self.halted}")

    def unreachable(self, exc: WarehouseUnavailable) -> None:
        """The batch found no warehouse: its writes wait, no call starts past a lease's fence
        meanwhile, and the batch is tried again shortly."""
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

    # --- leases ---------------------------------------------------------------------------------

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
                track = self.tracks.get(name)
                if track is not None and not track.done:
                    self.stop_track(
                        track,
                        "this run's lease lapsed while the warehouse could not be reached and "
                        "another run took the policy over; left to that run",
                    )

    def _give_up(self, refused: list[tuple[Track, str]]) -> None:
        """Policies whose lease another run kept beyond the lease wait."""
        with self.changed:
            for track, error in refused:
                self.fail(track, track.step, error)
