"""End to end: the product as users run it, ``dagster job execute`` as a subprocess, one run.

Throughput (the default): N policies written as YAML files into a temporary catalog, a
temporary DuckDB state file, the Policy API simulator in its own process (per-call latency L,
every policy ready R seconds after its creation), ``POLICY_API_MAX_CONCURRENCY`` = C, and a
fresh Dagster instance (``DAGSTER_HOME``) on SQLite or on a local PostgreSQL configured like
``deploy/dagster.yaml``. The N partitions are registered first (``policy-pipeline
register-partitions``, sorted by name), then one run over the whole range is timed from process
start to exit::

    dagster job execute -m policy_pipeline.definitions -j policy_workflow_job \\
      --tags '{"dagster/asset_partition_range_start": "<first>",
               "dagster/asset_partition_range_end": "<last>"}'

It is compared with NOOP: the same run of a no-op code location (``bench/noop_location.py``: the
same three asset keys, deps, dynamic partitions and single-run backfill, a step that returns one
``MaterializeResult`` per asset) on a fresh instance of the same kind: Dagster's own
bookkeeping of N x 3 materializations. The API's own limit is
LIMIT = max(3 N L / C, R + 3 L) (three calls per policy, C at a time; or one policy's own path);
the target is (wall - NOOP) <= 2 x LIMIT.

``--uneven``: readiness from a long tail (fixed seed): lognormal with median 5 s, 5 % at 60 s,
1 % never ready within the polling deadline, 2 % reported failed by the API. The run ends failed
(those policies), as it should; then, from the simulator's record of each policy, delay =
circuit breaker time - the moment the API could first report the policy ready: its p50, p99 and
maximum against the polling interval cap (target p99 <= cap + 1 s).

    .venv/bin/python -m bench.e2e                          # N=1000, SQLite then PostgreSQL
    .venv/bin/python -m bench.e2e --instance sqlite --event-batch-size 100
    .venv/bin/python -m bench.e2e --uneven --instance postgres

Every server (the simulator, PostgreSQL) is started here on an ephemeral 127.0.0.1 port and
stopped after; the temporary directories are removed (``--keep`` keeps them).

Exit status: 0 all targets met, 1 a target missed (0 with --no-targets), 2 the run itself went
wrong (a wrong count, a duplicate, a run that failed when it should not have).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import secrets
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import yaml

from bench.benchlib import (
    REPO_ROOT,
    Targets,
    environ,
    machine_line,
    make_policies,
    policy_api,
    print_table,
)
from bench.noop_location import ASSET_KEYS
from bench.noop_location import JOB_NAME as NOOP_JOB
from bench.noop_location import PARTITIONS_NAME as NOOP_PARTITIONS
from policy_devtools.simulator import ENDPOINTS, SimulatorConfig

PRODUCT_JOB = "policy_workflow_job"
PARTITIONS_NAME = "policies"
NOOP_LOCATION = Path(__file__).resolve().parent / "noop_location.py"
INSTANCES = ("sqlite", "postgres")
EVENT_BATCH_ENV = "DAGSTER_EVENT_BATCH_SIZE"
STATE_TABLE = "policy_execution_state"
BIN_DIR = Path(sys.executable).parent
LOG_TAIL_LINES = 40
assert NOOP_PARTITIONS == PARTITIONS_NAME


# --- processes ------------------------------------------------------------------------------------


def _tool(name: str, module: str) -> list[str]:
    """A console script of this virtual environment, as a user runs it (or its module)."""
    script = BIN_DIR / name
    return [str(script)] if script.exists() else [sys.executable, "-m", module]


class RunSetupError(RuntimeError):
    """Something before the timed run failed (the figures cannot be made)."""


@dataclass
class Timed:
    exit_code: int
    wall: float
    peak_rss_mb: float  # ru_maxrss of the process (and of any process it waited for)
    log_path: Path
    started_at: float  # wall clock (time.time()), to place the run's own events
    ended_at: float
    timed_out: bool = False
    phases: dict[str, float] = field(default_factory=dict)

    def tail(self, lines: int = LOG_TAIL_LINES) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError as exc:
            return f"(no log: {exc})"
        return "\n".join(text.splitlines()[-lines:])


def run_timed(command: Sequence[str], env: dict[str, str], log_path: Path, timeout: float) -> Timed:
    """Run ``command`` from the repository root, output to ``log_path``; wall time from process
    start to exit, and the process's own peak RSS from ``wait4`` (not mixed with other children
    of this process, such as the simulator)."""
    killed = threading.Event()
    with log_path.open("wb") as log:
        started_at = time.time()
        started = time.perf_counter()
        process = subprocess.Popen(
            list(command),
            cwd=REPO_ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
        )

        def kill() -> None:
            killed.set()
            process.kill()

        timer = threading.Timer(timeout, kill)
        timer.start()
        try:
            _, status, usage = os.wait4(process.pid, 0)
        except BaseException:
            process.kill()
            process.wait()
            raise
        finally:
            timer.cancel()
        wall = time.perf_counter() - started
    process.returncode = os.waitstatus_to_exitcode(status)
    return Timed(
        exit_code=process.returncode,
        wall=wall,
        peak_rss_mb=usage.ru_maxrss / 1024,  # KiB on Linux
        log_path=log_path,
        started_at=started_at,
        ended_at=started_at + wall,
        timed_out=killed.is_set(),
    )


def job_command(target: Sequence[str], job: str, first: str, last: str) -> list[str]:
    tags = {"dagster/asset_partition_range_start": first, "dagster/asset_partition_range_end": last}
    return [
        *_tool("dagster", "dagster"),
        *("job", "execute", *target, "-j", job, "--tags", json.dumps(tags)),
    ]


def base_env(args: argparse.Namespace) -> dict[str, str]:
    """This process's environment without any product, Snowflake or Dagster setting; with
    DAGSTER_EVENT_BATCH_SIZE only if --event-batch-size is given."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("POLICY_", "SNOWFLAKE_", "DAGSTER_"))
    }
    if args.event_batch_size is not None:
        env[EVENT_BATCH_ENV] = str(args.event_batch_size)
    return env


