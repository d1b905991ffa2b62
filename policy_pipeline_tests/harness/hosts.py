"""Test hosts built from Linux namespaces, and the services they share.

A *test host* is a set of namespaces this harness makes: its own network namespace
(``ip netns add``), UTS namespace (its own host name) and PID namespace (its own pids, with its
own ``/proc``). Its first process is started as::

    ip netns exec NS unshare --uts --pid --fork --mount-proc --kill-child \\
        sh -c 'hostname HOST; mount --bind HOSTS /etc/hosts; ...; exec sleep infinity'

and every process of the host is started inside those namespaces with ``nsenter``. Killing that
first process (pid 1 of the host's PID namespace) kills every process of the host at once, as a
host that loses power: `TestHosts.kill_host`.

The network, all in one /24 the harness picks (``10.213.N.0/24``, an N no route on this machine
uses), with two bridges inside the *services* host::

      test process (root netns)      control          worker-1 ...        each host: eth0, wh0
        .2 ──────┐                   .11 eth0          .12 eth0
                 ├── br-main (.1 = the services: PostgreSQL :5432, Redis :6379, Policy API :8787)
        .130 ────┤
                 └── br-wh (.129 = the warehouse: fakesnow)
                                     .139 wh0          .140 wh0

Every host has one veth pair to each bridge: ``eth0`` on the main network (10.213.N.0/25) and
``wh0`` on the warehouse network (10.213.N.128/25). The warehouse is on a link of its own so
that `TestHosts.cut` can take one host off the warehouse while it still reaches the Policy API,
PostgreSQL (Dagster's storage) and Redis: it takes the bridge-side end of that host's ``wh0``
pair down, so from inside the host nothing answers any more (connections time out, as across a
real partition), and `TestHosts.restore` brings it back. Hosts on the same bridge reach each
other directly (the daemon and webserver on the control host, the code server). The test process
has its own legs into both networks (``.2`` and ``.130``) so that it can query every service.

Host names resolve inside the hosts (a bind-mounted ``/etc/hosts`` listing every host, and an
empty ``/etc/resolv.conf``: no name server is ever asked). Traffic only ever goes between these
namespaces; nothing outside this machine is a target.

The services host runs PostgreSQL (Dagster's storage; the superuser also reaches it over the
Unix socket in its directory), Redis (the Celery broker and result backend), fakesnow (the
warehouse) and the Policy API simulator (``python -m policy_devtools.simulator``, which only
listens on loopback; `policy_pipeline_tests.harness.relay` gives it the address ``.1:8787``).

Everything is removed on exit of `test_hosts`, also on failure: every host's processes (SIGKILL
of each PID namespace), every namespace (``ip netns del``; their veths go with them), the test
process's own veths, and the temporary files. `leftovers` lists what of a harness is still
there (nothing, after exit).

Usage::

    reason = unavailable_reason()
    if reason: skip_or_fail(reason)   # skip here, fail in CI (CI=true)
    with test_hosts(tmp_path) as hosts:
        services = hosts.start_services(simulator_config)
        worker = hosts.add_host("worker-1")
        proc = hosts.spawn("worker-1", ["bash", "deploy/start-worker.sh"], env, "worker")
        hosts.cut("worker-1"); hosts.restore("worker-1"); hosts.kill_host("worker-1")
"""

from __future__ import annotations

import contextlib
import fcntl
import ipaddress
import json
import os
import pwd
import random
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from policy_devtools.simulator import API_KEY_ENV_VAR, LISTENING_PREFIX, SimulatorConfig
from policy_pipeline.core.settings import PROJECT_ROOT
from policy_pipeline_tests.harness.postgres_server import find_postgres
from policy_pipeline_tests.harness.postgres_server import missing_reason as postgres_missing

SERVICES = "services"
PG_PORT = 5432
REDIS_PORT = 6379
API_PORT = 8787
SIMULATOR_PORT = 18787  # on the services host's loopback, behind the relay on API_PORT
FIRST_HOST = 11  # host addresses: .11, .12, ... on the main network; +128 on the warehouse's
MAX_HOSTS = 100
START_TIMEOUT_SECONDS = 60.0
COMMAND_TIMEOUT_SECONDS = 30.0
# Serialises picking a subnet and making the test process's legs, between concurrent tests.
LOCK_PATH = Path(tempfile.gettempdir()) / "policy-test-hosts.lock"
NETNS_PREFIX = "pph-"  # every namespace of this harness: pph-<tag>-<host>
LINK_PREFIX = "pph"  # the test process's legs: pph<tag>m, pph<tag>w
REDIS_SERVER = "/usr/bin/redis-server"


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes", "on")


