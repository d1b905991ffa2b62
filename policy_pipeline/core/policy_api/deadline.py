"""The total deadline of one attempt: connect, TLS, request, headers and body, however slowly a
server drips them.

requests' timeouts bound each socket operation, not the attempt: a server that sends one byte
every (timeout - 1) seconds holds a call for ever. So each attempt is watched: one `Watchdog`
thread per client cuts the attempt whose deadline passes by shutting down its socket, which
ends any blocked read or write at once. The socket is the one the attempt's connection uses:
the connections below hand themselves to the attempt of the thread that uses them (requests
makes a call in the calling thread, and only that thread touches a connection while it is
checked out), and the attempt forgets its connection before it goes back to the pool, so a cut
never reaches another attempt's socket. A connection of another class (a SOCKS proxy's) is cut
through urllib3's ``HTTPResponse.shutdown()`` once its headers are in; until then only each
read's timeout bounds it.

urllib3 reports response headers it cannot parse only by logging a warning, offending line and
all (an echoing server may have put the API key there): during an attempt that record becomes
the attempt's failure instead and reaches no log handler. (With urllib3's warnings switched off
there is no record, and nothing to leak: the answer is then taken as http.client parsed it.)
"""

from __future__ import annotations

import heapq
import itertools
import logging
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from typing import Any

import urllib3
import urllib3.connection
import urllib3.exceptions

_current = threading.local()


def _current_watch() -> AttemptWatch | None:
    watch: AttemptWatch | None = getattr(_current, "watch", None)
    return watch


class AttemptWatch:
    """One attempt under watch: what the watchdog cuts, and whether it did."""

    def __init__(self, deadline: float) -> None:
        self.deadline = deadline  # time.monotonic()
        self.fired = False  # the deadline passed before the attempt finished
        self.header_problem: str | None = None  # urllib3 could not parse the headers
        self._lock = threading.Lock()
        self._finished = False
        self._connection: urllib3.connection.HTTPConnection | None = None
        self._response: urllib3.BaseHTTPResponse | None = None

    @property
    def finished(self) -> bool:
        return self._finished

    def attach(self, connection: urllib3.connection.HTTPConnection) -> None:
        """The connection this attempt now uses (cut at once if the deadline has passed)."""
        with self._lock:
            if self._finished:
                return
            self._connection = connection
            if self.fired:
                _shut(connection)

    def answered(self, response: urllib3.BaseHTTPResponse) -> None:
        """The answer whose body is read next (a cut of last resort, see the module doc)."""
        with self._lock:
            self._response = response

    def finish(self) -> None:
        """From now on nothing is cut: the connection may go back to the pool."""
        with self._lock:
            self._finished = True
            self._connection = self._response = None

    def cut(self) -> None:
        with self._lock:
            if self._finished:
                return
            self.fired = True
            if self._connection is not None:
                _shut(self._connection)
            elif self._response is not None:
                with suppress(OSError, ValueError, RuntimeError):
                    self._response.shutdown()


def _shut(connection: urllib3.connection.HTTPConnection) -> None:
    # shutdown(), not close(): a blocked read on a socket that is merely closed goes on waiting.
    sock = connection.sock
    if sock is not None:
        with suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)


class Watchdog:
    """Cuts every watched attempt whose deadline passes; one thread, started on first use and
    ended by `close` once no attempt is watched."""

    def __init__(self) -> None:
        self._changed = threading.Condition()
        self._due: list[tuple[float, int, AttemptWatch]] = []
        self._order = itertools.count()
        self._thread: threading.Thread | None = None
        self._closed = False

    @contextmanager
    def watching(self, deadline: float) -> Iterator[AttemptWatch]:
        """Watch the calling thread's attempt until the block ends."""
        watch = AttemptWatch(deadline)
        with self._changed:
            heapq.heappush(self._due, (deadline, next(self._order), watch))
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(
                    target=self._run, name="policy-api-watchdog", daemon=True
                )
                self._thread.start()
            elif self._due[0][2] is watch:
                self._changed.notify()
        _current.watch = watch
        try:
            yield watch
        finally:
            _current.watch = None
            watch.finish()

    def close(self) -> None:
        with self._changed:
            self._closed = True
            self._changed.notify()

    def _run(self) -> None:
        while True:
            with self._changed:
                while True:
                    while self._due and self._due[0][2].finished:
                        heapq.heappop(self._due)
                    if not self._due:
                        if self._closed:
                            self._thread = None
                            return
                        self._changed.wait()
                        continue
                    wait = self._due[0][0] - time.monotonic()
                    if wait <= 0:
                        break
                    self._changed.wait(wait)
                watch = heapq.heappop(self._due)[2]
            watch.cut()


# --- connections that hand themselves to the attempt -------------------------------------------


class WatchedHTTPConnection(urllib3.connection.HTTPConnection):
    def connect(self) -> None:
        _attach(self)
        super().connect()

    def request(self, *args: Any, **kwargs: Any) -> None:
        _attach(self)  # a kept-alive connection serves a new attempt
        super().request(*args, **kwargs)


class WatchedHTTPSConnection(urllib3.connection.HTTPSConnection):
    def connect(self) -> None:
        _attach(self)  # the TLS handshake runs inside connect()
        super().connect()

    def request(self, *args: Any, **kwargs: Any) -> None:
        _attach(self)
        super().request(*args, **kwargs)


WATCHED_CONNECTIONS: dict[type, type[urllib3.connection.HTTPConnection]] = {
    urllib3.connection.HTTPConnection: WatchedHTTPConnection,
    urllib3.connection.HTTPSConnection: WatchedHTTPSConnection,
}


def _attach(connection: urllib3.connection.HTTPConnection) -> None:
    watch = _current_watch()
    if watch is not None:
        watch.attach(connection)


# --- headers urllib3 cannot parse --------------------------------------------------------------


class _UnparsedHeaders(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        watch = _current_watch()
        error = record.exc_info[1] if record.exc_info else None
        if watch is None or not isinstance(error, urllib3.exceptions.HeaderParsingError):
            return True
        watch.header_problem = f"illegal response headers ({error})"  # scrubbed by the caller
        return False


logging.getLogger("urllib3.connection").addFilter(_UnparsedHeaders())
