"""Nothing waits on a person: `policy_progress_sensor` resumes what nothing moves, polls the
policies runs handed off, and ends for good (with an alert) what has used up its budget.

The sensor is evaluated as Dagster evaluates it (its definition, a sensor context on the test's
instance, the real resources); the runs it requests are then executed as requested (tags,
partition, asset selection) on the same instance."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from dagster import (
    AssetKey,
    DagsterRunStatus,
    SensorResult,
    SkipReason,
    build_sensor_context,
)

from policy_pipeline.core.engine.progress import group_runs
from policy_pipeline.core.settings import ProgressSettings
from policy_pipeline_tests.conftest import (
    CATALOG_POLICIES,
    Workspace,
    launch_requested,
    requested_runs,
)

SENSOR = "policy_progress_sensor"

# Resume at once (no backoff) and look at the warehouse on every tick.
PROGRESS_ENV = {
    "POLICY_RESUME_BACKOFF_SECONDS": "0",
    "POLICY_WAIT_POLL_INTERVAL_SECONDS": "1",
    "POLICY_API_MAX_ATTEMPTS": "1",
}


@pytest.fixture(autouse=True)
def _progress_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in PROGRESS_ENV.items():
        monkeypatch.setenv(name, value)


def _tick(workspace: Workspace, cursor: str | None = None) -> SensorResult | SkipReason:
    defs = workspace.definitions()
    sensor = defs.resolve_sensor_def(SENSOR)
    resources = {name: defs.resources[name] for name in ("policy_state", "policy_api")}
    with build_sensor_context(
        instance=workspace.instance, cursor=cursor, resources=resources
    ) as context:
        result = sensor(context)
    assert isinstance(result, SensorResult | SkipReason)
    return result


def _circuit_calls(workspace: Workspace, name: str) -> int:
    return int(workspace.simulator.counts()["per_policy"][name]["circuits_triggered"])


@pytest.mark.both_warehouses
def test_sensor_resumes_a_resumable_error_and_a_stranded_ready_policy(
    workspace: Workspace, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Backoff: 2 s before the first resumption, 4 s before the second.
    monkeypatch.setenv("POLICY_RESUME_BACKOFF_SECONDS", "2")
    failing, ready_only = CATALOG_POLICIES[0], CATALOG_POLICIES[1]
    # The circuit-breaker call fails once (transient): the execution is a resumable error.
    workspace.simulator.configure(
        scripted_faults=[{"endpoint": "circuit", "fault": "5xx", "times": 1}]
    )
    assert not workspace.run([failing]).success
    [row] = workspace.executions(failing)
    assert row["status"] == "error" and row["resumable"]
    # A run that stopped at policy_ready: ready, lease released, circuit breaker never fired.
    assert workspace.run([ready_only], selection=["policy_created", "policy_ready"]).success
    assert workspace.executions(ready_only)[0]["status"] == "policy_ready"

    time.sleep(2.2)
    first = _tick(workspace)
    requests = requested_runs(first)
    # Neighbours with the same step left share one run (a range of partitions).
    [request] = requests
    assert request.tags["dagster/asset_partition_range_start"] == failing
    assert request.tags["dagster/asset_partition_range_end"] == ready_only
    for request in requests:
        # Only the circuit breaker is left for both.
        assert list(request.asset_selection or []) == [AssetKey("circuit_breaker_activation")]
        assert request.tags["policy_pipeline/trigger"] == "progress"
        assert request.run_key and request.run_key.startswith("resume:")
    # A second tick before the runs start claims nothing again (each resumption once; and
    # the next resumption of the same execution waits for its doubled backoff).
    assert not requested_runs(_tick(workspace))

    for request in requests:
        assert launch_requested(workspace, request).success
    for name in (failing, ready_only):
        [row] = workspace.executions(name)
        assert row["status"] == "completed", row
        assert _circuit_calls(workspace, name) == 1
    assert not requested_runs(_tick(workspace))  # nothing left to resume
    resumes = workspace.query(
        'SELECT "policy_name", "auto_resume_count" FROM policy_execution_state '
        'ORDER BY "policy_name"'
    )
    assert [(str(n), int(c)) for n, c in resumes] == [(failing, 1), (ready_only, 1)]


class _Webhook:
    """A local alert receiver: records every JSON body posted to it."""

    def __init__(self) -> None:
        self.received: list[dict[str, Any]] = []
        received = self.received

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", "0"))
                received.append(json.loads(self.rfile.read(length)))
                self.send_response(204)
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/alert"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def webhook(monkeypatch: pytest.MonkeyPatch) -> Iterator[_Webhook]:
    hook = _Webhook()
    monkeypatch.setenv("POLICY_ALERT_WEBHOOK_URL", hook.url)
    yield hook
    hook.close()


def test_resume_budget_ends_the_execution_for_good_and_alerts(
    workspace: Workspace, webhook: _Webhook, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("POLICY_RESUME_MAX_ATTEMPTS", "2")
    name = CATALOG_POLICIES[2]
    workspace.simulator.configure(
        scripted_faults=[{"endpoint": "circuit", "fault": "5xx", "times": 10}]
    )
    assert not workspace.run([name]).success
    for attempt in (1, 2):  # each automatic resumption fails the same way
        [request] = requested_runs(_tick(workspace))
        assert not launch_requested(workspace, request).success
        [row] = workspace.executions(name)
        assert row["status"] == "error" and row["resumable"], (attempt, row)

    final = _tick(workspace)
    assert not requested_runs(final)
    [row] = workspace.executions(name)
    assert row["status"] == "error" and not row["resumable"]
    assert "gave up after 2 automatic resumptions" in row["error_message"]
    assert [a["policy"] for a in webhook.received] == [name]
    assert "gave up" in webhook.received[0]["error"]
    [(_alert, execution_id)] = workspace.query(
        'SELECT "event_type", "execution_id" FROM policy_execution_events '
        "WHERE \"event_type\" = 'alert'"
    )
    assert execution_id == row["execution_id"]
    assert not requested_runs(_tick(workspace))  # ended for good: never resumed again
    assert _circuit_calls(workspace, name) == 0


@pytest.mark.both_warehouses
def test_handed_off_policy_is_polled_outside_runs_and_two_racing_ticks_request_one_run(
    workspace: Workspace, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("POLICY_WAIT_HANDOFF_SECONDS", "0.5")
    # A ready policy whose circuit run was just requested is not stranded: it is resumed
    # only after the backoff, by which time the daemon has launched the requested run.
    monkeypatch.setenv("POLICY_RESUME_BACKOFF_SECONDS", "30")
    slow, quick = CATALOG_POLICIES[0], CATALOG_POLICIES[1]
    workspace.simulator.configure(ready_after_seconds_by_policy={slow: 3600})
    result = workspace.run([slow, quick])
    # Handed off is waiting, not failed: the run succeeds and leaves policy_ready unmaterialized.
    assert result.success
    [waiting] = workspace.executions(slow)
    assert waiting["status"] == "policy_created"
    assert workspace.executions(quick)[0]["status"] == "completed"
    ready = {
        e.partition
        for e in result.asset_materializations_for_node("policy_workflow")
        if e.asset_key == AssetKey("policy_ready")
    }
    assert ready == {quick}
    [observation] = [
        e.event_specific_data.asset_observation  # type: ignore[union-attr]
        for e in result.all_events
        if e.event_type_value == "ASSET_OBSERVATION"
    ]
    assert observation.partition == slow
    polls_by_run = int(waiting["poll_count"])

    # Not ready yet: once due (POLICY_WAIT_POLL_INTERVAL_SECONDS after the hand-off), a tick
    # polls it and records the poll as a run would.
    time.sleep(1.1)
    not_yet = _tick(workspace)
    assert not requested_runs(not_yet)
    [row] = workspace.executions(slow)
    assert row["status"] == "policy_created" and int(row["poll_count"]) == polls_by_run + 1

    # Ready now; two ticks at the same moment: one reports it and requests one circuit run.
    workspace.simulator.configure(ready_after_seconds_by_policy={})
    time.sleep(1.1)
    results: list[SensorResult | SkipReason] = []
    ticks = [threading.Thread(target=lambda: results.append(_tick(workspace))) for _ in range(2)]
    for tick in ticks:
        tick.start()
    for tick in ticks:
        tick.join()
    requests = [r for result in results for r in requested_runs(result)]
    events = [
        e
        for result in results
        if isinstance(result, SensorResult)
        for e in (result.asset_events or [])
    ]
    assert len(requests) == 1, requests
    assert [(e.asset_key, e.partition) for e in events] == [(AssetKey("policy_ready"), slow)]
    [request] = requests
    assert request.run_key == f"circuit:{waiting['execution_id']}"
    assert workspace.executions(slow)[0]["status"] == "policy_ready"
    assert launch_requested(workspace, request).success
    [done] = workspace.executions(slow)
    assert done["status"] == "completed" and _circuit_calls(workspace, slow) == 1
    events_logged = workspace.query(
        "SELECT COUNT(*) FROM policy_execution_events WHERE \"event_type\" = 'handoff'"
    )
    assert int(events_logged[0][0]) == 1
    runs = workspace.instance.get_runs()
    assert all(run.status is DagsterRunStatus.SUCCESS for run in runs)


def test_cursor_keeps_the_warehouse_asleep_between_polls(
    workspace: Workspace, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("POLICY_WAIT_POLL_INTERVAL_SECONDS", "600")
    first = _tick(workspace)
    assert isinstance(first, SensorResult) and first.cursor
    second = _tick(workspace, first.cursor)
    assert isinstance(second, SkipReason)
    assert "next look at the warehouse" in (second.skip_message or "")


def test_resumptions_group_neighbours_of_one_kind_only() -> None:
    ordered = ["a", "b", "c", "d", "e", "f"]
    kinds = {"a": "workflow", "b": "workflow", "c": "circuit", "e": "circuit", "f": "circuit"}
    assert group_runs(ordered, kinds) == [
        ("workflow", "a", "b", ["a", "b"]),
        ("circuit", "c", "c", ["c"]),
        ("circuit", "e", "f", ["e", "f"]),
    ]
    assert ProgressSettings(resume_backoff_seconds=10).resume_backoff(3) == 80
    assert ProgressSettings(resume_backoff_max_seconds=100).resume_backoff(50) == 100
