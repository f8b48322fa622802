#!/usr/bin/env python3
"""Box Update Server: publishes OPQ Box software updates over HTTP.

OPQ Boxes download ``/latest`` and run what it holds as root, OPQ Health polls
``/`` and operators ``curl /ls``.  The configuration is the JSON object in the
environment variable BOX_UPDATE_SERVER_SETTINGS (see README.md).

The file reads top to bottom in the order data flows:

1. Settings        parse and validate the configuration
2. Archive checks  what makes a file a safe update (the catalog and ``check`` share it)
3. Catalog         which updates are offered, kept fresh by background threads
4. HTTP rules      pure functions for Range and conditional requests (RFC 9110)
5. Handler         routing and responses
6. Server          threads, connection limit, graceful shutdown
7. Command line

Standard library only, CPython 3.7 to 3.13.
"""

import argparse
import bz2
import contextlib
import email.utils
import errno
import hashlib
import http.client
import http.server
import json
import logging
import os
import posixpath
import re
import signal
import socket
import stat
import sys
import tarfile
import threading
import time
import urllib.parse
from base64 import b64encode
from typing import Any, Dict, Iterator, List, NamedTuple, Optional, Tuple

logger = logging.getLogger("box_update_server")


# ---------------------------------------------------------------------------
# 1. Settings
# ---------------------------------------------------------------------------

SETTINGS_VARIABLE = "BOX_UPDATE_SERVER_SETTINGS"


class SettingsError(Exception):
    """A configuration problem: reported as one line, then exit status 1."""


class Settings(NamedTuple):
    """The server's configuration, validated."""
    port: int
    updates_dir: str
    host: str = ""                  # all interfaces
    idle_timeout: float = 30.0      # seconds a connection may sit idle or half-sent
    shutdown_grace: float = 5.0     # seconds in-flight requests get after SIGTERM
    max_connections: int = 1000     # beyond this a new connection gets 503
    verify_updates: bool = True     # check archives before offering them


REQUIRED_KEYS = ("port", "updates_dir")
_DIGITS = re.compile(r"[0-9]+")


def parse_settings(text: Optional[str], cwd: str = ".") -> Tuple[Settings, List[str]]:
    """Settings from the JSON text of BOX_UPDATE_SERVER_SETTINGS, plus warnings.

    Pure: it does not look at the file system (see check_updates_dir).
    """
    if text is None or not text.strip():
        raise SettingsError("%s is not set: it must hold a JSON object with port and updates_dir"
                            % SETTINGS_VARIABLE)
    try:
        raw = json.loads(text)
    except ValueError as error:
        raise SettingsError("%s is not valid JSON: %s" % (SETTINGS_VARIABLE, error)) from None
    if not isinstance(raw, dict):
        raise SettingsError("%s must be a JSON object, not %s" % (SETTINGS_VARIABLE, type(raw).__name__))
    for key in REQUIRED_KEYS:
        if key not in raw:
            raise SettingsError("%s has no %r" % (SETTINGS_VARIABLE, key))

    values = {}  # type: Dict[str, Any]
    values["port"] = _port_setting(raw["port"])
    values["updates_dir"] = _text_setting("updates_dir", raw["updates_dir"])
    values["updates_dir"] = os.path.normpath(os.path.join(cwd, values["updates_dir"]))
    if "host" in raw:
        values["host"] = _text_setting("host", raw["host"], allow_empty=True)
    for key in ("idle_timeout", "shutdown_grace"):
        if key in raw:
            values[key] = _seconds_setting(key, raw[key])
    if "max_connections" in raw:
        values["max_connections"] = _count_setting("max_connections", raw["max_connections"])
    if "verify_updates" in raw:
        if not isinstance(raw["verify_updates"], bool):
            raise SettingsError("verify_updates must be true or false, not %r" % (raw["verify_updates"],))
        values["verify_updates"] = raw["verify_updates"]

    known = set(Settings._fields)
    warnings = ["unknown setting %r is ignored" % key for key in sorted(raw) if key not in known]
    return Settings(**values), warnings


def _port_setting(value: Any) -> int:
    """A TCP port: an integer, or a string of digits, from 1 to 65535."""
    if isinstance(value, str) and _DIGITS.fullmatch(value.strip()):
        value = int(value.strip())
    if isinstance(value, bool) or not isinstance(value, int):
        raise SettingsError("port must be an integer, not %r" % (value,))
    if not 1 <= value <= 65535:
        raise SettingsError("port must be between 1 and 65535, not %d" % value)
    return value


def _text_setting(key: str, value: Any, allow_empty: bool = False) -> str:
    if not isinstance(value, str) or (not value and not allow_empty) or "\0" in value:
        raise SettingsError("%s must be a non-empty string, not %r" % (key, value))
    return value


