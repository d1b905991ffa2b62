"""Tests for the Policy API client (`PolicyApiClient`, and the Dagster resource
`PolicyApiResource` that hands it out) against the real local simulator.

Every test talks HTTP to a `PolicyApiSimulator` on an ephemeral loopback port. Back-off sleeps
are recorded instead of slept (``PolicyApiClient(..., sleep=sleeps.append)``), so retries cost
no wall time.
"""

from __future__ import annotations

import dataclasses
import json
import random
import socket
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import requests
from dagster import build_resources

from policy_pipeline.core import policy_api
from policy_pipeline.core.policy_api import PolicyApiClient, PolicyApiConfig, parse_retry_after
from policy_pipeline.core.policy_api_types import ApiAttempt, ApiResponse, PolicyApiError
from policy_pipeline.resources.policy_api import PolicyApiResource
from policy_pipeline_tests.conftest import SimFactory, simulators
from policy_pipeline_tests.harness.client_rig import Rig, RigFactory, rigs

API_KEY = "sk-test-S3CRET-7f3a9c1e"
WRONG_KEY = "sk-test-WRONG-0000"


pytestmark = pytest.mark.usefixtures("no_proxy")


@pytest.fixture
def make_sim() -> Iterator[SimFactory]:
    """conftest's `make_sim`, its simulators wanting API_KEY unless told another."""
    yield from simulators(api_key=API_KEY)


@pytest.fixture
def make_rig() -> Iterator[RigFactory]:
    yield from rigs(API_KEY)


@pytest.fixture
def closed_port_url() -> str:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"  # nothing listens there any more: connection refused


def jitter_ceiling(api: PolicyApiClient, attempt: int) -> float:
    config = api.config
    return float(
        min(config.backoff_max_seconds, config.backoff_initial_seconds * 2 ** (attempt - 1))
    )


def seed_for_non_json_status(status: int) -> int:
    """A seed whose first simulator RNG draw gives a ``non_json`` fault this status.

    The simulator picks a non_json fault's status (200 or 502) as the first use of its seeded
    RNG; the tests assert the status they got, so a change there fails loudly, not silently.
    """
    return next(s for s in range(1000) if random.Random(s).choice((200, 502)) == status)


def texts_of(obj: Any) -> list[str]:
    """Every rendering of an attempt/response/error a log or state table could end up with."""
    texts = [repr(obj), str(obj)]
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            texts += [repr(value), str(value), json.dumps(value, default=str)]
    if isinstance(obj, ApiResponse):
        texts += [json.dumps(obj.recorded_body, default=str), obj.describe()]
    if isinstance(obj, BaseException):
        texts += [repr(a) for a in obj.args]
    return texts


def assert_no_secret(objects: list[Any], secret: str = API_KEY) -> None:
    assert objects, "nothing was scanned"
    for obj in objects:
        for text in texts_of(obj):
            assert secret not in text, f"API key leaked in {type(obj).__name__}: {text!r}"


def create(rig: Rig, name: str = "alpha", key: str = "idem-1", **extra: Any) -> ApiResponse:
    return rig.api.create_policy({"policy_name": name, **extra}, key, rig.record)


def ready_policy(rig: Rig, name: str = "alpha") -> str:
    """Create a policy and poll it once (ready_after_polls=0 makes one poll enough)."""
    policy_id = create(rig, name, key=f"create-{name}").field("policy_id")
    assert isinstance(policy_id, str)
    assert rig.api.get_policy_status(policy_id, rig.record).field("status") == "success"
    return policy_id


# --------------------------------------------------------------------------------------------
# Happy paths
# --------------------------------------------------------------------------------------------


