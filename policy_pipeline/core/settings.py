"""Every setting the product reads from the environment: the one place that reads them.

Each variable is named once, with its default and its lower bound, in the section it belongs
to; ``Settings.from_env()`` reads them all (it is cheap: a dict lookup each), so a process
that changes its environment sees the change on the next call. Nothing here is cached and
nothing is written back to the environment.

Secrets (POLICY_API_KEY, SNOWFLAKE_PASSWORD, ...) are not read here: the Dagster resources
get them as ``EnvVar`` references, resolved only at run time and never shown. Only whether
one is set is looked at (to choose Snowflake's authentication), never its value.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from policy_pipeline.core.engine.leases import LeasePolicy
from policy_pipeline.core.engine.policy_ready import PollingPolicy
from policy_pipeline.core.engine.progress import ProgressPolicy
from policy_pipeline.core.policy_api import PolicyApiConfig

PROJECT_ROOT = Path(__file__).resolve().parents[2]

# The environment variables that hold secrets or the endpoint: resolved by Dagster at run time.
API_ENDPOINT_VAR = "POLICY_API_ENDPOINT"
API_KEY_VAR = "POLICY_API_KEY"
SNOWFLAKE_REQUIRED_VARS = (
    "SNOWFLAKE_ACCOUNT",
    "SNOWFLAKE_USER",
    "SNOWFLAKE_ROLE",
    "SNOWFLAKE_WAREHOUSE",
    "SNOWFLAKE_DATABASE",
    "SNOWFLAKE_SCHEMA",
)
SNOWFLAKE_AUTH_VARS = ("SNOWFLAKE_PASSWORD", "SNOWFLAKE_PRIVATE_KEY", "SNOWFLAKE_PRIVATE_KEY_PATH")
SNOWFLAKE_PASSPHRASE_VAR = "SNOWFLAKE_PRIVATE_KEY_PASSPHRASE"

# Which warehouse holds the state (POLICY_WAREHOUSE); the profiles.yml targets share the names.
WarehouseKind = Literal["duckdb", "snowflake"]


class SettingsError(ValueError):
    pass


# The defaults are the engine's and the client's own (declared there, once); an environment
# variable overrides one.
_API = PolicyApiConfig(endpoint="", api_key="")
_POLLING = PollingPolicy()
_LEASE = LeasePolicy()
_PROGRESS = ProgressPolicy()


class _Env:
    """Typed reads of one environment mapping, each naming the variable at fault."""

    def __init__(self, environ: Mapping[str, str]) -> None:
        self._environ = environ

    def text(self, name: str, default: str = "") -> str:
        return self._environ.get(name, "").strip() or default

    def is_set(self, name: str) -> bool:
        return bool(self.text(name))

    def integer(self, name: str, default: int, minimum: int = 0) -> int:
        raw = self.text(name)
        if not raw:
            return default
        try:
            value = int(raw)
        except ValueError:
            raise SettingsError(f"environment variable {name}={raw!r} is not an integer") from None
        if value < minimum:
            raise SettingsError(f"environment variable {name}={value} must be at least {minimum}")
        return value

    def number(self, name: str, default: float, minimum: float = 0.0) -> float:
        raw = self.text(name)
        if not raw:
            return default
        try:
            value = float(raw)
        except ValueError:
            raise SettingsError(f"environment variable {name}={raw!r} is not a number") from None
        if value < minimum:
            raise SettingsError(f"environment variable {name}={value} must be at least {minimum}")
        return value

    def path(self, name: str, default: str) -> Path:
        candidate = Path(self.text(name, default)).expanduser()
        return candidate if candidate.is_absolute() else PROJECT_ROOT / candidate


@dataclass(frozen=True)
class ApiSettings:
    """The Policy API client (the endpoint and key are EnvVars: API_ENDPOINT_VAR, API_KEY_VAR)."""

    endpoint: str
    timeout_seconds: float
    max_attempts: int
    backoff_initial_seconds: float
    backoff_max_seconds: float
    max_concurrency: int
    guard_failure_threshold: int
    guard_cooldown_seconds: int

    @classmethod
    def read(cls, env: _Env) -> ApiSettings:
        return cls(
            endpoint=env.text(API_ENDPOINT_VAR),
            timeout_seconds=env.number("POLICY_API_TIMEOUT_SECONDS", _API.timeout_seconds),
            max_attempts=env.integer("POLICY_API_MAX_ATTEMPTS", _API.max_attempts, minimum=1),
            backoff_initial_seconds=env.number(
                "POLICY_API_BACKOFF_INITIAL_SECONDS", _API.backoff_initial_seconds
            ),
            backoff_max_seconds=env.number(
                "POLICY_API_BACKOFF_MAX_SECONDS", _API.backoff_max_seconds
            ),
            max_concurrency=env.integer(
                "POLICY_API_MAX_CONCURRENCY", _API.max_concurrent_requests, minimum=1
            ),
            guard_failure_threshold=env.integer(
                "POLICY_GUARD_FAILURE_THRESHOLD", _API.guard_failure_threshold, minimum=1
            ),
            guard_cooldown_seconds=env.integer(
                "POLICY_GUARD_COOLDOWN_SECONDS", _API.guard_cooldown_seconds, minimum=0
            ),
        )


@dataclass(frozen=True)
class PollingSettings:
    """Defaults of the workflow run's polling (run config overrides each)."""

    initial_seconds: float
    max_interval_seconds: float
    backoff_multiplier: float
    max_polls: int
    deadline_seconds: float
    handoff_seconds: float
    not_found_grace_seconds: float  # runs and policy_progress_sensor alike

    @classmethod
    def read(cls, env: _Env) -> PollingSettings:
        return cls(
            initial_seconds=env.number(
                "POLICY_POLL_INITIAL_SECONDS", _POLLING.initial_interval_seconds
            ),
            max_interval_seconds=env.number(
                "POLICY_POLL_MAX_INTERVAL_SECONDS", _POLLING.max_interval_seconds
            ),
            backoff_multiplier=env.number(
                "POLICY_POLL_BACKOFF_MULTIPLIER", _POLLING.backoff_multiplier, minimum=1.0
            ),
            max_polls=env.integer("POLICY_POLL_MAX_POLLS", _POLLING.max_polls, minimum=1),
            deadline_seconds=env.number("POLICY_POLL_DEADLINE_SECONDS", _POLLING.deadline_seconds),
            not_found_grace_seconds=env.number(
                "POLICY_POLL_NOT_FOUND_GRACE_SECONDS", _POLLING.not_found_grace_seconds
            ),
            # Not the engine's default (0: never hand off): in a Dagster run a long wait goes
            # to the progress sensor.
            handoff_seconds=env.number("POLICY_WAIT_HANDOFF_SECONDS", 120.0),
        )


