"""Tests for the Policy API simulator: a real server on an ephemeral port, real HTTP via httpx."""

from __future__ import annotations

import email.utils
import json
import os
import re
import select
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from policy_devtools.simulator import (
    API_KEY_ENV_VAR,
    LISTENING_PREFIX,
    PolicyApiSimulator,
    SimulatorConfig,
    is_loopback_host,
)
from policy_pipeline_tests.conftest import SimFactory

REPO_ROOT = Path(__file__).resolve().parent.parent
POLICY_ID_RE = re.compile(r"pol_[0-9a-f]{16}")


@pytest.fixture
def client() -> Iterator[httpx.Client]:
    # trust_env=False: a proxy configured in the environment must never see loopback traffic.
    with httpx.Client(timeout=5.0, trust_env=False) as c:
        yield c


def create(
    client: httpx.Client,
    sim: PolicyApiSimulator,
    name: str = "alpha",
    key: str | None = None,
    **extra: Any,
) -> httpx.Response:
    headers = {"Idempotency-Key": key} if key else {}
    return client.post(
        f"{sim.base_url}/createpolicy", json={"policy_name": name, **extra}, headers=headers
    )


def poll(client: httpx.Client, sim: PolicyApiSimulator, policy_id: str) -> httpx.Response:
    return client.get(f"{sim.base_url}/policy/{policy_id}")


def trigger(
    client: httpx.Client,
    sim: PolicyApiSimulator,
    policy_id: str,
    key: str | None = None,
    execution_id: str = "exec-1",
) -> httpx.Response:
    headers = {"Idempotency-Key": key} if key else {}
    body = {"policy_id": policy_id, "execution_id": execution_id, "trigger_reason": "test"}
    return client.post(f"{sim.base_url}/circuit", json=body, headers=headers)


# --------------------------------------------------------------------------------------------
# Happy path and status progression
# --------------------------------------------------------------------------------------------


def test_happy_path_through_three_endpoints(make_sim: SimFactory, client: httpx.Client) -> None:
    sim = make_sim(ready_after_polls=1)
    created = create(client, sim, "alpha", execution_id="exec-1", premium=12.5)
    assert created.status_code == 200
    assert created.headers["content-type"] == "application/json"
    body = created.json()
    policy_id = body["policy_id"]
    assert POLICY_ID_RE.fullmatch(policy_id)
    assert body == {
        "policy_id": policy_id,
        "execution_id": "exec-1",
        "status": "pending",
        "policy_name": "alpha",
    }

    assert poll(client, sim, policy_id).json() == {
        "policy_id": policy_id,
        "status": "pending",
        "polls": 1,
    }
    assert poll(client, sim, policy_id).json()["status"] == "success"

    fired = trigger(client, sim, policy_id)
    assert fired.status_code == 200
    fired_body = fired.json()
    assert fired_body["circuit_breaker_id"].startswith("cb_")
    assert fired_body == {
        "circuit_breaker_id": fired_body["circuit_breaker_id"],
        "policy_id": policy_id,
        "execution_id": "exec-1",
        "status": "triggered",
    }

    assert sim.counts() == {
        "requests": {"createpolicy": 1, "policy_status": 2, "circuit": 1},
        "faults": {
            "5xx": 0,
            "429": 0,
            "non_json": 0,
            "empty": 0,
            "timeout": 0,
            "reset": 0,
            "unauthorized": 0,
        },
        "replays": {"createpolicy": 0, "circuit": 0},
        "policies_created": 1,
        "circuits_triggered": 1,
        "per_policy": {
            "alpha": {
                "create_requests": 1,
                "policies_created": 1,
                "status_requests": 2,
                "circuit_requests": 1,
                "circuits_triggered": 1,
                "duplicate_circuit_triggers": 0,
            }
        },
    }
    record = sim.policies()[policy_id]
    assert record["policy_name"] == "alpha"
    assert record["status"] == "success"
    assert record["polls"] == 2
    assert record["circuit_triggered"] is True
    assert record["execution_id"] == "exec-1"
    assert isinstance(record["created_at"], float)


