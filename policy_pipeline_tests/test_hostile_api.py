"""The Policy API client against a hostile API (`harness.hostile_api.HostileApi`): an API that
echoes the key, drips its answer one byte at a time, or answers 409/422 to an idempotent POST.

Back-off sleeps are recorded instead of slept (``PolicyApiClient(..., sleep=...)``); only the drip
tests spend wall time, bounded by the client's per-attempt deadline.
"""

from __future__ import annotations

import contextlib
import dataclasses
import html
import json
import logging
import re
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import quote, quote_plus

import pytest

from policy_pipeline.core.policy_api_types import (
    ApiResponse,
    InvalidApiKeyError,
    PolicyApiError,
)
from policy_pipeline.core.settings import Settings
from policy_pipeline.resources import policy_api_resource
from policy_pipeline.resources.policy_api import PolicyApiResource
from policy_pipeline_tests.harness.client_rig import Rig, RigFactory, rigs
from policy_pipeline_tests.harness.hostile_api import (
    FIXED_POLICY_ID,
    Behaviour,
    HostileApi,
    Route,
    SeenRequest,
    json_answer,
    well_behaved,
)

# Printable ASCII without spaces, so valid, but with every character that JSON, percent, HTML
# and repr() escaping change: a scrubber that only knows the raw form misses its echoes.
API_KEY = "sk-hostile/\"Q7z\\W+%&<k>'x9"


ApiFactory = Callable[..., HostileApi]


pytestmark = pytest.mark.usefixtures("no_proxy")


@pytest.fixture
def hostile() -> Iterator[ApiFactory]:
    """Start a HostileApi with the given routes (over `well_behaved()`); stopped after the test."""
    started: list[HostileApi] = []

    def _make(routes: dict[str, Route] | None = None) -> HostileApi:
        api = HostileApi({**well_behaved(), **(routes or {})}).start()
        started.append(api)
        return api

    yield _make
    for api in started:
        api.stop()


@pytest.fixture
def make_rig() -> Iterator[RigFactory]:
    yield from rigs(API_KEY)


def create(rig: Rig, key: str = "idem-1") -> ApiResponse:
    return rig.api.create_policy({"policy_name": "alpha"}, key, rig.record)


# --------------------------------------------------------------------------------------------
# Issue item 1: an API that echoes the key must not get it into anything the client returns
# --------------------------------------------------------------------------------------------


def lower_hex(percent_encoded: str) -> str:
    return re.sub("%[0-9A-F]{2}", lambda m: m.group().lower(), percent_encoded)


def leak_forms(key: str) -> list[str]:
    """The key as an echoing server may render it; none may survive the client."""
    return [
        key,
        json.dumps(key)[1:-1],
        quote(key, safe=""),
        lower_hex(quote(key, safe="")),
        quote_plus(key),
        html.escape(key),
        repr(key)[1:-1],
        "".join(f"\\u{ord(c):04x}" for c in key),
    ]


def renderings(obj: Any) -> list[str]:
    """Every rendering of an attempt/response/error a log, the warehouse or stderr could get."""
    texts = [repr(obj), str(obj)]
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            texts += [repr(value), str(value), json.dumps(value, default=str)]
    if isinstance(obj, ApiResponse):
        texts += [json.dumps(obj.recorded_body, default=str), obj.describe(), obj.text]
    if isinstance(obj, BaseException):
        texts += [repr(a) for a in obj.args]
        for chained in (obj.__cause__, obj.__context__):
            if chained is not None:
                texts += [repr(chained), str(chained)]
    return texts


def assert_no_key(objects: list[Any], key: str = API_KEY) -> None:
    assert objects, "nothing was scanned"
    forms = leak_forms(key)
    for obj in objects:
        for text in renderings(obj):
            for form in forms:
                assert form not in text, f"API key leaked in {type(obj).__name__}: {text!r}"


def _key_of(request: SeenRequest) -> str:
    return (request.header("Authorization") or "").removeprefix("Bearer ")