@dataclass(frozen=True)
class LeaseSettings:
    ttl_seconds: int
    wait_seconds: float

    @classmethod
    def read(cls, env: _Env) -> LeaseSettings:
        return cls(
            ttl_seconds=env.integer("POLICY_LEASE_TTL_SECONDS", _LEASE.ttl_seconds, minimum=5),
            wait_seconds=env.number("POLICY_LEASE_WAIT_SECONDS", _LEASE.wait_seconds),
        )


@dataclass(frozen=True)
class ProgressSettings:
    """`policy_progress_sensor` (README, "Nothing waits on a person")."""

    tick_seconds: int
    queue_limit: int
    wait_poll_seconds: float
    wait_deadline_seconds: float
    poll_batch: int
    tick_budget_seconds: float
    resume_max_attempts: int
    resume_backoff_seconds: float
    resume_backoff_max_seconds: float

    @classmethod
    def read(cls, env: _Env) -> ProgressSettings:
        return cls(
            tick_seconds=env.integer("POLICY_PROGRESS_TICK_SECONDS", 30, minimum=1),
            queue_limit=env.integer("POLICY_PROGRESS_QUEUE_LIMIT", 20, minimum=1),
            wait_poll_seconds=env.number(
                "POLICY_WAIT_POLL_INTERVAL_SECONDS", _PROGRESS.wait_poll_seconds, minimum=1.0
            ),
            wait_deadline_seconds=env.number(
                "POLICY_WAIT_DEADLINE_SECONDS", _PROGRESS.wait_deadline_seconds, minimum=1
            ),
            poll_batch=env.integer("POLICY_WAIT_POLL_BATCH", _PROGRESS.poll_batch, minimum=1),
            tick_budget_seconds=env.number(
                "POLICY_PROGRESS_TICK_BUDGET_SECONDS", _PROGRESS.tick_budget_seconds, minimum=1
            ),
            resume_max_attempts=env.integer(
                "POLICY_RESUME_MAX_ATTEMPTS", _PROGRESS.resume_max_attempts, minimum=0
            ),
            resume_backoff_seconds=env.number(
                "POLICY_RESUME_BACKOFF_SECONDS", _PROGRESS.resume_backoff_seconds
            ),
            resume_backoff_max_seconds=env.number(
                "POLICY_RESUME_BACKOFF_MAX_SECONDS", _PROGRESS.resume_backoff_max_seconds
            ),
        )


