"""Measures a proposed product change: audit events inserted with one JSON-array parameter.

Runs ``throughput.py`` (same arguments, DuckDB only) with ``StateStore._write_events``
replaced, for this process only, by a version that sends each batch as one JSON array
(``INSERT ... SELECT ... FROM (SELECT unnest(CAST(? AS JSON[])) AS j)``) instead of
``sql.insert_events(n)``'s ``VALUES`` list of n x 15 placeholders. The statement text no
longer depends on the batch size, so it is rendered once, and DuckDB binds one parameter.
Compare its figures with a plain ``throughput.py`` run (see bench/README.md, proposal P1).

    .venv/bin/python bench/proposal_json_events.py --sequential-n 0 --no-targets
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

import throughput

from policy_pipeline import sql, state
from policy_pipeline.sql import Dialect, Statement
from policy_pipeline.warehouse import Session

_TYPES = {"http_status": "BIGINT", "attempt": "BIGINT", "latency_ms": "DOUBLE"}


def _select(column: str) -> str:
    if column == "detail":
        return "CAST(j->>'detail' AS JSON)"
    if column in _TYPES:
        return f"CAST(j->>'{column}' AS {_TYPES[column]})"
    return f"j->>'{column}'"


_COLUMNS = ", ".join(f'"{c}"' for c in sql.EVENT_INSERT_COLUMNS)
_TEXT = (
    f'INSERT INTO {sql.EVENTS_TABLE} ({_COLUMNS}, "event_time") '
    f"SELECT {', '.join(_select(c) for c in sql.EVENT_INSERT_COLUMNS)}, CURRENT_TIMESTAMP "
    "FROM (SELECT unnest(CAST(? AS JSON[])) AS j)"
)


class _DuckDBText(Statement):
    """A statement already written in DuckDB's dialect (no sqlglot translation)."""

    def render(self, dialect: Dialect) -> str:
        if dialect is not Dialect.DUCKDB:
            raise NotImplementedError("this measurement is for DuckDB only")
        return self.source


INSERT_EVENTS_JSON = _DuckDBText("insert_events_json", _TEXT)


def _write_events(self: state.StateStore, session: Session, events: list[state.AuditEvent]) -> None:
    for batch in state._chunks(events, state.EVENT_BATCH_ROWS):
        rows = [
            dict(zip(sql.EVENT_INSERT_COLUMNS, e.params(self.run_id), strict=True)) for e in batch
        ]
        session.rowcount(INSERT_EVENTS_JSON, [json.dumps(rows, default=str)])


def build_parser() -> argparse.ArgumentParser:
    """The same options as throughput.py."""
    parser = throughput.build_parser()
    parser.description = "throughput.py with audit events inserted as one JSON-array parameter"
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if any(a.startswith("--warehouse") and "snowflake" in a for a in args) or "snowflake" in args:
        print("error: this measurement patches the DuckDB statement only", file=sys.stderr)
        return 2
    original = state.StateStore._write_events
    state.StateStore._write_events = _write_events  # type: ignore[method-assign]
    try:
        print("PROPOSAL P1 MEASUREMENT: audit events inserted with one JSON-array parameter")
        return throughput.main(args)
    finally:
        state.StateStore._write_events = original  # type: ignore[method-assign]


if __name__ == "__main__":
    sys.exit(main())
