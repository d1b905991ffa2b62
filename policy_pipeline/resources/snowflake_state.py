"""State in Snowflake through dagster-snowflake (imported only when chosen: it takes seconds).

Its settings from the environment are checked before any run starts; secrets stay ``EnvVar``
references, resolved at run time and never shown."""

from __future__ import annotations

import base64
import contextlib
from pathlib import Path
from typing import Any

from dagster import EnvVar
from dagster_snowflake import SnowflakeResource

from policy_pipeline.core.engine.workflow import WAREHOUSE_GIVE_UP_TTLS
from policy_pipeline.core.settings import (
    SNOWFLAKE_PASSPHRASE_VAR,
    LeaseSettings,
    Settings,
    SettingsError,
)
from policy_pipeline.core.store.connection import WarehouseConnection
from policy_pipeline.core.store.dialect import SqlDialect
from policy_pipeline.resources.state import PolicyStateResource


def snowflake_resource(settings: Settings) -> SnowflakeResource:
    """A SnowflakeResource from the SNOWFLAKE_* variables."""
    snowflake = settings.snowflake()
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
    # A login gives up within a third of the lease TTL (the connector's default is 60 s), so
    # a run cut off from Snowflake fences its calls before its leases lapse.
    lease = LeaseSettings(ttl_seconds=settings.leases.ttl_seconds)
    args["login_timeout"] = max(1, int(lease.warehouse_wait_seconds))
    # A statement on a connection already open when the network goes retries without end by
    # default. Its calls are fenced all the same (no renewal lands meanwhile); this bound ends
    # the run when the warehouse stays gone as long as a run tolerates failed logins, while a
    # shorter cut lets the statement through when the network is back.
    extra["network_timeout"] = WAREHOUSE_GIVE_UP_TTLS * lease.ttl_seconds
    args["additional_snowflake_connection_args"] = extra
    return SnowflakeResource(**args)


def private_key_secrets(key: str) -> list[str]:
    """A private key (PEM, or base64 of a PEM as dagster-snowflake also takes) as secrets to
    scrub: whole, its body joined, and line by line, since an echo may wrap or re-join it."""
    texts = [key]
    if "-----BEGIN" not in key:
        with contextlib.suppress(ValueError):  # not base64, or not text once decoded
            texts.append(base64.b64decode(key, validate=True).decode())
    secrets = list(texts)
    for text in texts:
        lines = [line.strip() for line in text.splitlines()]
        body = [line for line in lines if line and not line.startswith("-----")]
        secrets.append("".join(body))
        secrets.extend(line for line in body if len(line) >= 16)  # too short to be guessable
    return [secret for secret in secrets if secret]


class SnowflakeStateResource(PolicyStateResource):
    """State in Snowflake through dagster-snowflake."""

    snowflake: SnowflakeResource

    def warehouse_secrets(self) -> tuple[str, ...]:
        """The password, or the private key (given or read from its file) and passphrase."""
        key = self.snowflake.private_key
        if key is None and self.snowflake.private_key_path:
            try:
                key = Path(self.snowflake.private_key_path).read_text(errors="replace")
            except OSError:
                key = None  # the connection reports the unreadable file; no content to scrub
        secrets = [
            self.snowflake.password,
            *(private_key_secrets(key) if key else ()),
            self.snowflake.private_key_password,
        ]
        return tuple(secret for secret in secrets if secret)

    def _connect_warehouse(self) -> WarehouseConnection:
        return WarehouseConnection(
            SqlDialect.SNOWFLAKE, self.snowflake.get_connection, secrets=self.warehouse_secrets()
        )
