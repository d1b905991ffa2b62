"""Throughput of the batch engine: N policies through create -> ready -> circuit breaker.

Drives `PolicyWorkflow` directly (no Dagster run) against the Policy API simulator (in its own
process, as the real API is another service; ``--simulator thread`` runs it in this one) with a
per-call latency L and a readiness time R, at most C calls in flight, with its state in
a temporary DuckDB file or on a local fakesnow server. Prints the wall time against a lower
bound implied by L, R and C, API calls and warehouse statements per policy and per step, and
peak memory; then runs the seeds' sequential workflow (``bench/sequential.py``) over a few
policies against the same simulator configuration and prints the speed-up per policy.

    .venv/bin/python bench/throughput.py                       # N=1000, DuckDB
    .venv/bin/python bench/throughput.py --warehouse snowflake  # the same on fakesnow
    .venv/bin/python bench/throughput.py --compare-n 100,1000   # statements per step vs N

Exit status: 0 all targets met, 1 a target missed (0 with --no-targets), 2 the run itself
went wrong (a policy did not complete, a duplicate at the API).
"""

from __future__ import annotations

import argparse
import inspect
import math
import secrets
import sys
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field

from benchlib import (
    SIMULATOR_MODES,
    WAREHOUSES,
    QuietLog,
    StatementCounter,
    Targets,
    machine_line,
    make_policies,
    open_warehouse,
    peak_rss_mb,
    policy_api,
    print_table,
    process_peak_rss_mb,
    stopwatch,
    timing_renders,
    workdir,
)
from sequential import SequentialResult, run_baseline

from policy_pipeline.api_client import PolicyApiResource
from policy_pipeline.simulator import ENDPOINTS, SimulatorConfig
from policy_pipeline.workflow import (
    FLUSH_PARTS,
    LeasePolicy,
    PolicyWorkflow,
    PollingPolicy,
    StepReport,
)

STEPS = ("create", "ready", "circuit")
TARGET_N = 1000  # the wall-time and memory targets are set for 1,000 policies


@dataclass
class RunResult:
    n: int
    warehouse: str
    wall: float
    step_seconds: dict[str, float]
    lower_bound: float
    naive_bound: float
    requests: dict[str, int]
    statements: dict[str, int]
    sessions: dict[str, int]
    connect_seconds: dict[str, float]
    statement_seconds: dict[str, float]
    render_seconds: dict[str, float]
    cpu_seconds: dict[str, float]
    kinds: dict[str, dict[str, int]]
    kind_seconds: dict[str, dict[str, float]]
    peak_rss_mb: float
    fakesnow_peak_mb: float | None
    problems: list[str] = field(default_factory=list)

    @property
    def ratio(self) -> float:
        return self.wall / self.lower_bound


def lower_bounds(n: int, latency: float, ready: float, concurrency: int) -> tuple[float, float]:
    """(tight, naive) lower bounds on the wall time; see bench/README.md.

    With at most C calls in flight, each taking at least L, a step of N calls takes at least
    W = ceil(N/C) * L. The steps run one after the other (they are three assets). Step 2 cannot
    end before the last policy, created at the end of step 1, is ready R later, nor before its N
    polls are made: max(W, R). Tight bound: W + max(W, R) + W. The naive bound adds R to three
    full waves, W + R + W + W, as if no poll could overlap the wait for readiness.
    """
    wave = math.ceil(n / concurrency) * latency
    return 2 * wave + max(wave, ready), 3 * wave + ready


def polling_policy(args: argparse.Namespace) -> PollingPolicy:
    initial = args.ready_seconds / 2 if args.poll_initial is None else args.poll_initial
    return PollingPolicy(
        initial_interval_seconds=initial,
        max_interval_seconds=max(initial, args.poll_max_interval),
        backoff_multiplier=args.poll_multiplier,
        max_polls=args.max_polls,
        deadline_seconds=args.poll_deadline,
    )


