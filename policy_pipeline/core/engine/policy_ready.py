"""What a ``GET /policy/{policy_id}`` answer means (step 2, the ``policy_ready`` asset):
`read_poll`, for runs and the progress sensor alike (ready, failed, still pending, unknown,
not visible yet, an answer about another policy, an HTTP error), and the wording of a poll's
note on the state row.

The step itself is `flow.wait_until_ready`; the sensor's poll is `flow.poll_handed_off`.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from policy_pipeline.core.domain import (
    ApiPolicyStatus,
    classify_api_status,
)
from policy_pipeline.core.policy_api_types import ApiResponse, PolicyApiError, json_value_kind


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
            error=f"{response.describe()}: {response.excerpt()}",
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
            f"its status is not taken as ours: {response.excerpt()}",
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
        f"{response.method} {response.path}: {seen} ({response.excerpt(120)}); "
        "still treated as pending"
    )