def unavailable_reason() -> str | None:
    """Why test hosts cannot be built here (not root, no ``ip netns``, no unshare/nsenter, no
    Redis or PostgreSQL server), or None."""
    if os.geteuid() != 0:
        return "test hosts need root (ip netns, unshare, nsenter)"
    for tool in ("ip", "unshare", "nsenter", "mount"):
        if shutil.which(tool) is None:
            return f"`{tool}` is not installed (iproute2 / util-linux)"
    probe = f"{NETNS_PREFIX}probe-{secrets.token_hex(3)}"
    added = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if added.returncode != 0:
        return f"`ip netns add` does not work here: {added.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    if not os.access(REDIS_SERVER, os.X_OK):
        return f"{REDIS_SERVER} not found: install Debian's redis-server package"
    problem = postgres_missing()
    if problem is not None:
        return problem
    return None


def skip_or_fail(reason: str) -> None:
    """Skip the test with the reason, or fail it in CI (CI=true), where the packages are
    installed by .ci/run and a skip would hide a broken set-up."""
    import pytest

    if in_ci():
        pytest.fail(f"CI is set and test hosts cannot be built: {reason}")
    pytest.skip(reason)


class HostsError(RuntimeError):
    pass


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        ["ip", *args], capture_output=True, text=True, timeout=COMMAND_TIMEOUT_SECONDS
    )
    if check and result.returncode != 0:
        raise HostsError(f"ip {' '.join(args)}: {result.stderr.strip()}")
    return result


def _networks_in_use() -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
    """The IPv4 networks of the test process's namespace: its routes and addresses."""
    found: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = []
    for args in (("-4", "-j", "route", "show", "table", "all"), ("-4", "-j", "addr")):
        for entry in json.loads(_ip(*args).stdout or "[]"):
            dst = entry.get("dst")
            if dst and dst != "default":
                with contextlib.suppress(ValueError):
                    found.append(ipaddress.ip_network(dst, strict=False))
            for info in entry.get("addr_info", []):
                with contextlib.suppress(ValueError, KeyError):
                    found.append(
                        ipaddress.ip_network(f"{info['local']}/{info['prefixlen']}", strict=False)
                    )
    return found


def _pick_subnet() -> ipaddress.IPv4Network:
    used = _networks_in_use()
    choices = list(range(1, 255))
    random.shuffle(choices)
    for third in choices:
        net = ipaddress.IPv4Network(f"10.213.{third}.0/24")
        if not any(net.overlaps(other) for other in used):
            return net
    raise HostsError("no free 10.213.N.0/24 for test hosts")


@dataclass
class Proc:
    """A process started in a test host (through nsenter, which waits for it outside)."""

    host: str
    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError as exc:
            return f"(no log: {exc})"

    def alive(self) -> bool:
        return self.popen.poll() is None

    def inner_pid(self) -> int | None:
        """The process's pid as the test sees it (nsenter's child), or None once it ended."""
        return _first_child(self.popen.pid)

    def signal(self, signum: int) -> None:
        pid = self.inner_pid()
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signum)

    def stop(self, timeout: float = 20.0) -> None:
        """SIGTERM, then SIGKILL after `timeout`."""
        self.signal(signal.SIGTERM)
        try:
            self.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.signal(signal.SIGKILL)
            self.popen.wait(timeout=timeout)


def _first_child(pid: int) -> int | None:
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        return None
    return int(children[0]) if children else None


@dataclass
class Host:
    """One test host: its namespaces, addresses and first process."""

    name: str
    netns: str
    address: str  # on the main network (eth0)
    warehouse_address: str  # on the warehouse network (wh0)
    init: subprocess.Popen[bytes]  # `ip netns exec ... unshare`: waits for the host's pid 1
    init_pid: int  # pid 1 of the host's PID namespace, as the test sees it
    wh_link: str  # the services-side end of this host's warehouse veth pair
    processes: list[Proc] = field(default_factory=list)
    killed: bool = False

    def pid_namespace(self) -> str:
        """The PID namespace's id, as lease owners name it (``<host>/<this>:<pid>:<start>``)."""
        return os.readlink(f"/proc/{self.init_pid}/ns/pid").removeprefix("pid:").strip("[]")


