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
import json
import statistics
import subprocess
import sys
from collections.abc import Mapping, Sequence
from typing import Any

from bench.benchlib import REPO_ROOT, machine_line

_PROBE = """
import json, os, subprocess, time
started = time.perf_counter()
import dagster, dagster_dbt
libraries = time.perf_counter() - started
spawned, written = [], []
original_popen = subprocess.Popen.__init__
def spy(self, *args, **kwargs):
    spawned.append(str(args[0] if args else kwargs.get("args")))
    return original_popen(self, *args, **kwargs)
subprocess.Popen.__init__ = spy
environ_class = type(os.environ)
original_set = environ_class.__setitem__
def track(self, key, value):
    written.append(key)
    original_set(self, key, value)
environ_class.__setitem__ = track
started = time.perf_counter()
import policy_pipeline.definitions as location
definitions = time.perf_counter() - started
keys = sorted(k.to_user_string() for k in location.defs.resolve_asset_graph().get_all_asset_keys())
print(json.dumps({"libraries": libraries, "definitions": definitions,
                  "subprocesses": spawned, "env_writes": written, "asset_keys": keys}))
"""


def measure(env: Mapping[str, str] | None = None) -> dict[str, Any]:
    """One load in a fresh interpreter (``env``: its whole environment, default this one's)."""
    result = subprocess.run(
        [sys.executable, "-c", _PROBE],
        cwd=REPO_ROOT,
        env=None if env is None else dict(env),
        capture_output=True,
        text=True,
        timeout=300,
    )
    if result.returncode != 0:
        raise RuntimeError(f"loading the definitions failed:\n{result.stderr[-3000:]}")
    loaded: dict[str, Any] = json.loads(result.stdout.strip().splitlines()[-1])
    return loaded


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
