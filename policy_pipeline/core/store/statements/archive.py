"""Archiving (`Archiver`): terminal executions move to the history tables, one transaction per
batch. Every statement that moves executions re-checks that they are terminal."""

from __future__ import annotations

from policy_pipeline.core.store.batches import IDS
from policy_pipeline.core.store.dialect import Statement
from policy_pipeline.core.store.predicates import TERMINAL
from policy_pipeline.core.store.schema import (
    ARCHIVE_RUNS,
    ARCHIVED_COLUMNS,
    EVENTS,
    EVENTS_HISTORY,
    STATE,
    STATE_HISTORY,
    Table,
)

_S, _E, _RUNS = STATE.name, EVENTS.name, ARCHIVE_RUNS.name

ARCHIVE_CANDIDATES = Statement(
    "archive_candidates",
    f'SELECT "execution_id" FROM {_S} WHERE {TERMINAL} '
    f'AND COALESCE("completed_time", "updated_time", "start_time") '
    f"< DATEADD(day, ?, SYSDATE()) "
    f'ORDER BY "start_time", "execution_id" LIMIT ?',
)

# Only the rows of a batch (ids bound as one JSON array) that are terminal.
_TERMINAL_IDS = (
    f'SELECT "execution_id" FROM {_S} '
    f'WHERE "execution_id" IN (SELECT v_execution_id FROM {IDS}) AND {TERMINAL}'
)


def _copy_to_history(name: str, source: Table, history: Table, condition: str) -> Statement:
    """Params: archive run id, then the condition's. Every column of ``source``, stamped."""
    columns = source.quoted_names()
    return Statement(
        name,
        f"INSERT INTO {history.name} ({columns}, {history.quoted_names(ARCHIVED_COLUMNS)}) "
        f"SELECT {columns}, SYSDATE(), ? FROM {source.name} WHERE {condition}",
    )


# Params: archive run id, ids.
ARCHIVE_EVENTS = _copy_to_history(
    "archive_events", EVENTS, EVENTS_HISTORY, f'"execution_id" IN ({_TERMINAL_IDS})'
)
ARCHIVE_EXECUTIONS = _copy_to_history(
    "archive_executions", STATE, STATE_HISTORY, f'"execution_id" IN ({_TERMINAL_IDS})'
)
# Params: ids.
DELETE_ARCHIVED_EVENTS = Statement(
    "delete_archived_events", f'DELETE FROM {_E} WHERE "execution_id" IN ({_TERMINAL_IDS})'
)
DELETE_ARCHIVED_EXECUTIONS = Statement(
    "delete_archived_executions",
    f'DELETE FROM {_S} WHERE "execution_id" IN (SELECT v_execution_id FROM {IDS}) AND {TERMINAL}',
)

# Events about a run rather than an execution (a failed run, the guard) have no execution_id:
# they are archived by age. Params: archive run id, days (negative) / days (negative).
_RUN_EVENTS = '"execution_id" IS NULL AND "event_time" < DATEADD(day, ?, SYSDATE())'
ARCHIVE_RUN_EVENTS = _copy_to_history("archive_run_events", EVENTS, EVENTS_HISTORY, _RUN_EVENTS)
DELETE_ARCHIVED_RUN_EVENTS = Statement(
    "delete_archived_run_events", f"DELETE FROM {_E} WHERE {_RUN_EVENTS}"
)

START_ARCHIVE_RUN = Statement(
    "start_archive_run",
    f'INSERT INTO {_RUNS} ("archive_run_id", "started_time", "retention_days", '
    f'"status", "batches", "executions_archived", "events_archived", "dagster_run_id") '
    f"SELECT ?, SYSDATE(), ?, 'running', 0, 0, 0, ?",
)

# Params: batches, executions, events, archive run id. Progress after each batch: a run that
# is killed shows how far it got.
ARCHIVE_RUN_PROGRESS = Statement(
    "archive_run_progress",
    f'UPDATE {_RUNS} SET "batches" = ?, "executions_archived" = ?, '
    f'"events_archived" = ? WHERE "archive_run_id" = ? AND "status" = \'running\'',
)

RUNNING_ARCHIVE_RUNS = Statement(
    "running_archive_runs",
    f'SELECT "archive_run_id", "dagster_run_id" FROM {_RUNS} WHERE "status" = \'running\'',
)

# Params: error, archive run id. A run found dead while its row still says running.
INTERRUPT_ARCHIVE_RUN = Statement(
    "interrupt_archive_run",
    f"UPDATE {_RUNS} SET \"status\" = 'interrupted', "
    f'"finished_time" = SYSDATE(), "error_message" = ? '
    f'WHERE "archive_run_id" = ? AND "status" = \'running\'',
)

FINISH_ARCHIVE_RUN = Statement(
    "finish_archive_run",
    f'UPDATE {_RUNS} SET "finished_time" = SYSDATE(), "status" = ?, '
    f'"batches" = ?, "executions_archived" = ?, "events_archived" = ?, "error_message" = ? '
    f'WHERE "archive_run_id" = ?',
)
