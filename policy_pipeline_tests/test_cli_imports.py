"""`policy-pipeline status` and `diagnose` answer without loading Dagster: on a DuckDB state
they open the file through the core, and check the Policy API through the core's client."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from policy_pipeline.core.settings import PROJECT_ROOT

_PROBE = """
import contextlib, io, json, sys
from policy_pipeline.cli import main
with contextlib.redirect_stdout(io.StringIO()):
    code = main(sys.argv[1:])
print(json.dumps({"code": code,
                  "dagster": sorted(m for m in sys.modules if m.startswith("dagster"))}))
"""


@pytest.mark.parametrize("command", [["status"], ["status", "--json"], ["diagnose", "--json"]])
def test_status_and_diagnose_import_no_dagster(tmp_path: Path, command: list[str]) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("POLICY_", "SNOWFLAKE_"))}
    env.update(
        POLICY_WAREHOUSE="duckdb",
        POLICY_DUCKDB_PATH=str(tmp_path / "state.duckdb"),
        POLICY_API_ENDPOINT="http://127.0.0.1:9",  # nothing listens: diagnose says unreachable
        POLICY_API_KEY="key-for-the-probe",
    )
    result = subprocess.run(
        [sys.executable, "-c", _PROBE, *command],
        cwd=PROJECT_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    outcome = json.loads(result.stdout.strip().splitlines()[-1])
    assert outcome["code"] == (1 if command[0] == "diagnose" else 0)  # diagnose: API unreachable
    assert outcome["dagster"] == []
