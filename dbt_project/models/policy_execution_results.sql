-- Current state of every workflow execution with its step durations in seconds.
-- Portable SQL only (DuckDB and Snowflake): durations through dbt.datediff in milliseconds, and
-- every output column aliased as a quoted lower-case name (Snowflake upper-cases bare aliases).
{{ config(materialized='view') }}

with executions as (
    select * from {{ source('policy_state', 'policy_execution_state') }}
),

event_counts as (
    select
        "execution_id",
        count(case when "event_type" = 'api_call' then 1 end) as api_calls,
        count(
            case when "event_type" = 'api_call' and ("http_status" is null or "http_status" >= 400)
            then 1 end
        ) as failed_api_calls,
        count(case when "event_type" = 'transition' then 1 end) as transitions,
        max("event_time") as last_event_time
    from {{ source('policy_state', 'policy_execution_events') }}
    group by "execution_id"
)

select
    executions."execution_id" as "execution_id",
    executions."policy_name" as "policy_name",
    executions."policy_id" as "policy_id",
    executions."status" as "status",
    executions."completed" as "completed",
    executions."circuit_breaker_completed" as "circuit_breaker_completed",
    executions."error_step" as "error_step",
    executions."error_message" as "error_message",
    executions."message" as "message",
    executions."start_time" as "start_time",
    executions."policy_created_time" as "policy_created_time",
    executions."policy_ready_time" as "policy_ready_time",
    executions."completed_time" as "completed_time",
    {{ seconds_between('executions."start_time"', 'executions."policy_created_time"') }}
        as "seconds_to_created",
    {{ seconds_between('executions."start_time"', 'executions."policy_ready_time"') }}
        as "seconds_to_ready",
    -- The polling phase alone: from the policy's creation until the service reported it ready.
    {{ seconds_between('executions."policy_created_time"', 'executions."policy_ready_time"') }}
        as "seconds_created_to_ready",
    {{ seconds_between('executions."start_time"', 'executions."completed_time"') }}
        as "seconds_to_completed",
    coalesce(executions."poll_count", 0) as "polls_used",
    coalesce(event_counts.api_calls, 0) as "api_calls",
    coalesce(event_counts.failed_api_calls, 0) as "failed_api_calls",
    coalesce(event_counts.transitions, 0) as "transitions",
    event_counts.last_event_time as "last_event_time"
from executions
left join event_counts
    on event_counts."execution_id" = executions."execution_id"
