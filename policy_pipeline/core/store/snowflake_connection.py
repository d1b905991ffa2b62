"""The Snowflake connection from the SNOWFLAKE_* variables: the options declared once, for the
dagster-snowflake resource of the runs (`policy_pipeline.resources.snowflake_state`) and for
the operator CLI, which opens them with snowflake-connector-python itself. The CLI's
``status`` and ``diagnose`` thus answer without importing Dagster: dagster-snowflake's import
alone takes seconds (it loads snowflake.core and Snowpark)."""

from __future__ import annotations

import base64
import binascii
import contextlib
import functools
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from policy_pipeline.core.engine.workflow import WAREHOUSE_GIVE_UP_TTLS
from policy_pipeline.core.settings import (
    SNOWFLAKE_PASSPHRASE_VAR,
    LeaseSettings,
    Settings,
    SettingsError,
)
from policy_pipeline.core.store.connection import WarehouseConnection
from policy_pipeline.core.store.dialect import SqlDialect

# The connection's fields (dagster-snowflake's SnowflakeResource names) and their variables.
_FIELD_VARS = {
    "account": "SNOWFLAKE_ACCOUNT",
    "user": "SNOWFLAKE_USER",
    "warehouse": "SNOWFLAKE_WAREHOUSE",
    "database": "SNOWFLAKE_DATABASE",
    "schema": "SNOWFLAKE_SCHEMA",
    "role": "SNOWFLAKE_ROLE",
}
_AUTH_FIELDS = {
    "SNOWFLAKE_PASSWORD": "password",
    "SNOWFLAKE_PRIVATE_KEY": "private_key",
    "SNOWFLAKE_PRIVATE_KEY_PATH": "private_key_path",
}


@dataclass(frozen=True)
class SnowflakeOptions:
    """What the connection is given: fields read from variables (secrets among them, so only
    their names are kept here), the login timeout, and the connector's extra arguments."""

    field_vars: Mapping[str, str]  # field -> the environment variable holding its value
    login_timeout: int
    connection_args: Mapping[str, Any]

    @classmethod
    def from_settings(cls, settings: Settings) -> SnowflakeOptions:
        snowflake = settings.snowflake()
        if snowflake.missing:
            raise SettingsError(
                "POLICY_WAREHOUSE=snowflake but these environment variables are not set: "
                + ", ".join(snowflake.missing)
            )
        assert snowflake.auth_var is not None  # else it is among the missing
        field_vars = {**_FIELD_VARS, _AUTH_FIELDS[snowflake.auth_var]: snowflake.auth_var}
        if snowflake.auth_var != "SNOWFLAKE_PASSWORD" and snowflake.passphrase_set:
            field_vars["private_key_password"] = SNOWFLAKE_PASSPHRASE_VAR
        # Private-link hosts and the local test server (fakesnow) are reached through these.
        args: dict[str, Any] = {}
        if snowflake.host:
            args["host"] = snowflake.host
        if snowflake.port is not None:
            args["port"] = snowflake.port
        if snowflake.protocol:
            args["protocol"] = snowflake.protocol
        # A login gives up within a third of the lease TTL (the connector's default is 60 s),
        # so a run cut off from Snowflake fences its calls before its leases lapse.
        lease = LeaseSettings(ttl_seconds=settings.leases.ttl_seconds)
        # A statement on a connection already open when the network goes retries without end
        # by default. Its calls are fenced all the same (no renewal lands meanwhile); this
        # bound ends the run when the warehouse stays gone as long as a run tolerates failed
        # logins, while a shorter cut lets the statement through when the network is back.
        args["network_timeout"] = WAREHOUSE_GIVE_UP_TTLS * lease.ttl_seconds
        return cls(field_vars, max(1, int(lease.warehouse_wait_seconds)), args)


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


def snowflake_secrets(
    password: str | None,
    private_key: str | None,
    private_key_path: str | None,
    passphrase: str | None,
) -> tuple[str, ...]:
    """The password, or the private key (given or read from its file) and passphrase."""
    key = private_key
    if key is None and private_key_path:
        try:
            key = Path(private_key_path).read_text(errors="replace")
        except OSError:
            key = None  # the connection reports the unreadable file; no content to scrub
    secrets = [password, *(private_key_secrets(key) if key else ()), passphrase]
    return tuple(secret for secret in secrets if secret)


def _der_private_key(pem: bytes, passphrase: str | None, var: str) -> bytes:
    """The key as the connector takes it (PKCS#8 DER), from a PEM or base64 of a PEM, decrypted
    with the passphrase, as dagster-snowflake reads it."""
    from cryptography.hazmat.primitives import serialization

    password = passphrase.encode() if passphrase is not None else None
    for candidate in (pem, _base64_or_none(pem)):
        if candidate is None:
            continue
        try:
            key = serialization.load_pem_private_key(candidate, password=password)
        except (ValueError, TypeError):
            continue
        return key.private_bytes(
            serialization.Encoding.DER,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    raise SettingsError(
        f"{var} is not a readable private key: it must be a PEM (or base64 of one), and "
        f"{SNOWFLAKE_PASSPHRASE_VAR} must decrypt it if it is encrypted (neither is shown)"
    )


def _base64_or_none(data: bytes) -> bytes | None:
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        return None


def snowflake_warehouse(settings: Settings) -> WarehouseConnection:
    """The state in Snowflake, connected as the runs connect (same options, same secrets
    scrubbed), without Dagster. The variables are read here, as the resource resolves them."""
    options = SnowflakeOptions.from_settings(settings)
    values = {field: Settings.secret_if_set(var) for field, var in options.field_vars.items()}
    secrets = snowflake_secrets(
        values.get("password"),
        values.get("private_key"),
        values.get("private_key_path"),
        values.get("private_key_password"),
    )
    plain = (*_FIELD_VARS, "password")
    args = {field: values[field] for field in plain if values.get(field) is not None}

    @functools.cache
    def key_args() -> dict[str, Any]:
        """The private key, read and decrypted once (at the first connection), as the
        connector takes it; nothing for a password."""
        key_path, key = values.get("private_key_path"), values.get("private_key")
        if key_path is None and key is None:
            return {}
        var = options.field_vars["private_key_path" if key_path is not None else "private_key"]
        try:
            pem = Path(key_path).read_bytes() if key_path is not None else str(key).encode()
        except OSError as exc:
            raise SettingsError(f"{var}: the key file cannot be read ({exc.strerror})") from None
        return {"private_key": _der_private_key(pem, values.get("private_key_password"), var)}

    @contextlib.contextmanager
    def connect() -> Iterator[Any]:
        import snowflake.connector

        connection = snowflake.connector.connect(
            **args,
            **key_args(),
            login_timeout=options.login_timeout,
            **options.connection_args,
        )
        try:
            yield connection
            connection.commit()  # as dagster-snowflake's get_connection does, autocommit off
        finally:
            connection.close()

    return WarehouseConnection(SqlDialect.SNOWFLAKE, connect, secrets=secrets)
