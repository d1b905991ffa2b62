#!/usr/bin/env bash
# The Dagster UI and GraphQL API on $DAGSTER_WEBSERVER_HOST:$DAGSTER_WEBSERVER_PORT
# (default 127.0.0.1:3000), for the code location served by start-code-server.sh.
# Put it behind your authenticating reverse proxy before listening beyond loopback.
set -euo pipefail
# shellcheck source=_common.sh source-path=SCRIPTDIR
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"

cd "$REPO_DIR"
exec "$DAGSTER_BIN_DIR/dagster-webserver" \
  --workspace "$DEPLOY_DIR/workspace.yaml" \
  --host "${DAGSTER_WEBSERVER_HOST:-127.0.0.1}" \
  --port "${DAGSTER_WEBSERVER_PORT:-3000}" \
  "$@"