# --- Dagster instances ----------------------------------------------------------------------------


POSTGRES_STORAGE = {
    "postgres": {
        "postgres_db": {
            "hostname": {"env": "DAGSTER_PG_HOST"},
            "port": {"env": "DAGSTER_PG_PORT"},
            "username": {"env": "DAGSTER_PG_USERNAME"},
            "password": {"env": "DAGSTER_PG_PASSWORD"},
            "db_name": {"env": "DAGSTER_PG_DB"},
            "scheme": "postgresql+psycopg2",
        }
    }
}


@dataclass
class Instance:
    """A fresh DAGSTER_HOME: its dagster.yaml and the environment its processes need."""

    kind: str
    home: Path
    env: dict[str, str]

    @contextmanager
    def open(self) -> Iterator[Any]:
        from dagster import DagsterInstance

        with environ(self.env), DagsterInstance.from_config(str(self.home)) as instance:
            yield instance

    def register(self, names: Sequence[str]) -> None:
        with self.open() as instance:
            instance.add_dynamic_partitions(PARTITIONS_NAME, list(names))

    def phases(self, run: Timed) -> dict[str, float]:
        """Where the run's wall time went, from the timestamps of its own events: process
        start to RUN_START (interpreter, code location, run set-up), the step, and after."""
        from dagster import DagsterEventType

        kinds = {
            DagsterEventType.RUN_START,
            DagsterEventType.STEP_START,
            DagsterEventType.STEP_SUCCESS,
            DagsterEventType.STEP_FAILURE,
        }
        with self.open() as instance:
            records = instance.get_run_records()
            if len(records) != 1:
                return {}
            entries = instance.all_logs(records[0].dagster_run.run_id, of_type=kinds)
        first: dict[str, float] = {}
        for entry in entries:
            if entry.dagster_event is not None:
                first.setdefault(entry.dagster_event.event_type_value, entry.timestamp)
        run_start = first.get(DagsterEventType.RUN_START.value)
        step_start = first.get(DagsterEventType.STEP_START.value)
        step_end = first.get(DagsterEventType.STEP_SUCCESS.value) or first.get(
            DagsterEventType.STEP_FAILURE.value
        )
        if run_start is None or step_start is None or step_end is None:
            return {}
        return {
            "start": run_start - run.started_at,
            "to step": step_start - run_start,
            "step": step_end - step_start,
            "after step": run.ended_at - step_end,
        }

    def materialized(self) -> dict[str, set[str]]:
        from dagster import AssetKey

        with self.open() as instance:
            return {
                key: {str(p) for p in instance.get_materialized_partitions(AssetKey(key))}
                for key in ASSET_KEYS
            }


