"""One clock, in UTC: every stored time is UTC and every time that decides something (lease
expiry, stuck, resume backoff) is the warehouse's, whatever ``TZ`` the process runs under.

DuckDB takes its session time zone from the process's ``TZ`` when it opens a database, so a
process's ``TZ`` reaches its SQL; fakesnow (like Snowflake) has its own, so there the tests
hold that the SQL is UTC whatever the client's ``TZ``. Runs go through the real CLIs, the
progress sensor is evaluated as the daemon does, and the API ignores ``Idempotency-Key`` and
counts raw calls, so a duplicate cannot hide behind a replay."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import tokenize
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import yaml
from dagster import DagsterInstance, RunRequest, SensorResult, SkipReason, build_sensor_context

from policy_pipeline.core.catalog import load_catalog
from policy_pipeline.core.settings import PROJECT_ROOT, Settings
from policy_pipeline.core.store import schema
from policy_pipeline.core.store.dialect import SqlDialect, render
from policy_pipeline.resources import open_state
from policy_pipeline_tests.conftest import (
    CATALOG_POLICIES,
    Workspace,
    job_command,
    run_job,
    subprocess_env,
)

# Polling that outlasts the second run's start (a policy is ready only when the test says so),
# never handed off, and a lease wait the second run gives up after.
SLOW_POLICY_ENV = {
    "POLICY_POLL_MAX_POLLS": "100000",
    "POLICY_POLL_DEADLINE_SECONDS": "600",
    "POLICY_POLL_MAX_INTERVAL_SECONDS": "0.5",
    "POLICY_WAIT_HANDOFF_SECONDS": "0",
    "POLICY_LEASE_WAIT_SECONDS": "5",
}
TIMEOUT_SECONDS = 300.0
# How far a stored time may be from the test's own UTC reading of the clock (both read the
# same host clock; a local time would be hours away).
TOLERANCE = timedelta(minutes=1)
LEASE_TTL_SECONDS = 5  # the shortest allowed: a crashed run's lease lapses soon


def _utc_now() -> datetime:
    return datetime.now(UTC).replace(tzinfo=None)


@contextmanager
def process_tz(zone: str) -> Iterator[None]:
    """This process under ``TZ=zone`` (DuckDB reads it when a database is opened)."""
    before = os.environ.get("TZ")
    os.environ["TZ"] = zone
    time.tzset()
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("TZ", None)
        else:
            os.environ["TZ"] = before
        time.tzset()


def _wait_for(what: str, condition: Any, timeout: float = TIMEOUT_SECONDS) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.5)


def _job(workspace: Workspace, config: str, zone: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        job_command("-c", config),
        cwd=PROJECT_ROOT,
        env=subprocess_env(workspace, **SLOW_POLICY_ENV, TZ=zone),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _stored_times(workspace: Workspace) -> dict[str, tuple[datetime, datetime]]:
    """``table.column`` -> (earliest, latest) of every timestamp column that holds any."""
    found: dict[str, tuple[datetime, datetime]] = {}
    for table in (schema.STATE, schema.EVENTS, schema.LOCKS, schema.GUARD):
        for column in table.columns:
            if column.sql_type != "TIMESTAMP_NTZ":
                continue
            [(low, high)] = workspace.query(
                f"SELECT MIN({column.quoted}), MAX({column.quoted}) FROM {table.name}"
            )
            if low is not None:
                found[f"{table.name}.{column.name}"] = (low, high)
    return found


@pytest.mark.both_warehouses
def test_a_run_under_another_tz_does_not_take_over_live_leases(workspace: Workspace) -> None:
    # Both runs name the two slow policies; the second also one of its own, so that each run
    # stores an execution.
    names, own = CATALOG_POLICIES[:2], CATALOG_POLICIES[2]
    sim = workspace.simulator
    sim.configure(ignore_idempotency_keys=True, never_ready_policies=names)
    first_config, second_config = workspace.root / "first.yaml", workspace.root / "second.yaml"
    for config, chosen in ((first_config, names), (second_config, [*names, own])):
        run_config = {"ops": {"policy_workflow": {"config": {"policies": chosen}}}}
        config.write_text(yaml.safe_dump(run_config))
    # The instance's storage exists before two CLI processes use it at once.
    home = subprocess_env(workspace)["DAGSTER_HOME"]
    DagsterInstance.from_config(home).dispose()
    began = _utc_now()

    def polled() -> bool:
        per_policy = sim.counts()["per_policy"]
        return all(per_policy.get(n, {}).get("status_requests", 0) >= 1 for n in names)

    def owners() -> set[str]:
        """Who holds the slow policies' leases."""
        rows = workspace.query(
            'SELECT DISTINCT "lease_owner" FROM policy_execution_locks '
            'WHERE "lease_owner" IS NOT NULL AND "policy_name" IN (?, ?)',
            names,
        )
        return {str(owner) for (owner,) in rows}

    first = _job(workspace, str(first_config), "America/Los_Angeles")
    second: subprocess.Popen[str] | None = None
    try:
        # The first run (8 h behind UTC) holds both leases and polls.
        _wait_for("the first run to poll both policies", polled)
        holders = owners()
        assert len(holders) == 1, holders
        second = _job(workspace, str(second_config), "UTC")
        # The second run gives up on the held policies after its lease wait; a run that took
        # the leases over shows as a new owner.
        running = second

        def second_settled() -> bool:
            return running.poll() is not None or bool(owners() - holders)

        _wait_for("the second run to give up or take over", second_settled)
        sim.configure(never_ready_policies=[])
        first_output, _ = first.communicate(timeout=TIMEOUT_SECONDS)
        second_output, _ = second.communicate(timeout=TIMEOUT_SECONDS)
    finally:
        for process in (first, second):
            if process is not None and process.poll() is None:
                process.kill()
                process.communicate()
    ended = _utc_now()

    assert first.returncode == 0, first_output[-3000:]
    per_policy = sim.counts()["per_policy"]
    for name in names:
        counts = per_policy[name]
        assert counts["create_requests"] == 1, (name, counts, second_output[-3000:])
        assert counts["circuit_requests"] == 1, (name, counts, second_output[-3000:])
        [row] = workspace.executions(name)
        assert row["status"] == "completed" and row["circuit_breaker_completed"], row
    # The second run saw the live leases: it worked on neither policy, only on its own.
    assert second.returncode != 0, second_output[-3000:]
    assert "being processed by" in second_output, second_output[-3000:]
    assert per_policy[own]["create_requests"] == 1 and per_policy[own]["circuit_requests"] == 1
    [row] = workspace.executions(own)
    assert row["status"] == "completed", row

    # Every time either run stored is UTC (a Los Angeles time would be 8 h early).
    stored = _stored_times(workspace)
    assert "policy_execution_state.start_time" in stored, stored
    for column, (low, high) in stored.items():
        assert began - TOLERANCE <= low and high <= ended + TOLERANCE, (column, low, high)
    with DagsterInstance.from_config(home) as instance:
        run_ids = {run.run_id for run in instance.get_runs()}
    rows = workspace.query(
        'SELECT "dagster_run_id", MIN("event_time"), MAX("event_time") '
        'FROM policy_execution_events GROUP BY "dagster_run_id"'
    )
    by_run = {str(run_id): (low, high) for run_id, low, high in rows if run_id is not None}
    assert set(by_run) == run_ids, (by_run, run_ids)  # both runs wrote events
    for run_id, (low, high) in by_run.items():
        assert began - TOLERANCE <= low and high <= ended + TOLERANCE, (run_id, low, high)
    starts = workspace.query(
        'SELECT "dagster_run_id", MIN("start_time"), MAX("start_time") '
        'FROM policy_execution_state GROUP BY "dagster_run_id"'
    )
    assert {str(run_id) for run_id, _low, _high in starts} == run_ids, starts
    for run_id, low, high in starts:
        assert began - TOLERANCE <= low and high <= ended + TOLERANCE, (run_id, low, high)


