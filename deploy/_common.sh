# shellcheck shell=bash
# Shared by the deploy/start-*.sh scripts (sourced, not run): checks the environment every
# Dagster process of the deployment needs and sets the defaults documented in deploy/README.md.

set -euo pipefail

DEPLOY_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_DIR="$(dirname "$DEPLOY_DIR")"
# Where dagster, dagster-webserver and dagster-daemon are installed: the repository's .venv
# unless DAGSTER_BIN_DIR says otherwise (e.g. /usr/local/bin in a container image).
DAGSTER_BIN_DIR="${DAGSTER_BIN_DIR:-$REPO_DIR/.venv/bin}"
# dagster-dbt runs the `dbt` on PATH to prepare the manifest: the one installed beside Dagster.
export PATH="$DAGSTER_BIN_DIR:$PATH"

: "${DAGSTER_HOME:?DAGSTER_HOME must be set: the directory holding the production dagster.yaml (deploy/README.md)}"
if [ ! -f "$DAGSTER_HOME/dagster.yaml" ]; then
  echo "error: $DAGSTER_HOME/dagster.yaml not found; copy deploy/dagster.yaml there" >&2
  exit 2
fi
for name in DAGSTER_PG_HOST DAGSTER_PG_PORT DAGSTER_PG_USERNAME DAGSTER_PG_PASSWORD DAGSTER_PG_DB; do
  if [ -z "${!name:-}" ]; then
    echo "error: $name must be set (the PostgreSQL connection of dagster.yaml)" >&2
    exit 2
  fi
done
export DAGSTER_HOME
export DAGSTER_CODE_SERVER_HOST="${DAGSTER_CODE_SERVER_HOST:-127.0.0.1}"
export DAGSTER_CODE_SERVER_PORT="${DAGSTER_CODE_SERVER_PORT:-4000}"
# The Celery layout's instance (deploy/celery/dagster.yaml) reaches the broker from every
# process that loads it: the daemon launches runs there, the webserver terminates them.
if grep -q "DAGSTER_CELERY_BROKER_URL" "$DAGSTER_HOME/dagster.yaml"; then
  for name in DAGSTER_CELERY_BROKER_URL DAGSTER_CELERY_BACKEND_URL; do
    if [ -z "${!name:-}" ]; then
      echo "error: $name must be set: $DAGSTER_HOME/dagster.yaml runs on Celery" \
        "(deploy/celery/*.env.example)" >&2
      exit 2
    fi
  done
fi
