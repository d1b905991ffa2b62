"""The workflow as three partitioned assets: policy_created -> policy_ready ->
circuit_breaker_activation, one partition per catalog policy.

The partitions are dynamic (named "policies") because the catalog is data, not code: the
catalog sensor adds a partition when a policy file appears, and a run registers its own
catalog policies if this Dagster instance has not seen them yet (a fresh DAGSTER_HOME).

Each asset is one step of the seed's workflow. A run may hold many partitions (a single-run
backfill or a sensor tick); the step then works on them concurrently and records metadata per
partition. Nothing goes through an IO manager: the state lives in the warehouse.
"""

import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from dagster import (
    AssetExecutionContext,
    AssetsDefinition,
    BackfillPolicy,
    BetaWarning,
    Config,
    DynamicPartitionsDefinition,
    Failure,
    MaterializeResult,
    MetadataValue,
    asset,
    define_asset_job,
    in_process_executor,
)
from dagster._core.definitions.unresolved_asset_job_definition import UnresolvedAssetJobDefinition
from pydantic import Field

from policy_pipeline.api_client import PolicyApiResource
from policy_pipeline.catalog import CatalogEntry
from policy_pipeline.guard import ApiGuard, GuardPolicy
from policy_pipeline.resources import PolicyStateResource
from policy_pipeline.settings import env_float, env_int
from policy_pipeline.workflow import (
    LeasePolicy,
    PolicyWorkflow,
    PollingPolicy,
    StepOutcome,
    StepReport,
)

WORKFLOW_GROUP = "policy_workflow"
OWNERS = ["team:data-platform"]
JOB_NAME = "policy_workflow_job"
PARTITIONS_NAME = "policies"
POLICY_PARTITIONS = DynamicPartitionsDefinition(name=PARTITIONS_NAME)
RUN_OWNER_PREFIX = "run:"


class CreateConfig(Config):
    force_new_execution: bool = Field(
        default=False,
        description="Create a new policy even if this content has already completed "
        "(by default the same content is one policy).",
    )


class PollingConfig(Config):
    """Step 2's polling schedule. The seed's behaviour: max_polls=3, backoff_multiplier=1."""

    initial_interval_seconds: float = Field(
        default_factory=lambda: env_float("POLICY_POLL_INITIAL_SECONDS", 1.0),
        description="Wait after the first poll (env POLICY_POLL_INITIAL_SECONDS, default 1).",
    )
    max_interval_seconds: float = Field(
        default_factory=lambda: env_float("POLICY_POLL_MAX_INTERVAL_SECONDS", 30.0),
        description="Cap on the wait between polls (env POLICY_POLL_MAX_INTERVAL_SECONDS, 30).",
    )
    backoff_multiplier: float = Field(
        default_factory=lambda: env_float("POLICY_POLL_BACKOFF_MULTIPLIER", 2.0, minimum=1.0),
        description="Growth of the wait per poll (env POLICY_POLL_BACKOFF_MULTIPLIER, 2).",
    )
    max_polls: int = Field(
        default_factory=lambda: env_int("POLICY_POLL_MAX_POLLS", 60, minimum=1),
        description="Polls per run before giving up (env POLICY_POLL_MAX_POLLS, default 60).",
    )
    deadline_seconds: float = Field(
        default_factory=lambda: env_float("POLICY_POLL_DEADLINE_SECONDS", 900.0),
        description="Overall polling deadline per run (env POLICY_POLL_DEADLINE_SECONDS, 900).",
    )

    def policy(self) -> PollingPolicy:
        return PollingPolicy(
            initial_interval_seconds=self.initial_interval_seconds,
            max_interval_seconds=self.max_interval_seconds,
            backoff_multiplier=self.backoff_multiplier,
            max_polls=self.max_polls,
            deadline_seconds=self.deadline_seconds,
        )


def _workflow(
    context: AssetExecutionContext, api: PolicyApiResource, state: PolicyStateResource
) -> PolicyWorkflow:
    store = state.store(run_id=context.run.run_id)
    owner = f"{RUN_OWNER_PREFIX}{context.run.run_id}"
    guard = ApiGuard(
        store,
        owner,
        GuardPolicy(
            failure_threshold=api.guard_failure_threshold,
            cooldown_seconds=api.guard_cooldown_seconds,
        ),
    )
    return PolicyWorkflow(
        store=store,
        api=api,
        owner=owner,
        log=context.log,
        lease=LeasePolicy(
            ttl_seconds=state.lease_ttl_seconds, wait_seconds=state.lease_wait_seconds
        ),
        concurrency=api.max_concurrent_requests,
        owner_finished=lambda previous: _run_finished(context, previous),
        guard=guard,
    )


def _run_finished(context: AssetExecutionContext, owner: str) -> bool:
    run_id = owner.removeprefix(RUN_OWNER_PREFIX)
    run = context.instance.get_run_by_id(run_id) if owner.startswith(RUN_OWNER_PREFIX) else None
    return run is not None and run.is_finished


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


def contiguous_ranges(ordered: Sequence[str], wanted: set[str]) -> list[tuple[str, str]]:
    """The wanted partition keys as maximal runs of neighbours in the partitions' order: a run
    can take a range of partitions, not an arbitrary set."""
    ranges: list[tuple[str, str]] = []
    start: str | None = None
    previous: str | None = None
    for key in ordered:
        if key in wanted:
            start = start or key
            previous = key
        elif start is not None and previous is not None:
            ranges.append((start, previous))
            start = None
    if start is not None and previous is not None:
        ranges.append((start, previous))
    return ranges


