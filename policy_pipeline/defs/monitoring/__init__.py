"""The monitoring area: the health, success-rate and consistency checks on the results view,
their schedule, and the alert on every failed run."""

from dagster import Definitions

from policy_pipeline.core.settings import Settings
from policy_pipeline.defs.monitoring.alerts import build_run_failure_alert
from policy_pipeline.defs.monitoring.checks import (
    build_checks,
    policy_checks_job,
    policy_checks_schedule,
)


def build_monitoring_defs(settings: Settings) -> Definitions:
    return Definitions(
        asset_checks=build_checks(settings),
        jobs=[policy_checks_job],
        schedules=[policy_checks_schedule],
        sensors=[build_run_failure_alert(settings)],
    )