def run_batch(n: int, args: argparse.Namespace) -> RunResult:
    key = secrets.token_hex(16)
    config = SimulatorConfig(
        api_key=key,
        latency_ms=args.latency_ms,
        ready_after_seconds=args.ready_seconds,
        ready_after_polls=0,
    )
    policies = make_policies(n, f"tp{secrets.token_hex(2)}")
    names = [p.policy_name for p in policies]
    counter = StatementCounter()
    problems: list[str] = []
    log = QuietLog()
    with (
        workdir("bench-throughput-") as tmp,
        open_warehouse(args.warehouse, tmp, counter) as handle,
        policy_api(config, args.simulator) as sim,
        timing_renders(counter),
    ):
        api = PolicyApiResource(
            endpoint=sim.base_url,
            api_key=key,
            timeout_seconds=30.0,
            max_concurrent_requests=args.concurrency,
        )
        with api.process_config_and_initialize_cm() as client:
            store = handle.store(run_id=f"bench-{uuid.uuid4()}")
            workflow = PolicyWorkflow(
                store=store,
                api=client,
                owner=f"bench:{uuid.uuid4()}",
                log=log,
                lease=LeasePolicy(),
                concurrency=args.concurrency,
                flush_seconds=args.flush_seconds,
                flush_rows=args.flush_rows,
            )
            polling = polling_policy(args)
            seconds: dict[str, float] = {}
            cpu: dict[str, float] = {}
            reports: dict[str, StepReport] = {}
            total = stopwatch()
            for step in STEPS:
                counter.set_phase(step)
                elapsed = stopwatch()
                cpu_started = time.process_time()
                if step == "create":
                    reports[step] = workflow.create_policies(policies)
                elif step == "ready":
                    reports[step] = workflow.wait_until_ready(names, polling)
                else:
                    reports[step] = workflow.activate_circuit_breakers(names)
                seconds[step] = elapsed()
                cpu[step] = time.process_time() - cpu_started
            wall = total()
            counter.set_phase("verify")
        for step, report in reports.items():
            if report.failures:
                sample = next(iter(report.failures.items()))
                problems.append(f"step {step}: {len(report.failures)} failed, e.g. {sample}")
        completed = handle.query(
            "SELECT COUNT(*) FROM policy_execution_state WHERE \"status\" = 'completed'"
        )[0][0]
        if completed != n:
            problems.append(f"{completed} of {n} executions completed")
        counts = sim.counts()
        if counts["policies_created"] != n or counts["circuits_triggered"] != n:
            problems.append(
                f"simulator: {counts['policies_created']} policies created and "
                f"{counts['circuits_triggered']} circuits triggered for {n} policies"
            )
        fakesnow_peak = process_peak_rss_mb(handle.fakesnow_pid) if handle.fakesnow_pid else None
    tight, naive = lower_bounds(n, args.latency_ms / 1000, args.ready_seconds, args.concurrency)
    return RunResult(
        n=n,
        warehouse=args.warehouse,
        wall=wall,
        step_seconds=seconds,
        lower_bound=tight,
        naive_bound=naive,
        requests={e: int(counts["requests"][e]) for e in ENDPOINTS},
        statements={s: counter.get(s).total for s in STEPS},
        sessions={s: counter.get(s).sessions for s in STEPS},
        connect_seconds={s: counter.get(s).connect_seconds for s in STEPS},
        statement_seconds={s: counter.get(s).statement_seconds for s in STEPS},
        render_seconds={s: counter.get(s).render_seconds for s in STEPS},
        cpu_seconds=cpu,
        kinds={s: dict(counter.get(s).statements) for s in STEPS},
        kind_seconds={s: dict(counter.get(s).kind_seconds) for s in STEPS},
        peak_rss_mb=peak_rss_mb(),
        fakesnow_peak_mb=fakesnow_peak,
        problems=problems,
    )


def run_sequential(args: argparse.Namespace) -> SequentialResult:
    key = secrets.token_hex(16)
    config = SimulatorConfig(
        api_key=key,
        latency_ms=args.latency_ms,
        ready_after_seconds=args.ready_seconds,
        ready_after_polls=0,
    )
    interval = args.ready_seconds if args.sequential_interval is None else args.sequential_interval
    counter = StatementCounter()
    with (
        workdir("bench-seq-") as tmp,
        open_warehouse(args.warehouse, tmp, counter) as handle,
        policy_api(config, args.simulator) as sim,
    ):
        return run_baseline(
            handle, sim.base_url, key, args.sequential_n, interval, args.sequential_max_polls
        )


