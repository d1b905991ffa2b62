"""The workflow as three partitioned assets: policy_created -> policy_ready ->
circuit_breaker_activation, one partition per catalog policy.

The partitions (``partitions.py``) are the catalog's policies.

The three assets are one multi-asset step (`policy_workflow`), so that each policy of a run
goes through the three steps on its own: the engine (`workflow.py`) works on all of them
concurrently, and as each policy passes a step, the step logs that asset's materialization
for that policy's partition, at that moment. A policy that fails is not materialized for the
steps it did not reach (Dagster shows those partitions failed), and the others go on. Any
subset of the three assets can be materialized (e.g. only `circuit_breaker_activation` for
policies already ready). Nothing goes through an IO manager: the state lives in the warehouse.
"""

import queue
import threading
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from dagster import (
    AssetExecutionContext,
    AssetKey,
    AssetMaterialization,
    AssetObservation,
    AssetsDefinition,
    AssetSpec,
    BackfillPolicy,
    Config,
    Failure,
    MetadataValue,
    multi_asset,
)
from pydantic import Field

from policy_pipeline.core.catalog import CatalogEntry, CatalogError, load_catalog
from policy_pipeline.core.domain import STEP_CIRCUIT, STEP_CREATE, STEP_READY, STEPS, is_active
from policy_pipeline.core.engine.guard import ApiGuard
from policy_pipeline.core.engine.steps import Progress, RunReport, StepOutcome
from policy_pipeline.core.engine.workflow import PolicyWorkflow
from policy_pipeline.core.liveness import lease_owner
from policy_pipeline.core.settings import (
    LeaseSettings,
    PollingSettings,
    Settings,
    override_field,
    with_overrides,
)
from policy_pipeline.core.store.state_store import StateStore
from policy_pipeline.defs.workflow.cluster import refuse_duckdb_on_celery
from policy_pipeline.defs.workflow.partitions import POLICY_PARTITIONS, register_policies
from policy_pipeline.defs.workflow.runs import (
    JOB_NAME,
    RETRY_NUMBER_TAG,
    RUN_OWNER_PREFIX,
    SENSOR_TAG,
    holder_gone,
    tag_this_process,
)
from policy_pipeline.resources import DuckDBStateResource, PolicyStateResource
from policy_pipeline.resources.policy_api import PolicyApiResource

WORKFLOW_GROUP = "policy_workflow"
WORKFLOW_OP = "policy_workflow"  # the op behind the three assets (its run config key)
OWNERS = ["team:data-platform"]
# A run names at most this many failed policies in its failure message (all in metadata).
LISTED_FAILURES = 50


def _polling(name: str) -> Any:
    return override_field(PollingSettings, name)


class WorkflowConfig(Config):
    """Run config of the workflow step: which policies, and how a run polls them. A polling
    field left out takes this code location's setting (its environment variable, or the
    Component attribute)."""

    policies: list[str] = Field(
        default_factory=list,
        description="Run these catalog policies by name (any set, in any order) instead of a "
        "partition or a partition range; the run then has no partition tags.",
    )
    force_new_execution: bool = Field(
        default=False,
        description="Create a new policy even if this content has already completed "
        "(by default the same content is one policy).",
    )
    initial_interval_seconds: float | None = _polling("initial_interval_seconds")
    max_interval_seconds: float | None = _polling("max_interval_seconds")
    backoff_multiplier: float | None = _polling("backoff_multiplier")
    max_polls: int | None = _polling("max_polls")
    deadline_seconds: float | None = _polling("deadline_seconds")
    wait_handoff_seconds: float | None = _polling("wait_handoff_seconds")
    not_found_grace_seconds: float | None = _polling("not_found_grace_seconds")

    def polling(self, settings: PollingSettings) -> PollingSettings:
        """The code location's polling settings, with what this run's config overrides."""
        return with_overrides(settings, self.model_dump())


def _workflow(
    context: AssetExecutionContext, api: PolicyApiResource, state: PolicyStateResource
) -> PolicyWorkflow:
    store = state.store(run_id=context.run.run_id)
    owner = lease_owner(f"{RUN_OWNER_PREFIX}{context.run.run_id}")
    guard = ApiGuard(
        store,
        owner,
        api.guard_settings(),
    )
    return PolicyWorkflow(
        store=store,
        api=api.get_client(),
        owner=owner,
        log=context.log,
        lease=LeaseSettings(
            ttl_seconds=state.lease_ttl_seconds, wait_seconds=state.lease_wait_seconds
        ),
        max_concurrency=api.max_concurrency,
        holder_gone=lambda previous: holder_gone(context.instance, previous, context.run.run_id),
        guard=guard,
    )


def _metadata(outcome: StepOutcome) -> dict[str, Any]:
    return {
        "execution_id": outcome.execution_id,
        "policy_id": outcome.policy_id or "",
        "status": outcome.status,
        "poll_count": MetadataValue.int(outcome.poll_count),
        "api_calls": MetadataValue.int(outcome.api_calls),
        "api_latency_ms": MetadataValue.float(outcome.api_latency_ms),
        "resumed": MetadataValue.bool(outcome.resumed),
        "message": outcome.message,
    }


