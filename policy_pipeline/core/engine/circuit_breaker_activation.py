"""The rules of the ``circuit_breaker_activation`` asset (step 3): trigger each ready
policy's circuit breaker exactly once.

Which rows may be called for (only ``policy_ready`` ones), the conditional claim that is the
exactly-once gate, the ``POST`` trigger call with the claim's idempotency key, what its answer
means, and the ``completed`` write. A failure here keeps steps 1 and 2 recorded; the next run
repeats the same call with the same key. The run (`workflow.py`) calls these; the workers
(`scheduling.py`) call `request` and `answer` for each ``"circuit"`` call.
"""

from __future__ import annotations

from typing import Any

from policy_pipeline.core.domain import TRIGGER_REASON, ExecutionStatus, circuit_idempotency_key
from policy_pipeline.core.engine.run_state import RunContext, Track, excerpt, refusal
from policy_pipeline.core.engine.steps import STEP_CIRCUIT
from policy_pipeline.core.failpoints import failpoint
from policy_pipeline.core.policy_api_types import ApiResponse, PolicyApiError


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
        # Steps 1 and 2 stay recorded; the next run retries the same call with its key.
        run = self.run
        writes = run.writes
        if isinstance(response, PolicyApiError):
            writes.failed.append((track, str(response), STEP_CIRCUIT, True))
        elif not response.ok:
            run.refused_credentials(response)
            writes.kept.setdefault("circuit_breaker_response", []).append(
                (track, response.recorded_body)
            )
            problem = f"{response.describe()}: {excerpt(response)}"
            writes.failed.append((track, problem, STEP_CIRCUIT, True))
        elif not isinstance(response.data, dict):
            # A 2xx whose body cannot be read (an HTML page from a proxy, an empty body) is no
            # confirmation that the breaker fired: record it and let the next run repeat the
            # call with the same idempotency key.
            writes.kept.setdefault("circuit_breaker_response", []).append(
                (track, response.recorded_body)
            )
            problem = f"{response.describe()} without a readable confirmation"
            writes.failed.append((track, f"{problem}: {excerpt(response)}", STEP_CIRCUIT, True))
        else:
            writes.completed.append((track, response.recorded_body))

    def write_completed(self, completed: list[tuple[Track, Any]]) -> None:
        run = self.run
        after = run.store.mark_completed([(t.execution, body) for t, body in completed])
        failpoint("after_completed")
        with run.changed:
            for track, _body in completed:
                assert track.row is not None
                done = after.get(track.row.execution_id)
                if done is None or done.status is not ExecutionStatus.COMPLETED:
                    run.fail(track, STEP_CIRCUIT, "state row did not reach completed")
                    continue
                track.row = done
                run.detail(f"policy '{track.name}': circuit breaker triggered")
                run.passed(track, "circuit breaker triggered", [])
