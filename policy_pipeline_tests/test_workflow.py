"""The workflow end to end: the real job, the real Definitions, the simulator over HTTP and a
DuckDB file. Assertions come from the simulator's counters and the state table."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from dagster import AssetKey, AssetPartitionStatus, DagsterInstance

from policy_pipeline.core.settings import PROJECT_ROOT
from policy_pipeline.defs.workflow.partitions import POLICY_PARTITIONS
from policy_pipeline_tests.conftest import (
    CATALOG_POLICIES,
    Workspace,
    run_cli,
    run_job,
    subprocess_env,
)

WORKFLOW_ASSETS = ["policy_created", "policy_ready", "circuit_breaker_activation"]


def _metadata(workspace: Workspace, asset: str, partition: str) -> dict[str, object]:
    event = workspace.instance.get_latest_materialization_event(AssetKey(asset))
    records = workspace.instance.fetch_materializations(AssetKey(asset), limit=100).records
    for record in records:
        materialization = record.asset_materialization
        if materialization is not None and materialization.partition == partition:
            return {k: v.value for k, v in materialization.metadata.items()}
    raise AssertionError(f"no materialization of {asset}[{partition}] (latest: {event})")


@pytest.mark.both_warehouses
def test_every_catalog_policy_completes(workspace: Workspace) -> None:
    result = workspace.run()
    assert result.success
    counts = workspace.simulator.counts()
    assert counts["policies_created"] == len(CATALOG_POLICIES)
    assert counts["circuits_triggered"] == len(CATALOG_POLICIES)
    for name in CATALOG_POLICIES:
        [execution] = workspace.executions(name)
        assert execution["status"] == "completed"
        assert execution["completed"] is True
        assert execution["circuit_breaker_completed"] is True
        assert execution["policy_id"].startswith("pol_")
        assert execution["poll_count"] == 2  # ready_after_polls=1: one pending, one ready
        assert counts["per_policy"][name]["create_requests"] == 1
        assert counts["per_policy"][name]["circuit_requests"] == 1
        metadata = _metadata(workspace, "circuit_breaker_activation", name)
        assert metadata["execution_id"] == execution["execution_id"]
        assert metadata["policy_id"] == execution["policy_id"]
        assert metadata["status"] == "completed"
        ready = _metadata(workspace, "policy_ready", name)
        assert ready["poll_count"] == 2
        assert isinstance(ready["api_latency_ms"], float) and ready["api_latency_ms"] > 0

    # The audit trail: every transition in order, and every API attempt.
    transitions = workspace.query(
        'SELECT "to_status" FROM policy_execution_events WHERE "event_type" = \'transition\' '
        'AND "policy_name" = ? ORDER BY "event_time", "to_status"',
        [CATALOG_POLICIES[0]],
    )
    statuses = [t[0] for t in transitions]
    assert statuses[0] == "pending"
    assert statuses.index("policy_created") < statuses.index("policy_ready")
    assert statuses[-1] == "completed"
    api_calls = workspace.query(
        'SELECT "endpoint", COUNT(*) FROM policy_execution_events '
        'WHERE "event_type" = \'api_call\' GROUP BY "endpoint" ORDER BY "endpoint"'
    )
    assert dict(api_calls) == {
        "circuit": len(CATALOG_POLICIES),
        "createpolicy": len(CATALOG_POLICIES),
        "policy_status": 2 * len(CATALOG_POLICIES),
    }


def test_completed_content_is_not_created_again_unless_forced(workspace: Workspace) -> None:
    name = CATALOG_POLICIES[0]
    assert workspace.run([name]).success
    assert workspace.run([name]).success  # same content: nothing to do
    assert [e["status"] for e in workspace.executions(name)] == ["completed"]
    assert workspace.simulator.counts()["per_policy"][name]["create_requests"] == 1
    assert _metadata(workspace, "policy_created", name)["resumed"] is True

    force = {"ops": {"policy_workflow": {"config": {"force_new_execution": True}}}}
    assert workspace.run([name], run_config=force).success
    executions = workspace.executions(name)
    assert [e["status"] for e in executions] == ["completed", "completed"]
    assert executions[0]["policy_id"] != executions[1]["policy_id"]
    assert workspace.simulator.counts()["per_policy"][name]["circuits_triggered"] == 2

    # A changed policy file is new content: a new execution without forcing.
    path = workspace.catalog_dir / f"{name}.yaml"
    path.write_text(path.read_text().replace("90 days", "120 days"), encoding="utf-8")
    assert workspace.run([name]).success
    assert len(workspace.executions(name)) == 3


@pytest.mark.both_warehouses
def test_failed_policy_stops_before_the_circuit_breaker(workspace: Workspace) -> None:
    failing, *others = CATALOG_POLICIES
    workspace.simulator.configure(fail_policies=[failing])
    result = workspace.run()
    assert not result.success
    [execution] = workspace.executions(failing)
    assert execution["status"] == "error"
    assert "reported status 'failed'" in execution["error_message"]
    assert execution["circuit_breaker_initiated"] is False
    counts = workspace.simulator.counts()
    assert counts["per_policy"][failing]["circuit_requests"] == 0
    # One policy's failure strands no other: the healthy ones complete in the same run.
    for name in others:
        [healthy] = workspace.executions(name)
        assert healthy["status"] == "completed"
        assert counts["per_policy"][name]["circuits_triggered"] == 1
    failure = next(e for e in result.all_events if e.event_type_value == "STEP_FAILURE")
    assert f"1 of {len(CATALOG_POLICIES)} policies failed" in (failure.message or "") + str(
        failure.event_specific_data
    )
    # Dagster records each policy's truth: the failed one is materialized only for step 1.
    for asset in WORKFLOW_ASSETS:
        materialized = workspace.instance.get_materialized_partitions(AssetKey(asset))
        expected = set(CATALOG_POLICIES) if asset == "policy_created" else set(others)
        assert materialized == expected, asset


@pytest.mark.both_warehouses
def test_transient_5xx_and_429_are_retried(workspace: Workspace) -> None:
    name = CATALOG_POLICIES[1]
    workspace.simulator.configure(
        retry_after_seconds=0.05,
        scripted_faults=[
            {"endpoint": "createpolicy", "fault": "5xx", "times": 2},
            {"endpoint": "policy_status", "fault": "429", "times": 1},
            {"endpoint": "circuit", "fault": "5xx", "times": 1, "after_effect": True},
        ],
    )
    assert workspace.run([name]).success
    [execution] = workspace.executions(name)
    assert execution["status"] == "completed"
    counts = workspace.simulator.counts()
    assert counts["per_policy"][name]["policies_created"] == 1
    # The circuit call that failed after its effect was retried with the same key: one trigger.
    assert counts["per_policy"][name]["circuits_triggered"] == 1
    assert counts["replays"]["circuit"] == 1
    attempts = workspace.query(
        'SELECT "endpoint", "attempt", "http_status", "outcome" FROM policy_execution_events '
        'WHERE "event_type" = \'api_call\' AND "endpoint" = \'createpolicy\' ORDER BY "attempt"'
    )
    assert [(a[1], a[3]) for a in attempts] == [(1, "retry"), (2, "retry"), (3, "ok")]
    assert attempts[0][2] >= 500


@pytest.mark.both_warehouses
def test_non_json_create_response_is_recorded_and_resumed(workspace: Workspace) -> None:
    name = CATALOG_POLICIES[0]
    workspace.simulator.configure(
        scripted_faults=[{"endpoint": "createpolicy", "fault": "non_json", "status": 200}]
    )
    result = workspace.run([name])
    assert not result.success
    [execution] = workspace.executions(name)
    assert execution["status"] == "error"
    assert "field 'policy_id'" in execution["error_message"]
    assert "POST /createpolicy" in execution["error_message"]
    assert "not JSON" in execution["error_message"]
    assert execution["resumable"] is True
    [[raw]] = workspace.query(
        "SELECT JSON_EXTRACT_PATH_TEXT(\"api_response\", 'raw_text') "
        'FROM policy_execution_state WHERE "policy_name" = ?',
        [name],
    )
    assert "<html" in raw.lower()
    # The next run re-sends the same idempotency key and finishes the same execution.
    assert workspace.run([name]).success
    [resumed] = workspace.executions(name)
    assert resumed["execution_id"] == execution["execution_id"]
    assert resumed["status"] == "completed"


def test_empty_and_non_json_status_bodies_keep_polling(workspace: Workspace) -> None:
    name = CATALOG_POLICIES[2]
    workspace.simulator.configure(
        scripted_faults=[
            {"endpoint": "policy_status", "fault": "empty", "times": 1},
            {"endpoint": "policy_status", "fault": "non_json", "status": 200, "times": 1},
        ]
    )
    assert workspace.run([name]).success
    [execution] = workspace.executions(name)
    assert execution["status"] == "completed"
    assert execution["poll_count"] == 4
    warnings = workspace.query(
        'SELECT "message" FROM policy_execution_events WHERE "event_type" = \'warning\''
    )
    assert len(warnings) == 2
    assert all("no 'status' field" in w[0] for w in warnings)


@pytest.mark.both_warehouses
def test_polls_exhausted_then_resumed_with_the_same_policy(workspace: Workspace) -> None:
    name = CATALOG_POLICIES[0]
    workspace.simulator.configure(never_ready_policies=[name])
    polling = {"ops": {"policy_workflow": {"config": {"max_polls": 3, "backoff_multiplier": 1.0}}}}
    result = workspace.run([name], run_config=polling)
    assert not result.success
    [execution] = workspace.executions(name)
    assert execution["status"] == "error"
    assert execution["poll_count"] == 3
    assert "not ready after 3 polls" in execution["error_message"]
    assert execution["resumable"] is True
    assert workspace.simulator.counts()["requests"]["circuit"] == 0

    workspace.simulator.configure(never_ready_policies=[])
    assert workspace.run([name], run_config=polling).success
    [resumed] = workspace.executions(name)
    assert resumed["execution_id"] == execution["execution_id"]
    assert resumed["policy_id"] == execution["policy_id"]
    assert resumed["status"] == "completed"
    assert workspace.simulator.counts()["per_policy"][name]["create_requests"] == 1


@pytest.mark.both_warehouses
def test_active_execution_is_resumed_without_a_second_create(workspace: Workspace) -> None:
    name = CATALOG_POLICIES[1]
    assert workspace.run([name], selection=["policy_created"]).success
    [created] = workspace.executions(name)
    assert created["status"] == "policy_created"
    # Step 1 again, then the whole job: the same execution goes on; one create in all.
    assert workspace.run([name], selection=["policy_created"]).success
    assert workspace.run([name]).success
    [execution] = workspace.executions(name)
    assert execution["execution_id"] == created["execution_id"]
    assert execution["status"] == "completed"
    counts = workspace.simulator.counts()["per_policy"][name]
    assert counts["create_requests"] == 1
    assert counts["circuits_triggered"] == 1
    assert _metadata(workspace, "policy_created", name)["resumed"] is True


def test_circuit_breaker_refuses_a_policy_that_is_not_ready(workspace: Workspace) -> None:
    name = CATALOG_POLICIES[2]
    assert workspace.run([name], selection=["policy_created"]).success
    result = workspace.run([name], selection=["circuit_breaker_activation"])
    assert not result.success
    assert workspace.simulator.counts()["requests"]["circuit"] == 0
    assert workspace.executions(name)[0]["status"] == "policy_created"


def test_circuit_breaker_failure_keeps_steps_one_and_two(
    workspace: Workspace, monkeypatch: pytest.MonkeyPatch
) -> None:
    name = CATALOG_POLICIES[0]
    monkeypatch.setenv("POLICY_API_MAX_ATTEMPTS", "2")
    workspace.simulator.configure(
        scripted_faults=[{"endpoint": "circuit", "fault": "5xx", "times": 2}]
    )
    result = workspace.run([name])
    assert not result.success
    [execution] = workspace.executions(name)
    assert execution["status"] == "error"
    assert execution["policy_id"] is not None
    assert execution["circuit_breaker_initiated"] is True
    assert execution["circuit_breaker_completed"] is False
    ready_time = workspace.query(
        'SELECT "policy_ready_time" IS NOT NULL, "error_step" FROM policy_execution_state'
    )
    assert ready_time == [(True, "circuit_breaker_activation")]
    # Re-run: the circuit call is retried with its key; the policy is not created again.
    assert workspace.run([name]).success
    [done] = workspace.executions(name)
    assert done["status"] == "completed"
    counts = workspace.simulator.counts()["per_policy"][name]
    assert counts["policies_created"] == 1
    assert counts["circuits_triggered"] == 1


def test_each_policy_moves_on_its_own_in_one_cli_run(workspace: Workspace) -> None:
    """Four policies in one `dagster job execute` run: two ordinary, one the API reports
    failed, one ready only after ~30 s. Nobody waits for anybody: each circuit breaker fires
    within seconds of its own policy's readiness, and Dagster records each policy's truth."""
    slow, failing = "slow_readiness", CATALOG_POLICIES[1]
    ordinary = [CATALOG_POLICIES[0], CATALOG_POLICIES[2]]
    (workspace.catalog_dir / f"{slow}.yaml").write_text(
        f"policy_name: {slow}\npolicy_type: access\ndescription: Takes its time.\npriority: low\n",
        encoding="utf-8",
    )
    names = sorted([*CATALOG_POLICIES, slow])
    workspace.simulator.configure(
        fail_policies=[failing], ready_after_seconds_by_policy={slow: 30.0}
    )
    env = subprocess_env(
        workspace, POLICY_POLL_MAX_POLLS="1000", POLICY_POLL_DEADLINE_SECONDS="120"
    )
    register = run_cli(workspace, "register-partitions", env=env, timeout=300)
    assert register.returncode == 0, register.stderr[-2000:]
    tags = {
        "dagster/asset_partition_range_start": names[0],
        "dagster/asset_partition_range_end": names[-1],
    }
    run = run_job(env, "--tags", json.dumps(tags))
    assert run.returncode != 0  # a run with a failed policy ends failed ...
    assert f"1 of {len(names)} policies failed" in run.stdout + run.stderr  # ... naming it
    assert f"- {failing}: " in run.stdout + run.stderr

    counts = workspace.simulator.counts()["per_policy"]
    policies = {p["policy_name"]: p for p in workspace.simulator.policies().values()}
    for name in [*ordinary, slow]:
        [execution] = workspace.executions(name)
        assert execution["status"] == "completed", execution
        assert counts[name]["circuit_requests"] == 1, counts[name]
        delay = policies[name]["circuit_at"] - policies[name]["ready_at"]
        assert 0 <= delay < 3.0, (name, delay)  # within seconds of its own readiness
    for name in ordinary:  # finished long before the slow one was even ready
        assert policies[name]["circuit_at"] < policies[slow]["ready_at"] - 20
    [failed] = workspace.executions(failing)
    assert failed["status"] == "error" and "reported status 'failed'" in failed["error_message"]
    assert counts[failing]["circuit_requests"] == 0

    # The instance (not the log): each asset materialized for exactly the policies that got there.
    instance = DagsterInstance.from_config(env["DAGSTER_HOME"])
    reached = {
        "policy_created": set(names),
        "policy_ready": {*ordinary, slow},
        "circuit_breaker_activation": {*ordinary, slow},
    }
    for asset, expected in reached.items():
        assert instance.get_materialized_partitions(AssetKey(asset)) == expected, asset
        status = instance.get_status_by_partition(AssetKey(asset), names, POLICY_PARTITIONS)
        assert status is not None
        failed = {name for name, value in status.items() if value == AssetPartitionStatus.FAILED}
        assert failed == set(names) - expected, asset  # the partition view shows it failed
    instance.dispose()


def test_one_asset_alone_for_policies_already_ready(workspace: Workspace) -> None:
    """Only `circuit_breaker_activation`, from the CLI, for a policy already ready: just that
    step runs, and only that asset is materialized by the run."""
    name = CATALOG_POLICIES[0]
    assert workspace.run([name], selection=["policy_created", "policy_ready"]).success
    assert workspace.executions(name)[0]["status"] == "policy_ready"
    env = subprocess_env(workspace)
    register = [sys.executable, "-m", "policy_pipeline.cli", "register-partitions"]
    subprocess.run(register, cwd=PROJECT_ROOT, env=env, check=True, capture_output=True)
    command = [
        *(sys.executable, "-m", "dagster", "asset", "materialize"),
        *("-m", "policy_pipeline.definitions"),
        *("--select", "circuit_breaker_activation", "--partition", name),
    ]
    result = subprocess.run(
        command, cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    [execution] = workspace.executions(name)
    assert execution["status"] == "completed"
    counts = workspace.simulator.counts()["per_policy"][name]
    assert counts["create_requests"] == 1 and counts["status_requests"] == 2
    assert counts["circuits_triggered"] == 1
    instance = DagsterInstance.from_config(env["DAGSTER_HOME"])
    materialized = {
        asset: instance.get_materialized_partitions(AssetKey(asset)) for asset in WORKFLOW_ASSETS
    }
    assert materialized == {
        "policy_created": set(),
        "policy_ready": set(),
        "circuit_breaker_activation": {name},
    }
    instance.dispose()


def test_an_automatic_retry_resumes_but_never_recreates_a_failed_policy(
    workspace: Workspace,
) -> None:
    """Dagster's run retries re-run the whole step: a policy the API failed is not created
    again by them (a person's re-run does create it anew)."""
    failing, healthy = CATALOG_POLICIES[0], CATALOG_POLICIES[1]
    workspace.simulator.configure(fail_policies=[failing])
    assert not workspace.run([failing, healthy]).success
    retry = workspace.run([failing, healthy], tags={"dagster/retry_number": "1"})
    assert not retry.success
    counts = workspace.simulator.counts()["per_policy"]
    assert counts[failing]["create_requests"] == 1
    assert counts[healthy]["create_requests"] == 1 and counts[healthy]["circuits_triggered"] == 1
    assert [e["status"] for e in workspace.executions(failing)] == ["error"]
    workspace.simulator.configure(fail_policies=[])
    assert workspace.run([failing]).success  # by hand: a new policy
    assert [e["status"] for e in workspace.executions(failing)] == ["error", "completed"]
