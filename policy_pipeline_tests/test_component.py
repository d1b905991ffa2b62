"""The component as a team adds it to its own Dagster project: a throwaway dg project in
``tmp_path`` whose ``defs.yaml`` names ``PolicyWorkflowComponent`` with its own catalog folder,
its own endpoint and key variables and its own DuckDB file. ``dg check defs`` accepts it, and
``dg launch`` runs the workflow job for one catalog policy through the real CLI."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import duckdb
import pytest
from dagster import AssetKey, DagsterInstance
from dagster._core.instance.ref import InstanceRef

from policy_devtools.simulator import PolicyApiSimulator
from policy_pipeline.component import (
    LeaseAttributes,
    PolicyWorkflowComponent,
    PollingAttributes,
    build_policy_defs,
)
from policy_pipeline.core.settings import PROJECT_ROOT, LeaseSettings, PollingSettings
from policy_pipeline.defs.workflow.assets import WorkflowConfig
from policy_pipeline_tests.conftest import CATALOG, FAST_ENV

POLICY = "customer_data_retention"

PYPROJECT = """\
[project]
name = "team_policies"
version = "0.1.0"
requires-python = ">=3.10"
dependencies = ["dagster", "policy-pipeline"]

[build-system]
requires = ["setuptools"]
build-backend = "setuptools.build_meta"

[tool.dg]
directory_type = "project"

[tool.dg.project]
root_module = "team_policies"
"""

DEFINITIONS = """\
from pathlib import Path

from dagster import load_from_defs_folder

defs = load_from_defs_folder(path_within_project=Path(__file__).parent)
"""

# The team's own names for everything: none of them is this project's default.
DEFS_YAML = """\
type: policy_pipeline.component.PolicyWorkflowComponent
attributes:
  catalog_dir: catalog
  api_endpoint_env: TEAM_POLICY_API_URL
  api_key_env: TEAM_POLICY_API_KEY
  warehouse: duckdb
  duckdb_path: state/policies.duckdb
  reporting: false
"""


def _team_project(root: Path) -> Path:
    package = root / "team_policies"
    (package / "defs" / "policies").mkdir(parents=True)
    (root / "pyproject.toml").write_text(PYPROJECT, encoding="utf-8")
    (package / "__init__.py").write_text("", encoding="utf-8")
    (package / "definitions.py").write_text(DEFINITIONS, encoding="utf-8")
    (package / "defs" / "policies" / "defs.yaml").write_text(DEFS_YAML, encoding="utf-8")
    (root / "catalog").mkdir()
    shutil.copy(CATALOG / f"{POLICY}.yaml", root / "catalog" / f"{POLICY}.yaml")
    return root


def _team_env(project: Path, dagster_home: Path, simulator: PolicyApiSimulator) -> dict[str, str]:
    """The team's environment: only its own endpoint and key variables (no POLICY_API_*, no
    POLICY_DUCKDB_PATH...), fast polling, this venv active so dg neither makes nor resolves one."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("POLICY_", "SNOWFLAKE_"))}
    bin_dir = Path(sys.executable).parent
    env.update(FAST_ENV)
    env.update(
        TEAM_POLICY_API_URL=simulator.base_url,
        TEAM_POLICY_API_KEY=simulator.config.api_key or "",
        DAGSTER_HOME=str(dagster_home),
        PYTHONPATH=os.pathsep.join(p for p in (str(project), env.get("PYTHONPATH")) if p),
        VIRTUAL_ENV=sys.prefix,
        PATH=f"{bin_dir}{os.pathsep}{env.get('PATH', '')}",
    )
    env.pop("PYTHONHOME", None)
    return env


