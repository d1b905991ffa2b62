"""How to reach the Policy API and how hard to try (no Dagster: the resource mirrors it)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


def _check(name: str, value: Any, kind: type, low: float, inclusive: bool) -> None:
    number_types: tuple[type, ...] = (int,) if kind is int else (int, float)
    if isinstance(value, bool) or not isinstance(value, number_types):
        raise TypeError(f"{name} must be {'an int' if kind is int else 'a number'}")
    if not (value >= low if inclusive else value > low):
        raise ValueError(f"{name} must be {'>=' if inclusive else '>'} {low:g}, got {value!r}")


@dataclass(frozen=True)
class PolicyApiConfig:
    """Same names, defaults and limits as the Dagster resource's fields
    (`policy_pipeline.resources.policy_api.PolicyApiResource`)."""

    endpoint: str  # base URL (POLICY_API_ENDPOINT)
    api_key: str = field(repr=False)  # sent as 'Authorization: Bearer ...' (POLICY_API_KEY)
    create_path: str = "/createpolicy"
    status_path: str = "/policy/{policy_id}"
    circuit_path: str = "/circuit"
    timeout_seconds: float = 30.0  # > 0; a whole attempt, connect to last body byte
    max_attempts: int = 5  # >= 1; attempts per call, first included
    backoff_initial_seconds: float = 0.5  # >= 0
    backoff_max_seconds: float = 30.0  # >= 0
    retry_after_max_seconds: float = 120.0  # >= 0; cap on a server-requested wait
    max_concurrency: int = 16  # >= 1; API calls in flight, and pooled connections
    guard_failure_threshold: int = 10  # >= 1; consecutive transient failures opening the guard
    guard_cooldown_seconds: int = 60  # >= 0; how long the guard stays open before one probe

    def __post_init__(self) -> None:
        for name in ("endpoint", "api_key", "create_path", "status_path", "circuit_path"):
            if not isinstance(getattr(self, name), str):
                raise TypeError(f"{name} must be a string")  # the value is not shown: a key?
        _check("timeout_seconds", self.timeout_seconds, float, 0, inclusive=False)
        _check("max_attempts", self.max_attempts, int, 1, inclusive=True)
        _check("backoff_initial_seconds", self.backoff_initial_seconds, float, 0, inclusive=True)
        _check("backoff_max_seconds", self.backoff_max_seconds, float, 0, inclusive=True)
        _check("retry_after_max_seconds", self.retry_after_max_seconds, float, 0, inclusive=True)
        _check("max_concurrency", self.max_concurrency, int, 1, inclusive=True)
        _check("guard_failure_threshold", self.guard_failure_threshold, int, 1, inclusive=True)
        _check("guard_cooldown_seconds", self.guard_cooldown_seconds, int, 0, inclusive=True)
