"""The operations area: what keeps the state tables lean without a person (archiving)."""

from dagster import Definitions

from policy_pipeline.core.settings import Settings
from policy_pipeline.defs.operations.archive import build_archive_job, build_archive_schedule


def build_operations_defs(settings: Settings) -> Definitions:
    archive_job = build_archive_job(settings)
    return Definitions(jobs=[archive_job], schedules=[build_archive_schedule(archive_job)])
