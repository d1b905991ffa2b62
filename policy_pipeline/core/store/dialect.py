"""The SQL dialect translator: statements are written once, in strict Snowflake SQL with ``?``
placeholders, and rendered for each warehouse: for Snowflake the source itself with pyformat
placeholders, for DuckDB the sqlglot translation with Snowflake's types mapped to DuckDB's.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from enum import StrEnum

import sqlglot
from sqlglot import exp
from sqlglot.tokenizer_core import TokenType


class SqlDialect(StrEnum):
    """The SQL a warehouse speaks (not the warehouse setting, not a connection)."""

    DUCKDB = "duckdb"
    SNOWFLAKE = "snowflake"


@dataclass(frozen=True)
class Statement:
    name: str
    source: str

    def render(self, dialect: SqlDialect) -> str:
        return render(self.source, dialect)


@functools.cache
def render(source: str, dialect: SqlDialect) -> str:
    if dialect is SqlDialect.SNOWFLAKE:
        return _snowflake_pyformat(source)
    tree = sqlglot.parse_one(source, read="snowflake")
    return tree.transform(_duckdb_dialect).sql(dialect="duckdb")


def _snowflake_pyformat(source: str) -> str:
    """The source itself, with ``?`` as ``%s`` and literal ``%`` doubled (pyformat binding).

    A statement without parameters is sent as is: the connector only interpolates (and so
    only un-doubles ``%%``) when there are parameters."""
    tokens = sqlglot.tokenize(source, read="snowflake")
    if not any(t.token_type == TokenType.PLACEHOLDER and t.text == "?" for t in tokens):
        return source
    out: list[str] = []
    cursor = 0
    for token in tokens:
        if token.token_type == TokenType.PLACEHOLDER and token.text == "?":
            out.append(source[cursor : token.start].replace("%", "%%"))
            out.append("%s")
            cursor = token.end + 1
    out.append(source[cursor:].replace("%", "%%"))
    return "".join(out)


# DuckDB's form of the batch table source (``batches.rows_source``): the JSON array parameter,
# one row per element.
_DUCKDB_ROWS = sqlglot.parse_one("SELECT UNNEST(CAST(? AS JSON[])) AS value", read="duckdb")


def _duckdb_utc_now() -> exp.Expression:
    """DuckDB's form of Snowflake's ``SYSDATE()`` (the current time in UTC, TIMESTAMP_NTZ):
    ``(CAST(CURRENT_TIMESTAMP AT TIME ZONE 'UTC' AS TIMESTAMP))``. DuckDB's CURRENT_TIMESTAMP
    is a TIMESTAMPTZ that a TIMESTAMP column takes in the session's time zone, which DuckDB
    takes from the process's TZ. In parentheses, so that it stays one operand of the DATEADD
    arithmetic and the comparisons around it."""
    utc = exp.AtTimeZone(this=exp.CurrentTimestamp(), zone=exp.Literal.string("UTC"))
    return exp.Paren(this=exp.Cast(this=utc, to=exp.DataType.build("TIMESTAMP")))


def _duckdb_dialect(node: exp.Expression) -> exp.Expression:
    """What sqlglot does not translate: FLATTEN over a parameter, ``value:key::TYPE`` extraction
    (text, not JSON, before the cast), ``SYSDATE()`` and Snowflake's types."""
    if isinstance(node, exp.CurrentTimestamp) and node.args.get("sysdate"):
        return _duckdb_utc_now()
    if isinstance(node, (exp.Lateral, exp.TableFromRows)) and isinstance(node.this, exp.Explode):
        alias = node.args.get("alias")  # FLATTEN's alias also names its columns: keep the name
        name = exp.TableAlias(this=alias.this.copy()) if alias is not None else None
        return exp.Subquery(this=_DUCKDB_ROWS.copy(), alias=name)
    if (
        isinstance(node, exp.Cast)
        and isinstance(node.this, exp.JSONExtract)
        and node.this.args.get("variant_extract")
    ):
        # ``value:key::TYPE`` casts the text of the value; ``value:key`` alone stays JSON.
        scalar = exp.JSONExtractScalar(this=node.this.this, expression=node.this.expression)
        return exp.Cast(this=scalar, to=node.args["to"])
    if isinstance(node, exp.DataType):
        if node.this == exp.DataType.Type.VARIANT:
            return exp.DataType.build("JSON")
        if node.this == exp.DataType.Type.DECIMAL and node.sql() in ("DECIMAL", "DECIMAL(38, 0)"):
            # Snowflake's bare NUMBER is an integer; DuckDB's DECIMAL(38,0) would be slow.
            return exp.DataType.build("BIGINT")
    return node
