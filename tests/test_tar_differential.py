"""Archive paths judged as GNU tar extracts them: every crafted archive is refused, or lists and unpacks as judged.

The reference is the real GNU tar (1.34 on Raspberry Pi OS bookworm, as the boxes run it): for each archive
of a corpus of hand-built headers, either the server refuses it, or the members it judged are exactly those
``tar tvf`` lists (names and link targets) and ``tar xf`` in a temporary folder puts nothing outside the top
folder.  Cases that must pass are named, so the test cannot hold by refusing everything; cases where Python's
tarfile and GNU tar read different paths are shown to escape with the real ``tar xf``, then to be refused.
"""

import bz2
import io
import os
import re
import subprocess
import tempfile
import unittest

from support import pax_records, require_binary

import box_update_server as bus

VERSION = "1700000000"
TOP = ("opq-box-update-%s" % VERSION).encode()

V7, GNU, USTAR = b"\0" * 8, b"ustar  \0", b"ustar\x0000"     # the magic and version fields of each format
END = bytes(1024)


def header(name, kind=b"0", size=0, linkname=b"", prefix=b"", magic=GNU, mode=0o644):
    """One tar header block, every field chosen, with a correct checksum."""
    block = bytearray(512)
    block[0:100] = name[:100].ljust(100, b"\0")
    block[100:108] = b"%07o\0" % mode
    block[108:124] = b"0000000\0" * 2
    block[124:136] = b"%011o\0" % size
    block[136:148] = b"%011o\0" % 1700000000
    block[148:156] = b" " * 8
    block[156:157] = kind
    block[157:257] = linkname[:100].ljust(100, b"\0")
    block[257:265] = magic
    block[345:500] = prefix[:155].ljust(155, b"\0")
    block[148:156] = b"%06o\0 " % sum(block)
    return bytes(block)


def padded(data):
    return data + bytes(-len(data) % 512)


def regular(name, data=b"x\n", mode=0o644, **fields):
    return header(name, b"0", len(data), mode=mode, **fields) + padded(data)


def folder(name, **fields):
    return header(name, b"5", mode=0o755, **fields)


def symlink(name, target, **fields):
    return header(name, b"2", linkname=target, mode=0o777, **fields)


def hardlink(name, target, **fields):
    return header(name, b"1", linkname=target, **fields)


def long_name(name, kind=b"L"):
    """A GNU long name (L) or long link (K) header and its data, as GNU tar writes them (NUL included)."""
    return header(b"././@LongLink", kind, len(name) + 1) + padded(name + b"\0")


def pax(records, kind=b"x"):
    """A pax extended header (x, or g for global) holding key=value records."""
    body = pax_records(records)
    return header(b"./PaxHeaders/x", kind, len(body), magic=USTAR) + padded(body)


def update(*extra, magic=GNU):
    """A good update (top folder, VERSION, install_update.sh, box-config-daemon/), then the crafted headers."""
    return (folder(TOP + b"/", magic=magic) + regular(TOP + b"/VERSION", VERSION.encode() + b"\n", magic=magic)
            + regular(TOP + b"/install_update.sh", b"#!/bin/sh\necho installed\n", 0o755, magic=magic)
            + folder(TOP + b"/box-config-daemon/", magic=magic) + b"".join(extra) + END)


LONG = TOP + b"/box-config-daemon/" + b"d" * 120 + b"/file.txt"     # too long for the 100-byte name field

