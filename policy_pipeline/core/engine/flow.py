"""What happens to one policy, top to bottom: `policy_workflow`.

Create the policy (the intent committed before the call), poll it until the API calls it
ready, then trigger its circuit breaker once, after a conditional claim. Each policy of a run
goes through this function on its own; the driver (`driver.py`) runs all of them at once and
carries out what each yields (`effects.py`): the API calls, at most ``max_concurrency`` in
flight, most urgent first; the writes, batched with every other policy's (group commit); the
leases and their fence. The flow never calls the API or the warehouse itself, so it reads as
the original rules in their order.

A run's polls (`wait_until_ready`) and the progress sensor's polls of handed-off policies
(`poll_handed_off`, through the same driver) are each made and read by `poll_once`;
`read_poll` decides what an answer means.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Generator, Mapping
from dataclasses import dataclass, field
from typing import Any

from policy_pipeline.core.domain import (
    ACTIVE_STATUSES,
    RESUME_FROM,
    STEP_CIRCUIT,
    STEP_CREATE,
    STEP_READY,
    TRIGGER_REASON,
    ExecutionStatus,
    PolicyDefinition,
    circuit_idempotency_key,
)
from policy_pipeline.core.engine.auditing import AttemptRecorder
from policy_pipeline.core.engine.circuit_breaker_activation import read_circuit
from policy_pipeline.core.engine.effects import (
    CIRCUIT_CALL,
    CREATE_CALL,
    POLL_CALL,
    Call,
    ClaimCircuit,
    ClaimCircuitRequest,
    CreatedWrite,
    Effect,
    Flow,
    HandedOff,
    HandOff,
    KeepResponse,
    Logger,
    MarkCompleted,
    MarkCreated,
    MarkReady,
    Passed,
    RecordPoll,
    Reopen,
    Retirement,
    Started,
    StartExecution,
    StepError,
    StepRefused,
    StopCalls,
    Track,
    Warn,
)
from policy_pipeline.core.engine.guard import GuardOpen
from policy_pipeline.core.engine.policy_created import (
    content_change,
    deleted_before_create,
    read_create,
)
from policy_pipeline.core.engine.policy_ready import (
    PollReading,
    PollVerdict,
    no_answer_note,
    read_poll,
)
from policy_pipeline.core.failpoints import failpoint
from policy_pipeline.core.policy_api import PolicyApiClient
from policy_pipeline.core.policy_api_types import ApiResponse, PolicyApiError
from policy_pipeline.core.settings import PollingSettings
from policy_pipeline.core.store.state_store import ExecutionRow

# The API refuses our credentials: a configuration error, the same for every policy. (A 403
# may be about one policy only, so it fails just that policy, resumable like any poll error.)
AUTH_STATUSES = frozenset({401})


@dataclass
class RunPlan:
    """What every policy's flow in one run goes by."""

    api: PolicyApiClient
    log: Logger
    steps: list[str]  # the chosen steps, in the workflow's order
    definitions: Mapping[str, PolicyDefinition]  # the catalog's content, by policy
    polling: PollingSettings
    force_new: bool
    recreate_failed: bool
    verbose: bool  # per-policy log lines (small runs)
    # Read by the driver as policies enter: completed executions by policy and content hash
    # (archived ones included), and the stored create bodies of intents.
    completed: dict[str, dict[str, ExecutionRow]] = field(default_factory=dict)
    bodies: dict[str, Any] = field(default_factory=dict)

    def detail(self, message: str) -> None:
        if self.verbose:
            self.log.info(message)

    def completed_content(self, name: str, digest: str) -> ExecutionRow | None:
        """The completed execution of this content, unless the run forces a new one."""
        return None if self.force_new else self.completed.get(name, {}).get(digest)


# --- one policy in a run ---------------------------------------------------------------------


