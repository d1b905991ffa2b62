"""The workflow on a Celery cluster of test hosts (deploy/README.md, "Many machines: Celery").

`policy_pipeline_tests.harness.cluster` builds the layout of deploy/ from Linux namespaces: a
services host (PostgreSQL, Redis, fakesnow as the warehouse, the Policy API simulator), a
control host (code server, webserver, daemon: deploy/start-*.sh) and worker hosts
(deploy/start-worker.sh), each with its own host name, PID namespace and network namespace, and
deploy/celery/dagster.yaml unchanged. Without root or ``ip netns`` the test is skipped, unless
CI is set: then it fails.
"""

from __future__ import annotations

import threading
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import yaml
from dagster import DagsterRunStatus

from policy_devtools.simulator import SimulatorConfig
from policy_pipeline.core.liveness import Holder
from policy_pipeline.defs.workflow.assets import PARTITIONS_NAME, PROCESS_TAG
from policy_pipeline.defs.workflow.cluster import DUCKDB_ON_CELERY
from policy_pipeline_tests.conftest import FAST_ENV
from policy_pipeline_tests.harness.cluster import Cluster, celery_cluster
from policy_pipeline_tests.harness.hosts import skip_or_fail, unavailable_reason

DEPLOY_DIR = Path(__file__).resolve().parent.parent / "deploy"
STEPS = ["policy_created", "policy_ready", "circuit_breaker_activation"]
POLICIES = 240
PER_RUN = 60  # POLICY_BACKFILL_MAX_PARTITIONS_PER_RUN: 4 runs for 2 worker hosts
BACKFILL_TIMEOUT_SECONDS = 240.0


@pytest.fixture
def cluster_hosts() -> None:
    reason = unavailable_reason()
    if reason is not None:
        skip_or_fail(reason)


def write_catalog(directory: Path, count: int) -> list[str]:
    directory.mkdir()
    names = [f"cluster_policy_{i:04d}" for i in range(count)]
    for i, name in enumerate(names):
        entry = {
            "policy_name": name,
            "policy_type": "data_retention",
            "description": f"Cluster test policy {i}.",
            "priority": ("low", "medium", "high")[i % 3],
            "parameters": {"retention_days": 30 + i % 60},
        }
        (directory / f"{name}.yaml").write_text(yaml.safe_dump(entry))
    return names


class LeaseSampler:
    """Reads the lease owners of policy_execution_locks every half second while runs go on:
    the host each lease holder names (``run:<id>@<host>/<pid ns>:<pid>:<start>``)."""

    def __init__(self, cluster: Cluster) -> None:
        self.cluster = cluster
        self.owners: set[str] = set()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self.stop.wait(0.5):
            try:
                rows = self.cluster.query(
                    'SELECT DISTINCT "lease_owner" FROM policy_execution_locks '
                    'WHERE "lease_owner" IS NOT NULL'
                )
            except Exception:  # the table does not exist until the first run creates it
                continue
            self.owners.update(str(owner) for (owner,) in rows)

    def hosts(self) -> set[str]:
        return {(Holder.parse(owner).host or "?").split("/")[0] for owner in self.owners}

    def __enter__(self) -> LeaseSampler:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(timeout=30)


def test_the_celery_instance_matches_the_single_host_one_and_its_worker_config() -> None:
    """deploy/celery/dagster.yaml differs from deploy/dagster.yaml only in the run launcher
    and run monitoring, and the worker's Celery settings are the launcher's."""
    single = yaml.safe_load((DEPLOY_DIR / "dagster.yaml").read_text())
    cluster = yaml.safe_load((DEPLOY_DIR / "celery" / "dagster.yaml").read_text())
    worker = yaml.safe_load((DEPLOY_DIR / "celery" / "worker.yaml").read_text())
    for section in ("storage", "run_coordinator", "run_retries", "telemetry"):
        assert cluster[section] == single[section], section
    launcher = cluster["run_launcher"]
    assert launcher["class"] == "CeleryRunLauncher"
    worker_config = worker["execution"]["config"]
    for key in ("broker", "backend", "config_source"):
        assert worker_config[key] == launcher["config"][key], key
    source = launcher["config"]["config_source"]
    assert source["task_acks_late"] is True and source["worker_prefetch_multiplier"] == 1
    # A live run is never handed to a second worker: Redis waits longer than any run lasts.
    visibility = source["broker_transport_options"]["visibility_timeout"]
    assert visibility > cluster["run_monitoring"]["max_runtime_seconds"]
    assert (
        cluster["run_monitoring"]["enabled"]
        and cluster["run_monitoring"]["max_resume_run_attempts"] >= 1
    )


