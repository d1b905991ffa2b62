"""bench/e2e.py still runs end to end: `dagster job execute` as a subprocess on a fresh SQLite
instance, tiny N, in both modes (the figures are not checked, only that the script completes,
prints its tables and finds nothing wrong with the run; PostgreSQL is left to the script's own
``--instance postgres``, the deployment tests cover that storage)."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Sequence

from policy_pipeline.core.settings import PROJECT_ROOT

TIMEOUT_SECONDS = 180


def _run(argv: Sequence[str]) -> str:
    result = subprocess.run(
        [sys.executable, "-m", "bench.e2e", *argv],
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        timeout=TIMEOUT_SECONDS,
        check=False,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-5000:]
    assert "The run went wrong" not in output
    return result.stdout


def test_e2e_throughput_tiny() -> None:
    out = _run(["--n", "6", "--instance", "sqlite", "--no-targets"])
    for line in (
        "End to end, N=6, sqlite instance",
        "DAGSTER_EVENT_BATCH_SIZE",
        "unset",
        "wall seconds (dagster job execute, start to exit)",
        "NOOP seconds (no-op location, same partitions/keys)",
        "wall - NOOP seconds",
        "LIMIT seconds = max(3 N L / C, R + 3 L)",
        "(wall - NOOP) / LIMIT",
        "peak RSS MB of the run process",
        "API calls per policy",
        "Targets",
        "(wall - NOOP) <= 2 x LIMIT (sqlite)",
    ):
        assert line in out, out
    exit_line = next(row for row in out.splitlines() if row.startswith("run exit code"))
    assert exit_line.split()[-1] == "0"


def test_e2e_uneven_tiny() -> None:
    out = _run(
        [
            *("--uneven", "--n", "10", "--instance", "sqlite", "--latency-ms", "5"),
            *("--median-ready", "0.3", "--slow-ready", "1", "--poll-initial", "0.1"),
            *("--poll-max-interval", "0.5", "--poll-deadline", "3", "--no-targets"),
        ]
    )
    for line in (
        "End to end, uneven readiness, N=10, sqlite instance",
        "healthy / at slow readiness / never ready / failed by the API",
        "delay s (circuit_at - ready_at): p50",
        "delay s: p99",
        "delay s: max",
        "polling interval cap in force s",
        "p99 <= cap + 1 s (sqlite)",
    ):
        assert line in out, out
    # One never-ready and one failed policy of ten: the run fails, as it should; the rest
    # complete (the script itself checks each one and exits 2 otherwise).
    exit_line = next(row for row in out.splitlines() if row.startswith("run exit code"))
    assert exit_line.split()[-1] != "0"
    completed = next(row for row in out.splitlines() if row.startswith("completed executions"))
    assert completed.split()[-1] == "8"
