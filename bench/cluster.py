"""A multi-run backfill on a Celery cluster of test hosts: 1 and 2 worker hosts (issue 20, item 7).

The cluster is the layout of deploy/ ("Many machines: Celery"), built from Linux namespaces by
the cluster tests' harness (`policy_pipeline_tests.harness.cluster.celery_cluster`): a services
host (PostgreSQL for Dagster's storage, Redis as the Celery broker, fakesnow as the warehouse,
the Policy API simulator with latency L and readiness R), a control host (code server,
webserver, daemon: deploy/start-*.sh) and W worker hosts (deploy/start-worker.sh), every one
with deploy/celery/dagster.yaml unchanged and ``DAGSTER_EVENT_BATCH_SIZE`` set on every host,
as a production deployment sets it. N policies are registered as partitions (as the catalog
sensor does), then one backfill of the three workflow assets over all of them is launched
through the webserver's GraphQL (as the UI's *Materialize* does) and split into runs of at most
``--per-run`` partitions (``POLICY_BACKFILL_MAX_PARTITIONS_PER_RUN``); the daemon queues them
and the CeleryRunLauncher hands each run to whichever worker host takes it.

Printed per worker count: the wall time from the launch to the backfill done (every run
finished, the backfill no longer requested; observed every second), policies per second, the
peak memory of each worker host (the sum over the processes of its PID namespace, sampled every
second: RSS, which counts shared pages once per process, and PSS, which shares them out), API
calls per policy (the simulator's counts), and NOOP: a no-op backfill of the same three asset
keys over the same partitions in runs of the same size, on the same cluster. For NOOP the
control host's code server is replaced by one serving this module's ``noop_defs`` under the
same location name (a redeploy of the code: `bench.noop_location`'s multi-asset with the
multi-run backfill policy and the product's in-process executor) and the daemon is restarted
so that it loads it; the workers load each run's code from the run itself.

    .venv/bin/python -m bench.cluster              # N=2000, runs of 500, on 1 then 2 workers
    .venv/bin/python -m bench.cluster --n 20 --per-run 10 --workers 1

Needs root, ``ip netns``, redis-server and PostgreSQL (as the cluster tests). Traffic goes only
between the namespaces the harness builds; every namespace, link and process is removed on
exit, also on failure or Ctrl-C.

Exit status: 0 done, 2 the run itself went wrong (a failed run, a wrong count, a duplicate) or
the cluster cannot be built here. There is no target (the issue sets none for this figure).
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
import warnings
from collections import Counter, defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dagster import (
    BackfillPolicy,
    BetaWarning,
    DagsterRunStatus,
    Definitions,
    DynamicPartitionsDefinition,
    MaterializeResult,
    RunsFilter,
    in_process_executor,
    multi_asset,
)

from bench.noop_location import ASSET_KEYS, PARTITIONS_NAME, SPECS

PER_RUN_ENV = "POLICY_BACKFILL_MAX_PARTITIONS_PER_RUN"

warnings.filterwarnings("ignore", category=BetaWarning, message=".*backfill_policy.*")


# --- the no-op code location (served by the control host for NOOP) ------------------------------
# Module level because the code server and each worker load it by name (`-m bench.cluster -a
# noop_defs`); it reads the run size from the same variable as the product, on every host.


def _noop_definitions(per_run: int) -> Definitions:
    @multi_asset(
        name="policy_workflow",
        specs=SPECS,
        partitions_def=DynamicPartitionsDefinition(name=PARTITIONS_NAME),
        backfill_policy=(
            BackfillPolicy.multi_run(per_run) if per_run > 0 else BackfillPolicy.single_run()
        ),
        can_subset=True,
    )
    def noop_workflow(context) -> Iterator[MaterializeResult]:  # type: ignore[no-untyped-def]
        for spec in SPECS:  # in the deps' order, as Dagster wants a multi-asset's outputs
            if spec.key in context.selected_asset_keys:
                yield MaterializeResult(asset_key=spec.key)

    # The product's executor (policy_pipeline/definitions.py): the step in the run's process.
    return Definitions(assets=[noop_workflow], executor=in_process_executor)


noop_defs = _noop_definitions(int(os.environ.get(PER_RUN_ENV) or 0))


# --- the benchmark --------------------------------------------------------------------------------
# The harness and the product are imported by the functions below, not at module level: the code
# server and the workers load this module for `noop_defs` only, and then import Dagster alone
# (as bench/noop_location.py), so that NOOP stays Dagster's own bookkeeping.

EVENT_BATCH_ENV = "DAGSTER_EVENT_BATCH_SIZE"
BACKFILL_TAG = "dagster/backfill"
CONTROL = "control"
SERVICES = "services"
CODE_SERVER_PORT = 4000  # the harness's (policy_pipeline_tests.harness.cluster)
WEBSERVER_PORT = 3000
SAMPLE_SECONDS = 1.0
SWAP_TIMEOUT_SECONDS = 180.0
RELOAD_LOCATION = """
mutation { reloadRepositoryLocation(repositoryLocationName: "policy_pipeline") {
  __typename ... on WorkspaceLocationEntry { loadStatus } ... on PythonError { message } } }
