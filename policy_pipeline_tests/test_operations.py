"""Checks, sensors, schedules, archiving and the operator CLI, against real DuckDB state
produced by the real workflow and the simulator."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
from dagster import (
    AssetCheckSeverity,
    DagsterRunStatus,
    Definitions,
    SensorResult,
    SkipReason,
    build_run_status_sensor_context,
    build_schedule_context,
    build_sensor_context,
)

from policy_pipeline_tests.conftest import CATALOG_POLICIES, Workspace, dagster_home, run_cli

VALID = """\
policy_name: {name}
policy_type: data_retention
description: {description}
priority: low
parameters: {{}}
"""


def _sql(workspace: Workspace, statement: str, params: list[Any] | None = None) -> None:
    workspace.query(statement, params)


def _check_results(
    workspace: Workspace, run_config: dict[str, Any] | None = None
) -> dict[str, Any]:
    defs = workspace.definitions()
    job = defs.resolve_job_def("policy_checks_job")
    result = job.execute_in_process(instance=workspace.instance, run_config=run_config)
    assert result.success
    evaluations = result.get_asset_check_evaluations()
    assert not result.get_asset_materialization_events()  # checks alone, no workflow or dbt
    return {e.check_name: e for e in evaluations}


@pytest.mark.both_warehouses
def test_checks_pass_on_healthy_state(workspace: Workspace) -> None:
    assert workspace.run().success
    checks = _check_results(workspace)
    assert set(checks) == {"no_stuck_executions", "success_rate_24h", "state_consistency"}
    assert all(c.passed for c in checks.values())
    rate = checks["success_rate_24h"].metadata
    assert rate["total"].value == len(CATALOG_POLICIES)
    assert rate["successful"].value == len(CATALOG_POLICIES)
    assert rate["success_rate_percent"].value == 100.0


def test_checks_on_an_empty_warehouse_pass_and_say_so(workspace: Workspace) -> None:
    checks = _check_results(workspace)
    assert checks["success_rate_24h"].passed
    assert "No finished executions" in (checks["success_rate_24h"].description or "")


@pytest.mark.both_warehouses
def test_stuck_and_failing_executions_fail_the_checks(workspace: Workspace) -> None:
    failing, *others = CATALOG_POLICIES
    workspace.simulator.configure(fail_policies=[failing])
    workspace.run([failing])  # one error
    workspace.run(others, selection=["policy_created"])  # the others still in flight
    _sql(
        workspace,
        'UPDATE policy_execution_state SET "start_time" = DATEADD(hour, -2, "start_time")',
    )
    checks = _check_results(workspace)
    stuck = checks["no_stuck_executions"]
    assert not stuck.passed
    assert stuck.metadata["stuck_count"].value == len(others)
    listed = {row["policy_name"] for row in stuck.metadata["stuck_executions"].value}
    assert listed == set(others)
    rate = checks["success_rate_24h"]
    assert not rate.passed and rate.severity == AssetCheckSeverity.ERROR  # 0 of 1 finished
    assert rate.metadata["failed"].value == 1

    # Between the bands: WARN. 1 failed of 20 = 95 % -> pass; 2 of 20 = 90 % -> WARN.
    _sql(workspace, "DELETE FROM policy_execution_state")
    for i in range(20):
        status = "error" if i < 2 else "completed"
        _sql(
            workspace,
            'INSERT INTO policy_execution_state ("execution_id", "policy_name", "status", '
            '"completed", "circuit_breaker_initiated", "circuit_breaker_completed", '
            '"requires_circuit_breaker", "policy_id", "start_time") '
            "SELECT ?, 'p', ?, ?, ?, ?, ?, 'pol', CURRENT_TIMESTAMP()",
            [f"e{i}", status, status == "completed", *(3 * [status == "completed"])],
        )
    rate = _check_results(workspace)["success_rate_24h"]
    assert not rate.passed and rate.severity == AssetCheckSeverity.WARN
    assert rate.metadata["success_rate_percent"].value == 90.0


@pytest.mark.both_warehouses
def test_state_consistency_reports_each_violation(workspace: Workspace) -> None:
    assert workspace.run().success
    a, b, c = CATALOG_POLICIES[:3]
    _sql(
        workspace,
        'UPDATE policy_execution_state SET "circuit_breaker_completed" = FALSE '
        'WHERE "policy_name" = ?',
        [a],
    )
    _sql(
        workspace,
        'UPDATE policy_execution_state SET "poll_count" = 500 WHERE "policy_name" = ?',
        [b],
    )
    _sql(
        workspace,
        'INSERT INTO policy_execution_state ("execution_id", "policy_name", "status", '
        "\"completed\", \"resumable\") SELECT 'x1', ?, 'policy_ready', FALSE, FALSE "
        "UNION ALL SELECT 'x2', ?, 'pending', FALSE, FALSE",
        [c, c],
    )
    check = _check_results(workspace)["state_consistency"]
    assert not check.passed
    found = {(v["violation"], v["policy_name"]) for v in check.metadata["violations"].value}
    assert ("completed_without_circuit_breaker", a) in found
    assert ("poll_count_over_maximum", b) in found
    assert ("missing_policy_id", c) in found  # policy_ready without a policy_id
    assert ("several_active_executions", c) in found


def test_checks_schedule_targets_the_checks_job_every_15_minutes(workspace: Workspace) -> None:
    defs = workspace.definitions()
    schedule = defs.resolve_schedule_def("policy_checks_every_15_minutes")
    assert schedule.cron_schedule == "*/15 * * * *"
    assert schedule.job_name == "policy_checks_job"
    archive = defs.resolve_schedule_def("policy_archive_daily")
    assert archive.job_name == "policy_archive_job"
    request = schedule.evaluate_tick(build_schedule_context(instance=workspace.instance))
    assert request.run_requests and len(request.run_requests) == 1


# --- sensors ------------------------------------------------------------------------------------


def _sensor_tick(
    workspace: Workspace, cursor: str | None, defs: Definitions | None = None
) -> SensorResult | SkipReason:
    defs = defs or workspace.definitions()
    sensor = defs.resolve_sensor_def("policy_catalog_sensor")
    with build_sensor_context(
        instance=workspace.instance,
        cursor=cursor,
        resources={"policy_state": defs.resources["policy_state"]},
    ) as context:
        result = sensor(context)
    assert isinstance(result, SensorResult | SkipReason)
    return result


@pytest.mark.both_warehouses
def test_catalog_sensor_launches_new_and_changed_content_once(workspace: Workspace) -> None:
    first = _sensor_tick(workspace, None)
    assert isinstance(first, SensorResult)
    [request] = first.run_requests or []
    assert request.tags["dagster/asset_partition_range_start"] == CATALOG_POLICIES[0]
    assert request.tags["dagster/asset_partition_range_end"] == CATALOG_POLICIES[-1]
    [added] = first.dynamic_partitions_requests or []
    assert sorted(added.partition_keys) == CATALOG_POLICIES
    workspace.instance.add_dynamic_partitions("policies", list(added.partition_keys))

    # Same content, same cursor: nothing.
    again = _sensor_tick(workspace, first.cursor)
    assert isinstance(again, SensorResult) and not again.run_requests

    # A new file and a changed one.
    (workspace.catalog_dir / "new_policy.yaml").write_text(
        VALID.format(name="new_policy", description="new"), encoding="utf-8"
    )
    changed = workspace.catalog_dir / f"{CATALOG_POLICIES[1]}.yaml"
    changed.write_text(changed.read_text().replace("Quarterly", "Monthly"), encoding="utf-8")
    tick = _sensor_tick(workspace, first.cursor)
    assert isinstance(tick, SensorResult)
    partitions = sorted(r.tags.get("dagster/partition", "") for r in tick.run_requests or [])
    assert partitions == sorted([CATALOG_POLICIES[1], "new_policy"])
    assert [list(r.partition_keys) for r in tick.dynamic_partitions_requests or []] == [
        ["new_policy"]
    ]
    run_keys = {r.run_key for r in tick.run_requests or []}
    assert len(run_keys) == 2

    # A lost cursor does not relaunch content the warehouse has already executed.
    assert workspace.run().success
    fresh = _sensor_tick(workspace, None)
    assert isinstance(fresh, SensorResult)
    launched = {r.tags.get("dagster/partition") for r in fresh.run_requests or []}
    assert CATALOG_POLICIES[0] not in launched


def test_catalog_sensor_skips_a_broken_catalog(workspace: Workspace) -> None:
    defs = workspace.definitions()  # loaded while the catalog was valid
    (workspace.catalog_dir / "broken.yaml").write_text("policy_name: [", encoding="utf-8")
    result = _sensor_tick(workspace, None, defs)
    assert isinstance(result, SkipReason)
    assert "broken.yaml" in (result.skip_message or "")


def test_catalog_sensor_tick_with_thousands_of_policies(workspace: Workspace) -> None:
    import time

    for i in range(2000):
        (workspace.catalog_dir / f"bulk-{i:05d}.yaml").write_text(
            VALID.format(name=f"bulk-{i:05d}", description=f"bulk {i}"), encoding="utf-8"
        )
    started = time.monotonic()
    result = _sensor_tick(workspace, None)
    elapsed = time.monotonic() - started
    assert isinstance(result, SensorResult)
    assert len(result.run_requests or []) == 1  # all new, contiguous: one run
    assert elapsed < 20, f"a tick over 2,003 policies took {elapsed:.1f}s"


class _Receiver(BaseHTTPRequestHandler):
    received: list[dict[str, Any]] = []

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        type(self).received.append(json.loads(body))
        self.send_response(204)
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def webhook() -> Iterator[tuple[str, list[dict[str, Any]]]]:
    _Receiver.received = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Receiver)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/alert", _Receiver.received
    server.shutdown()
    server.server_close()


def test_run_failure_sensor_records_and_posts_an_alert(
    workspace: Workspace, webhook: tuple[str, list[dict[str, Any]]], monkeypatch: pytest.MonkeyPatch
) -> None:
    url, received = webhook
    monkeypatch.setenv("POLICY_ALERT_WEBHOOK_URL", url)
    name = CATALOG_POLICIES[0]
    workspace.simulator.configure(fail_policies=[name])
    result = workspace.run([name])
    assert not result.success
    failure_event = next(e for e in result.all_events if e.event_type_value == "PIPELINE_FAILURE")
    defs = workspace.definitions()
    sensor = defs.resolve_sensor_def("policy_run_failure_alert")
    with build_run_status_sensor_context(
        sensor_name="policy_run_failure_alert",
        dagster_instance=workspace.instance,
        dagster_run=result.dagster_run,
        dagster_event=failure_event,
        resources={"policy_state": defs.resources["policy_state"]},
    ) as status_context:
        sensor(status_context.for_run_failure())
    assert result.dagster_run.status == DagsterRunStatus.FAILURE
    [alert] = received
    assert alert["policy"] == name
    assert alert["step"] == "policy_ready"
    assert "reported status 'failed'" in alert["error"]
    assert workspace.api_key not in json.dumps(alert)
    [[recorded]] = workspace.query(
        "SELECT COUNT(*) FROM policy_execution_events WHERE \"event_type\" = 'run_failure'"
    )
    assert recorded == 1


# --- archiving ------------------------------------------------------------------------------------


@pytest.mark.both_warehouses
def test_archive_moves_old_terminal_executions_and_keeps_in_progress(workspace: Workspace) -> None:
    done, stopped, *_ = CATALOG_POLICIES
    assert workspace.run([done]).success
    workspace.simulator.configure(never_ready_policies=[stopped])
    workspace.run([stopped], run_config={"ops": {"policy_workflow": {"config": {"max_polls": 1}}}})
    _sql(
        workspace,
        'UPDATE policy_execution_state SET "start_time" = DATEADD(day, -10, "start_time"), '
        '"completed_time" = DATEADD(day, -10, "completed_time"), '
        '"updated_time" = DATEADD(day, -10, "updated_time")',
    )
    events_before = workspace.query(
        'SELECT COUNT(*) FROM policy_execution_events WHERE "policy_name" = ?', [done]
    )[0][0]
    defs = workspace.definitions()
    result = defs.resolve_job_def("policy_archive_job").execute_in_process(
        instance=workspace.instance,
        run_config={"ops": {"archive_terminal_executions": {"config": {"batch_size": 1}}}},
    )
    assert result.success
    assert [e["status"] for e in workspace.executions(done)] == []
    assert [e["status"] for e in workspace.executions(stopped)] == ["error"]  # resumable: kept
    assert workspace.query('SELECT "policy_name", "status" FROM policy_execution_history') == [
        (done, "completed")
    ]
    assert workspace.query("SELECT COUNT(*) FROM policy_execution_events_history") == [
        (events_before,)
    ]
    runs = workspace.query(
        'SELECT "status", "executions_archived", "events_archived" FROM policy_archive_runs'
    )
    assert runs == [("succeeded", 1, events_before)]


# --- the operator CLI, as a subprocess ------------------------------------------------------------


@pytest.mark.both_warehouses
def test_cli_status_and_diagnose(workspace: Workspace) -> None:
    assert workspace.run().success
    table = run_cli(workspace, "status")
    assert table.returncode == 0, table.stderr
    assert all(name in table.stdout for name in CATALOG_POLICIES)
    as_json = run_cli(workspace, "status", "--json", "--policy", CATALOG_POLICIES[0])
    rows = json.loads(as_json.stdout)
    assert [r["policy_name"] for r in rows] == [CATALOG_POLICIES[0]]
    assert rows[0]["status"] == "completed"
    assert json.loads(run_cli(workspace, "status", "--json", "--status", "error").stdout) == []

    healthy = run_cli(workspace, "diagnose", "--json")
    assert healthy.returncode == 0, healthy.stdout + healthy.stderr
    report = json.loads(healthy.stdout)
    assert report["warehouse"]["ok"] and report["policy_api"]["ok"]
    assert report["success_rate_24h"]["rate_percent"] == 100.0
    assert len(report["last_api_calls"]) == 10

    workspace.simulator.configure(fail_policies=[CATALOG_POLICIES[0]])
    force = {"ops": {"policy_workflow": {"config": {"force_new_execution": True}}}}
    workspace.run([CATALOG_POLICIES[0]], run_config=force)  # a second execution, which fails
    unhealthy = run_cli(workspace, "diagnose")
    assert unhealthy.returncode == 1
    assert "1 failed executions" in unhealthy.stdout
    assert "reported status 'failed'" in unhealthy.stdout
    assert workspace.api_key not in unhealthy.stdout + unhealthy.stderr


def test_cli_diagnose_reports_an_unreachable_api(workspace: Workspace) -> None:
    workspace.env["POLICY_API_ENDPOINT"] = "http://127.0.0.1:9"
    result = run_cli(workspace, "diagnose")
    assert result.returncode == 1
    assert "Policy API: unreachable" in result.stdout


def test_cli_override_trigger_is_refused_before_ready_and_never_fires_twice(
    workspace: Workspace,
) -> None:
    name = CATALOG_POLICIES[0]
    assert workspace.run([name], selection=["policy_created"]).success
    refused = run_cli(workspace, "override", name, "--trigger-circuit-breaker", "--reason", "test")
    assert refused.returncode == 1 and "--force" in refused.stderr
    assert workspace.simulator.counts()["requests"]["circuit"] == 0

    workspace.simulator.configure(ready_after_polls=0)
    workspace.run([name], selection=["policy_ready"])  # ready as far as the API knows
    forced = run_cli(
        workspace, "override", name, "--trigger-circuit-breaker", "--reason", "ops ticket 42"
    )
    assert forced.returncode == 0, forced.stdout + forced.stderr
    [execution] = workspace.executions(name)
    assert execution["status"] == "completed"
    twice = run_cli(workspace, "override", name, "--trigger-circuit-breaker", "--reason", "again")
    assert twice.returncode == 1 and "never fires it twice" in twice.stderr
    assert workspace.simulator.counts()["per_policy"][name]["circuits_triggered"] == 1
    reasons = workspace.query(
        'SELECT "message" FROM policy_execution_events WHERE "event_type" = \'override\''
    )
    assert any("ops ticket 42" in r[0] for r in reasons)


def test_cli_override_force_and_skip(workspace: Workspace) -> None:
    forced_name, skipped_name = CATALOG_POLICIES[:2]
    for name in (forced_name, skipped_name):
        assert workspace.run([name], selection=["policy_created"]).success
    # The operator learnt out of band that the policy is ready (the API agrees when asked).
    [forced_execution] = workspace.executions(forced_name)
    httpx.get(
        f"{workspace.simulator.base_url}/policy/{forced_execution['policy_id']}",
        headers={"Authorization": f"Bearer {workspace.api_key}"},
    )
    httpx.get(
        f"{workspace.simulator.base_url}/policy/{forced_execution['policy_id']}",
        headers={"Authorization": f"Bearer {workspace.api_key}"},
    )
    forced = run_cli(
        workspace,
        "override",
        forced_name,
        "--trigger-circuit-breaker",
        "--force",
        "--reason",
        "API confirmed out of band",
    )
    assert forced.returncode == 0, forced.stdout + forced.stderr
    assert workspace.executions(forced_name)[0]["status"] == "completed"

    skipped = run_cli(
        workspace,
        "override",
        skipped_name,
        "--skip-circuit-breaker",
        "--force",
        "--reason",
        "not needed",
    )
    assert skipped.returncode == 0, skipped.stdout + skipped.stderr
    [execution] = workspace.executions(skipped_name)
    assert execution["status"] == "completed"
    assert execution["circuit_breaker_initiated"] is False
    assert workspace.simulator.counts()["per_policy"][skipped_name].get("circuit_requests", 0) == 0
    assert all(c.passed for c in _check_results(workspace).values())


def test_cli_retry_runs_the_workflow(workspace: Workspace, tmp_path: Path) -> None:
    name = CATALOG_POLICIES[2]
    workspace.simulator.configure(never_ready_policies=[name])
    workspace.env["POLICY_POLL_MAX_POLLS"] = "2"
    workspace.run([name], run_config={"ops": {"policy_workflow": {"config": {"max_polls": 2}}}})
    assert workspace.executions(name)[0]["status"] == "error"
    workspace.simulator.configure(never_ready_policies=[])
    # retry submits a run to the instance in DAGSTER_HOME; --wait follows it to its end.
    dagster_home(workspace)
    result = run_cli(workspace, "retry", name, "--reason", "API fixed", "--wait")
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "SUCCESS" in result.stdout and f"{name}: execution" in result.stdout
    [execution] = workspace.executions(name)
    assert execution["status"] == "completed"
    assert workspace.simulator.counts()["per_policy"][name]["policies_created"] == 1
    assert workspace.simulator.counts()["per_policy"][name]["circuit_requests"] == 1


# --- the seeds' monitoring queries, and the reporting models, on the resulting state ------------

SEED_RECENT = """SELECT
    "execution_id",
    "policy_id",
    "status",
    "poll_count",
    "circuit_breaker_completed",
    "message",
    "start_time"
