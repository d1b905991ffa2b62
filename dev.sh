#!/usr/bin/env bash
# The project's set-up commands (see README):
#   ./dev.sh demo   install into .venv, run the workflow for every catalog policy, print the table
#   ./dev.sh test   install into .venv, then lint, type-check, `dg check defs` and run the tests
#   ./dev.sh ui     install into .venv, start the simulator and `dagster dev` on loopback
set -euo pipefail
cd "$(dirname "$0")"

find_python() {
  for candidate in "${PYTHON:-}" python3.11 python3; do
    if [ -n "$candidate" ] && command -v "$candidate" >/dev/null 2>&1 &&
      "$candidate" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))'; then
      echo "$candidate"
      return
    fi
  done
  echo "error: Python 3.11 is required (set PYTHON=/path/to/python3.11)" >&2
  exit 2
}

# The virtual environment's tools first on PATH, as if it were active: dagster-dbt runs the
# `dbt` it finds there (to prepare the manifest, and under `dagster dev`).
export VIRTUAL_ENV="$PWD/.venv" PATH="$PWD/.venv/bin:$PATH"

install() {
  if [ ! -x .venv/bin/python ]; then
    "$(find_python)" -m venv .venv
  fi
  # uv resolves and installs the pinned lock file in seconds; pip would take minutes.
  .venv/bin/python -m pip install --quiet --disable-pip-version-check "uv==0.13.9"
  .venv/bin/uv pip install --quiet --python .venv/bin/python -r requirements.lock -e .
  # The dbt manifest the reporting assets are built from, prepared the way dagster-dbt intends
  # (the code location never parses dbt while it loads; `dagster dev` re-prepares on reload).
  .venv/bin/dagster-dbt project prepare-and-package --file policy_pipeline/defs/reporting/project.py >/dev/null
}

case "${1:-}" in
  demo)
    install
    .venv/bin/python -m policy_devtools.demo
    ;;
  test)
    install
    .venv/bin/ruff check .
    .venv/bin/ruff format --check .
    .venv/bin/mypy policy_pipeline policy_devtools
    .venv/bin/dg check defs
    # Three workers on two cores, each taking tests from the others when idle: the longest
    # tests mostly wait (the hands-off test's three minutes, leases lapsing on the cluster's
    # hosts), so a third worker overlaps them (13.3 to 13.8 minutes on a fresh clone; a fourth
    # adds CPU contention and takes longer). Every server a test starts has its own port.
    .venv/bin/python -m pytest -n 3 --dist worksteal "${@:2}"
    ;;
  ui)
    install
    exec .venv/bin/python -m policy_devtools.dev_ui "${@:2}"
    ;;
  *)
    echo "usage: ./dev.sh demo | test [pytest args] | ui" >&2
    exit 2
    ;;
esac
