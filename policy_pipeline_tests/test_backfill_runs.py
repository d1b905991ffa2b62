"""A backfill launched as the UI launches it (GraphQL `launchPartitionBackfill` on `dagster dev`,
whose daemon runs the backfill) is split into runs of at most
POLICY_BACKFILL_MAX_PARTITIONS_PER_RUN partitions, so that the runs can go to different
workers; a smaller selection stays one run. Each policy is still created and fired once."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from dagster import DagsterInstance, DagsterRunStatus, RunsFilter

from policy_pipeline_tests.conftest import CATALOG_POLICIES, Workspace, subprocess_env
from policy_pipeline_tests.harness.dagster_dev import DagsterDev, dagster_dev, prepare_dagster_home
from policy_pipeline_tests.harness.graphql import LAUNCH_BACKFILL

STEPS = ("policy_created", "policy_ready", "circuit_breaker_activation")
FINISHED = {DagsterRunStatus.SUCCESS, DagsterRunStatus.FAILURE, DagsterRunStatus.CANCELED}


def _launch(server: DagsterDev, names: list[str]) -> str:
    params = {"partitionNames": names, "assetSelection": [{"path": [step]} for step in STEPS]}
    result = server.graphql(LAUNCH_BACKFILL, {"params": params})["launchPartitionBackfill"]
    assert result["__typename"] == "LaunchBackfillSuccess", result
    return str(result["backfillId"])


def _runs_of(instance: DagsterInstance, backfill_id: str, expected: int, log: Path) -> list[Any]:
    deadline = time.monotonic() + 240
    while True:
        runs = instance.get_runs(RunsFilter(tags={"dagster/backfill": backfill_id}))
        if len(runs) >= expected and all(run.status in FINISHED for run in runs):
            return list(runs)
        if time.monotonic() > deadline:
            raise AssertionError(
                f"backfill {backfill_id}: {[(r.run_id, r.status) for r in runs]}\n"
                + log.read_text(errors="replace")[-4000:]
            )
        time.sleep(1)


def _partitions(run: Any) -> list[str]:
    """The policies one run of the backfill was given (a range of the partition order)."""
    tags = run.tags
    if "dagster/partition" in tags:
        return [tags["dagster/partition"]]
    return [tags["dagster/asset_partition_range_start"], tags["dagster/asset_partition_range_end"]]


def test_a_big_backfill_is_split_into_runs_and_a_small_one_stays_one_run(
    workspace: Workspace,
) -> None:
    # Four more policies: seven in all, in the catalog's name order.
    extras = [f"retention_extra_{n}" for n in ("one", "two", "three", "four")]
    for name in extras:
        (workspace.catalog_dir / f"{name}.yaml").write_text(
            f"policy_name: {name}\npolicy_type: data_retention\n"
            "description: A backfill test policy.\npriority: low\n"
        )
    names = sorted([*CATALOG_POLICIES, *extras])
    big_names, small_names = names[:5], names[5:]
    env = subprocess_env(workspace, POLICY_BACKFILL_MAX_PARTITIONS_PER_RUN="2")
    home = prepare_dagster_home(
        Path(env["DAGSTER_HOME"]), {"run_queue": {"dequeue_interval_seconds": 1}}
    )
    log = workspace.root / "dagster-dev.log"
    with dagster_dev(env, log) as server, DagsterInstance.from_config(str(home)) as instance:
        instance.add_dynamic_partitions(
            "policies", [n for n in names if not instance.has_dynamic_partition("policies", n)]
        )
        # Both at once, on policies of their own: the daemon takes them up in one pass (it
        # looks at backfills every 30 s).
        big_id, small_id = _launch(server, big_names), _launch(server, small_names)
        big = _runs_of(instance, big_id, 3, log)
        small = _runs_of(instance, small_id, 1, log)

    # Five policies, at most two per run: three runs, which between them cover all five.
    assert len(big) == 3, [r.tags for r in big]
    assert all(run.status is DagsterRunStatus.SUCCESS for run in big), [r.status for r in big]
    covered = sorted(name for run in big for name in _partitions(run))
    assert set(covered) == set(big_names) and len(covered) in (5, 6), covered
    # Two policies, within the limit: one run.
    assert len(small) == 1 and small[0].status is DagsterRunStatus.SUCCESS
    assert sorted(_partitions(small[0])) == small_names, small[0].tags
    counts = workspace.simulator.counts()["per_policy"]
    for name in names:
        assert counts[name]["policies_created"] == 1, (name, counts[name])
        assert counts[name]["circuits_triggered"] == 1, (name, counts[name])
