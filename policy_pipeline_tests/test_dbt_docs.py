"""The dbt project's documentation: every model, source and column described and typed, every
data test named and described, the sources mapped onto the workflow's Dagster asset, and no
deprecated dbt syntax.

No warehouse: the real dbt CLI parses the project (``dbt parse`` connects to nothing) into a
temporary target folder, once per target. The Snowflake parse needs its profile's variables but
no server; it is also the one that reports deprecated properties, since dbt validates YAML
properties against its JSON schema only for some adapters (Snowflake, not DuckDB).
"""

import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
import yaml
from dagster import AssetKey
from dagster_dbt import DagsterDbtTranslator

from policy_pipeline.core.store.schema import TABLES

PROJECT_DIR = Path(__file__).resolve().parents[1] / "dbt_project"
DBT = str(Path(sys.executable).parent / "dbt")

# The workflow's last step, which finishes writing the tables the sources read.
WORKFLOW_ASSET_KEY = ["circuit_breaker_activation"]

# A readable test name: snake case, short, without the `__` of dbt's generated names
# (`source_relationships_policy_state_policy_execution_events__execution_id____...`).
READABLE_NAME = re.compile(r"[a-z][a-z0-9]*(_[a-z0-9]+)*")
MAX_NAME_LENGTH = 63

# Dummy Snowflake profile values: `dbt parse` renders the profile but never connects.
SNOWFLAKE_PARSE_ENV = {
    name: "parse-only"
    for name in (
        "SNOWFLAKE_ACCOUNT",
        "SNOWFLAKE_USER",
        "SNOWFLAKE_ROLE",
        "SNOWFLAKE_WAREHOUSE",
        "SNOWFLAKE_DATABASE",
        "SNOWFLAKE_SCHEMA",
    )
}


class Parsed:
    def __init__(self, target: str, manifest: Mapping[str, Any], output: str) -> None:
        self.target = target
        self.manifest = manifest
        self.output = output

    def of_type(self, resource_type: str) -> list[Mapping[str, Any]]:
        nodes = self.manifest["sources" if resource_type == "source" else "nodes"].values()
        return [n for n in nodes if n["resource_type"] == resource_type]


