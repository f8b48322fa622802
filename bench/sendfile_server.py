#!/usr/bin/env python3
"""The ceiling for file downloads on http.server: a minimal keep-alive handler that only sendfile()s one file.

Every GET answers 200 with the whole of FILE, opened once at start: headers, then the bytes by sendfile(2)
straight from the page cache, under TCP_CORK as box_update_server.py streams its downloads.  It has the same
advantages as that server (HTTP/1.1 keep-alive, TCP_NODELAY, a 64 KiB write buffer so the headers leave in
one send, a listen backlog of 1024) and does none of its work (no routing, no open, fstat or identity check
per request, no Range or preconditions, no metrics), so the ratio against it measures what our download path
adds.  Like the ceiling stub it keeps http.server's own log line per request, written to stderr (the bench
sends it to a file).  A client that goes away mid-download ends its connection quietly (no traceback).

    python3 bench/sendfile_server.py PORT FILE
"""

import http.server
import os
import socket
import sys

from ceiling_server import QuietServer


class SendfileHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True
    wbufsize = 1 << 16
    descriptor = -1      # the file, opened once: sendfile with an explicit offset leaves its position alone
    size = 0

    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(self.size))
        self.end_headers()
        connection = self.connection
        connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_CORK, 1)   # full segments, as nginx's tcp_nopush
        self.wfile.flush()
        offset = 0
        while offset < self.size:
            sent = os.sendfile(connection.fileno(), self.descriptor, offset, self.size - offset)
            if not sent:
                raise ConnectionAbortedError("the file shrank")
            offset += sent
        connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_CORK, 0)    # the last partial segment leaves now


if __name__ == "__main__":
    SendfileHandler.descriptor = os.open(sys.argv[2], os.O_RDONLY)
    SendfileHandler.size = os.fstat(SendfileHandler.descriptor).st_size
    QuietServer(("127.0.0.1", int(sys.argv[1])), SendfileHandler).serve_forever()
