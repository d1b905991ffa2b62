"""The workflow area: the three partitioned assets (one step), their job, and the sensors that
drive them (the catalog's new policies; whatever waits or is stranded)."""

import warnings

from dagster import (
    AssetsDefinition,
    AssetSpec,
    BetaWarning,
    CodeReferencesMetadataValue,
    Definitions,
    LocalFileCodeReference,
    with_source_code_references,
)

import policy_pipeline.core.engine.workflow as engine
from policy_pipeline.core.settings import Settings
from policy_pipeline.defs.workflow.assets import build_workflow_assets
from policy_pipeline.defs.workflow.runs import policy_workflow_job
from policy_pipeline.defs.workflow.sensors import build_catalog_sensor, build_progress_sensor

CODE_REFERENCES = "dagster/code_references"


def with_code_references(assets: AssetsDefinition) -> AssetsDefinition:
    """The assets, each linking (in the UI) to the engine that takes every policy through the
    steps and to the asset function that runs it."""
    # Dagster marks code references beta: silenced here, for this use only.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=BetaWarning, message="Class `LocalFileCode")
        warnings.filterwarnings("ignore", category=BetaWarning, message="Class `CodeReferences")
        warnings.filterwarnings(
            "ignore", category=BetaWarning, message="Function `with_source_code_references`"
        )
        engine_code = LocalFileCodeReference(
            file_path=str(engine.__file__), label="The engine: every policy through the steps"
        )

        def link_engine(spec: AssetSpec) -> AssetSpec:
            return spec.merge_attributes(
                metadata={
                    CODE_REFERENCES: CodeReferencesMetadataValue(code_references=[engine_code])
                }
            )

        [linked] = with_source_code_references([assets.map_asset_specs(link_engine)])
    assert isinstance(linked, AssetsDefinition)
    return linked


def build_workflow_defs(settings: Settings) -> Definitions:
    return Definitions(
        assets=[with_code_references(build_workflow_assets(settings))],
        jobs=[policy_workflow_job],
        sensors=[build_catalog_sensor(settings), build_progress_sensor(settings)],
    )
