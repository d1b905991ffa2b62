"""The policy workflow's domain: policy definitions, statuses and state transitions.

Plain typed Python with no Dagster import, so the rules can be read and tested on their own.
"""

from __future__ import annotations

import datetime
import hashlib
import itertools
import json
import math
import re
from enum import StrEnum
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from pydantic_core import InitErrorDetails, PydanticCustomError

SLUG_PATTERN = re.compile(r"^[a-z0-9][a-z0-9_-]{0,127}$")


class PolicyDefinition(BaseModel):
    """One catalog entry: the policy data sent to ``POST /createpolicy``."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    policy_name: str = Field(description="Slug that identifies the policy; the partition key.")
    policy_type: str = Field(min_length=1, max_length=200)
    description: str = Field(max_length=10_000)
    priority: Literal["low", "medium", "high"]
    parameters: dict[str, Any] = Field(default_factory=dict)

    @field_validator("policy_name")
    @classmethod
    def _slug(cls, value: str) -> str:
        if not SLUG_PATTERN.fullmatch(value):
            raise ValueError(
                "must be a slug: lower-case letters, digits, '-' or '_', starting with a letter "
                "or digit, at most 128 characters"
            )
        return value

    @field_validator("policy_type", "description")
    @classmethod
    def _no_control_characters(cls, value: str) -> str:
        if any(ord(ch) < 32 and ch not in "\n\t" for ch in value):
            raise ValueError("must not contain control characters")
        return value

    # Caps on parameters, the parameters mapping itself being level 1 and one value. YAML
    # aliases repeat a value without writing it again (a value containing itself, or a "billion
    # laughs" of millions of values in a few lines): the caps refuse them before serialisation.
    MAX_PARAMETER_DEPTH: ClassVar[int] = 32
    MAX_PARAMETER_VALUES: ClassVar[int] = 1_000_000

    @field_validator("parameters", mode="before")
    @classmethod
    def _json_values_only(cls, value: object) -> object:
        if not isinstance(value, dict):
            return value  # refused by the field's type
        problem = cls._json_problem(value, (), 1, [cls.MAX_PARAMETER_VALUES])
        if problem is not None:
            # Raised as a ValidationError so that pydantic reports the path inside the field:
            # 'parameters.retention.days', not 'parameters'.
            loc, reason = problem
            error = PydanticCustomError("json_value", "{reason}", {"reason": reason})
            detail = InitErrorDetails(type=error, loc=loc, input=value)
            raise ValidationError.from_exception_data(cls.__name__, [detail])
        return value

    @classmethod
    def _json_problem(
        cls, value: object, loc: tuple[str | int, ...], depth: int, budget: list[int]
    ) -> tuple[tuple[str | int, ...], str] | None:
        """Where and why ``value`` is not a JSON value, or None. Anything else has no single
        JSON form (a set's order changes from one process to the next, a date or NaN becomes
        whatever the serialiser chooses), so the content hash would not be stable."""
        budget[0] -= 1
        if budget[0] < 0:
            return (), f"more than {cls.MAX_PARAMETER_VALUES} values"
        if value is None or isinstance(value, str | bool | int):
            return None
        if isinstance(value, float):
            if math.isfinite(value):
                return None
            return loc, f"{value} is not a JSON number: numbers must be finite"
        if isinstance(value, set | frozenset):
            return loc, "a set is not a JSON value: write a list"
        if isinstance(value, tuple):
            return loc, "a tuple is not a JSON value: write a list"
        if isinstance(value, bytes | bytearray):
            return loc, "binary data is not a JSON value: write a string"
        if isinstance(value, datetime.date | datetime.time):
            return loc, f"a {type(value).__name__} ({value}) is not a JSON value: quote it"
        if not isinstance(value, dict | list):
            return loc, f"a {type(value).__name__} is not a JSON value"
        if depth > cls.MAX_PARAMETER_DEPTH:
            return loc, f"nested deeper than {cls.MAX_PARAMETER_DEPTH} levels"
        if isinstance(value, list):
            for index, item in enumerate(value):
                problem = cls._json_problem(item, (*loc, index), depth + 1, budget)
                if problem is not None:
                    return problem
            return None
        for key, item in value.items():
            if not isinstance(key, str):
                return loc, f"key {key!r} is not a string: JSON object keys are strings, quote it"
            problem = cls._json_problem(item, (*loc, key), depth + 1, budget)
            if problem is not None:
                return problem
        return None

    def payload(self) -> dict[str, Any]:
        """The JSON body of the create request, as the original ``policy_data``."""
        return self.model_dump(mode="json")

    def content_hash(self) -> str:
        """Stable hash of the policy's content: a changed hash means a changed policy.

        Hashes one canonical text for one content (parameters are JSON values only): sorted
        keys, fixed separators, and non-ASCII always escaped, whatever its spelling in YAML."""
        canonical = json.dumps(
            self.payload(),
            sort_keys=True,
            separators=(",", ":"),
            ensure_ascii=True,
            allow_nan=False,
        )
        return hashlib.sha256(canonical.encode("ascii")).hexdigest()[:32]


class ExecutionStatus(StrEnum):
    """The workflow states, in order; ``error`` can follow any of them."""

    PENDING = "pending"
    POLICY_CREATED = "policy_created"
    POLICY_READY = "policy_ready"
    COMPLETED = "completed"
    ERROR = "error"


# Every legal move of the state machine. `error -> ...` is a resumed recoverable error (a
# polling deadline, a circuit-breaker call retried with its key) or an operator's override;
# `policy_created -> completed` is an operator skipping the circuit breaker with --force.
TRANSITIONS: dict[ExecutionStatus, frozenset[ExecutionStatus]] = {
    ExecutionStatus.PENDING: frozenset({ExecutionStatus.POLICY_CREATED, ExecutionStatus.ERROR}),
    ExecutionStatus.POLICY_CREATED: frozenset(
        {ExecutionStatus.POLICY_READY, ExecutionStatus.ERROR, ExecutionStatus.COMPLETED}
    ),
    ExecutionStatus.POLICY_READY: frozenset({ExecutionStatus.COMPLETED, ExecutionStatus.ERROR}),
    ExecutionStatus.COMPLETED: frozenset(),
    ExecutionStatus.ERROR: frozenset(
        {
            ExecutionStatus.PENDING,
            ExecutionStatus.POLICY_CREATED,
            ExecutionStatus.POLICY_READY,
            ExecutionStatus.COMPLETED,
        }
    ),
}

# The workflow's own path: each step moves an execution one status along it. The other
# transitions are failures, resumptions and operator overrides.
PATH: tuple[ExecutionStatus, ...] = (
    ExecutionStatus.PENDING,
    ExecutionStatus.POLICY_CREATED,
    ExecutionStatus.POLICY_READY,
    ExecutionStatus.COMPLETED,
)
INITIAL_STATUS = PATH[0]

# The workflow's steps (the names stored in `error_step`) and the status each one reaches.
STEP_CREATE = "policy_created"
STEP_READY = "policy_ready"
STEP_CIRCUIT = "circuit_breaker_activation"
STEP_TARGETS: dict[str, ExecutionStatus] = {
    STEP_CREATE: ExecutionStatus.POLICY_CREATED,
    STEP_READY: ExecutionStatus.POLICY_READY,
    STEP_CIRCUIT: ExecutionStatus.COMPLETED,
}
STEPS: tuple[str, ...] = tuple(STEP_TARGETS)


def allowed_sources(target: ExecutionStatus) -> frozenset[ExecutionStatus]:
    """Every status from which some transition reaches ``target``."""
    return frozenset(source for source, targets in TRANSITIONS.items() if target in targets)


def step_source(target: ExecutionStatus) -> ExecutionStatus:
    """The status the workflow's own step to ``target`` moves from (the previous on the path)."""
    index = PATH.index(target)
    if index == 0:
        raise ValueError(f"{target} is where an execution starts: no step reaches it")
    return PATH[index - 1]