def _seconds_setting(key: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 86400:
        raise SettingsError("%s must be a number of seconds above 0, not %r" % (key, value))
    return float(value)


def _count_setting(key: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise SettingsError("%s must be a positive integer, not %r" % (key, value))
    return value


def check_updates_dir(path: str) -> None:
    """Refuse to start on an updates folder that is missing or cannot be listed."""
    if not os.path.exists(path):
        raise SettingsError("updates_dir %s does not exist" % path)
    if not os.path.isdir(path):
        raise SettingsError("updates_dir %s is not a folder" % path)
    try:
        os.listdir(path)
    except OSError as error:
        raise SettingsError("updates_dir %s cannot be read: %s" % (path, error.strerror)) from None


# ---------------------------------------------------------------------------
# 2. Archive checks
# ---------------------------------------------------------------------------

UPDATE_NAME = re.compile(r"opq-box-update-([0-9]{1,20})\.tar\.bz2")
READ_CHUNK = 1 << 16


def parse_update_name(name: str) -> Optional[int]:
    """The VERSION in ``opq-box-update-<VERSION>.tar.bz2``, or None for any other name."""
    digits = version_digits(name)
    return int(digits) if digits is not None else None


def version_digits(name: str) -> Optional[str]:
    """The VERSION as written in an update's file name, as its top folder repeats it."""
    match = UPDATE_NAME.fullmatch(name)
    return match.group(1) if match else None


class ArchiveError(Exception):
    """Why an archive must not be offered to boxes."""


class _TarStream:
    """The tar bytes inside a .tar.bz2, read in bounded chunks, hashing the file as it goes.

    Holds at most a chunk of compressed and of decompressed data, whatever the
    archive's size, and accepts the multi-stream files that pbzip2 writes.
    """

    def __init__(self, fileobj: Any) -> None:
        self.fileobj = fileobj
        self.sha256 = hashlib.sha256()
        self.decompressor = bz2.BZ2Decompressor()
        self.pending = b""
        self.at_end = False

    def read(self, size: int = -1) -> bytes:
        """Up to size bytes of tar data (tarfile's stream mode reads this way)."""
        wanted = READ_CHUNK if size is None or size < 0 else size
        while len(self.pending) < wanted and not self.at_end:
            self._decompress_more()
        data, self.pending = self.pending[:wanted], self.pending[wanted:]
        return data

    def finish(self) -> str:
        """Read to the end of the file, insist the bzip2 stream is complete, return its SHA-256."""
        while not self.at_end:
            self._decompress_more()
            self.pending = b""
        return self.sha256.hexdigest()

    def _decompress_more(self) -> None:
        data = b""
        if self.decompressor.eof:  # pylint: disable=using-constant-test  # astroid misreads the C type
            data = self.decompressor.unused_data or self._read_file()
            if not data:
                self.at_end = True
                return
            self.decompressor = bz2.BZ2Decompressor()
        elif self.decompressor.needs_input:  # pylint: disable=using-constant-test
            data = self._read_file()
            if not data:
                raise ArchiveError("truncated: the bzip2 stream ends early")
        try:
            self.pending += self.decompressor.decompress(data, READ_CHUNK)
        except (OSError, EOFError, ValueError) as error:
            raise ArchiveError("corrupt bzip2 data (%s)" % error) from None

    def _read_file(self) -> bytes:
        data = self.fileobj.read(READ_CHUNK)  # type: bytes
        self.sha256.update(data)
        return data


def member_path(member: tarfile.TarInfo, top: str) -> str:
    """A member's path below the top folder ('' for the folder itself); ArchiveError if it escapes."""
    name = member.name
    if name.startswith("/"):
        raise ArchiveError("member %r has an absolute path" % name)
    parts = [part for part in name.split("/") if part not in ("", ".")]
    if ".." in parts:
        raise ArchiveError("member %r has a '..' component" % name)
    if not parts or parts[0] != top:
        raise ArchiveError("member %r is outside the top folder %s/" % (name, top))
    if member.ischr() or member.isblk() or member.isfifo():
        raise ArchiveError("member %r is a device or pipe" % name)
    if member.issym():
        target = posixpath.normpath(posixpath.join(posixpath.dirname("/".join(parts)), member.linkname))
        if member.linkname.startswith("/") or not (target + "/").startswith(top + "/"):
            raise ArchiveError("link %r points outside the top folder: %r" % (name, member.linkname))
    if member.islnk():
        target = posixpath.normpath(member.linkname)
        if member.linkname.startswith("/") or not target.startswith(top + "/"):
            raise ArchiveError("hard link %r points outside the top folder: %r" % (name, member.linkname))
    return "/".join(parts[1:])


def check_update_archive(fileobj: Any, version_text: str) -> str:
    """Check an open ``.tar.bz2`` as a box would unpack it; return its SHA-256 hex digest.

    Raises ArchiveError naming the first problem.  One streaming pass, flat memory.
    """
    top = "opq-box-update-" + version_text
    stream = _TarStream(fileobj)
    found_version = None  # type: Optional[bytes]
    found_installer = False
    try:
        with tarfile.open(fileobj=stream, mode="r|") as archive:  # type: ignore[call-overload]
            for member in archive:
                path = member_path(member, top)
                if path == "VERSION":
                    if not member.isreg() or member.size > 64:
                        raise ArchiveError("%s/VERSION is not a small regular file" % top)
                    found_version = archive.extractfile(member).read()
                elif path == "install_update.sh":
                    if not member.isreg():
                        raise ArchiveError("%s/install_update.sh is not a regular file" % top)
                    found_installer = True
    except tarfile.TarError as error:
        raise ArchiveError("not a valid tar archive (%s)" % error) from None
    digest = stream.finish()
    if found_version is None:
        raise ArchiveError("%s/VERSION is missing" % top)
    if found_version.strip() != version_text.encode("ascii"):
        raise ArchiveError("%s/VERSION says %r, the file name says %s"
                           % (top, found_version.strip()[:20].decode("latin-1"), version_text))
    if not found_installer:
        raise ArchiveError("%s/install_update.sh is missing" % top)
    return digest


def hash_file(fileobj: Any) -> str:
    """SHA-256 hex digest of an open file, read in bounded chunks."""
    digest = hashlib.sha256()
    for chunk in iter(lambda: fileobj.read(READ_CHUNK), b""):
        digest.update(chunk)
    return digest.hexdigest()


# ---------------------------------------------------------------------------
# 3. Catalog
# ---------------------------------------------------------------------------

# (inode, size, modification time in ns): when any of these changes, it is another file.
FileIdentity = Tuple[int, int, int]


def file_identity(status: os.stat_result) -> FileIdentity:
    """What tells two versions of a file apart without reading it."""
    return (status.st_ino, status.st_size, status.st_mtime_ns)


class Update(NamedTuple):
    """One offered update."""
    name: str
    version: int
    path: str
    identity: FileIdentity
    sha256: Optional[str]


class Snapshot(NamedTuple):
    """What the catalog offers at one moment; requests read it without a lock."""
    updates: Tuple[Update, ...]     # oldest first
    by_name: Dict[str, Update]
    listing: bytes                  # the /ls body
    problem: Optional[str]          # why the updates folder cannot be read
    rejected: int
    waiting: int                    # files not checked yet

    @property
    def latest(self) -> Optional[Update]:
        """The newest offered update, what /latest and /version name."""
        return self.updates[-1] if self.updates else None


EMPTY_SNAPSHOT = Snapshot((), {}, b"", None, 0, 0)


class _Candidate:
    """A correctly named regular file in the updates folder, and what is known of it."""
    __slots__ = ("name", "version", "identity", "checked", "problem", "sha256")

    def __init__(self, name: str, version: int, identity: FileIdentity) -> None:
        self.name = name
        self.version = version
        self.identity = identity
        self.checked = False
        self.problem = None  # type: Optional[str]
        self.sha256 = None  # type: Optional[str]

    def sort_key(self) -> Tuple[int, str]:
        """Numeric VERSION order; the name breaks ties such as 01 and 1."""
        return (self.version, self.name)


class Catalog:
    """The updates folder, watched by a scanner thread and checked by a checker thread.

    The scanner stats the folder every POLL_SECONDS and lists it again only when
    it changed.  The checker verifies (or, with verify_updates off, only hashes)
    one file at a time, newest first.  Both publish an immutable Snapshot.
    """

    POLL_SECONDS = 0.25
    SETTLE_SECONDS = 0.5   # a file modified more recently may still be being written
    RACY_SECONDS = 2.0     # a folder changed this recently may change again within its timestamp tick
    PUBLISH_SECONDS = 0.25

    def __init__(self, updates_dir: str, verify: bool = True) -> None:
        self.updates_dir = updates_dir
        self.verify = verify
        self.snapshot = EMPTY_SNAPSHOT
        self._candidates = {}  # type: Dict[str, _Candidate]
        self._problem = None  # type: Optional[str]
        self._folder_identity = None  # type: Optional[Tuple[int, int]]
        self._relist = True
        self._new_candidates = False
        self._lock = threading.Condition()
        self._stopping = threading.Event()
        self._last_publish = 0.0

    def start(self) -> None:
        """Scan once, so the first requests see the folder, then watch and check in the background."""
        self.scan()
        for target, name in ((self._scan_loop, "catalog-scanner"), (self._check_loop, "catalog-checker")):
            threading.Thread(target=target, name=name, daemon=True).start()

    def stop(self) -> None:
        """Let the background threads end."""
        self._stopping.set()
        with self._lock:
            self._lock.notify_all()

    def suspect(self) -> None:
        """A served file no longer matches the catalog: look at every file again."""
        self._relist = True

    # The scanner ---------------------------------------------------------

    def _scan_loop(self) -> None:
        while not self._stopping.wait(self.POLL_SECONDS):
            try:
                self.scan()
            except Exception:  # pylint: disable=broad-except
                logger.exception("scanning %s failed", self.updates_dir)

    def scan(self) -> None:
        """Bring the candidates up to date with the folder.

        The whole folder is listed only when its identity changed (or right after a
        change, since a second change within one timestamp tick would not show);
        otherwise only files still waiting or rejected are looked at again.
        """
        relist, self._relist = self._relist, False
        try:
            folder = os.stat(self.updates_dir)
            if not stat.S_ISDIR(folder.st_mode):
                raise NotADirectoryError(errno.ENOTDIR, "not a folder")
            folder_identity = (folder.st_ino, folder.st_mtime_ns)
            relist = relist or folder_identity != self._folder_identity
            if relist:
                names = os.listdir(self.updates_dir)
                self._folder_identity = folder_identity
                if time.time() - folder.st_mtime_ns / 1e9 < self.RACY_SECONDS:
                    self._relist = True
            else:
                names = [name for name, candidate in self._candidates.items() if not self._settled(candidate)]
        except OSError as error:
            self._relist, self._folder_identity = True, None
            self._update({}, "updates folder %s cannot be read: %s" % (self.updates_dir, error.strerror))
            return
        found = {}  # type: Dict[str, _Candidate]
        for name in names:
            version = parse_update_name(name)
            identity = self._regular_file_identity(name) if version is not None else None
            if version is not None and identity is not None:
                known = self._candidates.get(name)
                found[name] = known if known and known.identity == identity else _Candidate(name, version, identity)
        if not relist:
            found.update((name, c) for name, c in self._candidates.items() if self._settled(c))
        self._update(found, None)

    def _settled(self, candidate: _Candidate) -> bool:
        """Offered files need no second look; waiting and rejected ones may still change."""
        return candidate.checked and candidate.problem is None

    def _regular_file_identity(self, name: str) -> Optional[FileIdentity]:
        try:
            status = os.lstat(os.path.join(self.updates_dir, name))
        except OSError:
            return None
        return file_identity(status) if stat.S_ISREG(status.st_mode) else None

    def _update(self, candidates: Dict[str, _Candidate], problem: Optional[str]) -> None:
        """Take a scan's result; publish if anything changed."""
        with self._lock:
            changed = problem != self._problem or candidates.keys() != self._candidates.keys() or any(
                self._candidates[name] is not candidate for name, candidate in candidates.items())
            self._candidates = candidates
            self._problem = problem
            if changed:
                self._publish()
                self._new_candidates = True
                self._lock.notify_all()

    # The checker ---------------------------------------------------------

    def _check_loop(self) -> None:
        """Work through the waiting files newest first; start over whenever the scanner finds new ones."""
        queue = []  # type: List[_Candidate]
        while not self._stopping.is_set():
            with self._lock:
                if self._new_candidates or not queue:
                    queue, self._new_candidates = self._waiting_oldest_first(), False
                candidate = queue.pop() if queue else None
                if candidate is None:
                    self._lock.wait(self.POLL_SECONDS)
                    continue
                if self._candidates.get(candidate.name) is not candidate:
                    continue  # replaced or removed since the queue was made
            try:
                verdict = self._check(candidate)
            except Exception:  # pylint: disable=broad-except
                logger.exception("checking %s failed", candidate.name)
                continue
            with self._lock:
                if verdict is None or self._candidates.get(candidate.name) is not candidate:
                    continue
                problem, sha256 = verdict
                candidate.checked, candidate.problem, candidate.sha256 = True, problem, sha256
                if problem:
                    logger.warning("rejected %s: %s", candidate.name, problem)
                latest = self.snapshot.latest
                if (not queue or latest is None or candidate.version >= latest.version
                        or time.monotonic() - self._last_publish >= self.PUBLISH_SECONDS):
                    self._publish()

    def _waiting_oldest_first(self) -> List[_Candidate]:
        """Unchecked files that have stopped changing, so that pop() gives the newest."""
        settled_before = time.time() - self.SETTLE_SECONDS
        return sorted((c for c in self._candidates.values() if not c.checked and c.identity[2] / 1e9 < settled_before),
                      key=_Candidate.sort_key)

    def _check(self, candidate: _Candidate) -> Optional[Tuple[Optional[str], Optional[str]]]:
        """(problem, sha256) for one file; None when it changed under us.

        Unchecked files are looked at again on every scan, so the scanner brings the new version.
        """
        try:
            with open_regular_file(os.path.join(self.updates_dir, candidate.name)) as fileobj:
                if file_identity(os.fstat(fileobj.fileno())) != candidate.identity:
                    return None
                if self.verify:
                    sha256 = check_update_archive(fileobj, str(version_digits(candidate.name)))
                else:
                    sha256 = hash_file(fileobj)
                if file_identity(os.fstat(fileobj.fileno())) != candidate.identity:
                    return None
                return None, sha256
        except ArchiveError as error:
            return str(error), None
        except OSError as error:
            return "cannot be read: %s" % error.strerror, None

    def _is_offered(self, candidate: _Candidate) -> bool:
        return candidate.problem is None and (candidate.checked or not self.verify)

    def _publish(self) -> None:
        """Replace the snapshot; called with the lock held."""
        offered = sorted((c for c in self._candidates.values() if self._is_offered(c)), key=_Candidate.sort_key)
        updates = tuple(Update(c.name, c.version, os.path.join(self.updates_dir, c.name), c.identity, c.sha256)
                        for c in offered)
        self.snapshot = Snapshot(
            updates=updates,
            by_name={update.name: update for update in updates},
            listing="\n".join(update.name for update in updates).encode("ascii"),
            problem=self._problem,
            rejected=sum(1 for c in self._candidates.values() if c.problem is not None),
            waiting=sum(1 for c in self._candidates.values() if not c.checked),
        )
        self._last_publish = time.monotonic()


def open_regular_file(path: str) -> Any:
    """Open a regular file for reading, refusing links and anything else."""
    descriptor = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0))
    try:
        if not stat.S_ISREG(os.fstat(descriptor).st_mode):
            raise OSError(errno.EINVAL, "not a regular file", path)
        return os.fdopen(descriptor, "rb", buffering=0)
    except BaseException:
        os.close(descriptor)
        raise


