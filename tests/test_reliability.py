"""Reliability and security: load, slow and idle clients, hostile input, faults during downloads.

Loopback only, bounded in count and time.  With RELIABILITY_REPORT=<file> the figures are written
as the README's Reliability table (see support.record).
"""

import http.client
import os
import random
import re
import signal
import socket
import subprocess
import threading
import time

from support import (TempDirTestCase, file_member, hold_connections, make_update, publish, raw_exchange, record,
                     require_binary, status_of, update_members, wait_until)

SECRET = b"SECRET-MARKER-7f3a9c"


def percentile(values, fraction):
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * fraction))]


class SlowDownload(threading.Thread):
    """A raw-socket download read at a fixed rate through a small receive buffer, as on a thin home link."""

    def __init__(self, port, path, rate, extra_headers=b""):
        super().__init__(daemon=True)
        self.port, self.path, self.rate, self.extra_headers = port, path, rate, extra_headers
        self.status = self.content_length = None
        self.body = b""
        self.closed_early = False
        self.error = None

    def run(self):
        try:
            with socket.socket() as connection:
                connection.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 32768)
                connection.settimeout(30)
                connection.connect(("127.0.0.1", self.port))
                connection.sendall(b"GET %s HTTP/1.1\r\nHost: x\r\n%s\r\n" % (self.path.encode(), self.extra_headers))
                received = b""
                while b"\r\n\r\n" not in received:
                    chunk = connection.recv(4096)
                    if not chunk:
                        raise ConnectionError("closed before the headers")
                    received += chunk
                head, body = received.split(b"\r\n\r\n", 1)
                self.status = status_of(head)
                self.content_length = int(re.search(rb"Content-Length: (\d+)", head).group(1))
                parts, total, started = [body], len(body), time.monotonic()
                while total < self.content_length:
                    chunk = connection.recv(16384)
                    if not chunk:
                        self.closed_early = True
                        break
                    parts.append(chunk)
                    total += len(chunk)
                    delay = total / self.rate - (time.monotonic() - started)
                    if delay > 0:
                        time.sleep(delay)
                self.body = b"".join(parts)
        except Exception as error:  # the test asserts on it
            self.error = error


class HealthWatcher(threading.Thread):
    """OPQ Health's probe, every 100 ms while a test runs: every answer must be a 200 within 2 s."""

    def __init__(self, port):
        super().__init__(daemon=True)
        self.port, self.stopping, self.latencies, self.failures = port, threading.Event(), [], []

    def run(self):
        while not self.stopping.is_set():
            started = time.monotonic()
            try:
                connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=2)
                connection.request("GET", "/")
                answer = connection.getresponse()
                answer.read()
                connection.close()
                if answer.status != 200:
                    self.failures.append(answer.status)
            except Exception as error:  # noted as a failure
                self.failures.append(repr(error))
            self.latencies.append(time.monotonic() - started)
            self.stopping.wait(0.1)

    def stop(self):
        self.stopping.set()
        self.join(10)
        return self


