"""Archive checks: only whole, well-formed updates are offered, with checksums that match."""

import base64
import bz2
import errno
import hashlib
import inspect
import io
import json
import os
import random
import re
import shutil
import subprocess
import tarfile
import threading
import tracemalloc
import unittest

from support import (ROOT, SERVER, TempDirTestCase, archive_bytes, device_member, dir_member, file_member,
                     link_member, make_update, pax_records, publish, python_executable, require_binary, tar_bytes,
                     update_members, wait_until)

import box_update_server as bus

TOP = "opq-box-update-1700000000"


def check(data, version="1700000000"):
    return bus.check_update_archive(io.BytesIO(data), version)


def within(seconds, function, *arguments):
    """function(*arguments), failing the test if it has not returned after seconds (a check that never ends)."""
    outcome = {}

    def run():
        try:
            outcome["value"] = function(*arguments)
        except BaseException as error:  # pylint: disable=broad-except  # handed to the test's thread
            outcome["error"] = error
    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    worker.join(seconds)
    if worker.is_alive():
        raise AssertionError("still running after %d s" % seconds)
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


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

    def test_install_update_sh_must_be_an_executable_regular_file(self):
        """Every box runs ./install_update.sh: without an execute bit it cannot; a link or folder is not the script."""
        def with_installer(*installer):
            return archive_bytes([dir_member(TOP), file_member(TOP + "/VERSION", b"1700000000")] + list(installer))
        for mode in (0o755, 0o700, 0o744, 0o100, 0o4755):
            with self.subTest(mode=oct(mode)):
                check(with_installer(file_member(TOP + "/install_update.sh", b"#!/bin/sh\n", mode)))
        for mode in (0o644, 0o600, 0o666, 0o4644):
            with self.subTest(mode=oct(mode)):
                self.assert_rejected(with_installer(file_member(TOP + "/install_update.sh", b"#!/bin/sh\n", mode)),
                                     "install_update.sh is not executable (mode %04o)" % mode)
        script = file_member(TOP + "/install_update.sh", b"#!/bin/sh\n", 0o755)
        for other, reason in [(link_member(TOP + "/install_update.sh", "VERSION"), "not a regular file"),
                              (link_member(TOP + "/install_update.sh", TOP + "/VERSION", hard=True),
                               "not a regular file"),
                              (dir_member(TOP + "/install_update.sh"), "not a regular file"),
                              (file_member(TOP + "/install_update.sh/x", b""), "make install_update.sh a folder"),
                              (file_member(TOP + "/VERSION/x", b""), "make VERSION a folder")]:
            with self.subTest(other=other[0].name, type=other[0].type):
                self.assert_rejected(with_installer(script, other), reason)         # tar xf replaces the script
                self.assert_rejected(with_installer(other), reason)

    def test_the_expanded_size_is_limited(self):
        tar = tar_bytes(update_members(1700000000))
        data = bz2.compress(tar)
        self.assertEqual(bus.check_update_archive(io.BytesIO(data), "1700000000", len(tar)).sha256,
                         hashlib.sha256(data).digest())
        with self.assertRaises(bus.ArchiveError) as caught:
            bus.check_update_archive(io.BytesIO(data), "1700000000", len(tar) - 1)
        self.assertEqual(str(caught.exception), "expands to more than %d bytes (max_expanded_bytes)" % (len(tar) - 1))
        default = inspect.signature(bus.check_update_archive).parameters["max_expanded_bytes"].default
        self.assertEqual(default, 4 << 30)
        self.assertEqual(bus.Settings(port=1, updates_dir="/").max_expanded_bytes, default)

    def test_a_bomb_is_rejected_without_decompressing_the_rest(self):
        """An endless bzip2 file of zeros: decompression stops as soon as the tar stream passes the limit."""
        bomb_file = EndlessBomb(give_up_after=64)
        with self.assertRaises(bus.ArchiveError) as caught:
            bus.check_update_archive(bomb_file, "1700000000", 8 << 20)
        self.assertIn("expands to more than %d bytes" % (8 << 20), str(caught.exception))
        self.assertLessEqual(bomb_file.units, 10, "read on past the limit")

    def test_absurd_numbers_in_pax_records_reject_the_archive(self):
        """Past CPython's 4,300-digit int() limit (3.11+) and past GNU tar's off_t: a reason, never a traceback."""
        tail = member_blocks(update_members(1700000000)) + END
        for records, reason in [([(b"size", b"9" * 5000)], "unusable size"),
                                ([(b"size", b"1" * 19)], "unusable size"),
                                ([(b"size", b"0" * 4999 + b"1")], "unusable size")]:
            with self.subTest(record=records[0][1][:20]):
                self.assert_rejected(bz2.compress(pax_header(records) + tail), reason)
        huge_length = b"9" * 5000 + b" path=x\n"
        for body in (huge_length, b"0" * 5000 + b"12 path=x\n"):
            with self.subTest(body=body[:20]):
                self.assert_rejected(bz2.compress(raw_header("././@PaxHeader", tarfile.XHDTYPE, len(body), body +
                                                             bytes(-len(body) % 512)) + tail), "malformed pax header")

    def test_any_header_bytes_give_a_verdict_or_an_archive_error(self):
        """Seeded random header fields, checksums kept valid: nothing but ArchiveError comes out of a check."""
        within(300, self.random_headers)

    def random_headers(self):
        rng = random.Random(1700000000)
        good = bytearray(member_blocks(update_members(1700000000) + [
            link_member(TOP + "/box-config-daemon/l", "daemon.bin")]) + END)
        headers = [offset for offset in range(0, len(good) - 1024, 512)
                   if bytes(good[offset + 257:offset + 262]) == b"ustar"]
        fields = [(0, 100), (100, 8), (124, 12), (148, 8), (156, 1), (157, 100), (257, 8), (345, 155)]
        outcomes = set()
        for _ in range(400):
            tar = bytearray(good)
            offset = rng.choice(headers)
            for _ in range(rng.randint(1, 3)):
                start, length = rng.choice(fields)
                value = rng.choice([b"", b"\0", b"/", b"..", b"../x", b"ustar\0", b"ustar  \0", b"7" * 12,
                                    b"\x80" + b"\xff" * 11, b"L", b"K", b"x", b"g", b"5", b"2", b"1", b"0",
                                    os.urandom(length), TOP.encode() + b"/"])
                tar[offset + start:offset + start + length] = value[:length].ljust(length, b"\0")
            if rng.random() < 0.9:
                block = tar[offset:offset + 512]
                block[148:156] = b" " * 8
                tar[offset + 148:offset + 156] = b"%06o\0 " % sum(block)
            try:
                check(bz2.compress(bytes(tar)))
                outcomes.add("ok")
            except bus.ArchiveError as error:
                outcomes.add(" ".join(str(error).split(" ")[:2]))
        self.assertIn("ok", outcomes)
        self.assertGreater(len(outcomes), 8, outcomes)

    def test_a_member_declaring_more_data_than_the_stream_holds_is_rejected_at_once(self):
        """tarfile would seek on through the declared size (2**88 bytes here) reading nothing, for ever."""
        info = tarfile.TarInfo(TOP + "/box-config-daemon/huge")
        block = bytearray(info.tobuf(tarfile.GNU_FORMAT))
        block[124:136] = b"\x80" + b"\xff" * 11                  # GNU base-256
        block[148:156] = b" " * 8
        block[148:156] = b"%06o\0 " % sum(block)
        tar = member_blocks(update_members(1700000000)) + bytes(block) + bytes(5000)
        for data in (bz2.compress(tar), bz2.compress(tar[:-5000]), bz2.compress(tar[:-4000]) + bz2.compress(b"")):
            with self.assertRaises(bus.ArchiveError) as caught:
                within(30, check, data)
            self.assertIn("truncated: the tar stream ends at byte", str(caught.exception))

    def test_memory_stays_flat_for_many_members(self):
        """tarfile keeps each member it reads; the check lets them go, and stops at the first one tarfile misses."""
        many = member_blocks([file_member(TOP + "/box-config-daemon/f%d" % number, b"") for number in range(8000)])
        hidden = bytearray(member_blocks([file_member(TOP + "/box-config-daemon/x", b"")]))
        hidden[108:116] = b"zzzzzzz\0"               # tarfile stops here; GNU tar reads on
        hidden[148:156] = b" " * 8
        hidden[148:156] = b"%06o\0 " % sum(hidden[:512])
        good = member_blocks(update_members(1700000000))
        for tar, reason in [(good + many + END, None), (good + bytes(hidden) + many + END, "GNU tar reads it")]:
            data = bz2.compress(tar)
            tracemalloc.start()
            try:
                if reason is None:
                    check(data)
                else:
                    with self.assertRaises(bus.ArchiveError) as caught:
                        check(data)
                    self.assertIn(reason, str(caught.exception))
                _, peak = tracemalloc.get_traced_memory()
            finally:
                tracemalloc.stop()
            self.assertLess(peak, 1 << 20, "8,000 members peaked at %d bytes" % peak)

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
    body = pax_records(records)
    return raw_header("././@PaxHeader", kind, len(body), body + b"\0" * (-len(body) % 512))


