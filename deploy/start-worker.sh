#!/usr/bin/env bash
# A worker host of the Celery layout (deploy/README.md, "Many machines: Celery"): a Celery
# worker that takes run tasks from the broker's "dagster" queue and executes each run in a
# process of this host, with the instance in $DAGSTER_HOME/dagster.yaml (deploy/celery/
# dagster.yaml) and the code of this checkout (the policy_pipeline package, importable here).
#
# It needs exactly what deploy/celery/worker.env.example lists: DAGSTER_HOME, DAGSTER_PG_*,
# DAGSTER_CELERY_BROKER_URL / _BACKEND_URL, and the runs' POLICY_* and SNOWFLAKE_* (the runs
# run here). POLICY_WORKER_CONCURRENCY (default 1) runs at once on this host; each run already
# works POLICY_API_MAX_CONCURRENCY policies concurrently.
#
# Stop it with SIGTERM (a warm shutdown: the runs in progress finish first); a second SIGTERM or
# SIGKILL stops it at once, and the runs it held are then picked up as deploy/README.md says.
set -euo pipefail
# shellcheck source=_common.sh source-path=SCRIPTDIR
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"

for name in DAGSTER_CELERY_BROKER_URL DAGSTER_CELERY_BACKEND_URL POLICY_API_ENDPOINT POLICY_API_KEY; do
  if [ -z "${!name:-}" ]; then
    echo "error: $name must be set on a worker host (deploy/celery/worker.env.example)" >&2
    exit 2
  fi
done
if [ "${POLICY_WAREHOUSE:-duckdb}" != "snowflake" ]; then
  echo "error: POLICY_WAREHOUSE=${POLICY_WAREHOUSE:-duckdb}: DuckDB is a file on one host;" \
    "runs on Celery workers need POLICY_WAREHOUSE=snowflake and the SNOWFLAKE_* variables" >&2
  exit 2
fi

cd "$REPO_DIR"  # relative POLICY_* paths (the catalog) are read from the repository root
exec "$DAGSTER_BIN_DIR/dagster-celery" worker start \
  --app dagster_celery.app \
  --config-yaml "$DEPLOY_DIR/celery/worker.yaml" \
  --queue dagster \
  --name "${POLICY_WORKER_NAME:-policy-worker}" \
  --loglevel "${POLICY_WORKER_LOGLEVEL:-INFO}" \
  -- --concurrency "${POLICY_WORKER_CONCURRENCY:-1}" "$@"
