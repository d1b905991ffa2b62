"""The policy workflow as a Dagster Component.

A team with its own Dagster project adds the workflow with a ``defs.yaml``::

    type: policy_pipeline.component.PolicyWorkflowComponent
    attributes:
      catalog_dir: policies              # relative to the project root
      api_endpoint_env: POLICY_API_ENDPOINT
      api_key_env: POLICY_API_KEY
      warehouse: duckdb                  # or snowflake (SNOWFLAKE_* variables)
      duckdb_path: data/policies.duckdb

and gets the assets, checks, sensors, schedules, jobs and resources. Attributes left out take
the environment's settings (README, "Configuration"). This project loads itself the same way
(``policy_pipeline/defs/defs.yaml``).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Literal

from dagster import Component, ComponentLoadContext, Definitions, Model, Resolvable
from pydantic import Field

from policy_pipeline.core.settings import API_ENDPOINT_VAR, API_KEY_VAR, Settings


class PolicyWorkflowComponent(Component, Model, Resolvable):
    """The policy workflow (create, poll, circuit breaker) over a catalog of policy files, with
    its state in DuckDB or Snowflake, its checks, sensors and archive job."""

    catalog_dir: str | None = Field(
        default=None,
        description="Folder of policy YAML files, relative to the project root "
        "(default: POLICY_CATALOG_DIR, else 'policies').",
    )
    api_endpoint_env: str = Field(
        default=API_ENDPOINT_VAR,
        description="Environment variable holding the Policy API's base URL.",
    )
    api_key_env: str = Field(
        default=API_KEY_VAR,
        description="Environment variable holding the Policy API key (read at run time).",
    )
    warehouse: Literal["duckdb", "snowflake"] | None = Field(
        default=None, description="Where the state lives (default: POLICY_WAREHOUSE, else duckdb)."
    )
    duckdb_path: str | None = Field(
        default=None,
        description="DuckDB file, relative to the project root (default: POLICY_DUCKDB_PATH).",
    )
    reporting: bool = Field(
        default=True,
        description="Also the dbt reporting models of dbt_project/ (their results view is "
        "what the checks read).",
    )

    def settings(self, project_root: Path) -> Settings:
        settings = Settings.from_env()
        changes: dict[str, object] = {}
        if self.catalog_dir is not None:
            changes["catalog_dir"] = project_root / self.catalog_dir
        if self.warehouse is not None:
            changes["warehouse"] = self.warehouse
        if self.duckdb_path is not None:
            changes["duckdb_path"] = project_root / self.duckdb_path
        return dataclasses.replace(settings, **changes)  # type: ignore[arg-type]

    def build_defs(self, context: ComponentLoadContext) -> Definitions:
        return build_policy_defs(
            self.settings(context.project_root),
            endpoint_var=self.api_endpoint_env,
            key_var=self.api_key_env,
            reporting=self.reporting,
        )


def build_policy_defs(
    settings: Settings,
    *,
    endpoint_var: str = API_ENDPOINT_VAR,
    key_var: str = API_KEY_VAR,
    reporting: bool = True,
) -> Definitions:
    """Every area's definitions for these settings: workflow, reporting, monitoring and
    operations, with the resources they ask for. Building them reads no file and connects to
    nothing: the catalog is read by runs and sensor ticks, the warehouse by runs."""
    # Imported here: `dg` lists this module's component without loading every area.
    from policy_pipeline.defs.monitoring import build_monitoring_defs
    from policy_pipeline.defs.operations import build_operations_defs
    from policy_pipeline.defs.workflow import build_workflow_defs
    from policy_pipeline.resources import build_resources

    areas = [build_workflow_defs(settings), build_monitoring_defs(), build_operations_defs()]
    if reporting:
        from policy_pipeline.defs.reporting import build_reporting_defs

        areas.append(build_reporting_defs(settings))
    resources = Definitions(
        resources=build_resources(settings, endpoint_var=endpoint_var, key_var=key_var)
    )
    return Definitions.merge(*areas, resources)