# The statuses that end an execution: no transition leaves them.
FINAL_STATUSES = frozenset(status for status, targets in TRANSITIONS.items() if not targets)
# In flight: on the path and still able to move. An `error` is active too while its row is
# resumable (a later run continues it) and terminal once it is not; see `is_active`.
ACTIVE_STATUSES: tuple[ExecutionStatus, ...] = tuple(s for s in PATH if s not in FINAL_STATUSES)
# Where a recoverable failure in a step goes back to when a later run resumes it: where the
# step starts.
RESUME_FROM: dict[str, ExecutionStatus] = {
    step: step_source(target) for step, target in STEP_TARGETS.items()
}


def is_active(status: ExecutionStatus, resumable: bool) -> bool:
    """An execution that a later run continues rather than replaces."""
    return status in ACTIVE_STATUSES or (status is ExecutionStatus.ERROR and resumable)


def is_terminal(status: ExecutionStatus, resumable: bool) -> bool:
    """An execution that nothing moves any more (what archiving may take away)."""
    return status in FINAL_STATUSES or (status is ExecutionStatus.ERROR and not resumable)


def _check_state_machine() -> None:
    # The declarations above must agree: a contradiction fails at import, not in a run.
    for source, target in itertools.pairwise(PATH):
        if target not in TRANSITIONS[source]:
            raise AssertionError(f"the step {source} -> {target} is not a transition")
    for status in ACTIVE_STATUSES:
        if ExecutionStatus.ERROR not in TRANSITIONS[status]:
            raise AssertionError(f"an active {status} execution must be able to fail")
    for target in RESUME_FROM.values():
        if target not in TRANSITIONS[ExecutionStatus.ERROR]:
            raise AssertionError(f"a resumed error cannot go back to {target}")


