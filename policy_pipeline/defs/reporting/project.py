"""The dbt project (``dbt_project/``) as dagster-dbt sees it.

The manifest is prepared the way dagster-dbt intends, never while the definitions load:
``dagster-dbt project prepare-and-package --file policy_pipeline/defs/reporting/project.py``
(run by ``./dev.sh``, ``.ci/run`` and ``deploy/``), and again on every reload under
``dagster dev`` / ``dg dev`` (``prepare_if_dev``; both run ``dbt`` from PATH, so the virtual
environment must be active). The manifest is parsed with the DuckDB target, which renders
without any secret: its structure (nodes, tests, lineage) does not depend on the target, and
``dbt build`` compiles against the warehouse's own target at run time.
"""

import sys
from pathlib import Path
from typing import Final

from dagster_dbt import DbtProject

from policy_pipeline.core.settings import PROJECT_ROOT, Settings

DBT_PROJECT_DIR: Final = PROJECT_ROOT / "dbt_project"  # the project shipped here
PARSE_TARGET: Final = "duckdb"


def dbt_executable() -> str:
    """The dbt beside this interpreter, for the runs' ``dbt build``: a run started from an
    unactivated virtual environment has no dbt on PATH."""
    candidate = Path(sys.executable).parent / "dbt"
    return str(candidate) if candidate.exists() else "dbt"


# POLICY_DBT_PROJECT_DIR names another copy (default: the shipped one).
_project_dir = Settings.from_env().dbt_project_dir
policy_dbt_project = DbtProject(
    project_dir=_project_dir, profiles_dir=_project_dir, target=PARSE_TARGET
)
policy_dbt_project.prepare_if_dev()
