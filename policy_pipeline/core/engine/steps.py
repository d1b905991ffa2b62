"""The workflow's three steps by name, and what a run reports about them.

Each step is named by the key of the Dagster asset it materializes (`defs/workflow/assets.py`);
what it does is one function of `flow.py`:

- ``policy_created`` -> `flow.create_policy`
- ``policy_ready`` -> `flow.wait_until_ready`
- ``circuit_breaker_activation`` -> `flow.trigger_circuit_breaker`

This module serves all three assets; it imports nothing else from the engine, so every other
engine module can import it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from policy_pipeline.core.domain import (
    STEPS,
)


class StepFailed(Exception):
    """A step could not complete for one policy; the state table says why."""

    def __init__(self, policy_name: str, step: str, message: str) -> None:
        super().__init__(f"{step} failed for policy '{policy_name}': {message}")
        self.policy_name = policy_name
        self.step = step
        self.reason = message


@dataclass
class StepOutcome:
    policy_name: str
    execution_id: str
    policy_id: str | None
    status: str
    poll_count: int
    resumed: bool = False
    api_calls: int = 0
    api_latency_ms: float = 0.0
    message: str = ""


@dataclass
class StepReport:
    """What one step did for each policy."""

    outcomes: dict[str, StepOutcome] = field(default_factory=dict)
    failures: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Progress:
    """One policy passed one step (``outcome``) or failed at it (``error``), just now: the
    state row already says so."""

    policy_name: str
    step: str
    outcome: StepOutcome | None = None
    error: str | None = None
    waiting: str | None = None  # handed off: waiting for readiness outside the run


@dataclass
class RunReport:
    """What a run did: per step, the policies that passed it; per policy, where it failed."""

    outcomes: dict[str, dict[str, StepOutcome]] = field(
        default_factory=lambda: {step: {} for step in STEPS}
    )
    failures: dict[str, tuple[str, str]] = field(default_factory=dict)  # name -> (step, why)
    waiting: dict[str, str] = field(default_factory=dict)  # handed off: name -> message

    def step(self, step: str) -> StepReport:
        return StepReport(
            outcomes=dict(self.outcomes[step]),
            failures={name: why for name, (_step, why) in self.failures.items()},
        )
