"""A no-op twin of the policy workflow, for ``bench/e2e.py``: Dagster's own bookkeeping.

The same three asset keys with the same deps, the same dynamic partitions (``policies``), a
single-run backfill and the in-process executor, as
``policy_pipeline/defs/workflow/assets.py``; the step
does nothing but return one ``MaterializeResult`` per asset, and Dagster records every
partition of the run's range for each of them. Run like the product:

    dagster job execute -f bench/noop_location.py -j noop_workflow_job \\
      --tags '{"dagster/asset_partition_range_start": "<first>",
               "dagster/asset_partition_range_end": "<last>"}'

Nothing here imports the product (so its load time is Dagster's alone).
"""

import warnings
from collections.abc import Iterator

from dagster import (
    AssetExecutionContext,
    AssetSpec,
    BackfillPolicy,
    BetaWarning,
    Definitions,
    DynamicPartitionsDefinition,
    MaterializeResult,
    define_asset_job,
    in_process_executor,
    multi_asset,
)

JOB_NAME = "noop_workflow_job"
PARTITIONS_NAME = "policies"
ASSET_KEYS = ("policy_created", "policy_ready", "circuit_breaker_activation")

warnings.filterwarnings("ignore", category=BetaWarning, message=".*backfill_policy.*")

SPECS = [
    AssetSpec(ASSET_KEYS[0], skippable=True),
    AssetSpec(ASSET_KEYS[1], deps=[ASSET_KEYS[0]], skippable=True),
    AssetSpec(ASSET_KEYS[2], deps=[ASSET_KEYS[1]], skippable=True),
]


@multi_asset(
    name="policy_workflow",
    specs=SPECS,
    partitions_def=DynamicPartitionsDefinition(name=PARTITIONS_NAME),
    backfill_policy=BackfillPolicy.single_run(),
    can_subset=True,
)
def noop_workflow(context: AssetExecutionContext) -> Iterator[MaterializeResult]:
    # In the deps' order: Dagster wants a multi-asset's outputs yielded topologically.
    for spec in SPECS:
        if spec.key in context.selected_asset_keys:
            yield MaterializeResult(asset_key=spec.key)


noop_workflow_job = define_asset_job(
    JOB_NAME, selection=[noop_workflow], executor_def=in_process_executor
)

defs = Definitions(assets=[noop_workflow], jobs=[noop_workflow_job])