"""


class BenchError(RuntimeError):
    """The cluster or a backfill went wrong: the figures of that worker count are not valid."""


# --- memory of a host: every process of its PID namespace ----------------------------------------


@dataclass
class HostPeak:
    rss_mb: float = 0.0
    pss_mb: float = 0.0
    processes: int = 0


class HostMemory:
    """Samples, every second, the summed RSS and PSS of each host's processes: those whose
    ``/proc/<pid>/ns/pid`` is the host's PID namespace (the test process sees every pid)."""

    def __init__(self, namespaces: dict[str, str]) -> None:
        self.namespaces = {f"pid:[{ns}]": host for host, ns in namespaces.items()}
        self.peaks = {host: HostPeak() for host in namespaces}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True, name="host-memory")
        self._page_kb = os.sysconf("SC_PAGE_SIZE") / 1024

    def _loop(self) -> None:
        while True:
            self.sample()
            if self._stop.wait(SAMPLE_SECONDS):
                return

    def sample(self) -> None:
        rss: defaultdict[str, float] = defaultdict(float)
        pss: defaultdict[str, float] = defaultdict(float)
        count: Counter[str] = Counter()
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit():
                continue
            try:
                host = self.namespaces.get(os.readlink(f"/proc/{entry.name}/ns/pid"))
                if host is None:
                    continue
                resident = int(Path(f"/proc/{entry.name}/statm").read_text().split()[1])
                rss[host] += resident * self._page_kb / 1024
                pss[host] += _pss_kb(entry.name) / 1024
                count[host] += 1
            except (OSError, ValueError, IndexError):
                continue  # the process ended meanwhile
        for host, peak in self.peaks.items():
            peak.rss_mb = max(peak.rss_mb, rss[host])
            peak.pss_mb = max(peak.pss_mb, pss[host])
            peak.processes = max(peak.processes, count[host])

    def __enter__(self) -> HostMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=30)


def _pss_kb(pid: str) -> float:
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith("Pss:"):
            return float(line.split()[1])
    return 0.0


# --- one backfill ---------------------------------------------------------------------------------


@dataclass
class RunRow:
    run_id: str
    host: str
    partitions: int
    status: str
    start: float | None  # seconds after the launch
    end: float | None
    materializations: int
    failure: str = ""  # why a run failed: its failure events' messages


@dataclass
class Backfill:
    label: str
    wall: float  # launch -> backfill done (observed, every second)
    runs: list[RunRow]
    memory: dict[str, HostPeak]

    @property
    def first_start(self) -> float | None:
        starts = [r.start for r in self.runs if r.start is not None]
        return min(starts) if starts else None

    @property
    def last_end(self) -> float | None:
        ends = [r.end for r in self.runs if r.end is not None]
        return max(ends) if ends else None

    @property
    def materializations(self) -> int:
        return sum(r.materializations for r in self.runs)