def test_create_policy_happy_path(make_sim: SimFactory, make_rig: RigFactory) -> None:
    sim = make_sim()
    rig = make_rig(sim.base_url)
    resp = create(rig, "alpha", execution_id="exec-42")
    assert (resp.endpoint, resp.method, resp.path) == ("createpolicy", "POST", "/createpolicy")
    assert resp.ok and resp.http_status == 200 and resp.attempts == 1
    assert resp.field("policy_name") == "alpha"
    assert resp.field("execution_id") == "exec-42"
    policy_id = resp.field("policy_id")
    assert isinstance(policy_id, str) and policy_id.startswith("pol_")
    assert json.loads(resp.text) == resp.data == resp.recorded_body
    assert policy_id in sim.policies()
    [attempt] = rig.attempts
    assert (attempt.endpoint, attempt.method, attempt.path) == (
        "createpolicy",
        "POST",
        "/createpolicy",
    )
    assert (attempt.attempt, attempt.http_status, attempt.outcome) == (1, 200, "ok")
    assert attempt.body == resp.data and attempt.error is None and attempt.latency_ms >= 0
    assert rig.sleeps == []


def test_policy_status_happy_path(make_sim: SimFactory, make_rig: RigFactory) -> None:
    sim = make_sim(ready_after_polls=1)
    rig = make_rig(sim.base_url)
    policy_id = create(rig).field("policy_id")
    first = rig.api.get_policy_status(policy_id, rig.record)
    second = rig.api.get_policy_status(policy_id, rig.record)
    assert (first.endpoint, first.method, first.path) == (
        "policy_status",
        "GET",
        f"/policy/{policy_id}",
    )
    assert first.ok and first.data == {"policy_id": policy_id, "status": "pending", "polls": 1}
    assert second.field("status") == "success" and second.field("polls") == 2
    assert sim.counts()["requests"]["policy_status"] == 2
    assert [a.endpoint for a in rig.attempts] == ["createpolicy", "policy_status", "policy_status"]


def test_circuit_breaker_happy_path(make_sim: SimFactory, make_rig: RigFactory) -> None:
    sim = make_sim(ready_after_polls=0)
    rig = make_rig(sim.base_url)
    policy_id = ready_policy(rig)
    resp = rig.api.trigger_circuit_breaker(policy_id, "exec-7", "drift", "cb-key-1", rig.record)
    assert (resp.endpoint, resp.method, resp.path) == ("circuit", "POST", "/circuit")
    assert resp.ok and resp.attempts == 1
    assert resp.field("status") == "triggered"
    assert resp.field("policy_id") == policy_id and resp.field("execution_id") == "exec-7"
    assert str(resp.field("circuit_breaker_id")).startswith("cb_")
    assert sim.policies()[policy_id]["circuit_triggered"] is True
    assert sim.counts()["circuits_triggered"] == 1


def test_status_path_url_quotes_odd_policy_ids(make_sim: SimFactory, make_rig: RigFactory) -> None:
    sim = make_sim()
    rig = make_rig(sim.base_url)
    odd = "a/b c?d#e%f&g=ü"
    resp = rig.api.get_policy_status(odd, rig.record)
    # The whole id stays one path segment: the server decodes exactly the id we asked for.
    assert resp.path == "/policy/a%2Fb%20c%3Fd%23e%25f%26g%3D%C3%BC"
    assert resp.http_status == 404
    assert resp.field("policy_id") == odd
    assert rig.attempts[0].path == resp.path
    assert sim.counts()["requests"]["policy_status"] == 1


def test_endpoint_with_trailing_slash(make_sim: SimFactory, make_rig: RigFactory) -> None:
    sim = make_sim()
    rig = make_rig(sim.base_url + "/")
    assert create(rig).http_status == 200


def test_works_as_a_dagster_resource(make_sim: SimFactory) -> None:
    sim = make_sim()
    attempts: list[ApiAttempt] = []
    with build_resources({"api": PolicyApiResource(endpoint=sim.base_url, api_key=API_KEY)}) as res:
        api: PolicyApiResource = res.api
        client = api.get_client()
        assert isinstance(client, PolicyApiClient) and api.get_client() is client
        resp = client.create_policy({"policy_name": "dg"}, "dg-key", attempts.append)
        assert resp.http_status == 200 and len(attempts) == 1
        assert api._client is client
    assert api._client is None  # teardown_after_execution closed and dropped the client
    assert client._http is None  # ... and the client's connections are closed


# --------------------------------------------------------------------------------------------
# Headers: Authorization and Idempotency-Key reach the server
# --------------------------------------------------------------------------------------------


