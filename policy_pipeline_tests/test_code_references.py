"""What the workflow assets' pages in the UI link to: `policy_workflow` (what happens to one
policy, top to bottom) and the asset's own step function, at their lines in flow.py."""

from __future__ import annotations

from pathlib import Path

from dagster import CodeReferencesMetadataValue, LocalFileCodeReference

from policy_pipeline.core.engine import flow
from policy_pipeline.definitions import defs

STEP_FUNCTIONS = {
    "policy_created": "def create_policy(",
    "policy_ready": "def wait_until_ready(",
    "circuit_breaker_activation": "def trigger_circuit_breaker(",
}


def test_each_workflow_asset_links_to_one_policys_flow_and_its_own_step() -> None:
    graph = defs.resolve_asset_graph()
    specs = {key.to_user_string(): graph.get(key) for key in graph.get_all_asset_keys()}
    lines = Path(flow.__file__).read_text(encoding="utf-8").splitlines()
    for key, step in STEP_FUNCTIONS.items():
        references = specs[key].metadata["dagster/code_references"]
        assert isinstance(references, CodeReferencesMetadataValue)
        linked = [
            lines[reference.line_number - 1]
            for reference in references.code_references
            if isinstance(reference, LocalFileCodeReference)
            and reference.file_path == flow.__file__
            and reference.line_number is not None
        ]
        assert len(linked) == 2, (key, linked)
        assert linked[0].startswith("def policy_workflow("), (key, linked)
        assert linked[1].startswith(step), (key, linked)
