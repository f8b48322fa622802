"""Reliability and security: load, slow and hostile clients, special files, archive bombs, faults during downloads.

Loopback only (other clients are other addresses in 127.0.0.0/8), bounded in count and time.  With
RELIABILITY_REPORT=<file> the figures are written as the README's Reliability table (see support.record).
"""

import bz2
import http.client
import os
import random
import shutil
import socket
import subprocess
import tarfile
import threading
import time

from support import (HealthWatcher, ServerProcess, SlowDownload, TempDirTestCase, connect, file_member, heavy,
                     make_update, publish, python_executable, raw_exchange, record, require_binary, status_of,
                     update_members, wait_until, SERVER)

SECRET = b"SECRET-MARKER-7f3a9c"


def percentile(values, fraction):
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * fraction))]


class Slowloris(threading.Thread):
    """An attacker at one address: as many connections as it can get, each trickling a request head
    one byte at a time, below any idle timeout, and reconnecting whenever one is closed."""

    def __init__(self, port, source, connections, duration, interval=0.5):
        super().__init__(daemon=True)
        self.port, self.source, self.connections = port, source, connections
        self.duration, self.interval = duration, interval
        self.held_most = 0
        self.refused = 0

    def run(self):
        sockets = []
        deadline = time.monotonic() + self.duration
        while time.monotonic() < deadline:
            while len(sockets) < self.connections:
                try:
                    sockets.append(connect(self.port, self.source, timeout=1))
                except OSError:
                    break
            time.sleep(self.interval)
            alive = []
            for connection in sockets:
                try:
                    connection.settimeout(0)
                    try:
                        connection.recv(100)     # an answer (503, 408) or the end of the connection
                        self.refused += 1
                        connection.close()
                        continue
                    except BlockingIOError:
                        pass
                    connection.send(b"x")
                    alive.append(connection)
                except OSError:
                    connection.close()
            sockets = alive
            self.held_most = max(self.held_most, len(sockets))
        for connection in sockets:
            connection.close()


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


