"""Shared fixtures: the Policy API simulator on an ephemeral loopback port, a warehouse (a
temporary DuckDB file, or a schema on a local fakesnow server reached through the real
Snowflake connector), a temporary catalog, and a way to run the real job from the real
Definitions.

Tests marked ``both_warehouses`` run once per warehouse; the others on DuckDB only."""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from dagster import (
    AssetKey,
    DagsterInstance,
    ExecuteInProcessResult,
    RunRequest,
    SensorResult,
    SkipReason,
)

from policy_devtools.simulator import PolicyApiSimulator, SimulatorConfig
from policy_pipeline.core.catalog import load_catalog
from policy_pipeline.core.settings import PROJECT_ROOT, Settings
from policy_pipeline.core.store.dialect import SqlDialect, Statement
from policy_pipeline.defs.workflow.partitions import (
    PARTITIONS_NAME,
    contiguous_ranges,
    partition_tags,
)
from policy_pipeline.resources import open_state
from policy_pipeline_tests.harness.client_rig import clear_proxies
from policy_pipeline_tests.harness.fakesnow_server import FakesnowServer, fakesnow_server

CATALOG = PROJECT_ROOT / "policies"
CATALOG_POLICIES = sorted(load_catalog(CATALOG))

# Fast polling and retries for tests; the defaults are for real APIs.
FAST_ENV = {
    "POLICY_POLL_INITIAL_INTERVAL_SECONDS": "0.05",
    "POLICY_POLL_MAX_INTERVAL_SECONDS": "0.2",
    "POLICY_POLL_MAX_POLLS": "20",
    "POLICY_POLL_DEADLINE_SECONDS": "30",
    "POLICY_API_BACKOFF_INITIAL_SECONDS": "0.01",
    "POLICY_API_BACKOFF_MAX_SECONDS": "0.05",
    "POLICY_API_TIMEOUT_SECONDS": "2",
    "POLICY_LEASE_WAIT_SECONDS": "5",
}


# A real account, when one is configured: the live smoke test runs the same scenarios on it.
LIVE_SNOWFLAKE_ENV = {k: v for k, v in os.environ.items() if k.startswith("SNOWFLAKE_")}


# The files that take longest (mostly waiting) start first, so that with several workers
# (`./dev.sh test`) the others run beside them instead of after them.
SLOW_FIRST = ("test_hands_off.py", "test_ui_browser.py", "test_deployment.py")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    def rank(item: pytest.Item) -> int:
        name = item.path.name
        return SLOW_FIRST.index(name) if name in SLOW_FIRST else len(SLOW_FIRST)

    items.sort(key=rank)  # stable: within a rank, the collection order


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "warehouse" in metafunc.fixturenames:
        params = ["duckdb"]
        if metafunc.definition.get_closest_marker("both_warehouses"):
            params.append("snowflake")
        if metafunc.definition.get_closest_marker("live_snowflake"):
            params.append("snowflake-live")
        metafunc.parametrize("warehouse", params)


@pytest.fixture(scope="session")
def fakesnow() -> Iterator[FakesnowServer]:
    """One local fakesnow server for the session; each test gets a schema of its own."""
    with fakesnow_server() as server:
        yield server


@pytest.fixture
def simulator() -> Iterator[PolicyApiSimulator]:
    config = SimulatorConfig(api_key="sim-key-" + secrets.token_hex(12), ready_after_polls=1)
    with PolicyApiSimulator(config) as sim:
        yield sim


SimFactory = Callable[..., PolicyApiSimulator]


def simulators(**defaults: Any) -> Iterator[SimFactory]:
    """The body of a `make_sim` fixture: simulators started with the given config fields (over
    ``defaults``), every one stopped after the test."""
    started: list[PolicyApiSimulator] = []

    def _make(**config: Any) -> PolicyApiSimulator:
        sim = PolicyApiSimulator(SimulatorConfig.from_dict({**defaults, **config})).start()
        started.append(sim)
        return sim

    yield _make
    for sim in started:
        sim.stop()


@pytest.fixture
def make_sim() -> Iterator[SimFactory]:
    """Start simulators with the given config fields; all are stopped after the test."""
    yield from simulators()


@pytest.fixture
def no_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    """No proxy variables in the environment (``pytest.mark.usefixtures("no_proxy")``): the
    client's requests session honours them, and loopback traffic must not use one."""
    clear_proxies(monkeypatch)


