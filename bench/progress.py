"""Waiting without a held run: one tick of ``policy_progress_sensor`` at scale, and what the
waiting costs in Snowflake warehouse time.

The sensor is the product's own definition, evaluated as the daemon evaluates it
(``build_sensor_context`` on a Dagster instance, the product's resources); only the
warehouse's connection factory is wrapped (statements counted and time-stamped) and the Policy
API resource counts its calls in flight. The Policy API simulator runs in its own process
(per-call latency L = 50 ms). The state is a fresh DuckDB file (``--warehouse snowflake``: a
schema on a local fakesnow server) seeded with N handed-off policies created at the simulator.

1. Scale: N waiting, D of them due. Targets: only the due ones are polled (at most the batch,
   ``POLICY_WAIT_POLL_BATCH``), at most ``POLICY_API_MAX_CONCURRENCY`` calls in flight, the
   tick under 30 s, and warehouse statements per tick the same for N = 1,000 and N = 10,000.
2. ``Retry-After``: an API answering 429 with ``Retry-After: 7`` - the tick stops starting
   polls and its cursor waits at least 7 s before the next.
3. The guard: an API failing every call - the guard opens, and the next tick makes no call.
4. Warehouse cost: the seconds per hour a Snowflake warehouse with 60 s auto-suspend would be
   awake while 1,000 policies wait for an hour, modelled as the union of [t, t + 60 s] over
   the times statements are sent:
   - the sensor with the default settings (one wake every ``POLICY_WAIT_POLL_INTERVAL_SECONDS``,
     300 s; the statement times of a measured tick polling 1,000 due policies, repeated at
     each wake), and for other intervals (the trade-off);
   - the previous in-run polling (engine only: `PolicyWorkflow` polling 1,000 never-ready
     policies with the default polling settings, hand-off off, measured for ``--window``
     seconds; its statement times repeat with the same gaps for the rest of the hour).

    .venv/bin/python -m bench.progress
    .venv/bin/python -m bench.progress --warehouse snowflake --large 2000 --window 30

Exit status: 0 all targets met, 1 a target missed (0 with --no-targets), 2 the bench itself
went wrong.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from dagster import DagsterInstance, SensorResult, SkipReason, build_sensor_context

from bench.benchlib import (
    QuietLog,
    StatementCounter,
    Targets,
    environ,
    machine_line,
    make_policies,
    open_warehouse,
    policy_api,
    print_table,
    workdir,
)
from policy_devtools.simulator import SimulatorConfig
from policy_pipeline.core.domain import STEP_READY
from policy_pipeline.core.engine.workflow import PolicyWorkflow
from policy_pipeline.core.policy_api import PolicyApiClient
from policy_pipeline.core.policy_api_types import AttemptCallback
from policy_pipeline.core.settings import PollingSettings, Settings
from policy_pipeline.core.store.connection import WarehouseConnection
from policy_pipeline.core.store.state_store import StateStore
from policy_pipeline.defs.workflow.sensors import build_progress_sensor
from policy_pipeline.resources import PolicyStateResource
from policy_pipeline.resources.policy_api import PolicyApiResource

API_KEY = "bench-progress-key"
LATENCY_MS = 50.0
CONCURRENCY = 16
AUTO_SUSPEND_SECONDS = 60.0
HOUR = 3600.0
TICK_TARGET_SECONDS = 30.0


class TimedCounter(StatementCounter):
    """Statements counted per phase, and the moment each was sent."""

    def __init__(self) -> None:
        super().__init__()
        self.sent: list[float] = []

    def statement(self, name: str, seconds: float) -> None:
        super().statement(name, seconds)
        with self._lock:
            self.sent.append(time.monotonic() - seconds)


class _Gauge:
    """Status calls in flight (Dagster copies resources, so the count lives out here)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.in_flight = 0
        self.peak = 0

    def take_peak(self) -> int:
        with self.lock:
            value, self.peak = self.peak, 0
            return value


GAUGE = _Gauge()
# The warehouse each bench state resource hands out, by key (resources are copied too).
BENCH_WAREHOUSES: dict[str, WarehouseConnection] = {}


