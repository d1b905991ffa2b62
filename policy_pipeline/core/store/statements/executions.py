"""The execution state and its audit trail: what `StateStore` runs for the workflow engine and
the operator overrides. Every move is conditional on the status the domain allows it from."""

from __future__ import annotations

import functools

from policy_pipeline.core.domain import PATH, STEP_CIRCUIT, ExecutionStatus, allowed_sources
from policy_pipeline.core.store.batches import (
    IDS,
    NAMES,
    insert_from_rows,
    rows_source,
    update_from_rows,
)
from policy_pipeline.core.store.dialect import Statement
from policy_pipeline.core.store.predicates import (
    ACTIVE,
    POLLED_STATUS,
    resumable_error,
    status_in,
    step_guard,
)
from policy_pipeline.core.store.rows import EXECUTION_READ_COLUMNS
from policy_pipeline.core.store.schema import (
    EVENT_INSERT_COLUMNS,
    EVENTS,
    NEW_EXECUTION_COLUMNS,
    STATE,
    STATE_HISTORY,
    Column,
)

_S = STATE.name
READ = ", ".join(f'"{c}"' for c in EXECUTION_READ_COLUMNS)

# The intents: committed before any create call is made.
INSERT_EXECUTIONS = insert_from_rows("insert_executions", STATE, NEW_EXECUTION_COLUMNS)

# A batch of audit events: one round trip per flush, not per event.
INSERT_EVENTS = insert_from_rows("insert_events", EVENTS, EVENT_INSERT_COLUMNS)

# Each policy's active execution, or else its latest. A long history stays cheap: a hash
# aggregate finds each policy's latest start, the window orders only the candidates (active,
# latest or without a start time) on narrow columns, and only the chosen rows are read whole.
CURRENT_EXECUTIONS = Statement(
    "current_executions",
    f'WITH named AS (SELECT "policy_name", "execution_id", "start_time", '
    f"CASE WHEN {ACTIVE} THEN 0 ELSE 1 END AS inactive FROM {_S} "
    f'WHERE "policy_name" IN (SELECT v_policy_name FROM {NAMES})), '
    f'latest AS (SELECT "policy_name", MAX("start_time") AS latest_start FROM named '
    f'GROUP BY "policy_name"), '
    f'chosen AS (SELECT n."execution_id" FROM named AS n JOIN latest AS l '
    f'ON n."policy_name" = l."policy_name" WHERE n.inactive = 0 '
    f'OR n."start_time" = l.latest_start OR n."start_time" IS NULL '
    f'QUALIFY ROW_NUMBER() OVER (PARTITION BY n."policy_name" '
    f'ORDER BY n.inactive, n."start_time" DESC, n."execution_id" DESC) = 1) '
    f"SELECT {READ} FROM {_S} "
    f'WHERE "execution_id" IN (SELECT "execution_id" FROM chosen)',
)

EXECUTIONS_BY_ID = Statement(
    "executions_by_id",
    f'SELECT {READ} FROM {_S} WHERE "execution_id" IN (SELECT v_execution_id FROM {IDS})',
)

POLICY_DATA_BY_ID = Statement(
    "policy_data_by_id",
    f'SELECT "execution_id", "policy_data" FROM {_S} '
    f'WHERE "execution_id" IN (SELECT v_execution_id FROM {IDS})',
)

# Params: target status, message, ids. A resumable error goes back to where its step starts.
REOPEN_EXECUTIONS = Statement(
    "reopen_executions",
    f'UPDATE {_S} SET "status" = ?, "message" = ?, "resumable" = FALSE, '
    f'"error_message" = NULL, "error_step" = NULL, "handed_off" = FALSE, '
    f'"resume_count" = COALESCE("resume_count", 0) + 1, "updated_time" = SYSDATE() '
    f'WHERE "execution_id" IN (SELECT v_execution_id FROM {IDS}) AND {resumable_error()}',
)

# The moves below take rows of execution_id plus the columns named.
# A policy_id already bound to another execution (live or archived) is refused: an API that
# hands one policy_id to several creates must not get two executions completed under it.
MARK_CREATED = update_from_rows(
    "mark_created",
    STATE,
    (Column("policy_id", "VARCHAR"), Column("response", "VARIANT"), Column("message", "VARCHAR")),
    f'"status" = \'{ExecutionStatus.POLICY_CREATED}\', "policy_id" = v.v_policy_id, '
    '"api_response" = v.v_response, "message" = v.v_message, '
    '"policy_created_time" = SYSDATE()',
    f"{step_guard(ExecutionStatus.POLICY_CREATED, _S)} "
    f"AND NOT EXISTS (SELECT 1 FROM {_S} AS other "
    f'WHERE other."policy_id" = v.v_policy_id AND other."execution_id" <> v.v_execution_id) '
    f"AND NOT EXISTS (SELECT 1 FROM {STATE_HISTORY.name} AS archived "
    f'WHERE archived."policy_id" = v.v_policy_id)',
)

