"""Local, deterministic stand-in for the external Policy API.

The real workflow talks to three endpoints:

1. ``POST /createpolicy``      -> returns a ``policy_id``
2. ``GET  /policy/{policy_id}`` -> polled until ``success|completed|active|ready`` or ``failed``
3. ``POST /circuit``           -> triggers the circuit breaker for a ready policy

This module serves those endpoints from a real HTTP server on the loopback interface so that
demos, the test-suite (in-process, ephemeral port) and fault-injection soak tests exercise the
actual HTTP client code.  Besides the standard library it imports only the product's plain
domain module (the success statuses, declared once there; no Dagster), so it starts fast and
never depends on the Dagster environment being importable.

Faults (5xx, 429 + Retry-After, HTML bodies, empty bodies, hangs, connection resets) can be
injected randomly (seeded, so runs are reproducible) or scripted in order.  A fault is applied
either *before* the request's side effect (nothing happened) or *after* it (the policy really
was created / the circuit really triggered, but the client only sees the fault) - the latter is
what makes idempotency keys necessary, and the exact ``counts()`` let tests prove that the
client used them.

Command line (the key is best passed through the environment, not the process list)::

    POLICY_SIMULATOR_API_KEY=secret python -m policy_devtools.simulator --port 0 --seed 1

It prints ``SIMULATOR_LISTENING http://127.0.0.1:<port>`` once, then serves until
SIGTERM/SIGINT.  Control endpoints (never faulted, delayed or authenticated) live under
``/_sim/``: ``GET counts``, ``GET policies``, ``GET|POST config``, ``POST reset``, ``GET health``.
"""

from __future__ import annotations

import argparse
import dataclasses
import email.utils
import hmac
import ipaddress
import json
import os
import random
import signal
import socket
import sys
import threading
import time
import uuid
from collections.abc import Callable, Container, Mapping, Sequence
from dataclasses import dataclass, field
from types import FrameType, TracebackType
from typing import Any
from urllib.parse import unquote, urlsplit

from policy_devtools.loopback_http import LoopbackHTTPServer, ResettingHandler
from policy_pipeline.core.domain import SUCCESS_STATUSES

__all__ = [
    "API_KEY_ENV_VAR",
    "ENDPOINTS",
    "FAULT_KINDS",
    "LISTENING_PREFIX",
    "SUCCESS_STATUSES",
    "UNKNOWN_POLICY",
    "PolicyApiSimulator",
    "SimulatorConfig",
    "is_loopback_host",
    "main",
]

ENDPOINTS: tuple[str, ...] = ("createpolicy", "policy_status", "circuit")
POST_ENDPOINTS: tuple[str, ...] = ("createpolicy", "circuit")
FAULT_KINDS: tuple[str, ...] = ("5xx", "429", "non_json", "empty", "timeout", "reset")
TERMINAL_STATUSES: tuple[str, ...] = (*SUCCESS_STATUSES, "failed")
UNKNOWN_STATUS = "mystery"
UNKNOWN_POLICY = "<unknown>"
API_KEY_ENV_VAR = "POLICY_SIMULATOR_API_KEY"
LISTENING_PREFIX = "SIMULATOR_LISTENING"
MAX_BODY_BYTES = 1 << 20

# Random fault probabilities in the order they are laid out on [0, 1): one uniform draw per
# request picks at most one fault, so the rates must sum to <= 1.
_RATE_FIELDS: tuple[tuple[str, str], ...] = (
    ("error_rate", "5xx"),
    ("rate_limit_rate", "429"),
    ("non_json_rate", "non_json"),
    ("empty_body_rate", "empty"),
    ("timeout_rate", "timeout"),
    ("reset_rate", "reset"),
)
_NON_NEGATIVE_FLOAT_FIELDS: tuple[str, ...] = (
    "ready_after_seconds",
    "latency_ms",
    "latency_jitter_ms",
    "retry_after_seconds",
    "hang_seconds",
)
_NAME_LIST_FIELDS: tuple[str, ...] = (
    "fail_policies",
    "never_ready_policies",
    "unknown_status_policies",
)
_SCRIPTED_FAULT_KEYS: tuple[str, ...] = ("endpoint", "fault", "times", "after_effect", "status")

_HTML_ERROR_PAGE = (
    b"<html><head><title>502 Bad Gateway</title></head>"
    b"<body><center><h1>502 Bad Gateway</h1></center><hr><center>nginx</center></body></html>"
)


# --------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------


def _as_int(name: str, value: Any, minimum: int) -> int:
    # bool is an int subclass; a JSON ``true`` is never a meaningful count.
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def _as_float(name: str, value: Any, maximum: float | None = None) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{name} must be a number, got {value!r}")
    result = float(value)
    if result != result or result < 0:  # rejects NaN too
        raise ValueError(f"{name} must be >= 0, got {value!r}")
    if maximum is not None and result > maximum:
        raise ValueError(f"{name} must be <= {maximum}, got {value!r}")
    return result


def _as_str_list(name: str, value: Any, allowed: Sequence[str] | None = None) -> list[str]:
    # A bare string would silently iterate as characters, so only real sequences are accepted.
    if not isinstance(value, list | tuple) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"{name} must be a list of strings, got {value!r}")
    if allowed is not None:
        for item in value:
            if item not in allowed:
                raise ValueError(f"{name}: unknown value {item!r} (allowed: {', '.join(allowed)})")
    return list(value)


