"""The production deployment of deploy/ brought up for real: PostgreSQL, the gRPC code server,
the webserver and the daemon, each started by its deploy/start-*.sh script.

A throw-away PostgreSQL cluster (`postgres_server`) holds the Dagster storage; DAGSTER_HOME
holds deploy/dagster.yaml as it is (only the environment differs). Runs of
``policy_workflow_job`` are submitted through the webserver's GraphQL API while no daemon is
running, so they wait in the queue; then the daemon starts them under the QueuedRunCoordinator's
limits. The Policy API simulator keeps the policies pending until the test has seen the daemon
hold the extra run back for several dequeue intervals; the last run's circuit breaker call then
fails (after the API really triggered it), and the daemon retries that run from its failed step.

The test checks the Policy API tag limit held (also from the runs' start and end times in
PostgreSQL), the runs succeeded or were retried to success, and the warehouse and the Policy API
saw each policy created and its circuit breaker triggered exactly once.

Without PostgreSQL's server binaries the test is skipped, unless CI is set: then it fails.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import duckdb
import httpx
import pytest
import yaml
from dagster import DagsterEventType, DagsterInstance, DagsterRun, DagsterRunStatus, RunsFilter

from policy_devtools.simulator import PolicyApiSimulator, SimulatorConfig
from policy_pipeline.core.catalog import load_catalog
from policy_pipeline.core.settings import PROJECT_ROOT
from policy_pipeline.defs.workflow.partitions import PARTITIONS_NAME
from policy_pipeline.defs.workflow.runs import JOB_NAME
from policy_pipeline_tests.conftest import CATALOG, FAST_ENV
from policy_pipeline_tests.harness.graphql import (
    AUTOMATION_QUERY,
    LAUNCH_RUN,
    LOCATION,
    LOCATIONS_QUERY,
    REPOSITORY,
    STOP_SCHEDULE,
    STOP_SENSOR,
)
from policy_pipeline_tests.harness.postgres_server import (
    HOST,
    PostgresServer,
    find_postgres,
    free_port,
    missing_reason,
    postgres_server,
)

pytestmark = pytest.mark.deployment

DEPLOY_DIR = PROJECT_ROOT / "deploy"
API_TAG_KEY = "policy_pipeline/api"
API_TAG_VALUE = "true"
CATALOG_SENSOR = "policy_catalog_sensor"
START_TIMEOUT_SECONDS = 120.0
RUNS_TIMEOUT_SECONDS = 150.0
PG_USER = "dagster"
PG_DATABASE = "dagster"
API_ATTEMPTS = 2  # POLICY_API_MAX_ATTEMPTS: attempts per API call within a run
IN_PROGRESS = (DagsterRunStatus.STARTING, DagsterRunStatus.STARTED)
QUEUE_PATH = {
    DagsterEventType.RUN_ENQUEUED,
    DagsterEventType.RUN_STARTING,
    DagsterEventType.RUN_START,
    DagsterEventType.RUN_SUCCESS,
}


def _in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes", "on")


@pytest.fixture
def postgres() -> Iterator[PostgresServer]:
    problem = missing_reason()
    if problem is None:
        try:
            import dagster_postgres  # noqa: F401
        except ImportError:
            problem = "dagster-postgres is not installed (pip install dagster-postgres)"
    binaries = find_postgres()
    if problem is not None or binaries is None:
        reason = problem or "PostgreSQL is not available"
        if _in_ci():
            pytest.fail(f"CI is set and the deployment test cannot run: {reason}")
        pytest.skip(reason)
    with postgres_server(binaries) as server:
        yield server


# --- the deployment's processes -------------------------------------------------------------


@dataclass
class Service:
    name: str
    process: subprocess.Popen[bytes]
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def check_alive(self) -> None:
        if self.process.poll() is not None:
            raise AssertionError(
                f"{self.name} exited with {self.process.returncode}:\n{self.log()[-4000:]}"
            )


@contextmanager
def service(name: str, script: str, env: Mapping[str, str], logs: Path) -> Iterator[Service]:
    """Run one deploy/ start script as the leader of its own session; SIGKILL the session
    (the script's process and everything it started: run workers, code server children)."""
    log_path = logs / f"{name}.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            ["bash", str(DEPLOY_DIR / script)],
            cwd=PROJECT_ROOT,
            env=dict(env),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        yield Service(name=name, process=process, log_path=log_path)
    finally:
        with suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=30)


