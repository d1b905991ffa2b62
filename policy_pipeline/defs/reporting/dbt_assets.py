"""The dbt reporting models as Dagster assets, downstream of the policy workflow.

The dbt project (``dbt_project/``) reads the workflow's state and event tables and builds the
``policy_execution_results`` view and the ``policy_execution_daily_stats`` table on the same
warehouse the workflow writes to (``POLICY_WAREHOUSE``: DuckDB or Snowflake).

The manifest that ``@dbt_assets`` needs is prepared at import (``prepare_dbt_manifest``) wherever
the code location loads, not only under ``dagster dev``: a fresh manifest costs an mtime
comparison, a stale or missing one an in-process ``dbt parse`` that needs no warehouse.
"""

# No `from __future__ import annotations`: Dagster inspects the asset's `context` annotation.
import importlib.metadata
import logging
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from functools import cached_property
from pathlib import Path
from typing import Any, Final

from dagster import (
    AssetExecutionContext,
    AssetKey,
    AssetSelection,
    AssetSpec,
    DefaultScheduleStatus,
    ScheduleDefinition,
    define_asset_job,
)
from dagster_dbt import (
    DagsterDbtTranslator,
    DagsterDbtTranslatorSettings,
    DbtCliResource,
    DbtProject,
    dbt_assets,
)
from filelock import FileLock, Timeout
from packaging.version import Version

from policy_pipeline.core.settings import PROJECT_ROOT, Settings, Warehouse

log = logging.getLogger(__name__)

DBT_PROJECT_DIR: Final = PROJECT_ROOT / "dbt_project"

DBT_GROUP: Final = "policy_reporting"
DBT_OWNERS: Final = ("team:data-platform",)  # the same owners as the workflow assets
# The workflow asset that finishes writing the state and event tables the dbt sources read.
WORKFLOW_ASSET_KEY: Final = AssetKey(["circuit_breaker_activation"])
WORKFLOW_SOURCE_NAME: Final = "policy_state"

# The target every manifest is parsed with: it renders without any secret, and dbt parse
# connects to nothing. The manifest's structure (nodes, tests, lineage) does not depend on
# the target; ``dbt build`` compiles against the real one at run time.
PARSE_TARGET: Final = "duckdb"

# Generated or tool-owned paths under the dbt project that never make the manifest stale.
_NOT_SOURCES: Final = frozenset({"target", "logs", "dbt_packages", ".user.yml", "__pycache__"})
_LOCK_TIMEOUT_S: Final = 300.0
# Dagster's standard table metadata keys (TableMetadataSet is not exported by `dagster`).
_TABLE_NAME_KEY: Final = "dagster/table_name"
_STORAGE_KIND_KEY: Final = "dagster/storage_kind"


# --- Manifest preparation ---------------------------------------------------------------------


def _source_files(project_dir: Path) -> Iterator[Path]:
    """Every file and folder whose change can change the manifest (folders: for deletions).

    The project folder itself is left out: dbt creating ``target/`` or ``logs/`` in it would
    otherwise make every manifest look stale.
    """
    for root, dirs, files in os.walk(project_dir):
        dirs[:] = [d for d in dirs if d not in _NOT_SOURCES]
        if Path(root) != project_dir:
            yield Path(root)
        for name in files:
            if name not in _NOT_SOURCES:
                yield Path(root, name)


def manifest_is_fresh(project_dir: Path = DBT_PROJECT_DIR) -> bool:
    """True when ``target/manifest.json`` exists and is newer than every project file."""
    try:
        manifest_mtime = (project_dir / "target" / "manifest.json").stat().st_mtime_ns
    except FileNotFoundError:
        return False
    return all(path.stat().st_mtime_ns <= manifest_mtime for path in _source_files(project_dir))


def _run_dbt_parse(project_dir: Path, target_path: Path) -> None:
    # In process: the code location has imported dagster-dbt (and most of dbt with it), so this
    # skips a second interpreter start and dbt import, the bulk of a parse's time.
    from dbt.cli.main import dbtRunner

    result = dbtRunner().invoke(
        [
            "parse",
            "--quiet",
            "--no-use-colors",
            "--project-dir",
            str(project_dir),
            "--profiles-dir",
            str(project_dir),
            "--target",
            PARSE_TARGET,
            "--target-path",
            str(target_path),
            "--log-path",
            str(target_path),
            "--log-level-file",
            "none",
        ]
    )
    if not result.success:
        raise RuntimeError(f"dbt parse of {project_dir} failed: {result.exception}")