class Postgres:
    """One local PostgreSQL server for the whole script; a new database per instance."""

    def __init__(self, server: Any) -> None:
        self.server = server
        self._count = 0

    def database(self) -> dict[str, str]:
        self._count += 1
        name = f"dagster_e2e_{self._count}_{secrets.token_hex(3)}"
        password = secrets.token_hex(16)
        self.server.create_database(name, user=name, password=password)
        return {
            "DAGSTER_PG_HOST": self.server.host,
            "DAGSTER_PG_PORT": str(self.server.port),
            "DAGSTER_PG_USERNAME": name,
            "DAGSTER_PG_PASSWORD": password,
            "DAGSTER_PG_DB": name,
        }


def new_instance(kind: str, home: Path, postgres: Postgres | None) -> Instance:
    home.mkdir(parents=True)
    config: dict[str, Any] = {"telemetry": {"enabled": False}, "nux": {"enabled": False}}
    env = {"DAGSTER_HOME": str(home)}
    if kind == "postgres":
        assert postgres is not None
        config["storage"] = POSTGRES_STORAGE
        env.update(postgres.database())
    (home / "dagster.yaml").write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    return Instance(kind, home, env)


def postgres_problem() -> str | None:
    from policy_pipeline_tests.harness.postgres_server import missing_reason

    problem = missing_reason()
    if problem is None:
        try:
            import dagster_postgres  # noqa: F401
        except ImportError:
            problem = "dagster-postgres is not installed"
    return problem


@contextmanager
def maybe_postgres(needed: bool) -> Iterator[Postgres | None]:
    if not needed:
        yield None
        return
    from policy_pipeline_tests.harness.postgres_server import find_postgres, postgres_server

    binaries = find_postgres()
    assert binaries is not None
    with postgres_server(binaries) as server:
        yield Postgres(server)


# --- the product's side ---------------------------------------------------------------------------


def write_catalog(directory: Path, n: int) -> list[str]:
    directory.mkdir()
    names = []
    for policy in make_policies(n, "e2e"):
        path = directory / f"{policy.policy_name}.yaml"
        path.write_text(yaml.safe_dump(policy.model_dump(), sort_keys=False), encoding="utf-8")
        names.append(policy.policy_name)
    return sorted(names)


def product_env(
    args: argparse.Namespace, instance: Instance, tmp: Path, sim_url: str, key: str
) -> dict[str, str]:
    env = base_env(args)
    env.update(instance.env)
    env.update(
        {
            "POLICY_API_ENDPOINT": sim_url,
            "POLICY_API_KEY": key,
            "POLICY_WAREHOUSE": "duckdb",
            "POLICY_DUCKDB_PATH": str(tmp / "state.duckdb"),
            "POLICY_CATALOG_DIR": str(tmp / "catalog"),
            "POLICY_API_MAX_CONCURRENCY": str(args.concurrency),
            "POLICY_POLL_INITIAL_INTERVAL_SECONDS": f"{poll_initial(args):g}",
            "POLICY_POLL_MAX_INTERVAL_SECONDS": f"{poll_cap(args):g}",
            "POLICY_POLL_DEADLINE_SECONDS": f"{poll_deadline(args):g}",
        }
    )
    if args.poll_multiplier is not None:
        env["POLICY_POLL_BACKOFF_MULTIPLIER"] = f"{args.poll_multiplier:g}"
    return env


def poll_initial(args: argparse.Namespace) -> float:
    if args.poll_initial is not None:
        return float(args.poll_initial)
    if args.uneven:
        return 1.0
    return args.ready_seconds / 2 if args.ready_seconds > 0 else 1.0


def poll_cap(args: argparse.Namespace) -> float:
    if args.poll_max_interval is not None:
        return float(args.poll_max_interval)
    return 5.0 if args.uneven else 2.0


def poll_deadline(args: argparse.Namespace) -> float:
    if args.poll_deadline is not None:
        return float(args.poll_deadline)
    return 90.0 if args.uneven else 900.0


