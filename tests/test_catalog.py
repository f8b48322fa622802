"""The catalog: which files are updates, their order, and how it follows the folder (no sockets)."""

import hashlib
import os
import time
import unittest
from unittest import mock

from support import TempDirTestCase, make_update, update_members, archive_bytes, publish, wait_until

import box_update_server as bus


class UpdateNameTest(unittest.TestCase):

    def test_update_names_give_their_version(self):
        self.assertEqual(bus.parse_update_name("opq-box-update-1764547200.tar.bz2"), 1764547200)
        self.assertEqual(bus.parse_update_name("opq-box-update-0.tar.bz2"), 0)

    def test_other_names_are_not_updates(self):
        for name in ["opq-box-update-broken.tar.bz2", ".opq-box-update-1.tar.bz2.part",
                     "opq-box-update-1.tar.bz2.part", "opq-box-update-1.tar.gz", "opq-box-update-.tar.bz2",
                     "xopq-box-update-1.tar.bz2", "opq-box-update-1.tar.bz2/", "opq-box-update--1.tar.bz2",
                     "opq-box-update-\u0661\u0662.tar.bz2", "opq-box-update-1 .tar.bz2",
                     "opq-box-update-%s.tar.bz2" % ("9" * 21), "../opq-box-update-1.tar.bz2", ""]:
            with self.subTest(name=name):
                self.assertIsNone(bus.parse_update_name(name))


class CatalogTest(TempDirTestCase):

    def catalog(self, verify=True):
        catalog = bus.Catalog(self.updates, verify=verify)
        catalog.start()
        self.addCleanup(catalog.stop)
        return catalog

    def names(self, catalog):
        return [update.name for update in catalog.snapshot.updates]

    def test_order_is_numeric_not_by_string(self):
        for version in (999999999, 1000000001, 99):
            make_update(self.updates, version)
        catalog = self.catalog()
        self.assertTrue(wait_until(lambda: len(catalog.snapshot.updates) == 3, 10))
        self.assertEqual([u.version for u in catalog.snapshot.updates], [99, 999999999, 1000000001])
        self.assertEqual(catalog.snapshot.latest.name, "opq-box-update-1000000001.tar.bz2")
        self.assertEqual(catalog.snapshot.listing.decode().split("\n"), self.names(catalog))

    def test_only_correctly_named_regular_files_are_candidates(self):
        make_update(self.updates, 5)
        publish(os.path.join(self.updates, "opq-box-update-broken.tar.bz2"), archive_bytes(update_members(6)))
        publish(os.path.join(self.updates, "notes.txt"), b"hello")
        os.mkdir(os.path.join(self.updates, "opq-box-update-7.tar.bz2"))
        os.symlink(os.path.join(self.updates, "opq-box-update-5.tar.bz2"),
                   os.path.join(self.updates, "opq-box-update-8.tar.bz2"))
        with open(os.path.join(self.updates, ".opq-box-update-9.tar.bz2.part"), "wb") as partial:
            partial.write(archive_bytes(update_members(9))[:50])
        catalog = self.catalog(verify=False)
        self.assertEqual(self.names(catalog), ["opq-box-update-5.tar.bz2"])

    def test_files_added_and_removed_show_within_a_second(self):
        catalog = self.catalog(verify=False)
        self.assertEqual(catalog.snapshot.updates, ())
        path = make_update(self.updates, 10)
        started = time.monotonic()
        self.assertTrue(wait_until(lambda: self.names(catalog) == ["opq-box-update-10.tar.bz2"], 5))
        self.assertLess(time.monotonic() - started, 1.0)
        os.unlink(path)
        started = time.monotonic()
        self.assertTrue(wait_until(lambda: self.names(catalog) == [], 5))
        self.assertLess(time.monotonic() - started, 1.0)

    def test_an_unchanged_folder_is_not_listed_again(self):
        make_update(self.updates, 11)
        long_ago = time.time() - 3600
        os.utime(self.updates, (long_ago, long_ago))
        catalog = self.catalog(verify=False)
        self.assertEqual(len(catalog.snapshot.updates), 1)
        with mock.patch("box_update_server.os.listdir", wraps=os.listdir) as listdir:
            time.sleep(4 * bus.Catalog.POLL_SECONDS + 0.1)
            self.assertEqual(listdir.call_count, 0)
            make_update(self.updates, 12)
            self.assertTrue(wait_until(lambda: len(catalog.snapshot.updates) == 2, 2))
            self.assertGreaterEqual(listdir.call_count, 1)

    def test_missing_folder_is_reported_then_recovered(self):
        make_update(self.updates, 13)
        catalog = self.catalog(verify=False)
        moved = self.updates + ".away"
        os.rename(self.updates, moved)
        self.assertTrue(wait_until(lambda: catalog.snapshot.problem is not None, 2))
        self.assertIn("cannot be read", catalog.snapshot.problem)
        self.assertEqual(catalog.snapshot.updates, ())
        os.rename(moved, self.updates)
        self.assertTrue(wait_until(lambda: catalog.snapshot.problem is None and len(catalog.snapshot.updates) == 1, 2))

    def test_hashes_are_computed_even_without_verification(self):
        path = make_update(self.updates, 14, mtime=time.time() - 60)
        catalog = self.catalog(verify=False)
        self.assertTrue(wait_until(lambda: catalog.snapshot.latest.sha256 is not None, 5))
        with open(path, "rb") as archive:
            self.assertEqual(catalog.snapshot.latest.sha256, hashlib.sha256(archive.read()).hexdigest())


class ResolveUpdateTest(unittest.TestCase):
    """Only names in the catalog resolve, however a request spells a path."""

    def setUp(self):
        update = bus.Update("opq-box-update-1.tar.bz2", 1, "/u/opq-box-update-1.tar.bz2", (1, 2, 3), None)
        self.snapshot = bus.EMPTY_SNAPSHOT._replace(updates=(update,), by_name={update.name: update})

    def test_catalog_names_resolve_plain_or_percent_encoded(self):
        self.assertIsNotNone(bus.resolve_update(self.snapshot, "opq-box-update-1.tar.bz2"))
        self.assertIsNotNone(bus.resolve_update(self.snapshot, "opq%2Dbox-update-1.tar.bz2"))

    def test_nothing_else_resolves(self):
        for spelling in ["../etc/passwd", "..%2f..%2fetc%2fpasswd", "%2e%2e/%2e%2e/etc/passwd",
                         "opq-box-update-1.tar.bz2%00", "opq-box-update-1.tar.bz2/", "/etc/passwd",
                         "..\\..\\etc\\passwd", "opq-box-update-1.tar.bz2%ff", "opq-box-update-1.tar.bz2%252e",
                         "", "."]:
            with self.subTest(spelling=spelling):
                self.assertIsNone(bus.resolve_update(self.snapshot, spelling))


class RequestPathTest(unittest.TestCase):

    def test_query_and_fragment_are_dropped(self):
        self.assertEqual(bus.request_path("/ls?box=7"), "/ls")
        self.assertEqual(bus.request_path("/latest#x"), "/latest")
        self.assertEqual(bus.request_path("http://example.org/version?a"), "/version")
        self.assertEqual(bus.request_path("http://[::1"), "")


if __name__ == "__main__":
    unittest.main()
