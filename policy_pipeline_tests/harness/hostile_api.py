"""A small hostile HTTP server for client tests: each test scripts how each route misbehaves.

Unlike the simulator (a faithful Policy API with a few faults), this server does exactly and
only what the test says, byte by byte if asked: echo the request headers (API key included)
into the body, drip the headers or the body one byte every N seconds, answer any status with
any body and headers, reset the connection, or send raw bytes that are not HTTP at all::

    api = HostileApi(
        {
            "POST /createpolicy": Behaviour(status=401, echo_request=True),
            "/policy/*": [Behaviour(status=503), Behaviour(body={"status": "success"})],
            "*": Behaviour(status=404, body={"error": "nothing here"}),
        }
    )
    with api:
        client = PolicyApiClient(PolicyApiConfig(endpoint=api.base_url, api_key=...))
        ...
        assert api.count("POST", "/createpolicy") == 1

Routing, for a request ``METHOD /path`` (query string ignored), the first match wins:
``"METHOD /path"``, then ``"/path"``, then glob keys (``fnmatch``, e.g. ``"GET /policy/*"`` or
``"/policy/*"``), the longest first so a specific pattern beats a generic one whatever the
insertion order, then ``"*"``; with no match the answer is a JSON 404.

A route's value is a :class:`Behaviour` (for every request), a list of them (one per request in
order, the last one repeating: ``[Behaviour(status=500)] * 2 + [Behaviour()]``), or a callable
``(SeenRequest) -> Behaviour``. :func:`well_behaved` gives a correct API that always returns
the same policy_id, to start from and override a route or two. Routes may be changed while
the server runs (:meth:`HostileApi.set`). Every request is recorded (:attr:`HostileApi.requests`).

The server listens on 127.0.0.1 on an ephemeral port, speaks HTTP/1.1 with keep-alive (so a
client's connection pool is exercised as against a real API), serves each connection in a
daemon thread, and ``stop()`` interrupts drips and closes every connection, so a test never
waits for a misbehaviour to play out.
"""

from __future__ import annotations

import fnmatch
import json
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from http import HTTPStatus
from types import TracebackType
from typing import Any
from urllib.parse import urlsplit

from policy_devtools.loopback_http import LoopbackHTTPServer, ResettingHandler

FIXED_POLICY_ID = "pol_hostile_fixed"


@dataclass(frozen=True)
class SeenRequest:
    """One request as the server received it."""

    method: str
    path: str  # without the query string
    target: str  # as sent: path and query
    headers: dict[str, str]  # names as sent; see header() for a case-insensitive look-up
    body: bytes
    received_at: float  # time.monotonic()

    def header(self, name: str) -> str | None:
        lowered = name.lower()
        return next((v for k, v in self.headers.items() if k.lower() == lowered), None)

    def json(self) -> Any:
        return json.loads(self.body) if self.body else None

    def echo(self) -> dict[str, Any]:
        """What ``Behaviour(echo_request=True)`` answers: the whole request, headers included."""
        return {
            "method": self.method,
            "path": self.target,
            "headers": dict(self.headers),
            "body": self.body.decode("utf-8", "replace"),
        }


Body = dict[str, Any] | list[Any] | str | bytes | None


@dataclass(frozen=True)
class Behaviour:
    """How to answer one request. The defaults are an empty 200."""

    status: int = 200
    # dict/list: sent as JSON; str: UTF-8 text; bytes: as is; None: empty. A callable gets the
    # SeenRequest and returns one of those (e.g. to echo the key in a form of its choosing).
    body: Body | Callable[[SeenRequest], Body] = None
    headers: Mapping[str, str] = field(default_factory=dict)  # extra response headers
    content_type: str | None = None  # default: from the body's type
    echo_request: bool = False  # the body is SeenRequest.echo() as JSON (overrides body)
    delay_seconds: float = 0.0  # before the first byte of the answer
    drip_headers_seconds: float = 0.0  # status line and headers one byte every N seconds
    drip_body_seconds: float = 0.0  # body one byte every N seconds
    reset: bool = False  # no answer: close the connection with a TCP RST
    raw: bytes | None = None  # send these bytes instead of a composed answer, then close
    close: bool = False  # "Connection: close" and close after the answer

    def render_body(self, request: SeenRequest) -> tuple[bytes, str | None]:
        """The body bytes and their default Content-Type."""
        body = request.echo() if self.echo_request else self.body
        if callable(body):
            body = body(request)
        if body is None:
            return b"", None
        if isinstance(body, bytes):
            return body, None
        if isinstance(body, str):
            return body.encode("utf-8"), "text/plain; charset=utf-8"
        return json.dumps(body).encode("utf-8"), "application/json"


Route = Behaviour | Sequence[Behaviour] | Callable[[SeenRequest], Behaviour]

NOT_FOUND = Behaviour(status=404, body={"error": "no behaviour scripted for this route"})


def json_answer(status: int, payload: Any, **extra: Any) -> Behaviour:
    return Behaviour(status=status, body=payload, **extra)


def well_behaved(policy_id: str = FIXED_POLICY_ID) -> dict[str, Behaviour]:
    """Routes of a correct Policy API that creates, reports ready and triggers ``policy_id``."""
    return {
        "POST /createpolicy": json_answer(200, {"policy_id": policy_id, "status": "pending"}),
        "GET /policy/*": json_answer(200, {"policy_id": policy_id, "status": "success"}),
        "POST /circuit": json_answer(
            200,
            {"policy_id": policy_id, "status": "triggered", "circuit_breaker_id": "cb_fixed"},
        ),
    }