@dataclass(frozen=True)
class Services:
    """Where the services host's services are, from any test host and the test process."""

    address: str  # PostgreSQL, Redis, the Policy API
    warehouse_address: str  # fakesnow
    pg_port: int
    pg_socket_dir: Path  # the superuser's Unix socket, reachable from the test process
    pg_user: str
    pg_password: str
    pg_database: str
    redis_port: int
    api_port: int
    api_key: str
    fakesnow_port: int

    @property
    def api_url(self) -> str:
        return f"http://{self.address}:{self.api_port}"

    @property
    def broker_url(self) -> str:
        return f"redis://{self.address}:{self.redis_port}/0"

    @property
    def backend_url(self) -> str:
        return f"redis://{self.address}:{self.redis_port}/1"

    def snowflake_env(self, schema: str = "POLICY") -> dict[str, str]:
        """The SNOWFLAKE_* variables for the fakesnow warehouse (as `FakesnowServer.env`)."""
        return {
            "SNOWFLAKE_ACCOUNT": "fakesnow",
            "SNOWFLAKE_USER": "fake",
            "SNOWFLAKE_PASSWORD": "snow-" + self.api_key[-8:],
            "SNOWFLAKE_WAREHOUSE": "FAKE_WH",
            "SNOWFLAKE_ROLE": "FAKE_ROLE",
            "SNOWFLAKE_DATABASE": "POLICY_DB",
            "SNOWFLAKE_SCHEMA": schema,
            "SNOWFLAKE_HOST": self.warehouse_address,
            "SNOWFLAKE_PORT": str(self.fakesnow_port),
            "SNOWFLAKE_PROTOCOL": "http",
            "SNOWFLAKE_DISABLE_PLATFORM_DETECTION": "true",
        }

    def dagster_pg_env(self) -> dict[str, str]:
        return {
            "DAGSTER_PG_HOST": self.address,
            "DAGSTER_PG_PORT": str(self.pg_port),
            "DAGSTER_PG_USERNAME": self.pg_user,
            "DAGSTER_PG_PASSWORD": self.pg_password,
            "DAGSTER_PG_DB": self.pg_database,
        }

    # --- the Policy API simulator's control endpoints, from the test process ---------------

    def api_counts(self) -> dict[str, Any]:
        return self._control("GET", "/_sim/counts")

    def api_policies(self) -> dict[str, Any]:
        return self._control("GET", "/_sim/policies")

    def configure_api(self, **changes: Any) -> dict[str, Any]:
        return self._control("POST", "/_sim/config", changes)

    def _control(self, method: str, path: str, body: Any = None) -> dict[str, Any]:
        response = httpx.request(method, self.api_url + path, json=body, timeout=30.0)
        response.raise_for_status()
        result: dict[str, Any] = response.json()
        return result

    def psql(self, sql: str) -> str:
        """SQL as PostgreSQL's superuser over its Unix socket (no network involved)."""
        binaries = find_postgres()
        assert binaries is not None
        result = subprocess.run(
            ["runuser", "-u", "postgres", "--", binaries.tool("psql"), "--no-psqlrc", "-qtA",
             "-v", "ON_ERROR_STOP=1", "-h", str(self.pg_socket_dir), "-p", str(self.pg_port),
             "-U", "postgres", "-d", self.pg_database, "-c", sql],
            capture_output=True, text=True, timeout=COMMAND_TIMEOUT_SECONDS, check=False,
            cwd=self.pg_socket_dir,
        )  # fmt: skip
        if result.returncode != 0:
            raise HostsError(f"psql: {result.stderr.strip()}")
        return result.stdout


