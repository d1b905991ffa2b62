"""Asset checks on the results view: the health and success-rate queries and the state
machine's invariants, each run as SQL in the warehouse. A schedule runs them on their own."""

from typing import Any

from dagster import (
    AssetCheckExecutionContext,
    AssetCheckKey,
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

from policy_pipeline.core.settings import (
    CheckSettings,
    PollingSettings,
    Settings,
    override_field,
    with_overrides,
)
from policy_pipeline.core.store.health import HealthReport
from policy_pipeline.resources import PolicyStateResource

RESULTS_VIEW = AssetKey("policy_execution_results")


def _jsonable(rows: list[dict[str, object]]) -> list[dict[str, object]]:
    return [
        {k: (v if isinstance(v, int | float | bool | None) else str(v)) for k, v in r.items()}
        for r in rows
    ]


def _check(name: str) -> Any:
    return override_field(CheckSettings, name)


class StuckConfig(Config):
    stuck_after_minutes: int | None = override_field(CheckSettings, "stuck_after_minutes")


class SuccessRateConfig(Config):
    success_rate_window_hours: int | None = _check("success_rate_window_hours")
    success_rate_warn_percent: float | None = _check("success_rate_warn_percent")
    success_rate_error_percent: float | None = _check("success_rate_error_percent")


class ConsistencyConfig(Config):
    max_polls: int | None = override_field(PollingSettings, "max_polls")


CHECK_NAMES = ("no_stuck_executions", "success_rate_24h", "state_consistency")


def build_checks(settings: Settings) -> list[AssetChecksDefinition]:
    """The checks; a config field left out takes this code location's setting."""

    @asset_check(
        asset=RESULTS_VIEW,
        description="Health: no execution still in flight (not completed) that "
        "started more than the threshold ago.",
    )
    def no_stuck_executions(
        context: AssetCheckExecutionContext,
        config: StuckConfig,
        policy_state: PolicyStateResource,
    ) -> AssetCheckResult:
        minutes = with_overrides(settings.checks, config.model_dump()).stuck_after_minutes
        monitor = HealthReport(policy_state.warehouse())
        count = monitor.stuck_count(minutes)
        stuck = monitor.stuck_executions(minutes) if count else []
        return AssetCheckResult(
            passed=count == 0,
            severity=AssetCheckSeverity.ERROR,
            description=f"{count} stuck executions (in flight > {minutes} min)",
            metadata={
                "stuck_count": MetadataValue.int(count),
                "threshold_minutes": MetadataValue.int(minutes),
                "stuck_executions": MetadataValue.json(_jsonable(stuck)),
            },
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
        checks = with_overrides(settings.checks, config.model_dump())
        window_hours = checks.success_rate_window_hours
        warn_below = checks.success_rate_warn_percent
        error_below = checks.success_rate_error_percent
        rate = HealthReport(policy_state.warehouse()).success_rate(window_hours)
        metadata: dict[str, MetadataValue] = {
            "total": MetadataValue.int(rate.total),
            "successful": MetadataValue.int(rate.successful),
            "failed": MetadataValue.int(rate.failed),
        }
        if rate.rate_percent is None:
            return AssetCheckResult(
                passed=True,
                description=f"No finished executions in the last {window_hours} hours "
                f"({rate.total} started)",
                metadata=metadata,
            )
        metadata["success_rate_percent"] = MetadataValue.float(rate.rate_percent)
        finished = rate.successful + rate.failed
        summary = (
            f"{rate.rate_percent:.2f}% of {finished} finished executions succeeded "
            f"(warn below {warn_below}%, error below {error_below}%)"
        )
        if rate.rate_percent < error_below:
            severity, passed = AssetCheckSeverity.ERROR, False
        elif rate.rate_percent < warn_below:
            severity, passed = AssetCheckSeverity.WARN, False
        else:
            severity, passed = AssetCheckSeverity.WARN, True
        return AssetCheckResult(
            passed=passed, severity=severity, description=summary, metadata=metadata
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
        max_polls = with_overrides(settings.polling, config.model_dump()).max_polls
        violations = HealthReport(policy_state.warehouse()).consistency_violations(max_polls)
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

    return [no_stuck_executions, success_rate_24h, state_consistency]


policy_checks_job = define_asset_job(
    "policy_checks_job",
    selection=AssetSelection.checks(*(AssetCheckKey(RESULTS_VIEW, name) for name in CHECK_NAMES)),
    description="The monitoring checks alone, without re-running the workflow or dbt.",
)

policy_checks_schedule = ScheduleDefinition(
    name="policy_checks_every_15_minutes",
    job=policy_checks_job,
    cron_schedule="*/15 * * * *",
    default_status=DefaultScheduleStatus.RUNNING,
    description="Runs the health, success-rate and consistency checks every 15 minutes.",
)