def _forms_json(request: SeenRequest) -> str:
    key = _key_of(request)
    return json.dumps(
        {
            "error": f"invalid token {key}",
            "percent": quote(key, safe=""),
            "percent_lower": lower_hex(quote(key, safe="")),
            "form": quote_plus(key),
            "html": html.escape(key),
            "repr": repr(key),
        }
    )


def _html_page(request: SeenRequest) -> str:
    key = _key_of(request)
    return f"<html><pre>Authorization: Bearer {html.escape(key)}\n{key}</pre></html>"


def _unicode_escaped_json(request: SeenRequest) -> str:
    # Valid JSON whose string holds the key entirely as \uXXXX escapes: only a scrub of the
    # decoded JSON catches it.
    escaped = "".join(f"\\u{ord(c):04x}" for c in _key_of(request))
    return '{"error": "bad token", "token": "' + escaped + '"}'


ECHOES: dict[str, dict[str, Any]] = {
    "echo-all-headers": {"echo_request": True},
    "json-in-many-forms": {"body": _forms_json, "content_type": "application/json"},
    "html-page": {"body": _html_page, "content_type": "text/html"},
    "unicode-escaped-json": {"body": _unicode_escaped_json, "content_type": "application/json"},
}


@pytest.mark.parametrize("echo", list(ECHOES))
@pytest.mark.parametrize("status", [200, 401])
def test_echoed_key_is_scrubbed_from_answers(
    hostile: ApiFactory, make_rig: RigFactory, status: int, echo: str
) -> None:
    server = hostile({"POST /createpolicy": Behaviour(status=status, **ECHOES[echo])})
    rig = make_rig(server.base_url)
    resp = create(rig)
    assert resp.http_status == status and resp.attempts == 1
    # The server really got (and echoed) the key; the client handed back only the mask.
    [seen] = server.requests
    assert seen.header("Authorization") == f"Bearer {API_KEY}"
    assert "***" in resp.text and "***" in json.dumps(rig.attempts[0].body)
    assert_no_key([resp, *rig.attempts])


@pytest.mark.parametrize("echo", list(ECHOES))
def test_echoed_key_is_scrubbed_from_retried_500s_and_the_error(
    hostile: ApiFactory, make_rig: RigFactory, echo: str
) -> None:
    server = hostile({"POST /createpolicy": Behaviour(status=500, **ECHOES[echo])})
    rig = make_rig(server.base_url, max_attempts=3)
    with pytest.raises(PolicyApiError) as info:
        create(rig)
    assert info.value.transient is True
    assert rig.outcomes() == ["retry", "retry", "failed"] and len(rig.sleeps) == 2
    assert server.count("POST", "/createpolicy") == 3
    assert all("***" in json.dumps(a.body) for a in rig.attempts)
    assert_no_key([info.value, *rig.attempts])


def test_echoed_key_in_a_json_200_keeps_the_rest_of_the_answer(
    hostile: ApiFactory, make_rig: RigFactory
) -> None:
    def answer(request: SeenRequest) -> dict[str, Any]:
        return {"policy_id": FIXED_POLICY_ID, "debug": request.echo()}

    server = hostile({"POST /createpolicy": Behaviour(body=answer)})
    rig = make_rig(server.base_url)
    resp = create(rig)
    assert resp.ok and resp.field("policy_id") == FIXED_POLICY_ID
    headers = resp.data["debug"]["headers"]
    assert headers["Authorization"] == "Bearer ***"
    assert headers["Idempotency-Key"] == "idem-1"  # only the key is masked
    assert_no_key([resp, *rig.attempts])