# name, tar stream, expected: "ok" (must pass), "refused" (must be refused; GNU tar may unpack it safely), or
# "escapes" (must be refused; the real tar xf writes outside the top folder)
CORPUS = [
    ("gnu format, plain", update(regular(TOP + b"/box-config-daemon/a.txt")), "ok"),
    ("ustar format, plain", update(regular(TOP + b"/box-config-daemon/a.txt", magic=USTAR), magic=USTAR), "ok"),
    ("v7 format, plain", update(regular(TOP + b"/box-config-daemon/a.txt", magic=V7), magic=V7), "ok"),
    ("leading ./", update(regular(b"./" + TOP + b"/box-config-daemon/a.txt")), "ok"),
    # the prefix field in each format
    ("prefix in v7 header", update(regular(b".profile", prefix=TOP, magic=V7)), "escapes"),
    ("prefix in gnu header", update(regular(b"escaped.txt", prefix=TOP, magic=GNU)), "escapes"),
    ("prefix in ustar header", update(regular(b"a.txt", prefix=TOP + b"/box-config-daemon", magic=USTAR)), "ok"),
    ("prefix in ustar header, escaping", update(regular(b"a.txt", prefix=b"elsewhere", magic=USTAR)), "escapes"),
    ("prefix in ustar header, dotdot", update(regular(b"a.txt", prefix=TOP + b"/..", magic=USTAR)), "refused"),
    ("prefix in ustar header, folder", update(folder(b"sub/", prefix=TOP + b"/box-config-daemon",
                                                     magic=USTAR)), "ok"),
    ("prefix in pax member, pax path wins in both",
     update(pax([(b"path", TOP + b"/box-config-daemon/p.txt")]) +
            regular(b"q.txt", prefix=b"elsewhere", magic=USTAR)), "ok"),
    ("prefix in pax member without path", update(pax([(b"mtime", b"1700000000")]) +
                                                 regular(b"q.txt", prefix=TOP, magic=USTAR)), "ok"),
    ("prefix in gnu member with pax path", update(pax([(b"path", TOP + b"/ok.txt")]) +
                                                  regular(b"q.txt", prefix=b"elsewhere", magic=GNU)), "ok"),
    # GNU long names and links, with and without pax
    ("long name", update(long_name(LONG) + regular(LONG[:99])), "ok"),
    ("long name, escaping", update(long_name(b"../escaped.txt") + regular(TOP + b"/x")), "refused"),
    ("long name, then pax path", update(long_name(LONG) + pax([(b"path", b"escaped.txt")]) + regular(LONG[:99])),
     "escapes"),
    ("pax path, then long name", update(pax([(b"path", b"escaped.txt")]) + long_name(LONG) + regular(LONG[:99])),
     "escapes"),
    ("long name, then pax path inside", update(long_name(LONG) + pax([(b"path", TOP + b"/p.txt")]) +
                                               regular(LONG[:99])), "refused"),
    ("two long names", update(long_name(LONG) + long_name(b"escaped.txt") + regular(TOP + b"/x")), "escapes"),
    ("long name, then pax without path", update(long_name(LONG) + pax([(b"mtime", b"1")]) + regular(b"x")), "ok"),
    ("long name running on into its padding", update(header(b"././@LongLink", b"L", len(TOP) - 1) +
                                                     padded(TOP + b"/x") + regular(b"x")), "ok"),
    ("long link for a symlink", update(long_name(LONG, b"K") + symlink(TOP + b"/box-config-daemon/l", b"x")),
     "ok"),
    ("long link for a hard link", update(regular(LONG[:99]) + long_name(LONG[:99], b"K") +
                                         hardlink(TOP + b"/box-config-daemon/h", b"x")), "ok"),
    ("long link escaping", update(long_name(b"../" * 40 + b"etc", b"K") + symlink(TOP + b"/l", b"x")),
     "refused"),
    ("long link, then pax linkpath", update(long_name(b"box-config-daemon", b"K") +
                                            pax([(b"linkpath", b"../..")]) + symlink(TOP + b"/l", b"x")),
     "refused"),
    ("pax linkpath, then long link", update(pax([(b"linkpath", b"../..")]) +
                                            long_name(b"box-config-daemon", b"K") + symlink(TOP + b"/l", b"x")),
     "refused"),
    # pax path and linkpath
    ("pax path", update(pax([(b"path", TOP + b"/box-config-daemon/" + b"p" * 150)]) + regular(b"short")), "ok"),
    ("pax path, escaping", update(pax([(b"path", b".profile")]) + regular(TOP + b"/x")), "escapes"),
    ("pax path, absolute", update(pax([(b"path", b"/tmp/escaped.txt")]) + regular(TOP + b"/x")), "escapes"),
    ("pax path for a folder", update(pax([(b"path", TOP + b"/box-config-daemon/sub/")]) + folder(b"x/")), "ok"),
    ("pax path with a NUL", update(pax([(b"path", TOP + b"/x\0/../../escaped.txt")]) + regular(b"x")),
     "refused"),
    ("pax linkpath inside", update(pax([(b"linkpath", b"../VERSION")]) +
                                   symlink(TOP + b"/box-config-daemon/v", b"x")), "ok"),
    ("pax linkpath outside", update(pax([(b"linkpath", b"../../etc")]) + symlink(TOP + b"/l", b"x")), "refused"),
    ("pax linkpath, hard link", update(pax([(b"linkpath", TOP + b"/VERSION")]) +
                                       hardlink(TOP + b"/box-config-daemon/h", b"x")), "ok"),
    ("pax linkpath, hard link outside", update(pax([(b"linkpath", b"/etc/shadow")]) + hardlink(TOP + b"/h", b"x")),
     "refused"),
    ("two pax headers", update(pax([(b"path", TOP + b"/ok")]) + pax([(b"path", b"escaped.txt")]) +
                               regular(TOP + b"/x")), "escapes"),
    ("global pax path", update(pax([(b"path", b"escaped.txt")], b"g") + regular(TOP + b"/x")), "escapes"),
    ("pax record with two blanks", update(pax([(b" path", b"escaped.txt")]) + regular(TOP + b"/x")), "escapes"),
    ("pax key with a NUL", update(pax([(b"a\0b", b"c"), (b"path", TOP + b"/ok")]) + regular(TOP + b"/x")),
     "refused"),
    ("pax data hiding a record in its padding",
     update(header(b"./PaxHeaders/x", b"x", 20, magic=USTAR) + padded(b"20 path=escaped.txt\n37 path=" + TOP +
                                                                      b"/ok\n") + regular(TOP + b"/x")),
     "escapes"),
    # hard and symbolic links
    ("symlink inside", update(symlink(TOP + b"/box-config-daemon/current", b"../VERSION")), "ok"),
    ("symlink outside", update(symlink(TOP + b"/etc", b"/etc")), "refused"),
    ("hard link inside", update(hardlink(TOP + b"/box-config-daemon/v", TOP + b"/VERSION")), "ok"),
    ("hard link outside", update(hardlink(TOP + b"/shadow", b"etc/shadow")), "refused"),
    ("hard link with a prefix in a gnu header", update(hardlink(b"h", TOP + b"/VERSION", prefix=TOP)), "escapes"),
    # a file named like a folder: tar xf makes a folder and reads its data as headers (tar tvf skips it)
    ("file with a trailing slash", update(regular(TOP + b"/box-config-daemon/f/", regular(b"escaped.txt"))),
     "escapes"),
]

