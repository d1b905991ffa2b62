"""The rules of the ``policy_ready`` asset (step 2): poll each created policy until the API
calls it ready.

How polls are paced (`PollingSettings`), the ``GET`` status call, what each answer means
(`read_poll`: ready, failed, still pending, unknown, not visible yet, an answer about another
policy, an HTTP error; the progress sensor reads its polls with it too), when a policy's wait
ends (max polls, deadline) or is handed off to the progress sensor (`progress.py`), and the
conditional ``policy_ready`` write. The run (`workflow.py`) calls these; the workers
(`scheduling.py`) call `request` and `answer` for each ``"poll"`` call.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from enum import StrEnum

from policy_pipeline.core.domain import (
    STEP_READY,
    ApiPolicyStatus,
    ExecutionStatus,
    classify_api_status,
)
from policy_pipeline.core.engine.guard import GuardOpen
from policy_pipeline.core.engine.run_state import (
    Failure,
    Polls,
    RunContext,
    Track,
    excerpt,
    refusal,
)
from policy_pipeline.core.engine.steps import Progress
from policy_pipeline.core.failpoints import failpoint
from policy_pipeline.core.policy_api_types import ApiResponse, PolicyApiError, json_value_kind
from policy_pipeline.core.settings import PollingSettings


class PollVerdict(StrEnum):
    """What one poll answer says about our policy."""

    READY = "ready"  # the API calls it ready
    FAILED = "failed"  # the API calls it failed: the execution ends for good
    WAITING = "waiting"  # not ready yet (pending, unknown, not visible yet): poll again
    REFUSED = "refused"  # no word about our policy (an HTTP error, another policy): resumable


@dataclass(frozen=True)
class PollReading:
    """`read_poll`'s reading of one answer."""

    verdict: PollVerdict
    note: str  # what the poll saw, for its message ("API status 'pending'")
    status: object = None  # the answer's status, as it came
    error: str | None = None  # FAILED and REFUSED: the execution's error
    warning: str | None = None  # an answer the engine did not expect (still pending)

    def poll_note(self, number: int) -> str:
        """The state row's message after poll ``number`` (runs and the progress sensor)."""
        return f"Poll {number}: {self.note}"

    def ready_note(self, number: int) -> str:
        return f"Step 2 complete: API status {self.status!r} after {number} polls"


def read_poll(
    response: ApiResponse,
    policy_id: str,
    seconds_since_create: float | None,
    not_found_grace_seconds: float,
) -> PollReading:
    """What a ``GET /policy/{policy_id}`` answer means, for runs and the progress sensor alike.

    ``seconds_since_create`` is how long ago the create answered, on one clock (None when
    unknown: no grace then)."""
    if not response.ok:
        since = seconds_since_create
        if response.http_status == 404 and since is not None and since <= not_found_grace_seconds:
            return PollReading(
                PollVerdict.WAITING,
                f"{response.describe()}: not visible yet {since:.0f}s after the create "
                f"(grace {not_found_grace_seconds:g}s, POLICY_POLL_NOT_FOUND_GRACE_SECONDS)",
            )
        # An HTTP error for a policy we created is no proof that it is gone (a 404 from a
        # proxy, a redirect, an auth error): the execution stays resumable, and a later run
        # polls the same policy_id rather than creating a second policy.
        return PollReading(
            PollVerdict.REFUSED,
            response.describe(),
            error=f"{response.describe()}: {excerpt(response)}",
        )
    status = response.field("status")
    named = response.field("policy_id")
    if named is not None and named != policy_id:
        # Whatever it says is about another policy: neither ready nor failed for ours.
        about = (
            f"policy_id {named!r}"
            if isinstance(named, str)
            else f"'policy_id' is {json_value_kind(named)}"
        )
        return PollReading(
            PollVerdict.REFUSED,
            f"answer about another policy ({about}), not taken as ours",
            status=status,
            error=f"{response.describe()} about another policy ({about}, not {policy_id!r}); "
            f"its status is not taken as ours: {excerpt(response)}",
        )
    verdict = classify_api_status(status)
    if verdict is ApiPolicyStatus.READY:
        return PollReading(PollVerdict.READY, f"API status {status!r}", status)
    if verdict is ApiPolicyStatus.FAILED:
        error = f"Policy API reported status {status!r} for policy {policy_id}"
        return PollReading(PollVerdict.FAILED, f"API status {status!r}", status, error=error)
    if verdict is ApiPolicyStatus.PENDING:
        return PollReading(PollVerdict.WAITING, f"API status {status!r}", status)
    note = _status_seen(response)
    return PollReading(PollVerdict.WAITING, note, status, warning=_unknown_status(response, note))


