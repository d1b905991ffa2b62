"""Exactly once under crashes and concurrency, the persistent API guard, and secrets kept out of
everything the project writes. Assertions come from the simulator's counters (what the Policy
API really did) and the state and audit tables."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from typing import Any

import pytest
from dagster import DagsterInstance

from policy_pipeline.core.failpoints import POINTS
from policy_pipeline.core.settings import PROJECT_ROOT
from policy_pipeline_tests.conftest import CATALOG_POLICIES, Workspace, job_command, subprocess_env

# The default lease TTL (30 s), and a lease wait that covers it: a re-run never gives up on a
# crashed run's lease, whether it sees the holder's process is gone or waits for the lapse.
CRASH_ENV = {"POLICY_LEASE_WAIT_SECONDS": "40"}
LEASE_TTL_SECONDS = 30


def _job(workspace: Workspace, partition: str, **env: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        job_command("--tags", json.dumps({"dagster/partition": partition})),
        cwd=PROJECT_ROOT,
        env=subprocess_env(workspace, **CRASH_ENV, **env),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _finish(process: subprocess.Popen[str]) -> tuple[int, str]:
    output, _ = process.communicate(timeout=900)
    return process.returncode, output


def _assert_exactly_once(workspace: Workspace, name: str, executions: int = 1) -> None:
    """One policy created and one circuit breaker fired per execution, all completed."""
    counts = workspace.simulator.counts()["per_policy"][name]
    assert counts["policies_created"] == executions, counts
    assert counts["circuits_triggered"] == executions, counts
    assert counts["duplicate_circuit_triggers"] == 0, counts
    rows = workspace.executions(name)
    assert len(rows) == executions  # no orphaned execution
    assert all(r["status"] == "completed" and r["circuit_breaker_completed"] for r in rows)


@pytest.mark.parametrize("point", POINTS)
def test_sigkill_at_each_point_then_rerun_completes_exactly_once(
    workspace: Workspace, point: str
) -> None:
    name = CATALOG_POLICIES[0]
    code, output = _finish(_job(workspace, name, POLICY_FAILPOINT=point))
    assert code == -signal.SIGKILL, output[-2000:]
    after_crash = workspace.executions(name)
    assert len(after_crash) == 1  # the intent is committed before any call
    counts = workspace.simulator.counts()["per_policy"].get(name, {})
    assert counts.get("circuits_triggered", 0) <= 1

    started = time.monotonic()
    code, output = _finish(_job(workspace, name))
    rerun_seconds = time.monotonic() - started
    assert code == 0, output[-3000:]
    _assert_exactly_once(workspace, name)
    assert workspace.executions(name)[0]["execution_id"] == after_crash[0]["execution_id"]
    # The killed run's process is gone from this host: the re-run takes its lease over at once
    # (no wait for the TTL) and reports the dead run failed, so Dagster does not show it
    # STARTED for ever.
    assert "taking over 1 leases" in output, output[-3000:]
    assert rerun_seconds < LEASE_TTL_SECONDS, rerun_seconds
    with DagsterInstance.from_config(subprocess_env(workspace)["DAGSTER_HOME"]) as instance:
        statuses = sorted(run.status.value for run in instance.get_runs())
    assert statuses == ["FAILURE", "SUCCESS"], statuses


@pytest.mark.both_warehouses
def test_two_runs_of_one_partition_at_once_call_the_circuit_breaker_once(
    workspace: Workspace,
) -> None:
    name = CATALOG_POLICIES[1]
    # The instance's storage exists before the race (two CLI processes creating a fresh
    # SQLite instance at once race in Dagster's own schema migration).
    home = subprocess_env(workspace)["DAGSTER_HOME"]
    DagsterInstance.from_config(home).dispose()
    first, second = _job(workspace, name), _job(workspace, name)
    results = [_finish(first), _finish(second)]
    assert [code for code, _ in results] == [0, 0], [out[-2000:] for _, out in results]
    _assert_exactly_once(workspace, name)
    assert workspace.simulator.counts()["per_policy"][name]["circuit_requests"] == 1


# --- the persistent guard --------------------------------------------------------------------


def _guard(workspace: Workspace) -> tuple[Any, ...]:
    [row] = workspace.query(
        'SELECT "state", "consecutive_failures", "last_error" FROM policy_api_guard'
    )
    return row


@pytest.mark.both_warehouses
def test_guard_opens_fails_fast_probes_and_closes(
    workspace: Workspace, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("POLICY_GUARD_FAILURE_THRESHOLD", "3")
    # Long enough that the fail-fast run below starts inside it, even on a loaded machine.
    monkeypatch.setenv("POLICY_GUARD_COOLDOWN_SECONDS", "8")
    monkeypatch.setenv("POLICY_API_MAX_ATTEMPTS", "2")
    name = CATALOG_POLICIES[0]
    workspace.simulator.configure(error_rate=1.0)
    assert not workspace.run(CATALOG_POLICIES).success
    state, failures, last_error = _guard(workspace)
    assert state == "open" and int(failures) >= 3
    assert "createpolicy" in last_error
    requests = workspace.simulator.counts()["requests"]["createpolicy"]
    # Retries stop once the guard opens: fewer calls than policies x attempts.
    assert requests < len(CATALOG_POLICIES) * 2

    # Open: the next run fails fast and makes no call at all.
    workspace.simulator.configure(error_rate=0.0)
    result = workspace.run([name])
    assert not result.success
    assert workspace.simulator.counts()["requests"]["createpolicy"] == requests
    failure = next(e for e in result.all_events if e.event_type_value == "STEP_FAILURE")
    assert "guard is open" in (failure.message or "") + str(failure.event_specific_data)

    # After the cool-down one probe goes through; it succeeds, the guard closes, work resumes.
    time.sleep(8.5)
    assert workspace.run(CATALOG_POLICIES).success
    assert _guard(workspace)[0] == "closed"
    for policy in CATALOG_POLICIES:
        assert workspace.executions(policy)[-1]["status"] == "completed"
    changes = [
        r[0]
        for r in workspace.query(
            'SELECT "message" FROM policy_execution_events WHERE "event_type" = \'guard\' '
            'ORDER BY "event_time"'
        )
    ]
    assert [c.split(":")[0].split(" after")[0] for c in changes] == [
        "guard opened",
        "guard half-open",
        "guard closed",
    ]


def test_failed_probe_reopens_the_guard(
    workspace: Workspace, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("POLICY_GUARD_FAILURE_THRESHOLD", "2")
    monkeypatch.setenv("POLICY_GUARD_COOLDOWN_SECONDS", "1")
    monkeypatch.setenv("POLICY_API_MAX_ATTEMPTS", "1")
    workspace.simulator.configure(error_rate=1.0)
    workspace.run(CATALOG_POLICIES)
    assert _guard(workspace)[0] == "open"
    before = workspace.simulator.counts()["requests"]["createpolicy"]
    time.sleep(1.5)
    assert not workspace.run(CATALOG_POLICIES).success
    assert _guard(workspace)[0] == "open"
    assert workspace.simulator.counts()["requests"]["createpolicy"] == before + 1  # one probe


def test_cli_diagnose_shows_an_open_guard(
    workspace: Workspace, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("POLICY_GUARD_FAILURE_THRESHOLD", "2")
    monkeypatch.setenv("POLICY_API_MAX_ATTEMPTS", "1")
    workspace.simulator.configure(error_rate=1.0)
    workspace.run(CATALOG_POLICIES)
    result = subprocess.run(
        [sys.executable, "-m", "policy_pipeline.cli", "diagnose", "--json"],
        cwd=PROJECT_ROOT,
        env=subprocess_env(workspace),
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 1
    report = json.loads(result.stdout)
    assert report["api_guard"]["state"] == "open"
    assert any("guard is open" in item for item in report["attention"])
    assert report["api_guard"]["recent_changes"][0]["message"].startswith("guard opened")


# --- secrets -----------------------------------------------------------------------------------


@pytest.mark.both_warehouses
def test_no_secret_reaches_logs_metadata_tables_or_errors(workspace: Workspace) -> None:
    secrets = [workspace.api_key]
    if workspace.warehouse == "snowflake":
        secrets.append(workspace.env["SNOWFLAKE_PASSWORD"])
    workspace.simulator.configure(
        seed=7,
        error_rate=0.2,
        non_json_rate=0.1,
        scripted_faults=[{"endpoint": "createpolicy", "fault": "5xx", "times": 1}],
    )
    results = [workspace.run(), workspace.run()]
    workspace.simulator.configure(fail_policies=[CATALOG_POLICIES[0]], error_rate=0.0)
    results.append(workspace.run([CATALOG_POLICIES[0]]))

    texts: list[str] = []
    for result in results:
        for event in result.all_events:
            texts.append(str(event))
            texts.append(repr(event.event_specific_data))
    for result in results:
        for entry in workspace.instance.all_logs(result.run_id):
            texts.append(entry.to_json())
    for table in ("policy_execution_state", "policy_execution_events", "policy_api_guard"):
        for row in workspace.query(f"SELECT * FROM {table}"):
            texts.append(" ".join(str(value) for value in row))
    dump = "\n".join(texts)
    assert len(dump) > 10_000  # the scan looked at something
    for secret in secrets:
        assert secret not in dump
