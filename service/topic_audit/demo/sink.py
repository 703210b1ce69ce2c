"""``topic-audit sink``: a stand-in for the app's own callback handler, to see forwarding work.

It prints one line per callback it gets (the command, ``X-Topic-Audit-Id``/``-Attempt``, and whether
the re-computed ``Sign`` is valid when it knows the token) and answers as Tencent expects: OK/0, or
ErrorCode 1 to Before-callbacks with ``--veto``. ``make run`` forwards to it.
"""

from __future__ import annotations

import hmac
import json
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TextIO

from topic_audit.tencent import checks, models


def handler_for(token: str | None, veto: bool, out: TextIO) -> type[BaseHTTPRequestHandler]:
    lock = threading.Lock()

    class Sink(BaseHTTPRequestHandler):
        server_version = "topic-audit-sink"
        protocol_version = "HTTP/1.1"  # keep-alive: the forwarder reuses its connections
        disable_nagle_algorithm = True  # headers and body are two writes: no delayed-ACK wait between
        sys_version = ""

        def do_POST(self) -> None:
            length = int(self.headers.get("content-length") or 0)
            body = self.rfile.read(length)
            _, _, query_string = self.path.partition("?")
            query = checks.parse_query(query_string)
            command = query.get("CallbackCommand", "?")
            signed = "unsigned"
            if token is not None:
                expected = checks.sign(token, query.get("RequestTime", ""))
                signed = (
                    "Sign valid" if hmac.compare_digest(expected, query.get("Sign", "")) else "Sign INVALID"
                )
            before = ".CallbackBefore" in command
            answer = (
                models.encode_answer("OK", "vetoed by topic-audit sink", 1)
                if before and veto
                else models.OK_BODY
            )
            with lock:
                print(
                    f"sink: {command} id={self.headers.get('x-topic-audit-id', '-')} "
                    f"attempt={self.headers.get('x-topic-audit-attempt', '-')} {signed} {len(body)} bytes "
                    f"-> {json.loads(answer)['ErrorCode']}",
                    file=out,
                    flush=True,
                )
            self.send_response(200)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(answer)))
            self.end_headers()
            self.wfile.write(answer)

        def log_message(self, format: str, *args: object) -> None:
            pass  # one line per callback is printed above

    return Sink


def serve(host: str, port: int, token: str | None, veto: bool, out: TextIO = sys.stdout) -> None:
    """Serve until interrupted; says where on stderr once it listens (the port it got, for port 0)."""
    with ThreadingHTTPServer((host, port), handler_for(token, veto, out)) as server:
        url = f"http://{host}:{server.server_address[1]}"
        print(
            f"sink on {url}/ (forward with TOPIC_AUDIT_FORWARD_URL={url}/callback)",
            file=sys.stderr,
            flush=True,
        )
        server.serve_forever()