@pytest.mark.both_warehouses
def test_diagnose_under_another_tz_does_not_call_a_new_execution_stuck(
    workspace: Workspace,
) -> None:
    name = CATALOG_POLICIES[0]
    # An execution in flight, started just now by a process on UTC.
    with process_tz("UTC"), open_state(Settings.from_env()) as state:
        state.store().start_executions([load_catalog(workspace.catalog_dir)[name].policy])
    [row] = workspace.executions(name)
    assert row["status"] == "pending"

    result = subprocess.run(
        [sys.executable, "-m", "policy_pipeline.cli", "diagnose", "--json"],
        cwd=PROJECT_ROOT,
        env=subprocess_env(workspace, TZ="Asia/Kolkata"),  # 5 h 30 min ahead of UTC
        capture_output=True,
        text=True,
        timeout=TIMEOUT_SECONDS,
    )
    report = json.loads(result.stdout)
    assert report["warehouse"]["ok"], report
    assert report["stuck_executions"] == [], report["stuck_executions"]
    assert not any("stuck" in item for item in report["attention"]), report["attention"]
    assert result.returncode == 0, (result.stdout[-3000:], result.stderr[-3000:])


def _tick(workspace: Workspace, instance: DagsterInstance) -> list[RunRequest]:
    """One tick of ``policy_progress_sensor``, as the daemon evaluates it."""
    defs = workspace.definitions()
    sensor = defs.resolve_sensor_def("policy_progress_sensor")
    resources = {name: defs.resources[name] for name in ("policy_state", "policy_api")}
    with build_sensor_context(instance=instance, resources=resources) as context:
        result = sensor(context)
    assert isinstance(result, SensorResult | SkipReason)
    return list(result.run_requests or []) if isinstance(result, SensorResult) else []


