"""The state resource: the state table, audit trail and per-policy leases in one warehouse.

A Dagster resource that holds configuration and hands out the plain store
(`policy_pipeline.core.store`), which knows nothing of Dagster.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import duckdb
from dagster import ConfigurableResource
from dagster_duckdb import DuckDBResource
from pydantic import Field, PrivateAttr

from policy_pipeline.core.engine.leases import LeasePolicy
from policy_pipeline.core.store.connection import WarehouseConnection
from policy_pipeline.core.store.dialect import SqlDialect
from policy_pipeline.core.store.state_store import StateStore


class PolicyStateResource(ConfigurableResource):
    """The state table, audit trail and per-policy leases, in one warehouse."""

    lease_ttl_seconds: int = Field(
        default=LeasePolicy().ttl_seconds,
        ge=5,
        description="How long a run's claim on a policy lasts without renewal (renewed every "
        "third of it; a crashed run's policies are free again within it).",
    )
    lease_wait_seconds: float = Field(
        default=LeasePolicy().wait_seconds,
        ge=0,
        description="How long a step waits for another run's claim.",
    )

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
        # The folder is made when the first run connects, not when the definitions load.
        Path(self.duckdb.database).parent.mkdir(parents=True, exist_ok=True)
        database = str(Path(self.duckdb.database).resolve())
        wait = LeasePolicy(ttl_seconds=self.lease_ttl_seconds).warehouse_wait_seconds
        config = {"custom_user_agent": "dagster", **self.duckdb.connection_config}

        # dagster-duckdb's own connect waits about 100 s for a file another process holds
        # (a reader, a backup): longer than a lease lives. This one gives up within a third
        # of the TTL, so a run's lease renewals fail (and fence its calls) before it lapses.
        @contextmanager
        def connect() -> Iterator[duckdb.DuckDBPyConnection]:
            connection = connect_duckdb(database, config, wait)
            try:
                yield connection
            finally:
                connection.close()

        return WarehouseConnection(SqlDialect.DUCKDB, connect, database)


def connect_duckdb(
    database: str, config: dict[str, Any], wait_seconds: float
) -> duckdb.DuckDBPyConnection:
    """Open the DuckDB file, retrying while another process holds its lock, for at most
    ``wait_seconds``."""
    deadline = time.monotonic() + wait_seconds
    delay = 0.05
    while True:
        try:
            return duckdb.connect(database, read_only=False, config=config)
        except (duckdb.IOException, RuntimeError):
            left = deadline - time.monotonic()
            if left <= 0:
                raise
            time.sleep(min(delay, left))
            delay = min(delay * 2, 1.0)
