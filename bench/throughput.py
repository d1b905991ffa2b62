"""Throughput of the workflow engine alone: N policies through create -> ready -> circuit breaker.

Engine only (no Dagster run): one call of `PolicyWorkflow.run` over all N policies, the way the
``policy_workflow`` asset step calls it, but without Dagster around it (no run, no event log, no
materializations). Each policy goes create -> poll -> circuit breaker on its own within that one
run, with at most C API calls in flight in all and one writer committing the state in batches
at most ``--flush-seconds`` apart.

The Policy API simulator runs in its own process (the real API is another service;
``--simulator thread`` runs it in this one) with a per-call latency L and a readiness time R;
the state lives in a temporary DuckDB file or on a local fakesnow server. Prints the wall time
against the lower bound implied by N, L, R and C, API calls per policy, warehouse statements and
connections per run, and peak memory; then runs the seeds' sequential workflow
(``bench/sequential.py``) over a few policies against the same simulator configuration and
prints the speed-up per policy.

    .venv/bin/python -m bench.throughput                       # N=1000, DuckDB
    .venv/bin/python -m bench.throughput --warehouse snowflake  # the same on fakesnow
    .venv/bin/python -m bench.throughput --compare-n 100,1000   # statements per run vs N

Exit status: 0 all targets met (or only printed, with --no-targets), 1 a target missed, 2 the
run itself went wrong (a policy did not complete, or the simulator saw a duplicate create or
circuit trigger): its figures are not valid, whatever --no-targets says.
"""

from __future__ import annotations

import argparse
import inspect
import secrets
import sys
import threading
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field

