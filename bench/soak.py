"""Fault soak of the workflow engine alone: N policies against a simulator that misbehaves.

Engine only (no Dagster run): each round is one call of `PolicyWorkflow.run` over the policies
still to do, every policy going create -> poll -> circuit breaker on its own within the round.
The simulator answers with 5xx, hangs past the client's timeout, non-JSON and empty bodies,
bursts of 429 with Retry-After and connection resets, some of them after the effect (the
policy was created / the circuit triggered, but the client only sees the fault). Round 1 runs
every policy; each later round, like an operator re-running the failed partitions (a "next
run" resumes recoverable errors), runs the policies still in flight or with a recoverable
error, until nothing is left to resume, nothing changes, or ``--rounds`` rounds.

Checked afterwards (any violation exits 1, unless --no-targets):

- every policy has an execution (no lost executions), each one ``completed`` or ``error``
  (``other`` must be 0); errors are listed grouped by reason;
- no duplicate creates: simulator ``per_policy[*].policies_created`` is at most 1;
- no duplicate circuit triggers: ``circuits_triggered`` at most 1 and no
  ``duplicate_circuit_triggers``;
- every completed execution's circuit breaker really was triggered at the API;
- every API attempt is in the audit table: simulator ``requests`` per endpoint equal the
  ``policy_execution_events`` rows with ``event_type = 'api_call'`` per endpoint (the
  simulator counts every request it receives, resets and timeouts included; an attempt that
  never reached it, e.g. connection refused, could not be counted and does not happen here);
- the state machine's invariants (``HealthReport.consistency_violations``) hold.

    .venv/bin/python -m bench.soak                 # 500 policies, DuckDB, seed 1
"""

from __future__ import annotations

import argparse
import random
import secrets
import sys
import uuid
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from bench.benchlib import (
    WAREHOUSES,
    QuietLog,
    StatementCounter,
    Targets,
    WarehouseHandle,
    machine_line,
    make_policies,
    normalise_message,
    open_warehouse,
    peak_rss_mb,
    print_table,
    stopwatch,
    workdir,
)
from policy_devtools.simulator import ENDPOINTS, PolicyApiSimulator, SimulatorConfig
from policy_pipeline.core.domain import STEPS, PolicyDefinition
from policy_pipeline.core.engine.workflow import PolicyWorkflow
from policy_pipeline.core.settings import LeaseSettings, PollingSettings
from policy_pipeline.core.store.health import HealthReport
from policy_pipeline.core.store.state_store import ExecutionRow
from policy_pipeline.resources.policy_api import PolicyApiResource

RESUMABLE_STATUSES = ("pending", "policy_created", "policy_ready")
SHORT = dict(zip(STEPS, ("create", "ready", "circuit"), strict=True))


@dataclass
class RoundFigures:
    number: int
    policies: int
    seconds: float
    failures: dict[str, int]
    completed: int
    errors: int
    resumable: int


@dataclass
class SoakResult:
    rounds: list[RoundFigures] = field(default_factory=list)
    stop_reason: str = ""
    # Why a step failed for a policy in some round (most are resumed by a later round).
    failure_reasons: Counter[str] = field(default_factory=Counter)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Engine only (no Dagster run): fault soak of PolicyWorkflow.run against a "
        "misbehaving simulator, re-run like an operator until nothing changes; checks "
        "duplicates, lost executions and the audit.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--n", type=int, default=500, help="policies")
    parser.add_argument("--rounds", type=int, default=10, help="at most this many runs (K)")
    parser.add_argument("--seed", type=int, default=1, help="simulator and jitter seed")
    parser.add_argument("--warehouse", choices=WAREHOUSES, default="duckdb")
    parser.add_argument("--concurrency", type=int, default=16)
    faults = parser.add_argument_group("faults (rates are per request and must sum to <= 1)")
    faults.add_argument("--error-rate", type=float, default=0.20, help="5xx")
    faults.add_argument("--timeout-rate", type=float, default=0.05, help="hang past the timeout")
    faults.add_argument("--non-json-rate", type=float, default=0.05, help="HTML, 200 or 502")
    faults.add_argument("--empty-body-rate", type=float, default=0.02, help="200, empty body")
    faults.add_argument("--rate-limit-rate", type=float, default=0.02, help="starts a 429 burst")
    faults.add_argument("--rate-limit-burst", type=int, default=5, help="429s in a burst")
    faults.add_argument("--retry-after-seconds", type=float, default=0.2)
    faults.add_argument("--reset-rate", type=float, default=0.03, help="TCP reset")
    faults.add_argument(
        "--fault-after-effect-rate",
        type=float,
        default=0.3,
        help="share of faults applied after the effect (policy created, circuit triggered)",
    )
    faults.add_argument("--hang-seconds", type=float, default=2.0)
    api = parser.add_argument_group("simulator and client")
    api.add_argument("--latency-ms", type=float, default=5.0)
    api.add_argument("--latency-jitter-ms", type=float, default=5.0)
    api.add_argument("--ready-seconds", type=float, default=0.5)
    api.add_argument("--ready-after-polls", type=int, default=1)
    api.add_argument("--client-timeout", type=float, default=1.0, help="seconds")
    api.add_argument("--max-attempts", type=int, default=5, help="per API call")
    api.add_argument("--backoff-initial", type=float, default=0.05)
    api.add_argument("--backoff-max", type=float, default=0.5)
    polling = parser.add_argument_group("polling (the policy_ready step)")
    polling.add_argument("--poll-initial", type=float, default=0.25)
    polling.add_argument("--poll-multiplier", type=float, default=1.5)
    polling.add_argument("--poll-max-interval", type=float, default=1.0)
    polling.add_argument("--max-polls", type=int, default=30)
    polling.add_argument("--poll-deadline", type=float, default=60.0)
    parser.add_argument("--no-targets", action="store_true", help="only print; exit 0")
    return parser


