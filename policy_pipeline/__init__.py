"""policy_pipeline: the policy workflow as a Dagster code location.

The definitions are built lazily (PEP 562): importing a plain-Python module of the package
(``policy_pipeline.core``) does not load Dagster. ``dagster ... -m policy_pipeline`` finds them
as ``code_location`` (not ``defs``: that name is the ``policy_pipeline/defs/`` folder, dg's
layout); ``policy_pipeline.definitions:defs`` is the same object.
"""

from typing import Any

__all__ = ["code_location"]


def __getattr__(name: str) -> Any:
    if name == "code_location":
        from policy_pipeline.definitions import defs

        return defs
    raise AttributeError(f"module 'policy_pipeline' has no attribute {name!r}")


def __dir__() -> list[str]:
    return [*globals(), "code_location"]
