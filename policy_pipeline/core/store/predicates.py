"""The domain's state machine (``core.domain``) as SQL conditions on the state table's
``status``: every status guard of a statement is generated here, never written by hand, so the
SQL cannot drift from the transitions the Python side checks.
"""

from __future__ import annotations

from collections.abc import Iterable

from policy_pipeline.core.domain import (
    ACTIVE_STATUSES,
    FINAL_STATUSES,
    ExecutionStatus,
    step_source,
)


def _column(name: str, table: str | None) -> str:
    return f'{table}."{name}"' if table else f'"{name}"'


def status_in(statuses: Iterable[ExecutionStatus], table: str | None = None) -> str:
    """``"status" = 'x'`` or ``"status" IN ('x', 'y')`` (in the statuses' declared order)."""
    chosen = set(statuses)
    ordered = [status for status in ExecutionStatus if status in chosen]
    if not ordered:
        raise ValueError("a status guard needs at least one status")
    column = _column("status", table)
    if len(ordered) == 1:
        return f"{column} = '{ordered[0].value}'"
    values = ", ".join(f"'{status.value}'" for status in ordered)
    return f"{column} IN ({values})"


def step_guard(target: ExecutionStatus, table: str | None = None) -> str:
    """The workflow's own step to ``target``: only from the status before it on the path."""
    return status_in([step_source(target)], table)


def resumable_error(table: str | None = None) -> str:
    error = status_in([ExecutionStatus.ERROR], table)
    return f"({error} AND {_column('resumable', table)} = TRUE)"


def active(table: str | None = None) -> str:
    """An execution that a later run continues rather than replaces (``domain.is_active``)."""
    return f"({status_in(ACTIVE_STATUSES, table)} OR {resumable_error(table)})"


def terminal(table: str | None = None) -> str:
    """An execution nothing moves any more (``domain.is_terminal``). Not the negation of
    ``active``: an error whose ``resumable`` is NULL is neither, as it always was."""
    final = status_in(FINAL_STATUSES, table)
    error = status_in([ExecutionStatus.ERROR], table)
    return f"({final} OR ({error} AND {_column('resumable', table)} = FALSE))"


# The status a policy is polled in: where the readiness step starts.
POLLED_STATUS = step_source(ExecutionStatus.POLICY_READY)

ACTIVE = active()
TERMINAL = terminal()
# Handed off by its run: waiting for readiness, polled by the progress sensor, not stuck.
WAITING = f'({status_in([POLLED_STATUS])} AND COALESCE("handed_off", FALSE) = TRUE)'