class SlowAndHostileClientsTest(TempDirTestCase):
    """No single client, nor a few, can starve the rest: OPQ Health's / keeps answering within 2 s."""

    def slowloris(self, addresses, max_connections=100):
        make_update(self.updates, 1700000000, mtime=time.time() - 60)
        server = self.start_server(max_connections=max_connections)
        watcher = HealthWatcher(server.port, source="127.0.0.1")
        attackers = [Slowloris(server.port, "127.0.0.%d" % (2 + index), max_connections, 6) for index in
                     range(addresses)]
        for attacker in attackers:
            attacker.start()
        time.sleep(1)
        watcher.start()
        for attacker in attackers:
            attacker.join(30)
        watcher.stop()
        self.assertEqual(watcher.failures, [])
        self.assertLess(max(watcher.latencies), 2.0)
        self.assertIsNone(server.process.poll())
        return server, attackers, watcher

    def test_one_address_trickling_heads_at_the_connection_cap(self):
        server, attackers, watcher = self.slowloris(1)
        self.assertLessEqual(attackers[0].held_most, 25, "a quarter of max_connections per address")
        record("Slow and idle clients", "slowloris from one address: 100 connections (max_connections 100) "
               "trickling request heads a byte every 0.5 s for 6 s",
               "it held at most %d (a quarter); OPQ Health's / answered %d times, p50 %.0f ms, max %.0f ms"
               % (attackers[0].held_most, len(watcher.latencies), percentile(watcher.latencies, 0.5) * 1000,
                  max(watcher.latencies) * 1000))

    def test_four_addresses_trickling_heads_fill_every_slot(self):
        server, attackers, watcher = self.slowloris(4)
        self.assertGreater(sum(attacker.held_most for attacker in attackers), 90, "the attack filled the server")
        record("Slow and idle clients", "slowloris from four addresses at a quarter of max_connections each (the "
               "server full), trickling for 6 s",
               "stalled heads older than 1 s gave their slots up to newcomers; OPQ Health's / answered %d times, "
               "p50 %.0f ms, max %.0f ms"
               % (len(watcher.latencies), percentile(watcher.latencies, 0.5) * 1000, max(watcher.latencies) * 1000))

    def test_five_hundred_stalled_connections_are_closed_by_the_head_deadline(self):
        server = self.start_server(request_header_timeout=2, idle_timeout=30)
        stalled = []
        self.addCleanup(lambda: [connection.close() for connection in stalled])
        for index in range(500):
            connection = connect(server.port, "127.0.0.%d" % (10 + index % 5))
            connection.sendall(b"GET /update/opq-box-update-1700000000.tar.bz2 HTTP/1.1\r\nHost: x\r\nRange: by")
            stalled.append(connection)
        started = time.monotonic()
        self.assertEqual(server.get("/").status, 200)
        served_in = time.monotonic() - started
        self.assertLess(served_in, 2.0)
        deadline = time.monotonic() + 30
        answers = {}
        for connection in stalled:
            connection.settimeout(max(0.1, deadline - time.monotonic()))
            try:
                status = status_of(connection.recv(200))
            except (ConnectionResetError, socket.timeout):
                status = None
            answers[status] = answers.get(status, 0) + 1
        closed_after = time.monotonic() - started
        self.assertEqual(answers, {408: 500})
        record("Slow and idle clients", "500 connections from 5 addresses each sending half a request head, then "
               "stalling (request_header_timeout 2 s, idle_timeout 30 s)",
               "a new client served in %.0f ms; all 500 answered 408 and closed within %.1f s"
               % (served_in * 1000, closed_after))

    def test_smuggled_requests_are_never_answered(self):
        """RFC 9112 §6.3: framing a proxy and this server could read differently ends in 400 and a close."""
        server = self.start_server()
        smuggled = b"GET /version HTTP/1.1\r\nHost: x\r\n\r\n"
        shapes = {
            "two Content-Length": b"Content-Length: 0\r\nContent-Length: %d\r\n" % len(smuggled),
            "empty Transfer-Encoding, then chunked": b"Transfer-Encoding: \r\nTransfer-Encoding: chunked\r\n",
            "a line without a colon before Content-Length": b"X-Junk\r\nContent-Length: %d\r\n" % len(smuggled),
            "Content-Length with a space before its colon": b"Content-Length : %d\r\n" % len(smuggled),
            "Transfer-Encoding and Content-Length": b"Transfer-Encoding: chunked\r\nContent-Length: 3\r\n",
        }
        for shape, headers in shapes.items():
            with self.subTest(shape=shape):
                raw = raw_exchange(server.port, b"GET /ls HTTP/1.1\r\nHost: x\r\n" + headers + b"\r\n" + smuggled)
                self.assertEqual(status_of(raw), 400, raw)
                self.assertEqual(raw.count(b"HTTP/1.1 "), 1, "the body was answered as a second request")
                self.assertIn(b"Connection: close\r\n", raw)
        raw = raw_exchange(server.port, b"GET /ls HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip, chunked\r\n\r\n")
        self.assertEqual(status_of(raw), 501)
        self.assertEqual(server.get("/").status, 200)
        record("Hostile input", "request smuggling: %s; and a transfer coding it does not read"
               % "; ".join(shapes), "each 400 and the connection closed, the smuggled request never answered; "
               "gzip, chunked: 501")


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
        self.assertTrue(download.headers_received.wait(10))    # under way: the fault hits mid-download
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
        self.assertLess(max(watcher.latencies), 2.0)
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
        self.assertTrue(wait_until(lambda: "the file changed" in self.server.log(), 5))
        with open(self.path, "r+b") as restored:   # the operator copies the same update in again
            restored.write(self.original)
        partial = os.path.join(self.tmp, "partial")
        with open(partial, "wb") as out:
            out.write(download.body)
        name = os.path.basename(self.path).encode()       # offered again once it stopped changing
        self.assertTrue(wait_until(lambda: name in self.server.get("/ls").body.split(b"\n"), 10), self.server.log())
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
        self.assertTrue(wait_until(lambda: self.server.health()["ok"] is False, 5))
        self.assertIn("is missing or was deleted", self.server.health()["info"])
        self.assertEqual(self.server.get("/ls").body, b"")
        os.rename(moved, self.updates)
        self.assertTrue(wait_until(lambda: self.server.health()["ok"] is True, 5))
        self.assertTrue(wait_until(lambda: self.server.get("/version").body == b"1700000000", 5))
        self.assert_others_were_served()
        record("Faults during downloads", "updates folder removed while a download ran, then restored",
               "download complete; / answered ok=false with the reason, then ok=true; updates offered again")


