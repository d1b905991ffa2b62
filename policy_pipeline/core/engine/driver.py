"""The driver: runs any number of policy flows (`flow.py`) at once, each on its own.

One thread (the writer, the caller of `Driver.drive`) and ``max_concurrency`` call workers:

- the workers take whichever call is due next from one schedule, most urgent first
  (``CALL_ORDER``: a circuit breaker before a poll before a create; when the API's limit is
  the bottleneck, ready policies finish first and new ones wait their turn), so at most
  ``max_concurrency`` calls are in flight, and a slow or failing policy only ever occupies the
  worker of its own call. A call whose policy's lease is past its fence (`Track.lease_until`)
  does not start: it is parked until a renewal confirms the lease (`workflow.py`).
- the writer commits what the flows asked to write, in batches (group commit): whatever has
  gathered since the last batch, at most ``flush_seconds`` apart (or, with
  ``flush_when_idle``, once nothing else can move). Each kind of write is one statement for
  every policy in the batch, in the order of ``WRITE_ORDER``; as a write commits, each flow
  gets its row back and goes on at once. A flow that yields a later kind of write while the
  batch runs joins the same batch (a claim right after the ready write).

A flow is advanced only with ``changed`` held, by the thread that has its answer, so flows
need no locks of their own. Setting ``stop`` ends the driving: calls in flight are answered
and written, and nothing new starts.

A run of the workflow (`workflow.py`) adds the leases and what it reports; a tick of the
progress sensor (`progress.py`) drives its polls through this class as it is.
"""

from __future__ import annotations

import heapq
import itertools
import math
import threading
import time
from collections.abc import Callable
from typing import Any

from policy_pipeline.core.domain import TRIGGER_REASON, circuit_idempotency_key
from policy_pipeline.core.engine import effects
from policy_pipeline.core.engine.auditing import LeaseFenced, warning_event
from policy_pipeline.core.engine.effects import CALL_ORDER, Call, Flow, Logger, Track
from policy_pipeline.core.engine.guard import ApiGuard
from policy_pipeline.core.failpoints import failpoint
from policy_pipeline.core.policy_api_types import ApiResponse, PolicyApiError
from policy_pipeline.core.store.connection import WarehouseUnavailable
from policy_pipeline.core.store.state_store import ExecutionRow, StateStore, has_retired

# The kinds of write in the order a batch writes them: a claim follows the writes that passed
# it, a poll's record comes before the ready write it led to, failures come last.
WRITE_ORDER: tuple[type, ...] = (
    effects.Warn,
    effects.Reopen,
    effects.StartExecution,
    effects.RecordPoll,
    effects.HandOff,
    effects.MarkCreated,
    effects.MarkReady,
    effects.ClaimCircuit,
    effects.ClaimCircuitRequest,
    effects.MarkCompleted,
    effects.KeepResponse,
    effects.StepError,
)
_POSITION = {kind: index for index, kind in enumerate(WRITE_ORDER)}


def _grouped(items: list[tuple[Track, Any]], field: str) -> dict[Any, list[tuple[Track, Any]]]:
    """A batch's writes of one kind by the value of one of their fields (one statement each)."""
    groups: dict[Any, list[tuple[Track, Any]]] = {}
    for track, write in items:
        groups.setdefault(getattr(write, field), []).append((track, write))
    return groups


class Batch:
    """Writes waiting to be committed, by kind, in the order the flows asked."""

    def __init__(self) -> None:
        self.items: dict[type, list[tuple[Track, Any]]] = {}
        self.position = -1  # while it is written: the kind being written

    def __bool__(self) -> bool:
        return any(self.items.values())

    def add(self, track: Track, effect: Any) -> None:
        self.items.setdefault(type(effect), []).append((track, effect))

    def accepts(self, effect: Any) -> bool:
        """Whether a write asked for while this batch is written still goes with it."""
        return _POSITION[type(effect)] > self.position

    def without(self, names: set[str]) -> Batch:
        """These writes less those about the named policies (their leases are another run's
        now). Their poll records and warnings stay: the polls were made and audited, so
        ``poll_count`` agrees with the audit trail."""
        kept = Batch()
        for kind, items in self.items.items():
            kept.items[kind] = [
                (track, effect)
                for track, effect in items
                if kind in (effects.RecordPoll, effects.Warn) or track.name not in names
            ]
        return kept


