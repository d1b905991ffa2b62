"""The reporting area: the dbt models over the workflow's tables, rebuilt after it moves."""

from dagster import Definitions

from policy_pipeline.core.settings import Settings
from policy_pipeline.defs.reporting.dbt_assets import (
    build_dbt_assets,
    dbt_cli_resource,
    policy_reporting_automation,
    policy_reporting_job,
    policy_reporting_schedule,
)


def build_reporting_defs(settings: Settings) -> Definitions:
    return Definitions(
        assets=[build_dbt_assets(settings)],
        jobs=[policy_reporting_job],
        schedules=[policy_reporting_schedule],
        sensors=[policy_reporting_automation],
        resources={"dbt": dbt_cli_resource(settings)},
    )
