"""The Snowflake state resource, with its settings from the environment checked before any run
starts."""

from __future__ import annotations

import os
from typing import Any

from dagster import EnvVar
from dagster_snowflake import SnowflakeResource

from policy_pipeline.core.settings import SettingsError
from policy_pipeline.core.store.connection import Warehouse
from policy_pipeline.core.store.sql import Dialect
from policy_pipeline.resources import PolicyStateResource

REQUIRED = (
    "SNOWFLAKE_ACCOUNT",
    "SNOWFLAKE_USER",
    "SNOWFLAKE_ROLE",
    "SNOWFLAKE_WAREHOUSE",
    "SNOWFLAKE_DATABASE",
    "SNOWFLAKE_SCHEMA",
)
AUTH = ("SNOWFLAKE_PASSWORD", "SNOWFLAKE_PRIVATE_KEY", "SNOWFLAKE_PRIVATE_KEY_PATH")


def _set(name: str) -> bool:
    return bool(os.environ.get(name, "").strip())


def snowflake_resource() -> SnowflakeResource:
    """A SnowflakeResource from SNOWFLAKE_* variables. Secrets stay EnvVar references."""
    missing = [name for name in REQUIRED if not _set(name)]
    if not any(_set(name) for name in AUTH):
        missing.append(" or ".join(AUTH))
    if missing:
        raise SettingsError(
            "POLICY_WAREHOUSE=snowflake but these environment variables are not set: "
            + ", ".join(missing)
        )
    args: dict[str, Any] = {
        "account": EnvVar("SNOWFLAKE_ACCOUNT"),
        "user": EnvVar("SNOWFLAKE_USER"),
        "warehouse": EnvVar("SNOWFLAKE_WAREHOUSE"),
        "database": EnvVar("SNOWFLAKE_DATABASE"),
        "schema": EnvVar("SNOWFLAKE_SCHEMA"),
        "role": EnvVar("SNOWFLAKE_ROLE"),
    }
    if _set("SNOWFLAKE_PASSWORD"):
        args["password"] = EnvVar("SNOWFLAKE_PASSWORD")
    elif _set("SNOWFLAKE_PRIVATE_KEY"):
        args["private_key"] = EnvVar("SNOWFLAKE_PRIVATE_KEY")
    else:
        args["private_key_path"] = EnvVar("SNOWFLAKE_PRIVATE_KEY_PATH")
    if "password" not in args and _set("SNOWFLAKE_PRIVATE_KEY_PASSPHRASE"):
        args["private_key_password"] = EnvVar("SNOWFLAKE_PRIVATE_KEY_PASSPHRASE")
    # Private-link hosts and the local test server (fakesnow) are reached through these.
    extra: dict[str, Any] = {}
    if _set("SNOWFLAKE_HOST"):
        extra["host"] = os.environ["SNOWFLAKE_HOST"].strip()
    if _set("SNOWFLAKE_PORT"):
        extra["port"] = int(os.environ["SNOWFLAKE_PORT"])
    if _set("SNOWFLAKE_PROTOCOL"):
        extra["protocol"] = os.environ["SNOWFLAKE_PROTOCOL"].strip()
    if extra:
        args["additional_snowflake_connection_args"] = extra
    return SnowflakeResource(**args)


class SnowflakeStateResource(PolicyStateResource):
    """State in Snowflake through dagster-snowflake."""

    snowflake: SnowflakeResource

    def _connect_warehouse(self) -> Warehouse:
        return Warehouse(Dialect.SNOWFLAKE, self.snowflake.get_connection)
