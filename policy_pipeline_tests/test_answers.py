"""Answers mean what they say, and a policy not found yet is polled again.

Against the hostile test server (`harness.hostile_api`): it ignores ``Idempotency-Key`` and counts
every raw request, so a repeated call would show as a second call. A circuit answer whose body
says the breaker was not triggered is a failure in the API's words; a 204 or ``{}`` is the
confirmation HTTP says it is; a poll answer about another policy is refused; error messages say
what stood where a field should be; a 404 on the polls right after the create is "not visible
yet" (within ``POLICY_POLL_NOT_FOUND_GRACE_SECONDS``), in runs and in `policy_progress_sensor`
alike (one reading of poll answers, `policy_ready.read_poll`)."""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from typing import Any

import pytest
from dagster import SensorResult, SkipReason, build_sensor_context

from policy_pipeline.core.engine.circuit_breaker_activation import read_circuit
from policy_pipeline.core.engine.policy_ready import PollVerdict, read_poll
from policy_pipeline.core.policy_api_types import ApiResponse, parse_body
from policy_pipeline_tests.conftest import CATALOG_POLICIES, Workspace, run_job, subprocess_env
from policy_pipeline_tests.harness.hostile_api import (
    Behaviour,
    HostileApi,
    SeenRequest,
    json_answer,
)

TRIGGERED = {"status": "triggered", "circuit_breaker_id": "cb_1"}


def _policy_id(name: str) -> str:
    return f"pol_{name.replace('_', '')}"


def _created(request: SeenRequest) -> Behaviour:
    return json_answer(200, {"policy_id": _policy_id(request.json()["policy_name"])})


def _ready(request: SeenRequest) -> Behaviour:
    return json_answer(200, {"policy_id": request.path.rsplit("/", 1)[-1], "status": "success"})


@pytest.fixture
def api(workspace: Workspace, monkeypatch: pytest.MonkeyPatch) -> Iterator[HostileApi]:
    """A correct API with one policy_id per policy name, pointed at by runs, the CLI and the
    sensor; tests replace a route."""
    routes: dict[str, Any] = {
        "POST /createpolicy": _created,
        "GET /policy/*": _ready,
        "POST /circuit": json_answer(200, TRIGGERED),
    }
    with HostileApi(routes) as server:
        monkeypatch.setenv("POLICY_API_ENDPOINT", server.base_url)
        monkeypatch.setenv("POLICY_API_MAX_ATTEMPTS", "1")
        workspace.env["POLICY_API_ENDPOINT"] = server.base_url
        workspace.env["POLICY_API_MAX_ATTEMPTS"] = "1"
        yield server


def _circuit_calls(api: HostileApi, name: str) -> int:
    return sum(
        1 for r in api.requests_to("POST", "/circuit") if r.json()["policy_id"] == _policy_id(name)
    )


def _events(workspace: Workspace, name: str, event_type: str) -> list[str]:
    rows = workspace.query(
        'SELECT "message" FROM policy_execution_events WHERE "policy_name" = ? '
        'AND "event_type" = ? ORDER BY "event_time"',
        [name, event_type],
    )
    return [str(r[0]) for r in rows]


def _job(workspace: Workspace, name: str) -> subprocess.CompletedProcess[str]:
    """``dagster job execute`` for one partition, as an operator runs it."""
    return run_job(subprocess_env(workspace), "--tags", json.dumps({"dagster/partition": name}))


