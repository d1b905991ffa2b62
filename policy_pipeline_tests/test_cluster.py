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
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import yaml
from dagster import DagsterRunStatus, RunsFilter

from policy_devtools.simulator import SimulatorConfig
from policy_pipeline.core.liveness import Holder
from policy_pipeline.defs.workflow.cluster import DUCKDB_ON_CELERY
from policy_pipeline.defs.workflow.partitions import PARTITIONS_NAME
from policy_pipeline.defs.workflow.runs import PROCESS_TAG
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
    """deploy/celery/dagster.yaml differs from deploy/dagster.yaml only in the run launcher,
    run monitoring and the run queue's size, and the worker's Celery settings are the
    launcher's."""
    single = yaml.safe_load((DEPLOY_DIR / "dagster.yaml").read_text())
    cluster = yaml.safe_load((DEPLOY_DIR / "celery" / "dagster.yaml").read_text())
    worker = yaml.safe_load((DEPLOY_DIR / "celery" / "worker.yaml").read_text())
    for section in ("storage", "run_retries", "telemetry"):
        assert cluster[section] == single[section], section
    # The same queue and its limits, but no more runs at once than the workers have slots (a
    # run beyond them would wait in the broker until run monitoring fails it).
    coordinator, queue = cluster["run_coordinator"], single["run_coordinator"]
    assert {**coordinator["config"], "max_concurrent_runs": 0} == {
        **queue["config"],
        "max_concurrent_runs": 0,
    }
    assert coordinator["config"]["max_concurrent_runs"] == 2  # two workers, one slot each
    launcher = cluster["run_launcher"]
    # dagster-celery's launcher with the health check that notices a lost worker host.
    assert (launcher["module"], launcher["class"]) == (
        "policy_pipeline.celery_launcher",
        "PolicyCeleryRunLauncher",
    )
    assert launcher["config"]["worker_lost_after_seconds"] >= 30  # POLICY_LEASE_TTL_SECONDS
    worker_config = worker["execution"]["config"]
    for key in ("broker", "backend", "config_source"):
        assert worker_config[key] == launcher["config"][key], key
    source = launcher["config"]["config_source"]
    assert source["task_acks_late"] is True and source["worker_prefetch_multiplier"] == 1
    # A live run is never handed to a second worker: Redis waits longer than any run lasts.
    visibility = source["broker_transport_options"]["visibility_timeout"]
    assert visibility > cluster["run_monitoring"]["max_runtime_seconds"]
    # Run monitoring fails a run whose worker is gone, and run retries launch it again: no
    # resume (dagster-celery 0.29.27's resume_run fails with a TypeError, see dagster.yaml).
    monitoring = cluster["run_monitoring"]
    assert monitoring["enabled"] and monitoring["max_resume_run_attempts"] == 0
    assert cluster["run_retries"]["enabled"] and cluster["run_retries"]["max_retries"] >= 1


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