def test_execution_id_is_generated_when_absent(make_sim: SimFactory, client: httpx.Client) -> None:
    sim = make_sim()
    body = create(client, sim).json()
    assert re.fullmatch(r"[0-9a-f-]{36}", body["execution_id"])


@pytest.mark.parametrize(
    ("ready_after_polls", "ready_status"), [(0, "ready"), (2, "success"), (4, "completed")]
)
def test_pending_until_ready_after_polls(
    make_sim: SimFactory, client: httpx.Client, ready_after_polls: int, ready_status: str
) -> None:
    sim = make_sim(ready_after_polls=ready_after_polls, ready_status=ready_status)
    policy_id = create(client, sim).json()["policy_id"]
    statuses = [poll(client, sim, policy_id).json()["status"] for _ in range(ready_after_polls + 2)]
    assert statuses == ["pending"] * ready_after_polls + [ready_status, ready_status]


def test_ready_after_seconds_is_also_required(make_sim: SimFactory, client: httpx.Client) -> None:
    sim = make_sim(ready_after_polls=0, ready_after_seconds=0.3)
    policy_id = create(client, sim).json()["policy_id"]
    assert poll(client, sim, policy_id).json()["status"] == "pending"
    assert poll(client, sim, policy_id).json()["status"] == "pending"
    time.sleep(0.35)
    assert poll(client, sim, policy_id).json()["status"] == "success"


def test_circuit_before_ready_is_409(make_sim: SimFactory, client: httpx.Client) -> None:
    sim = make_sim(ready_after_polls=5)
    policy_id = create(client, sim).json()["policy_id"]
    poll(client, sim, policy_id)
    response = trigger(client, sim, policy_id)
    assert response.status_code == 409
    assert response.json()["error"] == "policy not ready"
    assert sim.counts()["circuits_triggered"] == 0


def test_fail_policies_end_failed(make_sim: SimFactory, client: httpx.Client) -> None:
    sim = make_sim(ready_after_polls=1, fail_policies=["doomed"])
    doomed = create(client, sim, "doomed").json()["policy_id"]
    fine = create(client, sim, "fine").json()["policy_id"]
    assert [poll(client, sim, doomed).json()["status"] for _ in range(3)] == [
        "pending",
        "failed",
        "failed",
    ]
    assert [poll(client, sim, fine).json()["status"] for _ in range(2)] == ["pending", "success"]
    assert trigger(client, sim, doomed).status_code == 409
    # A later config change cannot resurrect a terminal policy.
    sim.configure(fail_policies=[])
    assert poll(client, sim, doomed).json()["status"] == "failed"


def test_unknown_status_and_never_ready(make_sim: SimFactory, client: httpx.Client) -> None:
    sim = make_sim(
        ready_after_polls=0, unknown_status_policies=["odd"], never_ready_policies=["stuck"]
    )
    odd = create(client, sim, "odd").json()["policy_id"]
    stuck = create(client, sim, "stuck").json()["policy_id"]
    assert {poll(client, sim, odd).json()["status"] for _ in range(4)} == {"mystery"}
    assert {poll(client, sim, stuck).json()["status"] for _ in range(4)} == {"pending"}


# --------------------------------------------------------------------------------------------
# Validation and routing
# --------------------------------------------------------------------------------------------


def test_validation_errors_name_the_field(make_sim: SimFactory, client: httpx.Client) -> None:
    sim = make_sim()
    missing_name = client.post(f"{sim.base_url}/createpolicy", json={"other": 1})
    assert missing_name.status_code == 400
    assert "policy_name" in missing_name.json()["error"]
    not_json = client.post(f"{sim.base_url}/createpolicy", content=b"{nope")
    assert not_json.status_code == 400

    policy_id = create(client, sim).json()["policy_id"]
    for missing in ("policy_id", "execution_id", "trigger_reason"):
        body = {"policy_id": policy_id, "execution_id": "e", "trigger_reason": "r"}
        del body[missing]
        response = client.post(f"{sim.base_url}/circuit", json=body)
        assert response.status_code == 400
        assert missing in response.json()["error"]
    assert sim.counts()["policies_created"] == 1
    assert sim.counts()["requests"]["circuit"] == 3


