"""The dbt reporting project: models built for real on DuckDB (and on a local fakesnow server),
a failing data test, the manifest preparation, and the Dagster asset definitions.

Every warehouse here is a temporary one; dbt's artifacts and logs go to temporary folders.
"""

import json
import os
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import duckdb
import pytest
from dagster import (
    AssetKey,
    AssetsDefinition,
    Definitions,
    StaticPartitionsDefinition,
    asset,
    materialize,
)

from policy_pipeline.core.settings import PROJECT_ROOT, Settings, SettingsError
from policy_pipeline.core.store import schema as store_schema
from policy_pipeline.core.store.dialect import SqlDialect
from policy_pipeline.defs.reporting import dbt_assets
from policy_pipeline.defs.reporting.project import DBT_PROJECT_DIR, policy_dbt_project
from policy_pipeline.resources import state_resource
from policy_pipeline_tests.harness.fakesnow_server import FakesnowServer

DBT = str(Path(sys.executable).parent / "dbt")
PROJECT_DIR = DBT_PROJECT_DIR

RESULTS = AssetKey(["policy_execution_results"])
DAILY = AssetKey(["policy_execution_daily_stats"])
WORKFLOW = AssetKey(["circuit_breaker_activation"])

D1 = datetime(2025, 1, 10)
D2 = datetime(2025, 1, 11)
D3 = datetime(2025, 1, 12)


# --- Test data: a realistic mix of executions with their audit events ---------------------------


@dataclass
class Execution:
    execution_id: str
    policy_name: str
    status: str
    start: datetime
    created_after: float | None = None  # seconds after start
    ready_after: float | None = None
    completed_after: float | None = None
    polls: int = 0
    # HTTP status of each API call, in order (None: no response, e.g. a timeout).
    api_calls: Sequence[int | None] = ()
    error_step: str | None = None
    error_message: str | None = None
    transitions: Sequence[tuple[str, str]] = field(default_factory=tuple)

    def at(self, seconds: float | None) -> datetime | None:
        return None if seconds is None else self.start + timedelta(seconds=seconds)

    def state_row(self) -> dict[str, Any]:
        completed = self.status == "completed"
        return {
            "execution_id": self.execution_id,
            "policy_name": self.policy_name,
            "policy_id": f"pol-{self.execution_id}" if self.created_after is not None else None,
            "status": self.status,
            "poll_count": self.polls,
            "completed": completed,
            "circuit_breaker_completed": completed,
            "error_step": self.error_step,
            "error_message": self.error_message,
            "message": f"{self.policy_name}: {self.status}",
            "start_time": self.start,
            "policy_created_time": self.at(self.created_after),
            "policy_ready_time": self.at(self.ready_after),
            "completed_time": self.at(self.completed_after),
            "last_poll_time": self.at(self.ready_after) if self.polls else None,
            "updated_time": self.start,
        }

    def event_rows(self) -> list[dict[str, Any]]:
        rows: list[dict[str, Any]] = []
        for i, status in enumerate(self.api_calls):
            rows.append(
                {
                    "event_id": f"{self.execution_id}-api-{i}",
                    "execution_id": self.execution_id,
                    "policy_name": self.policy_name,
                    "event_time": self.start + timedelta(seconds=i),
                    "event_type": "api_call",
                    "endpoint": "/policies",
                    "http_method": "POST" if i == 0 else "GET",
                    "http_status": status,
                    "latency_ms": 120.5,
                    "attempt": 1,
                    "outcome": "ok" if status is not None and status < 400 else "error",
                }
            )
        for i, (before, after) in enumerate(self.transitions):
            rows.append(
                {
                    "event_id": f"{self.execution_id}-tr-{i}",
                    "execution_id": self.execution_id,
                    "policy_name": self.policy_name,
                    "event_time": self.start + timedelta(seconds=100 + i),
                    "event_type": "transition",
                    "from_status": before,
                    "to_status": after,
                }
            )
        return rows


