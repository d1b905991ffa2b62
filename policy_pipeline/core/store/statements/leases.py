"""Per-policy leases: at most one run works on a policy at a time (`StateStore`'s leases)."""

from __future__ import annotations

from policy_pipeline.core.store.batches import NAMES
from policy_pipeline.core.store.dialect import Statement
from policy_pipeline.core.store.schema import LOCKS

_L = LOCKS.name

# MERGE, not INSERT ... WHERE NOT EXISTS: Snowflake runs concurrent INSERTs side by side, while
# MERGEs on one table take turns, so two first-time callers cannot both insert. Params: names.
ENSURE_LOCK_ROWS = Statement(
    "ensure_lock_rows",
    f'MERGE INTO {_L} USING {NAMES} AS s ON {_L}."policy_name" = '
    f's.v_policy_name WHEN NOT MATCHED THEN INSERT ("policy_name", "updated_time") '
    f"VALUES (s.v_policy_name, SYSDATE())",
)

_LEASE_TO = (
    f'UPDATE {_L} SET "lease_owner" = ?, '
    f'"lease_expires_at" = DATEADD(second, ?, SYSDATE()), '
    f'"updated_time" = SYSDATE() '
    f'WHERE "policy_name" IN (SELECT v_policy_name FROM {NAMES}) '
)

# Params: owner, ttl seconds, names, owner. Free, expired or already ours.
ACQUIRE_LEASES = Statement(
    "acquire_leases",
    _LEASE_TO + """AND ("lease_owner" IS NULL OR "lease_owner" = ? """
    """OR "lease_expires_at" < SYSDATE())""",
)

# Params: owner, ttl seconds, names, previous owner: a run known to have finished, or the
# owner itself renewing. A lapsed lease still naming its owner was taken by nobody since, so
# renewing it is safe; one another run acquired is not renewed.
TAKE_OVER_LEASES = Statement("take_over_leases", _LEASE_TO + 'AND "lease_owner" = ?')

# Params: names, owner.
RELEASE_LEASES = Statement(
    "release_leases",
    f'UPDATE {_L} SET "lease_owner" = NULL, "lease_expires_at" = NULL, '
    f'"updated_time" = SYSDATE() '
    f'WHERE "policy_name" IN (SELECT v_policy_name FROM {NAMES}) AND "lease_owner" = ?',
)

LEASE_HOLDERS = Statement(
    "lease_holders",
    f'SELECT "policy_name", "lease_owner", "lease_expires_at" FROM {_L} '
    f'WHERE "policy_name" IN (SELECT v_policy_name FROM {NAMES}) '
    f'AND "lease_owner" IS NOT NULL AND "lease_expires_at" >= SYSDATE()',
)

# A lease some run holds now (the progress sensor leaves those policies alone).
LIVE_LEASE_NAMES = (
    f'SELECT "policy_name" FROM {_L} '
    f'WHERE "lease_owner" IS NOT NULL AND "lease_expires_at" >= SYSDATE()'
)