def test_unknown_ids_paths_and_methods(make_sim: SimFactory, client: httpx.Client) -> None:
    sim = make_sim()
    assert poll(client, sim, "pol_doesnotexist").status_code == 404
    assert trigger(client, sim, "pol_doesnotexist").status_code == 404
    assert client.get(f"{sim.base_url}/nowhere").status_code == 404
    wrong_method = client.get(f"{sim.base_url}/createpolicy")
    assert wrong_method.status_code == 405
    assert wrong_method.headers["allow"] == "POST"
    assert client.post(f"{sim.base_url}/policy/x", json={}).status_code == 405
    per_policy = sim.counts()["per_policy"]
    assert per_policy["<unknown>"]["status_requests"] == 2  # the 404 GET and the 405 POST
    assert per_policy["<unknown>"]["circuit_requests"] == 1


# --------------------------------------------------------------------------------------------
# Authentication
# --------------------------------------------------------------------------------------------


def test_auth_requires_bearer_key(make_sim: SimFactory, client: httpx.Client) -> None:
    sim = make_sim(api_key="s3cret")
    no_key = create(client, sim)
    assert no_key.status_code == 401
    assert "error" in no_key.json()
    wrong = client.post(
        f"{sim.base_url}/createpolicy",
        json={"policy_name": "alpha"},
        headers={"Authorization": "Bearer nope"},
    )
    assert wrong.status_code == 401
    assert sim.counts()["policies_created"] == 0

    authed = client.post(
        f"{sim.base_url}/createpolicy",
        json={"policy_name": "alpha"},
        headers={"Authorization": "Bearer s3cret"},
    )
    assert authed.status_code == 200
    counts = sim.counts()
    assert counts["faults"]["unauthorized"] == 2
    assert counts["requests"]["createpolicy"] == 3
    assert counts["policies_created"] == 1
    # Control endpoints stay open so harnesses can inspect a locked-down simulator.
    assert client.get(f"{sim.base_url}/_sim/health").json() == {"ok": True}


# --------------------------------------------------------------------------------------------
# Idempotency
# --------------------------------------------------------------------------------------------


def test_idempotent_replay_and_conflicting_body(make_sim: SimFactory, client: httpx.Client) -> None:
    sim = make_sim()
    first = create(client, sim, "alpha", key="k-1", execution_id="e-1")
    again = create(client, sim, "alpha", key="k-1", execution_id="e-1")
    assert first.status_code == again.status_code == 200
    assert again.content == first.content
    assert again.headers["idempotent-replayed"] == "true"
    assert "idempotent-replayed" not in first.headers

    conflict = create(client, sim, "beta", key="k-1", execution_id="e-1")
    assert conflict.status_code == 422
    assert conflict.json() == {"error": "Idempotency-Key reused with a different request body"}

    # Keys are scoped per endpoint: the same key on /circuit is a fresh request.
    sim.configure(ready_after_polls=0)
    policy_id = first.json()["policy_id"]
    poll(client, sim, policy_id)
    fired = trigger(client, sim, policy_id, key="k-1")
    assert fired.status_code == 200
    replayed = trigger(client, sim, policy_id, key="k-1")
    assert replayed.content == fired.content
    assert replayed.headers["idempotent-replayed"] == "true"

    counts = sim.counts()
    assert counts["policies_created"] == 1
    assert counts["circuits_triggered"] == 1
    assert counts["replays"] == {"createpolicy": 1, "circuit": 1}
    assert counts["per_policy"]["alpha"]["duplicate_circuit_triggers"] == 0


