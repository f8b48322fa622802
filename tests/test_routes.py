"""Routes over real HTTP: what boxes, OPQ Health and operators see."""

import json
import os
import subprocess
import time
import unittest
import urllib.parse

from support import (PrefixProxy, ServerProcess, TempDirTestCase, make_update, publish, raw_exchange,
                     require_binary, status_of, wait_until)

OLD, NEW = 999999999, 1000000001   # string order would get these the wrong way round


class RoutesTest(TempDirTestCase):

    def setUp(self):
        super().setUp()
        self.old = os.path.basename(make_update(self.updates, OLD, mtime=time.time() - 60))
        self.new = os.path.basename(make_update(self.updates, NEW, mtime=time.time() - 60))
        publish(os.path.join(self.updates, "opq-box-update-broken.tar.bz2"), b"x")
        publish(os.path.join(self.updates, "README.txt"), b"not an update")
        os.mkdir(os.path.join(self.updates, "opq-box-update-5.tar.bz2"))
        self.server = self.start_server()

    def test_health_matches_the_opq_health_schema(self):
        before = int(time.time())
        answer = self.server.get("/")
        self.assertEqual(answer.status, 200)
        self.assertEqual(answer.header("Content-Type"), "application/json")
        health = json.loads(answer.body)
        self.assertEqual(health["name"], "Box Update Server")
        self.assertIs(health["ok"], True)
        self.assertIsInstance(health["timestamp"], int)
        self.assertTrue(before <= health["timestamp"] <= time.time() + 1)
        self.assertEqual(health["subcomponents"], [])
        self.assertNotIn("info", health)

    def test_ls_lists_updates_oldest_first_without_trailing_newline(self):
        answer = self.server.get("/ls")
        self.assertEqual(answer.status, 200)
        self.assertEqual(answer.header("Content-Type"), "text/plain")
        self.assertEqual(answer.body.decode(), self.old + "\n" + self.new)

    def test_latest_redirects_to_the_newest_update(self):
        answer = self.server.get("/latest")
        self.assertEqual(answer.status, 303)
        target = urllib.parse.urljoin(self.server.url("/latest"), answer.header("Location"))
        self.assertEqual(target, self.server.url("/update/" + self.new))

    def test_version_is_the_newest_version(self):
        answer = self.server.get("/version")
        self.assertEqual((answer.status, answer.header("Content-Type"), answer.body),
                         (200, "text/plain", str(NEW).encode()))

    def test_update_download(self):
        answer = self.server.get("/update/" + self.old)
        self.assertEqual(answer.status, 200)
        self.assertEqual(answer.header("Content-Type"), "application/octet-stream")
        self.assertEqual(answer.header("Content-Disposition"), 'attachment; filename="%s"' % self.old)
        with open(os.path.join(self.updates, self.old), "rb") as archive:
            expected = archive.read()
        self.assertEqual(answer.header("Content-Length"), str(len(expected)))
        self.assertEqual(answer.body, expected)

    def test_not_found(self):
        for path in ["/nope", "/update/", "/update/README.txt", "/update/opq-box-update-broken.tar.bz2",
                     "/update/opq-box-update-5.tar.bz2", "/update/opq-box-update-4.tar.bz2", "/ls/", "/latest/x",
                     "/update/%s/x" % self.new, "/LS"]:
            with self.subTest(path=path):
                answer = self.server.get(path)
                self.assertEqual((answer.status, answer.body), (404, b"Resource not found."))
                self.assertEqual(answer.header("Content-Type"), "text/plain")

    def test_query_string_is_ignored_on_every_route(self):
        for path in ["/", "/ls", "/latest", "/version", "/update/" + self.new, "/update/%s.sha256" % self.new]:
            with self.subTest(path=path):
                plain, queried = self.server.get(path), self.server.get(path + "?box=7&x=%2e%2e")
                self.assertEqual(plain.status, queried.status)
                if path != "/":
                    self.assertEqual(plain.body, queried.body)

    def test_head_gives_the_get_status_and_headers_without_a_body(self):
        for path in ["/", "/ls", "/latest", "/version", "/update/" + self.new, "/nope",
                     "/update/%s.sha256" % self.new]:
            with self.subTest(path=path):
                get, head = self.server.get(path), self.server.request("HEAD", path)
                self.assertEqual(head.status, get.status)
                self.assertEqual(head.body, b"")
                for name in ("Content-Type", "Content-Length", "Location", "ETag", "Last-Modified",
                             "Content-Disposition", "Accept-Ranges", "Repr-Digest", "Cache-Control"):
                    self.assertEqual(head.header(name), get.header(name), name)

    def test_what_names_the_newest_is_revalidated_by_caches_on_every_use(self):
        for path in ["/", "/ls", "/latest", "/version", "/nope", "/update/nope"]:
            with self.subTest(path=path):
                self.assertEqual(self.server.get(path).header("Cache-Control"), "no-cache")

    def test_listing_and_version_revalidate_with_a_cheap_304(self):
        for path in ["/ls", "/version"]:
            with self.subTest(path=path):
                answer = self.server.get(path)
                etag = answer.header("ETag")
                self.assertRegex(etag, r'^"[0-9a-f]{20}"$')
                again = self.server.get(path, {"If-None-Match": etag})
                self.assertEqual((again.status, again.body, again.header("ETag")), (304, b"", etag))
                self.assertEqual(self.server.get(path, {"If-None-Match": '"old"'}).body, answer.body)
        etag = self.server.get("/ls").header("ETag")
        make_update(self.updates, NEW + 1)    # a new update changes the listing, so the ETag
        self.assertTrue(wait_until(lambda: self.server.get("/ls", {"If-None-Match": etag}).status == 200, 5))

    def test_metrics_are_served_to_loopback(self):
        answer = self.server.get("/metrics")
        self.assertEqual(answer.status, 200)
        self.assertEqual(answer.header("Content-Type"), "text/plain; version=0.0.4; charset=utf-8")
        self.assertIn(b"box_update_server_updates_offered 2\n", answer.body)

    def test_request_head_limits(self):
        def answer(path="/ls", fields=()):
            head = "GET %s HTTP/1.1\r\nHost: x\r\n%s\r\n" % (path, "".join("X-%s: y\r\n" % n for n in fields))
            return status_of(raw_exchange(self.server.port, head.encode()))
        line = len("GET  HTTP/1.1\r\n")
        self.assertEqual(answer("/" + "a" * (8192 - line - 1)), 404)
        self.assertEqual(answer("/" + "a" * (8192 - line)), 414)
        self.assertEqual(answer(fields=range(99)), 200)           # with Host, 100 fields
        self.assertEqual(answer(fields=range(100)), 431)
        self.assertEqual(answer(fields=["%d-%s" % (n, "v" * 400) for n in range(80)]), 431)   # over 32 KiB

    def test_other_methods_get_405_with_allow(self):
        for method in ["POST", "PUT", "DELETE", "PATCH", "OPTIONS", "TRACE", "FOO"]:
            with self.subTest(method=method):
                answer = self.server.request(method, "/ls")
                self.assertEqual(answer.status, 405)
                self.assertEqual(answer.header("Allow"), "GET, HEAD")
        self.assertEqual(self.server.get("/ls").status, 200)

    def test_additions_and_removals_show_promptly_on_every_route(self):
        server = ServerProcess(self.updates, verify_updates=False)
        self.addCleanup(server.__exit__)
        server.start()
        newest = make_update(self.updates, NEW + 1)
        self.assertTrue(wait_until(lambda: server.get("/version").body == str(NEW + 1).encode(), 5))
        self.assertTrue(server.get("/ls").body.endswith(os.path.basename(newest).encode()))
        self.assertEqual(server.get("/latest").header("Location"), "update/" + os.path.basename(newest))
        os.unlink(newest)
        self.assertTrue(wait_until(lambda: server.get("/version").body == str(NEW).encode(), 5))
        for name in os.listdir(self.updates):
            os.unlink(os.path.join(self.updates, name)) if not os.path.isdir(os.path.join(self.updates, name)) \
                else os.rmdir(os.path.join(self.updates, name))
        self.assertTrue(wait_until(lambda: server.get("/ls").body == b"", 3))
        self.assertEqual((server.get("/latest").status, server.get("/latest").body), (404, b"Resource not found."))
        self.assertEqual((server.get("/version").status, server.get("/version").body),
                         (404, b"Update dir does not contain any valid updates."))