class CountingClient(PolicyApiClient):
    """The product's Policy API client, with the status calls in flight counted."""

    def get_policy_status(
        self, policy_id: str, on_attempt: AttemptCallback, max_attempts: int | None = None
    ) -> Any:
        with GAUGE.lock:
            GAUGE.in_flight += 1
            GAUGE.peak = max(GAUGE.peak, GAUGE.in_flight)
        try:
            return super().get_policy_status(policy_id, on_attempt, max_attempts)
        finally:
            with GAUGE.lock:
                GAUGE.in_flight -= 1


class CountingApi(PolicyApiResource):
    """The product's Policy API resource, handing out the counting client."""

    def get_client(self) -> PolicyApiClient:
        with self._client_lock:
            if self._client is None:
                self._client = CountingClient(self.client_config())
            return self._client

    def take_max_in_flight(self) -> int:
        return GAUGE.take_peak()


class BenchState(PolicyStateResource):
    """The state resource the sensor gets: the bench's counting warehouse."""

    key: str = "bench"

    def _connect_warehouse(self) -> WarehouseConnection:
        return BENCH_WAREHOUSES[self.key]


def bench_state(warehouse: WarehouseConnection) -> BenchState:
    key = f"w{len(BENCH_WAREHOUSES)}"
    BENCH_WAREHOUSES[key] = warehouse
    return BenchState(key=key)


@dataclass
class TickFigures:
    waiting: int
    due: int
    polled: int
    max_in_flight: int
    statements: int
    seconds: float
    next_in: float
    calls: int
    offsets: list[float]  # statement times from the tick's start
    names: str  # the statements, by name


def _configure(base_url: str, **changes: Any) -> None:
    httpx.post(f"{base_url}/_sim/config", json=changes, timeout=30).raise_for_status()


def _status_calls(counts: dict[str, Any]) -> int:
    return int(counts["requests"].get("policy_status", 0))


def seed(store: StateStore, api: PolicyApiResource, n: int, due: int, prefix: str) -> list[str]:
    """N policies created at the API, their executions handed off; ``due`` of them due now,
    the others in an hour. Returns the policy ids."""
    policies = make_policies(n, prefix)

    def create(index: int) -> str:
        policy = policies[index]
        answer = api.get_client().create_policy(
            {**policy.payload(), "execution_id": f"seed-{prefix}-{index}"},
            f"seed-{prefix}-{index}",
            lambda attempt: None,
        )
        return str(answer.field("policy_id"))

    with ThreadPoolExecutor(CONCURRENCY) as pool:
        ids = list(pool.map(create, range(n)))
    rows = store.start_executions(policies)
    created = store.mark_created(
        [(row, ids[i], {"policy_id": ids[i]}) for i, row in enumerate(rows)]
    )
    now = [created[row.execution_id] for row in rows]
    store.hand_off(
        [(row, 0.0 if i < due else HOUR, "bench: handed off") for i, row in enumerate(now)]
    )
    return ids


@contextmanager
def sensor_env(wait_poll_interval_seconds: float, batch: int) -> Iterator[None]:
    with environ(
        {
            "POLICY_WAIT_POLL_BATCH": str(batch),
            "POLICY_WAIT_POLL_INTERVAL_SECONDS": str(wait_poll_interval_seconds),
            "POLICY_API_MAX_CONCURRENCY": str(CONCURRENCY),
            "POLICY_API_MAX_ATTEMPTS": "1",
            # The project's catalog: the bench's policies are not in it, and need not be
            # (handed-off policies are polled whatever the catalog says).
            "POLICY_CATALOG_DIR": str(Path(__file__).resolve().parent.parent / "policies"),
        }
    ):
        yield


def evaluate(
    sensor: Any,
    instance: DagsterInstance,
    state: BenchState,
    api: CountingApi,
    counter: TimedCounter,
    phase: str,
) -> tuple[SensorResult | SkipReason, float, list[float]]:
    counter.set_phase(phase)
    first = len(counter.sent)
    started = time.monotonic()
    with build_sensor_context(
        instance=instance, resources={"policy_state": state, "policy_api": api}
    ) as context:
        result = sensor(context)
    seconds = time.monotonic() - started
    offsets = [t - started for t in counter.sent[first:]]
    return result, seconds, offsets


def next_in(result: SensorResult | SkipReason) -> float:
    if isinstance(result, SensorResult) and result.cursor:
        return max(0.0, float(json.loads(result.cursor)["next_at"]) - time.time())
    return 0.0


