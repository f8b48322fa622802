"""Concurrency, connection handling, graceful stop and logs, against the real server."""

import http.client
import io
import logging
import os
import signal
import socket
import threading
import time
import unittest

from support import TempDirTestCase, hold_connections, raw_exchange, status_of, wait_until

import box_update_server as bus


def slow_download(port, path, rate, results, index):
    """Read a download at about rate bytes per second, as a box on a thin link does."""
    try:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        connection.request("GET", path)
        answer = connection.getresponse()
        received, started = 0, time.monotonic()
        chunk = rate // 10
        while True:
            data = answer.read(chunk)
            if not data:
                break
            received += len(data)
            delay = received / rate - (time.monotonic() - started)
            if delay > 0:
                time.sleep(delay)
        results[index] = received
        connection.close()
    except Exception as error:  # reported by the test's assertion
        results[index] = error


class ConnectionTest(TempDirTestCase):

    def test_keep_alive_has_no_nagle_stalls(self):
        """Nagle with delayed ACKs would cost about 40 ms a request: 8 s for 200."""
        server = self.start_server()
        connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
        started = time.monotonic()
        for _ in range(200):
            connection.request("GET", "/version")
            answer = connection.getresponse()
            answer.read()
            self.assertEqual(answer.status, 404)
        elapsed = time.monotonic() - started
        connection.close()
        self.assertLess(elapsed, 2.0)
        self.assertTrue(wait_until(lambda: server.log().count('"GET /version" 404') == 200, 2))

    def test_slow_downloads_do_not_delay_health_checks(self):
        big = os.path.join(self.updates, "opq-box-update-1700000001.tar.bz2")
        with open(big, "wb") as out:
            out.write(os.urandom(6 << 20))
        server = self.start_server(verify_updates=False)
        results = [None] * 12
        threads = [threading.Thread(target=slow_download, daemon=True,
                                    args=(server.port, "/update/opq-box-update-1700000001.tar.bz2", 512 * 1024,
                                          results, index)) for index in range(12)]
        for thread in threads:
            thread.start()
        time.sleep(1.0)
        latencies = []
        for _ in range(20):
            started = time.monotonic()
            self.assertEqual(server.get("/").status, 200)
            latencies.append(time.monotonic() - started)
            time.sleep(0.05)
        self.assertTrue(all(thread.is_alive() for thread in threads), "downloads should still be running")
        self.assertLess(max(latencies), 0.5, "OPQ Health gives up after 2 s; we answered in %s" % latencies)
        for thread in threads:
            thread.join(60)
        self.assertEqual(results, [6 << 20] * 12)

    def test_idle_and_half_sent_connections_do_not_block_new_clients(self):
        server = self.start_server(idle_timeout=2)
        stalled = []
        for index in range(300):
            connection = socket.create_connection(("127.0.0.1", server.port), timeout=10)
            if index % 2:
                connection.sendall(b"GET /ls HTTP/1.1\r\nHost: x\r\n")   # half a request
            stalled.append(connection)
        self.addCleanup(lambda: [connection.close() for connection in stalled])
        started = time.monotonic()
        self.assertEqual(server.get("/").status, 200)
        self.assertLess(time.monotonic() - started, 1.0)
        # the stalled connections are closed once the idle timeout passes
        for connection in stalled[:20]:
            connection.settimeout(6)
            self.assertEqual(connection.recv(100), b"")

    def test_connections_beyond_the_limit_get_503(self):
        server = self.start_server(max_connections=5, idle_timeout=10)
        held = hold_connections(server.port, 5)
        self.addCleanup(lambda: [connection.close() for connection in held])
        raw = raw_exchange(server.port, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        self.assertEqual(status_of(raw), 503, raw)
        held.pop().close()
        self.assertTrue(wait_until(lambda: server.get("/").status == 200, 3))

    def test_request_with_a_body_closes_the_connection(self):
        server = self.start_server()
        raw = raw_exchange(server.port, b"POST /ls HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello"
                                        b"GET /ls HTTP/1.1\r\nHost: x\r\n\r\n")
        self.assertEqual(raw.count(b"HTTP/1.1 "), 1)
        self.assertEqual(status_of(raw), 405)


class IPv6Test(TempDirTestCase):

    def test_host_double_colon_listens_on_ipv6_and_ipv4(self):
        if not socket.has_ipv6:
            self.skipTest("no IPv6 on this machine")
        try:
            with socket.socket(socket.AF_INET6) as probe:
                probe.bind(("::1", 0))
        except OSError:
            self.skipTest("IPv6 loopback is not configured here")
        server = self.start_server(host="::")
        connection = http.client.HTTPConnection("::1", server.port, timeout=5)
        connection.request("GET", "/")
        self.assertEqual(connection.getresponse().status, 200)
        connection.close()
        self.assertEqual(server.get("/").status, 200)   # IPv4 through the same dual-stack socket
        self.assertIn("listening on http://[::]:%d/" % server.port, server.log())


class ShutdownTest(TempDirTestCase):

    def test_sigterm_lets_an_in_flight_download_finish_then_exits_0(self):
        big = os.path.join(self.updates, "opq-box-update-1700000000.tar.bz2")
        size = 3 << 20
        with open(big, "wb") as out:
            out.write(os.urandom(size))
        server = self.start_server(verify_updates=False, shutdown_grace=10)
        results = [None]
        thread = threading.Thread(target=slow_download, args=(server.port, "/update/" + os.path.basename(big),
                                                              2 << 20, results, 0))
        thread.start()
        time.sleep(0.5)
        started = time.monotonic()
        self.assertEqual(server.stop(signal.SIGTERM), 0)
        thread.join(30)
        self.assertEqual(results, [size])
        self.assertLess(time.monotonic() - started, 10)
        with self.assertRaises(OSError):
            socket.create_connection(("127.0.0.1", server.port), timeout=1).close()
        self.assertIn("stopped", server.log())

    def test_sigint_exits_0(self):
        server = self.start_server()
        self.assertEqual(server.stop(signal.SIGINT), 0)

    def test_grace_period_is_bounded(self):
        big = os.path.join(self.updates, "opq-box-update-1700000000.tar.bz2")
        with open(big, "wb") as out:
            out.write(os.urandom(8 << 20))
        server = self.start_server(verify_updates=False, shutdown_grace=1)
        results = [None]
        thread = threading.Thread(target=slow_download, daemon=True,
                                  args=(server.port, "/update/" + os.path.basename(big), 256 << 10, results, 0))
        thread.start()
        time.sleep(0.5)
        started = time.monotonic()
        self.assertEqual(server.stop(signal.SIGTERM), 0)
        self.assertLess(time.monotonic() - started, 4)
        self.assertIn("still in flight", server.log())


class LogTest(TempDirTestCase):

    def test_start_line_and_access_lines(self):
        server = self.start_server()
        server.get("/ls?x=1")
        self.assertTrue(wait_until(lambda: '"GET /ls?x=1"' in server.log(), 2))
        log = server.log()
        self.assertRegex(log, r"listening on http://127\.0\.0\.1:%d/ serving updates from %s"
                         % (server.port, self.updates))
        self.assertRegex(log, r'127\.0\.0\.1 "GET /ls\?x=1" 200 0 \d+\.\dms')

    def test_control_characters_cannot_forge_log_lines(self):
        server = self.start_server()
        raw_exchange(server.port, b"GET /x\x1b[31mred\x08\x7f\x9b HTTP/1.1\r\nHost: x\r\n\r\n")
        raw_exchange(server.port, b"GET /a\rINFO forged line HTTP/1.1\r\nHost: x\r\n\r\n")
        raw_exchange(server.port, b"\x1b[2J\x00\r\n\r\n")
        self.assertTrue(wait_until(lambda: '"GET /x\\x1b[31mred\\x08\\x7f\\x9b" 404' in server.log(), 2),
                        server.log())
        self.assertTrue(wait_until(lambda: server.log().count(" 400 ") == 2, 2), server.log())
        log = server.log()
        for character in "\x1b\r\x00\x08\x7f\x9b":
            self.assertNotIn(character, log)
        self.assertEqual(server.get("/").status, 200)


class HandlerErrorTest(TempDirTestCase):
    """A bug in a route is answered 500 and logged with its traceback; the server keeps serving."""

    def test_handler_error_is_500_and_the_server_lives_on(self):
        class BrokenHandler(bus.UpdateRequestHandler):
            def send_listing(self):
                raise RuntimeError("boom")

        settings = bus.Settings(port=1, updates_dir=self.updates, host="127.0.0.1")
        catalog = bus.Catalog(self.updates)
        catalog.start()
        self.addCleanup(catalog.stop)
        server = bus.BoxUpdateServer(settings._replace(port=0), catalog, BrokenHandler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        self.addCleanup(server.server_close)
        self.addCleanup(server.shutdown)
        port = server.server_address[1]
        stream = io.StringIO()
        handler = logging.StreamHandler(stream)
        bus.logger.addHandler(handler)
        self.addCleanup(bus.logger.removeHandler, handler)
        bus.logger.setLevel(logging.INFO)
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        connection.request("GET", "/ls")
        answer = connection.getresponse()
        self.assertEqual((answer.status, answer.read()), (500, b"Internal server error."))
        connection.close()
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        connection.request("GET", "/")
        self.assertEqual(connection.getresponse().status, 200)
        connection.close()
        log = stream.getvalue()
        self.assertIn("Traceback", log)
        self.assertIn("RuntimeError: boom", log)
        self.assertIn('"GET /ls" 500', log)


if __name__ == "__main__":
    unittest.main()
