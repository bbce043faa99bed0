"""A flaky HTTP proxy in front of an S3 server: it answers 503 to chosen GET requests (by a
fragment of their path, a number of times or always), holds chosen GET requests back for a
while (a slow bucket), and forwards everything else."""

from __future__ import annotations

import http.client
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit


class FlakyProxy:
    def __init__(self, upstream: str):
        self.upstream = urlsplit(upstream)
        self.failures: dict[str, int] = {}  # path fragment -> failures left (-1: always)
        self.failed: list[str] = []
        self.delays: dict[str, float] = {}  # path fragment -> seconds each matching GET waits
        self.lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):
                pass

            def _should_fail(self):
                with proxy.lock:
                    for fragment, left in proxy.failures.items():
                        if fragment in self.path and self.command == "GET" and left != 0:
                            proxy.failures[fragment] = left - 1 if left > 0 else -1
                            proxy.failed.append(self.path)
                            return True
                return False

            def _body(self) -> bytes | None:
                if self.headers.get("transfer-encoding", "").lower() == "chunked":
                    chunks = []
                    while size := int(self.rfile.readline().split(b";")[0].strip() or b"0", 16):
                        chunks.append(self.rfile.read(size))
                        self.rfile.readline()
                    self.rfile.readline()  # the blank line after the last chunk
                    return b"".join(chunks)
                length = int(self.headers.get("content-length") or 0)
                return self.rfile.read(length) if length else None

            def _forward(self):
                body = self._body()
                if self.command == "GET":
                    time.sleep(sum(s for fragment, s in proxy.delays.items() if fragment in self.path))
                if self._should_fail():
                    data = b"<Error><Code>ServiceUnavailable</Code><Message>flaky</Message></Error>"
                    self.send_response(503)
                    self.send_header("content-length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                    return
                conn = http.client.HTTPConnection(proxy.upstream.hostname, proxy.upstream.port, timeout=60)
                headers = {k: v for k, v in self.headers.items() if k.lower() != "transfer-encoding"}
                if body is not None:
                    headers["Content-Length"] = str(len(body))
                conn.request(self.command, self.path, body=body, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                self.send_response(resp.status)
                for k, v in resp.getheaders():  # a HEAD answer's content-length is the object's size
                    if k.lower() not in ("transfer-encoding", "connection") and (
                        k.lower() != "content-length" or self.command == "HEAD"
                    ):
                        self.send_header(k, v)
                if self.command != "HEAD":
                    self.send_header("content-length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)
                conn.close()

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _forward

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