class LoadTest(TempDirTestCase):

    def test_forty_keep_alive_clients_mixed_over_every_route(self):
        clients, per_client = 40, 250
        small = [make_update(self.updates, 1700000000 + i, mtime=time.time() - 60) for i in range(20)]
        big_members = update_members(1800000000) + [
            file_member("opq-box-update-1800000000/box-config-daemon/fw.bin", os.urandom(1 << 20))]
        big = make_update(self.updates, 1800000000, big_members, mtime=time.time() - 60)
        contents = {}
        for path in small + [big]:
            with open(path, "rb") as archive:
                contents["/update/" + os.path.basename(path)] = archive.read()
        server = self.start_server()
        time.sleep(0.5)
        baseline_fds, baseline_threads = server.fd_count(), server.thread_count()
        big_path = "/update/" + os.path.basename(big)
        etag = server.get(big_path).header("ETag")

        def one_request(connection, rng):
            kind = rng.randrange(10)
            if kind == 0:
                return "GET", "/", {}, 200, None
            if kind == 1:
                return "GET", "/ls?box=%d" % rng.randrange(99), {}, 200, None
            if kind == 2:
                return "GET", "/latest", {}, 303, None
            if kind == 3:
                return "HEAD", "/version", {}, 200, None
            if kind == 4:
                path = "/update/" + os.path.basename(rng.choice(small))
                return "GET", path, {}, 200, contents[path]
            if kind == 5:
                first = rng.randrange(len(contents[big_path]) - 1000)
                return ("GET", big_path, {"Range": "bytes=%d-%d" % (first, first + 999)}, 206,
                        contents[big_path][first:first + 1000])
            if kind == 6:
                return "GET", big_path, {"If-None-Match": etag}, 304, b""
            if kind == 7:
                return "GET", "/update/%s.sha256" % os.path.basename(rng.choice(small)), {}, 200, None
            if kind == 8:
                return "GET", "/no/such/route", {}, 404, b"Resource not found."
            return "GET", big_path, {}, 200, contents[big_path]

        errors, counts = [], [0] * clients

        def client(index):
            rng = random.Random(index)
            connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
            try:
                for _ in range(per_client):
                    method, path, headers, expected_status, expected_body = one_request(connection, rng)
                    connection.request(method, path, headers=headers)
                    answer = connection.getresponse()
                    body = answer.read()
                    if answer.status != expected_status or (expected_body is not None and body != expected_body):
                        errors.append((method, path, answer.status, len(body)))
                    counts[index] += 1
            except Exception as error:  # counted below
                errors.append(repr(error))
            finally:
                connection.close()

        threads = [threading.Thread(target=client, args=(index,)) for index in range(clients)]
        started = time.monotonic()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(180)
        elapsed = time.monotonic() - started
        self.assertEqual(errors, [])
        self.assertEqual(sum(counts), clients * per_client)
        self.assertTrue(wait_until(lambda: server.fd_count() <= baseline_fds, 10),
                        "descriptors: %d before, %d after" % (baseline_fds, server.fd_count()))
        self.assertTrue(wait_until(lambda: server.thread_count() <= baseline_threads, 10),
                        "threads: %d before, %d after" % (baseline_threads, server.thread_count()))
        record("Load", "%d keep-alive clients x %d requests, mixed over every route (downloads, ranges, 304, "
               "HEAD, 404)" % (clients, per_client),
               "%d requests in %.1f s (%.0f req/s); 0 errors, 0 unexpected statuses; descriptors %d -> %d, "
               "threads %d -> %d afterwards" % (sum(counts), elapsed, sum(counts) / elapsed, baseline_fds,
                                                server.fd_count(), baseline_threads, server.thread_count()))