def _normalise_scripted_fault(index: int, entry: Any) -> dict[str, Any]:
    where = f"scripted_faults[{index}]"
    if not isinstance(entry, Mapping):
        raise ValueError(f"{where} must be an object, got {entry!r}")
    for key in entry:
        if key not in _SCRIPTED_FAULT_KEYS:
            raise ValueError(f"{where}: unknown key {key!r}")
    endpoint = entry.get("endpoint")
    if endpoint not in ENDPOINTS:
        raise ValueError(f"{where}.endpoint must be one of {', '.join(ENDPOINTS)}")
    fault = entry.get("fault")
    if fault not in FAULT_KINDS:
        raise ValueError(f"{where}.fault must be one of {', '.join(FAULT_KINDS)}")
    after_effect = entry.get("after_effect", False)
    if not isinstance(after_effect, bool):
        raise ValueError(f"{where}.after_effect must be a boolean")
    status = entry.get("status")
    if status is not None and (not isinstance(status, int) or not 200 <= status <= 599):
        raise ValueError(f"{where}.status must be an HTTP status code")
    return {
        "endpoint": endpoint,
        "fault": fault,
        "times": _as_int(f"{where}.times", entry.get("times", 1), minimum=1),
        "after_effect": after_effect,
        # Optional: the HTTP status of a 5xx or non_json fault instead of a random one.
        "status": status,
    }


@dataclass
class SimulatorConfig:
    """Behaviour of the simulated Policy API.  Validated on construction (ValueError)."""

    api_key: str | None = None
    ready_after_polls: int = 2
    ready_after_seconds: float = 0.0
    # Per policy name, overriding ready_after_seconds (uneven readiness).
    ready_after_seconds_by_policy: dict[str, float] = field(default_factory=dict)
    ready_status: str = "success"
    fail_policies: list[str] = field(default_factory=list)
    never_ready_policies: list[str] = field(default_factory=list)
    unknown_status_policies: list[str] = field(default_factory=list)
    latency_ms: float = 0.0
    latency_jitter_ms: float = 0.0
    error_rate: float = 0.0
    non_json_rate: float = 0.0
    empty_body_rate: float = 0.0
    rate_limit_rate: float = 0.0
    rate_limit_burst: int = 1
    retry_after_seconds: float = 1.0
    retry_after_http_date: bool = False
    timeout_rate: float = 0.0
    hang_seconds: float = 5.0
    reset_rate: float = 0.0
    fault_after_effect_rate: float = 0.0
    fault_endpoints: list[str] = field(default_factory=lambda: list(ENDPOINTS))
    seed: int | None = None
    # Some real APIs ignore Idempotency-Key: then every replay is a new create or trigger, and
    # only the client's own care keeps a policy from being created (or fired) twice.
    ignore_idempotency_keys: bool = False
    scripted_faults: list[dict[str, Any]] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.api_key is not None and (not isinstance(self.api_key, str) or not self.api_key):
            raise ValueError("api_key must be a non-empty string or null")
        self.ready_after_polls = _as_int("ready_after_polls", self.ready_after_polls, minimum=0)
        self.rate_limit_burst = _as_int("rate_limit_burst", self.rate_limit_burst, minimum=1)
        for name in _NON_NEGATIVE_FLOAT_FIELDS:
            setattr(self, name, _as_float(name, getattr(self, name)))
        for name, _kind in _RATE_FIELDS:
            setattr(self, name, _as_float(name, getattr(self, name), maximum=1.0))
        self.fault_after_effect_rate = _as_float(
            "fault_after_effect_rate", self.fault_after_effect_rate, maximum=1.0
        )
        total = sum(getattr(self, name) for name, _kind in _RATE_FIELDS)
        if total > 1.0 + 1e-9:
            names = ", ".join(name for name, _kind in _RATE_FIELDS)
            raise ValueError(f"the fault rates ({names}) must sum to at most 1.0, got {total:g}")
        if self.ready_status not in SUCCESS_STATUSES:
            raise ValueError(f"ready_status must be one of {', '.join(SUCCESS_STATUSES)}")
        if not isinstance(self.retry_after_http_date, bool):
            raise ValueError("retry_after_http_date must be a boolean")
        seed = self.seed
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise ValueError(f"seed must be an integer or null, got {self.seed!r}")
        for name in _NAME_LIST_FIELDS:
            setattr(self, name, _as_str_list(name, getattr(self, name)))
        by_policy = self.ready_after_seconds_by_policy
        if not isinstance(by_policy, Mapping) or not all(isinstance(k, str) for k in by_policy):
            raise ValueError("ready_after_seconds_by_policy must map policy names to seconds")
        self.ready_after_seconds_by_policy = {
            key: _as_float(f"ready_after_seconds_by_policy[{key!r}]", value)
            for key, value in by_policy.items()
        }
        self.fault_endpoints = _as_str_list("fault_endpoints", self.fault_endpoints, ENDPOINTS)
        if not isinstance(self.scripted_faults, list | tuple):
            raise ValueError("scripted_faults must be a list")
        self.scripted_faults = [
            _normalise_scripted_fault(i, entry) for i, entry in enumerate(self.scripted_faults)
        ]

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SimulatorConfig:
        """Build a config from JSON-like data; unknown keys are an error (typos must not pass)."""
        if not isinstance(data, Mapping):
            raise ValueError(f"simulator config must be an object, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        for key in data:
            if key not in known:
                raise ValueError(f"unknown simulator config key: {key!r}")
        return cls(**dict(data))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)  # deep copy, JSON-serialisable


