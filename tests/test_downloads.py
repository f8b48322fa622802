"""Downloads: the box's real wget flow, resuming, byte ranges, validators, streaming memory."""

import email.utils
import http.client
import os
import subprocess
import time
import unittest

from support import (TempDirTestCase, archive_bytes, file_member, make_update, publish, require_binary, update_members,
                     wait_until)

import box_update_server as bus


class ParseRangeTest(unittest.TestCase):
    """RFC 9110 §14.1.2 byte ranges, without sockets."""

    def test_satisfiable_ranges(self):
        cases = {"bytes=0-9": (0, 9), "bytes=10-": (10, 99), "bytes=-10": (90, 99), "bytes=90-500": (90, 99),
                 "bytes=-500": (0, 99), "BYTES = 5-5": (5, 5), "bytes=0-9,": (0, 9), "bytes=99-99": (99, 99)}
        for header, expected in cases.items():
            with self.subTest(header=header):
                self.assertEqual(bus.parse_range(header, 100), expected)

    def test_unsatisfiable_ranges(self):
        for header, size in [("bytes=100-", 100), ("bytes=100-200", 100), ("bytes=-0", 100), ("bytes=0-", 0),
                             ("bytes=-5", 0)]:
            with self.subTest(header=header, size=size):
                with self.assertRaises(bus.RangeNotSatisfiable):
                    bus.parse_range(header, size)

    def test_malformed_or_multiple_ranges_are_ignored(self):
        for header in ["bytes=", "bytes=-", "bytes=a-b", "bytes=5-1", "items=0-9", "bytes 0-9", "bytes=0-9,20-29",
                       "bytes=\u0661-\u0662", "bytes=1.5-2", "bytes=--1", "bytes=0x10-", "", "bytes=1-2-3"]:
            with self.subTest(header=header):
                self.assertIsNone(bus.parse_range(header, 100))


class PreconditionsTest(unittest.TestCase):
    """RFC 9110 §13 conditional requests, without sockets."""

    ETAG = '"abc-1"'
    MODIFIED = 1700000000

    def evaluate(self, **headers):
        return bus.evaluate_preconditions({k.replace("_", "-"): v for k, v in headers.items()}, self.ETAG,
                                          self.MODIFIED)

    def date(self, seconds):
        return email.utils.formatdate(seconds, usegmt=True)

    def test_no_conditions(self):
        self.assertIsNone(self.evaluate())

    def test_if_none_match(self):
        self.assertEqual(self.evaluate(If_None_Match=self.ETAG), 304)
        self.assertEqual(self.evaluate(If_None_Match='"x", W/"abc-1"'), 304)  # weak comparison
        self.assertEqual(self.evaluate(If_None_Match="*"), 304)
        self.assertIsNone(self.evaluate(If_None_Match='"other"'))
        self.assertIsNone(self.evaluate(If_None_Match="garbage"))

    def test_if_modified_since(self):
        self.assertEqual(self.evaluate(If_Modified_Since=self.date(self.MODIFIED)), 304)
        self.assertIsNone(self.evaluate(If_Modified_Since=self.date(self.MODIFIED - 1)))
        self.assertIsNone(self.evaluate(If_Modified_Since="yesterday"))
        # If-None-Match takes precedence over If-Modified-Since
        self.assertIsNone(self.evaluate(If_None_Match='"other"', If_Modified_Since=self.date(self.MODIFIED)))

    def test_if_match_and_if_unmodified_since(self):
        self.assertIsNone(self.evaluate(If_Match=self.ETAG))
        self.assertEqual(self.evaluate(If_Match='"other"'), 412)
        self.assertEqual(self.evaluate(If_Match='W/"abc-1"'), 412)  # strong comparison
        self.assertEqual(self.evaluate(If_Unmodified_Since=self.date(self.MODIFIED - 1)), 412)
        self.assertIsNone(self.evaluate(If_Unmodified_Since=self.date(self.MODIFIED)))
        self.assertIsNone(self.evaluate(If_Match=self.ETAG, If_Unmodified_Since=self.date(0)))

    def test_if_range(self):
        self.assertTrue(bus.check_if_range(None, self.ETAG, self.MODIFIED))
        self.assertTrue(bus.check_if_range(self.ETAG, self.ETAG, self.MODIFIED))
        self.assertFalse(bus.check_if_range('W/"abc-1"', self.ETAG, self.MODIFIED))
        self.assertFalse(bus.check_if_range('"old"', self.ETAG, self.MODIFIED))
        self.assertTrue(bus.check_if_range(self.date(self.MODIFIED), self.ETAG, self.MODIFIED))
        self.assertFalse(bus.check_if_range(self.date(self.MODIFIED + 1), self.ETAG, self.MODIFIED))
        self.assertFalse(bus.check_if_range("not a date", self.ETAG, self.MODIFIED))


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