# --- the circuit breaker's answer ------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "words", "resumable"),
    [
        ({"status": "failed", "error": "breaker rejected"}, "breaker rejected", False),
        ({"error": "policy not ready", "triggered": False}, "policy not ready", True),
        ({"success": False, "message": "quota exceeded"}, "quota exceeded", False),
    ],
    ids=["status-failed", "triggered-false-not-ready", "success-false"],
)
def test_a_2xx_circuit_answer_saying_not_triggered_fails_that_policy_only(
    workspace: Workspace, api: HostileApi, body: dict[str, Any], words: str, resumable: bool
) -> None:
    refused, *others = CATALOG_POLICIES

    def circuit(request: SeenRequest) -> Behaviour:
        if request.json()["policy_id"] == _policy_id(refused):
            return json_answer(200, body)
        return json_answer(200, TRIGGERED)

    api.set("POST /circuit", circuit)
    result = workspace.run(CATALOG_POLICIES)
    assert not result.success
    [row] = workspace.executions(refused)
    assert row["status"] == "error", row
    assert words in row["error_message"] and "not triggered" in row["error_message"]
    assert not row["circuit_breaker_completed"] and row["circuit_breaker_initiated"]
    assert row["resumable"] is resumable
    for name in others:
        [done] = workspace.executions(name)
        assert done["status"] == "completed" and done["circuit_breaker_completed"]
    assert api.count("POST", "/createpolicy") == len(CATALOG_POLICIES)
    assert [_circuit_calls(api, n) for n in CATALOG_POLICIES] == [1] * len(CATALOG_POLICIES)
    failure = next(e for e in result.all_events if e.event_type_value == "STEP_FAILURE")
    assert words in str(failure.event_specific_data)

    if resumable:
        # A refusal about timing: the next run repeats the call for the same execution.
        api.set("POST /circuit", json_answer(200, TRIGGERED))
        assert workspace.run([refused]).success
        [after] = workspace.executions(refused)
        assert after["status"] == "completed" and after["execution_id"] == row["execution_id"]
        assert _circuit_calls(api, refused) == 2
        assert api.count("POST", "/createpolicy") == len(CATALOG_POLICIES)


def test_a_204_completes_in_one_call_through_the_cli(workspace: Workspace, api: HostileApi) -> None:
    name = CATALOG_POLICIES[0]
    api.set("POST /circuit", Behaviour(status=204))
    done = _job(workspace, name)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    [row] = workspace.executions(name)
    assert row["status"] == "completed" and row["circuit_breaker_completed"], row
    assert api.count("POST", "/circuit") == 1
    assert api.count("POST", "/createpolicy") == 1


def test_an_empty_object_is_a_confirmation(workspace: Workspace, api: HostileApi) -> None:
    name = CATALOG_POLICIES[0]
    api.set("POST /circuit", json_answer(200, {}))
    assert workspace.run([name]).success
    [row] = workspace.executions(name)
    assert row["status"] == "completed" and row["circuit_breaker_completed"], row
    assert api.count("POST", "/circuit") == 1


def _response(status: int, text: str, endpoint: str = "circuit") -> ApiResponse:
    method, path = ("POST", "/circuit") if endpoint == "circuit" else ("GET", "/policy/pol_1")
    return ApiResponse(endpoint, method, path, status, text, parse_body(text), 1.0, 1)


@pytest.mark.parametrize(
    ("status", "body", "triggered", "resumable"),
    [
        # The simulator's answers, first and repeated: confirmations.
        (200, {**TRIGGERED, "policy_id": "pol_1", "execution_id": "e"}, True, True),
        (200, {**TRIGGERED, "already_triggered": True}, True, True),
        (200, {"status": "triggered", "error": None, "errors": []}, True, True),
        (202, {"accepted": True}, True, True),
        (204, None, True, True),
        (200, {"status": "rejected"}, False, False),
        (200, {"status": "Not Triggered"}, False, False),
        (200, {"triggered": "false"}, False, False),
        (200, {"ok": False, "errors": [{"detail": "nope"}]}, False, False),
        (200, {"status": "not_ready"}, False, True),
        (200, {"error": "try later", "retryable": True}, False, True),
        # Contradictory: it may have fired, so it is not repeated automatically.
        (200, {"status": "triggered", "error": "policy not ready"}, False, False),
        (200, "<html>proxy</html>", False, True),
        (200, ["triggered"], False, True),
        (503, {"error": "down"}, False, True),
    ],
)
def test_what_each_circuit_answer_means(
    status: int, body: Any, triggered: bool, resumable: bool
) -> None:
    text = "" if body is None else body if isinstance(body, str) else json.dumps(body)
    reading = read_circuit(_response(status, text))
    assert reading.triggered is triggered
    if not triggered:
        assert reading.resumable is resumable
        assert reading.error and f"HTTP {status}" in reading.error


# --- the poll's answer -----------------------------------------------------------------------