@dataclass
class Workspace:
    """One isolated installation: catalog, DuckDB file, environment, Dagster instance."""

    root: Path
    simulator: PolicyApiSimulator
    env: dict[str, str]
    warehouse: str = "duckdb"
    fakesnow: FakesnowServer | None = None
    instance: DagsterInstance = field(default_factory=DagsterInstance.ephemeral)

    @property
    def dialect(self) -> SqlDialect:
        return SqlDialect(self.warehouse)

    @property
    def catalog_dir(self) -> Path:
        return Path(self.env["POLICY_CATALOG_DIR"])

    @property
    def duckdb_path(self) -> Path:
        return Path(self.env["POLICY_DUCKDB_PATH"])

    @property
    def api_key(self) -> str:
        return self.env["POLICY_API_KEY"]

    def definitions(self) -> Any:
        from policy_pipeline.core.settings import Settings
        from policy_pipeline.definitions import build_definitions

        return build_definitions(Settings.from_env())

    def run(
        self,
        partitions: list[str] | None = None,
        run_config: Mapping[str, Any] | None = None,
        selection: list[str] | None = None,
        tags: Mapping[str, str] | None = None,
    ) -> ExecuteInProcessResult:
        """Run policy_workflow_job (or a subset of its assets) for some partitions."""
        keys = partitions or CATALOG_POLICIES
        defs = self.definitions()
        job = defs.resolve_job_def("policy_workflow_job")
        known = self.instance.get_dynamic_partitions(PARTITIONS_NAME)
        self.instance.add_dynamic_partitions(PARTITIONS_NAME, [k for k in keys if k not in known])
        ordered = self.instance.get_dynamic_partitions(PARTITIONS_NAME)
        [(first, last)] = contiguous_ranges(ordered, set(keys))
        return job.execute_in_process(
            instance=self.instance,
            tags={**partition_tags(first, last), **(tags or {})},
            run_config=run_config,
            raise_on_error=False,
            asset_selection=[AssetKey(a) for a in selection] if selection else None,
        )

    def query(self, sql: str, params: list[Any] | None = None) -> list[tuple[Any, ...]]:
        """Run test SQL, written in Snowflake's dialect with ``?`` placeholders, on this
        workspace's warehouse through the project's own warehouse layer (translated for DuckDB;
        the real connector for Snowflake)."""
        with open_state(Settings.from_env()) as state, state.warehouse().session() as session:
            return session.rows(Statement("test_query", sql), params or [])

    def executions(self, policy_name: str) -> list[dict[str, Any]]:
        cols = [
            "execution_id",
            "policy_id",
            "status",
            "poll_count",
            "completed",
            "circuit_breaker_initiated",
            "circuit_breaker_completed",
            "error_message",
            "resumable",
        ]
        quoted = ", ".join(f'"{c}"' for c in cols)
        rows = self.query(
            f"SELECT {quoted} FROM policy_execution_state "
            'WHERE "policy_name" = ? ORDER BY "start_time"',
            [policy_name],
        )
        return [dict(zip(cols, row, strict=True)) for row in rows]


@pytest.fixture
def workspace(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    simulator: PolicyApiSimulator,
    warehouse: str,
    request: pytest.FixtureRequest,
) -> Workspace:
    catalog = tmp_path / "policies"
    shutil.copytree(CATALOG, catalog)
    env = {
        "POLICY_API_ENDPOINT": simulator.base_url,
        "POLICY_API_KEY": simulator.config.api_key or "",
        "POLICY_WAREHOUSE": warehouse,
        "POLICY_DUCKDB_PATH": str(tmp_path / "state.duckdb"),
        "POLICY_CATALOG_DIR": str(catalog),
        **FAST_ENV,
    }
    server: FakesnowServer | None = None
    if warehouse == "snowflake":
        server = request.getfixturevalue("fakesnow")
        env.update(server.env())
        # fakesnow accepts any password: a distinctive one lets tests scan for leaks.
        env["SNOWFLAKE_PASSWORD"] = f"fakesnow-pw-{secrets.token_hex(8)}"
    elif warehouse == "snowflake-live":
        if not LIVE_SNOWFLAKE_ENV.get("SNOWFLAKE_ACCOUNT"):
            pytest.skip("live Snowflake smoke test: set SNOWFLAKE_ACCOUNT (and the rest) to run")
        env.update(LIVE_SNOWFLAKE_ENV)
        env["POLICY_WAREHOUSE"] = "snowflake"
    if warehouse != "duckdb":
        # A schema of its own per test: fakesnow creates it at login; on a real account the
        # test creates it and drops it afterwards.
        env["SNOWFLAKE_SCHEMA"] = f"POLICY_TEST_{secrets.token_hex(6).upper()}"
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    workspace = Workspace(
        root=tmp_path,
        simulator=simulator,
        env=env,
        warehouse=warehouse.removesuffix("-live"),
        fakesnow=server,
    )
    if warehouse == "snowflake-live":
        request.addfinalizer(_live_schema(env["SNOWFLAKE_SCHEMA"]))
    return workspace


