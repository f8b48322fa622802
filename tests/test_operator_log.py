"""What an operator learns from the log and from /: the start-up summary, offers and withdrawals, the folder
going and coming back, a file still being copied (waiting, never rejected), and the first look at start."""

import bz2
import os
import subprocess
import threading
import time
import unittest
from unittest import mock

from support import (SERVER, InProcessServer, ServerProcess, TempDirTestCase, archive_bytes, bus, make_update, publish,
                     python_executable, settings_environment, update_members, wait_until)


class EventsTest(TempDirTestCase):

    def test_start_up_summary_then_offers_withdrawals_and_the_newest(self):
        make_update(self.updates, 5, mtime=time.time() - 60)
        make_update(self.updates, 6, mtime=time.time() - 60)
        publish(os.path.join(self.updates, "opq-box-update-7.tar.bz2"), b"not bzip2", mtime=time.time() - 60)
        server = self.start_server()
        self.assertTrue(wait_until(lambda: "first look at" in server.log(), 5), server.log())
        self.assertIn("first look at %s: 2 update(s) offered, the newest opq-box-update-6.tar.bz2; 1 rejected, "
                      "0 waiting for a signature, 0 being checked" % self.updates, server.log())
        self.assertNotIn("offered opq-box-update-5", server.log(), "the summary stands for the first look")

        path = make_update(self.updates, 8, mtime=time.time() - 60)
        with open(path, "rb") as archive:
            digest = bus.hash_update_file(archive).sha256.hex()
        self.assertTrue(wait_until(lambda: "offered opq-box-update-8.tar.bz2: VERSION 8, SHA-256 %s" % digest
                                   in server.log(), 5), server.log())
        self.assertTrue(wait_until(lambda: "the newest update is now opq-box-update-8.tar.bz2 "
                                           "(was opq-box-update-6.tar.bz2)" in server.log(), 5), server.log())
        os.unlink(path)
        self.assertTrue(wait_until(lambda: "withdrawn opq-box-update-8.tar.bz2: the file is gone" in server.log(), 5),
                        server.log())
        self.assertTrue(wait_until(lambda: "the newest update is now opq-box-update-6.tar.bz2 "
                                           "(was opq-box-update-8.tar.bz2)" in server.log(), 5), server.log())

    def test_the_folder_going_and_coming_back_is_logged_once_each(self):
        make_update(self.updates, 5, mtime=time.time() - 60)
        server = self.start_server()
        aside = self.updates + ".aside"
        os.rename(self.updates, aside)
        self.assertTrue(wait_until(lambda: "is missing or was deleted: nothing is offered" in server.log(), 5))
        self.assertTrue(wait_until(lambda: "withdrawn opq-box-update-5.tar.bz2" in server.log(), 5), server.log())
        os.rename(aside, self.updates)
        self.assertTrue(wait_until(lambda: "updates folder %s is back" % self.updates in server.log(), 5))
        self.assertTrue(wait_until(lambda: server.get("/version").body == b"5", 5))
        self.assertEqual(server.log().count("was deleted: nothing is offered"), 1, server.log())