def test_a_poll_answer_about_another_policy_is_refused_never_ready(
    workspace: Workspace, api: HostileApi
) -> None:
    name = CATALOG_POLICIES[0]
    api.set("GET /policy/*", json_answer(200, {"policy_id": "pol_someone_else", "status": "ready"}))
    assert not workspace.run([name]).success
    [row] = workspace.executions(name)
    assert row["status"] == "error" and row["resumable"], row
    assert row["policy_id"] == _policy_id(name)
    assert "another policy" in row["error_message"]
    assert "'pol_someone_else'" in row["error_message"]
    assert api.count("POST", "/circuit") == 0
    assert api.count("GET") == 1 and row["poll_count"] == 1
    # Audited as such: the poll and the move to error both say so.
    with_state = workspace.query(
        'SELECT "message" FROM policy_execution_events WHERE "policy_name" = ? '
        "AND \"message\" LIKE '%another policy%'",
        [name],
    )
    assert with_state, _events(workspace, name, "state_change")


def test_messages_say_what_stood_where_a_field_should_be(
    workspace: Workspace, api: HostileApi
) -> None:
    numbered, null_status = CATALOG_POLICIES[0], CATALOG_POLICIES[1]

    def create(request: SeenRequest) -> Behaviour:
        if request.json()["policy_name"] == numbered:
            return json_answer(200, {"policy_id": 12345})
        return _created(request)

    polls: list[str] = []

    def poll(request: SeenRequest) -> Behaviour:
        polls.append(request.path)
        if len(polls) == 1:
            return json_answer(200, {"status": None})
        return _ready(request)

    api.set("POST /createpolicy", create)
    api.set("GET /policy/*", poll)
    assert not workspace.run([numbered, null_status]).success
    [row] = workspace.executions(numbered)
    assert row["status"] == "error" and not row["resumable"]
    assert "'policy_id' is a number (12345), not a string" in row["error_message"], row
    assert "missing" not in row["error_message"]
    [done] = workspace.executions(null_status)
    assert done["status"] == "completed" and done["poll_count"] == 2
    [warning] = _events(workspace, null_status, "warning")
    assert "'status' is null" in warning and "no 'status' field" not in warning


@pytest.mark.parametrize(
    ("body", "verdict", "words"),
    [
        ({"policy_id": "pol_1", "status": "ready"}, PollVerdict.READY, "API status 'ready'"),
        ({"status": "pending"}, PollVerdict.WAITING, "API status 'pending'"),
        ({"policy_id": "pol_2", "status": "ready"}, PollVerdict.REFUSED, "another policy"),
        ({"policy_id": "pol_2", "status": "failed"}, PollVerdict.REFUSED, "another policy"),
        ({"policy_id": 1, "status": "ready"}, PollVerdict.REFUSED, "is a number (1)"),
        ({"status": None}, PollVerdict.WAITING, "'status' is null"),
        ({"status": 7}, PollVerdict.WAITING, "'status' is a number (7), not a string"),
        ({"policy_id": "pol_1"}, PollVerdict.WAITING, "no 'status' field"),
        ({"status": "failed"}, PollVerdict.FAILED, "API status 'failed'"),
    ],
)
def test_what_each_poll_answer_means(body: Any, verdict: PollVerdict, words: str) -> None:
    reading = read_poll(_response(200, json.dumps(body), "poll"), "pol_1", 1.0, 60.0)
    assert reading.verdict is verdict
    assert words in reading.note or words in (reading.error or "")


def test_a_404_is_not_yet_visible_only_within_the_grace() -> None:
    not_found = _response(404, '{"error": "policy not found"}', "poll")
    assert read_poll(not_found, "pol_1", 5.0, 60.0).verdict is PollVerdict.WAITING
    assert read_poll(not_found, "pol_1", 61.0, 60.0).verdict is PollVerdict.REFUSED
    # Created by an earlier run: how long ago is not known on this clock, so no grace.
    assert read_poll(not_found, "pol_1", None, 60.0).verdict is PollVerdict.REFUSED
    # Only a 404 is "not found".
    gone = _response(410, '{"error": "gone"}', "poll")
    assert read_poll(gone, "pol_1", 1.0, 60.0).verdict is PollVerdict.REFUSED


# --- not found yet -----------------------------------------------------------------------------


