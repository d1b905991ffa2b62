#!/usr/bin/env bash
# The Dagster daemon: starts queued runs within the limits of dagster.yaml, runs the
# schedules and sensors (the catalog sensor, the run-failure alert), monitors runs and retries
# failed ones. Run exactly one per deployment.
set -euo pipefail
# shellcheck source=_common.sh source-path=SCRIPTDIR
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"

cd "$REPO_DIR"
exec "$DAGSTER_BIN_DIR/dagster-daemon" run --workspace "$DEPLOY_DIR/workspace.yaml" "$@"