def timed_backfill(
    cluster: Any, label: str, names: Sequence[str], hosts: Sequence[str], timeout: float
) -> Backfill:
    """Launch a backfill of the three asset keys over `names` through the webserver (as the
    UI does) and wait until it is done, sampling the hosts' memory meanwhile."""
    from policy_pipeline.defs.workflow.runs import PROCESS_TAG

    namespaces = {host: cluster.hosts.hosts[host].pid_namespace() for host in hosts}
    print(f"[{label}] launching the backfill over {len(names)} partitions ...", flush=True)
    with HostMemory(namespaces) as memory:
        launched = time.time()
        backfill_id = cluster.launch_backfill(names, ASSET_KEYS)
        try:
            cluster.wait_backfill(backfill_id, timeout)
        except AssertionError as exc:  # the harness's timeout or a process that exited
            raise BenchError(f"{label}: {str(exc)[:6000]}") from exc
        wall = time.time() - launched
    instance = cluster.instance
    rows = []
    for record in instance.get_run_records(RunsFilter(tags={BACKFILL_TAG: backfill_id})):
        run = record.dagster_run
        tags = run.tags
        first = tags.get("dagster/asset_partition_range_start")
        last = tags.get("dagster/asset_partition_range_end")
        count = (
            names.index(last) - names.index(first) + 1
            if first in names and last in names
            else (1 if tags.get("dagster/partition") else 0)
        )
        rows.append(
            RunRow(
                run_id=run.run_id,
                host=tags.get(PROCESS_TAG, "").split("/")[0] or "-",
                partitions=count,
                status=run.status.value,
                start=None if record.start_time is None else record.start_time - launched,
                end=None if record.end_time is None else record.end_time - launched,
                materializations=instance.get_run_stats(run.run_id).materializations,
                failure=_failure(instance, run.run_id)
                if run.status != DagsterRunStatus.SUCCESS
                else "",
            )
        )
    rows.sort(key=lambda r: (r.start is None, r.start or 0.0))
    return Backfill(label, wall, rows, memory.peaks)


def _failure(instance: Any, run_id: str) -> str:
    from dagster import DagsterEventType

    kinds = {DagsterEventType.RUN_FAILURE, DagsterEventType.STEP_FAILURE}
    messages = []
    for entry in instance.all_logs(run_id, of_type=kinds):
        event = entry.dagster_event
        error = getattr(event.event_specific_data, "error", None) if event else None
        messages.append(error.message.strip() if error is not None else entry.message)
    return " | ".join(messages)[-1500:]


def check_backfill(result: Backfill, n: int, per_run: int, problems: list[str]) -> None:
    failed = [r for r in result.runs if r.status != DagsterRunStatus.SUCCESS.value]
    if failed:
        problems.append(
            f"{result.label}: {len(failed)} of {len(result.runs)} runs did not succeed: "
            + ", ".join(f"{r.run_id[:8]} {r.status}" for r in failed[:5])
            + f"; the first: {failed[0].failure or '(no failure event)'}"
        )
    expected_runs = math.ceil(n / per_run) if per_run > 0 else 1
    if len(result.runs) != expected_runs:
        problems.append(f"{result.label}: {len(result.runs)} runs, expected {expected_runs}")
    if sum(r.partitions for r in result.runs) != n:
        problems.append(
            f"{result.label}: the runs cover {sum(r.partitions for r in result.runs)} "
            f"partitions, expected {n}"
        )
    if result.materializations != 3 * n:
        problems.append(
            f"{result.label}: {result.materializations} materializations, expected {3 * n}"
        )


# --- the no-op location on the same cluster -------------------------------------------------------