def register_with_cli(env: dict[str, str], n: int) -> None:
    """The README's ``policy-pipeline register-partitions`` on the fresh DAGSTER_HOME."""
    result = subprocess.run(
        [*_tool("policy-pipeline", "policy_pipeline.cli"), "register-partitions"],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    if result.returncode != 0 or f"{n} partitions added" not in result.stdout:
        raise RunSetupError(
            f"policy-pipeline register-partitions failed (exit {result.returncode}):\n"
            f"{result.stdout[-2000:]}\n{result.stderr[-2000:]}"
        )


def state_rows(duckdb_path: Path) -> list[tuple[str, str]]:
    """(policy_name, status) of every execution in the DuckDB state table."""
    import duckdb

    if not duckdb_path.exists():
        return []
    with duckdb.connect(str(duckdb_path), read_only=True) as conn:
        rows = conn.execute(f'SELECT "policy_name", "status" FROM {STATE_TABLE}').fetchall()
    return [(str(name), str(status)) for name, status in rows]


def sim_policies(base_url: str) -> list[dict[str, Any]]:
    with httpx.Client(base_url=base_url, timeout=60.0) as control:
        response = control.get("/_sim/policies")
        response.raise_for_status()
        return list(response.json().values())


def sim_configure(base_url: str, changes: dict[str, Any]) -> None:
    with httpx.Client(base_url=base_url, timeout=60.0) as control:
        response = control.post("/_sim/config", json=changes)
        response.raise_for_status()


def api_calls(counts: dict[str, Any], n: int) -> dict[str, float]:
    requests = {e: int(counts["requests"][e]) for e in ENDPOINTS}
    return {"all": sum(requests.values()) / n, **{e: c / n for e, c in requests.items()}}


def check_simulator(
    counts: dict[str, Any], created: int, triggered: int, problems: list[str]
) -> None:
    if counts["policies_created"] != created or counts["circuits_triggered"] != triggered:
        problems.append(
            f"simulator: {counts['policies_created']} policies created and "
            f"{counts['circuits_triggered']} circuits triggered; expected {created} and "
            f"{triggered}"
        )
    duplicates = [
        name
        for name, stats in counts["per_policy"].items()
        if stats["policies_created"] > 1 or stats["duplicate_circuit_triggers"] > 0
    ]
    if duplicates:
        problems.append(
            f"simulator: duplicates for {len(duplicates)} policies, e.g. {duplicates[0]}"
        )


def check_run(label: str, run: Timed, expect_success: bool, problems: list[str]) -> None:
    if run.timed_out:
        problems.append(f"{label}: killed after the --run-timeout")
    if (run.exit_code == 0) != expect_success:
        expected = "exit 0" if expect_success else "a non-zero exit (failing policies)"
        problems.append(f"{label}: exit code {run.exit_code}, expected {expected}")
        print(f"\n{label}: exit code {run.exit_code}; the end of its output:\n{run.tail()}")


# --- throughput -----------------------------------------------------------------------------------


@dataclass
class ThroughputResult:
    instance: str
    n: int
    run: Timed
    noop: Timed
    limit: float
    calls: dict[str, float]
    problems: list[str] = field(default_factory=list)

    @property
    def overhead(self) -> float:
        return self.run.wall - self.noop.wall


def api_limit(n: int, latency: float, ready: float, concurrency: int) -> float:
    """The API's own limit: three calls per policy at most C at a time, or one policy's own
    path (ready R after its creation, three calls of L)."""
    return max(3 * n * latency / concurrency, ready + 3 * latency)


def run_throughput(
    kind: str, args: argparse.Namespace, postgres: Postgres | None, tmp: Path
) -> ThroughputResult:
    n = args.n
    problems: list[str] = []
    names = write_catalog(tmp / "catalog", n)
    key = secrets.token_hex(16)
    config = SimulatorConfig(
        api_key=key,
        latency_ms=args.latency_ms,
        ready_after_seconds=args.ready_seconds,
        ready_after_polls=0,
    )
    timeout = args.run_timeout
    with policy_api(config, "process") as sim:
        instance = new_instance(kind, tmp / "dagster_home", postgres)
        env = product_env(args, instance, tmp, sim.base_url, key)
        register_with_cli(env, n)
        command = job_command(
            ["-m", "policy_pipeline.definitions"], PRODUCT_JOB, names[0], names[-1]
        )
        print(f"[{kind}] timing dagster job execute over {n} partitions ...", flush=True)
        run = run_timed(command, env, tmp / "run.log", timeout)
        counts = sim.counts()
    check_run(f"{kind} product run", run, True, problems)
    statuses = Counter(status for _name, status in state_rows(tmp / "state.duckdb"))
    if statuses != Counter({"completed": n}):
        problems.append(f"state table: {dict(statuses)}; expected {n} completed executions")
    check_simulator(counts, n, n, problems)
    check_materialized(f"{kind} product run", instance, set(names), problems)
    run.phases = instance.phases(run)

    noop_instance = new_instance(kind, tmp / "dagster_home_noop", postgres)
    noop_instance.register(names)
    noop_env = {**base_env(args), **noop_instance.env}
    target = ["-f", str(NOOP_LOCATION.relative_to(REPO_ROOT))]
    print(f"[{kind}] timing the no-op run over the same {n} partitions ...", flush=True)
    noop = run_timed(
        job_command(target, NOOP_JOB, names[0], names[-1]), noop_env, tmp / "noop.log", timeout
    )
    check_run(f"{kind} no-op run", noop, True, problems)
    check_materialized(f"{kind} no-op run", noop_instance, set(names), problems)
    noop.phases = noop_instance.phases(noop)
    limit = api_limit(n, args.latency_ms / 1000, args.ready_seconds, args.concurrency)
    return ThroughputResult(kind, n, run, noop, limit, api_calls(counts, n), problems)


def check_materialized(
    label: str, instance: Instance, expected: set[str], problems: list[str]
) -> None:
    for key, partitions in instance.materialized().items():
        if partitions != expected:
            problems.append(
                f"{label}: {len(partitions)} partitions of {key} materialized, expected "
                f"{len(expected)} ({len(expected - partitions)} missing, "
                f"{len(partitions - expected)} unexpected)"
            )


PHASES = {
    "start": "process start -> RUN_START",
    "to step": "RUN_START -> STEP_START",
    "step": "the step",
    "after step": "step end -> process exit",
}


def phase_rows(run: Timed, label: str) -> list[tuple[str, object]]:
    if not run.phases:
        return [(f"  {label}: phases", "(not available)")]
    return [(f"  {label}: {PHASES[name]} s", value) for name, value in run.phases.items()]


def print_throughput(result: ThroughputResult, args: argparse.Namespace) -> None:
    rows: list[tuple[str, object]] = [
        ("policies N", result.n),
        (f"{EVENT_BATCH_ENV}", event_batch_text(args)),
        ("run exit code", result.run.exit_code),
        ("wall seconds (dagster job execute, start to exit)", result.run.wall),
        ("NOOP seconds (no-op location, same partitions/keys)", result.noop.wall),
        ("wall - NOOP seconds", result.overhead),
        ("LIMIT seconds = max(3 N L / C, R + 3 L)", result.limit),
        ("(wall - NOOP) / LIMIT", result.overhead / result.limit),
        *phase_rows(result.run, "run"),
        *phase_rows(result.noop, "NOOP"),
        ("peak RSS MB of the run process (wait4 ru_maxrss)", result.run.peak_rss_mb),
        ("peak RSS MB of the no-op run process", result.noop.peak_rss_mb),
        ("API calls per policy", result.calls["all"]),
        *((f"  {e} per policy", result.calls[e]) for e in ENDPOINTS),
    ]
    print_table(f"End to end, N={result.n}, {result.instance} instance", ["figure", "value"], rows)


# --- uneven readiness -----------------------------------------------------------------------------


@dataclass
class UnevenPlan:
    ready_after: dict[str, float]  # every policy that is not never-ready
    slow: list[str]
    never: list[str]
    failed: list[str]

    @property
    def healthy(self) -> list[str]:
        bad = set(self.never) | set(self.failed)
        return sorted(name for name in self.ready_after if name not in bad)


def plan_uneven(names: Sequence[str], args: argparse.Namespace) -> UnevenPlan:
    rng = random.Random(args.seed)

    def share(fraction: float) -> int:
        return max(1, round(fraction * len(names))) if fraction > 0 else 0

    counts = [share(args.never_fraction), share(args.fail_fraction), share(args.slow_fraction)]
    if sum(counts) >= len(names):
        raise SystemExit(f"--n {len(names)} is too small for the uneven mode's shares {counts}")
    shuffled = list(names)
    rng.shuffle(shuffled)
    never = sorted(shuffled[: counts[0]])
    failed = sorted(shuffled[counts[0] : counts[0] + counts[1]])
    slow = sorted(shuffled[counts[0] + counts[1] : sum(counts)])
    ready_after: dict[str, float] = {}
    mu = math.log(args.median_ready)
    for name in names:
        draw = rng.lognormvariate(mu, args.sigma)  # drawn for every name: stable across shares
        if name in never:
            continue
        ready_after[name] = (
            args.slow_ready if name in slow else round(min(draw, args.slow_ready), 3)
        )
    return UnevenPlan(ready_after, slow, never, failed)


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100)."""
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


@dataclass
class UnevenResult:
    instance: str
    n: int
    plan: UnevenPlan
    run: Timed
    delays: list[float]
    cap: float
    completed: int
    calls: dict[str, float]
    problems: list[str] = field(default_factory=list)


def run_uneven(
    kind: str, args: argparse.Namespace, postgres: Postgres | None, tmp: Path
) -> UnevenResult:
    n = args.n
    problems: list[str] = []
    names = write_catalog(tmp / "catalog", n)
    plan = plan_uneven(names, args)
    key = secrets.token_hex(16)
    config = SimulatorConfig(
        api_key=key,
        latency_ms=args.latency_ms,
        ready_after_seconds=args.median_ready,
        ready_after_polls=0,
    )
    with policy_api(config, "process") as sim:
        # The per-policy settings go by the control endpoint, not on the command line (size).
        sim_configure(
            sim.base_url,
            {
                "ready_after_seconds_by_policy": plan.ready_after,
                "fail_policies": plan.failed,
                "never_ready_policies": plan.never,
            },
        )
        instance = new_instance(kind, tmp / "dagster_home", postgres)
        env = product_env(args, instance, tmp, sim.base_url, key)
        register_with_cli(env, n)
        command = job_command(
            ["-m", "policy_pipeline.definitions"], PRODUCT_JOB, names[0], names[-1]
        )
        print(f"[{kind}] uneven: timing dagster job execute over {n} partitions ...", flush=True)
        run = run_timed(command, env, tmp / "run.log", args.run_timeout)
        counts = sim.counts()
        policies = sim_policies(sim.base_url)
    expect_success = not plan.failed and not plan.never
    check_run(f"{kind} uneven run", run, expect_success, problems)

    rows = state_rows(tmp / "state.duckdb")
    status = dict(rows)
    if len(status) != len(rows):
        problems.append(f"state table: {len(rows)} executions for {len(status)} policies")
    completed = {name for name, s in status.items() if s == "completed"}
    not_done = [name for name in plan.healthy if status.get(name) != "completed"]
    if not_done:
        problems.append(
            f"{len(not_done)} healthy policies did not complete, e.g. {not_done[0]}: "
            f"{status.get(not_done[0])}"
        )
    per_policy = counts["per_policy"]
    for label, group in (("failed", plan.failed), ("never-ready", plan.never)):
        wrong = [name for name in group if status.get(name) != "error"]
        called = [name for name in group if per_policy.get(name, {}).get("circuit_requests", 0)]
        if wrong:
            problems.append(f"{len(wrong)} {label} policies not in error, e.g. {wrong[0]}")
        if called:
            problems.append(f"{len(called)} {label} policies had a circuit call, e.g. {called[0]}")
    check_simulator(counts, n, len(completed), problems)
    materialized = instance.materialized()
    run.phases = instance.phases(run)
    circuit = materialized[ASSET_KEYS[2]]
    if circuit != completed:
        problems.append(
            f"instance: {ASSET_KEYS[2]} materialized for {len(circuit)} partitions, "
            f"{len(completed)} completed ({len(completed - circuit)} missing, "
            f"{len(circuit - completed)} not completed)"
        )
    if materialized[ASSET_KEYS[0]] != set(names):
        problems.append(
            f"instance: {ASSET_KEYS[0]} materialized for {len(materialized[ASSET_KEYS[0]])} "
            f"of {n} partitions"
        )
    delays = [
        float(p["circuit_at"]) - float(p["ready_at"])
        for p in policies
        if p.get("ready_at") is not None and p.get("circuit_at") is not None
    ]
    if len(delays) != len(completed):
        problems.append(f"{len(delays)} delays for {len(completed)} completed policies")
    return UnevenResult(
        kind, n, plan, run, delays, poll_cap(args), len(completed), api_calls(counts, n), problems
    )


def print_uneven(result: UnevenResult, args: argparse.Namespace) -> None:
    plan = result.plan
    drawn = [plan.ready_after[name] for name in plan.healthy]
    rows: list[tuple[str, object]] = [
        ("policies N", result.n),
        (f"{EVENT_BATCH_ENV}", event_batch_text(args)),
        (
            "healthy / at slow readiness / never ready / failed by the API",
            f"{len(plan.healthy)} / {len(plan.slow)} / {len(plan.never)} / {len(plan.failed)}",
        ),
        (
            "readiness of healthy policies s: p50 / p99 / max",
            f"{percentile(drawn, 50):.2f} / {percentile(drawn, 99):.2f} / {max(drawn):.2f}",
        ),
        ("run exit code (non-zero expected: failing policies)", result.run.exit_code),
        ("wall seconds (dagster job execute, start to exit)", result.run.wall),
        *phase_rows(result.run, "run"),
        ("completed executions", result.completed),
        ("delays counted (ready_at and circuit_at)", len(result.delays)),
        ("delay s (circuit_at - ready_at): p50", percentile(result.delays, 50)),
        ("delay s: p99", percentile(result.delays, 99)),
        ("delay s: max", max(result.delays, default=float("nan"))),
        ("polling interval cap in force s", result.cap),
        ("peak RSS MB of the run process (wait4 ru_maxrss)", result.run.peak_rss_mb),
        ("API calls per policy", result.calls["all"]),
        *((f"  {e} per policy", result.calls[e]) for e in ENDPOINTS),
    ]
    print_table(
        f"End to end, uneven readiness, N={result.n}, {result.instance} instance",
        ["figure", "value"],
        rows,
    )


# --- main -----------------------------------------------------------------------------------------


def event_batch_text(args: argparse.Namespace) -> str:
    if args.event_batch_size is None:
        return "unset (events stored one by one)"
    return f"set: {args.event_batch_size}"


@contextmanager
def scratch(prefix: str, keep: bool) -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        yield path
    finally:
        if keep:
            print(f"(kept {path})")
        else:
            shutil.rmtree(path, ignore_errors=True)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="End-to-end benchmark: `dagster job execute` over N partitions as a "
        "subprocess on a fresh instance, against the no-op run of the same partitions and the "
        "API's own limit; or (--uneven) the delay from readiness to circuit breaker.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--n", type=int, default=1000, help="policies N")
    parser.add_argument(
        "--instance", choices=(*INSTANCES, "both"), default="both", help="Dagster storage"
    )
    parser.add_argument(
        "--event-batch-size",
        type=int,
        default=None,
        help=f"set {EVENT_BATCH_ENV} for the runs (default: unset, Dagster's default)",
    )
    parser.add_argument("--latency-ms", type=float, default=50.0, help="per-call latency L")
    parser.add_argument("--ready-seconds", type=float, default=2.0, help="readiness time R")
    parser.add_argument(
        "--concurrency", type=int, default=16, help="C = POLICY_API_MAX_CONCURRENCY"
    )
    polling = parser.add_argument_group("polling (POLICY_POLL_*)")
    polling.add_argument(
        "--poll-initial", type=float, default=None, help="initial interval (default R/2; uneven 1)"
    )
    polling.add_argument(
        "--poll-max-interval", type=float, default=None, help="interval cap (default 2; uneven 5)"
    )
    polling.add_argument(
        "--poll-multiplier", type=float, default=None, help="backoff (default: the product's)"
    )
    polling.add_argument(
        "--poll-deadline", type=float, default=None, help="deadline (default 900; uneven 90)"
    )
    uneven = parser.add_argument_group("uneven readiness (--uneven)")
    uneven.add_argument("--uneven", action="store_true", help="long-tail readiness mode")
    uneven.add_argument("--median-ready", type=float, default=5.0, help="lognormal median s")
    uneven.add_argument("--sigma", type=float, default=0.6, help="lognormal sigma")
    uneven.add_argument("--slow-ready", type=float, default=60.0, help="the slow share's s")
    uneven.add_argument("--slow-fraction", type=float, default=0.05)
    uneven.add_argument("--never-fraction", type=float, default=0.01, help="never ready")
    uneven.add_argument("--fail-fraction", type=float, default=0.02, help="failed by the API")
    uneven.add_argument("--seed", type=int, default=1)
    parser.add_argument(
        "--run-timeout", type=float, default=1800.0, help="kill a run after this many s"
    )
    parser.add_argument("--keep", action="store_true", help="keep the temporary directories")
    targets = parser.add_argument_group("targets")
    targets.add_argument("--no-targets", action="store_true", help="only print; exit 0")
    targets.add_argument(
        "--max-overhead-ratio", type=float, default=2.0, help="(wall - NOOP) / LIMIT"
    )
    targets.add_argument("--delay-slack", type=float, default=1.0, help="p99 delay <= cap + this")
    return parser


def throughput_run(
    kind: str,
    args: argparse.Namespace,
    postgres: Postgres | None,
    tmp: Path,
    targets: Targets,
    problems: list[str],
) -> None:
    result = run_throughput(kind, args, postgres, tmp)
    print_throughput(result, args)
    bound = args.max_overhead_ratio * result.limit
    targets.check(
        f"(wall - NOOP) <= {args.max_overhead_ratio:g} x LIMIT ({kind})",
        f"{result.overhead:.2f} s = {result.overhead / result.limit:.2f} x {result.limit:.2f} s",
        f"<= {bound:.2f} s",
        result.overhead <= bound,
    )
    problems += [f"{kind}: {p}" for p in result.problems]


def uneven_run(
    kind: str,
    args: argparse.Namespace,
    postgres: Postgres | None,
    tmp: Path,
    targets: Targets,
    problems: list[str],
) -> None:
    result = run_uneven(kind, args, postgres, tmp)
    print_uneven(result, args)
    p99 = percentile(result.delays, 99)
    targets.check(
        f"p99 <= cap + {args.delay_slack:g} s ({kind})",
        f"p99 {p99:.2f} s (cap {result.cap:g} s)",
        f"<= {result.cap + args.delay_slack:g} s",
        p99 <= result.cap + args.delay_slack,  # NaN (no delays) is a miss
    )
    problems += [f"{kind}: {p}" for p in result.problems]


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    kinds = list(INSTANCES) if args.instance == "both" else [args.instance]
    if args.n < 1:
        print("error: --n must be at least 1", file=sys.stderr)
        return 2
    if "postgres" in kinds and (problem := postgres_problem()) is not None:
        print(
            f"error: no PostgreSQL instance: {problem} (or use --instance sqlite)", file=sys.stderr
        )
        return 2
    print(machine_line())
    mode = "uneven readiness" if args.uneven else "throughput"
    ready = (
        f"readiness lognormal median {args.median_ready:g} s (sigma {args.sigma:g}), "
        f"{args.slow_fraction:.0%} at {args.slow_ready:g} s, {args.never_fraction:.0%} never, "
        f"{args.fail_fraction:.0%} failed, seed {args.seed}"
        if args.uneven
        else f"R={args.ready_seconds:g} s"
    )
    print(
        f"settings: {mode}, N={args.n}, L={args.latency_ms:g} ms, {ready}, C={args.concurrency}; "
        f"polling: initial {poll_initial(args):g} s, cap {poll_cap(args):g} s, deadline "
        f"{poll_deadline(args):g} s, multiplier "
        f"{'the product default' if args.poll_multiplier is None else f'{args.poll_multiplier:g}'}"
        f"; instances: {', '.join(kinds)}; {EVENT_BATCH_ENV}: {event_batch_text(args)}; DuckDB "
        "state; simulator in its own process"
    )
    targets = Targets()
    problems: list[str] = []
    with maybe_postgres("postgres" in kinds) as postgres:
        for kind in kinds:
            with scratch(f"bench-e2e-{kind}-", args.keep) as tmp:
                try:
                    if args.uneven:
                        uneven_run(kind, args, postgres, tmp, targets, problems)
                    else:
                        throughput_run(kind, args, postgres, tmp, targets, problems)
                except RunSetupError as exc:
                    problems.append(f"{kind}: {exc}")
    targets.print()
    return targets.exit_code(enforce=not args.no_targets, problems=problems)


if __name__ == "__main__":
    sys.exit(main())
