"""`dagster dev` (webserver and daemon) for end-to-end tests, on a free loopback port.

``dagster dev`` ignores SIGTERM here and its webserver, daemon, code servers and run workers
are all its descendants in one process group, so it is started as the leader of a session of
its own and stopped by killing that whole group (SIGKILL). Its output goes to a log file, never
to a pipe that nobody drains, and its temporary files (gRPC sockets, workspace files, which a
killed process cannot remove) go to a scratch ``TMPDIR`` removed after it.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import yaml

from policy_pipeline.core.settings import PROJECT_ROOT

HOST = "127.0.0.1"
WORKSPACE_FILE = PROJECT_ROOT / "workspace.yaml"
LOCATION_NAME = "policy_pipeline"
START_TIMEOUT_SECONDS = 180.0
STOP_TIMEOUT_SECONDS = 15.0
_PORT_ATTEMPTS = 3

# A test instance: no telemetry (no network) and no first-visit dialog over the UI.
INSTANCE_CONFIG: dict[str, Any] = {
    "telemetry": {"enabled": False},
    "nux": {"enabled": False},
}

_LOCATION_QUERY = """
query LocationStatus {
  workspaceOrError {
    __typename
    ... on Workspace {
      locationEntries {
        name
        loadStatus
        locationOrLoadError {
          __typename
          ... on PythonError { message }
        }
      }
    }
  }
}
"""


class DagsterDevError(RuntimeError):
    """``dagster dev`` did not start, or its code location did not load."""


@dataclass(frozen=True)
class DagsterDev:
    """A running ``dagster dev``."""

    port: int
    pid: int
    log_path: Path

    @property
    def base_url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def graphql(self, query: str, variables: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """The ``data`` of a GraphQL query; errors raise with the server's messages."""
        response = httpx.post(
            f"{self.base_url}/graphql",
            json={"query": query, "variables": dict(variables or {})},
            timeout=30.0,
        )
        response.raise_for_status()
        body: dict[str, Any] = response.json()
        if body.get("errors"):
            raise DagsterDevError(f"GraphQL errors: {body['errors']}")
        data: dict[str, Any] = body["data"]
        return data

    def log_tail(self, chars: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except FileNotFoundError:
            return ""


def prepare_dagster_home(dagster_home: Path, extra: Mapping[str, Any] | None = None) -> Path:
    """Create ``dagster_home`` with a ``dagster.yaml`` of ``INSTANCE_CONFIG`` and ``extra`` (its
    top-level keys win) and return it."""
    dagster_home.mkdir(parents=True, exist_ok=True)
    config = {**INSTANCE_CONFIG, **(extra or {})}
    (dagster_home / "dagster.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    return dagster_home


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        return port


def _spawn(env: Mapping[str, str], port: int, log_path: Path) -> subprocess.Popen[bytes]:
    command = [
        sys.executable,
        "-m",
        "dagster",
        "dev",
        *("-h", HOST, "-p", str(port), "-w", str(WORKSPACE_FILE)),
    ]
    with log_path.open("ab") as log:
        return subprocess.Popen(
            command,
            cwd=PROJECT_ROOT,
            env=dict(env),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def stop(process: subprocess.Popen[bytes]) -> None:
    """Kill ``dagster dev`` and every process it started (its whole process group)."""
    with contextlib.suppress(ProcessLookupError):  # the group is gone already
        os.killpg(process.pid, signal.SIGKILL)
    try:
        process.wait(timeout=STOP_TIMEOUT_SECONDS)
    except subprocess.TimeoutExpired as exc:
        raise DagsterDevError(f"dagster dev (pid {process.pid}) survived SIGKILL") from exc


def _location_status(server: DagsterDev) -> tuple[str, str | None]:
    """(load status, load error or None) of the code location, ("", None) while unknown."""
    workspace = server.graphql(_LOCATION_QUERY)["workspaceOrError"]
    if workspace["__typename"] != "Workspace":
        return "", None
    for entry in workspace["locationEntries"]:
        if entry["name"] == LOCATION_NAME:
            location = entry["locationOrLoadError"] or {}
            error = location.get("message") if location.get("__typename") == "PythonError" else None
            return str(entry["loadStatus"]), error
    return "", None


def _wait_until_ready(process: subprocess.Popen[bytes], server: DagsterDev, timeout: float) -> None:
    """Wait for ``/server_info`` to answer and the code location to have loaded."""
    deadline = time.monotonic() + timeout
    webserver_up = False
    while True:
        if process.poll() is not None:
            raise DagsterDevError(
                f"dagster dev exited ({process.returncode}) before it was ready:\n"
                f"{server.log_tail()}"
            )
        try:
            if not webserver_up:
                response = httpx.get(f"{server.base_url}/server_info", timeout=5.0)
                webserver_up = response.status_code == 200
            if webserver_up:
                status, error = _location_status(server)
                if error is not None:
                    raise DagsterDevError(f"code location {LOCATION_NAME} failed to load:\n{error}")
                if status == "LOADED":
                    return
        except httpx.HTTPError:
            pass  # not listening yet
        if time.monotonic() > deadline:
            raise DagsterDevError(
                f"dagster dev was not ready in {timeout:.0f}s "
                f"(webserver up: {webserver_up}):\n{server.log_tail()}"
            )
        time.sleep(0.25)


def _start(
    env: Mapping[str, str], log_path: Path, timeout: float
) -> tuple[subprocess.Popen[bytes], DagsterDev]:
    for attempt in range(1, _PORT_ATTEMPTS + 1):
        port = free_port()
        process = _spawn(env, port, log_path)
        server = DagsterDev(port=port, pid=process.pid, log_path=log_path)
        try:
            _wait_until_ready(process, server, timeout)
        except DagsterDevError:
            stop(process)
            # The free port may have been taken between our probe and the webserver's bind.
            if attempt < _PORT_ATTEMPTS and "address already in use" in server.log_tail().lower():
                continue
            raise
        except BaseException:
            stop(process)
            raise
        return process, server
    raise AssertionError("unreachable")


@contextmanager
def dagster_dev(
    env: Mapping[str, str], log_path: Path, timeout: float = START_TIMEOUT_SECONDS
) -> Iterator[DagsterDev]:
    """Run ``dagster dev -h 127.0.0.1 -p PORT -w workspace.yaml`` from the repository root with
    ``env`` (which must set ``DAGSTER_HOME``) until the block ends; yields once the webserver
    answers and the code location has loaded. Its output is appended to ``log_path``."""
    if not env.get("DAGSTER_HOME"):
        raise ValueError("env must set DAGSTER_HOME")
    log_path.parent.mkdir(parents=True, exist_ok=True)
    # Short on purpose: the gRPC servers' Unix socket paths must stay under ~100 characters.
    scratch = tempfile.mkdtemp(prefix="dagster-dev-")
    try:
        # `dagster dev` prepares (re-parses) the dbt manifest with the `dbt` on PATH: this
        # interpreter's, into a copy of the dbt project, so that tests running beside this one
        # never read the repository's manifest while it is rewritten.
        path = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
        dbt_copy = Path(scratch) / "dbt_project"
        shutil.copytree(
            PROJECT_ROOT / "dbt_project", dbt_copy, ignore=shutil.ignore_patterns("logs")
        )
        dev_env = {
            **env,
            "TMPDIR": scratch,
            "PATH": path,
            "POLICY_DBT_PROJECT_DIR": str(dbt_copy),
        }
        process, server = _start(dev_env, log_path, timeout)
        try:
            yield server
        finally:
            stop(process)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