# the reason each refused case must give: the rule that refuses it, not merely some later check
REASONS = {
    "prefix in v7 header": "has a prefix field", "prefix in gnu header": "has a prefix field",
    "hard link with a prefix in a gnu header": "has a prefix field",
    "prefix in ustar header, escaping": "outside the top folder", "prefix in ustar header, dotdot": "'..' component",
    "long name, escaping": "'..' component", "long name, then pax path": "both a GNU long name and a pax path",
    "pax path, then long name": "both a GNU long name and a pax path",
    "long name, then pax path inside": "both a GNU long name and a pax path",
    "two long names": "a second GNU long name header", "long link escaping": "points outside the top folder",
    "long link, then pax linkpath": "both a GNU long link and a pax linkpath",
    "pax linkpath, then long link": "both a GNU long link and a pax linkpath",
    "pax path, escaping": "outside the top folder", "pax path, absolute": "absolute path",
    "pax path with a NUL": "sets a NUL byte in its path", "pax linkpath outside": "points outside the top folder",
    "pax linkpath, hard link outside": "points outside the top folder", "two pax headers": "a second pax header",
    "global pax path": "sets a global path", "pax record with two blanks": "malformed pax header",
    "pax key with a NUL": "malformed pax header", "pax data hiding a record in its padding": "hides records in",
    "symlink outside": "points outside the top folder", "hard link outside": "points outside the top folder",
    "file with a trailing slash": "has a name ending in '/'",
}


def gnu_tar():
    """The path of GNU tar, or skip: the reference must be the tar boxes run."""
    tar = require_binary("tar")
    version = subprocess.run([tar, "--version"], stdout=subprocess.PIPE, stderr=subprocess.PIPE).stdout.decode()
    if "GNU tar" not in version:
        raise unittest.SkipTest("tar is not GNU tar (%s), so the comparison is skipped" % version.split("\n")[0])
    return tar


_ESCAPES = {"\\": "\\", "a": "\a", "b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t", "v": "\v", "?": "?"}


def unquote(text):
    """A name as GNU tar's default 'escape' quoting prints it, back to the name (bytes as surrogates)."""
    out, position = bytearray(), 0
    while position < len(text):
        if text[position] == "\\" and re.match(r"[0-7]{3}", text[position + 1:position + 4]):
            out.append(int(text[position + 1:position + 4], 8))
            position += 4
        elif text[position] == "\\" and text[position + 1:position + 2] in _ESCAPES:
            out += _ESCAPES[text[position + 1]].encode()
            position += 2
        else:
            out += text[position].encode()
            position += 1
    return out.decode("utf-8", "surrogateescape")


_LISTING = re.compile(r"(\S+) \S+ +\d+ \S+ \S+ (.*)")