class HostileApi:
    """The server. Start/stop it, or use it as a context manager."""

    def __init__(self, routes: Mapping[str, Route] | None = None) -> None:
        self._lock = threading.Lock()
        self._routes: dict[str, Route] = dict(routes or {})
        self._served: dict[str, int] = {}  # route key -> requests it answered
        self._requests: list[SeenRequest] = []
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    # --- lifecycle -----------------------------------------------------------------------------

    def start(self) -> HostileApi:
        if self._server is not None:
            return self
        server = _Server(("127.0.0.1", 0), self)
        thread = threading.Thread(
            target=server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name="hostile-api",
            daemon=True,
        )
        thread.start()
        self._server, self._thread = server, thread
        return self

    def stop(self) -> None:
        server, thread = self._server, self._thread
        if server is None:
            return
        server.stopping.set()  # drips and delays end now
        server.stop_serving()
        if thread is not None:
            thread.join(timeout=5)
        self._server = self._thread = None

    def __enter__(self) -> HostileApi:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    @property
    def base_url(self) -> str:
        assert self._server is not None, "start() the server first"
        return f"http://127.0.0.1:{self._server.server_port}"

    # --- scripting and inspection --------------------------------------------------------------

    def set(self, key: str, route: Route) -> None:
        """Add or replace a route; its request count (for lists of behaviours) restarts."""
        with self._lock:
            self._routes[key] = route
            self._served.pop(key, None)

    @property
    def requests(self) -> list[SeenRequest]:
        with self._lock:
            return list(self._requests)

    def requests_to(self, method: str | None = None, path: str | None = None) -> list[SeenRequest]:
        """Recorded requests, filtered by method and by path (a glob)."""
        return [
            r
            for r in self.requests
            if (method is None or r.method == method)
            and (path is None or fnmatch.fnmatchcase(r.path, path))
        ]

    def count(self, method: str | None = None, path: str | None = None) -> int:
        return len(self.requests_to(method, path))

    # --- used by the handler -------------------------------------------------------------------

    def _behaviour_for(self, request: SeenRequest) -> Behaviour:
        with self._lock:
            self._requests.append(request)
            key = self._match(request.method, request.path)
            if key is None:
                return NOT_FOUND
            route = self._routes[key]
            served = self._served.get(key, 0)
            self._served[key] = served + 1
        if isinstance(route, Behaviour):
            return route
        if callable(route):
            return route(request)
        return route[min(served, len(route) - 1)]

    def _match(self, method: str, path: str) -> str | None:
        for key in (f"{method} {path}", path):
            if key in self._routes:
                return key
        globs = [k for k in self._routes if k != "*" and any(c in k for c in "*?[")]
        for key in sorted(globs, key=len, reverse=True):
            pattern_method, _, pattern_path = key.rpartition(" ")
            if pattern_method and pattern_method != method:
                continue
            if fnmatch.fnmatchcase(path, pattern_path):
                return key
        return "*" if "*" in self._routes else None


class _Server(LoopbackHTTPServer):
    def __init__(self, address: tuple[str, int], api: HostileApi) -> None:
        self.api = api
        self.stopping = threading.Event()
        super().__init__(address, _Handler)


class _Handler(ResettingHandler):
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        self._serve()

    do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = do_GET

    def _serve(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length > 0 else b""
        request = SeenRequest(
            method=self.command,
            path=urlsplit(self.path).path,
            target=self.path,
            headers=dict(self.headers.items()),
            body=body,
            received_at=time.monotonic(),
        )
        behaviour = self.server.api._behaviour_for(request)
        try:
            self._answer(request, behaviour)
        except OSError:
            self.close_connection = True  # the client gave up (its deadline) or stop()

    def _answer(self, request: SeenRequest, behaviour: Behaviour) -> None:
        stopping = self.server.stopping
        if behaviour.delay_seconds > 0 and stopping.wait(behaviour.delay_seconds):
            self.close_connection = True
            return
        if behaviour.reset:
            self.reset_connection = self.close_connection = True
            return
        if behaviour.raw is not None:
            self.close_connection = True
            self.wfile.write(behaviour.raw)
            return
        body, content_type = behaviour.render_body(request)
        reason = HTTPStatus(behaviour.status).phrase if behaviour.status in _KNOWN else "Unknown"
        lines = [f"HTTP/1.1 {behaviour.status} {reason}"]
        content_type = behaviour.content_type or content_type
        if content_type is not None:
            lines.append(f"Content-Type: {content_type}")
        lines += [f"{name}: {value}" for name, value in behaviour.headers.items()]
        lines.append(f"Content-Length: {len(body)}")
        if behaviour.close or self.close_connection:
            self.close_connection = True
            lines.append("Connection: close")
        head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        if not self._send(head, behaviour.drip_headers_seconds):
            return
        if self.command != "HEAD":
            self._send(body, behaviour.drip_body_seconds)

    def _send(self, data: bytes, drip_seconds: float) -> bool:
        """Write ``data``, one byte every ``drip_seconds`` if set; False if stop() cut it short."""
        if drip_seconds <= 0:
            self.wfile.write(data)
            return True
        for i in range(len(data)):
            self.wfile.write(data[i : i + 1])
            if i + 1 < len(data) and self.server.stopping.wait(drip_seconds):
                self.close_connection = True
                return False
        return True


_KNOWN = {s.value for s in HTTPStatus}