def test_bearer_key_is_accepted_and_wrong_key_gets_401_without_retry(
    make_sim: SimFactory, make_rig: RigFactory
) -> None:
    sim = make_sim()
    good = make_rig(sim.base_url)
    assert create(good, "good").http_status == 200
    assert sim.counts()["faults"]["unauthorized"] == 0

    bad = make_rig(sim.base_url, api_key=WRONG_KEY)
    resp = create(bad, "bad")
    assert resp.http_status == 401 and not resp.ok
    assert resp.attempts == 1 and bad.numbers() == [1] and bad.outcomes() == ["ok"]
    assert bad.sleeps == []
    counts = sim.counts()
    assert counts["faults"]["unauthorized"] == 1
    assert counts["requests"]["createpolicy"] == 2
    assert counts["policies_created"] == 1


def test_idempotency_key_replays_the_same_policy(
    make_sim: SimFactory, make_rig: RigFactory
) -> None:
    sim = make_sim()
    rig = make_rig(sim.base_url)
    first = create(rig, "alpha", key="same-key")
    again = create(rig, "alpha", key="same-key")
    other = create(rig, "alpha", key="other-key")
    assert first.field("policy_id") == again.field("policy_id") != other.field("policy_id")
    counts = sim.counts()
    assert counts["replays"]["createpolicy"] == 1
    assert counts["policies_created"] == 2


def test_idempotency_key_is_resent_on_every_retry(
    make_sim: SimFactory, make_rig: RigFactory
) -> None:
    # The first attempt really creates the policy but the client sees a 5xx: only a retry that
    # carries the same Idempotency-Key gets the original policy back instead of a second one.
    sim = make_sim(
        scripted_faults=[{"endpoint": "createpolicy", "fault": "5xx", "after_effect": True}]
    )
    rig = make_rig(sim.base_url)
    resp = create(rig, "alpha", key="k-retry")
    assert resp.http_status == 200 and resp.attempts == 2
    assert list(sim.policies()) == [resp.field("policy_id")]
    counts = sim.counts()
    assert counts["policies_created"] == 1
    assert counts["replays"]["createpolicy"] == 1


def test_idempotency_mismatch_422_is_not_retried(
    make_sim: SimFactory, make_rig: RigFactory
) -> None:
    sim = make_sim()
    rig = make_rig(sim.base_url)
    assert create(rig, "alpha", key="k").http_status == 200
    rig.attempts.clear()
    resp = create(rig, "beta", key="k")
    assert resp.http_status == 422
    assert "Idempotency-Key" in str(resp.field("error"))
    assert resp.attempts == 1 and rig.outcomes() == ["ok"] and rig.sleeps == []
    assert sim.counts()["requests"]["createpolicy"] == 2


@pytest.mark.parametrize(
    ("call", "expected_status"),
    [
        (lambda rig: rig.api.get_policy_status("pol_missing", rig.record), 404),
        (lambda rig: create(rig, "   "), 400),
        (
            lambda rig: rig.api.trigger_circuit_breaker(
                create(rig).field("policy_id"), "e", "r", "cb", rig.record
            ),
            409,
        ),
    ],
    ids=["404-unknown-policy", "400-bad-body", "409-not-ready"],
)
def test_other_4xx_are_returned_without_retry(
    make_sim: SimFactory,
    make_rig: RigFactory,
    call: Callable[[Rig], ApiResponse],
    expected_status: int,
) -> None:
    sim = make_sim(ready_after_polls=5)
    rig = make_rig(sim.base_url)
    resp = call(rig)
    assert resp.http_status == expected_status and resp.attempts == 1
    assert rig.attempts[-1].attempt == 1 and rig.attempts[-1].outcome == "ok"
    assert rig.sleeps == []
    assert sum(sim.counts()["requests"].values()) == len(rig.attempts)


# --------------------------------------------------------------------------------------------
# Retries and back-off
# --------------------------------------------------------------------------------------------