def serve_noop(cluster: Any, workdir: Path) -> None:
    """Redeploy the control host's code: its code server now serves ``noop_defs`` under the
    same location name, the webserver reloads the location and the daemon restarts (so that
    its workspace is the new one before the backfill daemon plans a run)."""
    from policy_pipeline_tests.harness.cluster import DEPLOY_DIR

    env = {
        **cluster.env,
        "DAGSTER_HOME": str(workdir / "hosts" / CONTROL / "dagster_home"),
        "DAGSTER_CODE_SERVER_HOST": "127.0.0.1",
        "DAGSTER_CODE_SERVER_PORT": str(CODE_SERVER_PORT),
        "DAGSTER_WEBSERVER_HOST": cluster.hosts.hosts[CONTROL].address,
        "DAGSTER_WEBSERVER_PORT": str(WEBSERVER_PORT),
    }
    for script in ("start-daemon.sh", "start-code-server.sh"):
        proc = cluster.processes.pop(f"{CONTROL}/{script}")  # stopped on purpose
        proc.stop(timeout=30)
    dagster = str(Path(sys.executable).parent / "dagster")
    command = [
        *(dagster, "code-server", "start", "-m", "bench.cluster", "-a", "noop_defs"),
        *("--location-name", "policy_pipeline", "--host", "127.0.0.1"),
        *("--port", str(CODE_SERVER_PORT)),
    ]
    cluster.processes[f"{CONTROL}/noop-code-server"] = cluster.hosts.spawn(
        CONTROL, command, env, "noop-code-server"
    )

    def noop_loaded() -> bool:
        result = cluster.graphql(RELOAD_LOCATION)["reloadRepositoryLocation"]
        if result.get("loadStatus") != "LOADED":
            return False
        # The no-op repository has no sensors or schedules; the product's has several.
        return _no_automation(cluster)

    try:
        cluster.wait_for("the no-op code location", noop_loaded, SWAP_TIMEOUT_SECONDS)
    except AssertionError as exc:
        raise BenchError(f"no-op location: {str(exc)[:6000]}") from exc
    restarted = time.time()
    cluster.processes[f"{CONTROL}/start-daemon.sh"] = cluster.hosts.spawn(
        CONTROL, ["bash", str(DEPLOY_DIR / "start-daemon.sh")], env, "start-daemon.sh.noop"
    )
    wait_daemon(cluster, since=restarted)


def wait_daemon(cluster: Any, since: float = 0.0) -> None:
    """Wait for the backfill daemon's first heartbeat after `since`: a backfill launched before
    the daemon runs would count the daemon's start-up as the backfill's time."""

    def beating() -> bool:
        beats = cluster.instance.get_daemon_heartbeats().values()
        return any(b.daemon_type == "BACKFILL" and b.timestamp > since for b in beats)

    try:
        cluster.wait_for("the daemon's backfill heartbeat", beating, SWAP_TIMEOUT_SECONDS)
    except AssertionError as exc:
        raise BenchError(f"the daemon: {str(exc)[:6000]}") from exc


def _no_automation(cluster: Any) -> bool:
    from policy_pipeline_tests.harness.cluster import AUTOMATION_QUERY, LOCATION, REPOSITORY

    selector = {"repositoryName": REPOSITORY, "repositoryLocationName": LOCATION}
    repository = cluster.graphql(AUTOMATION_QUERY, {"selector": selector})["repositoryOrError"]
    return bool(
        repository.get("__typename") == "Repository"
        and not repository["sensors"]
        and not repository["schedules"]
    )


# --- one cluster ----------------------------------------------------------------------------------


@dataclass
class ClusterResult:
    workers: int
    n: int
    product: Backfill | None = None
    noop: Backfill | None = None
    calls: dict[str, float] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)


def write_catalog(directory: Path, n: int) -> list[str]:
    import yaml

    from bench.benchlib import make_policies

    directory.mkdir()
    names = []
    for policy in make_policies(n, "cluster"):
        path = directory / f"{policy.policy_name}.yaml"
        path.write_text(yaml.safe_dump(policy.model_dump(), sort_keys=False), encoding="utf-8")
        names.append(policy.policy_name)
    return sorted(names)