def resolve_update(snapshot: Snapshot, encoded_name: str) -> Optional[Update]:
    """The update a request names in ``/update/<name>``; only catalog names ever resolve."""
    try:
        name = urllib.parse.unquote(encoded_name, errors="strict")
    except UnicodeDecodeError:
        return None
    return snapshot.by_name.get(name)


# ---------------------------------------------------------------------------
# 4. HTTP rules (RFC 9110), pure functions
# ---------------------------------------------------------------------------

class RangeNotSatisfiable(Exception):
    """The Range header is well formed but selects nothing: answer 416."""


_BYTE_RANGE = re.compile(r"([0-9]*)-([0-9]*)")
_ENTITY_TAG = re.compile(r'\s*(W/)?("[\x21\x23-\x7e\x80-\xff]*")\s*(?:,|$)')


def request_path(target: str) -> str:
    """The path of a request target, without query or fragment (RFC 9112 §3.2)."""
    if target.startswith(("http://", "https://")):  # absolute-form, as sent to proxies
        try:
            target = urllib.parse.urlsplit(target).path or "/"
        except ValueError:
            return ""
    return target.split("?", 1)[0].split("#", 1)[0]


def parse_range(header: str, size: int) -> Optional[Tuple[int, int]]:
    """The (first, last) byte positions one byte range selects (RFC 9110 §14.1.2).

    None means ignore the header and send the whole file (malformed, another
    unit, or several ranges); RangeNotSatisfiable means answer 416.
    """
    unit, _, ranges = header.partition("=")
    if unit.strip().lower() != "bytes":
        return None
    specs = [spec.strip() for spec in ranges.split(",") if spec.strip()]
    if len(specs) != 1:
        return None
    match = _BYTE_RANGE.fullmatch(specs[0])
    if not match or match.group(1) == match.group(2) == "":
        return None
    first_text, last_text = match.groups()
    if first_text == "":  # suffix range: the last N bytes
        suffix = int(last_text)
        if suffix == 0 or size == 0:
            raise RangeNotSatisfiable()
        return max(size - suffix, 0), size - 1
    first = int(first_text)
    if last_text and int(last_text) < first:
        return None
    if first >= size:
        raise RangeNotSatisfiable()
    return first, min(int(last_text), size - 1) if last_text else size - 1


