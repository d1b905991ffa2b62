"""The Policy API client: a plain class (no Dagster) for the three endpoints of the seed.

Transient failures (connection errors, timeouts, 429, 5xx, and a 409 that says a POST with
the same Idempotency-Key is still in flight) are retried with capped exponential backoff and
full jitter, honouring ``Retry-After``; other 4xx are returned to the caller. Every attempt is
reported to an ``on_attempt`` callback so the caller can audit it, which is why the retries are
this module's own loop and not urllib3's ``Retry``. Each attempt has a total deadline of
``timeout_seconds``, headers and body included, however slowly the server drips. Redirects
are not followed: a 3xx is the answer.

The API key is only ever placed in the ``Authorization`` header, and scrubbed (raw, JSON-,
percent- and HTML-escaped) from every body, message and error the client hands back: an API
that echoes request headers must not put it into the warehouse or the logs.

The Dagster resource that hands out this client is ``policy_pipeline.resources.policy_api``.
"""

from __future__ import annotations

import codecs
import email.errors
import email.message
import email.utils
import http.client
import io
import json
import random
import socket
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from types import TracebackType
from typing import Any, NamedTuple
from urllib.parse import quote, urlsplit

import requests
import requests.adapters
import requests.auth
import requests.exceptions
import urllib3.connection
import urllib3.connectionpool
import urllib3.exceptions

from policy_pipeline.core.policy_api_types import (
    MAX_RECORDED_BODY,
    ApiAttempt,
    ApiResponse,
    AttemptCallback,
    PolicyApiError,
    api_key_problem,
    parse_body,
)
from policy_pipeline.core.scrubbing import SecretScrubber