_POLICY_IDS = rows_source((Column("policy_id", "VARCHAR"),))

# Params: policy ids. Which executions (live or archived) hold these policy_ids.
POLICY_ID_HOLDERS = Statement(
    "policy_id_holders",
    f'SELECT "policy_id", "execution_id", "policy_name" FROM {_S} '
    f'WHERE "policy_id" IN (SELECT v_policy_id FROM {_POLICY_IDS}) '
    f'UNION ALL SELECT "policy_id", "execution_id", "policy_name" FROM {STATE_HISTORY.name} '
    f'WHERE "policy_id" IN (SELECT v_policy_id FROM {_POLICY_IDS})',
)

_COMPLETED = status_in([ExecutionStatus.COMPLETED])

# Params: names, names. The completed executions of these policies, archived ones included:
# "the same content is one policy" holds after archiving too.
COMPLETED_EXECUTIONS = Statement(
    "completed_executions",
    f"SELECT {READ} FROM {_S} WHERE {_COMPLETED} "
    f'AND "policy_name" IN (SELECT v_policy_name FROM {NAMES}) '
    f"UNION ALL SELECT {READ} FROM {STATE_HISTORY.name} WHERE {_COMPLETED} "
    f'AND "policy_name" IN (SELECT v_policy_name FROM {NAMES})',
)

# Which policy contents have already been executed (so the catalog sensor never launches the
# same content twice, even with a lost cursor). Archived executions count too.
EXECUTED_CONTENT = Statement(
    "executed_content",
    f'SELECT DISTINCT "policy_name", "policy_content_hash" FROM {_S} '
    f'UNION SELECT DISTINCT "policy_name", "policy_content_hash" FROM {STATE_HISTORY.name}',
)

# ``next_in`` (seconds) is when the progress sensor polls a handed-off policy next (NULL in a
# run, which schedules its own polls).
RECORD_POLLS = update_from_rows(
    "record_polls",
    STATE,
    (
        Column("polls", "NUMBER"),
        Column("response", "VARIANT"),
        Column("message", "VARCHAR"),
        Column("next_in", "NUMBER"),
    ),
    '"poll_count" = COALESCE("poll_count", 0) + v.v_polls, '
    '"last_poll_time" = SYSDATE(), '
    '"policy_status_response" = v.v_response, "message" = v.v_message, '
    '"next_poll_time" = DATEADD(second, v.v_next_in, SYSDATE())',
    status_in([POLLED_STATUS], _S),
)

# A run hands a long wait off: the row stays polled, flagged, with its next poll due. Any
# earlier sensor claim is cleared, so the tick that finds it ready can claim it.
HAND_OFF = update_from_rows(
    "hand_off",
    STATE,
    (Column("next_in", "NUMBER"), Column("message", "VARCHAR")),
    '"handed_off" = TRUE, "next_poll_time" = DATEADD(second, v.v_next_in, SYSDATE()), '
    '"progress_claim" = NULL, "message" = v.v_message',
    status_in([POLLED_STATUS], _S),
)

# The original dual validation: the API said ready for this policy_id AND the row still agrees.
MARK_READY = update_from_rows(
    "mark_ready",
    STATE,
    (Column("policy_id", "VARCHAR"), Column("message", "VARCHAR")),
    f'"status" = \'{ExecutionStatus.POLICY_READY}\', "requires_circuit_breaker" = TRUE, '
    '"message" = v.v_message, "policy_ready_time" = SYSDATE()',
    f'{step_guard(ExecutionStatus.POLICY_READY, _S)} AND {_S}."policy_id" = v.v_policy_id',
)

# The exactly-once gate: only a ready execution whose breaker is not yet initiated moves.
CLAIM_CIRCUIT_BREAKERS = update_from_rows(
    "claim_circuit_breakers",
    STATE,
    (Column("key", "VARCHAR"), Column("reason", "VARCHAR"), Column("message", "VARCHAR")),
    '"circuit_breaker_initiated" = TRUE, "circuit_idempotency_key" = v.v_key, '
    '"trigger_reason" = v.v_reason, "message" = v.v_message',
    f'{step_guard(ExecutionStatus.COMPLETED, _S)} AND {_S}."circuit_breaker_initiated" = FALSE',
)

MARK_COMPLETED = update_from_rows(
    "mark_completed",
    STATE,
    (Column("response", "VARIANT"), Column("message", "VARCHAR")),
    f'"status" = \'{ExecutionStatus.COMPLETED}\', "completed" = TRUE, '
    '"circuit_breaker_completed" = TRUE, '
    '"circuit_breaker_response" = v.v_response, "message" = v.v_message, '
    '"error_message" = NULL, "completed_time" = SYSDATE()',
    f"{step_guard(ExecutionStatus.COMPLETED, _S)} "
    f'AND {_S}."circuit_breaker_initiated" = TRUE '
    f'AND {_S}."circuit_breaker_completed" = FALSE',
)

