"""Sensors: the catalog drives runs, and failed runs raise an alert.

`policy_catalog_sensor` launches `policy_workflow_job` for a new policy file or a changed one.
A given content is launched once: its run key is the content hash, and content the warehouse
has already executed is not launched again even if the cursor is lost.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

import httpx
from dagster import (
    AddDynamicPartitionsRequest,
    DefaultSensorStatus,
    RunFailureSensorContext,
    RunRequest,
    SensorEvaluationContext,
    SensorResult,
    SkipReason,
    run_failure_sensor,
    sensor,
)
from dagster._core.definitions.unresolved_asset_job_definition import UnresolvedAssetJobDefinition

from policy_pipeline.assets import PARTITIONS_NAME, contiguous_ranges, partition_tags
from policy_pipeline.catalog import CatalogError, load_catalog
from policy_pipeline.resources import PolicyStateResource
from policy_pipeline.settings import Settings
from policy_pipeline.state import AuditEvent

SENSOR_TAG = "policy_pipeline/trigger"
ALERT_TIMEOUT_SECONDS = 10.0


def build_catalog_sensor(job: UnresolvedAssetJobDefinition) -> Any:
    @sensor(
        name="policy_catalog_sensor",
        job=job,
        minimum_interval_seconds=30,
        default_status=DefaultSensorStatus.RUNNING,
        description="Runs the workflow for every new or changed policy file in the catalog.",
    )
    def policy_catalog_sensor(
        context: SensorEvaluationContext, policy_state: PolicyStateResource
    ) -> SensorResult | SkipReason:
        settings = Settings.from_env()
        try:
            catalog = load_catalog(settings.catalog_dir)
        except CatalogError as exc:
            # A broken catalog launches nothing until it is fixed.
            context.log.error(str(exc))
            return SkipReason(str(exc))
        hashes = {name: entry.policy.content_hash() for name, entry in catalog.items()}
        seen: dict[str, str] = json.loads(context.cursor) if context.cursor else {}
        changed = {name for name, digest in hashes.items() if seen.get(name) != digest}
        if changed:
            executed = policy_state.store().executed_content()
            changed = {name for name in changed if (name, hashes[name]) not in executed}

        known = context.instance.get_dynamic_partitions(PARTITIONS_NAME)
        known_set = set(known)
        new_partitions = sorted(name for name in hashes if name not in known_set)
        ordered = [*known, *new_partitions]
        run_requests = []
        for first, last in contiguous_ranges(ordered, changed):
            in_range = ordered[ordered.index(first) : ordered.index(last) + 1]
            content = ",".join(f"{name}:{hashes[name]}" for name in in_range)
            run_requests.append(
                RunRequest(
                    run_key=hashlib.sha256(content.encode()).hexdigest()[:40],
                    tags={**partition_tags(first, last), SENSOR_TAG: "catalog"},
                )
            )
        if run_requests:
            context.log.info(f"launching {len(changed)} new or changed policies")
        return SensorResult(
            run_requests=run_requests,
            dynamic_partitions_requests=(
                [AddDynamicPartitionsRequest(PARTITIONS_NAME, new_partitions)]
                if new_partitions
                else []
            ),
            cursor=json.dumps(hashes, sort_keys=True, separators=(",", ":")),
        )

    return policy_catalog_sensor


def _failure_summary(context: RunFailureSensorContext) -> dict[str, Any]:
    run = context.dagster_run
    tags = run.tags
    steps = []
    for event in context.get_step_failure_events():
        data = event.step_failure_data
        error = data.error.message.strip() if data and data.error else "unknown error"
        metadata = data.user_failure_data.metadata if data and data.user_failure_data else {}
        failed: Any = metadata["failed_policies"].value if "failed_policies" in metadata else None
        # The workflow step where the (first) failed policy stopped, not the Dagster op that
        # runs all three.
        where: Any = metadata["failed_steps"].value if "failed_steps" in metadata else None
        step = min(where.items())[1] if isinstance(where, dict) and where else event.step_key
        steps.append({"step": step, "error": error[:2000], "failed_policies": failed})
    policy = tags.get("dagster/partition") or (
        f"{tags.get('dagster/asset_partition_range_start')}.."
        f"{tags.get('dagster/asset_partition_range_end')}"
        if "dagster/asset_partition_range_start" in tags
        else None
    )
    return {
        "run_id": run.run_id,
        "job": run.job_name,
        "policy": policy,
        "step": steps[0]["step"] if steps else None,
        "error": steps[0]["error"] if steps else (context.failure_event.message or ""),
        "steps": steps,
    }


@run_failure_sensor(
    name="policy_run_failure_alert",
    default_status=DefaultSensorStatus.RUNNING,
    description="Records every failed run in the audit table and, when POLICY_ALERT_WEBHOOK_URL "
    "is set, posts a JSON alert (policy, step, error) to it.",
)
def policy_run_failure_alert(
    context: RunFailureSensorContext, policy_state: PolicyStateResource
) -> None:
    summary = _failure_summary(context)
    store = policy_state.store(run_id=summary["run_id"])
    store.audit(
        AuditEvent(
            execution_id=None,
            policy_name=summary["policy"] or "",
            event_type="run_failure",
            message=f"run {summary['run_id']} of {summary['job']} failed at {summary['step']}",
            detail=summary,
        )
    )
    store.flush()
    url = os.environ.get("POLICY_ALERT_WEBHOOK_URL", "").strip()
    if not url:
        return
    try:
        response = httpx.post(url, json=summary, timeout=ALERT_TIMEOUT_SECONDS)
        response.raise_for_status()
    except httpx.HTTPError as exc:
        # The alert is best-effort; the failure is already recorded in the audit table.
        context.log.warning(f"alert webhook failed: {type(exc).__name__}: {exc}")
    else:
        context.log.info(f"alert posted for run {summary['run_id']}")
