"""One answer path: every route and status gets its header fields from answer_fields, chosen by status.

An error is never cached as if it were the update, representation metadata goes only with content
(200, 206), and a 304 carries only what RFC 9110 §15.4.5 allows.
"""

import os
import time
import unittest

from support import (InProcessServer, TempDirTestCase, bus, hold_connections, close_all, make_update, raw_exchange,
                     request, status_of, wait_until)

REPRESENTATION = ("ETag", "Last-Modified", "Repr-Digest", "Content-Disposition", "Accept-Ranges")
ALLOWED_IN_304 = {"ETag", "Cache-Control", "Date", "Server", "Connection", "Vary", "Content-Location", "Expires"}


def head_fields(raw):
    """The status and the header fields of a raw answer, names as sent."""
    head = raw.split(b"\r\n\r\n", 1)[0].decode("latin-1").split("\r\n")
    fields = {}
    for line in head[1:]:
        name, _, value = line.partition(":")
        fields[name] = value.strip()
    return int(head[0].split()[1]), fields


class AnswerFieldsTest(unittest.TestCase):
    """answer_fields alone, without a socket."""

    def fields(self, answer):
        return dict(bus.answer_fields(answer))

    def test_errors_are_revalidated_whatever_the_route_asks(self):
        for status in (400, 404, 405, 412, 416, 431, 500, 503):
            fields = self.fields(bus.Answer(status, "/update", b"x", fields=(("ETag", '"e"'),),
                                            cache=bus.CACHE_IMMUTABLE))
            self.assertEqual(fields["Cache-Control"], "no-cache", status)
            self.assertNotIn("ETag", fields, status)

    def test_successes_keep_their_route_policy_and_metadata(self):
        for status in (200, 206):
            fields = self.fields(bus.Answer(status, "/update", b"abc", "application/octet-stream",
                                            tuple((name, "v") for name in REPRESENTATION), bus.CACHE_IMMUTABLE))
            self.assertEqual(fields["Cache-Control"], bus.CACHE_IMMUTABLE)
            self.assertEqual(fields["Content-Length"], "3")
            for name in REPRESENTATION:
                self.assertIn(name, fields)

    def test_not_modified_carries_only_what_a_304_may(self):
        fields = self.fields(bus.Answer(304, "/update", b"", "text/plain",
                                        tuple((name, "v") for name in REPRESENTATION), bus.CACHE_IMMUTABLE))
        self.assertEqual(set(fields), {"ETag", "Cache-Control"})
        self.assertEqual(fields["Cache-Control"], bus.CACHE_IMMUTABLE)

    def test_a_file_body_gives_the_length(self):
        body = bus.FileBody(-1, 10, 90, None, "x")
        fields = self.fields(bus.Answer(206, "/update", b"", "application/octet-stream", file=body))
        self.assertEqual(fields["Content-Length"], "90")

    def test_refusals_take_the_same_path(self):
        status, fields = head_fields(bus.REFUSALS["full"])
        self.assertEqual((status, fields["Cache-Control"], fields["Connection"]), (503, "no-cache", "close"))
        self.assertEqual(int(fields["Content-Length"]), len(bus.REFUSALS["full"].split(b"\r\n\r\n", 1)[1]))


class EveryRouteAndStatusTest(TempDirTestCase):
    """The real server: each route and each status it can answer, and the fields that come with it."""

    @classmethod
    def setUpClass(cls):
        class BrokenRoutes(bus.UpdateRoutes):
            def version(self, request):
                raise RuntimeError("a bug in a route")
        cls.broken_routes = BrokenRoutes

    def setUp(self):
        super().setUp()
        self.name = os.path.basename(make_update(self.updates, 7, mtime=time.time() - 60))
        self.server = InProcessServer(self, self.updates, routes=self.broken_routes)

    def exchange(self, method, path, headers=()):
        lines = ["%s %s HTTP/1.1" % (method, path), "Host: x", "Connection: close"] + list(headers)
        return head_fields(raw_exchange(self.server.port, ("\r\n".join(lines) + "\r\n\r\n").encode()))

    def test_every_route_and_status(self):
        update = "/update/" + self.name
        etag = request(self.server.port, "GET", update).header("ETag")
        ls_etag = request(self.server.port, "GET", "/ls").header("ETag")
        cases = [
            ("GET", "/", (), 200, "no-cache"),
            ("GET", "/ls", (), 200, "no-cache"),
            ("GET", "/ls", ("If-None-Match: " + ls_etag,), 304, "no-cache"),
            ("GET", "/ls", ('If-Match: "other"',), 412, "no-cache"),
            ("GET", "/latest", (), 303, "no-cache"),
            ("GET", "/version", (), 500, "no-cache"),
            ("GET", "/metrics", (), 200, "no-store"),
            ("GET", "/status", (), 200, "no-store"),
            ("GET", "/fleet", (), 404, "no-cache"),          # no rollout here: test_fleet covers its 200
            ("GET", update, (), 200, bus.CACHE_IMMUTABLE),
            ("HEAD", update, (), 200, bus.CACHE_IMMUTABLE),
            ("GET", update, ("Range: bytes=0-9",), 206, bus.CACHE_IMMUTABLE),
            ("GET", update, ("If-None-Match: " + etag,), 304, bus.CACHE_IMMUTABLE),
            ("GET", update, ('If-Match: "other"',), 412, "no-cache"),
            ("GET", update, ("Range: bytes=99999999-",), 416, "no-cache"),
            ("GET", update + ".sha256", (), 200, bus.CACHE_IMMUTABLE),
            ("GET", "/update/opq-box-update-8.tar.bz2", (), 404, "no-cache"),
            ("GET", "/elsewhere", (), 404, "no-cache"),
            ("POST", "/ls", (), 405, "no-cache"),
            ("GET", "/", ["X-Many: 1"] * 101, 431, "no-cache"),
        ]
        for method, path, headers, status, cache in cases:
            with self.subTest(method=method, path=path, headers=headers[:1]):
                got, fields = self.exchange(method, path, headers)
                self.assertEqual(got, status, fields)
                self.assertEqual(fields.get("Cache-Control"), cache)
                if status == 304:
                    self.assertLessEqual(set(fields), ALLOWED_IN_304)
                elif status in (200, 206) and path == update:
                    for name in REPRESENTATION:
                        self.assertIn(name, fields)
                else:
                    for name in REPRESENTATION[1:]:
                        self.assertNotIn(name, fields)
                if status >= 400:
                    self.assertNotIn("ETag", fields)
                if status == 416:
                    self.assertEqual(fields["Content-Range"], "bytes */%d" % os.path.getsize(
                        os.path.join(self.updates, self.name)))

    def test_bad_request_before_any_route(self):
        raw = raw_exchange(self.server.port, b"GET / HTTP/1.1\r\n\r\n")     # no Host
        status, fields = head_fields(raw)
        self.assertEqual((status, fields["Cache-Control"], fields["Connection"]), (400, "no-cache", "close"))

    def test_refused_connection(self):
        server = InProcessServer(self, self.updates, max_connections_per_client=1)
        held = hold_connections(server.port, 1)
        self.addCleanup(close_all, held)
        self.assertTrue(wait_until(lambda: server.server.connections.open_count() == 1, 10))
        raw = raw_exchange(server.port, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        status, fields = head_fields(raw)
        self.assertEqual((status, fields["Cache-Control"]), (503, "no-cache"))
        self.assertEqual(status_of(raw), 503)


if __name__ == "__main__":
    unittest.main()
