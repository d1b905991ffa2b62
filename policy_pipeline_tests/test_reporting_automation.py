"""The reporting models are rebuilt by declarative automation once the workflow has moved,
evaluated as the automation sensor evaluates them (a real instance, the real definitions)."""

from __future__ import annotations

from dagster import (
    AssetKey,
    AssetMaterialization,
    DagsterInstance,
    evaluate_automation_conditions,
)

from policy_pipeline.core.domain import STEP_CIRCUIT
from policy_pipeline.core.settings import Settings
from policy_pipeline.definitions import build_definitions
from policy_pipeline.defs.workflow.assets import POLICY_API_POOL
from policy_pipeline.defs.workflow.partitions import PARTITIONS_NAME

RESULTS = AssetKey("policy_execution_results")
DAILY = AssetKey("policy_execution_daily_stats")


def test_the_models_are_rebuilt_after_the_workflow_materializes() -> None:
    defs = build_definitions(Settings.from_env())
    with DagsterInstance.ephemeral() as instance:
        quiet = evaluate_automation_conditions(defs=defs, instance=instance)
        assert quiet.total_requested == 0  # nothing has moved

        instance.add_dynamic_partitions(PARTITIONS_NAME, ["customer_data_retention"])
        instance.report_runless_asset_event(
            AssetMaterialization(STEP_CIRCUIT, partition="customer_data_retention")
        )
        moved = evaluate_automation_conditions(defs=defs, instance=instance, cursor=quiet.cursor)
        requested = {result.key for result in moved.results if result.true_subset.size}
        assert requested == {RESULTS, DAILY}

        again = evaluate_automation_conditions(defs=defs, instance=instance, cursor=moved.cursor)
        assert again.total_requested == 0  # handled: not requested twice for one move


def test_the_workflow_step_is_in_the_policy_api_pool() -> None:
    defs = build_definitions(Settings.from_env())
    job = defs.resolve_implicit_global_asset_job_def()
    workflow = next(node for node in job.graph.node_defs if node.name == "policy_workflow")
    assert workflow.pool == POLICY_API_POOL
