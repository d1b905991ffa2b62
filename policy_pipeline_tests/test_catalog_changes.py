"""Catalog changes never lose work: a policy file edited or deleted while its execution waits
for readiness outside any run (handed off).

The sensors are evaluated as the daemon evaluates them (their definitions, a sensor context on
the test's instance, the real resources), and the runs they request are executed as requested
(tags, partition, asset selection) on the same instance, against the simulator ignoring
``Idempotency-Key`` so that every create and every trigger it counts was really sent.

The design: an edit retires the old execution at once while it is not ready yet (it ends
``error``, not resumable, audited as ``retired``) and creates the new content in the same run;
an old execution already ``policy_ready`` is finished first (its circuit breaker), then the
new content is created. A deleted file: an execution already created goes on to its end from
what it stored; an intent whose create never succeeded is retired."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest
from dagster import (
    AddDynamicPartitionsRequest,
    AssetKey,
    ExecuteInProcessResult,
    SensorResult,
    SkipReason,
    build_sensor_context,
)

from policy_pipeline.core.catalog import load_catalog
from policy_pipeline.core.settings import Settings
from policy_pipeline.defs.workflow.partitions import PARTITIONS_NAME
from policy_pipeline.resources import open_state
from policy_pipeline_tests.conftest import (
    CATALOG_POLICIES,
    Workspace,
    launch_requested,
    requested_runs,
    run_cli,
)

CATALOG_SENSOR = "policy_catalog_sensor"
PROGRESS_SENSOR = "policy_progress_sensor"
SLOW = CATALOG_POLICIES[-1]  # the policy whose file changes

ENV = {
    "POLICY_WAIT_HANDOFF_SECONDS": "0.5",  # a run lets a wait go after half a second
    "POLICY_WAIT_POLL_INTERVAL_SECONDS": "1",  # the progress sensor polls it every second
    "POLICY_RESUME_BACKOFF_SECONDS": "0",
    "POLICY_API_MAX_ATTEMPTS": "1",
}


@pytest.fixture(autouse=True)
def _env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in ENV.items():
        monkeypatch.setenv(name, value)


def _tick(workspace: Workspace, name: str, cursor: str | None = None) -> SensorResult | SkipReason:
    defs = workspace.definitions()
    sensor = defs.resolve_sensor_def(name)
    wanted = ("policy_state", "policy_api") if name == PROGRESS_SENSOR else ("policy_state",)
    resources = {key: defs.resources[key] for key in wanted}
    with build_sensor_context(
        instance=workspace.instance, cursor=cursor, resources=resources
    ) as context:
        result = sensor(context)
    assert isinstance(result, SensorResult | SkipReason)
    if isinstance(result, SensorResult):
        # What the daemon does with the partitions a tick adds.
        for request in result.dynamic_partitions_requests or []:
            assert isinstance(request, AddDynamicPartitionsRequest)
            known = set(workspace.instance.get_dynamic_partitions(PARTITIONS_NAME))
            new = [key for key in request.partition_keys if key not in known]
            workspace.instance.add_dynamic_partitions(PARTITIONS_NAME, new)
    return result


def _run_log(workspace: Workspace, result: ExecuteInProcessResult) -> str:
    entries = workspace.instance.all_logs(result.run_id)
    return "\n".join(entry.user_message for entry in entries)


def _per_execution(workspace: Workspace) -> dict[str, dict[str, Any]]:
    """What the API holds, by the execution that created it."""
    return {p["execution_id"]: p for p in workspace.simulator.policies().values()}


def _counts(workspace: Workspace, name: str) -> dict[str, int]:
    return dict(workspace.simulator.counts()["per_policy"].get(name, {}))


def _events(workspace: Workspace, execution_id: str, event_type: str) -> list[tuple[Any, ...]]:
    return workspace.query(
        'SELECT "message", "from_status", "to_status", "detail" FROM policy_execution_events '
        'WHERE "execution_id" = ? AND "event_type" = ?',
        [execution_id, event_type],
    )


def _hand_off_slow_policy(workspace: Workspace) -> tuple[str, dict[str, Any]]:
    """The catalog sensor's first tick launches the catalog; the slow policy is handed off.
    Returns the sensor's cursor and the waiting execution."""
    workspace.simulator.configure(
        ignore_idempotency_keys=True, ready_after_seconds_by_policy={SLOW: 3600}
    )
    first = _tick(workspace, CATALOG_SENSOR)
    assert isinstance(first, SensorResult) and first.cursor
    [request] = requested_runs(first)
    assert launch_requested(workspace, request).success
    [waiting] = workspace.executions(SLOW)
    assert waiting["status"] == "policy_created", waiting
    [(handed_off,)] = workspace.query(
        'SELECT "handed_off" FROM policy_execution_state WHERE "execution_id" = ?',
        [waiting["execution_id"]],
    )
    assert handed_off
    return first.cursor, waiting


