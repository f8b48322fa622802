"""The access log tells the truth: durations of the request alone, cut downloads named with the bytes that
reached the client, and a line for every connection refused or download cut at shutdown."""

import http.client
import os
import re
import socket
import time
import unittest

from support import (SlowDownload, TempDirTestCase, close_all, hold_connections, publish, raw_exchange,
                     read_response_head, status_of, wait_until)

ACCESS = re.compile(r'"(?P<request>[^"]*)" (?P<status>\d{3}) (?P<bytes>\d+) (?P<ms>[0-9.]+)ms(?P<rest>.*)$')


def access(server, request):
    """The parsed access lines of one request, e.g. 'GET /version'."""
    found = []
    for line in server.access_lines('"%s"' % request):
        match = ACCESS.search(line)
        if match:
            found.append(match)
    return found


def write_update(folder, size):
    path = os.path.join(folder, "opq-box-update-1.tar.bz2")
    publish(path, os.urandom(size), mtime=time.time() - 60)
    return "/update/" + os.path.basename(path)


class DurationTest(TempDirTestCase):

    def test_the_clock_starts_at_the_request_not_at_the_wait_before_it(self):
        write_update(self.updates, 1000)
        server = self.start_server(verify_updates=False)
        connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
        self.addCleanup(connection.close)
        for _ in range(3):
            connection.request("GET", "/version")
            connection.getresponse().read()
            time.sleep(1.5)        # keep-alive: the connection waits between requests
        self.assertTrue(wait_until(lambda: len(access(server, "GET /version")) == 3, 5), server.log())
        durations = [float(match.group("ms")) for match in access(server, "GET /version")]
        self.assertTrue(all(duration < 1000 for duration in durations), durations)
        metrics = server.get("/metrics").body.decode()
        under_a_second = re.search(r'request_duration_seconds_bucket\{route="/version",le="1\.0"\} (\d+)', metrics)
        self.assertEqual(int(under_a_second.group(1)), 3, metrics)


class CutDownloadTest(TempDirTestCase):

    def setUp(self):
        super().setUp()
        self.path = write_update(self.updates, 32 << 20)

    def test_an_abandoned_download_is_logged_as_cut(self):
        server = self.start_server(verify_updates=False)
        with socket.socket() as connection:
            connection.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 32768)
            connection.connect(("127.0.0.1", server.port))
            connection.sendall(b"GET %s HTTP/1.1\r\nHost: x\r\n\r\n" % self.path.encode())
            head, _ = read_response_head(connection)
            self.assertEqual(status_of(head), 200)
        self.assertTrue(wait_until(lambda: access(server, "GET " + self.path), 10), server.log())
        line = access(server, "GET " + self.path)[0]
        self.assertIn("cut after %s of %d bytes: the client went away" % (line.group("bytes"), 32 << 20),
                      line.group("rest"))

    def test_a_stalled_download_is_reset_and_counts_no_fewer_bytes_than_the_client_got(self):
        server = self.start_server(verify_updates=False, idle_timeout=2)
        received = 0
        with socket.socket() as connection:
            connection.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
            connection.settimeout(30)
            connection.connect(("127.0.0.1", server.port))
            connection.sendall(b"GET %s HTTP/1.1\r\nHost: x\r\n\r\n" % self.path.encode())
            head, body = read_response_head(connection)
            received += len(body)
            self.assertTrue(wait_until(lambda: access(server, "GET " + self.path), 15), server.log())
            time.sleep(0.5)
            try:
                while True:
                    chunk = connection.recv(1 << 20)
                    if not chunk:
                        break
                    received += len(chunk)
            except ConnectionResetError:
                reset = True
            else:
                reset = False
        line = access(server, "GET " + self.path)[0]
        self.assertIn("the client took", line.group("rest"))
        self.assertTrue(reset, "a cut download is reset, not closed gracefully")
        self.assertGreaterEqual(int(line.group("bytes")), received)
        self.assertLess(received, 8 << 20, "the kernel did not go on sending after the cut")

    def test_a_download_cut_at_shutdown_is_logged(self):
        server = self.start_server(verify_updates=False, shutdown_grace=1)
        download = SlowDownload(server.port, self.path, 0)
        download.start()
        self.addCleanup(download.resume.set)
        self.assertTrue(download.headers_received.wait(10))
        self.assertEqual(server.stop(), 0)
        line = access(server, "GET " + self.path)
        self.assertEqual(len(line), 1, server.log())
        self.assertIn("the server stopped", line[0].group("rest"))


class RefusalTest(TempDirTestCase):

    def test_a_refused_connection_has_its_access_line(self):
        server = self.start_server(max_connections_per_client=1)
        held = hold_connections(server.port, 1)
        self.addCleanup(close_all, held)
        raw = raw_exchange(server.port, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        self.assertEqual(status_of(raw), 503)
        body = raw.split(b"\r\n\r\n", 1)[1]
        self.assertTrue(wait_until(lambda: server.access_lines('"-" 503 %d ' % len(body)), 5), server.log())
        self.assertIn("refused: too many connections from this client", server.access_lines('"-" 503')[0])


if __name__ == "__main__":
    unittest.main()
