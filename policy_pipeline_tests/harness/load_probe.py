"""Loading the code location in a fresh interpreter, as every Dagster process that loads it
does: ``import dagster`` (and dagster-dbt) first, then the definitions
(``policy_pipeline.definitions``), timed apart; subprocesses started and environment variables
written while the definitions load are recorded (there should be none).

One probe for both users: `test_load` asserts the load is pure, ``python -m bench.load`` times it.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Mapping
from typing import Any

from policy_pipeline.core.settings import PROJECT_ROOT

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
        cwd=PROJECT_ROOT,
        env=None if env is None else dict(env),
        capture_output=True,
        text=True,
        timeout=300,
    )
    if result.returncode != 0:
        raise RuntimeError(f"loading the definitions failed:\n{result.stderr[-3000:]}")
    loaded: dict[str, Any] = json.loads(result.stdout.strip().splitlines()[-1])
    return loaded
