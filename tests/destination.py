"""A real HTTP server on loopback standing in for the app's own callback handler, whose behaviour a test
changes while it runs: ``ok``, ``veto``, ``fail`` (500), ``hang``, ``flap`` (500 then 200, alternately),
``redirect`` (302), ``garbage`` (200 with a body that is not JSON), ``slow`` (answers after ``delay``)."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qsl

VETO = b'{"ActionStatus": "OK",  "ErrorInfo": "not in this group", "ErrorCode": 1}'
"""A veto spaced unlike our own encoder: relayed byte for byte or not at all."""
OK = b'{"ActionStatus":"OK","ErrorInfo":"","ErrorCode":0}'


@dataclass(frozen=True)
class Received:
    at: float
    path: str
    query_string: str
    headers: dict[str, str]
    body: bytes

    @property
    def query(self) -> dict[str, str]:
        return dict(parse_qsl(self.query_string, keep_blank_values=True))

    @property
    def audit_id(self) -> int | None:
        value = self.headers.get("x-topic-audit-id")
        return int(value) if value else None


class Destination:
    def __init__(self, mode: str = "ok", delay: float = 0.05) -> None:
        self.mode, self.delay = mode, delay
        self.received: list[Received] = []
        self._lock = threading.Lock()
        self._released = threading.Event()
        self._flap = 0
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/im/callback"

    def ids(self) -> set[int]:
        with self._lock:
            return {r.audit_id for r in self.received if r.audit_id is not None}

    def stop(self) -> None:
        self._released.set()
        self.server.shutdown()
        self.server.server_close()

    def _answer(self) -> tuple[int, bytes, dict[str, str]]:
        mode = self.mode
        if mode == "flap":
            with self._lock:
                self._flap += 1
                mode = "fail" if self._flap % 2 else "ok"
        if mode == "hang":
            self._released.wait(60)
            return 200, OK, {}
        if mode == "slow":
            time.sleep(self.delay)
        if mode == "fail":
            return 500, b"internal error", {}
        if mode == "redirect":
            return 302, b"", {"location": "http://127.0.0.1:9/elsewhere"}
        if mode == "garbage":
            return 200, b"<html>not json</html>", {}
        if mode == "veto":
            return 200, VETO, {}
        return 200, OK, {}

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        destination = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True  # headers and body go out in two writes: no 40 ms wait between

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length") or 0))
                path, _, query = self.path.partition("?")
                with destination._lock:
                    destination.received.append(
                        Received(
                            time.time(), path, query, {k.lower(): v for k, v in self.headers.items()}, body
                        )
                    )
                status, answer, headers = destination._answer()
                try:
                    self.send_response(status)
                    for name, value in {"content-type": "application/json", **headers}.items():
                        self.send_header(name, value)
                    self.send_header("content-length", str(len(answer)))
                    self.end_headers()
                    self.wfile.write(answer)
                except OSError:
                    pass  # the forwarder gave up waiting

            def log_message(self, format: str, *args: object) -> None:
                pass

        return Handler
