"""The workflow's runs: the job, the tags a run carries, and whether a run is dead.

Whether a process is certainly gone is decided in one place, ``core/liveness.py`` (no
Dagster); this module is what Dagster does about it: a run whose process is gone is reported
failed, so that the UI does not show it STARTED for ever when no daemon monitors runs.
"""

from collections.abc import Iterable

from dagster import (
    AssetSelection,
    DagsterInstance,
    DagsterRun,
    define_asset_job,
    in_process_executor,
)

from policy_pipeline.core.domain import STEPS
from policy_pipeline.core.liveness import Holder, this_process

JOB_NAME = "policy_workflow_job"
RETRY_NUMBER_TAG = "dagster/retry_number"  # set by Dagster on an automatic retry of a run
SENSOR_TAG = "policy_pipeline/trigger"  # which sensor launched a run ("catalog", "progress")
# The process a run's step runs in (host, pid, start time): lets anyone on that host see for
# sure that a STARTED run is dead.
PROCESS_TAG = "policy_pipeline/process"
RUN_OWNER_PREFIX = "run:"

policy_workflow_job = define_asset_job(
    JOB_NAME,
    selection=AssetSelection.assets(*STEPS),
    description="The three-step policy workflow (create, wait until ready, circuit breaker) "
    "for one or more policies.",
    # The step is I/O-bound (it fans out over threads inside), so one process per step would
    # only add interpreter start-up to every run.
    executor_def=in_process_executor,
    # deploy/dagster.yaml also limits how many such runs are in progress at once by this tag
    # (tag_concurrency_limits); the pool limits the steps, whatever launched them.
    tags={"policy_pipeline/api": "true"},
)


def tag_this_process(instance: DagsterInstance, run_id: str) -> None:
    """Name the process that runs this run's step, on the run."""
    instance.add_run_tags(run_id, {PROCESS_TAG: this_process()})


def holder_gone(instance: DagsterInstance, owner: str, found_by: str) -> bool:
    """Whether a lease holder has certainly stopped: its process is gone from this host. A run
    Dagster calls finished is no proof (run monitoring fails a run whose worker host stopped
    answering, and its process may live on, cut off): a holder on another host is waited for
    until its lease lapses. A dead run still STARTED (killed; no run monitoring) is reported
    failed, so Dagster no longer shows it running."""
    holder = Holder.parse(owner)
    if not holder.certainly_dead():
        return False
    run = instance.get_run_by_id(holder.run_id) if holder.run_id else None
    if run is not None and not run.is_finished:
        _report_dead_run(instance, run, holder, found_by)
    return True


def run_is_dead(instance: DagsterInstance, run: DagsterRun, found_by: str) -> bool:
    """Whether this run's process is certainly gone from this host; if so, and Dagster still
    has the run in progress, it is reported failed."""
    process = run.tags.get(PROCESS_TAG)
    if process is None:
        return False
    holder = Holder.parse(f"{RUN_OWNER_PREFIX}{run.run_id}@{process}")
    if not holder.certainly_dead():
        return False
    if not run.is_finished:
        _report_dead_run(instance, run, holder, found_by)
    return True


def fail_dead_runs(instance: DagsterInstance, runs: Iterable[DagsterRun], found_by: str) -> None:
    for run in runs:
        run_is_dead(instance, run, found_by)


def _report_dead_run(instance: DagsterInstance, run: DagsterRun, holder: Holder, by: str) -> None:
    instance.report_run_failed(
        run,
        message=f"Run process {holder.pid} on {holder.host} is gone (killed, or its host "
        f"restarted); {by} found it and took its policies over.",
    )
