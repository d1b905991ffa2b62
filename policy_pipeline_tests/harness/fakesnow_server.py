"""A local fakesnow server for tests: Snowflake's wire protocol on an ephemeral loopback port.

fakesnow (``fakesnow[server]``) answers the real ``snowflake-connector-python`` (and so
dagster-snowflake's ``SnowflakeResource`` and dbt-snowflake) over plain HTTP, running the SQL on
DuckDB. It runs here in a process of its own, so every client process (the test, Dagster's step
processes, dbt) sees the same databases through it. They live in the server's memory, or with
``db_path`` in DuckDB files there (``<db_path>/<DATABASE>.db``) that a later server reopens.

Unless told not to, the connector probes cloud metadata hosts (169.254.169.254,
metadata.google.internal) while it logs in. `FakesnowServer.env` therefore sets
``SNOWFLAKE_DISABLE_PLATFORM_DETECTION=true`` (read by the connector in every process that
inherits it) and `FakesnowServer.connect_args` sets ``platform_detection_timeout_seconds=0``.

Usage::

    with fakesnow_server() as server:
        for name, value in server.env().items():
            monkeypatch.setenv(name, value)  # inherited by Dagster's step processes and dbt
        with server.connect() as conn:
            conn.cursor().execute("SELECT 1")
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HOST = "127.0.0.1"
START_TIMEOUT_SECONDS = 60.0
STOP_TIMEOUT_SECONDS = 10.0
START_ATTEMPTS = 3
_SCRIPT = str(Path(__file__).resolve())  # run as a script, it is the server process


@dataclass(frozen=True)
class FakesnowServer:
    """A running fakesnow server and how to reach it."""

    host: str
    port: int
    pid: int
    log_path: Path
    db_path: Path | None = None
    account: str = "fakesnow"
    user: str = "fake"
    password: str = "snow"
    warehouse: str = "FAKE_WH"
    role: str = "FAKE_ROLE"
    database: str = "POLICY_DB"
    schema: str = "POLICY"

    def env(self) -> dict[str, str]:
        """The SNOWFLAKE_* variables the Snowflake state resource reads, for this server."""
        return {
            "SNOWFLAKE_ACCOUNT": self.account,
            "SNOWFLAKE_USER": self.user,
            "SNOWFLAKE_PASSWORD": self.password,
            "SNOWFLAKE_WAREHOUSE": self.warehouse,
            "SNOWFLAKE_ROLE": self.role,  # optional in snowflake_config; the dbt profile needs it
            "SNOWFLAKE_DATABASE": self.database,
            "SNOWFLAKE_SCHEMA": self.schema,
            "SNOWFLAKE_HOST": self.host,
            "SNOWFLAKE_PORT": str(self.port),
            "SNOWFLAKE_PROTOCOL": "http",
            # Read by snowflake-connector-python itself: no probes of cloud metadata endpoints.
            "SNOWFLAKE_DISABLE_PLATFORM_DETECTION": "true",
        }

    def connect_args(self, **overrides: Any) -> dict[str, Any]:
        """Keyword arguments for ``snowflake.connector.connect`` to this server."""
        args: dict[str, Any] = {
            "account": self.account,
            "user": self.user,
            "password": self.password,
            "warehouse": self.warehouse,
            "role": self.role,
            "database": self.database,
            "schema": self.schema,
            "host": self.host,
            "port": self.port,
            "protocol": "http",
            "platform_detection_timeout_seconds": 0.0,
            "login_timeout": 30,
        }
        args.update(overrides)
        return args

    def connect(self, **overrides: Any) -> Any:
        """A real ``snowflake.connector`` connection to this server (close it, or use ``with``)."""
        import snowflake.connector

        return snowflake.connector.connect(**self.connect_args(**overrides))

    def log(self) -> str:
        """What the server has logged so far (its errors name the failing SQL)."""
        return self.log_path.read_text(errors="replace")


@contextmanager
def fakesnow_server(db_path: Path | None = None) -> Iterator[FakesnowServer]:
    """Start fakesnow in a subprocess on an ephemeral 127.0.0.1 port; stop it on exit.

    Without ``db_path`` the databases are in the server's memory, shared by every connection
    until the server stops. With it (a directory, created if missing) they are DuckDB files
    there, so a later server on the same directory sees the same tables.
    """
    if db_path is not None:
        db_path = Path(db_path).resolve()
        db_path.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="fakesnow-") as tmp:
        log_path = Path(tmp) / "server.log"
        for attempt in range(1, START_ATTEMPTS + 1):
            port_file = Path(tmp) / f"port-{attempt}"
            process = _spawn(port_file, log_path, db_path)
            try:
                port = _wait_for_port(process, port_file, log_path)
            except _ExitedEarly as exc:
                # fakesnow picks its port by binding and releasing it, so another process can
                # take it first; then start again, on another port.
                if attempt == START_ATTEMPTS or "already in use" not in str(exc):
                    raise
                continue
            except BaseException:
                _stop(process)
                raise
            break
        try:
            yield FakesnowServer(
                host=HOST, port=port, pid=process.pid, log_path=log_path, db_path=db_path
            )
        finally:
            _stop(process)


class _ExitedEarly(RuntimeError):
    pass


def _spawn(port_file: Path, log_path: Path, db_path: Path | None) -> subprocess.Popen[bytes]:
    with log_path.open("ab") as log:
        # Both streams to the log file, never to a pipe: uvicorn writes a line per request to
        # stdout, and an undrained pipe would block the server once its buffer is full.
        return subprocess.Popen(
            [sys.executable, _SCRIPT, HOST, str(port_file), str(db_path or "")],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            start_new_session=True,
        )


def _wait_for_port(process: subprocess.Popen[bytes], port_file: Path, log_path: Path) -> int:
    deadline = time.monotonic() + START_TIMEOUT_SECONDS
    while not port_file.exists():
        if process.poll() is not None:
            tail = log_path.read_text(errors="replace")[-2000:]
            raise _ExitedEarly(f"fakesnow exited ({process.returncode}) before it started:\n{tail}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"fakesnow did not start in {START_TIMEOUT_SECONDS:.0f}s")
        time.sleep(0.05)
    port = int(json.loads(port_file.read_text())["port"])
    with socket.create_connection((HOST, port), timeout=5.0):
        pass  # uvicorn had started before the port file was written; this proves it listens
    return port


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=STOP_TIMEOUT_SECONDS)
    except subprocess.TimeoutExpired:
        # It ignored SIGTERM: kill its whole process group (it leads a session of its own).
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=STOP_TIMEOUT_SECONDS)


# --- The server process ---------------------------------------------------------------------------


def _serve(host: str, port_file: Path, db_path: str | None) -> None:
    """Run fakesnow's own ``fakesnow.server()`` (uvicorn in a thread, on a free port of
    ``host``), write the port to ``port_file`` once it listens, and serve until SIGTERM/SIGINT."""
    import logging
    import threading

    import fakesnow

    start_server = fakesnow.server  # the function: importing the submodule shadows this name
    import fakesnow.server

    if db_path:
        from fakesnow.instance import FakeSnow

        # Every login without a FAKESNOW_DB_PATH session parameter uses this one instance. (With
        # that parameter each login opens an instance of its own, and the second login to the
        # same files fails: DuckDB reports a "Unique file handle conflict".)
        vars(sys.modules["fakesnow.server"])["shared_fs"] = FakeSnow(db_path=db_path)
    _keep_null_timestamps()

    parent = os.getppid()
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    with start_server(host=host) as kwargs:
        logging.getLogger("uvicorn.access").setLevel(logging.WARNING)  # no line per request
        partial = port_file.with_suffix(".partial")
        partial.write_text(json.dumps({"port": kwargs["port"]}))
        partial.rename(port_file)
        # Also stop when the process that started this one is gone (killed, crashed).
        while not stop.wait(1.0) and os.getppid() == parent:
            pass


def _keep_null_timestamps() -> None:
    """fakesnow 0.12.1 sends a NULL timestamp as epoch 0 (1970-01-01 00:00:00): its
    Snowflake-style timestamp struct drops the null mask. Keep the mask, so that a NULL reads
    back as None, as on Snowflake."""
    import fakesnow.arrow
    import pyarrow as pa

    original = fakesnow.arrow.timestamp_to_sf_struct

    def timestamp_to_sf_struct(ts: pa.Array | pa.ChunkedArray) -> pa.Array:
        if isinstance(ts, pa.ChunkedArray):
            ts = ts.combine_chunks()
        if ts.null_count == 0:
            return original(ts)
        struct = original(ts.fill_null(pa.scalar(0, type=ts.type)))
        return pa.StructArray.from_arrays(
            struct.flatten(), fields=list(struct.type), mask=ts.is_null()
        )

    fakesnow.arrow.timestamp_to_sf_struct = timestamp_to_sf_struct


if __name__ == "__main__":
    _serve(sys.argv[1], Path(sys.argv[2]), sys.argv[3] or None)