def test_5xx_then_success_records_every_attempt(make_sim: SimFactory, make_rig: RigFactory) -> None:
    sim = make_sim(scripted_faults=[{"endpoint": "createpolicy", "fault": "5xx", "times": 3}])
    rig = make_rig(sim.base_url, backoff_initial_seconds=0.2, backoff_max_seconds=0.5)
    resp = create(rig)
    assert resp.http_status == 200 and resp.attempts == 4
    assert rig.numbers() == [1, 2, 3, 4]
    assert rig.outcomes() == ["retry", "retry", "retry", "ok"]
    statuses = [a.http_status for a in rig.attempts]
    assert all(s in (500, 502, 503) for s in statuses[:3]) and statuses[3] == 200
    assert all(
        a.body == {"error": "simulated server error", "simulated_fault": "5xx"}
        for a in rig.attempts[:3]
    )
    assert len(rig.sleeps) == 3  # one back-off between consecutive attempts, none after
    for n, slept in enumerate(rig.sleeps, start=1):
        assert 0 <= slept <= jitter_ceiling(rig.api, n)
    assert sim.counts()["requests"]["createpolicy"] == 4


@pytest.mark.parametrize("retry_after", [3.0, 0.25])
def test_429_retry_after_seconds_is_slept_exactly(
    make_sim: SimFactory, make_rig: RigFactory, retry_after: float
) -> None:
    sim = make_sim(
        retry_after_seconds=retry_after,
        scripted_faults=[{"endpoint": "policy_status", "fault": "429"}],
    )
    rig = make_rig(sim.base_url, backoff_initial_seconds=100.0, backoff_max_seconds=100.0)
    resp = rig.api.get_policy_status("pol_x", rig.record)
    assert resp.http_status == 404 and resp.attempts == 2
    assert [a.http_status for a in rig.attempts] == [429, 404]
    assert rig.outcomes() == ["retry", "ok"]
    assert rig.sleeps == [retry_after]


def test_429_retry_after_http_date_is_honoured(make_sim: SimFactory, make_rig: RigFactory) -> None:
    sim = make_sim(
        retry_after_seconds=40,
        retry_after_http_date=True,
        scripted_faults=[{"endpoint": "policy_status", "fault": "429"}],
    )
    rig = make_rig(sim.base_url, backoff_initial_seconds=0.01, backoff_max_seconds=0.01)
    resp = rig.api.get_policy_status("pol_x", rig.record)
    assert resp.attempts == 2 and rig.outcomes() == ["retry", "ok"]
    [slept] = rig.sleeps
    # The date has whole-second resolution, so the distance is just under 40 s.
    assert 38.0 <= slept <= 40.0


@pytest.mark.parametrize("http_date", [False, True])
def test_retry_after_above_the_cap_is_capped(
    make_sim: SimFactory, make_rig: RigFactory, http_date: bool
) -> None:
    sim = make_sim(
        retry_after_seconds=600,
        retry_after_http_date=http_date,
        scripted_faults=[{"endpoint": "createpolicy", "fault": "429", "times": 2}],
    )
    rig = make_rig(sim.base_url, retry_after_max_seconds=7.5)
    resp = create(rig)
    assert resp.http_status == 200 and resp.attempts == 3
    assert rig.sleeps == [7.5, 7.5]


def test_backoff_full_jitter_bounds_over_many_samples() -> None:
    api = PolicyApiClient(
        PolicyApiConfig(
            endpoint="http://127.0.0.1:9",
            api_key=API_KEY,
            backoff_initial_seconds=0.5,
            backoff_max_seconds=10.0,
        )
    )
    for attempt in range(1, 9):
        ceiling = min(10.0, 0.5 * 2 ** (attempt - 1))
        samples = [api.backoff_seconds(attempt, None) for _ in range(400)]
        assert all(0.0 <= s <= ceiling for s in samples), (attempt, ceiling, max(samples))
        # Full jitter spans [0, ceiling], it is not constant, nor "ceiling plus noise".
        assert min(samples) < 0.2 * ceiling
        assert max(samples) > 0.8 * ceiling
        assert len(set(samples)) > 300
    assert jitter_ceiling(api, 8) == 10.0  # the cap really was exercised above


