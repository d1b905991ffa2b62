"""The warehouse resources: where the workflow's state lives (DuckDB here; Snowflake in
`snowflake_config`, imported only when chosen because dagster-snowflake takes seconds to import)."""

from __future__ import annotations

from pathlib import Path

from dagster import ConfigurableResource
from dagster_duckdb import DuckDBResource
from pydantic import Field, PrivateAttr

from policy_pipeline.sql import Dialect
from policy_pipeline.state import StateStore
from policy_pipeline.warehouse import Warehouse


class PolicyStateResource(ConfigurableResource):
    """The state table, audit trail and per-policy leases, in one warehouse."""

    lease_ttl_seconds: int = Field(
        default=300,
        ge=5,
        description="How long a run's claim on a policy lasts without renewal (crash recovery).",
    )
    lease_wait_seconds: float = Field(
        default=60.0, ge=0, description="How long a step waits for another run's claim."
    )

    _warehouse: Warehouse | None = PrivateAttr(default=None)

    def _connect_warehouse(self) -> Warehouse:
        raise NotImplementedError

    def warehouse(self) -> Warehouse:
        # One Warehouse per resource instance, so the schema check runs once per process.
        if self._warehouse is None:
            self._warehouse = self._connect_warehouse()
        return self._warehouse

    def store(self, run_id: str | None = None) -> StateStore:
        return StateStore(self.warehouse(), run_id=run_id)


class DuckDBStateResource(PolicyStateResource):
    """State in a DuckDB file: the embedded default."""

    duckdb: DuckDBResource

    def _connect_warehouse(self) -> Warehouse:
        Path(self.duckdb.database).parent.mkdir(parents=True, exist_ok=True)
        return Warehouse(Dialect.DUCKDB, self.duckdb.get_connection)
