"""A webhook receiver on loopback for the notification tests: it records each POST and answers as told."""

from __future__ import annotations

import http.server
import json
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from email.message import Message


class Receiver(http.server.BaseHTTPRequestHandler):
    """Records each POST (path, headers, JSON body); answers `statuses` in turn, then 200."""

    received: list[tuple[str, Message, dict]] = []
    statuses: list[int] = []

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        Receiver.received.append((self.path, self.headers, body))
        self.send_response(Receiver.statuses.pop(0) if Receiver.statuses else 200)
        self.end_headers()
        self.wfile.write(b"ok")

    def log_message(self, *args):
        pass


@contextmanager
def receiving() -> Iterator[int]:
    """A receiver listening on a loopback port (yielded) for the block, its records and answers reset."""
    Receiver.received, Receiver.statuses = [], []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Receiver)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield server.server_port
    finally:
        server.shutdown()
        server.server_close()


def closed_port() -> int:
    """A loopback port nothing listens on."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]
