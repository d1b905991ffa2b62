"""Every setting of the product: the one place that declares them and reads them.

Each knob is declared once, in the section it belongs to, with its default, its environment
variable, its lower bound and what it does (`_knob`); the engine, the client and the Dagster
definitions take these sections as they are. ``Settings.from_env()`` reads them all when the
code location loads (the Component) or the CLI starts, and the result is passed down: runs,
sensor ticks and checks read no environment. Run config and the Component's attributes
override a knob under its own name (`override_field`, `with_overrides`). Nothing is written
back to the environment.

Secrets (POLICY_API_KEY, SNOWFLAKE_PASSWORD, ...) are not part of the settings: the Dagster
resources get them as ``EnvVar`` references, resolved only at run time and never shown.
Whether one is set chooses Snowflake's authentication; ``Settings.secret_if_set`` hands a value
over only to check its form at load and to the CLI's own warehouse connection.
"""

from __future__ import annotations

import dataclasses
import os
import random
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal, TypeVar

from pydantic import Field as PydanticField

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


_API = PolicyApiConfig(endpoint="", api_key="")  # the client's own defaults


def _knob(default: Any, env: str, doc: str, minimum: float = 0) -> Any:
    """A setting: its default, the environment variable that overrides it, what it does and its
    lower bound (the run config and Component fields that override it say the same)."""
    return field(default=default, metadata={"env": env, "doc": doc, "minimum": minimum})


_Section = TypeVar("_Section")


class _Env:
    """Typed reads of one environment mapping, each naming the variable at fault."""

    def __init__(self, environ: Mapping[str, str]) -> None:
        self._environ = environ

    def text(self, name: str, default: str = "") -> str:
        return self._environ.get(name, "").strip() or default

    def is_set(self, name: str) -> bool:
        return bool(self.text(name))

    def integer(self, name: str, default: int, minimum: int = 0) -> int:
        return int(self._number(name, default, minimum, int, "an integer"))

    def number(self, name: str, default: float, minimum: float = 0.0) -> float:
        return self._number(name, default, minimum, float, "a number")

    def _number(
        self, name: str, default: float, minimum: float, kind: type[float], what: str
    ) -> float:
        raw = self.text(name)
        if not raw:
            return default
        try:
            value = kind(raw)
        except ValueError:
            raise SettingsError(f"environment variable {name}={raw!r} is not {what}") from None
        if value < minimum:
            raise SettingsError(f"environment variable {name}={value} must be at least {minimum}")
        return value

    def path(self, name: str, default: str) -> Path:
        candidate = Path(self.text(name, default)).expanduser()
        return candidate if candidate.is_absolute() else PROJECT_ROOT / candidate

    def section(self, cls: type[_Section]) -> _Section:
        """A settings section, each of its knobs from its environment variable or default."""
        values: dict[str, Any] = {}
        for knob in fields(cls):  # type: ignore[arg-type]
            name = knob.metadata.get("env")
            if name is None:
                continue
            default: Any = knob.default
            if isinstance(default, int):
                values[knob.name] = self.integer(name, default, int(knob.metadata["minimum"]))
            else:
                values[knob.name] = self.number(name, default, knob.metadata["minimum"])
        return cls(**values)


@dataclass(frozen=True)
class ApiSettings:
    """The Policy API client (the endpoint and key are EnvVars: API_ENDPOINT_VAR, API_KEY_VAR)."""

    timeout_seconds: float = _knob(
        _API.timeout_seconds,
        "POLICY_API_TIMEOUT_SECONDS",
        "Total deadline of each API attempt: connect, headers and body",
    )
    max_attempts: int = _knob(
        _API.max_attempts,
        "POLICY_API_MAX_ATTEMPTS",
        "Attempts per API call for transient failures",
        minimum=1,
    )
    backoff_initial_seconds: float = _knob(
        _API.backoff_initial_seconds,
        "POLICY_API_BACKOFF_INITIAL_SECONDS",
        "First wait between attempts (capped exponential backoff, full jitter)",
    )
    backoff_max_seconds: float = _knob(
        _API.backoff_max_seconds, "POLICY_API_BACKOFF_MAX_SECONDS", "Cap on a wait between attempts"
    )
    max_concurrency: int = _knob(
        _API.max_concurrency,
        "POLICY_API_MAX_CONCURRENCY",
        "Policy API calls in flight at once for a run or a sensor tick",
        minimum=1,
    )
    guard_failure_threshold: int = _knob(
        _API.guard_failure_threshold,
        "POLICY_GUARD_FAILURE_THRESHOLD",
        "Consecutive transient API failures that open the guard",
        minimum=1,
    )
    guard_cooldown_seconds: int = _knob(
        _API.guard_cooldown_seconds,
        "POLICY_GUARD_COOLDOWN_SECONDS",
        "How long the guard stays open before one probe call",
    )


