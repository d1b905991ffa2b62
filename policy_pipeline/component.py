"""The policy workflow as a Dagster Component.

A team with its own Dagster project adds the workflow with a ``defs.yaml``::

    type: policy_pipeline.component.PolicyWorkflowComponent
    attributes:
      catalog_dir: policies              # relative to the project root
      api_endpoint_env: POLICY_API_ENDPOINT
      api_key_env: POLICY_API_KEY
      warehouse: duckdb                  # or snowflake (SNOWFLAKE_* variables)
      duckdb_path: data/policies.duckdb
      polling: {initial_interval_seconds: 2, wait_handoff_seconds: 300}
      leases: {ttl_seconds: 60}
      max_concurrency: 8

and gets the assets, checks, sensors, schedules, jobs and resources. Attributes left out take
the environment's settings (README, "Configuration"). This project loads itself the same way
(``policy_pipeline/defs/defs.yaml``).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Literal

from dagster import Component, ComponentLoadContext, Definitions, Model, Resolvable
from pydantic import Field

from policy_pipeline.core.settings import (
    API_ENDPOINT_VAR,
    API_KEY_VAR,
    ApiSettings,
    LeaseSettings,
    PollingSettings,
    Settings,
    override_field,
    with_overrides,
)


def _knob(section: type, name: str) -> Any:
    return override_field(section, name)


class PollingAttributes(Model, Resolvable):
    """How runs poll a policy until ready (run config overrides each for one run)."""

    initial_interval_seconds: float | None = _knob(PollingSettings, "initial_interval_seconds")
    max_interval_seconds: float | None = _knob(PollingSettings, "max_interval_seconds")
    backoff_multiplier: float | None = _knob(PollingSettings, "backoff_multiplier")
    max_polls: int | None = _knob(PollingSettings, "max_polls")
    deadline_seconds: float | None = _knob(PollingSettings, "deadline_seconds")
    wait_handoff_seconds: float | None = _knob(PollingSettings, "wait_handoff_seconds")
    wait_poll_interval_seconds: float | None = _knob(PollingSettings, "wait_poll_interval_seconds")
    not_found_grace_seconds: float | None = _knob(PollingSettings, "not_found_grace_seconds")


class LeaseAttributes(Model, Resolvable):
    """Per-policy leases."""

    ttl_seconds: int | None = _knob(LeaseSettings, "ttl_seconds")
    wait_seconds: float | None = _knob(LeaseSettings, "wait_seconds")


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
    polling: PollingAttributes | None = Field(
        default=None, description="How runs poll a policy (POLICY_POLL_* and POLICY_WAIT_*)."
    )
    leases: LeaseAttributes | None = Field(
        default=None, description="Per-policy leases (POLICY_LEASE_TTL_SECONDS, ..._WAIT_SECONDS)."
    )
    max_concurrency: int | None = override_field(ApiSettings, "max_concurrency")
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
        if self.polling is not None:
            changes["polling"] = with_overrides(settings.polling, self.polling.model_dump())
        if self.leases is not None:
            changes["leases"] = with_overrides(settings.leases, self.leases.model_dump())
        changes["api"] = with_overrides(settings.api, {"max_concurrency": self.max_concurrency})
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

    areas = [
        build_workflow_defs(settings),
        build_monitoring_defs(settings),
        build_operations_defs(settings),
    ]
    if reporting:
        from policy_pipeline.defs.reporting import build_reporting_defs

        areas.append(build_reporting_defs(settings))
    resources = Definitions(
        resources=build_resources(settings, endpoint_var=endpoint_var, key_var=key_var)
    )
    return Definitions.merge(*areas, resources)
