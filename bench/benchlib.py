"""Shared plumbing of the benchmark and soak scripts in ``bench/``.

Nothing here changes product code: statements are counted by a `WarehouseConnection`
subclass that wraps each session the product opens, and the state store, API client and
simulator are the product's own classes, built the way ``open_state`` and the resources build
them.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import platform
import re
import resource
import secrets
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from policy_devtools.simulator import (
    API_KEY_ENV_VAR,
    LISTENING_PREFIX,
    PolicyApiSimulator,
    SimulatorConfig,
)
from policy_pipeline.core.domain import PolicyDefinition
from policy_pipeline.core.settings import Settings
from policy_pipeline.core.store.connection import Params, Session, WarehouseConnection
from policy_pipeline.core.store.dialect import SqlDialect, Statement
from policy_pipeline.core.store.state_store import StateStore
from policy_pipeline.resources import DuckDBStateResource, open_state

REPO_ROOT = Path(__file__).resolve().parent.parent
WAREHOUSES = ("duckdb", "snowflake")

log = logging.getLogger("bench")


# --- statement counting -------------------------------------------------------------------------


@dataclass
class PhaseCounts:
    statements: Counter[str] = field(default_factory=Counter)
    kind_seconds: defaultdict[str, float] = field(default_factory=lambda: defaultdict(float))
    sessions: int = 0
    connect_seconds: float = 0.0  # opening connections
    statement_seconds: float = 0.0  # rendering (sqlglot) included
    render_seconds: float = 0.0  # sql.Statement.render: the sqlglot translation (cached by text)

    @property
    def total(self) -> int:
        return sum(self.statements.values())


class StatementCounter:
    """Statements and sessions (= connections opened) per phase; thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.phase = "setup"
        self.phases: dict[str, PhaseCounts] = {}

    def set_phase(self, phase: str) -> None:
        with self._lock:
            self.phase = phase

    def _current(self) -> PhaseCounts:
        return self.phases.setdefault(self.phase, PhaseCounts())

    def session_opened(self, seconds: float) -> None:
        with self._lock:
            counts = self._current()
            counts.sessions += 1
            counts.connect_seconds += seconds

    def statement(self, name: str, seconds: float) -> None:
        with self._lock:
            counts = self._current()
            counts.statements[name] += 1
            counts.kind_seconds[name] += seconds
            counts.statement_seconds += seconds

    def rendered(self, seconds: float) -> None:
        with self._lock:
            self._current().render_seconds += seconds

    def get(self, phase: str) -> PhaseCounts:
        with self._lock:
            return self.phases.get(phase, PhaseCounts())


class CountingSession:
    """Delegates to the product's session and counts every statement it executes."""

    def __init__(self, inner: Session, counter: StatementCounter) -> None:
        self._inner = inner
        self._counter = counter

    def rows(self, statement: Statement, params: Params = ()) -> list[tuple[Any, ...]]:
        started = time.perf_counter()
        try:
            return self._inner.rows(statement, params)
        finally:
            self._counter.statement(statement.name, time.perf_counter() - started)

    def rowcount(self, statement: Statement, params: Params = ()) -> int:
        started = time.perf_counter()
        try:
            return self._inner.rowcount(statement, params)
        finally:
            self._counter.statement(statement.name, time.perf_counter() - started)


class CountingWarehouse(WarehouseConnection):
    """The product's `WarehouseConnection`, with each session (one connection each) and each
    statement counted. ``transaction()`` and ``ensure_schema()`` go through ``session()`` too;
    a session opened inside another on the same thread is the same connection and is not
    counted again."""

    def __init__(
        self,
        dialect: SqlDialect,
        connect: Callable[[], AbstractContextManager[Any]],
        counter: StatementCounter,
    ) -> None:
        @contextmanager
        def timed_connect() -> Iterator[Any]:
            started = time.perf_counter()
            with connect() as connection:
                counter.session_opened(time.perf_counter() - started)
                yield connection

        super().__init__(dialect, timed_connect)
        self.counter = counter

    def _wrap(self, session: Session) -> Session:
        return CountingSession(session, self.counter)


@contextmanager
def timing_renders(counter: StatementCounter) -> Iterator[None]:
    """Time the product's ``Statement.render`` (its sqlglot translation, cached per statement
    text) for the duration, by wrapping the method; the rendered text is unchanged."""
    original = Statement.render

    def render(self: Statement, dialect: SqlDialect) -> str:
        started = time.perf_counter()
        try:
            return original(self, dialect)
        finally:
            counter.rendered(time.perf_counter() - started)

    Statement.render = render  # type: ignore[method-assign]
    try:
        yield
    finally:
        Statement.render = original  # type: ignore[method-assign]