DONE = (
    ("pending", "policy_created"),
    ("policy_created", "policy_ready"),
    ("policy_ready", "completed"),
)

# Compact by hand: one execution per block, its step timings on one line.
# fmt: off
EXECUTIONS = (
    # Day 1: three completed, one failed, one still polling.
    Execution(
        "e1", "alpha", "completed", D1.replace(hour=10),
        created_after=2.5, ready_after=60, completed_after=70.25, polls=3,
        api_calls=(201, 200, 200, 200, 200), transitions=DONE,
    ),
    # Starts just before a second boundary: 0.2 s to creation, not the 1 that a whole-second
    # DATEDIFF would count.
    Execution(
        "e2", "beta", "completed", D1.replace(hour=11, microsecond=900_000),
        created_after=0.2, ready_after=30, completed_after=40, polls=2,
        api_calls=(201, 503, 200, 200), transitions=DONE,
    ),
    Execution(
        "e3", "gamma", "completed", D1.replace(hour=12),
        created_after=5, ready_after=90, completed_after=100, polls=6,
        api_calls=(201, 200, 200, 200, 200, 200, 200, 200), transitions=DONE,
    ),
    Execution(
        "e4", "delta", "error", D1.replace(hour=13),
        created_after=2, polls=1, api_calls=(201, 200, 500),
        error_step="policy_ready", error_message="policy failed validation",
        transitions=(("pending", "policy_created"), ("policy_created", "error")),
    ),
    Execution(
        "e5", "epsilon", "policy_created", D1.replace(hour=14),
        created_after=3, polls=4, api_calls=(201, 200, 200, 200, 200),
        transitions=(("pending", "policy_created"),),
    ),
    # Day 2: one completed, two failed before the policy was created.
    Execution(
        "e6", "alpha", "completed", D2.replace(hour=9),
        created_after=1, ready_after=20, completed_after=55.5, polls=1,
        api_calls=(201, 200, 200), transitions=DONE,
    ),
    Execution(
        "e7", "beta", "error", D2.replace(hour=9, minute=30),
        api_calls=(500, None, 503), error_step="policy_created", error_message="create failed",
        transitions=(("pending", "error"),),
    ),
    Execution(
        "e8", "gamma", "error", D2.replace(hour=10),
        api_calls=(400,), error_step="policy_created", error_message="bad request",
        transitions=(("pending", "error"),),
    ),
    # Day 3: one execution, not started yet (no events at all).
    Execution("e9", "zeta", "pending", D3.replace(hour=8)),
)
# fmt: on


def _inserts(placeholder: str) -> Iterator[tuple[str, tuple[Any, ...]]]:
    """INSERT statements (one per row) for the test data, with the connector's placeholder."""
    for execution in EXECUTIONS:
        for table, row in [(store_schema.STATE.name, execution.state_row())] + [
            (store_schema.EVENTS.name, event) for event in execution.event_rows()
        ]:
            columns = ", ".join(f'"{c}"' for c in row)
            values = ", ".join(placeholder for _ in row)
            yield f"INSERT INTO {table} ({columns}) VALUES ({values})", tuple(row.values())


def create_duckdb_warehouse(path: Path, *, duplicate: str | None = None) -> Path:
    """A DuckDB file with the workflow's tables (DDL from the store) and the rows."""
    with duckdb.connect(str(path)) as con:
        for table in store_schema.TABLES:
            con.execute(store_schema.create_table(table).render(SqlDialect.DUCKDB))
        for statement, params in _inserts("?"):
            con.execute(statement, params)
        if duplicate is not None:
            # The same execution recorded twice: what the unique tests are there to catch.
            con.execute(
                f"INSERT INTO {store_schema.STATE.name} SELECT * FROM {store_schema.STATE.name} "
                f'WHERE "execution_id" = ?',
                [duplicate],
            )
    return path


