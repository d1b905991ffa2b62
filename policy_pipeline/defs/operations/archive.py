"""Archiving, instead of a manual DELETE: a daily job moves terminal executions older
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

from policy_pipeline.core.liveness import Holder, this_process
from policy_pipeline.core.settings import Settings
from policy_pipeline.core.store.archiver import Archiver
from policy_pipeline.defs.workflow.assets import PROCESS_TAG, report_dead_run
from policy_pipeline.resources import PolicyStateResource


class ArchiveConfig(Config):
    retention_days: int = Field(
        default_factory=lambda: Settings.from_env().archive.retention_days,
        description="Terminal executions older than this are archived "
        "(env POLICY_ARCHIVE_RETENTION_DAYS, default 7).",
    )
    batch_size: int = Field(
        default_factory=lambda: Settings.from_env().archive.batch_size,
        description="Executions moved per transaction.",
    )


@op(description="Move completed and failed executions past the retention to history tables.")
def archive_terminal_executions(
    context: OpExecutionContext, config: ArchiveConfig, policy_state: PolicyStateResource
) -> None:
    archiver = Archiver(policy_state.warehouse())

    context.instance.add_run_tags(context.run_id, {PROCESS_TAG: this_process()})

    def alive(run_id: str | None) -> bool:
        run = context.instance.get_run_by_id(run_id) if run_id else None
        if run is None or run.is_finished or run_id == context.run_id:
            return False
        process = run.tags.get(PROCESS_TAG)
        holder = Holder.parse(f"run:{run.run_id}@{process}") if process else None
        if holder is not None and holder.certainly_dead():
            report_dead_run(context.instance, run, holder, f"run {context.run_id}")
            return False
        return True

    for archive_id in archiver.interrupt_dead_archive_runs(alive):
        context.log.warning(f"archive run {archive_id} was interrupted; marked so")
    result = archiver.archive(config.retention_days, config.batch_size, run_id=context.run_id)
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