def tar_listing(tar, path):
    """(name, link target or None) for each member, from ``tar tvf`` (C locale, numeric owners)."""
    finished = subprocess.run([tar, "--numeric-owner", "-tvf", path], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              env=dict(os.environ, LC_ALL="C"))
    listing = []
    for line in finished.stdout.decode("ascii").splitlines():
        modes, rest = _LISTING.fullmatch(line).groups()
        separator = {"l": " -> ", "h": " link to "}.get(modes[0])
        name, target = rest.split(separator, 1) if separator else (rest, None)
        listing.append((unquote(name), unquote(target) if target is not None else None))
    return listing, finished.returncode


def judged_members(tar_stream):
    """The members the archive check judged: TarFraming's reading of the tar stream, as check_update_archive uses."""
    framing = bus.TarFraming()
    framing.feed(tar_stream)
    return [(member.name, member.linkname if member.kind in (b"1", b"2") else None) for member in framing.members]


def extract(tar, path):
    """Run ``tar xf`` (as a box does) in a fresh folder; return what appeared there at the top level."""
    with tempfile.TemporaryDirectory(prefix="box-update-tar-") as work:
        unpack = os.path.join(work, "unpack")
        os.mkdir(unpack)
        subprocess.run([tar, "xf", path], cwd=unpack, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                       env=dict(os.environ, LC_ALL="C"))
        return sorted(os.listdir(unpack)), sorted(os.listdir(work))


class GnuTarDifferentialTest(unittest.TestCase):

    def setUp(self):
        self.tar = gnu_tar()
        self.tmp = tempfile.mkdtemp(prefix="box-update-differential-")
        self.addCleanup(lambda: subprocess.run(["rm", "-rf", self.tmp]))

    def verdict(self, tar_stream):
        try:
            bus.check_update_archive(io.BytesIO(bz2.compress(tar_stream)), VERSION)
        except bus.ArchiveError as error:
            return str(error)
        return None

    def test_each_archive_is_refused_or_unpacks_as_judged(self):
        for number, (name, tar_stream, expected) in enumerate(CORPUS):
            with self.subTest(case=name):
                path = os.path.join(self.tmp, "case-%d-opq-box-update-%s.tar.bz2" % (number, VERSION))
                with open(path, "wb") as archive:
                    archive.write(bz2.compress(tar_stream))
                refusal = self.verdict(tar_stream)
                top_level, beside = extract(self.tar, path)
                escaped = top_level != [TOP.decode()] or beside != ["unpack"]
                if expected == "ok":
                    self.assertIsNone(refusal, "a sound archive was refused")
                else:
                    self.assertIsNotNone(refusal, "accepted, but GNU tar unpacks %s" % top_level)
                    self.assertIn(REASONS[name], refusal)
                if expected == "escapes":
                    self.assertTrue(escaped, "the corpus meant this case to escape with the real tar xf")
                if refusal is not None:
                    continue
                listing, status = tar_listing(self.tar, path)
                self.assertEqual(status, 0, "tar tvf failed on an accepted archive")
                self.assertEqual(judged_members(tar_stream), listing)
                self.assertFalse(escaped, "tar xf put %s beside the top folder" % top_level)

    def test_the_shipped_style_archives_agree_with_tar(self):
        """tarfile's own writers in every format: accepted, and judged as tar lists them."""
        import tarfile
        from support import update_members
        for tar_format in (tarfile.GNU_FORMAT, tarfile.PAX_FORMAT, tarfile.USTAR_FORMAT):
            members = update_members(VERSION)
            buffer = io.BytesIO()
            with tarfile.open(fileobj=buffer, mode="w", format=tar_format) as archive:
                for info, data in members:
                    archive.addfile(info, io.BytesIO(data) if data is not None else None)
                deep = tarfile.TarInfo(LONG.decode()[:-4] + ".bin" if tar_format != tarfile.USTAR_FORMAT
                                       else "%s/box-config-daemon/%s/f" % (TOP.decode(), "u" * 90))
                archive.addfile(deep, io.BytesIO(b""))
            with self.subTest(format=tar_format):
                self.assertIsNone(self.verdict(buffer.getvalue()))
                path = os.path.join(self.tmp, "format-%d.tar.bz2" % tar_format)
                with open(path, "wb") as archive:
                    archive.write(bz2.compress(buffer.getvalue()))
                self.assertEqual(judged_members(buffer.getvalue()), tar_listing(self.tar, path)[0])


if __name__ == "__main__":
    unittest.main()