def policy_workflow(p: Track, plan: RunPlan) -> Flow:
    """One policy's way through the chosen steps. ``p.row`` is its current execution (None
    before the first); each step passes at once for what the state row says is done."""
    row = p.row
    if row is not None and row.status is ExecutionStatus.ERROR and row.resumable:
        # A recoverable error of a chosen step (of any step when the run creates): this run
        # goes on with the same execution (same policy_id, same idempotency keys).
        failed_step = row.error_step or STEP_CREATE
        if STEP_CREATE in plan.steps or failed_step in plan.steps:
            target = RESUME_FROM.get(failed_step, ExecutionStatus.PENDING)
            p.row = yield Reopen(row, target)
            plan.detail(f"policy '{p.name}': resuming after {row.error_message}")
    while True:
        finish_first = False
        if STEP_CREATE in plan.steps:
            finish_first = yield from create_policy(p, plan)
        if STEP_READY in plan.steps:
            waiting = yield from wait_until_ready(p, plan)
            if waiting is not None:
                return waiting
        if STEP_CIRCUIT in plan.steps:
            yield from trigger_circuit_breaker(p, plan)
        if not finish_first:
            return None
        # The execution of the old content is finished; the new content goes through every
        # chosen step now.


# --- step 1: policy_created ------------------------------------------------------------------


def create_policy(p: Track, plan: RunPlan) -> Generator[Effect, Any, bool]:
    """Create the policy at the API, once per content. Returns True when an execution of
    other content is ready: it is finished first (its circuit breaker), then this step comes
    again for the new content."""
    p.step, row = STEP_CREATE, p.row
    definition = plan.definitions.get(p.name)
    if definition is None:
        yield from _without_definition(p, plan)
        return False
    digest = definition.content_hash()
    done = plan.completed_content(p.name, digest)
    retirement = None
    if (
        row is not None
        and row.status in ACTIVE_STATUSES
        and row.policy_content_hash not in (None, digest)
    ):
        # The catalog holds other content than the active execution's.
        if row.status is ExecutionStatus.POLICY_READY:
            return (yield from _finish_first(p, plan, row, digest))
        carrier = done.execution_id if done is not None else str(uuid.uuid4())
        retirement = Retirement(
            row,
            f"superseded: {content_change(p.name, row, digest)} before it was ready; "
            f"execution {carrier} carries the new content",
            {
                "reason": "superseded",
                "content_hash": row.policy_content_hash,
                "new_content_hash": digest,
                "new_execution_id": carrier,
            },
        )
        new_id = carrier
    elif (
        row is not None
        and row.status is ExecutionStatus.COMPLETED
        and not plan.force_new
        and row.policy_content_hash == digest
    ):
        plan.detail(f"policy '{p.name}': this content completed as {row.policy_id}")
        yield Passed(STEP_CREATE, "already completed for this content")
        return False
    elif (row is None or row.status is ExecutionStatus.COMPLETED) and done is not None:
        # Completed before, and archived since (or superseded by other content that has now
        # come back): still one policy per content.
        p.row = done
        plan.detail(f"policy '{p.name}': this content completed as {done.policy_id} (archived)")
        yield Passed(STEP_CREATE, "already completed for this content (archived)")
        return False
    elif (
        row is not None
        and row.status is ExecutionStatus.ERROR
        and not plan.recreate_failed
        and not plan.force_new
        and row.policy_content_hash == digest
    ):
        raise StepRefused(
            STEP_CREATE,
            refusal(row, "an automatic retry does not create a failed policy again"),
        )
    elif row is not None and row.status is ExecutionStatus.PENDING:
        # Intent recorded, create never confirmed: re-send exactly the body it stored, with
        # the same idempotency key.
        body = plan.bodies.get(row.execution_id)
        if not isinstance(body, dict):
            raise StepError(STEP_CREATE, "stored policy_data is not a JSON object", False)
        return (yield from _create_call(p, plan, row, body))
    elif row is not None and row.status in ACTIVE_STATUSES:
        plan.detail(f"policy '{p.name}': resuming {row.execution_id} ({row.status})")
        yield Passed(STEP_CREATE, "resumed")
        return False
    else:
        new_id = str(uuid.uuid4())
    # The original rule: the intent (a pending execution with its idempotency key) is
    # committed before the create call; the execution it replaces is retired in the same
    # transaction.
    p.resumed = False
    # Content that completed before needs no new execution once the old one is retired.
    start = retirement is None or done is None
    written: Started = yield StartExecution(definition, new_id, retirement, start)
    if retirement is not None:
        if not written.moved:
            return (yield from _not_retired(p, plan, retirement, written.retired))
        old = retirement.row.execution_id
        plan.log.warning(f"policy '{p.name}': execution {old} {retirement.error}")
        if done is not None:
            p.row = done
            yield Passed(STEP_CREATE, "already completed for this content")
            return False
    assert written.started is not None
    return (yield from _create_call(p, plan, written.started, definition.payload()))


