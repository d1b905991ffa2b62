"""The workflow area: the three partitioned assets (one step), their job, and the sensors that
drive them (the catalog's new policies; whatever waits or is stranded)."""

from dagster import Definitions

from policy_pipeline.core.settings import Settings
from policy_pipeline.defs.workflow.assets import build_workflow_assets, policy_workflow_job
from policy_pipeline.defs.workflow.sensors import build_catalog_sensor, build_progress_sensor


def build_workflow_defs(settings: Settings) -> Definitions:
    return Definitions(
        assets=[build_workflow_assets(settings)],
        jobs=[policy_workflow_job],
        sensors=[build_catalog_sensor(settings), build_progress_sensor(settings)],
    )
