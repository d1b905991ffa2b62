"""A hostile Policy API and careless operations, through the real job: answers that are not
identifiers, one policy_id handed to several creates, poll errors that are no proof a policy
is gone, refused credentials, archived content, run-level audit events and dbt run from the
repository root. Each leaves no duplicate and a clear error.

The lying API here is a few lines of ``http.server`` on 127.0.0.1 whose answers each test
scripts (the simulator is honest by design)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from policy_pipeline.core.catalog import load_catalog
from policy_pipeline.core.settings import PROJECT_ROOT, Settings
from policy_pipeline.core.store.archiver import Archiver
from policy_pipeline.core.store.state_store import AuditEvent
from policy_pipeline.core.store.statements import archive as sql_archive
from policy_pipeline.resources import open_state
from policy_pipeline_tests.conftest import CATALOG_POLICIES, Workspace, run_cli
from policy_pipeline_tests.harness.hostile_api import Behaviour, HostileApi, well_behaved

Reply = tuple[int, Any]


class LyingApi:
    """``create``, ``poll`` and ``circuit`` answer (status, JSON body) as the test says."""

    def __init__(self) -> None:
        self.calls: Counter[str] = Counter()
        self.create: Callable[[dict[str, Any]], Reply] = lambda body: (
            201,
            {"policy_id": f"pol_{body['policy_name']}"},
        )
        self.poll: Callable[[str], Reply] = lambda policy_id: (200, {"status": "success"})
        self.circuit: Callable[[dict[str, Any]], Reply] = lambda body: (200, {"ok": True})
        api = self

        class Handler(BaseHTTPRequestHandler):
            def _reply(self, reply: Reply) -> None:
                status, body = reply
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", "0"))
                body = json.loads(self.rfile.read(length) or b"{}")
                if self.path == "/createpolicy":
                    api.calls["create"] += 1
                    self._reply(api.create(body))
                else:
                    api.calls["circuit"] += 1
                    self._reply(api.circuit(body))

            def do_GET(self) -> None:
                api.calls["poll"] += 1
                self._reply(api.poll(self.path.removeprefix("/policy/")))

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


@pytest.fixture
def lying_api(workspace: Workspace, monkeypatch: pytest.MonkeyPatch) -> Iterator[LyingApi]:
    api = LyingApi()
    monkeypatch.setenv("POLICY_API_ENDPOINT", api.url)
    monkeypatch.setenv("POLICY_API_MAX_ATTEMPTS", "1")
    yield api
    api.server.shutdown()
    api.server.server_close()


def _events(workspace: Workspace, name: str) -> list[str]:
    rows = workspace.query(
        'SELECT "message" FROM policy_execution_events WHERE "policy_name" = ? '
        'ORDER BY "event_time"',
        [name],
    )
    return [str(r[0]) for r in rows]


@pytest.mark.parametrize("policy_id", ["x" * (1 << 20), "..", "../admin", "a/b", "pol 1", ""])
def test_a_policy_id_that_is_not_an_identifier_is_refused_before_any_poll(
    workspace: Workspace, lying_api: LyingApi, policy_id: str
) -> None:
    name = CATALOG_POLICIES[0]
    lying_api.create = lambda body: (201, {"policy_id": policy_id})
    result = workspace.run([name])
    assert not result.success
    [row] = workspace.executions(name)
    assert row["status"] == "error" and row["policy_id"] is None
    assert lying_api.calls["poll"] == 0 and lying_api.calls["circuit"] == 0
    if policy_id:
        assert "not an identifier" in row["error_message"]
        assert len(row["error_message"]) < 2000  # the 1 MiB answer is not copied into it
    # The answer itself stays in the audit trail (the attempt's event).
    [(detail,)] = workspace.query(
        'SELECT "detail" FROM policy_execution_events WHERE "event_type" = \'api_call\' '
        'AND "policy_name" = ?',
        [name],
    )
    assert "policy_id" in str(detail)


def test_one_policy_id_for_several_creates_is_refused_before_any_circuit_breaker(
    workspace: Workspace, lying_api: LyingApi
) -> None:
    # A static mock: one policy_id whatever the create, Idempotency-Key ignored.
    lying_api.create = lambda body: (201, {"policy_id": "pol_static_0001"})
    result = workspace.run(CATALOG_POLICIES)
    assert not result.success
    rows = [r for name in CATALOG_POLICIES for r in workspace.executions(name)]
    completed = [r for r in rows if r["status"] == "completed"]
    refused = [r for r in rows if r["status"] == "error"]
    assert len(completed) == 1 and len(refused) == len(CATALOG_POLICIES) - 1
    assert all("already bound to execution" in r["error_message"] for r in refused)
    assert all(not r["resumable"] for r in refused)
    assert lying_api.calls["circuit"] == 1
    # Again: still one execution holds it, no other circuit breaker.
    assert not workspace.run(CATALOG_POLICIES).success
    holders = workspace.query(
        "SELECT COUNT(*) FROM policy_execution_state WHERE \"policy_id\" = 'pol_static_0001'"
    )
    assert int(holders[0][0]) == 1
    assert lying_api.calls["circuit"] == 1


@pytest.mark.parametrize("status", [404, 301, 410])
def test_one_poll_error_does_not_end_the_execution_or_create_a_second_policy(
    workspace: Workspace, lying_api: LyingApi, status: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Past the not-found grace (test_answers.py covers a 404 within it).
    monkeypatch.setenv("POLICY_POLL_NOT_FOUND_GRACE_SECONDS", "0")
    name = CATALOG_POLICIES[0]
    answers = iter([(status, {"error": "not here"})])
    lying_api.poll = lambda policy_id: next(answers, (200, {"status": "success"}))
    assert not workspace.run([name]).success
    [row] = workspace.executions(name)
    assert row["status"] == "error" and row["resumable"], row
    assert workspace.run([name]).success  # resumes polling the same policy
    [row] = workspace.executions(name)
    assert row["status"] == "completed" and row["policy_id"] == f"pol_{name}"
    assert lying_api.calls["create"] == 1 and lying_api.calls["circuit"] == 1


def test_refused_credentials_stop_the_run_and_leave_everything_resumable(
    workspace: Workspace, lying_api: LyingApi, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("POLICY_API_MAX_CONCURRENCY", "1")
    lying_api.create = lambda body: (401, {"error": "bad credentials"})
    result = workspace.run(CATALOG_POLICIES)
    assert not result.success
    assert lying_api.calls["create"] == 1  # the first refusal stops the run's calls
    failure = next(e for e in result.all_events if e.event_type_value == "STEP_FAILURE")
    assert "check POLICY_API_KEY" in str(failure.event_specific_data)
    rows = [r for name in CATALOG_POLICIES for r in workspace.executions(name)]
    # Nothing ended for good: the refused one is a resumable error, the others untouched.
    assert all(r["status"] != "error" or r["resumable"] for r in rows), rows
    lying_api.create = lambda body: (201, {"policy_id": f"pol_{body['policy_name']}"})
    assert workspace.run(CATALOG_POLICIES).success
    assert lying_api.calls["circuit"] == len(CATALOG_POLICIES)
    for name in CATALOG_POLICIES:
        assert [r["status"] for r in workspace.executions(name)] == ["completed"]


def test_archiving_does_not_undo_one_policy_per_content(
    workspace: Workspace, lying_api: LyingApi
) -> None:
    assert workspace.run(CATALOG_POLICIES).success
    with open_state(Settings.from_env()) as state:
        archived = Archiver(state.warehouse()).archive(retention_days=0)
    assert archived.executions == len(CATALOG_POLICIES)
    assert workspace.run(CATALOG_POLICIES).success
    assert lying_api.calls["create"] == len(CATALOG_POLICIES)
    assert lying_api.calls["circuit"] == len(CATALOG_POLICIES)
    assert all(workspace.executions(name) == [] for name in CATALOG_POLICIES)


def test_run_level_audit_events_keep_reporting_working_and_are_archived(
    workspace: Workspace,
) -> None:
    assert workspace.run().success
    with open_state(Settings.from_env()) as state:
        store = state.store(run_id="a-failed-run")
        # As the run-failure sensor and the guard write them: about a run, no execution.
        for event_type in ("run_failure", "guard"):
            store.audit(
                AuditEvent(execution_id=None, policy_name="", event_type=event_type, message="x")
            )
        store.flush()
    defs = workspace.definitions()
    result = defs.resolve_job_def("policy_reporting_job").execute_in_process(
        instance=workspace.instance, raise_on_error=False
    )
    assert result.success
    checks = {e.check_name: e.passed for e in result.get_asset_check_evaluations()}
    assert checks and all(checks.values()), checks
    with open_state(Settings.from_env()) as state:
        Archiver(state.warehouse()).archive(retention_days=0)
    left = workspace.query(
        'SELECT COUNT(*) FROM policy_execution_events WHERE "execution_id" IS NULL'
    )
    moved = workspace.query(
        'SELECT COUNT(*) FROM policy_execution_events_history WHERE "execution_id" IS NULL'
    )
    assert (int(left[0][0]), int(moved[0][0])) == (0, 2)


def test_dbt_build_from_the_repository_root(workspace: Workspace, tmp_path: Path) -> None:
    """The README's dbt command from the repository root, with no POLICY_DUCKDB_PATH: the
    default state file is found from the profile's directory, not the cwd."""
    assert workspace.run().success
    root = tmp_path / "repo"
    shutil.copytree(
        PROJECT_ROOT / "dbt_project",
        root / "dbt_project",
        ignore=shutil.ignore_patterns("target", "logs", "dbt_packages"),
    )
    (root / "data").mkdir()
    shutil.copy(workspace.duckdb_path, root / "data" / "policy_pipeline.duckdb")
    env = {k: v for k, v in os.environ.items() if not k.startswith("POLICY_")}
    result = subprocess.run(
        [
            str(Path(sys.executable).parent / "dbt"),
            *("build", "--project-dir", "dbt_project", "--profiles-dir", "dbt_project"),
            *("--target", "duckdb"),
        ],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert "Completed successfully" in result.stdout


# --- which policies a run works on ---------------------------------------------------------


def test_any_set_of_policies_by_name_and_partitions_in_catalog_order(
    workspace: Workspace,
) -> None:
    first, middle, last = CATALOG_POLICIES
    job = workspace.definitions().resolve_job_def("policy_workflow_job")
    # A single run of the last policy first: every catalog policy becomes a partition, in
    # name order, so a later range follows the catalog.
    assert workspace.instance.get_dynamic_partitions("policies") == []
    single = job.execute_in_process(
        instance=workspace.instance, tags={"dagster/partition": last}, raise_on_error=False
    )
    assert single.success
    assert workspace.instance.get_dynamic_partitions("policies") == CATALOG_POLICIES

    # Two policies that are not neighbours, by name, with no partition tags.
    chosen = job.execute_in_process(
        instance=workspace.instance,
        run_config={"ops": {"policy_workflow": {"config": {"policies": [first, last]}}}},
        raise_on_error=False,
    )
    assert chosen.success
    assert workspace.executions(middle) == []
    assert [r["status"] for r in workspace.executions(first)] == ["completed"]
    done = {
        (e.asset_key.path[-1], e.partition)
        for e in chosen.asset_materializations_for_node("policy_workflow")
    }
    assert ("circuit_breaker_activation", first) in done

    # Clear errors: no policy named at all; a name not in the catalog.
    for run_config, expected in (
        (None, "this run names none"),
        (
            {"ops": {"policy_workflow": {"config": {"policies": ["nope"]}}}},
            "not in the catalog: nope",
        ),
    ):
        failed = job.execute_in_process(
            instance=workspace.instance, run_config=run_config, raise_on_error=False
        )
        assert not failed.success
        failure = next(e for e in failed.all_events if e.event_type_value == "STEP_FAILURE")
        assert expected in str(failure.event_specific_data)


# --- the operator CLI ------------------------------------------------------------------------


def _overrides(workspace: Workspace) -> int:
    rows = workspace.query(
        "SELECT COUNT(*) FROM policy_execution_events WHERE \"event_type\" = 'override'"
    )
    return int(rows[0][0])


def test_cli_override_refuses_clearly_and_audits_only_what_happened(
    workspace: Workspace,
) -> None:
    polling, pending = CATALOG_POLICIES[0], CATALOG_POLICIES[1]
    assert workspace.run([polling], selection=["policy_created"]).success
    # A run is polling it (it holds the lease): a forced trigger must not go under it.
    with open_state(Settings.from_env()) as state:
        store = state.store()
        assert store.acquire_leases([polling], "run:busy", 300) == {polling}
        refused = run_cli(
            workspace, "override", polling, "--trigger-circuit-breaker", "--force", "--reason", "x"
        )
        assert refused.returncode == 1, refused.stdout + refused.stderr
        assert "being processed by run:busy" in refused.stderr
        assert "Traceback" not in refused.stderr
        store.release_leases([polling], "run:busy")
    assert [r["status"] for r in workspace.executions(polling)] == ["policy_created"]
    assert workspace.simulator.counts()["requests"].get("circuit", 0) == 0

    # Skipping the circuit breaker of a policy never created: a clear refusal, no traceback.
    with open_state(Settings.from_env()) as state:
        state.store().start_executions([load_catalog(workspace.catalog_dir)[pending].policy])
    skipped = run_cli(
        workspace, "override", pending, "--skip-circuit-breaker", "--force", "--reason", "x"
    )
    assert skipped.returncode == 1 and "never created" in skipped.stderr, skipped.stderr
    assert "Traceback" not in skipped.stderr
    assert [r["status"] for r in workspace.executions(pending)] == ["pending"]
    assert _overrides(workspace) == 0  # refusals are not audited as overrides

    # What happens is audited, after it happened.
    done = run_cli(
        workspace, "override", polling, "--skip-circuit-breaker", "--force", "--reason", "ok"
    )
    assert done.returncode == 0, done.stderr
    assert _overrides(workspace) == 1

    bad_limit = run_cli(workspace, "status", "--limit", "-1")
    assert bad_limit.returncode == 2 and "is not at least 1" in bad_limit.stderr
    assert "Traceback" not in bad_limit.stderr


def test_an_archive_run_killed_mid_way_is_marked_interrupted(workspace: Workspace) -> None:
    with open_state(Settings.from_env()) as state:
        state.warehouse().ensure_schema()
        with state.warehouse().session() as session:
            # As a killed archive run leaves it: 'running', its Dagster run gone.
            session.rowcount(sql_archive.START_ARCHIVE_RUN, ["killed-archive", 7, "no-such-run"])
    defs = workspace.definitions()
    result = defs.resolve_job_def("policy_archive_job").execute_in_process(
        instance=workspace.instance
    )
    assert result.success
    rows = workspace.query(
        'SELECT "archive_run_id", "status", "error_message" FROM policy_archive_runs '
        'ORDER BY "started_time"'
    )
    status = {str(r[0]): (str(r[1]), r[2]) for r in rows}
    assert status["killed-archive"][0] == "interrupted"
    assert "stopped before it finished" in str(status["killed-archive"][1])
    assert sorted(s for s, _e in status.values()) == ["interrupted", "succeeded"]


# --- an API that echoes the key ------------------------------------------------------------


def test_an_api_echoing_the_key_leaks_it_nowhere(
    workspace: Workspace, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Echoed in a 500 (retried) on the poll and in a 401 on the circuit breaker: the key is in
    no table, no Dagster event or log, no stderr and not in ``diagnose --json``."""
    echo = Behaviour(status=500, echo_request=True)
    routes: dict[str, Any] = {**well_behaved()}
    routes["GET /policy/*"] = [echo, Behaviour(body={"status": "success"})]
    routes["POST /circuit"] = Behaviour(status=401, echo_request=True)
    monkeypatch.setenv("POLICY_API_MAX_ATTEMPTS", "2")
    with HostileApi(routes) as api:
        monkeypatch.setenv("POLICY_API_ENDPOINT", api.base_url)
        workspace.env["POLICY_API_ENDPOINT"] = api.base_url
        result = workspace.run([CATALOG_POLICIES[0]])
        diagnose = run_cli(workspace, "diagnose", "--json")
        assert api.count("POST", "/circuit") >= 1
    assert not result.success
    texts = [str(event) for event in result.all_events]
    texts += [entry.to_json() for entry in workspace.instance.all_logs(result.run_id)]
    for table in ("policy_execution_state", "policy_execution_events"):
        texts += [" ".join(map(str, row)) for row in workspace.query(f"SELECT * FROM {table}")]
    texts += [diagnose.stdout, diagnose.stderr]
    dump = "\n".join(texts)
    assert "***" in dump  # the echo was there, scrubbed
    assert workspace.api_key not in dump


def test_a_403_for_one_policy_leaves_the_others_going(
    workspace: Workspace, lying_api: LyingApi
) -> None:
    forbidden, *others = CATALOG_POLICIES
    lying_api.poll = lambda policy_id: (
        (403, {"error": "forbidden"})
        if policy_id == f"pol_{forbidden}"
        else (200, {"status": "success"})
    )
    assert not workspace.run(CATALOG_POLICIES).success
    [row] = workspace.executions(forbidden)
    assert row["status"] == "error" and row["resumable"], row
    for name in others:
        assert [r["status"] for r in workspace.executions(name)] == ["completed"]
    assert lying_api.calls["circuit"] == len(others)
