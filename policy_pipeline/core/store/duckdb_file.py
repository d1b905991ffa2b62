"""The state in a DuckDB file: one connection factory, for the Dagster resource
(`policy_pipeline.resources.state.DuckDBStateResource`) and for the operator CLI alike."""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import duckdb

from policy_pipeline.core.store.connection import WarehouseConnection
from policy_pipeline.core.store.dialect import SqlDialect


def duckdb_warehouse(
    path: Path, *, wait_seconds: float, config: Mapping[str, Any] | None = None
) -> WarehouseConnection:
    """The state in the DuckDB file ``path``; a connection waits at most ``wait_seconds`` for
    the file's lock. Its folder is made when the first connection is opened."""
    # dagster-duckdb's own connect waits about 100 s for a file another process holds (a
    # reader, a backup): longer than a lease lives. This one gives up within the given wait (a
    # third of the lease TTL), so a run's lease renewals fail (and fence its calls) in time.
    settings = {"custom_user_agent": "dagster", **(config or {})}

    @contextmanager
    def connect() -> Iterator[duckdb.DuckDBPyConnection]:
        path.parent.mkdir(parents=True, exist_ok=True)
        connection = connect_duckdb(str(path.resolve()), settings, wait_seconds)
        try:
            yield connection
        finally:
            connection.close()

    return WarehouseConnection(SqlDialect.DUCKDB, connect, str(path.resolve()))


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
