"""The Policy API as a Dagster resource: its configuration, and one plain client to call it.

The client (`policy_pipeline.core.policy_api.PolicyApiClient`) knows nothing of Dagster; the
resource only holds the configuration Dagster shows and validates, and hands out a client the
way dagster-fivetran's resource does::

    client = policy_api.get_client()
    client.create_policy(payload, idempotency_key, on_attempt)
"""

from __future__ import annotations

import dataclasses
import threading
from typing import Any

from dagster import ConfigurableResource, InitResourceContext
from pydantic import Field, PrivateAttr

from policy_pipeline.core.policy_api import PolicyApiClient, PolicyApiConfig
from policy_pipeline.core.settings import ApiSettings, GuardSettings, setting_field

# The client's defaults are the single source (the settings take theirs from it); the fields
# carry the limits that PolicyApiConfig checks, so that Dagster rejects a bad value when the run
# is launched.
_DEFAULT = PolicyApiConfig


def _setting(name: str) -> Any:
    return setting_field(ApiSettings, name)


class PolicyApiResource(ConfigurableResource):
    """HTTP client for the Policy API (create policy, policy status, circuit breaker)."""

    endpoint: str = Field(description="Base URL of the Policy API (POLICY_API_ENDPOINT).")
    api_key: str = Field(
        repr=False, description="Sent as 'Authorization: Bearer ...' (POLICY_API_KEY)."
    )
    create_path: str = _DEFAULT.create_path
    status_path: str = _DEFAULT.status_path
    circuit_path: str = _DEFAULT.circuit_path
    timeout_seconds: float = Field(default=_DEFAULT.timeout_seconds, gt=0)
    max_attempts: int = _setting("max_attempts")
    backoff_initial_seconds: float = _setting("backoff_initial_seconds")
    backoff_max_seconds: float = _setting("backoff_max_seconds")
    retry_after_max_seconds: float = Field(
        default=_DEFAULT.retry_after_max_seconds,
        ge=0,
        description="Cap on a server-requested Retry-After wait.",
    )
    max_concurrency: int = _setting("max_concurrency")
    guard_failure_threshold: int = _setting("guard_failure_threshold")
    guard_cooldown_seconds: int = _setting("guard_cooldown_seconds")

    _client: PolicyApiClient | None = PrivateAttr(default=None)
    _client_lock: threading.Lock = PrivateAttr(default_factory=threading.Lock)

    def setup_for_execution(self, context: InitResourceContext) -> None:
        self._client = None

    def teardown_after_execution(self, context: InitResourceContext) -> None:
        with self._client_lock:
            client, self._client = self._client, None
        if client is not None:
            client.close()

    def __repr__(self) -> str:
        return f"PolicyApiResource(endpoint={self.endpoint!r})"

    __str__ = __repr__

    def client_config(self) -> PolicyApiConfig:
        # The resource's fields have the client configuration's names.
        return PolicyApiConfig(
            **{name.name: getattr(self, name.name) for name in dataclasses.fields(PolicyApiConfig)}
        )

    def guard_settings(self) -> GuardSettings:
        return GuardSettings(
            failure_threshold=self.guard_failure_threshold,
            cooldown_seconds=self.guard_cooldown_seconds,
        )

    def get_client(self) -> PolicyApiClient:
        """The client of this resource instance: one, created on first use (steps call from
        many threads), so all calls share its connection pool; closed at teardown. The key is
        checked when the client first calls the API."""
        with self._client_lock:
            if self._client is None:
                self._client = PolicyApiClient(self.client_config())
            return self._client
