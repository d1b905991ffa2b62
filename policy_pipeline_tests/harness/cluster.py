"""The Celery layout of deploy/ (deploy/README.md, "Many machines: Celery") on test hosts.

`celery_cluster` starts the services host (`hosts.TestHosts.start_services`), a control host
running deploy/start-code-server.sh, start-webserver.sh and start-daemon.sh, and N worker hosts
each running deploy/start-worker.sh, every one with deploy/celery/dagster.yaml unchanged in a
DAGSTER_HOME of its own and exactly the environment deploy/celery/*.env.example lists. The
warehouse is the services host's fakesnow (Snowflake's protocol), the Policy API its simulator.

The schedules and sensors that run by default are switched off through the webserver before the
daemon starts (the catalog sensor would launch the whole catalog at its first tick), unless
named in ``keep_automation``. The test process gets a `DagsterInstance` on the same PostgreSQL
(`Cluster.instance`), GraphQL on the webserver (`Cluster.graphql`) and SQL on the warehouse
(`Cluster.query`).

Usage::

    with celery_cluster(tmp_path, catalog_dir, SimulatorConfig(...), workers=2) as cluster:
        backfill_id = cluster.launch_backfill(names, assets)
        cluster.wait_backfill(backfill_id, timeout=150)
        cluster.hosts.kill_host("worker-1")

The daemon looks at backfills every 30 s (Dagster's fixed interval), from the moment it starts.
A test that launches its first backfill right away starts the cluster with
``start_daemon=False``, launches, then calls `Cluster.start_daemon`: the daemon's first pass
takes the backfill up at once.
"""

from __future__ import annotations

import os
import secrets
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import yaml
from dagster import DagsterInstance, DagsterRun, RunsFilter

from policy_devtools.simulator import SimulatorConfig
from policy_pipeline.core.settings import PROJECT_ROOT
from policy_pipeline_tests.harness.graphql import (
    AUTOMATION_QUERY,
    LAUNCH_BACKFILL,
    LOCATIONS_QUERY,
    STOP_SCHEDULE,
    STOP_SENSOR,
)
from policy_pipeline_tests.harness.hosts import Proc, Services, TestHosts, test_hosts

DEPLOY_DIR = PROJECT_ROOT / "deploy"
CELERY_INSTANCE = DEPLOY_DIR / "celery" / "dagster.yaml"
CONTROL = "control"
LOCATION = "policy_pipeline"
REPOSITORY = "__repository__"
CODE_SERVER_PORT = 4000
WEBSERVER_PORT = 3000
START_TIMEOUT_SECONDS = 180.0


class GraphQL:
    def __init__(self, url: str) -> None:
        self.url = url

    def __call__(self, query: str, variables: Mapping[str, Any] | None = None) -> Any:
        response = httpx.post(
            self.url, json={"query": query, "variables": dict(variables or {})}, timeout=60.0
        )
        response.raise_for_status()
        body = response.json()
        if body.get("errors"):
            raise AssertionError(f"GraphQL errors: {body['errors']}")
        return body["data"]


