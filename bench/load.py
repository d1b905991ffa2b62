"""How long loading the code location takes, as every Dagster process that loads it pays it
(webserver, daemon, each run worker, each `dagster job execute`), and what the load does.

Each measurement is a fresh interpreter: ``import dagster`` (and dagster-dbt) first, then the
definitions (``policy_pipeline.definitions``), timed apart; subprocesses started and
environment variables written while the definitions load are counted (there should be none).

    .venv/bin/python -m bench.load            # 5 fresh interpreters
    .venv/bin/python -m bench.load --repeat 10
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Sequence

from bench.benchlib import machine_line
from policy_pipeline_tests.harness.load_probe import measure


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench.load", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--repeat", type=int, default=5, help="fresh interpreters (default 5)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    print(machine_line())
    runs = [measure() for _ in range(args.repeat)]
    libraries = [float(str(run["libraries"])) for run in runs]
    definitions = [float(str(run["definitions"])) for run in runs]
    print(
        f"import dagster + dagster_dbt: median {statistics.median(libraries):.2f} s "
        f"(min {min(libraries):.2f}, max {max(libraries):.2f})"
    )
    print(
        f"import policy_pipeline.definitions after them: median "
        f"{statistics.median(definitions):.2f} s (min {min(definitions):.2f}, "
        f"max {max(definitions):.2f}); {len(runs[0]['asset_keys'])} asset keys"
    )
    spawned = sorted({name for run in runs for name in run["subprocesses"]})
    written = sorted({name for run in runs for name in run["env_writes"]})
    print(f"subprocesses started while loading: {spawned or 'none'}")
    print(f"environment variables written while loading: {written or 'none'}")
    return 0 if not spawned and not written else 1


if __name__ == "__main__":
    raise SystemExit(main())