def test_the_launcher_reports_a_run_failed_once_its_worker_stays_silent(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """PolicyCeleryRunLauncher (as deploy/celery/dagster.yaml configures it): a STARTED task
    whose worker answers is RUNNING; whose worker is silent, RUNNING until it has been silent
    for worker_lost_after_seconds, then FAILED; a broker it cannot ask says nothing; a resumed
    run's task waiting for a free worker (PENDING) is not a lost one."""
    from types import SimpleNamespace

    from dagster import DagsterInstance, DagsterRun
    from dagster._core.launcher import WorkerStatus
    from dagster_celery.tags import DAGSTER_CELERY_TASK_ID_TAG

    from policy_pipeline import celery_launcher
    from policy_pipeline.celery_launcher import PolicyCeleryRunLauncher

    deployed = yaml.safe_load((DEPLOY_DIR / "celery" / "dagster.yaml").read_text())
    launcher_yaml = deployed["run_launcher"]
    launcher_yaml["config"]["worker_lost_after_seconds"] = 10
    (tmp_path / "dagster.yaml").write_text(yaml.safe_dump({"run_launcher": launcher_yaml}))
    monkeypatch.setenv("DAGSTER_CELERY_BROKER_URL", "redis://127.0.0.1:1/0")  # never reached
    monkeypatch.setenv("DAGSTER_CELERY_BACKEND_URL", "redis://127.0.0.1:1/1")
    now = [1000.0]
    monkeypatch.setattr(celery_launcher, "time", SimpleNamespace(monotonic=lambda: now[0]))
    task = SimpleNamespace(state="STARTED", info={"pid": 7, "hostname": "policy-worker@w1"})
    answering = {"policy-worker@w1": True}
    pings: list[list[str]] = []

    def ping(destination: list[str], timeout: float) -> list[dict[str, Any]]:
        pings.append(destination)
        if answering.get("broker-down"):
            raise ConnectionError("broker unreachable")
        return [{name: {"ok": "pong"}} for name in destination if answering.get(name)]

    with DagsterInstance.from_config(str(tmp_path)) as instance:
        launcher = instance.run_launcher
        assert isinstance(launcher, PolicyCeleryRunLauncher)
        assert (
            launcher.ping_timeout_seconds
            == deployed["run_launcher"]["config"]["ping_timeout_seconds"]
        )
        monkeypatch.setattr(launcher.celery, "AsyncResult", lambda task_id: task)
        monkeypatch.setattr(launcher.celery.control, "ping", ping)
        run = DagsterRun(job_name="policy_workflow_job", tags={DAGSTER_CELERY_TASK_ID_TAG: "t1"})

        def check(after: float) -> Any:
            now[0] += after
            return launcher.check_run_worker_health(run)

        assert check(0).status is WorkerStatus.RUNNING  # answers
        answering["policy-worker@w1"] = False  # its host dies
        assert check(30).status is WorkerStatus.RUNNING  # first silence
        assert check(6).status is WorkerStatus.RUNNING  # 6 s silent
        lost = check(6)  # 12 s silent: gone
        assert lost.status is WorkerStatus.FAILED
        assert "policy-worker@w1 no longer answers" in str(lost.msg)
        answering["policy-worker@w1"] = True  # it was only slow: the count starts again
        assert check(6).status is WorkerStatus.RUNNING
        answering["policy-worker@w1"] = False
        assert check(6).status is WorkerStatus.RUNNING
        answering["broker-down"] = True  # no answer from the broker is no verdict
        assert check(30).status is WorkerStatus.RUNNING
        # One ping per worker within a ping timeout, however many runs it has.
        answering["broker-down"] = False
        check(0)
        before = len(pings)
        check(0)
        check(1)
        assert len(pings) == before
        # A resumed run's task queued behind busy workers is not lost (for a while) ...
        task.state, task.info = "PENDING", None
        assert check(0).status is WorkerStatus.RUNNING
        assert check(launcher.pending_grace_seconds - 1).status is WorkerStatus.RUNNING
        assert check(2).status is WorkerStatus.UNKNOWN  # ... then dagster-celery's verdict
        task.state = "FAILURE"  # the rest is dagster-celery's
        assert check(0).status is WorkerStatus.FAILED
        task.state = "SUCCESS"
        assert check(0).status is WorkerStatus.SUCCESS


@pytest.mark.cluster
def test_two_worker_hosts_share_a_backfill(cluster_hosts: None, tmp_path: Path) -> None:
    names = write_catalog(tmp_path / "policies", POLICIES)
    simulator = SimulatorConfig(
        ready_after_polls=1, latency_ms=10, latency_jitter_ms=20, ignore_idempotency_keys=True
    )
    env = {**FAST_ENV, "POLICY_BACKFILL_MAX_PARTITIONS_PER_RUN": str(PER_RUN)}
    with celery_cluster(
        tmp_path, tmp_path / "policies", simulator, workers=2, env=env, start_daemon=False
    ) as cluster:
        hosts = cluster.hosts
        # As the catalog sensor registers them, in name order.
        cluster.instance.add_dynamic_partitions(PARTITIONS_NAME, names)
        with LeaseSampler(cluster) as sampler:
            backfill_id = cluster.launch_backfill(names, STEPS)
            cluster.start_daemon()
            runs = cluster.wait_backfill_runs(backfill_id, names, BACKFILL_TIMEOUT_SECONDS)
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


# --- Losing a worker host (issue 20, item 4) ------------------------------------------------------

KILL_POLICIES = 16
KILL_PER_RUN = 8  # two runs: one on each worker host
LEASE_TTL_SECONDS = 10
# The policies turn ready this long after their create: the run to kill holds their leases
# between the creates and the circuit breakers for that long.
READY_AFTER_SECONDS = 12.0
KILL_ENV = {
    **FAST_ENV,
    "POLICY_BACKFILL_MAX_PARTITIONS_PER_RUN": str(KILL_PER_RUN),
    "POLICY_LEASE_TTL_SECONDS": str(LEASE_TTL_SECONDS),
    "POLICY_LEASE_WAIT_SECONDS": "30",
    "POLICY_RESUME_BACKOFF_SECONDS": "2",
    "POLICY_PROGRESS_TICK_SECONDS": "2",
    "POLICY_POLL_MAX_INTERVAL_SECONDS": "1",
    "POLICY_POLL_MAX_POLLS": "200",
    "POLICY_POLL_DEADLINE_SECONDS": "120",
    # Idempotency keys are ignored below: a create retried after a timeout under load would
    # be a second create that no host loss caused.
    "POLICY_API_TIMEOUT_SECONDS": "30",
}
# Run monitoring looks every 2 s; a worker silent for the lease TTL is gone.
KILL_INSTANCE = {
    "run_monitoring": {"poll_interval_seconds": 2},
    "run_launcher": {
        "config": {"worker_lost_after_seconds": LEASE_TTL_SECONDS, "ping_timeout_seconds": 3}
    },
}


def _in_list(names: list[str]) -> str:
    return ", ".join(f"'{name}'" for name in names)  # test-made names: no quoting issues


class TakeoverSampler:
    """After the kill: for each policy, the earliest ``updated_time`` of its lock row seen under
    an owner other than the dead one (the takeover writes it; renewals only move it later)."""

    def __init__(self, cluster: Cluster, names: list[str], dead: dict[str, str]) -> None:
        self.cluster, self.names, self.dead = cluster, names, dead
        self.first: dict[str, tuple[Any, str]] = {}  # name -> (updated_time, new owner)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        sql = (
            'SELECT "policy_name", "lease_owner", "updated_time" FROM policy_execution_locks '
            f'WHERE "policy_name" IN ({_in_list(self.names)}) AND "lease_owner" IS NOT NULL'
        )
        while not self.stop.wait(0.5):
            try:
                rows = self.cluster.query(sql)
            except Exception:  # a busy warehouse: the next sample
                continue
            for name, owner, updated in rows:
                if owner != self.dead[name]:
                    seen = self.first.get(name)
                    if seen is None or updated < seen[0]:
                        self.first[name] = (updated, str(owner))

    def __enter__(self) -> TakeoverSampler:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(timeout=60)


