"""A TCP relay: ``python -m policy_pipeline_tests.harness.relay LISTEN_HOST LISTEN_PORT
TARGET_PORT`` accepts connections on LISTEN_HOST:LISTEN_PORT and pipes each to
127.0.0.1:TARGET_PORT of the same network namespace.

The Policy API simulator only ever listens on loopback; in the services host of
`policy_pipeline_tests.harness.hosts` this relay gives it the address the other test hosts reach
it on. It only ever connects to loopback. It stops on SIGTERM (or when its host is killed).
"""

from __future__ import annotations

import contextlib
import signal
import socket
import sys
import threading

BUFFER = 65536
TARGET_HOST = "127.0.0.1"


def _pipe(source: socket.socket, sink: socket.socket) -> None:
    try:
        while chunk := source.recv(BUFFER):
            sink.sendall(chunk)
    except OSError:
        pass
    finally:
        # The other direction may still be sending: close this one's write side only.
        for sock, how in ((sink, socket.SHUT_WR), (source, socket.SHUT_RD)):
            with contextlib.suppress(OSError):
                sock.shutdown(how)


def _serve_one(client: socket.socket, target_port: int) -> None:
    try:
        upstream = socket.create_connection((TARGET_HOST, target_port), timeout=10)
    except OSError:
        client.close()
        return
    upstream.settimeout(None)
    back = threading.Thread(target=_pipe, args=(upstream, client), daemon=True)
    back.start()
    _pipe(client, upstream)
    back.join()
    client.close()
    upstream.close()


def main(argv: list[str]) -> int:
    listen_host, listen_port, target_port = argv[0], int(argv[1]), int(argv[2])
    server = socket.create_server((listen_host, listen_port), backlog=256)
    signal.signal(signal.SIGTERM, lambda *_: server.close())
    print(f"RELAY_LISTENING {listen_host}:{listen_port}", flush=True)
    while True:
        try:
            client, _ = server.accept()
        except OSError:
            return 0  # closed by SIGTERM
        client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        threading.Thread(target=_serve_one, args=(client, target_port), daemon=True).start()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