def entity_tags(header: str) -> Optional[List[Tuple[bool, str]]]:
    """The (weak, opaque-tag) pairs of an If-Match or If-None-Match list; None if malformed."""
    tags = []
    position = 0
    while position < len(header):
        match = _ENTITY_TAG.match(header, position)
        if not match or match.end() == position:
            return None
        tags.append((bool(match.group(1)), match.group(2)))
        position = match.end()
    return tags


def http_date(header: str) -> Optional[int]:
    """Seconds since the epoch of an HTTP-date (RFC 9110 §5.6.7), or None when it is not one."""
    try:
        parsed = email.utils.parsedate_tz(header)
        return int(email.utils.mktime_tz(parsed)) if parsed else None
    except (TypeError, ValueError, IndexError, OverflowError):
        return None


def check_if_match(header: Optional[str], etag: str) -> bool:
    """RFC 9110 §13.1.1: false (412) unless a listed tag matches strongly."""
    if header is None or header.strip() == "*":
        return True
    tags = entity_tags(header) or []
    return any(not weak and tag == etag for weak, tag in tags)


def check_if_unmodified_since(header: Optional[str], modified: int) -> bool:
    """RFC 9110 §13.1.4: false (412) when the file changed after the date."""
    since = http_date(header) if header is not None else None
    return since is None or modified <= since


