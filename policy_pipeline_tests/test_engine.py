"""The engine on its own (no Dagster run): each policy moves on its own, whatever another
policy, another run's lease or a stop request does. Real parts: the simulator over HTTP and a
DuckDB file."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import duckdb
import pytest

from policy_devtools.simulator import PolicyApiSimulator, SimulatorConfig
from policy_pipeline.core.domain import STEP_CIRCUIT, STEP_CREATE, STEP_READY, PolicyDefinition
from policy_pipeline.core.engine.steps import Progress
from policy_pipeline.core.engine.workflow import PolicyWorkflow
from policy_pipeline.core.liveness import this_process
from policy_pipeline.core.settings import LeaseSettings, PollingSettings
from policy_pipeline.core.store.connection import WarehouseConnection
from policy_pipeline.core.store.dialect import SqlDialect
from policy_pipeline.core.store.state_store import StateStore
from policy_pipeline.resources.policy_api import PolicyApiResource
from policy_pipeline_tests.conftest import RecordingLog

FAST = PollingSettings(initial_interval_seconds=0.05, max_interval_seconds=0.2, max_polls=400)


def _policies(*names: str) -> dict[str, PolicyDefinition]:
    return {
        name: PolicyDefinition(
            policy_name=name, policy_type="access", description="engine test", priority="low"
        )
        for name in names
    }


@contextmanager
def _engine(
    tmp_path: Path, config: SimulatorConfig, lease: LeaseSettings | None = None
) -> Iterator[tuple[PolicyWorkflow, PolicyApiSimulator, StateStore]]:
    database = str(tmp_path / "state.duckdb")
    store = StateStore(WarehouseConnection(SqlDialect.DUCKDB, lambda: duckdb.connect(database)))
    with (
        PolicyApiSimulator(config) as sim,
        PolicyApiResource(
            endpoint=sim.base_url, api_key=config.api_key or "", backoff_initial_seconds=0.01
        ).process_config_and_initialize_cm() as api,
    ):
        owner = f"test:{uuid.uuid4().hex[:8]}"
        yield (
            PolicyWorkflow(store, api.get_client(), owner=owner, log=RecordingLog(), lease=lease),
            sim,
            store,
        )


def _config(**changes: object) -> SimulatorConfig:
    return SimulatorConfig(api_key="k-" + uuid.uuid4().hex, ready_after_polls=0, **changes)  # type: ignore[arg-type]


def test_a_policy_another_run_holds_does_not_hold_up_the_others(tmp_path: Path) -> None:
    """One policy's lease is held by another run: the others finish at once; the held one
    goes on as soon as the lease is free, within the same run, and nothing is lost."""
    policies = _policies("held", "free-1", "free-2")
    lease = LeaseSettings(ttl_seconds=30, wait_seconds=20)
    with _engine(tmp_path, _config(), lease) as (workflow, sim, store):
        assert store.acquire_leases(["held"], "run:other", 30) == {"held"}
        passed: dict[str, float] = {}

        def seen(progress: Progress) -> None:
            if progress.step == STEP_CIRCUIT and progress.outcome is not None:
                passed[progress.policy_name] = time.monotonic()

        release = threading.Timer(2.0, store.release_leases, (["held"], "run:other"))
        release.start()
        started = time.monotonic()
        report = workflow.run(list(policies), definitions=policies, polling=FAST, on_progress=seen)
        release.join()
        assert not report.failures, report.failures
        assert passed["free-1"] - started < 2.0 and passed["free-2"] - started < 2.0
        assert passed["held"] - started >= 2.0  # after the other run let go of it
        counts = sim.counts()["per_policy"]
        assert all(counts[name]["circuits_triggered"] == 1 for name in policies)
        for name in policies:
            row = store.current_execution(name)
            assert row is not None and row.status == "completed", name


def test_a_lease_never_freed_fails_only_that_policy(tmp_path: Path) -> None:
    policies = _policies("held", "free")
    with _engine(tmp_path, _config(), LeaseSettings(ttl_seconds=60, wait_seconds=1)) as (
        workflow,
        sim,
        store,
    ):
        store.acquire_leases(["held"], "run:other", 60)
        report = workflow.run(list(policies), definitions=policies, polling=FAST)
        assert set(report.failures) == {"held"}
        step, why = report.failures["held"]
        assert step == STEP_CREATE and "being processed by run:other" in why
        assert set(report.outcomes[STEP_CIRCUIT]) == {"free"}
        assert "held" not in sim.counts()["per_policy"]  # no call at all for it


def test_step_figures_count_each_step_alone(tmp_path: Path) -> None:
    policies = _policies("one")
    with _engine(tmp_path, _config(ready_after_seconds=0.3)) as (workflow, _sim, _store):
        report = workflow.run(list(policies), definitions=policies, polling=FAST)
        created = report.outcomes[STEP_CREATE]["one"]
        ready = report.outcomes[STEP_READY]["one"]
        circuit = report.outcomes[STEP_CIRCUIT]["one"]
        assert created.api_calls == 1 and circuit.api_calls == 1
        assert ready.api_calls == ready.poll_count >= 2  # only its polls
        assert not created.resumed and not ready.resumed and not circuit.resumed


def test_stop_writes_the_answers_in_flight_and_starts_nothing_new(tmp_path: Path) -> None:
    """A stopped run (Dagster terminating it) leaves every policy where its last answer put
    it, recorded, for a later run to resume."""
    policies = _policies(*(f"p{i}" for i in range(6)))
    stop = threading.Event()
    with _engine(tmp_path, _config(never_ready_policies=list(policies))) as (
        workflow,
        sim,
        store,
    ):
        threading.Timer(1.0, stop.set).start()
        started = time.monotonic()
        report = workflow.run(list(policies), definitions=policies, polling=FAST, stop=stop)
        assert time.monotonic() - started < 5.0
        assert set(report.outcomes[STEP_CREATE]) == set(policies)
        polls = sim.counts()["requests"]["policy_status"]
        time.sleep(0.5)
        assert sim.counts()["requests"]["policy_status"] == polls  # nothing after the stop
        recorded = sum(
            row.poll_count
            for name in policies
            if (row := store.current_execution(name)) is not None
        )
        assert recorded == polls  # every answer in flight was written
        assert store.lease_holders(list(policies)) == {}  # released


@pytest.mark.parametrize("steps", [[STEP_READY], [STEP_CIRCUIT]])
def test_a_later_step_alone_refuses_a_policy_never_created(
    tmp_path: Path, steps: list[str]
) -> None:
    with _engine(tmp_path, _config()) as (workflow, sim, _store):
        report = workflow.run(["never"], steps)
        assert report.failures["never"] == (steps[0], report.failures["never"][1])
        assert "materialize policy_created first" in report.failures["never"][1]
        assert sim.counts()["requests"]["createpolicy"] == 0


def test_a_slow_call_keeps_its_lease_alive_and_a_dead_holder_is_taken_over_at_once(
    tmp_path: Path,
) -> None:
    """The lease is renewed while a call takes longer than its TTL, so a second run does not
    take a slow run for a dead one; a holder whose process is gone is taken over at once."""
    policies = _policies("slow")
    lease = LeaseSettings(ttl_seconds=5, wait_seconds=1.5)
    with _engine(tmp_path, _config(latency_ms=8_000), lease) as (workflow, sim, store):
        stop = threading.Event()
        slow = threading.Thread(
            target=workflow.run,
            args=(list(policies),),
            kwargs={"definitions": policies, "stop": stop},
        )
        slow.start()
        time.sleep(6.5)  # the create call is still in flight, past the TTL
        other = PolicyWorkflow(
            store, workflow.api, owner="run:other", log=RecordingLog(), lease=lease
        )
        report = other.run(list(policies), definitions=policies, polling=FAST)
        assert "being processed by test:" in report.failures["slow"][1]
        stop.set()  # the slow run writes its create's answer and ends
        slow.join()
        assert sim.counts()["per_policy"]["slow"]["policies_created"] == 1

    # A holder on this host whose process is gone: taken over without waiting for the TTL.
    (tmp_path / "dead").mkdir()
    with _engine(tmp_path / "dead", _config(), LeaseSettings(ttl_seconds=300, wait_seconds=10)) as (
        workflow,
        sim,
        store,
    ):
        gone = subprocess.Popen([sys.executable, "-c", "import os; print(os.getpid())"])
        gone.wait()
        host = this_process().rsplit(":", 2)[0]
        dead_owner = f"run:dead@{host}:{gone.pid}:1"
        assert store.acquire_leases(["slow"], dead_owner, 300) == {"slow"}
        started = time.monotonic()
        report = workflow.run(list(policies), definitions=policies, polling=FAST)
        assert not report.failures, report.failures
        assert time.monotonic() - started < 5
        assert sim.counts()["per_policy"]["slow"]["circuits_triggered"] == 1
