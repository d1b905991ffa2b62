"""The code location: the project's defs folder (``policy_pipeline/defs/defs.yaml``, the policy
workflow component) loaded the dg way, and the executor.

Loading reads the environment and nothing else: no subprocess, no DDL, no network, no file of
the catalog (runs and sensor ticks read it). The dbt manifest is prepared beforehand
(``policy_pipeline/defs/reporting/project.py``).
"""

from pathlib import Path

from dagster import ComponentTree, Definitions, in_process_executor

from policy_pipeline.component import build_policy_defs
from policy_pipeline.core.settings import Settings

DEFS_FOLDER = Path(__file__).resolve().parent / "defs"


def _execution() -> Definitions:
    # Every step is I/O-bound and fans out over threads itself: one process per step would
    # only add an interpreter start (and the dbt import) to each. (A function: a module-level
    # Definitions beside `defs` would be a second code location to Dagster's loader.)
    return Definitions(executor=in_process_executor)


def build_definitions(settings: Settings) -> Definitions:
    """The definitions for explicit settings (tests, tools): what the defs folder loads."""
    return Definitions.merge(build_policy_defs(settings), _execution())


def load_definitions() -> Definitions:
    """The defs folder, as ``load_from_defs_folder`` loads it, less the catalog of every
    installed package's component types it adds for the UI's component browser: that imports
    each package's components (dagster-snowflake's alone takes seconds), in every run worker."""
    tree = ComponentTree.for_project(path_within_project=DEFS_FOLDER)
    return Definitions.merge(tree.build_defs(DEFS_FOLDER), _execution())


defs = load_definitions()
