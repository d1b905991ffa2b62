"""Sending one attempt within its deadline: the requests session, the connection slots, and
what a failed attempt is called.

Redirects are not followed (a 3xx is the answer) and urllib3 never retries: every attempt goes
through the client's audited loop (`client.py`). At most ``max_connections`` attempts are in
flight at once; one beyond that waits for a slot within its own deadline.
"""

from __future__ import annotations

import http.client
import threading
import time
from dataclasses import dataclass
from typing import Any

import requests
import requests.adapters
import requests.auth
import requests.exceptions
import urllib3
import urllib3.exceptions

from policy_pipeline.core.policy_api.deadline import WATCHED_CONNECTIONS, Watchdog


@dataclass(frozen=True)
class RawAnswer:
    """What the server answered, unread: the caller decodes and scrubs it."""

    status: int
    body: bytes
    content_type: str | None
    retry_after: str | None


class AttemptFailed(Exception):
    """An attempt that got no answer. ``problem`` names the kind of failure first; it may quote
    the server (the caller scrubs it). ``sendable`` is False for a request that cannot be sent
    as built: retrying cannot help, and the library's text (which may quote a header value) is
    not repeated."""

    def __init__(self, problem: str, *, sendable: bool = True) -> None:
        super().__init__(problem)
        self.problem = problem
        self.sendable = sendable


class _WatchedAdapter(requests.adapters.HTTPAdapter):
    """Gives every pool the connections that hand themselves to the attempt (`deadline.py`)."""

    def get_connection_with_tls_context(
        self,
        request: requests.PreparedRequest,
        verify: bool | str | None,
        proxies: Any = None,
        cert: Any = None,
    ) -> Any:
        pool = super().get_connection_with_tls_context(request, verify, proxies, cert)
        if isinstance(pool, urllib3.HTTPConnectionPool):
            watched = WATCHED_CONNECTIONS.get(pool.ConnectionCls)
            if watched is not None:
                pool.ConnectionCls = watched
        return pool


class _PolicySession(requests.Session):
    def get_redirect_target(self, resp: requests.Response) -> str | None:
        # Never follow a redirect, nor read its body on the way: the 3xx is the answer.
        return None


class _BearerAuth(requests.auth.AuthBase):
    """Sets the key. As the session's auth it also keeps requests from consulting ~/.netrc,
    which would otherwise replace the header."""

    def __init__(self, key: str) -> None:
        self._header = f"Bearer {key}"

    def __call__(self, r: requests.PreparedRequest) -> requests.PreparedRequest:
        r.headers["Authorization"] = self._header
        return r

    def __repr__(self) -> str:
        return "_BearerAuth(***)"


