"""policy_pipeline: the policy workflow as a Dagster code location.

``defs`` is loaded lazily (PEP 562) so that ``python -m policy_pipeline.simulator`` and the
plain-Python modules do not load the catalog and the Dagster definitions on import.
"""

from typing import Any

__all__ = ["defs"]


def __getattr__(name: str) -> Any:
    if name == "defs":
        from policy_pipeline.definitions import defs

        return defs
    raise AttributeError(f"module 'policy_pipeline' has no attribute {name!r}")


def __dir__() -> list[str]:
    return [*globals(), "defs"]