def test_key_quoted_in_a_protocol_error_is_scrubbed(
    hostile: ApiFactory, make_rig: RigFactory
) -> None:
    # A malformed header line: h11's error quotes the line with repr(), which doubles the '\'
    # of the key, so a scrub of the raw key alone lets it through.
    raw = f"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nBearer {API_KEY}\r\n\r\n".encode()
    server = hostile({"GET /policy/*": Behaviour(raw=raw)})
    rig = make_rig(server.base_url, max_attempts=2)
    with pytest.raises(PolicyApiError) as info:
        rig.api.get_policy_status("pol_x", rig.record)
    assert "RemoteProtocolError" in str(info.value)
    assert all(a.error and "***" in a.error for a in rig.attempts)
    assert_no_key([info.value, *rig.attempts])


# --------------------------------------------------------------------------------------------
# Issue item 9: a key that cannot be sent fails when the code location loads, cleanly
# --------------------------------------------------------------------------------------------

# Distinctive material: none of it may appear in an error message.
BAD_KEYS = {
    "non-ASCII": ("Zq9Xé7vJ", "contains a non-ASCII character at position 5"),
    "unprintable": ("Zq9X\x017vJ", "contains an unprintable character at position 5"),
    "inner space": ("Zq9X 7vJ", "contains whitespace at position 5"),
    "blank": ("  \n", "is empty"),
}


def assert_no_key_material(text: str, key: str) -> None:
    stripped = key.strip()
    for i in range(len(stripped) - 2):
        assert stripped[i : i + 3] not in text, f"key material {stripped[i : i + 3]!r} in {text!r}"
    assert not any(c in text for c in stripped if not c.isascii() or not c.isprintable())


@pytest.mark.parametrize("case", list(BAD_KEYS))
def test_bad_key_is_refused_when_the_code_location_loads(
    monkeypatch: pytest.MonkeyPatch, case: str
) -> None:
    key, problem = BAD_KEYS[case]
    monkeypatch.setenv("POLICY_API_KEY", key)
    monkeypatch.setenv("POLICY_API_ENDPOINT", "http://127.0.0.1:9")
    with pytest.raises(InvalidApiKeyError) as info:
        policy_api_resource(Settings.from_env())
    assert isinstance(info.value, ValueError)
    message = str(info.value)
    assert message.startswith(f"POLICY_API_KEY {problem}")
    assert_no_key_material(message + repr(info.value), key)


