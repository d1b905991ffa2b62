"""A thin, warehouse-neutral way to run the statements of ``sql.py``.

A `Warehouse` opens a connection only for the statements that need it and closes it at once:
DuckDB lets one process hold a database file, and Dagster runs steps, sensors and the UI in
separate processes, so holding a connection would turn a brief wait into a lock failure.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Any, Protocol

from policy_pipeline.core.store.sql import (
    BEGIN,
    COMMIT,
    ROLLBACK,
    SCHEMA_COLUMNS,
    TABLES,
    Dialect,
    Statement,
    add_column,
    create_table,
)

Params = Sequence[Any]


class WarehouseError(RuntimeError):
    pass


class Session(Protocol):
    def rows(self, statement: Statement, params: Params = ()) -> list[tuple[Any, ...]]: ...

    def rowcount(self, statement: Statement, params: Params = ()) -> int: ...


class _DBAPISession:
    """Statements on one connection. DuckDB's ``cursor()`` would open a second connection
    (outside any transaction begun on the first), so DuckDB statements run on the connection
    itself; Snowflake's run on one cursor for the session."""

    def __init__(self, connection: Any, dialect: Dialect) -> None:
        self._dialect = dialect
        self._cursor = connection if dialect is Dialect.DUCKDB else connection.cursor()

    def _execute(self, statement: Statement, params: Params) -> None:
        try:
            self._cursor.execute(statement.render(self._dialect), list(params))
        except Exception as exc:
            # Name the statement, never the parameters (they may carry policy data).
            raise WarehouseError(
                f"{self._dialect} statement '{statement.name}' failed: {exc}"
            ) from exc

    def rows(self, statement: Statement, params: Params = ()) -> list[tuple[Any, ...]]:
        self._execute(statement, params)
        if not self._cursor.description:
            return []
        return [tuple(row) for row in self._cursor.fetchall()]

    def rowcount(self, statement: Statement, params: Params = ()) -> int:
        self._execute(statement, params)
        if self._dialect is Dialect.DUCKDB:
            # DuckDB answers DML with a one-row result holding the affected count.
            result = self._cursor.fetchall()
            return int(result[0][0]) if result else 0
        return int(self._cursor.rowcount or 0)

    def close(self) -> None:
        if self._dialect is not Dialect.DUCKDB:
            self._cursor.close()


ConnectionFactory = Callable[[], AbstractContextManager[Any]]

# One turn per DuckDB file for the whole process: two resources (two sensor ticks, a tick and
# a run in one process) on one file must not write at the same moment either.
_DUCKDB_TURNS: dict[str, threading.Lock] = {}
_DUCKDB_TURNS_LOCK = threading.Lock()


def _duckdb_turn(database: str | None) -> threading.Lock:
    if database is None:
        return threading.Lock()
    with _DUCKDB_TURNS_LOCK:
        return _DUCKDB_TURNS.setdefault(database, threading.Lock())


class Warehouse:
    """Runs statements on DuckDB or Snowflake through a connection factory (a dagster-duckdb
    ``DuckDBResource.get_connection`` or a dagster-snowflake ``SnowflakeResource.get_connection``).
    """

    def __init__(
        self, dialect: Dialect, connect: ConnectionFactory, database: str | None = None
    ) -> None:
        self.dialect = dialect
        self._connect = connect
        # DuckDB has one writer per file and races when threads attach it at the same moment;
        # its sessions are short, so threads of one process take turns (per file, when
        # ``database`` names it). Snowflake needs no turn.
        self._turn: AbstractContextManager[Any] = (
            _duckdb_turn(database) if dialect is Dialect.DUCKDB else nullcontext()
        )
        self._schema_ready = False
        self._local = threading.local()

    @contextmanager
    def session(self) -> Iterator[Session]:
        """One connection for a few statements; autocommit, so each statement commits.

        Re-entrant per thread: a session opened inside another on the same thread is that
        session, so a batch of reads and writes costs one connection (on Snowflake, one login).
        dagster-duckdb's ``get_connection`` already retries with backoff while another process
        holds the DuckDB file, so concurrent runs wait briefly rather than fail.
        """
        current: Session | None = getattr(self._local, "session", None)
        if current is not None:
            yield current
            return
        with self._turn, self._connect() as connection:
            raw = _DBAPISession(connection, self.dialect)
            self._local.session = self._wrap(raw)
            try:
                yield self._local.session
            finally:
                self._local.session = None
                raw.close()

    def _wrap(self, session: Session) -> Session:
        """Hook for a subclass that observes statements (the benchmarks count them)."""
        return session

    @contextmanager
    def transaction(self) -> Iterator[Session]:
        """Several statements that commit together or not at all."""
        with self.session() as session:
            session.rows(BEGIN)
            try:
                yield session
            except BaseException:
                session.rows(ROLLBACK)
                raise
            session.rows(COMMIT)

    def ensure_schema(self) -> None:
        """Create the missing tables and add any missing column; idempotent, one query when the
        schema is already up to date, and nothing after the first call in a process."""
        if self._schema_ready:
            return
        with self.session() as session:
            existing: dict[str, set[str]] = {}
            for table, column in session.rows(SCHEMA_COLUMNS):
                existing.setdefault(str(table), set()).add(str(column))
            for table, columns in TABLES.items():
                if table not in existing:
                    session.rows(create_table(table))
                    continue
                for name, _ddl in columns:
                    if name not in existing[table]:
                        session.rows(add_column(table, name))
        self._schema_ready = True