class SlowAndIdleClientsTest(TempDirTestCase):

    def test_five_hundred_stalled_connections(self):
        make_update(self.updates, 1700000000, mtime=time.time() - 60)
        timeout = 2
        server = self.start_server(idle_timeout=timeout)
        stalled = []
        self.addCleanup(lambda: [connection.close() for connection in stalled])
        for _ in range(500):
            connection = socket.create_connection(("127.0.0.1", server.port), timeout=10)
            connection.sendall(b"GET /update/opq-box-update-1700000000.tar.bz2 HTTP/1.1\r\nHost: x\r\nRange: by")
            stalled.append(connection)
        started = time.monotonic()
        self.assertEqual(server.get("/").status, 200)
        served_in = time.monotonic() - started
        self.assertLess(served_in, 1.0)
        closed_at = []
        deadline = time.monotonic() + timeout + 10
        for connection in stalled:
            connection.settimeout(max(0.1, deadline - time.monotonic()))
            try:
                self.assertEqual(connection.recv(100), b"")
            except ConnectionResetError:
                pass
            closed_at.append(time.monotonic() - started)
        self.assertLess(max(closed_at), timeout + 5)
        self.assertEqual(server.get("/version").status, 200)
        record("Slow and idle clients", "500 connections each sending half a request, then stalling "
               "(idle_timeout %d s)" % timeout,
               "a new client served in %.0f ms; all 500 closed by the server within %.1f s"
               % (served_in * 1000, max(closed_at)))

    def test_a_flood_beyond_the_connection_limit_gets_a_fast_clean_answer(self):
        limit = 100
        server = self.start_server(max_connections=limit, idle_timeout=20)
        held = hold_connections(server.port, limit)
        self.addCleanup(lambda: [connection.close() for connection in held])
        rss_before = server.peak_rss_kb()
        answers, slowest = {}, 0.0
        for _ in range(400):
            started = time.monotonic()
            raw = raw_exchange(server.port, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", timeout=5)
            slowest = max(slowest, time.monotonic() - started)
            status = status_of(raw) or "closed"
            answers[status] = answers.get(status, 0) + 1
        self.assertEqual(set(answers) - {503, "closed"}, set(), answers)
        self.assertLess(slowest, 1.0)
        growth = server.peak_rss_kb() - rss_before
        self.assertLess(growth, 20 << 10)
        for connection in held:
            connection.close()
        self.assertTrue(wait_until(lambda: server.get("/").status == 200, 5))
        record("Slow and idle clients", "%d idle connections at max_connections=%d, then 400 more" % (limit, limit),
               "%s; slowest answer %.0f ms; peak RSS +%d kB; served normally once the idle ones left"
               % (", ".join("%s: %d" % item for item in sorted(answers.items(), key=str)), slowest * 1000, growth))


def hostile_requests(rng, count, update_name):
    """A seeded mix of broken, oversized and malicious HTTP requests."""
    traversals = ["../secret", "..%2fsecret", "%2e%2e%2fsecret", "..%252fsecret", "..\\secret", "%2e%2e%5csecret",
                  "secret.txt", "..%c0%afsecret", "/etc/passwd", "%00", "opq-box-update-1800000000.tar.bz2",
                  update_name + "%00", update_name + "/..", "....//secret", "%ff%fe", "\u00e9\u00e8"]
    ranges = ["bytes=0-", "bytes=-0", "bytes=99999999999999999999-", "bytes=5-1", "bytes=-", "bytes=0-1,2-3",
              "bytes=\u0661-\u0662", "bytes=1-2-3", "lines=1-2", "bytes = 0 - 5", "bytes=-99999999999999999999"]
    validators = ["If-None-Match: W/\"x\", *, \"", "If-Modified-Since: Sun, 31 Dec 99999 23:59:59 GMT",
                  "If-Range: garbage", "If-Match: \"\\\"", "If-Unmodified-Since: \x01\x02",
                  "If-Modified-Since: Mon, 32 Foo 2020 25:61:61 XYZ", "If-Range: Thu, 01 Jan 1970 00:00:00 GMT"]
    methods = ["GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS", "CONNECT", "TRACE", "BREW", "G\u00c9T", "", "get"]
    versions = ["HTTP/1.1", "HTTP/1.0", "HTTP/0.9", "HTTP/2.0", "HTTP/3", "HTTP/1.2", "HTTP/9.9", "HTTP/1.1.1",
                "HTTP/x", "HTTPS/1.1", "", "http/1.1", "HTTP/01.01"]
    for index in range(count):
        kind = index % 10
        method, version = rng.choice(methods[:3]), "HTTP/1.1"
        path = "/update/" + rng.choice(traversals)
        headers = ["Host: x"]
        if kind == 0:
            yield bytes(rng.randrange(256) for _ in range(rng.randrange(1, 300)))
            continue
        if kind == 1:
            method, version = rng.choice(methods), rng.choice(versions)
            path = rng.choice(["/", "/ls", "/latest", "/version", "*", "http://x/ls", "//ls", path])
        elif kind == 2:
            path = "/" + "a" * rng.choice([8000, 9000, 70000])
        elif kind == 3:
            headers.append("X-Long: " + "b" * rng.choice([1000, 70000]))
        elif kind == 4:
            headers += ["X-%d: y" % n for n in range(rng.choice([99, 101, 500]))]
        elif kind == 5:
            path = "/update/" + update_name
            headers.append("Range: " + rng.choice(ranges))
        elif kind == 6:
            path = "/update/" + update_name
            headers.append(rng.choice(validators))
            headers.append("Range: " + rng.choice(ranges))
        elif kind == 7:
            path = rng.choice(["/", "/ls"]) + "".join(rng.choice(["%", "%z", "%2", "%%", "%e9", "\u00ff", "?", "#"])
                                                      for _ in range(rng.randrange(1, 8)))
        elif kind == 8:
            headers.append(rng.choice(["Content-Length: -1", "Content-Length: abc", "Transfer-Encoding: chunked",
                                       "Expect: 100-continue", "Connection: keep-alive, upgrade", ": empty name",
                                       "No colon here", " leading: space", "Host: \u00e9"]))
        else:
            path = rng.choice(["/update/" + rng.choice(traversals), "/" + rng.choice(traversals)])
        if version == "HTTP/0.9":
            yield ("%s %s\r\n" % (method, path)).encode("utf-8", "surrogateescape")
            continue
        line = " ".join(part for part in (method, path, version) if part)
        yield ("%s\r\n%s\r\n\r\n" % (line, "\r\n".join(headers))).encode("utf-8")


class HostileInputTest(TempDirTestCase):

    def test_ten_thousand_hostile_requests(self):
        update = make_update(self.updates, 1700000000, mtime=time.time() - 60)
        with open(os.path.join(self.tmp, "secret"), "wb") as secret:
            secret.write(SECRET)
        publish(os.path.join(self.updates, "secret.txt"), SECRET)
        publish(os.path.join(self.updates, "opq-box-update-1800000000.tar.bz2"), b"BZh9" + SECRET)  # rejected
        server = self.start_server(idle_timeout=2)
        requests = list(hostile_requests(random.Random(20261130), 10000, os.path.basename(update)))
        statuses, problems = {}, []
        lock = threading.Lock()

        def worker(batch):
            for data in batch:
                try:
                    raw = raw_exchange(server.port, data, timeout=5)
                except OSError as error:
                    raw = b""
                    with lock:
                        problems.append("connection failed: %r" % error)
                status = status_of(raw)
                with lock:
                    statuses[status] = statuses.get(status, 0) + 1
                    if (status is None and raw) or (status is not None and status >= 500):
                        problems.append((data[:120], raw[:200]))
                    if SECRET in raw:
                        problems.append(("leak", data[:120]))

        started = time.monotonic()
        batches = [requests[offset::4] for offset in range(4)]
        threads = [threading.Thread(target=worker, args=(batch,)) for batch in batches]
        for thread in threads:
            thread.start()
        while any(thread.is_alive() for thread in threads):
            self.assertEqual(server.get("/").status, 200, "the server must stay alive")
            time.sleep(0.5)
        elapsed = time.monotonic() - started
        self.assertEqual(problems, [])
        self.assertIsNone(server.process.poll())
        self.assertEqual(server.get("/version").body, b"1700000000")
        self.assertNotIn("Traceback", server.log())
        summary = ", ".join("%s: %d" % (status if status else "closed without an answer", count)
                            for status, count in sorted(statuses.items(), key=lambda item: str(item[0])))
        record("Hostile input", "%d seeded requests: random bytes, long lines and headers, too many headers, bad "
               "percent-encoding, traversals, odd Range and If-* values, non-ASCII, HTTP/0.9 and unknown "
               "versions" % len(requests),
               "%.1f s; no 5xx, no byte outside the catalog, no traceback, alive throughout; %s"
               % (elapsed, summary))


class DownloadFaultTest(TempDirTestCase):
    """A file changing under a download ends in the right bytes or a clean close, and others are served."""

    SIZE = 8 << 20
    RATE = 4 << 20

    def setUp(self):
        super().setUp()
        self.path = os.path.join(self.updates, "opq-box-update-1700000000.tar.bz2")
        self.original = os.urandom(self.SIZE)
        publish(self.path, self.original, mtime=time.time() - 60)
        self.server = self.start_server(verify_updates=False, shutdown_grace=10)
        self.watcher = HealthWatcher(self.server.port)
        self.watcher.start()
        self.addCleanup(self.watcher.stop)

    def download_with_fault(self, fault):
        download = SlowDownload(self.server.port, "/update/" + os.path.basename(self.path), self.RATE)
        download.start()
        time.sleep(0.5)
        fault()
        download.join(60)
        self.assertIsNone(download.error)
        self.assertEqual(download.status, 200)
        self.assertEqual(download.content_length, self.SIZE)
        self.assertLessEqual(len(download.body), download.content_length)
        return download

    def assert_others_were_served(self):
        watcher = self.watcher.stop()
        self.assertEqual(watcher.failures, [])
        self.assertLess(max(watcher.latencies), 1.0)
        return watcher

    def test_deleted_during_download(self):
        download = self.download_with_fault(lambda: os.unlink(self.path))
        self.assertFalse(download.closed_early)
        self.assertEqual(download.body, self.original)
        self.assert_others_were_served()
        record("Faults during downloads", "update deleted during an 8 MB download",
               "complete original bytes (the open file outlives its name); others served")

    def test_replaced_by_rename_during_download(self):
        download = self.download_with_fault(lambda: publish(self.path, os.urandom(self.SIZE)))
        self.assertFalse(download.closed_early)
        self.assertEqual(download.body, self.original)
        self.assert_others_were_served()
        record("Faults during downloads", "update replaced by a rename during a download",
               "complete original bytes; the next request gets the new file; others served")

    def test_truncated_during_download_then_resumed(self):
        curl = require_binary("curl")

        def truncate():
            os.truncate(self.path, 0)
        download = self.download_with_fault(truncate)
        self.assertTrue(download.closed_early, "a short answer must end in a closed connection")
        self.assertEqual(download.body, self.original[:len(download.body)], "the bytes sent were the original's")
        self.assertTrue(wait_until(lambda: "changed during the download" in self.server.log(), 2))
        with open(self.path, "r+b") as restored:   # the operator copies the same update in again
            restored.write(self.original)
        partial = os.path.join(self.tmp, "partial")
        with open(partial, "wb") as out:
            out.write(download.body)
        subprocess.run([curl, "-sS", "-C", "-", "-o", partial, self.server.url("/update/" + os.path.basename(
            self.path))], check=True)
        with open(partial, "rb") as resumed:
            self.assertEqual(resumed.read(), self.original)
        self.assert_others_were_served()
        record("Faults during downloads", "update truncated in place during a download, then copied in again",
               "connection closed after %d of %d bytes, never past the truncation; curl -C - completed "
               "to the original bytes" % (len(download.body), self.SIZE))

    def test_updates_folder_removed_and_restored(self):
        moved = self.updates + ".away"
        download = self.download_with_fault(lambda: os.rename(self.updates, moved))
        self.assertEqual(download.body, self.original)
        self.assertTrue(wait_until(lambda: self.server.health()["ok"] is False, 2))
        self.assertEqual(self.server.get("/ls").body, b"")
        os.rename(moved, self.updates)
        self.assertTrue(wait_until(lambda: self.server.health()["ok"] is True, 2))
        self.assertTrue(wait_until(lambda: self.server.get("/version").body == b"1700000000", 2))
        self.assert_others_were_served()
        record("Faults during downloads", "updates folder removed while a download ran, then restored",
               "download complete; / answered ok=false with the reason, then ok=true; updates offered again")

    def test_sigterm_during_download(self):
        download = SlowDownload(self.server.port, "/update/" + os.path.basename(self.path), self.RATE)
        download.start()
        time.sleep(0.5)
        started = time.monotonic()
        self.assertEqual(self.server.stop(signal.SIGTERM), 0)
        stopped_in = time.monotonic() - started
        download.join(30)
        self.assertIsNone(download.error)
        self.assertFalse(download.closed_early)
        self.assertEqual(download.body, self.original)
        self.assertLess(stopped_in, 10)
        record("Faults during downloads", "SIGTERM with an 8 MB download in flight (shutdown_grace 10 s)",
               "download completed with the original bytes; exit status 0 after %.1f s" % stopped_in)
