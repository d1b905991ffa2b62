"""The workflow's partitions: one per catalog policy, named "policies".

They are dynamic because the catalog is data, not code: the catalog sensor adds a partition
when a policy file appears, and a run registers the catalog's policies if this Dagster
instance has not seen them yet (a fresh DAGSTER_HOME).
"""

from collections.abc import Sequence

from dagster import DagsterInstance, DynamicPartitionsDefinition
from sqlalchemy.exc import IntegrityError

PARTITIONS_NAME = "policies"
POLICY_PARTITIONS = DynamicPartitionsDefinition(name=PARTITIONS_NAME)


def register_policies(instance: DagsterInstance, names: Sequence[str]) -> list[str]:
    """Make these policies known partitions of the instance (a fresh DAGSTER_HOME has none
    until the catalog sensor's first tick), in the order given, and return those it added.
    Callers pass every catalog policy in name order, so that partition ranges follow the
    catalog. The one place partitions are added outside the catalog sensor's own request: runs,
    `policy-pipeline register-partitions` and the demo."""
    for attempt in range(3):
        known = set(instance.get_dynamic_partitions(PARTITIONS_NAME))
        missing = [name for name in names if name not in known]
        if not missing:
            return []
        try:
            instance.add_dynamic_partitions(PARTITIONS_NAME, missing)
            return missing
        except IntegrityError:
            # Another run registered some of them at the same moment (two runs started at
            # once on a fresh instance): read again and add what is still missing.
            if attempt == 2:
                raise
    return []


def contiguous_ranges(ordered: Sequence[str], wanted: set[str]) -> list[tuple[str, str]]:
    """The wanted partition keys as maximal runs of neighbours in the partitions' order: a run
    can take a range of partitions, not an arbitrary set."""
    ranges: list[tuple[str, str]] = []
    start: str | None = None
    previous: str | None = None
    for key in ordered:
        if key in wanted:
            start = start or key
            previous = key
        elif start is not None and previous is not None:
            ranges.append((start, previous))
            start = None
    if start is not None and previous is not None:
        ranges.append((start, previous))
    return ranges


def partition_tags(first: str, last: str) -> dict[str, str]:
    """The tags of a run of one partition, or of the range from ``first`` to ``last``."""
    if first == last:
        return {"dagster/partition": first}
    return {
        "dagster/asset_partition_range_start": first,
        "dagster/asset_partition_range_end": last,
    }