def test_duplicate_trigger_without_key_reuse_is_counted(
    make_sim: SimFactory, client: httpx.Client
) -> None:
    sim = make_sim(ready_after_polls=0)
    policy_id = create(client, sim).json()["policy_id"]
    poll(client, sim, policy_id)
    first = trigger(client, sim, policy_id, key="a").json()
    second = trigger(client, sim, policy_id, key="b").json()
    assert second["circuit_breaker_id"] == first["circuit_breaker_id"]
    assert second["already_triggered"] is True
    counts = sim.counts()
    assert counts["circuits_triggered"] == 1
    assert counts["per_policy"]["alpha"]["duplicate_circuit_triggers"] == 1
    assert counts["per_policy"]["alpha"]["circuit_requests"] == 2


def test_fault_after_effect_then_same_key_retry_yields_one_policy(
    make_sim: SimFactory, client: httpx.Client
) -> None:
    sim = make_sim(
        scripted_faults=[{"endpoint": "createpolicy", "fault": "5xx", "after_effect": True}]
    )
    failed = create(client, sim, "alpha", key="retry-me")
    assert failed.status_code in (500, 502, 503)
    assert len(sim.policies()) == 1  # the policy exists although the client saw an error

    retried = create(client, sim, "alpha", key="retry-me")
    assert retried.status_code == 200
    assert retried.headers["idempotent-replayed"] == "true"
    assert retried.json()["policy_id"] == next(iter(sim.policies()))
    counts = sim.counts()
    assert counts["policies_created"] == 1
    assert counts["faults"]["5xx"] == 1
    assert counts["replays"]["createpolicy"] == 1


def test_fault_before_effect_stores_nothing(make_sim: SimFactory, client: httpx.Client) -> None:
    sim = make_sim(scripted_faults=[{"endpoint": "createpolicy", "fault": "5xx"}])
    assert create(client, sim, key="k").status_code >= 500
    assert sim.policies() == {}
    retried = create(client, sim, key="k")
    assert retried.status_code == 200
    assert "idempotent-replayed" not in retried.headers
    assert sim.counts()["policies_created"] == 1


# --------------------------------------------------------------------------------------------
# Scripted faults
# --------------------------------------------------------------------------------------------


def test_scripted_5xx_non_json_and_empty(make_sim: SimFactory, client: httpx.Client) -> None:
    sim = make_sim(
        scripted_faults=[
            {"endpoint": "createpolicy", "fault": "5xx", "times": 2},
            {"endpoint": "createpolicy", "fault": "non_json"},
            {"endpoint": "createpolicy", "fault": "empty"},
        ]
    )
    first, second = create(client, sim), create(client, sim)
    assert {first.status_code, second.status_code} <= {500, 502, 503}
    assert "error" in first.json()

    html = create(client, sim)
    assert html.status_code in (200, 502)
    assert html.text.startswith("<html>")
    with pytest.raises(json.JSONDecodeError):
        html.json()

    empty = create(client, sim)
    assert empty.status_code == 200
    assert empty.content == b""

    assert create(client, sim).status_code == 200  # script exhausted
    counts = sim.counts()
    assert counts["faults"]["5xx"] == 2
    assert counts["faults"]["non_json"] == 1
    assert counts["faults"]["empty"] == 1
    assert counts["policies_created"] == 1
    assert sim.config.scripted_faults == []


def test_scripted_faults_only_hit_their_endpoint(
    make_sim: SimFactory, client: httpx.Client
) -> None:
    sim = make_sim(scripted_faults=[{"endpoint": "circuit", "fault": "5xx"}])
    policy_id = create(client, sim).json()["policy_id"]
    assert poll(client, sim, policy_id).status_code == 200
    assert trigger(client, sim, policy_id).status_code >= 500


def test_scripted_timeout(make_sim: SimFactory, client: httpx.Client) -> None:
    sim = make_sim(
        hang_seconds=1.0,
        scripted_faults=[
            {"endpoint": "createpolicy", "fault": "timeout"},
            {"endpoint": "createpolicy", "fault": "timeout", "after_effect": True},
        ],
    )
    with pytest.raises(httpx.TimeoutException):
        client.post(f"{sim.base_url}/createpolicy", json={"policy_name": "a"}, timeout=0.2)
    assert sim.counts()["policies_created"] == 0
    with pytest.raises(httpx.TimeoutException):
        client.post(f"{sim.base_url}/createpolicy", json={"policy_name": "a"}, timeout=0.2)
    # After the effect: the policy exists even though the client timed out.
    assert sim.counts()["policies_created"] == 1
    assert sim.counts()["faults"]["timeout"] == 2


