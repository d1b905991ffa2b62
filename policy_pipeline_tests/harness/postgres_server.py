"""A throw-away PostgreSQL server for tests, on an ephemeral 127.0.0.1 port.

It uses the server binaries of the machine (Debian's ``postgresql`` package installs them under
``/usr/lib/postgresql/<version>/bin``; ``POSTGRES_BIN_DIR`` names another directory). The
cluster is created with ``initdb`` in a fresh temporary directory, started with ``pg_ctl`` and
stopped with ``pg_ctl stop -m immediate``; nothing else on the machine is touched.

PostgreSQL refuses to run as root, so under root the binaries run as the unprivileged
``postgres`` system user (the Debian package creates it) through ``runuser``, and the cluster's
directory belongs to that user. The superuser only connects over the Unix socket in that
directory; TCP connections on 127.0.0.1 need a password (scram-sha-256), as in production.

Usage::

    binaries = find_postgres()          # None, with `missing_reason()`, when there are none
    with postgres_server(binaries) as server:
        server.create_database("dagster", user="dagster", password="...")
"""

from __future__ import annotations

import glob
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

HOST = "127.0.0.1"
SUPERUSER = "postgres"
RUN_AS_USER = "postgres"  # the unprivileged account the server runs as when we are root
DEBIAN_GLOB = "/usr/lib/postgresql/*/bin"
BIN_DIR_ENV = "POSTGRES_BIN_DIR"
REQUIRED = ("initdb", "pg_ctl", "postgres", "psql")
START_ATTEMPTS = 3
START_TIMEOUT_SECONDS = 60
COMMAND_TIMEOUT_SECONDS = 120.0
_IDENTIFIER = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")


@dataclass(frozen=True)
class PostgresBinaries:
    bin_dir: Path
    run_as: str | None  # a user to run as (we are root), or None to run as ourselves

    def tool(self, name: str) -> str:
        return str(self.bin_dir / name)


def _version_key(path: Path) -> tuple[int, ...]:
    version = path.parent.name  # /usr/lib/postgresql/<version>/bin
    return tuple(int(part) for part in re.findall(r"\d+", version)) or (0,)


def _candidate_dirs() -> list[Path]:
    override = os.environ.get(BIN_DIR_ENV, "").strip()
    if override:
        return [Path(override)]
    debian = sorted((Path(p) for p in glob.glob(DEBIAN_GLOB)), key=_version_key, reverse=True)
    on_path = shutil.which("initdb")
    return [*debian, *([Path(on_path).resolve().parent] if on_path else [])]


def _has_tools(directory: Path) -> bool:
    return all(os.access(directory / name, os.X_OK) for name in REQUIRED)


def missing_reason() -> str | None:
    """Why no PostgreSQL server can be started here, or None if one can."""
    dirs = _candidate_dirs()
    if not any(_has_tools(d) for d in dirs):
        where = os.environ.get(BIN_DIR_ENV) or f"{DEBIAN_GLOB} or PATH"
        return (
            f"PostgreSQL server binaries ({', '.join(REQUIRED)}) not found in {where}; "
            "install Debian's `postgresql` package (apt-get install postgresql) "
            f"or set {BIN_DIR_ENV}"
        )
    if os.geteuid() == 0:
        try:
            pwd.getpwnam(RUN_AS_USER)
        except KeyError:
            return (
                f"running as root, and PostgreSQL refuses root: the unprivileged user "
                f"'{RUN_AS_USER}' (created by Debian's postgresql package) does not exist"
            )
        if shutil.which("runuser") is None:
            return "running as root, and `runuser` (util-linux) is not available"
    return None


def find_postgres() -> PostgresBinaries | None:
    if missing_reason() is not None:
        return None
    bin_dir = next(d for d in _candidate_dirs() if _has_tools(d))
    return PostgresBinaries(bin_dir=bin_dir, run_as=RUN_AS_USER if os.geteuid() == 0 else None)


def free_port(host: str = HOST) -> int:
    """A port that was free a moment ago (the caller retries if another process takes it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


@dataclass(frozen=True)
class PostgresServer:
    """A running cluster: the superuser reaches it over the Unix socket in ``socket_dir``."""

    binaries: PostgresBinaries
    root: Path
    port: int
    host: str = HOST

    @property
    def data_dir(self) -> Path:
        return self.root / "data"

    @property
    def socket_dir(self) -> Path:
        return self.root

    @property
    def log_path(self) -> Path:
        return self.root / "server.log"

    def psql(self, sql: str, database: str = "postgres") -> str:
        """Run SQL as the superuser over the Unix socket; return psql's output."""
        command = [
            self.binaries.tool("psql"),
            "--no-psqlrc",
            "--quiet",
            "--tuples-only",
            "--no-align",
            "-v",
            "ON_ERROR_STOP=1",
            "-h",
            str(self.socket_dir),
            "-p",
            str(self.port),
            "-U",
            SUPERUSER,
            "-d",
            database,
            "-c",
            sql,
        ]
        return _run(self.binaries, command, cwd=self.root).stdout

    def create_database(self, name: str, user: str, password: str) -> None:
        """A login role with a password and a database it owns (the README's set-up)."""
        for identifier in (name, user):
            if not _IDENTIFIER.match(identifier):
                raise ValueError(f"not a plain identifier: {identifier!r}")
        quoted_password = password.replace("'", "''")
        self.psql(f"CREATE ROLE {user} LOGIN PASSWORD '{quoted_password}'")
        self.psql(f"CREATE DATABASE {name} OWNER {user}")

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError as exc:
            return f"(no server log: {exc})"


