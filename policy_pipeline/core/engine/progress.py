"""Progress outside runs: nothing waits on a person.

Two jobs, done by one tick of `policy_progress_sensor` (plain Python here; the sensor turns the
reports into Dagster events and run requests):

- **Waiting without a held run.** A run hands off a policy that has waited long for readiness
  (`PollingSettings.wait_handoff_seconds`); from then on each tick polls the handed-off
  policies that are due, in one batch, through the driver a run uses (`driver.py`) and the
  flow `flow.poll_handed_off`: at most ``max_concurrency`` calls in flight, within a time
  budget, one attempt per poll (a transient failure is simply polled again later),
  ``Retry-After`` and the API guard honoured. Every poll is read (`flow.poll_once`) and
  recorded as a run reads and records it (``poll_count``, ``last_poll_time``, the response,
  the audit event). A policy found ready is
  moved to ``policy_ready`` by the same conditional update a run uses, and claimed by this
  tick, so that exactly one tick reports it and requests its circuit-breaker run.
- **Automatic resumption.** An execution nothing is moving (an active one whose lease lapsed:
  its run crashed, was stopped, or failed around it; or a resumable error) is resumed with
  exponential backoff, by a run whose request this tick claimed in the warehouse (one tick
  wins each resumption). After ``resume_max_attempts`` automatic resumptions it ends ``error``
  for good, and the caller raises the alert.

Warehouse statements per tick are a handful whatever the number of waiting policies: the due
ones are read with a LIMIT and each kind of write is one statement for the whole batch.
"""

from __future__ import annotations

import math
import threading
import time
import uuid
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field

from policy_pipeline.core.domain import (
    RESUME_FROM,
    STEP_CIRCUIT,
    STEP_CREATE,
    STEP_READY,
    ExecutionStatus,
)
from policy_pipeline.core.engine.driver import Driver
from policy_pipeline.core.engine.effects import Logger, Track
from policy_pipeline.core.engine.flow import TickPolls, poll_handed_off
from policy_pipeline.core.engine.guard import ApiGuard
from policy_pipeline.core.engine.policy_created import deleted_before_create
from policy_pipeline.core.liveness import lease_owner
from policy_pipeline.core.policy_api import PolicyApiClient
from policy_pipeline.core.settings import PollingSettings, ProgressSettings
from policy_pipeline.core.store.state_store import ExecutionRow, StateStore

# How long the sensor holds a policy's lease to retire its intent (one statement).
RETIRE_LEASE_SECONDS = 30
# The step an active execution is in, by status (where it is resumed, where it ends): the
# step that starts from that status.
STEP_OF_STATUS = {status: step for step, status in RESUME_FROM.items()}


@dataclass
class WaitReport:
    due: int = 0
    polled: int = 0
    api_calls: int = 0
    ready: list[ExecutionRow] = field(default_factory=list)  # claimed: report, request run
    failed: list[tuple[ExecutionRow, str]] = field(default_factory=list)  # ended by this tick
    cut_short: bool = False  # more were due than the batch or the budget allowed
    retry_after: float | None = None  # the API asked us to back off this long
    blocked: str | None = None  # why no poll was made (the guard is open)


@dataclass
class ResumeReport:
    candidates: int = 0
    backing_off: int = 0
    # Not in the catalog, never created, its lease held by a run: left to that run.
    unknown: list[str] = field(default_factory=list)
    # Not in the catalog and never created: retired by this tick (row, why).
    retired: list[tuple[ExecutionRow, str]] = field(default_factory=list)
    busy: int = 0  # a resumption run for it is queued or running already
    resumed: list[tuple[ExecutionRow, str]] = field(default_factory=list)  # row, run kind
    gave_up: list[tuple[ExecutionRow, str]] = field(default_factory=list)  # row, error
    deferred: int = 0  # due, but no run may be launched now (queue full, guard open)


class _TickDriver(Driver):
    """The driver of one tick's polls: no leases (the conditional updates guard the writes),
    one batch of writes once every answer is in, and what it reports is what the tick found."""

    def __init__(self, tick: ProgressTick) -> None:
        super().__init__(
            tick.store,
            tick.log,
            tick.guard,
            tick.max_concurrency,
            math.inf,
            threading.Event(),
            flush_when_idle=True,
            call_deadline=time.monotonic() + tick.settings.tick_budget_seconds,
        )
        self.found = TickPolls()

    def failed(self, track: Track, step: str, error: str, now: ExecutionRow | None) -> None:
        if now is not None and now.status is ExecutionStatus.ERROR:
            self.found.failed.append((track.execution, error))