def _live_schema(schema: str) -> Callable[[], None]:
    """Create the test's schema on the real account; returns the finalizer that drops it."""

    def connect() -> Any:
        from policy_pipeline.resources.snowflake_state import snowflake_resource

        resource = snowflake_resource(Settings.from_env()).process_config_and_initialize()
        return resource.get_connection()

    with connect() as conn:
        conn.cursor().execute(f'CREATE SCHEMA IF NOT EXISTS "{schema}"')

    def drop() -> None:
        with connect() as conn:
            conn.cursor().execute(f'DROP SCHEMA IF EXISTS "{schema}"')

    return drop


def subprocess_env(workspace: Workspace, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("POLICY_", "SNOWFLAKE_"))}
    env.update(workspace.env)
    env["DAGSTER_HOME"] = str(workspace.root / "dagster_home")
    Path(env["DAGSTER_HOME"]).mkdir(exist_ok=True)
    env.update(extra)
    return env


# The instance as `dagster dev` or a plain DAGSTER_HOME without a daemon would need it: runs
# start at once, each in a process of its own (Dagster's default is a queue for the daemon).
DEFAULT_LAUNCHER = """\
run_coordinator:
  module: dagster.core.run_coordinator
  class: DefaultRunCoordinator
run_launcher:
  module: dagster.core.launcher
  class: DefaultRunLauncher
telemetry:
  enabled: false
"""


def encrypted_pem(passphrase: str) -> str:
    """A new RSA private key as Snowflake key-pair authentication takes it: a PKCS#8 PEM,
    encrypted with ``passphrase``."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(passphrase.encode()),
    ).decode()


def dagster_home(workspace: Workspace, config: str = DEFAULT_LAUNCHER) -> Path:
    """The DAGSTER_HOME the CLI runs with (``subprocess_env``), with this dagster.yaml."""
    home = workspace.root / "dagster_home"
    home.mkdir(exist_ok=True)
    (home / "dagster.yaml").write_text(config)
    return home


def run_cli(
    workspace: Workspace, *args: str, env: Mapping[str, str] | None = None, timeout: float = 900
) -> subprocess.CompletedProcess[str]:
    """``policy-pipeline ARGS`` as an operator types it, in the workspace's environment (or
    ``env``)."""
    return subprocess.run(
        [sys.executable, "-m", "policy_pipeline.cli", *args],
        cwd=PROJECT_ROOT,
        env=subprocess_env(workspace) if env is None else dict(env),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def job_command(*args: str, job: str = "policy_workflow_job") -> list[str]:
    """``dagster job execute`` of one job of the code location, as an operator types it."""
    return [
        *(sys.executable, "-m", "dagster", "job", "execute"),
        *("-m", "policy_pipeline.definitions"),
        *("-j", job, *args),
    ]


def run_job(
    env: Mapping[str, str], *args: str, job: str = "policy_workflow_job", timeout: float = 600
) -> subprocess.CompletedProcess[str]:
    """`job_command` run to its end in ``env``, its output captured."""
    return subprocess.run(
        job_command(*args, job=job),
        cwd=PROJECT_ROOT,
        env=dict(env),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def requested_runs(result: SensorResult | SkipReason) -> list[RunRequest]:
    """The runs a sensor tick requested."""
    return list(result.run_requests or []) if isinstance(result, SensorResult) else []


def launch_requested(workspace: Workspace, request: RunRequest) -> ExecuteInProcessResult:
    """A requested run, as the sensor daemon would launch it."""
    job = workspace.definitions().resolve_job_def("policy_workflow_job")
    tags = dict(request.tags)
    if request.partition_key is not None:
        tags["dagster/partition"] = request.partition_key
    return job.execute_in_process(
        instance=workspace.instance,
        tags=tags,
        asset_selection=list(request.asset_selection) if request.asset_selection else None,
        raise_on_error=False,
    )


class RecordingLog:
    """The engine's logger, keeping the warnings for assertions."""

    def __init__(self) -> None:
        self.warnings: list[str] = []

    def info(self, msg: str) -> None:
        pass

    def warning(self, msg: str) -> None:
        self.warnings.append(msg)
