"""The Policy API client: its three endpoints, and the retry loop around them.

Transient failures (no answer, 429, 5xx, and a 409 that says a POST with the same
Idempotency-Key is still in flight) are retried with capped exponential backoff and full
jitter, honouring ``Retry-After``; other answers, 4xx included, are returned to the caller.
Every attempt is reported to the caller's ``on_attempt``, which may end a call's retries by
returning an error (`policy_pipeline.core.policy_api_types.AttemptCallback`); that is why the
retries are this loop and not urllib3's ``Retry``.
"""

from __future__ import annotations

import email.utils
import functools
import json
import random
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from types import TracebackType
from typing import Any
from urllib.parse import quote, urlsplit

from policy_pipeline.core.policy_api.answers import ResponseScrubber, decode_text
from policy_pipeline.core.policy_api.config import PolicyApiConfig
from policy_pipeline.core.policy_api.transport import AttemptFailed, Transport
from policy_pipeline.core.policy_api_types import (
    MAX_RECORDED_BODY,
    ApiAttempt,
    ApiResponse,
    AttemptCallback,
    PolicyApiError,
    api_key_problem,
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


def _about_idempotency(text: str, data: Any) -> bool:
    """Whether a 409/422 answer is the IETF idempotency-key draft's: a body about the key, or
    no readable explanation at all. A JSON error about something else (the simulator's 409
    "policy not ready") is the API's answer to the request itself."""
    return data is None or "idempoten" in text.lower()


def _json_body(body: Any) -> bytes:
    # Compact UTF-8, no NaN, the same bytes every time: an API that fingerprints the body of an
    # Idempotency-Key must see a retry as the same request.
    return json.dumps(body, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode()


class PolicyApiClient:
    """HTTP client for the Policy API (create policy, policy status, circuit breaker).

    Safe to share between threads: one session (built on first use) and at most
    ``max_concurrency`` connections serve them all. ``close()`` (or leaving a ``with``
    block) closes the connections; a later call opens new ones. ``sleep`` is how the client
    waits between attempts (tests record it instead)."""

    def __init__(
        self, config: PolicyApiConfig, *, sleep: Callable[[float], None] = time.sleep
    ) -> None:
        self.config = config
        self._sleep = sleep
        self._http_lock = threading.Lock()
        self._http: Transport | None = None
        self._scrubber: ResponseScrubber | None = None

    def __repr__(self) -> str:
        return f"PolicyApiClient(endpoint={self.config.endpoint!r})"

    __str__ = __repr__

    def __enter__(self) -> PolicyApiClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        with self._http_lock:
            http, self._http = self._http, None
        if http is not None:
            http.close()

    def _connection(self) -> tuple[Transport, ResponseScrubber]:
        # Steps call one client from many threads: build one transport, once.
        with self._http_lock:
            if self._http is None or self._scrubber is None:
                # A key read from a secret file often ends in a newline. Anything else
                # unprintable would be quoted, key and all, in a header-validation error, and
                # a non-ASCII one fails to encode mid-run; the check is here, on first use, so
                # a bad key is a clean non-transient error of the call, before anything is sent.
                problem = api_key_problem(self.config.api_key)
                if problem is not None:
                    raise PolicyApiError(f"POLICY_API_KEY {problem}", transient=False)
                key = self.config.api_key.strip()
                config = self.config
                self._http = Transport(key, config.max_concurrency, config.timeout_seconds)
                self._scrubber = ResponseScrubber(key)
            return self._http, self._scrubber

    def _url(self, path: str) -> str:
        if urlsplit(path).scheme:  # an absolute path setting wins over the endpoint
            return path
        return f"{self.config.endpoint.rstrip('/')}/{path.lstrip('/')}"

    # --- the three endpoints --------------------------------------------------------------------

    def create_policy(
        self, payload: dict[str, Any], idempotency_key: str, on_attempt: AttemptCallback
    ) -> ApiResponse:
        return self._call(
            "createpolicy", "POST", self.config.create_path, payload, idempotency_key, on_attempt
        )

    def get_policy_status(
        self, policy_id: str, on_attempt: AttemptCallback, max_attempts: int | None = None
    ) -> ApiResponse:
        """``max_attempts`` (default: the client's) caps this call's attempts: the progress
        sensor makes one, and polls again at its next tick."""
        path = self.config.status_path.format(policy_id=quote(policy_id, safe=""))
        return self._call("policy_status", "GET", path, None, None, on_attempt, max_attempts)

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
        return self._call(
            "circuit", "POST", self.config.circuit_path, body, idempotency_key, on_attempt
        )

    # --- retries --------------------------------------------------------------------------------

    def backoff_seconds(self, attempt: int, retry_after: float | None) -> float:
        config = self.config
        if retry_after is not None:
            return min(retry_after, config.retry_after_max_seconds)
        growth = 2 ** min(attempt - 1, 32)  # bounded: a huge attempt number must not overflow
        ceiling = min(config.backoff_max_seconds, config.backoff_initial_seconds * growth)
        return random.uniform(0, ceiling)  # full jitter

    def _call(
        self,
        endpoint: str,
        method: str,
        path: str,
        body: dict[str, Any] | None,
        idempotency_key: str | None,
        on_attempt: AttemptCallback,
        max_attempts: int | None = None,
    ) -> ApiResponse:
        config = self.config
        attempts = config.max_attempts if max_attempts is None else max(1, max_attempts)
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        content = None if body is None else _json_body(body)
        if content is not None:
            headers["Content-Type"] = "application/json"
        keyed_post = method == "POST" and bool(idempotency_key)
        transport, scrubber = self._connection()
        url = self._url(path)
        attempt_of = functools.partial(ApiAttempt, endpoint, method, path)
        last_problem = ""
        retry_after: float | None = None  # the last attempt's
        for attempt in range(1, attempts + 1):
            retrying = attempt < attempts
            started = time.monotonic()
            failed: AttemptFailed | None = None
            try:
                answer = transport.send(method, url, content, headers)
            except AttemptFailed as exc:
                failed = exc
            latency = (time.monotonic() - started) * 1000
            retry_after = None
            if failed is not None and not failed.sendable:
                on_attempt(attempt_of(attempt, 0.0, None, "failed", None, failed.problem))
                raise PolicyApiError(f"{method} {path}: {failed.problem}", transient=False)
            if failed is not None:
                last_problem = scrubber.text(failed.problem)
                outcome = "retry" if retrying else "failed"
                report = attempt_of(attempt, latency, None, outcome, None, last_problem)
            else:
                text, data = scrubber.body(decode_text(answer.body, answer.content_type))
                about_key = keyed_post and _about_idempotency(text, data)
                # IETF idempotency-key draft: 409 = a request with this key is still in flight.
                in_flight = answer.status == 409 and about_key
                transient = answer.status == 429 or answer.status >= 500 or in_flight
                if transient:
                    retry_after = parse_retry_after(answer.retry_after)
                report = attempt_of(
                    attempt,
                    latency,
                    answer.status,
                    ("retry" if retrying else "failed") if transient else "ok",
                    data if data is not None else text[:MAX_RECORDED_BODY],
                    None,
                    retry_after,
                )
                if not transient:
                    on_attempt(report)
                    return ApiResponse(
                        endpoint,
                        method,
                        path,
                        answer.status,
                        text,
                        data,
                        latency,
                        attempt,
                        # IETF draft: 422 = this key was used with another body.
                        idempotency_key_reused=answer.status == 422 and about_key,
                    )
                last_problem = f"HTTP {answer.status}"
                if in_flight:
                    last_problem += " (a request with this Idempotency-Key is still in flight)"
            stop = on_attempt(report)
            if not retrying:
                break
            if stop is not None:
                raise stop  # the caller ends the call's retries (the API guard, a lease fence)
            self._sleep(self.backoff_seconds(attempt, retry_after))
        raise PolicyApiError(
            f"{method} {path} failed after {attempts} attempts (last: {last_problem})",
            transient=True,
            retry_after=retry_after,
        )
