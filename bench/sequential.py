"""The seeds' sequential workflow, as a baseline for the batch engine.

One policy at a time, as ``dbt run-operation run_policy_workflow`` does it: clear old completed
rows, ``POST /createpolicy``, insert the state row and read it back, poll ``GET /policy/{id}``
at a fixed interval for at most ``max_polls`` polls (reading the state row before and updating
it after each poll), read the row back, ``POST /circuit``, mark it completed. Every state write
is one statement on one connection held for the whole run (as dbt's macros run them). The
HTTP calls are plain ``httpx`` calls with no retries, against the same simulator.

Run alone (starts its own simulator and warehouse)::

    .venv/bin/python -m bench.sequential --n 20

``bench/throughput.py`` runs it too, after the batch engine, and prints the speed-up.
"""

from __future__ import annotations

import argparse
import json
import secrets
import sys
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import httpx

from bench.benchlib import (
    WAREHOUSES,
    StatementCounter,
    WarehouseHandle,
    machine_line,
    make_policies,
    open_warehouse,
    print_table,
    stopwatch,
    workdir,
)
from policy_devtools.simulator import PolicyApiSimulator, SimulatorConfig
from policy_pipeline.core.domain import PolicyDefinition
from policy_pipeline.core.store.connection import Session
from policy_pipeline.core.store.dialect import Statement

SEED_TABLE = "seed_policy_execution_state"
SUCCESS = {"success", "completed", "active", "ready"}

# The second seed's DDL (plus the policy name, so runs can be told apart).
SEED_DDL = Statement(
    "seed_create_table",
    f"CREATE TABLE IF NOT EXISTS {SEED_TABLE} ("
    '"execution_id" VARCHAR, "policy_id" VARCHAR, "poll_count" NUMBER DEFAULT 0, '
    "\"status\" VARCHAR DEFAULT 'pending', "
    '"start_time" TIMESTAMP_NTZ DEFAULT CURRENT_TIMESTAMP(), "last_poll_time" TIMESTAMP_NTZ, '
    '"completed" BOOLEAN DEFAULT FALSE, "requires_circuit_breaker" BOOLEAN DEFAULT FALSE, '
    '"circuit_breaker_initiated" BOOLEAN DEFAULT FALSE, '
    '"circuit_breaker_completed" BOOLEAN DEFAULT FALSE, "error_message" VARCHAR, '
    '"message" VARCHAR, "api_response" VARIANT, "policy_data" VARIANT, '
    '"policy_status_response" VARIANT, "circuit_breaker_response" VARIANT, '
    '"policy_name" VARCHAR)',
)
CLEANUP = Statement(
    "seed_cleanup",
    f'DELETE FROM {SEED_TABLE} WHERE "completed" = TRUE '
    'AND "start_time" < DATEADD(hour, -1, CURRENT_TIMESTAMP())',
)
INSERT_CREATED = Statement(
    "seed_insert",
    f'INSERT INTO {SEED_TABLE} ("execution_id", "policy_name", "policy_id", "status", '
    '"poll_count", "start_time", "completed", "requires_circuit_breaker", '
    '"circuit_breaker_initiated", "circuit_breaker_completed", "message", "api_response", '
    '"policy_data") '
    "SELECT ?, ?, ?, 'policy_created', 0, CURRENT_TIMESTAMP(), FALSE, FALSE, FALSE, FALSE, "
    "'Step 1 complete: policy created', PARSE_JSON(?), PARSE_JSON(?)",
)
READ_ROW = Statement(
    "seed_read",
    f'SELECT "status", "policy_id", "poll_count" FROM {SEED_TABLE} WHERE "execution_id" = ?',
)
RECORD_POLL = Statement(
    "seed_record_poll",
    f'UPDATE {SEED_TABLE} SET "poll_count" = ?, "last_poll_time" = CURRENT_TIMESTAMP(), '
    '"policy_status_response" = PARSE_JSON(?), "message" = ? WHERE "execution_id" = ?',
)
MARK_READY = Statement(
    "seed_mark_ready",
    f'UPDATE {SEED_TABLE} SET "status" = \'policy_ready\', "requires_circuit_breaker" = TRUE, '
    '"message" = \'Step 2 complete\' WHERE "execution_id" = ?',
)
MARK_INITIATED = Statement(
    "seed_mark_initiated",
    f'UPDATE {SEED_TABLE} SET "circuit_breaker_initiated" = TRUE WHERE "execution_id" = ?',
)
MARK_COMPLETED = Statement(
    "seed_mark_completed",
    f'UPDATE {SEED_TABLE} SET "status" = \'completed\', "completed" = TRUE, '
    '"circuit_breaker_completed" = TRUE, "circuit_breaker_response" = PARSE_JSON(?), '
    '"message" = \'Workflow completed\' WHERE "execution_id" = ?',
)
MARK_ERROR = Statement(
    "seed_mark_error",
    f'UPDATE {SEED_TABLE} SET "status" = \'error\', "error_message" = ?, "message" = ? '
    'WHERE "execution_id" = ?',
)


@dataclass
class SequentialResult:
    policies: int
    completed: int
    seconds: float
    statements: int
    api_calls: int
    polls: int

    @property
    def per_policy_seconds(self) -> float:
        return self.seconds / max(1, self.policies)


def _json_text(response: httpx.Response) -> str:
    try:
        response.json()
    except ValueError:
        return json.dumps({"raw_text": response.text[:4000], "non_json": True})
    return response.text


