"""The rules of the ``circuit_breaker_activation`` asset (step 3): trigger each ready
policy's circuit breaker exactly once.

Which rows may be called for (only ``policy_ready`` ones), the conditional claim that is the
exactly-once gate, the ``POST`` trigger call with the claim's idempotency key, what its answer
means (`read_circuit`), and the ``completed`` write. A failure here keeps steps 1 and 2
recorded; a resumable one is repeated by the next run with the same key. The run
(`workflow.py`) calls these; the workers (`scheduling.py`) call `request` and `answer` for each
``"circuit"`` call.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from policy_pipeline.core.domain import (
    FAILURE_STATUSES,
    STEP_CIRCUIT,
    TRIGGER_REASON,
    ExecutionStatus,
    circuit_idempotency_key,
)
from policy_pipeline.core.engine.run_state import (
    Failure,
    RunContext,
    Track,
    excerpt,
    refusal,
)
from policy_pipeline.core.failpoints import failpoint
from policy_pipeline.core.policy_api_types import ApiResponse, PolicyApiError

# Statuses of a 2xx circuit answer that say the breaker was not triggered (compared lower-case,
# spaces and dashes as underscores).
NOT_TRIGGERED_STATUSES = FAILURE_STATUSES | {
    "not_triggered",
    "refused",
    "denied",
    "declined",
    "not_ready",
}
# Statuses that say it was.
TRIGGERED_STATUSES = frozenset({"triggered", "already_triggered", "success", "completed", "ok"})
# A refusal in these words is about timing (the API does not see the policy ready yet): the
# same call is repeated later.
_NOT_YET = re.compile(r"\bnot[\s_-]+(?:yet[\s_-]+)?ready\b|\bnot[\s_-]+yet\b", re.IGNORECASE)


@dataclass(frozen=True)
class CircuitReading:
    """`read_circuit`'s reading of one answer to ``POST /circuit``."""

    triggered: bool
    error: str | None = None  # not triggered: why, in the API's words
    resumable: bool = True  # not triggered: whether a later run repeats the call


def read_circuit(response: ApiResponse) -> CircuitReading:
    """What a ``POST /circuit`` answer means.

    A 2xx is the confirmation HTTP says it is (no body, as a 204, and ``{}`` included) unless
    its JSON says the breaker was not triggered: a failure status, ``triggered``, ``success``
    or ``ok`` false, an ``error`` (or ``errors``) that is not empty. Such a refusal is final
    for the execution (the API answered; an automatic repeat would only ask again what it
    refused), except when its words say the policy is not ready yet, or ``retryable`` is true,
    and nothing in it claims the breaker fired: then a later run repeats the call. A 2xx whose
    body is neither empty nor a JSON object (a proxy's HTML page) confirms nothing: resumable.
    """
    if not response.ok:
        return CircuitReading(False, f"{response.describe()}: {excerpt(response)}")
    if not response.text.strip():
        return CircuitReading(True)
    data = response.data
    if not isinstance(data, dict):
        # A body that cannot be read (an HTML page from a proxy) is no confirmation that the
        # breaker fired: the next run repeats the call with the same idempotency key.
        problem = f"{response.describe()} without a readable confirmation"
        return CircuitReading(False, f"{problem}: {excerpt(response)}")
    signs = _not_triggered_signs(data)
    if not signs:
        return CircuitReading(True)
    status = _word(data.get("status"))
    claims_fired = status in TRIGGERED_STATUSES or data.get("triggered") is True
    words = " ".join(
        json.dumps(data[key])
        for key in ("status", "error", "errors", "message", "reason")
        if key in data
    )
    not_yet = bool(_NOT_YET.search(words)) or status == "not_ready" or data.get("retryable") is True
    resumable = not_yet and not claims_fired
    then = "a later run repeats the call" if resumable else "not repeated automatically"
    error = (
        f"{response.describe()} but the circuit breaker was not triggered "
        f"({', '.join(signs)}); {then}: {excerpt(response)}"
    )
    return CircuitReading(False, error, resumable)


def _word(value: object) -> str | None:
    if not isinstance(value, str):
        return None
    return re.sub(r"[\s-]+", "_", value.strip().lower())


