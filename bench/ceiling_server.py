#!/usr/bin/env python3
"""The ceiling for any server built on http.server: a minimal keep-alive handler with a fixed 33-byte body.

Given the same advantages as box_update_server.py (TCP_NODELAY, headers and body in one send), so the
ratio against it measures only the work our handler adds.  Usage: python3 bench/ceiling_server.py PORT
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


if __name__ == "__main__":
    server = http.server.ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), CeilingHandler)
    server.daemon_threads = True
    server.serve_forever()