def _dg(project: Path, env: dict[str, str], *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [str(Path(sys.executable).parent / "dg"), *args],
        cwd=project,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _finished(process: subprocess.Popen[str], label: str) -> str:
    """Its output, once it exits 0."""
    stdout, stderr = process.communicate(timeout=300)
    assert process.returncode == 0, (
        f"{label} exited {process.returncode}\n"
        f"--- stdout\n{stdout[-4000:]}\n--- stderr\n{stderr[-4000:]}"
    )
    return stdout + stderr


def test_component_in_a_team_project(tmp_path: Path, simulator: PolicyApiSimulator) -> None:
    project = _team_project(tmp_path / "team_policies")
    homes: dict[str, Path] = {}
    for name in ("check", "launch"):
        homes[name] = tmp_path / f"dagster_home_{name}"
        homes[name].mkdir()
        (homes[name] / "dagster.yaml").write_text("telemetry:\n  enabled: false\n", "utf-8")
    env = _team_env(project, homes["launch"], simulator)
    config = {"ops": {"policy_workflow": {"config": {"policies": [POLICY]}}}}

    # Side by side (each spends most of its time importing); the check only loads code.
    processes = [
        _dg(
            project,
            {**env, "DAGSTER_HOME": str(homes["check"])},
            "check",
            "defs",
            "--use-active-venv",
        ),
        _dg(
            project,
            env,
            "launch",
            "--job",
            "policy_workflow_job",
            "--config-json",
            json.dumps(config),
        ),
    ]
    try:
        checked = _finished(processes[0], "dg check defs --use-active-venv")
        output = _finished(processes[1], "dg launch --job policy_workflow_job")
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.communicate()
    assert "All definitions loaded successfully." in checked
    assert "RUN_SUCCESS" in output, output[-4000:]
    assert env["TEAM_POLICY_API_KEY"] not in output

    # The state went to the team's own DuckDB file, relative to its project root.
    state = project / "state" / "policies.duckdb"
    assert state.is_file(), sorted(str(p.relative_to(project)) for p in project.rglob("*"))
    with duckdb.connect(str(state), read_only=True) as conn:
        rows = conn.execute(
            "SELECT status FROM policy_execution_state WHERE policy_name = ?", [POLICY]
        ).fetchall()
    assert rows == [("completed",)]

    # Through the team's endpoint and key variables: one create, one circuit breaker.
    counts = simulator.counts()
    mine = counts["per_policy"][POLICY]
    assert mine["create_requests"] == 1, counts
    assert mine["circuit_requests"] == 1, counts
    assert counts["faults"]["unauthorized"] == 0, counts

    with DagsterInstance.from_ref(InstanceRef.from_dir(str(homes["launch"]))) as instance:
        event = instance.get_latest_materialization_event(AssetKey("circuit_breaker_activation"))
    assert event is not None


def test_workflow_settings_are_component_attributes_under_their_own_names(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("POLICY_POLL_MAX_POLLS", "7")
    monkeypatch.setenv("POLICY_LEASE_TTL_SECONDS", "40")
    component = PolicyWorkflowComponent.model_validate(
        {
            "polling": {"wait_handoff_seconds": 5},
            "leases": {"wait_seconds": 9},
            "max_concurrency": 3,
        }
    )
    settings = component.settings(tmp_path)
    # What the attributes set wins; what they leave out keeps the environment's setting.
    assert settings.polling.wait_handoff_seconds == 5 and settings.polling.max_polls == 7
    assert (settings.leases.ttl_seconds, settings.leases.wait_seconds) == (40, 9)
    assert settings.api.max_concurrency == 3
    defs = build_policy_defs(settings, reporting=False)
    assert defs.resources["policy_state"].lease_ttl_seconds == 40
    assert defs.resources["policy_state"].lease_wait_seconds == 9
    assert defs.resources["policy_api"].max_concurrency == 3

    # One name per knob: the attributes, the run config and the settings say the same.
    def knobs(section: type) -> set[str]:
        return {knob.name for knob in dataclasses.fields(section) if "env" in knob.metadata}

    assert set(PollingAttributes.model_fields) == knobs(PollingSettings)
    assert set(LeaseAttributes.model_fields) == knobs(LeaseSettings)
    overrides = set(WorkflowConfig.model_fields) - {"policies", "force_new_execution"}
    assert overrides <= knobs(PollingSettings)
    run = WorkflowConfig(max_polls=2).polling(settings.polling)
    assert (run.max_polls, run.wait_handoff_seconds) == (2, 5)


def test_a_bad_attribute_is_refused_by_dg_check_yaml(tmp_path: Path) -> None:
    project = _team_project(tmp_path / "team_policies")
    defs_yaml = project / "team_policies" / "defs" / "policies" / "defs.yaml"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("POLICY_", "SNOWFLAKE_"))}
    env.update(
        VIRTUAL_ENV=sys.prefix, PATH=f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    )
    env.pop("PYTHONHOME", None)
    defs_yaml.write_text(DEFS_YAML + "  polling:\n    max_polls: 0\n", encoding="utf-8")
    refused = _dg(project, env, "check", "yaml")
    stdout, stderr = refused.communicate(timeout=300)
    assert refused.returncode != 0, stdout + stderr
    assert "max_polls" in stdout + stderr
    defs_yaml.write_text(DEFS_YAML + "  polling:\n    max_polls: 5\n", encoding="utf-8")
    _finished(_dg(project, env, "check", "yaml"), "dg check yaml")


def test_definitions_read_no_environment_after_they_load() -> None:
    """Settings are built once (the component, the CLI) and passed down: nothing in a run, a
    tick or a config default reads the environment again."""
    readers = []
    for path in sorted((PROJECT_ROOT / "policy_pipeline").rglob("*.py")):
        relative = path.relative_to(PROJECT_ROOT).as_posix()
        if relative in SETTINGS_READERS:
            continue
        text = path.read_text(encoding="utf-8")
        if "from_env(" in text or "os.environ" in text or "getenv(" in text:
            readers.append(relative)
    assert readers == []


# Where the environment is read: the settings themselves, the component and the CLI (which
# build them), the dbt project file that `dagster-dbt project prepare-and-package` loads on its
# own, the failpoints of the tests, and dbt's environment while it runs (written, not read).
SETTINGS_READERS = {
    "policy_pipeline/core/settings.py",
    "policy_pipeline/component.py",
    "policy_pipeline/cli.py",
    "policy_pipeline/defs/reporting/project.py",
    "policy_pipeline/core/failpoints.py",
    "policy_pipeline/defs/reporting/dbt_assets.py",
}