def test_a_404_right_after_the_create_completes_in_one_run_through_the_cli(
    workspace: Workspace, api: HostileApi
) -> None:
    name = CATALOG_POLICIES[0]
    not_found = json_answer(404, {"error": "policy not found"})
    api.set("GET /policy/*", [not_found, not_found, Behaviour(body={"status": "success"})])
    done = _job(workspace, name)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    [row] = workspace.executions(name)
    assert row["status"] == "completed" and row["circuit_breaker_completed"], row
    assert api.count("POST", "/createpolicy") == 1
    assert api.count("POST", "/circuit") == 1
    assert api.count("GET") == 3 and row["poll_count"] == 3  # counted as polls
    polls = workspace.query(
        'SELECT COUNT(*) FROM policy_execution_events WHERE "policy_name" = ? '
        "AND \"event_type\" = 'api_call' AND \"endpoint\" = 'policy_status'",
        [name],
    )
    assert int(polls[0][0]) == 3


def test_a_404_past_the_grace_leaves_the_execution_resumable(
    workspace: Workspace, api: HostileApi, monkeypatch: pytest.MonkeyPatch
) -> None:
    name = CATALOG_POLICIES[0]
    monkeypatch.setenv("POLICY_POLL_NOT_FOUND_GRACE_SECONDS", "1")
    api.set("GET /policy/*", json_answer(404, {"error": "policy not found"}))
    assert not workspace.run([name]).success
    [row] = workspace.executions(name)
    assert row["status"] == "error" and row["resumable"], row
    assert "answered HTTP 404" in row["error_message"]
    assert row["poll_count"] == api.count("GET") >= 1
    assert api.count("POST", "/createpolicy") == 1 and api.count("POST", "/circuit") == 0


def _tick(workspace: Workspace) -> SensorResult | SkipReason:
    """One evaluation of policy_progress_sensor, as the daemon evaluates it."""
    defs = workspace.definitions()
    sensor = defs.resolve_sensor_def("policy_progress_sensor")
    resources = {name: defs.resources[name] for name in ("policy_state", "policy_api")}
    with build_sensor_context(instance=workspace.instance, resources=resources) as context:
        result = sensor(context)
    assert isinstance(result, SensorResult | SkipReason)
    return result


@pytest.mark.both_warehouses
def test_the_progress_sensor_reads_polls_as_runs_do(
    workspace: Workspace, api: HostileApi, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Handed-off policies polled by the sensor: a 404 within the grace of the create (on the
    warehouse's clock) is counted and polled again, past it a resumable error; an answer about
    another policy is refused."""
    for variable, value in {
        "POLICY_WAIT_HANDOFF_SECONDS": "0.3",
        "POLICY_WAIT_POLL_INTERVAL_SECONDS": "1",
        "POLICY_RESUME_BACKOFF_SECONDS": "3600",  # no resumption run in the way
    }.items():
        monkeypatch.setenv(variable, value)
    missing, foreign = CATALOG_POLICIES[0], CATALOG_POLICIES[1]
    api.set("GET /policy/*", json_answer(200, {"status": "pending"}))
    assert workspace.run([missing, foreign]).success  # both handed off
    before = {n: workspace.executions(n)[0] for n in (missing, foreign)}
    assert all(r["status"] == "policy_created" for r in before.values()), before

    def poll(request: SeenRequest) -> Behaviour:
        if request.path.endswith(_policy_id(missing)):
            return json_answer(404, {"error": "policy not found"})
        return json_answer(200, {"policy_id": "pol_someone_else", "status": "ready"})

    api.set("GET /policy/*", poll)
    time.sleep(1.2)
    _tick(workspace)
    [waiting] = workspace.executions(missing)
    assert waiting["status"] == "policy_created", waiting
    assert waiting["poll_count"] == before[missing]["poll_count"] + 1
    [(message,)] = workspace.query(
        'SELECT "message" FROM policy_execution_state WHERE "policy_name" = ?', [missing]
    )
    assert "not visible yet" in str(message)
    [refused] = workspace.executions(foreign)
    assert refused["status"] == "error" and refused["resumable"], refused
    assert "another policy" in refused["error_message"]

    # Past the grace: what a 404 is anywhere else, a resumable error.
    monkeypatch.setenv("POLICY_POLL_NOT_FOUND_GRACE_SECONDS", "1")
    time.sleep(1.2)
    _tick(workspace)
    [after] = workspace.executions(missing)
    assert after["status"] == "error" and after["resumable"], after
    assert "answered HTTP 404" in after["error_message"]
    assert api.count("POST", "/createpolicy") == 2 and api.count("POST", "/circuit") == 0