def parse_retry_after(value: str | None, now: datetime | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header in either of its forms."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - (now or datetime.now(UTC))).total_seconds())


# --- the API key never leaves the client ------------------------------------------------------


class ResponseScrubber(SecretScrubber):
    """The shared scrubber (`policy_pipeline.core.scrubbing`), for response bodies too."""

    def body(self, raw: str) -> tuple[str, Any]:
        """A response body, scrubbed, then parsed (text, JSON or None)."""
        text = self.text(raw)
        data = parse_body(text)
        if data is not None and "\\" in text:  # JSON escapes could still hide the key
            clean = self.data(data)
            if clean != data:
                # The key was still there once decoded (\uXXXX escapes): the text the caller
                # keeps must not hold it either, so it becomes the scrubbed JSON.
                data, text = clean, json.dumps(clean)
        return text, data


# --- a total deadline per attempt ---------------------------------------------------------------
#
# requests' timeouts bound each socket operation, not the call: a server that sends one byte
# every (timeout - 1) seconds holds a call for ever. The connections below clamp every connect,
# send and read (TLS handshake, proxy CONNECT, status line, headers and body alike) to what is
# left of the calling thread's attempt deadline, and the pool waits for a free connection no
# longer than that either; a drip then ends in an ordinary socket timeout, which urllib3 turns
# into its timeout errors and answers by dropping the connection. requests runs a call in the
# calling thread and only that thread touches a connection while it is checked out of the pool,
# so a thread-local deadline is exactly the attempt's, and no thread ever acts on another's
# socket.

_deadline = threading.local()


@contextmanager
def _attempt_deadline(at: float) -> Iterator[None]:
    previous = getattr(_deadline, "at", None)
    _deadline.at = at
    try:
        yield
    finally:
        _deadline.at = previous


def _time_left() -> float | None:
    at: float | None = getattr(_deadline, "at", None)
    return None if at is None else at - time.monotonic()


def _bound(sock: socket.socket) -> None:
    """Before a blocking operation on ``sock``: let it wait no longer than the attempt may."""
    left = _time_left()
    if left is None:
        return
    if left <= 0:
        raise TimeoutError("the attempt's deadline passed")
    sock.settimeout(left)


def _connect_within_deadline(
    conn: urllib3.connection.HTTPConnection, connect: Callable[[], socket.socket]
) -> socket.socket:
    left = _time_left()
    if left is None:
        return connect()
    if left <= 0:
        raise urllib3.exceptions.ConnectTimeoutError(conn, "the attempt's deadline passed")
    configured = conn.timeout
    conn.timeout = min(configured, left) if isinstance(configured, int | float) else left
    try:
        sock = connect()
    finally:
        conn.timeout = configured
    # The TLS handshake (and a proxy's CONNECT) that may follow run on this socket's timeout;
    # CPython bounds a whole handshake by it, so it gets only what is left now.
    left = _time_left()
    if left is None or left <= 0:
        sock.close()
        raise urllib3.exceptions.ConnectTimeoutError(conn, "the attempt's deadline passed")
    sock.settimeout(left)
    return sock


class _DeadlineReader(io.RawIOBase):
    """The socket reader of http.client's response, each read bounded by the deadline."""

    def __init__(self, sock: socket.socket, raw: io.RawIOBase) -> None:
        super().__init__()
        self._sock = sock
        self._raw = raw

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int | None:
        _bound(self._sock)
        return self._raw.readinto(buffer)

    def close(self) -> None:
        if not self.closed:
            try:
                self._raw.close()  # releases the socket's reference, as the original would
            finally:
                super().close()


class _MalformedHeadersError(http.client.HTTPException):
    """Response headers that do not parse; the message quotes the offending line with repr()
    (the caller scrubs it: an echoing server may put the key there)."""


# A multipart Content-Type makes the email parser expect a body it is never given.
_HARMLESS_DEFECTS = (
    email.errors.StartBoundaryNotFoundDefect,
    email.errors.MultipartInvariantViolationDefect,
)


def _header_problem(message: email.message.Message) -> str | None:
    """What is wrong with parsed response headers, or None. http.client only records defects
    (urllib3 then logs them, quoted line and all); httpx's h11 refused such an answer."""
    defects = [d for d in message.defects if not isinstance(d, _HARMLESS_DEFECTS)]
    payload = None if message.is_multipart() else message.get_payload()
    unparsed = payload.strip() if isinstance(payload, str) else ""
    if not defects and not unparsed:
        return None
    if unparsed:
        return f"illegal header line: {unparsed.splitlines()[0]!r}"
    return "illegal response headers: " + ", ".join(type(d).__name__ for d in defects)


class _DeadlineResponse(http.client.HTTPResponse):
    """http.client's response reading through the deadline, and strict about its headers."""

    def __init__(
        self,
        sock: socket.socket,
        debuglevel: int = 0,
        method: str | None = None,
        url: str | None = None,
    ) -> None:
        super().__init__(sock, debuglevel, method, url)
        # detach(), not a new makefile(): the socket counts its readers, and the dropped
        # buffer must not close the raw reader on its way out.
        self.fp = io.BufferedReader(_DeadlineReader(sock, self.fp.detach()))

    def begin(self) -> None:
        super().begin()
        problem = _header_problem(self.msg)
        if problem is not None:
            raise _MalformedHeadersError(problem)


class _DeadlineHTTPConnection(urllib3.connection.HTTPConnection):
    response_class = _DeadlineResponse

    def _new_conn(self) -> socket.socket:
        return _connect_within_deadline(self, super()._new_conn)

    def send(self, data: Any) -> None:
        if self.sock is not None:
            _bound(self.sock)
        super().send(data)


class _DeadlineHTTPSConnection(urllib3.connection.HTTPSConnection):
    response_class = _DeadlineResponse

    def _new_conn(self) -> socket.socket:
        return _connect_within_deadline(self, super()._new_conn)

    def send(self, data: Any) -> None:
        if self.sock is not None:
            _bound(self.sock)
        super().send(data)


def _pool_wait(timeout: float | None) -> float | None:
    left = _time_left()
    if left is None:
        return timeout
    left = max(left, 0.0)  # a free connection is still taken; the deadline then fails it
    return left if timeout is None else min(timeout, left)


class _DeadlineHTTPPool(urllib3.connectionpool.HTTPConnectionPool):
    ConnectionCls = _DeadlineHTTPConnection

    def _get_conn(self, timeout: float | None = None) -> Any:
        return super()._get_conn(_pool_wait(timeout))


class _DeadlineHTTPSPool(urllib3.connectionpool.HTTPSConnectionPool):
    ConnectionCls = _DeadlineHTTPSConnection

    def _get_conn(self, timeout: float | None = None) -> Any:
        return super()._get_conn(_pool_wait(timeout))


_DEADLINE_POOLS: dict[str, type[urllib3.connectionpool.HTTPConnectionPool]] = {
    "http": _DeadlineHTTPPool,
    "https": _DeadlineHTTPSPool,
}


class _DeadlineAdapter(requests.adapters.HTTPAdapter):
    """Puts the deadline pools under every pool manager of the session, direct and proxied."""

    def init_poolmanager(
        self, connections: int, maxsize: int, block: bool = False, **pool_kwargs: Any
    ) -> None:
        super().init_poolmanager(connections, maxsize, block, **pool_kwargs)
        self.poolmanager.pool_classes_by_scheme = _DEADLINE_POOLS

    def proxy_manager_for(self, proxy: str, **proxy_kwargs: Any) -> Any:
        if proxy.lower().startswith("socks"):
            # urllib3's SOCKS pools bring their own connections, which the deadline misses.
            raise requests.exceptions.InvalidSchema(
                "SOCKS proxies are not supported by the Policy API client"
            )
        manager = super().proxy_manager_for(proxy, **proxy_kwargs)
        manager.pool_classes_by_scheme = _DEADLINE_POOLS
        return manager

    def get_connection_with_tls_context(
        self,
        request: requests.PreparedRequest,
        verify: bool | str | None,
        proxies: Mapping[str, str] | None = None,
        cert: Any = None,
    ) -> urllib3.connectionpool.HTTPConnectionPool:
        pool = super().get_connection_with_tls_context(request, verify, proxies, cert)
        # A requests/urllib3 that builds its pools otherwise fails here, loudly, rather than
        # silently losing the deadline.
        if not isinstance(pool, _DeadlineHTTPPool | _DeadlineHTTPSPool):
            raise RuntimeError(
                "cannot enforce the Policy API attempt deadline with this requests/urllib3 "
                f"version (got a {type(pool).__name__})"
            )
        return pool


class _PolicySession(requests.Session):
    def get_redirect_target(self, resp: requests.Response) -> str | None:
        # Never follow a redirect, nor read its body on the way: the 3xx is the answer (as
        # with httpx, whose default was the same).
        return None


class _BearerAuth(requests.auth.AuthBase):
    """Sets the key. As the session's auth it also keeps requests from consulting ~/.netrc,
    which would otherwise replace the header (httpx never read .netrc)."""

    def __init__(self, key: str) -> None:
        self._header = f"Bearer {key}"

    def __call__(self, r: requests.PreparedRequest) -> requests.PreparedRequest:
        r.headers["Authorization"] = self._header
        return r

    def __repr__(self) -> str:
        return "_BearerAuth(***)"


def _new_session(key: str, max_connections: int) -> requests.Session:
    session = _PolicySession()
    session.auth = _BearerAuth(key)
    # No more connections than calls in flight, and a call beyond that waits for one (within
    # its deadline) instead of opening a connection the pool would then throw away. No
    # urllib3 retries (the default Retry(0)): every attempt goes through the audited loop.
    adapter = _DeadlineAdapter(pool_maxsize=max_connections, pool_block=True)
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    return session


def _json_bytes(body: Any) -> bytes:
    # Byte for byte what httpx sent (compact, UTF-8, no NaN): an API that fingerprints the
    # body of an Idempotency-Key must see a retry across the switch as the same request.
    return json.dumps(body, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode()


def _decode_text(content: bytes, content_type: str | None) -> str:
    """The body as text as httpx decoded it: the declared charset if Python knows it, else
    UTF-8, bad bytes replaced (requests would guess a charset, or say Latin-1 for text/*)."""
    if not content:
        return ""
    encoding = "utf-8"
    if content_type:
        message = email.message.Message()
        message["content-type"] = content_type
        charset = message.get_content_charset(failobj=None)
        if charset:
            try:
                codecs.lookup(charset)
                encoding = charset
            except LookupError:
                pass
    try:
        text = codecs.decode(content, encoding, errors="replace")
    except (LookupError, TypeError, ValueError):
        text = None
    return text if isinstance(text, str) else content.decode("utf-8", errors="replace")


def _about_idempotency(text: str, data: Any) -> bool:
    """Whether a 409/422 answer is the IETF idempotency-key draft's: a body about the key, or
    no readable explanation at all. A JSON error about something else (the simulator's 409
    "policy not ready") is the API's answer to the request itself."""
    return data is None or "idempoten" in text.lower()


# --- naming a transport failure -----------------------------------------------------------------
#
# The names are the ones the httpx client wrote (ConnectError, ReadTimeout, ...), so the audit
# trail and the logs read the same before and after the switch. requests and urllib3 nest their
# errors several deep; the name comes from the most telling one in the chain.

_UNSENDABLE = (ValueError, requests.exceptions.URLRequired)
_TRANSPORT = (
    requests.exceptions.RequestException,
    urllib3.exceptions.HTTPError,
    http.client.HTTPException,
    OSError,
)


def _chain(exc: BaseException) -> list[BaseException]:
    """``exc`` and everything it wraps: arguments, urllib3's ``reason``, cause and context."""
    found: list[BaseException] = []
    todo = [exc]
    while todo:
        current = todo.pop(0)
        if any(current is seen for seen in found):
            continue
        found.append(current)
        nested = [a for a in current.args if isinstance(a, BaseException)]
        reason = getattr(current, "reason", None)
        if isinstance(reason, BaseException):
            nested.append(reason)
        nested += [c for c in (current.__cause__, current.__context__) if c is not None]
        todo += nested
    return found


def _first(chain: list[BaseException], kinds: Any) -> BaseException | None:
    return next((e for e in chain if isinstance(e, kinds)), None)


def _detail(exc: BaseException) -> str:
    cause = exc.__cause__
    if isinstance(exc, urllib3.exceptions.NewConnectionError) and isinstance(cause, OSError):
        exc = cause  # urllib3's own text starts with the connection object's repr
    if isinstance(exc, http.client.RemoteDisconnected):
        return "Server disconnected without sending a response."  # httpx's words
    if isinstance(exc, http.client.BadStatusLine):
        return f"illegal status line: {exc.args[0]!r}"  # the raw line, quoted, may be anything
    return str(exc).strip() or type(exc).__name__


def _transport_problem(exc: BaseException, limit: float) -> str:
    chain = _chain(exc)
    timeout: str | None = None
    if _first(chain, urllib3.exceptions.EmptyPoolError):
        timeout = "PoolTimeout"
    elif any(
        isinstance(e, urllib3.exceptions.ConnectTimeoutError | requests.exceptions.ConnectTimeout)
        and not isinstance(e, urllib3.exceptions.NewConnectionError)
        for e in chain
    ):
        timeout = "ConnectTimeout"
    elif _first(chain, urllib3.exceptions.ReadTimeoutError | requests.exceptions.ReadTimeout):
        timeout = "ReadTimeout"
    elif _first(chain, TimeoutError):  # a send that the deadline cut short
        timeout = "WriteTimeout"
    if timeout is not None:
        return f"{timeout}: no complete answer within the {limit:g}s attempt limit"
    for name, kinds in (
        ("ConnectError", urllib3.exceptions.NewConnectionError),
        ("ProxyError", urllib3.exceptions.ProxyError | requests.exceptions.ProxyError),
        ("ConnectError", urllib3.exceptions.SSLError | requests.exceptions.SSLError),
        (
            "DecodingError",
            urllib3.exceptions.DecodeError | requests.exceptions.ContentDecodingError,
        ),
        ("RemoteProtocolError", http.client.HTTPException),
    ):
        found = _first(chain, kinds)
        if found is not None:
            return f"{name}: {_detail(found)}"
    os_error = next(
        (
            e
            for e in chain
            if isinstance(e, OSError) and not isinstance(e, requests.exceptions.RequestException)
        ),
        None,
    )
    if os_error is not None:
        return f"ReadError: {_detail(os_error)}"
    protocol = _first(
        chain, urllib3.exceptions.ProtocolError | requests.exceptions.ChunkedEncodingError
    )
    if protocol is not None:
        return f"RemoteProtocolError: {_detail(protocol)}"
    return f"{type(exc).__name__}: {_detail(exc)}"


def _unsendable_name(exc: BaseException) -> str:
    if isinstance(exc, requests.exceptions.MissingSchema | requests.exceptions.InvalidSchema):
        return "UnsupportedProtocol"
    return "LocalProtocolError"


# --- the client ---------------------------------------------------------------------------------


def _check(name: str, value: Any, kind: type, low: float, inclusive: bool) -> None:
    number_types: tuple[type, ...] = (int,) if kind is int else (int, float)
    if isinstance(value, bool) or not isinstance(value, number_types):
        raise TypeError(f"{name} must be {'an int' if kind is int else 'a number'}")
    if not (value >= low if inclusive else value > low):
        raise ValueError(f"{name} must be {'>=' if inclusive else '>'} {low:g}, got {value!r}")


@dataclass(frozen=True)
class PolicyApiConfig:
    """How to reach the Policy API and how hard to try. Same names, defaults and limits as the
    Dagster resource's fields (`policy_pipeline.resources.policy_api.PolicyApiResource`)."""

    endpoint: str  # base URL (POLICY_API_ENDPOINT)
    api_key: str = field(repr=False)  # sent as 'Authorization: Bearer ...' (POLICY_API_KEY)
    create_path: str = "/createpolicy"
    status_path: str = "/policy/{policy_id}"
    circuit_path: str = "/circuit"
    timeout_seconds: float = 30.0  # > 0; a whole attempt, connect to last body byte
    max_attempts: int = 5  # >= 1; attempts per call, first included
    backoff_initial_seconds: float = 0.5  # >= 0
    backoff_max_seconds: float = 30.0  # >= 0
    retry_after_max_seconds: float = 120.0  # >= 0; cap on a server-requested wait
    max_concurrent_requests: int = 16  # >= 1; API calls in flight, and pooled connections
    guard_failure_threshold: int = 10  # >= 1; consecutive transient failures opening the guard
    guard_cooldown_seconds: int = 60  # >= 0; how long the guard stays open before one probe

    def __post_init__(self) -> None:
        for name in ("endpoint", "api_key", "create_path", "status_path", "circuit_path"):
            if not isinstance(getattr(self, name), str):
                raise TypeError(f"{name} must be a string")  # the value is not shown: a key?
        _check("timeout_seconds", self.timeout_seconds, float, 0, inclusive=False)
        _check("max_attempts", self.max_attempts, int, 1, inclusive=True)
        _check("backoff_initial_seconds", self.backoff_initial_seconds, float, 0, inclusive=True)
        _check("backoff_max_seconds", self.backoff_max_seconds, float, 0, inclusive=True)
        _check("retry_after_max_seconds", self.retry_after_max_seconds, float, 0, inclusive=True)
        _check("max_concurrent_requests", self.max_concurrent_requests, int, 1, inclusive=True)
        _check("guard_failure_threshold", self.guard_failure_threshold, int, 1, inclusive=True)
        _check("guard_cooldown_seconds", self.guard_cooldown_seconds, int, 0, inclusive=True)


class _Http(NamedTuple):
    session: requests.Session
    scrubber: ResponseScrubber


class PolicyApiClient:
    """HTTP client for the Policy API (create policy, policy status, circuit breaker).

    Safe to share between threads: one ``requests.Session`` (built on first use) and one
    connection pool of ``max_concurrent_requests`` connections serve them all. ``close()``
    (or leaving a ``with`` block) closes the connections; a later call opens new ones.
    ``sleep`` is how the client waits between attempts (tests record it instead)."""

    def __init__(
        self, config: PolicyApiConfig, *, sleep: Callable[[float], None] = time.sleep
    ) -> None:
        self.config = config
        self._sleep = sleep
        self._http_lock = threading.Lock()
        self._http: _Http | None = None

    def __repr__(self) -> str:
        return f"PolicyApiClient(endpoint={self.config.endpoint!r})"

    __str__ = __repr__

    def __enter__(self) -> PolicyApiClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        with self._http_lock:
            http, self._http = self._http, None
        if http is not None:
            http.session.close()

    def _connection(self) -> _Http:
        # Steps call one client from many threads: build one session, once.
        with self._http_lock:
            if self._http is None:
                # A key read from a secret file often ends in a newline. Anything else
                # unprintable would be quoted, key and all, in a header-validation error, and
                # a non-ASCII one fails to encode mid-run; the check is here, on first use, so
                # a bad key is a clean non-transient error of the call, before anything is sent.
                problem = api_key_problem(self.config.api_key)
                if problem is not None:
                    raise PolicyApiError(f"POLICY_API_KEY {problem}", transient=False)
                key = self.config.api_key.strip()
                self._http = _Http(
                    _new_session(key, self.config.max_concurrent_requests), ResponseScrubber(key)
                )
            return self._http

    def _url(self, path: str) -> str:
        if urlsplit(path).scheme:  # an absolute path setting wins over the endpoint, as in httpx
            return path
        return f"{self.config.endpoint.rstrip('/')}/{path.lstrip('/')}"

    # --- the three endpoints --------------------------------------------------------------------

    def create_policy(
        self, payload: dict[str, Any], idempotency_key: str, on_attempt: AttemptCallback
    ) -> ApiResponse:
        return self._call(
            "createpolicy", "POST", self.config.create_path, payload, idempotency_key, on_attempt
        )

    def get_policy_status(self, policy_id: str, on_attempt: AttemptCallback) -> ApiResponse:
        path = self.config.status_path.format(policy_id=quote(policy_id, safe=""))
        return self._call("policy_status", "GET", path, None, None, on_attempt)

    def trigger_circuit_breaker(
        self,
        policy_id: str,
        execution_id: str,
        trigger_reason: str,
        idempotency_key: str,
        on_attempt: AttemptCallback,
    ) -> ApiResponse:
        body = {
            "policy_id": policy_id,
            "execution_id": execution_id,
            "trigger_reason": trigger_reason,
        }
        return self._call(
            "circuit", "POST", self.config.circuit_path, body, idempotency_key, on_attempt
        )

    # --- retries --------------------------------------------------------------------------------

    def backoff_seconds(self, attempt: int, retry_after: float | None) -> float:
        config = self.config
        if retry_after is not None:
            return min(retry_after, config.retry_after_max_seconds)
        growth = 2 ** min(attempt - 1, 32)  # bounded: a huge attempt number must not overflow
        ceiling = min(config.backoff_max_seconds, config.backoff_initial_seconds * growth)
        return random.uniform(0, ceiling)  # full jitter

    def _send(
        self,
        session: requests.Session,
        method: str,
        url: str,
        content: bytes | None,
        headers: dict[str, str],
        deadline: float,
    ) -> tuple[int, str, str | None, str | None]:
        """One attempt: status, body text, Content-Type and Retry-After, all within the
        deadline. Raises what requests/urllib3 raise."""
        with _attempt_deadline(deadline):
            response = session.request(
                method,
                url,
                data=content,
                headers=headers,
                timeout=self.config.timeout_seconds,
                allow_redirects=False,
                stream=True,  # the body is read here, inside the deadline, then released
            )
            try:
                body = response.content
            finally:
                response.close()
        content_type = response.headers.get("Content-Type")
        text = _decode_text(body, content_type)
        return response.status_code, text, content_type, response.headers.get("Retry-After")

    def _call(
        self,
        endpoint: str,
        method: str,
        path: str,
        body: dict[str, Any] | None,
        idempotency_key: str | None,
        on_attempt: AttemptCallback,
    ) -> ApiResponse:
        config = self.config
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        content = None if body is None else _json_bytes(body)
        if content is not None:
            headers["Content-Type"] = "application/json"
        keyed_post = method == "POST" and bool(idempotency_key)
        last_problem = ""
        session, scrubber = self._connection()
        url = self._url(path)
        for attempt in range(1, config.max_attempts + 1):
            started = time.monotonic()
            retry_after: float | None = None
            answer: tuple[int, str, str | None, str | None] | None = None
            problem, unsendable = "", False
            try:
                answer = self._send(
                    session, method, url, content, headers, started + config.timeout_seconds
                )
            except _UNSENDABLE as exc:
                # Our request cannot be sent as built (a bad URL or header value): retrying
                # cannot help, and the library's text may quote a header value, so it is not
                # repeated.
                problem = f"{_unsendable_name(exc)}: the request could not be sent"
                unsendable = True
            except _TRANSPORT as exc:
                # Transport errors name the URL, not the headers; the key is scrubbed regardless.
                problem = scrubber.text(_transport_problem(exc, config.timeout_seconds))
            if unsendable:
                on_attempt(
                    ApiAttempt(endpoint, method, path, attempt, 0.0, None, "failed", None, problem)
                )
                # Raised outside the except clause, so the library's exception (which may
                # quote the header) is not even attached as its __context__.
                raise PolicyApiError(f"{method} {path}: {problem}", transient=False)
            latency = (time.monotonic() - started) * 1000
            if answer is None:
                last_problem = problem
                retrying = attempt < config.max_attempts
                on_attempt(
                    ApiAttempt(
                        endpoint,
                        method,
                        path,
                        attempt,
                        latency,
                        None,
                        "retry" if retrying else "failed",
                        None,
                        last_problem,
                    )
                )
            else:
                status, raw_text, _, retry_after_header = answer
                text, data = scrubber.body(raw_text)
                about_key = keyed_post and _about_idempotency(text, data)
                # IETF idempotency-key draft: 409 = a request with this key is still in flight.
                in_flight = status == 409 and about_key
                transient = status == 429 or status >= 500 or in_flight
                retrying = transient and attempt < config.max_attempts
                outcome = "retry" if retrying else ("failed" if transient else "ok")
                if transient:
                    retry_after = parse_retry_after(retry_after_header)
                on_attempt(
                    ApiAttempt(
                        endpoint,
                        method,
                        path,
                        attempt,
                        latency,
                        status,
                        outcome,
                        data if data is not None else text[:MAX_RECORDED_BODY],
                        None,
                        retry_after,
                    )
                )
                if not transient:
                    return ApiResponse(
                        endpoint,
                        method,
                        path,
                        status,
                        text,
                        data,
                        latency,
                        attempt,
                        # IETF draft: 422 = this key was used with another body.
                        idempotency_key_reused=status == 422 and about_key,
                    )
                last_problem = f"HTTP {status}"
                if in_flight:
                    last_problem += " (a request with this Idempotency-Key is still in flight)"
            if attempt < config.max_attempts:
                self._sleep(self.backoff_seconds(attempt, retry_after))
        raise PolicyApiError(
            f"{method} {path} failed after {config.max_attempts} attempts (last: {last_problem})",
            transient=True,
        )
