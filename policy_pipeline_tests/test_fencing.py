"""Fencing: a run that cannot renew its leases stops calling the API before they lapse, goes on
with what it still holds once the warehouse answers again, and leaves to the other run what
that run took over. Against an API that ignores Idempotency-Key (replays are new calls), so
only the fencing keeps a policy from being created or fired twice."""

from __future__ import annotations

import subprocess
import threading
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import duckdb
import pytest

from policy_pipeline.core.domain import PolicyDefinition
from policy_pipeline.core.engine import workflow as workflow_module
from policy_pipeline.core.engine.steps import RunReport
from policy_pipeline.core.engine.workflow import PolicyWorkflow
from policy_pipeline.core.settings import PROJECT_ROOT, LeaseSettings, PollingSettings, Settings
from policy_pipeline.core.store.connection import WarehouseConnection, WarehouseUnavailable
from policy_pipeline.core.store.state_store import StateStore
from policy_pipeline.resources.policy_api import PolicyApiResource
from policy_pipeline.resources.snowflake_state import snowflake_resource
from policy_pipeline_tests.conftest import RecordingLog, Workspace, job_command, subprocess_env

POLLING = PollingSettings(initial_interval_seconds=0.05, max_interval_seconds=0.2, max_polls=2000)
TTL = 6  # seconds: short, so the test waits for lapses of a few seconds only


class _CuttableWarehouse:
    """A connection factory whose warehouse the test can cut off: while cut, every connect
    fails as a network cut or a lock held past the wait does."""

    def __init__(self, connect: Callable[[], AbstractContextManager[Any]]) -> None:
        self.connect = connect
        self.cut = threading.Event()

    def __call__(self) -> AbstractContextManager[Any]:
        if self.cut.is_set():
            raise ConnectionError("the warehouse cannot be reached (cut off by the test)")
        return self.connect()


def _connect(workspace: Workspace) -> Callable[[], AbstractContextManager[Any]]:
    if workspace.warehouse == "duckdb":
        path = str(workspace.duckdb_path)
        return lambda: duckdb.connect(path)
    return snowflake_resource(Settings.from_env()).process_config_and_initialize().get_connection


def _polls(workspace: Workspace, name: str) -> int:
    return workspace.simulator.counts()["per_policy"].get(name, {}).get("status_requests", 0)