def test_backoff_prefers_retry_after_over_jitter() -> None:
    api = PolicyApiClient(
        PolicyApiConfig(
            endpoint="http://127.0.0.1:9", api_key=API_KEY, retry_after_max_seconds=20.0
        )
    )
    assert api.backoff_seconds(1, 0.0) == 0.0
    assert api.backoff_seconds(3, 4.5) == 4.5
    assert api.backoff_seconds(1, 500.0) == 20.0


def test_exhausted_retries_raise_a_transient_error(
    make_sim: SimFactory, make_rig: RigFactory
) -> None:
    sim = make_sim(scripted_faults=[{"endpoint": "policy_status", "fault": "5xx", "times": 10}])
    rig = make_rig(sim.base_url, max_attempts=3)
    with pytest.raises(PolicyApiError) as info:
        rig.api.get_policy_status("pol_abc", rig.record)
    err = info.value
    assert err.transient is True
    message = str(err)
    assert "GET /policy/pol_abc" in message
    assert "3 attempts" in message
    assert "HTTP 50" in message
    assert rig.numbers() == [1, 2, 3]
    assert rig.outcomes() == ["retry", "retry", "failed"]
    assert len(rig.sleeps) == 2
    assert sim.counts()["requests"]["policy_status"] == 3
    assert_no_secret([err])


def test_on_attempt_ends_a_calls_retries_by_returning_an_error(
    make_sim: SimFactory, make_rig: RigFactory
) -> None:
    # How the engine's API guard and lease fence stop a call: the error the callback returns
    # for an attempt the client would retry is raised as is, with no further attempt.
    sim = make_sim(scripted_faults=[{"endpoint": "policy_status", "fault": "5xx", "times": 4}])
    rig = make_rig(sim.base_url, max_attempts=5)
    stop = PolicyApiError("stopped by the caller", transient=True)
    verdicts = iter([None, stop])

    def on_attempt(attempt: ApiAttempt) -> PolicyApiError | None:
        rig.record(attempt)
        return next(verdicts)

    with pytest.raises(PolicyApiError) as info:
        rig.api.get_policy_status("pol_x", on_attempt)
    assert info.value is stop
    assert rig.outcomes() == ["retry", "retry"] and len(rig.sleeps) == 1
    assert sim.counts()["requests"]["policy_status"] == 2

    # What it returns for the last attempt, or for an answer, changes nothing.
    last = make_rig(sim.base_url, max_attempts=2)
    with pytest.raises(PolicyApiError, match="failed after 2 attempts"):
        last.api.get_policy_status(
            "pol_x", lambda a: last.record(a) or (stop if a.outcome == "failed" else None)
        )
    assert last.outcomes() == ["retry", "failed"]
    answered = make_rig(sim.base_url)  # the faults are spent: a 404
    assert answered.api.get_policy_status("pol_x", lambda a: stop).http_status == 404


def test_exhausted_429_names_the_status(make_sim: SimFactory, make_rig: RigFactory) -> None:
    sim = make_sim(
        retry_after_seconds=1,
        scripted_faults=[{"endpoint": "circuit", "fault": "429", "times": 5}],
    )
    rig = make_rig(sim.base_url, max_attempts=2)
    with pytest.raises(PolicyApiError, match=r"POST /circuit failed after 2 attempts.*HTTP 429"):
        rig.api.trigger_circuit_breaker("pol_x", "e", "r", "cb", rig.record)
    assert rig.outcomes() == ["retry", "failed"] and rig.sleeps == [1.0]


def test_connection_refused_is_retried_then_raises(
    closed_port_url: str, make_rig: RigFactory
) -> None:
    rig = make_rig(closed_port_url, max_attempts=3, timeout_seconds=0.5)
    with pytest.raises(PolicyApiError) as info:
        create(rig)
    assert info.value.transient is True
    assert "POST /createpolicy" in str(info.value) and "3 attempts" in str(info.value)
    assert "ConnectError" in str(info.value)
    assert rig.numbers() == [1, 2, 3]
    assert rig.outcomes() == ["retry", "retry", "failed"]
    assert all(a.http_status is None and a.body is None for a in rig.attempts)
    assert all(a.error is not None and "ConnectError" in a.error for a in rig.attempts)
    assert len(rig.sleeps) == 2
    assert_no_secret([info.value, *rig.attempts])