def bomb(declared_size):
    """A GNU long-name header declaring declared_size bytes, which the stream then really holds."""
    compressor = bz2.BZ2Compressor(9)
    parts = [compressor.compress(raw_header("././@LongLink", tarfile.GNUTYPE_LONGNAME, declared_size))]
    chunk = b"a" * (1 << 20)
    for _ in range(declared_size >> 20):
        parts.append(compressor.compress(chunk))
    return b"".join(parts) + compressor.flush()


class MaxExpandedBytesSettingTest(unittest.TestCase):

    def parse(self, **raw):
        settings, _ = bus.parse_settings(json.dumps(dict({"port": 8151, "updates_dir": "/srv/updates"}, **raw)))
        return settings

    def test_default_value_and_errors(self):
        self.assertEqual(self.parse().max_expanded_bytes, 4 << 30)
        self.assertEqual(self.parse(max_expanded_bytes=1 << 20).max_expanded_bytes, 1 << 20)
        self.assertEqual(self.parse(max_expanded_bytes=None).max_expanded_bytes, 4 << 30)
        for bad in (0, -1, True, "1000", 1.5, [1]):
            with self.subTest(value=bad):
                with self.assertRaises(bus.SettingsError) as caught:
                    self.parse(max_expanded_bytes=bad)
                self.assertIn("max_expanded_bytes must be a positive integer", str(caught.exception))