class GraphQL:
    def __init__(self, url: str) -> None:
        self.url = url
        self.client = httpx.Client(timeout=30.0)

    def __call__(self, query: str, variables: Mapping[str, Any] | None = None) -> Any:
        response = self.client.post(self.url, json={"query": query, "variables": variables or {}})
        response.raise_for_status()
        body = response.json()
        assert not body.get("errors"), body["errors"]
        return body["data"]


def wait_for(
    what: str, condition: Any, timeout: float, services: list[Service], interval: float = 0.5
) -> Any:
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        for svc in services:
            svc.check_alive()
        try:
            result = condition()
        except (httpx.HTTPError, OSError) as exc:
            last_error, result = exc, None
        if result:
            return result
        time.sleep(interval)
    logs = "\n".join(f"--- {s.name}:\n{s.log()[-3000:]}" for s in services)
    raise AssertionError(
        f"timed out after {timeout:.0f}s waiting for {what} ({last_error})\n{logs}"
    )


def code_server_serving(env: Mapping[str, str]) -> bool:
    """What `dagster api grpc-health-check` asks (deploy/README.md), without a process start."""
    from dagster._grpc.client import DagsterGrpcClient

    host, port = env["DAGSTER_CODE_SERVER_HOST"], int(env["DAGSTER_CODE_SERVER_PORT"])
    try:
        socket.create_connection((host, port), timeout=2.0).close()
    except OSError:
        return False  # not listening yet: spare the gRPC client's error output
    client = DagsterGrpcClient(host=host, port=port)
    try:
        status = client.health_check_query()  # type: ignore[no-untyped-call]
    except Exception:
        return False
    return bool(status == "SERVING")


def location_loaded(graphql: GraphQL) -> bool:
    """Whether the webserver has loaded the code location. Until the code server answers, the
    location is unreachable, and the webserver tries again by itself every 10 seconds."""
    data = graphql(LOCATIONS_QUERY)["workspaceOrError"]
    entries = {e["name"]: e for e in data.get("locationEntries", [])}
    entry = entries.get(LOCATION)
    if entry is None or entry["loadStatus"] != "LOADED" or entry["locationOrLoadError"] is None:
        return False
    error = entry["locationOrLoadError"]
    if error["__typename"] == "RepositoryLocation":
        return True
    assert "DagsterUserCodeUnreachableError" in str(error.get("message")), (
        f"the code location failed to load: {error}"
    )
    return False


def stop_automation(graphql: GraphQL) -> list[str]:
    """An operator switching off the schedules and sensors that run by default (the catalog
    sensor would launch the whole catalog at its first tick, the hourly dbt schedule its own
    run), so that the daemon starts only the runs the test submits. Returns their names."""
    selector = {"repositoryName": REPOSITORY, "repositoryLocationName": LOCATION}
    repository = graphql(AUTOMATION_QUERY, {"selector": selector})["repositoryOrError"]
    assert repository["__typename"] == "Repository", repository
    stopped = []
    for sensor in repository["sensors"]:
        if sensor["sensorState"]["status"] == "RUNNING":
            result = graphql(STOP_SENSOR, {"id": sensor["sensorState"]["id"]})["stopSensor"]
            assert result["__typename"] == "StopSensorMutationResult", result
            assert result["instigationState"]["status"] == "STOPPED", result
            stopped.append(sensor["name"])
    for schedule in repository["schedules"]:
        if schedule["scheduleState"]["status"] == "RUNNING":
            state_id = schedule["scheduleState"]["id"]
            result = graphql(STOP_SCHEDULE, {"id": state_id})["stopRunningSchedule"]
            assert result["__typename"] == "ScheduleStateResult", result
            assert result["scheduleState"]["status"] == "STOPPED", result
            stopped.append(schedule["name"])
    return stopped