def check_if_none_match(header: Optional[str], etag: str) -> bool:
    """RFC 9110 §13.1.2: false (304) when a listed tag matches weakly."""
    if header is None:
        return True
    if header.strip() == "*":
        return False
    tags = entity_tags(header) or []
    return not any(tag == etag for _, tag in tags)


def check_if_modified_since(header: Optional[str], modified: int) -> bool:
    """RFC 9110 §13.1.3: false (304) when the file has not changed since the date."""
    since = http_date(header) if header is not None else None
    return since is None or modified > since


def check_if_range(header: Optional[str], etag: str, modified: int) -> bool:
    """RFC 9110 §13.1.5: whether to honour Range (a strong ETag match or the exact date)."""
    if header is None:
        return True
    header = header.strip()
    if header.startswith(('"', "W/")):
        return header == etag
    return http_date(header) == modified


def evaluate_preconditions(headers: Any, etag: str, modified: int) -> Optional[int]:
    """The status a GET or HEAD ends with before any body: 412, 304, or None to go on.

    The order is RFC 9110 §13.2.2's.
    """
    if "If-Match" in headers:
        if not check_if_match(headers.get("If-Match"), etag):
            return 412
    elif not check_if_unmodified_since(headers.get("If-Unmodified-Since"), modified):
        return 412
    if "If-None-Match" in headers:
        if not check_if_none_match(headers.get("If-None-Match"), etag):
            return 304
    elif not check_if_modified_since(headers.get("If-Modified-Since"), modified):
        return 304
    return None


def make_etag(identity: FileIdentity) -> str:
    """A strong ETag that changes whenever the file does (RFC 9110 §8.8.3)."""
    return '"%x-%x-%x"' % identity


def repr_digest(sha256_hex: str) -> str:
    """The Repr-Digest field value for a SHA-256 (RFC 9530 §3)."""
    return "sha-256=:%s:" % b64encode(bytes.fromhex(sha256_hex)).decode("ascii")


# Control characters (and the backslash that escapes them) as \xNN, so a
# request can neither forge a log line nor send terminal escape sequences.
_LOG_ESCAPES = {code: "\\x%02x" % code for code in list(range(0x20)) + list(range(0x7F, 0xA0))}
_LOG_ESCAPES[ord("\\")] = "\\\\"


def escape_for_log(text: str) -> str:
    """Text from a request, safe to write into a log line."""
    return text.translate(_LOG_ESCAPES)


# ---------------------------------------------------------------------------
# 5. Handler
# ---------------------------------------------------------------------------

NOT_FOUND = "Resource not found."
NO_UPDATES = "Update dir does not contain any valid updates."