def partition_tags(first: str, last: str) -> dict[str, str]:
    if first == last:
        return {"dagster/partition": first}
    return {
        "dagster/asset_partition_range_start": first,
        "dagster/asset_partition_range_end": last,
    }


def register_partitions(context: AssetExecutionContext, keys: Sequence[str]) -> None:
    """Make this run's policies known partitions of the instance (a fresh DAGSTER_HOME has
    none until the catalog sensor's first tick)."""
    known = set(context.instance.get_dynamic_partitions(PARTITIONS_NAME))
    missing = [key for key in keys if key not in known]
    if missing:
        context.instance.add_dynamic_partitions(PARTITIONS_NAME, missing)


def run_step(
    context: AssetExecutionContext,
    catalog: Mapping[str, CatalogEntry],
    step: Callable[[list[str]], StepReport],
) -> MaterializeResult:
    """Run one workflow step for every partition of this run (the workflow works on them
    concurrently) and report per partition.

    Every partition is taken to the end of the step before a failure is raised, so one bad
    policy does not leave the others half-done.
    """
    key_range = context.partition_key_range
    # A single key is taken as is: resolving it would fail before it is registered.
    keys: Sequence[str] = (
        [key_range.start] if key_range.start == key_range.end else context.partition_keys
    )
    runnable = [key for key in keys if key in catalog]
    register_partitions(context, runnable)
    report = step(runnable)
    failures = dict(report.failures)
    failures.update(
        {key: f"policy '{key}' is not in the catalog" for key in keys if key not in catalog}
    )
    for key, outcome in report.outcomes.items():
        context.add_asset_metadata(_metadata(outcome), partition_key=key)
    for key, reason in sorted(failures.items())[:50]:
        context.log.error(f"{key}: {reason}")
    if failures:
        listing = "\n".join(f"- {key}: {reason}" for key, reason in sorted(failures.items())[:50])
        more = f"\n(and {len(failures) - 50} more)" if len(failures) > 50 else ""
        raise Failure(
            description=f"{len(failures)} of {len(keys)} policies failed:\n{listing}{more}",
            metadata={
                "failed_policies": MetadataValue.json(failures),
                "succeeded_policies": MetadataValue.int(len(report.outcomes)),
            },
        )
    # Run-wide figures under their own names: they are copied onto every partition.
    return MaterializeResult(
        metadata={
            "policies_in_run": MetadataValue.int(len(keys)),
            "api_calls_in_run": MetadataValue.int(
                sum(o.api_calls for o in report.outcomes.values())
            ),
        }
    )


def build_workflow_assets(
    catalog: Mapping[str, CatalogEntry],
) -> tuple[list[AssetsDefinition], UnresolvedAssetJobDefinition]:
    # single_run() is what lets a backfill hand many policies to one run (beta in Dagster).
    warnings.filterwarnings("ignore", category=BetaWarning, message=".*backfill_policy.*")
    common: dict[str, Any] = {
        "partitions_def": POLICY_PARTITIONS,
        "backfill_policy": BackfillPolicy.single_run(),
        "group_name": WORKFLOW_GROUP,
        "owners": OWNERS,
    }

    @asset(
        description="Step 1: the policy exists in the Policy API (POST /createpolicy) and its "
        "policy_id is stored and verified in policy_execution_state. Resumes an active "
        "execution instead of creating a second policy, and creates none for content that "
        "has already completed (run config force_new_execution to override).",
        kinds={"python", "api"},
        **common,
    )
    def policy_created(
        context: AssetExecutionContext,
        config: CreateConfig,
        policy_api: PolicyApiResource,
        policy_state: PolicyStateResource,
    ) -> MaterializeResult:
        workflow = _workflow(context, policy_api, policy_state)
        return run_step(
            context,
            catalog,
            lambda keys: workflow.create_policies(
                [catalog[key].policy for key in keys], force_new=config.force_new_execution
            ),
        )

    @asset(
        deps=[policy_created],
        description="Step 2: the Policy API reports the policy ready (GET /policy/{policy_id} "
        "polled with backoff and jitter) and the state row agrees (status policy_ready).",
        kinds={"python", "api"},
        **common,
    )
    def policy_ready(
        context: AssetExecutionContext,
        config: PollingConfig,
        policy_api: PolicyApiResource,
        policy_state: PolicyStateResource,
    ) -> MaterializeResult:
        workflow = _workflow(context, policy_api, policy_state)
        polling = config.policy()
        return run_step(context, catalog, lambda keys: workflow.wait_until_ready(keys, polling))

    @asset(
        deps=[policy_ready],
        description="Step 3: the circuit breaker was triggered exactly once (POST /circuit) for "
        "a ready policy, and the execution is completed.",
        kinds={"python", "api"},
        **common,
    )
    def circuit_breaker_activation(
        context: AssetExecutionContext,
        policy_api: PolicyApiResource,
        policy_state: PolicyStateResource,
    ) -> MaterializeResult:
        workflow = _workflow(context, policy_api, policy_state)
        return run_step(context, catalog, workflow.activate_circuit_breakers)

    assets = [policy_created, policy_ready, circuit_breaker_activation]
    job = define_asset_job(
        JOB_NAME,
        selection=assets,
        description="The seed's three-step policy workflow for one or more policies.",
        # The steps are sequential and I/O-bound (they fan out over threads inside), so one
        # process per step would only add interpreter start-up to every run.
        executor_def=in_process_executor,
        # Every run calls the Policy API: deploy/dagster.yaml limits how many such runs are in
        # progress at once by this tag (tag_concurrency_limits).
        tags={"policy_pipeline/api": "true"},
    )
    return assets, job
