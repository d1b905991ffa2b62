"""What the Policy API client hands back: attempts, responses and errors (no Dagster import)."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

MAX_RECORDED_BODY = 4_000


@dataclass(frozen=True)
class ApiAttempt:
    endpoint: str  # "createpolicy" | "policy_status" | "circuit"
    method: str
    path: str
    attempt: int
    latency_ms: float
    http_status: int | None
    outcome: str  # "ok" | "retry" | "failed"
    body: Any  # parsed JSON, or the raw text (truncated), or None
    error: str | None
    retry_after: float | None = None  # seconds, from a transient answer's Retry-After


@dataclass(frozen=True)
class ApiResponse:
    endpoint: str
    method: str
    path: str
    http_status: int
    text: str
    data: Any  # parsed JSON, or None when the body was empty or not JSON
    latency_ms: float
    attempts: int
    # A 422 to a POST with an Idempotency-Key whose body is about that key (IETF draft): we
    # reused a key with another body, a bug on our side that must not pass as a plain 4xx.
    idempotency_key_reused: bool = False

    @property
    def ok(self) -> bool:
        return 200 <= self.http_status < 300

    @property
    def recorded_body(self) -> Any:
        """What goes into the state table: the JSON, else the raw text (truncated)."""
        if self.data is not None:
            return self.data
        return {"raw_text": self.text[:MAX_RECORDED_BODY], "non_json": True}

    def field(self, name: str) -> Any:
        return self.data.get(name) if isinstance(self.data, dict) else None

    def excerpt(self, limit: int = 300) -> str:
        """The body's text for an error message, shortened to ``limit``."""
        text = self.text.strip()
        if not text:
            return "(empty body)"
        return text[:limit] + ("..." if len(text) > limit else "")

    def describe(self) -> str:
        if self.idempotency_key_reused:
            return (
                f"{self.method} {self.path} answered HTTP {self.http_status}: the API says this "
                "Idempotency-Key was used with a different request body — a bug in "
                "policy_pipeline, not retried"
            )
        return f"{self.method} {self.path} answered HTTP {self.http_status}"


class PolicyApiError(RuntimeError):
    """The Policy API did not give a usable answer (after retries where they apply)."""

    def __init__(self, message: str, transient: bool, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.transient = transient
        # The last attempt's Retry-After (seconds): how long the API asked us to back off.
        self.retry_after = retry_after


class InvalidApiKeyError(ValueError):
    """POLICY_API_KEY cannot be sent as a bearer token. The message never quotes the key."""


# Told of every attempt of a call. What it returns for an attempt the client would retry
# (outcome "retry") decides whether the call goes on: None lets it; an error ends the call's
# retries and the client raises it (how the engine's API guard and lease fence stop a call).
# What it returns for any other attempt is ignored.
AttemptCallback = Callable[[ApiAttempt], PolicyApiError | None]


def api_key_problem(raw: str) -> str | None:
    """What makes ``raw`` unusable as a bearer token (after stripping surrounding whitespace),
    or None. Says where, never which character: the message ends up in logs."""
    key = raw.strip()
    if not key:
        return "is empty"
    offset = len(raw) - len(raw.lstrip())
    for index, char in enumerate(key):
        where = f"at position {offset + index + 1}"
        if not char.isascii():
            # Header values go out as Latin-1 (http.client): a non-ASCII key would reach the
            # API garbled, or fail to encode (UnicodeEncodeError) mid-run.
            return f"contains a non-ASCII character {where}"
        if char.isspace():
            return f"contains whitespace {where}"
        if not char.isprintable():
            return f"contains an unprintable character {where}"
    return None


def json_value_kind(value: Any, limit: int = 60) -> str:
    """A JSON value as an error message names it: "null", "a number (12345)", "the string
    'pol_1'", "an empty string", "a list", ... (long values shortened to ``limit``)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"a boolean ({json.dumps(value)})"
    if isinstance(value, int | float):
        return f"a number ({value!r})"
    if isinstance(value, str):
        if not value.strip():
            return "an empty string" if not value else "a blank string"
        shown = value if len(value) <= limit else value[:limit] + "..."
        return f"the string {shown!r}"
    if isinstance(value, list):
        return "a list" if value else "an empty list"
    if isinstance(value, dict):
        return "an object" if value else "an empty object"
    return f"a {type(value).__name__}"


def parse_body(text: str) -> Any:
    if not text.strip():
        return None
    try:
        return json.loads(text)
    except ValueError:
        return None