def scale_tick(
    args: argparse.Namespace, n: int, due: int, sim_url: str, counts: Any
) -> TickFigures:
    counter = TimedCounter()
    with workdir("bench-progress-") as tmp, open_warehouse(args.warehouse, tmp, counter) as handle:
        api = CountingApi(
            endpoint=sim_url, api_key=API_KEY, max_attempts=1, max_concurrency=CONCURRENCY
        )
        _configure(sim_url, latency_ms=0.0)
        seed(handle.store(), api, n, due, f"wait{n}")
        _configure(sim_url, latency_ms=LATENCY_MS)
        state = bench_state(handle.warehouse)
        with DagsterInstance.ephemeral() as instance, sensor_env(300.0, args.batch):
            # Built inside: the sensor takes its settings when it is built, as on loading.
            sensor = build_progress_sensor(Settings.from_env())
            before = _status_calls(counts())
            api.take_max_in_flight()
            result, seconds, offsets = evaluate(sensor, instance, state, api, counter, "tick")
            calls = _status_calls(counts()) - before
            waiting = handle.query(
                'SELECT COUNT(*) FROM policy_execution_state WHERE "handed_off" = TRUE '
                "AND \"status\" = 'policy_created'"
            )[0][0]
            polled = handle.query(
                'SELECT COUNT(*) FROM policy_execution_state WHERE "poll_count" > 0'
            )[0][0]
        return TickFigures(
            waiting=int(waiting),
            due=due,
            polled=int(polled),
            max_in_flight=api.take_max_in_flight(),
            statements=counter.get("tick").total,
            seconds=seconds,
            next_in=next_in(result),
            calls=calls,
            offsets=offsets,
            names=", ".join(
                f"{name} x{count}" for name, count in sorted(counter.get("tick").statements.items())
            ),
        )


def misbehaving_api(args: argparse.Namespace, sim_url: str, counts: Any) -> dict[str, Any]:
    """Retry-After, then an API failing every call (the guard)."""
    figures: dict[str, Any] = {}
    counter = TimedCounter()
    with workdir("bench-progress-") as tmp, open_warehouse(args.warehouse, tmp, counter) as handle:
        api = CountingApi(
            endpoint=sim_url, api_key=API_KEY, max_attempts=1, max_concurrency=CONCURRENCY
        )
        _configure(sim_url, latency_ms=0.0, rate_limit_rate=0.0, error_rate=0.0)
        seed(handle.store(), api, 500, 500, "odd")
        state = bench_state(handle.warehouse)
        with DagsterInstance.ephemeral() as instance, sensor_env(300.0, args.batch):
            # Built inside: the sensor takes its settings when it is built, as on loading.
            sensor = build_progress_sensor(Settings.from_env())
            _configure(sim_url, latency_ms=LATENCY_MS, rate_limit_rate=1.0, retry_after_seconds=7)
            before = _status_calls(counts())
            result, _seconds, _ = evaluate(sensor, instance, state, api, counter, "retry_after")
            figures["retry_after_calls"] = _status_calls(counts()) - before
            figures["retry_after_next_in"] = next_in(result)

            # The 429s above count as transient failures too: start from a closed guard.
            handle.query("DELETE FROM policy_api_guard")
            with environ({"POLICY_GUARD_FAILURE_THRESHOLD": "10"}):
                api_guarded = CountingApi(
                    endpoint=sim_url,
                    api_key=API_KEY,
                    max_attempts=1,
                    max_concurrency=CONCURRENCY,
                    guard_failure_threshold=10,
                )
                _configure(sim_url, rate_limit_rate=0.0, error_rate=1.0)
                before = _status_calls(counts())
                evaluate(sensor, instance, state, api_guarded, counter, "guard_opens")
                figures["guard_first_calls"] = _status_calls(counts()) - before
                before = _status_calls(counts())
                result, _s, _ = evaluate(
                    sensor, instance, state, api_guarded, counter, "guard_open"
                )
                figures["guard_next_calls"] = _status_calls(counts()) - before
            guard = handle.query('SELECT "state" FROM policy_api_guard')
            figures["guard_state"] = guard[0][0] if guard else "none"
            _configure(sim_url, error_rate=0.0)
    return figures


