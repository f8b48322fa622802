"""The catalog: which files are updates, their order, and how it follows the folder (no sockets)."""

import hashlib
import logging
import os
import stat
import threading
import time
import unittest
from unittest import mock

from support import (TempDirTestCase, make_update, update_members, archive_bytes, publish, record,
                     shorten_watcher_timing, wait_until)

import box_update_server as bus

NO_KEYS = bus.Keys(0, None)
REAL_CHECK = bus.check_update_archive


class UpdateNameTest(unittest.TestCase):

    def test_update_names_give_their_version_digits(self):
        self.assertEqual(bus.version_digits("opq-box-update-1764547200.tar.bz2"), "1764547200")
        self.assertEqual(bus.version_digits("opq-box-update-0.tar.bz2"), "0")
        self.assertEqual(bus.version_digits("opq-box-update-007.tar.bz2"), "007")

    def test_other_names_are_not_updates(self):
        for name in ["opq-box-update-broken.tar.bz2", ".opq-box-update-1.tar.bz2.part",
                     "opq-box-update-1.tar.bz2.part", "opq-box-update-1.tar.gz", "opq-box-update-.tar.bz2",
                     "xopq-box-update-1.tar.bz2", "opq-box-update-1.tar.bz2/", "opq-box-update--1.tar.bz2",
                     "opq-box-update-\u0661\u0662.tar.bz2", "opq-box-update-1 .tar.bz2",
                     "opq-box-update-%s.tar.bz2" % ("9" * 21), "../opq-box-update-1.tar.bz2", ""]:
            with self.subTest(name=name):
                self.assertIsNone(bus.version_digits(name))
                self.assertFalse(bus.watched_name(name))

    def test_signature_files_are_watched_beside_their_updates(self):
        self.assertTrue(bus.watched_name("opq-box-update-1.tar.bz2.sig"))
        self.assertFalse(bus.watched_name("opq-box-update-x.tar.bz2.sig"))
        self.assertFalse(bus.watched_name("notes.sig"))


class CatalogTestCase(TempDirTestCase):

    def capture_log(self):
        """The catalog's log lines from now on."""
        lines = []
        handler = logging.Handler()
        handler.emit = lambda record: lines.append(record.getMessage())
        bus.logger.addHandler(handler)
        self.addCleanup(bus.logger.removeHandler, handler)
        self.addCleanup(bus.logger.setLevel, bus.logger.level)
        bus.logger.setLevel(logging.INFO)
        return lines

    def catalog(self, verify=True, signers=None):
        self.capture_log()      # the catalog's warnings go to the test, not to stderr
        catalog = bus.Catalog(self.updates, verify=verify, signers=signers)
        catalog.start()
        self.addCleanup(catalog.stop)
        return catalog

    def names(self, catalog):
        return [update.name for update in catalog.snapshot.updates]


