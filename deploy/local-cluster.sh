#!/usr/bin/env bash
# A control host and two worker hosts of the Celery layout on this machine, as Linux namespaces
# (deploy/README.md, "Many machines: Celery"): the recipe of the cluster tests
# (policy_pipeline_tests/harness/hosts.py), with the start scripts and deploy/celery/dagster.yaml
# of this directory, PostgreSQL, Redis, a local fakesnow warehouse and the Policy API simulator.
# Needs root, iproute2, util-linux, redis-server and postgresql (Debian packages), and the
# repository's .venv (./dev.sh installs it). Commands on standard input: kill HOST, cut HOST,
# restore HOST, counts, quit. Everything is removed when it stops.
set -euo pipefail
REPO_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO_DIR"
export PYTHONPATH="$REPO_DIR${PYTHONPATH:+:$PYTHONPATH}"
exec "${DAGSTER_BIN_DIR:-$REPO_DIR/.venv/bin}/python" -m policy_pipeline_tests.harness.local_cluster "$@"