def test_timeout_is_retried(make_sim: SimFactory, make_rig: RigFactory) -> None:
    sim = make_sim(
        ready_after_polls=0,
        hang_seconds=1.5,
        scripted_faults=[{"endpoint": "policy_status", "fault": "timeout"}],
    )
    rig = make_rig(sim.base_url, timeout_seconds=0.5)
    policy_id = create(rig).field("policy_id")
    rig.attempts.clear()
    started = time.monotonic()
    resp = rig.api.get_policy_status(policy_id, rig.record)
    elapsed = time.monotonic() - started
    assert resp.http_status == 200 and resp.field("status") == "success"
    assert resp.attempts == 2 and rig.outcomes() == ["retry", "ok"]
    first = rig.attempts[0]
    assert first.http_status is None and first.error is not None and "Timeout" in first.error
    assert first.latency_ms >= 400
    assert elapsed < 1.4  # gave up after timeout_seconds instead of waiting out the hang
    assert len(rig.sleeps) == 1


def test_connection_reset_is_retried_idempotently(
    make_sim: SimFactory, make_rig: RigFactory
) -> None:
    sim = make_sim(
        scripted_faults=[{"endpoint": "createpolicy", "fault": "reset", "after_effect": True}]
    )
    rig = make_rig(sim.base_url)
    resp = create(rig, key="k-reset")
    assert resp.http_status == 200 and resp.attempts == 2
    assert rig.outcomes() == ["retry", "ok"]
    assert rig.attempts[0].http_status is None and rig.attempts[0].error
    counts = sim.counts()
    assert counts["faults"]["reset"] == 1
    assert counts["policies_created"] == 1 and counts["replays"]["createpolicy"] == 1


# --------------------------------------------------------------------------------------------
# Bodies that are not JSON
# --------------------------------------------------------------------------------------------


def test_non_json_200_is_returned_with_raw_text(make_sim: SimFactory, make_rig: RigFactory) -> None:
    sim = make_sim(
        seed=seed_for_non_json_status(200),
        scripted_faults=[{"endpoint": "policy_status", "fault": "non_json"}],
    )
    rig = make_rig(sim.base_url)
    resp = rig.api.get_policy_status("pol_x", rig.record)
    assert resp.http_status == 200, "simulator no longer draws the non_json status first"
    assert resp.ok and resp.attempts == 1 and rig.sleeps == []
    assert resp.data is None and resp.field("status") is None
    assert resp.text.startswith("<html>") and "502 Bad Gateway" in resp.text
    assert resp.recorded_body == {"raw_text": resp.text, "non_json": True}
    [attempt] = rig.attempts
    assert attempt.outcome == "ok" and attempt.body == resp.text


def test_non_json_502_is_retried(make_sim: SimFactory, make_rig: RigFactory) -> None:
    sim = make_sim(
        seed=seed_for_non_json_status(502),
        scripted_faults=[{"endpoint": "policy_status", "fault": "non_json"}],
    )
    rig = make_rig(sim.base_url)
    resp = rig.api.get_policy_status("pol_x", rig.record)
    assert [a.http_status for a in rig.attempts] == [502, 404]
    assert rig.outcomes() == ["retry", "ok"] and resp.attempts == 2
    assert isinstance(rig.attempts[0].body, str) and "<html>" in rig.attempts[0].body


def test_empty_200_is_returned_with_data_none(make_sim: SimFactory, make_rig: RigFactory) -> None:
    sim = make_sim(scripted_faults=[{"endpoint": "createpolicy", "fault": "empty"}])
    rig = make_rig(sim.base_url)
    resp = create(rig)
    assert resp.http_status == 200 and resp.attempts == 1
    assert resp.data is None and resp.text == "" and resp.field("policy_id") is None
    assert resp.recorded_body == {"raw_text": "", "non_json": True}
    assert rig.attempts[0].body == "" and rig.attempts[0].outcome == "ok"


# --------------------------------------------------------------------------------------------
# parse_retry_after
# --------------------------------------------------------------------------------------------