def launch_run(graphql: GraphQL, policy: str) -> str:
    params = {
        "selector": {
            "repositoryLocationName": LOCATION,
            "repositoryName": REPOSITORY,
            "jobName": JOB_NAME,
        },
        "runConfigData": {},
        "executionMetadata": {"tags": [{"key": "dagster/partition", "value": policy}]},
    }
    result = graphql(LAUNCH_RUN, {"params": params})["launchRun"]
    assert result["__typename"] == "LaunchRunSuccess", result
    run = result["run"]
    assert run["status"] == "QUEUED", run  # the QueuedRunCoordinator took it
    return str(run["runId"])


# --- what the test reads back -----------------------------------------------------------------


def api_tag_limit(config: Mapping[str, Any]) -> int:
    limits = config["run_coordinator"]["config"]["tag_concurrency_limits"]
    [limit] = [
        entry["limit"]
        for entry in limits
        if entry["key"] == API_TAG_KEY and entry.get("value") == API_TAG_VALUE
    ]
    assert isinstance(limit, int) and limit >= 1, limit
    return limit


@dataclass(frozen=True)
class RunRow:
    run_id: str
    status: str
    start_time: float | None
    end_time: float | None


def runs_in_postgres(server: PostgresServer, database: str) -> list[RunRow]:
    """The run storage's own table, read as the superuser: where the timestamps really are."""
    output = server.psql(
        "SELECT run_id, status, COALESCE(start_time::text, ''), COALESCE(end_time::text, '') "
        "FROM runs ORDER BY create_timestamp",
        database=database,
    )
    rows = []
    for line in output.strip().splitlines():
        run_id, status, start, end = line.split("|")
        rows.append(
            RunRow(run_id, status, float(start) if start else None, float(end) if end else None)
        )
    return rows


def max_overlap(intervals: list[tuple[float, float]]) -> int:
    """The most intervals in progress at one moment (an end before a start at the same time)."""
    events = sorted([(start, 1) for start, _ in intervals] + [(end, -1) for _, end in intervals])
    current = peak = 0
    for _, delta in events:
        current += delta
        peak = max(peak, current)
    return peak


def extend_catalog(catalog_dir: Path, count: int) -> list[str]:
    """At least `count` policies in the catalog copy (more runs than the API tag limit)."""
    names = sorted(load_catalog(catalog_dir))
    template = yaml.safe_load((catalog_dir / f"{names[0]}.yaml").read_text())
    index = 0
    while len(names) < count:
        index += 1
        name = f"deployment_extra_{index}"
        entry = {**template, "policy_name": name}
        (catalog_dir / f"{name}.yaml").write_text(yaml.safe_dump(entry))
        names.append(name)
    return sorted(names)[:count]


# --- the test -----------------------------------------------------------------------------------