def prepare_dbt_manifest(project_dir: Path = DBT_PROJECT_DIR, *, force: bool = False) -> Path:
    """Make ``project_dir/target/manifest.json`` current and return its path.

    Fresh (newer than every file of the project): nothing to do. Otherwise ``dbt parse`` runs
    into a private temporary target folder and the manifest (with dbt's partial-parse state) is
    renamed into ``target/`` atomically, so a reader sees the old or the new manifest, never a
    partial one. A file lock keeps concurrent loads (webserver, daemon, run workers) from
    parsing side by side; if it cannot be had in time, parsing anyway is still safe.
    """
    project_dir = project_dir.resolve()
    target_dir = project_dir / "target"
    manifest = target_dir / "manifest.json"
    if not force and manifest_is_fresh(project_dir):
        return manifest

    target_dir.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(target_dir / ".manifest.lock"))
    try:
        lock.acquire(timeout=_LOCK_TIMEOUT_S)
    except Timeout:
        # Another process is stuck holding it; the atomic rename keeps us safe without it.
        log.warning("parsing %s without the manifest lock (held for too long)", project_dir)
    try:
        # Whoever held the lock before us may just have produced a current manifest.
        if not force and manifest_is_fresh(project_dir):
            return manifest
        started_ns = time.time_ns()
        with tempfile.TemporaryDirectory(dir=target_dir, prefix=".parse-") as scratch:
            scratch_dir = Path(scratch)
            partial = target_dir / "partial_parse.msgpack"
            if partial.exists():
                # dbt checks every file's checksum against it, so a stale one only costs time.
                shutil.copy2(partial, scratch_dir / partial.name)
            _run_dbt_parse(project_dir, scratch_dir)
            log.info(
                "parsed dbt project %s in %.1fs", project_dir, (time.time_ns() - started_ns) / 1e9
            )
            if (scratch_dir / partial.name).exists():
                os.replace(scratch_dir / partial.name, partial)
            os.replace(scratch_dir / "manifest.json", manifest)
        # Stamp the manifest with the time the parse began: a file saved during the parse is
        # newer than that, so the next load parses again instead of trusting this manifest.
        os.utime(manifest, ns=(started_ns, started_ns))
        return manifest
    finally:
        if lock.is_locked:
            lock.release()


# --- Dagster definitions ----------------------------------------------------------------------


class PolicyDbtTranslator(DagsterDbtTranslator):
    """Maps the workflow's tables onto the workflow asset and labels the reporting models.

    Both dbt sources (state and events) are the output of the workflow, whose last step is
    ``circuit_breaker_activation``: mapping them to that key draws the dbt models downstream of
    the workflow in the asset graph, rather than as two unconnected external tables.
    """

    def __init__(self, warehouse: Warehouse | None = None) -> None:
        super().__init__(
            DagsterDbtTranslatorSettings(
                # dbt model tests become asset checks on the models.
                enable_asset_checks=True,
                # Both sources share one asset key on purpose.
                enable_duplicate_source_asset_keys=True,
                # Source tests stay observations: as checks they would land on the workflow's
                # partitioned asset, which the workflow code owns. They still run in
                # `dbt build`, and a failing one fails the build (and skips the models).
                enable_source_tests_as_checks=False,
            )
        )
        self.warehouse: Warehouse = warehouse or Settings.from_env().warehouse

    def get_asset_key(self, dbt_resource_props: Mapping[str, Any]) -> AssetKey:
        if (
            dbt_resource_props["resource_type"] == "source"
            and dbt_resource_props["source_name"] == WORKFLOW_SOURCE_NAME
        ):
            return WORKFLOW_ASSET_KEY
        return super().get_asset_key(dbt_resource_props)

    def get_group_name(self, dbt_resource_props: Mapping[str, Any]) -> str | None:
        if dbt_resource_props["resource_type"] == "source":
            return super().get_group_name(dbt_resource_props)
        return DBT_GROUP

    def get_owners(self, dbt_resource_props: Mapping[str, Any]) -> Sequence[str] | None:
        # Owners set in dbt (meta.dagster.owners or a dbt group) win over the team default.
        return super().get_owners(dbt_resource_props) or list(DBT_OWNERS)

    def get_description(self, dbt_resource_props: Mapping[str, Any]) -> str:
        description = (dbt_resource_props.get("description") or "").strip()
        if description:
            return description
        materialized = dbt_resource_props.get("config", {}).get("materialized", "model")
        return f"dbt {materialized} {dbt_resource_props['name']} (policy reporting)."

    def get_metadata(self, dbt_resource_props: Mapping[str, Any]) -> Mapping[str, Any]:
        metadata = dict(super().get_metadata(dbt_resource_props))
        if dbt_resource_props["resource_type"] != "source":
            # The manifest is parsed with the DuckDB target whatever the warehouse, so its
            # database-qualified relation would be wrong on Snowflake: name the relation only
            # (it lives in the warehouse's configured schema).
            metadata[_TABLE_NAME_KEY] = dbt_resource_props["alias"]
        return metadata

    def get_asset_spec(
        self, manifest: Mapping[str, Any], unique_id: str, project: DbtProject | None
    ) -> AssetSpec:
        spec = super().get_asset_spec(manifest, unique_id, project)
        if unique_id.startswith("source."):
            return spec
        # The manifest's adapter is the parse target's; show the warehouse the models run on.
        materialized = self.get_resource_props(manifest, unique_id)["config"].get("materialized")
        kinds = {"dbt", self.warehouse}
        if materialized in ("view", "table"):
            kinds.add(materialized)
        return spec.replace_attributes(
            kinds=kinds,
            metadata={**spec.metadata, _STORAGE_KIND_KEY: self.warehouse},
        )


