#!/usr/bin/env bash
# Serve the policy_pipeline code location over gRPC on
# $DAGSTER_CODE_SERVER_HOST:$DAGSTER_CODE_SERVER_PORT (default 127.0.0.1:4000).
#
# Runs are started by this server (DefaultRunLauncher), so its environment is the runs'
# environment: besides DAGSTER_HOME and DAGSTER_PG_* it needs POLICY_API_ENDPOINT,
# POLICY_API_KEY, the warehouse settings (POLICY_WAREHOUSE, SNOWFLAKE_* or POLICY_DUCKDB_PATH)
# and any other POLICY_* variable of the README's "Configuration" table.
#
# `dagster code-server start` (not `dagster api grpc`) so that "Reload" in the UI reloads the
# code (after a deploy of new code) without restarting this process; the catalog needs no
# reload (runs and sensor ticks read it);
# runs in progress finish on the code they started with.
set -euo pipefail
# shellcheck source=_common.sh source-path=SCRIPTDIR
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"

if [ -z "${POLICY_API_ENDPOINT:-}" ] || [ -z "${POLICY_API_KEY:-}" ]; then
  echo "error: POLICY_API_ENDPOINT and POLICY_API_KEY must be set for the runs" >&2
  exit 2
fi
cd "$REPO_DIR"  # relative POLICY_* paths are read from the repository root
# The dbt manifest the reporting assets are built from (the code location never parses dbt
# while it loads), parsed again only when a file of the dbt project is newer. In a container
# image, run the prepare-and-package at build time instead.
if ! "$DAGSTER_BIN_DIR/python" -c 'import sys
from policy_pipeline.defs.reporting.project import manifest_is_current, policy_dbt_project
sys.exit(not manifest_is_current(policy_dbt_project))'; then
  "$DAGSTER_BIN_DIR/dagster-dbt" project prepare-and-package \
    --file policy_pipeline/defs/reporting/project.py >/dev/null
fi
exec "$DAGSTER_BIN_DIR/dagster" code-server start \
  --module-name policy_pipeline.definitions \
  --attribute defs \
  --location-name policy_pipeline \
  --host "$DAGSTER_CODE_SERVER_HOST" \
  --port "$DAGSTER_CODE_SERVER_PORT" \
  "$@"