@dataclass
class Cluster:
    hosts: TestHosts
    services: Services
    instance: DagsterInstance
    graphql: GraphQL
    workers: list[str]
    env: dict[str, str]  # what every host has in common (control's and workers' base)
    control_env: dict[str, str]
    processes: dict[str, Proc] = field(default_factory=dict)  # "<host>/<name>" -> process

    def start_daemon(self) -> None:
        _start(self.hosts, self.processes, CONTROL, "start-daemon.sh", self.control_env)

    def logs(self, tail: int = 3000) -> str:
        return "\n".join(
            f"--- {key}:\n{proc.log()[-tail:]}" for key, proc in self.processes.items()
        )

    def check_alive(self, *, except_hosts: Sequence[str] = ()) -> None:
        for key, proc in self.processes.items():
            gone = proc.host in except_hosts or self.hosts.hosts[proc.host].killed
            if not gone and not proc.alive():
                raise AssertionError(f"{key} exited:\n{proc.log()[-4000:]}")

    def wait_for(self, what: str, condition: Callable[[], Any], timeout: float) -> Any:
        """Poll `condition` until it returns something true; fail with every log otherwise."""
        deadline = time.monotonic() + timeout
        last: Exception | None = None
        while time.monotonic() < deadline:
            self.check_alive()
            try:
                result = condition()
            except (httpx.HTTPError, OSError) as exc:
                last, result = exc, None
            if result:
                return result
            time.sleep(1.0)
        raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what} ({last})\n"
                             + self.logs())  # fmt: skip

    def launch_backfill(
        self,
        partitions: Sequence[str],
        assets: Sequence[str],
        tags: Mapping[str, str] | None = None,
    ) -> str:
        """A backfill as the UI's *Materialize* launches it (the daemon runs it); `tags` go
        on the backfill and its runs (e.g. ``dagster/max_retries``)."""
        params: dict[str, Any] = {
            "partitionNames": list(partitions),
            "assetSelection": [{"path": [asset]} for asset in assets],
        }
        if tags:
            params["tags"] = [{"key": key, "value": value} for key, value in tags.items()]
        result = self.graphql(LAUNCH_BACKFILL, {"params": params})["launchPartitionBackfill"]
        assert result["__typename"] == "LaunchBackfillSuccess", result
        return str(result["backfillId"])

    def backfill_runs(self, backfill_id: str) -> list[DagsterRun]:
        return list(self.instance.get_runs(RunsFilter(tags={"dagster/backfill": backfill_id})))

    def wait_backfill(self, backfill_id: str, timeout: float) -> list[DagsterRun]:
        """Wait until the backfill is done (every run requested and finished)."""

        def done() -> list[DagsterRun] | None:
            backfill = self.instance.get_backfill(backfill_id)
            runs = self.backfill_runs(backfill_id)
            finished = backfill is not None and backfill.status.value != "REQUESTED"
            return runs if finished and runs and all(r.is_finished for r in runs) else None

        result: list[DagsterRun] = self.wait_for(f"backfill {backfill_id}", done, timeout)
        return result

    def wait_backfill_runs(
        self, backfill_id: str, partitions: Sequence[str], timeout: float
    ) -> list[DagsterRun]:
        """Wait until the backfill's runs have ended and between them covered `partitions` (in
        their registration order): sooner than `wait_backfill`, since the daemon marks a
        backfill done only at its next pass."""
        position = {name: i for i, name in enumerate(partitions)}

        def covered(run: DagsterRun) -> set[str]:
            tags = run.tags
            if "dagster/partition" in tags:
                return {tags["dagster/partition"]}
            start = position[tags["dagster/asset_partition_range_start"]]
            end = position[tags["dagster/asset_partition_range_end"]]
            return set(partitions[start : end + 1])

        def done() -> list[DagsterRun] | None:
            runs = self.backfill_runs(backfill_id)
            if not runs or not all(run.is_finished for run in runs):
                return None
            return runs if set().union(*map(covered, runs)) >= set(partitions) else None

        result: list[DagsterRun] = self.wait_for(f"backfill {backfill_id}'s runs", done, timeout)
        return result

    def query(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        """SQL on the warehouse (fakesnow in the services host) from the test process."""
        import snowflake.connector

        env = self.env
        with snowflake.connector.connect(
            account=env["SNOWFLAKE_ACCOUNT"],
            user=env["SNOWFLAKE_USER"],
            password=env["SNOWFLAKE_PASSWORD"],
            warehouse=env["SNOWFLAKE_WAREHOUSE"],
            role=env["SNOWFLAKE_ROLE"],
            database=env["SNOWFLAKE_DATABASE"],
            schema=env["SNOWFLAKE_SCHEMA"],
            host=env["SNOWFLAKE_HOST"],
            port=int(env["SNOWFLAKE_PORT"]),
            protocol="http",
            platform_detection_timeout_seconds=0.0,
            login_timeout=30,
        ) as conn:
            cursor = conn.cursor()
            cursor.execute(sql, list(params))
            return list(cursor.fetchall())


def _base_env(services: Services, catalog_dir: Path, extra: Mapping[str, str]) -> dict[str, str]:
    """What every host of the layout has: Dagster's storage, the broker, the runs' settings."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("POLICY_", "SNOWFLAKE_", "DAGSTER_", "PYTEST_", "CELERY"))
    }
    env.update(services.dagster_pg_env())
    env.update(services.snowflake_env(schema=f"POLICY_{secrets.token_hex(4).upper()}"))
    env.update(
        {
            "DAGSTER_CELERY_BROKER_URL": services.broker_url,
            "DAGSTER_CELERY_BACKEND_URL": services.backend_url,
            "DAGSTER_BIN_DIR": str(Path(sys.executable).parent),
            "POLICY_API_ENDPOINT": services.api_url,
            "POLICY_API_KEY": services.api_key,
            "POLICY_WAREHOUSE": "snowflake",
            "POLICY_CATALOG_DIR": str(catalog_dir),
            **extra,
        }
    )
    return env


def _dagster_home(root: Path, host: str, overrides: Mapping[str, Any] | None = None) -> Path:
    home = root / "hosts" / host / "dagster_home"
    home.mkdir(parents=True)
    if not overrides:
        (home / "dagster.yaml").write_text(CELERY_INSTANCE.read_text())  # as it is
    else:
        merged = _merged(yaml.safe_load(CELERY_INSTANCE.read_text()), overrides)
        (home / "dagster.yaml").write_text(yaml.safe_dump(merged))
    return home


def _merged(base: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """`base` with `overrides` merged in, mapping by mapping (e.g. a shorter poll interval)."""
    merged = dict(base)
    for key, value in overrides.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = _merged(merged[key], value)
        else:
            merged[key] = value
    return merged


def _location_loaded(graphql: GraphQL) -> bool:
    data = graphql(LOCATIONS_QUERY)["workspaceOrError"]
    entries = {e["name"]: e for e in data.get("locationEntries", [])}
    entry = entries.get(LOCATION)
    error = entry and entry["locationOrLoadError"]
    if not entry or entry["loadStatus"] != "LOADED" or not error:
        return False
    if error["__typename"] == "RepositoryLocation":
        return True
    assert "DagsterUserCodeUnreachableError" in str(error.get("message")), error
    return False


def stop_automation(graphql: GraphQL, keep: Sequence[str] = ()) -> list[str]:
    """Switch off the schedules and sensors that are on by default, except `keep`."""
    selector = {"repositoryName": REPOSITORY, "repositoryLocationName": LOCATION}
    repository = graphql(AUTOMATION_QUERY, {"selector": selector})["repositoryOrError"]
    assert repository["__typename"] == "Repository", repository
    stopped = []
    for kind, mutation in (("sensors", STOP_SENSOR), ("schedules", STOP_SCHEDULE)):
        for item in repository[kind]:
            state = item["sensorState" if kind == "sensors" else "scheduleState"]
            if state["status"] == "RUNNING" and item["name"] not in keep:
                graphql(mutation, {"id": state["id"]})
                stopped.append(item["name"])
    return stopped


@contextmanager
def celery_cluster(
    workdir: Path,
    catalog_dir: Path,
    simulator: SimulatorConfig,
    workers: int = 2,
    env: Mapping[str, str] | None = None,
    worker_env: Mapping[str, Mapping[str, str]] | None = None,
    keep_automation: Sequence[str] = (),
    instance_yaml: Mapping[str, Any] | None = None,
    start_daemon: bool = True,
) -> Iterator[Cluster]:
    """Services, a control host and `workers` worker hosts (``worker-1`` ...), all started and
    ready (the code location loaded, every worker listening on the queue). `env` is added to
    every host's environment, `worker_env[name]` to one worker's. Everything is removed on
    exit. `instance_yaml` is merged into every host's dagster.yaml (e.g. ``{"run_monitoring":
    {"poll_interval_seconds": 2}}``); without it the file is used as it is. With
    `start_daemon` false the daemon waits for `Cluster.start_daemon`."""
    with ExitStack() as stack:
        hosts = stack.enter_context(test_hosts(workdir / "hosts"))
        services = hosts.start_services(simulator)
        hosts.add_host(CONTROL)
        names = [f"worker-{i}" for i in range(1, workers + 1)]
        for name in names:
            hosts.add_host(name)
        base = _base_env(services, catalog_dir, env or {})
        control_address = hosts.hosts[CONTROL].address
        control_env = {
            **base,
            "DAGSTER_HOME": str(_dagster_home(workdir, CONTROL, instance_yaml)),
            "DAGSTER_CODE_SERVER_HOST": "127.0.0.1",
            "DAGSTER_CODE_SERVER_PORT": str(CODE_SERVER_PORT),
            "DAGSTER_WEBSERVER_HOST": control_address,
            "DAGSTER_WEBSERVER_PORT": str(WEBSERVER_PORT),
        }
        processes: dict[str, Proc] = {}
        _start(hosts, processes, CONTROL, "start-code-server.sh", control_env)
        _start(hosts, processes, CONTROL, "start-webserver.sh", control_env)
        # The test's own view of the instance: the same dagster.yaml and PostgreSQL.
        saved = {k: os.environ.get(k) for k in control_env if k.startswith("DAGSTER_")}
        os.environ.update({k: v for k, v in control_env.items() if k.startswith("DAGSTER_")})
        stack.callback(_restore_env, saved)
        instance = stack.enter_context(DagsterInstance.get())
        graphql = GraphQL(f"http://{control_address}:{WEBSERVER_PORT}/graphql")
        cluster = Cluster(hosts, services, instance, graphql, names, base, control_env, processes)
        cluster.wait_for(
            "the code location", lambda: _location_loaded(graphql), START_TIMEOUT_SECONDS
        )
        stop_automation(graphql, keep_automation)
        if start_daemon:
            cluster.start_daemon()
        started = []
        for name in names:
            home = str(_dagster_home(workdir, name, instance_yaml))
            extra = (worker_env or {}).get(name, {})
            host_env = {**base, "DAGSTER_HOME": home, **extra}
            started.append(_start(hosts, processes, name, "start-worker.sh", host_env))
        for worker in started:
            cluster.wait_for(
                f"{worker.host}'s Celery worker", _ready(worker), START_TIMEOUT_SECONDS
            )
        yield cluster


def _start(
    hosts: TestHosts,
    processes: dict[str, Proc],
    host: str,
    script: str,
    host_env: Mapping[str, str],
) -> Proc:
    """Run a deploy/ start script on a host, as its operator would."""
    proc = hosts.spawn(host, ["bash", str(DEPLOY_DIR / script)], host_env, script)
    processes[f"{host}/{script}"] = proc
    return proc


def _ready(worker: Proc) -> Callable[[], bool]:
    """Celery logs "<name>@<host> ready." once it consumes from the queue."""
    return lambda: " ready." in worker.log()


def _restore_env(saved: Mapping[str, str | None]) -> None:
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