NOW = datetime(2024, 1, 1, 12, 0, 0, tzinfo=UTC)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("120", 120.0),
        (" 7 ", 7.0),
        ("0", 0.0),
        ("0.25", 0.25),
        ("1.5", 1.5),
        ("-5", 0.0),
        ("Mon, 01 Jan 2024 12:01:30 GMT", 90.0),
        ("Mon, 01 Jan 2024 13:00:00 +0100", 0.0),
        ("Sun, 06 Nov 1994 08:49:37 GMT", 0.0),
        ("soon", None),
        ("Mon, 99 Foo", None),
        ("", None),
        ("   ", None),
        (None, None),
    ],
)
def test_parse_retry_after(value: str | None, expected: float | None) -> None:
    assert parse_retry_after(value, now=NOW) == expected


def test_parse_retry_after_http_date_defaults_to_the_current_time() -> None:
    header = (datetime.now(UTC) + timedelta(seconds=30)).strftime("%a, %d %b %Y %H:%M:%S GMT")
    seconds = parse_retry_after(header)
    assert seconds is not None and 28.0 <= seconds <= 30.0


# --------------------------------------------------------------------------------------------
# The API key never leaks
# --------------------------------------------------------------------------------------------


def test_repr_of_resource_hides_the_key() -> None:
    api = PolicyApiResource(endpoint="http://127.0.0.1:9", api_key=API_KEY)
    assert API_KEY not in repr(api)
    assert "127.0.0.1:9" in repr(api)


def test_repr_of_client_and_config_hides_the_key() -> None:
    config = PolicyApiConfig(endpoint="http://127.0.0.1:9", api_key=API_KEY)
    client = PolicyApiClient(config)
    for text in (repr(client), str(client), f"{client}", repr(config), str(config)):
        assert API_KEY not in text
        assert "127.0.0.1:9" in text


def test_str_of_resource_hides_the_key() -> None:
    api = PolicyApiResource(endpoint="http://127.0.0.1:9", api_key=API_KEY)
    assert API_KEY not in str(api)
    assert API_KEY not in f"{api}"


def test_secret_scan_across_faulty_calls(
    make_sim: SimFactory, make_rig: RigFactory, closed_port_url: str
) -> None:
    sim = make_sim(
        ready_after_polls=0,
        retry_after_seconds=0.1,
        seed=seed_for_non_json_status(502),
        scripted_faults=[
            {"endpoint": "createpolicy", "fault": "non_json"},
            {"endpoint": "createpolicy", "fault": "5xx", "after_effect": True},
            {"endpoint": "createpolicy", "fault": "reset"},
            {"endpoint": "policy_status", "fault": "429"},
            {"endpoint": "policy_status", "fault": "empty"},
            {"endpoint": "circuit", "fault": "5xx", "times": 9},
        ],
    )
    rig = make_rig(sim.base_url, max_attempts=4)
    scanned: list[Any] = []
    created = create(rig, "alpha", key="scan-key")
    policy_id = created.field("policy_id")
    scanned += [created, rig.api.get_policy_status(policy_id, rig.record)]
    scanned.append(rig.api.get_policy_status(policy_id, rig.record))
    with pytest.raises(PolicyApiError) as circuit_error:
        rig.api.trigger_circuit_breaker(policy_id, "e", "r", "cb-scan", rig.record)
    scanned.append(circuit_error.value)

    wrong = make_rig(sim.base_url, api_key=WRONG_KEY)
    scanned.append(create(wrong, "beta"))
    refused = make_rig(closed_port_url, max_attempts=2)
    with pytest.raises(PolicyApiError) as refused_error:
        create(refused)
    scanned.append(refused_error.value)

    attempts = rig.attempts + wrong.attempts + refused.attempts
    outcomes = {a.outcome for a in attempts}
    assert outcomes == {"ok", "retry", "failed"}
    assert any(a.error for a in attempts) and any(a.http_status == 429 for a in attempts)
    assert created.attempts == 4  # non_json 502, 5xx, reset, then the replayed policy
    assert_no_secret([*scanned, *attempts])
    assert_no_secret([*scanned, *attempts], WRONG_KEY)
    assert all(API_KEY not in repr(r.api) for r in (rig, wrong, refused))


