"""Faults across hosts on the Celery layout (issue 20, items 5 and 6), end to end through Dagster:
the daemon launches the runs, its queue starts them, Celery workers on test hosts run them
(`policy_pipeline_tests.harness.cluster`). The Policy API ignores Idempotency-Key, so every
create or circuit-breaker call it counts is an effect: one each per policy, or the test fails.

- A slow host is not a dead host: a run whose API calls take longer than the lease TTL keeps
  its policies (it renews its leases meanwhile); a second run of the same policies on the
  other host waits for them, then fails just those cleanly, and does its own policy.
- A network partition: a host that still reaches the Policy API but no longer the warehouse
  stops calling the API before its leases lapse; after the lapse `policy_progress_sensor`
  resumes the policies in a run on the other host, which completes them; when the warehouse is
  back, the cut-off run gives them up (its log says why), writes nothing more for them, and ends.

Without root or ``ip netns`` the tests are skipped, unless CI is set: then they fail.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import yaml
from dagster import DagsterRun, DagsterRunStatus, RunsFilter

from policy_devtools.simulator import SimulatorConfig
from policy_pipeline.defs.workflow.partitions import PARTITIONS_NAME
from policy_pipeline.defs.workflow.runs import PROCESS_TAG, SENSOR_TAG
from policy_pipeline_tests.conftest import FAST_ENV
from policy_pipeline_tests.harness.cluster import Cluster, celery_cluster
from policy_pipeline_tests.harness.hosts import skip_or_fail, unavailable_reason

pytestmark = pytest.mark.cluster

STEPS = ["policy_created", "policy_ready", "circuit_breaker_activation"]
TTL = 10  # POLICY_LEASE_TTL_SECONDS: short, so that lapses take seconds
FENCE = TTL * 5 / 6  # LeaseSettings.fence_seconds
# A call that starts right at the fence reaches the API a little later on a loaded machine.
TRANSIT_SLACK_SECONDS = 1.5
RUN_TIMEOUT_SECONDS = 240.0
NO_RETRY = {"dagster/max_retries": "0"}


@pytest.fixture
def cluster_hosts() -> None:
    reason = unavailable_reason()
    if reason is not None:
        skip_or_fail(reason)


def write_catalog(directory: Path, names: Sequence[str]) -> None:
    directory.mkdir()
    for i, name in enumerate(names):
        entry = {
            "policy_name": name,
            "policy_type": "data_retention",
            "description": f"Cluster fault test policy {i}.",
            "priority": "medium",
            "parameters": {"retention_days": 30 + i},
        }
        (directory / f"{name}.yaml").write_text(yaml.safe_dump(entry))


def host_of(run: DagsterRun) -> str:
    """The host that ran the run's workflow step (``<host>/<pid ns>:<pid>:<start>``)."""
    return run.tags[PROCESS_TAG].split("/")[0]


def utc_epoch(value: datetime) -> float:
    """A warehouse time (TIMESTAMP_NTZ, UTC) as seconds since the epoch."""
    return value.replace(tzinfo=UTC).timestamp()


def run_messages(cluster: Cluster, run_id: str) -> list[tuple[float, str]]:
    return [
        (entry.timestamp, entry.user_message)
        for entry in cluster.instance.all_logs(run_id)
        if entry.user_message
    ]


class Sampler:
    """Reads `read` every `period` seconds in a thread, keeping (time.time(), value) pairs."""

    def __init__(self, read: Callable[[], Any], period: float) -> None:
        self.read = read
        self.period = period
        self.samples: list[tuple[float, Any]] = []
        self.errors = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                value = self.read()
            except Exception:  # a table not created yet, a busy moment: the next one counts
                self.errors += 1
            else:
                self.samples.append((time.time(), value))
            self._stop.wait(self.period)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=60)


