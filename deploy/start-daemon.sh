#!/usr/bin/env bash
# The Dagster daemon: starts queued runs within the limits of dagster.yaml, runs the
# schedules and sensors (the catalog sensor, the run-failure alert), monitors runs and retries
# failed ones. Run exactly one per deployment.
set -euo pipefail
# shellcheck source=_common.sh source-path=SCRIPTDIR
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"

cd "$REPO_DIR"
# The op concurrency pool of the workflow step (its limit lives in the instance's storage, not
# in dagster.yaml, whose run queue limits would conflict with a `concurrency:` section): at most
# POLICY_API_POOL_LIMIT workflow steps call the Policy API at once, however they were launched.
"$DAGSTER_BIN_DIR/dagster" instance concurrency set policy_api "${POLICY_API_POOL_LIMIT:-2}" >/dev/null
exec "$DAGSTER_BIN_DIR/dagster-daemon" run --workspace "$DEPLOY_DIR/workspace.yaml" "$@"
