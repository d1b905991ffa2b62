"""bench/cluster.py still runs end to end: a tiny multi-run backfill (20 policies in runs of 10)
on a Celery cluster of test hosts with one worker host, then the no-op backfill on the same
cluster. The figures are not checked, only that the script completes, prints its tables and
finds nothing wrong (every run a success, every policy completed once at the API, the no-op
backfill without an API call, nothing of the hosts left). Without root or ``ip netns`` it is
skipped, unless CI is set: then it fails."""

from __future__ import annotations

import subprocess
import sys

import pytest

from policy_pipeline.core.settings import PROJECT_ROOT
from policy_pipeline_tests.harness.hosts import skip_or_fail, unavailable_reason

TIMEOUT_SECONDS = 420  # ~2 minutes alone; generous for a loaded 2-core machine


@pytest.mark.cluster
def test_cluster_bench_tiny() -> None:
    reason = unavailable_reason()
    if reason is not None:
        skip_or_fail(reason)
    result = subprocess.run(
        [
            *(sys.executable, "-m", "bench.cluster", "--n", "20", "--per-run", "10"),
            *("--workers", "1", "--latency-ms", "5", "--ready-seconds", "0.2"),
        ],
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        timeout=TIMEOUT_SECONDS,
        check=False,
    )
    out = result.stdout
    assert result.returncode == 0, (out + result.stderr)[-8000:]
    assert "The run went wrong" not in out
    for line in (
        "DAGSTER_EVENT_BATCH_SIZE=1000 on every host",
        "Backfill on a Celery cluster, N=20, 1 worker host(s)",
        "runs (succeeded / all)",
        "wall seconds (launch -> backfill done)",
        "policies per second",
        "NOOP seconds (no-op backfill, same keys/partitions/runs)",
        "peak memory of worker-1 MB: RSS sum / PSS sum (processes)",
        "API calls per policy",
        "Summary: multi-run backfill on Celery worker hosts",
    ):
        assert line in out, out
    runs = next(row for row in out.splitlines() if row.startswith("runs (succeeded / all)"))
    assert runs.split()[-3:] == ["2", "/", "2"], runs
    # Two product runs and two no-op runs, each over 10 partitions.
    table = out.split("Runs (seconds after the backfill's launch)")[1].split("Summary:")[0]
    run_rows = [row.split() for row in table.splitlines() if row.startswith(("product ", "NOOP "))]
    assert [(row[0], row[3], row[4]) for row in run_rows] == [
        ("product", "10", "SUCCESS"),
        ("product", "10", "SUCCESS"),
        ("NOOP", "10", "SUCCESS"),
        ("NOOP", "10", "SUCCESS"),
    ], out
