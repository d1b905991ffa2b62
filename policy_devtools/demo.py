"""Run the whole workflow for every catalog policy and print the resulting executions.

With no POLICY_API_ENDPOINT set, the local Policy API simulator is started on a free loopback
port for the duration (with a random API key); the workflow itself runs through the real
``dagster job execute`` CLI, one run for all catalog policies.

    python -m policy_devtools.demo
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from policy_devtools.simulator import PolicyApiSimulator, SimulatorConfig
from policy_pipeline.cli import open_warehouse, print_table
from policy_pipeline.core.catalog import CatalogError, load_catalog
from policy_pipeline.core.settings import PROJECT_ROOT, Settings, SettingsError
from policy_pipeline.defs.workflow.partitions import (
    PARTITIONS_NAME,
    contiguous_ranges,
    partition_tags,
    register_policies,
)
from policy_pipeline.defs.workflow.runs import JOB_NAME


def job_command(job: str, tags: dict[str, str] | None = None) -> list[str]:
    """The README's ``dagster job execute`` form."""
    command = [
        sys.executable,
        "-m",
        "dagster",
        "job",
        "execute",
        "-m",
        "policy_pipeline.definitions",
        "-j",
        job,
    ]
    return [*command, "--tags", json.dumps(tags)] if tags else command


def workflow_command(first: str, last: str) -> list[str]:
    return job_command(JOB_NAME, partition_tags(first, last))


@contextmanager
def policy_api(env: dict[str, str]) -> Iterator[str]:
    """The configured Policy API, or the simulator on a free port when none is configured."""
    if env.get("POLICY_API_ENDPOINT"):
        yield f"Policy API at {env['POLICY_API_ENDPOINT']}"
        return
    key = secrets.token_urlsafe(24)
    config = SimulatorConfig(api_key=key, ready_after_polls=2)
    with PolicyApiSimulator(config) as simulator:
        env["POLICY_API_ENDPOINT"] = simulator.base_url
        env["POLICY_API_KEY"] = key
        yield f"local Policy API simulator at {simulator.base_url}"


def _register(dagster_home: str, names: list[str]) -> list[tuple[str, str]]:
    """Add the catalog's policies as partitions, as the catalog sensor would, and return the
    ranges of partitions that cover them."""
    from dagster import DagsterInstance

    os.environ["DAGSTER_HOME"] = dagster_home
    with DagsterInstance.get() as instance:
        register_policies(instance, names)
        ordered = instance.get_dynamic_partitions(PARTITIONS_NAME)
    return contiguous_ranges(ordered, set(names))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--log", default="data/demo-run.log", help="where the run's log goes")
    args = parser.parse_args(argv)
    env = dict(os.environ)
    try:
        settings = Settings.from_env()
        catalog = load_catalog(settings.catalog_dir)
    except (CatalogError, SettingsError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if not catalog:
        print(f"error: no policies in {settings.catalog_dir}", file=sys.stderr)
        return 2
    names = sorted(catalog)
    env.setdefault("DAGSTER_HOME", str(PROJECT_ROOT / "data" / "dagster_home"))
    Path(env["DAGSTER_HOME"]).mkdir(parents=True, exist_ok=True)
    env["POLICY_DUCKDB_PATH"] = str(settings.duckdb_path)
    log_path = (PROJECT_ROOT / args.log).resolve()
    log_path.parent.mkdir(parents=True, exist_ok=True)

    ranges = _register(env["DAGSTER_HOME"], names)
    with policy_api(env) as api_description:
        print(f"Running {JOB_NAME} for {len(names)} policies against the {api_description}")
        where = (
            str(settings.duckdb_path)
            if settings.warehouse == "duckdb"
            else f"{env.get('SNOWFLAKE_DATABASE')}.{env.get('SNOWFLAKE_SCHEMA')}"
        )
        print(f"  warehouse: {settings.warehouse} ({where})")
        print(f"  DAGSTER_HOME: {env['DAGSTER_HOME']}; run log: {log_path}", flush=True)
        returncode = 0
        with log_path.open("w") as log:
            for first, last in ranges:  # one run, unless the partitions are interleaved
                result = subprocess.run(
                    workflow_command(first, last),
                    env=env,
                    cwd=PROJECT_ROOT,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    check=False,
                )
                returncode = returncode or result.returncode
            if returncode == 0:
                print("Building the dbt reporting models (policy_reporting_job)", flush=True)
                result = subprocess.run(
                    job_command("policy_reporting_job"),
                    env=env,
                    cwd=PROJECT_ROOT,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    check=False,
                )
                returncode = result.returncode

    from policy_pipeline.core.store.health import HealthReport

    with open_warehouse(settings) as warehouse:  # as `policy-pipeline status` reads it
        rows = HealthReport(warehouse).executions(limit=10 * len(names))
    latest: dict[str, dict[str, object]] = {}
    for row in rows:  # newest first: keep each policy's latest execution
        if row["policy_name"] in catalog:
            latest.setdefault(str(row["policy_name"]), row)
    print()
    columns = ["policy_name", "status", "policy_id", "poll_count", "circuit_breaker_completed"]
    print_table([latest[name] for name in names if name in latest], [*columns, "start_time"])
    if returncode != 0:
        print(f"\nThe run failed (exit {returncode}); see {log_path}", file=sys.stderr)
        return 1
    completed = sum(1 for r in latest.values() if r["status"] == "completed")
    print(f"\n{completed} of {len(names)} policies completed.")
    return 0 if completed == len(names) else 1


if __name__ == "__main__":
    sys.exit(main())