def api_totals(cluster: Cluster, names: Sequence[str]) -> Callable[[], dict[str, int]]:
    """Every call the Policy API counted for these policies, by kind."""

    def read() -> dict[str, int]:
        per_policy = cluster.services.api_counts()["per_policy"]
        totals = dict.fromkeys(("create_requests", "status_requests", "circuit_requests"), 0)
        for name in names:
            for key in totals:
                totals[key] += int(per_policy.get(name, {}).get(key, 0))
        return totals

    return read


def lease_rows(cluster: Cluster) -> Callable[[], dict[str, tuple[str | None, datetime | None]]]:
    def read() -> dict[str, tuple[str | None, datetime | None]]:
        rows = cluster.query(
            'SELECT "policy_name", "lease_owner", "lease_expires_at" FROM policy_execution_locks'
        )
        return {str(name): (owner, expires) for name, owner, expires in rows}

    return read


def states(cluster: Cluster) -> dict[str, list[dict[str, Any]]]:
    """Every execution row by policy: what decides exactly-once and who did it."""
    columns = [
        "policy_name",
        "execution_id",
        "policy_id",
        "status",
        "dagster_run_id",
        "circuit_breaker_completed",
        "completed_time",
        "error_message",
    ]
    rows = cluster.query(
        "SELECT " + ", ".join(f'"{c}"' for c in columns) + " FROM policy_execution_state "
        'ORDER BY "policy_name", "start_time"'
    )
    found: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        entry = dict(zip(columns, row, strict=True))
        found.setdefault(str(entry["policy_name"]), []).append(entry)
    return found


def one_run(cluster: Cluster, backfill_id: str, timeout: float) -> DagsterRun:
    """The backfill's one run, once its workflow step has started (it names its host)."""

    def started() -> DagsterRun | None:
        runs = cluster.backfill_runs(backfill_id)
        assert len(runs) <= 1, [run.run_id for run in runs]
        return runs[0] if runs and PROCESS_TAG in runs[0].tags else None

    run: DagsterRun = cluster.wait_for(f"backfill {backfill_id}'s run", started, timeout)
    return run


def finished(cluster: Cluster, run_id: str, timeout: float) -> DagsterRun:
    def done() -> DagsterRun | None:
        run = cluster.instance.get_run_by_id(run_id)
        return run if run is not None and run.is_finished else None

    run: DagsterRun = cluster.wait_for(f"run {run_id} to end", done, timeout)
    return run


def per_policy_counts(cluster: Cluster, names: Sequence[str]) -> dict[str, dict[str, int]]:
    per_policy = cluster.services.api_counts()["per_policy"]
    return {name: dict(per_policy.get(name, {})) for name in names}


# --- item 5 ---------------------------------------------------------------------------------------

SLOW_CALL_SECONDS = 20.0  # every API call: twice the lease TTL
SLOW_LEASE_WAIT_SECONDS = 12  # how long the second run waits for a held policy


