"""Connections and their limits, signals, graceful stop and logs, against the real server."""

import http.client
import os
import re
import signal
import socket
import struct
import threading
import time
import unittest
from unittest import mock

from support import (InProcessServer, SlowDownload, TempDirTestCase, close_all, connect, hold_connections,
                     make_update, publish, raw_exchange, record, request, status_of, wait_until)

import box_update_server as bus


def write_big_update(folder, size=8 << 20, version=1700000000):
    path = os.path.join(folder, "opq-box-update-%d.tar.bz2" % version)
    publish(path, os.urandom(size), mtime=time.time() - 60)
    return "/update/" + os.path.basename(path)


class ConnectionTest(TempDirTestCase):

    def test_connections_use_tcp_nodelay(self):
        """Without it, a response's last small segment waits for the client's delayed ACK (40 ms)."""
        seen = []

        class RecordingHandler(bus.ConnectionHandler):
            def handle_one_request(self):
                super().handle_one_request()
                seen.append(self.connection.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))

        path = write_big_update(self.updates, 100000)
        server = InProcessServer(self, self.updates, handler=RecordingHandler, verify_updates=False)
        connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
        for target in ("/version", path, "/ls"):     # a download switches it off while corked, then on again
            connection.request("GET", target)
            connection.getresponse().read()
        connection.close()
        self.assertTrue(wait_until(lambda: len(seen) >= 3, 5))
        self.assertTrue(all(seen[:3]), seen)

    def test_slow_downloads_do_not_delay_health_checks(self):
        path = write_big_update(self.updates, 3 << 20)
        server = self.start_server(verify_updates=False)
        downloads = [SlowDownload(server.port, path, 512 << 10) for _ in range(12)]
        for download in downloads:
            download.start()
        self.assertTrue(all(download.headers_received.wait(10) for download in downloads))
        latencies = []
        for _ in range(20):
            started = time.monotonic()
            self.assertEqual(server.get("/").status, 200)
            latencies.append(time.monotonic() - started)
            time.sleep(0.05)
        self.assertTrue(any(download.is_alive() for download in downloads), "downloads should still be running")
        self.assertLess(max(latencies), 2.0, "OPQ Health gives up after 2 s; we answered in %s" % latencies)
        for download in downloads:
            download.join(60)
            self.assertIsNone(download.error)
            self.assertEqual(len(download.body), 3 << 20)

    def test_when_every_slot_is_answering_a_newcomer_gets_503(self):
        path = write_big_update(self.updates)
        server = self.start_server(verify_updates=False, max_connections=4, max_connections_per_client=4,
                                   max_downloads=4)                          # no slot kept for short answers
        downloads = [SlowDownload(server.port, path, 0) for _ in range(4)]   # busy: stalled mid-download
        for download in downloads:
            download.start()
        self.assertTrue(all(download.headers_received.wait(10) for download in downloads))
        raw = raw_exchange(server.port, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", source="127.0.0.2")
        self.assertEqual(status_of(raw), 503, raw)
        self.assertIn(b"Retry-After: 5", raw)
        self.assertTrue(raw.endswith(b"\r\n\r\nServer busy."))
        for download in downloads:
            download.resume.set()
            download.join(30)
        self.assertTrue(wait_until(lambda: server.get("/").status == 200, 5))

    @staticmethod
    def answered_connection(port):
        """A keep-alive connection answered once (refused while an earlier slot is still released: tried again)."""
        for _ in range(20):
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            connection.request("GET", "/ls")
            answer = connection.getresponse()
            answer.read()
            if answer.status == 200:
                return connection
            connection.close()
            time.sleep(0.2)
        raise AssertionError("the server kept refusing connections below its limit")

    def test_an_idle_keep_alive_connection_gives_its_slot_up_when_the_server_is_full(self):
        server = self.start_server(max_connections=3, max_connections_per_client=3)
        kept = [self.answered_connection(server.port) for _ in range(3)]
        self.addCleanup(lambda: [connection.close() for connection in kept])
        answer = request(server.port, "GET", "/", source="127.0.0.2")
        self.assertEqual(answer.status, 200)
        closed = 0
        for connection in kept:   # the one that waited longest was closed to make room
            connection.sock.settimeout(0.5)
            try:
                closed += connection.sock.recv(1) == b""
            except socket.timeout:
                pass
        self.assertEqual(closed, 1)

    def test_a_connection_that_sends_nothing_gives_its_slot_up_when_the_server_is_full(self):
        server = self.start_server(max_connections=5, max_connections_per_client=5)
        held = hold_connections(server.port, 5)
        self.addCleanup(close_all, held)
        raw = raw_exchange(server.port, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", source="127.0.0.2")
        if status_of(raw) == 503:   # the held ones may not have waited EVICT_AFTER yet
            time.sleep(bus.ConnectionTable.EVICT_AFTER)
            raw = raw_exchange(server.port, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", source="127.0.0.2")
        self.assertEqual(status_of(raw), 200, raw)

    def test_a_slot_is_free_once_the_server_has_closed_its_connection(self):
        server = self.start_server(max_connections_per_client=1)
        closing = b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        statuses = [status_of(raw_exchange(server.port, closing)) for _ in range(300)]
        self.assertEqual(statuses, [200] * 300, "a client that saw the close may connect again at once")

    def test_one_address_holds_at_most_its_share(self):
        server = self.start_server(max_connections=20, max_connections_per_client=3,
                                   trusted_proxies=["127.0.0.3"])
        held = hold_connections(server.port, 3)
        self.addCleanup(close_all, held)
        raw = raw_exchange(server.port, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        self.assertEqual(status_of(raw), 503, raw)
        self.assertTrue(raw.endswith(b"Too many connections from your address."))
        self.assertEqual(request(server.port, "GET", "/", source="127.0.0.2").status, 200)
        proxied = hold_connections(server.port, 6, source="127.0.0.3")   # a trusted proxy is exempt
        self.addCleanup(close_all, proxied)
        self.assertEqual(request(server.port, "GET", "/", source="127.0.0.3").status, 200)

    def test_a_request_head_must_arrive_within_its_deadline(self):
        server = self.start_server(request_header_timeout=1, idle_timeout=10)
        connection = connect(server.port)
        self.addCleanup(connection.close)
        started = time.monotonic()
        answer = b""
        for byte in b"GET / HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 40:
            try:
                connection.sendall(bytes([byte]))
            except OSError:
                break
            connection.settimeout(0.3)       # a byte every 0.3 s: every recv is far inside idle_timeout
            try:
                answer += connection.recv(1000)
                if answer:
                    break
            except socket.timeout:
                pass
        elapsed = time.monotonic() - started
        self.assertEqual(status_of(answer), 408, answer)
        self.assertIn(b"Connection: close", answer)
        self.assertLess(elapsed, 5, "the head deadline is 1 s")

    def test_a_pipelined_head_that_stalls_gets_408_by_the_head_deadline(self):
        server = self.start_server(request_header_timeout=1, idle_timeout=20)
        connection = connect(server.port)
        self.addCleanup(connection.close)
        # the second head's request line arrives with the first request, then the rest never comes
        connection.sendall(b"GET /version HTTP/1.1\r\nHost: x\r\n\r\nGET /ls HTTP/1.1\r\nHost: x\r\n")
        started, received = time.monotonic(), b""
        connection.settimeout(15)
        while True:
            chunk = connection.recv(4096)
            if not chunk:
                break
            received += chunk
        elapsed = time.monotonic() - started
        answers = received.split(b"HTTP/1.1 ")[1:]
        self.assertEqual([int(answer[:3]) for answer in answers], [404, 408], received)
        self.assertLess(elapsed, 10, "the head deadline is 1 s; idle_timeout is 20 s")

    def test_a_request_with_a_body_closes_the_connection_and_says_so(self):
        server = self.start_server()
        raw = raw_exchange(server.port, b"POST /ls HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello"
                                        b"GET /ls HTTP/1.1\r\nHost: x\r\n\r\n")
        self.assertEqual(raw.count(b"HTTP/1.1 "), 1)
        self.assertEqual(status_of(raw), 405)
        self.assertIn(b"Connection: close\r\n", raw)

    def test_http_1_0_keep_alive_is_answered_as_such(self):
        server = self.start_server()
        with connect(server.port) as connection:
            for _ in range(2):
                connection.sendall(b"GET /ls HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
                answer = connection.recv(4096)
                self.assertEqual(status_of(answer), 200)
                self.assertIn(b"Connection: keep-alive\r\n", answer)
        raw = raw_exchange(server.port, b"GET /ls HTTP/1.0\r\n\r\n")
        self.assertIn(b"Connection: close\r\n", raw)

    def test_one_empty_line_before_a_request_is_ignored(self):
        server = self.start_server()
        self.assertEqual(status_of(raw_exchange(server.port, b"\r\nGET / HTTP/1.1\r\nHost: x\r\n\r\n")), 200)


class ConnectionTableTest(unittest.TestCase):
    """Admission without a server: the hand-over between the accept thread evicting and a request beginning.

    Both sides decide under the slot's lock, so the hand-over holds without the GIL: the tests hold that
    lock as the other side would and show that each side waits for it and then sees what the other did.
    """

    class RacingSlot(bus.Slot):
        """A slot whose request begins between _evict_one picking it and its hand-over."""
        __slots__ = ()

        def give_up(self):
            self.begin_request()
            return super().give_up()

    def connections(self):
        """A held connection, its client's end, and a newcomer: socket pairs closed after the test."""
        held, peer = socket.socketpair()
        newcomer, other = socket.socketpair()
        for connection in (held, peer, newcomer, other):
            self.addCleanup(connection.close)
        return held, peer, newcomer

    def test_a_slot_whose_request_began_during_eviction_is_kept(self):
        table = bus.ConnectionTable(1, 1)
        held, peer, newcomer = self.connections()
        self.assertIsNone(table.admit(held, "10.0.0.1", False))
        racing = table.slot_of(held)
        racing.__class__ = self.RacingSlot
        racing.served = True                    # an idle keep-alive connection: the first to be evicted
        self.assertEqual(table.admit(newcomer, "10.0.0.2", False), "full")
        self.assertFalse(racing.evicted, "the request in progress keeps its slot")
        self.assertEqual((table.open_count(), table.evicted, table.refused["full"]), (1, 0, 1))
        peer.setblocking(False)
        with self.assertRaises(BlockingIOError):    # not shut down: the client sees no end of stream
            peer.recv(1)

    def test_when_the_longest_waiting_slot_begins_a_request_the_next_one_gives_its_slot_up(self):
        table = bus.ConnectionTable(2, 2)
        first, first_peer, newcomer = self.connections()
        second, second_peer = socket.socketpair()
        self.addCleanup(second.close)
        self.addCleanup(second_peer.close)
        table.admit(first, "10.0.0.1", False)
        table.admit(second, "10.0.0.1", False)
        racing, idle = table.slot_of(first), table.slot_of(second)
        racing.__class__ = self.RacingSlot
        racing.served = idle.served = True
        idle.waiting_since = racing.waiting_since + 1           # racing has waited longer: picked first
        self.assertIsNone(table.admit(newcomer, "10.0.0.2", False))
        self.assertEqual((racing.evicted, idle.evicted, table.evicted), (False, True, 1))
        self.assertEqual(second_peer.recv(1), b"")

    def test_an_idle_slot_is_evicted_for_a_newcomer(self):
        table = bus.ConnectionTable(1, 1)
        held, peer, newcomer = self.connections()
        table.admit(held, "10.0.0.1", False)
        slot = table.slot_of(held)
        slot.served = True
        self.assertIsNone(table.admit(newcomer, "10.0.0.2", False))
        self.assertEqual((table.open_count(), table.evicted), (1, 1))
        self.assertEqual(peer.recv(1), b"", "the evicted connection was shut down")
        with self.assertRaises(ConnectionAbortedError, msg="a request arriving now is not answered"):
            slot.begin_request()

    def in_thread(self, function):
        """Run function in a thread; return (its thread, a list that gets its result or exception)."""
        outcome = []

        def run():
            try:
                outcome.append(function())
            except Exception as error:  # pylint: disable=broad-except
                outcome.append(error)
        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        self.addCleanup(thread.join, 5)
        return thread, outcome

    def test_a_request_beginning_waits_for_an_eviction_under_way_and_sees_it(self):
        slot = bus.Slot(socket.socket(), "10.0.0.1", False)
        self.addCleanup(slot.connection.close)
        with slot.lock:                         # the accept thread, half-way through give_up
            thread, outcome = self.in_thread(slot.begin_request)
            thread.join(0.3)
            self.assertTrue(thread.is_alive(), "begin_request decided without the slot's lock")
            slot.evicted = True
        thread.join(5)
        self.assertIsInstance(outcome[0], ConnectionAbortedError)
        self.assertFalse(slot.busy)

    def test_an_eviction_waits_for_a_request_beginning_and_sees_it(self):
        slot = bus.Slot(socket.socket(), "10.0.0.1", False)
        self.addCleanup(slot.connection.close)
        with slot.lock:                         # the connection's thread, half-way through begin_request
            thread, outcome = self.in_thread(slot.give_up)
            thread.join(0.3)
            self.assertTrue(thread.is_alive(), "give_up decided without the slot's lock")
            slot.busy = True
        thread.join(5)
        self.assertEqual(outcome, [False])
        self.assertFalse(slot.evicted)

    def test_a_request_that_ends_can_be_evicted_again(self):
        slot = bus.Slot(socket.socket(), "10.0.0.1", False)
        self.addCleanup(slot.connection.close)
        slot.begin_request()
        self.assertFalse(slot.give_up())
        slot.end_request()
        self.assertTrue(slot.give_up())
        self.assertRaises(ConnectionAbortedError, slot.begin_request)


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
        self.assertTrue(wait_until(lambda: server.access_lines('127.0.0.1 "GET /"'), 5), "mapped address shown plain")


class SignalTest(TempDirTestCase):

    def test_sigterm_lets_an_in_flight_download_finish_then_exits_0(self):
        path = write_big_update(self.updates)
        server = self.start_server(verify_updates=False, shutdown_grace=10)
        download = SlowDownload(server.port, path, 4 << 20)
        download.start()
        self.assertTrue(download.headers_received.wait(10))
        started = time.monotonic()
        self.assertEqual(server.stop(signal.SIGTERM), 0)
        stopped_in = time.monotonic() - started
        download.join(30)
        self.assertIsNone(download.error)
        self.assertFalse(download.closed_early)
        self.assertEqual(len(download.body), 8 << 20)
        with self.assertRaises(OSError):
            socket.create_connection(("127.0.0.1", server.port), timeout=1).close()
        self.assertIn("stopped", server.log())
        record("Faults during downloads", "SIGTERM with an 8 MB download in flight (shutdown_grace 10 s)",
               "download completed with the original bytes; exit status 0 after %.1f s" % stopped_in)

    def test_sigint_exits_0(self):
        server = self.start_server()
        self.assertEqual(server.stop(signal.SIGINT), 0)

    def test_the_grace_period_is_bounded_and_a_second_signal_ends_it_at_once(self):
        path = write_big_update(self.updates)
        server = self.start_server(verify_updates=False, shutdown_grace=1)
        download = SlowDownload(server.port, path, 0)
        download.start()
        self.addCleanup(download.resume.set)
        self.assertTrue(download.headers_received.wait(10))
        started = time.monotonic()
        self.assertEqual(server.stop(signal.SIGTERM), 0)
        self.assertLess(time.monotonic() - started, 5, "shutdown_grace is 1 s")
        self.assertIn("still in flight", server.log())

        server = self.start_server(verify_updates=False, shutdown_grace=60)
        download = SlowDownload(server.port, path, 0)
        download.start()
        self.addCleanup(download.resume.set)
        self.assertTrue(download.headers_received.wait(10))
        server.process.send_signal(signal.SIGTERM)
        self.assertTrue(wait_until(lambda: "received SIGTERM, stopping" in server.log(), 5))
        self.assertEqual(server.stop(signal.SIGINT, timeout=10), 1)
        self.assertIn("received SIGINT during the graceful stop SIGTERM began: exiting now", server.log())

    def test_during_the_grace_period_a_kept_connection_gets_one_last_answer(self):
        path = write_big_update(self.updates)
        server = self.start_server(verify_updates=False, shutdown_grace=30)
        kept = connect(server.port)
        self.addCleanup(kept.close)
        kept.sendall(b"GET /version HTTP/1.1\r\nHost: x\r\n\r\n")
        self.assertNotIn(b"Connection: close", kept.recv(4096))          # kept alive before the signal
        download = SlowDownload(server.port, path, 0)                     # holds the server in its grace period
        download.start()
        self.addCleanup(download.resume.set)
        self.assertTrue(download.headers_received.wait(10))
        server.process.send_signal(signal.SIGTERM)
        self.assertTrue(wait_until(lambda: "received SIGTERM, stopping" in server.log(), 10))
        kept.sendall(b"GET /version HTTP/1.1\r\nHost: x\r\n\r\n")
        answer = b""
        kept.settimeout(10)
        while True:                        # to the end of the stream: a timeout here fails the test
            chunk = kept.recv(4096)
            if not chunk:
                break
            answer += chunk
        self.assertEqual(status_of(answer), 200, answer)
        self.assertIn(b"Connection: close\r\n", answer)
        download.resume.set()
        self.assertEqual(server.wait(30), 0)

    def test_sighup_rescans_and_never_stops_the_server(self):
        make_update(self.updates, 1700000000)
        server = self.start_server()
        for count in range(1, 4):
            server.process.send_signal(signal.SIGHUP)
            self.assertTrue(wait_until(lambda: server.log().count("SIGHUP: rescanned") == count, 10), server.log())
        self.assertIsNone(server.process.poll())
        self.assertEqual(server.get("/version").body, b"1700000000")
        self.assertEqual(server.stop(), 0)


class LogTest(TempDirTestCase):

    def test_start_line_and_access_lines(self):
        server = self.start_server()
        server.get("/ls?x=1")
        self.assertTrue(wait_until(lambda: server.access_lines('"GET /ls?x=1"'), 5))
        log = server.log()
        self.assertRegex(log, r"listening on http://127\.0\.0\.1:%d/ serving updates from %s"
                         % (server.port, self.updates))
        # the same shape as the logging lines around it: asctime, level, message
        self.assertRegex(log, r'\n\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} INFO 127\.0\.0\.1 "GET /ls\?x=1" 200 0 '
                              r'\d+\.\dms\n')

    def test_every_request_is_logged_in_order_under_load(self):
        server = self.start_server()
        clients, per_client = 8, 100

        def client(index):
            connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
            for number in range(per_client):
                connection.request("GET", "/ls?client=%d&n=%d" % (index, number))
                connection.getresponse().read()
            connection.close()
        threads = [threading.Thread(target=client, args=(index,)) for index in range(clients)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        self.assertTrue(wait_until(lambda: len(server.access_lines('"GET /ls?client=')) == clients * per_client, 10))
        for index in range(clients):
            numbers = [int(match) for match in re.findall(r'/ls\?client=%d&n=(\d+)"' % index, server.log())]
            self.assertEqual(numbers, list(range(per_client)))

    def test_control_characters_cannot_forge_log_lines(self):
        server = self.start_server()
        raw_exchange(server.port, b"GET /x\x1b[31mred\x08\x7f\x9b HTTP/1.1\r\nHost: x\r\n\r\n")
        raw_exchange(server.port, b"GET /a\rINFO forged line HTTP/1.1\r\nHost: x\r\n\r\n")
        raw_exchange(server.port, b"\x1b[2J\x00\r\n\r\n")
        self.assertTrue(wait_until(lambda: '"GET /x\\x1b[31mred\\x08\\x7f\\x9b" 404' in server.log(), 5),
                        server.log())
        self.assertTrue(wait_until(lambda: server.log().count(" 400 ") == 2, 5), server.log())
        log = server.log()
        for character in "\x1b\r\x00\x08\x7f\x9b":
            self.assertNotIn(character, log)
        self.assertEqual(server.get("/").status, 200)

    def test_error_answers_count_their_bytes(self):
        server = self.start_server()
        raw = raw_exchange(server.port, b"GET / HTTP/1.1\r\n\r\n")     # no Host
        body = raw.split(b"\r\n\r\n", 1)[1]
        self.assertEqual(status_of(raw), 400)
        self.assertTrue(wait_until(lambda: server.access_lines('"GET /" 400 %d ' % len(body)), 5), server.log())


class HandlerErrorTest(TempDirTestCase):
    """A bug in a route is answered 500 and logged with its traceback; the server keeps serving."""

    def test_handler_error_is_500_and_the_server_lives_on(self):
        class BrokenRoutes(bus.UpdateRoutes):
            def listing(self, request):
                raise RuntimeError("boom")

        with self.assertLogs(bus.logger, "ERROR") as errors:
            server = InProcessServer(self, self.updates, routes=BrokenRoutes)
            answer = server.get("/ls")
            self.assertEqual((answer.status, answer.body), (500, b"Internal server error."))
            self.assertEqual(server.get("/").status, 200)
        self.assertIn("RuntimeError: boom", "\n".join(errors.output))
        self.assertTrue(wait_until(lambda: any('"GET /ls" 500' in line for line in server.log), 5), server.log)


class SocketTimeoutTest(unittest.TestCase):
    """set_socket_timeout: a timeval of zero means "never", so the shortest wait is clamped to 1 microsecond."""

    def test_a_wait_under_a_microsecond_is_not_zero(self):
        size = struct.calcsize("ll")
        for seconds in (4e-7, 0.0, 1e-9):
            with self.subTest(seconds=seconds), socket.socket() as connection:
                bus.set_socket_timeout(connection, socket.SO_RCVTIMEO, seconds)
                whole, micro = struct.unpack("ll", connection.getsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, size))
                self.assertEqual(whole, 0)
                self.assertGreater(micro, 0, "zero: recv would wait forever")
        with socket.socket() as connection:
            bus.set_socket_timeout(connection, socket.SO_RCVTIMEO, 2.5)
            self.assertEqual(struct.unpack("ll", connection.getsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, size)),
                             (2, 500000))

    def test_a_head_deadline_a_fraction_of_a_microsecond_away_still_ends_the_read(self):
        ours, theirs = socket.socketpair()
        self.addCleanup(theirs.close)
        self.addCleanup(ours.close)
        reader = bus.RequestReader(ours, idle_timeout=30, head_timeout=10)
        reader.await_request()
        reader.deadline = 100.0 + 4e-7          # what remains of it when the next read starts: 0.4 microseconds
        outcome = []

        def read():
            try:
                outcome.append(reader.readinto(bytearray(16)))
            except socket.timeout as error:
                outcome.append(str(error))
        with mock.patch("box_update_server.time") as clock:
            clock.monotonic.return_value = 100.0
            worker = threading.Thread(target=read, daemon=True)
            worker.start()
            worker.join(10)
        if worker.is_alive():
            ours.shutdown(socket.SHUT_RDWR)     # let the stuck read go
            worker.join(5)
            self.fail("the read outlived its head deadline by 10 s")
        self.assertEqual(len(outcome), 1)
        self.assertRegex(outcome[0], r"^no bytes for 4e-07 s$")


if __name__ == "__main__":
    unittest.main()
