"""`policy-pipeline retry` submits a run to the Dagster instance named by DAGSTER_HOME (through
``dagster job launch`` and the instance's run coordinator): it is not executed in the
operator's process. Real parts only: the CLI as a subprocess, a real instance on disk, the
simulator and a DuckDB file."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from dagster import DagsterInstance, DagsterRun, DagsterRunStatus

from policy_pipeline.core.liveness import Holder, lease_owner
from policy_pipeline.core.settings import PROJECT_ROOT, Settings
from policy_pipeline.defs.workflow.runs import JOB_NAME, PROCESS_TAG, SENSOR_TAG
from policy_pipeline.resources import open_state
from policy_pipeline_tests.conftest import (
    CATALOG_POLICIES,
    Workspace,
    dagster_home,
    run_cli,
    subprocess_env,
)

QUEUED = """\
run_coordinator:
  module: dagster.core.run_coordinator
  class: QueuedRunCoordinator
  config:
    tag_concurrency_limits:
      - key: policy_pipeline/api
        value: "true"
        limit: 2
run_launcher:
  module: dagster.core.launcher
  class: DefaultRunLauncher
telemetry:
  enabled: false
"""
RUN_TIMEOUT_SECONDS = 240


@contextmanager
def instance_at(home: Path) -> Iterator[DagsterInstance]:
    with DagsterInstance.from_config(str(home)) as instance:
        yield instance


def submitted_run_id(stdout: str) -> str:
    found = re.search(r"Submitted run ([0-9a-f-]{36})", stdout)
    assert found, stdout
    return found.group(1)


def wait_for(instance: DagsterInstance, run_id: str, until: str) -> DagsterRun:
    """Poll until the run has the process tag (``started``) or has ended (``finished``)."""
    deadline = time.monotonic() + RUN_TIMEOUT_SECONDS
    while True:
        run = instance.get_run_by_id(run_id)
        assert run is not None
        if (until == "started" and PROCESS_TAG in run.tags) or run.is_finished:
            return run
        assert time.monotonic() < deadline, f"run {run_id} still {run.status} ({until})"
        time.sleep(0.5)


def fail_by_exhausted_polls(workspace: Workspace, name: str) -> None:
    workspace.simulator.configure(never_ready_policies=[name])
    workspace.run([name], run_config={"ops": {"policy_workflow": {"config": {"max_polls": 2}}}})
    assert workspace.executions(name)[0]["status"] == "error"
    workspace.simulator.configure(never_ready_policies=[])


def test_retry_submits_the_run_and_returns_before_it_ends(workspace: Workspace) -> None:
    name = CATALOG_POLICIES[2]
    fail_by_exhausted_polls(workspace, name)
    home = dagster_home(workspace)
    # The run waits for the policy's lease while this test holds it: the CLI can only return
    # before the run ends if it did not execute the run itself.
    workspace.env["POLICY_LEASE_WAIT_SECONDS"] = str(RUN_TIMEOUT_SECONDS)
    holder = lease_owner("operator:test-holds-the-lease")
    with open_state(Settings.from_env()) as state:
        store = state.store()
        assert store.acquire_leases([name], holder, 600) == {name}
        cli = subprocess.Popen(
            [sys.executable, "-m", "policy_pipeline.cli", "retry", name, "--reason", "API fixed"],
            cwd=PROJECT_ROOT,
            env=subprocess_env(workspace),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        stdout, stderr = cli.communicate(timeout=RUN_TIMEOUT_SECONDS)
        assert cli.returncode == 0, stdout + stderr
        run_id = submitted_run_id(stdout)
        assert "dagster run list" in stdout
        with instance_at(home) as instance:
            run = instance.get_run_by_id(run_id)
            assert run is not None and not run.is_finished, run and run.status
            assert run.job_name == JOB_NAME
            assert run.tags["dagster/partition"] == name
            assert run.tags[SENSOR_TAG] == "retry"
            assert run.tags["policy_pipeline/api"] == "true"  # the job's tag: the queue's limit
            # The run's step runs in a process of its own, neither the CLI nor this test.
            started = wait_for(instance, run_id, "started")
            assert not started.is_finished, started.status
            pid = Holder.parse(f"run:{run_id}@{started.tags[PROCESS_TAG]}").pid
            assert pid not in (None, cli.pid, os.getpid())
            assert workspace.simulator.counts()["per_policy"][name].get("circuit_requests", 0) == 0
            store.release_leases([name], holder)
            finished = wait_for(instance, run_id, "finished")
            assert finished.status is DagsterRunStatus.SUCCESS
    [execution] = workspace.executions(name)
    assert execution["status"] == "completed"
    counts = workspace.simulator.counts()["per_policy"][name]
    assert counts["policies_created"] == 1
    assert counts["circuit_requests"] == 1 and counts["circuits_triggered"] == 1
    audited = workspace.query(
        'SELECT "message" FROM policy_execution_events WHERE "event_type" = \'override\''
    )
    assert any("API fixed" in m and run_id in m for (m,) in audited), audited


def test_retry_wait_returns_1_when_the_run_fails(workspace: Workspace) -> None:
    name = CATALOG_POLICIES[0]
    home = dagster_home(workspace)
    workspace.simulator.configure(fail_policies=[name])
    result = run_cli(workspace, "retry", name, "--wait")
    assert result.returncode == 1, result.stdout[-2000:] + result.stderr[-2000:]
    run_id = submitted_run_id(result.stdout)
    assert f"run {run_id} ended FAILURE" in result.stderr
    assert f"{name}: execution" in result.stdout and "error" in result.stdout
    with instance_at(home) as instance:
        run = instance.get_run_by_id(run_id)
        assert run is not None and run.status is DagsterRunStatus.FAILURE
    assert [e["status"] for e in workspace.executions(name)] == ["error"]


def test_retry_only_queues_the_run_with_a_queued_coordinator(workspace: Workspace) -> None:
    name = CATALOG_POLICIES[1]
    home = dagster_home(workspace, QUEUED)
    result = run_cli(workspace, "retry", name)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    run_id = submitted_run_id(result.stdout)
    with instance_at(home) as instance:
        run = instance.get_run_by_id(run_id)
        # No daemon here: the run waits in the queue, under the instance's limits.
        assert run is not None and run.status is DagsterRunStatus.QUEUED
        assert run.tags["dagster/partition"] == name
    assert name not in workspace.simulator.counts()["per_policy"]  # nothing executed
    assert workspace.executions(name) == []


def test_retry_refuses_without_an_instance_or_for_an_unknown_policy(
    workspace: Workspace,
) -> None:
    env = {k: v for k, v in subprocess_env(workspace).items() if k != "DAGSTER_HOME"}
    no_home = subprocess.run(
        [sys.executable, "-m", "policy_pipeline.cli", "retry", CATALOG_POLICIES[0]],
        cwd=PROJECT_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert no_home.returncode == 2 and "DAGSTER_HOME is not set" in no_home.stderr
    home = dagster_home(workspace)
    unknown = run_cli(workspace, "retry", "no_such_policy")
    assert unknown.returncode == 1 and "not in the catalog" in unknown.stderr, unknown.stderr
    with instance_at(home) as instance:
        assert instance.get_runs() == []
