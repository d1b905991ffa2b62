"""`policy-pipeline`: the operator's command line over the same state the assets write.

    policy-pipeline status [--policy P] [--status S] [--limit N] [--json]
    policy-pipeline diagnose [--json]
    policy-pipeline retry POLICY [--reason TEXT] [--wait]
    policy-pipeline override POLICY (--trigger-circuit-breaker | --skip-circuit-breaker)
                             --reason TEXT [--force]
    policy-pipeline register-partitions

Exit codes: 0 fine, 1 something needs attention (or the action failed), 2 bad usage.
"""

from __future__ import annotations

import argparse
import getpass
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import date, datetime
from typing import TYPE_CHECKING, Any

from policy_pipeline.core.domain import ExecutionStatus
from policy_pipeline.core.settings import (
    API_KEY_VAR,
    PROJECT_ROOT,
    LeaseSettings,
    Settings,
    SettingsError,
    dagster_home_set,
)
from policy_pipeline.core.store.connection import WarehouseConnection, WarehouseError

if TYPE_CHECKING:
    from dagster import DagsterInstance

    from policy_pipeline.core.store.state_store import StateStore

log = logging.getLogger("policy_pipeline.cli")


def _text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, datetime):
        return value.isoformat(sep=" ", timespec="seconds")
    if isinstance(value, date):
        return value.isoformat()
    return str(value)


