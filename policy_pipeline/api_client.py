"""The Policy API client: one Dagster resource for the three endpoints of the seed.

Transient failures (connection errors, timeouts, 429, 5xx) are retried with capped exponential
backoff and full jitter, honouring ``Retry-After``; other 4xx are returned to the caller. Every
attempt is reported to an ``on_attempt`` callback so the caller can audit it. The API key is
only ever placed in the ``Authorization`` header: it is not logged, returned or put in errors.
"""

from __future__ import annotations

import email.utils
import random
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote

import httpx
from dagster import ConfigurableResource, InitResourceContext
from pydantic import Field, PrivateAttr

from policy_pipeline.api_types import (
    MAX_RECORDED_BODY,
    ApiAttempt,
    ApiResponse,
    AttemptCallback,
    PolicyApiError,
    parse_body,
)


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
                # unprintable would make httpx quote the header, key and all, in its error; the
                # check is here, not in a pydantic validator, whose error repeats the value.
                key = self.api_key.strip()
                if not key or not key.isprintable():
                    raise PolicyApiError(
                        "POLICY_API_KEY is empty or contains unprintable characters",
                        transient=False,
                    )
                self._client = httpx.Client(
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
        last_problem = ""
        http = self._http()
        for attempt in range(1, self.max_attempts + 1):
            started = time.monotonic()
            retry_after: float | None = None
            try:
                response = http.request(method, path, json=body, headers=headers)
            except (httpx.LocalProtocolError, httpx.UnsupportedProtocol) as exc:
                # Our request cannot be sent as built: retrying cannot help, and httpx's text
                # may quote a header value, so it is not repeated.
                problem = f"{type(exc).__name__}: the request could not be sent"
                on_attempt(
                    ApiAttempt(endpoint, method, path, attempt, 0.0, None, "failed", None, problem)
                )
                raise PolicyApiError(f"{method} {path}: {problem}", transient=False) from None
            except httpx.HTTPError as exc:
                latency = (time.monotonic() - started) * 1000
                # Transport errors name the URL, not the headers; the key is scrubbed regardless.
                last_problem = f"{type(exc).__name__}: {exc}".replace(self.api_key, "***")
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
                latency = (time.monotonic() - started) * 1000
                text = response.text
                data = parse_body(text)
                transient = response.status_code == 429 or response.status_code >= 500
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
                        response.status_code,
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
                        response.status_code,
                        text,
                        data,
                        latency,
                        attempt,
                    )
                last_problem = f"HTTP {response.status_code}"
            if attempt < self.max_attempts:
                self._sleep(self.backoff_seconds(attempt, retry_after))
        raise PolicyApiError(
            f"{method} {path} failed after {self.max_attempts} attempts (last: {last_problem})",
            transient=True,
        )