def _create_call(
    p: Track, plan: RunPlan, row: ExecutionRow, body: dict[str, Any]
) -> Generator[Effect, Any, bool]:
    """``POST /createpolicy`` with the execution's idempotency key, and the conditional write
    that binds one policy_id to one execution (the original "verify database storage")."""
    p.row = row

    def send(recorder: AttemptRecorder) -> ApiResponse:
        key = row.create_idempotency_key or ""
        answer = plan.api.create_policy({**body, "execution_id": row.execution_id}, key, recorder)
        failpoint("after_create_call")
        return answer

    answer = yield Call(CREATE_CALL, send)
    if isinstance(answer, PolicyApiError):
        raise StepError(STEP_CREATE, str(answer), answer.transient)
    if not answer.ok:
        refused_credentials = yield from _check_credentials(answer)
        raise StepError(
            STEP_CREATE, f"{answer.describe()}: {answer.excerpt()}", refused_credentials
        )
    reading = read_create(answer)
    if reading.policy_id is None:
        assert reading.error is not None
        yield KeepResponse(row, "api_response", answer.recorded_body)
        raise StepError(STEP_CREATE, reading.error, reading.resumable)
    # When this run saw the create answer: the start of its grace for a 404 on the first
    # polls (an eventually consistent API may not show a new policy at once).
    p.created_answer_at = time.monotonic()
    policy_id = reading.policy_id
    written: CreatedWrite = yield MarkCreated(row, policy_id, answer.recorded_body)
    stored = written.stored
    if stored is None or stored.policy_id != policy_id:
        if written.others:
            execution, name = written.others[0]
            error = (
                f"POST /createpolicy returned policy_id {policy_id}, which is already bound to "
                f"execution {execution} (policy '{name}'): the Policy API handed one policy_id "
                "to two creates (does it ignore Idempotency-Key?); refused before any circuit "
                "breaker"
            )
            plan.log.warning(f"policy '{p.name}': {error}")
            raise StepError(STEP_CREATE, error, False)
        raise StepRefused(
            STEP_CREATE,
            f"state row for execution {row.execution_id} does not hold policy_id {policy_id} "
            "after the write",
        )
    p.row = stored
    plan.detail(f"policy '{p.name}': created {policy_id}")
    yield Passed(STEP_CREATE, f"created {policy_id}")
    return False


def _finish_first(
    p: Track, plan: RunPlan, row: ExecutionRow, digest: str
) -> Generator[Effect, Any, bool]:
    """New content while the old execution is ready (its circuit breaker may have started):
    the old one is finished first, so that no ready policy is left half done."""
    change = content_change(p.name, row, digest)
    if STEP_CIRCUIT not in plan.steps:
        raise StepRefused(
            STEP_CREATE,
            f"{change} while execution {row.execution_id} is policy_ready: its circuit breaker "
            "comes first (materialize circuit_breaker_activation), then the new content is "
            "created",
        )
    yield Warn(
        row,
        p.name,
        f"{change} after execution {row.execution_id} was ready: finishing it (its circuit "
        "breaker) first, then creating the new content in this run",
    )
    p.row = row
    yield Passed(STEP_CREATE, f"resumed to finish execution {row.execution_id} first")
    return True


def _without_definition(p: Track, plan: RunPlan) -> Generator[Effect, Any, None]:
    """A policy no longer in the catalog (its file was deleted): an execution already created
    goes on from what it stored (polling and the circuit breaker need no catalog); an intent
    whose create was never confirmed is retired; nothing is created."""
    row = p.row
    if row is not None and row.status in (
        ExecutionStatus.POLICY_CREATED,
        ExecutionStatus.POLICY_READY,
    ):
        plan.detail(
            f"policy '{p.name}' is not in the catalog any more: execution "
            f"{row.execution_id} goes on from what it stored ({row.status})"
        )
        yield Passed(STEP_CREATE, "resumed (not in the catalog any more)")
        return
    if row is None or row.status is not ExecutionStatus.PENDING:
        raise StepRefused(STEP_CREATE, f"policy '{p.name}' is not in the catalog")
    retirement = Retirement(
        row,
        deleted_before_create(p.name),
        {"reason": "catalog_file_deleted", "content_hash": row.policy_content_hash},
    )
    written: Started = yield StartExecution(None, "", retirement, start=False)
    if not written.moved:
        yield from _not_retired(p, plan, retirement, written.retired)
        return
    p.row = written.retired
    plan.log.warning(f"policy '{p.name}': execution {row.execution_id} {retirement.error}")
    raise StepRefused(STEP_CREATE, f"policy '{p.name}' is not in the catalog: {retirement.error}")


