#!/usr/bin/env python3
"""The ceiling for any server built on http.server: a minimal keep-alive handler with a fixed 33-byte body.

Given the same advantages as box_update_server.py (TCP_NODELAY, headers and body in one send, a listen
backlog of 1024, daemon threads), so the ratio against it measures only the work our handler adds.  It keeps
http.server's own log line per request, written to stderr: the bench sends that to a file, as it sends our
access log.  A client that goes away ends its connection quietly (no traceback).

    python3 bench/ceiling_server.py PORT
"""

import http.server
import sys

BODY = b"Fixed 33-byte body for the bench\n"
assert len(BODY) == 33


class CeilingHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True
    wbufsize = 1 << 16

    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(BODY)))
        self.end_headers()
        self.wfile.write(BODY)


class QuietServer(http.server.ThreadingHTTPServer):
    """ThreadingHTTPServer with our server's backlog, silent when a client resets or closes mid-answer."""

    daemon_threads = True
    request_queue_size = 1024

    def handle_error(self, request, client_address):
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


if __name__ == "__main__":
    QuietServer(("127.0.0.1", int(sys.argv[1])), CeilingHandler).serve_forever()