class UpdateRequestHandler(http.server.BaseHTTPRequestHandler):
    """Routes /, /ls, /latest, /version and /update/<name>, for GET and HEAD.

    Per-request state (status, bytes_sent, ...) is set in handle_one_request, as
    BaseHTTPRequestHandler does for its own, hence no __init__.
    """
    # pylint: disable=attribute-defined-outside-init

    server_version = "BoxUpdateServer/2"
    protocol_version = "HTTP/1.1"
    default_request_version = "HTTP/1.0"   # so even a garbled request line gets a status line back
    disable_nagle_algorithm = True
    wbufsize = 1 << 16           # headers and small bodies leave in one send
    max_request_line = 8192
    copy_chunk = 8 << 20         # bytes per sendfile call between checks that the file is unchanged

    server: "BoxUpdateServer"  # set by socketserver

    def setup(self) -> None:
        super().setup()
        self.connection.settimeout(self.server.settings.idle_timeout)

    # One request, from its first byte to its access log line --------------

    def handle_one_request(self) -> None:
        """One request on a kept-alive connection; a client that stalls or goes away just ends it."""
        self.started = time.monotonic()
        self.status = None  # type: Optional[int]
        self.bytes_sent = 0
        try:
            self.raw_requestline = self.rfile.readline(self.max_request_line + 1)
            if not self.raw_requestline:
                self.close_connection = True
                return
            with self.server.in_flight():
                self.handle_request_line()
                self.wfile.flush()
            if self.server.stopping:
                self.close_connection = True
        except (socket.timeout, ConnectionError):
            self.close_connection = True
        except Exception:  # pylint: disable=broad-except
            self.answer_internal_error()
        finally:
            if self.status is not None:
                self.log_access()

    def handle_request_line(self) -> None:
        """Parse the request and answer it: the HTTP errors first, then the route."""
        if len(self.raw_requestline) > self.max_request_line:
            self.requestline, self.request_version, self.command = "", "", ""
            self.send_error(414)
            return
        if not self.parse_request():
            return  # parse_request answered 400 or 431
        if self.headers.get("Transfer-Encoding") or self.headers.get("Content-Length", "0").strip() != "0":
            self.close_connection = True  # we read no request bodies, so the connection cannot be reused
        if self.command in ("GET", "HEAD"):
            self.route(request_path(self.path))
        else:
            self.send_text(405, "Method not allowed.", extra_headers=(("Allow", "GET, HEAD"),))

    def send_error(self, code: int, message: Optional[str] = None, explain: Optional[str] = None) -> None:
        """http.server's error answers, but an HTTP version we do not speak is the client's error (400).

        A request line that says HTTP/2 or HTTP/3 in text is malformed for HTTP/1.1
        (RFC 9113 §3 starts HTTP/2 otherwise), so a 5xx would blame the server.
        """
        if code == 505:
            code, message = 400, "Unsupported HTTP version"
        super().send_error(code, message, explain)

    def answer_internal_error(self) -> None:
        """A bug in a route: log its traceback, answer 500 if nothing was sent yet, close the connection."""
        logger.exception("error while answering %s", escape_for_log(getattr(self, "requestline", "")))
        self.close_connection = True
        if self.status is None:  # nothing sent yet, so there is room for a clean answer
            try:
                self.send_text(500, "Internal server error.")
                self.wfile.flush()
            except OSError:
                pass

    def route(self, path: str) -> None:
        """The table of contents."""
        if path == "/":
            self.send_health()
        elif path == "/ls":
            self.send_listing()
        elif path == "/latest":
            self.send_latest()
        elif path == "/version":
            self.send_version()
        elif path.startswith("/update/") and path.endswith(".sha256"):
            self.send_checksum(path[len("/update/"):-len(".sha256")])
        elif path.startswith("/update/"):
            self.send_update(path[len("/update/"):])
        else:
            self.send_text(404, NOT_FOUND)

    # Routes ----------------------------------------------------------------

    def send_health(self) -> None:
        """The OPQ Health answer: still 200 when unhealthy, so the JSON says why."""
        snapshot = self.server.catalog.snapshot
        health = {"name": "Box Update Server", "ok": snapshot.problem is None,
                  "timestamp": int(time.time()), "subcomponents": []}  # type: Dict[str, Any]
        notes = [snapshot.problem] if snapshot.problem else []
        if snapshot.rejected:
            notes.append("%d file(s) in the updates folder rejected, see the log" % snapshot.rejected)
        if snapshot.waiting:
            notes.append("%d file(s) waiting to be checked" % snapshot.waiting)
        if notes:
            health["info"] = "; ".join(notes)
        self.send_text(200, json.dumps(health), "application/json")

    def send_listing(self) -> None:
        """/ls: offered names, oldest first, one a line, no trailing newline."""
        self.send_bytes(200, self.server.catalog.snapshot.listing, "text/plain")

    def send_latest(self) -> None:
        """303 to the newest update, relative so it also works under a proxy's path prefix."""
        latest = self.server.catalog.snapshot.latest
        if latest is None:
            self.send_text(404, NOT_FOUND)
        else:
            self.send_bytes(303, b"", "text/plain", (("Location", "update/" + latest.name),))

    def send_version(self) -> None:
        """/version: the newest VERSION as text."""
        latest = self.server.catalog.snapshot.latest
        if latest is None:
            self.send_text(404, NO_UPDATES)
        else:
            self.send_text(200, str(latest.version))

    def send_checksum(self, encoded_name: str) -> None:
        """``<hex>  <name>``, the format ``sha256sum -c`` reads."""
        update = self.find_update(encoded_name)
        if update is None:
            self.send_text(404, NOT_FOUND)
        elif update.sha256 is None:
            self.send_text(503, "Checksum not computed yet.", extra_headers=(("Retry-After", "1"),))
        else:
            self.send_text(200, "%s  %s\n" % (update.sha256, update.name))

    def send_update(self, encoded_name: str) -> None:
        """/update/<name>: an offered update's bytes, whole or a range."""
        update = self.find_update(encoded_name)
        try:
            if update is None:
                raise FileNotFoundError(errno.ENOENT, "not in the catalog", encoded_name)
            fileobj = open_regular_file(update.path)
        except OSError:  # not offered, or removed since the last scan
            self.send_text(404, NOT_FOUND)
            return
        with fileobj:
            self.serve_file(fileobj, update)

    def find_update(self, encoded_name: str) -> Optional[Update]:
        """The offered update a path segment names, or None."""
        return resolve_update(self.server.catalog.snapshot, encoded_name)

    # File serving: GET and HEAD share this one path --------------------------

    def serve_file(self, fileobj: Any, update: Update) -> None:
        """GET and HEAD of an open update: preconditions, then Range, then headers, then the bytes."""
        identity = file_identity(os.fstat(fileobj.fileno()))
        if identity != update.identity and self.server.catalog.verify:
            self.server.catalog.suspect()  # not the file that was checked
            self.send_text(404, NOT_FOUND)
            return
        size, modified, etag = identity[1], identity[2] // 10**9, make_etag(identity)
        headers = [("ETag", etag), ("Last-Modified", email.utils.formatdate(modified, usegmt=True))]
        if update.sha256 and identity == update.identity:
            headers.append(("Repr-Digest", repr_digest(update.sha256)))

        precondition = evaluate_preconditions(self.headers, etag, modified)
        if precondition is not None:
            self.send_bytes(precondition, b"", None, headers)
            return
        first, last, status = 0, size - 1, 200
        if "Range" in self.headers and check_if_range(self.headers.get("If-Range"), etag, modified):
            try:
                selected = parse_range(self.headers.get("Range", ""), size)
            except RangeNotSatisfiable:
                self.send_text(416, "Range not satisfiable.",
                               extra_headers=(("Content-Range", "bytes */%d" % size),))
                return
            if selected is not None:
                (first, last), status = selected, 206
                headers.append(("Content-Range", "bytes %d-%d/%d" % (first, last, size)))

        self.send_response(status)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Disposition", 'attachment; filename="%s"' % update.name)
        self.send_header("Content-Length", str(last - first + 1))
        self.send_header("Accept-Ranges", "bytes")
        for name, value in headers:
            self.send_header(name, value)
        self.end_headers()
        if self.command == "HEAD":
            return
        with tcp_corked(self.connection):   # headers and body in full segments, as nginx's tcp_nopush
            self.wfile.flush()
            self.copy_file(fileobj, first, last - first + 1, identity)

    def copy_file(self, fileobj: Any, offset: int, count: int, identity: FileIdentity) -> None:
        """Send count bytes with the kernel's sendfile; close early rather than send changed bytes."""
        sent = 0
        while sent < count:
            chunk = min(count - sent, self.copy_chunk)
            done = self.connection.sendfile(fileobj, offset + sent, chunk)
            sent += done
            self.bytes_sent += done
            if done < chunk or file_identity(os.fstat(fileobj.fileno())) != identity:
                logger.warning("%s changed during the download; closed after %d of %d bytes",
                               escape_for_log(self.path), sent, count)
                self.close_connection = True
                return

    # Small answers -------------------------------------------------------------

    def send_text(self, status: int, text: str, content_type: str = "text/plain",
                  extra_headers: Any = ()) -> None:
        """A small text answer."""
        self.send_bytes(status, text.encode("utf-8"), content_type, extra_headers)

    def send_bytes(self, status: int, body: bytes, content_type: Optional[str], extra_headers: Any = ()) -> None:
        """A small answer; wbufsize makes headers and body leave in one send."""
        self.send_response(status)
        if content_type:
            self.send_header("Content-Type", content_type)
        if status != 304:
            self.send_header("Content-Length", str(len(body)))
        for name, value in extra_headers:
            self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD" and status != 304:
            self.wfile.write(body)
            self.bytes_sent += len(body)

    # Logging ---------------------------------------------------------------

    def log_request(self, code: Any = "-", size: Any = "-") -> None:
        """Called by send_response: remember the status; log_access writes the line once the body is out."""
        self.status = int(code)

    def log_access(self) -> None:
        """client "METHOD path" status body-bytes duration; an unparsed request shows its raw line."""
        if self.command and hasattr(self, "path"):
            request = "%s %s" % (self.command, self.path)
        else:
            request = self.raw_requestline.rstrip(b"\r\n").decode("latin-1")
        logger.info('%s "%s" %d %d %.1fms', self.client_address[0], escape_for_log(request),
                    self.status, self.bytes_sent, (time.monotonic() - self.started) * 1000)

    def log_message(self, format: str, *args: Any) -> None:  # pylint: disable=redefined-builtin
        """http.server's own messages (bad requests, timeouts), escaped."""
        logger.warning("%s %s", self.client_address[0], escape_for_log(format % args))


