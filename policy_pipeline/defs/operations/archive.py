"""Archiving, instead of a manual DELETE: a daily job moves terminal executions older
than the retention, and their events, to the history tables."""

from dagster import (
    Config,
    DefaultScheduleStatus,
    JobDefinition,
    OpExecutionContext,
    ScheduleDefinition,
    job,
    op,
)

from policy_pipeline.core.settings import (
    ArchiveSettings,
    Settings,
    override_field,
    with_overrides,
)
from policy_pipeline.core.store.archiver import Archiver
from policy_pipeline.defs.workflow.runs import run_is_dead, tag_this_process
from policy_pipeline.resources import PolicyStateResource


class ArchiveConfig(Config):
    retention_days: int | None = override_field(ArchiveSettings, "retention_days")
    batch_size: int | None = override_field(ArchiveSettings, "batch_size")


def archive_terminal_executions(
    context: OpExecutionContext,
    config: ArchiveConfig,
    settings: Settings,
    policy_state: PolicyStateResource,
) -> None:
    """Move completed and failed executions past the retention to history tables."""
    archiver = Archiver(policy_state.warehouse())

    tag_this_process(context.instance, context.run_id)

    def alive(run_id: str | None) -> bool:
        run = context.instance.get_run_by_id(run_id) if run_id else None
        if run is None or run.is_finished or run_id == context.run_id:
            return False
        return not run_is_dead(context.instance, run, f"run {context.run_id}")

    for archive_id in archiver.interrupt_dead_archive_runs(alive):
        context.log.warning(f"archive run {archive_id} was interrupted; marked so")
    archive = with_overrides(settings.archive, config.model_dump())
    result = archiver.archive(archive.retention_days, archive.batch_size, run_id=context.run_id)
    context.log.info(
        f"archived {result.executions} executions and {result.events} events "
        f"in {result.batches} batches (archive run {result.archive_run_id})"
    )


def build_archive_job(settings: Settings) -> JobDefinition:
    @op(
        name="archive_terminal_executions",
        description="Move completed and failed executions past the retention to history tables.",
    )
    def archive_op(
        context: OpExecutionContext, config: ArchiveConfig, policy_state: PolicyStateResource
    ) -> None:
        archive_terminal_executions(context, config, settings, policy_state)

    @job(
        name="policy_archive_job",
        description="Archive terminal executions older than the retention (daily schedule).",
    )
    def policy_archive_job() -> None:
        archive_op()

    return policy_archive_job


def build_archive_schedule(archive_job: JobDefinition) -> ScheduleDefinition:
    return ScheduleDefinition(
        name="policy_archive_daily",
        job=archive_job,
        cron_schedule="0 3 * * *",
        default_status=DefaultScheduleStatus.RUNNING,
        description="Archives terminal executions every day at 03:00.",
    )