def simulator_config(args: argparse.Namespace, key: str) -> SimulatorConfig:
    return SimulatorConfig(
        api_key=key,
        seed=args.seed,
        latency_ms=args.latency_ms,
        latency_jitter_ms=args.latency_jitter_ms,
        ready_after_seconds=args.ready_seconds,
        ready_after_polls=args.ready_after_polls,
        error_rate=args.error_rate,
        timeout_rate=args.timeout_rate,
        hang_seconds=args.hang_seconds,
        non_json_rate=args.non_json_rate,
        empty_body_rate=args.empty_body_rate,
        rate_limit_rate=args.rate_limit_rate,
        rate_limit_burst=args.rate_limit_burst,
        retry_after_seconds=args.retry_after_seconds,
        reset_rate=args.reset_rate,
        fault_after_effect_rate=args.fault_after_effect_rate,
    )


def _to_resume(current: dict[str, ExecutionRow], names: Sequence[str]) -> list[str]:
    """The partitions an operator re-runs: never executed, in flight, or a recoverable error.
    (Re-running a completed or finally failed policy would start a new execution.)"""
    wanted = []
    for name in names:
        row = current.get(name)
        if (
            row is None
            or row.status.value in RESUMABLE_STATUSES
            or (row.status.value == "error" and row.resumable)
        ):
            wanted.append(name)
    return wanted


def _snapshot(current: dict[str, ExecutionRow]) -> dict[str, tuple[Any, ...]]:
    return {
        name: (row.execution_id, row.status.value, row.resumable, row.poll_count)
        for name, row in current.items()
    }