from bench.benchlib import (
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
from bench.sequential import SequentialResult, run_baseline
from policy_devtools.simulator import ENDPOINTS, SimulatorConfig
from policy_pipeline.core.domain import STEPS
from policy_pipeline.core.engine.steps import Progress
from policy_pipeline.core.engine.workflow import PolicyWorkflow
from policy_pipeline.core.settings import LeaseSettings, PollingSettings
from policy_pipeline.resources.policy_api import PolicyApiResource

TARGET_N = 1000  # the wall-time and memory targets are set for 1,000 policies
PHASE = "run"  # the statement counter's phase for the engine's run
TITLE = "Engine only (no Dagster run)"


@dataclass
class RunResult:
    n: int
    warehouse: str
    wall: float
    limit: float
    completed: int
    requests: dict[str, int]
    statements: int
    sessions: int
    connect_seconds: float
    statement_seconds: float
    render_seconds: float
    cpu_seconds: float
    kinds: dict[str, int]
    kind_seconds: dict[str, float]
    # Seconds from the start of the run until the first / the last policy passed each step.
    first_passed: dict[str, float]
    last_passed: dict[str, float]
    peak_rss_mb: float
    fakesnow_peak_mb: float | None
    problems: list[str] = field(default_factory=list)

    @property
    def ratio(self) -> float:
        return self.wall / self.limit

    @property
    def api_calls(self) -> int:
        return sum(self.requests.values())


def lower_bound(n: int, latency: float, ready: float, concurrency: int) -> float:
    """LIMIT = max(3·N·L/C, R + 3·L), a lower bound on the wall time; see bench/README.md.

    Every policy needs at least three calls (create, a poll that finds it ready, circuit
    breaker), each taking at least L, with at most C in flight: 3·N·L/C. And no policy can
    finish before its create call, R of readiness, the poll that sees it ready and its circuit
    call: R + 3·L.
    """
    return max(3 * n * latency / concurrency, ready + 3 * latency)


def polling_policy(args: argparse.Namespace) -> PollingSettings:
    initial = args.ready_seconds / 2 if args.poll_initial is None else args.poll_initial
    return PollingSettings(
        initial_interval_seconds=initial,
        max_interval_seconds=max(initial, args.poll_max_interval),
        backoff_multiplier=args.poll_multiplier,
        max_polls=args.max_polls,
        deadline_seconds=args.poll_deadline,
    )


class StepClock:
    """``on_progress``: when the first and the last policy passed each step, and failures."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.started = time.perf_counter()
        self.first: dict[str, float] = {}
        self.last: dict[str, float] = {}
        self.failed = 0

    def __call__(self, progress: Progress) -> None:
        now = time.perf_counter() - self.started
        with self._lock:
            if progress.outcome is None:
                self.failed += 1
                return
            self.first.setdefault(progress.step, now)
            self.last[progress.step] = now


def run_batch(n: int, args: argparse.Namespace) -> RunResult:
    key = secrets.token_hex(16)
    config = SimulatorConfig(
        api_key=key,
        latency_ms=args.latency_ms,
        ready_after_seconds=args.ready_seconds,
        ready_after_polls=0,
    )
    policies = make_policies(n, f"tp{secrets.token_hex(2)}")
    definitions = {p.policy_name: p for p in policies}
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
            max_concurrency=args.concurrency,
        )
        with api.process_config_and_initialize_cm() as client:
            store = handle.store(run_id=f"bench-{uuid.uuid4()}")
            workflow = PolicyWorkflow(
                store=store,
                api=client.get_client(),
                owner=f"bench:{uuid.uuid4()}",
                log=log,
                lease=LeaseSettings(),
                max_concurrency=args.concurrency,
                flush_seconds=args.flush_seconds,
            )
            polling = polling_policy(args)
            counter.set_phase(PHASE)
            clock = StepClock()
            total = stopwatch()
            cpu_started = time.process_time()
            report = workflow.run(
                list(definitions),
                STEPS,
                definitions=definitions,
                polling=polling,
                on_progress=clock,
            )
            wall = total()
            cpu = time.process_time() - cpu_started
            counter.set_phase("verify")
        if report.failures:
            by_step: dict[str, int] = {}
            for step, _why in report.failures.values():
                by_step[step] = by_step.get(step, 0) + 1
            sample = next(iter(report.failures.items()))
            problems.append(f"{len(report.failures)} policies failed {by_step}, e.g. {sample}")
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
    work = counter.get(PHASE)
    return RunResult(
        n=n,
        warehouse=args.warehouse,
        wall=wall,
        limit=lower_bound(n, args.latency_ms / 1000, args.ready_seconds, args.concurrency),
        completed=int(completed),
        requests={e: int(counts["requests"][e]) for e in ENDPOINTS},
        statements=work.total,
        sessions=work.sessions,
        connect_seconds=work.connect_seconds,
        statement_seconds=work.statement_seconds,
        render_seconds=work.render_seconds,
        cpu_seconds=cpu,
        kinds=dict(work.statements),
        kind_seconds=dict(work.kind_seconds),
        first_passed=dict(clock.first),
        last_passed=dict(clock.last),
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


def print_run(result: RunResult) -> None:
    n = result.n
    rows: list[tuple[str, object]] = [
        ("policies N", n),
        ("wall seconds (one run, all steps)", result.wall),
        ("LIMIT seconds: max(3*N*L/C, R + 3*L)", result.limit),
        ("wall / LIMIT", result.ratio),
        ("seconds per policy", result.wall / n),
        *(
            (f"  first / last policy past {s} (s)", _pair(result, s))
            for s in STEPS
            if s in result.last_passed
        ),
        ("API calls per policy", result.api_calls / n),
        *((f"  {e} per policy", result.requests[e] / n) for e in ENDPOINTS),
        ("warehouse statements per run", result.statements),
        ("  per policy", result.statements / n),
        ("  seconds in them ('render' included)", result.statement_seconds),
        ("  of which render (sqlglot)", result.render_seconds),
        ("connections (sessions) per run", result.sessions),
        ("  seconds opening them", result.connect_seconds),
        ("process CPU seconds (user+sys, simulator thread incl.)", result.cpu_seconds),
        ("peak RSS MB (ru_maxrss, whole process)", result.peak_rss_mb),
    ]
    if result.fakesnow_peak_mb is not None:
        rows.append(("fakesnow server peak RSS MB (VmHWM)", result.fakesnow_peak_mb))
    print_table(
        f"{TITLE}: PolicyWorkflow.run, N={n}, warehouse {result.warehouse}",
        ["figure", "value"],
        rows,
    )
    print_table(
        f"{TITLE}: statements per run by kind, N={n}: count, and seconds spent in them",
        ["statement", "count", "seconds"],
        [(k, result.kinds[k], result.kind_seconds.get(k, 0.0)) for k in sorted(result.kinds)],
    )


def _pair(result: RunResult, step: str) -> str:
    return f"{result.first_passed[step]:.2f} / {result.last_passed[step]:.2f}"


def print_comparison(results: Sequence[RunResult]) -> None:
    figures: list[tuple[str, list[object]]] = [
        ("wall seconds", [r.wall for r in results]),
        ("wall / LIMIT", [r.ratio for r in results]),
        ("statements per run", [r.statements for r in results]),
        ("statements per policy", [r.statements / r.n for r in results]),
        ("statements per wall second", [r.statements / r.wall for r in results]),
        ("connections per run", [r.sessions for r in results]),
        ("API calls per policy", [r.api_calls / r.n for r in results]),
    ]
    print_table(
        f"{TITLE}: statements per run vs N (side by side)",
        ["figure", *(f"N={r.n}" for r in results)],
        [(name, *values) for name, values in figures],
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Engine only (no Dagster run): throughput of one PolicyWorkflow.run over N "
        "policies against the local simulator, with a lower bound, API calls per policy, "
        "warehouse statements per run, peak memory, and the speed-up over the seeds' "
        "sequential workflow.",
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
        help="comma-separated N values (e.g. 100,1000): one run each (or --repeat), statements "
        "per run side by side, and the target that they do not grow with N",
    )
    polling = parser.add_argument_group("polling (the policy_ready step)")
    polling.add_argument(
        "--poll-initial",
        type=float,
        default=None,
        help="interval after the first poll, which the engine makes as soon as the create is "
        "written (default R/2: with equal jitter each later wait is R/4..R/2)",
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
        help="PolicyWorkflow: state writes are committed in batches at most this far apart "
        "(default: the engine's)",
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
    targets.add_argument("--max-ratio", type=float, default=1.5, help="wall / LIMIT")
    targets.add_argument("--max-rss-mb", type=float, default=500.0, help="at N >= 1000")
    targets.add_argument("--min-speedup", type=float, default=20.0, help="per policy")
    targets.add_argument(
        "--max-statement-growth",
        type=float,
        default=2.0,
        help="statements per run at the largest N / at the smallest N (with --compare-n)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    print(machine_line())
    sizes = [int(x) for x in args.compare_n.split(",")] if args.compare_n else [args.n]
    sizes = sorted(set(sizes))
    polling = polling_policy(args)
    print(
        f"{TITLE}: one PolicyWorkflow.run per N over all N policies, each going create -> "
        "poll -> circuit breaker on its own"
    )
    print(
        f"settings: L={args.latency_ms:g} ms, R={args.ready_seconds:g} s, C={args.concurrency}, "
        f"warehouse {args.warehouse}, simulator in a {args.simulator}; state writes committed "
        f"in batches at most {args.flush_seconds:g} s apart; polling: first poll as soon as the "
        f"create is written, then initial interval {polling.initial_interval_seconds:g} s, "
        f"x{polling.backoff_multiplier:g}, max interval "
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
        print_run(result)
        result.problems.extend(p for r in runs if r is not result for p in r.problems)
    if len(results) > 1:
        print_comparison(results)
    sequential = run_sequential(args) if args.sequential_n > 0 else None

    targets = Targets()
    for r in results:
        if r.n < TARGET_N:
            # Informational: with few policies LIMIT is mostly R, and a poll finds a policy
            # ready up to one poll interval after it became so.
            print(f"N={r.n}: wall {r.wall:.2f} s = {r.ratio:.2f} x LIMIT (no target below N=1000)")
            continue
        targets.check(
            f"wall <= {args.max_ratio:g} x LIMIT (N={r.n}, {r.warehouse}, engine only)",
            f"{r.wall:.2f} s = {r.ratio:.2f} x {r.limit:.2f} s",
            f"<= {args.max_ratio * r.limit:.2f} s",
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
        growth = largest.statements / max(1, small.statements)
        targets.check(
            "statements of a run independent of N",
            f"{small.statements} at N={small.n}, {largest.statements} at N={largest.n} "
            f"({growth:.2f}x for {largest.n / small.n:g}x N)",
            f"<= {args.max_statement_growth:g}x",
            growth <= args.max_statement_growth,
        )
    if sequential is not None:
        batch_per_policy = largest.wall / largest.n
        speedup = sequential.per_policy_seconds / batch_per_policy
        print_table(
            f"Per policy: sequential seed workflow ({sequential.policies} policies) vs the "
            f"engine (N={largest.n}; engine only, no Dagster run)",
            ["figure", "sequential", "engine"],
            [
                ("seconds per policy", sequential.per_policy_seconds, batch_per_policy),
                (
                    "API calls per policy",
                    sequential.api_calls / sequential.policies,
                    largest.api_calls / largest.n,
                ),
                (
                    "statements per policy",
                    sequential.statements / sequential.policies,
                    largest.statements / largest.n,
                ),
                ("completed", sequential.completed, largest.completed),
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
    return targets.exit_code(enforce=not args.no_targets, problems=problems)


if __name__ == "__main__":
    sys.exit(main())