class EmptyFolderTest(TempDirTestCase):

    def test_no_updates(self):
        server = self.start_server()
        self.assertEqual((server.get("/ls").status, server.get("/ls").body), (200, b""))
        self.assertEqual(server.get("/latest").status, 404)
        self.assertEqual(server.get("/version").body, b"Update dir does not contain any valid updates.")


class TraversalTest(TempDirTestCase):
    """Nothing outside the catalog is served, however the path is spelled."""

    SECRET = b"TOP-SECRET-CONTENT"

    def setUp(self):
        super().setUp()
        make_update(self.updates, 1700000000, mtime=time.time() - 60)
        with open(os.path.join(self.tmp, "secret"), "wb") as secret:
            secret.write(self.SECRET)
        publish(os.path.join(self.updates, "notes.txt"), self.SECRET)
        os.symlink("/", os.path.join(self.updates, "root-link"))
        os.symlink(self.tmp, os.path.join(self.updates, "parent-link"))
        os.symlink(os.path.join(self.tmp, "secret"), os.path.join(self.updates, "opq-box-update-1800000000.tar.bz2"))
        self.server = self.start_server(verify_updates=False)

    def test_traversal_spellings(self):
        spellings = [
            "/update/../secret", "/update/..%2fsecret", "/update/%2e%2e%2fsecret", "/update/%2E%2E/secret",
            "/update/..%252fsecret", "/update/%252e%252e%252fsecret", "/update/..\\secret", "/update/..%5csecret",
            "/update/notes.txt", "/update/notes.txt%00", "/update/opq-box-update-1700000000.tar.bz2%00../secret",
            "/update/%2f" + self.tmp.lstrip("/") + "/secret", "/update/" + self.tmp + "/secret",
            "/update//etc/passwd", "/update/%2fetc%2fpasswd", "/update/root-link/etc/passwd",
            "/update/parent-link/secret", "/update/parent-link%2fsecret", "/update/opq-box-update-1800000000.tar.bz2",
            "/../secret", "/%2e%2e/secret", "/update/.%2e/secret", "//update/../secret", "/update/%c0%ae%c0%ae/secret",
            "/update/..;/secret", "/update/%u002e%u002e/secret",
        ]
        for spelling in spellings:
            with self.subTest(path=spelling):
                raw = raw_exchange(self.server.port, b"GET %s HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
                                   % spelling.encode())
                self.assertIn(status_of(raw), (400, 404), raw[:200])
                self.assertNotIn(self.SECRET, raw)
                self.assertNotIn(b"root:", raw)
        raw = raw_exchange(self.server.port, b"GET /update/notes.txt\x00 HTTP/1.1\r\nHost: x\r\n\r\n")
        self.assertNotIn(self.SECRET, raw)
        self.assertEqual(self.server.get("/ls").body, b"opq-box-update-1700000000.tar.bz2")
        self.assertEqual(self.server.get("/version").status, 200)


class ReverseProxyTest(TempDirTestCase):
    """Boxes reach the public deployment as https://<host>/box-update-server/latest."""

    def test_following_latest_under_a_path_prefix(self):
        path = make_update(self.updates, 1700000000, mtime=time.time() - 60)
        server = self.start_server()
        proxy = PrefixProxy("/box-update-server", server.port)
        self.addCleanup(proxy.close)
        curl = require_binary("curl")
        output = subprocess.run([curl, "-sSL", "-o", os.path.join(self.tmp, "out"), "-w", "%{url_effective}",
                                 "http://127.0.0.1:%d/box-update-server/latest" % proxy.port],
                                stdout=subprocess.PIPE, check=True).stdout.decode()
        self.assertEqual(output, "http://127.0.0.1:%d/box-update-server/update/%s"
                         % (proxy.port, os.path.basename(path)))
        self.assertIn("/box-update-server/update/" + os.path.basename(path), proxy.seen)
        with open(path, "rb") as original, open(os.path.join(self.tmp, "out"), "rb") as downloaded:
            self.assertEqual(original.read(), downloaded.read())


if __name__ == "__main__":
    unittest.main()
