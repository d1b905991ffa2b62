"""What an operator does by hand (the `policy-pipeline` CLI): an override of one policy's
circuit breaker, an audit entry for it, and a check that the Policy API answers. Plain Python
over the state store and the API client; the CLI only parses and prints."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from logging import Logger
from typing import Literal

from policy_pipeline.core.domain import ExecutionStatus, IllegalTransition
from policy_pipeline.core.engine.steps import StepFailed
from policy_pipeline.core.engine.workflow import PolicyWorkflow
from policy_pipeline.core.policy_api import PolicyApiClient, PolicyApiConfig
from policy_pipeline.core.policy_api_types import ApiAttempt, PolicyApiError, api_key_problem
from policy_pipeline.core.settings import API_ENDPOINT_VAR, API_KEY_VAR, LeaseSettings, Settings
from policy_pipeline.core.store.rows import AuditEvent, ExecutionRow
from policy_pipeline.core.store.state_store import StateStore

# A policy id no API has: any HTTP answer to a status request for it proves the API reachable.
PROBE_POLICY_ID = "__policy_pipeline_diagnose__"


class OverrideRefused(Exception):
    """The override cannot be done as asked; nothing was changed."""


class OverrideFailed(Exception):
    """The circuit breaker call failed; a forced ``policy_ready`` was put back if it could be."""


@dataclass(frozen=True)
class Override:
    """An operator's override of one policy's circuit breaker."""

    policy: str
    action: Literal["trigger_circuit_breaker", "skip_circuit_breaker"]
    reason: str
    force: bool  # even if the execution is not policy_ready
    owner: str  # the lease owner the override holds the policy's lease as (operator:<user>@...)
    user: str  # the operating system user, as recorded in the audit trail


def audit_operator(
    store: StateStore, row: ExecutionRow, action: str, reason: str, user: str
) -> None:
    """Record what an operator did to an execution, and why."""
    store.audit(
        AuditEvent.about(
            row,
            "override",
            f"{action} by {user}: {reason}",
            detail={"action": action, "operator": user, "reason": reason},
        )
    )
    store.flush()


def override_circuit_breaker(
    store: StateStore,
    override: Override,
    lease: LeaseSettings,
    api: PolicyApiClient | None,
    log: Logger,
) -> str:
    """Trigger or skip the circuit breaker of the policy's current execution, under the
    policy's lease; audited once it has happened. Returns what was done. Raises
    `OverrideRefused` (nothing changed) or `OverrideFailed`. ``api`` is needed to trigger."""
    row = store.current_execution(override.policy)
    if row is None:
        raise OverrideRefused(f"no execution for policy '{override.policy}'")
    if row.circuit_breaker_completed or row.status is ExecutionStatus.COMPLETED:
        done = "triggered" if row.circuit_breaker_completed else "skipped"
        raise OverrideRefused(
            f"execution {row.execution_id} is already completed (circuit breaker {done}); "
            "an override never fires it twice"
        )
    if row.status is not ExecutionStatus.POLICY_READY and not override.force:
        raise OverrideRefused(
            f"execution {row.execution_id} is '{row.status}', not 'policy_ready'; "
            "use --force to override anyway"
        )
    if row.policy_id is None:
        raise OverrideRefused(
            f"execution {row.execution_id} is '{row.status}': the policy was never "
            "created, so there is no circuit breaker to trigger or skip"
        )
    # Hold the policy's lease through the override: no run polls it, claims it or fires its
    # circuit breaker meanwhile, and a run holding it now is not overridden under it.
    if override.policy not in store.acquire_leases(
        [override.policy], override.owner, lease.ttl_seconds
    ):
        holder = store.lease_holders([override.policy]).get(override.policy)
        who = f"{holder[0].split('@')[0]} (until {holder[1]})" if holder else "a run"
        raise OverrideRefused(
            f"policy '{override.policy}' is being processed by {who}; wait for it, or stop "
            "that run, then override"
        )
    try:
        try:
            return _override(store, row, override, lease, api, log)
        except IllegalTransition as exc:
            raise OverrideRefused(f"execution {row.execution_id}: {exc}") from None
    finally:
        store.release_leases([override.policy], override.owner)


def _override(
    store: StateStore,
    row: ExecutionRow,
    override: Override,
    lease: LeaseSettings,
    api: PolicyApiClient | None,
    log: Logger,
) -> str:
    operator = override.owner.split("@")[0]
    forced = " (forced)" if override.force else ""
    if override.action == "skip_circuit_breaker":
        message = f"Circuit breaker skipped by {operator}: {override.reason}"
        if not store.skip_circuit_breaker(row, message, force=override.force):
            raise OverrideRefused("the execution changed meanwhile")
        audit_operator(store, row, override.action + forced, override.reason, override.user)
        return f"Execution {row.execution_id} completed without the circuit breaker."
    if api is None:
        raise ValueError("triggering the circuit breaker needs a Policy API client")
    if row.status is not ExecutionStatus.POLICY_READY:
        message = f"Forced to policy_ready by {operator}: {override.reason}"
        if not store.force_ready(row, message):
            raise OverrideRefused("the execution changed meanwhile")
    workflow = PolicyWorkflow(
        store=store, api=api, owner=override.owner, log=log, lease=lease, max_concurrency=1
    )
    try:
        outcome = workflow.activate_circuit_breaker(override.policy)
    except StepFailed as exc:
        undone = row.status is not ExecutionStatus.POLICY_READY and store.undo_force_ready(
            row, f"Override by {operator} failed before the circuit breaker; put back"
        )
        after = " (the forced policy_ready was undone)" if undone else ""
        raise OverrideFailed(f"{exc}{after}") from None
    audit_operator(store, row, override.action + forced, override.reason, override.user)
    return f"Circuit breaker triggered for execution {outcome.execution_id}: {outcome.status}."


def api_config(settings: Settings, api_key: str) -> PolicyApiConfig:
    """The client configuration the Dagster resource builds from these settings."""
    # The settings' knobs have the client's names.
    return PolicyApiConfig(
        endpoint=settings.api_endpoint, api_key=api_key, **dataclasses.asdict(settings.api)
    )


@dataclass(frozen=True)
class Reachability:
    ok: bool
    detail: str


def api_reachability(settings: Settings, api_key: str | None) -> Reachability:
    """Whether the Policy API answers, and accepts the key: one status request (the client's
    configured path, deadline and scrubbing; one attempt) for a policy id no API has."""
    if not settings.api_endpoint:
        return Reachability(False, f"{API_ENDPOINT_VAR} is not set")
    problem = api_key_problem(api_key or "")
    if api_key is None or problem is not None:
        return Reachability(False, f"{API_KEY_VAR} {problem}")
    attempts: list[ApiAttempt] = []
    config = dataclasses.replace(api_config(settings, api_key), max_attempts=1)
    with PolicyApiClient(config) as client:
        try:
            status = client.get_policy_status(PROBE_POLICY_ID, attempts.append).http_status
        except PolicyApiError as exc:
            answered = [a.http_status for a in attempts if a.http_status is not None]
            if not answered:  # no HTTP answer at all
                return Reachability(
                    False, f"unreachable: {attempts[-1].error if attempts else exc}"
                )
            status = answered[-1]  # a 5xx or 429 is an answer too
    if status in (401, 403):
        return Reachability(False, f"reachable, but the key was refused (HTTP {status})")
    return Reachability(True, f"reachable (HTTP {status})")