def test_duckdb_is_refused_when_runs_go_to_celery_workers(tmp_path: Path) -> None:
    from dagster import DagsterInstance, Failure

    from policy_pipeline.defs.workflow.cluster import refuse_duckdb_on_celery, runs_on_celery

    with DagsterInstance.ephemeral() as instance:
        assert not runs_on_celery(instance)
        refuse_duckdb_on_celery(instance, "duckdb")  # in-process: DuckDB is fine
    launcher = {
        "module": "dagster_celery.launcher",
        "class": "CeleryRunLauncher",
        "config": {"broker": "redis://127.0.0.1:1/0", "backend": "redis://127.0.0.1:1/1"},
    }
    (tmp_path / "dagster.yaml").write_text(yaml.safe_dump({"run_launcher": launcher}))
    with DagsterInstance.from_config(str(tmp_path)) as instance:
        assert runs_on_celery(instance)
        refuse_duckdb_on_celery(instance, "snowflake")
        with pytest.raises(Failure, match="DuckDB is a file on one host") as failure:
            refuse_duckdb_on_celery(instance, "duckdb")
        assert failure.value.description == DUCKDB_ON_CELERY


@pytest.mark.cluster
def test_two_worker_hosts_share_a_backfill(cluster_hosts: None, tmp_path: Path) -> None:
    names = write_catalog(tmp_path / "policies", POLICIES)
    simulator = SimulatorConfig(
        ready_after_polls=1, latency_ms=10, latency_jitter_ms=20, ignore_idempotency_keys=True
    )
    env = {**FAST_ENV, "POLICY_BACKFILL_MAX_PARTITIONS_PER_RUN": str(PER_RUN)}
    with celery_cluster(tmp_path, tmp_path / "policies", simulator, workers=2, env=env) as cluster:
        hosts = cluster.hosts
        # As the catalog sensor registers them, in name order.
        cluster.instance.add_dynamic_partitions(PARTITIONS_NAME, names)
        with LeaseSampler(cluster) as sampler:
            backfill_id = cluster.launch_backfill(names, STEPS)
            runs = cluster.wait_backfill(backfill_id, BACKFILL_TIMEOUT_SECONDS)
        counts = cluster.services.api_counts()["per_policy"]
        states = cluster.query(
            'SELECT "policy_name", "status", "dagster_run_id" FROM policy_execution_state'
        )
        logs = cluster.logs()

    # Split into runs of at most PER_RUN partitions, every one a success.
    assert len(runs) == -(-POLICIES // PER_RUN), [run.tags for run in runs]
    assert all(run.status is DagsterRunStatus.SUCCESS for run in runs), (
        [(run.run_id, run.status) for run in runs],
        logs,
    )
    # The runs ran on both worker hosts: the host each run's step named, and the hosts the
    # lease owners named while the runs held their policies.
    run_hosts = {run.run_id: run.tags[PROCESS_TAG].split("/")[0] for run in runs}
    assert set(run_hosts.values()) == {"worker-1", "worker-2"}, run_hosts
    assert sampler.hosts() == {"worker-1", "worker-2"}, sampler.owners
    # Every policy completed exactly once, by one of the backfill's runs.
    assert sorted(name for name, _, _ in states) == names
    assert Counter(status for _, status, _ in states) == {"completed": POLICIES}
    assert {run_id for _, _, run_id in states} <= set(run_hosts)
    done_by: Counter[str] = Counter(run_hosts[run_id] for _, _, run_id in states)
    assert done_by["worker-1"] > 0 and done_by["worker-2"] > 0, done_by
    # The API's own counts (idempotency keys ignored: a second call would be a second effect).
    for name in names:
        mine: dict[str, Any] = counts[name]
        assert mine["create_requests"] == 1 and mine["circuit_requests"] == 1, (name, mine)
    # Nothing of the test hosts is left.
    assert hosts.leftovers() == []
    print(f"{POLICIES} policies in {len(runs)} runs; policies per host: {dict(done_by)}")