class TestHosts:
    """The namespaces, links and processes of one test; see the module docstring."""

    __test__ = False  # not a pytest test class

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.tag = secrets.token_hex(2)  # keeps names unique between concurrent tests
        self.subnet: ipaddress.IPv4Network | None = None
        self.hosts: dict[str, Host] = {}
        self.services: Services | None = None
        self._root_links: list[str] = []
        self._hosts_file = workdir / "etc-hosts"
        self._resolv_file = workdir / "etc-resolv.conf"

    # --- addresses --------------------------------------------------------------------------------

    def _address(self, index: int, warehouse: bool = False) -> str:
        assert self.subnet is not None
        return str(self.subnet.network_address + index + (128 if warehouse else 0))

    @property
    def services_address(self) -> str:
        return self._address(1)

    @property
    def warehouse_address(self) -> str:
        return self._address(1, warehouse=True)

    def netns(self, host: str) -> str:
        return f"{NETNS_PREFIX}{self.tag}-{host}"[:64]

    # --- the network ------------------------------------------------------------------------------

    def _open(self) -> None:
        """The services host with its two bridges, and the test process's two legs."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._resolv_file.write_text("")  # no name server: names come from /etc/hosts only
        with LOCK_PATH.open("a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            self.subnet = _pick_subnet()
            services = self.netns(SERVICES)
            _ip("netns", "add", services)
            self._init_host(SERVICES, services, 1)  # registers it for cleanup before anything
            for bridge, index, warehouse in (("br-main", 1, False), ("br-wh", 1, True)):
                _ip("-n", services, "link", "add", bridge, "type", "bridge")
                _ip("-n", services, "addr", "add", f"{self._address(index, warehouse)}/25",
                    "dev", bridge)  # fmt: skip
                _ip("-n", services, "link", "set", bridge, "up")
            _ip("-n", services, "link", "set", "lo", "up")
            for suffix, bridge, warehouse in (("m", "br-main", False), ("w", "br-wh", True)):
                leg = f"{LINK_PREFIX}{self.tag}{suffix}"
                _ip("link", "add", leg, "type", "veth", "peer", "name", f"t{suffix}",
                    "netns", services)  # fmt: skip
                self._root_links.append(leg)
                _ip("-n", services, "link", "set", f"t{suffix}", "master", bridge, "up")
                _ip("addr", "add", f"{self._address(2, warehouse)}/25", "dev", leg)
                _ip("link", "set", leg, "up")
        self._write_hosts_file()

    def _write_hosts_file(self) -> None:
        lines = ["127.0.0.1 localhost"]
        if self.subnet is not None:
            lines.append(f"{self.services_address} {SERVICES}")
            lines.append(f"{self.warehouse_address} warehouse")
        lines += [f"{h.address} {h.name}" for h in self.hosts.values() if h.name != SERVICES]
        # In place (same inode): the hosts' bind mounts see the new content.
        with self._hosts_file.open("r+" if self._hosts_file.exists() else "w") as handle:
            handle.seek(0)
            handle.write("\n".join(lines) + "\n")
            handle.truncate()

    def add_host(self, name: str) -> Host:
        """A new test host named `name`, on both networks, with no process but its first."""
        if name in self.hosts or not name.replace("-", "").isalnum():
            raise HostsError(f"bad or duplicate host name {name!r}")
        index = FIRST_HOST + len(self.hosts) - 1  # the services host is not counted
        if index >= FIRST_HOST + MAX_HOSTS:
            raise HostsError("too many test hosts")
        netns = self.netns(name)
        services = self.netns(SERVICES)
        _ip("netns", "add", netns)
        host = self._init_host(name, netns, index)
        for dev, bridge, suffix in (("eth0", "br-main", "m"), ("wh0", "br-wh", "w")):
            outer = f"{suffix}{index}"
            _ip("-n", services, "link", "add", outer, "type", "veth", "peer", "name", dev,
                "netns", netns)  # fmt: skip
            _ip("-n", services, "link", "set", outer, "master", bridge, "up")
            address = host.warehouse_address if dev == "wh0" else host.address
            _ip("-n", netns, "addr", "add", f"{address}/25", "dev", dev)
            _ip("-n", netns, "link", "set", dev, "up")
        _ip("-n", netns, "link", "set", "lo", "up")
        self._write_hosts_file()
        return host

    def _init_host(self, name: str, netns: str, index: int) -> Host:
        """Start the host's first process: pid 1 of its PID namespace, in its UTS namespace
        (host name) and a mount namespace of its own (its /proc, /etc/hosts, resolv.conf)."""
        self._hosts_file.touch()
        script = (
            f"hostname {name} && mount --bind {self._hosts_file} /etc/hosts && "
            f"mount --bind {self._resolv_file} /etc/resolv.conf && exec sleep infinity"
        )
        init = subprocess.Popen(
            ["ip", "netns", "exec", netns, "unshare", "--uts", "--pid", "--fork", "--mount-proc",
             "--kill-child", "sh", "-c", script],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            start_new_session=True,
        )  # fmt: skip
        deadline = time.monotonic() + START_TIMEOUT_SECONDS
        while (pid := _first_child(init.pid)) is None or not _is_sleeping_init(pid, name):
            if init.poll() is not None:
                err = init.stderr.read().decode(errors="replace") if init.stderr else ""
                raise HostsError(f"host {name} did not start ({init.returncode}): {err}")
            if time.monotonic() > deadline:
                raise HostsError(f"host {name} did not start in {START_TIMEOUT_SECONDS:.0f}s")
            time.sleep(0.02)
        host = Host(
            name=name,
            netns=netns,
            address=self._address(index),
            warehouse_address=self._address(index, warehouse=True),
            init=init,
            init_pid=pid,
            wh_link=f"w{index}",
        )
        self.hosts[name] = host
        return host

    # --- processes --------------------------------------------------------------------------------

    def spawn(
        self,
        host: str,
        argv: Sequence[str],
        env: Mapping[str, str],
        name: str,
        cwd: Path = PROJECT_ROOT,
    ) -> Proc:
        """Start `argv` as a process of `host` (all its namespaces), its output in a log file
        ``<workdir>/logs/<host>.<name>.log``."""
        target = self.hosts[host]
        logs = self.workdir / "logs"
        logs.mkdir(exist_ok=True)
        log_path = logs / f"{host}.{name}.log"
        with log_path.open("ab") as log:
            popen = subprocess.Popen(
                ["nsenter", "--target", str(target.init_pid), "--net", "--uts", "--pid",
                 "--mount", f"--wd={cwd}", "--", *argv],
                env=dict(env), stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True,
            )  # fmt: skip
        proc = Proc(host=host, name=name, popen=popen, log_path=log_path)
        target.processes.append(proc)
        return proc

    def run(
        self, host: str, argv: Sequence[str], timeout: float = COMMAND_TIMEOUT_SECONDS
    ) -> subprocess.CompletedProcess[str]:
        """Run a short command in `host` and return its result (e.g. ``hostname``)."""
        target = self.hosts[host]
        return subprocess.run(
            ["nsenter", "--target", str(target.init_pid), "--net", "--uts", "--pid", "--mount",
             "--", *argv],
            capture_output=True, text=True, timeout=timeout, check=False,
        )  # fmt: skip

    def kill_host(self, name: str) -> None:
        """SIGKILL the host's pid 1: the kernel kills every process of its PID namespace at
        once (a host losing power). Its network stays (another engineer's test may look)."""
        host = self.hosts[name]
        with contextlib.suppress(ProcessLookupError):
            os.kill(host.init_pid, signal.SIGKILL)
        host.killed = True
        host.init.wait(timeout=COMMAND_TIMEOUT_SECONDS)
        for proc in host.processes:  # the nsenter parents outside return at once
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.popen.wait(timeout=COMMAND_TIMEOUT_SECONDS)

    def cut(self, name: str) -> None:
        """Take `name` off the warehouse: the services-side end of its wh0 link goes down, so
        nothing answers the host there any more; the Policy API, PostgreSQL and Redis stay."""
        _ip("-n", self.netns(SERVICES), "link", "set", self.hosts[name].wh_link, "down")

    def restore(self, name: str) -> None:
        _ip("-n", self.netns(SERVICES), "link", "set", self.hosts[name].wh_link, "up")

    # --- the services -----------------------------------------------------------------------------

    def start_services(self, simulator: SimulatorConfig) -> Services:
        """PostgreSQL, Redis, fakesnow and the Policy API simulator in the services host."""
        pg_password = secrets.token_urlsafe(18)
        api_key = simulator.api_key or "sim-key-" + secrets.token_hex(12)
        socket_dir = self._start_postgres(pg_password)
        self._start_redis()
        fakesnow_port = self._start_fakesnow()
        self._start_simulator(simulator, api_key)
        self.services = Services(
            address=self.services_address,
            warehouse_address=self.warehouse_address,
            pg_port=PG_PORT,
            pg_socket_dir=socket_dir,
            pg_user="dagster",
            pg_password=pg_password,
            pg_database="dagster",
            redis_port=REDIS_PORT,
            api_port=API_PORT,
            api_key=api_key,
            fakesnow_port=fakesnow_port,
        )
        return self.services

    def _services_env(self) -> dict[str, str]:
        keep = ("PATH", "HOME", "LANG", "LC_ALL", "TZ")
        return {k: v for k, v in os.environ.items() if k in keep}

    def _start_postgres(self, password: str) -> Path:
        binaries = find_postgres()
        if binaries is None:
            raise HostsError("PostgreSQL server binaries not found")
        root = Path(tempfile.mkdtemp(prefix="policy-pg-", dir="/tmp"))  # short socket path
        self._pg_root = root
        user = pwd.getpwnam("postgres")
        os.chown(root, user.pw_uid, user.pw_gid)
        root.chmod(0o700)
        env = {**self._services_env(), "LC_ALL": "C", "LANG": "C"}
        initdb = subprocess.run(
            ["runuser", "-u", "postgres", "--", binaries.tool("initdb"), "-D", str(root / "data"),
             "-U", "postgres", "--auth-local=trust", "--auth-host=scram-sha-256",
             "--encoding=UTF8", "--locale=C", "--no-sync"],
            cwd=root, env=env, capture_output=True, text=True, timeout=120, check=False,
        )  # fmt: skip
        if initdb.returncode != 0:
            raise HostsError(f"initdb failed: {initdb.stderr[-2000:]}")
        # Every test host is on 10.213.N.0/24: password logins from there.
        with (root / "data" / "pg_hba.conf").open("a") as hba:
            hba.write(f"host all all {self.subnet} scram-sha-256\n")
        proc = self.spawn(
            SERVICES,
            ["runuser", "-u", "postgres", "--", binaries.tool("postgres"), "-D",
             str(root / "data"), "-p", str(PG_PORT), "-k", str(root),
             "-c", f"listen_addresses={self.services_address}", "-c", "fsync=off",
             "-c", "synchronous_commit=off", "-c", "full_page_writes=off",
             "-c", "max_connections=300"],
            env, "postgres", cwd=root,
        )  # fmt: skip
        self._wait_port(proc, self.services_address, PG_PORT)
        quoted = password.replace("'", "''")
        for sql in (
            f"CREATE ROLE dagster LOGIN PASSWORD '{quoted}'",
            "CREATE DATABASE dagster OWNER dagster",
        ):
            result = subprocess.run(
                ["runuser", "-u", "postgres", "--", binaries.tool("psql"), "--no-psqlrc", "-q",
                 "-v", "ON_ERROR_STOP=1", "-h", str(root), "-p", str(PG_PORT), "-U", "postgres",
                 "-d", "postgres", "-c", sql],
                cwd=root, env=env, capture_output=True, text=True, timeout=60, check=False,
            )  # fmt: skip
            if result.returncode != 0:
                raise HostsError(f"psql: {result.stderr.strip()}")
        return root

    def _start_redis(self) -> None:
        directory = self.workdir / "redis"
        directory.mkdir()
        proc = self.spawn(
            SERVICES,
            [REDIS_SERVER, "--bind", self.services_address, "--port", str(REDIS_PORT),
             "--protected-mode", "no", "--save", "", "--appendonly", "no",
             "--dir", str(directory), "--daemonize", "no"],
            self._services_env(), "redis",
        )  # fmt: skip
        self._wait_port(proc, self.services_address, REDIS_PORT)

    def _start_fakesnow(self) -> int:
        from policy_pipeline_tests.harness import fakesnow_server

        port_file = self.workdir / "fakesnow.port"
        proc = self.spawn(
            SERVICES,
            [sys.executable, fakesnow_server.__file__, self.warehouse_address, str(port_file), ""],
            self._services_env(), "fakesnow",
        )  # fmt: skip
        deadline = time.monotonic() + START_TIMEOUT_SECONDS
        while not port_file.exists():
            self._check(proc, deadline, "fakesnow")
            time.sleep(0.05)
        port = int(json.loads(port_file.read_text())["port"])
        self._wait_port(proc, self.warehouse_address, port)
        return port

    def _start_simulator(self, config: SimulatorConfig, api_key: str) -> None:
        settings = {k: v for k, v in config.to_dict().items() if k != "api_key"}
        env = {**self._services_env(), API_KEY_ENV_VAR: api_key, "PYTHONPATH": str(PROJECT_ROOT)}
        simulator = self.spawn(
            SERVICES,
            [sys.executable, "-m", "policy_devtools.simulator", "--port", str(SIMULATOR_PORT),
             "--config-json", json.dumps(settings)],
            env, "simulator",
        )  # fmt: skip
        deadline = time.monotonic() + START_TIMEOUT_SECONDS
        while LISTENING_PREFIX not in simulator.log():
            self._check(simulator, deadline, "the simulator")
            time.sleep(0.05)
        relay = self.spawn(
            SERVICES,
            [sys.executable, "-m", "policy_pipeline_tests.harness.relay", self.services_address,
             str(API_PORT), str(SIMULATOR_PORT)],
            env, "api-relay",
        )  # fmt: skip
        self._wait_port(relay, self.services_address, API_PORT)

    def _check(self, proc: Proc, deadline: float, what: str) -> None:
        if not proc.alive():
            raise HostsError(f"{what} exited ({proc.popen.returncode}):\n{proc.log()[-3000:]}")
        if time.monotonic() > deadline:
            raise HostsError(f"{what} did not start:\n{proc.log()[-3000:]}")

    def _wait_port(self, proc: Proc, address: str, port: int) -> None:
        """Wait until `address:port` accepts a connection from the test process."""
        deadline = time.monotonic() + START_TIMEOUT_SECONDS
        while True:
            self._check(proc, deadline, f"{proc.host}/{proc.name}")
            with contextlib.suppress(OSError):
                socket.create_connection((address, port), timeout=1.0).close()
                return
            time.sleep(0.1)

    # --- clean-up ---------------------------------------------------------------------------------

    def close(self) -> None:
        """Kill every host (pid 1 of each PID namespace), delete every namespace and the test
        process's legs, remove the temporary files. Safe to call twice."""
        for host in list(self.hosts.values()):
            with contextlib.suppress(ProcessLookupError):
                os.kill(host.init_pid, signal.SIGKILL)
        for host in list(self.hosts.values()):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(host.init.pid, signal.SIGKILL)  # the unshare/ip wrapper
            with contextlib.suppress(subprocess.TimeoutExpired):
                host.init.wait(timeout=COMMAND_TIMEOUT_SECONDS)
            for proc in host.processes:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.popen.pid, signal.SIGKILL)  # nsenter, if still there
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.popen.wait(timeout=COMMAND_TIMEOUT_SECONDS)
        for host in list(self.hosts.values()):
            _ip("netns", "del", host.netns, check=False)
        for link in self._root_links:
            _ip("link", "del", link, check=False)  # gone with its peer's namespace already
        self.hosts.clear()
        self._root_links.clear()
        pg_root = getattr(self, "_pg_root", None)
        if pg_root is not None:
            shutil.rmtree(pg_root, ignore_errors=True)

    def leftovers(self) -> list[str]:
        """What of this harness is still on the machine: namespaces, links, processes."""
        prefix = f"{NETNS_PREFIX}{self.tag}-"
        found = [
            f"netns {line.split()[0]}"
            for line in _ip("netns", "list").stdout.splitlines()
            if line.startswith(prefix)
        ]
        links = json.loads(_ip("-j", "link").stdout or "[]")
        found += [
            f"link {entry['ifname']}"
            for entry in links
            if entry.get("ifname", "").startswith(f"{LINK_PREFIX}{self.tag}")
        ]
        return found


def _is_sleeping_init(pid: int, name: str) -> bool:
    """The host's pid 1 has set its host name and mounts, and is `sleep infinity` now."""
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip() == "sleep"
    except OSError:
        return False


@contextmanager
def test_hosts(workdir: Path) -> Iterator[TestHosts]:
    """The services host and its networks; `add_host` adds hosts. Everything is removed on
    exit, also when the body fails."""
    hosts = TestHosts(workdir)
    try:
        hosts._open()
        yield hosts
    finally:
        hosts.close()


test_hosts.__test__ = False  # type: ignore[attr-defined]  # not a pytest test