def _not_retired(
    p: Track, plan: RunPlan, retirement: Retirement, now: ExecutionRow | None
) -> Generator[Effect, Any, bool]:
    """The execution changed before it could be retired. One that turned ready meanwhile
    (the progress sensor polled it) is finished first."""
    definition = plan.definitions.get(p.name)
    if now is not None and now.status is ExecutionStatus.POLICY_READY and definition is not None:
        return (yield from _finish_first(p, plan, now, definition.content_hash()))
    if now is None:
        raise StepRefused(
            STEP_CREATE, f"state row of execution {retirement.row.execution_id} is gone"
        )
    p.row = now
    raise StepRefused(STEP_CREATE, refusal(now, "it changed while being retired"))


# --- step 2: policy_ready --------------------------------------------------------------------


def wait_until_ready(p: Track, plan: RunPlan) -> Generator[Effect, Any, HandedOff | None]:
    """Poll the created policy until the API calls it ready; then move the state row to
    ``policy_ready`` (a conditional update). A long wait is handed off to the progress sensor
    (returns `HandedOff`); too many polls, or the deadline, fail it resumably."""
    p.step, row = STEP_READY, p.row
    polling = plan.polling
    if row is None:
        raise StepRefused(STEP_READY, "no execution exists; materialize policy_created first")
    if row.status in (ExecutionStatus.POLICY_READY, ExecutionStatus.COMPLETED):
        yield Passed(STEP_READY, "ready")
        return None
    if row.status is not ExecutionStatus.POLICY_CREATED:
        raise StepRefused(STEP_READY, refusal(row, "materialize policy_created first"))
    p.resumed = False
    polling_since = time.monotonic()
    polls = 0
    wait = polling.interval(1)  # a policy just created is not ready yet
    while True:
        answer = yield from poll_once(p, plan.api, polling, wait, p.seconds_since_create)
        if isinstance(answer, GuardOpen):  # no call was made: not a poll
            raise StepError(STEP_READY, str(answer), True)
        polls += 1
        if isinstance(answer, PolicyApiError):
            # The client already retried; a poll that got no answer is still a poll.
            yield RecordPoll(row, {"error": str(answer)}, no_answer_note(polls, answer))
        else:
            response, reading = answer
            if not response.ok:
                yield from _check_credentials(response)
            yield RecordPoll(row, response.recorded_body, reading.poll_note(polls))
            if reading.verdict is PollVerdict.READY:
                now = yield MarkReady(row, reading.ready_note(polls))
                # Already ready (or further) for the same policy_id is fine: the progress
                # sensor may have polled a handed-off policy at the same moment.
                if (
                    now is None
                    or now.status not in (ExecutionStatus.POLICY_READY, ExecutionStatus.COMPLETED)
                    or now.policy_id != row.policy_id
                ):
                    shown = f"'{now.status}'" if now is not None else "gone"
                    raise StepRefused(
                        STEP_READY,
                        f"state row changed while polling: execution {row.execution_id} is "
                        f"{shown}, not 'policy_created' with policy_id {row.policy_id}",
                    )
                p.row = now
                plan.detail(f"policy '{p.name}': {now.policy_id} ready")
                yield Passed(STEP_READY, f"ready after {now.poll_count} polls")
                return None
            if reading.verdict is not PollVerdict.WAITING:
                assert reading.error is not None
                resumable = reading.verdict is PollVerdict.REFUSED
                raise StepError(STEP_READY, reading.error, resumable)
            if reading.warning is not None:
                yield Warn(row, p.name, reading.warning)
        wait = polling.interval(polls)
        elapsed = time.monotonic() - polling_since
        if polling.wait_handoff_seconds > 0 and elapsed >= polling.wait_handoff_seconds:
            # A long wait holds no run: the progress sensor polls it from now on.
            next_in = max(wait, polling.wait_poll_interval_seconds)
            now = yield HandOff(
                row,
                next_in,
                f"Handed off after {polls} polls in this run: waiting for readiness outside "
                f"any run (next poll in {next_in:.0f}s)",
            )
            if now is None:
                raise StepRefused(STEP_READY, "state row is gone")
            p.row = now
            if now.handed_off and now.status is ExecutionStatus.POLICY_CREATED:
                message = f"waiting for readiness outside the run ({now.poll_count} polls)"
                plan.detail(f"policy '{p.name}': {message}")
                return HandedOff(message)
            # It moved meanwhile (ready, polled by the sensor): go on from there.
            return (yield from wait_until_ready(p, plan))
        if polls >= polling.max_polls or elapsed + wait > polling.deadline_seconds:
            raise StepError(
                STEP_READY,
                f"policy {row.policy_id} not ready after {polls} polls in {elapsed:.1f}s (last "
                f"status {_last_status(answer)!r}); a later run resumes polling the same policy",
                True,
            )


