"""Archiving, replacing the seeds' manual DELETE: a daily job moves terminal executions older
than the retention, and their events, to the history tables."""

from dagster import (
    Config,
    DefaultScheduleStatus,
    OpExecutionContext,
    ScheduleDefinition,
    job,
    op,
)
from pydantic import Field

from policy_pipeline.monitoring import Monitor
from policy_pipeline.resources import PolicyStateResource
from policy_pipeline.settings import env_int


class ArchiveConfig(Config):
    retention_days: int = Field(
        default_factory=lambda: env_int("POLICY_ARCHIVE_RETENTION_DAYS", 7, minimum=0),
        description="Terminal executions older than this are archived "
        "(env POLICY_ARCHIVE_RETENTION_DAYS, default 7).",
    )
    batch_size: int = Field(
        default_factory=lambda: env_int("POLICY_ARCHIVE_BATCH_SIZE", 500, minimum=1),
        description="Executions moved per transaction.",
    )


@op(description="Move completed and failed executions past the retention to history tables.")
def archive_terminal_executions(
    context: OpExecutionContext, config: ArchiveConfig, policy_state: PolicyStateResource
) -> None:
    monitor = Monitor(policy_state.warehouse())
    result = monitor.archive(config.retention_days, config.batch_size, run_id=context.run_id)
    context.log.info(
        f"archived {result.executions} executions and {result.events} events "
        f"in {result.batches} batches (archive run {result.archive_run_id})"
    )


@job(description="Archive terminal executions older than the retention (daily schedule).")
def policy_archive_job() -> None:
    archive_terminal_executions()


policy_archive_schedule = ScheduleDefinition(
    name="policy_archive_daily",
    job=policy_archive_job,
    cron_schedule="0 3 * * *",
    default_status=DefaultScheduleStatus.RUNNING,
    description="Archives terminal executions every day at 03:00.",
)