def run_dbt(
    args: Sequence[str], env: Mapping[str, str], work: Path
) -> subprocess.CompletedProcess[str]:
    """The real dbt CLI on the real project, with its artifacts and logs under ``work``."""
    return subprocess.run(
        [
            DBT,
            *args,
            "--project-dir",
            str(PROJECT_DIR),
            "--profiles-dir",
            str(PROJECT_DIR),
            "--target-path",
            str(work / "target"),
        ],
        env={
            **os.environ,
            "DBT_LOG_PATH": str(work / "logs"),
            "DBT_SEND_ANONYMOUS_USAGE_STATS": "false",
            **env,
        },
        cwd=PROJECT_DIR,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )


def query(con: Any, statement: str) -> list[dict[str, Any]]:
    """Rows as dicts, keyed by the column names the warehouse returns."""
    cursor = con.cursor() if not isinstance(con, duckdb.DuckDBPyConnection) else con
    cursor.execute(statement)
    names = [d[0] for d in cursor.description]
    return [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]


# `IS NULL` in SQL rather than reading the timestamp: fakesnow's server returns a NULL
# TIMESTAMP_NTZ to the connector as 1970-01-01 00:00:00 (the stored value is NULL).
RESULTS_QUERY = (
    'SELECT "execution_id", "policy_name", "status", "seconds_to_created", "seconds_to_ready", '
    '"seconds_created_to_ready", "seconds_to_completed", "polls_used", "api_calls", '
    '"failed_api_calls", "transitions", "error_step", "last_event_time" IS NULL AS "no_events" '
    'FROM policy_execution_results ORDER BY "execution_id"'
)
DAILY_QUERY = (
    'SELECT "day", "total_executions", "completed_executions", "failed_executions", '
    '"in_progress_executions", "success_rate", "median_seconds_to_completed", '
    '"p95_seconds_to_completed" FROM policy_execution_daily_stats ORDER BY "day"'
)


def assert_reporting_contents(con: Any) -> None:
    """The models' contents, computed by hand from EXECUTIONS (same on every warehouse)."""
    results = {row["execution_id"]: row for row in query(con, RESULTS_QUERY)}
    assert sorted(results) == [e.execution_id for e in EXECUTIONS]

    e1 = results["e1"]
    assert e1["status"] == "completed"
    assert e1["seconds_to_created"] == pytest.approx(2.5)
    assert e1["seconds_to_ready"] == pytest.approx(60.0)
    assert e1["seconds_created_to_ready"] == pytest.approx(57.5)
    assert e1["seconds_to_completed"] == pytest.approx(70.25)
    assert (e1["polls_used"], e1["api_calls"], e1["failed_api_calls"]) == (3, 5, 0)
    assert e1["transitions"] == 3

    # Millisecond precision across a second boundary.
    assert results["e2"]["seconds_to_created"] == pytest.approx(0.2)
    assert results["e2"]["failed_api_calls"] == 1

    e4 = results["e4"]
    assert e4["status"] == "error" and e4["error_step"] == "policy_ready"
    assert e4["seconds_to_created"] == pytest.approx(2.0)
    assert e4["seconds_to_ready"] is None and e4["seconds_to_completed"] is None
    assert (e4["api_calls"], e4["failed_api_calls"]) == (3, 1)

    # No HTTP status (a timeout) counts as a failed call.
    assert (results["e7"]["api_calls"], results["e7"]["failed_api_calls"]) == (3, 3)

    e9 = results["e9"]
    assert e9["status"] == "pending" and e9["seconds_to_created"] is None
    assert (e9["polls_used"], e9["api_calls"], e9["transitions"]) == (0, 0, 0)
    assert e9["no_events"] is True

    daily = query(con, DAILY_QUERY)
    assert [row["day"] for row in daily] == [D1.date(), D2.date(), D3.date()]
    day1, day2, day3 = daily
    assert (
        day1["total_executions"],
        day1["completed_executions"],
        day1["failed_executions"],
        day1["in_progress_executions"],
    ) == (5, 3, 1, 1)
    assert day1["success_rate"] == pytest.approx(75.0)
    assert day1["median_seconds_to_completed"] == pytest.approx(70.25)
    # Continuous percentile over [40, 70.25, 100]: 70.25 + 0.9 * (100 - 70.25).
    assert day1["p95_seconds_to_completed"] == pytest.approx(97.025)

    assert (day2["total_executions"], day2["completed_executions"], day2["failed_executions"]) == (
        3,
        1,
        2,
    )
    assert day2["success_rate"] == pytest.approx(33.33)  # 1 of 3, two decimals
    assert day2["median_seconds_to_completed"] == pytest.approx(55.5)
    assert day2["p95_seconds_to_completed"] == pytest.approx(55.5)

    # Nothing finished yet: no rate and no durations rather than zeros.
    assert (day3["total_executions"], day3["in_progress_executions"]) == (1, 1)
    assert day3["success_rate"] is None
    assert day3["median_seconds_to_completed"] is None
    assert day3["p95_seconds_to_completed"] is None


