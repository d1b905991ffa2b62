"""The dbt project (``dbt_project/``) as dagster-dbt sees it.

The manifest is prepared the way dagster-dbt intends, never while the definitions load:
``dagster-dbt project prepare-and-package --file policy_pipeline/defs/reporting/project.py``
(run by ``./dev.sh``, ``.ci/run`` and ``deploy/``), and again under ``dagster dev`` / ``dg dev``
when a file of the dbt project changed since (``prepare_if_dev``; both run ``dbt`` from PATH, so
the virtual environment must be active). The manifest is parsed with the DuckDB target, which
renders without any secret: its structure (nodes, tests, lineage) does not depend on the target,
and ``dbt build`` compiles against the warehouse's own target at run time.
"""

import json
import os
import sys
from pathlib import Path
from typing import Final

from dagster_dbt import DbtProject
from dbt.version import __version__ as DBT_VERSION

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


def manifest_is_current(project: DbtProject) -> bool:
    """Whether the manifest was parsed by this dbt after the last change to any file of the
    project (dbt's own output, logs and installed packages aside)."""
    manifest = project.manifest_path
    try:
        parsed_at = manifest.stat().st_mtime_ns
        parsed_by = json.loads(manifest.read_bytes())["metadata"]["dbt_version"]
    except (OSError, ValueError, KeyError, TypeError):
        return False
    if parsed_by != DBT_VERSION:
        return False
    root = Path(project.project_dir)
    outputs = {root / project.target_path, root / "logs", root / "dbt_packages"}
    for directory, subdirectories, files in os.walk(root):
        here = Path(directory)
        subdirectories[:] = [
            name
            for name in subdirectories
            if not name.startswith(".") and here / name not in outputs
        ]
        for name in files:
            if not name.startswith(".") and (here / name).stat().st_mtime_ns > parsed_at:
                return False
    return True


# Under `dagster dev` every run process loads the definitions too: an unchanged project is not
# parsed again (a `dbt parse` costs seconds of CPU per run). Elsewhere nothing is looked at.
if policy_dbt_project.preparer.using_dagster_dev() and not manifest_is_current(policy_dbt_project):
    policy_dbt_project.prepare_if_dev()
