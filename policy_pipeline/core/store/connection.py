"""A thin, warehouse-neutral way to run the project's statements (``statements/``).

A `WarehouseConnection` opens a connection only for the statements that need it and closes it
at once: DuckDB lets one process hold a database file, and Dagster runs steps, sensors and the
UI in separate processes, so holding a connection would turn a brief wait into a lock failure.

Constructing one does nothing. The schema (``schema.TABLES``) is created or migrated by
``ensure_schema()``, which the first session also runs, once per database per process.
"""

from __future__ import annotations

import threading
import traceback
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import AbstractContextManager, ExitStack, contextmanager, nullcontext
from typing import Any, NoReturn, Protocol

from policy_pipeline.core.scrubbing import SecretScrubber
from policy_pipeline.core.store.dialect import SqlDialect, Statement
from policy_pipeline.core.store.schema import SCHEMA_COLUMNS, TABLES, add_column, create_table

Params = Sequence[Any]

BEGIN = Statement("begin", "BEGIN")
COMMIT = Statement("commit", "COMMIT")
ROLLBACK = Statement("rollback", "ROLLBACK")


class WarehouseError(RuntimeError):
    pass


class WarehouseUnavailable(WarehouseError):
    """No connection could be opened (a lock held past the wait, a network cut, a login that
    timed out): no statement of the session ran, so the same work can be tried again."""


def raise_scrubbed(
    error: type[WarehouseError], message: str, exc: Exception, scrubber: SecretScrubber
) -> NoReturn:
    """Raise ``error("message: exc")`` with the warehouse's secrets scrubbed. A login error
    may echo the request, password and all: when the chain of ``exc`` holds a secret anywhere,
    it is described (scrubbed) but not attached as the cause, since Dagster stores and shows
    causes; otherwise it is the cause, traceback and all."""
    if scrubber.found_in("".join(traceback.format_exception(exc))):
        raise error(scrubber.text(f"{message}: {type(exc).__name__}: {exc}")) from None
    raise error(f"{message}: {exc}") from exc


class Session(Protocol):
    def rows(self, statement: Statement, params: Params = ()) -> list[tuple[Any, ...]]: ...

    def rowcount(self, statement: Statement, params: Params = ()) -> int: ...


class _DBAPISession:
    """Statements on one connection. DuckDB's ``cursor()`` would open a second connection
    (outside any transaction begun on the first), so DuckDB statements run on the connection
    itself; Snowflake's run on one cursor for the session."""

    def __init__(self, connection: Any, dialect: SqlDialect, scrubber: SecretScrubber) -> None:
        self._dialect = dialect
        self._scrubber = scrubber
        self._cursor = connection if dialect is SqlDialect.DUCKDB else connection.cursor()

    def _execute(self, statement: Statement, params: Params) -> None:
        try:
            self._cursor.execute(statement.render(self._dialect), list(params))
        except Exception as exc:
            # Name the statement, never the parameters (they may carry policy data).
            message = f"{self._dialect} statement '{statement.name}' failed"
            raise_scrubbed(WarehouseError, message, exc, self._scrubber)

    def rows(self, statement: Statement, params: Params = ()) -> list[tuple[Any, ...]]:
        self._execute(statement, params)
        if not self._cursor.description:
            return []
        return [tuple(row) for row in self._cursor.fetchall()]

    def rowcount(self, statement: Statement, params: Params = ()) -> int:
        self._execute(statement, params)
        if self._dialect is SqlDialect.DUCKDB:
            # DuckDB answers DML with a one-row result holding the affected count.
            result = self._cursor.fetchall()
            return int(result[0][0]) if result else 0
        return int(self._cursor.rowcount or 0)

    def close(self) -> None:
        if self._dialect is not SqlDialect.DUCKDB:
            self._cursor.close()


def _create_or_migrate(session: Session) -> None:
    """Create the missing tables and add any missing column: one query when the schema is
    already up to date."""
    existing: dict[str, set[str]] = {}
    for table, column in session.rows(SCHEMA_COLUMNS):
        existing.setdefault(str(table), set()).add(str(column))
    for table in TABLES:
        if table.name not in existing:
            session.rows(create_table(table))
            continue
        for column in table.columns:
            if column.name not in existing[table.name]:
                session.rows(add_column(table, column))


class _SchemaCheck:
    """Whether one database's schema is known to be up to date in this process. The lock makes
    threads that open their first sessions together run the check once."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.done = False


ConnectionFactory = Callable[[], AbstractContextManager[Any]]

# Per DuckDB file, for the whole process: one turn (two resources - two sensor ticks, a tick and
# a run in one process - on one file must not write at the same moment either) and one schema
# check.
_DUCKDB_TURNS: dict[str, threading.Lock] = {}
_SCHEMA_CHECKS: dict[tuple[SqlDialect, str], _SchemaCheck] = {}
_SHARED_LOCK = threading.Lock()


def _duckdb_turn(database: str | None) -> threading.Lock:
    if database is None:
        return threading.Lock()
    with _SHARED_LOCK:
        return _DUCKDB_TURNS.setdefault(database, threading.Lock())


def _schema_check(dialect: SqlDialect, database: str | None) -> _SchemaCheck:
    # Without a name for its database, a connection cannot share the check: it keeps its own.
    if database is None:
        return _SchemaCheck()
    with _SHARED_LOCK:
        return _SCHEMA_CHECKS.setdefault((dialect, database), _SchemaCheck())


class WarehouseConnection:
    """Runs statements on DuckDB or Snowflake through a connection factory (a dagster-duckdb
    ``DuckDBResource.get_connection`` or a dagster-snowflake ``SnowflakeResource.get_connection``).
    ``database`` names the database the factory connects to, so that every connection to it in
    the process shares one DuckDB turn and one schema check. ``secrets`` are what the factory
    logs in with (a password, a private key, its passphrase): every error raised here, from
    connecting or from a statement, has them scrubbed (`policy_pipeline.core.scrubbing`).
    """

    def __init__(
        self,
        dialect: SqlDialect,
        connect: ConnectionFactory,
        database: str | None = None,
        *,
        secrets: Iterable[str | None] = (),
    ) -> None:
        self.dialect = dialect
        self._connect = connect
        self.scrubber = SecretScrubber(*secrets)
        # DuckDB has one writer per file and races when threads attach it at the same moment;
        # its sessions are short, so threads of one process take turns (per file, when
        # ``database`` names it). Snowflake needs no turn.
        self._turn: AbstractContextManager[Any] = (
            _duckdb_turn(database) if dialect is SqlDialect.DUCKDB else nullcontext()
        )
        self._schema = _schema_check(dialect, database)
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
        with self._turn, ExitStack() as stack:
            try:
                connection = stack.enter_context(self._connect())
            except Exception as exc:
                message = f"{self.dialect} connection could not be opened"
                raise_scrubbed(WarehouseUnavailable, message, exc, self.scrubber)
            raw = _DBAPISession(connection, self.dialect, self.scrubber)
            try:
                # On the first session's own connection, and unobserved by ``_wrap``: the
                # schema check is not one of the statements a caller runs.
                self._ensure_schema_on(raw)
                self._local.session = self._wrap(raw)
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
        """Create the missing tables and add any missing column. Idempotent: nothing (not even
        a connection) once this process has checked this database."""
        if self._schema.done:
            return
        with self.session():
            pass  # opening the session runs the check

    def _ensure_schema_on(self, session: Session) -> None:
        if self._schema.done:
            return
        with self._schema.lock:
            if not self._schema.done:
                _create_or_migrate(session)
                self._schema.done = True