def test_good_or_unset_key_loads(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("POLICY_API_KEY", API_KEY + "\n")  # a secret file's newline is fine
    assert isinstance(policy_api_resource(Settings.from_env()), PolicyApiResource)
    monkeypatch.delenv("POLICY_API_KEY")
    assert isinstance(
        policy_api_resource(Settings.from_env()), PolicyApiResource
    )  # resolved (and checked) later


def test_non_ascii_key_gives_a_clean_non_transient_error(
    hostile: ApiFactory, make_rig: RigFactory
) -> None:
    server = hostile()
    key = "Zq9Xé7vJ-W4kP"
    rig = make_rig(server.base_url, api_key=key)
    with pytest.raises(PolicyApiError) as info:
        create(rig)
    err = info.value
    assert err.transient is False
    assert str(err) == "POLICY_API_KEY contains a non-ASCII character at position 5"
    assert not isinstance(err.__context__, UnicodeError)
    assert not isinstance(err.__cause__, UnicodeError)
    assert_no_key_material(str(err) + repr(err), key)
    assert rig.attempts == [] and server.requests == []  # nothing was sent


# --------------------------------------------------------------------------------------------
# Issue item 10: timeout_seconds bounds a whole attempt, however slowly the server drips
# --------------------------------------------------------------------------------------------

TIMEOUT = 1.0
MARGIN = 0.6  # scheduling slack on a busy machine; a drip-held attempt lasts >= 10 s
SLOW_BODY = {"policy_id": FIXED_POLICY_ID, "status": "success", "pad": "x" * 40}  # ~80 bytes


@pytest.mark.parametrize(
    "drip",
    [
        Behaviour(body=SLOW_BODY, drip_body_seconds=0.15),
        Behaviour(body=SLOW_BODY, drip_headers_seconds=0.15),
    ],
    ids=["body-drip", "header-drip"],
)
def test_dripping_answer_times_out_within_the_attempt_deadline(
    hostile: ApiFactory, make_rig: RigFactory, drip: Behaviour
) -> None:
    # Each byte comes well within the per-read timeout; only a total deadline stops this.
    server = hostile({"GET /policy/*": drip})
    rig = make_rig(server.base_url, timeout_seconds=TIMEOUT, max_attempts=2, max_concurrency=1)
    started = time.monotonic()
    with pytest.raises(PolicyApiError) as info:
        rig.api.get_policy_status(FIXED_POLICY_ID, rig.record)
    elapsed = time.monotonic() - started
    assert info.value.transient is True
    assert "failed after 2 attempts" in str(info.value) and "Timeout" in str(info.value)
    assert rig.outcomes() == ["retry", "failed"] and len(rig.sleeps) == 1
    for attempt in rig.attempts:
        assert attempt.http_status is None and attempt.error and "Timeout" in attempt.error
        assert TIMEOUT * 1000 * 0.9 <= attempt.latency_ms <= (TIMEOUT + MARGIN) * 1000
    assert elapsed <= 2 * TIMEOUT + MARGIN

    # The pool (one connection at most) is usable at once: the dripping connections were
    # dropped, not left holding the only slot.
    server.set("GET /policy/*", json_answer(200, {"status": "success"}))
    started = time.monotonic()
    resp = rig.api.get_policy_status(FIXED_POLICY_ID, rig.record)
    assert resp.ok and resp.field("status") == "success" and resp.attempts == 1
    assert time.monotonic() - started < 0.5


def test_slow_but_timely_answers_still_succeed(hostile: ApiFactory, make_rig: RigFactory) -> None:
    body = {"status": "success"}
    server = hostile(
        {"GET /policy/*": Behaviour(body=body, drip_body_seconds=0.02, delay_seconds=0.2)}
    )
    rig = make_rig(server.base_url, timeout_seconds=3.0)  # each answer takes ~0.65 s
    for _ in range(3):  # a reused keep-alive connection gets a fresh deadline each call
        resp = rig.api.get_policy_status(FIXED_POLICY_ID, rig.record)
        assert resp.ok and resp.data == body and resp.attempts == 1
    assert rig.outcomes() == ["ok"] * 3


def test_deadlines_are_per_thread_on_a_shared_resource(
    hostile: ApiFactory, make_rig: RigFactory
) -> None:
    # Many worker threads share one resource: the dripping calls time out on their own
    # deadline while the prompt ones, interleaved on the same pool, are unaffected.
    server = hostile(
        {
            "GET /policy/pol_drip*": Behaviour(body=SLOW_BODY, drip_headers_seconds=0.15),
            "GET /policy/pol_fast*": json_answer(200, {"status": "success"}),
        }
    )
    rig = make_rig(server.base_url, timeout_seconds=TIMEOUT, max_attempts=1, max_concurrency=8)
    results: dict[str, tuple[str, float]] = {}
    lock = threading.Lock()
    barrier = threading.Barrier(8)

    def call(policy_id: str) -> None:
        barrier.wait()
        started = time.monotonic()
        try:
            outcome = f"HTTP {rig.api.get_policy_status(policy_id, lambda a: None).http_status}"
        except PolicyApiError as exc:
            outcome = "transient" if exc.transient else "non-transient"
            outcome += f": {exc}"
        with lock:
            results[policy_id] = (outcome, time.monotonic() - started)

    ids = [f"pol_drip{i}" for i in range(4)] + [f"pol_fast{i}" for i in range(4)]
    threads = [threading.Thread(target=call, args=(i,)) for i in ids]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=10)
    assert sorted(results) == sorted(ids)
    for policy_id, (outcome, seconds) in results.items():
        if policy_id.startswith("pol_drip"):
            assert outcome.startswith("transient: ") and "Timeout" in outcome, outcome
            assert seconds <= TIMEOUT + MARGIN, (policy_id, seconds)
        else:
            assert outcome == "HTTP 200" and seconds < TIMEOUT, (policy_id, outcome, seconds)


