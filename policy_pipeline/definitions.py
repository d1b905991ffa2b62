"""The code location, ``policy_pipeline.definitions:defs``: the project's defs folder
(``policy_pipeline/defs/defs.yaml``, the policy workflow component) loaded the dg way, and the
executor.

Loading reads the environment and nothing else: no subprocess, no DDL, no network, no file of
the catalog (runs and sensor ticks read it). The dbt manifest is prepared beforehand
(``policy_pipeline/defs/reporting/project.py``).
"""

import warnings
from pathlib import Path

from dagster import BetaWarning, ComponentTree, Definitions, in_process_executor

import policy_pipeline.defs
from policy_pipeline.component import build_policy_defs
from policy_pipeline.core.settings import PROJECT_ROOT, Settings

# Loading these definitions makes Dagster itself use APIs it marks beta (the component loader
# adds code references and owner metadata, the repository sets an execution type): a warning
# per asset, sensor and process, about Dagster's own calls, that a user can do nothing about.
# Only those are silenced, and only when Dagster's own modules raise them: the same API used
# in a user's code still warns.
for _api in (
    "Class `CodeReferencesMetadataValue`",
    "Class `LocalFileCodeReference`",
    "Parameter `owners` of initializer `SensorDefinition",
    "Parameter `use_user_code_server` of initializer `AutomationConditionSensorDefinition",
    "Parameter `execution_type` of function `AssetsDefinition",
):
    warnings.filterwarnings("ignore", message=_api, category=BetaWarning, module=r"dagster\.")

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
    """The defs folder, as ``dagster.load_from_defs_folder`` loads it, less what that adds at
    the project root: a catalog of every installed package's component types (for the UI's
    component browser), built by importing each one. dagster-snowflake's alone takes seconds:
    ``load_from_defs_folder`` measured 5.1-7.7 s after ``import dagster``, this 0.40 s
    (``python -m bench.load``, Dagster 1.13), paid by every run worker and sensor process.
    The tree carries no code location name of its own: the name is the one the location is
    loaded under (workspace.yaml, ``-m policy_pipeline.definitions``), without a warning that
    the two differ."""
    tree = ComponentTree.from_module(defs_module=policy_pipeline.defs, project_root=PROJECT_ROOT)
    return Definitions.merge(tree.build_defs(DEFS_FOLDER), _execution())


defs = load_definitions()
