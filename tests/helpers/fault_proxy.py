"""A fault-injecting HTTP proxy in front of a test S3 server, on 127.0.0.1.

    with FaultProxy(server.endpoint_url, rate=0.2, seed=1) as proxy:
        ...point AWS_ENDPOINT_URL at proxy.endpoint_url...
    proxy.counts  # Counter: requests, forwarded, and each fault injected

On a seeded fraction `rate` of requests it injects one of `kinds`:
- "reset": the connection is reset (RST) after the request was read, no response;
- "stall": the request waits `stall_s`, then is forwarded or (half the time) dropped;
- "500" / "503": an S3-style XML error response (InternalError / SlowDown).
Requests whose path matches `always_fail` (a regex) always get a 500: a stored object
that stays unreadable. Requests are forwarded byte for byte, the Host header included,
so SigV4 signatures made for the proxy's address still verify upstream.
"""
from __future__ import annotations

import http.client
import random
import re
import socket
import struct
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

import pytest

KINDS = ("reset", "stall", "500", "503")
_ERRORS = {500: ("InternalError", "We encountered an internal error. Please try again."),
           503: ("SlowDown", "Please reduce your request rate.")}
_HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding"}


class FaultProxy:
    def __init__(self, upstream_url: str, *, rate: float = 0.0, seed: int = 0,
                 kinds=KINDS, stall_s: float = 1.0, always_fail: str | None = None):
        upstream = urlsplit(upstream_url)
        self.upstream = (upstream.hostname, upstream.port)
        self.rate, self.kinds, self.stall_s = rate, tuple(kinds), stall_s
        self.always_fail = re.compile(always_fail) if always_fail else None
        self.counts = Counter()
        self._rng, self._lock = random.Random(seed), threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self._server.daemon_threads = True
        self._server.proxy = self
        self.endpoint_url = f"http://127.0.0.1:{self._server.server_address[1]}"

    def __enter__(self) -> FaultProxy:
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()

    @property
    def faults(self) -> int:
        return sum(n for kind, n in self.counts.items() if kind not in ("requests", "forwarded"))

    def decide(self, path: str) -> tuple[str | None, bool]:
        """(fault to inject or None, whether a stalled request is then dropped); counted."""
        with self._lock:
            self.counts["requests"] += 1
            if self.always_fail and self.always_fail.search(path):
                fault = "always_fail"
            elif self._rng.random() < self.rate:
                fault = self._rng.choice(self.kinds)
            else:
                fault = None
            drop = fault == "stall" and self._rng.random() < 0.5
            self.counts[fault or "forwarded"] += 1
            return fault, drop


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as S3 clients expect

    def log_message(self, *args) -> None:  # quiet: pytest shows failures, not traffic
        pass

    def _handle(self) -> None:
        body = self._read_body()
        fault, drop = self.server.proxy.decide(self.path)
        if fault == "reset":
            self._reset()
        elif fault == "stall":
            time.sleep(self.server.proxy.stall_s)
            if drop:
                self._reset()
            else:
                self._forward(body)
        elif fault in ("500", "503", "always_fail"):
            self._s3_error(503 if fault == "503" else 500)
        else:
            self._forward(body)

    do_GET = do_HEAD = do_PUT = do_POST = do_DELETE = _handle

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            return self._read_chunked()
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _read_chunked(self) -> bytes:
        """The raw chunked body, framing kept: it is forwarded as it came."""
        raw = b""
        while True:
            size_line = self.rfile.readline()
            raw += size_line
            size = int(size_line.split(b";")[0], 16)
            if size == 0:
                while (line := self.rfile.readline()) not in (b"\r\n", b""):
                    raw += line  # trailers
                return raw + b"\r\n"
            raw += self.rfile.read(size + 2)

    def _reset(self) -> None:
        """Close with RST (linger 0): the client sees 'connection reset by peer'."""
        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.connection.close()
        self.close_connection = True

    def _s3_error(self, status: int) -> None:
        code, message = _ERRORS[status]
        body = (f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code>'
                f"<Message>{message}</Message><Resource>{self.path}</Resource>"
                "<RequestId>fault-proxy</RequestId></Error>").encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/xml")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _forward(self, body: bytes) -> None:
        upstream = http.client.HTTPConnection(*self.server.proxy.upstream, timeout=60)
        try:
            upstream.putrequest(self.command, self.path, skip_host=True,
                                skip_accept_encoding=True)
            for name, value in self.headers.items():
                upstream.putheader(name, value)
            upstream.endheaders(body)
            response = upstream.getresponse()
            data = response.read()
            self.send_response_only(response.status, response.reason)
            for name, value in response.getheaders():
                if name.lower() not in _HOP_BY_HOP and not (
                        name.lower() == "content-length" and response.chunked):
                    self.send_header(name, value)
            if response.chunked:  # re-framed: the whole body is here now
                self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        finally:
            upstream.close()


@pytest.fixture
def fault_proxy():
    """A factory: fault_proxy(server, rate=..., ...) -> a started FaultProxy in front of
    an S3Server (moto_s3 or seaweed_s3), stopped after the test."""
    started = []

    def start(server, **options) -> FaultProxy:
        started.append(FaultProxy(server.endpoint_url, **options).__enter__())
        return started[-1]

    yield start
    for proxy in started:
        proxy.__exit__(None, None, None)