def _dbt_executable() -> str:
    # The dbt beside this interpreter: `dagster dev` from an unactivated venv has no dbt on PATH.
    candidate = Path(sys.executable).parent / "dbt"
    return str(candidate) if candidate.exists() else "dbt"


class PolicyDbtCliResource(DbtCliResource):
    """``DbtCliResource`` that knows the version of the dbt beside this interpreter.

    dagster-dbt otherwise runs ``dbt --version`` before every invocation it makes in a run: a
    second dbt start-up (seconds here), and dbt's version check then queries PyPI, three
    requests that a network-less deployment waits out. The dbt installed beside this
    interpreter is the dbt-core this process can import, so its version is known already.
    """

    @cached_property
    def _cli_version(self) -> Version:
        if self.dbt_executable == _dbt_executable() and Path(self.dbt_executable).is_absolute():
            return Version(importlib.metadata.version("dbt-core"))
        return super()._cli_version  # Another dbt: ask it, as dagster-dbt does.


def dbt_cli_resource(settings: Settings) -> PolicyDbtCliResource:
    """A ``DbtCliResource`` for the warehouse (profiles.yml targets share its name).

    For DuckDB, ``POLICY_DUCKDB_PATH`` is set in this process's environment to its absolute
    form (what the workflow itself resolves it to), because dagster-dbt hands dbt this
    process's environment and dbt would resolve a relative path against ``dbt_project/``.
    """
    if settings.warehouse == "duckdb":
        os.environ["POLICY_DUCKDB_PATH"] = str(settings.duckdb_path)
    return PolicyDbtCliResource(
        project_dir=str(dbt_project.project_dir),
        profiles_dir=str(dbt_project.profiles_dir),
        target=settings.warehouse,
        dbt_executable=_dbt_executable(),
    )


DBT_MANIFEST_PATH: Final = prepare_dbt_manifest()

dbt_project = DbtProject(
    project_dir=DBT_PROJECT_DIR,
    profiles_dir=DBT_PROJECT_DIR,
    target=Settings.from_env().warehouse,
)


@dbt_assets(
    manifest=DBT_MANIFEST_PATH,
    project=dbt_project,
    dagster_dbt_translator=PolicyDbtTranslator(),
    name="policy_dbt_models",
)
def policy_dbt_assets(context: AssetExecutionContext, dbt: DbtCliResource) -> Iterator[Any]:
    """``dbt build``: the models, then their tests, reported as asset checks."""
    yield from dbt.cli(["build"], context=context).stream()


policy_reporting_job = define_asset_job(
    "policy_reporting_job",
    selection=AssetSelection.assets(policy_dbt_assets),
    description="dbt build of the reporting models and their tests (asset checks).",
)

policy_reporting_schedule = ScheduleDefinition(
    name="policy_reporting_hourly",
    job=policy_reporting_job,
    cron_schedule="5 * * * *",
    default_status=DefaultScheduleStatus.RUNNING,
    description="Rebuilds the reporting models (and runs their tests) every hour.",
)
