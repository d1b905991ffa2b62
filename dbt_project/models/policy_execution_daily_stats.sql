-- Per day of start_time: how many executions started, how they ended, and how long the
-- completed ones took. A table (not incremental: a day's rows change while executions run, and
-- fakesnow cannot create the database-qualified temporary relations incremental merges use).
{{ config(materialized='table') }}

with results as (
    select * from {{ ref('policy_execution_results') }}
),

daily as (
    select
        cast("start_time" as date) as start_day,
        count(*) as total_executions,
        count(case when "status" = 'completed' then 1 end) as completed_executions,
        count(case when "status" = 'error' then 1 end) as failed_executions,
        count(case when "status" in ('pending', 'policy_created', 'policy_ready') then 1 end)
            as in_progress_executions,
        percentile_cont(0.5) within group (order by "seconds_to_completed")
            as median_seconds_to_completed,
        percentile_cont(0.95) within group (order by "seconds_to_completed")
            as p95_seconds_to_completed,
        cast(avg("polls_used") as double) as avg_polls_used,
        cast(sum("api_calls") as bigint) as api_calls
    from results
    group by cast("start_time" as date)
)

select
    start_day as "day",
    total_executions as "total_executions",
    completed_executions as "completed_executions",
    failed_executions as "failed_executions",
    in_progress_executions as "in_progress_executions",
    -- Percent of the day's finished executions (completed or failed) that completed; null while
    -- none has finished, rather than a division by zero or a misleading 0.
    -- A double on both warehouses (Snowflake would return a NUMBER, DuckDB a DOUBLE).
    round(
        cast(100 * completed_executions as double)
            / nullif(completed_executions + failed_executions, 0),
        2
    ) as "success_rate",
    median_seconds_to_completed as "median_seconds_to_completed",
    p95_seconds_to_completed as "p95_seconds_to_completed",
    avg_polls_used as "avg_polls_used",
    api_calls as "api_calls"
from daily
