"""The state resource: the state table, audit trail and per-policy leases in one warehouse.

A Dagster resource that holds configuration and hands out the plain store
(`policy_pipeline.core.store`), which knows nothing of Dagster.
"""

from __future__ import annotations

from pathlib import Path

from dagster import ConfigurableResource
from dagster_duckdb import DuckDBResource
from pydantic import PrivateAttr

from policy_pipeline.core.settings import LeaseSettings, setting_field
from policy_pipeline.core.store.connection import WarehouseConnection
from policy_pipeline.core.store.duckdb_file import duckdb_warehouse
from policy_pipeline.core.store.state_store import StateStore


class PolicyStateResource(ConfigurableResource):
    """The state table, audit trail and per-policy leases, in one warehouse."""

    lease_ttl_seconds: int = setting_field(LeaseSettings, "ttl_seconds")
    lease_wait_seconds: float = setting_field(LeaseSettings, "wait_seconds")

    _warehouse: WarehouseConnection | None = PrivateAttr(default=None)

    def _connect_warehouse(self) -> WarehouseConnection:
        raise NotImplementedError  # each warehouse's resource says how it connects

    def warehouse_secrets(self) -> tuple[str, ...]:
        """What the warehouse is logged in with, scrubbed from every error and log (passed to
        `WarehouseConnection` as ``secrets``): none for a DuckDB file."""
        return ()

    def warehouse(self) -> WarehouseConnection:
        # One connection wrapper per resource instance, so the schema check runs once.
        if self._warehouse is None:
            self._warehouse = self._connect_warehouse()
        return self._warehouse

    def store(self, run_id: str | None = None) -> StateStore:
        return StateStore(self.warehouse(), run_id=run_id)


class DuckDBStateResource(PolicyStateResource):
    """State in a DuckDB file: the embedded default."""

    duckdb: DuckDBResource

    def _connect_warehouse(self) -> WarehouseConnection:
        wait = LeaseSettings(ttl_seconds=self.lease_ttl_seconds).warehouse_wait_seconds
        return duckdb_warehouse(
            Path(self.duckdb.database), wait_seconds=wait, config=self.duckdb.connection_config
        )
