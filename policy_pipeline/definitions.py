"""The code location: Definitions assembled from the per-area modules.

Resources are chosen and configured from the environment (see README, "Configuration"):
secrets reach them as ``EnvVar`` so they are resolved at run time and never displayed.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from dagster import Definitions, EnvVar
from dagster_duckdb import DuckDBResource

from policy_pipeline.api_client import PolicyApiResource
from policy_pipeline.assets import build_workflow_assets
from policy_pipeline.catalog import load_catalog
from policy_pipeline.resources import DuckDBStateResource, PolicyStateResource
from policy_pipeline.settings import Settings, env_float, env_int
from policy_pipeline.state import StateStore


def policy_api_resource() -> PolicyApiResource:
    return PolicyApiResource(
        endpoint=EnvVar("POLICY_API_ENDPOINT"),
        api_key=EnvVar("POLICY_API_KEY"),
        timeout_seconds=env_float("POLICY_API_TIMEOUT_SECONDS", 30.0),
        max_attempts=env_int("POLICY_API_MAX_ATTEMPTS", 5, minimum=1),
        backoff_initial_seconds=env_float("POLICY_API_BACKOFF_INITIAL_SECONDS", 0.5),
        backoff_max_seconds=env_float("POLICY_API_BACKOFF_MAX_SECONDS", 30.0),
        max_concurrent_requests=env_int("POLICY_API_MAX_CONCURRENCY", 16, minimum=1),
    )


def state_resource(settings: Settings) -> PolicyStateResource:
    ttl = env_int("POLICY_LEASE_TTL_SECONDS", 300, minimum=5)
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
def open_state_store(settings: Settings) -> Iterator[StateStore]:
    """The state store outside a Dagster run (demo, CLI): EnvVar fields resolved from the
    environment as a run would."""
    with state_resource(settings).process_config_and_initialize_cm() as resource:
        yield resource.store()


def build_definitions(settings: Settings) -> Definitions:
    catalog = load_catalog(settings.catalog_dir)
    workflow_assets, workflow_job = build_workflow_assets(catalog)
    return Definitions(
        assets=workflow_assets,
        jobs=[workflow_job],
        resources={
            "policy_api": policy_api_resource(),
            "policy_state": state_resource(settings),
        },
    )


defs = build_definitions(Settings.from_env())