class PolicyReadyStep:
    """Step 2 for every policy of one run."""

    call = "poll"

    def __init__(self, run: RunContext, polling: PollingSettings) -> None:
        self.run = run
        self.polling = polling

    # The methods below are called with ``changed`` held, except the writes and `request`.

    def begin(self, track: Track, claims: list[Track]) -> None:
        """Pass it at once if the row is already ready; otherwise start polling a created
        policy."""
        run, step, row = self.run, track.steps[0], track.row
        if row is None:
            run.fail(track, step, "no execution exists; materialize policy_created first")
        elif row.status in (ExecutionStatus.POLICY_READY, ExecutionStatus.COMPLETED):
            run.passed(track, "ready", claims)
        elif row.status is not ExecutionStatus.POLICY_CREATED:
            run.fail(track, step, refusal(row, "materialize policy_created first"))
        else:
            track.polls, track.polling_since = 0, time.monotonic()
            track.resumed = False
            # A policy just created is not ready yet: the first poll waits one interval.
            run.schedule("poll", track, self.polling.interval(1))

    def request(self, track: Track) -> ApiResponse:
        assert track.row is not None and track.row.policy_id is not None
        response = self.run.api.get_policy_status(
            track.row.policy_id, track.attempt_recorder(self.run.store, self.run.guard)
        )
        failpoint("after_poll_call")
        return response

    def answer(self, track: Track, response: ApiResponse | PolicyApiError) -> None:
        run = self.run
        writes = run.writes
        assert track.row is not None
        if isinstance(response, GuardOpen):  # no call was made: not a poll
            writes.failed.append(Failure(track, str(response), STEP_READY, True))
            return
        track.polls += 1
        count = track.polls
        record = writes.polls.setdefault(track.row.execution_id, Polls(track))
        record.count += 1
        status: object = None
        if isinstance(response, PolicyApiError):
            # The client already retried; a poll that got no answer is still a poll.
            record.body = {"error": str(response)}
            record.message = no_answer_note(count, response)
        else:
            if not response.ok:
                run.refused_credentials(response)
            assert track.row.policy_id is not None
            reading = read_poll(
                response,
                track.row.policy_id,
                self._since_create(track),
                self.polling.not_found_grace_seconds,
            )
            status = reading.status
            record.body, record.message = response.recorded_body, reading.poll_note(count)
            if reading.verdict is PollVerdict.READY:
                message = reading.ready_note(count)
                writes.ready[track] = message
                return
            if reading.verdict is not PollVerdict.WAITING:
                assert reading.error is not None
                resumable = reading.verdict is PollVerdict.REFUSED
                writes.failed.append(Failure(track, reading.error, STEP_READY, resumable))
                return
            if reading.warning is not None:
                run.warn(track, reading.warning)
        wait_seconds = self.polling.interval(count)
        elapsed = time.monotonic() - track.polling_since
        handoff = self.polling.wait_handoff_seconds
        if handoff > 0 and elapsed >= handoff:
            # A long wait holds no run: the progress sensor polls it from now on.
            next_in = max(wait_seconds, self.polling.wait_poll_interval_seconds)
            writes.handoffs[track] = next_in
            return
        if (
            count >= self.polling.max_polls
            or elapsed + wait_seconds > self.polling.deadline_seconds
        ):
            writes.failed.append(
                Failure(
                    track,
                    f"policy {track.row.policy_id} not ready after {count} polls in "
                    f"{elapsed:.1f}s (last status {status!r}); a later run resumes polling the "
                    "same policy",
                    STEP_READY,
                    True,
                )
            )
            return
        run.schedule("poll", track, wait_seconds)

    @staticmethod
    def _since_create(track: Track) -> float | None:
        """Seconds since this run saw the create answer, on the run's monotonic clock; None
        when an earlier run created it (this process cannot tell how long ago on its own
        clock, so no grace)."""
        if track.created_answer_at is None:
            return None
        return time.monotonic() - track.created_answer_at

    def write_polls(self, polls: dict[str, Polls]) -> None:
        """Each policy's polls since the last write, as one statement."""
        self.run.store.record_polls(
            [(p.track.execution, p.count, p.body, p.message, None) for p in polls.values()]
        )

    def write_handoffs(self, handoffs: dict[Track, float], claims: list[Track]) -> None:
        """Let long waits go: the progress sensor polls them from now on, outside any run."""
        run = self.run
        after = run.store.hand_off(
            [
                (
                    t.execution,
                    delay,
                    f"Handed off after {t.polls} polls in this run: waiting for readiness "
                    f"outside any run (next poll in {delay:.0f}s)",
                )
                for t, delay in handoffs.items()
            ]
        )
        with run.changed:
            for track in handoffs:
                now = after.get(track.execution.execution_id)
                if (
                    now is not None
                    and now.handed_off
                    and now.status is ExecutionStatus.POLICY_CREATED
                ):
                    track.row = now
                    message = f"waiting for readiness outside the run ({now.poll_count} polls)"
                    run.detail(f"policy '{track.name}': {message}")
                    run.report.waiting[track.name] = message
                    run.on_progress(Progress(track.name, STEP_READY, waiting=message))
                    run.finish(track)
                elif now is not None:
                    # It moved meanwhile (ready, polled by the sensor): go on from there.
                    track.row = now
                    run.begin(track, claims)
                else:
                    run.fail(track, STEP_READY, "state row is gone")

    def write_ready(self, ready: dict[Track, str], claims: list[Track]) -> None:
        # Moves only the rows still 'policy_created' with the policy_id the API called ready.
        run = self.run
        after = run.store.mark_ready([(t.execution, message) for t, message in ready.items()])
        failpoint("after_ready")
        with run.changed:
            for track in ready:
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
                    run.fail(
                        track,
                        STEP_READY,
                        f"state row changed while polling: execution {track.row.execution_id} "
                        f"is {now}, not 'policy_created' with policy_id {track.row.policy_id}",
                    )
                    continue
                track.row = done
                run.detail(f"policy '{track.name}': {done.policy_id} ready")
                run.passed(track, f"ready after {done.poll_count} polls", claims)


def no_answer_note(number: int, error: PolicyApiError) -> str:
    """The state row's message after a poll that got no answer (the client's retries spent)."""
    return f"Poll {number}: no answer ({error})"


def _status_seen(response: ApiResponse) -> str:
    """What stood where a known status should be: no field, null, another type, a new word."""
    if not isinstance(response.data, dict) or "status" not in response.data:
        return "no 'status' field"
    status = response.data["status"]
    if status is None:
        return "'status' is null"
    if not isinstance(status, str):
        return f"'status' is {json_value_kind(status)}, not a string"
    return f"unknown status {status!r}"


def _unknown_status(response: ApiResponse, seen: str) -> str:
    return (
        f"{response.method} {response.path}: {seen} ({excerpt(response, 120)}); "
        "still treated as pending"
    )