def test_key_with_trailing_newline_is_stripped(make_sim: SimFactory, make_rig: RigFactory) -> None:
    sim = make_sim()
    rig = make_rig(sim.base_url, api_key=API_KEY + "\n", max_attempts=2)
    assert create(rig).http_status == 200  # the simulator accepted exactly API_KEY


def test_unprintable_key_is_refused_without_echoing_it() -> None:
    key = "secret-\x01-key-material"
    resource = PolicyApiResource(endpoint="http://127.0.0.1:9", api_key=key)
    client = resource.get_client()  # the key is checked when the client first calls the API
    attempts: list[ApiAttempt] = []
    with pytest.raises(PolicyApiError) as info:
        client.get_policy_status("pol_x", attempts.append)
    assert info.value.transient is False
    assert "unprintable" in str(info.value)
    shown = str(info.value) + repr(client) + str(client) + repr(client.config)
    assert "key-material" not in shown + repr(resource) + str(resource)
    assert attempts == []  # nothing was sent


def test_concurrent_first_calls_share_one_http_client(
    make_sim: SimFactory, make_rig: RigFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    sim = make_sim()
    rig = make_rig(sim.base_url)
    built: list[requests.Session] = []
    real_session = policy_api.transport._PolicySession

    class SlowSession(real_session):  # type: ignore[misc, valid-type]
        def __init__(self) -> None:
            time.sleep(0.05)  # widen the check-then-set window deterministically
            super().__init__()
            built.append(self)

    monkeypatch.setattr(policy_api.transport, "_PolicySession", SlowSession)
    barrier = threading.Barrier(4)
    lock = threading.Lock()

    def call() -> None:
        barrier.wait()
        resp = rig.api.get_policy_status("pol_x", lambda a: None)
        with lock:
            statuses.append(resp.http_status)

    statuses: list[int] = []
    threads = [threading.Thread(target=call) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=10)
    try:
        assert statuses == [404] * 4
        assert len(built) == 1, f"{len(built)} requests sessions were created"
    finally:
        current = rig.api._http
        for session in built:
            if current is None or session is not current.session:
                session.close()


# --------------------------------------------------------------------------------------------
# Client configuration, and the resource that hands the client out
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "bad"),
    [
        ("timeout_seconds", 0),
        ("max_attempts", 0),
        ("backoff_initial_seconds", -0.1),
        ("backoff_max_seconds", -1),
        ("retry_after_max_seconds", -1),
        ("max_concurrency", 0),
        ("guard_failure_threshold", 0),
        ("guard_cooldown_seconds", -1),
    ],
)
def test_client_config_has_the_resource_limits(field: str, bad: float) -> None:
    settings: dict[str, Any] = {"endpoint": "http://127.0.0.1:9", "api_key": API_KEY, field: bad}
    with pytest.raises(ValueError, match=field):
        PolicyApiConfig(**settings)
    with pytest.raises(ValueError, match=field):  # pydantic's ValidationError is a ValueError
        PolicyApiResource(**settings)


def test_client_config_defaults_are_the_resource_defaults() -> None:
    config = PolicyApiConfig(endpoint="http://127.0.0.1:9", api_key=API_KEY)
    resource = PolicyApiResource(endpoint="http://127.0.0.1:9", api_key=API_KEY)
    assert resource.client_config() == config
    fields = [f.name for f in dataclasses.fields(config)]
    assert fields == list(PolicyApiResource.model_fields)


def test_resource_hands_out_one_client_to_many_threads() -> None:
    resource = PolicyApiResource(endpoint="http://127.0.0.1:9", api_key=API_KEY)
    barrier = threading.Barrier(8)
    clients: list[PolicyApiClient] = []
    lock = threading.Lock()

    def get() -> None:
        barrier.wait()
        client = resource.get_client()
        with lock:
            clients.append(client)

    threads = [threading.Thread(target=get) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=10)
    assert len(clients) == 8 and all(c is clients[0] for c in clients)
