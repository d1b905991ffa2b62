"""Sensors: the catalog drives runs, nothing waits on a person, and failures raise an alert.

`policy_catalog_sensor` launches `policy_workflow_job` for a new policy file or a changed one.
A given content is launched once: its run key is the content hash, and content the warehouse
has already executed is not launched again even if the cursor is lost. Content whose run ended
without starting an execution (another run held the policy past the lease wait, the guard was
open) is launched again, under a new run key, once no catalog run is in flight and the resume
backoff has passed: a change is never lost.

`policy_progress_sensor` polls the policies that runs handed off, reports `policy_ready` for
each that turns ready and requests its circuit-breaker run, and resumes every execution that
nothing moves (`progress.py`). It touches the warehouse once per ``POLICY_WAIT_POLL_INTERVAL_
SECONDS`` while policies only wait, so that a Snowflake warehouse can suspend in between.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Mapping, Sequence
from typing import Any

from dagster import (
    AddDynamicPartitionsRequest,
    AssetKey,
    AssetMaterialization,
    DagsterRunStatus,
    DefaultSensorStatus,
    MetadataValue,
    RunRequest,
    RunsFilter,
    SensorDefinition,
    SensorEvaluationContext,
    SensorResult,
    SkipReason,
    sensor,
)

from policy_pipeline.core.catalog import CatalogError, load_catalog
from policy_pipeline.core.domain import STEP_CIRCUIT, STEP_READY
from policy_pipeline.core.engine.guard import ApiGuard
from policy_pipeline.core.engine.progress import (
    ProgressTick,
    group_runs,
    run_kind,
)
from policy_pipeline.core.settings import Settings
from policy_pipeline.core.store.state_store import AuditEvent, ExecutionRow, StateStore
from policy_pipeline.defs.monitoring.alerts import post_alert
from policy_pipeline.defs.workflow.partitions import (
    PARTITIONS_NAME,
    contiguous_ranges,
    partition_tags,
)
from policy_pipeline.defs.workflow.runs import (
    JOB_NAME,
    SENSOR_TAG,
    fail_dead_runs,
    policy_workflow_job,
)
from policy_pipeline.resources import PolicyStateResource
from policy_pipeline.resources.policy_api import PolicyApiResource

PROGRESS_SENSOR = "policy_progress_sensor"
_WAITING_TO_START = [
    DagsterRunStatus.QUEUED,
    DagsterRunStatus.NOT_STARTED,
    DagsterRunStatus.STARTING,
]
_STARTED = DagsterRunStatus.STARTED


# The catalog sensor's runs that have not finished.
_IN_FLIGHT = [
    DagsterRunStatus.QUEUED,
    DagsterRunStatus.NOT_STARTED,
    DagsterRunStatus.STARTING,
    DagsterRunStatus.STARTED,
]


def _catalog_cursor(cursor: str | None) -> tuple[dict[str, str], dict[str, list[Any]]]:
    """The content hashes seen, and the content requested but not yet executed
    (name -> [hash, attempt, when requested]). An older cursor holds only the hashes."""
    data = json.loads(cursor) if cursor else {}
    if "hashes" not in data:
        return data, {}
    return data["hashes"], data["requested"]


def build_catalog_sensor(settings: Settings) -> SensorDefinition:
    catalog_dir = settings.catalog_dir
    retry_seconds = settings.progress.resume_backoff_seconds

    @sensor(
        name="policy_catalog_sensor",
        job=policy_workflow_job,
        minimum_interval_seconds=30,
        default_status=DefaultSensorStatus.RUNNING,
        description="Runs the workflow for every new or changed policy file in the catalog.",
    )
    def policy_catalog_sensor(
        context: SensorEvaluationContext, policy_state: PolicyStateResource
    ) -> SensorResult | SkipReason:
        try:
            catalog = load_catalog(catalog_dir)
        except CatalogError as exc:
            # A broken catalog launches nothing until it is fixed.
            context.log.error(str(exc))
            return SkipReason(str(exc))
        hashes = {name: entry.policy.content_hash() for name, entry in catalog.items()}
        seen, requested = _catalog_cursor(context.cursor)
        changed = {name for name, digest in hashes.items() if seen.get(name) != digest}
        waiting = {n for n, (digest, _a, _t) in requested.items() if hashes.get(n) == digest}
        if changed | waiting:
            executed = policy_state.store().executed_content()
            changed = {name for name in changed if (name, hashes[name]) not in executed}
            waiting = {name for name in waiting if (name, hashes[name]) not in executed}
        now = time.time()
        attempts = {name: 0 for name in changed}
        if waiting - changed and not context.instance.get_runs(
            RunsFilter(job_name=JOB_NAME, statuses=_IN_FLIGHT, tags={SENSOR_TAG: "catalog"}),
            limit=1,
        ):
            # Requested, finished, and still no execution of it: launch it again.
            for name in waiting - changed:
                _digest, attempt, at = requested[name]
                if now - at >= retry_seconds:
                    attempts[name] = attempt + 1
        launching = set(attempts)

        known = context.instance.get_dynamic_partitions(PARTITIONS_NAME)
        known_set = set(known)
        new_partitions = sorted(name for name in hashes if name not in known_set)
        ordered = [*known, *new_partitions]
        run_requests = []
        for first, last in contiguous_ranges(ordered, launching):
            in_range = ordered[ordered.index(first) : ordered.index(last) + 1]
            content = ",".join(f"{name}:{hashes[name]}:{attempts[name]}" for name in in_range)
            run_requests.append(
                RunRequest(
                    run_key=hashlib.sha256(content.encode()).hexdigest()[:40],
                    tags={**partition_tags(first, last), SENSOR_TAG: "catalog"},
                )
            )
        if run_requests:
            again = len(launching - changed)
            context.log.info(
                f"launching {len(changed)} new or changed policies"
                + (f" and {again} whose earlier run started no execution" if again else "")
            )
        # What is requested stays in the cursor until the warehouse has an execution of it.
        still = {
            name: [hashes[name], attempts[name], now] if name in launching else requested[name]
            for name in launching | waiting
        }
        return SensorResult(
            run_requests=run_requests,
            dynamic_partitions_requests=(
                [AddDynamicPartitionsRequest(PARTITIONS_NAME, new_partitions)]
                if new_partitions
                else []
            ),
            cursor=json.dumps(
                {"hashes": hashes, "requested": still}, sort_keys=True, separators=(",", ":")
            ),
        )

    return policy_catalog_sensor


def build_progress_sensor(settings: Settings) -> SensorDefinition:
    @sensor(
        name=PROGRESS_SENSOR,
        job=policy_workflow_job,
        minimum_interval_seconds=settings.progress.tick_seconds,
        default_status=DefaultSensorStatus.RUNNING,
        description="Polls the policies that runs handed off (reports policy_ready, requests "
        "the circuit-breaker run) and resumes, with backoff, every execution that nothing "
        "moves; ends for good (and alerts) what has used up POLICY_RESUME_MAX_ATTEMPTS.",
    )
    def policy_progress_sensor(
        context: SensorEvaluationContext,
        policy_state: PolicyStateResource,
        policy_api: PolicyApiResource,
    ) -> SensorResult | SkipReason:
        return progress_tick(context, policy_state, policy_api, settings)

    return policy_progress_sensor


def progress_tick(
    context: SensorEvaluationContext,
    policy_state: PolicyStateResource,
    policy_api: PolicyApiResource,
    settings: Settings,
) -> SensorResult | SkipReason:
    """One tick: nothing at all until the cursor says the warehouse is due (so that it can
    suspend while policies only wait), then the due polls and the resumption scan together."""
    cursor: dict[str, float] = json.loads(context.cursor) if context.cursor else {}
    started = time.time()
    if started < cursor.get("next_at", 0.0):
        return SkipReason(f"next look at the warehouse in {cursor['next_at'] - started:.0f}s")
    store = policy_state.store()
    guard = ApiGuard(
        store,
        f"sensor:{PROGRESS_SENSOR}",
        policy_api.guard_settings(),
    )
    tick = ProgressTick(
        store,
        policy_api.get_client(),
        settings.progress,
        settings.polling,
        policy_api.max_concurrency,
        context.log,
        guard,
    )
    # Poll what is due before the next wake too: one wake serves a whole cadence.
    waits = tick.poll_waiting(lead_seconds=settings.polling.wait_poll_interval_seconds / 2)
    asset_events = [_ready_event(row) for row in waits.ready]
    try:
        catalog = load_catalog(settings.catalog_dir)
        # Content hash by policy: a ready execution whose content changed since gets the
        # whole workflow, which finishes it and then creates the new content.
        contents: dict[str, str] | None = {
            name: entry.policy.content_hash() for name, entry in catalog.items()
        }
    except CatalogError as exc:
        context.log.warning(f"catalog unreadable, resuming only what it cannot judge: {exc}")
        contents = None
    known: set[str] | None = set(contents) if contents is not None else None
    ordered = context.instance.get_dynamic_partitions(PARTITIONS_NAME)
    run_requests = _run_requests(
        "circuit",
        [
            (row, run_kind(row, contents), row.execution_id)  # circuit, or the whole workflow
            for row in waits.ready
        ],
        ordered,
    )
    for row, error in waits.failed:
        _alert(context, store, row, "policy_ready", error, settings.alert_webhook_url)
    queue_limit = settings.progress.queue_limit
    runs = context.instance.get_runs(
        RunsFilter(tags={SENSOR_TAG: "progress"}, statuses=[*_WAITING_TO_START, _STARTED]),
        limit=1000,
    )
    # A resumption whose run has not started (or finished) yet is not resumed again.
    busy = {name for run in runs for name in _run_partitions(run.tags, ordered)}
    busy.update(row.policy_name for row in waits.ready)  # its circuit run is requested now
    queued = sum(1 for run in runs if run.status in _WAITING_TO_START)
    blocked = guard.blocks_calls()
    resumes = tick.resume_stranded(
        known, busy, launch=queued < queue_limit and blocked is None, contents=contents
    )
    for row, error in resumes.gave_up:
        _alert(context, store, row, "resume budget spent", error, settings.alert_webhook_url)
    for row, error in resumes.retired:
        context.log.warning(f"policy '{row.policy_name}': execution {row.execution_id} {error}")
    run_requests += _run_requests(
        "resume",
        [
            (row, kind, f"{row.execution_id}:{row.auto_resume_count + 1}")
            for row, kind in resumes.resumed
        ],
        ordered,
    )
    _fail_dead_runs(context)

    waiting, _next_due = store.wait_summary()
    next_in = settings.polling.wait_poll_interval_seconds
    if waits.cut_short:
        next_in = 0.0  # more are due than one tick could poll
    if waits.retry_after is not None:
        next_in = max(waits.retry_after, 1.0)
    summary = (
        f"{waiting} waiting, {waits.polled} of {waits.due} due polled "
        f"({len(waits.ready)} ready, {len(waits.failed)} failed), "
        f"{len(resumes.resumed)} resumed, {resumes.backing_off} backing off, "
        f"{resumes.busy} being resumed, "
        f"{resumes.deferred} deferred, {len(resumes.gave_up)} given up, "
        f"{len(resumes.retired)} retired"
        f"{'; guard: ' + blocked if blocked else ''} in {time.time() - started:.1f}s"
    )
    if run_requests or asset_events or waits.failed or resumes.gave_up or resumes.retired:
        context.log.info(summary)
    return SensorResult(
        run_requests=run_requests,
        asset_events=asset_events,
        cursor=json.dumps({"next_at": time.time() + next_in}),
        skip_reason=None if run_requests else summary,
    )


def _ready_event(row: ExecutionRow) -> AssetMaterialization:
    return AssetMaterialization(
        asset_key=STEP_READY,
        partition=row.policy_name,
        description=f"ready after {row.poll_count} polls (polled outside any run)",
        metadata={
            "execution_id": row.execution_id,
            "policy_id": row.policy_id or "",
            "status": row.status.value,
            "poll_count": MetadataValue.int(row.poll_count),
            "resumed": MetadataValue.bool(True),
            "message": "polled by policy_progress_sensor after the run handed it off",
        },
    )


def _run_partitions(tags: Mapping[str, str], ordered: Sequence[str]) -> list[str]:
    """The policies a run works on, from its partition tags."""
    if "dagster/partition" in tags:
        return [tags["dagster/partition"]]
    first = tags.get("dagster/asset_partition_range_start")
    last = tags.get("dagster/asset_partition_range_end")
    if first in ordered and last in ordered:
        return list(ordered[ordered.index(first) : ordered.index(last) + 1])
    return []


def _run_requests(
    prefix: str, items: list[tuple[ExecutionRow, str, str]], ordered: Sequence[str]
) -> list[RunRequest]:
    """Runs for (execution, kind of run, what is asked of it): neighbours (in partition order)
    of one kind share a run, since a run takes a range of partitions, and the others get one
    each. The run key names what each execution is asked for (its id, and for a resumption
    its number), so the same request is never launched twice; each was claimed in the
    warehouse by this tick alone."""
    if not items:
        return []
    rows = {row.policy_name: (row, key) for row, _kind, key in items}
    kinds = {row.policy_name: kind for row, kind, _key in items}
    known = set(ordered)
    requests = []
    groups = group_runs(ordered, kinds)
    # A policy not registered as a partition yet (a fresh instance): a run of its own.
    groups += [(kinds[n], n, n, [n]) for n in sorted(set(rows) - known)]
    for kind, first, last, names in groups:
        keys = [rows[n][1] for n in names]
        run_key = (
            f"{prefix}:{keys[0]}"
            if len(keys) == 1
            else f"{prefix}:" + hashlib.sha256(",".join(keys).encode()).hexdigest()[:40]
        )
        requests.append(
            RunRequest(
                run_key=run_key,
                asset_selection=[AssetKey(STEP_CIRCUIT)] if kind == "circuit" else None,
                tags={**partition_tags(first, last), SENSOR_TAG: "progress"},
            )
        )
    return requests


def _fail_dead_runs(context: SensorEvaluationContext) -> None:
    """A workflow run whose process is gone from this host is reported failed (with no
    daemon's run monitoring it would show STARTED for ever)."""
    runs = context.instance.get_runs(
        RunsFilter(job_name=JOB_NAME, statuses=[DagsterRunStatus.STARTED]), limit=200
    )
    fail_dead_runs(context.instance, runs, PROGRESS_SENSOR)


def _alert(
    context: SensorEvaluationContext,
    store: StateStore,
    row: ExecutionRow,
    why: str,
    error: str,
    webhook_url: str,
) -> None:
    """An execution ended for good outside any run: audit it and post the alert."""
    summary: dict[str, Any] = {
        "run_id": None,
        "job": None,
        "policy": row.policy_name,
        "execution_id": row.execution_id,
        "step": why,
        "error": error,
        "steps": [],
    }
    store.audit(
        AuditEvent.about(
            row,
            "alert",
            f"execution {row.execution_id} ended: {error}"[:2000],
            detail=summary,
        )
    )
    store.flush()
    post_alert(summary, context.log, webhook_url)
