"""``deploy/local-cluster.sh``: the Celery layout of deploy/ on this machine, for a local try.

The same hosts as the cluster tests (`policy_pipeline_tests.harness.cluster`): a services host
(PostgreSQL, Redis, fakesnow as the warehouse, the Policy API simulator), a control host
(code server, webserver, daemon) and worker hosts, each its own set of Linux namespaces, built
with deploy/'s start scripts and deploy/celery/dagster.yaml. Needs root. It prints the UI's
address, then reads commands on standard input until ``quit`` (or Ctrl-C, or end of input):

    kill worker-1      every process of that host dies at once (SIGKILL of its PID namespace)
    cut worker-2       that host no longer reaches the warehouse (it still reaches the API)
    restore worker-2   it reaches the warehouse again
    counts             the Policy API's create and circuit-breaker calls per policy
    quit               stop everything and remove every namespace

The catalog sensor is off (materialize from the UI); policy_progress_sensor stays on.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

import yaml

from policy_devtools.simulator import SimulatorConfig
from policy_pipeline.core.catalog import load_catalog
from policy_pipeline.core.settings import PROJECT_ROOT
from policy_pipeline.defs.workflow.partitions import register_policies
from policy_pipeline_tests.harness.cluster import WEBSERVER_PORT, celery_cluster
from policy_pipeline_tests.harness.hosts import unavailable_reason


def _catalog(directory: Path, extra: int) -> Path:
    shutil.copytree(PROJECT_ROOT / "policies", directory)
    for i in range(extra):
        name = f"local_policy_{i:04d}"
        entry = {
            "policy_name": name,
            "policy_type": "data_retention",
            "description": f"Local cluster policy {i}.",
            "priority": "low",
        }
        (directory / f"{name}.yaml").write_text(yaml.safe_dump(entry))
    return directory


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="deploy/local-cluster.sh", description=__doc__)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--extra-policies", type=int, default=200, help="added to policies/")
    parser.add_argument("--per-run", type=int, default=50, help="partitions per backfill run")
    args = parser.parse_args(argv)
    reason = unavailable_reason()
    if reason is not None:
        print(f"error: {reason}", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="policy-local-cluster-") as tmp:
        root = Path(tmp)
        catalog = _catalog(root / "policies", args.extra_policies)
        simulator = SimulatorConfig(ready_after_polls=2, latency_ms=20, latency_jitter_ms=30)
        env = {"POLICY_BACKFILL_MAX_PARTITIONS_PER_RUN": str(args.per_run)}
        print("starting the services, the control host and the worker hosts ...", flush=True)
        with celery_cluster(
            root, catalog, simulator, workers=args.workers, env=env,
            keep_automation=["policy_progress_sensor"],
        ) as cluster:  # fmt: skip
            # The catalog's policies as partitions, so that the UI offers them at once (as
            # `policy-pipeline register-partitions` does on a new instance).
            register_policies(cluster.instance, sorted(load_catalog(catalog)))
            control = cluster.hosts.hosts["control"].address
            print(
                f"UI: http://{control}:{WEBSERVER_PORT}  (Assets > policy_workflow > Materialize)"
            )
            print(f"hosts: control, {', '.join(cluster.workers)}; logs: {root / 'hosts' / 'logs'}")
            print("commands: kill HOST | cut HOST | restore HOST | counts | quit", flush=True)
            for line in sys.stdin:
                words = line.split()
                if not words:
                    continue
                command, target = words[0], (words[1] if len(words) > 1 else "")
                try:
                    if command == "quit":
                        break
                    if command == "kill":
                        cluster.hosts.kill_host(target)
                    elif command == "cut":
                        cluster.hosts.cut(target)
                    elif command == "restore":
                        cluster.hosts.restore(target)
                    elif command == "counts":
                        per_policy = cluster.services.api_counts()["per_policy"]
                        for name, mine in sorted(per_policy.items()):
                            print(f"{name}: creates {mine['create_requests']}, "
                                  f"circuit breakers {mine['circuit_requests']}")  # fmt: skip
                    else:
                        print(f"unknown command: {command}")
                        continue
                    print("ok", flush=True)
                except (KeyError, RuntimeError) as exc:
                    print(f"error: {exc!r}", flush=True)
        print("stopped; every namespace removed", flush=True)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.exit(130)
