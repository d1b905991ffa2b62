"""The policy workflow's domain: policy definitions, statuses and state transitions.

Plain typed Python with no Dagster import, so the rules can be read and tested on their own.
"""

from __future__ import annotations

import hashlib
import json
import re
from enum import StrEnum
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

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

    def payload(self) -> dict[str, Any]:
        """The JSON body of the create request, as the seed's ``policy_data``."""
        return self.model_dump(mode="json")

    def content_hash(self) -> str:
        """Stable hash of the policy's content: a changed hash means a changed policy."""
        canonical = json.dumps(self.payload(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()[:32]


class ExecutionStatus(StrEnum):
    """The seed's workflow states, in order; ``error`` can follow any of them."""

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


SUCCESS_STATUSES = frozenset({"success", "completed", "active", "ready"})
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
