"""Nothing waits on a person, end to end: `dagster dev` with its sensors on, a catalog whose
slowest policy becomes ready only after three minutes, and the run killed (SIGKILL, as an OOM
kill would) while it waits. Nobody launches anything: the catalog sensor starts the work, the
progress sensor resumes the killed run's policy, the run hands the long wait off, the sensor
polls it outside any run and requests its circuit-breaker run. At the end every policy is
completed with one policy and one circuit breaker, the killed run is not left STARTED, and no
run was in progress during the long wait (from the instance's run records)."""

from __future__ import annotations

import itertools
import os
import signal
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from dagster import DagsterInstance, DagsterRunStatus, RunsFilter

from policy_pipeline.core.liveness import Holder
from policy_pipeline.defs.workflow.runs import PROCESS_TAG
from policy_pipeline_tests.conftest import CATALOG_POLICIES, Workspace, subprocess_env
from policy_pipeline_tests.harness.dagster_dev import dagster_dev, prepare_dagster_home

READY_AFTER_SECONDS = 180.0
HANDS_OFF_ENV = {
    "POLICY_WAIT_HANDOFF_SECONDS": "10",  # a run lets a wait go after 10 s
    "POLICY_WAIT_POLL_INTERVAL_SECONDS": "10",  # the sensor polls waiting policies every 10 s
    "POLICY_PROGRESS_TICK_SECONDS": "5",
    "POLICY_RESUME_BACKOFF_SECONDS": "5",
    "POLICY_LEASE_TTL_SECONDS": "10",
    "POLICY_POLL_MAX_INTERVAL_SECONDS": "2",
}
INSTANCE_EXTRA: dict[str, Any] = {"run_queue": {"dequeue_interval_seconds": 1}}
TIMEOUT_SECONDS = 480.0


def _wait(what: str, condition: Any, timeout: float, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            tail = log.read_text(errors="replace")[-4000:] if log.exists() else ""
            raise AssertionError(f"timed out waiting for {what}\n{tail}")
        time.sleep(0.5)


def _seconds(value: float | datetime | None) -> float:
    if isinstance(value, datetime):
        return value.timestamp()
    return float(value or 0.0)


def test_killed_run_and_a_three_minute_wait_complete_with_nobody_launching_anything(
    workspace: Workspace,
) -> None:
    slow = CATALOG_POLICIES[-1]
    workspace.simulator.configure(
        ready_after_polls=0, ready_after_seconds_by_policy={slow: READY_AFTER_SECONDS}
    )
    env = subprocess_env(workspace, **HANDS_OFF_ENV)
    home = prepare_dagster_home(Path(env["DAGSTER_HOME"]), INSTANCE_EXTRA)
    log = workspace.root / "dagster-dev.log"
    counts = workspace.simulator.counts

    def circuits(name: str) -> int:
        return int(counts()["per_policy"].get(name, {}).get("circuits_triggered", 0))

    with dagster_dev(env, log), DagsterInstance.from_config(str(home)) as instance:
        # The catalog sensor launches the first run; the quick policies complete in it, the
        # slow one is created and polled.
        _wait(
            "the catalog sensor's run to create every policy and finish the quick ones",
            lambda: (
                all(circuits(n) == 1 for n in CATALOG_POLICIES if n != slow)
                and counts()["per_policy"].get(slow, {}).get("policies_created", 0) == 1
            ),
            120,
            log,
        )
        [first] = instance.get_runs(RunsFilter(statuses=[DagsterRunStatus.STARTED]))
        holder = Holder.parse(f"run:{first.run_id}@{first.tags[PROCESS_TAG]}")
        assert holder.pid is not None
        os.kill(holder.pid, signal.SIGKILL)  # mid-way: the slow policy holds its lease
        killed_at = time.time()

        _wait(
            "the slow policy's circuit breaker",
            lambda: circuits(slow) == 1,
            TIMEOUT_SECONDS,
            log,
        )
        _wait(
            "every run to finish",
            lambda: (
                not instance.get_runs(
                    RunsFilter(
                        statuses=[
                            DagsterRunStatus.QUEUED,
                            DagsterRunStatus.NOT_STARTED,
                            DagsterRunStatus.STARTING,
                            DagsterRunStatus.STARTED,
                        ]
                    )
                )
            ),
            60,
            log,
        )
        records = instance.get_run_records()

    # Exactly once, and everything completed.
    for name in CATALOG_POLICIES:
        per_policy = counts()["per_policy"][name]
        assert per_policy["policies_created"] == 1, (name, per_policy)
        assert per_policy["circuits_triggered"] == 1, (name, per_policy)
        assert per_policy["duplicate_circuit_triggers"] == 0, (name, per_policy)
        [row] = workspace.executions(name)
        assert row["status"] == "completed", row

    by_id = {record.dagster_run.run_id: record for record in records}
    # The killed run is not left STARTED: the project found its process gone and said so.
    assert by_id[first.run_id].dagster_run.status is DagsterRunStatus.FAILURE
    # The workflow's runs (the schedules may have run checks or reports meanwhile).
    later = [
        r
        for r in records
        if r.dagster_run.run_id != first.run_id and r.dagster_run.job_name == "policy_workflow_job"
    ]
    assert later and all(r.dagster_run.status is DagsterRunStatus.SUCCESS for r in later)
    triggers = [r.dagster_run.tags.get("policy_pipeline/trigger") for r in later]
    assert triggers and set(triggers) == {"progress"}, [
        (r.dagster_run.job_name, r.dagster_run.tags) for r in later
    ]

    # No run was in progress through the long wait: the runs after the kill (the resumption,
    # which handed the wait off, and the circuit-breaker run) leave a gap of minutes.
    spans = sorted(
        (_seconds(r.start_time), _seconds(r.end_time)) for r in later if r.start_time is not None
    )
    gaps = [b[0] - a[1] for a, b in itertools.pairwise(spans)]
    # The slow policy was created a few seconds before the kill; the circuit-breaker run
    # starts once it is ready.
    ready_at = killed_at + READY_AFTER_SECONDS - 30
    assert gaps and max(gaps) > 90, (spans, gaps)
    busy = sum(end - start for start, end in spans)
    assert busy < 90, spans
    assert spans[-1][0] > ready_at, (spans, ready_at)