def run_rounds(
    args: argparse.Namespace,
    handle: WarehouseHandle,
    client: PolicyApiResource,
    policies: Sequence[PolicyDefinition],
    log: QuietLog,
) -> SoakResult:
    by_name = {p.policy_name: p for p in policies}
    names = list(by_name)
    polling = PollingSettings(
        initial_interval_seconds=args.poll_initial,
        max_interval_seconds=args.poll_max_interval,
        backoff_multiplier=args.poll_multiplier,
        max_polls=args.max_polls,
        deadline_seconds=args.poll_deadline,
    )
    result = SoakResult()
    previous: dict[str, tuple[Any, ...]] | None = None
    todo = names
    for number in range(1, args.rounds + 1):
        run_id = f"soak-round-{number}-{uuid.uuid4().hex[:8]}"
        workflow = PolicyWorkflow(
            store=handle.store(run_id=run_id),
            api=client.get_client(),
            owner=f"run:{run_id}",
            log=log,
            lease=LeaseSettings(ttl_seconds=300, wait_seconds=5.0),
            max_concurrency=args.concurrency,
        )
        elapsed = stopwatch()
        handle.counter.set_phase(f"round {number}")
        report = workflow.run(todo, definitions={n: by_name[n] for n in todo}, polling=polling)
        seconds = elapsed()
        # Each policy fails at most once per round, at the step it could not pass.
        failures = dict(Counter(SHORT[step] for step, _reason in report.failures.values()))
        result.failure_reasons.update(
            f"{SHORT[step]}: {normalise_message(reason, 100)}"
            for step, reason in report.failures.values()
        )
        current = handle.store().current_executions(names)
        statuses = Counter(row.status.value for row in current.values())
        resumable = sum(1 for row in current.values() if row.resumable)
        result.rounds.append(
            RoundFigures(
                number=number,
                policies=len(todo),
                seconds=seconds,
                failures=failures,
                completed=statuses.get("completed", 0),
                errors=statuses.get("error", 0),
                resumable=resumable,
            )
        )
        snapshot = _snapshot(current)
        todo = _to_resume(current, names)
        if not todo:
            result.stop_reason = f"nothing left to resume after round {number}"
            break
        if snapshot == previous:
            result.stop_reason = f"round {number} changed nothing"
            break
        previous = snapshot
    else:
        result.stop_reason = f"{args.rounds} rounds done; {len(todo)} policies still resumable"
    return result


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    print(machine_line())
    random.seed(args.seed)  # polling and backoff jitter; thread timing still varies run to run
    key = secrets.token_hex(16)
    config = simulator_config(args, key)  # validates the rates (sum <= 1)
    total_rate = sum(
        (
            args.error_rate,
            args.timeout_rate,
            args.non_json_rate,
            args.empty_body_rate,
            args.rate_limit_rate,
            args.reset_rate,
        )
    )
    print(
        f"faults per request: 5xx {args.error_rate:g}, timeout {args.timeout_rate:g} "
        f"(hang {args.hang_seconds:g} s > client timeout {args.client_timeout:g} s), non-JSON "
        f"{args.non_json_rate:g}, empty {args.empty_body_rate:g}, 429 burst start "
        f"{args.rate_limit_rate:g} x{args.rate_limit_burst} (Retry-After "
        f"{args.retry_after_seconds:g} s), reset {args.reset_rate:g}; sum {total_rate:g}; "
        f"after the effect {args.fault_after_effect_rate:g}; seed {args.seed}"
    )
    policies = make_policies(args.n, f"soak{secrets.token_hex(2)}")
    names = [p.policy_name for p in policies]
    counter = StatementCounter()
    log = QuietLog()
    targets = Targets()
    with (
        workdir("bench-soak-") as tmp,
        open_warehouse(args.warehouse, tmp, counter) as handle,
        PolicyApiSimulator(config) as sim,
    ):
        api = PolicyApiResource(
            endpoint=sim.base_url,
            api_key=key,
            timeout_seconds=args.client_timeout,
            max_attempts=args.max_attempts,
            backoff_initial_seconds=args.backoff_initial,
            backoff_max_seconds=args.backoff_max,
            retry_after_max_seconds=5.0,
            max_concurrency=args.concurrency,
        )
        total = stopwatch()
        with api.process_config_and_initialize_cm() as client:
            result = run_rounds(args, handle, client, policies, log)
        wall = total()
        counts = sim.counts()
        sim_policies = sim.policies()
        counter.set_phase("verify")
        current = handle.store().current_executions(names)
        executions_per_policy = dict(
            handle.query(
                'SELECT "policy_name", COUNT(*) FROM policy_execution_state GROUP BY "policy_name"'
            )
        )
        audited = {
            str(endpoint): int(count)
            for endpoint, count in handle.query(
                'SELECT "endpoint", COUNT(*) FROM policy_execution_events '
                'WHERE "event_type" = \'api_call\' GROUP BY "endpoint"'
            )
        }
        violations = HealthReport(handle.warehouse).consistency_violations(args.max_polls)
        responses = dict(
            handle.query(
                'SELECT "execution_id", "circuit_breaker_response" FROM policy_execution_state '
                "WHERE \"status\" = 'completed'"
            )
        )

    print_table(
        "Engine only (no Dagster run): rounds, each one PolicyWorkflow.run over the policies "
        "still to do; failed c/r/cb = policies that failed at create / ready / circuit",
        ["round", "policies", "seconds", "failed c/r/cb", "completed", "error", "resumable"],
        [
            (
                r.number,
                r.policies,
                r.seconds,
                "/".join(str(r.failures.get(s, 0)) for s in SHORT.values()),
                r.completed,
                r.errors,
                r.resumable,
            )
            for r in result.rounds
        ],
    )
    print(f"stopped: {result.stop_reason}; wall {wall:.1f} s")
    if result.failure_reasons:
        print_table(
            "Step failures over all rounds, grouped by reason (a later round resumes most)",
            ["step: reason", "count"],
            _ranked(result.failure_reasons),
        )

    statuses = Counter(row.status.value for row in current.values())
    completed = statuses.get("completed", 0)
    errors = [row for row in current.values() if row.status.value == "error"]
    other = len(current) - completed - len(errors)
    lost = [name for name in names if name not in current]
    per_policy = counts["per_policy"]
    duplicate_creates = [n for n, c in per_policy.items() if c["policies_created"] > 1]
    duplicate_circuits = [
        n
        for n, c in per_policy.items()
        if c["circuits_triggered"] > 1 or c["duplicate_circuit_triggers"] > 0
    ]
    untriggered = [
        row
        for row in current.values()
        if row.status.value == "completed"
        and not sim_policies.get(row.policy_id or "", {}).get("circuit_triggered", False)
    ]
    several = sorted(n for n, c in executions_per_policy.items() if int(c) > 1)

    print_table(
        f"Executions ({args.n} policies)",
        ["outcome", "count"],
        [
            ("completed", completed),
            ("error", len(errors)),
            ("  of which resumable", sum(1 for r in errors if r.resumable)),
            ("other (not completed or error)", other),
            ("lost (policy with no execution)", len(lost)),
            ("policies with more than one execution", len(several)),
        ],
    )
    if errors:
        reasons = Counter(
            f"[{row.error_step}{', resumable' if row.resumable else ''}] "
            + normalise_message(row.error_message or "")
            for row in errors
        )
        print_table("Errors grouped by reason", ["reason", "count"], _ranked(reasons))
    print_table(
        "Simulator",
        ["figure", "value"],
        [
            *((f"requests {e}", counts["requests"][e]) for e in ENDPOINTS),
            *((f"faults {k}", v) for k, v in counts["faults"].items()),
            *((f"idempotent replays {k}", v) for k, v in counts["replays"].items()),
            ("policies created", counts["policies_created"]),
            ("circuits triggered", counts["circuits_triggered"]),
            ("duplicate creates (policies_created > 1)", len(duplicate_creates)),
            ("duplicate circuit triggers", len(duplicate_circuits)),
        ],
    )
    print_table(
        "Audit: API attempts the simulator received vs api_call rows in the audit table",
        ["endpoint", "simulator requests", "audited attempts", "difference"],
        [
            (e, counts["requests"][e], audited.get(e, 0), audited.get(e, 0) - counts["requests"][e])
            for e in ENDPOINTS
        ],
    )
    if log.warnings:
        print_table(
            "Workflow warnings (grouped)",
            ["warning", "count"],
            _ranked(log.warnings)[:10],
        )
    if untriggered:
        stored = Counter(
            normalise_message(str(responses.get(row.execution_id)), 90) for row in untriggered
        )
        print_table(
            "Completed, but the API never triggered the circuit breaker: the stored "
            "circuit_breaker_response",
            ["response", "count"],
            _ranked(stored),
        )
    if violations:
        kinds = Counter(str(v["violation"]) for v in violations)
        print_table("Consistency violations", ["violation", "count"], sorted(kinds.items()))
    print(f"\npeak RSS {peak_rss_mb():.0f} MB (ru_maxrss, whole process)")

    targets.check("other executions (not completed/error)", str(other), "0", other == 0)
    targets.check("lost executions", str(len(lost)), "0", not lost)
    targets.check("duplicate creates", str(len(duplicate_creates)), "0", not duplicate_creates)
    targets.check(
        "duplicate circuit triggers", str(len(duplicate_circuits)), "0", not duplicate_circuits
    )
    targets.check(
        "completed without a circuit trigger at the API",
        f"{len(untriggered)}" + (f" (e.g. {untriggered[0].policy_name})" if untriggered else ""),
        "0",
        not untriggered,
    )
    for e in ENDPOINTS:
        targets.check(
            f"every {e} attempt audited",
            f"{audited.get(e, 0)} audited / {counts['requests'][e]} received",
            "equal",
            audited.get(e, 0) == counts["requests"][e],
        )
    targets.check("consistency violations", str(len(violations)), "0", not violations)
    targets.print()
    return targets.exit_code(enforce=not args.no_targets)


def _ranked(counts: Counter[str]) -> list[tuple[str, int]]:
    """Most frequent first."""
    return sorted(counts.items(), key=lambda item: (-item[1], item[0]))


if __name__ == "__main__":
    sys.exit(main())