@pytest.mark.cluster
def test_a_slow_host_keeps_its_leases_and_a_second_run_on_the_other_host_waits(
    cluster_hosts: None, tmp_path: Path
) -> None:
    """Run 1 takes four policies on one host; every API call takes 20 s (twice the TTL), so
    each of its calls outlasts a lease many times over. Run 2 (those four and a fifth) lands
    on the other host while run 1's creates are in flight: it does the fifth, waits the lease
    wait for the four, then fails just those, naming run 1 as their holder. Run 1's leases
    are renewed throughout and never taken over; it completes the four. One create and one
    circuit-breaker call per policy, counted at the API."""
    held = [f"slow_policy_{i}" for i in range(4)]
    free = "free_policy"
    names = [*held, free]
    write_catalog(tmp_path / "policies", names)
    # Ready at the second poll: four calls of 20 s per policy, so run 1 holds its policies
    # well beyond the moment run 2 has waited for them.
    simulator = SimulatorConfig(
        ready_after_polls=1, latency_ms=SLOW_CALL_SECONDS * 1000, ignore_idempotency_keys=True
    )
    env = {
        **FAST_ENV,
        "POLICY_LEASE_TTL_SECONDS": str(TTL),
        "POLICY_LEASE_WAIT_SECONDS": str(SLOW_LEASE_WAIT_SECONDS),
        # A call is never given up (and re-sent) while the API takes its time.
        "POLICY_API_TIMEOUT_SECONDS": str(SLOW_CALL_SECONDS * 3),
        "POLICY_POLL_DEADLINE_SECONDS": "600",
    }
    began = time.monotonic()
    with celery_cluster(
        tmp_path, tmp_path / "policies", simulator, workers=2, env=env, start_daemon=False
    ) as cluster:
        up = time.monotonic()
        cluster.instance.add_dynamic_partitions(PARTITIONS_NAME, sorted(names))
        totals = api_totals(cluster, held)
        with Sampler(lease_rows(cluster), 0.5) as leases:
            first = cluster.launch_backfill(held, STEPS)
            cluster.start_daemon()
            run_1 = one_run(cluster, first, RUN_TIMEOUT_SECONDS)
            cluster.wait_for(
                "run 1's creates", lambda: totals()["create_requests"] == len(held), 120
            )
            host_1 = host_of(run_1)
            # Run 1's host runs one run at a time (POLICY_WORKER_CONCURRENCY=1) and is busy:
            # the next run goes to the other host.
            second = cluster.launch_backfill(names, STEPS, tags=NO_RETRY)
            run_2 = one_run(cluster, second, RUN_TIMEOUT_SECONDS)
            run_1 = finished(cluster, run_1.run_id, RUN_TIMEOUT_SECONDS)
            run_2 = finished(cluster, run_2.run_id, RUN_TIMEOUT_SECONDS)
        counts = per_policy_counts(cluster, names)
        rows = states(cluster)
        stats_1 = cluster.instance.get_run_stats(run_1.run_id)
        messages_2 = run_messages(cluster, run_2.run_id)
        messages_1 = run_messages(cluster, run_1.run_id)
        logs = cluster.logs()
        owner_1 = f"run:{run_1.run_id}@{run_1.tags[PROCESS_TAG]}"
        hosts = cluster.hosts
    host_2 = host_of(run_2)
    context = f"{[m for _, m in messages_2][-30:]}\n{logs}"

    assert host_1 != host_2, (host_1, host_2)
    assert run_1.status is DagsterRunStatus.SUCCESS, (run_1.status, logs)
    # Run 2 failed just the four run 1 held, naming run 1 (on the slow host) as the holder,
    # once it had waited for them; it completed the fifth.
    assert run_2.status is DagsterRunStatus.FAILURE, context
    refusals = {
        name: (at, message)
        for at, message in messages_2
        for name in held
        if message.startswith(f"{name}: ") and "being processed by" in message
    }
    assert set(refusals) == set(held), context
    for _at, message in refusals.values():
        assert f"run:{run_1.run_id}@{host_1}/" in message, message
    assert not any(f"{free}: " in message and "failed" in message for _, message in messages_2)
    # Run 2 gave up after its lease wait, while run 1 still worked on the four.
    assert stats_1.end_time is not None and stats_1.start_time is not None
    gave_up_at = min(at for at, _ in refusals.values())
    assert gave_up_at < stats_1.end_time, (gave_up_at, stats_1.end_time)
    assert not any("taking over" in message for _, message in messages_1 + messages_2)

    # Run 1's leases: never anyone else's while it ran, and renewed all along (each renewal
    # moves the expiry on), though every one of its calls took twice the TTL.
    seen_owners = {owner for _, rows_at in leases.samples for n, (owner, _) in rows_at.items()
                   if n in held and owner is not None}  # fmt: skip
    assert seen_owners == {owner_1}, seen_owners
    expiries = {
        expires
        for _, rows_at in leases.samples
        for n, (owner, expires) in rows_at.items()
        if n == held[0] and owner == owner_1
    }
    held_for = stats_1.end_time - stats_1.start_time
    assert held_for > 3 * TTL, held_for
    assert len(expiries) >= held_for / TTL, (len(expiries), held_for)

    # One create and one circuit-breaker call per policy; each completed once, by its run.
    for name in names:
        assert counts[name]["create_requests"] == 1, (name, counts[name])
        assert counts[name]["circuit_requests"] == 1, (name, counts[name])
        [row] = rows[name]
        assert row["status"] == "completed", row
        assert row["dagster_run_id"] == (run_2.run_id if name == free else run_1.run_id), row
    assert hosts.leftovers() == []
    calls = {n: (c["create_requests"], c["status_requests"], c["circuit_requests"])
             for n, c in counts.items()}  # fmt: skip
    print(
        f"\nslow host: cluster up in {up - began:.0f}s; run 1 on {host_1} held its policies "
        f"{held_for:.0f}s ({len(expiries)} lease expiries seen for one policy) with "
        f"{SLOW_CALL_SECONDS:.0f}s calls; run 2 on {host_2} gave up on them "
        f"{gave_up_at - stats_1.start_time:.0f}s after run 1 started; API calls (create, "
        f"status, circuit): {calls}"
    )