def deployment_env(
    postgres: PostgresServer,
    pg_password: str,
    dagster_home: Path,
    simulator: PolicyApiSimulator,
    tmp_path: Path,
    catalog_dir: Path,
) -> dict[str, str]:
    """What an operator exports before running the start scripts (deploy/README.md)."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("POLICY_", "SNOWFLAKE_", "DAGSTER_"))
    }
    code_server_port = free_port()
    webserver_port = free_port()
    while webserver_port in (code_server_port, postgres.port):
        webserver_port = free_port()
    env.update(
        {
            "DAGSTER_HOME": str(dagster_home),
            "DAGSTER_PG_HOST": HOST,
            "DAGSTER_PG_PORT": str(postgres.port),
            "DAGSTER_PG_USERNAME": PG_USER,
            "DAGSTER_PG_PASSWORD": pg_password,
            "DAGSTER_PG_DB": PG_DATABASE,
            "DAGSTER_CODE_SERVER_HOST": HOST,
            "DAGSTER_CODE_SERVER_PORT": str(code_server_port),
            "DAGSTER_WEBSERVER_HOST": HOST,
            "DAGSTER_WEBSERVER_PORT": str(webserver_port),
            "DAGSTER_BIN_DIR": str(Path(sys.executable).parent),
            "POLICY_API_ENDPOINT": simulator.base_url,
            "POLICY_API_KEY": simulator.config.api_key or "",
            "POLICY_WAREHOUSE": "duckdb",
            "POLICY_DUCKDB_PATH": str(tmp_path / "state.duckdb"),
            "POLICY_CATALOG_DIR": str(catalog_dir),
            **FAST_ENV,
            # The runs keep polling while the test holds them (see hold_runs_at_the_limit).
            "POLICY_POLL_MAX_POLLS": "10000",
            "POLICY_POLL_DEADLINE_SECONDS": str(int(RUNS_TIMEOUT_SECONDS)),
            "POLICY_API_MAX_ATTEMPTS": str(API_ATTEMPTS),
        }
    )
    return env


def in_progress(instance: DagsterInstance, limit: int) -> list[DagsterRun]:
    """The runs in progress now, checked against the Policy API tag limit."""
    records = instance.get_run_records(RunsFilter(statuses=list(IN_PROGRESS)))
    runs = [record.dagster_run for record in records]
    tagged = [run for run in runs if run.tags.get(API_TAG_KEY) == API_TAG_VALUE]
    assert len(tagged) <= limit, (
        f"{len(tagged)} runs tagged {API_TAG_KEY}={API_TAG_VALUE} in progress at once, more than "
        f"the limit of {limit}: { {run.run_id: run.status.value for run in tagged} }"
    )
    return runs


def hold_runs_at_the_limit(
    instance: DagsterInstance,
    simulator: PolicyApiSimulator,
    runs: Mapping[str, str],
    limit: int,
    hold_seconds: float,
    services: list[Service],
) -> set[str]:
    """While the Policy API answers "pending" for ever, wait until `limit` runs are polling it,
    then watch for `hold_seconds` (a few dequeue intervals) that the daemon starts no other run;
    then let the policies become ready. Without the tag limit the daemon would have started
    every queued run at its first dequeue. Returns the held runs."""

    def polling_at_the_limit() -> set[str] | None:
        polled = simulator.counts()["per_policy"]
        active = {run.run_id for run in in_progress(instance, limit)}
        at_limit = len(active) == limit and all(
            polled.get(runs[run_id], {}).get("status_requests", 0) > 0 for run_id in active
        )
        return active if at_limit else None

    held: set[str] = wait_for(
        f"{limit} runs polling the Policy API", polling_at_the_limit, RUNS_TIMEOUT_SECONDS, services
    )
    deadline = time.monotonic() + hold_seconds
    while time.monotonic() < deadline:
        active = {run.run_id for run in in_progress(instance, limit)}
        assert active == held, f"a queued run started while the limit was reached: {active}"
        time.sleep(0.5)
    for run_id in set(runs) - held:
        run = instance.get_run_by_id(run_id)
        assert run is not None and run.status == DagsterRunStatus.QUEUED, run
    simulator.configure(ready_after_seconds=0.0)
    return held


def fail_the_next_circuit_call(
    simulator: PolicyApiSimulator, held_policies: list[str], services: list[Service]
) -> None:
    """Once the held runs have triggered their circuit breakers, make the next run's circuit
    breaker call fail every attempt (the first after the API really triggered it), so that run
    fails in its last step and the daemon retries it."""

    def held_circuits_done() -> bool:
        counts = simulator.counts()["per_policy"]
        return all(counts.get(p, {}).get("circuits_triggered", 0) == 1 for p in held_policies)

    wait_for("the held runs' circuit breakers", held_circuits_done, RUNS_TIMEOUT_SECONDS, services)
    faults = [{"endpoint": "circuit", "fault": "5xx", "status": 503, "after_effect": True}]
    faults += [{"endpoint": "circuit", "fault": "5xx", "status": 503}] * (API_ATTEMPTS - 1)
    simulator.configure(scripted_faults=faults)


def test_deployment_queues_limits_and_retries_runs_on_postgres(
    postgres: PostgresServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config_text = (DEPLOY_DIR / "dagster.yaml").read_text()
    config = yaml.safe_load(config_text)
    limit = api_tag_limit(config)
    dequeue_interval = float(config["run_coordinator"]["config"].get("dequeue_interval_seconds", 5))
    assert config["run_retries"]["enabled"] and config["run_retries"]["max_retries"] >= 1
    run_count = limit + 1

    pg_password = secrets.token_urlsafe(18)
    postgres.create_database(PG_DATABASE, user=PG_USER, password=pg_password)
    dagster_home = tmp_path / "dagster_home"
    dagster_home.mkdir()
    (dagster_home / "dagster.yaml").write_text(config_text)  # the real file; only env differs
    catalog_dir = tmp_path / "policies"
    shutil.copytree(CATALOG, catalog_dir)
    policies = extend_catalog(catalog_dir, run_count)
    logs = tmp_path / "logs"
    logs.mkdir()

    api_key = "deploy-key-" + secrets.token_hex(12)
    # Not ready until the test says so (hold_runs_at_the_limit).
    simulator_config = SimulatorConfig(
        api_key=api_key, ready_after_polls=1, ready_after_seconds=1e9
    )
    with ExitStack() as stack:
        simulator = stack.enter_context(PolicyApiSimulator(simulator_config))
        env = deployment_env(postgres, pg_password, dagster_home, simulator, tmp_path, catalog_dir)

        started = time.monotonic()
        code_server = stack.enter_context(service("code-server", "start-code-server.sh", env, logs))
        webserver = stack.enter_context(service("webserver", "start-webserver.sh", env, logs))

        # While they load, the test's own view of the instance: the same dagster.yaml and
        # PostgreSQL. Opening it creates the tables; the policies become partitions as the
        # catalog sensor would add them.
        for name in ("DAGSTER_HOME", *(k for k in env if k.startswith("DAGSTER_PG_"))):
            monkeypatch.setenv(name, env[name])
        instance = stack.enter_context(DagsterInstance.get())
        assert type(instance.run_storage).__name__ == "PostgresRunStorage"
        assert type(instance.event_log_storage).__name__ == "PostgresEventLogStorage"
        assert type(instance.schedule_storage).__name__ == "PostgresScheduleStorage"
        assert type(instance.run_coordinator).__name__ == "QueuedRunCoordinator"
        instance.add_dynamic_partitions(PARTITIONS_NAME, policies)

        servers = [code_server, webserver]
        wait_for(
            "the code server", lambda: code_server_serving(env), START_TIMEOUT_SECONDS, servers
        )
        graphql = GraphQL(f"http://{HOST}:{env['DAGSTER_WEBSERVER_PORT']}/graphql")
        wait_for(
            "the webserver to load the code location",
            lambda: location_loaded(graphql),
            START_TIMEOUT_SECONDS,
            servers,
            interval=2.0,
        )
        assert CATALOG_SENSOR in stop_automation(graphql)

        # No daemon yet: every submitted run waits in the queue.
        runs = {launch_run(graphql, policy): policy for policy in policies}
        for run_id in runs:
            run = instance.get_run_by_id(run_id)
            assert run is not None and run.status == DagsterRunStatus.QUEUED, run
            assert run.tags.get(API_TAG_KEY) == API_TAG_VALUE, (
                f"run {run_id} of {JOB_NAME} lacks the tag {API_TAG_KEY}={API_TAG_VALUE!r} that "
                "dagster.yaml's tag_concurrency_limits protect the Policy API with; the job "
                f"must carry it: define_asset_job(..., tags={{{API_TAG_KEY!r}: "
                f"{API_TAG_VALUE!r}}}). Its tags: {dict(run.tags)}"
            )

        daemon = stack.enter_context(service("daemon", "start-daemon.sh", env, logs))
        services = [code_server, webserver, daemon]
        held = hold_runs_at_the_limit(
            instance, simulator, runs, limit, 2 * dequeue_interval + 2, services
        )
        [last_run] = set(runs) - held
        fail_the_next_circuit_call(simulator, [runs[run_id] for run_id in held], services)

        def all_done() -> list[DagsterRun] | None:
            in_progress(instance, limit)
            every = [record.dagster_run for record in instance.get_run_records()]
            retries = [run for run in every if run.parent_run_id == last_run]
            done = all(run.is_finished for run in every) and any(
                run.status == DagsterRunStatus.SUCCESS for run in retries
            )
            return every if done else None

        every_run = wait_for(
            "the runs and the retry", all_done, RUNS_TIMEOUT_SECONDS, services, 1.0
        )
        elapsed = time.monotonic() - started

        # --- the runs: the submitted ones, and one retry of the run whose last step failed
        statuses = {run.run_id: run.status for run in every_run}
        [retry] = [run for run in every_run if run.run_id not in runs]
        assert retry.parent_run_id == last_run and retry.root_run_id == last_run, retry
        assert retry.tags.get("dagster/retry_number") == "1", retry.tags
        assert retry.tags.get(API_TAG_KEY) == API_TAG_VALUE, retry.tags
        # The three assets are one step: the retry re-runs it, and it resumes at the circuit call.
        assert retry.step_keys_to_execute == ["policy_workflow"], retry
        expected = {run_id: DagsterRunStatus.SUCCESS for run_id in runs}
        expected[last_run] = DagsterRunStatus.FAILURE
        expected[retry.run_id] = DagsterRunStatus.SUCCESS
        assert statuses == expected, _logs(services)
        for run_id in [*runs, retry.run_id]:
            events = {e.dagster_event_type for e in instance.all_logs(run_id)}
            assert events >= QUEUE_PATH - {DagsterEventType.RUN_SUCCESS}, (run_id, events)

        # --- the limit held at every moment: start and end times from PostgreSQL's run table
        rows = runs_in_postgres(postgres, PG_DATABASE)
        assert {row.run_id for row in rows} == set(statuses)
        intervals = [(row.start_time, row.end_time) for row in rows]
        timed = [(start, end) for start, end in intervals if start is not None and end is not None]
        assert len(timed) == len(rows), intervals
        assert max_overlap(timed) <= limit, (
            f"more than {limit} runs tagged {API_TAG_KEY} were in progress at once: {timed}"
        )
        # The queue held the extra run back: it started only after another run had ended.
        assert sorted(start for start, _ in timed)[limit] >= min(end for _, end in timed)

        # --- the warehouse and the Policy API: each policy created and triggered exactly once
        with duckdb.connect(env["POLICY_DUCKDB_PATH"], read_only=True) as conn:
            states = conn.execute(
                "SELECT policy_name, status, circuit_breaker_completed "
                "FROM policy_execution_state ORDER BY policy_name"
            ).fetchall()
        assert states == [(policy, "completed", True) for policy in policies]
        counts = simulator.counts()
        for policy in policies:
            mine = counts["per_policy"][policy]
            assert mine["create_requests"] == 1 and mine["policies_created"] == 1, mine
            assert mine["circuits_triggered"] == 1, mine
            assert mine["duplicate_circuit_triggers"] == 0, mine
            # The failed run tried API_ATTEMPTS times; its retry re-sent the same idempotency
            # key once and got the original answer back.
            calls = API_ATTEMPTS + 1 if policy == runs[last_run] else 1
            assert mine["circuit_requests"] == calls, (policy, mine)
        assert counts["replays"]["circuit"] == 1, counts["replays"]

        # --- no secret in the configuration or in any process's output
        assert pg_password not in (dagster_home / "dagster.yaml").read_text()
        for svc in services:
            text = svc.log()
            assert pg_password not in text, f"{svc.name} logged the PostgreSQL password"
            assert api_key not in text, f"{svc.name} logged the Policy API key"
        print(f"{len(every_run)} runs (limit {limit}, one retry) done in {elapsed:.1f}s")


def _logs(services: list[Service]) -> str:
    return "\n".join(f"--- {s.name}:\n{s.log()[-3000:]}" for s in services)