def awake_seconds(times: Sequence[float], horizon: float = HOUR) -> float:
    """Seconds within [0, horizon] covered by the union of [t, t + auto-suspend]."""
    total, end = 0.0, -1.0
    for t in sorted(times):
        start, stop = max(t, end), min(t + AUTO_SUSPEND_SECONDS, horizon)
        if stop > start:
            total += stop - start
        end = max(end, t + AUTO_SUSPEND_SECONDS)
    return total


def sensor_hour(offsets: Sequence[float], wake_every: float) -> list[float]:
    """The statement times of an hour of waiting: the measured tick at every wake."""
    times: list[float] = []
    wake = 0.0
    while wake < HOUR:
        times += [wake + o for o in offsets]
        wake += wake_every
    return times


def in_run_polling(args: argparse.Namespace, sim_url: str) -> tuple[list[float], float]:
    """Engine only: statement times while one run polls ``args.n`` (1,000) never-ready
    policies with the default polling settings (hand-off off), over ``args.window`` s."""
    counter = TimedCounter()
    with workdir("bench-progress-") as tmp, open_warehouse(args.warehouse, tmp, counter) as handle:
        api = PolicyApiResource(
            endpoint=sim_url, api_key=API_KEY, max_attempts=1, max_concurrency=CONCURRENCY
        )
        _configure(sim_url, latency_ms=0.0, ready_after_seconds=10 * HOUR)
        store = handle.store()
        policies = make_policies(args.n, "inrun")
        seed(store, api, args.n, 0, "inrun")
        # Back in a run's hands: not handed off.
        handle.query('UPDATE policy_execution_state SET "handed_off" = FALSE')
        _configure(sim_url, latency_ms=LATENCY_MS)
        workflow = PolicyWorkflow(
            store, api.get_client(), "bench:inrun", QuietLog(), max_concurrency=CONCURRENCY
        )
        stop = threading.Event()
        counter.set_phase("in_run")
        first = len(counter.sent)
        started = time.monotonic()
        timer = threading.Timer(args.window, stop.set)
        timer.start()
        workflow.run(
            [p.policy_name for p in policies],
            [STEP_READY],
            polling=PollingSettings(max_polls=10_000, deadline_seconds=10 * HOUR),
            stop=stop,
        )
        timer.cancel()
        elapsed = time.monotonic() - started
        _configure(sim_url, ready_after_seconds=0.0)
        return [t - started for t in counter.sent[first:]], elapsed


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=(__doc__ or "").split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--warehouse", choices=("duckdb", "snowflake"), default="duckdb")
    parser.add_argument("--n", type=int, default=1_000, help="waiting policies (small case)")
    parser.add_argument("--large", type=int, default=10_000, help="waiting policies (large case)")
    parser.add_argument("--due", type=int, default=500, help="due policies of the first cases")
    parser.add_argument("--batch", type=int, default=2_000, help="POLICY_WAIT_POLL_BATCH")
    parser.add_argument("--window", type=float, default=90.0, help="in-run measurement (s)")
    parser.add_argument("--no-targets", action="store_true", help="print only, never exit 1")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    large = args.large
    targets = Targets()
    print(machine_line())
    print(f"warehouse {args.warehouse}; L = {LATENCY_MS:.0f} ms; C = {CONCURRENCY}")
    config = SimulatorConfig(api_key=API_KEY, ready_after_polls=0, ready_after_seconds=10 * HOUR)
    problems: list[str] = []
    with policy_api(config) as sim:
        figures = [
            scale_tick(args, args.n, args.due, sim.base_url, sim.counts),
            scale_tick(args, large, args.due, sim.base_url, sim.counts),
            scale_tick(args, large, large, sim.base_url, sim.counts),
            scale_tick(args, args.n, args.n, sim.base_url, sim.counts),  # an hour's wake (4.)
        ]
        print_table(
            "1. One tick of policy_progress_sensor (as the daemon evaluates it)",
            [
                "waiting",
                "due",
                "polled",
                "API calls",
                "max in flight",
                "statements",
                "tick s",
                "next tick in s",
            ],
            [
                [
                    f.waiting,
                    f.due,
                    f.polled,
                    f.calls,
                    f.max_in_flight,
                    f.statements,
                    f"{f.seconds:.2f}",
                    f"{f.next_in:.0f}",
                ]
                for f in figures
            ],
        )
        small, big, all_due, wake = figures
        print(f"statements of one tick: {small.names}")
        for f in figures:
            expected = min(f.due, args.batch)
            if f.polled != expected or f.calls != expected:
                problems.append(f"tick polled {f.polled} ({f.calls} calls), expected {expected}")
        targets.check(
            f"only the due policies are polled (N = {large}, {args.due} due)",
            f"{big.polled}",
            f"{args.due}",
            big.polled == args.due,
        )
        targets.check(
            "calls in flight <= POLICY_API_MAX_CONCURRENCY",
            f"{max(f.max_in_flight for f in figures)}",
            f"<= {CONCURRENCY}",
            max(f.max_in_flight for f in figures) <= CONCURRENCY,
        )
        targets.check(
            "tick time",
            f"{max(f.seconds for f in figures):.1f} s",
            f"< {TICK_TARGET_SECONDS:.0f} s",
            max(f.seconds for f in figures) < TICK_TARGET_SECONDS,
        )
        targets.check(
            "statements per tick do not grow with the waiting count",
            f"{small.statements} (N = {args.n}) vs {big.statements} (N = {large})",
            "equal",
            small.statements == big.statements,
        )
        targets.check(
            "a cut-short tick is followed at once",
            f"next in {all_due.next_in:.0f} s",
            "<= 1 s",
            all_due.next_in <= 1.0,
        )

        odd = misbehaving_api(args, sim.base_url, sim.counts)
        print_table(
            "2-3. Retry-After and the guard",
            ["case", "API calls", "next tick in s / guard"],
            [
                [
                    "429 Retry-After: 7 (500 due)",
                    odd["retry_after_calls"],
                    f"{odd['retry_after_next_in']:.1f}",
                ],
                [
                    "every call fails: the tick that opens the guard",
                    odd["guard_first_calls"],
                    odd["guard_state"],
                ],
                ["every call fails: the next tick", odd["guard_next_calls"], odd["guard_state"]],
            ],
        )
        targets.check(
            "Retry-After honoured",
            f"{odd['retry_after_calls']} calls, next tick in {odd['retry_after_next_in']:.1f} s",
            f"<= {CONCURRENCY} calls, >= 6.5 s",
            odd["retry_after_calls"] <= CONCURRENCY and odd["retry_after_next_in"] >= 6.5,
        )
        targets.check(
            "an open guard stops the polls",
            f"{odd['guard_next_calls']} calls",
            "0",
            odd["guard_next_calls"] == 0 and odd["guard_state"] == "open",
        )

        in_run, window = in_run_polling(args, sim.base_url)
    # An hour of waiting, modelled from the measured statement times.
    steady = [t for t in in_run if t > min(30.0, window / 3)]
    gaps = [b - a for a, b in itertools.pairwise(steady)]
    max_gap = max(gaps) if gaps else window
    in_run_awake = HOUR if max_gap < AUTO_SUSPEND_SECONDS else awake_seconds(in_run, window)
    rows = [
        [
            "previous in-run polling (engine only; defaults, hand-off off)",
            f"{len(in_run) / window * HOUR:.0f}",
            f"{in_run_awake:.0f}",
            f"max gap {max_gap:.1f} s over {window:.0f} s",
        ]
    ]
    tick = wake.offsets
    for every in (60.0, 120.0, 300.0, 600.0, 1800.0):
        times = sensor_hour(tick, every)
        label = "policy_progress_sensor" + (" (default)" if every == 300.0 else "")
        rows.append(
            [
                f"{label}, POLICY_WAIT_POLL_INTERVAL_SECONDS={every:.0f}",
                f"{len(times)}",
                f"{awake_seconds(times):.0f}",
                f"{len(tick)} statements per wake, {tick[-1] if tick else 0:.1f} s",
            ]
        )
    print_table(
        "4. Snowflake warehouse awake while 1,000 policies wait for an hour (60 s auto-suspend)",
        ["who polls", "statements per hour", "awake s per hour", "basis"],
        rows,
    )
    default_awake = awake_seconds(sensor_hour(tick, 300.0))
    targets.check(
        "warehouse awake, sensor defaults vs in-run polling",
        f"{default_awake:.0f} s vs {in_run_awake:.0f} s per hour",
        "less",
        default_awake < in_run_awake,
    )
    targets.print()
    return targets.exit_code(not args.no_targets, problems)


if __name__ == "__main__":
    sys.exit(main())
