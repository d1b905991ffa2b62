"""The resources, and their configuration for this environment (from environment variables).

The state lives in DuckDB here, or in Snowflake (`snowflake_config`, imported only when chosen
because dagster-snowflake takes seconds to import). Secrets reach the resources as ``EnvVar``
so they are resolved at run time and never displayed."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from dagster import ConfigurableResource, EnvVar
from dagster_duckdb import DuckDBResource
from pydantic import Field, PrivateAttr

from policy_pipeline.core.engine.progress import ProgressPolicy
from policy_pipeline.core.policy_api import PolicyApiResource
from policy_pipeline.core.policy_api_types import InvalidApiKeyError, api_key_problem
from policy_pipeline.core.settings import Settings, env_float, env_int
from policy_pipeline.core.store.connection import Warehouse
from policy_pipeline.core.store.sql import Dialect
from policy_pipeline.core.store.state_store import StateStore


class PolicyStateResource(ConfigurableResource):
    """The state table, audit trail and per-policy leases, in one warehouse."""

    lease_ttl_seconds: int = Field(
        default=30,
        ge=5,
        description="How long a run's claim on a policy lasts without renewal (renewed every "
        "third of it; a crashed run's policies are free again within it).",
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
        database = str(Path(self.duckdb.database).resolve())
        return Warehouse(Dialect.DUCKDB, self.duckdb.get_connection, database)


def policy_api_resource() -> PolicyApiResource:
    """The Policy API client. POLICY_API_KEY stays an EnvVar (resolved per run), but a key that
    is set and unusable fails here, when the code location loads, not mid-run after state was
    written (the client checks again when it builds its HTTP client)."""
    key = os.environ.get("POLICY_API_KEY")
    if key is not None:
        problem = api_key_problem(key)
        if problem is not None:
            raise InvalidApiKeyError(
                f"POLICY_API_KEY {problem}; it must be printable ASCII without spaces "
                "(the value is not shown)"
            )
    return PolicyApiResource(
        endpoint=EnvVar("POLICY_API_ENDPOINT"),
        api_key=EnvVar("POLICY_API_KEY"),
        timeout_seconds=env_float("POLICY_API_TIMEOUT_SECONDS", 30.0),
        max_attempts=env_int("POLICY_API_MAX_ATTEMPTS", 5, minimum=1),
        backoff_initial_seconds=env_float("POLICY_API_BACKOFF_INITIAL_SECONDS", 0.5),
        backoff_max_seconds=env_float("POLICY_API_BACKOFF_MAX_SECONDS", 30.0),
        max_concurrent_requests=env_int("POLICY_API_MAX_CONCURRENCY", 16, minimum=1),
        guard_failure_threshold=env_int("POLICY_GUARD_FAILURE_THRESHOLD", 10, minimum=1),
        guard_cooldown_seconds=env_int("POLICY_GUARD_COOLDOWN_SECONDS", 60, minimum=0),
    )


def progress_policy() -> ProgressPolicy:
    """`policy_progress_sensor`'s settings (README, "Nothing waits on a person")."""
    return ProgressPolicy(
        wait_poll_seconds=env_float("POLICY_WAIT_POLL_INTERVAL_SECONDS", 300.0, minimum=1.0),
        wait_deadline_seconds=env_float("POLICY_WAIT_DEADLINE_SECONDS", 86_400.0, minimum=1.0),
        poll_batch=env_int("POLICY_WAIT_POLL_BATCH", 2_000, minimum=1),
        tick_budget_seconds=env_float("POLICY_PROGRESS_TICK_BUDGET_SECONDS", 20.0, minimum=1.0),
        concurrency=env_int("POLICY_API_MAX_CONCURRENCY", 16, minimum=1),
        resume_max_attempts=env_int("POLICY_RESUME_MAX_ATTEMPTS", 5, minimum=0),
        resume_backoff_seconds=env_float("POLICY_RESUME_BACKOFF_SECONDS", 60.0),
        resume_backoff_max_seconds=env_float("POLICY_RESUME_BACKOFF_MAX_SECONDS", 3_600.0),
    )


def state_resource(settings: Settings) -> PolicyStateResource:
    ttl = env_int("POLICY_LEASE_TTL_SECONDS", 30, minimum=5)
    wait = env_float("POLICY_LEASE_WAIT_SECONDS", 60.0)
    if settings.warehouse == "snowflake":
        from policy_pipeline.snowflake_config import SnowflakeStateResource, snowflake_resource

        return SnowflakeStateResource(
            snowflake=snowflake_resource(), lease_ttl_seconds=ttl, lease_wait_seconds=wait
        )
    return DuckDBStateResource(
        duckdb=DuckDBResource(database=str(settings.duckdb_path)),
        lease_ttl_seconds=ttl,
        lease_wait_seconds=wait,
    )


@contextmanager
def open_state(settings: Settings) -> Iterator[PolicyStateResource]:
    """The state resource outside a Dagster run (demo, CLI), its EnvVar fields resolved from
    the environment as a run would resolve them."""
    with state_resource(settings).process_config_and_initialize_cm() as resource:
        yield resource
