"""What a ``POST /circuit`` answer means (step 3, the ``circuit_breaker_activation`` asset):
`read_circuit`. The step itself (the claim, the call, the completed write) is
`flow.trigger_circuit_breaker`.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from policy_pipeline.core.domain import (
    FAILURE_STATUSES,
)
from policy_pipeline.core.policy_api_types import ApiResponse

# Statuses of a 2xx circuit answer that say the breaker was not triggered (compared lower-case,
# spaces and dashes as underscores).
NOT_TRIGGERED_STATUSES = FAILURE_STATUSES | {
    "not_triggered",
    "refused",
    "denied",
    "declined",
    "not_ready",
}
# Statuses that say it was.
TRIGGERED_STATUSES = frozenset({"triggered", "already_triggered", "success", "completed", "ok"})
# A refusal in these words is about timing (the API does not see the policy ready yet): the
# same call is repeated later.
_NOT_YET = re.compile(r"\bnot[\s_-]+(?:yet[\s_-]+)?ready\b|\bnot[\s_-]+yet\b", re.IGNORECASE)


@dataclass(frozen=True)
class CircuitReading:
    """`read_circuit`'s reading of one answer to ``POST /circuit``."""

    triggered: bool
    error: str | None = None  # not triggered: why, in the API's words
    resumable: bool = True  # not triggered: whether a later run repeats the call


def read_circuit(response: ApiResponse) -> CircuitReading:
    """What a ``POST /circuit`` answer means.

    A 2xx is the confirmation HTTP says it is (no body, as a 204, and ``{}`` included) unless
    its JSON says the breaker was not triggered: a failure status, ``triggered``, ``success``
    or ``ok`` false, an ``error`` (or ``errors``) that is not empty. Such a refusal is final
    for the execution (the API answered; an automatic repeat would only ask again what it
    refused), except when its words say the policy is not ready yet, or ``retryable`` is true,
    and nothing in it claims the breaker fired: then a later run repeats the call. A 2xx whose
    body is neither empty nor a JSON object (a proxy's HTML page) confirms nothing: resumable.
    """
    if not response.ok:
        return CircuitReading(False, f"{response.describe()}: {response.excerpt()}")
    if not response.text.strip():
        return CircuitReading(True)
    data = response.data
    if not isinstance(data, dict):
        # A body that cannot be read (an HTML page from a proxy) is no confirmation that the
        # breaker fired: the next run repeats the call with the same idempotency key.
        problem = f"{response.describe()} without a readable confirmation"
        return CircuitReading(False, f"{problem}: {response.excerpt()}")
    signs = _not_triggered_signs(data)
    if not signs:
        return CircuitReading(True)
    status = _word(data.get("status"))
    claims_fired = status in TRIGGERED_STATUSES or data.get("triggered") is True
    words = " ".join(
        json.dumps(data[key])
        for key in ("status", "error", "errors", "message", "reason")
        if key in data
    )
    not_yet = bool(_NOT_YET.search(words)) or status == "not_ready" or data.get("retryable") is True
    resumable = not_yet and not claims_fired
    then = "a later run repeats the call" if resumable else "not repeated automatically"
    error = (
        f"{response.describe()} but the circuit breaker was not triggered "
        f"({', '.join(signs)}); {then}: {response.excerpt()}"
    )
    return CircuitReading(False, error, resumable)


def _word(value: object) -> str | None:
    if not isinstance(value, str):
        return None
    return re.sub(r"[\s-]+", "_", value.strip().lower())


def _not_triggered_signs(data: dict[str, Any]) -> list[str]:
    """What in a 2xx circuit answer says the breaker was not triggered."""
    signs = []
    if _word(data.get("status")) in NOT_TRIGGERED_STATUSES:
        signs.append(_shown(data, "status"))
    for flag in ("triggered", "success", "ok"):
        value = data.get(flag)
        if value is False or _word(value) == "false":
            signs.append(_shown(data, flag))
    for name in ("error", "errors"):
        if data.get(name) not in (None, False, "", [], {}):
            signs.append(_shown(data, name))
    return signs


def _shown(data: dict[str, Any], key: str, limit: int = 120) -> str:
    text = json.dumps(data[key])
    return f"{key}: {text if len(text) <= limit else text[:limit] + '...'}"
