"""Progress outside runs (`policy_progress_sensor`, through `StateStore`): a handful of
statements per tick however many policies wait. The due ones are read with a LIMIT, and each
kind of write is one statement for the whole batch."""

from __future__ import annotations

from policy_pipeline.core.domain import ACTIVE_STATUSES, ExecutionStatus
from policy_pipeline.core.store.batches import IDS, update_from_rows
from policy_pipeline.core.store.dialect import Statement
from policy_pipeline.core.store.predicates import (
    WAITING,
    active,
    resumable_error,
    status_in,
    step_guard,
)
from policy_pipeline.core.store.schema import STATE, Column
from policy_pipeline.core.store.statements.executions import READ
from policy_pipeline.core.store.statements.leases import LIVE_LEASE_NAMES

_S = STATE.name

# Params: lead seconds, limit. The handed-off policies whose next poll is due (or due within
# the lead), earliest first, and how long each has waited since it was created.
DUE_WAITS = Statement(
    "due_waits",
    f'SELECT {READ}, DATEDIFF(second, "policy_created_time", SYSDATE()) '
    f"FROM {_S} WHERE {WAITING} "
    f'AND "next_poll_time" <= DATEADD(second, ?, SYSDATE()) '
    f'ORDER BY "next_poll_time" LIMIT ?',
)

# How many wait, and in how many seconds the next one is due (for the tick's cursor).
WAIT_SUMMARY = Statement(
    "wait_summary",
    f'SELECT COUNT(*), DATEDIFF(second, SYSDATE(), MIN("next_poll_time")) '
    f"FROM {_S} WHERE {WAITING}",
)

# Params: limit. What nothing is moving: an active execution that no live lease holds (its run
# crashed, stopped or failed around it) and is not handed off, or a resumable error; with the
# seconds since it last moved or was last resumed (the backoff is applied by the caller).
RESUME_CANDIDATES = Statement(
    "resume_candidates",
    f"SELECT {READ}, "
    f'DATEDIFF(second, COALESCE("last_resume_time", "updated_time"), SYSDATE()) '
    f"FROM {_S} "
    f"WHERE (({status_in(ACTIVE_STATUSES)} AND NOT {WAITING}) OR {resumable_error()}) "
    f'AND "policy_name" NOT IN ({LIVE_LEASE_NAMES}) '
    f'ORDER BY COALESCE("last_resume_time", "updated_time") LIMIT ?',
)

_COUNT_UNCHANGED = f'COALESCE({_S}."auto_resume_count", 0) = v.v_count'

# A tick claims a resumption: one tick wins per (execution, count); its token says which.
CLAIM_RESUMES = update_from_rows(
    "claim_resumes",
    STATE,
    (Column("count", "NUMBER"), Column("token", "VARCHAR")),
    '"auto_resume_count" = v.v_count + 1, "last_resume_time" = SYSDATE(), '
    '"progress_claim" = v.v_token',
    f"{active(_S)} AND {_COUNT_UNCHANGED}",
)

# A tick claims the circuit-breaker run of an execution that turned ready outside a run.
CLAIM_CIRCUIT_REQUESTS = update_from_rows(
    "claim_circuit_requests",
    STATE,
    (Column("token", "VARCHAR"),),
    '"progress_claim" = v.v_token',
    f"{step_guard(ExecutionStatus.COMPLETED, _S)} "
    f'AND {_S}."circuit_breaker_initiated" = FALSE '
    f'AND {_S}."progress_claim" IS NULL',
)

# The resume budget is spent (or a handed-off wait passed its deadline): error for good.
GIVE_UP = update_from_rows(
    "give_up",
    STATE,
    (
        Column("count", "NUMBER"),
        Column("token", "VARCHAR"),
        Column("step", "VARCHAR"),
        Column("error", "VARCHAR"),
    ),
    f'"status" = \'{ExecutionStatus.ERROR}\', "resumable" = FALSE, "handed_off" = FALSE, '
    '"error_message" = v.v_error, "error_step" = v.v_step, "message" = v.v_error, '
    '"progress_claim" = v.v_token',
    f"{active(_S)} AND {_COUNT_UNCHANGED}",
)

# Params: token, ids. Which of these executions the tick with this token claimed.
CLAIMED_BY = Statement(
    "claimed_by",
    f'SELECT "execution_id" FROM {_S} WHERE "progress_claim" = ? '
    f'AND "execution_id" IN (SELECT v_execution_id FROM {IDS})',
)