@pytest.fixture(scope="module", params=["duckdb", "snowflake"])
def parsed(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Parsed]:
    target: str = request.param
    work = tmp_path_factory.mktemp(f"dbt-parse-{target}")
    env = {
        **os.environ,
        "DBT_LOG_PATH": str(work / "logs"),
        "DBT_SEND_ANONYMOUS_USAGE_STATS": "false",
        "POLICY_DUCKDB_PATH": str(work / "unused.duckdb"),
        **(SNOWFLAKE_PARSE_ENV if target == "snowflake" else {}),
    }
    completed = subprocess.run(
        [
            DBT,
            "parse",
            "--no-use-colors",
            "--show-all-deprecations",
            "--target",
            target,
            "--project-dir",
            str(PROJECT_DIR),
            "--profiles-dir",
            str(PROJECT_DIR),
            "--target-path",
            str(work / "target"),
        ],
        env=env,
        cwd=PROJECT_DIR,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    output = completed.stdout + completed.stderr
    assert completed.returncode == 0, output[-4000:]
    manifest = json.loads((work / "target" / "manifest.json").read_text())
    yield Parsed(target, manifest, output)


def _yaml_files() -> list[Path]:
    return sorted((PROJECT_DIR / "models").rglob("*.yml"))


def test_parse_reports_no_deprecations(parsed: Parsed) -> None:
    assert "deprecat" not in parsed.output.lower(), parsed.output[-4000:]


def test_every_model_and_model_column_is_described_and_typed(parsed: Parsed) -> None:
    models = parsed.of_type("model")
    assert models
    for model in models:
        assert model["description"].strip(), model["unique_id"]
        assert model["columns"], f"{model['unique_id']} documents no columns"
        for name, column in model["columns"].items():
            assert column["description"].strip(), f"{model['unique_id']}.{name}"
            assert (column["data_type"] or "").strip(), f"{model['unique_id']}.{name}"
        # The documented types are checked against what the SQL produces, on both warehouses.
        assert model["config"]["contract"]["enforced"], model["unique_id"]


def test_model_column_types_render_for_the_target(parsed: Parsed) -> None:
    timestamp = "timestamp_ntz" if parsed.target == "snowflake" else "timestamp"
    for model in parsed.of_type("model"):
        for name, column in model["columns"].items():
            assert "{{" not in column["data_type"], f"{model['unique_id']}.{name}"
            if name.endswith("_time"):
                assert column["data_type"] == timestamp, f"{model['unique_id']}.{name}"


def test_every_source_and_source_column_is_described_and_typed(parsed: Parsed) -> None:
    sources = parsed.of_type("source")
    assert sources
    for source in sources:
        assert source["source_description"].strip(), source["source_name"]
        assert source["description"].strip(), source["unique_id"]
        for name, column in source["columns"].items():
            assert column["description"].strip(), f"{source['unique_id']}.{name}"
            assert (column["data_type"] or "").strip(), f"{source['unique_id']}.{name}"
            assert "{{" not in column["data_type"], f"{source['unique_id']}.{name}"


def _ddl_types(target: str) -> dict[str, str]:
    """The data_type that documents each of the store's (Snowflake) column types."""
    return {
        "VARCHAR": "varchar",
        "BOOLEAN": "boolean",
        "NUMBER": "bigint",
        "FLOAT": "double",
        "TIMESTAMP_NTZ": "timestamp_ntz" if target == "snowflake" else "timestamp",
        "VARIANT": "variant" if target == "snowflake" else "json",
    }


def test_sources_document_every_column_of_the_workflow_tables(parsed: Parsed) -> None:
    # 100 % column coverage against the tables themselves (the store's DDL), not only against
    # the columns someone remembered to list; and each column's type as the DDL declares it.
    tables = {table.name: table for table in TABLES}
    types = _ddl_types(parsed.target)
    for source in parsed.of_type("source"):
        table = tables[source["identifier"]]
        ddl = set(table.names)
        documented = set(source["columns"])
        assert not ddl - documented, f"{source['unique_id']}: undocumented {ddl - documented}"
        assert not documented - ddl, f"{source['unique_id']}: not in the table {documented - ddl}"
        for column in table.columns:
            expected = types[column.sql_type]
            documented_type = source["columns"][column.name]["data_type"]
            assert documented_type == expected, (source["unique_id"], column.name)


def test_sources_map_onto_the_workflow_asset(parsed: Parsed) -> None:
    translator = DagsterDbtTranslator()
    for source in parsed.of_type("source"):
        # Under `config.meta`, where dbt 1.11 wants it (and dagster-dbt reads it first).
        assert source["config"]["meta"]["dagster"]["asset_key"] == WORKFLOW_ASSET_KEY
        # dagster-dbt's own translator maps it, with no override in Python.
        assert translator.get_asset_key(source) == AssetKey(WORKFLOW_ASSET_KEY)


def test_every_data_test_has_a_readable_name_and_a_description(parsed: Parsed) -> None:
    tests = parsed.of_type("test")
    assert tests
    names = [test["name"] for test in tests]
    assert len(names) == len(set(names)), names
    for test in tests:
        name = test["name"]
        assert READABLE_NAME.fullmatch(name), name
        assert len(name) <= MAX_NAME_LENGTH, name
        assert "__" not in name, name
        assert test["description"].strip(), name


def _data_tests(node: Mapping[str, Any]) -> Iterator[Any]:
    yield from node.get("data_tests") or ()
    yield from node.get("tests") or ()
    for column in node.get("columns") or ():
        yield from column.get("data_tests") or ()
        yield from column.get("tests") or ()


def test_every_data_test_is_named_explicitly_in_the_yaml() -> None:
    """In the YAML itself: no bare ``- unique`` whose name dbt would generate."""
    entries = []
    for path in _yaml_files():
        document = yaml.safe_load(path.read_text()) or {}
        nodes = list(document.get("models") or ())
        for source in document.get("sources") or ():
            nodes.extend(source.get("tables") or ())
        for node in nodes:
            for entry in _data_tests(node):
                entries.append(entry)
                assert isinstance(entry, dict) and len(entry) == 1, (path.name, entry)
                ((test_type, properties),) = entry.items()
                assert isinstance(properties, dict), (path.name, node["name"], test_type)
                assert properties.get("name"), (path.name, node["name"], test_type)
                assert (properties.get("description") or "").strip(), properties["name"]
    assert entries