class StillBeingCopiedTest(TempDirTestCase):

    def test_a_file_still_being_copied_waits_and_is_never_rejected(self):
        server = self.start_server()
        data = archive_bytes(update_members(9))
        path = os.path.join(self.updates, "opq-box-update-9.tar.bz2")
        with open(path, "wb") as copy:
            copy.write(data[:len(data) // 2])
            copy.flush()
            time.sleep(2)                 # a pause in the copy, longer than the settle time
            self.assertEqual(server.health().get("info"), "1 file(s) waiting to be checked")
            self.assertEqual(server.get("/ls").body, b"")
            copy.write(data[len(data) // 2:])
        self.assertTrue(wait_until(lambda: server.get("/version").body == b"9", 15), server.log())
        self.assertNotIn("rejected opq-box-update-9", server.log())
        self.assertIn("offered opq-box-update-9.tar.bz2", server.log())

    def test_a_broken_file_is_rejected_once_it_stopped_changing(self):
        server = self.start_server()
        publish(os.path.join(self.updates, "opq-box-update-9.tar.bz2"), bz2.compress(b"not a tar"))
        self.assertTrue(wait_until(lambda: "rejected opq-box-update-9.tar.bz2" in server.log(), 15), server.log())
        self.assertEqual(server.log().count("rejected opq-box-update-9.tar.bz2"), 1)

    def test_without_verification_a_file_is_offered_only_once_it_stopped_changing(self):
        server = self.start_server(verify_updates=False)
        data = archive_bytes(update_members(9)) + os.urandom(4 << 20)
        path = os.path.join(self.updates, "opq-box-update-9.tar.bz2")
        with open(path, "wb") as copy:
            for start in range(0, len(data), 256 << 10):
                copy.write(data[start:start + (256 << 10)])
                copy.flush()
                self.assertEqual(server.get("/ls").body, b"", "offered half written")
                time.sleep(0.1)
        self.assertTrue(wait_until(lambda: server.get("/version").body == b"9", 10), server.log())
        self.assertTrue(wait_until(lambda: server.get("/update/opq-box-update-9.tar.bz2.sha256").status == 200, 10))
        checksum = server.get("/update/opq-box-update-9.tar.bz2.sha256").body.decode().split()[0]
        self.assertEqual(checksum, bus.hashlib.sha256(data).hexdigest())
        self.assertIn("archives are not checked", server.log())


class FirstLookTest(TempDirTestCase):

    def test_latest_says_ask_again_while_the_first_look_is_under_way(self):
        make_update(self.updates, 9, mtime=time.time() - 60)
        release = threading.Event()
        self.addCleanup(release.set)
        real_check = bus.check_update_archive

        def slow_check(fileobj, digits, *args, **kwargs):
            release.wait(30)
            return real_check(fileobj, digits, *args, **kwargs)

        with mock.patch.object(bus, "check_update_archive", slow_check), \
                mock.patch.object(bus.Catalog, "FIRST_LOOK_SECONDS", 30):
            server = InProcessServer(self, self.updates, wait_for_checks=False)
            for route in ("/latest", "/version"):
                answer = server.get(route)
                self.assertEqual((answer.status, answer.header("Retry-After")), (503, "1"), route)
            self.assertIn("checking the updates folder", bus.json.loads(server.get("/").body)["info"])
            release.set()
            self.assertTrue(wait_until(lambda: server.get("/latest").status == 303, 10))


class StatusTest(TempDirTestCase):
    """Why is my file not offered? /status and the status command answer for every file in the folder."""

    def setUp(self):
        super().setUp()
        make_update(self.updates, 5, mtime=time.time() - 60)
        publish(os.path.join(self.updates, "opq-box-update-6.tar.bz2"), b"not bzip2", mtime=time.time() - 60)
        for name in ("opq-box-update-v2.tar.bz2", "opq-box-update-7.tar.gz", ".opq-box-update-8.tar.bz2.part",
                     "opq-box-update-9.tar.bz2.sig", "opq-box-update-5.tar.bz2.sig"):
            publish(os.path.join(self.updates, name), b"x")
        os.mkdir(os.path.join(self.updates, "opq-box-update-10.tar.bz2"))
        os.symlink("opq-box-update-5.tar.bz2", os.path.join(self.updates, "opq-box-update-11.tar.bz2"))

    def test_every_file_has_its_verdict_and_reason(self):
        server = self.start_server()
        answer = server.get("/status")
        self.assertEqual((answer.status, answer.header("Cache-Control")), (200, "no-store"))
        files = {entry["name"]: entry for entry in bus.json.loads(answer.body)["files"]}
        expected = {
            "opq-box-update-5.tar.bz2": ("offered", None),
            "opq-box-update-5.tar.bz2.sig": ("signature", "the signature of opq-box-update-5.tar.bz2"),
            "opq-box-update-6.tar.bz2": ("rejected", "corrupt bzip2 data"),
            "opq-box-update-v2.tar.bz2": ("ignored", "not named like an update"),
            "opq-box-update-7.tar.gz": ("ignored", "not named like an update"),
            ".opq-box-update-8.tar.bz2.part": ("ignored", "hidden"),
            "opq-box-update-9.tar.bz2.sig": ("ignored", "a .sig without its archive"),
            "opq-box-update-10.tar.bz2": ("ignored", "a folder"),
            "opq-box-update-11.tar.bz2": ("ignored", "a symbolic link"),
        }
        self.assertEqual(set(files), set(expected))
        for name, (state, reason) in expected.items():
            with self.subTest(name=name):
                self.assertEqual(files[name]["state"], state)
                if reason:
                    self.assertIn(reason, files[name]["reason"])
        self.assertEqual(len(files["opq-box-update-5.tar.bz2"]["sha256"]), 64)

    def test_the_status_command_asks_the_running_server(self):
        server = self.start_server()
        settings = {"port": server.port, "updates_dir": self.updates, "host": "127.0.0.1"}
        finished = subprocess.run([python_executable(), SERVER, "status"], timeout=30, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, env=settings_environment(settings))
        self.assertEqual(finished.returncode, 0, finished.stderr)
        lines = finished.stdout.decode().splitlines()
        self.assertEqual(lines[0], "updates folder %s" % self.updates)
        self.assertTrue(any(line.startswith("rejected") and "opq-box-update-6.tar.bz2  (corrupt bzip2" in line
                            for line in lines), lines)

    def test_status_is_for_the_metrics_addresses_only(self):
        server = self.start_server(metrics_allow=["10.0.0.0/8"])
        self.assertEqual(server.get("/status").status, 404)


class CheckFolderTest(TempDirTestCase):

    def check(self, *arguments):
        finished = subprocess.run([python_executable(), SERVER, "check"] + list(arguments), timeout=60,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        return finished.returncode, finished.stdout.decode().splitlines()

    def test_a_sig_is_its_archives_companion(self):
        make_update(self.updates, 5)
        publish(os.path.join(self.updates, "opq-box-update-5.tar.bz2.sig"), b"x")
        status, lines = self.check(*sorted(os.path.join(self.updates, name) for name in os.listdir(self.updates)))
        self.assertEqual(status, 0, lines)
        self.assertEqual(len(lines), 1, lines)
        self.assertTrue(lines[0].startswith("OK "), lines)

    def test_an_archive_without_its_sig_waits_for_it_as_the_server_would(self):
        path = make_update(self.updates, 5)
        keys = os.path.join(self.tmp, "allowed_signers")
        with open(keys, "w") as allowed:
            allowed.write("ops@example.org ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGnpCg5VnnNNvO+GaSQXwKb1lszPMOvRr64DyW"
                          "8L0K8S\n")
        status, lines = self.check("--allowed-signers", keys, path)
        self.assertEqual(status, 1)
        self.assertEqual(lines, ["WAITING   %s: waits for its signature opq-box-update-5.tar.bz2.sig" % path])


class QuickRestartTest(TempDirTestCase):
    """With state_dir, a restart offers at once everything that was offered, before any archive is read again."""

    def test_a_restart_offers_what_was_offered_before_reading_any_archive(self):
        for version in (5, 6, 7):
            make_update(self.updates, version, mtime=time.time() - 60)
        state = os.path.join(self.tmp, "state")
        os.mkdir(state)
        server = self.start_server(state_dir=state)
        listing = server.get("/ls").body
        self.assertEqual(len(listing.split(b"\n")), 3)
        self.assertEqual(server.stop(), 0)
        # The restarted server leaves every file it has no verdict for waiting (as if still being copied in):
        # only remembered verdicts can offer anything.
        restarted = ServerProcess(self.updates, timing={"CheckQueue.SETTLE_SECONDS": 3600}, state_dir=state)
        self.addCleanup(restarted.__exit__)
        restarted.start(wait_for_checks=False)
        self.assertEqual(restarted.get("/ls").body, listing)
        self.assertEqual(restarted.get("/latest").status, 303)
        self.assertTrue(wait_until(lambda: "first look at %s: 3 update(s) offered" % self.updates in restarted.log(),
                                   5), restarted.log())
        publish(os.path.join(self.updates, "opq-box-update-8.tar.bz2"), archive_bytes(update_members(8)),
                mtime=time.time() - 60)
        time.sleep(1)
        self.assertEqual(restarted.get("/version").body, b"7", "a new file is no remembered verdict")


if __name__ == "__main__":
    unittest.main()