def workflow_stand_in() -> AssetsDefinition:
    """The workflow's last step as the code location has it: partitioned by policy name."""

    @asset(key=WORKFLOW, partitions_def=StaticPartitionsDefinition(["alpha", "beta"]))
    def circuit_breaker_activation() -> None:
        return None

    return circuit_breaker_activation


# --- DuckDB: the real dbt build ------------------------------------------------------------------


def test_dbt_build_through_dagster_on_duckdb(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    database = create_duckdb_warehouse(tmp_path / "warehouse.duckdb")
    monkeypatch.setenv("POLICY_WAREHOUSE", "duckdb")
    monkeypatch.setenv("POLICY_DUCKDB_PATH", str(database))
    monkeypatch.setenv("DBT_TARGET_PATH", str(tmp_path / "dbt-target"))
    monkeypatch.setenv("DBT_LOG_PATH", str(tmp_path / "dbt-logs"))

    # With a partitioned stand-in for the workflow asset, as in the code location: the source
    # tests' observations land on it.
    reporting = dbt_assets.build_dbt_assets(Settings.from_env())
    result = materialize(
        [workflow_stand_in(), reporting],
        selection=[RESULTS, DAILY],
        resources={
            "dbt": dbt_assets.dbt_cli_resource(Settings.from_env()),
            "policy_state": state_resource(Settings.from_env()),
        },
        raise_on_error=False,
    )

    assert result.success
    materialized = {m.asset_key for m in result.get_asset_materialization_events()}
    assert materialized == {RESULTS, DAILY}
    evaluations = result.get_asset_check_evaluations()
    assert {e.asset_check_key.name for e in evaluations} == {k.name for k in reporting.check_keys}
    assert all(e.passed for e in evaluations)
    observed = [e.asset_key for e in result.all_events if e.event_type_value == "ASSET_OBSERVATION"]
    assert observed and set(observed) == {WORKFLOW}  # the source tests ran too

    with duckdb.connect(str(database), read_only=True) as con:
        assert_reporting_contents(con)
        kinds = dict(
            con.execute(
                "SELECT table_name, table_type FROM information_schema.tables "
                "WHERE table_name LIKE 'policy_execution_%'"
            ).fetchall()
        )
    assert kinds["policy_execution_results"] == "VIEW"
    assert kinds["policy_execution_daily_stats"] == "BASE TABLE"


def test_duplicate_execution_id_fails_dbt_build(tmp_path: Path) -> None:
    database = create_duckdb_warehouse(tmp_path / "warehouse.duckdb", duplicate="e1")

    completed = run_dbt(
        ["build", "--target", "duckdb"], {"POLICY_DUCKDB_PATH": str(database)}, tmp_path
    )

    assert completed.returncode == 1, completed.stdout
    results = json.loads((tmp_path / "target" / "run_results.json").read_text())
    status = {r["unique_id"].split(".")[2]: r["status"] for r in results["results"]}
    failed = {name for name, s in status.items() if s in ("fail", "error")}
    assert failed == {"state_execution_ids_are_unique"}
    unique_test = next(
        r for r in results["results"] if "state_execution_ids_are_unique" in r["unique_id"]
    )
    assert unique_test["failures"] == 1  # one execution_id seen twice
    # A failing source test stops the models downstream of it.
    assert status["policy_execution_results"] == "skipped"
    assert status["policy_execution_daily_stats"] == "skipped"


# --- Snowflake: the same models against a local fakesnow server ---------------------------------


def test_dbt_build_on_snowflake_target_against_fakesnow(
    tmp_path: Path, fakesnow: FakesnowServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The connector otherwise probes cloud metadata endpoints while logging in: loopback only.
    monkeypatch.setenv("SNOWFLAKE_DISABLE_PLATFORM_DETECTION", "true")
    schema = "REPORTING_DBT_TEST"
    with fakesnow.connect(schema=schema) as con:
        cursor = con.cursor()
        for table in store_schema.TABLES:
            cursor.execute(store_schema.create_table(table).render(SqlDialect.SNOWFLAKE))
        for statement, params in _inserts("%s"):
            cursor.execute(statement, params)

        completed = run_dbt(
            ["build", "--target", "snowflake"],
            {**fakesnow.env(), "SNOWFLAKE_SCHEMA": schema},
            tmp_path,
        )
        assert completed.returncode == 0, completed.stdout[-4000:]
        run = json.loads((tmp_path / "target" / "run_results.json").read_text())
        statuses = {r["unique_id"]: r["status"] for r in run["results"]}
        assert set(statuses.values()) <= {"success", "pass"}, statuses
        assert statuses["model.policy_pipeline_dbt.policy_execution_results"] == "success"
        assert statuses["model.policy_pipeline_dbt.policy_execution_daily_stats"] == "success"

        # Quoted lower-case output columns: the same names as on DuckDB.
        cursor.execute("SELECT * FROM policy_execution_daily_stats LIMIT 1")
        assert [d[0] for d in cursor.description][:3] == [
            "day",
            "total_executions",
            "completed_executions",
        ]
        assert_reporting_contents(con)


# --- Manifest preparation ------------------------------------------------------------------------


def _copy_project(destination: Path) -> Path:
    shutil.copytree(
        PROJECT_DIR, destination, ignore=shutil.ignore_patterns("target", "logs", ".user.yml")
    )
    return destination


def test_prepare_and_package_prepares_the_manifest(tmp_path: Path) -> None:
    """The manifest is prepared the way dagster-dbt intends (what ./dev.sh, .ci/run and
    deploy/ run), not while the definitions load; a new model is picked up by the next one."""
    project = _copy_project(tmp_path / "dbt_project")
    project_file = tmp_path / "project.py"
    project_file.write_text(
        "from dagster_dbt import DbtProject\n"
        f"project = DbtProject(project_dir={str(project)!r}, profiles_dir={str(project)!r}, "
        "target='duckdb')\n"
    )
    command = [str(Path(sys.executable).parent / "dagster-dbt"), "project"]
    command += ["prepare-and-package", "--file", str(project_file)]
    manifest = project / "target" / "manifest.json"
    # dagster-dbt runs the dbt on PATH: the virtual environment's, as ./dev.sh puts it there.
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin"}
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    nodes = json.loads(manifest.read_text())["nodes"]
    assert "model.policy_pipeline_dbt.policy_execution_results" in nodes

    (project / "models" / "policy_names.sql").write_text(
        'select distinct "policy_name" as "policy_name" '
        "from {{ ref('policy_execution_results') }}\n"
    )
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "model.policy_pipeline_dbt.policy_names" in json.loads(manifest.read_text())["nodes"]


# --- Dagster definitions ------------------------------------------------------------------------


def test_dbt_assets_sit_downstream_of_the_workflow() -> None:
    assert policy_dbt_project.manifest_path.exists()
    definition = dbt_assets.build_dbt_assets(Settings.from_env())

    assert set(definition.keys) == {RESULTS, DAILY}
    assert definition.asset_deps[RESULTS] == {WORKFLOW}
    assert definition.asset_deps[DAILY] == {RESULTS}
    for key in (RESULTS, DAILY):
        spec = definition.specs_by_key[key]
        assert spec.group_name == "policy_reporting"
        assert spec.owners == ["team:data-platform"]
        assert "dbt" in spec.kinds and spec.kinds & {"duckdb", "snowflake"}
        assert spec.description
    assert "view" in definition.specs_by_key[RESULTS].kinds
    assert "table" in definition.specs_by_key[DAILY].kinds


def test_dbt_assets_load_with_a_partitioned_workflow_asset() -> None:
    defs = Definitions(
        assets=[workflow_stand_in(), dbt_assets.build_dbt_assets(Settings.from_env())],
        resources={
            "dbt": dbt_assets.dbt_cli_resource(Settings.from_env()),
            "policy_state": state_resource(Settings.from_env()),
        },
    )
    Definitions.validate_loadable(defs)
    graph = defs.resolve_asset_graph()
    assert graph.get(RESULTS).parent_keys == {WORKFLOW}
    assert RESULTS in graph.get(WORKFLOW).child_keys


def test_dbt_tests_are_asset_checks() -> None:
    definition = dbt_assets.build_dbt_assets(Settings.from_env())
    checks = {(k.asset_key, k.name) for k in definition.check_keys}
    assert (RESULTS, "results_have_one_row_per_execution") in checks
    assert (RESULTS, "results_execution_id_is_present") in checks
    assert any(
        key == RESULTS and name.startswith("results_status_is_a_known_step") for key, name in checks
    )
    assert (DAILY, "daily_stats_have_one_row_per_day") in checks
    assert (DAILY, "daily_stats_day_is_present") in checks
    # Source tests run in `dbt build` but are not checks on the workflow's asset.
    assert all(key in (RESULTS, DAILY) for key, _ in checks)


def test_dbt_cli_resource_targets_the_warehouse(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # A folder every clone has (data/ is made by the first run).
    relative = f"dbt_project/test-relative-{uuid.uuid4().hex[:8]}.duckdb"
    monkeypatch.setenv("POLICY_DUCKDB_PATH", relative)
    resource = dbt_assets.dbt_cli_resource(Settings.from_env())
    assert resource.target == "duckdb"
    assert Path(resource.project_dir) == PROJECT_DIR
    # Nothing is written to the environment: the profile itself resolves a relative path
    # against the repository root, as the workflow does, from whatever directory dbt runs in.
    assert os.environ["POLICY_DUCKDB_PATH"] == relative
    assert Settings.from_env().duckdb_path == PROJECT_ROOT / relative
    debug = subprocess.run(
        [DBT, "debug", "--project-dir", str(PROJECT_DIR), "--profiles-dir", str(PROJECT_DIR)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    try:
        assert debug.returncode == 0, debug.stdout + debug.stderr
        assert (PROJECT_ROOT / relative).exists()  # dbt connected to the workflow's file
    finally:
        (PROJECT_ROOT / relative).unlink(missing_ok=True)

    monkeypatch.setenv("POLICY_WAREHOUSE", "snowflake")
    assert dbt_assets.dbt_cli_resource(Settings.from_env()).target == "snowflake"
    monkeypatch.setenv("POLICY_WAREHOUSE", "bigquery")
    with pytest.raises(SettingsError, match="POLICY_WAREHOUSE"):
        Settings.from_env()