def _not_triggered_signs(data: dict[str, Any]) -> list[str]:
    """What in a 2xx circuit answer says the breaker was not triggered."""
    signs = []
    if _word(data.get("status")) in NOT_TRIGGERED_STATUSES:
        signs.append(_shown(data, "status"))
    for flag in ("triggered", "success", "ok"):
        value = data.get(flag)
        if value is False or _word(value) == "false":
            signs.append(_shown(data, flag))
    for name in ("error", "errors"):
        if data.get(name) not in (None, False, "", [], {}):
            signs.append(_shown(data, name))
    return signs


def _shown(data: dict[str, Any], key: str, limit: int = 120) -> str:
    text = json.dumps(data[key])
    return f"{key}: {text if len(text) <= limit else text[:limit] + '...'}"


class CircuitBreakerActivationStep:
    """Step 3 for every policy of one run."""

    call = "circuit"

    def __init__(self, run: RunContext) -> None:
        self.run = run

    # The methods below are called with ``changed`` held, except the writes and `request`.

    def begin(self, track: Track, claims: list[Track]) -> None:
        """Pass it at once if the row is completed; otherwise only a ``policy_ready`` row
        goes on, to be claimed in the next write."""
        run, step, row = self.run, track.steps[0], track.row
        if row is None:
            run.fail(track, step, "no execution exists; materialize policy_created first")
        elif row.status is ExecutionStatus.COMPLETED:
            run.passed(track, "done", claims)
        elif row.status is not ExecutionStatus.POLICY_READY:
            run.fail(track, step, refusal(row, "the policy has not reached policy_ready"))
        else:
            track.resumed = False
            claims.append(track)

    def write_claims(self, claims: list[Track]) -> None:
        """The exactly-once gate: only a claimed ``policy_ready`` execution is called for."""
        run = self.run
        rows = [t.row for t in claims if t.row is not None]
        after = run.store.claim_circuit_breakers(
            [(row, circuit_idempotency_key(row.execution_id)) for row in rows], TRIGGER_REASON
        )
        failpoint("after_claim")
        with run.changed:
            for track in claims:
                assert track.row is not None
                now = after[track.row.execution_id]
                track.row = now
                if now.circuit_breaker_completed:
                    run.passed(track, "done", [])
                elif now.circuit_breaker_initiated and now.status is ExecutionStatus.POLICY_READY:
                    # Initiated now, or by a run that crashed: we hold the lease, so nobody
                    # else is calling, and the stored idempotency key makes a repeat safe.
                    run.schedule("circuit", track)
                else:
                    run.fail(track, STEP_CIRCUIT, refusal(now, "it changed while claiming"))

    def request(self, track: Track) -> ApiResponse:
        row = track.row
        assert row is not None and row.policy_id is not None
        key = row.circuit_idempotency_key or circuit_idempotency_key(row.execution_id)
        response = self.run.api.trigger_circuit_breaker(
            row.policy_id,
            row.execution_id,
            TRIGGER_REASON,
            key,
            track.attempt_recorder(self.run.store, self.run.guard),
        )
        failpoint("after_circuit_call")
        return response

    def answer(self, track: Track, response: ApiResponse | PolicyApiError) -> None:
        # Steps 1 and 2 stay recorded; a resumable failure is repeated by the next run with
        # the same key.
        run = self.run
        writes = run.writes
        if isinstance(response, PolicyApiError):
            writes.failed.append(Failure(track, str(response), STEP_CIRCUIT, True))
            return
        if not response.ok:
            run.refused_credentials(response)
        reading = read_circuit(response)
        body = response.recorded_body
        if not response.text.strip():  # a 204: what the state keeps says so
            body = {"http_status": response.http_status, "empty_body": True}
        if reading.triggered:
            writes.completed[track] = body
            return
        assert reading.error is not None
        writes.kept.setdefault("circuit_breaker_response", {})[track] = body
        writes.failed.append(Failure(track, reading.error, STEP_CIRCUIT, reading.resumable))

    def write_completed(self, completed: dict[Track, Any]) -> None:
        run = self.run
        after = run.store.mark_completed([(t.execution, body) for t, body in completed.items()])
        failpoint("after_completed")
        with run.changed:
            for track in completed:
                assert track.row is not None
                done = after.get(track.row.execution_id)
                if done is None or done.status is not ExecutionStatus.COMPLETED:
                    run.fail(track, STEP_CIRCUIT, "state row did not reach completed")
                    continue
                track.row = done
                run.detail(f"policy '{track.name}': circuit breaker triggered")
                run.passed(track, "circuit breaker triggered", [])
