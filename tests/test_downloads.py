"""Downloads: the box's real wget flow, resuming, byte ranges, validators, streaming memory."""

import email.utils
import http.client
import os
import subprocess
import time
import unittest

from support import (InProcessServer, SlowDownload, TempDirTestCase, archive_bytes, file_member, make_update, publish,
                     record, require_binary, update_members, wait_until)

import box_update_server as bus


class DownloadTest(TempDirTestCase):

    def setUp(self):
        super().setUp()
        # a realistic, incompressible update of about 1.5 MB
        members = update_members(1700000000) + [
            file_member("opq-box-update-1700000000/box-config-daemon/firmware.bin", os.urandom(1500000))]
        self.path = make_update(self.updates, 1700000000, members, mtime=time.time() - 60)
        self.name = os.path.basename(self.path)
        with open(self.path, "rb") as archive:
            self.data = archive.read()
        self.server = self.start_server()

    def get(self, **headers):
        return self.server.get("/update/" + self.name, {k.replace("_", "-"): v for k, v in headers.items()})

    def test_box_update_flow_with_real_wget_and_tar(self):
        require_binary("wget")
        require_binary("tar")
        box = os.path.join(self.tmp, "box")
        os.mkdir(box)
        make_update(self.updates, 1600000000, mtime=time.time() - 60)   # older: must not be chosen
        command = "wget {0}/latest -O update.tar.bz2 && tar xf update.tar.bz2 && cat opq-box-update-*/VERSION"
        finished = subprocess.run(["bash", "-c", command.format(self.server.url(""))], cwd=box,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.assertEqual(finished.returncode, 0, finished.stderr)
        self.assertEqual(finished.stdout.decode().strip(), "1700000000")
        self.assertTrue(os.access(os.path.join(box, "opq-box-update-1700000000", "install_update.sh"), os.X_OK))

    def resume_with(self, command):
        partial = os.path.join(self.tmp, "partial.tar.bz2")
        with open(partial, "wb") as out:
            out.write(self.data[:len(self.data) // 3])
        finished = subprocess.run(command + [partial, self.server.url("/update/" + self.name)],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.assertEqual(finished.returncode, 0, finished.stderr)
        with open(partial, "rb") as resumed:
            self.assertEqual(resumed.read(), self.data)
        self.assertIn('"GET /update/%s" 206 %d' % (self.name, len(self.data) - len(self.data) // 3),
                      self.server.log())

    def test_curl_resume_ends_with_identical_bytes(self):
        self.resume_with([require_binary("curl"), "-sS", "-C", "-", "-o"])

    def test_wget_resume_ends_with_identical_bytes(self):
        self.resume_with([require_binary("wget"), "-q", "-c", "-O"])

    def test_single_ranges(self):
        size = len(self.data)
        for header, first, last in [("bytes=0-99", 0, 99), ("bytes=1000-", 1000, size - 1),
                                    ("bytes=-500", size - 500, size - 1), ("bytes=10-%d" % (size * 2), 10, size - 1)]:
            with self.subTest(range=header):
                answer = self.get(Range=header)
                self.assertEqual(answer.status, 206)
                self.assertEqual(answer.header("Content-Range"), "bytes %d-%d/%d" % (first, last, size))
                self.assertEqual(answer.header("Content-Length"), str(last - first + 1))
                self.assertEqual(answer.body, self.data[first:last + 1])

    def test_unsatisfiable_range_is_416(self):
        answer = self.get(Range="bytes=%d-" % len(self.data))
        self.assertEqual(answer.status, 416)
        self.assertEqual(answer.header("Content-Range"), "bytes */%d" % len(self.data))

    def test_malformed_range_is_ignored(self):
        for header in ["bytes=oops", "bytes=9-1", "bytes=0-1,5-9", "lines=1-2"]:
            with self.subTest(range=header):
                answer = self.get(Range=header)
                self.assertEqual((answer.status, answer.body), (200, self.data))

    def test_an_update_is_cacheable_for_good(self):
        answer = self.get()
        self.assertEqual(answer.header("Cache-Control"), "public, max-age=31536000, immutable")
        self.assertEqual(self.get(Range="bytes=0-9").header("Cache-Control"), "public, max-age=31536000, immutable")
        checksum = self.server.get("/update/%s.sha256" % self.name)
        self.assertEqual(checksum.header("Cache-Control"), "public, max-age=31536000, immutable")
        revalidated = self.server.get("/update/%s.sha256" % self.name, {"If-None-Match": checksum.header("ETag")})
        self.assertEqual((revalidated.status, revalidated.body), (304, b""))

    def test_range_is_for_get_only(self):
        answer = self.server.request("HEAD", "/update/" + self.name, {"Range": "bytes=0-9"})
        self.assertEqual((answer.status, answer.header("Content-Length")), (200, str(len(self.data))))

    def test_validators(self):
        answer = self.get()
        etag, modified = answer.header("ETag"), answer.header("Last-Modified")
        self.assertRegex(etag, r'^"[0-9a-f-]+"$')
        self.assertEqual(email.utils.parsedate_to_datetime(modified).timestamp(),
                         int(os.stat(self.path).st_mtime))
        self.assertEqual(answer.header("Accept-Ranges"), "bytes")
        self.assertEqual(self.get().header("ETag"), etag, "the ETag is stable")

        not_modified = self.get(If_None_Match=etag)
        self.assertEqual((not_modified.status, not_modified.body, not_modified.header("ETag")), (304, b"", etag))
        self.assertEqual(self.get(If_Modified_Since=modified).status, 304)
        self.assertEqual(self.get(If_None_Match='"stale"').status, 200)
        self.assertEqual(self.get(If_Match='"stale"').status, 412)
        self.assertEqual(self.get(If_Range=etag, Range="bytes=0-9").status, 206)
        stale = self.get(If_Range='"stale"', Range="bytes=0-9")
        self.assertEqual((stale.status, stale.body), (200, self.data))

    def test_etag_changes_when_the_file_is_replaced(self):
        etag = self.get().header("ETag")
        replacement = archive_bytes(update_members(1700000000))
        publish(self.path, replacement, mtime=time.time() - 30)
        self.assertTrue(wait_until(lambda: self.get().body == replacement, 10))
        self.assertNotEqual(self.get().header("ETag"), etag)
        self.assertEqual(self.get(If_Range=etag, Range="bytes=0-9").body, replacement)


class SlowDownloadTest(TempDirTestCase):
    """Slow is not idle: a download that keeps moving is never cut; one that stops is, and the log says how far."""

    SIZE = 6 << 20

    def setUp(self):
        super().setUp()
        self.data = os.urandom(self.SIZE)
        publish(os.path.join(self.updates, "opq-box-update-1700000000.tar.bz2"), self.data, mtime=time.time() - 60)
        self.path = "/update/opq-box-update-1700000000.tar.bz2"

    def test_a_steady_download_longer_than_the_idle_timeout_completes(self):
        # more than the kernel buffers hold, read at 1 MB/s against a 1 s idle timeout: sendfile waits for
        # writable space far longer than 1 s between sends, and the client never stops moving
        server = self.start_server(verify_updates=False, idle_timeout=1)
        download = SlowDownload(server.port, self.path, 1 << 20)
        download.start()
        download.join(60)
        self.assertIsNone(download.error)
        self.assertFalse(download.closed_early)
        self.assertEqual(download.body, self.data)
        self.assertTrue(wait_until(lambda: server.access_lines('"GET %s" 200 %d ' % (self.path, self.SIZE)), 5))
        record("Slow and idle clients", "a 6 MB download read steadily at 1 MB/s through a 32 kB receive "
               "buffer, idle_timeout 1 s", "completed with identical bytes; the access line counts all %d bytes"
               % self.SIZE)

    def test_a_stalled_download_is_cut_and_logged_with_the_bytes_that_left(self):
        server = self.start_server(verify_updates=False, idle_timeout=1)
        download = SlowDownload(server.port, self.path, 0)
        download.start()
        self.addCleanup(download.resume.set)
        self.assertTrue(wait_until(lambda: server.access_lines('"GET %s" 200 ' % self.path), 15), server.log())
        line = server.access_lines('"GET %s" 200 ' % self.path)[0]
        logged = int(line.split('" 200 ')[1].split()[0])
        self.assertGreater(logged, 0)
        self.assertLess(logged, self.SIZE // 2, "the client read nothing; the kernel buffers hold a few MB at most")
        self.assertIn("cut after", server.log())
        download.resume.set()
        download.join(30)
        self.assertTrue(download.closed_early)
        self.assertEqual(download.body, self.data[:len(download.body)])


class ChangedFileTest(TempDirTestCase):
    """The bytes a box receives are the bytes that were checked, or the connection closes early."""

    class SmallChunkHandler(bus.ConnectionHandler):
        copy_chunk = 64 << 10

    def test_a_file_changed_after_its_check_is_not_served(self):
        path = make_update(self.updates, 1700000000, mtime=time.time() - 60)
        with open(path, "rb") as archive:
            data = archive.read()
        server = InProcessServer(self, self.updates)
        self.assertEqual(server.get("/update/" + os.path.basename(path)).body, data)
        server.catalog.stop()            # the watcher sleeps: only the identity check can notice
        with open(path, "r+b") as rewrite:
            rewrite.write(b"BZh9 rewritten in place")
        answer = server.get("/update/" + os.path.basename(path))
        self.assertEqual((answer.status, answer.body), (404, b"Resource not found."))
        self.assertIn(os.path.basename(path), server.catalog.watcher._requested)  # pylint: disable=W0212

    def test_a_file_rewritten_during_a_download_ends_it_at_the_next_chunk(self):
        size = 8 << 20      # more than the kernel buffers take while the client stalls
        path = os.path.join(self.updates, "opq-box-update-1700000000.tar.bz2")
        data = os.urandom(size)
        publish(path, data, mtime=time.time() - 60)
        server = InProcessServer(self, self.updates, handler=self.SmallChunkHandler, verify_updates=False)
        download = SlowDownload(server.port, "/update/" + os.path.basename(path), 0)
        download.start()
        self.assertTrue(download.headers_received.wait(10))
        time.sleep(0.5)                                # the server fills the buffers and waits
        with open(path, "r+b") as rewrite:             # same size, other bytes: only the identity shows it
            rewrite.seek(size // 2)
            rewrite.write(os.urandom(size // 2))
        download.resume.set()
        download.join(60)
        self.assertIsNone(download.error)
        self.assertTrue(download.closed_early, "the whole changed file was sent")
        self.assertTrue(any("the file changed" in line for line in server.log), server.log)


class StreamingMemoryTest(TempDirTestCase):

    def test_memory_does_not_grow_with_the_file(self):
        size = 256 << 20
        path = os.path.join(self.updates, "opq-box-update-1700000000.tar.bz2")
        with open(path, "wb") as big:
            big.truncate(size)
        server = self.start_server(verify_updates=False)
        before = server.peak_rss_kb()
        connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
        connection.request("GET", "/update/opq-box-update-1700000000.tar.bz2")
        answer = connection.getresponse()
        received = 0
        for chunk in iter(lambda: answer.read(1 << 20), b""):
            received += len(chunk)
        connection.close()
        self.assertEqual(received, size)
        self.assertLess(server.peak_rss_kb() - before, 16 << 10,
                        "serving %d MB raised the peak RSS from %d kB to %d kB"
                        % (size >> 20, before, server.peak_rss_kb()))


if __name__ == "__main__":
    unittest.main()