@dataclass
class ProgressTick:
    """One evaluation of the progress sensor."""

    store: StateStore
    api: PolicyApiClient
    settings: ProgressSettings
    polling: PollingSettings
    max_concurrency: int
    log: Logger
    guard: ApiGuard | None = None
    # Which tick claimed what: two ticks racing never both win an execution.
    token: str = field(default_factory=lambda: f"tick:{uuid.uuid4().hex}")

    # --- waiting policies -----------------------------------------------------------------------

    def poll_waiting(self, lead_seconds: float = 0.0) -> WaitReport:
        """Poll the handed-off policies due now (or within ``lead_seconds``, so that one wake
        of the warehouse serves the policies due before the next one)."""
        report = WaitReport()
        blocked = self.guard.blocks_calls() if self.guard is not None else None
        if blocked is not None:
            report.blocked = blocked
            return report
        due = self.store.due_waits(self.settings.wait_poll_batch, lead_seconds)
        report.due = len(due)
        report.cut_short = len(due) >= self.settings.wait_poll_batch
        deadline = self.settings.wait_deadline_seconds
        overdue = [(row, waited) for row, waited in due if waited > deadline]
        if overdue:
            ended = self.store.give_up(
                [
                    (
                        row,
                        STEP_READY,
                        f"policy {row.policy_id} not ready after waiting {waited}s "
                        f"(POLICY_WAIT_DEADLINE_SECONDS={deadline:.0f})",
                    )
                    for row, waited in overdue
                ],
                self.token,
            )
            report.failed += [
                (row, f"not ready after waiting {waited}s")
                for row, waited in overdue
                if row.execution_id in ended
            ]
        polled = [(row, waited) for row, waited in due if waited <= deadline]
        found = self._poll(polled)
        report.polled = found.polled
        report.api_calls = found.polled  # one attempt per poll
        report.ready += found.ready
        report.retry_after = found.retry_after
        report.failed += found.failed
        if found.polled < len(polled):
            report.cut_short = True
        return report

    def _poll(self, due: list[tuple[ExecutionRow, int]]) -> TickPolls:
        """One poll per due policy (`flow.poll_handed_off`), through the driver a run uses:
        at most ``max_concurrency`` in flight, until the budget is spent or the API asks us
        to back off; then one batch of writes for every answer."""
        driver = _TickDriver(self)
        found = driver.found
        with driver.changed:
            for row, waited in due:
                if row.policy_id is None:
                    continue
                track = Track(row.policy_name, row=row, step=STEP_READY, lease_until=math.inf)
                flow = poll_handed_off(track, self.api, self.polling, waited, self.token, found)
                driver.start(track, flow)
        if driver.tracks:
            driver.drive(len(driver.tracks))
        return found

    # --- resumption -----------------------------------------------------------------------------

    def resume_stranded(
        self,
        known: Collection[str] | None,
        busy: Collection[str],
        launch: bool,
        contents: Mapping[str, str] | None = None,
    ) -> ResumeReport:
        """Claim the resumption of every execution that nothing moves and whose backoff has
        passed; end for good those whose budget is spent. Policies in ``busy`` (a run that
        resumes them has not started or finished yet) are left alone. ``launch`` false (the run
        queue is full, the guard is open) defers the resumptions but still ends the spent
        ones. A policy not in the catalog (``known``) is resumed if its policy was created
        (the steps after the create need no catalog) and its intent retired otherwise.
        ``contents`` (catalog content hash by policy) picks the run for an execution whose
        content has changed since (`run_kind`)."""
        report = ResumeReport()
        candidates = self.store.resume_candidates(self.settings.resume_batch)
        report.candidates = len(candidates)
        due: list[ExecutionRow] = []
        orphans: list[ExecutionRow] = []
        for row, idle in candidates:
            if row.policy_name in busy:
                report.busy += 1
            elif known is not None and row.policy_name not in known and row.policy_id is None:
                orphans.append(row)
            elif idle < self.settings.resume_backoff(row.auto_resume_count):
                report.backing_off += 1
            else:
                due.append(row)
        spent = [row for row in due if row.auto_resume_count >= self.settings.resume_max_attempts]
        if spent:
            errors = {row.execution_id: _give_up_message(row) for row in spent}
            ended = self.store.give_up(
                [(row, _step(row), errors[row.execution_id]) for row in spent], self.token
            )
            report.gave_up = [
                (row, errors[row.execution_id]) for row in spent if row.execution_id in ended
            ]
        report.retired = self._retire_orphans(orphans)
        retired = {row.execution_id for row, _error in report.retired}
        report.unknown = [row.policy_name for row in orphans if row.execution_id not in retired]
        rest = [row for row in due if row.auto_resume_count < self.settings.resume_max_attempts]
        if not launch:
            report.deferred = len(rest)
            return report
        claimed = self.store.claim_resumes(rest, self.token, "policy_progress_sensor")
        report.resumed = [
            (row, run_kind(row, contents)) for row in rest if row.execution_id in claimed
        ]
        return report

    def _retire_orphans(self, rows: list[ExecutionRow]) -> list[tuple[ExecutionRow, str]]:
        """Intents whose catalog file was deleted before their policy was created: nothing
        creates them any more. Each is retired under its policy's lease, taken for the
        moment (one a run holds is left to that run, which retires it the same way)."""
        if not rows:
            return []
        owner = lease_owner(f"sensor:{self.token}")
        held = self.store.acquire_leases(
            sorted({row.policy_name for row in rows}), owner, RETIRE_LEASE_SECONDS
        )
        entries = [
            (
                row,
                _step(row),
                deleted_before_create(row.policy_name),
                {"reason": "catalog_file_deleted", "content_hash": row.policy_content_hash},
            )
            for row in rows
            if row.policy_name in held
        ]
        try:
            after = self.store.retire(entries) if entries else {}
        finally:
            self.store.release_leases(sorted(held), owner)
        retired = []
        for row, _step_name, error, _detail in entries:
            now = after.get(row.execution_id)
            if now is not None and now.status is ExecutionStatus.ERROR and not now.resumable:
                retired.append((row, error))
        return retired