_check_state_machine()


class IllegalTransition(Exception):
    pass


def check_transition(current: ExecutionStatus, target: ExecutionStatus) -> None:
    if target not in TRANSITIONS[current]:
        raise IllegalTransition(f"execution cannot move from {current} to {target}")


class ApiPolicyStatus(StrEnum):
    """How the workflow reads a status reported by ``GET /policy/{policy_id}``."""

    READY = "ready"
    FAILED = "failed"
    PENDING = "pending"
    UNKNOWN = "unknown"


# A tuple, in this order: the simulator offers them as choices and names them in messages.
SUCCESS_STATUSES: tuple[str, ...] = ("success", "completed", "active", "ready")
FAILURE_STATUSES = frozenset({"failed", "failure", "error", "rejected", "cancelled", "canceled"})
PENDING_STATUSES = frozenset({"pending", "running", "in_progress", "processing", "queued"})


def classify_api_status(raw: object) -> ApiPolicyStatus:
    """Map the API's status string onto the workflow's view of it.

    Unknown values are not failures: the caller keeps polling (with a warning) until its
    deadline, because a new intermediate status must not fail a healthy policy.
    """
    if not isinstance(raw, str):
        return ApiPolicyStatus.UNKNOWN
    value = raw.strip().lower()
    if value in SUCCESS_STATUSES:
        return ApiPolicyStatus.READY
    if value in FAILURE_STATUSES:
        return ApiPolicyStatus.FAILED
    if value in PENDING_STATUSES:
        return ApiPolicyStatus.PENDING
    return ApiPolicyStatus.UNKNOWN


def create_idempotency_key(execution_id: str) -> str:
    return f"create-{execution_id}"


def circuit_idempotency_key(execution_id: str) -> str:
    return f"circuit-{execution_id}"


TRIGGER_REASON = "policy_ready"
