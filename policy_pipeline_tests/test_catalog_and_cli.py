"""The catalog's validation, and the README's commands run as a new user would: the real
``dagster job execute`` CLI and the demo, as subprocesses."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from policy_pipeline.core.catalog import CatalogError, load_catalog
from policy_pipeline.core.settings import PROJECT_ROOT
from policy_pipeline_tests.conftest import (
    CATALOG_POLICIES,
    Workspace,
    run_cli,
    run_job,
    subprocess_env,
)

VALID = """\
policy_name: {name}
policy_type: data_retention
description: test policy
priority: low
parameters:
  retention_days: 30
"""


def _catalog(tmp_path: Path, files: dict[str, str]) -> Path:
    directory = tmp_path / "catalog"
    directory.mkdir()
    for name, text in files.items():
        (directory / name).write_text(text, encoding="utf-8")
    return directory


def test_shipped_catalog_has_the_seed_policy_and_more() -> None:
    catalog = load_catalog(PROJECT_ROOT / "policies")
    assert len(catalog) >= 3
    seed = catalog["customer_data_retention"].policy
    assert seed.parameters == {"retention_days": 90, "classification": "sensitive"}
    assert seed.priority == "high"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("policy_name: a\n  bad: [indent", "not valid YAML"),
        ("- just\n- a list\n", "expected a mapping"),
        (VALID.replace("priority: low", "priority: urgent"), "field 'priority'"),
        (VALID.replace("priority: low\n", ""), "field 'priority': Field required"),
        (VALID.replace("description: test policy", "description: 42"), "field 'description'"),
        (VALID.replace("parameters:\n  retention_days: 30", "parameters: [1, 2]"), "'parameters'"),
        (VALID.replace("{name}", "Not A Slug!"), "field 'policy_name': Value error, must be a"),
        (VALID + "owner: someone\n", "field 'owner': Extra inputs are not permitted"),
        (VALID.replace("test policy", '"bell\\u0007"'), "control characters"),
    ],
)
def test_bad_catalog_file_is_named_with_its_field(tmp_path: Path, text: str, expected: str) -> None:
    directory = _catalog(tmp_path, {"good.yaml": VALID.format(name="good"), "bad.yaml": text})
    with pytest.raises(CatalogError) as error:
        load_catalog(directory)
    message = str(error.value)
    assert str(directory / "bad.yaml") in message
    assert expected in message
    assert "good.yaml" not in message


def test_duplicate_policy_name_names_both_files(tmp_path: Path) -> None:
    directory = _catalog(
        tmp_path, {"a.yaml": VALID.format(name="same"), "b.yml": VALID.format(name="same")}
    )
    with pytest.raises(CatalogError, match=r"b\.yml: field 'policy_name': duplicate value 'same'"):
        load_catalog(directory)


@pytest.mark.both_warehouses
def test_hostile_strings_are_stored_through_bound_parameters(workspace: Workspace) -> None:
    name = "quote-test"
    hostile = "x'); DROP TABLE policy_execution_state; -- ünïcødé ✓"
    (workspace.catalog_dir / f"{name}.yaml").write_text(
        VALID.format(name=name).replace("test policy", f'"{hostile}"'), encoding="utf-8"
    )
    assert workspace.run([name]).success
    [[description]] = workspace.query(
        "SELECT JSON_EXTRACT_PATH_TEXT(\"policy_data\", 'description') "
        'FROM policy_execution_state WHERE "policy_name" = ?',
        [name],
    )
    assert description == hostile


def _readme_job_command() -> str:
    readme = (PROJECT_ROOT / "README.md").read_text(encoding="utf-8")
    match = re.search(
        r"^(dagster job execute -m policy_pipeline\.definitions .+)$", readme, re.MULTILINE
    )
    assert match, "README shows the dagster job execute form"
    return match.group(1)


@pytest.mark.both_warehouses
def test_readme_dagster_job_execute_command(workspace: Workspace) -> None:
    command = _readme_job_command()
    partition = re.search(r'"dagster/partition": "([^"]+)"', command)
    assert partition and partition.group(1) in CATALOG_POLICIES
    output = _run_shell_line(command, subprocess_env(workspace))
    [execution] = workspace.executions(partition.group(1))
    assert execution["status"] == "completed"
    assert workspace.simulator.counts()["circuits_triggered"] == 1
    assert workspace.api_key not in output


def _run_shell_line(line: str, env: dict[str, str]) -> str:
    """A README line as a user types it, with the venv's commands on PATH; its output."""
    env = {**env, "PATH": f"{Path(sys.executable).parent}:{env.get('PATH', '')}"}
    result = subprocess.run(
        ["bash", "-c", line], cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=900
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout + result.stderr


def test_readme_partition_range_commands_on_a_new_dagster_home(workspace: Workspace) -> None:
    """The README's range run from a fresh DAGSTER_HOME: register the catalog's partitions, then
    `dagster asset materialize --partition-range` runs every policy of the range in one run."""
    readme = (PROJECT_ROOT / "README.md").read_text(encoding="utf-8")
    lines = [
        re.search(rf"^({prefix}.*)$", readme, re.MULTILINE)
        for prefix in ("policy-pipeline register-partitions", "dagster asset materialize ")
    ]
    assert all(lines), "README shows register-partitions and the --partition-range form"
    env = subprocess_env(workspace)
    outputs = [_run_shell_line(line.group(1), env) for line in lines if line is not None]
    assert f"{len(CATALOG_POLICIES)} partitions added" in outputs[0]
    assert "RUN_SUCCESS" in outputs[1]
    for name in CATALOG_POLICIES:
        [execution] = workspace.executions(name)
        assert execution["status"] == "completed", (name, execution)
    assert workspace.simulator.counts()["circuits_triggered"] == len(CATALOG_POLICIES)
    assert workspace.api_key not in "".join(outputs)


def test_register_partitions_needs_a_dagster_home(workspace: Workspace) -> None:
    env = subprocess_env(workspace)
    del env["DAGSTER_HOME"]
    result = run_cli(workspace, "register-partitions", env=env, timeout=300)
    assert result.returncode == 2
    assert "DAGSTER_HOME is not set" in result.stderr


def test_bad_catalog_stops_the_cli_before_anything_is_written(workspace: Workspace) -> None:
    (workspace.catalog_dir / "broken.yaml").write_text(
        VALID.format(name="broken").replace("priority: low", "priority: 3"), encoding="utf-8"
    )
    env = subprocess_env(workspace)
    result = run_job(env, "--tags", '{"dagster/partition": "broken"}', timeout=900)
    assert result.returncode != 0
    output = result.stdout + result.stderr
    assert "broken.yaml: field 'priority'" in output
    assert not workspace.duckdb_path.exists()
    assert workspace.simulator.counts()["requests"]["createpolicy"] == 0


@pytest.mark.both_warehouses
def test_demo_runs_every_policy_and_prints_the_table(workspace: Workspace) -> None:
    env = subprocess_env(workspace)
    del env["POLICY_API_ENDPOINT"]  # the demo starts its own simulator
    del env["POLICY_API_KEY"]
    result = subprocess.run(
        [sys.executable, "-m", "policy_devtools.demo", "--log", str(workspace.root / "run.log")],
        cwd=PROJECT_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    for name in CATALOG_POLICIES:
        line = next(row for row in result.stdout.splitlines() if row.startswith(name))
        assert " completed " in line and " True " in line
    assert f"{len(CATALOG_POLICIES)} of {len(CATALOG_POLICIES)} policies completed" in (
        result.stdout
    )
    assert workspace.simulator.counts()["requests"]["createpolicy"] == 0  # not ours