def run_sequential(
    session: Session,
    client: httpx.Client,
    policies: Sequence[PolicyDefinition],
    poll_interval: float,
    max_polls: int,
    sleep: Callable[[float], None] = time.sleep,
) -> SequentialResult:
    """The seed's workflow for each policy in turn; returns the figures."""
    statements = api_calls = polls = completed = 0

    def run(statement: Statement, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        nonlocal statements
        statements += 1
        return session.rows(statement, list(params))

    session.rows(SEED_DDL)
    elapsed = stopwatch()
    for policy in policies:
        run(CLEANUP)
        execution_id = str(uuid.uuid4())
        data = policy.payload()
        api_calls += 1
        created = client.post("/createpolicy", json=data)
        policy_id = created.json().get("policy_id") if created.is_success else None
        if not isinstance(policy_id, str):
            continue  # the seed stops the workflow here; no row is written for it
        run(
            INSERT_CREATED,
            [execution_id, policy.policy_name, policy_id, created.text, json.dumps(data)],
        )
        run(READ_ROW, [execution_id])  # "verify database storage before proceeding"
        ready = False
        for attempt in range(1, max_polls + 1):
            run(READ_ROW, [execution_id])  # "check database state"
            api_calls += 1
            polls += 1
            answer = client.get(f"/policy/{policy_id}")
            status = answer.json().get("status") if answer.is_success else None
            message = f"Poll {attempt}: status {status}"
            run(RECORD_POLL, [attempt, _json_text(answer), message, execution_id])
            if status in SUCCESS:
                run(MARK_READY, [execution_id])
                ready = True
                break
            if attempt < max_polls:
                sleep(poll_interval)
        if not ready:
            error = f"policy {policy_id} not ready after {max_polls} polls"
            run(MARK_ERROR, [error, "Step 2 failed", execution_id])
            continue
        [(status, _pid, _polls)] = run(READ_ROW, [execution_id])  # "final verification"
        if status != "policy_ready":
            continue
        run(MARK_INITIATED, [execution_id])
        api_calls += 1
        body = {
            "policy_id": policy_id,
            "execution_id": execution_id,
            "trigger_reason": "policy_ready",
        }
        circuit = client.post("/circuit", json=body)
        if not circuit.is_success:
            run(MARK_ERROR, [f"HTTP {circuit.status_code}", "Step 3 failed", execution_id])
            continue
        run(MARK_COMPLETED, [json.dumps(circuit.json()), execution_id])
        completed += 1
    return SequentialResult(
        policies=len(policies),
        completed=completed,
        seconds=elapsed(),
        statements=statements,
        api_calls=api_calls,
        polls=polls,
    )


def run_baseline(
    handle: WarehouseHandle,
    base_url: str,
    api_key: str,
    count: int,
    poll_interval: float,
    max_polls: int,
) -> SequentialResult:
    """The baseline over ``count`` fresh policies, on one warehouse session held throughout."""
    policies = make_policies(count, f"seq{secrets.token_hex(2)}")
    headers = {"Authorization": f"Bearer {api_key}"}
    handle.counter.set_phase("sequential")
    with (
        httpx.Client(base_url=base_url, headers=headers, timeout=30.0) as client,
        handle.warehouse.session() as session,
    ):
        return run_sequential(session, client, policies, poll_interval, max_polls)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="The seeds' sequential workflow (one policy at a time, fixed-interval "
        "polling, one statement per state write) against the local simulator.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--n", type=int, default=20, help="policies")
    parser.add_argument("--latency-ms", type=float, default=50.0, help="simulator latency L")
    parser.add_argument("--ready-seconds", type=float, default=2.0, help="readiness time R")
    parser.add_argument(
        "--poll-interval",
        type=float,
        default=None,
        help="fixed wait between polls (default: R, the most favourable fixed interval)",
    )
    parser.add_argument("--max-polls", type=int, default=3, help="the seed's maximum")
    parser.add_argument("--warehouse", choices=WAREHOUSES, default="duckdb")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    print(machine_line())
    interval = args.ready_seconds if args.poll_interval is None else args.poll_interval
    key = secrets.token_hex(16)
    config = SimulatorConfig(
        api_key=key,
        latency_ms=args.latency_ms,
        ready_after_seconds=args.ready_seconds,
        ready_after_polls=0,
    )
    counter = StatementCounter()
    with (
        workdir("bench-seq-") as tmp,
        open_warehouse(args.warehouse, tmp, counter) as handle,
        PolicyApiSimulator(config) as sim,
    ):
        result = run_baseline(handle, sim.base_url, key, args.n, interval, args.max_polls)
    print_table(
        f"Sequential baseline ({args.warehouse}, L={args.latency_ms:g} ms, "
        f"R={args.ready_seconds:g} s, fixed poll interval {interval:g} s, "
        f"max {args.max_polls} polls)",
        ["figure", "value"],
        [
            ("policies", result.policies),
            ("completed", result.completed),
            ("wall seconds", result.seconds),
            ("seconds per policy", result.per_policy_seconds),
            ("API calls per policy", result.api_calls / max(1, result.policies)),
            ("statements per policy", result.statements / max(1, result.policies)),
        ],
    )
    if result.completed != result.policies:
        print(f"\nerror: only {result.completed} of {result.policies} policies completed")
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