def host_env(args: argparse.Namespace) -> dict[str, str]:
    """What every host gets besides the layout's own environment (the harness's)."""
    from bench.e2e import poll_cap, poll_deadline, poll_initial

    env = {
        PER_RUN_ENV: str(args.per_run),
        "POLICY_API_MAX_CONCURRENCY": str(args.concurrency),
        "POLICY_API_POOL_LIMIT": str(args.pool_limit),
        "POLICY_WORKER_CONCURRENCY": str(args.worker_concurrency),
        "POLICY_POLL_INITIAL_INTERVAL_SECONDS": f"{poll_initial(args):g}",
        "POLICY_POLL_MAX_INTERVAL_SECONDS": f"{poll_cap(args):g}",
        "POLICY_POLL_DEADLINE_SECONDS": f"{poll_deadline(args):g}",
    }
    if args.event_batch_size > 0:
        env[EVENT_BATCH_ENV] = str(args.event_batch_size)
    return env


def measure(workers: int, args: argparse.Namespace, workdir: Path) -> ClusterResult:
    from bench.e2e import api_calls, check_simulator
    from policy_devtools.simulator import SimulatorConfig
    from policy_pipeline_tests.harness.cluster import celery_cluster

    result = ClusterResult(workers, args.n)
    names = write_catalog(workdir / "policies", args.n)
    simulator = SimulatorConfig(
        latency_ms=args.latency_ms, ready_after_seconds=args.ready_seconds, ready_after_polls=0
    )
    print(f"[{workers} worker host(s)] starting the cluster ...", flush=True)
    started = time.monotonic()
    with celery_cluster(
        workdir, workdir / "policies", simulator, workers=workers, env=host_env(args)
    ) as cluster:
        print(f"[{workers} worker host(s)] cluster up in {time.monotonic() - started:.0f} s",
              flush=True)  # fmt: skip
        hosts = [*cluster.workers, CONTROL, SERVICES]
        # As the catalog sensor registers them, in name order.
        cluster.instance.add_dynamic_partitions(PARTITIONS_NAME, names)
        wait_daemon(cluster)
        label = f"{workers} worker(s), product"
        result.product = timed_backfill(cluster, label, names, hosts, args.backfill_timeout)
        check_backfill(result.product, args.n, args.per_run, result.problems)
        if result.problems:
            return result  # the product's backfill went wrong: nothing to compare NOOP with
        counts = cluster.services.api_counts()
        result.calls = api_calls(counts, args.n)
        check_simulator(counts, args.n, args.n, result.problems)
        statuses = Counter(
            str(status)
            for (status,) in cluster.query('SELECT "status" FROM policy_execution_state')
        )
        if statuses != Counter({"completed": args.n}):
            result.problems.append(
                f"{label}: executions {dict(statuses)}; expected {args.n} completed"
            )
        if args.noop:
            serve_noop(cluster, workdir)
            label = f"{workers} worker(s), NOOP"
            result.noop = timed_backfill(cluster, label, names, hosts, args.backfill_timeout)
            check_backfill(result.noop, args.n, args.per_run, result.problems)
            after = cluster.services.api_counts()["requests"]
            if after != counts["requests"]:
                result.problems.append(f"{label}: the no-op backfill called the Policy API")
        leftovers_of = cluster.hosts
    if left := leftovers_of.leftovers():
        result.problems.append(f"left on the machine after the cluster: {left}")
    return result


# --- output ---------------------------------------------------------------------------------------