def _edit(workspace: Workspace) -> None:
    path = workspace.catalog_dir / f"{SLOW}.yaml"
    text = path.read_text()
    assert "description:" in text
    path.write_text(text.replace("description:", "description: (edited)", 1))


def test_edit_while_handed_off_retires_the_old_execution_and_creates_the_new_content(
    workspace: Workspace,
) -> None:
    cursor, old = _hand_off_slow_policy(workspace)
    _edit(workspace)
    # The API would call either content ready from now on: only the state decides.
    workspace.simulator.configure(ready_after_seconds_by_policy={})

    changed = _tick(workspace, CATALOG_SENSOR, cursor)
    [request] = requested_runs(changed)
    assert request.tags.get("dagster/partition") == SLOW
    result = launch_requested(workspace, request)
    assert result.success, _run_log(workspace, result)

    before, new = workspace.executions(SLOW)
    assert before["execution_id"] == old["execution_id"]
    # The old execution is retired, saying why and naming the one that carries the new content.
    assert before["status"] == "error" and not before["resumable"], before
    assert before["error_message"].startswith("superseded: the catalog content of policy")
    assert new["execution_id"] in before["error_message"]
    assert new["status"] == "completed", new
    # Exactly one create per content, one circuit breaker, for the new content only.
    counts = _counts(workspace, SLOW)
    assert counts["policies_created"] == 2 and counts["create_requests"] == 2, counts
    assert counts["circuits_triggered"] == 1 and counts["circuit_requests"] == 1, counts
    by_execution = _per_execution(workspace)
    assert by_execution[new["execution_id"]]["circuit_triggered"]
    assert not by_execution[old["execution_id"]]["circuit_triggered"]

    # The audit trail, the run log and `policy-pipeline status` say what happened to each.
    [(message, from_status, to_status, detail)] = _events(workspace, old["execution_id"], "retired")
    assert (from_status, to_status) == ("policy_created", "error")
    assert message == before["error_message"]
    detail = json.loads(detail) if isinstance(detail, str) else detail
    assert detail["reason"] == "superseded"
    assert detail["new_execution_id"] == new["execution_id"]
    log = _run_log(workspace, result)
    assert f"execution {old['execution_id']} superseded" in log, log
    status = run_cli(workspace, "status", "--policy", SLOW, "--json")
    assert status.returncode == 0, status.stderr
    shown = {row["execution_id"]: row for row in json.loads(status.stdout)}
    assert shown[old["execution_id"]]["status"] == "error"
    assert "superseded" in json.dumps(shown[old["execution_id"]])
    assert shown[new["execution_id"]]["status"] == "completed"

    # Nothing moves the retired execution again: the progress sensor neither polls nor
    # resumes it, and the catalog sensor asks for nothing more.
    time.sleep(1.1)
    assert not requested_runs(_tick(workspace, PROGRESS_SENSOR))
    assert not requested_runs(_tick(workspace, CATALOG_SENSOR, changed.cursor))  # type: ignore[union-attr]
    [after, _new] = workspace.executions(SLOW)
    assert after["poll_count"] == before["poll_count"] and after["status"] == "error"
    assert _counts(workspace, SLOW)["status_requests"] == counts["status_requests"]