# --------------------------------------------------------------------------------------------
# Issue item 11: 409 / 422 to a POST with an Idempotency-Key (IETF idempotency-key draft)
# --------------------------------------------------------------------------------------------

IN_FLIGHT = {"error": "a request with this Idempotency-Key is still being processed"}
REUSED = {"error": "Idempotency-Key reused with a different request body"}
POSTS: dict[str, Callable[[Rig], ApiResponse]] = {
    "createpolicy": lambda rig: create(rig, key="k-409"),
    "circuit": lambda rig: rig.api.trigger_circuit_breaker(
        FIXED_POLICY_ID, "exec-1", "drift", "k-409", rig.record
    ),
}


@pytest.mark.parametrize("endpoint", list(POSTS))
def test_409_in_flight_on_an_idempotent_post_is_retried(
    hostile: ApiFactory, make_rig: RigFactory, endpoint: str
) -> None:
    route = f"POST /{endpoint}"
    server = hostile(
        {
            route: [
                json_answer(409, IN_FLIGHT, headers={"Retry-After": "2"}),
                Behaviour(status=409),  # no body at all: the draft's meaning too
                well_behaved()[route],
            ]
        }
    )
    rig = make_rig(server.base_url, backoff_initial_seconds=0.4, backoff_max_seconds=0.4)
    resp = POSTS[endpoint](rig)
    assert resp.ok and resp.attempts == 3
    assert [a.http_status for a in rig.attempts] == [409, 409, 200]
    assert rig.outcomes() == ["retry", "retry", "ok"]
    assert rig.attempts[0].retry_after == 2.0
    assert rig.sleeps[0] == 2.0 and 0 <= rig.sleeps[1] <= 0.4  # Retry-After, then jitter
    keys = [r.header("Idempotency-Key") for r in server.requests_to("POST", f"/{endpoint}")]
    assert keys == ["k-409"] * 3


def test_409_in_flight_for_ever_raises_a_transient_error(
    hostile: ApiFactory, make_rig: RigFactory
) -> None:
    server = hostile({"POST /createpolicy": json_answer(409, IN_FLIGHT)})
    rig = make_rig(server.base_url, max_attempts=3)
    with pytest.raises(PolicyApiError) as info:
        create(rig)
    assert info.value.transient is True
    assert "HTTP 409" in str(info.value) and "still in flight" in str(info.value)
    assert rig.outcomes() == ["retry", "retry", "failed"] and len(rig.sleeps) == 2


@pytest.mark.parametrize(
    ("route", "answer"),
    [
        ("GET /policy/*", json_answer(409, IN_FLIGHT)),  # a GET carries no Idempotency-Key
        # A conflict the body explains otherwise is the API's answer to the request itself.
        ("POST /circuit", json_answer(409, {"error": "policy not ready", "status": "pending"})),
    ],
    ids=["get", "post-business-conflict"],
)
def test_other_409s_are_returned_without_retry(
    hostile: ApiFactory, make_rig: RigFactory, route: str, answer: Behaviour
) -> None:
    server = hostile({route: answer})
    rig = make_rig(server.base_url)
    if route.startswith("GET"):
        resp = rig.api.get_policy_status(FIXED_POLICY_ID, rig.record)
    else:
        resp = POSTS["circuit"](rig)
    assert resp.http_status == 409 and resp.attempts == 1 and rig.outcomes() == ["ok"]
    assert rig.sleeps == [] and len(server.requests) == 1
    assert resp.describe().endswith("answered HTTP 409")


@pytest.mark.parametrize("endpoint", list(POSTS))
def test_422_key_reused_is_returned_loudly_without_retry(
    hostile: ApiFactory, make_rig: RigFactory, endpoint: str
) -> None:
    server = hostile({f"POST /{endpoint}": json_answer(422, REUSED)})
    rig = make_rig(server.base_url)
    resp = POSTS[endpoint](rig)
    assert resp.http_status == 422 and resp.attempts == 1 and rig.outcomes() == ["ok"]
    assert rig.sleeps == [] and len(server.requests) == 1
    assert resp.idempotency_key_reused is True
    assert (
        "HTTP 422: the API says this Idempotency-Key was used with a different request body "
        "— a bug in policy_pipeline, not retried"
    ) in resp.describe()
    assert resp.describe().startswith(f"POST /{endpoint} answered HTTP 422")


