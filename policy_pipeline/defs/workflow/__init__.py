"""The workflow area: the three partitioned assets (one step), their job, and the sensors that
drive them (the catalog's new policies; whatever waits or is stranded)."""

import warnings
from collections.abc import Callable
from types import FunctionType

from dagster import (
    AssetsDefinition,
    AssetSpec,
    BetaWarning,
    CodeReferencesMetadataValue,
    Definitions,
    LocalFileCodeReference,
    with_source_code_references,
)

from policy_pipeline.core.domain import STEP_CIRCUIT, STEP_CREATE, STEP_READY
from policy_pipeline.core.engine import flow
from policy_pipeline.core.settings import Settings
from policy_pipeline.defs.workflow.assets import build_workflow_assets
from policy_pipeline.defs.workflow.runs import policy_workflow_job
from policy_pipeline.defs.workflow.sensors import build_catalog_sensor, build_progress_sensor

CODE_REFERENCES = "dagster/code_references"


# Each asset's step, as a policy's flow goes through it.
STEP_FUNCTIONS = {
    STEP_CREATE: flow.create_policy,
    STEP_READY: flow.wait_until_ready,
    STEP_CIRCUIT: flow.trigger_circuit_breaker,
}


def _code(function: Callable[..., object], label: str) -> LocalFileCodeReference:
    # From the function's code object: nothing is read from disk while the definitions load.
    assert isinstance(function, FunctionType)
    code = function.__code__
    return LocalFileCodeReference(
        file_path=code.co_filename, line_number=code.co_firstlineno, label=label
    )


def with_code_references(assets: AssetsDefinition) -> AssetsDefinition:
    """The assets, each linking (in the UI) to what happens to one policy (`policy_workflow`),
    to its own step there, and to the asset function that runs it."""
    # Dagster marks code references beta: silenced here, for this use only.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=BetaWarning, message="Class `LocalFileCode")
        warnings.filterwarnings("ignore", category=BetaWarning, message="Class `CodeReferences")
        warnings.filterwarnings(
            "ignore", category=BetaWarning, message="Function `with_source_code_references`"
        )
        workflow_code = _code(flow.policy_workflow, "One policy's workflow, top to bottom")

        def link_flow(spec: AssetSpec) -> AssetSpec:
            key = spec.key.to_user_string()
            step = _code(STEP_FUNCTIONS[key], f"Its step: {STEP_FUNCTIONS[key].__name__}")
            references = CodeReferencesMetadataValue(code_references=[workflow_code, step])
            return spec.merge_attributes(metadata={CODE_REFERENCES: references})

        [linked] = with_source_code_references([assets.map_asset_specs(link_flow)])
    assert isinstance(linked, AssetsDefinition)
    return linked


def build_workflow_defs(settings: Settings) -> Definitions:
    return Definitions(
        assets=[with_code_references(build_workflow_assets(settings))],
        jobs=[policy_workflow_job],
        sensors=[build_catalog_sensor(settings), build_progress_sensor(settings)],
    )