@dataclass(frozen=True)
class CheckSettings:
    """Defaults of the asset checks and `policy-pipeline diagnose`."""

    stuck_after_minutes: int
    success_rate_window_hours: int
    success_rate_warn_percent: float
    success_rate_error_percent: float

    @classmethod
    def read(cls, env: _Env) -> CheckSettings:
        return cls(
            stuck_after_minutes=env.integer("POLICY_STUCK_AFTER_MINUTES", 60, minimum=1),
            success_rate_window_hours=env.integer(
                "POLICY_SUCCESS_RATE_WINDOW_HOURS", 24, minimum=1
            ),
            success_rate_warn_percent=env.number("POLICY_SUCCESS_RATE_WARN_PERCENT", 95.0),
            success_rate_error_percent=env.number("POLICY_SUCCESS_RATE_ERROR_PERCENT", 80.0),
        )


@dataclass(frozen=True)
class ArchiveSettings:
    retention_days: int
    batch_size: int

    @classmethod
    def read(cls, env: _Env) -> ArchiveSettings:
        return cls(
            retention_days=env.integer("POLICY_ARCHIVE_RETENTION_DAYS", 7, minimum=0),
            batch_size=env.integer("POLICY_ARCHIVE_BATCH_SIZE", 500, minimum=1),
        )


@dataclass(frozen=True)
class SnowflakeSettings:
    """What is not secret about the Snowflake connection, and which secrets are set."""

    missing: tuple[str, ...]  # required variables (or one of the auth ones) not set
    auth_var: str | None  # the variable that authenticates: password, key, or key file
    passphrase_set: bool
    host: str
    port: int | None
    protocol: str

    @classmethod
    def read(cls, env: _Env) -> SnowflakeSettings:
        missing = [name for name in SNOWFLAKE_REQUIRED_VARS if not env.is_set(name)]
        auth = next((name for name in SNOWFLAKE_AUTH_VARS if env.is_set(name)), None)
        if auth is None:
            missing.append(" or ".join(SNOWFLAKE_AUTH_VARS))
        return cls(
            missing=tuple(missing),
            auth_var=auth,
            passphrase_set=env.is_set(SNOWFLAKE_PASSPHRASE_VAR),
            host=env.text("SNOWFLAKE_HOST"),
            port=env.integer("SNOWFLAKE_PORT", 0, minimum=1) or None,
            protocol=env.text("SNOWFLAKE_PROTOCOL"),
        )


@dataclass(frozen=True)
class Settings:
    warehouse: WarehouseKind
    duckdb_path: Path
    catalog_dir: Path
    dbt_project_dir: Path
    alert_webhook_url: str
    api: ApiSettings
    polling: PollingSettings
    leases: LeaseSettings
    progress: ProgressSettings
    checks: CheckSettings
    archive: ArchiveSettings
    # A backfill of more policies than this is split into runs of at most this many (Dagster's
    # multi-run backfill policy), so that the runs can go to different workers; None: one run.
    backfill_max_partitions_per_run: int | None = None

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        env = _Env(os.environ if environ is None else environ)
        warehouse = env.text("POLICY_WAREHOUSE", "duckdb").lower()
        if warehouse not in ("duckdb", "snowflake"):
            raise SettingsError(
                f"environment variable POLICY_WAREHOUSE={warehouse!r} must be "
                "'duckdb' or 'snowflake'"
            )
        return cls(
            warehouse="snowflake" if warehouse == "snowflake" else "duckdb",
            duckdb_path=env.path("POLICY_DUCKDB_PATH", "data/policy_pipeline.duckdb"),
            catalog_dir=env.path("POLICY_CATALOG_DIR", "policies"),
            dbt_project_dir=env.path("POLICY_DBT_PROJECT_DIR", "dbt_project"),
            alert_webhook_url=env.text("POLICY_ALERT_WEBHOOK_URL"),
            api=ApiSettings.read(env),
            polling=PollingSettings.read(env),
            leases=LeaseSettings.read(env),
            progress=ProgressSettings.read(env),
            checks=CheckSettings.read(env),
            archive=ArchiveSettings.read(env),
            backfill_max_partitions_per_run=env.integer(
                "POLICY_BACKFILL_MAX_PARTITIONS_PER_RUN", 0, minimum=0
            )
            or None,
        )

    @staticmethod
    def secret_if_set(name: str) -> str | None:
        """A secret's value, only to check its form at load (never kept, shown or logged)."""
        return os.environ.get(name)

    def snowflake(self, environ: Mapping[str, str] | None = None) -> SnowflakeSettings:
        """Read only when the warehouse is Snowflake: its variables mean nothing otherwise."""
        return SnowflakeSettings.read(_Env(os.environ if environ is None else environ))


def dagster_home_set() -> bool:
    """Whether DAGSTER_HOME names the instance (Dagster itself reads it)."""
    return bool(os.environ.get("DAGSTER_HOME", "").strip())