def _run_policies(
    context: AssetExecutionContext, catalog: Mapping[str, CatalogEntry], config: WorkflowConfig
) -> list[str]:
    """The policies this run works on: its partition or partition range, or (run config
    ``policies``) a set of catalog policies by name. A clear error for anything else."""
    partitioned = context.has_partition_key or context.has_partition_key_range
    if config.policies:
        if partitioned:
            raise Failure("give either a partition (or a range) or run config 'policies', not both")
        unknown = sorted(set(config.policies) - set(catalog))
        if unknown:
            raise Failure(
                f"run config 'policies' names {len(unknown)} policies that are not in the "
                f"catalog: {', '.join(unknown[:20])}"
            )
        return list(dict.fromkeys(config.policies))
    if not partitioned:
        raise Failure(
            f"{JOB_NAME} works on policies, and this run names none: give a partition "
            '(--tags \'{"dagster/partition": "NAME"}\'), a partition range (the '
            "dagster/asset_partition_range_start and _end tags), or run config "
            "ops.policy_workflow.config.policies: [NAME, ...]"
        )
    return _partition_keys(context)


def _partition_keys(context: AssetExecutionContext) -> list[str]:
    key_range = context.partition_key_range
    # A single key is taken as is: resolving it would fail before it is registered.
    if key_range.start == key_range.end:
        return [str(key_range.start)]
    return [str(key) for key in context.partition_keys]


def _follow(workflow: PolicyWorkflow, **run: Any) -> Iterator[Progress | RunReport]:
    """Run the engine in a thread and hand over its progress as it happens, then its report:
    the step's own thread writes Dagster's events while the engine's calls go on."""
    progress: queue.SimpleQueue[Progress | RunReport | BaseException] = queue.SimpleQueue()
    stop = threading.Event()

    def engine() -> None:
        try:
            progress.put(workflow.run(on_progress=progress.put, stop=stop, **run))
        except BaseException as exc:  # re-raised in the step's thread
            progress.put(exc)

    thread = threading.Thread(target=engine, name="policy-workflow", daemon=True)
    thread.start()
    try:
        while True:
            item = progress.get()
            if isinstance(item, BaseException):
                raise item
            yield item
            if isinstance(item, RunReport):
                return
    finally:
        # The run was terminated (or failed): the engine writes what its calls in flight
        # answered, releases its leases and starts nothing new.
        stop.set()
        thread.join()


def run_workflow(
    context: AssetExecutionContext,
    catalog: Mapping[str, CatalogEntry],
    config: WorkflowConfig,
    settings: Settings,
    policy_api: PolicyApiResource,
    policy_state: PolicyStateResource,
) -> Iterator[AssetMaterialization | AssetObservation]:
    """Take every partition of this run through the selected steps, each policy on its own,
    and materialize each (asset, partition) as its policy passes that step."""
    warehouse = "duckdb" if isinstance(policy_state, DuckDBStateResource) else "snowflake"
    refuse_duckdb_on_celery(context.instance, warehouse, context.job_def)
    # Who runs this step, so that a process on this host can tell for sure it died.
    tag_this_process(context.instance, context.run.run_id)
    # Every catalog policy not yet a partition, in name order (not just this run's): a
    # range then follows the catalog, whatever single runs came first.
    register_policies(context.instance, sorted(catalog))
    keys = _run_policies(context, catalog, config)
    workflow = _workflow(context, policy_api, policy_state)
    runnable = _runnable(workflow.store, keys, catalog)
    steps = [step for step in STEPS if AssetKey(step) in context.selected_asset_keys]
    failures = {key: f"policy '{key}' is not in the catalog" for key in keys if key not in runnable}
    failed_steps = dict.fromkeys(failures, steps[0] if steps else "")
    api_calls = passed = 0
    for item in _follow(
        workflow,
        names=runnable,
        steps=steps,
        definitions={key: catalog[key].policy for key in runnable if key in catalog},
        polling=config.polling(settings.polling),
        force_new=config.force_new_execution,
        # Dagster's run retries re-run the whole step, and the progress sensor resumes: both
        # resume, they do not start over.
        recreate_failed=RETRY_NUMBER_TAG not in context.run.tags
        and context.run.tags.get(SENSOR_TAG) != "progress",
    ):
        if isinstance(item, RunReport):
            failures.update({name: why for name, (_step, why) in item.failures.items()})
            failed_steps.update({name: step for name, (step, _why) in item.failures.items()})
            passed = len(item.outcomes[steps[-1]]) if steps else 0
        elif item.outcome is not None:
            api_calls += item.outcome.api_calls
            yield AssetMaterialization(
                asset_key=item.step,
                partition=item.policy_name,
                description=item.outcome.message,
                metadata=_metadata(item.outcome),
            )
        elif item.waiting is not None:
            # Waiting, not failed: the partition stays unmaterialized, with this observation.
            yield AssetObservation(
                asset_key=item.step,
                partition=item.policy_name,
                description=item.waiting,
                metadata={"status": "waiting (handed off to policy_progress_sensor)"},
            )
        elif len(keys) <= LISTED_FAILURES:
            context.log.error(f"{item.policy_name}: {item.step} failed: {item.error}")
    waiting = len(keys) - len(failures) - passed
    context.log.info(
        f"{passed} of {len(keys)} policies passed {', '.join(steps)}"
        + (f", {waiting} wait for readiness outside the run" if waiting else "")
        + f"; {api_calls} API calls"
    )
    if failures:
        listing = "\n".join(
            f"- {key}: {reason}" for key, reason in sorted(failures.items())[:LISTED_FAILURES]
        )
        more = len(failures) - LISTED_FAILURES
        raise Failure(
            description=f"{len(failures)} of {len(keys)} policies failed:\n{listing}"
            + (f"\n(and {more} more)" if more > 0 else ""),
            metadata={
                "failed_policies": MetadataValue.json(failures),
                "failed_steps": MetadataValue.json(failed_steps),  # where each one stopped
                "succeeded_policies": MetadataValue.int(passed),
            },
        )


