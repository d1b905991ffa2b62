"""What a policy's flow asks of the driver, and what the driver keeps about each policy.

A flow (`flow.py`) is a generator: it yields one effect at a time and the driver
(`driver.py`) carries it out.

- `Call`: an API call. The flow waits; the driver sends back the `ApiResponse` or the
  `PolicyApiError`.
- A write (`Reopen`, `StartExecution`, `HandOff`, `MarkCreated`, `MarkReady`, `ClaimCircuit`,
  `MarkCompleted`, `ClaimCircuitRequest`): the flow waits; the driver writes it with every other
  policy's writes of the same kind, as one statement (group commit), and sends back the row as
  the warehouse has it now (or the answer named on the class).
- A note (`RecordPoll`, `KeepResponse`, `Warn`): written with the next batch; the flow goes on
  at once.
- `Passed`: the policy passed a step (reported at once); `StopCalls`: no call starts any more.

A flow ends by returning (`HandedOff` when it waits outside the run) or by raising
`StepError` (the driver records the error on the state row) or `StepRefused` (the state row
stays as it is).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Generator
from dataclasses import dataclass
from typing import Any, Protocol

from policy_pipeline.core.domain import ExecutionStatus, PolicyDefinition
from policy_pipeline.core.engine.auditing import AttemptRecorder
from policy_pipeline.core.engine.guard import ApiGuard
from policy_pipeline.core.engine.steps import StepOutcome
from policy_pipeline.core.policy_api_types import ApiResponse
from policy_pipeline.core.store.state_store import ExecutionRow, StateStore

# The kinds of call, most urgent first: one that finishes a policy before one that moves it
# on, before one that starts a new policy.
CIRCUIT_CALL, POLL_CALL, CREATE_CALL = CALL_ORDER = ("circuit", "poll", "create")


@dataclass(frozen=True)
class Call:
    """Make an API call (``send`` gets the policy's attempt recorder) ``delay`` from now."""

    kind: str  # one of CALL_ORDER
    send: Callable[[AttemptRecorder], ApiResponse]
    delay: float = 0.0


# --- writes: the flow waits for the row as the warehouse has it afterwards --------------------


@dataclass(frozen=True)
class Reopen:
    """Reopen a recoverable error at ``target`` (where its step starts)."""

    row: ExecutionRow
    target: ExecutionStatus


@dataclass(frozen=True)
class Retirement:
    """An execution that ends for good before its policy's new one starts."""

    row: ExecutionRow
    error: str
    detail: dict[str, Any]


@dataclass(frozen=True)
class StartExecution:
    """Commit a ``pending`` execution (the intent, with its idempotency key) before the create
    call, after retiring the one it replaces (one transaction). Answered by `Started`."""

    definition: PolicyDefinition | None
    execution_id: str
    retirement: Retirement | None = None
    start: bool = True  # False: only the retirement


@dataclass(frozen=True)
class Started:
    retired: ExecutionRow | None  # the replaced execution as it is now (None: none, or gone)
    moved: bool  # the retirement happened
    started: ExecutionRow | None  # the new execution


@dataclass(frozen=True)
class HandOff:
    row: ExecutionRow
    next_in: float  # seconds until the progress sensor's next poll
    message: str


@dataclass(frozen=True)
class MarkCreated:
    """Bind the policy_id to the execution. Answered by `CreatedWrite`."""

    row: ExecutionRow
    policy_id: str
    body: Any


@dataclass(frozen=True)
class CreatedWrite:
    stored: ExecutionRow | None
    # Other executions (execution_id, policy_name) that hold the same policy_id.
    others: list[tuple[str, str]]


@dataclass(frozen=True)
class MarkReady:
    row: ExecutionRow
    message: str


@dataclass(frozen=True)
class ClaimCircuit:
    """The exactly-once gate before the circuit-breaker call."""

    row: ExecutionRow


@dataclass(frozen=True)
class MarkCompleted:
    row: ExecutionRow
    body: Any


@dataclass(frozen=True)
class ClaimCircuitRequest:
    """The progress tick claims the circuit-breaker run of a policy it found ready (one tick
    wins). Answered by a bool: claimed."""

    row: ExecutionRow
    token: str


# --- notes: written with the next batch, the flow goes on at once ------------------------------


@dataclass(frozen=True)
class RecordPoll:
    row: ExecutionRow
    body: Any
    message: str
    next_in: float | None = None  # a handed-off policy: seconds until its next poll


@dataclass(frozen=True)
class KeepResponse:
    row: ExecutionRow
    column: str
    body: Any


@dataclass(frozen=True)
class Warn:
    """A warning about one policy: logged and audited."""

    row: ExecutionRow | None
    policy_name: str
    message: str


@dataclass(frozen=True)
class Passed:
    step: str
    message: str


@dataclass(frozen=True)
class StopCalls:
    """No call starts any more. ``fail_rest``: the policies left fail with ``why`` (the API
    refused our credentials); otherwise they stay where they are."""

    why: str
    fail_rest: bool


@dataclass(frozen=True)
class HandedOff:
    """A flow's end: the policy waits for readiness outside the run."""

    message: str


# Written with the next batch while the flow goes on.
NOTES = (RecordPoll, KeepResponse, Warn)
Effect = (
    Call
    | Reopen
    | StartExecution
    | HandOff
    | MarkCreated
    | MarkReady
    | ClaimCircuit
    | MarkCompleted
    | ClaimCircuitRequest
    | RecordPoll
    | KeepResponse
    | Warn
    | Passed
    | StopCalls
)
Flow = Generator[Effect, Any, HandedOff | None]


class StepError(Exception):
    """The policy failed at ``step``: the driver records it on the state row. ``resumable``:
    a later run goes on from where it is."""

    def __init__(self, step: str, error: str, resumable: bool) -> None:
        super().__init__(error)
        self.step = step
        self.error = error
        self.resumable = resumable


class StepRefused(Exception):
    """The policy cannot go through ``step``; the state row stays as it is."""

    def __init__(self, step: str, error: str) -> None:
        super().__init__(error)
        self.step = step
        self.error = error


class Logger(Protocol):
    def info(self, msg: str) -> None: ...

    def warning(self, msg: str) -> None: ...


@dataclass(eq=False)
class Track:
    """One policy in the driver: its flow, its current execution, and its figures."""

    name: str
    row: ExecutionRow | None = None
    flow: Flow | None = None
    done: bool = False
    step: str = ""  # the step it is in (set by the flow), for failures the driver reports
    resumed: bool = True  # it entered its current step with work already done
    recorder: AttemptRecorder | None = None
    created_answer_at: float | None = None  # monotonic: this run saw the create answer
    calls_before: int = 0  # API calls and latency before its current step (step figures)
    latency_before: float = 0.0
    # Until when (monotonic) its lease is surely the run's own: no call starts later
    # (`leases.py` sets it as the warehouse confirms the lease).
    lease_until: float = 0.0

    def fenced(self) -> str | None:
        """Why no call for it may start now, or None."""
        if time.monotonic() < self.lease_until:
            return None
        return (
            f"policy '{self.name}': its lease is not confirmed by the warehouse any more; "
            "no call starts until a renewal confirms it"
        )

    def seconds_since_create(self) -> float | None:
        """Seconds since this run saw the create answer, on the run's monotonic clock; None
        when an earlier run created it (this process cannot tell how long ago on its own
        clock, so no grace for a 404)."""
        if self.created_answer_at is None:
            return None
        return time.monotonic() - self.created_answer_at

    @property
    def execution(self) -> ExecutionRow:
        assert self.row is not None, f"policy '{self.name}' has no execution yet"
        return self.row

    def attempt_recorder(self, store: StateStore, guard: ApiGuard | None) -> AttemptRecorder:
        """The recorder of its current execution (a new execution starts new figures)."""
        row = self.execution
        if self.recorder is None or self.recorder.row.execution_id != row.execution_id:
            self.recorder = AttemptRecorder(store, row, guard, self.fenced)
            self.calls_before, self.latency_before = 0, 0.0
        return self.recorder

    def outcome(self, message: str) -> StepOutcome:
        """What its current step did: the row as it is now, and the step's API figures; the
        figures of the next step start from here."""
        row = self.execution
        recorder = self.recorder
        calls = recorder.calls - self.calls_before if recorder else 0
        latency = round(recorder.latency_ms - self.latency_before, 3) if recorder else 0.0
        if recorder is not None:
            self.calls_before, self.latency_before = recorder.calls, recorder.latency_ms
        return StepOutcome(
            policy_name=row.policy_name,
            execution_id=row.execution_id,
            policy_id=row.policy_id,
            status=row.status.value,
            poll_count=row.poll_count,
            resumed=self.resumed,
            api_calls=calls,
            api_latency_ms=latency,
            message=message,
        )
