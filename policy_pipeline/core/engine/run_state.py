"""What the parts of one engine run share: each policy's `Track`, the `Writes` the workers
have gathered for the writer, and `RunContext`, the run as a step's rules see it (implemented
by `workflow._Run`). Also what the engine needs from outside (`Logger`) and the
failure wording the steps share.

Serves all three workflow assets. It imports no step module, so the step modules
(`policy_created.py`, `policy_ready.py`, `circuit_breaker_activation.py`), `scheduling.py` and
`leases.py` can import it without a cycle.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from policy_pipeline.core.engine.auditing import AttemptRecorder
from policy_pipeline.core.engine.guard import ApiGuard
from policy_pipeline.core.engine.steps import Progress, RunReport, StepOutcome
from policy_pipeline.core.policy_api import PolicyApiClient
from policy_pipeline.core.policy_api_types import ApiResponse
from policy_pipeline.core.store.state_store import ExecutionRow, StateStore


class Logger(Protocol):
    def info(self, msg: str) -> None: ...

    def warning(self, msg: str) -> None: ...


@dataclass(eq=False)
class Track:
    """One policy's way through this run."""

    name: str
    steps: list[str]  # the chosen steps still ahead of it, in order
    row: ExecutionRow | None = None
    resumed: bool = False  # it entered its current step with work already done
    body: Any = None  # the create request's body
    recorder: AttemptRecorder | None = None
    polls: int = 0  # in this run
    polling_since: float = 0.0
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

    @property
    def execution(self) -> ExecutionRow:
        assert self.row is not None, f"policy '{self.name}' has no execution yet"
        return self.row

    def attempt_recorder(self, store: StateStore, guard: ApiGuard | None) -> AttemptRecorder:
        """The recorder of its current execution (a new execution starts new figures)."""
        assert self.row is not None
        if self.recorder is None or self.recorder.row.execution_id != self.row.execution_id:
            self.recorder = AttemptRecorder(store, self.row, guard, self.fenced)
            self.calls_before, self.latency_before = 0, 0.0
        return self.recorder

    def outcome(self, message: str) -> StepOutcome:
        """What its current step did: the row as it is now, and the step's API figures."""
        row = self.row
        assert row is not None
        recorder = self.recorder
        return StepOutcome(
            policy_name=row.policy_name,
            execution_id=row.execution_id,
            policy_id=row.policy_id,
            status=row.status.value,
            poll_count=row.poll_count,
            resumed=self.resumed,
            api_calls=recorder.calls - self.calls_before if recorder else 0,
            api_latency_ms=round(recorder.latency_ms - self.latency_before, 3) if recorder else 0.0,
            message=message,
        )


@dataclass
class Polls:
    """A policy's polls since the last write: how many, and the last answer."""

    track: Track
    count: int = 0
    body: Any = None
    message: str = ""


@dataclass(frozen=True)
class Created:
    """The create call answered with this ``policy_id``."""

    track: Track
    policy_id: str
    body: Any


@dataclass(frozen=True)
class Failure:
    """The policy failed at ``step``; ``resumable``: a later run goes on from where it is."""

    track: Track
    error: str
    step: str
    resumable: bool


@dataclass
class Writes:
    """What the workers learnt and the writer has not written yet."""

    intents: list[Track] = field(default_factory=list)
    polls: dict[str, Polls] = field(default_factory=dict)  # by execution id
    created: list[Created] = field(default_factory=list)
    ready: dict[Track, str] = field(default_factory=dict)  # the API called it ready: why
    handoffs: dict[Track, float] = field(default_factory=dict)  # let go: next poll in seconds
    claims: list[Track] = field(default_factory=list)
    completed: dict[Track, Any] = field(default_factory=dict)  # the circuit answer's body
    # Answer bodies to keep on the state rows, by column.
    kept: dict[str, dict[Track, Any]] = field(default_factory=dict)
    failed: list[Failure] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)  # logged by the writer, not the workers

    def __bool__(self) -> bool:
        return any(
            (self.intents, self.polls, self.created, self.ready, self.claims, self.completed)
        ) or any((self.handoffs, self.kept, self.failed, self.warnings))

    def without(self, names: set[str]) -> Writes:
        """These writes less those about the named policies, whose leases another run holds:
        what this run learnt of them is left for that run to learn again. Their poll counts
        stay (the polls were made, and their audit events are written), so that
        ``poll_count`` agrees with the audit trail."""

        def keep(track: Track) -> bool:
            return track.name not in names

        return Writes(
            intents=[t for t in self.intents if keep(t)],
            polls=self.polls,
            created=[w for w in self.created if keep(w.track)],
            ready={t: why for t, why in self.ready.items() if keep(t)},
            handoffs={t: delay for t, delay in self.handoffs.items() if keep(t)},
            claims=[t for t in self.claims if keep(t)],
            completed={t: body for t, body in self.completed.items() if keep(t)},
            kept={
                column: kept
                for column, bodies in self.kept.items()
                if (kept := {t: body for t, body in bodies.items() if keep(t)})
            },
            failed=[w for w in self.failed if keep(w.track)],
            warnings=self.warnings,
        )


class RunContext(Protocol):
    """The run as a step's rules see it. ``writes``, ``report``, the tracks and the methods
    are shared with the workers: use them with ``changed`` held."""

    store: StateStore
    api: PolicyApiClient
    guard: ApiGuard | None
    log: Logger
    steps: list[str]  # the steps chosen for this run
    changed: threading.Condition
    writes: Writes  # the writer swaps it for an empty one at each batch: never keep it
    report: RunReport
    on_progress: Callable[[Progress], None]

    def schedule(self, call: str, track: Track, delay: float = 0.0) -> None:
        """Queue an API call (``"create"``, ``"poll"``, ``"circuit"``) ``delay`` from now."""
        ...

    def begin(self, track: Track, claims: list[Track]) -> None:
        """Start the track's next step."""
        ...

    def passed(self, track: Track, message: str, claims: list[Track]) -> None:
        """The track passed its current step: report it and begin the next."""
        ...

    def fail(self, track: Track, step: str, error: str) -> None:
        """The track failed at ``step`` (the state row already says so)."""
        ...

    def finish(self, track: Track) -> None:
        """The track is done in this run, whatever its state."""
        ...

    def detail(self, message: str) -> None:
        """A per-policy log line (small runs only)."""
        ...

    def warn(self, track: Track, message: str) -> None:
        """A warning about one policy: logged by the writer, audited now."""
        ...

    def refused_credentials(self, response: ApiResponse) -> bool:
        """Whether the answer refuses our credentials (then the run stops starting calls)."""
        ...


def refusal(row: ExecutionRow, why: str) -> str:
    detail = f" ({row.error_message})" if row.error_message else ""
    return f"execution {row.execution_id} is '{row.status}'{detail}: {why}"


def excerpt(response: ApiResponse, limit: int = 300) -> str:
    text = response.text.strip()
    if not text:
        return "(empty body)"
    return text[:limit] + ("..." if len(text) > limit else "")
