"""State in Snowflake through dagster-snowflake (imported only when chosen: it takes seconds).

Its settings from the environment are checked before any run starts; secrets stay ``EnvVar``
references, resolved at run time and never shown."""

from __future__ import annotations

from typing import Any

from dagster import EnvVar
from dagster_snowflake import SnowflakeResource

from policy_pipeline.core.settings import Settings
from policy_pipeline.core.store.connection import WarehouseConnection
from policy_pipeline.core.store.dialect import SqlDialect
from policy_pipeline.core.store.snowflake_connection import SnowflakeOptions, snowflake_secrets
from policy_pipeline.resources.state import PolicyStateResource


def snowflake_resource(settings: Settings) -> SnowflakeResource:
    """A SnowflakeResource from the SNOWFLAKE_* variables."""
    options = SnowflakeOptions.from_settings(settings)
    fields: dict[str, Any] = {field: EnvVar(var) for field, var in options.field_vars.items()}
    return SnowflakeResource(
        **fields,
        login_timeout=options.login_timeout,
        additional_snowflake_connection_args=dict(options.connection_args),
    )


class SnowflakeStateResource(PolicyStateResource):
    """State in Snowflake through dagster-snowflake."""

    snowflake: SnowflakeResource

    def warehouse_secrets(self) -> tuple[str, ...]:
        """The password, or the private key (given or read from its file) and passphrase."""
        return snowflake_secrets(
            self.snowflake.password,
            self.snowflake.private_key,
            self.snowflake.private_key_path,
            self.snowflake.private_key_password,
        )

    def _connect_warehouse(self) -> WarehouseConnection:
        return WarehouseConnection(
            SqlDialect.SNOWFLAKE, self.snowflake.get_connection, secrets=self.warehouse_secrets()
        )