def _launch(workspace: Workspace, instance: DagsterInstance, request: RunRequest) -> bool:
    """The requested run, as the daemon would launch it; whether it succeeded."""
    job = workspace.definitions().resolve_job_def("policy_workflow_job")
    tags = dict(request.tags)
    if request.partition_key is not None:
        tags["dagster/partition"] = request.partition_key
    result = job.execute_in_process(
        instance=instance,
        tags=tags,
        asset_selection=list(request.asset_selection) if request.asset_selection else None,
        raise_on_error=False,
    )
    return bool(result.success)


@pytest.mark.both_warehouses
def test_progress_sensor_under_another_tz_resumes_a_crashed_utc_run(
    workspace: Workspace, monkeypatch: pytest.MonkeyPatch
) -> None:
    name = CATALOG_POLICIES[0]
    sim = workspace.simulator
    sim.configure(ignore_idempotency_keys=True)
    for variable, value in {
        "POLICY_WAIT_POLL_INTERVAL_SECONDS": "1",
        "POLICY_API_MAX_ATTEMPTS": "1",
        "POLICY_LEASE_TTL_SECONDS": str(LEASE_TTL_SECONDS),
    }.items():
        monkeypatch.setenv(variable, value)
    # A run on UTC crashes right after the policy is created: its lease lapses after the TTL.
    crashed = run_job(
        subprocess_env(
            workspace,
            TZ="UTC",
            POLICY_FAILPOINT="after_created",
            POLICY_LEASE_TTL_SECONDS=str(LEASE_TTL_SECONDS),
        ),
        "--tags",
        json.dumps({"dagster/partition": name}),
        timeout=TIMEOUT_SECONDS,
    )
    crashed_at = time.monotonic()
    assert crashed.returncode < 0, crashed.stdout[-3000:] + crashed.stderr[-3000:]
    [row] = workspace.executions(name)
    assert row["status"] == "policy_created", row

    # The daemon's instance is the crashed run's (it knows the run and the partition).
    with DagsterInstance.from_config(subprocess_env(workspace)["DAGSTER_HOME"]) as instance:
        # Ahead of UTC, with a backoff longer than the execution has been still: not yet due.
        monkeypatch.setenv("POLICY_RESUME_BACKOFF_SECONDS", "600")
        with process_tz("Asia/Kolkata"):
            assert _tick(workspace, instance) == []
        # Behind UTC, once the lease has lapsed and the backoff has passed: resumed.
        monkeypatch.setenv("POLICY_RESUME_BACKOFF_SECONDS", "1")
        time.sleep(max(0.0, crashed_at + LEASE_TTL_SECONDS + 1.5 - time.monotonic()))
        with process_tz("America/New_York"):
            [request] = _tick(workspace, instance)
            assert request.tags["policy_pipeline/trigger"] == "progress"
            assert _launch(workspace, instance, request)
    [row] = workspace.executions(name)
    assert row["status"] == "completed" and row["circuit_breaker_completed"], row
    counts = sim.counts()["per_policy"][name]
    assert counts["create_requests"] == 1 and counts["circuit_requests"] == 1, counts


# Where the store's SQL lives; the translator itself names DuckDB's clock to render SYSDATE().
_LOCAL_CLOCK = re.compile(r"(?i:CURRENT_TIMESTAMP|LOCALTIMESTAMP|CURRENT_TIME\b|GETDATE)|\bNOW\(\)")
_TRANSLATOR = PROJECT_ROOT / "policy_pipeline" / "core" / "store" / "dialect.py"


def test_no_statement_reads_a_local_clock() -> None:
    offences = []
    for path in sorted((PROJECT_ROOT / "policy_pipeline").rglob("*.py")):
        if path == _TRANSLATOR:
            continue
        with path.open() as source:
            for token in tokenize.generate_tokens(source.readline):
                if token.type == tokenize.STRING and _LOCAL_CLOCK.search(token.string):
                    offences.append(f"{path.relative_to(PROJECT_ROOT)}:{token.start[0]}")
    assert not offences, f"use SYSDATE() (UTC), not the session's local time: {offences}"


def test_sysdate_is_utc_on_duckdb_under_any_tz() -> None:
    duckdb = pytest.importorskip("duckdb")
    sql = (
        "SELECT SYSDATE(), DATEADD(second, ?, SYSDATE()), "
        "DATEADD(minute, -1, SYSDATE()) < SYSDATE(), DATEDIFF(second, SYSDATE(), "
        "DATEADD(second, 90, SYSDATE()))"
    )
    with process_tz("America/Los_Angeles"):
        connection = duckdb.connect()
        try:
            [(now, later, earlier_is_less, seconds)] = connection.execute(
                render(sql, SqlDialect.DUCKDB), [30]
            ).fetchall()
        finally:
            connection.close()
    assert abs(now - _utc_now()) < TOLERANCE, now
    assert later - now == timedelta(seconds=30)
    assert earlier_is_less is True and seconds == 90