def settings_line(args: argparse.Namespace) -> str:
    from bench.e2e import poll_cap, poll_deadline, poll_initial

    batch = str(args.event_batch_size) if args.event_batch_size > 0 else "unset"
    return (
        f"settings: N={args.n}, runs of at most {args.per_run} partitions "
        f"({PER_RUN_ENV}), worker hosts {args.workers}, worker concurrency "
        f"{args.worker_concurrency} run(s) per host (POLICY_WORKER_CONCURRENCY), "
        f"{EVENT_BATCH_ENV}={batch} on every host; L={args.latency_ms:g} ms, "
        f"R={args.ready_seconds:g} s, C={args.concurrency} per run "
        f"(POLICY_API_MAX_CONCURRENCY), policy_api pool limit {args.pool_limit} steps; polling: "
        f"initial {poll_initial(args):g} s, cap {poll_cap(args):g} s, deadline "
        f"{poll_deadline(args):g} s; Dagster storage PostgreSQL, broker Redis, warehouse "
        "fakesnow, all in the services host; deploy/celery/dagster.yaml unchanged; every host "
        "a set of Linux namespaces on this one machine"
    )


def memory_rows(result: Backfill, hosts: Sequence[str], label: str) -> list[tuple[str, object]]:
    rows: list[tuple[str, object]] = []
    for host in hosts:
        peak = result.memory.get(host)
        if peak is not None:
            rows.append(
                (
                    f"{label}peak memory of {host} MB: RSS sum / PSS sum (processes)",
                    f"{peak.rss_mb:,.0f} / {peak.pss_mb:,.0f} ({peak.processes})",
                )
            )
    return rows


def print_result(result: ClusterResult) -> None:
    from bench.benchlib import print_table
    from policy_devtools.simulator import ENDPOINTS

    product, noop = result.product, result.noop
    if product is None:
        return
    workers = [f"worker-{i}" for i in range(1, result.workers + 1)]
    rows: list[tuple[str, object]] = [
        ("policies N", result.n),
        ("runs (succeeded / all)", _runs_text(product)),
        ("wall seconds (launch -> backfill done)", product.wall),
        ("policies per second", result.n / product.wall),
        ("  launch -> first run started s", product.first_start),
        ("  launch -> last run ended s", product.last_end),
        ("NOOP seconds (no-op backfill, same keys/partitions/runs)", noop and noop.wall),
        ("wall - NOOP seconds", noop and product.wall - noop.wall),
        ("  NOOP: launch -> first run started s", noop and noop.first_start),
        ("  NOOP: launch -> last run ended s", noop and noop.last_end),
        *memory_rows(product, workers, ""),
        *(memory_rows(noop, workers, "NOOP: ") if noop else []),
        *memory_rows(product, [CONTROL, SERVICES], ""),
        ("API calls per policy", result.calls.get("all")),
        *((f"  {e} per policy", result.calls.get(e)) for e in ENDPOINTS),
    ]
    print_table(
        f"Backfill on a Celery cluster, N={result.n}, {result.workers} worker host(s)",
        ["figure", "value"],
        rows,
    )
    run_rows = [
        (label, r.run_id[:8], r.host, r.partitions, r.status, r.start, r.end,
         None if r.start is None or r.end is None else r.end - r.start)
        for label, backfill in (("product", product), ("NOOP", noop)) if backfill is not None
        for r in backfill.runs
    ]  # fmt: skip
    print_table(
        "Runs (seconds after the backfill's launch)",
        ["backfill", "run", "host", "partitions", "status", "started", "ended", "run s"],
        run_rows,
    )


def _runs_text(backfill: Backfill) -> str:
    ok = sum(r.status == DagsterRunStatus.SUCCESS.value for r in backfill.runs)
    return f"{ok} / {len(backfill.runs)}"


def print_summary(results: Sequence[ClusterResult]) -> None:
    from bench.benchlib import print_table

    rows = []
    for result in results:
        product, noop = result.product, result.noop
        if product is None:
            continue
        workers = [f"worker-{i}" for i in range(1, result.workers + 1)]
        peaks = " / ".join(
            f"{product.memory[w].rss_mb:,.0f}" for w in workers if w in product.memory
        )
        rows.append(
            (
                result.workers,
                result.n,
                product.wall,
                result.n / product.wall,
                noop and noop.wall,
                noop and product.wall - noop.wall,
                peaks,
                result.calls.get("all"),
            )
        )
    print_table(
        "Summary: multi-run backfill on Celery worker hosts",
        ["worker hosts", "N", "wall s", "policies/s", "NOOP s", "wall - NOOP s",
         "peak RSS MB per worker host", "API calls/policy"],
        rows,
    )  # fmt: skip