class CatalogTest(CatalogTestCase):

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
        os.mkfifo(os.path.join(self.updates, "opq-box-update-10.tar.bz2"))
        with open(os.path.join(self.updates, ".opq-box-update-9.tar.bz2.part"), "wb") as partial:
            partial.write(archive_bytes(update_members(9))[:50])
        catalog = self.catalog(verify=False)
        self.assertTrue(wait_until(lambda: self.names(catalog) == ["opq-box-update-5.tar.bz2"], 5), self.names(catalog))
        time.sleep(2 * bus.CheckQueue.SETTLE_SECONDS)
        self.assertEqual(self.names(catalog), ["opq-box-update-5.tar.bz2"])

    def test_files_added_and_removed_show_promptly(self):
        catalog = self.catalog(verify=False)
        self.assertEqual(catalog.snapshot.updates, ())
        path = make_update(self.updates, 10)
        self.assertTrue(wait_until(lambda: self.names(catalog) == ["opq-box-update-10.tar.bz2"], 5))
        os.unlink(path)
        self.assertTrue(wait_until(lambda: self.names(catalog) == [], 5))

    def test_an_unchanged_folder_is_not_listed_again(self):
        make_update(self.updates, 11)
        long_ago = time.time() - 3600
        os.utime(self.updates, (long_ago, long_ago))
        shorten_watcher_timing(self)
        catalog = self.catalog(verify=False)
        self.assertTrue(wait_until(lambda: len(catalog.snapshot.updates) == 1, 5))
        time.sleep(bus.FolderWatcher.RACY_SECONDS)   # the folder's own change (utime) has aged
        with mock.patch("box_update_server.os.scandir", wraps=os.scandir) as scandir:
            time.sleep(4 * bus.FolderWatcher.POLL_SECONDS + 0.1)
            self.assertEqual(scandir.call_count, 0)
            make_update(self.updates, 12)
            self.assertTrue(wait_until(lambda: len(catalog.snapshot.updates) == 2, 5))
            self.assertGreaterEqual(scandir.call_count, 1)

    def test_missing_folder_is_reported_then_recovered(self):
        make_update(self.updates, 13)
        catalog = self.catalog(verify=False)
        moved = self.updates + ".away"
        os.rename(self.updates, moved)
        self.assertTrue(wait_until(lambda: catalog.snapshot.problem is not None, 5))
        self.assertIn("is missing or was deleted", catalog.snapshot.problem)
        self.assertEqual(catalog.snapshot.updates, ())
        os.rename(moved, self.updates)
        self.assertTrue(wait_until(lambda: catalog.snapshot.problem is None and len(catalog.snapshot.updates) == 1, 5))

    def test_an_unreadable_folder_is_reported(self):
        make_update(self.updates, 13)
        catalog = self.catalog(verify=False)
        with mock.patch("box_update_server.os.scandir", side_effect=PermissionError(13, "Permission denied")):
            os.chmod(self.updates, 0o700)     # a change of mode: the folder's ctime moves, so it is listed again
            self.assertTrue(wait_until(lambda: catalog.snapshot.problem is not None, 5))
        self.assertIn("cannot be read: Permission denied", catalog.snapshot.problem)
        os.chmod(self.updates, 0o755)
        self.assertTrue(wait_until(lambda: catalog.snapshot.problem is None and len(catalog.snapshot.updates) == 1, 5))

    def test_a_deleted_folder_whose_mount_point_remains_is_reported(self):
        catalog = self.catalog(verify=False)
        real_stat = os.stat

        def deleted(path, *args, **kwargs):
            status = real_stat(path, *args, **kwargs)
            if path != self.updates:
                return status
            fields = list(status)
            fields[stat.ST_NLINK] = 0      # what a bind mount shows once its source folder is removed
            return os.stat_result(fields)
        with mock.patch("box_update_server.os.stat", side_effect=deleted):
            self.assertTrue(wait_until(lambda: catalog.snapshot.problem is not None, 5))
        self.assertIn("is missing or was deleted", catalog.snapshot.problem)
        self.assertTrue(wait_until(lambda: catalog.snapshot.problem is None, 5))

    def test_hashes_are_computed_even_without_verification(self):
        path = make_update(self.updates, 14, mtime=time.time() - 60)
        catalog = self.catalog(verify=False)
        self.assertTrue(wait_until(lambda: catalog.snapshot.latest and catalog.snapshot.latest.sha256, 5))
        with open(path, "rb") as archive:
            self.assertEqual(catalog.snapshot.latest.sha256, hashlib.sha256(archive.read()).digest())

    def test_the_newest_archives_are_checked_first(self):
        versions = list(range(1700000000, 1700000040))
        for version in versions:
            make_update(self.updates, version, mtime=time.time() - 60)
        checked = []
        real_check = bus.check_update_archive

        def recording_check(fileobj, digits, *limit):
            checked.append(int(digits))
            return real_check(fileobj, digits, *limit)
        with mock.patch("box_update_server.check_update_archive", side_effect=recording_check):
            catalog = self.catalog()
            self.assertTrue(wait_until(lambda: len(catalog.snapshot.updates) == len(versions), 20))
        self.assertEqual(checked, sorted(versions, reverse=True))

    def test_a_file_modified_within_the_settle_time_waits(self):
        with mock.patch.object(bus.CheckQueue, "SETTLE_SECONDS", 3.0):   # room for a busy machine
            catalog = self.catalog()
            log = self.capture_log()
            data = archive_bytes(update_members(1700000000))
            path = os.path.join(self.updates, "opq-box-update-1700000000.tar.bz2")
            with open(path, "wb") as out:   # copied straight into place, not renamed, by a writer that pauses
                out.write(data[:len(data) // 2])
                out.flush()
                time.sleep(1.0)             # the watcher sees the half file meanwhile
                out.write(data[len(data) // 2:])
        self.assertTrue(wait_until(lambda: self.names(catalog) == [os.path.basename(path)], 10))
        self.assertEqual([line for line in log if "rejected opq" in line], [], "the half file was checked")
        self.assertEqual(catalog.snapshot.rejected, 0)


class CheckQueueTest(unittest.TestCase):
    """The checker's queue, without threads: newest first, and a file written just now waits."""

    @staticmethod
    def candidate(version, age_seconds):
        mtime_ns = time.time_ns() - int(age_seconds * 1e9)
        return bus.Candidate("opq-box-update-%d.tar.bz2" % version, str(version),
                             bus.FileIdentity(1, 100, mtime_ns, mtime_ns, True), None)

    def test_newest_first(self):
        queue = bus.CheckQueue()
        for version in (5, 7, 6):
            queue.push(self.candidate(version, 60))
        self.assertEqual([queue.pop(lambda c: True, NO_KEYS).version for _ in range(3)], [7, 6, 5])
        self.assertIsNone(queue.pop(lambda c: True, NO_KEYS))

    def test_a_file_written_just_now_waits_and_an_older_one_does_not(self):
        queue = bus.CheckQueue()
        fresh = self.candidate(1700000000, 0)
        queue.push(fresh)
        self.assertIsNone(queue.pop(lambda c: True, NO_KEYS), "modified just now: not checked yet")
        self.assertTrue(queue.settling())
        old = self.candidate(1600000000, 10)
        queue.push(old)
        self.assertIs(queue.pop(lambda c: True, NO_KEYS), old)
        fresh.identity = fresh.identity._replace(mtime_ns=time.time_ns() - 10 * 10**9)   # as if it had aged
        self.assertIs(queue.pop(lambda c: True, NO_KEYS), fresh, "a settled file comes back from the side")

    def test_a_replaced_candidate_is_skipped(self):
        queue = bus.CheckQueue()
        stale = self.candidate(1700000000, 60)
        queue.push(stale)
        self.assertIsNone(queue.pop(lambda c: c is not stale, NO_KEYS))


class FolderChangesTest(CatalogTestCase):
    """What happens to files in place, where the folder itself does not change."""

    def test_an_old_update_truncated_in_place_is_withdrawn(self):
        shorten_watcher_timing(self)
        path = make_update(self.updates, 1700000000, mtime=time.time() - 60)
        catalog = self.catalog()
        self.assertTrue(wait_until(lambda: len(catalog.snapshot.updates) == 1, 10))
        # the file and the folder leave the watcher's "recently changed" set: only the rolling re-stat remains
        time.sleep(bus.FolderWatcher.RACY_SECONDS + 2 * bus.FolderWatcher.POLL_SECONDS + 0.5)
        os.truncate(path, 100)             # in place: the folder itself does not change
        self.assertTrue(wait_until(lambda: os.path.basename(path) not in catalog.snapshot.by_name, 10))

    def test_an_offered_update_truncated_in_place_is_withdrawn_at_once(self):
        for version in range(1700000000, 1700001000):     # the 1,000 updates the 2 s promise is made for
            make_update(self.updates, version, mtime=time.time() - 60)
        shorten_watcher_timing(self, {"FolderWatcher.RACY_SECONDS": 0.5})   # the poll and re-stat rate as shipped
        catalog = self.catalog()
        self.assertTrue(wait_until(lambda: len(catalog.snapshot.updates) == 1000, 60))
        # nothing is left in the watcher's "recently changed" set: the rolling re-stat has to find it
        time.sleep(bus.FolderWatcher.RACY_SECONDS + 2 * bus.FolderWatcher.POLL_SECONDS + 0.5)
        victim = os.path.join(self.updates, "opq-box-update-1700000500.tar.bz2")
        os.truncate(victim, 100)          # in place: the folder itself does not change
        started = time.monotonic()
        self.assertTrue(wait_until(lambda: os.path.basename(victim) not in catalog.snapshot.by_name, 10))
        self.assertLess(time.monotonic() - started, 4.0, "withdrawn within 2 s (twice that on a busy machine)")
        # rejected once it has stopped changing (QUIET_SECONDS after the truncation), not before
        self.assertTrue(wait_until(lambda: catalog.snapshot.rejected == 1, bus.Catalog.QUIET_SECONDS + 10))

    def test_an_update_rewritten_in_place_with_its_size_and_mtime_kept_is_checked_again(self):
        """Only the change time tells: the same inode and size, the modification time put back with utime."""
        shorten_watcher_timing(self)
        path = make_update(self.updates, 1700000000, mtime=time.time() - 60)
        catalog = self.catalog()
        self.assertTrue(wait_until(lambda: self.names(catalog) == [os.path.basename(path)], 10))
        before = os.stat(path)
        with open(path, "r+b") as out:
            out.seek(before.st_size // 2)
            out.write(b"\0" * 64)
        os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
        after = os.stat(path)
        self.assertEqual((after.st_ino, after.st_size, after.st_mtime_ns),
                         (before.st_ino, before.st_size, before.st_mtime_ns))
        self.assertTrue(wait_until(lambda: catalog.snapshot.rejected == 1, 10), "the rewrite went unnoticed")
        self.assertEqual(catalog.snapshot.updates, ())

    def test_a_file_rejected_as_unreadable_is_checked_again_when_its_mode_changes(self):
        path = make_update(self.updates, 1700000000, mtime=time.time() - 60)
        real_open = bus.open_regular_file
        denied = {path}

        def sometimes_denied(opened):
            if opened in denied:
                raise PermissionError(13, "Permission denied", opened)
            return real_open(opened)
        with mock.patch("box_update_server.open_regular_file", side_effect=sometimes_denied):
            catalog = self.catalog()
            self.assertTrue(wait_until(lambda: catalog.snapshot.rejected == 1, 10))
            self.assertEqual(catalog.snapshot.updates, ())
            denied.clear()
            os.chmod(path, 0o644)     # the operator fixes the mode: only the change time moves
            self.assertTrue(wait_until(lambda: self.names(catalog) == [os.path.basename(path)], 10))

    def test_a_fifo_renamed_onto_an_update_name_blocks_nothing(self):
        shorten_watcher_timing(self)
        catalog = self.catalog()
        fifo = os.path.join(self.tmp, "fifo")
        os.mkfifo(fifo)
        os.rename(fifo, os.path.join(self.updates, "opq-box-update-1700000005.tar.bz2"))
        time.sleep(2 * bus.FolderWatcher.POLL_SECONDS)
        make_update(self.updates, 1700000001)
        self.assertTrue(wait_until(lambda: self.names(catalog) == ["opq-box-update-1700000001.tar.bz2"], 5))

    def test_a_fifo_swapped_in_between_the_scan_and_the_check_is_rejected_not_waited_on(self):
        path = make_update(self.updates, 1700000000, mtime=time.time() - 60)
        catalog = bus.Catalog(self.updates)
        catalog.scan()
        candidate = catalog._candidates[os.path.basename(path)]   # pylint: disable=protected-access
        os.unlink(path)
        os.mkfifo(path)
        result = []
        checker = threading.Thread(target=lambda: result.append(catalog._check_archive(candidate)), daemon=True)
        checker.start()
        checker.join(5)
        self.assertFalse(checker.is_alive(), "the checker is blocked in open()")
        self.assertEqual(result[0].problem, "cannot be read: not a regular file")

    def test_a_verdict_on_bytes_that_changed_during_the_check_is_dropped(self):
        path = make_update(self.updates, 1700000000, mtime=time.time() - 60)
        catalog = bus.Catalog(self.updates)
        catalog.scan()
        candidate = catalog._candidates[os.path.basename(path)]   # pylint: disable=protected-access
        real_check = bus.check_update_archive

        def rewritten_during_the_check(fileobj, digits, *limit):
            digests = real_check(fileobj, digits, *limit)
            with open(path, "r+b") as rewrite:   # the operator overwrites the file while it is read
                rewrite.write(b"garbage")
            return digests
        with mock.patch("box_update_server.check_update_archive", side_effect=rewritten_during_the_check):
            self.assertIsNone(catalog._check_archive(candidate))     # pylint: disable=protected-access
        catalog.scan()                                              # the watcher brings the new version
        fresh = catalog._candidates[os.path.basename(path)]          # pylint: disable=protected-access
        self.assertIsNot(fresh, candidate)
        self.assertRegex(catalog._check_archive(fresh).problem, "^corrupt")  # pylint: disable=protected-access


class ResolveUpdateTest(unittest.TestCase):
    """Only names in the catalog resolve, however a request spells a path."""

    def setUp(self):
        update = bus.Update("opq-box-update-1.tar.bz2", 1, "/u/opq-box-update-1.tar.bz2",
                            bus.FileIdentity(1, 2, 3, 4, True), True, None, None, None)
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


class JudgeTest(unittest.TestCase):
    """judge: a candidate's state from what is known of it, every rule in one table."""

    IDENTITY = bus.FileIdentity(1, 2, 3, 4, True)
    DIGESTS = bus.Digests(b"a" * 32, b"b" * 64)
    SIGNERS = ("a key",)

    def candidate(self, sig_file=False, archive=None, signature=None):
        candidate = bus.Candidate("opq-box-update-7.tar.bz2", "7", self.IDENTITY,
                                  self.IDENTITY if sig_file else None)
        candidate.archive, candidate.signature = archive, signature
        candidate.digests = archive.digests if archive else (self.DIGESTS if signature else None)
        return candidate

    def test_table(self):
        good, bad = bus.ArchiveVerdict(None, self.DIGESTS), bus.ArchiveVerdict("truncated", None)
        keys, next_keys = bus.Keys(3, self.SIGNERS), bus.Keys(4, self.SIGNERS)
        signed = bus.SignatureVerdict(None, b"armor", "ops", 3)
        forged = bus.SignatureVerdict("signature: no listed key made this signature", None, None, 3)
        cases = [   # sig file, archive, signature, verify, keys -> state, reason
            (False, None, None, True, NO_KEYS, bus.CHECKING, None),
            (False, None, None, False, NO_KEYS, bus.CHECKING, None),       # maybe still being copied in
            (False, good, None, True, NO_KEYS, bus.OFFERED, None),
            (False, bad, None, True, NO_KEYS, bus.REJECTED, "truncated"),
            (True, good, forged, True, NO_KEYS, bus.OFFERED, None),        # keys not required: the .sig is not judged
            (False, good, None, True, keys, bus.UNSIGNED, None),
            (True, None, None, True, keys, bus.CHECKING, None),
            (True, None, forged, True, keys, bus.REJECTED, forged.problem),  # never decompressed
            (True, None, signed, True, keys, bus.CHECKING, None),           # signed: now the archive
            (True, None, signed, False, keys, bus.OFFERED, None),
            (True, good, signed, True, keys, bus.OFFERED, None),
            (True, good, signed, True, next_keys, bus.CHECKING, None),      # keys reloaded: judged again
            (True, bad, signed, True, keys, bus.REJECTED, "truncated"),
        ]
        for sig_file, archive, signature, verify, use_keys, state, reason in cases:
            with self.subTest(sig_file=sig_file, archive=archive, signature=signature, verify=verify, keys=use_keys):
                self.assertEqual(bus.judge(self.candidate(sig_file, archive, signature), verify, use_keys),
                                 (state, reason))
        settled = self.candidate()
        settled.settled = True
        self.assertEqual(bus.judge(settled, False, NO_KEYS), (bus.OFFERED, None), "unchecked, once it settled")


class SlowChecksTest(TempDirTestCase):
    """No single file holds the others back: a check that takes long gets another checker beside it."""

    def test_a_new_update_is_offered_while_a_slow_file_is_being_checked(self):
        make_update(self.updates, 9, mtime=time.time() - 60)
        release = threading.Event()
        self.addCleanup(release.set)
        real_check = bus.check_update_archive

        def check(fileobj, digits, *args, **kwargs):
            if digits == "9":
                release.wait(60)       # a bomb, or a huge archive
            return real_check(fileobj, digits, *args, **kwargs)

        with mock.patch.object(bus, "check_update_archive", check):
            catalog = bus.Catalog(self.updates)
            catalog.start()
            self.addCleanup(catalog.stop)
            time.sleep(0.2)
            make_update(self.updates, 5, mtime=time.time() - 60)
            self.assertTrue(wait_until(lambda: catalog.snapshot.latest is not None, 5))
            self.assertEqual(catalog.snapshot.latest.version, 5)
            release.set()
            self.assertTrue(wait_until(lambda: catalog.snapshot.latest.version == 9, 10))

    def test_a_check_that_fails_unexpectedly_rejects_the_file(self):
        make_update(self.updates, 9, mtime=time.time() - 60)
        with mock.patch.object(bus, "check_update_archive", side_effect=RuntimeError("a bug")):
            with self.assertLogs(bus.logger, "ERROR"):
                catalog = bus.Catalog(self.updates)
                catalog.start()
                self.addCleanup(catalog.stop)
                self.assertTrue(wait_until(lambda: catalog.snapshot.rejected == 1, 10))
        self.assertEqual(catalog.snapshot.waiting, 0)


class StartUpTest(TempDirTestCase):

    def test_thousands_of_rejected_newer_files_do_not_delay_the_newest_good_update(self):
        make_update(self.updates, 1000, mtime=time.time() - 60)
        for version in range(2000, 8000):
            publish(os.path.join(self.updates, "opq-box-update-%d.tar.bz2" % version), b"BZh9" + os.urandom(200),
                    mtime=time.time() - 60)
        logging.disable(logging.WARNING)
        self.addCleanup(logging.disable, logging.NOTSET)
        started = time.monotonic()
        catalog = bus.Catalog(self.updates)
        with mock.patch.object(bus.Catalog, "_publish", autospec=True, side_effect=bus.Catalog._publish) as publish_:
            catalog.start()
            self.addCleanup(catalog.stop)
            self.assertTrue(wait_until(lambda: catalog.snapshot.latest is not None, 10))
            offered_after = time.monotonic() - started
            self.assertTrue(wait_until(lambda: catalog.snapshot.waiting == 0, 10))
        # A rejection offers nothing new, so it is not published on its own: publishing costs the whole folder,
        # and once a verdict it made checking quadratic (6,000 files in 5.2 s, the good one offered last).
        self.assertLess(publish_.call_count, 100)
        self.assertLess(offered_after, 5.0)     # 0.6 s on an idle machine; generous for a shared CI one
        self.assertEqual(catalog.snapshot.latest.version, 1000)
        record("Load", "start-up with 6,000 rejected files newer than the one good update",
               "the good update offered %.2f s after start, all checked by then; %d snapshots published"
               % (offered_after, publish_.call_count))


class RememberedVerdictsTest(CatalogTestCase):
    """With a state folder, a restart offers at once what was offered, and checks again only what changed."""

    def catalog(self, verify=True, check=None):
        state = os.path.join(self.tmp, "state")
        os.makedirs(state, exist_ok=True)
        self.capture_log()
        patch = mock.patch.object(bus, "check_update_archive", check or REAL_CHECK)
        patch.start()
        self.addCleanup(patch.stop)
        catalog = bus.Catalog(self.updates, verify=verify, verdicts=bus.VerdictStore(state))
        catalog.start()
        self.addCleanup(catalog.stop)
        return catalog

    def test_a_restart_offers_at_once_and_rechecks_only_what_changed(self):
        for version in (5, 6, 7):
            make_update(self.updates, version, mtime=time.time() - 60)
        publish(os.path.join(self.updates, "opq-box-update-8.tar.bz2"), b"BZh9 broken", mtime=time.time() - 60)
        first = self.catalog()
        self.assertTrue(wait_until(lambda: first.snapshot.waiting == 0 and first.snapshot.rejected == 1, 10))
        first.stop()
        offered = [update.name for update in first.snapshot.updates]
        rewritten = make_update(self.updates, 6, mtime=time.time() - 60)     # a new file under the same name
        checked = []
        release = threading.Event()
        self.addCleanup(release.set)

        def blocking_check(fileobj, digits, *args, **kwargs):
            checked.append(int(digits))
            release.wait(30)
            return REAL_CHECK(fileobj, digits, *args, **kwargs)

        started = time.monotonic()
        second = self.catalog(check=blocking_check)
        self.assertEqual([update.name for update in second.snapshot.updates], [offered[0], offered[2]])
        self.assertLess(time.monotonic() - started, 1.0)
        self.assertEqual(second.snapshot.rejected, 1, "a remembered rejection stands")
        self.assertTrue(wait_until(lambda: checked == [6], 5), checked)
        release.set()
        self.assertTrue(wait_until(lambda: len(second.snapshot.updates) == 3, 10))
        with open(rewritten, "rb") as archive:
            self.assertEqual(second.snapshot.by_name[os.path.basename(rewritten)].sha256,
                             hashlib.sha256(archive.read()).digest())

    def test_a_hash_remembered_without_verification_is_no_verdict_with_it(self):
        make_update(self.updates, 5, mtime=time.time() - 60)
        first = self.catalog(verify=False)
        self.assertTrue(wait_until(lambda: first.snapshot.latest and first.snapshot.latest.sha256, 10))
        first.stop()
        checked = []

        def recording_check(fileobj, digits, *args, **kwargs):
            checked.append(int(digits))
            return REAL_CHECK(fileobj, digits, *args, **kwargs)

        second = self.catalog(verify=True, check=recording_check)
        self.assertTrue(wait_until(lambda: second.snapshot.latest is not None, 10))
        self.assertEqual(checked, [5])

    def test_a_corrupt_state_file_is_a_configuration_error(self):
        state = os.path.join(self.tmp, "state")
        os.mkdir(state)
        with open(os.path.join(state, bus.VerdictStore.FILE_NAME), "wb") as corrupt:
            corrupt.write(b"not a database" * 100)
        with self.assertRaisesRegex(bus.SettingsError, "state_dir: .* cannot be used"):
            bus.VerdictStore(state)


if __name__ == "__main__":
    unittest.main()
