"""The code location: Definitions assembled from the per-area modules.

Resources are chosen and configured from the environment (see README, "Configuration"):
secrets reach them as ``EnvVar`` so they are resolved at run time and never displayed.
"""

from __future__ import annotations

from dagster import Definitions, in_process_executor

from policy_pipeline.core.catalog import load_catalog
from policy_pipeline.core.settings import Settings
from policy_pipeline.defs.monitoring.checks import CHECKS, policy_checks_job, policy_checks_schedule
from policy_pipeline.defs.operations.archive import policy_archive_job, policy_archive_schedule
from policy_pipeline.defs.reporting.dbt_assets import (
    dbt_cli_resource,
    policy_dbt_assets,
    policy_reporting_job,
    policy_reporting_schedule,
)
from policy_pipeline.defs.workflow.assets import build_workflow_assets
from policy_pipeline.defs.workflow.sensors import (
    build_catalog_sensor,
    build_progress_sensor,
    policy_run_failure_alert,
)
from policy_pipeline.resources import policy_api_resource, state_resource


def build_definitions(settings: Settings) -> Definitions:
    catalog = load_catalog(settings.catalog_dir)
    workflow_assets, workflow_job = build_workflow_assets(catalog)
    return Definitions(
        assets=[*workflow_assets, policy_dbt_assets],
        asset_checks=CHECKS,
        jobs=[workflow_job, policy_reporting_job, policy_checks_job, policy_archive_job],
        schedules=[policy_checks_schedule, policy_reporting_schedule, policy_archive_schedule],
        sensors=[
            build_catalog_sensor(workflow_job),
            build_progress_sensor(workflow_job),
            policy_run_failure_alert,
        ],
        # Every step is I/O-bound and fans out over threads itself: one process per step would
        # only add an interpreter start (and the dbt import) to each.
        executor=in_process_executor,
        resources={
            "policy_api": policy_api_resource(),
            "policy_state": state_resource(settings),
            "dbt": dbt_cli_resource(settings),
        },
    )


defs = build_definitions(Settings.from_env())
