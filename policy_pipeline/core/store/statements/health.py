"""Health checks and operator reports (`HealthReport`): the original monitoring queries, the
state machine's invariants, and what the CLI's status and diagnose commands show."""

from __future__ import annotations

from policy_pipeline.core.domain import PATH, ExecutionStatus
from policy_pipeline.core.store.dialect import Statement
from policy_pipeline.core.store.predicates import ACTIVE, WAITING, status_in
from policy_pipeline.core.store.schema import EVENTS, STATE

_S = STATE.name
_COMPLETED = status_in([ExecutionStatus.COMPLETED])
_ERROR = status_in([ExecutionStatus.ERROR])

# The original health check ("not completed and started more than an hour ago"), limited to
# executions still in flight: a failed execution is reported as failed, not as stuck.
STUCK_EXECUTIONS = Statement(
    "stuck_executions",
    f'SELECT "execution_id", "policy_name", "status", "start_time", "message", "error_message" '
    f'FROM {_S} WHERE "completed" = FALSE AND {ACTIVE} AND NOT {WAITING} '
    f'AND "start_time" < DATEADD(minute, ?, SYSDATE()) '
    f'ORDER BY "start_time" LIMIT ?',
)

STUCK_EXECUTION_COUNT = Statement(
    "stuck_execution_count",
    f'SELECT COUNT(*) FROM {_S} WHERE "completed" = FALSE AND {ACTIVE} '
    f'AND NOT {WAITING} AND "start_time" < DATEADD(minute, ?, SYSDATE())',
)

# The original 24-hour success rate, over finished executions (an execution still polling is not
# a failure), with NULLIF so a window with none finished is no division by zero.
SUCCESS_RATE = Statement(
    "success_rate",
    "SELECT COUNT(*) AS total_executions, "
    f"SUM(CASE WHEN {_COMPLETED} THEN 1 ELSE 0 END) AS successful, "
    f"SUM(CASE WHEN {_ERROR} THEN 1 ELSE 0 END) AS failed, "
    f"ROUND(100.0 * SUM(CASE WHEN {_COMPLETED} THEN 1 ELSE 0 END) "
    f"/ NULLIF(SUM(CASE WHEN {status_in([ExecutionStatus.COMPLETED, ExecutionStatus.ERROR])} "
    "THEN 1 ELSE 0 END), 0), 2) AS success_rate_percent "
    f'FROM {_S} WHERE "start_time" >= DATEADD(hour, ?, SYSDATE())',
)

_VIOLATION = '"execution_id", "policy_name", "status"'
# Every status from policy_created on along the path: the API has given a policy_id.
_CREATED = PATH[PATH.index(ExecutionStatus.POLICY_CREATED) :]

# The state machine's invariants; every row returned is one violation.
CONSISTENCY_VIOLATIONS = Statement(
    "consistency_violations",
    f"SELECT 'completed_without_circuit_breaker' AS violation, {_VIOLATION} FROM {_S} "
    f'WHERE "completed" = TRUE AND "circuit_breaker_completed" = FALSE '
    f'AND "requires_circuit_breaker" = TRUE '
    f"UNION ALL SELECT 'completed_flag_disagrees_with_status', {_VIOLATION} FROM {_S} "
    f'WHERE ({_COMPLETED}) <> "completed" '
    f"UNION ALL SELECT 'missing_policy_id', {_VIOLATION} FROM {_S} "
    f"WHERE {status_in(_CREATED)} "
    f'AND "policy_id" IS NULL '
    f"UNION ALL SELECT 'circuit_breaker_completed_without_initiation', {_VIOLATION} "
    f'FROM {_S} WHERE "circuit_breaker_completed" = TRUE '
    f'AND "circuit_breaker_initiated" = FALSE '
    f"UNION ALL SELECT 'poll_count_over_maximum', {_VIOLATION} FROM {_S} "
    f'WHERE "poll_count" > ? * (COALESCE("resume_count", 0) + 1) '
    f"UNION ALL SELECT 'several_active_executions', NULL, \"policy_name\", NULL "
    f'FROM {_S} WHERE {ACTIVE} GROUP BY "policy_name" HAVING COUNT(*) > 1 '
    f"ORDER BY 1, 3 LIMIT ?",
)

# The original "View recent executions" query, with the policy name and optional filters.
FILTERED_EXECUTIONS = Statement(
    "filtered_executions",
    f'SELECT "policy_name", "execution_id", "policy_id", "status", "poll_count", '
    f'"circuit_breaker_completed", "message", "start_time", "error_message" '
    f"FROM {_S} "
    f'WHERE (CAST(? AS VARCHAR) IS NULL OR "policy_name" = ?) '
    f'AND (CAST(? AS VARCHAR) IS NULL OR "status" = ?) '
    f'ORDER BY "start_time" DESC, "policy_name" LIMIT ?',
)

FAILED_EXECUTIONS = Statement(
    "failed_executions",
    f'SELECT "execution_id", "policy_name", "error_step", "error_message", "resumable", '
    f'"updated_time" FROM {_S} WHERE {_ERROR} '
    f'AND "start_time" >= DATEADD(hour, ?, SYSDATE()) '
    f'ORDER BY "updated_time" DESC LIMIT ?',
)

LAST_API_CALLS = Statement(
    "last_api_calls",
    f'SELECT "event_time", "policy_name", "http_method", "endpoint", "http_status", '
    f'"attempt", "outcome", "latency_ms" FROM {EVENTS.name} '
    f'WHERE "event_type" = \'api_call\' ORDER BY "event_time" DESC LIMIT ?',
)

GUARD_EVENTS = Statement(
    "guard_events",
    f'SELECT "event_time", "message" FROM {EVENTS.name} '
    f'WHERE "event_type" = \'guard\' ORDER BY "event_time" DESC LIMIT ?',
)

PING = Statement("ping", "SELECT 1")