def test_422_validation_error_is_not_called_a_key_reuse(
    hostile: ApiFactory, make_rig: RigFactory
) -> None:
    # Many APIs use 422 for an invalid body; only one about the key means the key was reused.
    answer = json_answer(422, {"detail": [{"loc": ["body", "policy_name"], "msg": "too long"}]})
    server = hostile({"POST /createpolicy": answer})
    rig = make_rig(server.base_url)
    resp = create(rig)
    assert resp.http_status == 422 and resp.attempts == 1
    assert resp.idempotency_key_reused is False
    assert resp.describe() == "POST /createpolicy answered HTTP 422"


# --------------------------------------------------------------------------------------------
# The requests transport keeps what the httpx one did
# --------------------------------------------------------------------------------------------


def test_key_never_reaches_the_logs(
    hostile: ApiFactory, make_rig: RigFactory, caplog: pytest.LogCaptureFixture
) -> None:
    # urllib3 logs a response whose headers do not parse, offending line and all: the client
    # refuses such an answer before urllib3 gets to log it.
    raw = f"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nBearer {API_KEY}\r\n\r\n".encode()
    server = hostile(
        {
            "GET /policy/*": Behaviour(raw=raw),
            "POST /createpolicy": Behaviour(status=500, echo_request=True),
        }
    )
    rig = make_rig(server.base_url, max_attempts=2)
    caplog.set_level(logging.DEBUG)
    with pytest.raises(PolicyApiError):
        rig.api.get_policy_status("pol_x", rig.record)
    with pytest.raises(PolicyApiError):
        create(rig)
    assert server.count() == 4 and caplog.records  # urllib3 did log, at DEBUG
    for form in leak_forms(API_KEY):
        assert form not in caplog.text


def test_redirects_are_returned_not_followed(hostile: ApiFactory, make_rig: RigFactory) -> None:
    server = hostile()
    target = f"{server.base_url}/policy/{FIXED_POLICY_ID}"
    server.set(
        "POST /createpolicy", json_answer(307, {"moved": True}, headers={"Location": target})
    )
    rig = make_rig(server.base_url)
    resp = create(rig)
    assert resp.http_status == 307 and resp.data == {"moved": True} and resp.attempts == 1
    assert rig.outcomes() == ["ok"] and server.count() == 1  # the Location was not visited


def test_request_bytes_and_headers(hostile: ApiFactory, make_rig: RigFactory) -> None:
    server = hostile()
    rig = make_rig(server.base_url)
    rig.api.create_policy({"policy_name": "ünï", "n": 1}, "idem-bytes", rig.record)
    rig.api.get_policy_status(FIXED_POLICY_ID, rig.record)
    post, get = server.requests
    # Compact UTF-8 JSON, byte for byte what httpx sent: an API that fingerprints the body of
    # an Idempotency-Key sees a retry across the switch as the same request.
    assert post.body == '{"policy_name":"ünï","n":1}'.encode()
    assert post.header("Content-Type") == "application/json"
    assert post.header("Idempotency-Key") == "idem-bytes"
    assert post.header("Authorization") == f"Bearer {API_KEY}"
    assert get.body == b"" and get.header("Idempotency-Key") is None
    assert get.header("Authorization") == f"Bearer {API_KEY}"