FROM policy_execution_state
ORDER BY "start_time" DESC
LIMIT 10"""
SEED_ACTIVE = """SELECT COUNT(*) as active_executions
FROM policy_execution_state
WHERE "completed" = FALSE"""
SEED_STUCK = """SELECT "execution_id", "status", "start_time", "message"
FROM policy_execution_state
WHERE "completed" = FALSE
AND "start_time" < DATEADD(hour, -1, CURRENT_TIMESTAMP())"""
SEED_SUCCESS_RATE = """SELECT
    COUNT(*) as total_executions,
    SUM(CASE WHEN "status" = 'completed' THEN 1 ELSE 0 END) as successful,
    SUM(CASE WHEN "status" = 'error' THEN 1 ELSE 0 END) as failed,
    ROUND(100.0 * SUM(CASE WHEN "status" = 'completed' THEN 1 ELSE 0 END) / COUNT(*), 2) as success_rate_percent
FROM policy_execution_state
WHERE "start_time" >= DATEADD(hour, -24, CURRENT_TIMESTAMP())"""  # noqa: E501 (verbatim)


@pytest.mark.both_warehouses
@pytest.mark.live_snowflake
def test_seed_monitoring_queries_run_verbatim(workspace: Workspace) -> None:
    failing, *others = CATALOG_POLICIES
    workspace.simulator.configure(fail_policies=[failing])
    workspace.run()
    workspace.simulator.configure(fail_policies=[])
    assert workspace.run(others).success
    _sql(
        workspace,
        'UPDATE policy_execution_state SET "start_time" = DATEADD(hour, -2, "start_time") '
        'WHERE "policy_name" = ?',
        [failing],
    )
    # On Snowflake the seeds' text itself, through the real connector; DuckDB has no DATEADD,
    # so there the project's dialect layer translates the same text.
    run = _verbatim if workspace.warehouse == "snowflake" else workspace.query
    recent = run(SEED_RECENT)
    assert sorted(r[2] for r in recent) == sorted(["error", *["completed"] * len(others)])
    assert [int(r[0]) for r in run(SEED_ACTIVE)] == [1]  # the failed execution
    assert [r[1] for r in run(SEED_STUCK)] == ["error"]  # started 2 hours ago, not completed
    [(total, successful, failed, rate)] = run(SEED_SUCCESS_RATE)
    assert (int(total), int(successful), int(failed)) == (len(CATALOG_POLICIES), len(others), 1)
    assert float(rate) == round(100 * len(others) / len(CATALOG_POLICIES), 2)


def _verbatim(text: str) -> list[tuple[Any, ...]]:
    from policy_pipeline.core.settings import Settings
    from policy_pipeline.resources import open_state

    with (
        open_state(Settings.from_env()) as state,
        state.snowflake.get_connection() as conn,  # type: ignore[attr-defined]
    ):
        cursor = conn.cursor()
        cursor.execute(text)
        return [tuple(row) for row in cursor.fetchall()]


@pytest.mark.both_warehouses
def test_reporting_job_builds_the_results_view(workspace: Workspace) -> None:
    assert workspace.run().success
    defs = workspace.definitions()
    result = defs.resolve_job_def("policy_reporting_job").execute_in_process(
        instance=workspace.instance
    )
    assert result.success
    checks = {e.check_name: e.passed for e in result.get_asset_check_evaluations()}
    assert checks and all(checks.values())
    assert {"no_stuck_executions", "success_rate_24h", "state_consistency"} <= set(checks)
    rows = workspace.query(
        'SELECT "policy_name", "status", "polls_used", "seconds_to_completed" '
        'FROM policy_execution_results ORDER BY "policy_name"'
    )
    assert [(r[0], r[1], int(r[2])) for r in rows] == [
        (name, "completed", 2) for name in CATALOG_POLICIES
    ]
    assert all(float(r[3]) > 0 for r in rows)
    [(total, completed)] = workspace.query(
        'SELECT "total_executions", "completed_executions" FROM policy_execution_daily_stats'
    )
    assert (int(total), int(completed)) == (len(CATALOG_POLICIES), len(CATALOG_POLICIES))
