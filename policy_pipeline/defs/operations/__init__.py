"""The operations area: what keeps the state tables lean without a person (archiving)."""

from dagster import Definitions

from policy_pipeline.defs.operations.archive import policy_archive_job, policy_archive_schedule


def build_operations_defs() -> Definitions:
    return Definitions(jobs=[policy_archive_job], schedules=[policy_archive_schedule])