PollAnswer = tuple[ApiResponse, PollReading] | PolicyApiError


def poll_once(
    p: Track,
    api: PolicyApiClient,
    polling: PollingSettings,
    delay: float,
    seconds_since_create: Callable[[], float | None],
    max_attempts: int | None = None,
) -> Generator[Effect, Any, PollAnswer]:
    """``GET /policy/{policy_id}`` once (``delay`` from now), and what its answer means: the
    answer with `read_poll`'s reading, or the error (a `GuardOpen`: no call was made). Runs
    and the progress sensor poll through this."""
    row = p.execution
    policy_id = row.policy_id
    assert policy_id is not None

    def send(recorder: AttemptRecorder) -> ApiResponse:
        answer = api.get_policy_status(policy_id, recorder, max_attempts=max_attempts)
        failpoint("after_poll_call")
        return answer

    answer = yield Call(POLL_CALL, send, delay)
    if isinstance(answer, PolicyApiError):
        return answer
    reading = read_poll(answer, policy_id, seconds_since_create(), polling.not_found_grace_seconds)
    return answer, reading


def _last_status(answer: PollAnswer) -> object:
    return None if isinstance(answer, PolicyApiError) else answer[1].status


# --- step 3: circuit_breaker_activation -------------------------------------------------------


def trigger_circuit_breaker(p: Track, plan: RunPlan) -> Generator[Effect, Any, None]:
    """Claim the ready execution (the exactly-once gate), call ``POST /circuit`` with the
    claim's idempotency key, and mark the execution completed. A failure here keeps steps 1
    and 2 recorded; a resumable one is repeated by the next run with the same key."""
    p.step, row = STEP_CIRCUIT, p.row
    if row is None:
        raise StepRefused(STEP_CIRCUIT, "no execution exists; materialize policy_created first")
    if row.status is ExecutionStatus.COMPLETED:
        yield Passed(STEP_CIRCUIT, "done")
        return
    if row.status is not ExecutionStatus.POLICY_READY:
        raise StepRefused(STEP_CIRCUIT, refusal(row, "the policy has not reached policy_ready"))
    p.resumed = False
    claimed = yield ClaimCircuit(row)
    if claimed is None:
        raise StepRefused(STEP_CIRCUIT, f"state row of execution {row.execution_id} is gone")
    p.row = claimed
    if claimed.circuit_breaker_completed:
        yield Passed(STEP_CIRCUIT, "done")
        return
    if not (claimed.circuit_breaker_initiated and claimed.status is ExecutionStatus.POLICY_READY):
        raise StepRefused(STEP_CIRCUIT, refusal(claimed, "it changed while claiming"))
    # Initiated now, or by a run that crashed: we hold the lease, so nobody else is calling,
    # and the stored idempotency key makes a repeat safe.
    policy_id = claimed.policy_id
    assert policy_id is not None
    key = claimed.circuit_idempotency_key or circuit_idempotency_key(claimed.execution_id)

    def send(recorder: AttemptRecorder) -> ApiResponse:
        answer = plan.api.trigger_circuit_breaker(
            policy_id, claimed.execution_id, TRIGGER_REASON, key, recorder
        )
        failpoint("after_circuit_call")
        return answer

    answer = yield Call(CIRCUIT_CALL, send)
    if isinstance(answer, PolicyApiError):
        raise StepError(STEP_CIRCUIT, str(answer), True)
    if not answer.ok:
        yield from _check_credentials(answer)
    reading = read_circuit(answer)
    body = answer.recorded_body
    if not answer.text.strip():  # a 204: what the state keeps says so
        body = {"http_status": answer.http_status, "empty_body": True}
    if not reading.triggered:
        assert reading.error is not None
        yield KeepResponse(claimed, "circuit_breaker_response", body)
        raise StepError(STEP_CIRCUIT, reading.error, reading.resumable)
    done = yield MarkCompleted(claimed, body)
    if done is None or done.status is not ExecutionStatus.COMPLETED:
        raise StepRefused(STEP_CIRCUIT, "state row did not reach completed")
    p.row = done
    plan.detail(f"policy '{p.name}': circuit breaker triggered")
    yield Passed(STEP_CIRCUIT, "circuit breaker triggered")


