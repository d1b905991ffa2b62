"""The warehouse's secrets are scrubbed like the API key, and the reporting job works on a new
warehouse.

A Snowflake endpoint that refuses a login with an error echoing the request (the password in
the posted JSON, raw, percent- and HTML-escaped) is reached by the real connector, through the
real CLIs: ``policy-pipeline diagnose --json``, ``dagster job execute`` of the workflow and of
the reporting job (whose dbt build logs in on its own). The password then appears nowhere: not
in the commands' output, not in any file of the Dagster instance (event log, run storage,
compute logs), not in dbt's artifacts. The password carries a random token that every
rendering of it (escaped once, twice, quoted) keeps verbatim, so the scan looks for the token.
"""

from __future__ import annotations

import gzip
import html
import http.client
import json
import os
import secrets
import threading
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
from dagster import DagsterInstance
from dagster._serdes import serialize_value
from dagster._utils.error import serializable_error_info_from_exc_info
from dagster_snowflake import SnowflakeResource

from policy_pipeline.core.store.connection import WarehouseConnection, WarehouseError
from policy_pipeline.core.store.dialect import SqlDialect
from policy_pipeline.resources.snowflake_state import SnowflakeStateResource
from policy_pipeline_tests.conftest import (
    Workspace,
    encrypted_pem,
    run_cli,
    run_job,
    subprocess_env,
)
from policy_pipeline_tests.harness.fakesnow_server import FakesnowServer

REFUSAL = "Incorrect username or password was specified."


def distinctive_password() -> tuple[str, str]:
    """A password whose JSON, percent and HTML forms all differ from it, and its token."""
    token = secrets.token_hex(10)
    return token, f'sf-{token}"<&>/ %+\\'