class PostgresError(RuntimeError):
    pass


def _as_user(binaries: PostgresBinaries, command: Sequence[str]) -> list[str]:
    if binaries.run_as is None:
        return list(command)
    return ["runuser", "-u", binaries.run_as, "--", *command]


def _run(
    binaries: PostgresBinaries, command: Sequence[str], cwd: Path
) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "LC_ALL": "C", "LANG": "C"}
    for name in ("PGHOST", "PGPORT", "PGUSER", "PGDATABASE", "PGPASSWORD", "PGDATA"):
        env.pop(name, None)
    result = subprocess.run(
        _as_user(binaries, command),
        cwd=cwd,  # the server user may not be allowed into the caller's directory
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=COMMAND_TIMEOUT_SECONDS,
        check=False,
    )
    if result.returncode != 0:
        raise PostgresError(
            f"{Path(command[0]).name} failed (exit {result.returncode}):\n"
            f"{result.stdout[-2000:]}\n{result.stderr[-2000:]}"
        )
    return result


def _make_root() -> Path:
    """A fresh directory the server user owns, in a place it can reach (/tmp, not the
    caller's private pytest directory)."""
    as_root = os.geteuid() == 0
    # TMPDIR may be private to root; /tmp is open to every user (and keeps the socket path short).
    root = Path(tempfile.mkdtemp(prefix="policy-pg-", dir="/tmp" if as_root else None))
    if as_root:
        entry = pwd.getpwnam(RUN_AS_USER)
        os.chown(root, entry.pw_uid, entry.pw_gid)
    root.chmod(0o700)
    return root


def _remove(root: Path) -> None:
    shutil.rmtree(root, ignore_errors=True)


def _initdb(binaries: PostgresBinaries, root: Path) -> None:
    _run(
        binaries,
        [
            binaries.tool("initdb"),
            "-D",
            str(root / "data"),
            "-U",
            SUPERUSER,
            "--auth-local=trust",  # the superuser, over the socket in the private root only
            "--auth-host=scram-sha-256",  # everyone else: a password over TCP
            "--encoding=UTF8",
            "--locale=C",
            "--no-sync",
        ],
        cwd=root,
    )


def _start(binaries: PostgresBinaries, root: Path, port: int) -> None:
    options = " ".join(
        [
            f"-p {port}",
            f"-k {root}",
            f"-c listen_addresses={HOST}",
            # A disposable cluster: durability is not needed, speed is.
            "-c fsync=off",
            "-c synchronous_commit=off",
            "-c full_page_writes=off",
            "-c max_connections=200",
        ]
    )
    _run(
        binaries,
        [
            binaries.tool("pg_ctl"),
            "start",
            "-D",
            str(root / "data"),
            "-l",
            str(root / "server.log"),
            "-w",
            "-t",
            str(START_TIMEOUT_SECONDS),
            "-o",
            options,
        ],
        cwd=root,
    )


def _stop(binaries: PostgresBinaries, root: Path) -> None:
    if not (root / "data" / "postmaster.pid").exists():
        return
    try:
        _run(
            binaries,
            [binaries.tool("pg_ctl"), "stop", "-D", str(root / "data"), "-m", "immediate", "-w"],
            cwd=root,
        )
    except (PostgresError, subprocess.TimeoutExpired):
        _kill_postmaster(root)


def _kill_postmaster(root: Path) -> None:
    """Last resort when pg_ctl could not stop it: SIGKILL the postmaster by its pid file."""
    try:
        pid = int((root / "data" / "postmaster.pid").read_text().splitlines()[0])
        os.kill(pid, signal.SIGKILL)
    except (OSError, ValueError, IndexError):
        pass


@contextmanager
def postgres_server(binaries: PostgresBinaries) -> Iterator[PostgresServer]:
    """Create and start a cluster on a free 127.0.0.1 port; stop and delete it on exit."""
    root = _make_root()
    try:
        _initdb(binaries, root)
        port = 0
        for attempt in range(1, START_ATTEMPTS + 1):
            port = free_port()
            (root / "server.log").unlink(missing_ok=True)  # this attempt's log only
            try:
                _start(binaries, root, port)
                break
            except PostgresError as exc:
                # Another process may have taken the port between our probe and the start.
                log_path = root / "server.log"
                log = log_path.read_text(errors="replace") if log_path.exists() else ""
                if attempt == START_ATTEMPTS or "already in use" not in log:
                    raise PostgresError(f"{exc}\nserver log:\n{log[-3000:]}") from exc
                _stop(binaries, root)
        server = PostgresServer(binaries=binaries, root=root, port=port)
        try:
            _wait_accepting(server)
            yield server
        finally:
            _stop(binaries, root)
    finally:
        _remove(root)


def _wait_accepting(server: PostgresServer, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((server.host, server.port), timeout=2.0):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise PostgresError(
                    f"PostgreSQL does not accept connections on {server.host}:{server.port}:\n"
                    f"{server.log()[-3000:]}"
                ) from None
            time.sleep(0.1)
