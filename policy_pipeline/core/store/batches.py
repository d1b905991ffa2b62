"""Batches: a step works on many policies at once, so statements take a whole batch of rows as
ONE bound parameter, a JSON array of objects, unpacked into a table by ``rows_source``
(Snowflake's FLATTEN; DuckDB's unnest, see ``dialect``). The text is the same for every batch
size, so it is rendered once, and the warehouse binds one value rather than rows x columns
placeholders. ``bind_rows`` packs the rows: at most MAX_BATCH rows and MAX_BATCH_BYTES of JSON
per statement.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from policy_pipeline.core.store.dialect import Statement
from policy_pipeline.core.store.schema import Column, Table

MAX_BATCH = 10_000
# Snowflake asks for statements, bound values included, under 1 MB.
MAX_BATCH_BYTES = 900_000


def rows_source(columns: Sequence[Column]) -> str:
    """``(SELECT f.value:a::VARCHAR AS v_a, ... FROM LATERAL FLATTEN(...) AS f)``: the rows of
    the JSON-array parameter as a table. A key a row leaves out (a None) reads as NULL; a
    VARIANT column is the JSON value itself (no PARSE_JSON of a string, per row)."""
    select = ", ".join(
        f"f.value:{c.name} AS v_{c.name}"
        if c.sql_type == "VARIANT"
        else f"f.value:{c.name}::{c.sql_type} AS v_{c.name}"
        for c in columns
    )
    return f"(SELECT {select} FROM LATERAL FLATTEN(INPUT => PARSE_JSON(?)) AS f)"


NAMES = rows_source((Column("policy_name", "VARCHAR"),))
IDS = rows_source((Column("execution_id", "VARCHAR"),))


class JsonText(str):
    """Text that is already JSON (``rows.to_json``): a row embeds it as a value, not a string."""


def _json(value: Any) -> str:
    if isinstance(value, JsonText):
        return str(value)
    return json.dumps(value, default=str, ensure_ascii=False, separators=(",", ":"))


def bind_rows(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """The rows as JSON-array parameters, one per statement to run. None values are left out
    (a JSON null would be a VARIANT null on Snowflake, not NULL)."""
    batches: list[str] = []
    current: list[str] = []
    size = 2  # the brackets
    for row in rows:
        fields = (f"{_json(key)}:{_json(value)}" for key, value in row.items() if value is not None)
        item = "{" + ",".join(fields) + "}"
        if current and (len(current) >= MAX_BATCH or size + 1 + len(item) > MAX_BATCH_BYTES):
            batches.append(f"[{','.join(current)}]")
            current, size = [], 2
        size += len(item) + (1 if current else 0)  # and a comma before all but the first
        current.append(item)
    if current:
        batches.append(f"[{','.join(current)}]")
    return batches


def bind_values(key: str, values: Sequence[Any]) -> list[str]:
    """``bind_rows`` for a list of single values (names, ids) read as ``v_<key>``."""
    return bind_rows([{key: value} for value in values])


def insert_from_rows(name: str, table: Table, supplied: Sequence[Column]) -> Statement:
    """INSERT a batch of rows carrying ``supplied``; every other column with a default gets it,
    written out (a column added to an existing table has no DEFAULT)."""
    defaulted = [c for c in table.with_defaults() if c not in supplied]
    values = [f"v_{c.name}" for c in supplied]
    values += [c.ddl_default for c in defaulted]
    return Statement(
        name,
        f"INSERT INTO {table.name} ({table.quoted_names([*supplied, *defaulted])}) "
        f"SELECT {', '.join(values)} FROM {rows_source(supplied)}",
    )


def update_from_rows(
    name: str, table: Table, columns: Sequence[Column], assignments: str, condition: str
) -> Statement:
    """UPDATE the rows named by ``v_execution_id`` with per-row values, if ``condition`` still
    holds for them (the conditional move that decides who wins)."""
    source = rows_source((Column("execution_id", "VARCHAR"), *columns))
    return Statement(
        name,
        f'UPDATE {table.name} SET {assignments}, "updated_time" = SYSDATE() '
        f"FROM {source} AS v "
        f'WHERE {table.name}."execution_id" = v.v_execution_id AND {condition}',
    )