class HealthTruthTest(TempDirTestCase):
    """/ says ok only while the updates folder can be served."""

    def test_a_deleted_bind_mount_source_is_reported(self):
        """As in Docker with -v: the mount point stays, the folder behind it is gone (link count 0)."""
        if os.geteuid() != 0 or not shutil.which("unshare"):
            self.skipTest("needs root and unshare(1) for a private mount namespace")
        source, mount_point = os.path.join(self.tmp, "host-updates"), self.updates
        os.mkdir(source)
        make_update(source, 1700000000)
        probe = subprocess.run(["unshare", "--mount", "--propagation", "private", "true"], stderr=subprocess.PIPE)
        if probe.returncode != 0:
            self.skipTest("cannot make a mount namespace here: %s" % probe.stderr.decode().strip())
        command = ["unshare", "--mount", "--propagation", "private", "sh", "-c",
                   'mount --bind "$0" "$1" && exec "$2" "$3"', source, mount_point, python_executable(), SERVER]
        server = ServerProcess(self.updates, command=command)
        self.addCleanup(server.__exit__)
        server.start()
        self.assertEqual(server.get("/version").body, b"1700000000")
        shutil.rmtree(source)
        started = time.monotonic()
        self.assertTrue(wait_until(lambda: server.health()["ok"] is False, 10), server.health())
        record("Faults during downloads", "the source of the updates folder's bind mount deleted (as with docker "
               "run -v), the mount point left in place", "/ answered ok=false (\"%s\") after %.1f s"
               % (server.health()["info"].split(" is ")[1], time.monotonic() - started))

    def test_a_file_unreadable_at_first_is_offered_once_readable(self):
        path = make_update(self.updates, 1700000000, mtime=time.time() - 60)
        os.chmod(path, 0)
        server = self.start_server_as("nobody", wait_for_checks=False)
        self.assertTrue(wait_until(lambda: "rejected" in server.health().get("info", ""), 10), server.log())
        self.assertIn("Permission denied", server.log())
        os.chmod(path, 0o644)
        started = time.monotonic()
        self.assertTrue(wait_until(lambda: server.get("/version").status == 200, 10), server.log())
        record("Faults during downloads", "an update unreadable by the server (mode 000) when first seen, then "
               "made readable", "rejected as unreadable, then checked again on the mode change and offered "
               "after %.1f s" % (time.monotonic() - started))


class ArchiveBombTest(TempDirTestCase):

    @heavy
    def test_a_long_name_bomb_does_not_bloat_the_server(self):
        declared = 300 << 20
        compressor = bz2.BZ2Compressor(9)
        header = tarfile.TarInfo("././@LongLink")
        header.type, header.size = tarfile.GNUTYPE_LONGNAME, declared
        parts = [compressor.compress(header.tobuf(tarfile.GNU_FORMAT))]
        chunk = b"a" * (1 << 20)
        for _ in range(declared >> 20):
            parts.append(compressor.compress(chunk))
        bomb = b"".join(parts) + compressor.flush()
        server = self.start_server()
        before = server.peak_rss_kb()
        publish(os.path.join(self.updates, "opq-box-update-1700000000.tar.bz2"), bomb)
        self.assertTrue(wait_until(lambda: "rejected" in server.health().get("info", ""), 30))
        growth = server.peak_rss_kb() - before
        self.assertIn("declares %d bytes of names or pax data" % declared, server.log())
        self.assertLess(growth, 16 << 10)
        record("Hostile input", "an archive of %d bytes whose tar stream declares a 300 MB GNU long name "
               "(and holds it)" % len(bomb), "rejected at its header; peak RSS +%d kB" % growth)


class HugeFolderTest(TempDirTestCase):
    """A folder costs nothing between changes, at any size; checking at start grows linearly."""

    def fill(self, count, first=1600000000):
        for version in range(first, first + count):
            with open(os.path.join(self.updates, "opq-box-update-%d.tar.bz2" % version), "wb") as junk:
                junk.write(b"not an update")

    def start_and_time(self, newest):
        started = time.monotonic()
        server = self.start_server(wait_for_checks=False)
        self.assertTrue(wait_until(lambda: server.get("/version").body == str(newest).encode(), 60))
        newest_after = time.monotonic() - started
        self.assertTrue(wait_until(lambda: "waiting" not in server.health().get("info", ""), 600, interval=0.5))
        return server, newest_after, time.monotonic() - started

    @heavy
    def test_a_hundred_thousand_files(self):
        self.fill(20000)
        make_update(self.updates, 1800000000, mtime=time.time() - 60)
        small, _, small_all = self.start_and_time(1800000000)
        small.stop()
        self.fill(80000, first=1620000000)
        server, newest_after, all_after = self.start_and_time(1800000000)
        self.assertLess(newest_after, 2.0 * 3, "the newest update within 2 s of start (3x on a busy machine)")
        self.assertLess(all_after, small_all * 5 * 2, "checking 5x the files took %.1f s against %.1f s"
                        % (all_after, small_all))
        time.sleep(3)
        used_before, started = server.cpu_seconds(), time.monotonic()
        time.sleep(10)
        idle = (server.cpu_seconds() - used_before) / (time.monotonic() - started)
        self.assertLess(idle, 0.01, "idle CPU %.2f%% of a core" % (idle * 100))
        record("Load", "100,000 files in the updates folder (99,999 rejected, 1 good)",
               "the newest update offered %.1f s after start; all checked in %.0f s (20,000: %.0f s); idle CPU "
               "%.2f%% of a core; RSS %d MB"
               % (newest_after, all_after, small_all, idle * 100, server.rss_kb() >> 10))