class EndlessBomb(io.RawIOBase):
    """A .tar.bz2 that never ends: a member declaring 7 GiB, then bzip2 streams of 1 MiB of zeros for ever."""

    UNIT = bz2.compress(bytes(1 << 20))

    def __init__(self, give_up_after):
        super().__init__()
        info = tarfile.TarInfo(TOP + "/box-config-daemon/huge")
        info.size = 7 << 30
        self.head = bz2.compress(info.tobuf(tarfile.GNU_FORMAT))
        self.units = 0
        self.give_up_after = give_up_after

    def readable(self):
        return True

    def read(self, size=-1):
        if self.head:
            data, self.head = self.head, b""
            return data
        self.units += 1
        if self.units > self.give_up_after:
            raise RuntimeError("the check read %d MiB of tar data past the limit" % self.units)
        return self.UNIT


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

    def test_tarfile_and_gnu_tar_must_read_the_same_members(self):
        """What tarfile checks must be what GNU tar extracts: a member either reads differently is refused."""
        hidden = bytearray(member_blocks([file_member(TOP + "/box-config-daemon/x", b"")]))
        hidden[108:116] = b"zzzzzzz\0"               # a uid tarfile stops quietly at; GNU tar warns and goes on
        hidden[148:156] = b" " * 8
        hidden[148:156] = b"%06o\0 " % sum(hidden[:512])
        evil = member_blocks([file_member("etc/cron.d/evil", b"* * * * * root sh -c evil\n")])
        tar = self.good_members() + bytes(hidden) + evil + END
        self.assert_rejected(tar, "tar member at byte %d: GNU tar reads it, Python's tarfile does not"
                             % len(self.good_members()))
        if shutil.which("tar"):
            listing = subprocess.run(["tar", "-tjf", "-"], input=bz2.compress(tar), stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE).stdout.decode()
            self.assertIn("etc/cron.d/evil", listing, "GNU tar reads past the member tarfile stops at")
        self.assert_rejected(self.good_members() + member_blocks([link_member(TOP + "/box-config-daemon/l/", "x")])
                             + END, "Python's tarfile reads ('%s/box-config-daemon/l/', 'x'), GNU tar" % TOP)

    def test_metadata_must_describe_a_member(self):
        for metadata in (raw_header("././@LongLink", tarfile.GNUTYPE_LONGNAME, 10, b"abcdefghi\0" + bytes(502)),
                         pax_header([(b"path", TOP.encode() + b"/x")])):
            with self.subTest(kind=metadata[156:157]):
                self.assert_rejected(self.good_members() + metadata + END, "describes no member")

    def test_whatever_tarfile_raises_is_an_archive_error(self):
        """tarfile 3.7 to 3.12 raises UnicodeDecodeError for this pax header (3.13 reads it): a reason, no traceback."""
        try:
            check(bz2.compress(pax_header([(b"hdrcharset", b"\xff\xfe")]) + self.good_tar()))
        except bus.ArchiveError as error:
            self.assertIn("Python's tarfile cannot read it (UnicodeDecodeError", str(error))

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

    def test_an_absurd_pax_size_is_rejected_and_later_files_are_still_checked(self):
        bad = os.path.join(self.tmp, "opq-box-update-1700000001.tar.bz2")
        publish(bad, bz2.compress(pax_header([(b"size", b"9" * 5000)]) +
                                  member_blocks(update_members(1700000001)) + END))
        good = make_update(self.tmp, 1700000002)
        finished = subprocess.run([python_executable(), SERVER, "check", bad, good], cwd=ROOT,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=30)
        lines = finished.stdout.decode().splitlines()
        self.assertEqual(finished.returncode, 1)
        self.assertEqual(lines[0], "REJECTED  %s: pax header at byte 0 sets an unusable size" % bad)
        self.assertTrue(lines[1].startswith("OK        "), lines)
        self.assertEqual(finished.stderr, b"")

    def test_max_expanded_bytes_can_be_given(self):
        path = make_update(self.tmp, 1700000000)
        status, output = self.run_check("--max-expanded-bytes", "4096", path)
        self.assertEqual(status, 1)
        self.assertIn("REJECTED  %s: expands to more than 4096 bytes" % path, output)
        self.assertEqual(self.run_check("--max-expanded-bytes", str(1 << 20), path)[0], 0)
        finished = subprocess.run([python_executable(), SERVER, "check", "--max-expanded-bytes", "0", path],
                                  cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=30)
        self.assertEqual(finished.returncode, 2)
        self.assertIn(b"--max-expanded-bytes must be a positive number of bytes", finished.stderr)

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

    def test_archives_past_the_limits_are_rejected_with_the_reason_never_a_traceback(self):
        make_update(self.updates, 1700000000)
        publish(os.path.join(self.updates, "opq-box-update-1700000001.tar.bz2"),
                bz2.compress(pax_header([(b"size", b"9" * 5000)]) + member_blocks(update_members(1700000001)) + END))
        make_update(self.updates, 1700000002, update_members(1700000002) + [
            file_member(TOP[:-1] + "2/box-config-daemon/big.bin", bytes(40000))])
        server = self.start_server(max_expanded_bytes=30000)
        self.assertTrue(wait_until(lambda: "2 file(s) in the updates folder rejected" in server.health()["info"], 10),
                        server.health())
        log = server.log()
        self.assertIn("rejected opq-box-update-1700000001.tar.bz2: pax header at byte 0 sets an unusable size", log)
        self.assertIn("rejected opq-box-update-1700000002.tar.bz2: expands to more than 30000 bytes", log)
        self.assertNotIn("Traceback", log)
        self.assertNotIn("checking opq-box-update", log)
        self.assertEqual(server.get("/version").body, b"1700000000")

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