def print_table(rows: Sequence[dict[str, Any]], columns: Sequence[str] | None = None) -> None:
    if not rows:
        print("(none)")
        return
    columns = list(columns or rows[0].keys())
    cells = [[_text(row.get(c))[:80] for c in columns] for row in rows]
    widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(columns)]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)).rstrip())
    print("  ".join("-" * w for w in widths))
    for r in cells:
        print("  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip())


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not at least 1")
    return value


def _json(value: Any) -> str:
    return json.dumps(value, default=_text, indent=2)


@contextmanager
def open_warehouse(settings: Settings) -> Iterator[WarehouseConnection]:
    """The state's warehouse, as the runs reach it, opened through the core without Dagster
    (``status`` and ``diagnose`` answer in about a second): a DuckDB file, or Snowflake with
    the options and secrets of the runs' dagster-snowflake resource."""
    if settings.warehouse == "duckdb":
        from policy_pipeline.core.store.duckdb_file import duckdb_warehouse

        wait = LeaseSettings(ttl_seconds=settings.leases.ttl_seconds).warehouse_wait_seconds
        yield duckdb_warehouse(settings.duckdb_path, wait_seconds=wait)
        return
    from policy_pipeline.core.store.snowflake_connection import snowflake_warehouse

    yield snowflake_warehouse(settings)


def _store(warehouse: WarehouseConnection) -> StateStore:
    from policy_pipeline.core.store.state_store import StateStore

    return StateStore(warehouse)


# --- commands -----------------------------------------------------------------------------------


def cmd_status(args: argparse.Namespace, settings: Settings) -> int:
    from policy_pipeline.core.store.health import HealthReport

    with open_warehouse(settings) as warehouse:
        rows = HealthReport(warehouse).executions(args.policy, args.status, args.limit)
    if args.json:
        print(_json(rows))
    else:
        columns = ["policy_name", "status", "policy_id", "poll_count"]
        print_table(rows, [*columns, "circuit_breaker_completed", "start_time", "message"])
    return 0


def _api_reachability(settings: Settings) -> dict[str, Any]:
    from policy_pipeline.core.operations import api_reachability

    reachability = api_reachability(settings, Settings.secret_if_set(API_KEY_VAR))
    return {"ok": reachability.ok, "detail": reachability.detail}


def cmd_diagnose(args: argparse.Namespace, settings: Settings) -> int:
    """What needs attention, and why."""
    from policy_pipeline.core.engine.guard import read_guard
    from policy_pipeline.core.store.health import HealthReport

    report: dict[str, Any] = {"attention": []}
    stuck_after = settings.checks.stuck_after_minutes
    error_below = settings.checks.success_rate_error_percent
    try:
        with open_warehouse(settings) as warehouse:
            monitor = HealthReport(warehouse)
            monitor.ping()
            report["warehouse"] = {"ok": True, "detail": f"{settings.warehouse} reachable"}
            report["stuck_executions"] = monitor.stuck_executions(stuck_after, limit=20)
            report["failed_executions_24h"] = monitor.failed_executions(24, limit=20)
            rate = monitor.success_rate(24)
            report["success_rate_24h"] = rate.__dict__
            report["last_api_calls"] = monitor.last_api_calls(10)
            guard = read_guard(_store(warehouse))
            report["api_guard"] = {
                "state": guard.state.value,
                "consecutive_failures": guard.consecutive_failures,
                "opened_at": guard.opened_at,
                "last_error": guard.last_error,
                "recent_changes": monitor.guard_events(5),
            }
    except Exception as exc:
        report["warehouse"] = {"ok": False, "detail": f"{type(exc).__name__}: {exc}"}
        rate = None
    report["policy_api"] = _api_reachability(settings)

    if not report["warehouse"]["ok"]:
        report["attention"].append("the warehouse is not reachable")
    if not report["policy_api"]["ok"]:
        report["attention"].append(f"Policy API: {report['policy_api']['detail']}")
    guard_report = report.get("api_guard")
    if guard_report and guard_report["state"] != "closed":
        report["attention"].append(
            f"the Policy API guard is {guard_report['state']} ({guard_report['last_error']})"
        )
    if report.get("stuck_executions"):
        report["attention"].append(f"{len(report['stuck_executions'])} stuck executions")
    if report.get("failed_executions_24h"):
        report["attention"].append(f"{len(report['failed_executions_24h'])} failed executions")
    if rate is not None and rate.rate_percent is not None and rate.rate_percent < error_below:
        report["attention"].append(f"success rate {rate.rate_percent}% is below {error_below}%")

    if args.json:
        print(_json(report))
    else:
        _print_diagnosis(report, stuck_after)
    return 1 if report["attention"] else 0


def _print_diagnosis(report: dict[str, Any], stuck_after: int) -> None:
    print(f"Warehouse:  {report['warehouse']['detail']}")
    print(f"Policy API: {report['policy_api']['detail']}")
    guard = report.get("api_guard")
    if guard:
        since = f" since {_text(guard['opened_at'])}" if guard["opened_at"] else ""
        print(f"API guard:  {guard['state']}{since}")
    rate = report.get("success_rate_24h")
    if rate:
        shown = "n/a" if rate["rate_percent"] is None else f"{rate['rate_percent']}%"
        print(
            f"Success rate (24h): {shown} of {rate['total']} "
            f"({rate['successful']} completed, {rate['failed']} failed)"
        )
    for title, key in (
        (f"Stuck executions (in flight > {stuck_after} min)", "stuck_executions"),
        ("Failed executions (24h)", "failed_executions_24h"),
        ("Last API interactions", "last_api_calls"),
    ):
        if key == "last_api_calls" and report.get("api_guard", {}).get("recent_changes"):
            print("\nAPI guard changes:")
            print_table(report["api_guard"]["recent_changes"])
        if key in report:
            print(f"\n{title}:")
            print_table(report[key])
    print()
    if report["attention"]:
        print("Needs attention:")
        for item in report["attention"]:
            print(f"  - {item}")
    else:
        print("All good.")


# How often ``retry --wait`` looks at the run.
WAIT_POLL_SECONDS = 1.0
RETRY_TRIGGER = "retry"  # the run's policy_pipeline/trigger tag
OPERATOR_TAG = "policy_pipeline/operator"


def launch_command(job: str, run_id: str, tags: dict[str, str]) -> list[str]:
    """``dagster job launch``: the run is submitted to the instance's run coordinator (queued
    with a QueuedRunCoordinator, under its limits; started at once in the background with the
    DefaultRunCoordinator), not executed in this process. Through workspace.yaml, so that the
    run belongs to the code location a daemon or ``dagster dev`` knows (``policy_pipeline``)."""
    return [
        sys.executable,
        "-m",
        "dagster",
        "job",
        "launch",
        "-w",
        str(PROJECT_ROOT / "workspace.yaml"),
        "-j",
        job,
        "--run-id",
        run_id,
        "--tags",
        json.dumps(tags),
    ]


def cmd_retry(args: argparse.Namespace, settings: Settings) -> int:
    """Submit a run of the workflow for one policy to the Dagster instance (DAGSTER_HOME): it
    resumes the policy's active execution, if any. With --wait, follow it to its end."""
    from dagster import DagsterInstance

    from policy_pipeline.core.catalog import CatalogError, load_catalog
    from policy_pipeline.defs.workflow.partitions import partition_tags
    from policy_pipeline.defs.workflow.runs import JOB_NAME, SENSOR_TAG

    if not dagster_home_set():
        print(
            "error: DAGSTER_HOME is not set: it names the Dagster instance the run is submitted to",
            file=sys.stderr,
        )
        return 2
    try:
        catalog = load_catalog(settings.catalog_dir)
    except CatalogError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.policy not in catalog:
        return _refuse(f"policy '{args.policy}' is not in the catalog ({settings.catalog_dir})")
    operator = getpass.getuser()
    run_id = str(uuid.uuid4())
    tags = {
        **partition_tags(args.policy, args.policy),
        SENSOR_TAG: RETRY_TRIGGER,
        OPERATOR_TAG: operator,
    }
    print(f"Submitting a run of {JOB_NAME} for {args.policy} (dagster job launch)...", flush=True)
    # Not a pipe: the run's processes started by the launch inherit its output and live on
    # after it returns; a file lets this command return as soon as the run is submitted.
    with tempfile.TemporaryFile(mode="w+") as output:
        result = subprocess.run(
            launch_command(JOB_NAME, run_id, tags),
            cwd=PROJECT_ROOT,
            stdin=subprocess.DEVNULL,
            stdout=output,
            stderr=subprocess.STDOUT,
            check=False,
        )
        output.seek(0)
        launch_output = output.read(200_000)
    with DagsterInstance.get() as instance:
        run = instance.get_run_by_id(run_id)
        if result.returncode != 0 or run is None:
            print(launch_output[-4000:], file=sys.stderr)
            code = result.returncode
            if run is None:
                return _refuse(f"the run was not submitted (dagster job launch exit {code})")
            print(
                f"error: run {run_id} was created but not launched ({run.status.value}; "
                f"dagster job launch exit {code})",
                file=sys.stderr,
            )
            return 1
        _audit_retry(settings, args.policy, f"{args.reason or 'manual retry'} (run {run_id})")
        print(f"Submitted run {run_id} ({run.status.value}).")
        print(
            f"Watch it: dagster run list (DAGSTER_HOME={os.environ['DAGSTER_HOME']}), the run "
            f"{run_id} in the Dagster UI, or policy-pipeline status --policy {args.policy}.",
            flush=True,
        )
        if not args.wait:
            return 0
        return _wait_for_run(instance, run_id, args.policy, settings)


def _audit_retry(settings: Settings, policy: str, reason: str) -> None:
    """Record the retry on the policy's execution, if it has one. The run is already submitted:
    a failure here is reported, not fatal."""
    from policy_pipeline.core.operations import audit_operator

    try:
        with open_warehouse(settings) as warehouse:
            store = _store(warehouse)
            row = store.current_execution(policy)
            if row is not None:
                audit_operator(store, row, "retry", reason, getpass.getuser())
    except Exception as exc:
        print(f"warning: the retry was not audited: {type(exc).__name__}: {exc}", file=sys.stderr)


def _wait_for_run(instance: DagsterInstance, run_id: str, policy: str, settings: Settings) -> int:
    """Poll the instance until the run has ended: 0 if it succeeded, 1 otherwise."""
    from dagster import DagsterRunStatus

    shown: DagsterRunStatus | None = None
    try:
        while True:
            run = instance.get_run_by_id(run_id)
            if run is None:
                print(f"error: run {run_id} is no longer in the Dagster instance", file=sys.stderr)
                return 1
            if run.status != shown:
                shown = run.status
                print(f"  run {run_id}: {shown.value}", flush=True)
            if run.is_finished:
                break
            time.sleep(WAIT_POLL_SECONDS)
    except KeyboardInterrupt:
        print(f"\nStopped waiting; run {run_id} goes on.", file=sys.stderr)
        return 1
    with open_warehouse(settings) as warehouse:
        row = _store(warehouse).current_execution(policy)
    if row is not None:
        detail = f": {row.error_message}" if row.error_message else ""
        print(f"{policy}: execution {row.execution_id} is {row.status.value}{detail}")
    if run.status is DagsterRunStatus.SUCCESS:
        return 0
    print(f"error: run {run_id} ended {run.status.value}", file=sys.stderr)
    return 1


def cmd_register_partitions(args: argparse.Namespace, settings: Settings) -> int:
    """Add the catalog's policies to the Dagster instance's ``policies`` partitions, as the
    catalog sensor does, so that a CLI range run (``dagster asset materialize --partition-range``,
    or ``dagster job execute`` with range tags) works on a new DAGSTER_HOME."""
    from dagster import DagsterInstance

    from policy_pipeline.core.catalog import CatalogError, load_catalog
    from policy_pipeline.defs.workflow.partitions import PARTITIONS_NAME, register_policies

    if not dagster_home_set():
        print("error: DAGSTER_HOME is not set: it names the Dagster instance", file=sys.stderr)
        return 2
    try:
        names = sorted(load_catalog(settings.catalog_dir))
    except CatalogError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    with DagsterInstance.get() as instance:
        missing = register_policies(instance, names)
    print(
        f"{len(missing)} partitions added, {len(names) - len(missing)} already known "
        f"({PARTITIONS_NAME}: {', '.join(names) if len(names) <= 10 else f'{len(names)} policies'})"
    )
    return 0


def cmd_override(args: argparse.Namespace, settings: Settings) -> int:
    from policy_pipeline.core.liveness import lease_owner
    from policy_pipeline.core.operations import (
        Override,
        OverrideFailed,
        OverrideRefused,
        api_config,
        override_circuit_breaker,
    )
    from policy_pipeline.core.policy_api import PolicyApiClient

    user = getpass.getuser()
    override = Override(
        policy=args.policy,
        action="skip_circuit_breaker" if args.skip_circuit_breaker else "trigger_circuit_breaker",
        reason=args.reason,
        force=args.force,
        owner=lease_owner(f"operator:{user}"),
        user=user,
    )
    lease = LeaseSettings(settings.leases.ttl_seconds, settings.leases.wait_seconds)
    api = None
    if args.trigger_circuit_breaker:
        # A missing or unusable key fails the circuit breaker call as it fails a run's, and a
        # forced policy_ready is put back.
        api = PolicyApiClient(api_config(settings, Settings.secret_if_set(API_KEY_VAR) or ""))
    try:
        with open_warehouse(settings) as warehouse:
            done = override_circuit_breaker(_store(warehouse), override, lease, api, log)
    except OverrideRefused as exc:
        return _refuse(str(exc))
    except OverrideFailed as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        if api is not None:
            api.close()
    print(done)
    return 0


def _refuse(message: str) -> int:
    print(f"error: {message}; nothing done", file=sys.stderr)
    return 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="policy-pipeline", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)

    status = commands.add_parser("status", help="recent executions")
    status.add_argument("--policy", help="only this policy")
    status.add_argument("--status", choices=[s.value for s in ExecutionStatus])
    status.add_argument("--limit", type=_positive_int, default=20, help="at most this many")
    status.add_argument("--json", action="store_true", help="machine-readable output")
    status.set_defaults(handler=cmd_status)

    diagnose = commands.add_parser("diagnose", help="what needs attention (exit 1 if anything)")
    diagnose.add_argument("--json", action="store_true")
    diagnose.set_defaults(handler=cmd_diagnose)

    retry = commands.add_parser(
        "retry",
        help="submit a run of the workflow for one policy to the Dagster instance (DAGSTER_HOME)",
    )
    retry.add_argument("policy")
    retry.add_argument("--reason", help="recorded in the audit table")
    retry.add_argument(
        "--wait",
        action="store_true",
        help="follow the run until it ends; exit 1 if it did not succeed",
    )
    retry.set_defaults(handler=cmd_retry)

    override = commands.add_parser("override", help="manual intervention on the circuit breaker")
    override.add_argument("policy")
    what = override.add_mutually_exclusive_group(required=True)
    what.add_argument("--trigger-circuit-breaker", action="store_true")
    what.add_argument("--skip-circuit-breaker", action="store_true")
    override.add_argument("--reason", required=True, help="why (recorded in the audit table)")
    override.add_argument(
        "--force", action="store_true", help="even if the execution is not policy_ready"
    )
    override.set_defaults(handler=cmd_override)

    register = commands.add_parser(
        "register-partitions",
        help="add the catalog's policies to the Dagster instance's partitions (DAGSTER_HOME)",
    )
    register.set_defaults(handler=cmd_register_partitions)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    # Our own messages at INFO; the libraries' (requests, alembic) only when they matter.
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    log.setLevel(logging.INFO)
    args = build_parser().parse_args(argv)
    try:
        settings = Settings.from_env()
    except SettingsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        result: int = args.handler(args, settings)
    except SettingsError as exc:  # found once the command needs it (Snowflake's variables)
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except WarehouseError as exc:  # its message names the statement, secrets scrubbed
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return result


if __name__ == "__main__":
    sys.exit(main())
