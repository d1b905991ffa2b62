"""The Policy API client: one Dagster resource for the three endpoints of the seed.

Transient failures (connection errors, timeouts, 429, 5xx, and a 409 that says a POST with
the same Idempotency-Key is still in flight) are retried with capped exponential backoff and
full jitter, honouring ``Retry-After``; other 4xx are returned to the caller. Every attempt is
reported to an ``on_attempt`` callback so the caller can audit it. Each attempt has a total
deadline of ``timeout_seconds``, headers and body included, however slowly the server drips.

The API key is only ever placed in the ``Authorization`` header, and scrubbed (raw, JSON-,
percent- and HTML-escaped) from every body, message and error the client hands back: an API
that echoes request headers must not put it into the warehouse or the logs.
"""

from __future__ import annotations

import email.utils
import html
import json
import random
import re
import ssl
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote

import httpcore
import httpx
from dagster import ConfigurableResource, InitResourceContext
from pydantic import Field, PrivateAttr

from policy_pipeline.core.policy_api_types import (
    MAX_RECORDED_BODY,
    ApiAttempt,
    ApiResponse,
    AttemptCallback,
    PolicyApiError,
    api_key_problem,
    parse_body,
)

SCRUBBED = "***"


def parse_retry_after(value: str | None, now: datetime | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header in either of its forms."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - (now or datetime.now(UTC))).total_seconds())


# --- the API key never leaves the client ------------------------------------------------------


class SecretScrubber:
    """Replaces a secret, in the forms an echoing server may render it, with ``***``."""

    def __init__(self, secret: str) -> None:
        escaped_json = json.dumps(secret)[1:-1]
        percent = quote(secret, safe="")
        forms = {
            secret,
            escaped_json,  # '"' and '\\' escaped, as in a JSON echo of the headers
            escaped_json.replace("/", "\\/"),  # encoders that escape '/' too
            percent,
            re.sub("%[0-9A-F]{2}", lambda m: m.group().lower(), percent),
            quote(secret),  # '/' left as is
            html.escape(secret),
            html.escape(secret, quote=False),
            repr(secret)[1:-1],  # error messages quote what they choke on with repr()
            repr(secret.encode("utf-8", "replace"))[2:-1],
        }
        ordered = sorted((f for f in forms if f), key=len, reverse=True)  # longest first
        self._pattern = re.compile("|".join(re.escape(f) for f in ordered)) if ordered else None

    def text(self, text: str) -> str:
        return self._pattern.sub(SCRUBBED, text) if self._pattern is not None else text

    def data(self, value: Any) -> Any:
        """Parsed JSON with every string (keys included) scrubbed."""
        if isinstance(value, str):
            return self.text(value)
        if isinstance(value, list):
            return [self.data(v) for v in value]
        if isinstance(value, dict):
            return {self.data(k): self.data(v) for k, v in value.items()}
        return value

    def body(self, raw: str) -> tuple[str, Any]:
        """A response body, scrubbed, then parsed (text, JSON or None)."""
        text = self.text(raw)
        data = parse_body(text)
        if data is not None and "\\" in text:  # JSON escapes could still hide the key
            clean = self.data(data)
            if clean != data:
                # The key was still there once decoded (\uXXXX escapes): the text the caller
                # keeps must not hold it either, so it becomes the scrubbed JSON.
                data, text = clean, json.dumps(clean)
        return text, data


# --- a total deadline per attempt ---------------------------------------------------------------
#
# httpx's timeouts bound each socket operation, not the call: a server that sends one byte
# every (timeout - 1) seconds holds a call for ever. The network backend below clamps every
# connect, read and write to what is left of the calling thread's attempt deadline, so a
# drip of headers or body ends in an ordinary httpx timeout (transient, retried) on time, and
# httpcore drops that connection cleanly as after any timeout. httpx runs a sync request in
# the calling thread, so a thread-local deadline is exactly the attempt's.

_deadline = threading.local()


@contextmanager
def _attempt_deadline(at: float) -> Iterator[None]:
    previous = getattr(_deadline, "at", None)
    _deadline.at = at
    try:
        yield
    finally:
        _deadline.at = previous


def _clamp(timeout: float | None, expired: type[Exception]) -> float | None:
    at: float | None = getattr(_deadline, "at", None)
    if at is None:
        return timeout
    left = at - time.monotonic()
    if left <= 0:
        raise expired("the attempt's deadline passed")
    return left if timeout is None else min(timeout, left)


class _DeadlineStream(httpcore.NetworkStream):
    def __init__(self, inner: httpcore.NetworkStream) -> None:
        self._inner = inner

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        return self._inner.read(max_bytes, _clamp(timeout, httpcore.ReadTimeout))

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        self._inner.write(buffer, _clamp(timeout, httpcore.WriteTimeout))

    def close(self) -> None:
        self._inner.close()

    def start_tls(
        self,
        ssl_context: ssl.SSLContext,
        server_hostname: str | None = None,
        timeout: float | None = None,
    ) -> httpcore.NetworkStream:
        inner = self._inner.start_tls(
            ssl_context, server_hostname, _clamp(timeout, httpcore.ConnectTimeout)
        )
        return _DeadlineStream(inner)

    def get_extra_info(self, info: str) -> Any:
        return self._inner.get_extra_info(info)


class _DeadlineBackend(httpcore.NetworkBackend):
    def __init__(self, inner: httpcore.NetworkBackend) -> None:
        self._inner = inner

    def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.NetworkStream:
        timeout = _clamp(timeout, httpcore.ConnectTimeout)
        stream = self._inner.connect_tcp(host, port, timeout, local_address, socket_options)
        return _DeadlineStream(stream)

    def connect_unix_socket(
        self,
        path: str,
        timeout: float | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.NetworkStream:
        timeout = _clamp(timeout, httpcore.ConnectTimeout)
        return _DeadlineStream(self._inner.connect_unix_socket(path, timeout, socket_options))

    def sleep(self, seconds: float) -> None:
        self._inner.sleep(seconds)


def _enforce_attempt_deadlines(client: httpx.Client) -> None:
    """Put the deadline backend under every connection pool of ``client`` (direct and proxied).

    httpx has no public way to pass a network backend without also giving up the proxy
    environment variables, hence the private attributes; a changed httpx fails here, loudly,
    rather than silently losing the deadline."""
    wrapped = False
    for transport in (client._transport, *client._mounts.values()):
        pool = getattr(transport, "_pool", None)
        backend = getattr(pool, "_network_backend", None)
        if isinstance(backend, httpcore.NetworkBackend):
            if not isinstance(backend, _DeadlineBackend):
                pool._network_backend = _DeadlineBackend(backend)  # type: ignore[union-attr]
            wrapped = wrapped or transport is client._transport
    if not wrapped:
        raise RuntimeError(
            "cannot enforce the Policy API attempt deadline with this httpx/httpcore version"
        )


def _about_idempotency(text: str, data: Any) -> bool:
    """Whether a 409/422 answer is the IETF idempotency-key draft's: a body about the key, or
    no readable explanation at all. A JSON error about something else (the simulator's 409
    "policy not ready") is the API's answer to the request itself."""
    return data is None or "idempoten" in text.lower()


def _transport_problem(exc: httpx.HTTPError, limit: float) -> str:
    if isinstance(exc, httpx.TimeoutException):
        return f"{type(exc).__name__}: no complete answer within the {limit:g}s attempt limit"
    return f"{type(exc).__name__}: {exc}"


class PolicyApiResource(ConfigurableResource):
    """HTTP client for the Policy API (create policy, policy status, circuit breaker)."""

    endpoint: str = Field(description="Base URL of the Policy API (POLICY_API_ENDPOINT).")
    api_key: str = Field(
        repr=False, description="Sent as 'Authorization: Bearer ...' (POLICY_API_KEY)."
    )
    create_path: str = "/createpolicy"
    status_path: str = "/policy/{policy_id}"
    circuit_path: str = "/circuit"
    timeout_seconds: float = Field(default=30.0, gt=0)
    max_attempts: int = Field(default=5, ge=1, description="Attempts per call, first included.")
    backoff_initial_seconds: float = Field(default=0.5, ge=0)
    backoff_max_seconds: float = Field(default=30.0, ge=0)
    retry_after_max_seconds: float = Field(
        default=120.0, ge=0, description="Cap on a server-requested Retry-After wait."
    )
    max_concurrent_requests: int = Field(
        default=16, ge=1, description="Policies a step works on at once (API calls in flight)."
    )
    guard_failure_threshold: int = Field(
        default=10, ge=1, description="Consecutive transient failures that open the guard."
    )
    guard_cooldown_seconds: int = Field(
        default=60, ge=0, description="How long the guard stays open before one probe call."
    )

    _client: httpx.Client | None = PrivateAttr(default=None)
    _scrubber: SecretScrubber | None = PrivateAttr(default=None)
    _client_lock: threading.Lock = PrivateAttr(default_factory=threading.Lock)
    _sleep: Callable[[float], None] = PrivateAttr(default=time.sleep)

    def setup_for_execution(self, context: InitResourceContext) -> None:
        self._client = None

    def teardown_after_execution(self, context: InitResourceContext) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None

    def __repr__(self) -> str:
        return f"PolicyApiResource(endpoint={self.endpoint!r})"

    __str__ = __repr__

    def _http(self) -> httpx.Client:
        # Steps call one resource from many threads: build one client, once.
        with self._client_lock:
            if self._client is None:
                # A key read from a secret file often ends in a newline. Anything else
                # unprintable would make httpx quote the header, key and all, in its error, and
                # a non-ASCII one raises UnicodeEncodeError (naming the character) mid-run; the
                # check is here, not in a pydantic validator, whose error repeats the value.
                problem = api_key_problem(self.api_key)
                if problem is not None:
                    raise PolicyApiError(f"POLICY_API_KEY {problem}", transient=False)
                key = self.api_key.strip()
                self._scrubber = SecretScrubber(key)
                client = httpx.Client(
                    base_url=self.endpoint.rstrip("/"),
                    timeout=self.timeout_seconds,
                    headers={"Authorization": f"Bearer {key}"},
                    # No more connections than calls in flight: httpcore scans its pool on
                    # every request, so idle extra connections cost CPU.
                    limits=httpx.Limits(
                        max_connections=self.max_concurrent_requests,
                        max_keepalive_connections=self.max_concurrent_requests,
                    ),
                )
                try:
                    _enforce_attempt_deadlines(client)
                except BaseException:
                    client.close()
                    raise
                self._client = client
            return self._client

    # --- the three endpoints --------------------------------------------------------------------

    def create_policy(
        self, payload: dict[str, Any], idempotency_key: str, on_attempt: AttemptCallback
    ) -> ApiResponse:
        return self._call(
            "createpolicy", "POST", self.create_path, payload, idempotency_key, on_attempt
        )

    def get_policy_status(self, policy_id: str, on_attempt: AttemptCallback) -> ApiResponse:
        path = self.status_path.format(policy_id=quote(policy_id, safe=""))
        return self._call("policy_status", "GET", path, None, None, on_attempt)

    def trigger_circuit_breaker(
        self,
        policy_id: str,
        execution_id: str,
        trigger_reason: str,
        idempotency_key: str,
        on_attempt: AttemptCallback,
    ) -> ApiResponse:
        body = {
            "policy_id": policy_id,
            "execution_id": execution_id,
            "trigger_reason": trigger_reason,
        }
        return self._call("circuit", "POST", self.circuit_path, body, idempotency_key, on_attempt)

    # --- retries --------------------------------------------------------------------------------

    def backoff_seconds(self, attempt: int, retry_after: float | None) -> float:
        if retry_after is not None:
            return min(retry_after, self.retry_after_max_seconds)
        growth = 2 ** min(attempt - 1, 32)  # bounded: a huge attempt number must not overflow
        ceiling = min(self.backoff_max_seconds, self.backoff_initial_seconds * growth)
        return random.uniform(0, ceiling)  # full jitter

    def _call(
        self,
        endpoint: str,
        method: str,
        path: str,
        body: dict[str, Any] | None,
        idempotency_key: str | None,
        on_attempt: AttemptCallback,
    ) -> ApiResponse:
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        keyed_post = method == "POST" and bool(idempotency_key)
        last_problem = ""
        http = self._http()
        scrubber = self._scrubber
        assert scrubber is not None  # set with the client
        for attempt in range(1, self.max_attempts + 1):
            started = time.monotonic()
            retry_after: float | None = None
            response: httpx.Response | None = None
            problem, unsendable = "", False
            try:
                with _attempt_deadline(started + self.timeout_seconds):
                    response = http.request(method, path, json=body, headers=headers)
            except (httpx.LocalProtocolError, httpx.UnsupportedProtocol) as exc:
                # Our request cannot be sent as built: retrying cannot help, and httpx's text
                # may quote a header value, so it is not repeated.
                problem = f"{type(exc).__name__}: the request could not be sent"
                unsendable = True
            except httpx.HTTPError as exc:
                # Transport errors name the URL, not the headers; the key is scrubbed regardless.
                problem = scrubber.text(_transport_problem(exc, self.timeout_seconds))
            if unsendable:
                on_attempt(
                    ApiAttempt(endpoint, method, path, attempt, 0.0, None, "failed", None, problem)
                )
                # Raised outside the except clause, so httpx's exception (which may quote the
                # header) is not even attached as its __context__.
                raise PolicyApiError(f"{method} {path}: {problem}", transient=False)
            latency = (time.monotonic() - started) * 1000
            if response is None:
                last_problem = problem
                retrying = attempt < self.max_attempts
                on_attempt(
                    ApiAttempt(
                        endpoint,
                        method,
                        path,
                        attempt,
                        latency,
                        None,
                        "retry" if retrying else "failed",
                        None,
                        last_problem,
                    )
                )
            else:
                status = response.status_code
                text, data = scrubber.body(response.text)
                about_key = keyed_post and _about_idempotency(text, data)
                # IETF idempotency-key draft: 409 = a request with this key is still in flight.
                in_flight = status == 409 and about_key
                transient = status == 429 or status >= 500 or in_flight
                retrying = transient and attempt < self.max_attempts
                outcome = "retry" if retrying else ("failed" if transient else "ok")
                if transient:
                    retry_after = parse_retry_after(response.headers.get("Retry-After"))
                on_attempt(
                    ApiAttempt(
                        endpoint,
                        method,
                        path,
                        attempt,
                        latency,
                        status,
                        outcome,
                        data if data is not None else text[:MAX_RECORDED_BODY],
                        None,
                        retry_after,
                    )
                )
                if not transient:
                    return ApiResponse(
                        endpoint,
                        method,
                        path,
                        status,
                        text,
                        data,
                        latency,
                        attempt,
                        # IETF draft: 422 = this key was used with another body.
                        idempotency_key_reused=status == 422 and about_key,
                    )
                last_problem = f"HTTP {status}"
                if in_flight:
                    last_problem += " (a request with this Idempotency-Key is still in flight)"
            if attempt < self.max_attempts:
                self._sleep(self.backoff_seconds(attempt, retry_after))
        raise PolicyApiError(
            f"{method} {path} failed after {self.max_attempts} attempts (last: {last_problem})",
            transient=True,
        )
