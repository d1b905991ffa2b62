"""The Policy API guard (closed -> open -> half_open -> closed): one row, shared by all runs.
Reading never writes: a guard without its row reads as closed; the first writer creates it."""

from __future__ import annotations

from policy_pipeline.core.store.dialect import Statement
from policy_pipeline.core.store.schema import GUARD

_G = GUARD.name

# Params: name. Run by a writer before the one move that can find no row (opening).
ENSURE_GUARD = Statement(
    "ensure_guard",
    f"MERGE INTO {_G} USING (SELECT ? AS v_name) AS s "
    f'ON {_G}."guard_name" = s.v_name WHEN NOT MATCHED THEN '
    f'INSERT ("guard_name", "state", "consecutive_failures", "updated_time") '
    f"VALUES (s.v_name, 'closed', 0, SYSDATE())",
)

READ_GUARD = Statement(
    "read_guard",
    f'SELECT "state", "consecutive_failures", "opened_at", "probe_owner", "last_error" '
    f'FROM {_G} WHERE "guard_name" = ?',
)

# Params: failures, last error, name. From closed only: the first process to trip it wins.
OPEN_GUARD = Statement(
    "open_guard",
    f'UPDATE {_G} SET "state" = \'open\', "consecutive_failures" = ?, '
    f'"last_error" = ?, "opened_at" = SYSDATE(), "probe_owner" = NULL, '
    f'"updated_time" = SYSDATE() WHERE "guard_name" = ? AND "state" = \'closed\'',
)

# Params: owner, name, cool-down seconds (negative), probe timeout seconds (negative).
CLAIM_GUARD_PROBE = Statement(
    "claim_guard_probe",
    f'UPDATE {_G} SET "state" = \'half_open\', "probe_owner" = ?, '
    f'"updated_time" = SYSDATE() WHERE "guard_name" = ? AND ('
    f'("state" = \'open\' AND "opened_at" <= DATEADD(second, ?, SYSDATE())) '
    f'OR ("state" = \'half_open\' AND "updated_time" <= DATEADD(second, ?, SYSDATE())))',
)

# Params: name, owner. Only the probing process settles the probe.
CLOSE_GUARD = Statement(
    "close_guard",
    f'UPDATE {_G} SET "state" = \'closed\', "consecutive_failures" = 0, '
    f'"opened_at" = NULL, "probe_owner" = NULL, "last_error" = NULL, '
    f'"updated_time" = SYSDATE() '
    f'WHERE "guard_name" = ? AND "state" = \'half_open\' AND "probe_owner" = ?',
)

# Params: last error, name, owner.
REOPEN_GUARD = Statement(
    "reopen_guard",
    f'UPDATE {_G} SET "state" = \'open\', "opened_at" = SYSDATE(), '
    f'"last_error" = ?, "probe_owner" = NULL, "updated_time" = SYSDATE() '
    f'WHERE "guard_name" = ? AND "state" = \'half_open\' AND "probe_owner" = ?',
)
