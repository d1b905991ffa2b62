"""Runs on a Celery cluster (deploy/celery/): what the workflow refuses there.

Which machine a run lands on is chosen by the instance's dagster.yaml (dagster-celery's
``CeleryRunLauncher``), not by code, so the code checks at run time whether its run or step was
handed to a Celery worker. DuckDB is a file on one host: runs on other hosts would each see a
different state, and the leases that keep two runs off the same policy would mean nothing.
"""

from __future__ import annotations

from dagster import DagsterInstance, Failure, JobDefinition

CELERY_EXECUTOR = "celery"  # dagster_celery.celery_executor's name
DUCKDB_ON_CELERY = (
    "DuckDB is a file on one host; runs on Celery workers need POLICY_WAREHOUSE=snowflake "
    "(and the SNOWFLAKE_* variables on every worker host, deploy/README.md)"
)


def runs_on_celery(instance: DagsterInstance, job: JobDefinition | None = None) -> bool:
    """Whether this run was launched as a Celery task, or its steps are Celery tasks."""
    if job is not None and job.executor_def.name == CELERY_EXECUTOR:
        return True
    try:
        from dagster_celery.launcher import CeleryRunLauncher
    except ImportError:  # dagster-celery is a dependency; a trimmed install has no cluster
        return False
    return isinstance(instance.run_launcher, CeleryRunLauncher)


def refuse_duckdb_on_celery(
    instance: DagsterInstance, warehouse: str, job: JobDefinition | None = None
) -> None:
    """Fail before any API call or warehouse write when a Celery worker would use DuckDB."""
    if warehouse == "duckdb" and runs_on_celery(instance, job):
        raise Failure(DUCKDB_ON_CELERY)
