"""`policy-pipeline status` and `diagnose` answer without loading Dagster: they open a DuckDB
file, or Snowflake (a local fakesnow server) with the options and secrets the runs'
dagster-snowflake resource has, through the core, and check the Policy API through the core's
client."""

from __future__ import annotations

import base64
import json
import os
import secrets
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from policy_pipeline.core.settings import PROJECT_ROOT
from policy_pipeline_tests.conftest import encrypted_pem
from policy_pipeline_tests.harness.fakesnow_server import FakesnowServer

_PROBE = """
import contextlib, io, json, sys
from policy_pipeline.cli import main
with contextlib.redirect_stdout(io.StringIO()) as output:
    code = main(sys.argv[1:])
print(json.dumps({"code": code, "output": output.getvalue(),
                  "dagster": sorted(m for m in sys.modules if m.startswith("dagster"))}))
"""


def _probe(env: dict[str, str], command: list[str]) -> dict[str, Any]:
    result = subprocess.run(
        [sys.executable, "-c", _PROBE, *command],
        cwd=PROJECT_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    outcome: dict[str, Any] = json.loads(result.stdout.strip().splitlines()[-1])
    outcome["stderr"] = result.stderr
    return outcome


def _env(**settings: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("POLICY_", "SNOWFLAKE_"))}
    env.update(
        POLICY_API_ENDPOINT="http://127.0.0.1:9",  # nothing listens: diagnose says unreachable
        POLICY_API_KEY="key-for-the-probe",
        **settings,
    )
    return env


@pytest.mark.parametrize("command", [["status"], ["status", "--json"], ["diagnose", "--json"]])
def test_status_and_diagnose_import_no_dagster(tmp_path: Path, command: list[str]) -> None:
    env = _env(POLICY_WAREHOUSE="duckdb", POLICY_DUCKDB_PATH=str(tmp_path / "state.duckdb"))
    outcome = _probe(env, command)
    assert outcome["code"] == (1 if command[0] == "diagnose" else 0)  # diagnose: API unreachable
    assert outcome["dagster"] == []


def _snowflake_env(server: FakesnowServer, **auth: str) -> dict[str, str]:
    env = _env(POLICY_WAREHOUSE="snowflake", **server.env())
    env["SNOWFLAKE_SCHEMA"] = f"POLICY_TEST_{secrets.token_hex(6).upper()}"
    env.update(auth)
    return env


@pytest.mark.parametrize("command", [["status", "--json"], ["diagnose", "--json"]])
def test_status_and_diagnose_on_snowflake_import_no_dagster(
    fakesnow: FakesnowServer, command: list[str]
) -> None:
    outcome = _probe(_snowflake_env(fakesnow), command)
    assert outcome["code"] == (1 if command[0] == "diagnose" else 0), outcome
    assert outcome["dagster"] == []
    answer = json.loads(outcome["output"])
    if command[0] == "diagnose":
        assert answer["warehouse"] == {"ok": True, "detail": "snowflake reachable"}
    else:
        assert answer == []


def test_status_on_snowflake_logs_in_with_a_key_pair_and_names_a_key_it_cannot_read(
    fakesnow: FakesnowServer, tmp_path: Path
) -> None:
    passphrase = f"phrase-{secrets.token_hex(8)}"
    pem = encrypted_pem(passphrase)
    key_file = tmp_path / "rsa_key.p8"
    key_file.write_text(pem)
    phrase = {"SNOWFLAKE_PRIVATE_KEY_PASSPHRASE": passphrase}
    as_text = {"SNOWFLAKE_PRIVATE_KEY": pem, **phrase}
    as_base64 = {"SNOWFLAKE_PRIVATE_KEY": base64.b64encode(pem.encode()).decode(), **phrase}
    as_file = {"SNOWFLAKE_PRIVATE_KEY_PATH": str(key_file), **phrase}
    for auth in (as_text, as_base64, as_file):
        env = _snowflake_env(fakesnow, **auth)
        del env["SNOWFLAKE_PASSWORD"]
        outcome = _probe(env, ["status", "--json"])
        assert outcome["code"] == 0, outcome
        assert json.loads(outcome["output"]) == []

    for auth in (as_text, as_file):
        env = _snowflake_env(fakesnow, **{**auth, "SNOWFLAKE_PRIVATE_KEY_PASSPHRASE": "wrong"})
        del env["SNOWFLAKE_PASSWORD"]
        result = subprocess.run(
            [sys.executable, "-m", "policy_pipeline.cli", "status"],
            cwd=PROJECT_ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        said = result.stdout + result.stderr
        assert result.returncode != 0, said
        var = next(name for name in auth if name != "SNOWFLAKE_PRIVATE_KEY_PASSPHRASE")
        assert f"{var} is not a readable private key" in said, said
        body = "".join(line for line in pem.splitlines() if not line.startswith("-----"))
        assert passphrase not in said and body[:40] not in said and "Traceback" not in said
