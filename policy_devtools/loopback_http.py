"""The HTTP server plumbing the Policy API simulator and the tests' hostile API share: a
threaded server on a loopback port that knows its open connections (to cut them at stop), and
a keep-alive handler that can end a connection with a TCP reset."""

from __future__ import annotations

import contextlib
import socket
import socketserver
import struct
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


class LoopbackHTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    # stop() must not wait for handler threads parked in a simulated hang, a drip or an idle
    # keep-alive.
    block_on_close = False
    # The default backlog (5) drops SYNs when a client opens many connections at once, and the
    # client's SYN retransmit then costs a whole second.
    request_queue_size = 128
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], handler: type[BaseHTTPRequestHandler]) -> None:
        self._connections: set[socket.socket] = set()
        self._connections_lock = threading.Lock()
        super().__init__(address, handler)

    def server_bind(self) -> None:
        # HTTPServer.server_bind does a reverse DNS lookup (socket.getfqdn) that can stall for
        # seconds on machines without network; the loopback address needs no name.
        socketserver.TCPServer.server_bind(self)
        host, port = self.socket.getsockname()[:2]
        self.server_name = str(host)
        self.server_port = int(port)

    def quiet_disconnects(self) -> bool:
        """Whether clients that time out or drop connections go unreported (routine here)."""
        return True

    def handle_error(self, request: Any, client_address: Any) -> None:
        if isinstance(sys.exc_info()[1], OSError) and self.quiet_disconnects():
            return
        super().handle_error(request, client_address)

    def track(self, conn: socket.socket) -> None:
        with self._connections_lock:
            self._connections.add(conn)

    def untrack(self, conn: socket.socket) -> None:
        with self._connections_lock:
            self._connections.discard(conn)

    def stop_serving(self) -> None:
        """Stop accepting, cut the connections still open, and close the listening socket."""
        self.shutdown()
        self.close_connections()
        self.server_close()

    def close_connections(self) -> None:
        # Without this, keep-alive connections opened before a stop would still be served by
        # their handler threads after the server was "stopped".
        with self._connections_lock:
            conns = list(self._connections)
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)


class ResettingHandler(BaseHTTPRequestHandler):
    # HTTP/1.1 keep-alive, so client connection pools behave as against a real API.
    protocol_version = "HTTP/1.1"
    timeout = 60  # idle keep-alive connections are dropped eventually
    # Headers and body go out in separate writes; with Nagle on, the body waits for the
    # client's delayed ACK (~40 ms per request), and a dripped byte would not leave at once.
    disable_nagle_algorithm = True
    server: LoopbackHTTPServer
    # Set by a handler to end its connection with a TCP reset instead of a clean close.
    reset_connection = False

    def setup(self) -> None:
        super().setup()
        self.server.track(self.connection)

    def finish(self) -> None:
        self.server.untrack(self.connection)
        if self.reset_connection:
            # SO_LINGER(on, 0) makes close() send a TCP RST instead of a FIN: the client sees
            # "connection reset" rather than a clean EOF.
            with contextlib.suppress(OSError):
                self.connection.setsockopt(
                    socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
                )
        with contextlib.suppress(OSError):
            super().finish()
        if self.reset_connection:
            # Close now (the makefile wrappers are closed, so this really closes the fd); the
            # server's later shutdown()/close() on it are harmless no-ops.
            self.connection.close()
