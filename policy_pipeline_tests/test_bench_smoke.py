"""The benchmark and soak scripts in bench/ still run: each with tiny sizes, in seconds.

They are run through their ``main(argv)`` (the figures are not checked, only that a run
completes, prints its tables and finds nothing wrong with itself), and one of them as the
README's command line from the repository root.
"""

from __future__ import annotations

import importlib
import subprocess
import sys
from collections.abc import Callable, Sequence
from types import ModuleType

import pytest

from policy_pipeline.core.settings import PROJECT_ROOT

SCRIPTS = ("throughput", "sequential", "soak", "reads", "progress")


def _script(name: str) -> ModuleType:
    return importlib.import_module(f"bench.{name}")


def _run(name: str, argv: Sequence[str], capsys: pytest.CaptureFixture[str]) -> str:
    main: Callable[[Sequence[str]], int] = _script(name).main
    code = main(list(argv))
    out = capsys.readouterr().out
    assert code == 0, out
    return out


@pytest.mark.parametrize("name", SCRIPTS)
def test_help(name: str) -> None:
    text = _script(name).build_parser().format_help()
    assert "--no-targets" in text or name == "sequential"


def test_throughput_tiny(capsys: pytest.CaptureFixture[str]) -> None:
    out = _run(
        "throughput",
        [
            "--compare-n=3,6",
            "--repeat=2",
            "--latency-ms=1",
            "--ready-seconds=0.1",
            "--concurrency=4",
            "--flush-seconds=0.1",
            "--sequential-n=2",
            "--no-targets",
        ],
        capsys,
    )
    for heading in (
        "Engine only (no Dagster run): PolicyWorkflow.run, N=6",
        "N=6: 2 runs, wall seconds",
        "Engine only (no Dagster run): statements per run vs N",
        "statements of a run independent of N",
        "speed-up per policy",
        "Targets",
    ):
        assert heading in out
    # LIMIT = max(3*N*L/C, R + 3*L) = max(0.0045, 0.103) s at N=6, L=1 ms, C=4, R=0.1 s.
    limit = next(line for line in out.splitlines() if line.startswith("LIMIT seconds"))
    assert limit.split()[-1] == "0.103"


def test_throughput_lower_bound() -> None:
    lower_bound = _script("throughput").lower_bound
    assert lower_bound(1000, 0.05, 2.0, 16) == pytest.approx(9.375)  # 3*N*L/C
    assert lower_bound(100, 0.05, 2.0, 16) == pytest.approx(2.15)  # R + 3*L


def test_sequential_tiny(capsys: pytest.CaptureFixture[str]) -> None:
    out = _run("sequential", ["--n=2", "--latency-ms=1", "--ready-seconds=0.05"], capsys)
    assert "seconds per policy" in out


def test_soak_tiny(capsys: pytest.CaptureFixture[str]) -> None:
    out = _run(
        "soak",
        [
            "--n=8",
            "--rounds=3",
            "--latency-ms=1",
            "--latency-jitter-ms=0",
            "--ready-seconds=0.05",
            "--hang-seconds=0.3",
            "--client-timeout=0.15",
            "--retry-after-seconds=0.02",
            "--backoff-initial=0.01",
            "--backoff-max=0.02",
            "--poll-initial=0.02",
            "--poll-max-interval=0.05",
            "--no-targets",
        ],
        capsys,
    )
    for heading in (
        "Engine only (no Dagster run): rounds",
        "Executions (8 policies)",
        "Audit: API attempts",
        "Targets",
    ):
        assert heading in out
    assert "duplicate creates" in out
    # Round 1 is one PolicyWorkflow.run over all 8 policies.
    assert any(line.split()[:2] == ["1", "8"] for line in out.splitlines()), out


def test_reads_tiny(capsys: pytest.CaptureFixture[str]) -> None:
    out = _run(
        "reads",
        ["--rows=3000", "--events=1000", "--policies=30", "--repeat=1", "--no-targets"],
        capsys,
    )
    for operation in (
        "status (limit 20)",
        "consistency_violations",
        "sensor tick, no cursor, cold",
        "current_executions(all names)",
    ):
        assert operation in out


def test_a_script_runs_from_the_repository_root() -> None:
    command = [sys.executable, "-m", "bench.sequential", "--n=1", "--latency-ms=0"]
    result = subprocess.run(
        [*command, "--ready-seconds=0"],
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Sequential baseline" in result.stdout


def test_progress_tiny(capsys: pytest.CaptureFixture[str]) -> None:
    out = _run(
        "progress",
        ["--n=20", "--large=60", "--due=10", "--batch=40", "--window=3", "--no-targets"],
        capsys,
    )
    for heading in (
        "1. One tick of policy_progress_sensor",
        "2-3. Retry-After and the guard",
        "4. Snowflake warehouse awake",
        "Targets",
    ):
        assert heading in out, out
