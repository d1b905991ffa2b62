"""policy_pipeline: the policy workflow as a Dagster code location.

The code location is ``policy_pipeline.definitions:defs`` (workspace.yaml, ``[tool.dagster]``,
``[tool.dg]``). Importing the package, or a plain-Python module of it such as
``policy_pipeline.core`` or the operator CLI, loads no Dagster.
"""