def test_an_edit_whose_run_found_the_policy_held_is_launched_again(
    workspace: Workspace, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The run for an edit gives up on a policy another run holds past the lease wait: no
    execution of the new content exists. The catalog sensor launches it again (a new run key)
    once no catalog run is in flight, and the new content is created once."""
    monkeypatch.setenv("POLICY_LEASE_WAIT_SECONDS", "1")
    cursor, old = _hand_off_slow_policy(workspace)
    _edit(workspace)
    workspace.simulator.configure(ready_after_seconds_by_policy={})
    with open_state(Settings.from_env()) as state:
        store = state.store()
        assert store.acquire_leases([SLOW], "run:another", 600) == {SLOW}
        changed = _tick(workspace, CATALOG_SENSOR, cursor)
        [request] = requested_runs(changed)
        assert not launch_requested(workspace, request).success  # held: it gave up
        assert [e["execution_id"] for e in workspace.executions(SLOW)] == [old["execution_id"]]
        store.release_leases([SLOW], "run:another")
    assert isinstance(changed, SensorResult) and changed.cursor
    again = _tick(workspace, CATALOG_SENSOR, changed.cursor)
    [retry] = requested_runs(again)
    assert retry.run_key != request.run_key
    assert launch_requested(workspace, retry).success
    before, new = workspace.executions(SLOW)
    assert before["status"] == "error" and before["error_message"].startswith("superseded")
    assert new["status"] == "completed", new
    counts = _counts(workspace, SLOW)
    assert counts["create_requests"] == 2 and counts["circuit_requests"] == 1, counts
    # Executed now: nothing more is launched for it.
    assert isinstance(again, SensorResult) and again.cursor
    assert not requested_runs(_tick(workspace, CATALOG_SENSOR, again.cursor))


def test_edit_after_the_old_execution_turned_ready_finishes_it_first(
    workspace: Workspace,
) -> None:
    cursor, old = _hand_off_slow_policy(workspace)
    # The progress sensor finds it ready and requests its circuit-breaker run...
    workspace.simulator.configure(ready_after_seconds_by_policy={})
    time.sleep(1.1)
    ready_tick = _tick(workspace, PROGRESS_SENSOR)
    [circuit_request] = requested_runs(ready_tick)
    assert list(circuit_request.asset_selection or []) == [AssetKey("circuit_breaker_activation")]
    assert workspace.executions(SLOW)[0]["status"] == "policy_ready"
    # ... and the file is edited before that run starts.
    _edit(workspace)
    [request] = requested_runs(_tick(workspace, CATALOG_SENSOR, cursor))
    result = launch_requested(workspace, request)
    assert result.success, _run_log(workspace, result)

    before, new = workspace.executions(SLOW)
    assert before["execution_id"] == old["execution_id"]
    assert before["status"] == "completed" and before["circuit_breaker_completed"], before
    assert new["status"] == "completed", new
    log = _run_log(workspace, result)
    assert "finishing it (its circuit breaker) first" in log, log
    # The circuit-breaker run requested before the edit finds nothing left to do.
    assert launch_requested(workspace, circuit_request).success
    counts = _counts(workspace, SLOW)
    assert counts["policies_created"] == 2, counts
    # One circuit breaker per execution, none twice.
    assert counts["circuits_triggered"] == 2 and counts["duplicate_circuit_triggers"] == 0
    by_execution = _per_execution(workspace)
    assert by_execution[old["execution_id"]]["circuit_triggered"]
    assert by_execution[new["execution_id"]]["circuit_triggered"]
    assert _events(workspace, old["execution_id"], "warning")


@pytest.mark.both_warehouses
def test_deleted_file_of_a_handed_off_policy_still_completes(workspace: Workspace) -> None:
    _cursor, old = _hand_off_slow_policy(workspace)
    (workspace.catalog_dir / f"{SLOW}.yaml").unlink()
    workspace.simulator.configure(ready_after_seconds_by_policy={})
    time.sleep(1.1)

    # The sensor polls it (no catalog needed), finds it ready and requests the circuit run.
    [request] = requested_runs(_tick(workspace, PROGRESS_SENSOR))
    assert request.run_key == f"circuit:{old['execution_id']}"
    result = launch_requested(workspace, request)
    assert result.success, _run_log(workspace, result)

    [done] = workspace.executions(SLOW)
    assert done["execution_id"] == old["execution_id"]
    assert done["status"] == "completed" and done["circuit_breaker_completed"], done
    counts = _counts(workspace, SLOW)
    assert counts["policies_created"] == 1 and counts["circuits_triggered"] == 1, counts
    # Nothing left for anyone, and nothing was created for the deleted file.
    assert not requested_runs(_tick(workspace, PROGRESS_SENSOR))


@pytest.mark.both_warehouses
def test_deleted_file_of_a_policy_never_created_retires_its_intent(
    workspace: Workspace,
) -> None:
    # A run committed the intent and died before its create was sent: a pending execution
    # that no lease holds, with no policy.
    workspace.simulator.configure(ignore_idempotency_keys=True)
    definition = load_catalog(workspace.catalog_dir)[SLOW].policy
    with open_state(Settings.from_env()) as state:
        state.store().start_executions([definition])
    [failed] = workspace.executions(SLOW)
    assert failed["status"] == "pending" and failed["policy_id"] is None
    (workspace.catalog_dir / f"{SLOW}.yaml").unlink()

    # The progress sensor retires it (under the policy's lease) instead of leaving it for ever.
    assert not requested_runs(_tick(workspace, PROGRESS_SENSOR))
    [retired] = workspace.executions(SLOW)
    assert retired["status"] == "error" and not retired["resumable"], retired
    assert "catalog file of policy" in retired["error_message"]
    assert "was deleted before the policy was created" in retired["error_message"]
    [(_message, from_status, to_status, _detail)] = _events(
        workspace, failed["execution_id"], "retired"
    )
    assert (from_status, to_status) == ("pending", "error")
    assert not requested_runs(_tick(workspace, PROGRESS_SENSOR))

    # A run that would have to create it fails clearly, as before.
    run = workspace.run([SLOW])
    assert not run.success
    failure = next(e for e in run.all_events if e.event_type_value == "STEP_FAILURE")
    assert f"policy '{SLOW}' is not in the catalog" in str(failure.event_specific_data)
    assert _counts(workspace, SLOW).get("create_requests", 0) == 0