class Driver:
    """Drives the flows of one run (or one progress tick); subclasses add what they report
    through the hooks at the end."""

    def __init__(
        self,
        store: StateStore,
        log: Logger,
        guard: ApiGuard | None,
        max_concurrency: int,
        flush_seconds: float,
        stop: threading.Event,
        *,
        flush_when_idle: bool = False,
        call_deadline: float = math.inf,
    ) -> None:
        self.store = store
        self.log = log
        self.guard = guard
        self.max_concurrency = max(1, max_concurrency)
        self.flush_seconds = flush_seconds
        self.stop = stop
        self.flush_when_idle = flush_when_idle
        self.call_deadline = call_deadline  # monotonic: no call starts later
        # Shared by the writer and the workers; guards everything below.
        self.changed = threading.Condition()
        self.tracks: dict[str, Track] = {}
        self.unfinished = 0
        # Per kind of call, the calls by due time: (when, seq, track, call).
        self.due: dict[str, list[tuple[float, int, Track, Call]]] = {k: [] for k in CALL_ORDER}
        self.counter = itertools.count()
        self.in_flight = 0
        self.parked: list[tuple[Call, Track]] = []  # waiting for a renewal of their lease
        self.pending = Batch()
        self.warnings: list[str] = []  # logged by the writer, not the workers
        self.halted: str | None = None  # why no call starts any more, failing the rest
        self.closed = False
        self.worker_error: BaseException | None = None
        # The first writes go at once, unless batches wait for everything (an infinite interval).
        self.next_flush = 0.0 if math.isfinite(flush_seconds) else math.inf
        # While the warehouse cannot be reached: since when, and no batch is tried before
        # ``unreachable_until`` (monotonic).
        self.unreachable_since: float | None = None
        self.unreachable_until = 0.0
        self.writers: dict[type, Callable[[list[tuple[Track, Any]], Batch], None]] = {
            effects.Warn: self._write_warnings,
            effects.Reopen: self._reopen,
            effects.StartExecution: self._start_executions,
            effects.RecordPoll: self._record_polls,
            effects.HandOff: self._hand_off,
            effects.MarkCreated: self._mark_created,
            effects.MarkReady: self._mark_ready,
            effects.ClaimCircuit: self._claim_circuits,
            effects.ClaimCircuitRequest: self._claim_circuit_requests,
            effects.MarkCompleted: self._mark_completed,
            effects.KeepResponse: self._keep_responses,
            effects.StepError: self._record_failures,
        }

    # --- flows ----------------------------------------------------------------------------------

    def add(self, track: Track) -> None:
        """A policy the driving waits for (its flow may start later). Called with ``changed``
        held."""
        if track.name not in self.tracks:
            self.tracks[track.name] = track
            self.unfinished += 1

    def start(self, track: Track, flow: Flow) -> None:
        """Set a policy's flow going. Called with ``changed`` held."""
        self.add(track)
        track.flow = flow
        self.advance(track, None)

    def advance(self, track: Track, value: Any, batch: Batch | None = None) -> None:
        """Send the flow what it waited for and carry out what it yields, up to the next
        effect it must wait for. Writes go to ``batch`` (the one being written) when it still
        takes their kind, else to the next. Called with ``changed`` held."""
        flow = track.flow
        assert flow is not None
        if track.done:
            return
        while True:
            try:
                effect = flow.send(value)
            except StopIteration as end:
                if isinstance(end.value, effects.HandedOff):
                    self.handed_off(track, end.value.message)
                self._finish(track)
                return
            except effects.StepError as failed:
                self._queue(track, failed, batch)  # ends once the error is written
                return
            except effects.StepRefused as refused:
                self.fail(track, refused.step, refused.error)
                return
            value = None
            if isinstance(effect, Call):
                self._schedule(effect, track, effect.delay)
                return
            if isinstance(effect, effects.Passed):
                self.passed(track, effect.step, effect.message)
            elif isinstance(effect, effects.StopCalls):
                self._stop_calls(effect)
            else:
                self._queue(track, effect, batch)
                if not isinstance(effect, effects.NOTES):
                    return

    def fail(self, track: Track, step: str, error: str, now: ExecutionRow | None = None) -> None:
        """The policy failed at ``step`` (the state row says so when it was written: ``now``).
        Called with ``changed`` held."""
        if track.done:
            return
        self.failed(track, step, error, now)
        self._finish(track)

    def stop_track(self, track: Track, error: str) -> None:
        """End a policy's flow where it is, failing its current step. Called with ``changed``
        held."""
        if track.flow is not None and not track.done:
            track.flow.close()
        self.fail(track, track.step, error)

    def _finish(self, track: Track) -> None:
        track.done = True
        self.unfinished -= 1
        self.finished(track)

    def _queue(self, track: Track, effect: Any, batch: Batch | None) -> None:
        target = batch if batch is not None and batch.accepts(effect) else self.pending
        target.add(track, effect)
        self.changed.notify_all()

    def _stop_calls(self, effect: effects.StopCalls) -> None:
        if self.stop.is_set():
            return
        if effect.fail_rest:  # a halt is the run's to explain; a tick's back-off is not news
            self.halted = effect.why
            self.warnings.append(effect.why)
        self.stop.set()
        self.changed.notify_all()

    # --- the writer -----------------------------------------------------------------------------

    def drive(self, policies: int) -> None:
        """Drive the flows until every one has ended, or until ``stop``. ``policies``: how
        many flows there may be (no more workers than that)."""
        workers = [
            threading.Thread(target=self._work, name=f"policy-call-{i}", daemon=True)
            for i in range(min(self.max_concurrency, max(1, policies)))
        ]
        try:
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
                    if time.monotonic() >= self.call_deadline:
                        self.stop.set()
                    stopping = self.stop.is_set() and self.in_flight == 0
                    # Counted from this batch's start: a batch that took longer than the
                    # interval is followed at once by the next (group commit).
                    self.next_flush = time.monotonic() + self.flush_seconds
                if not self.write_batch():
                    continue
                if stopping:
                    self.stopped()
                    break
        finally:
            with self.changed:
                self.closed = True
                self.changed.notify_all()
            for worker in workers:
                if worker.is_alive():
                    worker.join()
            for track in self.tracks.values():
                if track.flow is not None and not track.done:
                    track.flow.close()

    def write_batch(self) -> bool:
        """One batch on one connection. Opening it is the one wait on the warehouse: if that
        fails, nothing was written, `unreachable` decides, and False says the batch is tried
        again."""
        try:
            with self.store.batch():
                self.before_writes()
                with self.changed:
                    batch, self.pending = self.pending, Batch()
                    warnings, self.warnings = self.warnings, []
                for message in warnings:
                    self.log.warning(message)
                self.write(self.kept_writes(batch))
                self.after_writes()
        except WarehouseUnavailable as exc:
            self.unreachable(exc)
            return False
        if self.unreachable_since is not None:
            self.log.warning(
                f"the warehouse answers again after {time.monotonic() - self.unreachable_since:.0f}"
                "s; the run goes on with the policies it still holds"
            )
            self.unreachable_since = None
        return True

    def write(self, batch: Batch) -> None:
        """Each kind of write as one statement (and its read-back) for all the policies in
        it, in ``WRITE_ORDER``; as a write commits, its flows go on at once."""
        for position, kind in enumerate(WRITE_ORDER):
            with self.changed:
                batch.position = position
                items = batch.items.pop(kind, [])
            if items:
                self.writers[kind](items, batch)
        self.store.flush()  # the audit events no write above wrote

    def _wake(self) -> bool:
        return (
            self.worker_error is not None
            or self._finished()
            or self._timer_due()
            # The answers in flight first.
            or (self.stop.is_set() and self.in_flight == 0)
            or (time.monotonic() >= self.call_deadline and self.in_flight == 0)
            or (self.flush_when_idle and bool(self.pending or self.warnings) and self._idle())
        )

    def _finished(self) -> bool:
        return self.unfinished == 0 and self.in_flight == 0 and not self.pending

    def _idle(self) -> bool:
        """No call in flight or waiting: only the writer can move the flows on."""
        return self.in_flight == 0 and not self.parked and not any(self.due.values())

    def _timer_due(self) -> bool:
        now = time.monotonic()
        if now < self.unreachable_until:
            return False
        if self.pending and now >= self.next_flush:
            return True
        return now >= self.next_timer()

    def _next_timer(self) -> float:
        timers = [self.next_timer(), self.call_deadline]
        if self.pending:
            timers.append(self.next_flush)
        return max(min(timers), self.unreachable_until)

    # --- the workers ----------------------------------------------------------------------------

    def _schedule(self, call: Call, track: Track, delay: float = 0.0) -> None:
        when = time.monotonic() + delay
        heapq.heappush(self.due[call.kind], (when, next(self.counter), track, call))
        self.changed.notify_all()

    def unpark(self, lost: set[str]) -> None:
        """After a renewal: the parked calls whose lease it confirmed are due now (those whose
        lease is gone are stopped by the caller). Called with ``changed`` held."""
        parked, self.parked = self.parked, []
        now = time.monotonic()
        for call, track in parked:
            if track.name in lost or track.done:
                continue
            if now < track.lease_until:
                self._schedule(call, track)
            else:
                self.parked.append((call, track))

    def _work(self) -> None:
        """One worker: make whichever call is due next, until the driving ends."""
        try:
            while True:
                with self.changed:
                    while self._calls_stopped() or (next_call := self._next_due()) is None:
                        if self.closed:
                            return
                        waits = [queue[0][0] for queue in self.due.values() if queue]
                        # Stopped, or nothing queued: until the writer (or a new call) says.
                        timeout = None
                        if waits and not self._calls_stopped():
                            timeout = max(0.0, min(waits) - time.monotonic())
                        self.changed.wait(timeout)
                    if self.closed:
                        return
                    call, track = next_call
                    self.in_flight += 1
                    recorder = track.attempt_recorder(self.store, self.guard)
                answer: ApiResponse | PolicyApiError
                try:
                    if self.guard is not None:
                        self.guard.before_call()  # raises GuardOpen: no call made
                    answer = call.send(recorder)
                except PolicyApiError as exc:
                    answer = exc
                with self.changed:
                    self.in_flight -= 1
                    if isinstance(answer, LeaseFenced):
                        self.parked.append((call, track))  # its retries stopped at the fence
                    else:
                        self.advance(track, answer)
                    self.changed.notify_all()
        except BaseException as exc:  # a bug: fail the run rather than hang it
            with self.changed:
                self.worker_error = self.worker_error or exc
                self.changed.notify_all()

    def _calls_stopped(self) -> bool:
        return self.stop.is_set() or time.monotonic() >= self.call_deadline

    def _next_due(self) -> tuple[Call, Track] | None:
        """The most urgent call that is due."""
        now = time.monotonic()
        for kind in CALL_ORDER:
            queue = self.due[kind]
            while queue and queue[0][0] <= now:
                _when, _seq, track, call = heapq.heappop(queue)
                if track.done:
                    continue  # stopped meanwhile (its lease was lost)
                if now < track.lease_until:
                    return call, track
                self.parked.append((call, track))
                self.changed.notify_all()  # the writer renews (or stops) parked policies
        return None

    # --- the writes, one statement per kind -----------------------------------------------------

    def _write_warnings(self, items: list[tuple[Track, Any]], batch: Batch) -> None:
        for _track, warn in items:
            self.log.warning(f"policy '{warn.policy_name}': {warn.message}")
            execution_id = warn.row.execution_id if warn.row is not None else None
            self.store.audit(warning_event(execution_id, warn.policy_name, warn.message))

    def _reopen(self, items: list[tuple[Track, Any]], batch: Batch) -> None:
        for target, group in _grouped(items, "target").items():
            after = self.store.reopen([reopen.row for _t, reopen in group], target)
            with self.changed:
                for track, reopen in group:
                    self.advance(track, after[reopen.row.execution_id], batch)

    def _start_executions(self, items: list[tuple[Track, Any]], batch: Batch) -> None:
        """One transaction: a crash between a retirement and the new intent leaves neither, so
        the new content is never lost with the old execution retired."""
        retirements = [start.retirement for _t, start in items if start.retirement is not None]
        with self.store.transaction():
            after = (
                self.store.retire(
                    [(r.row, "policy_created", r.error, r.detail) for r in retirements]
                )
                if retirements
                else {}
            )
            moved = {
                r.row.execution_id
                for r in retirements
                if has_retired(after.get(r.row.execution_id), r.error)
            }
            starting = [
                (track, start)
                for track, start in items
                if start.start
                and (start.retirement is None or start.retirement.row.execution_id in moved)
            ]
            rows = (
                self.store.start_executions(
                    [start.definition for _t, start in starting],
                    [start.execution_id for _t, start in starting],
                )
                if starting
                else []
            )
        if starting:
            failpoint("after_intents")
        started = {track.name: row for (track, _s), row in zip(starting, rows, strict=True)}
        with self.changed:
            for track, start in items:
                retired = start.retirement
                self.advance(
                    track,
                    effects.Started(
                        after.get(retired.row.execution_id) if retired is not None else None,
                        retired is not None and retired.row.execution_id in moved,
                        started.get(track.name),
                    ),
                    batch,
                )

    def _record_polls(self, items: list[tuple[Track, Any]], batch: Batch) -> None:
        """Each execution's polls since the last batch, as one row: how many, the last answer."""
        polls: dict[str, tuple[effects.RecordPoll, int]] = {}  # the last poll, how many
        for _track, poll in items:
            last = polls.get(poll.row.execution_id)
            polls[poll.row.execution_id] = (poll, (last[1] if last else 0) + 1)
        self.store.record_polls(
            [(p.row, count, p.body, p.message, p.next_in) for p, count in polls.values()]
        )

    def _answer_rows(
        self, items: list[tuple[Track, Any]], batch: Batch, after: dict[str, ExecutionRow]
    ) -> None:
        """Send each flow its execution's row as the write left it (None: gone)."""
        with self.changed:
            for track, write in items:
                self.advance(track, after.get(write.row.execution_id), batch)

    def _hand_off(self, items: list[tuple[Track, Any]], batch: Batch) -> None:
        after = self.store.hand_off([(h.row, h.next_in, h.message) for _t, h in items])
        self._answer_rows(items, batch, after)

    def _mark_created(self, items: list[tuple[Track, Any]], batch: Batch) -> None:
        """One policy_id per execution: within this batch the first keeps it; against the
        table, the conditional update refuses a policy_id another execution holds."""
        first: dict[str, effects.MarkCreated] = {}
        unique = [mark for _t, mark in items if first.setdefault(mark.policy_id, mark) is mark]
        after = self.store.mark_created([(m.row, m.policy_id, m.body) for m in unique])
        failpoint("after_created")
        refused = {
            mark.policy_id
            for _t, mark in items
            if (now := after.get(mark.row.execution_id)) is None or now.policy_id != mark.policy_id
        }
        holders = self.store.policy_id_holders(sorted(refused)) if refused else {}
        with self.changed:
            for track, mark in items:
                execution_id = mark.row.execution_id
                others = [(e, n) for e, n in holders.get(mark.policy_id, []) if e != execution_id]
                winner = first[mark.policy_id]
                if winner is not mark:
                    others.append((winner.row.execution_id, winner.row.policy_name))
                self.advance(track, effects.CreatedWrite(after.get(execution_id), others), batch)

    def _mark_ready(self, items: list[tuple[Track, Any]], batch: Batch) -> None:
        # Moves only the rows still 'policy_created' with the policy_id the API called ready.
        after = self.store.mark_ready([(mark.row, mark.message) for _t, mark in items])
        failpoint("after_ready")
        self._answer_rows(items, batch, after)

    def _claim_circuits(self, items: list[tuple[Track, Any]], batch: Batch) -> None:
        """The exactly-once gate: only a claimed ``policy_ready`` execution is called for."""
        after = self.store.claim_circuit_breakers(
            [(c.row, circuit_idempotency_key(c.row.execution_id)) for _t, c in items],
            TRIGGER_REASON,
        )
        failpoint("after_claim")
        self._answer_rows(items, batch, after)

    def _claim_circuit_requests(self, items: list[tuple[Track, Any]], batch: Batch) -> None:
        for token, group in _grouped(items, "token").items():
            claimed = self.store.claim_circuit_requests([c.row for _t, c in group], token)
            with self.changed:
                for track, claim in group:
                    self.advance(track, claim.row.execution_id in claimed, batch)

    def _mark_completed(self, items: list[tuple[Track, Any]], batch: Batch) -> None:
        after = self.store.mark_completed([(mark.row, mark.body) for _t, mark in items])
        failpoint("after_completed")
        self._answer_rows(items, batch, after)

    def _keep_responses(self, items: list[tuple[Track, Any]], batch: Batch) -> None:
        for column, group in _grouped(items, "column").items():
            self.store.set_responses(column, [(keep.row, keep.body) for _t, keep in group])

    def _record_failures(self, items: list[tuple[Track, Any]], batch: Batch) -> None:
        after = self.store.mark_errors(
            [(track.execution, f.error, f.step, f.resumable) for track, f in items]
        )
        with self.changed:
            for track, failed in items:
                self.fail(track, failed.step, failed.error, after.get(track.execution.execution_id))

    # --- hooks: what a run (or a tick) adds -----------------------------------------------------

    def passed(self, track: Track, step: str, message: str) -> None:
        """The policy passed a step. Called with ``changed`` held."""

    def failed(self, track: Track, step: str, error: str, now: ExecutionRow | None) -> None:
        """The policy failed at a step. Called with ``changed`` held."""

    def handed_off(self, track: Track, message: str) -> None:
        """The policy waits for readiness outside the run. Called with ``changed`` held."""

    def finished(self, track: Track) -> None:
        """The driver is done with the policy, whatever its state. Called with ``changed``
        held."""

    def next_timer(self) -> float:
        """When the writer must wake next for a timer of its own (monotonic)."""
        return math.inf

    def before_writes(self) -> None:
        """In each batch, before its writes (on the batch's connection)."""

    def kept_writes(self, batch: Batch) -> Batch:
        """The batch's writes that still may be written."""
        return batch

    def after_writes(self) -> None:
        """In each batch, after its writes."""

    def stopped(self) -> None:
        """The driving was stopped; the last batch is written."""

    def unreachable(self, exc: WarehouseUnavailable) -> None:
        """A batch found no warehouse: raise to end the driving, or set
        ``unreachable_until`` to try again then."""
        raise exc