# --- item 6 ---------------------------------------------------------------------------------------

PARTITION_POLICIES = 6
READY_AFTER_SECONDS = 25.0  # after its create: the policies become ready during the cut
RESUME_BACKOFF_SECONDS = 15  # no resumption starts before the cut is this old
RESTORE_AFTER_SECONDS = 30.0  # the cut's length at least (the run ends itself after 10 TTLs)


@pytest.mark.cluster
def test_a_host_cut_off_from_the_warehouse_stops_calling_and_another_host_takes_over(
    cluster_hosts: None, tmp_path: Path
) -> None:
    """Run 1 polls six policies on one host; that host is cut off from the warehouse (it still
    reaches the Policy API, PostgreSQL and Redis). Run 1 starts no API call past its lease
    fence (the last renewal the warehouse confirmed + 5/6 TTL). After the lapse,
    policy_progress_sensor resumes them in a run on the other host, which completes them.
    When the warehouse is back, run 1 finds its leases taken, gives the policies up (its log
    says so), writes nothing more for them, and its Dagster run ends. One create and one
    circuit-breaker call per policy, counted at the API."""
    names = [f"cut_policy_{i}" for i in range(PARTITION_POLICIES)]
    write_catalog(tmp_path / "policies", names)
    simulator = SimulatorConfig(
        ready_after_polls=0,
        ready_after_seconds=READY_AFTER_SECONDS,
        latency_ms=10,
        ignore_idempotency_keys=True,
    )
    env = {
        **FAST_ENV,
        "POLICY_LEASE_TTL_SECONDS": str(TTL),
        "POLICY_LEASE_WAIT_SECONDS": "30",
        "POLICY_POLL_INITIAL_INTERVAL_SECONDS": "0.5",
        "POLICY_POLL_MAX_INTERVAL_SECONDS": "1",
        "POLICY_POLL_MAX_POLLS": "2000",
        "POLICY_POLL_DEADLINE_SECONDS": "600",
        "POLICY_WAIT_HANDOFF_SECONDS": "600",  # the runs poll; nothing is handed off
        "POLICY_API_TIMEOUT_SECONDS": "5",
        "POLICY_PROGRESS_TICK_SECONDS": "2",
        # The sensor looks at the warehouse this often while nothing waits to be polled.
        "POLICY_WAIT_POLL_INTERVAL_SECONDS": "2",
        "POLICY_RESUME_BACKOFF_SECONDS": str(RESUME_BACKOFF_SECONDS),
    }
    began = time.monotonic()
    with celery_cluster(
        tmp_path,
        tmp_path / "policies",
        simulator,
        workers=2,
        env=env,
        keep_automation=["policy_progress_sensor"],
        start_daemon=False,
    ) as cluster:
        up = time.monotonic()
        cluster.instance.add_dynamic_partitions(PARTITIONS_NAME, sorted(names))
        totals = api_totals(cluster, names)
        first = cluster.launch_backfill(names, STEPS)
        cluster.start_daemon()
        run_1 = one_run(cluster, first, RUN_TIMEOUT_SECONDS)
        host_1 = host_of(run_1)

        def polling() -> bool:
            per_policy = cluster.services.api_counts()["per_policy"]
            created = cluster.query(
                "SELECT COUNT(*) FROM policy_execution_state "
                'WHERE "policy_id" IS NOT NULL AND "status" = \'policy_created\''
            )[0][0]
            return created == len(names) and all(
                per_policy.get(n, {}).get("status_requests", 0) >= 2 for n in names
            )

        cluster.wait_for("run 1 to poll every policy", polling, 120)
        with Sampler(totals, 0.2) as calls:
            time.sleep(1.0)  # a few samples before the cut
            cluster.hosts.cut(host_1)
            cut_at = time.time()
            # The last renewal the warehouse executed before the cut (run 1 cannot have had
            # a later one confirmed): its fence is at most this renewal + 5/6 TTL.
            expiries = [e for n, (_o, e) in lease_rows(cluster)().items() if n in names and e]
            fence_at = max(utc_epoch(e) for e in expiries) - TTL + FENCE
            # The progress sensor resumes the policies once their leases have lapsed.

            def resumed() -> list[DagsterRun]:
                runs = cluster.instance.get_runs(RunsFilter(tags={SENSOR_TAG: "progress"}))
                return [run for run in runs if PROCESS_TAG in run.tags]

            resuming = cluster.wait_for("the progress sensor's run", resumed, 150)
            resume_created = min(
                record.create_timestamp.timestamp()
                for record in cluster.instance.get_run_records(
                    RunsFilter(run_ids=[run.run_id for run in resuming])
                )
            )

            def all_completed() -> bool:
                rows = states(cluster)
                return all([r["status"] for r in rows.get(n, [])] == ["completed"] for n in names)

            cluster.wait_for("the other host to complete the policies", all_completed, 150)
            done_at = time.time()
            time.sleep(max(0.0, cut_at + RESTORE_AFTER_SECONDS - time.time()))
            before_restore = states(cluster)
            counts_before_restore = totals()
            cluster.hosts.restore(host_1)
            restored_at = time.time()
            run_1 = finished(cluster, run_1.run_id, 120)
            ended_at = time.time()
        after_run_1 = states(cluster)
        # Every run the progress sensor launched, once ended.
        resuming = [
            finished(cluster, run.run_id, 60)
            for run in cluster.instance.get_runs(RunsFilter(tags={SENSOR_TAG: "progress"}))
        ]
        # Run 1 failed the policies it gave up, so run retries launch it again: the retry
        # finds them completed and calls nothing.
        retries = cluster.wait_for(
            "run 1's retry to end",
            lambda: [
                run
                for run in cluster.instance.get_runs(
                    RunsFilter(tags={"dagster/parent_run_id": run_1.run_id})
                )
                if run.is_finished
            ],
            RUN_TIMEOUT_SECONDS,
        )
        all_runs = cluster.instance.get_runs()
        # Who called the circuit breaker, by the audit trail (the state row keeps the run that
        # created the execution).
        circuit_calls = cluster.query(
            'SELECT "policy_name", "dagster_run_id" FROM policy_execution_events '
            "WHERE \"event_type\" = 'api_call' AND \"endpoint\" = 'circuit'"
        )
        counts = per_policy_counts(cluster, names)
        final = totals()
        messages_1 = run_messages(cluster, run_1.run_id)
        logs = cluster.logs()
        hosts = cluster.hosts
    context = f"{[m for _, m in messages_1][-30:]}\n{logs}"

    # Run 1 stopped calling before its leases could lapse: no call reached the API between
    # its fence (plus the request's transit) and the first moment another run could exist.
    assert fence_at < cut_at + FENCE + 1.0, (fence_at, cut_at)
    window = [(at, value) for at, value in calls.samples if fence_at + TRANSIT_SLACK_SECONDS
              <= at <= resume_created]  # fmt: skip
    assert resume_created - (fence_at + TRANSIT_SLACK_SECONDS) > 3.0, (resume_created, fence_at)
    assert len(window) > 10, len(window)
    assert len({tuple(sorted(value.items())) for _, value in window}) == 1, window
    last_call = max(
        at
        for (at, value), (_, previous) in zip(calls.samples[1:], calls.samples, strict=False)
        if at <= resume_created and value != previous
    )
    # The lapse came before any other run could take the policies over.
    assert resume_created > max(utc_epoch(e) for e in expiries), (resume_created, expiries)

    # The resuming run ran on the other host; run 1 kept its host's only slot meanwhile.
    runs_seen = [
        (run.run_id[:8], run.status.value, run.tags.get(PROCESS_TAG, "-").split("/")[0],
         {k: v for k, v in run.tags.items() if k.startswith(("policy_pipeline/t", "dagster/p"))})
        for run in all_runs
    ]  # fmt: skip
    print(f"\nruns: {runs_seen}")
    resume_hosts = {host_of(run) for run in resuming if PROCESS_TAG in run.tags}
    assert resume_hosts and host_1 not in resume_hosts, (host_1, resume_hosts)
    assert all(run.status is DagsterRunStatus.SUCCESS for run in resuming), context
    resume_ids = {run.run_id for run in resuming}

    # Back on the warehouse, run 1 gave the policies up, wrote nothing more for them, and
    # its Dagster run ended (failed: its policies were not its own to finish).
    assert run_1.status is DagsterRunStatus.FAILURE, context
    text = "\n".join(message for _, message in messages_1)
    assert "leases were taken by another run after they lapsed" in text, context
    # A cut between two of the writer's statements makes its next login fail ("cannot be
    # reached", retried every 2 s); a cut in the middle of a statement holds that statement
    # until the network is back (the connector's network_timeout, 10 TTLs, bounds it).
    # Either way no call started past the fence (above).
    stalled = "cannot be reached" not in text
    assert "taking over" not in text
    assert after_run_1 == before_restore, (before_restore, after_run_1)
    assert final["create_requests"] == counts_before_restore["create_requests"]
    assert final["circuit_requests"] == counts_before_restore["circuit_requests"]
    assert all(run.status is DagsterRunStatus.SUCCESS for run in retries), context
    assert all(run.is_finished for run in all_runs), [(r.run_id, r.status) for r in all_runs]

    # Nothing lost, nothing twice: one execution per policy, created by run 1 and completed
    # by the resuming run; one create and one circuit-breaker call each at the API.
    assert sorted(name for name, _ in circuit_calls) == names, circuit_calls
    assert {run_id for _, run_id in circuit_calls} <= resume_ids, (circuit_calls, resume_ids)
    for name in names:
        [row] = after_run_1[name]
        assert row["status"] == "completed" and row["dagster_run_id"] == run_1.run_id, row
        assert counts[name]["create_requests"] == 1, (name, counts[name])
        assert counts[name]["circuit_requests"] == 1, (name, counts[name])
    assert hosts.leftovers() == []
    print(
        f"\npartition: cluster up in {up - began:.0f}s; {host_1} cut at 0s; its fence at "
        f"{fence_at - cut_at:.1f}s, its last API call seen at {last_call - cut_at:.1f}s; "
        f"leases lapsed by {max(utc_epoch(e) for e in expiries) - cut_at:.1f}s; the progress "
        f"sensor's run created at {resume_created - cut_at:.1f}s on {sorted(resume_hosts)}, "
        f"every policy completed at {done_at - cut_at:.1f}s; restored at "
        f"{restored_at - cut_at:.1f}s, run 1 ended {ended_at - restored_at:.1f}s later; "
        f"{len(retries)} retry run(s); API totals {final}; run 1's writer "
        + ("was held in a statement during the cut" if stalled else "retried its logins")
    )