def test_scripted_reset_raises_transport_error(make_sim: SimFactory, client: httpx.Client) -> None:
    sim = make_sim(scripted_faults=[{"endpoint": "createpolicy", "fault": "reset"}])
    with pytest.raises(httpx.TransportError):
        create(client, sim)
    assert sim.counts()["faults"]["reset"] == 1
    assert sim.counts()["policies_created"] == 0
    assert create(client, sim).status_code == 200  # the client recovers on a new connection


@pytest.mark.parametrize("http_date", [False, True])
def test_scripted_429_with_retry_after(
    make_sim: SimFactory, client: httpx.Client, http_date: bool
) -> None:
    sim = make_sim(
        retry_after_seconds=30,
        retry_after_http_date=http_date,
        scripted_faults=[{"endpoint": "createpolicy", "fault": "429"}],
    )
    response = create(client, sim)
    assert response.status_code == 429
    retry_after = response.headers["retry-after"]
    if http_date:
        assert retry_after.endswith("GMT")
        delay = email.utils.parsedate_to_datetime(retry_after).timestamp() - time.time()
        assert 25 <= delay <= 31
    else:
        assert retry_after == "30"
    assert sim.counts()["faults"]["429"] == 1
    assert sim.counts()["policies_created"] == 0


def test_rate_limit_burst_spans_endpoints(make_sim: SimFactory, client: httpx.Client) -> None:
    sim = make_sim(rate_limit_rate=1.0, rate_limit_burst=3, fault_endpoints=["createpolicy"])
    assert create(client, sim).status_code == 429
    sim.configure(rate_limit_rate=0.0)  # the burst already started keeps going
    assert poll(client, sim, "pol_x").status_code == 429
    assert create(client, sim).status_code == 429
    assert create(client, sim).status_code == 200
    assert sim.counts()["faults"]["429"] == 3


# --------------------------------------------------------------------------------------------
# Random faults, latency, determinism
# --------------------------------------------------------------------------------------------


def _run_sequence(sim: PolicyApiSimulator, client: httpx.Client) -> list[tuple[int, str]]:
    out = []
    for i in range(30):
        response = create(client, sim, f"p{i}")
        out.append((response.status_code, response.text))
    return out


def test_seeded_random_faults_are_deterministic(make_sim: SimFactory, client: httpx.Client) -> None:
    config = {"seed": 1234, "error_rate": 0.3, "non_json_rate": 0.2}
    first = _run_sequence(make_sim(**config), client)
    second = _run_sequence(make_sim(**config), client)
    assert first == second
    statuses = [status for status, _ in first]
    assert any(status >= 500 for status in statuses)
    assert any(text.startswith("<html>") for _, text in first)
    assert any(text.startswith('{"policy_id": "pol_') for _, text in first)
    third = _run_sequence(make_sim(**{**config, "seed": 99}), client)
    assert third != first


def test_fault_endpoints_limit_random_faults(make_sim: SimFactory, client: httpx.Client) -> None:
    sim = make_sim(error_rate=1.0, fault_endpoints=["createpolicy"], seed=1)
    assert create(client, sim).status_code >= 500
    sim.configure(error_rate=0.0)
    policy_id = create(client, sim).json()["policy_id"]
    sim.configure(error_rate=1.0)
    assert all(poll(client, sim, policy_id).status_code == 200 for _ in range(3))


def test_latency_is_added(make_sim: SimFactory, client: httpx.Client) -> None:
    sim = make_sim(latency_ms=150)
    started = time.monotonic()
    assert create(client, sim).status_code == 200
    assert time.monotonic() - started >= 0.15
    started = time.monotonic()
    client.get(f"{sim.base_url}/_sim/health")  # control endpoints are never delayed
    assert time.monotonic() - started < 0.15