MARK_ERRORS = update_from_rows(
    "mark_errors",
    STATE,
    (
        Column("error", "VARCHAR"),
        Column("step", "VARCHAR"),
        Column("resumable", "BOOLEAN"),
        Column("message", "VARCHAR"),
    ),
    f'"status" = \'{ExecutionStatus.ERROR}\', "error_message" = v.v_error, '
    '"error_step" = v.v_step, "resumable" = v.v_resumable, "message" = v.v_message',
    status_in(allowed_sources(ExecutionStatus.ERROR), _S),
)

# Retiring an execution whose catalog content changed (or whose file was deleted) before it was
# ready: it ends error for good, only from where no circuit breaker can have started (not yet
# ready, or a resumable error before the circuit-breaker step). A racing move to policy_ready
# wins, and the caller finishes that execution instead.
RETIRE_SOURCES = PATH[: PATH.index(ExecutionStatus.POLICY_READY)]
RETIRE_EXECUTIONS = update_from_rows(
    "retire_executions",
    STATE,
    (Column("error", "VARCHAR"), Column("step", "VARCHAR")),
    f'"status" = \'{ExecutionStatus.ERROR}\', "resumable" = FALSE, "handed_off" = FALSE, '
    '"error_message" = v.v_error, "error_step" = v.v_step, "message" = v.v_error',
    f"({status_in(RETIRE_SOURCES, _S)} OR ({resumable_error(_S)} "
    f"AND COALESCE({_S}.\"error_step\", '') <> '{STEP_CIRCUIT}')) "
    f'AND COALESCE({_S}."circuit_breaker_initiated", FALSE) = FALSE',
)

RESPONSE_COLUMNS = ("api_response", "circuit_breaker_response")


@functools.cache
def set_responses(column: str) -> Statement:
    """Keep a raw API response (``api_response`` or ``circuit_breaker_response``)."""
    if column not in RESPONSE_COLUMNS:
        raise ValueError(f"{column} is not a response column")
    return update_from_rows(
        f"set_{column}",
        STATE,
        (Column("response", "VARIANT"),),
        f'"{column}" = v.v_response',
        "TRUE",
    )


# Operator overrides (`policy-pipeline override`): conditional like every other move.
FORCE_READY = Statement(
    "force_ready",
    f"UPDATE {_S} SET \"status\" = '{ExecutionStatus.POLICY_READY}', "
    '"requires_circuit_breaker" = TRUE, '
    f'"resumable" = FALSE, "error_message" = NULL, "error_step" = NULL, "message" = ?, '
    f'"policy_ready_time" = COALESCE("policy_ready_time", SYSDATE()), '
    f'"updated_time" = SYSDATE() '
    f'WHERE "execution_id" = ? AND {status_in(allowed_sources(ExecutionStatus.POLICY_READY))} '
    f'AND "policy_id" IS NOT NULL AND "circuit_breaker_completed" = FALSE',
)

# What an undone override may find: the forced status, or the error a run left it in since
# (its circuit breaker never started either way).
UNDO_FORCE_READY_SOURCES = (ExecutionStatus.POLICY_READY, ExecutionStatus.ERROR)

# Params: status, error, step, resumable, message, id. An operator's forced policy_ready whose
# circuit breaker never started goes back to where it was.
UNDO_FORCE_READY = Statement(
    "undo_force_ready",
    f'UPDATE {_S} SET "status" = ?, "error_message" = ?, "error_step" = ?, '
    f'"resumable" = ?, "requires_circuit_breaker" = FALSE, "message" = ?, '
    f'"updated_time" = SYSDATE() '
    f'WHERE "execution_id" = ? AND {status_in(UNDO_FORCE_READY_SOURCES)} '
    f'AND "circuit_breaker_initiated" = FALSE AND "circuit_breaker_completed" = FALSE',
)


def _skip_circuit_breaker(name: str, sources: str) -> Statement:
    return Statement(
        name,
        f'UPDATE {_S} SET "status" = \'{ExecutionStatus.COMPLETED}\', "completed" = TRUE, '
        f'"requires_circuit_breaker" = FALSE, "resumable" = FALSE, "error_message" = NULL, '
        f'"message" = ?, "completed_time" = SYSDATE(), '
        f'"updated_time" = SYSDATE() '
        f'WHERE "execution_id" = ? AND {sources} AND "circuit_breaker_initiated" = FALSE',
    )


# Params: message, id. Completion without the breaker call: from where the circuit-breaker step
# starts or, with --force, from anywhere the domain allows completion.
SKIP_CIRCUIT_BREAKER = _skip_circuit_breaker(
    "skip_circuit_breaker", step_guard(ExecutionStatus.COMPLETED)
)
FORCE_SKIP_CIRCUIT_BREAKER = _skip_circuit_breaker(
    "force_skip_circuit_breaker", status_in(allowed_sources(ExecutionStatus.COMPLETED))
)
