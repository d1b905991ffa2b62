"""State in Snowflake through dagster-snowflake (imported only when chosen: it takes seconds).

Its settings from the environment are checked before any run starts; secrets stay ``EnvVar``
references, resolved at run time and never shown."""

from __future__ import annotations

from typing import Any

from dagster import EnvVar
from dagster_snowflake import SnowflakeResource

from policy_pipeline.core.settings import SNOWFLAKE_PASSPHRASE_VAR, Settings, SettingsError
from policy_pipeline.core.store.connection import WarehouseConnection
from policy_pipeline.core.store.dialect import SqlDialect
from policy_pipeline.resources.state import PolicyStateResource


def snowflake_resource(settings: Settings | None = None) -> SnowflakeResource:
    """A SnowflakeResource from the SNOWFLAKE_* variables."""
    snowflake = (settings or Settings.from_env()).snowflake()
    if snowflake.missing:
        raise SettingsError(
            "POLICY_WAREHOUSE=snowflake but these environment variables are not set: "
            + ", ".join(snowflake.missing)
        )
    args: dict[str, Any] = {
        "account": EnvVar("SNOWFLAKE_ACCOUNT"),
        "user": EnvVar("SNOWFLAKE_USER"),
        "warehouse": EnvVar("SNOWFLAKE_WAREHOUSE"),
        "database": EnvVar("SNOWFLAKE_DATABASE"),
        "schema": EnvVar("SNOWFLAKE_SCHEMA"),
        "role": EnvVar("SNOWFLAKE_ROLE"),
    }
    auth_field = {
        "SNOWFLAKE_PASSWORD": "password",
        "SNOWFLAKE_PRIVATE_KEY": "private_key",
        "SNOWFLAKE_PRIVATE_KEY_PATH": "private_key_path",
    }
    assert snowflake.auth_var is not None  # else it is among the missing
    args[auth_field[snowflake.auth_var]] = EnvVar(snowflake.auth_var)
    if snowflake.auth_var != "SNOWFLAKE_PASSWORD" and snowflake.passphrase_set:
        args["private_key_password"] = EnvVar(SNOWFLAKE_PASSPHRASE_VAR)
    # Private-link hosts and the local test server (fakesnow) are reached through these.
    extra: dict[str, Any] = {}
    if snowflake.host:
        extra["host"] = snowflake.host
    if snowflake.port is not None:
        extra["port"] = snowflake.port
    if snowflake.protocol:
        extra["protocol"] = snowflake.protocol
    if extra:
        args["additional_snowflake_connection_args"] = extra
    return SnowflakeResource(**args)


class SnowflakeStateResource(PolicyStateResource):
    """State in Snowflake through dagster-snowflake."""

    snowflake: SnowflakeResource

    def _connect_warehouse(self) -> WarehouseConnection:
        return WarehouseConnection(SqlDialect.SNOWFLAKE, self.snowflake.get_connection)
