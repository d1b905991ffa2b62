"""The monitoring area: the health, success-rate and consistency checks on the results view,
their schedule, and the alert on every failed run."""

from dagster import Definitions

from policy_pipeline.defs.monitoring.alerts import policy_run_failure_alert
from policy_pipeline.defs.monitoring.checks import (
    CHECKS,
    policy_checks_job,
    policy_checks_schedule,
)


def build_monitoring_defs() -> Definitions:
    return Definitions(
        asset_checks=CHECKS,
        jobs=[policy_checks_job],
        schedules=[policy_checks_schedule],
        sensors=[policy_run_failure_alert],
    )
