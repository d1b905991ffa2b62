"""The Policy API client under test, shared by the client's tests against the simulator and
against the hostile API: a client whose back-off sleeps are recorded instead of slept, and the
attempts it reported."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from policy_pipeline.core.policy_api import PolicyApiClient, PolicyApiConfig
from policy_pipeline.core.policy_api_types import ApiAttempt

PROXY_ENV_VARS = (
    "HTTP_PROXY",
    "HTTPS_PROXY",
    "ALL_PROXY",
    "http_proxy",
    "https_proxy",
    "all_proxy",
)


@dataclasses.dataclass
class Rig:
    """A client under test plus everything it reported."""

    api: PolicyApiClient
    sleeps: list[float]
    attempts: list[ApiAttempt]

    def record(self, attempt: ApiAttempt) -> None:
        self.attempts.append(attempt)

    def outcomes(self) -> list[str]:
        return [a.outcome for a in self.attempts]

    def numbers(self) -> list[int]:
        return [a.attempt for a in self.attempts]


RigFactory = Callable[..., Rig]


def clear_proxies(monkeypatch: pytest.MonkeyPatch) -> None:
    # The client's requests session honours proxy variables; loopback traffic must not use one.
    for name in PROXY_ENV_VARS:
        monkeypatch.delenv(name, raising=False)


def rigs(default_key: str) -> Iterator[RigFactory]:
    """The body of a `make_rig` fixture: rigs built with ``default_key`` unless told another,
    every client closed after the test."""
    built: list[Rig] = []

    def _make(endpoint: str, api_key: str = default_key, **overrides: Any) -> Rig:
        sleeps: list[float] = []
        config = PolicyApiConfig(endpoint=endpoint, api_key=api_key, **overrides)
        rig = Rig(api=PolicyApiClient(config, sleep=sleeps.append), sleeps=sleeps, attempts=[])
        built.append(rig)
        return rig

    yield _make
    for rig in built:
        rig.api.close()