def print_run(result: RunResult, args: argparse.Namespace) -> None:
    n = result.n
    rows: list[tuple[str, object]] = [
        ("policies N", n),
        ("wall seconds (3 steps)", result.wall),
        *((f"  step {s} seconds", result.step_seconds[s]) for s in STEPS),
        ("lower bound seconds: W + max(W, R) + W", result.lower_bound),
        ("wall / lower bound", result.ratio),
        ("naive bound seconds: W + R + W + W", result.naive_bound),
        ("wall / naive bound", result.wall / result.naive_bound),
        ("seconds per policy", result.wall / n),
        ("API calls per policy", sum(result.requests.values()) / n),
        *((f"  {e} per policy", result.requests[e] / n) for e in ENDPOINTS),
        ("statements per policy", sum(result.statements.values()) / n),
        ("connections (sessions) per policy", sum(result.sessions.values()) / n),
        ("process CPU seconds (user+sys, 3 steps)", sum(result.cpu_seconds.values())),
        ("peak RSS MB (ru_maxrss, whole process)", result.peak_rss_mb),
    ]
    if result.fakesnow_peak_mb is not None:
        rows.append(("fakesnow server peak RSS MB (VmHWM)", result.fakesnow_peak_mb))
    print_table(f"Batch engine, N={n}, warehouse {result.warehouse}", ["figure", "value"], rows)
    step_rows = [
        (
            s,
            result.step_seconds[s],
            result.cpu_seconds[s],
            result.statements[s],
            result.sessions[s],
            result.connect_seconds[s],
            result.statement_seconds[s],
            result.render_seconds[s],
        )
        for s in STEPS
    ]
    print_table(
        f"Time and warehouse work per step, N={n} (seconds; 'statement' includes 'render', the "
        "sqlglot translation; CPU is this process's user+sys, simulator threads included)",
        ["step", "wall", "CPU", "statements", "sessions", "connect", "statement", "render"],
        step_rows,
    )
    kinds = sorted({k for s in STEPS for k in result.kinds[s]})
    print_table(
        f"Statements by kind and step, N={n}: count, and seconds spent in them",
        ["statement", *STEPS, *(f"{s} s" for s in STEPS)],
        [
            (
                k,
                *(result.kinds[s].get(k, 0) for s in STEPS),
                *(result.kind_seconds[s].get(k, 0.0) for s in STEPS),
            )
            for k in kinds
        ],
    )