@dataclass(frozen=True)
class PollingSettings:
    """How a run polls a policy until ready: the first poll one initial interval after it
    entered the step, then growing intervals. The limits are per policy: one policy's exhausted
    polls end only its own wait. Run config overrides each for a run."""

    initial_interval_seconds: float = _knob(
        1.0, "POLICY_POLL_INITIAL_INTERVAL_SECONDS", "Wait before the first poll and after it"
    )
    max_interval_seconds: float = _knob(
        30.0, "POLICY_POLL_MAX_INTERVAL_SECONDS", "Cap on the wait between polls"
    )
    backoff_multiplier: float = _knob(
        2.0, "POLICY_POLL_BACKOFF_MULTIPLIER", "Growth of the wait per poll", minimum=1.0
    )
    max_polls: int = _knob(
        60, "POLICY_POLL_MAX_POLLS", "Polls per policy and run before giving up on it", minimum=1
    )
    deadline_seconds: float = _knob(
        900.0, "POLICY_POLL_DEADLINE_SECONDS", "Polling deadline per policy and run"
    )
    wait_handoff_seconds: float = _knob(
        120.0,
        "POLICY_WAIT_HANDOFF_SECONDS",
        "A policy still not ready after this long in a run is handed off: the run lets it go "
        "and policy_progress_sensor polls it (0: never)",
    )
    wait_poll_interval_seconds: float = _knob(
        300.0,
        "POLICY_WAIT_POLL_INTERVAL_SECONDS",
        "How often a handed-off policy is polled; also how often the warehouse is touched at "
        "all while policies only wait (its cost lever)",
        minimum=1.0,
    )
    not_found_grace_seconds: float = _knob(
        60.0,
        "POLICY_POLL_NOT_FOUND_GRACE_SECONDS",
        "A 404 this soon after the create answer is 'not visible yet': polled again, counted",
    )

    def interval(self, poll_number: int) -> float:
        base = min(
            self.max_interval_seconds,
            self.initial_interval_seconds * self.backoff_multiplier ** min(poll_number - 1, 64),
        )
        # "Equal jitter": never zero, never more than the computed interval.
        return base / 2 + random.uniform(0, base / 2)


@dataclass(frozen=True)
class LeaseSettings:
    """A run renews its leases every third of the TTL, so a crashed run's policies are free
    within the TTL; a holder known to be gone is taken over at once."""

    ttl_seconds: int = _knob(
        30, "POLICY_LEASE_TTL_SECONDS", "How long a run's claim on a policy lasts unrenewed", 5
    )
    wait_seconds: float = _knob(
        60.0, "POLICY_LEASE_WAIT_SECONDS", "How long a run waits for a policy another run holds"
    )

    @property
    def renew_seconds(self) -> float:
        return self.ttl_seconds / 3

    @property
    def fence_seconds(self) -> float:
        """How long after a confirming statement was sent calls may still start: the TTL less
        a sixth of it, for the time between a call's start check and its request reaching the
        API, and for warehouse and worker clocks that run at slightly different rates."""
        return self.ttl_seconds * 5 / 6

    @property
    def warehouse_wait_seconds(self) -> float:
        """The longest wait on the warehouse (a lock, a connection) that leaves a renewal time
        to land before the fence: a third of the TTL."""
        return self.ttl_seconds / 3


@dataclass(frozen=True)
class GuardSettings:
    """The API guard: after ``failure_threshold`` consecutive transient failures it opens for
    ``cooldown_seconds`` (the values come from `ApiSettings`' guard_* knobs)."""

    failure_threshold: int = _API.guard_failure_threshold
    cooldown_seconds: int = _API.guard_cooldown_seconds
    probe_timeout_seconds: int = 300