# --- a handed-off policy, in a tick of the progress sensor ----------------------------------


@dataclass
class TickPolls:
    """What a tick's polls found (filled by `poll_handed_off`, under the driver's lock)."""

    polled: int = 0
    ready: list[ExecutionRow] = field(default_factory=list)  # claimed by this tick
    failed: list[tuple[ExecutionRow, str]] = field(default_factory=list)  # ended by this tick
    retry_after: float | None = None  # the API asked us to back off this long


def poll_handed_off(
    p: Track,
    api: PolicyApiClient,
    polling: PollingSettings,
    waited_seconds: float,
    token: str,
    found: TickPolls,
) -> Flow:
    """One poll of a handed-off policy, one attempt (a transient failure is simply polled
    again later). Recorded as a run records a poll; a policy found ready is moved to
    ``policy_ready`` by the same conditional update a run uses and claimed by this tick, so
    that exactly one tick requests its circuit-breaker run."""
    p.step, row = STEP_READY, p.execution
    read_at = time.monotonic()

    def since_create() -> float:
        # The warehouse's age of the create when read, plus what this tick has spent since.
        return waited_seconds + time.monotonic() - read_at

    answer = yield from poll_once(p, api, polling, 0.0, since_create, max_attempts=1)
    if isinstance(answer, GuardOpen):
        # No call made: not a poll; it stays due.
        yield StopCalls(str(answer), fail_rest=False)
        return None
    found.polled += 1
    number = row.poll_count + 1
    later = polling.wait_poll_interval_seconds
    if isinstance(answer, PolicyApiError):
        # No answer is still a poll; it is polled again at its usual cadence (or after the
        # Retry-After the API asked for, which also ends the tick's polling).
        if answer.retry_after is not None:
            found.retry_after = max(found.retry_after or 0.0, answer.retry_after)
            yield StopCalls(f"the Policy API asked to retry after {answer.retry_after:g}s", False)
        next_in = max(later, found.retry_after or 0.0)
        yield RecordPoll(row, {"error": str(answer)}, no_answer_note(number, answer), next_in)
        return None
    response, reading = answer
    if reading.verdict is PollVerdict.REFUSED:
        # No word about our policy (an HTTP error, another policy's answer): the execution
        # stays resumable, and a run polls the same policy_id again.
        assert reading.error is not None
        yield RecordPoll(row, response.recorded_body, reading.poll_note(number))
        raise StepError(STEP_READY, reading.error, True)
    yield RecordPoll(row, response.recorded_body, reading.poll_note(number), later)
    if reading.verdict is PollVerdict.FAILED:
        assert reading.error is not None
        raise StepError(STEP_READY, reading.error, False)
    if reading.verdict is PollVerdict.READY:
        now = yield MarkReady(row, reading.ready_note(number))
        moved = (
            now is not None
            and now.status is ExecutionStatus.POLICY_READY
            and not now.circuit_breaker_initiated
        )
        if moved and (yield ClaimCircuitRequest(now, token)):
            found.ready.append(now)
    return None


# --- shared by the steps -----------------------------------------------------------------------


def _check_credentials(response: ApiResponse) -> Generator[Effect, Any, bool]:
    """An answer refusing our credentials stops the run from starting calls: every other
    policy would get the same. Returns whether it was one (the failure stays resumable)."""
    if response.http_status not in AUTH_STATUSES:
        return False
    yield StopCalls(
        f"the Policy API refused our credentials ({response.describe()}); check "
        "POLICY_API_KEY. The executions stay resumable",
        fail_rest=True,
    )
    return True


def refusal(row: ExecutionRow, why: str) -> str:
    detail = f" ({row.error_message})" if row.error_message else ""
    return f"execution {row.execution_id} is '{row.status}'{detail}: {why}"