def print_comparison(results: Sequence[RunResult]) -> None:
    headers = ["step"]
    for r in results:
        headers += [f"N={r.n} stmts", f"N={r.n} sessions", f"N={r.n} seconds"]
    rows = []
    for s in STEPS:
        row: list[object] = [s]
        for r in results:
            row += [r.statements[s], r.sessions[s], r.step_seconds[s]]
        rows.append(row)
    total: list[object] = ["all steps"]
    for r in results:
        total += [sum(r.statements.values()), sum(r.sessions.values()), r.wall]
    rows.append(total)
    print_table("Statements per step vs N (side by side)", headers, rows)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Throughput of PolicyWorkflow against the local simulator, with a lower "
        "bound, API calls and statements per policy/step, peak memory, and the speed-up over "
        "the seeds' sequential workflow.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--n", type=int, default=1000, help="policies N")
    parser.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="runs per N; the figures and targets are those of the median run (by wall time)",
    )
    parser.add_argument("--latency-ms", type=float, default=50.0, help="per-call latency L")
    parser.add_argument("--ready-seconds", type=float, default=2.0, help="readiness time R")
    parser.add_argument("--concurrency", type=int, default=16, help="calls in flight C")
    parser.add_argument("--warehouse", choices=WAREHOUSES, default="duckdb")
    parser.add_argument(
        "--compare-n",
        help="comma-separated N values (e.g. 100,1000): one run each, statements per step "
        "side by side, and the target that they do not grow with N",
    )
    polling = parser.add_argument_group("polling (step 2)")
    polling.add_argument(
        "--poll-initial",
        type=float,
        default=None,
        help="initial interval (default R/2: with equal jitter each wait is R/4..R/2)",
    )
    polling.add_argument("--poll-multiplier", type=float, default=1.0, help="backoff multiplier")
    polling.add_argument("--poll-max-interval", type=float, default=30.0)
    polling.add_argument("--max-polls", type=int, default=60)
    polling.add_argument("--poll-deadline", type=float, default=900.0)
    parser.add_argument(
        "--simulator",
        choices=SIMULATOR_MODES,
        default="process",
        help="where the Policy API simulator runs: its own process, or a thread of this one",
    )
    defaults = inspect.signature(PolicyWorkflow).parameters
    parser.add_argument(
        "--flush-seconds",
        type=float,
        default=defaults["flush_seconds"].default,
        help="PolicyWorkflow: write results at least this often (default: the engine's)",
    )
    parser.add_argument(
        "--flush-rows",
        type=int,
        default=defaults["flush_rows"].default,
        help="PolicyWorkflow: ... or once this many answers are pending (default: the engine's)",
    )
    seq = parser.add_argument_group("sequential baseline")
    seq.add_argument("--sequential-n", type=int, default=20, help="policies (0: skip)")
    seq.add_argument(
        "--sequential-interval",
        type=float,
        default=None,
        help="fixed poll interval (default R, the most favourable fixed interval)",
    )
    seq.add_argument("--sequential-max-polls", type=int, default=3, help="the seed's maximum")
    targets = parser.add_argument_group("targets")
    targets.add_argument("--no-targets", action="store_true", help="only print; exit 0")
    targets.add_argument("--max-ratio", type=float, default=1.5, help="wall / lower bound")
    targets.add_argument("--max-rss-mb", type=float, default=500.0, help="at N >= 1000")
    targets.add_argument("--min-speedup", type=float, default=20.0, help="per policy")
    targets.add_argument(
        "--max-statement-growth",
        type=float,
        default=2.0,
        help="statements per step at the largest N / at the smallest N (with --compare-n)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    print(machine_line())
    sizes = [int(x) for x in args.compare_n.split(",")] if args.compare_n else [args.n]
    sizes = sorted(set(sizes))
    polling = polling_policy(args)
    print(
        f"settings: L={args.latency_ms:g} ms, R={args.ready_seconds:g} s, C={args.concurrency}, "
        f"warehouse {args.warehouse}, simulator in a {args.simulator}; results written in "
        f"{FLUSH_PARTS} parts per step, at most {args.flush_rows} answers and "
        f"{args.flush_seconds:g} s apart; polling: initial "
        f"{polling.initial_interval_seconds:g} s, x{polling.backoff_multiplier:g}, max interval "
        f"{polling.max_interval_seconds:g} s, max {polling.max_polls} polls, deadline "
        f"{polling.deadline_seconds:g} s (waits have equal jitter: interval/2 .. interval)"
    )
    results: list[RunResult] = []
    for n in sizes:
        runs = sorted((run_batch(n, args) for _ in range(args.repeat)), key=lambda r: r.wall)
        result = runs[len(runs) // 2]  # the median run: the machine is shared, walls vary
        results.append(result)
        if len(runs) > 1:
            walls = ", ".join(f"{r.wall:.2f}" for r in runs)
            print(f"\nN={n}: {len(runs)} runs, wall seconds {walls}; the median run follows")
        print_run(result, args)
        result.problems.extend(p for r in runs if r is not result for p in r.problems)
    if len(results) > 1:
        print_comparison(results)
    sequential = run_sequential(args) if args.sequential_n > 0 else None

    targets = Targets()
    for r in results:
        if r.n < TARGET_N:
            # Informational: with few policies the bound is mostly R, and a poll finds a policy
            # ready up to one poll interval after it became so.
            print(f"N={r.n}: wall {r.wall:.2f} s = {r.ratio:.2f} x the lower bound (no target)")
            continue
        targets.check(
            f"wall <= {args.max_ratio:g} x lower bound (N={r.n}, {r.warehouse})",
            f"{r.wall:.2f} s = {r.ratio:.2f} x {r.lower_bound:.2f} s",
            f"<= {args.max_ratio * r.lower_bound:.2f} s",
            r.ratio <= args.max_ratio,
        )
    largest = results[-1]
    if largest.n >= TARGET_N:
        targets.check(
            f"peak memory (N={largest.n}, ru_maxrss)",
            f"{largest.peak_rss_mb:.0f} MB",
            f"< {args.max_rss_mb:g} MB",
            largest.peak_rss_mb < args.max_rss_mb,
        )
    if len(results) > 1:
        small = results[0]
        for s in STEPS:
            growth = largest.statements[s] / max(1, small.statements[s])
            targets.check(
                f"statements of step {s} independent of N",
                f"{small.statements[s]} at N={small.n}, {largest.statements[s]} at "
                f"N={largest.n} ({growth:.2f}x for {largest.n / small.n:g}x N)",
                f"<= {args.max_statement_growth:g}x",
                growth <= args.max_statement_growth,
            )
    if sequential is not None:
        batch_per_policy = largest.wall / largest.n
        speedup = sequential.per_policy_seconds / batch_per_policy
        print_table(
            f"Per policy: sequential seed workflow ({sequential.policies} policies) vs batch "
            f"engine (N={largest.n})",
            ["figure", "sequential", "batch"],
            [
                ("seconds per policy", sequential.per_policy_seconds, batch_per_policy),
                ("API calls per policy", sequential.api_calls / sequential.policies, None),
                ("statements per policy", sequential.statements / sequential.policies, None),
                ("completed", sequential.completed, largest.n),
                ("speed-up per policy", None, speedup),
            ],
        )
        targets.check(
            "speed-up per policy over the sequential workflow",
            f"{speedup:.1f}x",
            f">= {args.min_speedup:g}x",
            speedup >= args.min_speedup,
        )
    targets.print()
    problems = [f"N={r.n}: {p}" for r in results for p in r.problems]
    if sequential is not None and sequential.completed != sequential.policies:
        problems.append(f"sequential: {sequential.completed} of {sequential.policies} completed")
    if problems:
        print("\nThe run went wrong (figures are not valid):")
        for p in problems:
            print(f"  - {p}")
        return 2
    return targets.exit_code(enforce=not args.no_targets)


if __name__ == "__main__":
    sys.exit(main())
