"""The resources, configured from the settings: each holds configuration and hands out a plain
client or store from `policy_pipeline.core` (the pattern of dagster-fivetran's resource).

The state lives in DuckDB by default, or in Snowflake (`snowflake_state`, imported only when
chosen because dagster-snowflake takes seconds to import). Secrets reach the resources as
``EnvVar`` so they are resolved at run time and never displayed."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from dagster import EnvVar
from dagster_duckdb import DuckDBResource

from policy_pipeline.core.policy_api_types import InvalidApiKeyError, api_key_problem
from policy_pipeline.core.settings import API_ENDPOINT_VAR, API_KEY_VAR, Settings
from policy_pipeline.resources.policy_api import PolicyApiResource
from policy_pipeline.resources.state import DuckDBStateResource, PolicyStateResource

__all__ = [
    "DuckDBStateResource",
    "PolicyApiResource",
    "PolicyStateResource",
    "build_resources",
    "open_state",
    "policy_api_resource",
    "state_resource",
]


def policy_api_resource(
    settings: Settings,
    *,
    endpoint_var: str = API_ENDPOINT_VAR,
    key_var: str = API_KEY_VAR,
) -> PolicyApiResource:
    """The Policy API client. The key stays an EnvVar (resolved per run), but a key that is set
    and unusable fails here, when the code location loads, not mid-run after state was written
    (the client checks again when it builds its HTTP session)."""
    key = Settings.secret_if_set(key_var)
    if key is not None:
        problem = api_key_problem(key)
        if problem is not None:
            raise InvalidApiKeyError(
                f"{key_var} {problem}; it must be printable ASCII without spaces "
                "(the value is not shown)"
            )
    # The settings' knobs have the resource's field names.
    return PolicyApiResource(
        endpoint=EnvVar(endpoint_var), api_key=EnvVar(key_var), **dataclasses.asdict(settings.api)
    )


def state_resource(settings: Settings) -> PolicyStateResource:
    leases = settings.leases
    if settings.warehouse == "snowflake":
        from policy_pipeline.resources.snowflake_state import (
            SnowflakeStateResource,
            snowflake_resource,
        )

        return SnowflakeStateResource(
            snowflake=snowflake_resource(settings),
            lease_ttl_seconds=leases.ttl_seconds,
            lease_wait_seconds=leases.wait_seconds,
        )
    return DuckDBStateResource(
        duckdb=DuckDBResource(database=str(settings.duckdb_path)),
        lease_ttl_seconds=leases.ttl_seconds,
        lease_wait_seconds=leases.wait_seconds,
    )


def build_resources(
    settings: Settings, *, endpoint_var: str = API_ENDPOINT_VAR, key_var: str = API_KEY_VAR
) -> dict[str, Any]:
    """The workflow's resources by the names its assets, checks and sensors ask for."""
    return {
        "policy_api": policy_api_resource(settings, endpoint_var=endpoint_var, key_var=key_var),
        "policy_state": state_resource(settings),
    }


@contextmanager
def open_state(settings: Settings) -> Iterator[PolicyStateResource]:
    """The state resource outside a Dagster run (demo, CLI), its EnvVar fields resolved from
    the environment as a run would resolve them."""
    with state_resource(settings).process_config_and_initialize_cm() as resource:
        yield resource