# --- main -----------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="A multi-run backfill of N policies on a Celery cluster of test hosts "
        "(Linux namespaces), on 1 and on 2 worker hosts: wall time, policies per second, peak "
        "memory per worker host, API calls per policy, and the no-op backfill's time (NOOP).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--n", type=int, default=2000, help="policies N")
    parser.add_argument(
        "--per-run", type=int, default=500, help=f"partitions per run ({PER_RUN_ENV})"
    )
    parser.add_argument("--workers", default="1,2", help="worker host counts, one cluster each")
    parser.add_argument(
        "--worker-concurrency", type=int, default=1, help="runs at once per worker host"
    )
    parser.add_argument(
        "--event-batch-size", type=int, default=1000, help=f"{EVENT_BATCH_ENV} (0: unset)"
    )
    parser.add_argument("--latency-ms", type=float, default=50.0, help="per-call latency L")
    parser.add_argument("--ready-seconds", type=float, default=2.0, help="readiness time R")
    parser.add_argument(
        "--concurrency", type=int, default=16, help="C = POLICY_API_MAX_CONCURRENCY (per run)"
    )
    parser.add_argument(
        "--pool-limit", type=int, default=2, help="POLICY_API_POOL_LIMIT: workflow steps at once"
    )
    parser.add_argument("--poll-initial", type=float, default=None, help="default R/2")
    parser.add_argument("--poll-max-interval", type=float, default=None, help="default 2")
    parser.add_argument("--poll-deadline", type=float, default=None, help="default 900")
    parser.add_argument("--poll-multiplier", type=float, default=None)
    parser.add_argument(
        "--no-noop", dest="noop", action="store_false", help="skip the no-op backfill (NOOP)"
    )
    parser.add_argument(
        "--backfill-timeout", type=float, default=1800.0, help="give up on a backfill after s"
    )
    parser.add_argument("--keep", action="store_true", help="keep the hosts' logs (not the hosts)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.uneven = False  # bench.e2e's polling defaults read it
    try:
        counts = [int(w) for w in str(args.workers).split(",") if w.strip()]
    except ValueError:
        counts = []
    if not counts or min(counts) < 1 or args.n < 1 or args.per_run < 1:
        print("error: --workers needs counts >= 1, --n and --per-run >= 1", file=sys.stderr)
        return 2
    from bench.benchlib import machine_line
    from policy_pipeline_tests.harness.hosts import unavailable_reason

    if (reason := unavailable_reason()) is not None:
        print(f"error: no test hosts here: {reason}", file=sys.stderr)
        return 2
    print(machine_line())
    print(settings_line(args), flush=True)
    # SIGTERM ends the script as Ctrl-C does, through the harness's clean-up.
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    results: list[ClusterResult] = []
    problems: list[str] = []
    for workers in counts:
        workdir = Path(tempfile.mkdtemp(prefix=f"bench-cluster-{workers}-"))
        try:
            result = measure(workers, args, workdir)
        except (BenchError, AssertionError, RuntimeError) as exc:
            # The harness's own failures (HostsError is a RuntimeError): a cluster that did not
            # come up, a process that exited; the harness has removed everything already.
            problems.append(f"{workers} worker host(s): {type(exc).__name__}: {str(exc)[:6000]}")
            continue
        finally:
            if args.keep:
                print(f"(kept {workdir})")
            else:
                shutil.rmtree(workdir, ignore_errors=True)
        results.append(result)
        print_result(result)
        problems += result.problems
    print_summary(results)
    if problems:
        print("\nThe run went wrong (figures are not valid):")
        for problem in problems:
            print(f"  - {problem}")
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