def is_loopback_host(host: str) -> bool:
    """True for ``localhost`` and loopback IP literals; the simulator never listens elsewhere."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


# --------------------------------------------------------------------------------------------
# Internal state
# --------------------------------------------------------------------------------------------


@dataclass
class _Policy:
    policy_id: str
    policy_name: str
    execution_id: str
    created_at: float  # wall clock, for reporting
    created_monotonic: float  # for ready_after_seconds, immune to clock changes
    status: str = "pending"
    polls: int = 0
    circuit_triggered: bool = False
    circuit_breaker_id: str | None = None
    ready_at: float | None = None  # wall clock: when the API first could report it ready
    circuit_at: float | None = None  # wall clock: when its circuit breaker was triggered

    def to_dict(self) -> dict[str, Any]:
        return {
            "ready_at": self.ready_at,
            "circuit_at": self.circuit_at,
            "policy_name": self.policy_name,
            "status": self.status,
            "polls": self.polls,
            "created_at": self.created_at,
            "circuit_triggered": self.circuit_triggered,
            "execution_id": self.execution_id,
            "circuit_breaker_id": self.circuit_breaker_id,
        }


_PER_POLICY_KEYS: tuple[str, ...] = (
    "create_requests",
    "policies_created",
    "status_requests",
    "circuit_requests",
    "circuits_triggered",
    "duplicate_circuit_triggers",
)


@dataclass
class _Counts:
    requests: dict[str, int] = field(default_factory=lambda: dict.fromkeys(ENDPOINTS, 0))
    faults: dict[str, int] = field(
        default_factory=lambda: dict.fromkeys((*FAULT_KINDS, "unauthorized"), 0)
    )
    replays: dict[str, int] = field(default_factory=lambda: dict.fromkeys(POST_ENDPOINTS, 0))
    policies_created: int = 0
    circuits_triggered: int = 0
    per_policy: dict[str, dict[str, int]] = field(default_factory=dict)

    def policy(self, name: str) -> dict[str, int]:
        if name not in self.per_policy:
            self.per_policy[name] = dict.fromkeys(_PER_POLICY_KEYS, 0)
        return self.per_policy[name]


@dataclass
class _IdempotencyRecord:
    canonical_body: str
    status: int
    body: bytes


@dataclass
class _Fault:
    kind: str
    after_effect: bool
    status: int  # drawn when the fault is chosen, so all randomness happens under the lock


@dataclass
class _Request:
    method: str
    target: str
    body: bytes
    authorization: str | None
    idempotency_key: str | None


@dataclass
class _Reply:
    status: int
    body: bytes = b""
    content_type: str | None = "application/json"
    headers: list[tuple[str, str]] = field(default_factory=list)
    hang_seconds: float = 0.0  # "timeout" fault: wait this long before answering
    reset: bool = False  # "reset" fault: abort the connection instead of answering


def _json_reply(status: int, payload: Any, headers: list[tuple[str, str]] | None = None) -> _Reply:
    return _Reply(status=status, body=json.dumps(payload).encode(), headers=list(headers or []))


def _field_error(name: str) -> _Reply:
    return _json_reply(
        400, {"error": f"field '{name}' is required and must be a non-empty string", "field": name}
    )


def _decode_json(body: bytes) -> tuple[bool, Any]:
    try:
        return True, json.loads(body)
    except ValueError:  # JSONDecodeError and UnicodeDecodeError are both ValueErrors
        return False, None


def _route(path: str) -> tuple[str, str | None] | None:
    """Map a URL path to (endpoint, policy_id) or None for an unknown path."""
    if path == "/createpolicy":
        return "createpolicy", None
    if path == "/circuit":
        return "circuit", None
    prefix = "/policy/"
    if path.startswith(prefix):
        policy_id = path[len(prefix) :]
        if policy_id and "/" not in policy_id:
            return "policy_status", unquote(policy_id)
    return None


def _format_retry_after(seconds: float, http_date: bool) -> str:
    if http_date:
        return email.utils.formatdate(time.time() + seconds, usegmt=True)
    # RFC 9110 wants whole seconds; fractional values are kept (e.g. "0.2") so fast tests can
    # use sub-second back-off, and integral values are sent in the standard form ("1").
    return str(int(seconds)) if float(seconds).is_integer() else f"{seconds:g}"


# --------------------------------------------------------------------------------------------
# HTTP plumbing
# --------------------------------------------------------------------------------------------


class _BadRequestBody(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class _SimulatorHTTPServer(LoopbackHTTPServer):
    request_queue_size = 1024

    def __init__(self, address: tuple[str, int], simulator: PolicyApiSimulator) -> None:
        self.simulator = simulator
        super().__init__(address, _RequestHandler)

    def quiet_disconnects(self) -> bool:
        # Only real bugs deserve a traceback on stderr, unless asked to be verbose.
        return not self.simulator.verbose


class _SimulatorHTTPServer6(_SimulatorHTTPServer):
    address_family = socket.AF_INET6


class _RequestHandler(ResettingHandler):
    server_version = "PolicyApiSimulator/1.0"
    server: _SimulatorHTTPServer

    def do_GET(self) -> None:
        self._serve()

    def do_POST(self) -> None:
        self._serve()

    def do_PUT(self) -> None:
        self._serve()

    def do_PATCH(self) -> None:
        self._serve()

    def do_DELETE(self) -> None:
        self._serve()

    def log_message(self, format: str, *args: Any) -> None:
        if self.server.simulator.verbose:
            super().log_message(format, *args)

    def _serve(self) -> None:
        try:
            body = self._read_body()
        except _BadRequestBody as exc:
            # The rest of the stream cannot be trusted, so do not keep the connection alive.
            self.close_connection = True
            self._write(_json_reply(exc.status, {"error": str(exc)}))
            return
        request = _Request(
            method=self.command,
            target=self.path,
            body=body,
            authorization=self.headers.get("Authorization"),
            idempotency_key=(self.headers.get("Idempotency-Key") or "").strip() or None,
        )
        try:
            reply = self.server.simulator._handle(request)
        except Exception as exc:  # a simulator bug must surface as a response, not a hang
            reply = _json_reply(500, {"error": f"internal simulator error: {exc!r}"})
        self._write(reply)

    def _read_body(self) -> bytes:
        if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
            return self._read_chunked()
        raw_length = self.headers.get("Content-Length")
        if raw_length is None:
            return b""
        try:
            length = int(raw_length)
        except ValueError:
            raise _BadRequestBody(400, "invalid Content-Length") from None
        if length < 0:
            raise _BadRequestBody(400, "invalid Content-Length")
        if length > MAX_BODY_BYTES:
            raise _BadRequestBody(413, "request body too large")
        return self.rfile.read(length)

    def _read_chunked(self) -> bytes:
        chunks: list[bytes] = []
        total = 0
        while True:
            line = self.rfile.readline(65537)
            try:
                size = int(line.split(b";", 1)[0].strip(), 16)
            except ValueError:
                raise _BadRequestBody(400, "invalid chunked encoding") from None
            if size == 0:
                while self.rfile.readline(65537) not in (b"\r\n", b"\n", b""):
                    pass  # discard trailers
                return b"".join(chunks)
            total += size
            if total > MAX_BODY_BYTES:
                raise _BadRequestBody(413, "request body too large")
            chunks.append(self.rfile.read(size))
            self.rfile.readline()  # CRLF after each chunk

    def _write(self, reply: _Reply) -> None:
        if reply.hang_seconds > 0:
            self.server.simulator._sleep(reply.hang_seconds)
        if reply.reset:
            self.reset_connection = True
            self.close_connection = True
            return
        try:
            self.send_response(reply.status)
            if reply.content_type is not None:
                self.send_header("Content-Type", reply.content_type)
            for name, value in reply.headers:
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(reply.body)))
            if self.close_connection:
                self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(reply.body)
        except OSError:
            # Typically the client gave up (timeout fault) or stop() closed the socket.
            self.close_connection = True


# --------------------------------------------------------------------------------------------
# The simulator
# --------------------------------------------------------------------------------------------


class PolicyApiSimulator:
    """A real HTTP server imitating the Policy API, with fault injection and exact counters."""

    def __init__(
        self,
        config: SimulatorConfig | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        verbose: bool = False,
    ) -> None:
        if not is_loopback_host(host):
            raise ValueError(f"the simulator only listens on loopback addresses, not {host!r}")
        if not 0 <= port <= 65535:
            raise ValueError(f"invalid port {port}")
        self._host = host.strip("[]")
        self._requested_port = port
        self.verbose = verbose
        # Private copy: scripted faults are consumed in place and the caller's object must not
        # change under its feet.
        self._config = SimulatorConfig.from_dict((config or SimulatorConfig()).to_dict())
        # One lock guards all mutable state below; request handling never sleeps while holding it.
        self._lock = threading.Lock()
        self._rng = random.Random(self._config.seed)
        self._counts = _Counts()
        self._policies: dict[str, _Policy] = {}
        self._circuit_ids: set[str] = set()
        self._idempotency: dict[tuple[str, str], _IdempotencyRecord] = {}
        self._burst_remaining = 0
        self._lifecycle_lock = threading.Lock()
        self._server: _SimulatorHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._stop_event = threading.Event()
        self._bound_port: int | None = None

    # ---- lifecycle -------------------------------------------------------------------------

    def start(self) -> PolicyApiSimulator:
        """Bind and serve in a background daemon thread (port 0 picks a free port)."""
        with self._lifecycle_lock:
            if self._server is not None:
                raise RuntimeError("simulator already started")
            self._stop_event = threading.Event()
            server_cls = _SimulatorHTTPServer6 if ":" in self._host else _SimulatorHTTPServer
            server = server_cls((self._host, self._requested_port), self)
            self._bound_port = server.server_port
            thread = threading.Thread(
                target=server.serve_forever,
                kwargs={"poll_interval": 0.05},  # keeps stop() fast
                name=f"policy-api-simulator-{self._bound_port}",
                daemon=True,
            )
            thread.start()
            self._server, self._thread = server, thread
        return self

    def stop(self) -> None:
        """Stop serving and release the port.  Safe to call more than once."""
        with self._lifecycle_lock:
            server, thread = self._server, self._thread
            self._server, self._thread = None, None
        if server is None:
            return
        self._stop_event.set()  # wakes handlers sleeping in latency / hang faults
        server.stop_serving()
        if thread is not None:
            thread.join(timeout=10)

    def __enter__(self) -> PolicyApiSimulator:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    @property
    def port(self) -> int:
        if self._bound_port is not None:
            return self._bound_port
        if self._requested_port:
            return self._requested_port
        raise RuntimeError("the simulator has not been started, so its ephemeral port is unknown")

    @property
    def base_url(self) -> str:
        host = f"[{self._host}]" if ":" in self._host else self._host
        return f"http://{host}:{self.port}"

    # ---- configuration and inspection ------------------------------------------------------

    @property
    def config(self) -> SimulatorConfig:
        """A copy of the live config (scripted_faults shows what is left to consume)."""
        with self._lock:
            return SimulatorConfig.from_dict(self._config.to_dict())

    def configure(self, **changes: Any) -> None:
        """Change config fields at runtime; validated like from_dict (ValueError, no change)."""
        with self._lock:
            merged = self._config.to_dict()
            merged.update(changes)
            self._config = SimulatorConfig.from_dict(merged)
            if "seed" in changes:
                self._rng = random.Random(self._config.seed)

    def counts(self) -> dict[str, Any]:
        with self._lock:
            return dataclasses.asdict(self._counts)  # deep copy

    def reset_counts(self) -> None:
        with self._lock:
            self._counts = _Counts()

    def reset(self) -> None:
        """Forget counts, policies, idempotency records and any rate-limit burst in progress."""
        with self._lock:
            self._counts = _Counts()
            self._policies.clear()
            self._circuit_ids.clear()
            self._idempotency.clear()
            self._burst_remaining = 0

    def policies(self) -> dict[str, dict[str, Any]]:
        with self._lock:
            return {pid: p.to_dict() for pid, p in self._policies.items()}

    # ---- request handling ------------------------------------------------------------------

    def _sleep(self, seconds: float) -> None:
        self._stop_event.wait(seconds)

    def _handle(self, request: _Request) -> _Reply:
        path = urlsplit(request.target).path
        if path == "/_sim" or path.startswith("/_sim/"):
            return self._handle_control(request.method, path, request.body)
        route = _route(path)
        if route is None:
            return _json_reply(404, {"error": f"no such endpoint: {path}"})
        endpoint, path_policy_id = route
        parsed = _decode_json(request.body) if endpoint in POST_ENDPOINTS else (False, None)

        # Every request on an API endpoint is counted first, whatever happens to it afterwards.
        with self._lock:
            self._count_request(endpoint, path_policy_id, parsed[1])

        expected_method = "GET" if endpoint == "policy_status" else "POST"
        if request.method != expected_method:
            return _json_reply(
                405,
                {"error": f"method {request.method} not allowed on {path}"},
                headers=[("Allow", expected_method)],
            )

        delay = self._draw_latency()
        if delay > 0:
            self._sleep(delay)

        if not self._authorized(request.authorization):
            with self._lock:
                self._counts.faults["unauthorized"] += 1
            return _json_reply(
                401,
                {"error": "missing or invalid API key"},
                headers=[("WWW-Authenticate", 'Bearer realm="policy-api"')],
            )

        fault = self._draw_fault(endpoint)
        if fault is not None and not fault.after_effect:
            return self._fault_reply(fault, real=None)
        with self._lock:
            real = self._apply(endpoint, path_policy_id, parsed, request.idempotency_key)
        if fault is not None:
            return self._fault_reply(fault, real=real)
        return real

    def _count_request(self, endpoint: str, path_policy_id: str | None, payload: Any) -> None:
        self._counts.requests[endpoint] += 1
        name = UNKNOWN_POLICY
        if endpoint == "createpolicy":
            candidate = payload.get("policy_name") if isinstance(payload, dict) else None
            if isinstance(candidate, str) and candidate:
                name = candidate
            self._counts.policy(name)["create_requests"] += 1
            return
        if endpoint == "policy_status":
            policy_id = path_policy_id
            key = "status_requests"
        else:
            policy_id = payload.get("policy_id") if isinstance(payload, dict) else None
            key = "circuit_requests"
        policy = self._policies.get(policy_id) if isinstance(policy_id, str) else None
        if policy is not None:
            name = policy.policy_name
        self._counts.policy(name)[key] += 1

    def _authorized(self, authorization: str | None) -> bool:
        api_key = self._config.api_key
        if api_key is None:
            return True
        scheme, _, token = (authorization or "").strip().partition(" ")
        if scheme.lower() != "bearer":
            return False
        return hmac.compare_digest(token.strip().encode(), api_key.encode())

    def _draw_latency(self) -> float:
        with self._lock:
            cfg = self._config
            delay_ms = cfg.latency_ms
            if cfg.latency_jitter_ms > 0:
                delay_ms += self._rng.uniform(0.0, cfg.latency_jitter_ms)
        return delay_ms / 1000.0

    def _draw_fault(self, endpoint: str) -> _Fault | None:
        """Decide (and count) the fault for this request: burst, then scripted, then random."""
        with self._lock:
            cfg = self._config
            if self._burst_remaining > 0:
                # Rate limiting is per client, not per endpoint: the burst hits whatever comes.
                self._burst_remaining -= 1
                return self._record_fault("429", after_effect=False)
            for entry in cfg.scripted_faults:
                if entry["endpoint"] == endpoint:
                    entry["times"] -= 1
                    if entry["times"] <= 0:
                        cfg.scripted_faults.remove(entry)
                    return self._record_fault(
                        entry["fault"], after_effect=entry["after_effect"], status=entry["status"]
                    )
            if endpoint not in cfg.fault_endpoints:
                return None
            rates = [(kind, getattr(cfg, name)) for name, kind in _RATE_FIELDS]
            if not any(rate > 0 for _kind, rate in rates):
                return None  # no draw, so the RNG stream (ids) does not depend on fault config
            point = self._rng.random()
            chosen: str | None = None
            for kind, rate in rates:
                if point < rate:
                    chosen = kind
                    break
                point -= rate
            if chosen is None:
                return None
            after_effect = (
                cfg.fault_after_effect_rate > 0 and self._rng.random() < cfg.fault_after_effect_rate
            )
            if chosen == "429":
                self._burst_remaining = cfg.rate_limit_burst - 1
            return self._record_fault(chosen, after_effect=after_effect)

    def _record_fault(self, kind: str, after_effect: bool, status: int | None = None) -> _Fault:
        # Caller holds the lock.
        self._counts.faults[kind] += 1
        if status is not None and kind in ("5xx", "non_json"):
            pass  # the scripted status
        elif kind == "5xx":
            status = self._rng.choice((500, 502, 503))
        elif kind == "non_json":
            status = self._rng.choice((200, 502))
        else:
            status = {"429": 429, "empty": 200, "timeout": 504, "reset": 0}[kind]
        return _Fault(kind=kind, after_effect=after_effect, status=status)

    def _fault_reply(self, fault: _Fault, real: _Reply | None) -> _Reply:
        """The response the client gets instead of ``real`` (None: the effect never happened)."""
        marker = [("X-Simulated-Fault", fault.kind)]
        cfg = self._config
        if fault.kind == "5xx":
            return _json_reply(
                fault.status, {"error": "simulated server error", "simulated_fault": "5xx"}, marker
            )
        if fault.kind == "429":
            retry_after = _format_retry_after(cfg.retry_after_seconds, cfg.retry_after_http_date)
            return _json_reply(
                429,
                {"error": "rate limited", "retry_after_seconds": cfg.retry_after_seconds},
                [("Retry-After", retry_after), *marker],
            )
        if fault.kind == "non_json":
            return _Reply(fault.status, _HTML_ERROR_PAGE, "text/html; charset=utf-8", marker)
        if fault.kind == "empty":
            return _Reply(200, b"", "application/json", marker)
        if fault.kind == "timeout":
            if real is None:
                reply = _json_reply(504, {"error": "simulated timeout"}, marker)
            else:
                # The work is done; the real answer just arrives after the client gave up.
                reply = dataclasses.replace(real, headers=[*real.headers, *marker])
            reply.hang_seconds = cfg.hang_seconds
            return reply
        return _Reply(0, reset=True)

    # ---- side effects (caller holds the lock) ----------------------------------------------

    def _apply(
        self,
        endpoint: str,
        path_policy_id: str | None,
        parsed: tuple[bool, Any],
        idempotency_key: str | None,
    ) -> _Reply:
        if endpoint == "policy_status":
            assert path_policy_id is not None
            return self._poll(path_policy_id)
        ok, payload = parsed
        if not ok or not isinstance(payload, dict):
            return _json_reply(400, {"error": "request body must be a JSON object"})
        canonical = json.dumps(payload, sort_keys=True)
        record_key = (
            (endpoint, idempotency_key)
            if idempotency_key is not None and not self._config.ignore_idempotency_keys
            else None
        )
        if record_key is not None:
            record = self._idempotency.get(record_key)
            if record is not None:
                if record.canonical_body != canonical:
                    return _json_reply(
                        422, {"error": "Idempotency-Key reused with a different request body"}
                    )
                self._counts.replays[endpoint] += 1
                return _Reply(record.status, record.body, headers=[("Idempotent-Replayed", "true")])
        reply = self._create(payload) if endpoint == "createpolicy" else self._trigger(payload)
        # Only successes are remembered: a rejected request may be fixed and retried with the key.
        if record_key is not None and 200 <= reply.status < 300:
            self._idempotency[record_key] = _IdempotencyRecord(canonical, reply.status, reply.body)
        return reply

    def _new_hex_id(self, prefix: str, taken: Container[str]) -> str:
        while True:  # re-seeding can replay an id sequence, so collisions are checked
            if self._config.seed is None:
                suffix = uuid.uuid4().hex[:16]
            else:
                suffix = f"{self._rng.getrandbits(64):016x}"
            candidate = prefix + suffix
            if candidate not in taken:
                return candidate

    def _new_uuid(self) -> str:
        if self._config.seed is None:
            return str(uuid.uuid4())
        return str(uuid.UUID(int=self._rng.getrandbits(128), version=4))

    def _create(self, payload: dict[str, Any]) -> _Reply:
        name = payload.get("policy_name")
        if not isinstance(name, str) or not name.strip():
            return _field_error("policy_name")
        execution_id = payload.get("execution_id")
        if execution_id is None:
            execution_id = self._new_uuid()
        elif not isinstance(execution_id, str) or not execution_id:
            return _field_error("execution_id")
        policy_id = self._new_hex_id("pol_", self._policies)
        self._policies[policy_id] = _Policy(
            policy_id=policy_id,
            policy_name=name,
            execution_id=execution_id,
            created_at=time.time(),
            created_monotonic=time.monotonic(),
        )
        self._counts.policies_created += 1
        self._counts.policy(name)["policies_created"] += 1
        return _json_reply(
            200,
            {
                "policy_id": policy_id,
                "execution_id": execution_id,
                "status": "pending",
                "policy_name": name,
            },
        )

    def _poll(self, policy_id: str) -> _Reply:
        policy = self._policies.get(policy_id)
        if policy is None:
            return _json_reply(404, {"error": "policy not found", "policy_id": policy_id})
        policy.polls += 1
        # Terminal states are sticky, so a later configure() cannot un-ready a policy.
        if policy.status not in TERMINAL_STATUSES:
            policy.status = self._current_status(policy)
        return _json_reply(
            200, {"policy_id": policy_id, "status": policy.status, "polls": policy.polls}
        )

    def _current_status(self, policy: _Policy) -> str:
        cfg = self._config
        name = policy.policy_name
        if name in cfg.unknown_status_policies:
            return UNKNOWN_STATUS
        if name in cfg.never_ready_policies:
            return "pending"
        elapsed = time.monotonic() - policy.created_monotonic
        needed = cfg.ready_after_seconds_by_policy.get(name, cfg.ready_after_seconds)
        if policy.polls > cfg.ready_after_polls and elapsed >= needed:
            if policy.ready_at is None:  # the earliest moment a poll could have said so
                polls_gated = 0 < cfg.ready_after_polls == policy.polls - 1
                late = 0.0 if polls_gated else elapsed - needed
                policy.ready_at = time.time() - late
            return "failed" if name in cfg.fail_policies else cfg.ready_status
        return "pending"

    def _trigger(self, payload: dict[str, Any]) -> _Reply:
        for name in ("policy_id", "execution_id", "trigger_reason"):
            value = payload.get(name)
            if not isinstance(value, str) or not value:
                return _field_error(name)
        policy_id: str = payload["policy_id"]
        execution_id: str = payload["execution_id"]
        policy = self._policies.get(policy_id)
        if policy is None:
            return _json_reply(404, {"error": "policy not found", "policy_id": policy_id})
        if policy.status not in SUCCESS_STATUSES:
            return _json_reply(
                409, {"error": "policy not ready", "policy_id": policy_id, "status": policy.status}
            )
        stats = self._counts.policy(policy.policy_name)
        response: dict[str, Any] = {
            "circuit_breaker_id": policy.circuit_breaker_id,
            "policy_id": policy_id,
            "execution_id": execution_id,
            "status": "triggered",
        }
        if policy.circuit_triggered:
            # A client that retried without reusing its idempotency key lands here.
            stats["duplicate_circuit_triggers"] += 1
            response["already_triggered"] = True
            return _json_reply(200, response)
        circuit_breaker_id = self._new_hex_id("cb_", self._circuit_ids)
        self._circuit_ids.add(circuit_breaker_id)
        policy.circuit_triggered = True
        policy.circuit_at = time.time()
        policy.circuit_breaker_id = circuit_breaker_id
        response["circuit_breaker_id"] = circuit_breaker_id
        self._counts.circuits_triggered += 1
        stats["circuits_triggered"] += 1
        return _json_reply(200, response)

    # ---- control endpoints -----------------------------------------------------------------

    def _handle_control(self, method: str, path: str, body: bytes) -> _Reply:
        routes: dict[str, dict[str, Callable[[], _Reply]]] = {
            "/_sim/health": {"GET": lambda: _json_reply(200, {"ok": True})},
            "/_sim/counts": {"GET": lambda: _json_reply(200, self.counts())},
            "/_sim/policies": {"GET": lambda: _json_reply(200, self.policies())},
            "/_sim/reset": {"POST": self._control_reset},
            "/_sim/config": {
                "GET": lambda: _json_reply(200, self.config.to_dict()),
                "POST": lambda: self._control_config(body),
            },
        }
        methods = routes.get(path.rstrip("/"))
        if methods is None:
            return _json_reply(404, {"error": f"no such control endpoint: {path}"})
        handler = methods.get(method)
        if handler is None:
            return _json_reply(
                405, {"error": f"method {method} not allowed"}, [("Allow", ", ".join(methods))]
            )
        return handler()

    def _control_reset(self) -> _Reply:
        self.reset()
        return _json_reply(200, {"ok": True})

    def _control_config(self, body: bytes) -> _Reply:
        ok, changes = _decode_json(body) if body else (True, {})
        if not ok or not isinstance(changes, dict):
            return _json_reply(400, {"error": "config changes must be a JSON object"})
        try:
            self.configure(**changes)
        except ValueError as exc:
            return _json_reply(400, {"error": str(exc)})
        return _json_reply(200, self.config.to_dict())


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------


def _comma_list(value: str) -> list[str]:
    return [item.strip() for item in value.split(",") if item.strip()]


# Config fields that have a same-named CLI flag (argparse dest == field name).
_CLI_FIELDS: tuple[str, ...] = (
    "ready_after_polls",
    "ready_after_seconds",
    "ready_status",
    "latency_ms",
    "latency_jitter_ms",
    "error_rate",
    "non_json_rate",
    "empty_body_rate",
    "rate_limit_rate",
    "rate_limit_burst",
    "retry_after_seconds",
    "timeout_rate",
    "hang_seconds",
    "reset_rate",
    "fault_after_effect_rate",
    "fail_policies",
    "never_ready_policies",
    "unknown_status_policies",
    "seed",
)


def _build_arg_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m policy_devtools.simulator",
        description=(
            "Serve a local Policy API simulator. Prints one line "
            f"'{LISTENING_PREFIX} <base_url>' when ready; stops on SIGTERM/SIGINT. "
            f"Pass the API key through ${API_KEY_ENV_VAR} rather than --api-key."
        ),
    )
    parser.add_argument("--host", default="127.0.0.1", help="loopback address only")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port (default)")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--config-json", help="SimulatorConfig fields as a JSON object")
    source.add_argument("--config-file", help="path to a JSON file with SimulatorConfig fields")
    parser.add_argument(
        "--api-key", help=f"require this bearer token (prefer ${API_KEY_ENV_VAR}: not in ps output)"
    )
    parser.add_argument("--ready-after-polls", type=int)
    parser.add_argument("--ready-after-seconds", type=float)
    parser.add_argument("--ready-status", choices=SUCCESS_STATUSES)
    parser.add_argument("--latency-ms", type=float)
    parser.add_argument("--latency-jitter-ms", type=float)
    parser.add_argument("--error-rate", type=float)
    parser.add_argument("--non-json-rate", type=float)
    parser.add_argument("--empty-body-rate", type=float)
    parser.add_argument("--rate-limit-rate", type=float)
    parser.add_argument("--rate-limit-burst", type=int)
    parser.add_argument("--retry-after-seconds", type=float)
    parser.add_argument("--retry-after-http-date", action="store_true", default=None)
    parser.add_argument("--timeout-rate", type=float)
    parser.add_argument("--hang-seconds", type=float)
    parser.add_argument("--reset-rate", type=float)
    parser.add_argument("--fault-after-effect-rate", type=float)
    parser.add_argument("--fail-policies", type=_comma_list, metavar="A,B")
    parser.add_argument("--never-ready-policies", type=_comma_list, metavar="A,B")
    parser.add_argument("--unknown-status-policies", type=_comma_list, metavar="A,B")
    parser.add_argument("--seed", type=int)
    parser.add_argument("--verbose", action="store_true", help="log each request to stderr")
    return parser


def _config_from_args(args: argparse.Namespace) -> SimulatorConfig:
    """Base config from --config-json/--config-file, then explicit flags, then the API key."""
    data: dict[str, Any] = {}
    if args.config_json is not None:
        loaded = json.loads(args.config_json)
    elif args.config_file is not None:
        with open(args.config_file, encoding="utf-8") as handle:
            loaded = json.load(handle)
    else:
        loaded = {}
    if not isinstance(loaded, dict):
        raise ValueError("the simulator config must be a JSON object")
    data.update(loaded)
    for name in _CLI_FIELDS:
        value = getattr(args, name)
        if value is not None:
            data[name] = value
    if args.retry_after_http_date:
        data["retry_after_http_date"] = True
    api_key = args.api_key or os.environ.get(API_KEY_ENV_VAR, "").strip() or None
    if api_key is not None:
        data["api_key"] = api_key
    return SimulatorConfig.from_dict(data)


def main(argv: Sequence[str] | None = None) -> int:
    parser = _build_arg_parser()
    args = parser.parse_args(argv)
    if not is_loopback_host(args.host):
        print(f"error: refusing to listen on non-loopback host {args.host!r}", file=sys.stderr)
        return 2
    try:
        config = _config_from_args(args)
        simulator = PolicyApiSimulator(config, host=args.host, port=args.port, verbose=args.verbose)
    except (OSError, ValueError) as exc:  # bad JSON, unreadable file, invalid field
        print(f"error: invalid simulator configuration: {exc}", file=sys.stderr)
        return 2

    stop_requested = threading.Event()

    def _on_signal(signum: int, frame: FrameType | None) -> None:
        stop_requested.set()

    # Handlers go in before the port is announced, so a parent may SIGTERM right after reading it.
    previous = {sig: signal.signal(sig, _on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        try:
            simulator.start()
        except OSError as exc:
            print(f"error: cannot listen on {args.host}:{args.port}: {exc}", file=sys.stderr)
            return 1
        print(f"{LISTENING_PREFIX} {simulator.base_url}", flush=True)
        while not stop_requested.wait(0.5):
            pass
    finally:
        simulator.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0


if __name__ == "__main__":
    sys.exit(main())
