"""Archive checks: only whole, well-formed updates are offered, with checksums that match."""

import base64
import bz2
import errno
import hashlib
import io
import os
import re
import shutil
import subprocess
import tarfile
import threading
import tracemalloc
import unittest

from support import (ROOT, SERVER, TempDirTestCase, archive_bytes, device_member, dir_member, file_member,
                     link_member, make_update, publish, python_executable, require_binary, tar_bytes,
                     update_members, wait_until)

import box_update_server as bus

TOP = "opq-box-update-1700000000"


def check(data, version="1700000000"):
    return bus.check_update_archive(io.BytesIO(data), version)


class CheckUpdateArchiveTest(unittest.TestCase):

    def assert_rejected(self, data, reason_part, version="1700000000"):
        with self.assertRaises(bus.ArchiveError) as caught:
            check(data, version)
        self.assertIn(reason_part, str(caught.exception))

    def test_a_good_archive_passes_with_its_sha256(self):
        data = archive_bytes(update_members(1700000000))
        self.assertEqual(check(data).sha256, hashlib.sha256(data).digest())

    def test_leading_dot_slash_names_are_inside_the_top_folder(self):
        members = [(info, payload) for info, payload in update_members(1700000000)]
        for info, _ in members:
            info.name = "./" + info.name
        data = archive_bytes(members)
        self.assertEqual(check(data).sha256, hashlib.sha256(data).digest())

    def test_multi_stream_bzip2_as_pbzip2_writes_is_accepted(self):
        tar = tar_bytes(update_members(1700000000))
        data = bz2.compress(tar[:5000]) + bz2.compress(tar[5000:])
        self.assertEqual(check(data).sha256, hashlib.sha256(data).digest())

    def test_truncated_archives_are_rejected(self):
        data = archive_bytes(update_members(1700000000))
        for cut in (len(data) - 1, len(data) // 2, 10):
            with self.subTest(cut=cut):
                self.assert_rejected(data[:cut], "truncated")

    def test_empty_file_is_rejected(self):
        self.assert_rejected(b"", "truncated")

    def test_corrupt_archives_are_rejected(self):
        good = archive_bytes(update_members(1700000000))
        for position in (len(good) // 4, len(good) // 2, len(good) - 12):
            with self.subTest(position=position):
                data = bytearray(good)
                data[position] ^= 0xFF
                # the block and stream CRCs catch any flipped byte; where it lands decides whether the
                # decoder reports bad data or waits for data that never comes
                with self.assertRaises(bus.ArchiveError) as caught:
                    check(bytes(data))
                self.assertRegex(str(caught.exception), "^(corrupt|truncated)")
        self.assert_rejected(b"BZh9" + os.urandom(200), "corrupt")
        self.assert_rejected(b"not bzip2 at all", "corrupt")

    def test_trailing_garbage_is_rejected(self):
        self.assert_rejected(archive_bytes(update_members(1700000000)) + b"garbage", "corrupt")

    def test_bzip2_of_something_that_is_not_tar_is_rejected(self):
        self.assert_rejected(bz2.compress(os.urandom(3000)), "damaged tar header at byte 0")
        self.assert_rejected(bz2.compress(b"\0" * 100), "not a valid tar archive")

    def test_both_digests_come_from_the_same_pass(self):
        data = archive_bytes(update_members(1700000000))
        digests = check(data)
        self.assertEqual((digests.sha256, digests.sha512),
                         (hashlib.sha256(data).digest(), hashlib.sha512(data).digest()))
        self.assertEqual(bus.hash_update_file(io.BytesIO(data)), digests)

    def test_version_must_match_the_file_name(self):
        self.assert_rejected(archive_bytes(update_members(1700000000, version_content="1600000000\n")),
                             "VERSION says '1600000000'")
        self.assert_rejected(archive_bytes(update_members(1700000000)), "outside the top folder", "1700000001")

    def test_version_and_installer_must_exist(self):
        members = [m for m in update_members(1700000000) if not m[0].name.endswith("VERSION")]
        self.assert_rejected(archive_bytes(members), "VERSION is missing")
        self.assert_rejected(archive_bytes(update_members(1700000000, installer=False)),
                             "install_update.sh is missing")
        self.assert_rejected(archive_bytes([dir_member(TOP), file_member(TOP + "/VERSION", b"1700000000"),
                                            link_member(TOP + "/install_update.sh", "VERSION")]),
                             "install_update.sh is not a regular file")

    def test_escaping_members_are_rejected(self):
        good = update_members(1700000000)
        cases = [
            (file_member("/etc/cron.d/evil", b"x"), "absolute path"),
            (file_member(TOP + "/../evil", b"x"), "'..'"),
            (file_member("elsewhere/evil", b"x"), "outside the top folder"),
            (file_member(".", b""), "outside the top folder"),
            (link_member(TOP + "/etc", "/etc"), "points outside"),
            (link_member(TOP + "/up", "../../root"), "points outside"),
            (link_member(TOP + "/box-config-daemon/up", "../../x"), "points outside"),
            (link_member(TOP + "/hard", "etc/shadow", hard=True), "points outside"),
            (device_member(TOP + "/null"), "device"),
        ]
        for member, reason in cases:
            with self.subTest(member=member[0].name):
                self.assert_rejected(archive_bytes(good + [member]), reason)

    def test_devices_and_fifos_are_rejected(self):
        for kind in (tarfile.CHRTYPE, tarfile.BLKTYPE, tarfile.FIFOTYPE):
            info = tarfile.TarInfo(TOP + "/special")
            info.type, info.devmajor, info.devminor = kind, 8, 0
            with self.subTest(kind=kind):
                self.assert_rejected(archive_bytes(update_members(1700000000) + [(info, None)]), "device or pipe")

    def test_links_inside_the_top_folder_are_fine(self):
        members = update_members(1700000000) + [
            link_member(TOP + "/box-config-daemon/current", "daemon.bin"),
            link_member(TOP + "/box-config-daemon/again", TOP + "/VERSION", hard=True)]
        check(archive_bytes(members))

    def test_memory_stays_flat_for_a_large_archive(self):
        payload_size = 48 << 20
        tar = io.BytesIO()
        with tarfile.open(fileobj=tar, mode="w") as archive:
            for info, data in update_members(1700000000):
                archive.addfile(info, io.BytesIO(data) if data is not None else None)
            big = tarfile.TarInfo(TOP + "/box-config-daemon/big.img")
            big.size = payload_size
            archive.addfile(big, io.BytesIO(bytes(payload_size)))
        data = bz2.compress(tar.getvalue(), 1)
        del tar
        tracemalloc.start()
        try:
            check(data)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        self.assertLess(peak, 4 << 20, "checking a %d MB archive peaked at %d bytes" % (payload_size >> 20, peak))


def member_blocks(members):
    """Tar members without the end-of-archive blocks, so that more can follow."""
    out = b""
    for info, data in members:
        info.size = len(data) if data is not None else 0
        out += info.tobuf(tarfile.GNU_FORMAT) + (data or b"") + b"\0" * (-len(data or b"") % 512)
    return out


END = bytes(1024)


def raw_header(name, kind, size, data_blocks=b""):
    """One tar header block of any type and declared size, and the data that follows it."""
    info = tarfile.TarInfo(name)
    info.type, info.size = kind, size
    return info.tobuf(tarfile.GNU_FORMAT) + data_blocks


def pax_header(records, kind=tarfile.XHDTYPE):
    """A pax extended header carrying the given key=value records."""
    body = b""
    for key, value in records:
        record = b" %s=%s\n" % (key, value)
        length = len(record) + len(str(len(record)))
        length += len(str(length)) - len(str(len(record)))
        body += str(length).encode() + record
    return raw_header("././@PaxHeader", kind, len(body), body + b"\0" * (-len(body) % 512))


def bomb(declared_size):
    """A GNU long-name header declaring declared_size bytes, which the stream then really holds."""
    compressor = bz2.BZ2Compressor(9)
    parts = [compressor.compress(raw_header("././@LongLink", tarfile.GNUTYPE_LONGNAME, declared_size))]
    chunk = b"a" * (1 << 20)
    for _ in range(declared_size >> 20):
        parts.append(compressor.compress(chunk))
    return b"".join(parts) + compressor.flush()


class TarFramingTest(unittest.TestCase):
    """The tar stream is judged header by header before tarfile reads it: bounded memory, no hidden members."""

    def assert_rejected(self, tar, reason_part):
        with self.assertRaises(bus.ArchiveError) as caught:
            check(bz2.compress(tar))
        self.assertIn(reason_part, str(caught.exception))

    def good_members(self):
        return member_blocks(update_members(1700000000))

    def good_tar(self):
        return self.good_members() + END

    def test_a_long_name_bomb_is_refused_in_bounded_memory(self):
        data = bomb(32 << 20)
        self.assertLess(len(data), 4096)
        tracemalloc.start()
        try:
            with self.assertRaises(bus.ArchiveError) as caught:
                check(data)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        self.assertIn("declares %d bytes of names or pax data" % (32 << 20), str(caught.exception))
        self.assertLess(peak, 4 << 20, "peaked at %d bytes" % peak)

    def test_oversized_metadata_members_are_refused(self):
        for kind in (tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK, tarfile.XHDTYPE, tarfile.XGLTYPE):
            with self.subTest(kind=kind):
                self.assert_rejected(raw_header("x", kind, bus.MAX_TAR_METADATA + 1) + self.good_tar(), "at most")

    def test_sparse_members_are_refused(self):
        self.assert_rejected(raw_header(TOP + "/sparse", tarfile.GNUTYPE_SPARSE, 0) + self.good_tar(), "sparse")
        self.assert_rejected(pax_header([(b"GNU.sparse.major", b"1"), (b"GNU.sparse.minor", b"0")]) +
                             self.good_tar(), "sparse")

    def test_unknown_member_types_and_links_with_data_are_refused(self):
        self.assert_rejected(raw_header(TOP + "/dump", b"D", 0) + self.good_tar(), "type 'D'")
        self.assert_rejected(self.good_members() + raw_header(TOP + "/l", tarfile.SYMTYPE, 512, b"x" * 512) + END,
                             "with 512 bytes of data")

    def test_a_pax_size_is_followed_to_the_next_header(self):
        """A pax size overrides the member's own size field (for files over 8 GB): both readers must agree."""
        payload = os.urandom(700)
        member = raw_header(TOP + "/box-config-daemon/blob", tarfile.REGTYPE, 0, payload + bytes(-700 % 512))
        check(bz2.compress(self.good_members() + pax_header([(b"size", b"700")]) + member + END))
        tar = self.good_tar()
        self.assert_rejected(pax_header([(b"size", b"5")], tarfile.XGLTYPE) + tar, "unusable size")
        self.assert_rejected(pax_header([(b"size", b"-5")]) + tar, "unusable size")

    def test_a_damaged_header_cannot_hide_the_members_after_it(self):
        """tarfile stops quietly at a header it cannot read; GNU tar on a box skips it and extracts what follows."""
        evil = member_blocks([file_member("etc/cron.d/evil", b"* * * * * root sh -c evil\n")])
        tar = self.good_members() + b"\x01" * 512 + evil + END
        self.assert_rejected(tar, "damaged tar header at byte %d" % len(self.good_members()))
        if shutil.which("tar"):
            listing = subprocess.run(["tar", "-tjf", "-"], input=bz2.compress(tar), stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE).stdout.decode()
            self.assertIn("etc/cron.d/evil", listing, "GNU tar reads past the damaged header")

    def test_a_header_with_a_wrong_checksum_is_refused(self):
        good = self.good_members()
        header = bytearray(member_blocks([file_member(TOP + "/box-config-daemon/x", b"")]))
        header[0] ^= 0x01                       # the name changes, the stored checksum does not: fields still parse
        evil = member_blocks([file_member("etc/cron.d/evil", b"* * * * * root sh -c evil\n")])
        self.assert_rejected(good + bytes(header) + evil + END, "damaged tar header at byte %d" % len(good))

    def test_an_old_style_signed_checksum_is_accepted(self):
        """Old tars summed header bytes as signed chars; tarfile and GNU tar accept either sum."""
        info = tarfile.TarInfo(TOP + "/box-config-daemon/caf\xe9")
        block = bytearray(info.tobuf(tarfile.GNU_FORMAT, encoding="latin-1"))
        outside = block[:148] + block[156:]
        block[148:156] = b"%06o\0 " % (sum(outside) + 8 * 0x20 - 256 * sum(1 for byte in outside if byte > 127))
        check(bz2.compress(self.good_members() + bytes(block) + END))

    def test_only_zeros_may_follow_the_end_of_the_archive(self):
        tar = self.good_tar()
        check(bz2.compress(tar + bytes(10240)))
        self.assert_rejected(tar + tar_bytes([file_member(TOP + "/more", b"x")]), "data after the end")


class CheckCommandTest(TempDirTestCase):
    """``box_update_server.py check FILE...`` for operators, before publishing."""

    def run_check(self, *paths):
        finished = subprocess.run([python_executable(), SERVER, "check"] + list(paths), cwd=ROOT,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=30)
        return finished.returncode, finished.stdout.decode()

    def test_good_archives_pass_with_their_sha256(self):
        path = make_update(self.tmp, 1700000000)
        status, output = self.run_check(path)
        self.assertEqual(status, 0, output)
        with open(path, "rb") as archive:
            self.assertIn("OK        %s  %s" % (hashlib.sha256(archive.read()).hexdigest(), path), output)

    def test_the_readme_build_command_makes_an_archive_that_passes(self):
        tar = require_binary("tar")
        with open(os.path.join(ROOT, "README.md")) as readme:
            command = re.search(r"^tar -C build -cjf .*$", readme.read(), re.M).group(0)
        version = re.search(r"opq-box-update-(\d+)\.tar\.bz2", command).group(1)
        top = os.path.join(self.tmp, "build", "opq-box-update-%s" % version)
        os.makedirs(os.path.join(top, "box-config-daemon"))
        for name, data, mode in [("VERSION", version + "\n", 0o644), ("install_update.sh", "#!/bin/sh\n", 0o755),
                                 ("box-config-daemon/daemon.py", "print('running')\n", 0o644)]:
            with open(os.path.join(top, name), "w") as out:
                out.write(data)
            os.chmod(os.path.join(top, name), mode)
        subprocess.run(["bash", "-c", command.replace("tar ", "exec %s " % tar, 1)], cwd=self.tmp, check=True,
                       timeout=30)
        status, output = self.run_check(os.path.join(self.tmp, "opq-box-update-%s.tar.bz2" % version))
        self.assertEqual(status, 0, output)
        self.assertTrue(output.startswith("OK "), output)

    def test_any_bad_archive_fails_the_command(self):
        good = make_update(self.tmp, 1700000000)
        bad = make_update(self.tmp, 1700000001, update_members(1700000001, version_content="5"))
        misnamed = os.path.join(self.tmp, "update.tar.bz2")
        publish(misnamed, archive_bytes(update_members(1)))
        status, output = self.run_check(good, bad, misnamed, os.path.join(self.tmp, "opq-box-update-5.tar.bz2"))
        self.assertEqual(status, 1)
        lines = output.splitlines()
        self.assertEqual(len(lines), 4)
        self.assertTrue(lines[0].startswith("OK"))
        self.assertIn("REJECTED  %s: " % bad, lines[1])
        self.assertIn("not named opq-box-update-<VERSION>.tar.bz2", lines[2])
        self.assertIn("No such file", lines[3])

    def test_a_fifo_or_device_is_reported_not_waited_on(self):
        fifo = os.path.join(self.tmp, "opq-box-update-1700000000.tar.bz2")
        os.mkfifo(fifo)
        status, output = self.run_check(fifo, "/dev/zero")
        self.assertEqual(status, 1)
        self.assertIn("REJECTED  %s: not a regular file" % fifo, output)
        self.assertIn("REJECTED  /dev/zero: not named", output)
        device = os.path.join(self.tmp, "opq-box-update-1700000001.tar.bz2")
        try:
            os.symlink("/dev/zero", device)
        except OSError as error:
            self.skipTest("cannot make a symbolic link here: %s" % error)
        status, output = self.run_check(device)
        self.assertIn("REJECTED  %s: not a regular file" % device, output)

    def test_shipped_examples_pass(self):
        examples = os.path.join(ROOT, "examples", "updates")
        status, output = self.run_check(*[os.path.join(examples, name) for name in sorted(os.listdir(examples))])
        self.assertEqual(status, 0, output)


class VerifiedPublicationTest(TempDirTestCase):
    """Through the real server: what fails the checks is never offered anywhere."""

    def test_bad_archives_are_never_offered(self):
        good = make_update(self.updates, 1700000000)
        bad_versions = {
            1700000001: archive_bytes(update_members(1700000001))[:-20],                       # truncated
            1700000002: archive_bytes(update_members(1700000002, version_content="1")),         # wrong VERSION
            1700000003: archive_bytes(update_members(1700000003) + [file_member("/tmp/x", b"")]),  # escaping
            1700000004: archive_bytes(update_members(1700000004) + [link_member(
                "opq-box-update-1700000004/l", "/etc")]),                                       # escaping link
            1700000005: b"BZh91AY&SY" + os.urandom(500),                                       # corrupt
        }
        for version, data in bad_versions.items():
            publish(os.path.join(self.updates, "opq-box-update-%d.tar.bz2" % version), data)
        server = self.start_server()
        self.assertTrue(wait_until(lambda: server.health().get("info", "").startswith("5 file(s)"), 10),
                        server.health())
        self.assertEqual(server.get("/ls").body.decode(), os.path.basename(good))
        self.assertEqual(server.get("/version").body.decode(), "1700000000")
        self.assertEqual(server.get("/latest").header("Location"), "update/" + os.path.basename(good))
        for version in bad_versions:
            name = "opq-box-update-%d.tar.bz2" % version
            self.assertEqual(server.get("/update/" + name).status, 404)
            self.assertEqual(server.get("/update/" + name + ".sha256").status, 404)
            self.assertEqual(server.log().count("rejected %s:" % name), 1)
        health = server.health()
        self.assertTrue(health["ok"])
        self.assertIn("rejected", health["info"])

    def test_a_new_update_renamed_into_place_is_offered_promptly(self):
        server = self.start_server()
        for version in (1700000000, 1700000001, 1700000002):
            make_update(self.updates, version)   # written now, then renamed into place
            self.assertTrue(wait_until(lambda: server.get("/version").body == str(version).encode(), 5))

    def test_checksum_route_and_header_match_hashlib(self):
        path = make_update(self.updates, 1700000000)
        with open(path, "rb") as archive:
            digest = hashlib.sha256(archive.read())
        server = self.start_server()
        name = os.path.basename(path)
        answer = server.get("/update/%s.sha256" % name)
        self.assertEqual(answer.status, 200)
        self.assertEqual(answer.header("Content-Type"), "text/plain")
        self.assertEqual(answer.body.decode(), "%s  %s\n" % (digest.hexdigest(), name))
        expected = "sha-256=:%s:" % base64.b64encode(digest.digest()).decode()
        self.assertEqual(server.get("/update/" + name).header("Repr-Digest"), expected)
        ranged = server.get("/update/" + name, {"Range": "bytes=0-9"})
        self.assertEqual((ranged.status, ranged.header("Repr-Digest")), (206, expected))

    def test_sha256sum_checks_a_box_download(self):
        require_binary("sha256sum")
        require_binary("wget")
        make_update(self.updates, 1700000000)
        server = self.start_server()
        script = ('wget -q {base}/latest -O update.tar.bz2 && name=$(wget -q -O - {base}/ls | tail -n 1) && '
                  'wget -q -O - {base}/update/$name.sha256 | sed "s|  $name\\$|  update.tar.bz2|" | sha256sum -c -')
        finished = subprocess.run(["bash", "-c", script.format(base=server.url(""))], cwd=self.tmp,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        self.assertEqual(finished.returncode, 0, finished.stdout)
        self.assertIn(b"update.tar.bz2: OK", finished.stdout)

    def test_verification_off_offers_every_named_file_once_settled_without_waiting_for_its_hash(self):
        big = os.path.join(self.updates, "opq-box-update-1700000008.tar.bz2")
        with open(big, "wb") as sparse:
            sparse.truncate(2 << 30)           # hashing 2 GB takes seconds; offering it must not wait for that
        publish(os.path.join(self.updates, "opq-box-update-1700000009.tar.bz2"), b"not even bzip2")
        server = self.start_server(verify_updates=False, wait_for_checks=False)
        self.assertTrue(wait_until(lambda: server.get("/version").body == b"1700000009", 5), server.log())
        self.assertEqual(server.get("/update/opq-box-update-1700000009.tar.bz2").body, b"not even bzip2")
        self.assertEqual(server.request("HEAD", "/update/" + os.path.basename(big)).header("Content-Length"),
                         str(2 << 30))
        self.assertEqual(server.get("/update/%s.sha256" % os.path.basename(big)).status, 503, "hashed already?")
        self.assertIn("waiting to be checked", server.health()["info"])


class OpenRegularTest(TempDirTestCase):
    """open_regular, on its own: the catalog's check and every download open files through it."""

    def attempt(self, path):
        """What open_regular did with path, from a thread: a hang (no O_NONBLOCK) fails instead of stalling."""
        outcome = []

        def opening():
            try:
                descriptor, status = bus.open_regular(path)
                os.close(descriptor)
                outcome.append("regular, %d bytes" % status.st_size)
            except OSError as error:
                outcome.append(error.strerror)
        worker = threading.Thread(target=opening, daemon=True)
        worker.start()
        worker.join(10)
        return outcome[0] if outcome else "still waiting after 10 s"

    def test_only_a_regular_file_is_opened_and_nothing_is_waited_on(self):
        regular = os.path.join(self.tmp, "regular")
        with open(regular, "wb") as out:
            out.write(b"1234")
        fifo, link, folder = (os.path.join(self.tmp, name) for name in ("fifo", "link", "folder"))
        os.mkfifo(fifo)
        self.addCleanup(self.release_fifo, fifo)
        os.symlink(regular, link)
        os.mkdir(folder)
        cases = [(regular, "regular, 4 bytes"), (fifo, "not a regular file"), (folder, "not a regular file"),
                 ("/dev/null", "not a regular file"), (link, os.strerror(errno.ELOOP))]
        for path, expected in cases:
            with self.subTest(path=path):
                self.assertEqual(self.attempt(path), expected)

    @staticmethod
    def release_fifo(fifo):
        """A thread stuck opening the FIFO (the check mutated away) is let go by a writer."""
        try:
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        except OSError:
            pass


if __name__ == "__main__":
    unittest.main()
