"""Read paths over a large state table: the operator CLI, the checks, the catalog sensor.

Generates ``--rows`` executions (default 1,000,000) in ``policy_execution_state`` of a DuckDB
file with DuckDB's own ``INSERT ... SELECT FROM range(...)`` (a realistic mix: per policy one
execution every ~43 minutes over 30 days, 95 % completed, 5 % failed, the latest execution of
every 20th policy still in flight and a few of those stuck for hours, a content change every
~6 days), ``--events`` audit events (default 1,000,000) and a catalog of ``--policies`` YAML
files (default 1000) whose latest contents are mostly already executed. Then times, each
``--repeat`` times (every call opens its own connection, as the product does):

- ``policy-pipeline status`` (``cli.cmd_status``: default limit, ``--policy``, ``--status``);
- each check's SQL: ``HealthReport.stuck_count``, ``stuck_executions``, ``success_rate(24)``,
  ``consistency_violations(max_polls)``; the diagnose reads ``failed_executions`` and
  ``last_api_calls``;
- ``StateStore.executed_content()`` and one catalog sensor tick over the catalog (without a
  cursor, the worst case, and with an unchanged cursor);
- the batch reads every workflow step starts with (``current_executions`` over the whole
  catalog, ``executions`` of 500 ids), for context.

Target: each below ``--max-seconds`` (1 s), worst of the repeats.

    .venv/bin/python -m bench.reads
    .venv/bin/python -m bench.reads --db /tmp/reads.duckdb   # keep (and reuse) the data
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import logging
import math
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import duckdb
import yaml
from dagster import DagsterInstance, SensorResult, SkipReason, build_sensor_context
from dagster_duckdb import DuckDBResource

from bench.benchlib import REPO_ROOT, Targets, machine_line, make_policies, print_table, workdir
from policy_pipeline import cli
from policy_pipeline.core import catalog
from policy_pipeline.core.catalog import load_catalog
from policy_pipeline.core.settings import Settings
from policy_pipeline.core.store.connection import WarehouseConnection
from policy_pipeline.core.store.dialect import SqlDialect
from policy_pipeline.core.store.health import HealthReport
from policy_pipeline.core.store.state_store import StateStore
from policy_pipeline.defs.workflow.partitions import PARTITIONS_NAME
from policy_pipeline.defs.workflow.sensors import build_catalog_sensor
from policy_pipeline.resources import DuckDBStateResource, open_state

PREFIX = "bench"
_PART = "  part: "  # a part of the operation above it: informational, no target


@dataclass
class Timing:
    name: str
    seconds: list[float]
    detail: str

    @property
    def worst(self) -> float:
        return max(self.seconds)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Time the CLI status, the checks' SQL, executed_content and a catalog "
        "sensor tick over a large generated DuckDB state table.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--rows", type=int, default=1_000_000, help="executions")
    parser.add_argument("--events", type=int, default=1_000_000, help="audit events")
    parser.add_argument("--policies", type=int, default=1000, help="catalog files / names")
    parser.add_argument("--days", type=float, default=30.0, help="time span of the executions")
    parser.add_argument("--repeat", type=int, default=3, help="timed calls per operation")
    parser.add_argument("--max-polls", type=int, default=60, help="for consistency_violations")
    parser.add_argument(
        "--db", type=Path, help="DuckDB file to use; generated if missing, reused if present"
    )
    parser.add_argument(
        "--cli", action="store_true", help="also time `policy-pipeline status` as a process"
    )
    parser.add_argument("--max-seconds", type=float, default=1.0, help="target per operation")
    parser.add_argument("--no-targets", action="store_true", help="only print; exit 0")
    return parser


# --- data -----------------------------------------------------------------------------------------


def write_catalog(directory: Path, count: int) -> dict[str, str]:
    """``count`` policy files; returns name -> content hash."""
    directory.mkdir(parents=True, exist_ok=True)
    hashes = {}
    for policy in make_policies(count, PREFIX):
        path = directory / f"{policy.policy_name}.yaml"
        path.write_text(yaml.safe_dump(policy.payload(), sort_keys=False), encoding="utf-8")
        hashes[policy.policy_name] = policy.content_hash()
    return hashes


def generate(path: Path, args: argparse.Namespace, hashes: dict[str, str]) -> float:
    """Fill the tables with DuckDB SQL; returns the seconds it took."""
    started = time.perf_counter()
    # The product creates the schema, exactly as it would on first use.
    with open_state(_settings(path, path.parent)) as state:
        state.warehouse().ensure_schema()
    policies = args.policies
    versions = math.ceil(args.rows / policies)
    step_seconds = args.days * 86400 / versions
    con = duckdb.connect(str(path))
    try:
        con.execute("CREATE TEMP TABLE catalog_hashes (hp BIGINT, h VARCHAR)")
        con.executemany(
            "INSERT INTO catalog_hashes VALUES (?, ?)",
            [(int(name.rsplit("-", 1)[1]), digest) for name, digest in hashes.items()],
        )
        con.execute(_STATE_SQL.format(rows=args.rows, policies=policies, versions=versions,
                                      step=step_seconds, prefix=PREFIX))  # fmt: skip
        con.execute(_EVENTS_SQL.format(events=args.events, rows=args.rows, policies=policies,
                                       span=args.days * 86400, prefix=PREFIX))  # fmt: skip
        con.execute(
            'INSERT INTO policy_execution_locks ("policy_name", "updated_time") '
            f"SELECT '{PREFIX}-' || lpad(CAST(p AS VARCHAR), 5, '0'), CAST(now() AS TIMESTAMP) "
            f"FROM range({policies}) t(p)"
        )
        con.execute("CHECKPOINT")
    finally:
        con.close()
    return time.perf_counter() - started


# p: policy number, k: its execution number (0 = oldest), one execution per policy per `step`
# seconds. The latest execution of every 20th policy is in flight (every 100th started hours
# ago: stuck); 5 % of the others failed. Content changes every 200 executions; the latest
# content is the catalog's, except for every 100th policy + 1 (changed in the catalog since).
_STATE_SQL = """
INSERT INTO policy_execution_state (
  "execution_id", "policy_id", "poll_count", "status", "start_time", "last_poll_time",
  "completed", "requires_circuit_breaker", "circuit_breaker_initiated",
  "circuit_breaker_completed", "error_message", "message", "api_response", "policy_data",
  "policy_status_response", "circuit_breaker_response", "policy_name", "policy_content_hash",
  "create_idempotency_key", "circuit_idempotency_key", "trigger_reason", "policy_created_time",
  "policy_ready_time", "completed_time", "updated_time", "error_step", "resumable",
  "resume_count", "dagster_run_id")