class Transport:
    """One session, its connection slots and its watchdog, shared by the client's threads."""

    def __init__(self, key: str, max_connections: int, timeout_seconds: float) -> None:
        self.timeout_seconds = timeout_seconds
        self.session = _PolicySession()
        self.session.auth = _BearerAuth(key)
        # The slots keep the pool at max_connections; a pool that blocked itself would wait
        # for a connection with no deadline at all.
        adapter = _WatchedAdapter(pool_maxsize=max_connections, pool_block=False)
        self.session.mount("http://", adapter)
        self.session.mount("https://", adapter)
        self.slots = threading.BoundedSemaphore(max_connections)
        self._watchdog = Watchdog()

    def close(self) -> None:
        self.session.close()
        self._watchdog.close()

    def send(
        self, method: str, url: str, content: bytes | None, headers: dict[str, str]
    ) -> RawAnswer:
        """One attempt, done within ``timeout_seconds`` from now, waiting for a slot included.
        Raises AttemptFailed."""
        deadline = time.monotonic() + self.timeout_seconds
        if not self.slots.acquire(timeout=self.timeout_seconds):
            raise AttemptFailed(self._timed_out("PoolTimeout"))
        try:
            return self._send(method, url, content, headers, deadline)
        finally:
            self.slots.release()

    def _send(
        self,
        method: str,
        url: str,
        content: bytes | None,
        headers: dict[str, str],
        deadline: float,
    ) -> RawAnswer:
        failure: BaseException | None = None
        unsendable: str | None = None  # what kind of request cannot be sent
        answer: RawAnswer | None = None
        with self._watchdog.watching(deadline) as watch:
            left = max(deadline - time.monotonic(), 0.001)
            try:
                response = self.session.request(
                    method,
                    url,
                    data=content,
                    headers=headers,
                    timeout=(left, left),  # each wait; the watchdog bounds their sum
                    allow_redirects=False,
                    stream=True,  # the body is read below, still under watch
                )
            except _UNSENDABLE as exc:
                schemes = requests.exceptions.MissingSchema | requests.exceptions.InvalidSchema
                unsendable = "UnsupportedProtocol" if isinstance(exc, schemes) else "InvalidRequest"
            except _TRANSPORT as exc:
                failure = exc
            else:
                try:
                    if watch.header_problem is None:
                        watch.answered(response.raw)
                        answer = RawAnswer(
                            response.status_code,
                            response.content,
                            response.headers.get("Content-Type"),
                            response.headers.get("Retry-After"),
                        )
                except (*_TRANSPORT, ValueError) as exc:
                    failure = exc
                finally:
                    watch.finish()  # before the connection goes back to the pool
                    response.close()
        # Raised outside the except clauses: the library's exception, which may quote a header
        # value, is not even attached as the __context__.
        if watch.fired:  # whatever the cut made of the answer, it came too late
            connecting = isinstance(failure, requests.exceptions.ConnectTimeout)
            raise AttemptFailed(self._timed_out("ConnectTimeout" if connecting else "ReadTimeout"))
        if unsendable is not None:
            raise AttemptFailed(f"{unsendable}: the request could not be sent", sendable=False)
        if watch.header_problem is not None:
            raise AttemptFailed(f"RemoteProtocolError: {watch.header_problem}")
        if failure is not None:
            raise AttemptFailed(self._problem(failure))
        assert answer is not None
        return answer

    def _timed_out(self, kind: str) -> str:
        return f"{kind}: no complete answer within the {self.timeout_seconds:g}s attempt limit"

    def _problem(self, exc: BaseException) -> str:
        """A failure named by its kind, with the innermost cause's text."""
        chain = _causes(exc)
        if any(_connect_timeout(e) for e in chain):
            return self._timed_out("ConnectTimeout")
        if any(isinstance(e, _READ_TIMEOUTS) for e in chain):
            return self._timed_out("ReadTimeout")
        if any(isinstance(e, _CONNECT_ERRORS) for e in chain):
            kind = "ConnectError"
        elif isinstance(chain[-1], OSError) and not isinstance(
            chain[-1], http.client.HTTPException
        ):
            kind = "ReadError"  # the connection broke mid-answer (a reset)
        else:
            kind = "RemoteProtocolError"  # the answer is not valid HTTP, or it stopped short
        cause = chain[-1]
        if type(cause) is http.client.BadStatusLine:  # the raw line: quoted, it may be anything
            return f"{kind}: illegal status line: {cause.args[0]!r}"
        return f"{kind}: {str(cause).strip() or type(cause).__name__}"


_UNSENDABLE = (ValueError, requests.exceptions.URLRequired)
_TRANSPORT = (
    requests.exceptions.RequestException,
    urllib3.exceptions.HTTPError,
    http.client.HTTPException,
    OSError,
)
_READ_TIMEOUTS = (
    requests.exceptions.Timeout,
    urllib3.exceptions.ReadTimeoutError,
    TimeoutError,
)
_CONNECT_ERRORS = (
    urllib3.exceptions.NewConnectionError,  # refused, unreachable, unknown host
    urllib3.exceptions.SSLError,
    urllib3.exceptions.ProxyError,
    requests.exceptions.SSLError,
    requests.exceptions.ProxyError,
)


def _connect_timeout(exc: BaseException) -> bool:
    # urllib3's NewConnectionError (refused, unreachable) is a ConnectTimeoutError too.
    if isinstance(exc, urllib3.exceptions.NewConnectionError):
        return False
    return isinstance(
        exc, requests.exceptions.ConnectTimeout | urllib3.exceptions.ConnectTimeoutError
    )


def _causes(exc: BaseException) -> list[BaseException]:
    """``exc`` and what it wraps, outermost first: requests and urllib3 nest their errors
    (in arguments, in urllib3's ``reason``, as the cause)."""
    chain = [exc]
    while len(chain) < 10:
        current = chain[-1]
        reason = getattr(current, "reason", None)
        inner = next((a for a in current.args if isinstance(a, BaseException)), None)
        following = next(
            (
                e
                for e in (reason, inner, current.__cause__)
                if isinstance(e, BaseException) and all(e is not seen for seen in chain)
            ),
            None,
        )
        if following is None:
            break
        chain.append(following)
    return chain