@pytest.mark.cluster
def test_a_worker_host_killed_mid_run_is_taken_over_after_the_lapse(
    cluster_hosts: None, tmp_path: Path
) -> None:
    """Issue 20, item 4: a worker host dies (SIGKILL of its PID namespace's first process)
    while its run holds leases, after the creates and before the circuit breakers. With
    nobody acting, every policy completes with one create and one circuit breaker call (the
    API's counts), the dead host's leases are taken over only after they lapse, the run does
    not stay STARTED (PolicyCeleryRunLauncher reports its worker gone, run monitoring fails
    it), and the last policy completes at most the lease TTL + 60 s after the kill."""
    names = write_catalog(tmp_path / "policies", KILL_POLICIES)
    simulator = SimulatorConfig(
        ready_after_polls=1,
        ready_after_seconds=READY_AFTER_SECONDS,
        latency_ms=10,
        ignore_idempotency_keys=True,
    )
    with celery_cluster(
        tmp_path,
        tmp_path / "policies",
        simulator,
        workers=2,
        env=KILL_ENV,
        keep_automation=("policy_progress_sensor",),
        instance_yaml=KILL_INSTANCE,
        start_daemon=False,
    ) as cluster:
        instance = cluster.instance
        instance.add_dynamic_partitions(PARTITIONS_NAME, names)
        backfill_id = cluster.launch_backfill(names, STEPS)
        cluster.start_daemon()

        def victim() -> tuple[str, str, list[str]] | None:
            """A run on a worker host whose every policy is created and none triggered."""
            for run in cluster.backfill_runs(backfill_id):
                process = run.tags.get(PROCESS_TAG)
                if not process or run.status is not DagsterRunStatus.STARTED:
                    continue
                rows = cluster.query(
                    'SELECT "policy_name", "policy_id", "circuit_breaker_initiated" FROM '
                    f"policy_execution_state WHERE \"dagster_run_id\" = '{run.run_id}'"
                )
                created = [n for n, policy_id, triggered in rows if policy_id and not triggered]
                if len(rows) == KILL_PER_RUN and len(created) == KILL_PER_RUN:
                    return run.run_id, process.split("/")[0], sorted(created)
            return None

        run_id, host, mine = cluster.wait_for("a run holding created policies", victim, 240)
        others = [r for r in cluster.backfill_runs(backfill_id) if r.run_id != run_id]
        cluster.hosts.kill_host(host)
        killed_at = time.monotonic()
        # What the dead process held last: nothing of that host writes any more. (A statement
        # it sent just before the kill lands within a moment: read after it.)
        time.sleep(1.0)
        locks = cluster.query(
            'SELECT "policy_name", "lease_owner", "lease_expires_at", SYSDATE() '
            f'FROM policy_execution_locks WHERE "policy_name" IN ({_in_list(mine)})'
        )
        dead = {str(name): str(owner) for name, owner, _until, _now in locks}
        lapse = {str(name): until for name, _owner, until, _now in locks}
        killed_mark = locks[0][3]
        assert sorted(dead) == mine and all(
            Holder.parse(owner).run_id == run_id
            and (Holder.parse(owner).host or "").startswith(host + "/")
            for owner in dead.values()
        ), dead
        counts_at_kill = cluster.services.api_counts()["per_policy"]
        assert all(counts_at_kill[name]["circuit_requests"] == 0 for name in mine), counts_at_kill

        with TakeoverSampler(cluster, mine, dead) as sampler:

            def all_completed() -> bool:
                rows = cluster.query('SELECT "status" FROM policy_execution_state')
                return len(rows) == KILL_POLICIES and all(s == "completed" for (s,) in rows)

            cluster.wait_for("every policy completed", all_completed, 300)
            kill_to_complete = time.monotonic() - killed_at

            def settled() -> bool:
                run = instance.get_run_by_id(run_id)
                busy = instance.get_runs(
                    RunsFilter(statuses=[DagsterRunStatus.QUEUED, DagsterRunStatus.NOT_STARTED,
                                         DagsterRunStatus.STARTING, DagsterRunStatus.STARTED])
                )  # fmt: skip
                return run is not None and run.is_finished and not busy

            cluster.wait_for("the dead host's run to end, and every other run", settled, 300)
        victim_run = instance.get_run_by_id(run_id)
        assert victim_run is not None
        messages = [
            entry.message for entry in instance.all_logs(run_id) if entry.message is not None
        ]
        other_runs = [instance.get_run_by_id(r.run_id) for r in others]
        retries = [
            (r.run_id[:8], r.status.value)
            for r in instance.get_runs(RunsFilter(tags={"dagster/parent_run_id": run_id}))
        ]
        counts = cluster.services.api_counts()["per_policy"]
        states = cluster.query('SELECT "policy_name", "status" FROM policy_execution_state')
        events = cluster.query(
            'SELECT "policy_name", "event_time" FROM policy_execution_events '
            f'WHERE "policy_name" IN ({_in_list(mine)})'
        )
        completed_at = cluster.query(
            'SELECT MAX("completed_time") FROM policy_execution_state '
            f'WHERE "policy_name" IN ({_in_list(mine)})'
        )[0][0]
        logs = cluster.logs()
        hosts = cluster.hosts

    # The other host's run went on as if nothing happened.
    assert all(r is not None and r.status is DagsterRunStatus.SUCCESS for r in other_runs), logs
    # Every policy completed, with exactly one create and one circuit breaker call at the API.
    assert sorted(states) == [(name, "completed") for name in names]
    for name in names:
        assert counts[name]["create_requests"] == 1, (name, counts[name])
        assert counts[name]["circuit_requests"] == 1, (name, counts[name])
    # The dead host's leases went to other owners only after they lapsed: in the lock table
    # (the new owner's first write) and in the audit trail (its first move on the policy).
    assert sorted(sampler.first) == mine, (sampler.first, dead)
    for name in mine:
        taken_at, owner = sampler.first[name]
        assert taken_at >= lapse[name], (name, taken_at, lapse[name], owner)
        assert not (Holder.parse(owner).host or "").startswith(host + "/"), owner
    moves: dict[str, Any] = {}  # each policy's first audited move after the kill
    for name, when in events:
        if when > killed_mark and (str(name) not in moves or when < moves[str(name)]):
            moves[str(name)] = when
    assert sorted(moves) == mine, moves
    for name in mine:
        assert moves[name] >= lapse[name], (name, moves[name], lapse[name])
    # The run does not stay STARTED: run monitoring heard from PolicyCeleryRunLauncher that its
    # worker no longer answers and failed it (run retries then launched it again).
    assert victim_run.status is DagsterRunStatus.FAILURE, logs
    assert any("no longer answers" in m for m in messages), messages
    assert hosts.leftovers() == []
    warehouse_seconds = (completed_at - killed_mark).total_seconds() + 1.0
    new_owners = sorted({owner for _taken, owner in sampler.first.values()})
    print(
        f"worker host {host} killed holding {len(mine)} leases; kill to last policy completed: "
        f"{kill_to_complete:.1f}s (test clock), {warehouse_seconds:.1f}s (warehouse clock); "
        f"lease TTL {LEASE_TTL_SECONDS}s; the run ended {victim_run.status.value}, retried as "
        f"{retries}; new owners: {new_owners}"
    )
    assert kill_to_complete <= LEASE_TTL_SECONDS + 60, kill_to_complete