WITH base AS (
  SELECT i, i % {policies} AS p, i // {policies} AS k,
         hash(i) % 100 AS dice,
         CAST(now() AS TIMESTAMP) AS now_ts
  FROM range({rows}) t(i)
), shaped AS (
  SELECT *,
    CASE
      WHEN k = {versions} - 1 AND p % 20 = 0 THEN
        ['pending', 'policy_created', 'policy_ready', 'error'][1 + (p // 20) % 4]
      WHEN dice < 5 THEN 'error'
      ELSE 'completed'
    END AS st,
    now_ts - to_seconds(CAST(({versions} - k - (p / {policies})) * {step} AS BIGINT))
      - CASE WHEN k = {versions} - 1 AND p % 100 = 0 THEN INTERVAL 3 HOUR
             ELSE INTERVAL 0 HOUR END AS t0,
    '{prefix}-' || lpad(CAST(p AS VARCHAR), 5, '0') AS name,
    'exec-' || lpad(CAST(i AS VARCHAR), 9, '0') AS eid,
    'pol_' || substr(md5(CAST(i AS VARCHAR)), 1, 16) AS pid
  FROM base
)
SELECT
  eid,
  CASE WHEN st = 'pending' THEN NULL ELSE pid END,
  CASE WHEN st IN ('pending', 'policy_created') THEN 0 ELSE 1 + i % 4 END,
  st, t0,
  CASE WHEN st = 'pending' THEN NULL ELSE t0 + INTERVAL 20 SECOND END,
  st = 'completed', st IN ('policy_ready', 'completed'), st = 'completed', st = 'completed',
  CASE WHEN st = 'error' THEN 'Policy API reported status ''failed'' for policy ' || pid END,
  CASE st WHEN 'completed' THEN 'Workflow completed: circuit breaker triggered'
          WHEN 'error' THEN 'policy_ready failed' ELSE 'in flight' END,
  CAST('{{"policy_id": "' || pid || '", "status": "pending"}}' AS JSON),
  CAST('{{"policy_name": "' || name || '", "policy_type": "data_retention", '
       || '"priority": "low", "parameters": {{"retention_days": 90}}}}' AS JSON),
  CASE WHEN st = 'pending' THEN NULL
       ELSE CAST('{{"policy_id": "' || pid || '", "status": "success", "polls": 2}}' AS JSON) END,
  CASE WHEN st = 'completed'
       THEN CAST('{{"circuit_breaker_id": "cb_' || substr(pid, 5) || '", "status": "triggered"}}'
                 AS JSON) END,
  name,
  CASE WHEN k // 200 = ({versions} - 1) // 200 AND p % 100 <> 1 THEN h
       ELSE substr(md5(name || CAST(k // 200 AS VARCHAR)), 1, 32) END,
  'create-' || eid,
  CASE WHEN st = 'completed' THEN 'circuit-' || eid END,
  CASE WHEN st = 'completed' THEN 'policy_ready' END,
  CASE WHEN st = 'pending' THEN NULL ELSE t0 + INTERVAL 1 SECOND END,
  CASE WHEN st IN ('policy_ready', 'completed') THEN t0 + INTERVAL 20 SECOND END,
  CASE WHEN st = 'completed' THEN t0 + INTERVAL 21 SECOND END,
  t0 + INTERVAL 21 SECOND,
  CASE WHEN st = 'error' THEN 'policy_ready' END,
  st = 'error' AND k = {versions} - 1,
  0,
  'run-' || CAST(k AS VARCHAR)
FROM shaped LEFT JOIN catalog_hashes ON catalog_hashes.hp = shaped.p
"""

_EVENTS_SQL = """
INSERT INTO policy_execution_events (
  "event_id", "execution_id", "policy_name", "event_time", "event_type", "endpoint",
  "http_method", "http_status", "latency_ms", "attempt", "outcome", "from_status",
  "to_status", "message", "detail", "dagster_run_id")
SELECT
  'ev-' || CAST(j AS VARCHAR),
  'exec-' || lpad(CAST((j * 7919) % {rows} AS VARCHAR), 9, '0'),
  '{prefix}-' || lpad(CAST(((j * 7919) % {rows}) % {policies} AS VARCHAR), 5, '0'),
  CAST(now() AS TIMESTAMP) - to_seconds(CAST({span} * (1 - j / {events}) AS BIGINT)),
  CASE WHEN j % 5 < 3 THEN 'api_call' ELSE 'transition' END,
  CASE WHEN j % 5 < 3 THEN ['createpolicy', 'policy_status', 'circuit'][1 + j % 3] END,
  CASE WHEN j % 5 < 3 THEN CASE j % 3 WHEN 1 THEN 'GET' ELSE 'POST' END END,
  CASE WHEN j % 5 < 3 THEN CASE WHEN j % 17 = 0 THEN 503 ELSE 200 END END,
  CASE WHEN j % 5 < 3 THEN 20 + j % 80 END,
  CASE WHEN j % 5 < 3 THEN 1 END,
  CASE WHEN j % 5 < 3 THEN CASE WHEN j % 17 = 0 THEN 'retry' ELSE 'ok' END END,
  CASE WHEN j % 5 >= 3 THEN 'policy_created' END,
  CASE WHEN j % 5 >= 3 THEN 'policy_ready' END,
  'event ' || CAST(j AS VARCHAR),
  CAST('{{"body": {{"status": "success"}}, "error": null}}' AS JSON),
  'run-' || CAST(j // 1000 AS VARCHAR)
FROM range({events}) t(j)
"""


# --- timing ---------------------------------------------------------------------------------------


def _settings(db: Path, catalog: Path) -> Settings:
    return dataclasses.replace(
        Settings.from_env(), warehouse="duckdb", duckdb_path=db, catalog_dir=catalog
    )


@contextlib.contextmanager
def _env(values: dict[str, str]) -> Iterator[None]:
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def timed(
    name: str, repeat: int, call: Callable[[], Any], describe: Callable[[Any], str]
) -> Timing:
    call()  # warm-up: imports and caches; every timed call still opens its own connection
    seconds = []
    result: Any = None
    for _ in range(repeat):
        started = time.perf_counter()
        result = call()
        seconds.append(time.perf_counter() - started)
    return Timing(name, seconds, describe(result))


def _status(settings: Settings, **filters: Any) -> Callable[[], str]:
    def run() -> str:
        namespace = argparse.Namespace(
            policy=filters.get("policy"),
            status=filters.get("status"),
            limit=filters.get("limit", 20),
            json=False,
        )
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            cli.cmd_status(namespace, settings)
        return out.getvalue()

    return run


def _rows(text: str) -> str:
    return f"{max(0, len(text.splitlines()) - 2)} rows printed"


def _sensor_tick(
    resource: DuckDBStateResource, instance: DagsterInstance, catalog_dir: Path
) -> Callable[[str | None], SensorResult | SkipReason]:
    sensor = build_catalog_sensor(dataclasses.replace(Settings.from_env(), catalog_dir=catalog_dir))

    def tick(cursor: str | None) -> SensorResult | SkipReason:
        with build_sensor_context(
            instance=instance, cursor=cursor, resources={"policy_state": resource}
        ) as context:
            result = sensor(context)
        assert isinstance(result, SensorResult | SkipReason)
        return result

    return tick


def _launched(result: SensorResult | SkipReason) -> str:
    if isinstance(result, SkipReason):
        return f"skipped: {result.skip_message}"
    requests = result.run_requests or []
    return f"{len(requests)} run requests"


def run_timings(args: argparse.Namespace, db: Path, catalog_dir: Path) -> list[Timing]:
    settings = _settings(db, catalog_dir)
    env = {
        "POLICY_WAREHOUSE": "duckdb",
        "POLICY_DUCKDB_PATH": str(db),
        "POLICY_CATALOG_DIR": str(catalog_dir),
    }
    repeat = args.repeat
    names = sorted(load_catalog(catalog_dir))
    timings: list[Timing] = []
    with _env(env), open_state(settings) as state:
        warehouse = state.warehouse()
        monitor = HealthReport(warehouse)
        store = StateStore(warehouse)

        def add(name: str, call: Callable[[], Any], describe: Callable[[Any], str]) -> None:
            timing = timed(name, repeat, call, describe)
            timings.append(timing)
            print(f"  {name}: worst {timing.worst:.3f} s ({timing.detail})", flush=True)

        def count(result: Any) -> str:
            return f"{len(result)} rows"

        add("status (limit 20)", _status(settings), _rows)
        add(_PART + "open_state (resource init)", lambda: _open_state(settings), lambda _r: "")
        add(_PART + "ensure_schema()", lambda: _fresh(settings).ensure_schema(), lambda _r: "")
        add(_PART + "executions() query", lambda: monitor.executions(), count)
        add("status --policy P", _status(settings, policy=names[len(names) // 2]), _rows)
        add("status --status error", _status(settings, status="error"), _rows)
        add("stuck_count(60)", lambda: monitor.stuck_count(60), lambda r: f"{r} stuck")
        add("stuck_executions(60)", lambda: monitor.stuck_executions(60), count)
        add(
            "success_rate(24)",
            lambda: monitor.success_rate(24),
            lambda r: f"{r.total} in 24 h, {r.rate_percent}%",
        )
        add(
            f"consistency_violations({args.max_polls})",
            lambda: monitor.consistency_violations(args.max_polls),
            count,
        )
        add("failed_executions(24)", lambda: monitor.failed_executions(24), count)
        add("last_api_calls(10)", lambda: monitor.last_api_calls(10), count)
        add("executed_content()", store.executed_content, lambda r: f"{len(r)} (name, hash)")
        add(_PART + "load_catalog, cold", lambda: _load_catalog_cold(catalog_dir), count)
        add(_PART + "load_catalog, unchanged files", lambda: load_catalog(catalog_dir), count)

        resource = DuckDBStateResource(duckdb=DuckDBResource(database=str(db)))
        with DagsterInstance.ephemeral() as instance:
            instance.add_dynamic_partitions(PARTITIONS_NAME, names)  # a steady-state instance
            tick = _sensor_tick(resource, instance, catalog_dir)
            # Cold: a code server's first tick after it starts parses every file.
            add("sensor tick, no cursor, cold", lambda: _cold(tick), _launched)
            add("sensor tick, no cursor", lambda: tick(None), _launched)
            first = tick(None)
            cursor = first.cursor if isinstance(first, SensorResult) else None
            add("sensor tick, unchanged cursor", lambda: tick(cursor), _launched)
        add("current_executions(all names)", lambda: store.current_executions(names), count)
        ids = [f"exec-{i:09d}" for i in range(args.rows - 500, args.rows)]
        add("executions(500 ids)", lambda: store.executions(ids), count)
        add("open + close a session", lambda: _open_close(store), lambda _r: "")
    if args.cli:
        command = [str(REPO_ROOT / ".venv/bin/policy-pipeline"), "status"]
        add_env = {**os.environ, **env}
        timing = timed(
            "policy-pipeline status (process)",
            repeat,
            lambda: subprocess.run(command, env=add_env, capture_output=True, check=True),
            lambda _r: "interpreter + imports + query",
        )
        print(f"  {timing.name}: worst {timing.worst:.3f} s", flush=True)
        timings.append(timing)
    return timings


def _open_state(settings: Settings) -> None:
    with open_state(settings) as state:
        state.warehouse()


def _fresh(settings: Settings) -> WarehouseConnection:
    """A WarehouseConnection whose schema check has not run yet (as in a new CLI process)."""
    return WarehouseConnection(
        SqlDialect.DUCKDB, DuckDBResource(database=str(settings.duckdb_path)).get_connection
    )


def _load_catalog_cold(catalog_dir: Path) -> dict[str, Any]:
    """``load_catalog`` in a process that has parsed none of the files yet."""
    catalog._parsed.clear()
    return load_catalog(catalog_dir)


def _cold(tick: Callable[[str | None], SensorResult | SkipReason]) -> SensorResult | SkipReason:
    catalog._parsed.clear()
    return tick(None)


def _open_close(store: StateStore) -> None:
    with store.warehouse.session():
        pass


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    print(machine_line())
    previous = logging.root.manager.disable
    logging.disable(logging.INFO)  # the sensor's "launching ..." lines
    try:
        timings = _measure(args)
    finally:
        logging.disable(previous)
    print_table(
        f"Reads over {args.rows:,} executions / {args.events:,} events (DuckDB), seconds",
        ["operation", "min", "median", "worst", "result"],
        [
            (t.name, min(t.seconds), statistics.median(t.seconds), t.worst, t.detail)
            for t in timings
        ],
    )
    targets = Targets()
    for t in timings:
        if t.name.endswith("(process)") or t.name.startswith(_PART):
            continue  # informational: interpreter start-up, parts
        targets.check(
            t.name, f"{t.worst:.3f} s", f"< {args.max_seconds:g} s", t.worst < args.max_seconds
        )
    targets.print()
    return targets.exit_code(enforce=not args.no_targets)


def _measure(args: argparse.Namespace) -> list[Timing]:
    """Generate (or reuse) the data, then time every operation."""
    with workdir("bench-reads-") as tmp:
        db = args.db or tmp / "reads.duckdb"
        catalog_dir = (db.parent / f"{db.stem}-catalog") if args.db else tmp / "catalog"
        if db.exists() and catalog_dir.is_dir():
            print(f"reusing {db} and {catalog_dir}")
            generated = None
        else:
            hashes = write_catalog(catalog_dir, args.policies)
            generated = generate(db, args, hashes)
            print(
                f"generated {args.rows:,} executions, {args.events:,} events and "
                f"{args.policies} catalog files in {generated:.1f} s"
            )
        with contextlib.closing(duckdb.connect(str(db), read_only=True)) as con:
            counts = con.execute(
                'SELECT "status", COUNT(*) FROM policy_execution_state GROUP BY 1 ORDER BY 2 DESC'
            ).fetchall()
            events = con.execute("SELECT COUNT(*) FROM policy_execution_events").fetchone()
        size_mb = db.stat().st_size / 1e6
        print(
            f"{db.name}: {size_mb:,.0f} MB; executions by status: "
            + ", ".join(f"{s} {c:,}" for s, c in counts)
            + f"; events {events[0] if events else 0:,}"
        )
        print(f"timing (warm-up call, then {args.repeat} timed calls each):")
        return run_timings(args, db, catalog_dir)


if __name__ == "__main__":
    sys.exit(main())
