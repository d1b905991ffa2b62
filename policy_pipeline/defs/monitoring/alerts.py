"""Alerts: every failed run is recorded in the audit table and, when
POLICY_ALERT_WEBHOOK_URL is set, posted as JSON (policy, step, error) to it. The progress sensor
posts the same alert for an execution that ends for good outside any run."""

from __future__ import annotations

from typing import Any

import requests
from dagster import (
    DefaultSensorStatus,
    RunFailureSensorContext,
    SensorDefinition,
    run_failure_sensor,
)

from policy_pipeline.core.settings import Settings
from policy_pipeline.core.store.state_store import AuditEvent
from policy_pipeline.resources import PolicyStateResource

ALERT_TIMEOUT_SECONDS = 10.0


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


def build_run_failure_alert(settings: Settings) -> SensorDefinition:
    @run_failure_sensor(
        name="policy_run_failure_alert",
        default_status=DefaultSensorStatus.RUNNING,
        description="Records every failed run in the audit table and, when "
        "POLICY_ALERT_WEBHOOK_URL is set, posts a JSON alert (policy, step, error) to it.",
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
        post_alert(summary, context.log, settings.alert_webhook_url)

    return policy_run_failure_alert


def post_alert(summary: dict[str, Any], log: Any, url: str) -> None:
    """POST the alert to the webhook (POLICY_ALERT_WEBHOOK_URL) when set (best effort: it is
    audited)."""
    if not url:
        return
    try:
        response = requests.post(url, json=summary, timeout=ALERT_TIMEOUT_SECONDS)
        response.raise_for_status()
    except requests.RequestException as exc:
        # The alert is best-effort; the failure is already recorded in the audit table.
        log.warning(f"alert webhook failed: {type(exc).__name__}: {exc}")
    else:
        log.info(f"alert posted for {summary['run_id'] or summary['policy']}")