class EchoingSnowflake:
    """A loopback Snowflake endpoint. The first ``accept_logins`` logins, and everything else,
    go on to ``upstream`` (a fakesnow server); every later login is refused with an error
    that echoes the request body and the password in three escapings, as a careless gateway
    would."""

    def __init__(self, upstream: FakesnowServer | None = None, accept_logins: int = 0) -> None:
        self.upstream = upstream
        self.accept_logins = accept_logins
        self.logins = 0
        self.refused = 0
        self._lock = threading.Lock()
        echo = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                echo._handle(self)

            do_GET = do_POST

            def log_message(self, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self._server.server_address[1]

    def env(self, password: str, schema: str) -> dict[str, str]:
        """The SNOWFLAKE_* variables that reach this endpoint."""
        upstream = self.upstream or FakesnowServer("127.0.0.1", self.port, 0, Path(os.devnull))
        return {
            **upstream.env(),
            "SNOWFLAKE_HOST": "127.0.0.1",
            "SNOWFLAKE_PORT": str(self.port),
            "SNOWFLAKE_PASSWORD": password,
            "SNOWFLAKE_SCHEMA": schema,
        }

    def __enter__(self) -> EchoingSnowflake:
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()

    def _handle(self, request: BaseHTTPRequestHandler) -> None:
        length = int(request.headers.get("Content-Length") or 0)
        body = request.rfile.read(length) if length else b""
        if "login-request" in request.path:
            with self._lock:
                self.logins += 1
                refuse = self.logins > self.accept_logins or self.upstream is None
                self.refused += refuse
            if refuse:
                self._refuse(request, body)
                return
        self._forward(request, body)

    def _refuse(self, request: BaseHTTPRequestHandler, body: bytes) -> None:
        if request.headers.get("Content-Encoding") == "gzip":
            body = gzip.decompress(body)
        text = body.decode()
        password = json.loads(text)["data"].get("PASSWORD", "")
        message = (
            f"{REFUSAL} Request: {text} (password {password}, "
            f"{quote(password, safe='')}, {html.escape(password)})"
        )
        answer = {
            "data": {"nextAction": "RETRY_LOGIN"},
            "code": "390100",
            "message": message,
            "success": False,
        }
        self._send(request, 200, {"Content-Type": "application/json"}, json.dumps(answer).encode())

    def _forward(self, request: BaseHTTPRequestHandler, body: bytes) -> None:
        assert self.upstream is not None
        upstream = http.client.HTTPConnection(self.upstream.host, self.upstream.port, timeout=120)
        try:
            headers = {k: v for k, v in request.headers.items() if k.lower() != "host"}
            upstream.request(request.command, request.path, body=body, headers=headers)
            response = upstream.getresponse()
            keep = ("content-type", "content-encoding")
            kept = {k: v for k, v in response.getheaders() if k.lower() in keep}
            self._send(request, response.status, kept, response.read())
        finally:
            upstream.close()

    @staticmethod
    def _send(
        request: BaseHTTPRequestHandler, status: int, headers: dict[str, str], payload: bytes
    ) -> None:
        request.send_response(status)
        for name, value in headers.items():
            request.send_header(name, value)
        request.send_header("Content-Length", str(len(payload)))
        request.end_headers()
        request.wfile.write(payload)


def files_holding(token: str, *roots: Path) -> list[str]:
    """Every file under ``roots`` that holds ``token`` (SQLite storage and its WAL included)."""
    needle = token.encode()
    scanned = 0
    found = []
    for root in roots:
        for path in root.rglob("*"):
            if path.is_file():
                scanned += 1
                if needle in path.read_bytes():
                    found.append(str(path))
    assert scanned, f"nothing to scan under {roots}"
    return found


def stored_events(dagster_home: str) -> list[str]:
    """Every event of every run in the instance, serialized as Dagster stores it."""
    instance = DagsterInstance.from_config(dagster_home)
    try:
        runs = instance.get_runs()
        assert runs, "no run was recorded"
        return [serialize_value(entry) for run in runs for entry in instance.all_logs(run.run_id)]
    finally:
        instance.dispose()


# --- through the real CLIs ----------------------------------------------------------------------


def test_snowflake_login_error_echoing_the_password_reaches_no_output_or_storage(
    workspace: Workspace,
) -> None:
    token, password = distinctive_password()
    with EchoingSnowflake() as snowflake:
        workspace.env.update(
            {"POLICY_WAREHOUSE": "snowflake", **snowflake.env(password, "POLICY_SECRETS")}
        )
        diagnose = run_cli(workspace, "diagnose", "--json")
        env = subprocess_env(workspace)
        run = run_job(env, "--tags", '{"dagster/partition": "pii_access_review"}')
    assert snowflake.refused >= 2  # both commands logged in and were refused

    assert diagnose.returncode == 1, diagnose.stderr[-3000:]
    report = json.loads(diagnose.stdout)
    detail = report["warehouse"]["detail"]
    assert report["warehouse"]["ok"] is False
    assert REFUSAL in detail and "***" in detail  # the error is shown, scrubbed
    assert token not in diagnose.stdout + diagnose.stderr

    assert run.returncode != 0
    output = run.stdout + run.stderr
    assert REFUSAL in output, output[-3000:]
    assert token not in output, output[-3000:]

    events = stored_events(env["DAGSTER_HOME"])
    assert any(REFUSAL in event for event in events)  # the step failure, with its reason
    assert not [event for event in events if token in event]
    assert not files_holding(token, Path(env["DAGSTER_HOME"]))


def test_dbt_login_error_echoing_the_password_reaches_no_output_or_storage(
    workspace: Workspace, fakesnow: FakesnowServer
) -> None:
    """The reporting job logs in once to make sure the tables exist (accepted), then dbt logs
    in on its own and is refused with the echo."""
    token, password = distinctive_password()
    dbt_target = workspace.root / "dbt-target"
    with EchoingSnowflake(fakesnow, accept_logins=1) as snowflake:
        schema = f"POLICY_SECRETS_{secrets.token_hex(4).upper()}"
        workspace.env.update({"POLICY_WAREHOUSE": "snowflake", **snowflake.env(password, schema)})
        env = subprocess_env(workspace, DBT_TARGET_PATH=str(dbt_target))
        run = run_job(env, job="policy_reporting_job")
    assert snowflake.logins - snowflake.refused == 1 and snowflake.refused >= 1

    output = run.stdout + run.stderr
    assert run.returncode != 0, output[-3000:]
    assert "DagsterDbtCliRuntimeError" in output and REFUSAL in output, output[-3000:]
    assert token not in output, output[-3000:]
    events = stored_events(env["DAGSTER_HOME"])
    assert any(REFUSAL in event for event in events)
    assert not [event for event in events if token in event]
    assert not files_holding(token, Path(env["DAGSTER_HOME"]), dbt_target)


@pytest.mark.both_warehouses
def test_reporting_job_succeeds_on_a_new_warehouse(workspace: Workspace) -> None:
    """The hourly schedule's first run on a fresh install: no workflow run has written yet."""
    env = subprocess_env(workspace, DBT_TARGET_PATH=str(workspace.root / "dbt-target"))
    assert not workspace.duckdb_path.exists()

    run = run_job(env, job="policy_reporting_job")

    assert run.returncode == 0, (run.stdout + run.stderr)[-4000:]
    assert workspace.query("SELECT COUNT(*) FROM policy_execution_results") == [(0,)]
    assert workspace.query("SELECT COUNT(*) FROM policy_execution_daily_stats") == [(0,)]


# --- the warehouse connection, every secret and every form ---------------------------------------


def _renderings(secret: str) -> str:
    """The secret as an echo may render it: raw, in JSON, percent- and HTML-escaped, quoted."""
    return " | ".join(
        [
            secret,
            json.dumps({"v": secret}),
            quote(secret, safe=""),
            html.escape(secret),
            repr(secret),
        ]
    )


def test_connect_and_statement_errors_scrub_the_key_and_its_passphrase(tmp_path: Path) -> None:
    passphrase_token, passphrase = distinctive_password()
    pem = encrypted_pem(passphrase)
    key_file = tmp_path / "rsa_key.p8"
    key_file.write_text(pem)
    resource = SnowflakeStateResource(
        snowflake=SnowflakeResource(
            account="acct",
            user="someone",
            private_key_path=str(key_file),
            private_key_password=passphrase,
        )
    )
    body_lines = [line for line in pem.splitlines() if not line.startswith("-----")]
    echoed = " ; ".join(
        [_renderings(passphrase), _renderings(pem), _renderings("".join(body_lines))]
    )

    class Refused(Exception):
        pass

    @contextmanager
    def refusing_login() -> Iterator[Any]:
        raise Refused(f"login refused: {echoed}") from ValueError(f"caused by {echoed}")
        yield  # a context manager, like SnowflakeResource.get_connection

    class Cursor:
        description = None

        def execute(self, sql: str, params: list[Any]) -> None:
            raise Refused(f"session expired: {echoed}")

        def close(self) -> None:
            pass

    class Connection:
        def cursor(self) -> Cursor:
            return Cursor()

    @contextmanager
    def connected() -> Iterator[Any]:
        yield Connection()

    failures: list[BaseException] = []
    warehouse = WarehouseConnection(
        SqlDialect.SNOWFLAKE, refusing_login, secrets=resource.warehouse_secrets()
    )
    with pytest.raises(WarehouseError) as connect_failure:
        warehouse.ensure_schema()
    failures.append(connect_failure.value)
    warehouse = WarehouseConnection(
        SqlDialect.SNOWFLAKE, connected, secrets=resource.warehouse_secrets()
    )
    with pytest.raises(WarehouseError) as statement_failure:
        warehouse.ensure_schema()  # its first statement fails
    failures.append(statement_failure.value)

    for failure in failures:
        assert failure.__traceback__ is not None
        shown = "".join(traceback.format_exception(failure))
        # As Dagster records a step's failure in its event log.
        stored = serialize_value(
            serializable_error_info_from_exc_info((type(failure), failure, failure.__traceback__))
        )
        assert "login refused" in shown or "session expired" in shown
        assert "***" in str(failure)
        for text in (shown, stored):
            assert passphrase_token not in text
            for line in body_lines:
                assert line not in text

    # With nothing to scrub in it, an error keeps its cause, traceback and all.
    echoed = "nothing secret"  # what the cursor above now answers (a late-bound closure)
    clean = WarehouseConnection(SqlDialect.SNOWFLAKE, connected, secrets=["not-echoed-here"])
    with pytest.raises(WarehouseError, match="session expired: nothing secret") as kept:
        clean.ensure_schema()
    assert isinstance(kept.value.__cause__, Refused)