def _hold_read_only(path: Path, timeout: float = 30.0) -> duckdb.DuckDBPyConnection:
    """A reader's connection to the DuckDB file, taken between two of the run's own
    connections (the run holds the file only while it writes a batch)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return duckdb.connect(str(path), read_only=True)
        except duckdb.IOException:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def _wait_for(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


@pytest.mark.both_warehouses
def test_a_run_cut_off_from_the_warehouse_stops_calling_before_its_leases_lapse(
    workspace: Workspace,
) -> None:
    """Two policies polled by run A; A's warehouse is cut off past the lease TTL; meanwhile
    run B takes over one of them. A starts no call once its leases are no longer surely its
    own; when the warehouse answers again A finishes the policy still its own and leaves the
    other to B. Each policy is created once and fired once."""
    sim = workspace.simulator
    sim.configure(ignore_idempotency_keys=True, ready_after_polls=0, ready_after_seconds=25)
    names = ["kept", "taken"]
    policies = {
        name: PolicyDefinition(
            policy_name=name, policy_type="access", description="fencing test", priority="low"
        )
        for name in names
    }
    dialect = workspace.dialect
    cuttable = _CuttableWarehouse(_connect(workspace))
    store_a = StateStore(WarehouseConnection(dialect, cuttable))
    # Run B's own connection (on DuckDB, the same in-process database).
    store_b = StateStore(WarehouseConnection(dialect, _connect(workspace)))
    lease = LeaseSettings(ttl_seconds=TTL, wait_seconds=60)
    api = PolicyApiResource(
        endpoint=sim.base_url, api_key=sim.config.api_key or "", backoff_initial_seconds=0.01
    )
    with api.process_config_and_initialize_cm() as api_a:
        log_a = RecordingLog()
        run_a = PolicyWorkflow(store_a, api_a.get_client(), "run:a", log_a, lease=lease)
        reports: list[RunReport] = []
        thread = threading.Thread(
            target=lambda: reports.append(run_a.run(names, definitions=policies, polling=POLLING))
        )
        thread.start()
        try:
            _wait_for(lambda: all(_polls(workspace, n) >= 3 for n in names), 30, "polls")
            cuttable.cut.set()
            cut_at = time.monotonic()
            # Past the fence (5/6 of the TTL after the last confirmed renewal, which was
            # sent before the cut) no call may start.
            time.sleep(TTL + 0.5)
            at_lapse = {n: _polls(workspace, n) for n in names}
            # The leases have lapsed in the warehouse: run B acquires one of the policies.
            _wait_for(
                lambda: store_b.acquire_leases(["taken"], "run:b", TTL) == {"taken"},
                10,
                "run B to acquire the lapsed lease",
            )
            time.sleep(1.5)
            assert {n: _polls(workspace, n) for n in names} == at_lapse, (
                "run A called the API for a policy whose lease it could not renew"
            )
            cut_for = time.monotonic() - cut_at
            cuttable.cut.clear()
            thread.join(timeout=90)
            assert not thread.is_alive()
        finally:
            cuttable.cut.clear()
            thread.join(timeout=90)
        [report] = reports
        assert cut_for > TTL
        # A stopped the policy B holds, and wrote nothing more for it.
        assert set(report.failures) == {"taken"}, report.failures
        assert "another run took the policy over" in report.failures["taken"][1]
        assert any("cannot be reached" in w for w in log_a.warnings), log_a.warnings
        assert any("answers again" in w for w in log_a.warnings), log_a.warnings
        assert _polls(workspace, "taken") == at_lapse["taken"]
        # A released only what it still held: the lock row still names B.
        assert workspace.query(
            'SELECT "lease_owner" FROM policy_execution_locks WHERE "policy_name" = ?',
            ["taken"],
        ) == [("run:b",)]
        kept = store_b.current_execution("kept")
        assert kept is not None and kept.status == "completed"

        # Run B finishes the policy it took over: the same execution, no second create.
        with api.process_config_and_initialize_cm() as api_b:
            run_b = PolicyWorkflow(
                store_b, api_b.get_client(), "run:b", RecordingLog(), lease=lease
            )
            report_b = run_b.run(["taken"], definitions=policies, polling=POLLING)
        assert not report_b.failures, report_b.failures

    counts = sim.counts()["per_policy"]
    for name in names:
        assert counts[name]["create_requests"] == 1, (name, counts[name])
        assert counts[name]["circuit_requests"] == 1, (name, counts[name])
        rows = workspace.executions(name)
        assert [r["status"] for r in rows] == ["completed"], rows


def test_a_duckdb_file_held_past_the_ttl_fires_no_circuit_breaker_twice(
    workspace: Workspace, tmp_path: Path
) -> None:
    """The reported defect, through `dagster job execute`: a reader holds the DuckDB file for
    longer than the lease TTL while run 1 polls two slow policies, then run 2 of the same
    policies starts. Run 1 calls nothing while it cannot renew; one circuit breaker each."""
    sim = workspace.simulator
    sim.configure(ignore_idempotency_keys=True, ready_after_polls=0, ready_after_seconds=18)
    names = ["customer_data_retention", "pii_access_review"]
    config = tmp_path / "policies.yaml"
    config.write_text(
        "ops:\n  policy_workflow:\n    config:\n      policies: [" + ", ".join(names) + "]\n"
    )
    env = subprocess_env(
        workspace,
        POLICY_LEASE_TTL_SECONDS=str(TTL),
        POLICY_LEASE_WAIT_SECONDS="30",
        # Polled until ready, however long the hold and the other run take.
        POLICY_POLL_MAX_POLLS="2000",
        POLICY_POLL_DEADLINE_SECONDS="240",
    )
    command = job_command("-c", str(config))

    def start() -> subprocess.Popen[str]:
        return subprocess.Popen(
            command,
            cwd=PROJECT_ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )

    first = start()
    second: subprocess.Popen[str] | None = None
    try:
        _wait_for(lambda: all(_polls(workspace, n) >= 3 for n in names), 120, "polls")
        reader = _hold_read_only(workspace.duckdb_path)
        try:
            time.sleep(TTL + 0.5)
            at_fence = {n: _polls(workspace, n) for n in names}
            time.sleep(3)  # held TTL + 3.5 s in all
            assert {n: _polls(workspace, n) for n in names} == at_fence, (
                "run 1 kept calling the API while it could not renew its leases"
            )
        finally:
            reader.close()
        second = start()
        output_1, _ = first.communicate(timeout=300)
        output_2, _ = second.communicate(timeout=300)
    finally:
        for process in (first, second):
            if process is not None and process.poll() is None:
                process.kill()
                process.communicate()
    outputs = f"run 1:\n{output_1[-3000:]}\nrun 2:\n{output_2[-3000:]}"
    assert "cannot be reached" in output_1, outputs
    counts = sim.counts()["per_policy"]
    for name in names:
        assert counts[name]["create_requests"] == 1, (name, counts[name])
        [row] = workspace.executions(name)
        assert counts[name]["circuit_requests"] == 1, (name, counts[name], row, outputs)
        assert row["status"] == "completed", (row, outputs)
        # The audit trail holds every poll the state row counts.
        [(audited,)] = workspace.query(
            "SELECT COUNT(*) FROM policy_execution_events "
            'WHERE "execution_id" = ? AND "endpoint" = \'policy_status\' '
            "AND \"event_type\" = 'api_call'",
            [row["execution_id"]],
        )
        assert audited == row["poll_count"], (audited, row["poll_count"])


def test_a_run_whose_warehouse_stays_gone_ends_and_leaves_its_policies_resumable(
    workspace: Workspace, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A warehouse that does not come back: the run stops calling at the fence, gives up after
    WAREHOUSE_GIVE_UP_TTLS lease TTLs (not for ever), and a later run completes the policy
    from what the warehouse recorded: no second create, one circuit breaker."""
    monkeypatch.setattr(workflow_module, "WAREHOUSE_GIVE_UP_TTLS", 2)
    sim = workspace.simulator
    sim.configure(ignore_idempotency_keys=True, ready_after_polls=0, ready_after_seconds=20)
    name = "stranded"
    policies = {
        name: PolicyDefinition(
            policy_name=name, policy_type="access", description="fencing test", priority="low"
        )
    }
    cuttable = _CuttableWarehouse(_connect(workspace))
    store = StateStore(WarehouseConnection(workspace.dialect, cuttable))
    lease = LeaseSettings(ttl_seconds=TTL, wait_seconds=60)
    api = PolicyApiResource(
        endpoint=sim.base_url, api_key=sim.config.api_key or "", backoff_initial_seconds=0.01
    )
    errors: list[BaseException] = []
    with api.process_config_and_initialize_cm() as client:
        run = PolicyWorkflow(store, client.get_client(), "run:gone", RecordingLog(), lease=lease)

        def work() -> None:
            try:
                run.run([name], definitions=policies, polling=POLLING)
            except BaseException as exc:
                errors.append(exc)

        thread = threading.Thread(target=work)
        thread.start()
        try:
            _wait_for(lambda: _polls(workspace, name) >= 3, 30, "polls")
            cuttable.cut.set()
            cut_at = time.monotonic()
            thread.join(timeout=60)
            assert not thread.is_alive(), "the run kept waiting for a warehouse that is gone"
        finally:
            cuttable.cut.clear()
            thread.join(timeout=30)
    ended_after = time.monotonic() - cut_at
    [error] = errors
    assert isinstance(error, WarehouseUnavailable) and "could not be reached for" in str(error)
    assert 2 * TTL <= ended_after < 2 * TTL + 20, ended_after
    [row] = workspace.executions(name)
    assert row["status"] == "policy_created", row  # as last recorded: resumable
    with api.process_config_and_initialize_cm() as client:
        later = PolicyWorkflow(store, client.get_client(), "run:later", RecordingLog(), lease=lease)
        report = later.run([name], definitions=policies, polling=POLLING)
    assert not report.failures, report.failures
    counts = sim.counts()["per_policy"][name]
    assert counts["create_requests"] == 1 and counts["circuit_requests"] == 1, counts