# --- warehouses ---------------------------------------------------------------------------------


@dataclass
class WarehouseHandle:
    kind: str
    warehouse: CountingWarehouse
    counter: StatementCounter
    duckdb_path: Path | None = None
    fakesnow_pid: int | None = None

    def store(self, run_id: str | None = None) -> StateStore:
        return StateStore(self.warehouse, run_id=run_id)

    def query(self, text: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        """Bench-only SQL (Snowflake dialect, ``?`` placeholders), counted as phase 'verify'."""
        previous = self.counter.phase
        self.counter.set_phase("verify")
        try:
            with self.warehouse.session() as session:
                return session.rows(Statement("bench_query", text), list(params))
        finally:
            self.counter.set_phase(previous)


@contextmanager
def open_warehouse(
    kind: str, workdir: Path, counter: StatementCounter
) -> Iterator[WarehouseHandle]:
    """A fresh, empty state warehouse: a DuckDB file in ``workdir``, or a new schema on a local
    fakesnow server (started here, stopped on exit). Built through the product's own
    ``open_state``, as the CLI and the demo build it; only the connection factory is wrapped."""
    if kind not in WAREHOUSES:
        raise ValueError(f"unknown warehouse {kind!r}")
    with ExitStack() as stack:
        pid: int | None = None
        duckdb_path: Path | None = None
        if kind == "snowflake":
            from policy_pipeline.resources.snowflake_state import SnowflakeStateResource
            from policy_pipeline_tests.harness.fakesnow_server import fakesnow_server

            server = stack.enter_context(fakesnow_server())
            pid = server.pid
            env = server.env()
            env["SNOWFLAKE_SCHEMA"] = f"BENCH_{secrets.token_hex(4).upper()}"
            stack.enter_context(environ(env))
            settings = dataclasses.replace(
                Settings.from_env(), warehouse="snowflake", duckdb_path=workdir, catalog_dir=workdir
            )
            state = stack.enter_context(open_state(settings))
            assert isinstance(state, SnowflakeStateResource)
            warehouse = CountingWarehouse(
                SqlDialect.SNOWFLAKE, state.snowflake.get_connection, counter
            )
        else:
            duckdb_path = workdir / "state.duckdb"
            settings = dataclasses.replace(
                Settings.from_env(),
                warehouse="duckdb",
                duckdb_path=duckdb_path,
                catalog_dir=workdir,
            )
            state = stack.enter_context(open_state(settings))
            assert isinstance(state, DuckDBStateResource)
            warehouse = CountingWarehouse(SqlDialect.DUCKDB, state.duckdb.get_connection, counter)
        yield WarehouseHandle(kind, warehouse, counter, duckdb_path=duckdb_path, fakesnow_pid=pid)


@contextmanager
def environ(values: dict[str, str]) -> Iterator[None]:
    saved = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


SIMULATOR_MODES = ("process", "thread")


class SimulatorHandle:
    """The Policy API simulator as the benchmarks use it: a base URL and its counters."""

    def __init__(self, base_url: str, counts: Callable[[], dict[str, Any]]) -> None:
        self.base_url = base_url
        self._counts = counts

    def counts(self) -> dict[str, Any]:
        return self._counts()


@contextmanager
def policy_api(config: SimulatorConfig, mode: str = "process") -> Iterator[SimulatorHandle]:
    """The simulator in its own process (``python -m policy_devtools.simulator``), as the real
    Policy API is another service: its CPU is not the engine's. ``thread`` runs it inside this
    process instead (its request handling then competes with the engine for the GIL)."""
    if mode == "thread":
        with PolicyApiSimulator(config) as sim:
            yield SimulatorHandle(sim.base_url, sim.counts)
        return
    settings = {k: v for k, v in config.to_dict().items() if k != "api_key"}
    env = {**os.environ, API_KEY_ENV_VAR: config.api_key or ""}
    process = subprocess.Popen(
        [sys.executable, "-m", "policy_devtools.simulator", "--config-json", json.dumps(settings)],
        env=env,
        stdout=subprocess.PIPE,
        text=True,
        cwd=REPO_ROOT,
    )
    try:
        assert process.stdout is not None
        line = process.stdout.readline().strip()
        if not line.startswith(LISTENING_PREFIX):
            raise RuntimeError(f"the simulator did not start: {line!r}")
        base_url = line.split()[-1]
        with httpx.Client(base_url=base_url, timeout=30.0) as control:

            def counts() -> dict[str, Any]:
                response = control.get("/_sim/counts")
                response.raise_for_status()
                result: dict[str, Any] = response.json()
                return result

            yield SimulatorHandle(base_url, counts)
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@contextmanager
def workdir(prefix: str) -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
        yield Path(tmp)


# --- policies, logging ----------------------------------------------------------------------------


def make_policies(count: int, prefix: str) -> list[PolicyDefinition]:
    """``count`` catalog-like policies named ``<prefix>-00000`` ... (sorted like partitions)."""
    return [
        PolicyDefinition(
            policy_name=f"{prefix}-{i:05d}",
            policy_type="data_retention",
            description=f"Benchmark policy {i}: retain records and classify them.",
            priority=("low", "medium", "high")[i % 3],
            parameters={"retention_days": 30 + i % 60, "classification": "internal"},
        )
        for i in range(count)
    ]


class QuietLog:
    """The workflow's logger: warnings are counted (and kept, a few), infos dropped."""

    def __init__(self) -> None:
        self.warnings: Counter[str] = Counter()
        self._lock = threading.Lock()

    def info(self, msg: str) -> None:
        log.debug(msg)

    def warning(self, msg: str) -> None:
        with self._lock:
            self.warnings[normalise_message(msg)] += 1


_IDS = (
    (re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"), "<uuid>"),
    (re.compile(r"\b(pol|cb)_[0-9a-f]{16}\b"), r"\1_<id>"),
    (re.compile(r"'[a-z0-9]+-\d{5}'"), "'<policy>'"),
    (re.compile(r"http://127\.0\.0\.1:\d+"), "http://<sim>"),
    (re.compile(r"\d+(\.\d+)?"), "<n>"),
)


def normalise_message(message: str, limit: int = 120) -> str:
    """An error message with ids and numbers masked, so that like errors group together."""
    text = message
    for pattern, replacement in _IDS:
        text = pattern.sub(replacement, text)
    text = " ".join(text.split())
    return text[:limit] + ("..." if len(text) > limit else "")


# --- machine, memory, output ----------------------------------------------------------------------


def peak_rss_mb() -> float:
    """Peak resident set size of this process (``getrusage(RUSAGE_SELF).ru_maxrss``, KiB on
    Linux): Python heap, DuckDB's native memory and the in-process simulator together."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def process_peak_rss_mb(pid: int) -> float | None:
    """Peak RSS (VmHWM) of another process of ours, e.g. the fakesnow server."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def machine_line() -> str:
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    return (
        f"machine: {os.cpu_count()} cores, load average {load} (1/5/15 min); Python "
        f"{platform.python_version()}; other processes may be running, so wall times include "
        f"their interference"
    )


def print_table(title: str, headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    cells = [[_cell(v) for v in row] for row in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]
    print(f"\n{title}")
    print("  ".join(h.ljust(w) if i == 0 else h.rjust(w) for i, (h, w) in _enum(headers, widths)))
    print("  ".join("-" * w for w in widths))
    for r in cells:
        print("  ".join(v.ljust(w) if i == 0 else v.rjust(w) for i, (v, w) in _enum(r, widths)))


def _enum(values: Sequence[str], widths: Sequence[int]) -> Iterator[tuple[int, tuple[str, int]]]:
    return enumerate(zip(values, widths, strict=True))


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if value != value:  # NaN
            return "-"
        return f"{value:,.3f}" if abs(value) < 10 else f"{value:,.1f}"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return str(value)


@dataclass
class Target:
    name: str
    measured: str
    limit: str
    passed: bool


@dataclass
class Targets:
    """Stated targets and whether each was met; ``exit_code`` is 1 if any was missed."""

    items: list[Target] = field(default_factory=list)

    def check(self, name: str, measured: str, limit: str, passed: bool) -> None:
        self.items.append(Target(name, measured, limit, passed))

    def print(self) -> None:
        rows = [(t.name, t.measured, t.limit, "met" if t.passed else "MISSED") for t in self.items]
        print_table("Targets", ["target", "measured", "limit", "result"], rows)

    def exit_code(self, enforce: bool, problems: Sequence[str] = ()) -> int:
        """2 when the run itself went wrong (its figures are not valid), 1 when a target was
        missed (and enforced), else 0."""
        if problems:
            print("\nThe run went wrong (figures are not valid):")
            for problem in problems:
                print(f"  - {problem}")
            return 2
        missed = [t.name for t in self.items if not t.passed]
        if missed and enforce:
            print(f"\n{len(missed)} target(s) missed: {', '.join(missed)}")
            return 1
        if missed:
            print(f"\n{len(missed)} target(s) missed (--no-targets: not failing)")
        return 0


def stopwatch() -> Callable[[], float]:
    started = time.perf_counter()
    return lambda: time.perf_counter() - started