def _runnable(
    store: StateStore, keys: Sequence[str], catalog: Mapping[str, CatalogEntry]
) -> list[str]:
    """The run's policies it can work on: those in the catalog, and those whose catalog file
    was deleted while an execution of theirs is under way (it goes on from what it stored:
    polling and the circuit breaker need no catalog; the create step creates nothing)."""
    gone = [key for key in keys if key not in catalog]
    current = store.current_executions(gone) if gone else {}
    return [
        key
        for key in keys
        if key in catalog
        or (key in current and is_active(current[key].status, current[key].resumable))
    ]


def _catalog(directory: Path) -> dict[str, CatalogEntry]:
    """The catalog, read when a run starts (not when the definitions load)."""
    try:
        return load_catalog(directory)
    except CatalogError as exc:
        raise Failure(f"the policy catalog cannot be read: {exc}") from None


# The pool every Policy API caller is in (the workflow step; the progress sensor is one process
# with its own bound): its limit, set on the instance (deploy/dagster.yaml, or `dagster
# instance concurrency set policy_api N`), holds however the assets are materialized (a job,
# the asset graph's __ASSET_JOB, a sensor's run, a backfill).
POLICY_API_POOL = "policy_api"


def build_workflow_assets(settings: Settings) -> AssetsDefinition:
    """The three workflow assets as one multi-asset step over the catalog in
    ``settings.catalog_dir``."""
    common: dict[str, Any] = {
        "group_name": WORKFLOW_GROUP,
        "owners": OWNERS,
        "kinds": {"python", "api"},
        # A policy that fails is simply not materialized for the steps it did not reach.
        "skippable": True,
    }
    specs = [
        AssetSpec(
            STEP_CREATE,
            description="Step 1: the policy exists in the Policy API (POST /createpolicy) and "
            "its policy_id is stored and verified in policy_execution_state. Resumes an active "
            "execution instead of creating a second policy, and creates none for content that "
            "has already completed (run config force_new_execution to override).",
            **common,
        ),
        AssetSpec(
            STEP_READY,
            deps=[STEP_CREATE],
            description="Step 2: the Policy API reports the policy ready (GET "
            "/policy/{policy_id} polled with backoff and jitter) and the state row agrees "
            "(status policy_ready).",
            **common,
        ),
        AssetSpec(
            STEP_CIRCUIT,
            deps=[STEP_READY],
            description="Step 3: the circuit breaker was triggered exactly once (POST /circuit) "
            "for a ready policy, and the execution is completed.",
            **common,
        ),
    ]

    @multi_asset(
        name=WORKFLOW_OP,
        specs=specs,
        partitions_def=POLICY_PARTITIONS,
        # A backfill hands many policies to one run, which works on them concurrently; a
        # cluster splits a big one into runs that different workers take. (Dagster runs a
        # CLI partition range in one process only for a single-run policy.)
        backfill_policy=(
            BackfillPolicy.single_run()
            if settings.backfill_max_partitions_per_run is None
            else BackfillPolicy.multi_run(settings.backfill_max_partitions_per_run)
        ),
        can_subset=True,
        pool=POLICY_API_POOL,
        description="The policy workflow: each policy of the run goes through the selected "
        "steps on its own, and each asset partition is materialized as its policy passes it.",
    )
    def policy_workflow(
        context: AssetExecutionContext,
        config: WorkflowConfig,
        policy_api: PolicyApiResource,
        policy_state: PolicyStateResource,
    ) -> Iterator[AssetMaterialization | AssetObservation]:
        yield from run_workflow(
            context, _catalog(settings.catalog_dir), config, settings, policy_api, policy_state
        )

    return policy_workflow