@contextlib.contextmanager
def tcp_corked(connection: socket.socket) -> Iterator[None]:
    """Send only full segments while a file streams out, as nginx's tcp_nopush does.

    Linux TCP_CORK, with TCP_NODELAY off meanwhile (the two fight); switching
    NODELAY back on at the end sends the last partial segment at once.
    """
    cork = getattr(socket, "TCP_CORK", None)
    if cork is None:
        yield
        return
    connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 0)
    connection.setsockopt(socket.IPPROTO_TCP, cork, 1)
    try:
        yield
    finally:
        try:
            connection.setsockopt(socket.IPPROTO_TCP, cork, 0)
            connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass  # the client is gone


# ---------------------------------------------------------------------------
# 6. Server
# ---------------------------------------------------------------------------

BUSY_RESPONSE = (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain\r\nContent-Length: 12\r\n"
                 b"Retry-After: 5\r\nConnection: close\r\n\r\nServer busy.")


class BoxUpdateServer(http.server.ThreadingHTTPServer):
    """One thread per connection, a cap on connections, and a graceful stop."""

    daemon_threads = True
    request_queue_size = 1024

    def __init__(self, settings: Settings, catalog: Catalog,
                 handler: Any = UpdateRequestHandler) -> None:
        self.settings = settings
        self.catalog = catalog
        self.stopping = False
        self.connection_slots = threading.BoundedSemaphore(settings.max_connections)
        self._requests = 0
        self._requests_done = threading.Condition()
        if ":" in settings.host:
            self.address_family = socket.AF_INET6
        super().__init__((settings.host, settings.port), handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self.connection_slots.acquire(blocking=False):
            self.refuse(request)
            return
        try:
            super().process_request(request, client_address)
        except RuntimeError:  # no thread could be started
            self.connection_slots.release()
            self.refuse(request)

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.connection_slots.release()

    def refuse(self, request: socket.socket) -> None:
        """Answer 503 without a thread: a fresh socket's send buffer takes it at once."""
        try:
            request.setblocking(False)
            request.send(BUSY_RESPONSE)
        except OSError:
            pass
        self.shutdown_request(request)

    @contextlib.contextmanager
    def in_flight(self) -> Iterator[None]:
        """Count a request from its first line to its last byte, for the graceful stop."""
        with self._requests_done:
            self._requests += 1
        try:
            yield
        finally:
            with self._requests_done:
                self._requests -= 1
                self._requests_done.notify_all()

    def stop(self, grace: float) -> None:
        """Stop accepting, give in-flight requests up to grace seconds, then return."""
        self.stopping = True
        self.server_close()
        deadline = time.monotonic() + grace
        with self._requests_done:
            while self._requests and time.monotonic() < deadline:
                self._requests_done.wait(deadline - time.monotonic())
        if self._requests:
            logger.warning("%d request(s) still in flight after %.1f s; exiting anyway", self._requests, grace)


def make_server(settings: Settings) -> BoxUpdateServer:
    """Check the updates folder, bind the port and start watching the folder; SettingsError if not."""
    check_updates_dir(settings.updates_dir)
    catalog = Catalog(settings.updates_dir, verify=settings.verify_updates)
    try:
        server = BoxUpdateServer(settings, catalog)
    except OSError as error:
        if error.errno == errno.EADDRINUSE:
            raise SettingsError("port %d is already in use" % settings.port) from None
        raise SettingsError("cannot listen on %s:%d: %s"
                            % (settings.host or "*", settings.port, error.strerror or error)) from None
    catalog.start()
    return server


def serve(server: BoxUpdateServer) -> None:
    """Serve until SIGTERM or SIGINT, then stop gracefully."""
    def request_stop(signum: int, _frame: Any) -> None:
        logger.info("received %s, stopping", signal.Signals(signum).name)
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    host, port = str(server.server_address[0]), int(server.server_address[1])
    logger.info("listening on http://%s:%d/ serving updates from %s (verify_updates=%s)",
                host if ":" not in host else "[%s]" % host, port,
                server.settings.updates_dir, str(server.settings.verify_updates).lower())
    server.serve_forever()
    server.stop(server.settings.shutdown_grace)
    server.catalog.stop()
    logger.info("stopped")


# ---------------------------------------------------------------------------
# 7. Command line
# ---------------------------------------------------------------------------

def check_files(paths: List[str]) -> int:
    """``check FILE...``: the server's verdict on each archive, for operators before publishing."""
    failures = 0
    for path in paths:
        digits = version_digits(os.path.basename(path))
        try:
            if digits is None:
                raise ArchiveError("not named opq-box-update-<VERSION>.tar.bz2")
            with open_regular_file(path) as fileobj:
                digest = check_update_archive(fileobj, digits)
            print("OK        %s  %s" % (digest, path))
        except (ArchiveError, OSError) as error:
            failures += 1
            reason = error.strerror if isinstance(error, OSError) and error.strerror else str(error)
            print("REJECTED  %s: %s" % (path, reason))
    return 1 if failures else 0


def probe_health(settings: Settings) -> int:
    """``health``: 0 when the server these settings describe answers ``"ok": true`` on /, else 1.

    The Docker HEALTHCHECK runs this with the Python already in the image.
    """
    # a wildcard listening address is reached through loopback
    host = {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "::1"}.get(settings.host, settings.host)  # nosec
    connection = http.client.HTTPConnection(host, settings.port, timeout=3)
    try:
        connection.request("GET", "/")
        answer = connection.getresponse()
        health = json.loads(answer.read().decode("utf-8"))
        healthy = answer.status == 200 and isinstance(health, dict) and health.get("ok") is True
    except (OSError, ValueError, http.client.HTTPException) as error:
        print("unhealthy: %s" % error)
        return 1
    finally:
        connection.close()
    print(("healthy: %s" if healthy else "unhealthy: %s") % json.dumps(health))
    return 0 if healthy else 1


def main(argv: Optional[List[str]] = None) -> int:
    """Run the server (the default) or ``check``; return the exit status."""
    parser = argparse.ArgumentParser(
        prog="box_update_server.py",
        description="Serve OPQ Box updates. Configured by the JSON in %s." % SETTINGS_VARIABLE)
    commands = parser.add_subparsers(dest="command")
    commands.add_parser("serve", help="run the server (the default)")
    commands.add_parser("health", help="exit 0 if the configured server answers ok on /, 1 if not")
    check = commands.add_parser("check", help="check update archives as the server would, before publishing")
    check.add_argument("files", nargs="+", metavar="FILE")
    arguments = parser.parse_args(argv)
    if arguments.command == "check":
        return check_files(arguments.files)

    try:
        settings, warnings = parse_settings(os.environ.get(SETTINGS_VARIABLE), os.getcwd())
    except SettingsError as error:
        return refuse_to_start(error)
    if arguments.command == "health":
        return probe_health(settings)

    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(levelname)s %(message)s")
    for warning in warnings:
        logger.warning("%s", warning)
    try:
        server = make_server(settings)
    except SettingsError as error:
        return refuse_to_start(error)
    serve(server)
    return 0


def refuse_to_start(error: SettingsError) -> int:
    """One line naming the configuration problem, and exit status 1."""
    print("box_update_server: error: %s" % error, file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
