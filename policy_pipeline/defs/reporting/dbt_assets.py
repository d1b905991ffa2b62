"""The dbt reporting models as Dagster assets, downstream of the policy workflow.

The dbt project (``dbt_project/``, see ``project.py``) reads the workflow's state and event
tables and builds the ``policy_execution_results`` view and the ``policy_execution_daily_stats``
table on the same warehouse the workflow writes to (``POLICY_WAREHOUSE``: DuckDB or
Snowflake). Its sources name the workflow's asset keys themselves (``meta.dagster.asset_key``
in ``sources.yml``), so the models sit downstream of the workflow in the asset graph, and
declarative automation rebuilds them after the workflow moves (an hourly schedule stays as a
floor).

The warehouse's secrets reach dbt's process as ``DBT_ENV_SECRET_*`` variables as well, in every
form `policy_pipeline.core.scrubbing` knows: dbt scrubs those from its log lines and error
messages, so a login error that echoes the password reaches neither the compute logs nor the
run's events.
"""

# No `from __future__ import annotations`: Dagster inspects the asset's `context` annotation.
import importlib.metadata
import os
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from functools import cached_property
from pathlib import Path
from typing import Any, Final

from dagster import (
    AssetExecutionContext,
    AssetsDefinition,
    AssetSelection,
    AssetSpec,
    AutomationCondition,
    AutomationConditionSensorDefinition,
    DefaultScheduleStatus,
    DefaultSensorStatus,
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
from packaging.version import Version

from policy_pipeline.core.scrubbing import SecretScrubber
from policy_pipeline.core.settings import Settings, WarehouseKind
from policy_pipeline.defs.reporting.project import dbt_executable, policy_dbt_project
from policy_pipeline.resources.state import PolicyStateResource

DBT_GROUP: Final = "policy_reporting"
DBT_OWNERS: Final = ("team:data-platform",)  # the same owners as the workflow assets
# Dagster's standard table metadata keys (TableMetadataSet is not exported by `dagster`).
_TABLE_NAME_KEY: Final = "dagster/table_name"
_STORAGE_KIND_KEY: Final = "dagster/storage_kind"

# Rebuild once the workflow has moved (a policy materialized by a run or the progress
# sensor), when no workflow step is still writing. Not `eager()`: it also waits for every
# upstream partition to exist, and a failed policy's partitions never do.
REBUILD_AFTER_WORKFLOW: Final = (
    AutomationCondition.any_deps_updated().since_last_handled()
    & ~AutomationCondition.any_deps_in_progress()
    & ~AutomationCondition.in_progress()
).with_label("rebuild after the workflow moves")


class PolicyDbtTranslator(DagsterDbtTranslator):
    """Labels the reporting models and gives them their automation condition.

    Both dbt sources (state and events) name the workflow's last step,
    ``circuit_breaker_activation``, as their asset key in ``sources.yml``
    (``meta.dagster.asset_key``), which draws the models downstream of the workflow.
    """

    def __init__(self, warehouse: WarehouseKind) -> None:
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
        self.warehouse: WarehouseKind = warehouse

    def get_automation_condition(
        self, dbt_resource_props: Mapping[str, Any]
    ) -> AutomationCondition | None:
        if dbt_resource_props["resource_type"] == "model":
            return REBUILD_AFTER_WORKFLOW
        return super().get_automation_condition(dbt_resource_props)

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


class PolicyDbtCliResource(DbtCliResource):
    """``DbtCliResource`` that knows the version of the dbt beside this interpreter.

    The project's one use of private Dagster API, on purpose and only here: dagster-dbt runs
    ``dbt --version`` before every invocation it makes in a run (its private ``_cli_version``)
    — a second dbt start-up (seconds here), whose version check then queries PyPI, three
    requests that a network-less deployment waits out. The dbt installed beside this
    interpreter is the dbt-core this process can import, so its version is known already.
    If dagster-dbt renames the property, this override is simply unused (a slower start).
    """

    @cached_property
    def _cli_version(self) -> Version:
        if self.dbt_executable == dbt_executable() and Path(self.dbt_executable).is_absolute():
            return Version(importlib.metadata.version("dbt-core"))
        return super()._cli_version  # Another dbt: ask it, as dagster-dbt does.


def dbt_cli_resource(settings: Settings) -> "PolicyDbtCliResource":
    """A ``DbtCliResource`` for the warehouse (profiles.yml targets share its name). The
    profile resolves a relative POLICY_DUCKDB_PATH against the repository root, as the
    workflow does, so both open the same file."""
    return PolicyDbtCliResource(
        project_dir=str(policy_dbt_project.project_dir),
        profiles_dir=str(policy_dbt_project.profiles_dir),
        target=settings.warehouse,
        dbt_executable=dbt_executable(),
    )


# dbt scrubs the value of every environment variable named with dbt_common's SECRET_ENV_PREFIX
# ("DBT_ENV_SECRET") from what it logs and raises.
DBT_SECRET_ENV_PREFIX: Final = "DBT_ENV_SECRET_POLICY_PIPELINE_"


@contextmanager
def dbt_scrubs(secrets: Sequence[str]) -> Iterator[None]:
    """While dbt runs (dagster-dbt passes this process's environment to it), every form of
    ``secrets`` as a ``DBT_ENV_SECRET_*`` variable."""
    forms = SecretScrubber(*secrets).forms
    names = [f"{DBT_SECRET_ENV_PREFIX}{i}" for i in range(len(forms))]
    os.environ.update(zip(names, forms, strict=True))
    try:
        yield
    finally:
        for name in names:
            os.environ.pop(name, None)


def _manifest_path(project: DbtProject) -> Path:
    if not project.manifest_path.exists():
        raise FileNotFoundError(
            f"the dbt manifest {project.manifest_path} is missing: prepare it with "
            "`dagster-dbt project prepare-and-package --file "
            "policy_pipeline/defs/reporting/project.py` (./dev.sh does), or run `dagster dev`"
        )
    return project.manifest_path


def build_dbt_assets(settings: Settings) -> AssetsDefinition:
    """The reporting models (and their tests as asset checks) for the warehouse in use."""

    @dbt_assets(
        manifest=_manifest_path(policy_dbt_project),
        project=policy_dbt_project,
        dagster_dbt_translator=PolicyDbtTranslator(settings.warehouse),
        name="policy_dbt_models",
    )
    def policy_dbt_assets(
        context: AssetExecutionContext, dbt: DbtCliResource, policy_state: PolicyStateResource
    ) -> Iterator[Any]:
        """``dbt build``: the models, then their tests, reported as asset checks."""
        # The models read the workflow's tables as sources: on a warehouse no run has written
        # to yet they are created (empty) first, so the build succeeds with empty reports.
        policy_state.warehouse().ensure_schema()
        with dbt_scrubs(policy_state.warehouse_secrets()):
            yield from dbt.cli(["build"], context=context).stream()

    return policy_dbt_assets


policy_reporting_job = define_asset_job(
    "policy_reporting_job",
    selection=AssetSelection.groups(DBT_GROUP),
    description="dbt build of the reporting models and their tests (asset checks).",
)

policy_reporting_schedule = ScheduleDefinition(
    name="policy_reporting_hourly",
    job=policy_reporting_job,
    cron_schedule="5 * * * *",
    default_status=DefaultScheduleStatus.RUNNING,
    description="A floor under the automation: rebuilds the reporting models (and runs their "
    "tests) every hour even if nothing materialized the workflow.",
)

policy_reporting_automation = AutomationConditionSensorDefinition(
    "policy_reporting_automation",
    target=AssetSelection.groups(DBT_GROUP),
    default_status=DefaultSensorStatus.RUNNING,
    minimum_interval_seconds=30,
    description="Rebuilds the reporting models after the workflow materializes.",
)