def test_netrc_does_not_replace_the_key(
    hostile: ApiFactory,
    make_rig: RigFactory,
    tmp_path: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    netrc = tmp_path / "netrc"
    netrc.write_text("machine 127.0.0.1 login someone password other-secret\n")
    netrc.chmod(0o600)
    monkeypatch.setenv("NETRC", str(netrc))
    server = hostile()
    assert create(make_rig(server.base_url)).ok
    assert server.requests[0].header("Authorization") == f"Bearer {API_KEY}"


def test_text_without_a_charset_is_utf8(hostile: ApiFactory, make_rig: RigFactory) -> None:
    # requests would call text/* without a charset Latin-1; httpx (and the client) say UTF-8.
    body = "état: prêt".encode()
    server = hostile(
        {
            "GET /policy/*": Behaviour(body=body, content_type="text/plain"),
            "POST /createpolicy": Behaviour(
                body="état".encode("latin-1"), content_type="text/plain; charset=ISO-8859-1"
            ),
        }
    )
    rig = make_rig(server.base_url)
    assert rig.api.get_policy_status(FIXED_POLICY_ID, rig.record).text == "état: prêt"
    assert create(rig).text == "état"


@pytest.mark.parametrize(
    ("endpoint", "name"),
    [("ftp://127.0.0.1:9", "UnsupportedProtocol"), ("127.0.0.1:9", "UnsupportedProtocol")],
)
def test_unsendable_request_is_not_retried(make_rig: RigFactory, endpoint: str, name: str) -> None:
    rig = make_rig(endpoint)
    with pytest.raises(PolicyApiError) as info:
        create(rig)
    assert info.value.transient is False
    assert str(info.value) == f"POST /createpolicy: {name}: the request could not be sent"
    assert info.value.__context__ is None and info.value.__cause__ is None
    assert rig.outcomes() == ["failed"] and rig.sleeps == []


def test_calls_beyond_the_pool_wait_within_their_deadline(
    hostile: ApiFactory, make_rig: RigFactory
) -> None:
    server = hostile()
    rig = make_rig(server.base_url, timeout_seconds=TIMEOUT, max_attempts=1, max_concurrency=1)
    assert rig.api.get_policy_status(FIXED_POLICY_ID, rig.record).ok
    # Hold the only connection slot, as a call in flight would: the next call waits for it,
    # and gives up when its attempt's deadline passes instead of opening a second connection.
    transport, _ = rig.api._connection()
    assert transport.slots.acquire(timeout=0)
    try:
        started = time.monotonic()
        with pytest.raises(PolicyApiError) as info:
            rig.api.get_policy_status(FIXED_POLICY_ID, rig.record)
        elapsed = time.monotonic() - started
        assert "PoolTimeout: no complete answer within the 1s attempt limit" in str(info.value)
        assert TIMEOUT * 0.9 <= elapsed <= TIMEOUT + MARGIN
    finally:
        transport.slots.release()
    assert rig.api.get_policy_status(FIXED_POLICY_ID, rig.record).ok


@contextlib.contextmanager
def _tls_dripper() -> Iterator[str]:
    """A TCP server that answers a TLS ClientHello with a record header, then one byte of the
    record every 0.15 s: a handshake that never completes but is never silent either."""
    listener = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def serve() -> None:
        with contextlib.suppress(OSError):
            conn, _ = listener.accept()
            with conn:
                conn.recv(4096)
                conn.sendall(bytes([0x16, 0x03, 0x03, 0x40, 0x00]))  # handshake, 16 KiB
                while not stop.wait(0.15):
                    conn.sendall(b"\x00")

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield f"https://127.0.0.1:{listener.getsockname()[1]}"
    finally:
        stop.set()
        listener.close()
        thread.join(timeout=5)


def test_a_dripping_tls_handshake_ends_within_the_deadline(make_rig: RigFactory) -> None:
    with _tls_dripper() as url:
        rig = make_rig(url, timeout_seconds=TIMEOUT, max_attempts=1)
        started = time.monotonic()
        with pytest.raises(PolicyApiError) as info:
            create(rig)
        elapsed = time.monotonic() - started
    assert info.value.transient is True and "Timeout" in str(info.value)
    assert TIMEOUT * 0.9 <= elapsed <= TIMEOUT + MARGIN