def superseded(row: ExecutionRow, contents: Mapping[str, str]) -> bool:
    """Whether the catalog now holds other content than this execution's."""
    digest = contents.get(row.policy_name)
    return digest is not None and row.policy_content_hash not in (None, digest)


def run_kind(row: ExecutionRow, contents: Mapping[str, str] | None = None) -> str:
    """What a resumption runs: only the circuit breaker for an execution that is ready (or
    failed calling it), else the whole workflow, whose earlier steps pass at once for what
    is already done. An execution whose catalog content has changed since gets the whole
    workflow: it is finished (or retired), then the new content is created."""
    if contents is not None and superseded(row, contents):
        return "workflow"
    if row.status is ExecutionStatus.POLICY_READY:
        return "circuit"
    if row.status is ExecutionStatus.ERROR and row.error_step == STEP_CIRCUIT:
        return "circuit"
    return "workflow"


def _step(row: ExecutionRow) -> str:
    return row.error_step or STEP_OF_STATUS.get(row.status, STEP_CREATE)


def _give_up_message(row: ExecutionRow) -> str:
    where = row.error_message or f"stranded in '{row.status}'"
    return (
        f"gave up after {row.auto_resume_count} automatic resumptions "
        f"(POLICY_RESUME_MAX_ATTEMPTS): {where}"
    )


def group_runs(
    ordered: Sequence[str], kinds: dict[str, str]
) -> list[tuple[str, str, str, list[str]]]:
    """(kind, first, last, names): the policies to resume as runs. A run takes a range of
    partitions, not an arbitrary set, so neighbours of one kind share a run and the others
    get one each; a range never includes a policy that is not being resumed."""
    groups: list[tuple[str, str, str, list[str]]] = []
    current: list[str] = []
    kind = ""
    for name in ordered:
        if name in kinds and (not current or kinds[name] == kind):
            current.append(name)
            kind = kinds[name]
            continue
        if current:
            groups.append((kind, current[0], current[-1], current))
        current, kind = ([name], kinds[name]) if name in kinds else ([], "")
    if current:
        groups.append((kind, current[0], current[-1], current))
    return groups