# --------------------------------------------------------------------------------------------
# Concurrency
# --------------------------------------------------------------------------------------------


def test_concurrent_creates_with_distinct_keys(make_sim: SimFactory) -> None:
    sim = make_sim()
    limits = httpx.Limits(max_connections=64)
    with (
        httpx.Client(timeout=20.0, trust_env=False, limits=limits) as shared,
        ThreadPoolExecutor(max_workers=32) as pool,
    ):
        responses = list(
            pool.map(lambda i: create(shared, sim, f"p{i % 10}", key=f"k-{i}"), range(200))
        )
    assert [r.status_code for r in responses] == [200] * 200
    assert len({r.json()["policy_id"] for r in responses}) == 200
    counts = sim.counts()
    assert counts["policies_created"] == 200
    assert counts["requests"]["createpolicy"] == 200
    assert sum(p["policies_created"] for p in counts["per_policy"].values()) == 200


def test_concurrent_same_key_creates_make_one_policy(make_sim: SimFactory) -> None:
    sim = make_sim()
    with (
        httpx.Client(timeout=20.0, trust_env=False) as shared,
        ThreadPoolExecutor(max_workers=50) as pool,
    ):
        responses = list(pool.map(lambda _: create(shared, sim, key="same"), range(50)))
    assert [r.status_code for r in responses] == [200] * 50
    assert len({r.content for r in responses}) == 1
    originals = [r for r in responses if "idempotent-replayed" not in r.headers]
    assert len(originals) == 1
    counts = sim.counts()
    assert counts["policies_created"] == 1
    assert counts["replays"]["createpolicy"] == 49


def test_concurrent_faults_are_counted_exactly(make_sim: SimFactory) -> None:
    sim = make_sim(seed=7, error_rate=0.2, empty_body_rate=0.1, rate_limit_rate=0.1)
    with (
        httpx.Client(timeout=20.0, trust_env=False) as shared,
        ThreadPoolExecutor(max_workers=32) as pool,
    ):
        responses = list(pool.map(lambda i: create(shared, sim, key=f"k{i}"), range(150)))
    ok = [r for r in responses if r.status_code == 200 and r.content]
    counts = sim.counts()
    faults = counts["faults"]
    assert counts["requests"]["createpolicy"] == 150
    assert counts["policies_created"] == len(ok)
    assert faults["5xx"] + faults["429"] + faults["empty"] + len(ok) == 150
    assert faults["429"] == sum(r.status_code == 429 for r in responses)


# --------------------------------------------------------------------------------------------
# Control endpoints and Python API
# --------------------------------------------------------------------------------------------


def test_control_endpoints(make_sim: SimFactory, client: httpx.Client) -> None:
    sim = make_sim(ready_after_polls=0)
    base = sim.base_url
    policy_id = create(client, sim).json()["policy_id"]

    assert client.get(f"{base}/_sim/health").json() == {"ok": True}
    assert client.get(f"{base}/_sim/counts").json() == sim.counts()
    assert client.get(f"{base}/_sim/policies").json()[policy_id]["policy_name"] == "alpha"

    updated = client.post(f"{base}/_sim/config", json={"ready_after_polls": 3, "seed": 5})
    assert updated.status_code == 200
    assert updated.json()["ready_after_polls"] == 3
    assert sim.config.ready_after_polls == 3
    bad = client.post(f"{base}/_sim/config", json={"no_such_field": 1})
    assert bad.status_code == 400
    assert "no_such_field" in bad.json()["error"]
    assert client.post(f"{base}/_sim/config", json={"error_rate": 2}).status_code == 400
    assert client.get(f"{base}/_sim/reset").status_code == 405

    # Control requests are not counted as API requests.
    assert sim.counts()["requests"]["createpolicy"] == 1
    assert client.post(f"{base}/_sim/reset").json() == {"ok": True}
    assert sim.policies() == {}
    assert sim.counts()["requests"] == {"createpolicy": 0, "policy_status": 0, "circuit": 0}
    assert poll(client, sim, policy_id).status_code == 404

    create(client, sim)
    sim.reset_counts()
    assert sim.counts()["policies_created"] == 0
    assert len(sim.policies()) == 1  # reset_counts keeps policies


