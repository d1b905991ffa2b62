"""Loading is pure and the core is plain Python.

Loading the code location (what every Dagster process does) starts no subprocess, writes no
environment variable, runs no DDL (the DuckDB file is not even created), reads no catalog file
and does not parse dbt (the prepared manifest is left as it is). The core imports no Dagster.
"""

from __future__ import annotations

import json
import os
import pkgutil
import shutil
import subprocess
import sys
from pathlib import Path

import policy_pipeline.core
from policy_pipeline.core.settings import PROJECT_ROOT
from policy_pipeline.defs.reporting.project import policy_dbt_project
from policy_pipeline_tests.harness.load_probe import measure


def test_loading_the_definitions_is_pure(tmp_path: Path) -> None:
    manifest = policy_dbt_project.manifest_path
    stamp = manifest.stat().st_mtime_ns
    database = tmp_path / "state" / "never.duckdb"
    env = {
        "PATH": str(Path(sys.executable).parent),
        "HOME": str(tmp_path),
        "POLICY_CATALOG_DIR": str(tmp_path / "no-catalog-here"),  # read by runs, not loads
        "POLICY_DUCKDB_PATH": str(database),
    }
    loaded = measure(env)  # the probe `python -m bench.load` times
    assert loaded["subprocesses"] == []
    assert loaded["env_writes"] == []
    assert {"policy_created", "policy_ready", "circuit_breaker_activation"} <= set(
        loaded["asset_keys"]
    )
    assert "policy_execution_results" in loaded["asset_keys"]
    assert not database.parent.exists()  # no connection, no DDL
    assert manifest.stat().st_mtime_ns == stamp  # no dbt parse


def test_under_dagster_dev_only_a_changed_dbt_project_is_parsed_again(tmp_path: Path) -> None:
    """`dagster dev` loads the definitions in every run process: an unchanged project keeps its
    manifest (no `dbt` process), a changed one is parsed again at the next load."""
    project = tmp_path / "dbt_project"
    source = policy_dbt_project.project_dir
    shutil.copytree(source, project, ignore=shutil.ignore_patterns("target", "logs", ".*"))
    (project / "target").mkdir()
    manifest = project / "target" / "manifest.json"
    shutil.copy2(policy_dbt_project.manifest_path, manifest)
    os.utime(manifest)  # parsed after the copy of every file
    env = {
        "PATH": str(Path(sys.executable).parent),
        "HOME": str(tmp_path),
        "DAGSTER_IS_DEV_CLI": "1",
        "POLICY_DBT_PROJECT_DIR": str(project),
        "POLICY_DUCKDB_PATH": str(tmp_path / "state.duckdb"),
    }
    stamp = manifest.stat().st_mtime_ns
    assert measure(env)["subprocesses"] == []
    assert manifest.stat().st_mtime_ns == stamp

    (project / "models" / "policy_names.sql").write_text(
        'select distinct "policy_name" as "policy_name" '
        "from {{ ref('policy_execution_results') }}\n"
    )
    loaded = measure(env)
    assert any("dbt" in command for command in loaded["subprocesses"]), loaded["subprocesses"]
    assert "model.policy_pipeline_dbt.policy_names" in json.loads(manifest.read_text())["nodes"]
    assert "policy_names" in loaded["asset_keys"]


def test_the_core_imports_no_dagster() -> None:
    modules = [
        info.name
        for info in pkgutil.walk_packages(policy_pipeline.core.__path__, "policy_pipeline.core.")
    ]
    assert len(modules) > 10
    probe = (
        "import importlib, json, sys, time\n"
        "started = time.perf_counter()\n"
        f"for name in {modules!r}: importlib.import_module(name)\n"
        "print(json.dumps({'seconds': time.perf_counter() - started,\n"
        "  'dagster': sorted(m for m in sys.modules if m.split('.')[0].startswith('dagster'))}))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-3000:]
    loaded = json.loads(result.stdout.strip().splitlines()[-1])
    assert loaded["dagster"] == []
