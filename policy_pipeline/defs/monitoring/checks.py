"""Asset checks on the results view: the health and success-rate queries and the state
machine's invariants, each run as SQL in the warehouse. A schedule runs them on their own."""

from dagster import (
    AssetCheckExecutionContext,
    AssetCheckResult,
    AssetChecksDefinition,
    AssetCheckSeverity,
    AssetKey,
    AssetSelection,
    Config,
    DefaultScheduleStatus,
    MetadataValue,
    ScheduleDefinition,
    asset_check,
    define_asset_job,
)
from pydantic import Field

from policy_pipeline.core.settings import Settings
from policy_pipeline.core.store.health import HealthReport
from policy_pipeline.resources import PolicyStateResource

RESULTS_VIEW = AssetKey("policy_execution_results")


def _jsonable(rows: list[dict[str, object]]) -> list[dict[str, object]]:
    return [
        {k: (v if isinstance(v, int | float | bool | None) else str(v)) for k, v in r.items()}
        for r in rows
    ]


class StuckConfig(Config):
    older_than_minutes: int = Field(
        default_factory=lambda: Settings.from_env().checks.stuck_after_minutes,
        description="An execution still in flight after this long is stuck "
        "(env POLICY_STUCK_AFTER_MINUTES, default 60: an hour).",
    )


@asset_check(
    asset=RESULTS_VIEW,
    description="Health: no execution still in flight (not completed) that "
    "started more than the threshold ago.",
)
def no_stuck_executions(
    context: AssetCheckExecutionContext, config: StuckConfig, policy_state: PolicyStateResource
) -> AssetCheckResult:
    monitor = HealthReport(policy_state.warehouse())
    count = monitor.stuck_count(config.older_than_minutes)
    stuck = monitor.stuck_executions(config.older_than_minutes) if count else []
    return AssetCheckResult(
        passed=count == 0,
        severity=AssetCheckSeverity.ERROR,
        description=f"{count} stuck executions (in flight > {config.older_than_minutes} min)",
        metadata={
            "stuck_count": MetadataValue.int(count),
            "threshold_minutes": MetadataValue.int(config.older_than_minutes),
            "stuck_executions": MetadataValue.json(_jsonable(stuck)),
        },
    )


class SuccessRateConfig(Config):
    window_hours: int = Field(
        default_factory=lambda: Settings.from_env().checks.success_rate_window_hours
    )
    warn_below_percent: float = Field(
        default_factory=lambda: Settings.from_env().checks.success_rate_warn_percent,
        description="Below this rate the check fails with WARN (env, default 95).",
    )
    error_below_percent: float = Field(
        default_factory=lambda: Settings.from_env().checks.success_rate_error_percent,
        description="Below this rate the check fails with ERROR (env, default 80).",
    )


@asset_check(
    asset=RESULTS_VIEW,
    description="The success rate over the last 24 hours, counting finished "
    "executions (one still polling is not a failure), against WARN and ERROR thresholds. "
    "No finished executions in the window is a pass.",
)
def success_rate_24h(
    context: AssetCheckExecutionContext,
    config: SuccessRateConfig,
    policy_state: PolicyStateResource,
) -> AssetCheckResult:
    rate = HealthReport(policy_state.warehouse()).success_rate(config.window_hours)
    metadata: dict[str, MetadataValue] = {
        "total": MetadataValue.int(rate.total),
        "successful": MetadataValue.int(rate.successful),
        "failed": MetadataValue.int(rate.failed),
    }
    if rate.rate_percent is None:
        return AssetCheckResult(
            passed=True,
            description=f"No finished executions in the last {config.window_hours} hours "
            f"({rate.total} started)",
            metadata=metadata,
        )
    metadata["success_rate_percent"] = MetadataValue.float(rate.rate_percent)
    finished = rate.successful + rate.failed
    summary = (
        f"{rate.rate_percent:.2f}% of {finished} finished executions succeeded "
        f"(warn below {config.warn_below_percent}%, error below {config.error_below_percent}%)"
    )
    if rate.rate_percent < config.error_below_percent:
        severity, passed = AssetCheckSeverity.ERROR, False
    elif rate.rate_percent < config.warn_below_percent:
        severity, passed = AssetCheckSeverity.WARN, False
    else:
        severity, passed = AssetCheckSeverity.WARN, True
    return AssetCheckResult(
        passed=passed, severity=severity, description=summary, metadata=metadata
    )


class ConsistencyConfig(Config):
    max_polls: int = Field(
        default_factory=lambda: Settings.from_env().polling.max_polls,
        description="Polls allowed per run of policy_ready (env POLICY_POLL_MAX_POLLS).",
    )


@asset_check(
    asset=RESULTS_VIEW,
    description="The state machine's invariants: completed implies the circuit breaker "
    "completed (unless skipped by an operator); policy_created and later imply a policy_id; "
    "poll_count within the maximum per run; at most one active execution per policy.",
)
def state_consistency(
    context: AssetCheckExecutionContext,
    config: ConsistencyConfig,
    policy_state: PolicyStateResource,
) -> AssetCheckResult:
    violations = HealthReport(policy_state.warehouse()).consistency_violations(config.max_polls)
    kinds = sorted({str(v["violation"]) for v in violations})
    return AssetCheckResult(
        passed=not violations,
        severity=AssetCheckSeverity.ERROR,
        description="No violations" if not violations else f"Violations: {', '.join(kinds)}",
        metadata={
            "violation_count": MetadataValue.int(len(violations)),
            "violations": MetadataValue.json(_jsonable(violations)),
        },
    )


CHECKS: list[AssetChecksDefinition] = [no_stuck_executions, success_rate_24h, state_consistency]

policy_checks_job = define_asset_job(
    "policy_checks_job",
    selection=AssetSelection.checks(*CHECKS),
    description="The monitoring checks alone, without re-running the workflow or dbt.",
)

policy_checks_schedule = ScheduleDefinition(
    name="policy_checks_every_15_minutes",
    job=policy_checks_job,
    cron_schedule="*/15 * * * *",
    default_status=DefaultScheduleStatus.RUNNING,
    description="Runs the health, success-rate and consistency checks every 15 minutes.",
)