def test_config_from_dict_and_validation() -> None:
    config = SimulatorConfig.from_dict({"error_rate": 0.5, "fail_policies": ["x"], "seed": 3})
    assert config.error_rate == 0.5
    assert SimulatorConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match="bogus"):
        SimulatorConfig.from_dict({"bogus": 1})
    with pytest.raises(ValueError, match="error_rate"):
        SimulatorConfig(error_rate=1.5)
    with pytest.raises(ValueError, match="sum"):
        SimulatorConfig(error_rate=0.6, reset_rate=0.6)
    with pytest.raises(ValueError, match="ready_status"):
        SimulatorConfig(ready_status="done")
    with pytest.raises(ValueError, match="fault_endpoints"):
        SimulatorConfig(fault_endpoints=["nope"])
    with pytest.raises(ValueError, match="scripted_faults"):
        SimulatorConfig(scripted_faults=[{"endpoint": "circuit", "fault": "explode"}])


def test_lifecycle_and_loopback_only() -> None:
    with pytest.raises(ValueError, match="loopback"):
        PolicyApiSimulator(host="0.0.0.0")
    assert is_loopback_host("127.0.0.1") and is_loopback_host("::1")
    assert not is_loopback_host("10.0.0.1")

    config = SimulatorConfig(scripted_faults=[{"endpoint": "circuit", "fault": "5xx"}])
    with PolicyApiSimulator(config) as sim, httpx.Client(trust_env=False) as c:
        assert sim.base_url == f"http://127.0.0.1:{sim.port}"
        assert c.get(f"{sim.base_url}/_sim/health").status_code == 200
        base = sim.base_url
    sim.stop()  # idempotent
    assert config.scripted_faults[0]["times"] == 1  # the caller's config is never mutated
    with pytest.raises(httpx.TransportError), httpx.Client(trust_env=False) as c:
        c.get(f"{base}/_sim/health", timeout=1.0)


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------


def _spawn_cli(*args: str, env_extra: dict[str, str] | None = None) -> subprocess.Popen[str]:
    # The key must come only from env_extra, never leak in from the developer's shell.
    env = {k: v for k, v in os.environ.items() if k != API_KEY_ENV_VAR}
    env.update({"PYTHONPATH": str(REPO_ROOT), **(env_extra or {})})
    return subprocess.Popen(
        [sys.executable, "-m", "policy_devtools.simulator", *args],
        cwd=REPO_ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _read_listening_line(proc: subprocess.Popen[str], timeout: float = 30.0) -> str:
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    if not ready:
        proc.kill()
        pytest.fail("simulator CLI did not announce its port in time")
    return proc.stdout.readline().strip()


def test_cli_serves_until_sigterm() -> None:
    proc = _spawn_cli("--port", "0", "--ready-after-polls", "0", env_extra={API_KEY_ENV_VAR: "k"})
    try:
        line = _read_listening_line(proc)
        match = re.fullmatch(rf"{LISTENING_PREFIX} (http://127\.0\.0\.1:(\d+))", line)
        assert match, line
        base = match.group(1)
        with httpx.Client(timeout=5.0, trust_env=False) as c:
            assert c.get(f"{base}/_sim/health").json() == {"ok": True}
            assert c.get(f"{base}/_sim/config").json()["ready_after_polls"] == 0
            assert c.post(f"{base}/createpolicy", json={"policy_name": "a"}).status_code == 401
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
        assert proc.stdout is not None
        assert proc.stdout.read() == ""  # exactly one line on stdout
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_cli_refuses_non_loopback_host() -> None:
    proc = _spawn_cli("--host", "0.0.0.0", "--port", "0")
    _, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 2
    assert "loopback" in stderr