@dataclass(frozen=True)
class ProgressSettings:
    """`policy_progress_sensor` (docs/how-it-behaves.md, "Nothing waits on a person")."""

    tick_seconds: int = _knob(30, "POLICY_PROGRESS_TICK_SECONDS", "The tick interval", 1)
    queue_limit: int = _knob(
        20,
        "POLICY_PROGRESS_QUEUE_LIMIT",
        "While this many of its runs wait in the run queue, it launches no more",
        minimum=1,
    )
    wait_deadline_seconds: float = _knob(
        86_400.0,
        "POLICY_WAIT_DEADLINE_SECONDS",
        "A handed-off policy not ready this long after its creation ends error for good",
        minimum=1,
    )
    wait_poll_batch: int = _knob(
        2_000, "POLICY_WAIT_POLL_BATCH", "Handed-off policies polled per tick at most", 1
    )
    tick_budget_seconds: float = _knob(
        20.0, "POLICY_PROGRESS_TICK_BUDGET_SECONDS", "No poll starts later into a tick", 1
    )
    resume_max_attempts: int = _knob(
        5, "POLICY_RESUME_MAX_ATTEMPTS", "Automatic resumptions per execution, then error"
    )
    resume_backoff_seconds: float = _knob(
        60.0, "POLICY_RESUME_BACKOFF_SECONDS", "Wait before the first resumption, then doubled"
    )
    resume_backoff_max_seconds: float = _knob(
        3_600.0, "POLICY_RESUME_BACKOFF_MAX_SECONDS", "Cap on the wait before a resumption"
    )
    resume_batch: int = 500  # candidates read per scan

    def resume_backoff(self, count: int) -> float:
        growth = 2.0 ** min(count, 32)
        return min(self.resume_backoff_max_seconds, self.resume_backoff_seconds * growth)


@dataclass(frozen=True)
class CheckSettings:
    """The asset checks and `policy-pipeline diagnose`."""

    stuck_after_minutes: int = _knob(
        60,
        "POLICY_STUCK_AFTER_MINUTES",
        "An execution still in flight after this long is stuck",
        minimum=1,
    )
    success_rate_window_hours: int = _knob(
        24, "POLICY_SUCCESS_RATE_WINDOW_HOURS", "The success-rate window", minimum=1
    )
    success_rate_warn_percent: float = _knob(
        95.0, "POLICY_SUCCESS_RATE_WARN_PERCENT", "Below this rate the check fails with WARN"
    )
    success_rate_error_percent: float = _knob(
        80.0, "POLICY_SUCCESS_RATE_ERROR_PERCENT", "Below this rate the check fails with ERROR"
    )


@dataclass(frozen=True)
class ArchiveSettings:
    retention_days: int = _knob(
        7, "POLICY_ARCHIVE_RETENTION_DAYS", "Terminal executions older than this are archived"
    )
    batch_size: int = _knob(
        500, "POLICY_ARCHIVE_BATCH_SIZE", "Executions moved per archive transaction", minimum=1
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
    api_endpoint: str
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
            api_endpoint=env.text(API_ENDPOINT_VAR),
            api=env.section(ApiSettings),
            polling=env.section(PollingSettings),
            leases=env.section(LeaseSettings),
            progress=env.section(ProgressSettings),
            checks=env.section(CheckSettings),
            archive=env.section(ArchiveSettings),
            backfill_max_partitions_per_run=env.integer(
                "POLICY_BACKFILL_MAX_PARTITIONS_PER_RUN", 0, minimum=0
            )
            or None,
        )

    @staticmethod
    def secret_if_set(name: str) -> str | None:
        """A secret's value, to check its form at load or for the CLI's warehouse connection
        (never kept, shown or logged)."""
        return os.environ.get(name)

    def snowflake(self, environ: Mapping[str, str] | None = None) -> SnowflakeSettings:
        """Read only when the warehouse is Snowflake: its variables mean nothing otherwise."""
        return SnowflakeSettings.read(_Env(os.environ if environ is None else environ))


def override_field(section: type, name: str) -> Any:
    """A run config field or Component attribute that overrides the setting ``name`` of
    ``section`` (same name; None, the default, keeps the setting), with the setting's lower
    bound and description."""
    knob = {each.name: each for each in fields(section)}[name]
    return PydanticField(
        default=None,
        ge=knob.metadata["minimum"],
        description=f"{knob.metadata['doc']} (default: {knob.metadata['env']}, "
        f"else {knob.default:g}).",
    )


def setting_field(section: type, name: str) -> Any:
    """A Dagster resource field for the setting ``name`` of ``section``: its default, lower
    bound and description (the resource built from the settings passes the value)."""
    knob = {each.name: each for each in fields(section)}[name]
    return PydanticField(
        default=knob.default,
        ge=knob.metadata["minimum"],
        description=f"{knob.metadata['doc']} ({knob.metadata['env']}).",
    )


def with_overrides(section: _Section, given: Mapping[str, Any]) -> _Section:
    """The settings section with each value given for one of its knobs (not None) in place of
    the setting: run config and Component attributes use the knobs' names."""
    names = {each.name for each in fields(section)}  # type: ignore[arg-type]
    chosen = {name: value for name, value in given.items() if name in names and value is not None}
    return dataclasses.replace(section, **chosen)  # type: ignore[type-var]


def dagster_home_set() -> bool:
    """Whether DAGSTER_HOME names the instance (Dagster itself reads it)."""
    return bool(os.environ.get("DAGSTER_HOME", "").strip())
