#!/usr/bin/env python3
"""Box Update Server: publishes OPQ Box software updates over HTTP.

OPQ Boxes download ``/latest`` and run what it holds as root, OPQ Health polls
``/``, operators ``curl /ls`` and Prometheus scrapes ``/metrics``.  The
configuration is the JSON object in the environment variable
BOX_UPDATE_SERVER_SETTINGS (see README.md).

The file reads top to bottom in the order data flows:

1. Settings        parse and validate the configuration
2. Archive checks  what makes a file a safe update (the catalog and ``check`` share it)
3. Signatures      OpenSSH signatures (PROTOCOL.sshsig) over updates, Ed25519 and RSA
4. Catalog         which updates are offered, kept fresh by background threads (verdicts remembered)
5. Rollout         which update each box is offered: canaries, waves, pins, halts; the fleet's state
6. HTTP rules      pure functions: request heads, framing, ranges, preconditions, answers (RFC 9110, 9112)
7. Metrics         counters for Prometheus
8. Connections     the HTTP/1.1 protocol layer: request heads, the one answer path, access lines
9. Routes          the application: what each route answers
10. Server         connections, their limits, signals and graceful shutdown
11. Command line

Standard library only, CPython 3.7 to 3.13, Linux (sendfile, TCP_CORK, SIOCOUTQ).
"""

import argparse
import base64
import bz2
import calendar
import contextlib
import email.utils
import errno
import fcntl
import functools
import hashlib
import heapq
import hmac
import http.client
import http.server
import io
import ipaddress
import json
import logging
import os
import posixpath
import re
import signal
import socket
import socketserver
import sqlite3
import stat
import struct
import sys
import tarfile
import termios
import threading
import time
import types
import urllib.parse
from bisect import bisect_left
from typing import (Any, BinaryIO, Callable, Dict, FrozenSet, Iterable, Iterator, List, Mapping, NamedTuple, Optional,
                    Sequence, Set, Tuple, TypeVar, Union)

__version__ = "3.0"

logger = logging.getLogger("box_update_server")
T = TypeVar("T")


# ---------------------------------------------------------------------------
# 1. Settings
# ---------------------------------------------------------------------------

SETTINGS_VARIABLE = "BOX_UPDATE_SERVER_SETTINGS"

Network = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]
Address = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]

LOOPBACK_AND_PRIVATE = tuple(ipaddress.ip_network(cidr) for cidr in (
    "127.0.0.0/8", "::1/128", "10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "fc00::/7"))


class SettingsError(Exception):
    """A configuration problem: reported as one line, then exit status 1."""


class Settings(NamedTuple):
    """The server's configuration, validated."""
    port: int
    updates_dir: str
    host: str = ""                          # all interfaces
    idle_timeout: float = 30.0              # seconds a connection may sit idle, or a download make no progress
    request_header_timeout: float = 10.0    # seconds a whole request head may take to arrive
    shutdown_grace: float = 5.0             # seconds in-flight requests get after SIGTERM
    max_connections: int = 1000             # beyond this a new connection gets 503
    max_connections_per_client: int = 250   # per client address; trusted proxies are exempt
    trusted_proxies: Tuple[Network, ...] = ()
    metrics_allow: Tuple[Network, ...] = LOOPBACK_AND_PRIVATE
    verify_updates: bool = True             # check archives before offering them
    allowed_signers: Optional[str] = None   # OpenSSH allowed_signers file: signatures required when set
    # Who the client is:
    max_downloads: int = 950                # downloads at once; the other slots are kept for short answers
    ipv6_client_prefix: int = 64            # an IPv6 client is its /64 (one home, one site) for the per-client cap
    forwarded_header: str = "X-Forwarded-For"   # the header the trusted proxies name the client in, or "Forwarded"
    signer_principals: Tuple[str, ...] = ()  # what boxes pass to ssh-keygen -Y verify -I; () means any listed
    max_expanded_bytes: int = 4 << 30       # an archive whose tar stream is longer is rejected (bzip2 bombs)
    rollout: Optional[str] = None           # JSON rollout policy file: staged rollout when set
    state_dir: Optional[str] = None         # the fleet's state (SQLite); required with rollout
    silent_after_hours: float = 48.0        # a box not seen for this long is "silent"
    max_boxes: int = 100000                 # boxes remembered; beyond this the longest unseen is forgotten


REQUIRED_KEYS = ("port", "updates_dir")
_DIGITS = re.compile(r"[0-9]+")


def parse_settings(text: Optional[str], cwd: str = ".") -> Tuple[Settings, List[str]]:
    """Settings from the JSON text of BOX_UPDATE_SERVER_SETTINGS, plus warnings.

    Pure: it does not look at the file system (see check_updates_dir and load_allowed_signers).
    """
    if text is None or not text.strip():
        raise SettingsError("%s is not set: it must hold a JSON object with port and updates_dir"
                            % SETTINGS_VARIABLE)
    try:
        raw = json.loads(text)
    except ValueError as error:
        if _looks_like_a_path(text):
            raise SettingsError("%s holds a path, %r, not JSON: it must hold the JSON itself, e.g. %s=$(<%s)"
                                % (SETTINGS_VARIABLE, text.strip(), SETTINGS_VARIABLE, text.strip())) from None
        raise SettingsError("%s is not valid JSON: %s" % (SETTINGS_VARIABLE, error)) from None
    if not isinstance(raw, dict):
        raise SettingsError("%s must be a JSON object, not %s" % (SETTINGS_VARIABLE, type(raw).__name__))
    unknown = [key for key in sorted(raw) if key not in Settings._fields]
    for key in REQUIRED_KEYS:
        if key not in raw:    # a misspelt key is the likely cause: name the keys that were not understood
            hint = " (unknown: %s)" % ", ".join(map(repr, unknown)) if unknown else ""
            raise SettingsError("%s has no %r%s" % (SETTINGS_VARIABLE, key, hint))

    default = Settings(port=0, updates_dir="")

    def optional(key: str, parse: "Callable[[str, object], T]", fallback: T) -> T:
        return parse(key, raw[key]) if raw.get(key) is not None else fallback

    max_connections = optional("max_connections", _count_setting, default.max_connections)
    settings = Settings(
        port=_port_setting("port", raw["port"]),
        updates_dir=_path_setting("updates_dir", raw["updates_dir"], cwd),
        host=optional("host", _host_setting, default.host),
        idle_timeout=optional("idle_timeout", _seconds_setting, default.idle_timeout),
        request_header_timeout=optional("request_header_timeout", _seconds_setting, default.request_header_timeout),
        shutdown_grace=optional("shutdown_grace", _seconds_setting, default.shutdown_grace),
        max_connections=max_connections,
        max_connections_per_client=optional("max_connections_per_client", _count_setting,
                                            max(1, max_connections // 4)),
        trusted_proxies=optional("trusted_proxies", _networks_setting, default.trusted_proxies),
        metrics_allow=optional("metrics_allow", _networks_setting, default.metrics_allow),
        verify_updates=optional("verify_updates", _bool_setting, default.verify_updates),
        allowed_signers=optional("allowed_signers", lambda key, value: _path_setting(key, value, cwd), None),
        max_downloads=optional("max_downloads", _count_setting, default_max_downloads(max_connections)),
        ipv6_client_prefix=optional("ipv6_client_prefix", _ipv6_prefix_setting, default.ipv6_client_prefix),
        forwarded_header=optional("forwarded_header", _forwarded_header_setting, default.forwarded_header),
        signer_principals=optional("signer_principals", _principals_setting, default.signer_principals),
        max_expanded_bytes=optional("max_expanded_bytes", _count_setting, default.max_expanded_bytes),
        rollout=optional("rollout", lambda key, value: _path_setting(key, value, cwd), None),
        state_dir=optional("state_dir", lambda key, value: _path_setting(key, value, cwd), None),
        silent_after_hours=optional("silent_after_hours", _hours_setting, default.silent_after_hours),
        max_boxes=optional("max_boxes", _count_setting, default.max_boxes),
    )
    if settings.max_downloads > settings.max_connections:
        raise SettingsError("max_downloads (%d) must not exceed max_connections (%d)"
                            % (settings.max_downloads, settings.max_connections))
    if settings.rollout is not None and settings.state_dir is None:
        raise SettingsError("rollout needs state_dir: a writable folder for the fleet's state")
    warnings = ["unknown setting %r is ignored" % key for key in unknown]
    return settings, warnings


def _looks_like_a_path(text: str) -> bool:
    """Not JSON, one word, with a slash or a .json ending: the file's name where its content belongs."""
    word = text.strip()
    return not any(character.isspace() for character in word) and not word.startswith(("{", "[", '"')) and (
        "/" in word or word.endswith(".json"))


def _port_setting(key: str, value: object) -> int:
    """A TCP port: an integer, or a string of digits, from 0 to 65535.

    0 lets the system pick a free port, which the start line names (as tests do, to race nobody for a port).
    """
    if isinstance(value, str) and _DIGITS.fullmatch(value.strip()):
        value = int(value.strip())
    if isinstance(value, bool) or not isinstance(value, int):
        raise SettingsError("%s must be an integer, not %r" % (key, value))
    if not 0 <= value <= 65535:
        raise SettingsError("%s must be between 0 and 65535, not %d" % (key, value))
    return value


def _path_setting(key: str, value: object, cwd: str) -> str:
    """A non-empty path; a relative one is taken from the working directory."""
    if not isinstance(value, str) or not value or "\0" in value:
        raise SettingsError("%s must be a non-empty path, not %r" % (key, value))
    return os.path.normpath(os.path.join(cwd, value))


def _host_setting(key: str, value: object) -> str:
    """An address to listen on; empty means every IPv4 interface."""
    if not isinstance(value, str) or "\0" in value:
        raise SettingsError("%s must be a string (an address, or empty for all interfaces), not %r" % (key, value))
    return value


def _seconds_setting(key: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 86400:
        raise SettingsError("%s must be a number of seconds above 0, not %r" % (key, value))
    return float(value)


def _hours_setting(key: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 24 * 3650:
        raise SettingsError("%s must be a number of hours above 0 (at most ten years), not %r" % (key, value))
    return float(value)


def _count_setting(key: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise SettingsError("%s must be a positive integer, not %r" % (key, value))
    return value


def _bool_setting(key: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise SettingsError("%s must be true or false, not %r" % (key, value))
    return value


def _networks_setting(key: str, value: object) -> Tuple[Network, ...]:
    """A list of addresses or CIDR ranges, such as ["10.0.0.0/8", "::1"]."""
    if not isinstance(value, list):
        raise SettingsError("%s must be a list of addresses or CIDR ranges, not %r" % (key, value))
    networks = []
    for item in value:
        try:
            networks.append(unmapped_network(ipaddress.ip_network(item if isinstance(item, str) else "-",
                                                                  strict=False)))
        except ValueError:
            raise SettingsError("%s: %r is not an address or CIDR range" % (key, item)) from None
    return tuple(networks)


def unmapped_network(network: Network) -> Network:
    """An IPv4-mapped range (::ffff:127.0.0.1, ::ffff:10.0.0.0/104) as the IPv4 one (127.0.0.1/32, 10.0.0.0/8).

    The server reads a mapped peer or forwarded address as IPv4 (parse_address), so the
    mapped spelling would otherwise match nothing, silently.
    """
    if isinstance(network, ipaddress.IPv6Network) and network.prefixlen >= 96:     # ::ffff:0:0/96, RFC 4291 §2.5.5.2
        mapped = network.network_address.ipv4_mapped
        if mapped is not None:
            return ipaddress.IPv4Network((mapped, network.prefixlen - 96))
    return network


def default_max_downloads(max_connections: int) -> int:
    """All but a twentieth of the slots (at least two), so a server full of slow downloads still answers OPQ Health.

    Two at least: a client's next request may arrive while the thread of its last one is
    still finishing, holding its slot for a moment.
    """
    return max(1, max_connections - max(2, max_connections // 20))


def _ipv6_prefix_setting(key: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 128:
        raise SettingsError("%s must be a prefix length from 1 to 128, not %r" % (key, value))
    return value


FORWARDED_HEADERS = ("X-Forwarded-For", "Forwarded")


def _forwarded_header_setting(key: str, value: object) -> str:
    """The header the proxies write, spelt as in FORWARDED_HEADERS whatever the case given."""
    for name in FORWARDED_HEADERS:
        if isinstance(value, str) and value.lower() == name.lower():
            return name
    raise SettingsError("%s must be %s, not %r" % (key, " or ".join(map(repr, FORWARDED_HEADERS)), value))


def _principals_setting(key: str, value: object) -> Tuple[str, ...]:
    """Principal names, each as a box passes it to ``ssh-keygen -Y verify -I``; empty means any listed."""
    if not isinstance(value, list) or not all(
            isinstance(item, str) and item and not set(item) & set("\0\r\n") for item in value):
        raise SettingsError("%s must be a list of principal names (as boxes pass to ssh-keygen -Y verify -I), not %r"
                            % (key, value))
    return tuple(value)


def check_updates_dir(path: str) -> None:
    """Refuse to start on an updates folder that is missing or cannot be listed."""
    if not os.path.exists(path):
        raise SettingsError("updates folder %s is missing" % path)
    if not os.path.isdir(path):
        raise SettingsError("updates folder %s is not a folder" % path)
    try:
        os.listdir(path)
    except OSError as error:
        raise SettingsError("updates folder %s cannot be read: %s" % (path, error.strerror)) from None


# ---------------------------------------------------------------------------
# 2. Archive checks
# ---------------------------------------------------------------------------

UPDATE_NAME = re.compile(r"opq-box-update-([0-9]{1,20})\.tar\.bz2")
SIGNATURE_SUFFIX = ".sig"
READ_CHUNK = 1 << 16
MAX_TAR_METADATA = 64 << 10     # a GNU long name or link, or a pax header, may hold at most this
MAX_EXPANDED_BYTES = Settings(port=0, updates_dir="").max_expanded_bytes   # the setting's default


class ArchiveError(Exception):
    """Why an archive must not be offered to boxes."""


def version_digits(name: str) -> Optional[str]:
    """The VERSION as written in an update's file name (its top folder repeats it), or None for other names."""
    match = UPDATE_NAME.fullmatch(name)
    return match.group(1) if match else None


READ_FLAGS = os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)


def open_regular(path: str) -> Tuple[int, os.stat_result]:
    """A descriptor of a regular file, and its status, opened without ever waiting on it.

    No-follow refuses links; non-blocking means a FIFO or device renamed into the
    folder cannot hang the thread in open(); anything but a regular file is refused.
    """
    descriptor = os.open(path, READ_FLAGS)
    try:
        status = os.fstat(descriptor)
        if not stat.S_ISREG(status.st_mode):
            raise OSError(errno.EINVAL, "not a regular file", path)
    except BaseException:
        os.close(descriptor)
        raise
    return descriptor, status


def open_regular_file(path: str) -> io.FileIO:
    """open_regular, as a file object to read from."""
    descriptor, _ = open_regular(path)
    try:
        return io.FileIO(descriptor, "rb", closefd=True)
    except BaseException:
        os.close(descriptor)
        raise


class Digests(NamedTuple):
    """Hashes of an update file's exact bytes: SHA-256 for boxes, SHA-512 for signatures (PROTOCOL.sshsig)."""
    sha256: bytes
    sha512: bytes

    def for_algorithm(self, algorithm: str) -> bytes:
        """The digest a signature's hash algorithm names."""
        return self.sha512 if algorithm == "sha512" else self.sha256


class _HashingReader:
    """Reads a file in bounded chunks, hashing every byte on the way."""

    def __init__(self, fileobj: BinaryIO) -> None:
        self.fileobj = fileobj
        self.sha256 = hashlib.sha256()
        self.sha512 = hashlib.sha512()

    def read_chunk(self) -> bytes:
        """The next chunk of the file (empty at its end), hashed."""
        data = self.fileobj.read(READ_CHUNK) or b""
        self.sha256.update(data)
        self.sha512.update(data)
        return data

    def read_to_end(self) -> Digests:
        """Hash the rest of the file."""
        while self.read_chunk():
            pass
        return self.digests()

    def digests(self) -> Digests:
        """The digests of what was read so far."""
        return Digests(self.sha256.digest(), self.sha512.digest())


def hash_update_file(fileobj: BinaryIO) -> Digests:
    """The digests alone, in one pass: what verify_updates false still computes."""
    return _HashingReader(fileobj).read_to_end()


class TarMember(NamedTuple):
    """A tar member as GNU tar 1.34 on a box reads it (src/list.c read_header, src/xheader.c xheader_decode)."""
    offset: int      # where its header starts in the tar stream
    kind: bytes      # the type flag
    name: str        # as stored, trailing slashes kept (what ``tar tvf`` lists); UTF-8, other bytes escaped
    linkname: str    # the link target (stored for every type, meaningful for links)
    mode: int        # permission bits, as GNU tar restores them for root
    size: int        # bytes of data that follow the header

    @property
    def path(self) -> str:
        """The name without trailing slashes: the file GNU tar creates (strip_trailing_slashes)."""
        return self.name.rstrip("/") or self.name[:1]


def _tar_text(data: bytes) -> str:
    """Name bytes as str, reversibly (tarfile is opened with the same encoding)."""
    return data.decode("utf-8", "surrogateescape")


def _c_string(field: bytes) -> bytes:
    """A header field or long name up to its first NUL, as GNU tar (C strings) and tarfile (nts) read it."""
    return field.split(b"\0", 1)[0]


class TarFraming:
    """Follows the headers of a tar stream as its bytes pass, before tarfile reads them, as GNU tar reads them.

    tarfile reads a GNU long name or a pax header whole into memory however large its
    header says it is, and stops quietly at a header it cannot parse, where GNU tar on a
    box would skip ahead and go on extracting.  So each header is checked here first:
    checksums must match, metadata members are capped at MAX_TAR_METADATA, sparse and
    unknown member types are refused, and after the end-of-archive block only zeros may
    follow.  Memory is bounded by one header plus one capped metadata member.

    Each member's name is the one GNU tar 1.34 extracts, appended to ``members``.  Where
    Python's tarfile would read another name (a prefix field outside ustar, a long name
    beside a pax path, repeated or padded metadata), the archive is refused: what is
    checked must be what the box unpacks.
    """

    REGULAR = (b"0", b"\0", b"7")
    NO_DATA = (b"1", b"2", b"3", b"4", b"5", b"6")     # links, devices, folders, FIFOs
    LONG_NAMES = (b"L", b"K")                        # GNU long name and long link
    PAX = (b"x", b"g", b"X")                         # pax extended headers (X: Solaris)
    USTAR_MAGIC = b"ustar\0"                         # GNU tar joins the prefix field only after this magic

    def __init__(self) -> None:
        self.offset = 0                # bytes of tar data seen so far
        self.skip = 0                  # member data still to pass over
        self.wanted = tarfile.BLOCKSIZE
        self.buffer = b""              # the header or metadata being collected
        self.metadata_kind = b""       # set while collecting a long name's, long link's or pax header's data
        self.metadata_size = 0
        self.metadata_start = 0
        self.long_name: Optional[bytes] = None          # for the next member: GNU 'L' data
        self.long_link: Optional[bytes] = None          # GNU 'K' data
        self.pax: Optional[Dict[bytes, bytes]] = None   # pax 'x' records
        self.members: List[TarMember] = []              # read, not yet taken (check_update_archive takes them)
        self.ended = False

    def feed(self, data: bytes) -> None:
        """Check the next bytes of the tar stream; ArchiveError at the first problem."""
        view = memoryview(data)
        while view:
            if self.ended:
                if bytes(view).strip(b"\0"):
                    raise ArchiveError("data after the end of the tar archive at byte %d" % self.offset)
                self.offset += len(view)
                return
            if self.skip:
                taken = min(self.skip, len(view))
                self.skip -= taken
            else:
                taken = min(self.wanted - len(self.buffer), len(view))
                self.buffer += bytes(view[:taken])
            view = view[taken:]
            self.offset += taken
            if not self.skip and len(self.buffer) == self.wanted:
                block, self.buffer = self.buffer, b""
                if self.metadata_kind:
                    self._metadata(block)
                else:
                    self._header(block)

    def _header(self, block: bytes) -> None:
        start = self.offset - tarfile.BLOCKSIZE
        if not block.strip(b"\0"):
            if self.long_name is not None or self.long_link is not None or self.pax is not None:
                raise ArchiveError("tar metadata before byte %d describes no member" % start)
            self.ended = True    # tarfile and GNU tar stop at the first zero block too
            return
        if _tar_number(block[148:156], start) not in _tar_checksums(block):
            raise ArchiveError("damaged tar header at byte %d" % start)
        kind, size = block[156:157], _tar_number(block[124:136], start)
        if size < 0:
            raise ArchiveError("damaged tar header at byte %d" % start)
        if kind in self.LONG_NAMES or kind in self.PAX:
            self._metadata_header(kind, size, start)
        else:
            self._member(block, kind, size, start)

    def _metadata_header(self, kind: bytes, size: int, start: int) -> None:
        if size > MAX_TAR_METADATA:
            raise ArchiveError("tar header at byte %d declares %d bytes of names or pax data (at most %d)"
                               % (start, size, MAX_TAR_METADATA))
        # tarfile lets the first of two long names (or pax headers) for one member win, GNU tar the last
        pending = {b"L": self.long_name, b"K": self.long_link, b"x": self.pax, b"X": self.pax}.get(kind)
        if pending is not None:
            raise ArchiveError("a second %s header for one member at byte %d (tarfile and GNU tar disagree "
                               "on which applies)" % ("pax" if kind in self.PAX else "GNU long name", start))
        self.metadata_kind, self.metadata_size, self.metadata_start = kind, size, start
        self.wanted = _whole_blocks(size)
        if not size:
            self._metadata(b"")

    def _metadata(self, data: bytes) -> None:
        kind, start, self.metadata_kind, self.wanted = self.metadata_kind, self.metadata_start, b"", tarfile.BLOCKSIZE
        if kind == b"L":
            self.long_name = _c_string(data)     # both read the whole blocks up to a NUL, whatever the size says
        elif kind == b"K":
            self.long_link = _c_string(data)
        else:
            if data[self.metadata_size:].strip(b"\0"):
                raise ArchiveError("pax header at byte %d hides records in its padding (tarfile reads them, GNU "
                                   "tar does not)" % start)
            records = _pax_records(data[:self.metadata_size], kind == b"g", start)
            if kind != b"g":
                self.pax = records

    def _member(self, block: bytes, kind: bytes, size: int, start: int) -> None:
        pax = self.pax or {}
        if b"size" in pax:
            size = int(pax[b"size"])     # at most 18 digits (_pax_records)
        name = self._member_name(block, pax, start)
        if b"linkpath" in pax and self.long_link is not None:
            raise ArchiveError("member at byte %d has both a GNU long link and a pax linkpath (tarfile reads "
                               "the one, GNU tar the other)" % start)
        linkname = pax.get(b"linkpath", self.long_link if self.long_link is not None else _c_string(block[157:257]))
        self.long_name = self.long_link = self.pax = None
        if kind in self.REGULAR:
            if name.endswith(b"/"):
                raise ArchiveError("file %r at byte %d has a name ending in '/': GNU tar makes it a folder and "
                                   "reads its data as tar headers" % (_tar_text(name), start))
            self.skip = _whole_blocks(size)
        elif kind in self.NO_DATA:
            if size:
                raise ArchiveError("tar member at byte %d is a link, device or folder with %d bytes of data"
                                   % (start, size))
        elif kind == b"S":
            raise ArchiveError("sparse tar member at byte %d: updates may not hold sparse files" % start)
        else:
            raise ArchiveError("tar member type %r at byte %d is not allowed in an update"
                               % (kind.decode("latin-1"), start))
        mode = _tar_number(block[100:108], start) & 0o7777
        self.members.append(TarMember(start, kind, _tar_text(name), _tar_text(linkname), mode, size))

    def _member_name(self, block: bytes, pax: Dict[bytes, bytes], start: int) -> bytes:
        """GNU tar's name: a pax path, else a long name, else the name field after a ustar prefix."""
        if b"path" in pax:
            if self.long_name is not None:
                raise ArchiveError("member at byte %d has both a GNU long name and a pax path (tarfile reads "
                                   "the one, GNU tar the other)" % start)
            return pax[b"path"]
        if self.long_name is not None:
            return self.long_name
        name, prefix = _c_string(block[:100]), _c_string(block[345:500])
        if not prefix:
            return name
        if block[257:263] != self.USTAR_MAGIC:
            raise ArchiveError("member %r at byte %d has a prefix field %r outside a ustar header: tarfile "
                               "prepends it, GNU tar ignores it" % (_tar_text(name), start, _tar_text(prefix)))
        return prefix + b"/" + name


_PAX_LENGTH = re.compile(rb"([0-9]{1,20}) ")
_PAX_SIZE = re.compile(rb"[0-9]{1,18}")         # below 2**63 (GNU tar's off_t); int() never meets a digit limit


def _pax_records(data: bytes, is_global: bool, start: int) -> Dict[bytes, bytes]:
    """Records "LENGTH key=value\\n" (POSIX pax), exactly one way: as tarfile and GNU tar both read them.

    GNU tar (xheader.c decode_record) also takes blanks around the length and stops at a key
    holding a NUL, where tarfile reads on; those forms are refused.  Sparse maps are refused,
    and a global header may not set a path, link or size (GNU tar applies it to every member
    that follows, tarfile to none).
    """
    records: Dict[bytes, bytes] = {}
    position = 0
    while position < len(data):
        match = _PAX_LENGTH.match(data, position)
        length = int(match.group(1)) if match else 0
        record = data[position:position + length]
        key, equals, value = record[len(match.group(0)) if match else 0:-1].partition(b"=")
        if not match or length <= len(match.group(0)) or len(record) != length or not record.endswith(b"\n") \
                or not equals or not key or key[:1] in b" \t" or b"\0" in key:
            raise ArchiveError("malformed pax header at byte %d" % start)
        if key.startswith(b"GNU.sparse."):
            raise ArchiveError("sparse tar member: updates may not hold sparse files")
        if key == b"size" and (is_global or not _PAX_SIZE.fullmatch(value)):
            raise ArchiveError("pax header at byte %d sets an unusable size" % start)
        if key in (b"path", b"linkpath") and (is_global or b"\0" in value):
            raise ArchiveError("pax header at byte %d sets %s %s (tarfile and GNU tar read it differently)"
                               % (start, "a global" if is_global else "a NUL byte in its", key.decode()))
        records[key] = value
        position += length
    return records


def _whole_blocks(size: int) -> int:
    return -(-size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE


def _tar_checksums(block: bytes) -> Tuple[int, int]:
    """The header checksum with its own field read as spaces, unsigned and signed (POSIX ustar; old tars)."""
    outside = block[:148] + block[156:]
    unsigned = sum(outside) + 8 * 0x20
    return unsigned, unsigned - 256 * sum(1 for byte in outside if byte > 127)


def _tar_number(field: bytes, start: int) -> int:
    """A numeric header field: octal text, or GNU base-256 when the first byte's high bit is set."""
    if field[:1] in (b"\x80", b"\xff"):
        value = int.from_bytes(field[1:], "big")
        return value - 256 ** (len(field) - 1) if field[:1] == b"\xff" else value
    text = field.split(b"\0", 1)[0].strip(b" ")
    if not re.fullmatch(rb"[0-7]*", text):
        raise ArchiveError("damaged tar header at byte %d" % start)
    return int(text, 8) if text else 0


class _TarStream:
    """The tar bytes inside a .tar.bz2, for tarfile's stream mode, checked by TarFraming as they pass.

    Holds at most a chunk of compressed and of decompressed data whatever the
    archive's size, accepts the multi-stream files pbzip2 writes, and hashes the
    file's own bytes on the way (one pass for everything).  Decompression stops as
    soon as the tar stream grows past max_expanded_bytes, so a bzip2 bomb costs at
    most that much work.
    """

    def __init__(self, reader: _HashingReader, max_expanded_bytes: int) -> None:
        self.reader = reader
        self.framing = TarFraming()
        self.decompressor = bz2.BZ2Decompressor()
        self.pending = b""
        self.at_end = False
        self.expanded = 0
        self.max_expanded_bytes = max_expanded_bytes

    def read(self, size: int = -1) -> bytes:
        """Up to size bytes of tar data (tarfile's stream mode reads this way)."""
        wanted = READ_CHUNK if size is None or size < 0 else size
        while len(self.pending) < wanted and not self.at_end:
            self._decompress_more()
        data, self.pending = self.pending[:wanted], self.pending[wanted:]
        return data

    def finish(self) -> Digests:
        """Read to the end of the file once tarfile has stopped, insisting the bzip2 stream is complete, the rest
        is tar padding, and tarfile has taken every member GNU tar reads."""
        while True:
            if self.framing.members:
                raise ArchiveError("tar member at byte %d: GNU tar reads it, Python's tarfile does not"
                                   % self.framing.members[0].offset)
            if self.at_end:
                return self.reader.digests()
            self._decompress_more()
            self.pending = b""

    def _decompress_more(self) -> None:
        data = b""
        if self.decompressor.eof:  # pylint: disable=using-constant-test  # astroid misreads the C type
            data = self.decompressor.unused_data or self.reader.read_chunk()
            if not data:
                if self.framing.skip:   # else tarfile would seek on through the data its header declares
                    raise ArchiveError("truncated: the tar stream ends at byte %d, %d bytes short of a member's end"
                                       % (self.framing.offset, self.framing.skip))
                self.at_end = True
                return
            self.decompressor = bz2.BZ2Decompressor()
        elif self.decompressor.needs_input:  # pylint: disable=using-constant-test
            data = self.reader.read_chunk()
            if not data:
                raise ArchiveError("truncated: the bzip2 stream ends early")
        try:
            tar_data = self.decompressor.decompress(data, READ_CHUNK)
        except (OSError, EOFError, ValueError) as error:
            raise ArchiveError("corrupt bzip2 data (%s)" % error) from None
        self.expanded += len(tar_data)
        if self.expanded > self.max_expanded_bytes:
            raise ArchiveError("expands to more than %d bytes (max_expanded_bytes)" % self.max_expanded_bytes)
        self.framing.feed(tar_data)
        self.pending += tar_data


def member_path(member: TarMember, top: str) -> str:
    """A member's path below the top folder ('' for the folder itself); ArchiveError if it escapes."""
    name = member.name
    if name.startswith("/"):
        raise ArchiveError("member %r has an absolute path" % name)
    parts = [part for part in name.split("/") if part not in ("", ".")]
    if ".." in parts:
        raise ArchiveError("member %r has a '..' component" % name)
    if not parts or parts[0] != top:
        raise ArchiveError("member %r is outside the top folder %s/" % (name, top))
    if member.kind in (tarfile.CHRTYPE, tarfile.BLKTYPE, tarfile.FIFOTYPE):
        raise ArchiveError("member %r is a device or pipe" % name)
    if member.kind == tarfile.SYMTYPE:
        target = posixpath.normpath(posixpath.join(posixpath.dirname("/".join(parts)), member.linkname))
        if member.linkname.startswith("/") or not (target + "/").startswith(top + "/"):
            raise ArchiveError("link %r points outside the top folder: %r" % (name, member.linkname))
    if member.kind == tarfile.LNKTYPE:
        target = posixpath.normpath(member.linkname)
        if member.linkname.startswith("/") or not target.startswith(top + "/"):
            raise ArchiveError("hard link %r points outside the top folder: %r" % (name, member.linkname))
    return "/".join(parts[1:])


def _take_member(framing: TarFraming, info: tarfile.TarInfo) -> TarMember:
    """The member GNU tar reads where tarfile read info; ArchiveError unless both read the same."""
    gnu = framing.members.pop(0) if framing.members else None
    seen_by_tarfile = (info.name, info.linkname, info.type, info.size)
    if gnu is None or (gnu.path, gnu.linkname, gnu.kind, gnu.size) != seen_by_tarfile:
        raise ArchiveError("tar member at byte %d: Python's tarfile reads %r, GNU tar %r"
                           % (info.offset, seen_by_tarfile[:2], (gnu.path, gnu.linkname) if gnu else None))
    return gnu


def check_update_archive(fileobj: BinaryIO, version_text: str,
                         max_expanded_bytes: int = MAX_EXPANDED_BYTES) -> Digests:
    """Check an open ``.tar.bz2`` as a box would unpack it; return its digests.

    Raises ArchiveError naming the first problem (whatever the bytes: no other exception
    comes from the archive's contents).  One streaming pass, flat memory, at most
    max_expanded_bytes of tar data decompressed.  Paths are judged as GNU tar extracts them.
    """
    top = "opq-box-update-" + version_text
    stream = _TarStream(_HashingReader(fileobj), max_expanded_bytes)
    found_version: Optional[bytes] = None
    found_installer = False
    try:
        with tarfile.open(fileobj=stream, mode="r|", encoding="utf-8",  # type: ignore[call-overload]
                          errors="surrogateescape") as archive:
            for info in archive:
                archive.members.clear()     # tarfile keeps every member it read: memory would grow with their number
                member = _take_member(stream.framing, info)
                path = member_path(member, top)
                if path == "VERSION":
                    if member.kind not in TarFraming.REGULAR or member.size > 64:
                        raise ArchiveError("%s/VERSION is not a small regular file" % top)
                    found_version = archive.extractfile(info).read()
                elif path == "install_update.sh":
                    if member.kind not in TarFraming.REGULAR:
                        raise ArchiveError("%s/install_update.sh is not a regular file" % top)
                    if not member.mode & 0o111:
                        raise ArchiveError("%s/install_update.sh is not executable (mode %04o): boxes run "
                                           "./install_update.sh" % (top, member.mode))
                    found_installer = True
                elif path.startswith(("VERSION/", "install_update.sh/")):
                    raise ArchiveError("member %r would make %s a folder" % (member.name, path.partition("/")[0]))
    except tarfile.TarError as error:
        raise ArchiveError("not a valid tar archive (%s)" % error) from None
    except (ValueError, OverflowError, LookupError, EOFError, struct.error) as error:
        raise ArchiveError("Python's tarfile cannot read it (%s: %s)" % (type(error).__name__, error)) from None
    digests = stream.finish()
    if found_version is None:
        raise ArchiveError("%s/VERSION is missing" % top)
    if found_version.strip() != version_text.encode("ascii"):
        raise ArchiveError("%s/VERSION says %r, the file name says %s"
                           % (top, found_version.strip()[:20].decode("latin-1"), version_text))
    if not found_installer:
        raise ArchiveError("%s/install_update.sh is missing" % top)
    return digests


# ---------------------------------------------------------------------------
# 3. Signatures
# ---------------------------------------------------------------------------
# OpenSSH signatures (``ssh-keygen -Y sign``, PROTOCOL.sshsig) checked against an allowed_signers file
# (ssh-keygen(1) "ALLOWED SIGNERS"), in pure Python, to the verdict a box's ``ssh-keygen -Y verify -I <principal>``
# (OpenSSH 9.2) reaches on the same bytes.  Two layers, as OpenSSH's sshsig.c has them:
#   the policy (sshsig_check_allowed_keys): which allowed_signers line lists the key, and whether that line allows
#     the boxes' principal, the namespace and the moment;
#   the cryptography (sshsig_dearmor, sshsig_wrap_verify): armor, blob, namespace, hash, signature algorithm, and
#     the Ed25519 (RFC 8032) or RSA (RFC 8017, rsa-sha2-256/512) signature itself.
# Deliberately stricter than OpenSSH: only Ed25519 keys and RSA keys of 2048 bits or more are verified (ECDSA,
# DSA, security keys, certificates and RSA keys no key generator makes, with an even exponent, are refused), an
# Ed25519 S must be below L and A and R canonical (RFC 8032 §5.1.7; OpenSSH's ref10 code checks only S's top 3
# bits), and a .sig holds at most 64 KiB.

SIGNATURE_NAMESPACE = "opq-box-update"     # what operators pass to ssh-keygen -Y sign -n


class SignatureError(Exception):
    """Why a signature is refused: str(error) is a short reason for a log line."""


class AllowedSigner(NamedTuple):
    """One line of an allowed_signers file that OpenSSH reads as a key."""
    principals: Tuple[str, ...]            # an OpenSSH pattern list, matched against ssh-keygen -Y verify -I
    namespaces: Optional[Tuple[str, ...]]  # a pattern list; None: any namespace
    valid_after: Optional[int]   # epoch seconds, whole as OpenSSH's; never 0 (OpenSSH refuses 0)
    valid_before: Optional[int]
    key_type: str
    key_blob: bytes              # in its shortest encoding, so that one key has one blob
    line: int


class AllowedSigners(NamedTuple):
    """What an allowed_signers file lists: the keys, and a warning for each line skipped or never usable."""
    signers: List[AllowedSigner]
    warnings: List[str]


class SshSignature(NamedTuple):
    """The fields of a PROTOCOL.sshsig §2 blob that verification needs."""
    public_key: bytes  # in its shortest encoding, as AllowedSigner.key_blob
    namespace: str
    hash_algorithm: str
    signature: bytes  # string sig-algorithm, string sig-bytes


MAX_SIGNATURE_BYTES = 64 * 1024
_MIN_RSA_BITS = 2048
_OPENSSH_RSA_BITS = (1024, 16384)   # OpenSSH sshkey_check_rsa_length(): a key outside cannot even be read
_ARMOR_BEGIN = b"-----BEGIN SSH SIGNATURE-----\n"   # sshsig.c BEGIN_SIGNATURE, line end included
_ARMOR_END = b"\n-----END SSH SIGNATURE-----"       # sshsig_dearmor() looks for END_SIGNATURE after a \n
_MAGIC_PREAMBLE = b"SSHSIG"
_HASH_ALGORITHMS = ("sha256", "sha512")  # PROTOCOL.sshsig §2
# PROTOCOL.sshsig §2: RSA must sign with SHA-2, never the SHA-1 "ssh-rsa" algorithm (RFC 8332).
_RSA_SIGNATURE_HASHES = {"rsa-sha2-256": "sha256", "rsa-sha2-512": "sha512"}
# RFC 8017 §9.2 note 1: the DER DigestInfo that precedes the hash in EMSA-PKCS1-v1_5.
_DIGEST_INFO_PREFIXES = {
    "sha256": bytes.fromhex("3031300d060960864801650304020105000420"),
    "sha512": bytes.fromhex("3051300d060960864801650304020305000440"),
}
_PLAIN_KEY_TYPES = ("ssh-ed25519", "ssh-rsa", "ssh-dss", "ecdsa-sha2-nistp256", "ecdsa-sha2-nistp384",
                    "ecdsa-sha2-nistp521", "sk-ecdsa-sha2-nistp256@openssh.com", "sk-ssh-ed25519@openssh.com")
_KNOWN_KEY_TYPES = frozenset(_PLAIN_KEY_TYPES + tuple(
    name.partition("@")[0] + "-cert-v01@openssh.com" for name in _PLAIN_KEY_TYPES))
# The names OpenSSH 9.2's sshkey_read() takes before a key (its keyimpls[]), each with the type of blob it must
# hold: the RSA signature algorithm names also name an RSA key.  A type that is read but not verified here is
# kept, so that its signatures are refused with the reason rather than the line skipped.
_KEY_TYPE_NAMES = dict([(name, name) for name in _KNOWN_KEY_TYPES] + [
    ("rsa-sha2-256", "ssh-rsa"), ("rsa-sha2-512", "ssh-rsa"),
    ("rsa-sha2-256-cert-v01@openssh.com", "ssh-rsa-cert-v01@openssh.com"),
    ("rsa-sha2-512-cert-v01@openssh.com", "ssh-rsa-cert-v01@openssh.com"),
    ("webauthn-sk-ecdsa-sha2-nistp256@openssh.com", "sk-ecdsa-sha2-nistp256@openssh.com")])
_C_SPACE = " \t\n\v\f\r"       # isspace() in the C locale: what OpenSSH's base64 decoder b64_pton() skips
_MISC_WHITESPACE = " \t\r\n"   # misc.c WHITESPACE: what ends an allowed_signers principals field
_PATTERN_MAX = 1023            # match.c match_pattern_list(): a longer sub-pattern fails the whole list
_ASCII_LOWER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")
# misc.c parse_absolute_time() hands YYYY-MM-DD[THH:MM[:SS]] to glibc strptime(): each field is optional
# white space then digits, in the range strptime allows (%S up to 61, leap seconds); mktime/timegm normalise.
_TIME_FIELDS = ((4, 0, 9999), (2, 1, 12), (2, 1, 31), (2, 0, 23), (2, 0, 59), (2, 0, 61))
_TIME_FIELD = re.compile("[ \t\n\v\f\r]*([0-9]+)")


# The cryptography ------------------------------------------------------------

class _SshWireReader:
    """Reads RFC 4251 §5 data types from a blob; running short or leaving bytes over is a ValueError."""

    def __init__(self, blob: bytes) -> None:
        self._blob = blob
        self._offset = 0

    def take(self, size: int) -> bytes:
        """The next `size` bytes."""
        end = self._offset + size
        if end > len(self._blob):
            raise ValueError("truncated field")
        chunk = self._blob[self._offset:end]
        self._offset = end
        return chunk

    def uint32(self) -> int:
        """A big-endian 32-bit unsigned integer."""
        return int.from_bytes(self.take(4), "big")

    def string(self) -> bytes:
        """A uint32 length followed by that many bytes."""
        return self.take(self.uint32())

    def text(self) -> str:
        """A string of UTF-8 without NUL, as OpenSSH's sshbuf_get_cstring() insists."""
        raw = self.string()
        if b"\0" in raw:
            raise ValueError("NUL in a text field")
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise ValueError("text field is not UTF-8") from None

    def mpint(self) -> int:
        """A non-negative mpint; leading zero bytes are skipped, as OpenSSH's sshbuf_get_bignum2() skips them."""
        raw = self.string()
        if raw[:1] >= b"\x80":
            raise ValueError("negative mpint")
        if len(raw) > 2049 or (len(raw) == 2049 and raw[0]):    # SSHBUF_MAX_BIGNUM + 1
            raise ValueError("mpint too large")
        return int.from_bytes(raw, "big")

    def finish(self) -> None:
        """Refuse bytes left over after the last field."""
        if self._offset != len(self._blob):
            raise ValueError("trailing bytes")


def _ssh_string(data: bytes) -> bytes:
    """RFC 4251 §5 string: uint32 length, then the bytes."""
    return len(data).to_bytes(4, "big") + data


def _ssh_mpint(value: int) -> bytes:
    """RFC 4251 §5 mpint of a non-negative integer, in its shortest encoding."""
    return _ssh_string(value.to_bytes(value.bit_length() // 8 + 1, "big") if value else b"")


def _shown(text: str) -> str:
    """Quotes and escapes untrusted text for a log line, cut to a sane length."""
    return ascii(text[:64])


def _openssh_base64(text: str) -> bytes:
    """Base64 as OpenSSH's b64_pton() decodes it: C white space anywhere is skipped; otherwise padded,
    with zero spare bits (so one blob has one spelling); ValueError if not."""
    compact = re.sub("[%s]" % _C_SPACE, "", text)
    decoded = base64.b64decode(compact, validate=True)  # binascii.Error is a ValueError
    if base64.b64encode(decoded).decode("ascii") != compact:
        raise ValueError("non-canonical base64")
    return decoded


def _read_public_key(blob: bytes) -> Tuple[str, bytes]:
    """(type, blob in its shortest encoding) of an SSH public key blob, read as OpenSSH's sshkey_from_blob()
    reads it; ValueError if OpenSSH could not read it.  Types not verified here are kept as they are."""
    reader = _SshWireReader(blob)
    key_type = reader.text()
    if key_type == "ssh-ed25519":       # RFC 8709 §4
        key = reader.string()
        reader.finish()
        if len(key) != 32:
            raise ValueError("Ed25519 key is not 32 bytes")
        return key_type, blob
    if key_type == "ssh-rsa":           # RFC 4253 §6.6: string type, mpint e, mpint n
        exponent = reader.mpint()
        modulus = reader.mpint()
        reader.finish()
        if not _OPENSSH_RSA_BITS[0] <= modulus.bit_length() <= _OPENSSH_RSA_BITS[1]:
            raise ValueError("RSA key of %d bits (OpenSSH reads %d to %d)"
                             % ((modulus.bit_length(),) + _OPENSSH_RSA_BITS))
        return key_type, _ssh_string(b"ssh-rsa") + _ssh_mpint(exponent) + _ssh_mpint(modulus)
    if key_type not in _KNOWN_KEY_TYPES:
        raise ValueError("unknown key type %s" % _shown(key_type))
    return key_type, blob


def _ed25519_public_key(key_blob: bytes) -> bytes:
    """The 32-byte key of an "ssh-ed25519" blob that _read_public_key read (RFC 8709 §4)."""
    return key_blob[-32:]


def _rsa_public_numbers(key_blob: bytes) -> Tuple[int, int]:
    """(modulus, exponent) of an "ssh-rsa" blob (RFC 4253 §6.6: string type, mpint e, mpint n)."""
    reader = _SshWireReader(key_blob)
    reader.string()
    exponent = reader.mpint()
    return reader.mpint(), exponent


def _key_refusal(key_type: str, key_blob: bytes) -> Optional[str]:
    """Why every signature by this key is refused, or None if it can be verified."""
    if key_type == "ssh-rsa":
        modulus, exponent = _rsa_public_numbers(key_blob)
        if exponent < 3 or exponent % 2 == 0 or modulus % 2 == 0:
            return "impossible RSA key"
        if modulus.bit_length() < _MIN_RSA_BITS:
            return "RSA key of %d bits is too small (%d at least)" % (modulus.bit_length(), _MIN_RSA_BITS)
        return None
    if key_type != "ssh-ed25519":
        return "unsupported key type " + _shown(key_type)
    return None


def _armor_refusal(armored: bytes) -> str:
    """Why sshsig_dearmor() finds no BEGIN line at the very start, in the operator's terms."""
    first_line = armored.split(b"\n", 1)[0]
    if first_line.rstrip(b" \t\r") == _ARMOR_BEGIN[:-1]:
        if first_line.endswith(b"\r"):
            return "the BEGIN line ends in CR LF (OpenSSH reads only LF line ends)"
        return "space or tab after the BEGIN line"
    if armored.lstrip().startswith(_ARMOR_BEGIN[:-1]):
        return "something (a blank line, spaces) before the BEGIN line"
    return "no BEGIN line"


def dearmor_sshsig(armored: bytes) -> bytes:
    """The blob inside PROTOCOL.sshsig §1 armor, read exactly as OpenSSH's sshsig_dearmor() reads it, so that
    every .sig the server accepts (and serves as it is) is one a box's ssh-keygen accepts.

    That is: BEGIN and a line feed at the very start; the base64 up to the first line feed followed by the END
    marker (what follows it is not read); white space inside the base64 is skipped.  Every other variant is a
    SignatureError naming it."""
    if len(armored) > MAX_SIGNATURE_BYTES:
        raise SignatureError("malformed armor: more than %d bytes" % MAX_SIGNATURE_BYTES)
    if not armored.startswith(_ARMOR_BEGIN):
        raise SignatureError("malformed armor: " + _armor_refusal(armored))
    end = armored.find(_ARMOR_END, len(_ARMOR_BEGIN))
    if end < 0:
        indented = re.search(rb"\n[ \t]+-----END SSH SIGNATURE-----", armored)
        raise SignatureError("malformed armor: " + ("the END line is indented" if indented else "no END line"))
    body = armored[len(_ARMOR_BEGIN):end]
    if b"\0" in body[:-1]:      # sshbuf_dup_string(): a NUL is allowed only as the last byte
        raise SignatureError("malformed armor: NUL byte")
    try:
        return _openssh_base64(body.rstrip(b"\0").decode("ascii"))
    except ValueError:          # UnicodeDecodeError is a ValueError
        raise SignatureError("malformed armor: bad base64") from None


def parse_sshsig(armored: bytes) -> SshSignature:
    """Reads an armored signature (PROTOCOL.sshsig §1 armor around the §2 blob) as OpenSSH 9.2 reads it."""
    blob = dearmor_sshsig(armored)
    try:
        reader = _SshWireReader(blob)
        if reader.take(len(_MAGIC_PREAMBLE)) != _MAGIC_PREAMBLE:
            raise ValueError("no SSHSIG preamble")
        version = reader.uint32()
        if version > 1:     # sshsig_parse_preamble() refuses only versions above SIG_VERSION (1)
            raise ValueError("version %d" % version)
        public_key = _read_public_key(reader.string())[1]
        namespace = reader.text()
        reader.string()  # reserved: PROTOCOL.sshsig §2 says to ignore it; the signed data has it empty
        hash_algorithm = reader.text()
        signature = reader.string()
        reader.finish()
        if not namespace:
            raise ValueError("empty namespace")  # PROTOCOL.sshsig §2: MUST NOT be empty
    except ValueError as error:
        raise SignatureError("malformed signature: %s" % error) from None
    if hash_algorithm not in _HASH_ALGORITHMS:
        raise SignatureError("unsupported hash algorithm " + _shown(hash_algorithm))
    return SshSignature(public_key, namespace, hash_algorithm, signature)


def _check_signature(key_blob: bytes, signed_data: bytes, signature_blob: bytes) -> None:
    """Raises SignatureError unless the key's signature over signed_data is good."""
    key_type = _read_public_key(key_blob)[0]
    refusal = _key_refusal(key_type, key_blob)
    if refusal:
        raise SignatureError(refusal)
    reader = _SshWireReader(signature_blob)
    algorithm = reader.text()
    signature = reader.string()
    reader.finish()  # OpenSSH refuses trailing data here too
    if key_type == "ssh-ed25519":
        if algorithm != "ssh-ed25519":
            raise SignatureError("signature algorithm %s is not accepted" % _shown(algorithm))
        good = ed25519_verify(_ed25519_public_key(key_blob), signed_data, signature)
    else:
        if algorithm not in _RSA_SIGNATURE_HASHES:
            raise SignatureError("signature algorithm %s is not accepted" % _shown(algorithm))
        modulus, exponent = _rsa_public_numbers(key_blob)
        size = (modulus.bit_length() + 7) // 8
        # OpenSSH ssh-rsa.c ssh_rsa_verify(): a signature shorter than the modulus is padded with leading zeros.
        signature = signature.rjust(size, b"\0")
        good = rsa_pkcs1v15_verify(modulus, exponent, _RSA_SIGNATURE_HASHES[algorithm], signed_data, signature)
    if not good:
        raise SignatureError("bad signature")


def verify_signature(signature: SshSignature, message_digest: bytes, namespace: str) -> None:
    """The cryptography alone (OpenSSH sshsig_wrap_verify()): raises SignatureError unless signature.public_key
    signed this digest of the message for this namespace.  Which keys are trusted is the policy's question.

    A message_digest of the wrong size for signature.hash_algorithm is the caller's bug: ValueError."""
    if signature.namespace != namespace:
        raise SignatureError("signed for namespace %s, not %s" % (_shown(signature.namespace), _shown(namespace)))
    if len(message_digest) != hashlib.new(signature.hash_algorithm).digest_size:
        raise ValueError("message_digest is not a %s digest" % signature.hash_algorithm)
    # PROTOCOL.sshsig §3: the data the key signed; the reserved field is always empty here.
    signed_data = (_MAGIC_PREAMBLE + _ssh_string(namespace.encode("utf-8")) + _ssh_string(b"")
                   + _ssh_string(signature.hash_algorithm.encode("ascii")) + _ssh_string(message_digest))
    try:
        _check_signature(signature.public_key, signed_data, signature.signature)
    except ValueError as error:
        raise SignatureError("malformed signature: %s" % error) from None


# Ed25519 (RFC 8032 §5.1): points are extended coordinates (X, Y, Z, T), x = X/Z, y = Y/Z, x*y = T/Z.
_Point = Tuple[int, int, int, int]
_P = 2 ** 255 - 19
_L = 2 ** 252 + 27742317777372353535851937790883648493  # the order of the base point
_D = -121665 * pow(121666, _P - 2, _P) % _P
_SQRT_MINUS_ONE = pow(2, (_P - 1) // 4, _P)
_IDENTITY: _Point = (0, 1, 1, 0)


def _point_add(one: _Point, two: _Point) -> _Point:
    """RFC 8032 §5.1.4 addition (complete for this curve)."""
    # pylint: disable=invalid-name  # the RFC's names
    x_1, y_1, z_1, t_1 = one
    x_2, y_2, z_2, t_2 = two
    a = (y_1 - x_1) * (y_2 - x_2) % _P
    b = (y_1 + x_1) * (y_2 + x_2) % _P
    c = 2 * _D * t_1 * t_2 % _P
    d = 2 * z_1 * z_2 % _P
    e, f, g, h = b - a, d - c, d + c, b + a
    return e * f % _P, g * h % _P, f * g % _P, e * h % _P


def _point_double(point: _Point) -> _Point:
    """RFC 8032 §5.1.4 doubling, cheaper than adding a point to itself."""
    # pylint: disable=invalid-name  # the RFC's names
    x_1, y_1, z_1, _ = point
    a = x_1 * x_1 % _P
    b = y_1 * y_1 % _P
    c = 2 * z_1 * z_1 % _P
    h = a + b
    e = h - (x_1 + y_1) * (x_1 + y_1)
    g = a - b
    f = c + g
    return e * f % _P, g * h % _P, f * g % _P, e * h % _P


def _decode_point(encoded: bytes) -> Optional[_Point]:
    """RFC 8032 §5.1.3, strict: None for y >= p, for no square root, and for x = 0 with the sign bit set."""
    # pylint: disable=invalid-name  # the RFC's names
    value = int.from_bytes(encoded, "little")
    y, sign = value & ((1 << 255) - 1), value >> 255
    if y >= _P:
        return None
    u, v = (y * y - 1) % _P, (_D * y * y + 1) % _P
    x = u * pow(v, 3, _P) * pow(u * pow(v, 7, _P), (_P - 5) // 8, _P) % _P
    if v * x * x % _P != u:
        x = x * _SQRT_MINUS_ONE % _P
        if v * x * x % _P != u:
            return None
    if x == 0 and sign:
        return None
    if x & 1 != sign:
        x = _P - x
    return x, y, 1, x * y % _P


def _encode_point(point: _Point) -> bytes:
    """RFC 8032 §5.1.2: y, little-endian, with the low bit of x on top; always canonical."""
    z_inverse = pow(point[2], _P - 2, _P)
    x_affine, y_affine = point[0] * z_inverse % _P, point[1] * z_inverse % _P
    return (y_affine | (x_affine & 1) << 255).to_bytes(32, "little")


def _multiples(point: _Point) -> List[_Point]:
    """[0]point .. [15]point, the table for a 4-bit window."""
    table = [_IDENTITY, point]
    for _ in range(14):
        table.append(_point_add(table[-1], point))
    return table


# RFC 8032 §5.1: the base point B = (x, 4/5) with x positive.
_BASE_X = 15112221349535400772501151409588531511454012693041857206046113283949847762202
_BASE_Y = 46316835694926478169428394003475163141307993866256225615783033603165251855960
_BASE_MULTIPLES = _multiples((_BASE_X, _BASE_Y, 1, _BASE_X * _BASE_Y % _P))


def _base_times_plus(scalar_b: int, scalar_a: int, point_a: _Point) -> _Point:
    """[scalar_b]B + [scalar_a]point_a for scalars below 2^256, sharing the doublings (Straus)."""
    a_multiples = _multiples(point_a)
    result = _IDENTITY
    for shift in range(252, -1, -4):
        result = _point_double(_point_double(_point_double(_point_double(result))))
        window_b, window_a = (scalar_b >> shift) & 15, (scalar_a >> shift) & 15
        if window_b:
            result = _point_add(result, _BASE_MULTIPLES[window_b])
        if window_a:
            result = _point_add(result, a_multiples[window_a])
    return result


def ed25519_verify(public_key: bytes, message: bytes, signature: bytes) -> bool:
    """RFC 8032 §5.1.7, strict (canonical A and R, S < L) and cofactorless, as OpenSSH's ref10 code."""
    if len(public_key) != 32 or len(signature) != 64:
        return False
    point_a = _decode_point(public_key)
    scalar_s = int.from_bytes(signature[32:], "little")
    if point_a is None or scalar_s >= _L:
        return False
    encoded_r = signature[:32]
    k = int.from_bytes(hashlib.sha512(encoded_r + public_key + message).digest(), "little") % _L
    minus_a = (-point_a[0] % _P, point_a[1], point_a[2], -point_a[3] % _P)
    check = _base_times_plus(scalar_s, k, minus_a)  # [S]B - [k]A, which must be R
    # Our encoding is canonical, so an R that is not canonical or not a point can never equal it.
    return hmac.compare_digest(_encode_point(check), encoded_r)


def rsa_pkcs1v15_verify(modulus: int, exponent: int, hash_name: str, message: bytes, signature: bytes) -> bool:
    """RFC 8017 §8.2.2 RSASSA-PKCS1-v1_5: rebuild the whole encoded block and compare, never parse padding."""
    size = (modulus.bit_length() + 7) // 8
    if len(signature) != size:
        return False
    representative = int.from_bytes(signature, "big")
    if representative >= modulus:  # RFC 8017 §5.2.2 RSAVP1
        return False
    digest_info = _DIGEST_INFO_PREFIXES[hash_name] + hashlib.new(hash_name, message).digest()
    padding_size = size - len(digest_info) - 3
    if padding_size < 8:  # RFC 8017 §9.2 step 3: "intended encoded message length too short"
        return False
    expected = b"\x00\x01" + b"\xff" * padding_size + b"\x00" + digest_info  # RFC 8017 §9.2 step 5
    return hmac.compare_digest(pow(representative, exponent, modulus).to_bytes(size, "big"), expected)


# The allowed_signers policy --------------------------------------------------

def _match_pattern(text: bytes, pattern: bytes) -> bool:
    """OpenSSH match.c match_pattern(): * matches any bytes, ? one byte; in time linear in both lengths."""
    position, index, star, resume = 0, 0, -1, 0
    while position < len(text):
        if index < len(pattern) and pattern[index] == 42:        # *
            star, resume, index = index, position, index + 1
        elif index < len(pattern) and pattern[index] in (63, text[position]):    # ? or the same byte
            position, index = position + 1, index + 1
        elif star >= 0:
            resume += 1
            position, index = resume, star + 1
        else:
            return False
    return pattern[index:].strip(b"*") == b""


def _match_pattern_list(text: str, patterns: Sequence[str]) -> int:
    """OpenSSH match.c match_pattern_list() on the comma-separated list: -1 when a !pattern matches first,
    1 when a pattern matched, else 0; a sub-pattern of 1023 bytes or more fails the list where it stands."""
    raw = ",".join(patterns).encode("utf-8", "surrogateescape")
    subject = text.encode("utf-8", "surrogateescape")
    matched, index = 0, 0
    while index < len(raw):     # not split(","): like OpenSSH, a trailing comma adds no empty pattern
        negated = raw[index:index + 1] == b"!"
        index += negated
        end = raw.find(b",", index)
        end = len(raw) if end < 0 else end
        if end - index >= _PATTERN_MAX:
            return 0
        if _match_pattern(subject, raw[index:end]):
            if negated:
                return -1
            matched = 1
        index = end + 1
    return matched


def signer_principal(signer: AllowedSigner, principals: Sequence[str] = ()) -> Optional[str]:
    """The principal under which a box's ``ssh-keygen -Y verify -I <principal>`` finds this line (sshsig.c
    parse_principals_key_and_options(): match_pattern_list(principal, the line's principals) == 1), or None.

    `principals` are the names the boxes pass to -I: the first that matches is returned.  With none given, any
    principal will do: the line's own names that would match, joined by commas, so a line that lists only
    negations (or names it also negates) is never usable, as it is for every -I."""
    if principals:
        return next((name for name in principals if _match_pattern_list(name, signer.principals) == 1), None)
    own = [name for name in signer.principals
           if name and not name.startswith("!") and _match_pattern_list(name, signer.principals) == 1]
    return ",".join(own) or None


def signer_valid_at(signer: AllowedSigner, when: float) -> bool:
    """Whether the line's valid-after/valid-before allow a signature checked at `when` (epoch seconds): as
    sshsig.c check_allowed_keys_line(), in whole seconds, valid-after <= t <= valid-before."""
    second = int(when // 1)
    return ((signer.valid_after is None or second >= signer.valid_after)
            and (signer.valid_before is None or second <= signer.valid_before))


def next_validity_boundary(signers: Sequence[AllowedSigner], now: float) -> Optional[float]:
    """The first instant after `now` at which signer_valid_at changes for any of these lines (a valid-after
    arrives, or the second after a valid-before passes), or None if none ever will."""
    boundaries = [float(signer.valid_after) for signer in signers if signer.valid_after is not None]
    boundaries += [float(signer.valid_before + 1) for signer in signers if signer.valid_before is not None]
    return min((moment for moment in boundaries if moment > now), default=None)


def allowed_signer_refusal(signer: AllowedSigner, namespace: str, when: float,
                           principals: Sequence[str] = ()) -> Optional[str]:
    """Why this line, which lists the signing key, does not allow the signature (its principals, namespaces or
    validity window, checked as sshsig.c check_allowed_keys_line() checks them), or None if it does."""
    if signer_principal(signer, principals) is None:
        return ("the key is listed for %s, not for %s" % (_shown(",".join(signer.principals)), ", ".join(
            _shown(name) for name in principals)) if principals else "the key is listed for no principal")
    if signer.namespaces is not None and _match_pattern_list(namespace, signer.namespaces) != 1:
        return "the key is not allowed for namespace " + _shown(namespace)
    if not signer_valid_at(signer, when):
        return "the key is outside its valid-after/valid-before window"
    return None


def check_allowed_signers(public_key: bytes, signers: Sequence[AllowedSigner], namespace: str, when: float,
                          principals: Sequence[str] = ()) -> Tuple[AllowedSigner, str]:
    """The policy alone (OpenSSH sshsig_check_allowed_keys()): the first line that lists this key and allows it
    for one of the principals, the namespace and the moment, with the principal that matched.  SignatureError
    otherwise, naming each line that lists the key and why it does not allow it."""
    refusals = []
    for signer in signers:
        if not hmac.compare_digest(signer.key_blob, public_key):
            continue
        refusal = allowed_signer_refusal(signer, namespace, when, principals)
        if refusal is None:
            return signer, signer_principal(signer, principals) or ""
        refusals.append("%s (allowed_signers line %d)" % (refusal, signer.line))
    raise SignatureError("; ".join(refusals) if refusals else "no listed key made this signature")


def verify_sshsig(signature: SshSignature, message_digest: bytes, signers: Sequence[AllowedSigner],
                  namespace: str, now: Optional[float] = None, principals: Sequence[str] = ()) -> str:
    """Returns the principal a box verifies this signature under (see signer_principal), or raises
    SignatureError: the policy picks the allowed_signers line, the cryptography checks the signature.

    A message_digest of the wrong size for signature.hash_algorithm is the caller's bug: ValueError."""
    if signature.namespace != namespace:
        raise SignatureError("signed for namespace %s, not %s" % (_shown(signature.namespace), _shown(namespace)))
    signer, principal = check_allowed_signers(signature.public_key, signers, namespace,
                                              time.time() if now is None else now, principals)
    try:
        verify_signature(signature, message_digest, namespace)
    except SignatureError as error:
        raise SignatureError("%s (allowed_signers line %d)" % (error, signer.line)) from None
    return principal


# Reading allowed_signers (ssh-keygen(1) ALLOWED SIGNERS, as OpenSSH 9.2's sshsig.c reads it) ---------------

def _strdelimw(text: str) -> Tuple[Optional[str], Optional[str]]:
    """misc.c strdelimw(): the first word (a part in double quotes may hold spaces) and the text after it and
    the white space that follows; None for either where OpenSSH gets NULL (an unclosed quote, no more text)."""
    delimiter = re.search('[ \t\r\n"]', text)
    if delimiter is None:
        return text, None
    start = delimiter.start()
    if text[start] != '"':
        return text[:start], text[start + 1:].lstrip(_MISC_WHITESPACE)
    text = text[:start] + text[start + 1:]
    close = text.find('"', start)
    if close < 0:
        return None, None
    return text[:close], text[close + 1:].lstrip(_MISC_WHITESPACE)


def _read_key(text: str) -> Tuple[str, bytes]:
    """sshkey.c sshkey_read(): "keytype base64 [comment]" to (type, shortest blob); ValueError if not a key."""
    type_end = re.search("[ \t]", text)
    if type_end is None:
        raise ValueError("no key")
    name = text[:type_end.start()]
    if name not in _KEY_TYPE_NAMES:
        raise ValueError("unknown key type %s" % _shown(name))
    encoded = re.split("[ \t]", text[type_end.start():].lstrip(" \t"), maxsplit=1)[0]
    if not encoded:
        raise ValueError("no key after %s" % name)
    key_type, key_blob = _read_public_key(_openssh_base64(encoded))
    if key_type != _KEY_TYPE_NAMES[name]:
        raise ValueError("a %s key written as %s" % (_shown(key_type), name))
    return key_type, key_blob


def _options_end(text: str) -> Optional[int]:
    """sshkey_advance_past_options(): where the options end (the first space or tab outside "quotes"),
    None for a quote left open at the end of the line."""
    index, quoted = 0, False
    while index < len(text) and (quoted or text[index] not in " \t"):
        if text.startswith('\\"', index):
            index += 1
        elif text[index] == '"':
            quoted = not quoted
        index += 1
    return None if quoted and index == len(text) else index


def _opt_dequote(text: str, index: int) -> Tuple[str, int]:
    """misc.c opt_dequote(): the "quoted" value at text[index] (\\" stands for ") and where it ends."""
    if not text.startswith('"', index):
        raise ValueError("missing start quote")
    value, index = [], index + 1
    while index < len(text) and text[index] != '"':
        if text.startswith('\\"', index):
            index += 1
        value.append(text[index])
        index += 1
    if index >= len(text):
        raise ValueError("missing end quote")
    return "".join(value), index + 1


def _parse_absolute_time(value: str) -> int:
    """misc.c parse_absolute_time() with glibc: YYYYMMDD[HHMM[SS]], then Z or UTC for UTC, else local time as
    mktime(3) reads it with tm_isdst 0 (so standard time, even in summer); ValueError for a time OpenSSH cannot
    read, and for one before 1970 (mktime/timegm give -1)."""
    utc = False
    if len(value) > 1 and value[-1:] in ("Z", "z"):
        utc, value = True, value[:-1]
    elif len(value) > 3 and value[-3:].lower() == "utc":
        utc, value = True, value[:-3]
    if len(value) not in (8, 12, 14):
        raise ValueError("not YYYYMMDD[HHMM[SS]]")
    fields, start = [], 0
    for width, lowest, highest in _TIME_FIELDS[:(len(value) - 2) // 2]:
        match = _TIME_FIELD.fullmatch(value, start, start + width)
        if not match or not lowest <= int(match.group(1)) <= highest:
            raise ValueError("%s is not a time" % _shown(value))
        fields.append(int(match.group(1)))
        start += width
    fields += [0] * (6 - len(fields))
    if fields[0] < 1969:
        raise ValueError("before 1970")
    year, month, day, hour, minute, second = fields
    try:    # both normalise out-of-range days and seconds, as timegm(3) and mktime(3) do (20250230 is 2 March)
        if utc:
            seconds = calendar.timegm((year, month, day, hour, minute, second))
        else:
            seconds = int(time.mktime((year, month, day, hour, minute, second, 0, 0, 0)))
    except (OverflowError, ValueError):
        raise ValueError("%s is out of range" % _shown(value)) from None
    if seconds < 0:
        raise ValueError("before 1970")
    return seconds


def _parse_signer_options(text: str) -> Tuple[bool, Dict[str, str], Dict[str, int]]:
    """sshsig.c sshsigopt_parse(): (cert-authority, namespaces, valid-after/valid-before in epoch seconds)."""
    certificate_authority, index = False, 0
    values: Dict[str, str] = {}
    times: Dict[str, int] = {}
    while index < len(text) and text[index] not in " \t":
        head = text[index:index + 15].translate(_ASCII_LOWER)   # strncasecmp() folds only ASCII
        if head.startswith("cert-authority"):   # opt_flag(): a prefix, compared case-insensitively
            certificate_authority, index = True, index + len("cert-authority")
        else:
            name = next((name for name in ("namespaces", "valid-after", "valid-before")
                         if head.startswith(name + "=")), None)   # opt_match()
            if name is not None:
                if name in values:
                    raise ValueError('multiple "%s" clauses' % name)
                values[name], index = _opt_dequote(text, index + len(name) + 1)
                if name != "namespaces":
                    try:
                        times[name] = _parse_absolute_time(values[name])
                    except ValueError as error:
                        raise ValueError('invalid "%s" time: %s' % (name, error)) from None
                    if times[name] == 0:
                        raise ValueError('invalid "%s" time: 0 means unset to OpenSSH' % name)
        if index >= len(text) or text[index] in " \t":
            break
        if text[index] != ",":
            raise ValueError("unknown key option at %s" % _shown(text[index:]))
        index += 1
        if index >= len(text):
            raise ValueError("unexpected end-of-options")
    if "valid-after" in times and "valid-before" in times and times["valid-before"] <= times["valid-after"]:
        raise ValueError('"valid-before" time is before "valid-after"')
    return certificate_authority, values, times


def _parse_signer_line(line: str, number: int) -> Optional[AllowedSigner]:
    """One line, as sshsig.c parse_principals_key_and_options(): principals [options] keytype base64 [comment].
    None for a blank or comment line; ValueError saying why OpenSSH skips it."""
    line = line.split("\0", 1)[0].lstrip(" \t")     # OpenSSH reads the line as a C string
    if not line.strip(_MISC_WHITESPACE) or line.startswith("#"):
        return None
    principals, rest = _strdelimw(line)
    if principals is None or rest is None:
        raise ValueError("invalid line")
    try:
        key_type, key_blob = _read_key(rest)
        options = ""
    except ValueError as key_error:     # as OpenSSH: no key here, so options come first
        end = _options_end(rest)
        if end is None:
            raise ValueError("invalid options (a quote is not closed)") from None
        if end == len(rest):
            raise ValueError("missing key") from None
        try:
            key_type, key_blob = _read_key(rest[end + 1:].lstrip(" \t"))
        except ValueError as error:
            reason = key_error if rest[:end] in _KEY_TYPE_NAMES else error   # the more telling of the two
            raise ValueError("invalid key: %s" % reason) from None
        options = rest[:end]
    try:
        certificate_authority, values, times = _parse_signer_options(options)
    except ValueError as error:
        raise ValueError("bad options: %s" % error) from None
    if certificate_authority:
        raise ValueError("cert-authority: certificates are not supported")
    namespaces = tuple(values["namespaces"].split(",")) if "namespaces" in values else None
    return AllowedSigner(tuple(principals.split(",")), namespaces, times.get("valid-after"),
                         times.get("valid-before"), key_type, key_blob, number)


def parse_allowed_signers(text: str) -> AllowedSigners:
    """Reads an allowed_signers file as ssh-keygen does: a line it cannot read is skipped, with a warning
    naming it (see load_allowed_signers for the file itself)."""
    signers, warnings = [], []
    for number, line in enumerate(text.split("\n"), 1):  # not splitlines(): only \n ends a line for OpenSSH
        try:
            signer = _parse_signer_line(line, number)
        except ValueError as error:
            warnings.append("line %d: %s; skipped, as ssh-keygen skips it" % (number, error))
            continue
        if signer is not None:
            signers.append(signer)
    return AllowedSigners(signers, warnings)


def unsupported_signers(signers: Sequence[AllowedSigner]) -> List[str]:
    """A warning for each listed key whose signatures will always be refused, for the operator at start-up."""
    warnings = []
    for signer in signers:
        reason = _key_refusal(signer.key_type, signer.key_blob)
        if reason:
            warnings.append("line %d: %s; signatures by this key are refused" % (signer.line, reason))
    return warnings


# Files -----------------------------------------------------------------------

def read_signature_file(path: str, expected: "Optional[FileIdentity]") -> Optional[bytes]:
    """The bytes of an update's .sig; SignatureError when it is not a small regular file, None if it is not
    (any longer) the file of the expected identity."""
    try:
        fileobj = open_regular_file(path)
    except OSError as error:
        if error.errno in (errno.ELOOP, errno.EINVAL):
            raise SignatureError("the .sig is not a regular file") from None
        raise SignatureError("the .sig cannot be read: %s" % (error.strerror or error)) from None
    with fileobj:
        if expected is not None and FileIdentity.from_stat(os.fstat(fileobj.fileno())) != expected:
            return None
        data = fileobj.read(MAX_SIGNATURE_BYTES + 1) or b""
    if len(data) > MAX_SIGNATURE_BYTES:
        raise SignatureError("the .sig is larger than %d KiB" % (MAX_SIGNATURE_BYTES >> 10))
    return data


def load_allowed_signers(path: str, principals: Sequence[str] = ()) -> AllowedSigners:
    """The keys the server trusts, for the principals the boxes verify with (see signer_principal), and a
    warning naming each line that is skipped or never usable, for the caller to log.  SettingsError (one line)
    when the file cannot be read or lists no usable key."""
    try:
        with open(path, "rb") as signers_file:
            data = signers_file.read()
    except OSError as error:
        raise SettingsError("allowed_signers %s cannot be read: %s" % (path, error.strerror or error)) from None
    # Bytes, not text mode: its universal newlines would end a line at a \r, which OpenSSH's getline() does not.
    parsed = parse_allowed_signers(data.decode("utf-8", "surrogateescape"))
    signers, warnings = [], list(parsed.warnings)
    for signer in parsed.signers:
        if signer_principal(signer, principals) is not None:
            signers.append(signer)
        elif principals:
            warnings.append("line %d: listed for %s, which ssh-keygen -Y verify -I %s never matches; ignored"
                            % (signer.line, _shown(",".join(signer.principals)), " or ".join(principals)))
        else:
            warnings.append("line %d: listed for %s, which no ssh-keygen -Y verify -I matches; ignored"
                            % (signer.line, _shown(",".join(signer.principals))))
    warnings += unsupported_signers(signers)
    warnings.sort(key=lambda warning: int(warning[5:warning.index(":")]))
    if all(_key_refusal(signer.key_type, signer.key_blob) for signer in signers):
        raise SettingsError("allowed_signers %s lists no usable key%s"
                            % (path, "".join("; " + warning for warning in warnings[:3])))
    return AllowedSigners(signers, warnings)


# ---------------------------------------------------------------------------
# 4. Catalog
# ---------------------------------------------------------------------------

class FileIdentity(NamedTuple):
    """What tells two versions of a file apart without reading it.

    The change time catches what inode, size and mtime miss: chmod, and a rewrite in place
    within one mtime tick.
    """
    inode: int
    size: int
    mtime_ns: int
    ctime_ns: int
    regular: bool
    device: int = 0

    @classmethod
    def from_stat(cls, status: os.stat_result) -> "FileIdentity":
        """The identity an lstat or fstat result gives."""
        return cls(status.st_ino, status.st_size, status.st_mtime_ns, status.st_ctime_ns,
                   stat.S_ISREG(status.st_mode), status.st_dev)

    @property
    def modified(self) -> int:
        """Whole seconds, as Last-Modified and If-Modified-Since compare them."""
        return self.mtime_ns // 10**9

    @property
    def etag(self) -> str:
        """A strong ETag (RFC 9110 §8.8.3): the bytes under a name change only with inode, size or mtime."""
        return '"%x-%x-%x"' % (self.inode, self.size, self.mtime_ns)


class ArchiveVerdict(NamedTuple):
    """What one pass over an archive found: a problem, or the digests of bytes that passed."""
    problem: Optional[str]
    digests: Optional[Digests]


class SignatureVerdict(NamedTuple):
    """What the update's .sig file holds and, when signatures are required, who signed it."""
    problem: Optional[str]
    armored: Optional[bytes]     # served as /update/<name>.sig
    signer: Optional[str]        # the principal a box verifies it under (signer_principals), else the line's
    generation: int              # the keys it was judged under (Keys.generation)


# What one check found: digests, the archive's verdict, the signature's verdict (each None if not judged).
CheckFound = Tuple[Optional[Digests], Optional[ArchiveVerdict], Optional["SignatureVerdict"]]


class Keys(NamedTuple):
    """The allowed_signers keys in force; each reload gives a new generation, so a verdict knows its keys."""
    generation: int
    signers: Optional[Sequence[AllowedSigner]]    # None: signatures not required
    problem: Optional[str] = None                 # why no key can be used (then nothing signed is offered)

    @property
    def required(self) -> bool:
        """Whether an update needs a .sig a listed key made: fails closed while the keys are unusable."""
        return self.signers is not None


# What the catalog knows of a candidate: the states it moves through, set in one place (Catalog._record).
CHECKING = "being checked"               # its archive or signature is still to be judged
UNSIGNED = "waiting for its signature"   # signatures are required and no .sig lies beside it
OFFERED = "offered"
REJECTED = "rejected"                    # Candidate.reason says why
STATES = (CHECKING, UNSIGNED, OFFERED, REJECTED)


class Candidate:
    """A correctly named regular file in the updates folder, its .sig if any, and what is known of them."""
    __slots__ = ("name", "digits", "version", "identity", "signature_identity", "digests", "archive", "signature",
                 "state", "reason", "recheck_after", "settled")

    def __init__(self, name: str, digits: str, identity: FileIdentity,
                 signature_identity: Optional[FileIdentity]) -> None:
        self.name = name
        self.digits = digits
        self.version = int(digits)
        self.identity = identity
        self.signature_identity = signature_identity
        self.digests: Optional[Digests] = None             # of the file's bytes, from whichever pass read them
        self.archive: Optional[ArchiveVerdict] = None      # the archive checks' verdict, once they ran
        self.signature: Optional[SignatureVerdict] = None  # the .sig's verdict, once it was read
        self.state = CHECKING
        self.reason: Optional[str] = None
        self.recheck_after = 0.0     # time.time() before which the checker leaves it (a file still changing)
        self.settled = False         # the checker saw it unchanged for CheckQueue.SETTLE_SECONDS

    def needs_work(self, keys: Keys) -> bool:
        """Whether the checker has something to do: judge it, or (offered) hash it or read its .sig to serve."""
        if self.state == CHECKING:
            return True
        if self.state != OFFERED:
            return False
        return self.digests is None or (self.signature_identity is not None and (
            self.signature is None or self.signature.generation != keys.generation))


def judge(candidate: Candidate, verify: bool, keys: Keys) -> Tuple[str, Optional[str]]:
    """A candidate's state and reason from what is known of it: pure, so each rule is in one place.

    With signatures required, the signature is judged first, over the file as stored, so an
    unsigned or wrongly signed file is never decompressed.
    """
    archive, signature = candidate.archive, candidate.signature
    if archive is not None and archive.problem:
        return REJECTED, archive.problem
    if keys.required:
        if candidate.signature_identity is None:
            return UNSIGNED, None
        if signature is None or signature.generation != keys.generation:
            return CHECKING, None
        if signature.problem:
            return REJECTED, signature.problem
    if archive is None and (verify or not (candidate.settled or keys.required)):    # a verified .sig: final bytes
        return CHECKING, None       # verify_updates false: offered once it stopped changing, hashed after
    return OFFERED, None


class Update(NamedTuple):
    """One offered update, as requests see it."""
    name: str
    version: int
    path: str
    identity: FileIdentity
    checked: bool                  # these exact bytes were checked: a changed file must not be served
    sha256: Optional[bytes]
    signature: Optional[bytes]     # the armored .sig, served from memory
    signer: Optional[str]


class Snapshot(NamedTuple):
    """What the catalog offers at one moment; requests read it without a lock."""
    updates: Tuple[Update, ...]     # oldest first
    by_name: Dict[str, Update]
    listing: bytes                  # the /ls body
    problem: Optional[str]          # why the updates folder cannot be read
    rejected: int
    waiting: int                    # files not checked yet
    unsigned: int                   # archives waiting for their .sig
    signatures_required: bool
    changed_at: float               # when the folder last changed (time.time())
    keys_problem: Optional[str] = None      # why allowed_signers cannot be used: nothing signed is offered
    first_look_done: bool = True            # false until every file present at start has been judged

    @property
    def latest(self) -> Optional[Update]:
        """The newest offered update, what /latest and /version name."""
        return self.updates[-1] if self.updates else None


EMPTY_SNAPSHOT = Snapshot((), {}, b"", None, 0, 0, 0, False, 0.0, first_look_done=False)


def resolve_update(snapshot: Snapshot, encoded_name: str) -> Optional[Update]:
    """The update a request names in ``/update/<name>``; only catalog names ever resolve."""
    try:
        name = urllib.parse.unquote(encoded_name, errors="strict")
    except UnicodeDecodeError:
        return None
    return snapshot.by_name.get(name)


def watched_name(name: str) -> bool:
    """Update archives and their signature files; the folder may hold anything else."""
    if name.endswith(SIGNATURE_SUFFIX):
        name = name[:-len(SIGNATURE_SUFFIX)]
    return UPDATE_NAME.fullmatch(name) is not None


IGNORED, COMPANION = "ignored", "signature"


def describe_entry(name: str, kind: str, candidate: Optional["Candidate"], names: Set[str]) -> Dict[str, object]:
    """One entry of the updates folder as /status shows it: its verdict and why (kind: file, folder, link or
    other, as lstat sees it; names: every name in the folder)."""
    if name.startswith("."):
        return {"name": name, "state": IGNORED, "reason": "hidden (a copy in progress keeps such a name until it "
                                                          "is renamed into place)"}
    if name.endswith(SIGNATURE_SUFFIX) and UPDATE_NAME.fullmatch(name[:-len(SIGNATURE_SUFFIX)]):
        archive = name[:-len(SIGNATURE_SUFFIX)]
        if archive in names:
            return {"name": name, "state": COMPANION, "reason": "the signature of %s" % archive}
        return {"name": name, "state": IGNORED, "reason": "a .sig without its archive %s" % archive}
    if not UPDATE_NAME.fullmatch(name):
        return {"name": name, "state": IGNORED,
                "reason": "not named like an update (opq-box-update-<VERSION>.tar.bz2)"}
    if kind != "file":
        return {"name": name, "state": IGNORED, "reason": {"folder": "a folder", "link": "a symbolic link"}.get(
            kind, "not a regular file")}
    if candidate is None:
        return {"name": name, "state": CHECKING}      # it appeared since the watcher's last look
    entry: Dict[str, object] = {"name": name, "state": candidate.state, "version": candidate.version}
    if candidate.reason:
        entry["reason"] = candidate.reason
    if candidate.state == OFFERED and candidate.digests:
        entry["sha256"] = candidate.digests.sha256.hex()
    if candidate.state == OFFERED and candidate.signature is not None and candidate.signature.signer:
        entry["signer"] = candidate.signature.signer
    return entry


def entry_kind(entry: "os.DirEntry[str]") -> str:
    """file, folder, link or other, without following a link."""
    if entry.is_symlink():
        return "link"
    if entry.is_dir(follow_symlinks=False):
        return "folder"
    return "file" if entry.is_file(follow_symlinks=False) else "other"


class FolderWatcher:
    """Follows the updates folder at a cost that does not grow with idle time.

    Every POLL_SECONDS it stats the folder; it lists it (scandir: names and inodes, no
    stat) only when the folder's identity changes.  Writes, truncation and chmod in place
    do not change the folder, so a rolling re-stat visits RESTAT_PER_SECOND files a second
    (a folder of 1,000 updates in 1.25 s; 100,000 files cost about half a percent of a
    core), and files that changed in the last RACY_SECONDS (still being written, or changed
    again within one timestamp tick) are re-stat'ed on every poll.
    """

    POLL_SECONDS = 0.25
    RACY_SECONDS = 2.0
    RESTAT_PER_SECOND = 800

    def __init__(self, path: str) -> None:
        self.path = path
        self.entries: Dict[str, FileIdentity] = {}
        self.problem: Optional[str] = None
        self._folder: Optional[Tuple[int, int, int]] = None
        self._folder_fd: Optional[int] = None
        self._racy_until = 0.0
        self._rolling: List[str] = []
        self._rolling_set: Set[str] = set()
        self._cursor = 0
        self._recent: Dict[str, float] = {}
        self._requested: Set[str] = set()
        self._full_restat = False
        self._lock = threading.Lock()

    def look_again(self, name: Optional[str] = None) -> None:
        """From any thread: re-stat one file at the next poll, or (None) list and re-stat everything."""
        with self._lock:
            if name is None:
                self._full_restat = True
            else:
                self._requested.add(name)

    def poll(self) -> Dict[str, Optional[FileIdentity]]:
        """Look at the folder once; return the watched names whose identity changed (None: gone)."""
        changes: Dict[str, Optional[FileIdentity]] = {}
        with self._lock:
            requested, self._requested = self._requested, set()
            full, self._full_restat = self._full_restat, False
        try:
            if self._folder_changed() or full:
                self._relist(changes, full)
        except OSError as error:
            self.problem = folder_problem(self.path, error)
            self._folder = None
            self.close()
            for name in self.entries:
                changes[name] = None
            self.entries = {}
            return changes
        self.problem = None
        now = time.monotonic()
        self._recent = {name: until for name, until in self._recent.items() if until > now}
        self._restat(self._next_to_restat(requested), changes)
        for name in changes:
            self._recent[name] = now + self.RACY_SECONDS
        return changes

    def _folder_changed(self) -> bool:
        folder = os.stat(self.path)
        if not stat.S_ISDIR(folder.st_mode):
            raise NotADirectoryError(errno.ENOTDIR, "not a folder")
        if folder.st_nlink == 0:
            raise FileNotFoundError(errno.ENOENT, "deleted")
        identity = (folder.st_ino, folder.st_mtime_ns, folder.st_ctime_ns)
        changed = identity != self._folder or time.monotonic() < self._racy_until
        if identity != self._folder:
            self._folder = identity
            self._racy_until = time.monotonic() + self.RACY_SECONDS
        return changed

    def close(self) -> None:
        """Let go of the folder's descriptor (the next listing opens it again)."""
        if self._folder_fd is not None:
            os.close(self._folder_fd)
            self._folder_fd = None

    def _relist(self, changes: Dict[str, Optional[FileIdentity]], restat_all: bool) -> None:
        """New names are stat'ed; a known name whose inode differs was replaced by a rename."""
        descriptor = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)  # lstat by name within it
        self.close()
        self._folder_fd = descriptor
        seen = set()
        with os.scandir(self.path) as listing:
            for entry in listing:
                if not watched_name(entry.name):
                    continue
                seen.add(entry.name)
                known = self.entries.get(entry.name)
                if restat_all or known is None or known.inode != entry.inode():
                    self._restat((entry.name,), changes)
        for name in [name for name in self.entries if name not in seen]:
            del self.entries[name]
            changes[name] = None
        if len(self._rolling) != len(self.entries) or any(identity is None or name not in self._rolling_set
                                                          for name, identity in changes.items()):
            self._rolling = sorted(self.entries)
            self._rolling_set = set(self._rolling)
            self._cursor = min(self._cursor, len(self._rolling))

    def _next_to_restat(self, requested: Set[str]) -> Set[str]:
        """Requested and recently changed files, and the next slice of the rolling re-stat."""
        count = int(self.RESTAT_PER_SECOND * self.POLL_SECONDS)
        names = set(self._rolling[self._cursor:self._cursor + count]) | requested | set(self._recent)
        self._cursor += count
        if self._cursor >= len(self._rolling):
            self._cursor = 0
        return names

    def _restat(self, names: Iterable[str], changes: Dict[str, Optional[FileIdentity]]) -> None:
        """Look at these files; any change moves a file's change time (or, replaced, its inode).

        This loop is the watcher's whole cost while nothing changes, so it stays lean.
        """
        entries, lstat, folder = self.entries, os.lstat, self._folder_fd
        for name in names:
            known = entries.get(name)
            try:
                status = lstat(name, dir_fd=folder)
            except OSError:
                identity = None    # gone, or not reachable: withdrawn until it is
            else:
                if known is not None and known.ctime_ns == status.st_ctime_ns and known.inode == status.st_ino:
                    continue
                identity = FileIdentity.from_stat(status)
            if identity != known:
                if identity is None:
                    entries.pop(name, None)
                else:
                    entries[name] = identity
                changes[name] = identity


def folder_problem(path: str, error: OSError) -> str:
    """Why the updates folder cannot be served, for / and the log."""
    if error.errno == errno.ENOENT:
        return "updates folder %s is missing or was deleted" % path
    return "updates folder %s cannot be read: %s" % (path, error.strerror)


class CheckQueue:
    """Candidates waiting for the checker, newest VERSION first.

    A replaced candidate stays in the heap until popped and is skipped then; one whose
    file was modified in the last SETTLE_SECONDS (maybe still being copied in) waits aside.
    """

    SETTLE_SECONDS = 0.5

    def __init__(self) -> None:
        self._heap: List[Tuple[int, str, int, Candidate]] = []
        self._settling: List[Candidate] = []
        self._pushed = 0

    def push(self, candidate: Candidate) -> None:
        """Queue a new or changed candidate."""
        self._pushed += 1
        heapq.heappush(self._heap, (-candidate.version, candidate.name, self._pushed, candidate))

    def pop(self, is_current: Callable[[Candidate], bool], keys: Keys) -> Optional[Candidate]:
        """The newest current candidate that needs work under these keys and has settled, or None."""
        settled_before = time.time_ns() - int(self.SETTLE_SECONDS * 1e9)
        settling, self._settling = self._settling, []
        for candidate in settling:
            if is_current(candidate):
                self.push(candidate)
        while self._heap:
            candidate = heapq.heappop(self._heap)[3]
            if not is_current(candidate) or not candidate.needs_work(keys):
                continue
            if candidate.digests is None and (candidate.identity.mtime_ns > settled_before
                                              or candidate.recheck_after > time.time()):
                self._settling.append(candidate)
                continue
            return candidate
        return None

    def waiting(self) -> bool:
        """Whether candidates wait in the queue (some may turn out to need no work)."""
        return bool(self._heap)

    def settling(self) -> bool:
        """Whether a candidate waits for its file to stop changing (so the checker looks again soon)."""
        return bool(self._settling)


class VerdictStore:
    """The archive checks' verdicts, remembered in state_dir so a restart offers at once what it offered before.

    A verdict is keyed by the file's whole identity (device, inode, size, modification and
    change times), and carries the digests of the bytes it judged: any write moves the
    change time, so a changed file is checked again.  SQLite in WAL mode: a kill -9 loses
    at most the verdicts not yet committed, which are simply checked again.
    """

    FILE_NAME = "verdicts.sqlite3"

    def __init__(self, state_dir: str) -> None:
        self.path = os.path.join(state_dir, self.FILE_NAME)
        try:
            self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.execute("CREATE TABLE IF NOT EXISTS verdicts (name TEXT PRIMARY KEY, device INTEGER, "
                             "inode INTEGER, size INTEGER, mtime_ns INTEGER, ctime_ns INTEGER, sha256 BLOB, "
                             "sha512 BLOB, problem TEXT, checked INTEGER)")
            self._db.execute("PRAGMA quick_check")
        except sqlite3.Error as error:
            raise SettingsError("state_dir: %s cannot be used: %s" % (self.path, error)) from None
        self._lock = threading.Lock()
        self.problem: Optional[str] = None

    def load(self, verify: bool) -> Dict[str, Tuple[FileIdentity, ArchiveVerdict]]:
        """Every remembered verdict by file name; with verify, only those of archives that were checked."""
        with self._lock:
            rows = self._db.execute("SELECT name, device, inode, size, mtime_ns, ctime_ns, sha256, sha512, problem, "
                                    "checked FROM verdicts").fetchall()
        remembered = {}
        for name, device, inode, size, mtime_ns, ctime_ns, sha256, sha512, problem, checked in rows:
            if verify and not checked:
                continue        # hashed only, under verify_updates false: its structure was never checked
            digests = Digests(bytes(sha256), bytes(sha512)) if sha256 and sha512 else None
            remembered[name] = (FileIdentity(inode, size, mtime_ns, ctime_ns, True, device),
                                ArchiveVerdict(problem, None if problem else digests))
        return remembered

    def save(self, name: str, identity: FileIdentity, verdict: ArchiveVerdict, checked: bool) -> None:
        """Remember one verdict (checked: the archive checks ran, not just the hash); a failure is logged once
        and leaves the server serving."""
        digests = verdict.digests
        try:
            with self._lock:
                self._db.execute("INSERT OR REPLACE INTO verdicts VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", (
                    name, identity.device, identity.inode, identity.size, identity.mtime_ns, identity.ctime_ns,
                    digests.sha256 if digests else None, digests.sha512 if digests else None, verdict.problem,
                    int(checked)))
            self.problem = None
        except sqlite3.Error as error:
            if self.problem is None:
                logger.error("cannot remember verdicts in %s: %s", self.path, error)
            self.problem = "cannot remember verdicts in %s: %s" % (self.path, error)

    def forget_all_but(self, names: Set[str]) -> None:
        """Drop the verdicts of files no longer in the folder."""
        try:
            with self._lock:
                known = [row[0] for row in self._db.execute("SELECT name FROM verdicts")]
                self._db.executemany("DELETE FROM verdicts WHERE name = ?",
                                     [(name,) for name in known if name not in names])
        except sqlite3.Error as error:
            logger.error("cannot forget old verdicts in %s: %s", self.path, error)


class Catalog:
    """Which updates are offered: the folder's files, what checking them found, and the Snapshot requests read.

    A watcher thread reports what changed in the folder and a checker thread works
    through candidates newest first.  Both hand their results in under one lock, and
    _record is the one place a candidate's state moves.  A change to what boxes are
    offered is published at once as a new immutable Snapshot, while a bulk of verdicts
    that offer nothing new is published at most every publish_interval (which grows with
    the cost of publishing, so a huge folder cannot spend its time on it).
    """

    MIN_PUBLISH_INTERVAL = 0.25
    SLOW_CHECK_SECONDS = 1.0    # a check taking longer gets a checker started beside it ...
    MAX_CHECKERS = 4            # ... up to this many, so no single file holds the others back
    QUIET_SECONDS = 5.0         # a file modified this recently is still being copied in: not rejected yet
    FIRST_LOOK_SECONDS = 2.0    # the start-up summary is logged by then at the latest

    def __init__(self, updates_dir: str, verify: bool = True,
                 signers: Optional[Sequence[AllowedSigner]] = None, verdicts: Optional[VerdictStore] = None,
                 principals: Sequence[str] = (), max_expanded_bytes: int = MAX_EXPANDED_BYTES) -> None:
        self.updates_dir = updates_dir
        self.verify = verify
        self.max_expanded_bytes = max_expanded_bytes
        self.principals = principals      # signer_principals: the one a box verifies with is named
        self.verdicts = verdicts
        self._remembered = verdicts.load(verify) if verdicts else {}
        self.keys = Keys(0, signers)
        self.snapshot = EMPTY_SNAPSHOT
        self.checking_seconds = 0.0
        self.publish_interval = self.MIN_PUBLISH_INTERVAL
        self.watcher = FolderWatcher(updates_dir)
        self._candidates: Dict[str, Candidate] = {}
        self._queue = CheckQueue()
        self._lock = threading.Condition()
        self._stopping = threading.Event()
        self._changed_at = time.time()
        self._published_at = 0.0
        self._unpublished = False
        self._offer_changed = False
        self._checking: Dict[int, float] = {}     # checker thread id: when its current check began
        self._first_look_done = False
        self._started = time.monotonic()
        self._checkers = 0

    @property
    def signers(self) -> Optional[Sequence[AllowedSigner]]:
        """The keys in force (None: signatures are not required)."""
        return self.keys.signers

    def start(self) -> None:
        """Scan once, so the first requests see the folder, then watch and check in the background."""
        self.scan()
        with self._lock:
            self._publish()     # even an empty folder: the snapshot says when it was first seen
        threading.Thread(target=self._watch_loop, name="catalog-watcher", daemon=True).start()
        with self._lock:
            self._start_checker()

    def stop(self) -> None:
        """Let the background threads end."""
        self._stopping.set()
        with self._lock:
            self._lock.notify_all()

    def suspect(self, name: str) -> None:
        """A request found a file that is not the one checked: look at it again at once."""
        self.watcher.look_again(name)

    def reload(self, signers: Optional[Sequence[AllowedSigner]], problem: Optional[str] = None) -> None:
        """SIGHUP, an edited allowed_signers or a key's validity boundary passing: list and re-stat the whole
        folder, and judge every signature again under these keys (problem: none can be used).

        The .sig files are read again but no archive is: its digests are kept.  Verdicts are
        recorded together, and states move only when they are, so what is offered does not
        flicker meanwhile.
        """
        self.watcher.look_again()
        with self._lock:
            keys = self.keys = Keys(self.keys.generation + 1, signers, problem)
            candidates = list(self._candidates.values())
        verdicts = [(candidate, self._check_signature(candidate, keys, candidate.digests))
                    for candidate in candidates if candidate.digests is not None and candidate.signature_identity]
        with self._lock:
            if keys is not self.keys:
                return      # another reload came after this one, and records its own
            for candidate, verdict in verdicts:
                if self._is_current(candidate) and verdict is not None:
                    candidate.signature = verdict
            for candidate in candidates:
                if self._is_current(candidate):
                    self._record(candidate)
            self._publish()
            self._lock.notify_all()

    def report(self) -> Dict[str, object]:
        """Every entry of the updates folder with its verdict and why: what /status and ``status`` show."""
        try:
            with os.scandir(self.updates_dir) as listing:
                entries = sorted((entry.name, entry_kind(entry)) for entry in listing)
        except OSError as error:
            return {"folder": self.updates_dir, "problem": folder_problem(self.updates_dir, error), "files": []}
        names = {name for name, _ in entries}
        with self._lock:
            files = [describe_entry(name, kind, self._candidates.get(name), names) for name, kind in entries]
        return {"folder": self.updates_dir, "problem": self.watcher.problem, "files": files}

    # The watcher -----------------------------------------------------------

    def _watch_loop(self) -> None:
        while not self._stopping.wait(self.watcher.POLL_SECONDS):
            try:
                self.scan()
            except Exception:  # pylint: disable=broad-except
                logger.exception("watching %s failed", self.updates_dir)
            with self._lock:
                if self._all_checkers_slow():
                    self._start_checker()
                if not self._first_look_done and time.monotonic() - self._started >= self.FIRST_LOOK_SECONDS:
                    self._end_first_look()
        self.watcher.close()

    def scan(self) -> None:
        """Take one look at the folder and bring the candidates up to date."""
        problem_before = self.watcher.problem
        changes = self.watcher.poll()
        if not changes and self.watcher.problem == problem_before:
            return
        if self.watcher.problem != problem_before:
            if self.watcher.problem:
                logger.error("%s: nothing is offered until it is back", self.watcher.problem)
            else:
                logger.info("updates folder %s is %s", self.updates_dir, "back" if problem_before else "readable")
        with self._lock:
            for archive_name in {name[:-len(SIGNATURE_SUFFIX)] if name.endswith(SIGNATURE_SUFFIX) else name
                                 for name in changes}:
                self._refresh(archive_name)
            self._changed_at = time.time()
            self._publish()
            self._lock.notify_all()

    def _refresh(self, name: str) -> None:
        """Replace the candidate of an archive whose file or .sig changed; called with the lock held."""
        identity = self.watcher.entries.get(name)
        signature_identity = self.watcher.entries.get(name + SIGNATURE_SUFFIX)
        known = self._candidates.get(name)
        digits = version_digits(name)
        if identity is None or not identity.regular or digits is None:
            self._candidates.pop(name, None)
            return
        if known is not None and known.identity == identity and known.signature_identity == signature_identity:
            return
        candidate = Candidate(name, digits, identity, signature_identity)
        if known is not None and known.identity == identity:     # only the .sig changed
            candidate.digests, candidate.archive, candidate.settled = known.digests, known.archive, known.settled
        elif name in self._remembered and self._remembered[name][0] == identity:    # judged before a restart
            candidate.archive = self._remembered.pop(name)[1]
            candidate.digests, candidate.settled = candidate.archive.digests, True
        self._candidates[name] = candidate
        self._record(candidate)

    # The checker -----------------------------------------------------------

    def _start_checker(self) -> None:
        """One more checker thread; called with the lock held."""
        self._checkers += 1
        threading.Thread(target=self._check_loop, name="catalog-checker-%d" % self._checkers, daemon=True).start()

    def _all_checkers_slow(self) -> bool:
        """Every checker has spent SLOW_CHECK_SECONDS on one file (an archive bomb, a huge update) while
        others wait, and there is room for one more; called with the lock held."""
        began_before = time.monotonic() - self.SLOW_CHECK_SECONDS
        return (len(self._checking) == self._checkers < self.MAX_CHECKERS and self._queue.waiting()
                and all(began < began_before for began in self._checking.values()))

    def _check_loop(self) -> None:
        """Work through the candidates newest first, publishing as verdicts come in.

        The first checker runs as long as the catalog; one started beside a slow check ends
        when it finds the checkers outnumber the slow checks.
        """
        checker = threading.get_ident()
        while not self._stopping.is_set():
            with self._lock:
                if self._checkers > 1 and len(self._checking) < self._checkers - 1:
                    self._checkers -= 1
                    return          # the slow check it stood in for is over
                candidate = self._queue.pop(self._is_current, self.keys)
                if candidate is None:
                    if not self._first_look_done and not self._queue.settling():
                        self._end_first_look()
                    if self._unpublished:
                        self._publish()
                    self._lock.wait(self.watcher.POLL_SECONDS if self._queue.settling() else None)
                    continue
                keys = self.keys
                if not (self.verify or keys.required or candidate.settled):
                    candidate.settled = True        # unchecked archives are offered once they stopped changing
                    self._record(candidate)
                    self._publish()
                    continue
                self._checking[checker] = started = time.monotonic()
            try:
                found = self._check(candidate, keys)
            except Exception as error:  # pylint: disable=broad-except
                logger.exception("checking %s failed", candidate.name)
                found = (None, ArchiveVerdict("could not be checked: %s" % error, None), None)    # fails closed
            with self._lock:
                del self._checking[checker]
                self.checking_seconds += time.monotonic() - started
                if not self._is_current(candidate):
                    continue
                if found is None:       # it changed while being checked: the watcher brings the new version
                    self.watcher.look_again(candidate.name)
                    continue
                digests, archive, signature = found
                if signature is not None and signature.generation != self.keys.generation:
                    signature = None    # judged under keys that a reload has replaced since: judged again
                self._record(candidate, digests, archive, signature)
                if self._offer_changed or time.monotonic() - self._published_at >= self.publish_interval:
                    self._publish()
                remember = self.verdicts is not None and archive is not None and candidate.archive is archive
            if remember and archive is not None and self.verdicts is not None:    # off the lock: a disk write
                self.verdicts.save(candidate.name, candidate.identity, archive, self.verify)

    def _check(self, candidate: Candidate, keys: Keys) -> Optional[CheckFound]:
        """The next passes a candidate needs, outside the lock; None when its file changed meanwhile.

        With signatures required: hash the file as stored and verify its .sig first, and
        decompress only a file a listed key signed.
        """
        digests, archive, signature = candidate.digests, None, None
        if keys.required and candidate.state == CHECKING:
            if digests is None:
                try:
                    digests = self._read(candidate, hash_update_file)
                except OSError as error:
                    return None, ArchiveVerdict("cannot be read: %s" % (error.strerror or error), None), None
                if digests is None:
                    return None
            if candidate.signature is None or candidate.signature.generation != keys.generation:
                signature = self._check_signature(candidate, keys, digests)
                if signature is None:
                    return None
                if signature.problem:
                    return digests, None, signature
        if candidate.archive is None and (self.verify or digests is None):
            archive = self._check_archive(candidate)
            if archive is None:
                return None
            if archive.problem is None and digests is not None and archive.digests != digests:
                return None     # not the bytes that were hashed before
            digests = archive.digests or digests
        if (not keys.required and candidate.signature_identity is not None and digests is not None
                and (candidate.signature is None or candidate.signature.generation != keys.generation)):
            signature = self._check_signature(candidate, keys, digests)   # read, to be served as it is
        return digests, archive, signature

    def _read(self, candidate: Candidate, reader: Callable[[BinaryIO], T]) -> Optional[T]:
        """reader over the candidate's file; None when the file is not (or no longer) the candidate's."""
        with open_regular_file(os.path.join(self.updates_dir, candidate.name)) as fileobj:
            result = reader(fileobj)
            if FileIdentity.from_stat(os.fstat(fileobj.fileno())) != candidate.identity:
                return None     # the result is about bytes that are no longer there
            return result

    def _check_archive(self, candidate: Candidate) -> Optional[ArchiveVerdict]:
        """One pass over the archive (verify_updates false: the digests alone); None when the file changed."""
        def verdict(fileobj: BinaryIO) -> ArchiveVerdict:
            try:
                if self.verify:
                    return ArchiveVerdict(None, check_update_archive(fileobj, candidate.digits,
                                                                     self.max_expanded_bytes))
                return ArchiveVerdict(None, hash_update_file(fileobj))
            except ArchiveError as error:
                return ArchiveVerdict(str(error), None)
        try:
            return self._read(candidate, verdict)
        except OSError as error:
            return ArchiveVerdict("cannot be read: %s" % (error.strerror or error), None)

    def _check_signature(self, candidate: Candidate, keys: Keys,
                         digests: Optional[Digests]) -> Optional[SignatureVerdict]:
        """Read the .sig (and, with keys configured, verify it over digests); None when it changed meanwhile."""
        path = os.path.join(self.updates_dir, candidate.name + SIGNATURE_SUFFIX)
        try:
            armored = read_signature_file(path, candidate.signature_identity)
            if armored is None:
                return None
            if not keys.required:
                return SignatureVerdict(None, armored, None, keys.generation)
            if keys.problem or not keys.signers:
                raise SignatureError(keys.problem or "allowed_signers lists no usable key")
            if digests is None:
                return None
            parsed = parse_sshsig(armored)
            signer = verify_sshsig(parsed, digests.for_algorithm(parsed.hash_algorithm), keys.signers,
                                   SIGNATURE_NAMESPACE, principals=self.principals)
            return SignatureVerdict(None, armored, signer, keys.generation)
        except SignatureError as error:
            return SignatureVerdict("signature: %s" % error, None, None, keys.generation)

    def _is_current(self, candidate: Candidate) -> bool:
        return self._candidates.get(candidate.name) is candidate

    # Recording ---------------------------------------------------------------

    def _record(self, candidate: Candidate, digests: Optional[Digests] = None,
                archive: Optional[ArchiveVerdict] = None, signature: Optional[SignatureVerdict] = None) -> None:
        """The one place a candidate's state moves: take in what a check found, judge, log, queue what is left.

        Called with the lock held.
        """
        candidate.digests = digests or candidate.digests
        candidate.archive = archive or candidate.archive
        if signature is not None:
            if signature.problem and not self.keys.required and (
                    candidate.signature is None or candidate.signature.problem != signature.problem):
                logger.warning("not serving %s%s: %s", candidate.name, SIGNATURE_SUFFIX, signature.problem)
            candidate.signature = signature
        before = (candidate.state, candidate.reason)
        candidate.state, candidate.reason = judge(candidate, self.verify, self.keys)
        quiet_at = candidate.identity.mtime_ns / 1e9 + self.QUIET_SECONDS
        if candidate.state == REJECTED and candidate.archive is not None and quiet_at > time.time():
            # Maybe still being copied in: judged again once it has stopped changing, rejected only then.
            candidate.archive, candidate.digests, candidate.recheck_after = None, None, quiet_at
            candidate.state, candidate.reason = CHECKING, None
        if (candidate.state, candidate.reason) != before:
            self._offer_changed |= OFFERED in (before[0], candidate.state)
            self._log_state(candidate)
        if candidate.needs_work(self.keys):
            self._queue.push(candidate)
        self._unpublished = True

    def _log_state(self, candidate: Candidate) -> None:
        """One line when a candidate is rejected or waits for its signature (offers are logged as published)."""
        if candidate.state == REJECTED and not self.keys.problem:    # that problem is logged once, not per file
            logger.warning("rejected %s: %s", candidate.name, candidate.reason)
        elif candidate.state == UNSIGNED:
            logger.info("%s waits for its signature %s%s", candidate.name, candidate.name, SIGNATURE_SUFFIX)

    def _end_first_look(self) -> None:
        """The start-up summary, once every file present at start is judged (or FIRST_LOOK_SECONDS passed)."""
        self._first_look_done = True
        if self.verdicts is not None:
            self._remembered = {}
            self.verdicts.forget_all_but(set(self._candidates))
        self._publish()
        snapshot = self.snapshot
        latest = snapshot.latest
        logger.info("first look at %s: %d update(s) offered%s; %d rejected, %d waiting for a signature, "
                    "%d being checked", self.updates_dir, len(snapshot.updates),
                    ", the newest %s" % latest.name if latest else "", snapshot.rejected, snapshot.unsigned,
                    snapshot.waiting)

    def _log_offer_changes(self, before: Snapshot, after: Snapshot) -> None:
        """An update offered or withdrawn (and why), and the newest changing; quiet during the first look."""
        for update in after.updates:
            known = before.by_name.get(update.name)
            if known is None or known.identity != update.identity:
                logger.info("offered %s: VERSION %d, SHA-256 %s%s", update.name, update.version,
                            update.sha256.hex() if update.sha256 else "not computed yet",
                            ", signed by %s" % update.signer if update.signer else "")
        for update in before.updates:
            if update.name not in after.by_name:
                candidate = self._candidates.get(update.name)
                if candidate is None:
                    why = "the file is gone" if self.watcher.problem is None else self.watcher.problem
                elif candidate.identity != update.identity:
                    why = "the file changed, checking it again"
                else:
                    why = candidate.state + (": " + candidate.reason if candidate.reason else "")
                logger.warning("withdrawn %s: %s", update.name, why)
        newest_before, newest = before.latest, after.latest
        if (newest_before and newest_before.name) != (newest and newest.name):
            logger.info("the newest update is now %s%s", newest.name if newest else "none",
                        " (was %s)" % newest_before.name if newest_before else "")

    # Publishing --------------------------------------------------------------

    def _publish(self) -> None:
        """Replace the snapshot; called with the lock held."""
        started = time.monotonic()
        before = self.snapshot
        counts = dict.fromkeys(STATES, 0)
        offered, unchecked = [], 0
        for candidate in self._candidates.values():
            counts[candidate.state] += 1
            if candidate.state == OFFERED:
                offered.append(candidate)
            if candidate.state != REJECTED and candidate.needs_work(self.keys):
                unchecked += 1
        offered.sort(key=lambda c: (c.version, c.name))
        updates = tuple(self._update(candidate) for candidate in offered)
        self.snapshot = Snapshot(
            updates=updates,
            by_name={update.name: update for update in updates},
            listing="\n".join(update.name for update in updates).encode("ascii"),
            problem=self.watcher.problem,
            rejected=counts[REJECTED],
            waiting=unchecked,
            unsigned=counts[UNSIGNED],
            signatures_required=self.keys.required,
            keys_problem=self.keys.problem,
            first_look_done=self._first_look_done,
            changed_at=self._changed_at,
        )
        if self._first_look_done and before.first_look_done:
            self._log_offer_changes(before, self.snapshot)
        self._published_at = time.monotonic()
        self._unpublished = self._offer_changed = False
        self.publish_interval = max(self.MIN_PUBLISH_INTERVAL, 10 * (self._published_at - started))

    def _update(self, candidate: Candidate) -> Update:
        signature = candidate.signature
        return Update(
            name=candidate.name, version=candidate.version,
            path=os.path.join(self.updates_dir, candidate.name), identity=candidate.identity,
            checked=self.verify or self.keys.required,
            sha256=candidate.digests.sha256 if candidate.digests else None,
            signature=signature.armored if signature else None, signer=signature.signer if signature else None)


# ---------------------------------------------------------------------------
# 5. Rollout
# ---------------------------------------------------------------------------
# A staged rollout, as Mender, Eclipse hawkBit and Sparkle's phased updates stage theirs: a new release
# reaches the canary boxes first, then the rest of the fleet in waves over time; the operator pins, halts
# and resumes through a JSON policy file.  What /latest gives a box is decided from memory (choose_update,
# pure); the fleet and the releases' clocks are kept in SQLite by a background thread, off the request path.
# Box headers are not authenticated, so progress comes from time and the operator, never from what a box
# says: a forged header can get its sender what /update/<name> gives anybody, or slow or halt the rollout.

BOX_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")
_BOX_VERSION = re.compile(r"[0-9]{1,18}")
_BOX_RESULT = re.compile(r"failed ([0-9]{1,18})")
POLICY_KEYS = ("canaries", "canary_hours", "waves_hours", "pins", "halt", "halt_after_failures",
               "install_timeout_minutes", "resume")
MAX_POLICY_BYTES = 1 << 20
BOX_STATES = ("current", "offered", "downloaded", "installed", "failed", "silent")


class PolicyError(ValueError):
    """A rollout policy that cannot be used; the message is one line."""


class RolloutPolicy(NamedTuple):
    """The operator's rollout policy file, validated (see parse_policy for the defaults)."""
    canary_ids: FrozenSet[str]
    canary_networks: Tuple[Network, ...]
    canary_hours: float
    waves_hours: float
    pins: Mapping[str, int]               # box id or address: VERSION
    halt: bool
    halt_after_failures: int              # 0: never halts by itself
    install_timeout_minutes: float
    resume: Optional[int]                 # releases an automatic halt of this VERSION

    def is_canary(self, box_id: Optional[str], address: str) -> bool:
        """A box named by its id, or whose address is in a canary range."""
        if box_id is not None and box_id in self.canary_ids:
            return True
        if not self.canary_networks:
            return False
        try:
            parsed = ipaddress.ip_address(address)
        except ValueError:
            return False
        return any(parsed in network for network in self.canary_networks)

    def pin_for(self, box_id: Optional[str], address: str) -> Optional[int]:
        """The VERSION this box is pinned to, by id first, then by address."""
        if not self.pins:
            return None
        pinned = self.pins.get(box_id) if box_id is not None else None
        return pinned if pinned is not None else self.pins.get(address)


def parse_policy(text: str) -> RolloutPolicy:
    """The policy file's JSON object; PolicyError names the first problem.  Every key is optional."""
    try:
        raw = json.loads(text)
    except ValueError as error:
        raise PolicyError("not valid JSON: %s" % error) from None
    if not isinstance(raw, dict):
        raise PolicyError("must be a JSON object, not %s" % type(raw).__name__)
    for key in raw:
        if key not in POLICY_KEYS:
            raise PolicyError("unknown key %r (known: %s)" % (key, ", ".join(POLICY_KEYS)))
    ids, networks = _policy_canaries(raw.get("canaries", []))
    resume = raw.get("resume")
    return RolloutPolicy(
        canary_ids=ids, canary_networks=networks,
        canary_hours=_policy_number("canary_hours", raw.get("canary_hours", 24), 0, 24 * 3650),
        waves_hours=_policy_number("waves_hours", raw.get("waves_hours", 72), 0, 24 * 3650),
        pins=_policy_pins(raw.get("pins", {})),
        halt=_policy_flag("halt", raw.get("halt", False)),
        halt_after_failures=int(_policy_number("halt_after_failures", raw.get("halt_after_failures", 1), 0, 10**9,
                                               whole=True)),
        install_timeout_minutes=_policy_number("install_timeout_minutes", raw.get("install_timeout_minutes", 30),
                                               0, 60 * 24 * 365, above=True),
        resume=None if resume is None else _policy_version("resume", resume))


def _policy_number(key: str, value: object, low: float, high: float, whole: bool = False,
                   above: bool = False) -> float:
    """A number in [low, high] ((low, high] when above), an integer when whole."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (whole and not isinstance(value, int)):
        raise PolicyError("%s must be %s, not %r" % (key, "an integer" if whole else "a number", value))
    if not (low < value <= high if above else low <= value <= high):
        raise PolicyError("%s must be %s %g and at most %g, not %r"
                          % (key, "above" if above else "at least", low, high, value))
    return float(value)


def _policy_flag(key: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise PolicyError("%s must be true or false, not %r" % (key, value))
    return value


def _policy_version(key: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 10**18:
        raise PolicyError("%s must be a VERSION (a whole number), not %r" % (key, value))
    return value


def _box_name(key: str, value: object) -> Union[str, Network]:
    """A box id, or (when it reads as one) an address or CIDR range; digits alone are an id."""
    if isinstance(value, str) and not _BOX_VERSION.fullmatch(value):
        try:
            return ipaddress.ip_network(value, strict=False)
        except ValueError:
            pass
    if isinstance(value, str) and BOX_ID.fullmatch(value):
        return value
    raise PolicyError("%s: %r is neither a box id (1 to 64 of A-Z a-z 0-9 . _ -) nor an address" % (key, value))


def _policy_canaries(value: object) -> Tuple[FrozenSet[str], Tuple[Network, ...]]:
    if not isinstance(value, list):
        raise PolicyError("canaries must be a list of box ids, addresses or CIDR ranges, not %r" % (value,))
    names = [_box_name("canaries", item) for item in value]
    return (frozenset(name for name in names if isinstance(name, str)),
            tuple(name for name in names if not isinstance(name, str)))


def _policy_pins(value: object) -> Dict[str, int]:
    if not isinstance(value, dict):
        raise PolicyError("pins must be an object of box id or address to VERSION, not %r" % (value,))
    pins = {}
    for key, version in value.items():
        name = _box_name("pins", key)
        if not isinstance(name, str) and name.num_addresses != 1:
            raise PolicyError("pins: %r is a range; pin a box id or one address" % key)
        pins[name if isinstance(name, str) else str(name.network_address)] = _policy_version("pins", version)
    return pins


def read_policy(path: str) -> Tuple[RolloutPolicy, str]:
    """The policy in the file, and a stamp that changes whenever the file is written (its mtime and content)."""
    try:
        with open(path, "rb") as policy_file:
            data = policy_file.read(MAX_POLICY_BYTES + 1)
            modified = os.fstat(policy_file.fileno()).st_mtime_ns
    except OSError as error:
        raise PolicyError("cannot be read: %s" % (error.strerror or error)) from None
    if len(data) > MAX_POLICY_BYTES:
        raise PolicyError("is larger than %d KiB" % (MAX_POLICY_BYTES >> 10))
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise PolicyError("is not UTF-8 text") from None
    return parse_policy(text), "%d:%s" % (modified, hashlib.sha256(data).hexdigest())


class BoxReport(NamedTuple):
    """What a request says about the box that sent it; malformed headers are ignored and named."""
    box_id: Optional[str]
    version: Optional[int]
    failed: Optional[int]           # X-OPQ-Box-Result: failed <VERSION>
    malformed: Tuple[str, ...]      # header names

    def box(self, client: str) -> str:
        """The box's key: its id, or else its client address."""
        return self.box_id if self.box_id is not None else client


def read_box_headers(headers: Mapping[str, str]) -> BoxReport:
    """X-OPQ-Box-Id, X-OPQ-Box-Version and X-OPQ-Box-Result, each optional; anything malformed is dropped."""
    malformed = []
    box_id = headers.get("x-opq-box-id")
    if box_id is not None and not BOX_ID.fullmatch(box_id):
        malformed.append("X-OPQ-Box-Id")
        box_id = None
    version_text = headers.get("x-opq-box-version")
    version = None
    if version_text is not None:
        if _BOX_VERSION.fullmatch(version_text):
            version = int(version_text)
        else:
            malformed.append("X-OPQ-Box-Version")
    result = headers.get("x-opq-box-result")
    failed = None
    if result is not None:
        match = _BOX_RESULT.fullmatch(result)
        if match:
            failed = int(match.group(1))
        else:
            malformed.append("X-OPQ-Box-Result")
    return BoxReport(box_id, version, failed, tuple(malformed))


def wave_position(box: str, version: int) -> float:
    """The box's stable place in [0, 1) in the waves of one release: a new release shuffles the fleet anew."""
    digest = hashlib.sha256(("%s\n%d" % (box, version)).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


class ReleaseClock(NamedTuple):
    """One release's rollout: when it started (0: before the rollout state existed), halts and failures."""
    version: int
    started: float                  # epoch seconds
    paused: float                   # seconds halted, halts that ended
    halted_since: Optional[float]   # halted now (by the file or by failures), since then
    halted_by_failures: bool
    failures: int                   # boxes that failed to install it
    forgiven: int                   # failures that a resume released


def rollout_elapsed(clock: ReleaseClock, now: float) -> float:
    """Seconds the release has been rolling out; the clock stops while it is halted."""
    end = clock.halted_since if clock.halted_since is not None else now
    return max(0.0, end - clock.started - clock.paused)


def wave_share(policy: RolloutPolicy, elapsed: float) -> float:
    """The share of the fleet (beyond the canaries) the waves have reached after elapsed seconds."""
    canary, waves = policy.canary_hours * 3600, policy.waves_hours * 3600
    if elapsed < canary:
        return 0.0
    return 1.0 if waves <= 0 else min(1.0, (elapsed - canary) / waves)


class BoxView(NamedTuple):
    """What choose_update needs to know of one box (a BoxRecord has the same attributes)."""
    box: str                        # its key: id, or else address
    box_id: Optional[str]
    address: str
    reported: Optional[int]                 # the VERSION it says it runs
    downloaded_version: Optional[int]       # the VERSION it was last seen downloading
    failed_version: Optional[int]           # the VERSION it failed to install

    def position(self, version: int) -> float:
        """Its wave position in that release."""
        return wave_position(self.box, version)


def release_open_to(update: Update, policy: RolloutPolicy, clocks: Mapping[int, ReleaseClock], box: "AnyBox",
                    now: float) -> bool:
    """Whether the rollout gives this box this release now: started, not halted, canary or its wave reached."""
    if update.version == box.failed_version:
        return False          # not again: a failed install reboots nothing, but each retry costs a box an outage
    clock = clocks.get(update.version)
    if clock is None or clock.halted_since is not None:
        return False          # not started (the policy is broken) or halted
    if clock.started == 0 or policy.is_canary(box.box_id, box.address):
        return True
    return box.position(update.version) < wave_share(policy, rollout_elapsed(clock, now))


def choose_update(updates: Sequence[Update], policy: RolloutPolicy, clocks: Mapping[int, ReleaseClock],
                  box: "AnyBox", now: float) -> Optional[Update]:
    """The update /latest gives this box: its pin if offered, else the newest release open to it, never older
    than the VERSION it reports or was last seen downloading (unless it failed that one) when that is offered."""
    pinned = policy.pin_for(box.box_id, box.address)
    if pinned is not None:
        for update in reversed(updates):
            if update.version == pinned:
                return update
    floor = box.reported
    downloaded = box.downloaded_version
    if downloaded is not None and downloaded != box.failed_version and (floor is None or downloaded > floor):
        floor = downloaded
    for update in reversed(updates):
        if (floor is not None and update.version <= floor) or release_open_to(update, policy, clocks, box, now):
            return update
    return None


class BoxRecord:
    """What the server knows of one box."""
    COLUMNS = ("box", "box_id", "address", "first_seen", "last_seen", "reported", "offered", "offered_version",
               "downloaded_version", "download_complete", "downloaded_at", "failed_version", "failed_at")
    __slots__ = COLUMNS + ("_position",)

    def __init__(self, box: str, box_id: Optional[str], address: str, now: float) -> None:
        self.box, self.box_id, self.address = box, box_id, address
        self.first_seen = self.last_seen = now
        self.reported: Optional[int] = None
        self.offered: Optional[str] = None
        self.offered_version: Optional[int] = None
        self.downloaded_version: Optional[int] = None
        self.download_complete = False
        self.downloaded_at: Optional[float] = None
        self.failed_version: Optional[int] = None
        self.failed_at: Optional[float] = None
        self._position = (-1, 0.0)

    def position(self, version: int) -> float:
        """Its wave position in that release, kept: /latest asks it on every check (a hash costs 2 us)."""
        if self._position[0] != version:
            self._position = (version, wave_position(self.box, version))
        return self._position[1]

    def row(self) -> Tuple[Any, ...]:
        """The record as a row of the boxes table, in COLUMNS order."""
        return tuple(getattr(self, column) for column in self.COLUMNS)

    @classmethod
    def from_row(cls, row: Sequence[Any]) -> "BoxRecord":
        """The record a row of the boxes table (in COLUMNS order) holds."""
        record = cls(row[0], row[1], row[2], row[3])
        for column, value in zip(cls.COLUMNS[3:], row[3:]):
            setattr(record, column, bool(value) if column == "download_complete" else value)
        return record

    def state(self, newest: Optional[int], silent_after: float, now: float) -> str:
        """current, offered, downloaded, installed, failed or silent (see BOX_STATES and the README)."""
        reported = -1 if self.reported is None else self.reported
        if now - self.last_seen >= silent_after:
            return "silent"
        if self.failed_version is not None and reported < self.failed_version:
            return "failed"
        offered = self.offered_version
        if offered is not None and reported >= offered and self.downloaded_version == offered:
            return "installed"      # seen downloading the release it was offered, and now runs it
        if newest is not None and reported >= newest:
            return "current"
        if offered is not None and reported >= offered:
            return "installed"
        return "downloaded" if self.downloaded() else "offered"

    def downloaded(self) -> bool:
        """It downloaded the release it was last offered completely."""
        return (self.offered_version is not None and self.download_complete
                and self.downloaded_version == self.offered_version)


AnyBox = Union[BoxView, BoxRecord]     # choose_update reads a record as it is, without a copy


class FleetStore:
    """The fleet's state in SQLite (WAL) in state_dir, checked at start and then written by one thread.

    Each write is one transaction, so a kill -9 at any moment loses nothing that was committed.
    """

    FILE = "fleet.sqlite3"
    SCHEMA = 1

    def __init__(self, state_dir: str) -> None:
        if not os.path.isdir(state_dir):
            problem = "not a folder" if os.path.exists(state_dir) else "missing"
            raise SettingsError("state_dir %s is %s" % (state_dir, problem))
        self.path = os.path.join(state_dir, self.FILE)
        try:
            self.connection = sqlite3.connect(self.path, timeout=5, isolation_level=None, check_same_thread=False)
            try:
                self._prepare(self.connection)
            except BaseException:
                self.connection.close()
                raise
        except (sqlite3.Error, OSError) as error:
            raise SettingsError("state %s cannot be used: %s" % (self.path, error)) from None

    def _prepare(self, connection: sqlite3.Connection) -> None:
        """WAL, an intact file of our schema, and a write that proves the folder is writable."""
        if connection.execute("PRAGMA journal_mode=WAL").fetchone()[0].lower() != "wal":
            raise sqlite3.OperationalError("cannot use write-ahead logging")
        connection.execute("PRAGMA synchronous=FULL")
        problem = connection.execute("PRAGMA quick_check").fetchone()[0]
        if problem != "ok":
            raise sqlite3.DatabaseError("corrupt: %s" % problem)
        schema = connection.execute("PRAGMA user_version").fetchone()[0]
        if schema not in (0, self.SCHEMA):
            raise sqlite3.DatabaseError("written by a newer server (schema %d)" % schema)
        with self.transaction() as cursor:
            cursor.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
            cursor.execute("CREATE TABLE IF NOT EXISTS releases (version INTEGER PRIMARY KEY, started REAL NOT NULL,"
                           " paused REAL NOT NULL, halted_since REAL, halted_by_failures INTEGER NOT NULL,"
                           " failures INTEGER NOT NULL, forgiven INTEGER NOT NULL)")
            cursor.execute("CREATE TABLE IF NOT EXISTS boxes (box TEXT PRIMARY KEY, box_id TEXT, address TEXT NOT NULL,"
                           " first_seen REAL NOT NULL, last_seen REAL NOT NULL, reported INTEGER, offered TEXT,"
                           " offered_version INTEGER, downloaded_version INTEGER, download_complete INTEGER NOT NULL,"
                           " downloaded_at REAL, failed_version INTEGER, failed_at REAL)")
            cursor.execute("PRAGMA user_version = %d" % self.SCHEMA)
            cursor.execute("INSERT OR REPLACE INTO meta VALUES ('opened', ?)", (repr(time.time()),))

    @contextlib.contextmanager
    def transaction(self) -> Iterator[sqlite3.Cursor]:
        """BEGIN IMMEDIATE ... COMMIT, or ROLLBACK on any error."""
        cursor = self.connection.cursor()
        cursor.execute("BEGIN IMMEDIATE")
        try:
            yield cursor
        except BaseException:
            cursor.execute("ROLLBACK")
            raise
        cursor.execute("COMMIT")

    def load(self) -> Tuple[Dict[str, str], List[ReleaseClock], List[BoxRecord]]:
        """Everything, boxes longest unseen first."""
        try:
            meta = dict(self.connection.execute("SELECT key, value FROM meta").fetchall())
            releases = [ReleaseClock(row[0], row[1], row[2], row[3], bool(row[4]), row[5], row[6]) for row in
                        self.connection.execute("SELECT version, started, paused, halted_since, halted_by_failures,"
                                                " failures, forgiven FROM releases")]
            boxes = [BoxRecord.from_row(row) for row in self.connection.execute(
                "SELECT %s FROM boxes ORDER BY last_seen" % ", ".join(BoxRecord.COLUMNS))]  # nosec: constant names
        except sqlite3.Error as error:
            raise SettingsError("state %s cannot be read: %s" % (self.path, error)) from None
        return meta, releases, boxes

    def write(self, meta: Mapping[str, str], releases: Sequence[ReleaseClock], boxes: Sequence[Tuple[Any, ...]],
              forgotten: Sequence[str]) -> None:
        """One transaction; sqlite3.Error or OSError when it cannot be written."""
        with self.transaction() as cursor:
            cursor.executemany("INSERT OR REPLACE INTO meta VALUES (?, ?)", sorted(meta.items()))
            cursor.executemany("INSERT OR REPLACE INTO releases VALUES (?, ?, ?, ?, ?, ?, ?)", releases)
            cursor.executemany("INSERT OR REPLACE INTO boxes VALUES (%s)" % ", ".join("?" * len(BoxRecord.COLUMNS)),
                               boxes)
            cursor.executemany("DELETE FROM boxes WHERE box = ?", [(box,) for box in forgotten])

    def close(self) -> None:
        """Close the state; closing it again does nothing, and any use after raises sqlite3.ProgrammingError."""
        self.connection.close()


MetricFamily = Tuple[str, str, str, List[Tuple[Dict[str, str], Union[int, float]]]]   # name, type, help, samples


class Rollout:
    """The staged rollout: the policy in force, the releases' clocks and every box, in memory under one lock.

    Requests decide from memory and mark what changed; the rollout thread re-reads the policy
    file when its status changes (every TICK_SECONDS), logs the rollout's progress, forgets
    silent boxes and writes what changed in one transaction.  A box's last_seen alone is
    written at most every TOUCH_SECONDS, so a fleet checking in does not keep the disk busy.
    """

    TICK_SECONDS = 0.5
    TOUCH_SECONDS = 10.0
    FORGET_AFTER_SILENT = 7      # a box silent for 7 x silent_after_hours is forgotten
    MAX_LOGGED_CLIENTS = 1000    # malformed headers are logged once per client address, for this many

    def __init__(self, policy_path: str, store: FleetStore, snapshot: Callable[[], Snapshot],
                 versions_present: Iterable[int], silent_after_hours: float = 48.0, max_boxes: int = 100000) -> None:
        """Read the policy and the state; SettingsError when either cannot be used."""
        self.policy_path = policy_path
        self.store = store
        self.snapshot = snapshot
        self.silent_after = silent_after_hours * 3600
        self.max_boxes = max_boxes
        try:
            self.policy, stamp = read_policy(policy_path)
            self._policy_identity = self._stat_policy()
        except PolicyError as error:
            raise SettingsError("rollout policy %s %s" % (policy_path, error)) from None
        self.policy_problem: Optional[str] = None
        self.state_problem: Optional[str] = None
        self.halts = 0
        started = time.monotonic()
        meta, releases, boxes = store.load()
        logger.info("rollout: policy %s; state %s: %d box(es) and %d release(s) loaded in %.0f ms", policy_path,
                    store.path, len(boxes), len(releases), (time.monotonic() - started) * 1000)
        self._meta = meta
        self._meta_dirty: Set[str] = set()
        if "baseline" not in meta:    # a new state: what the folder holds now counts as rolled out already
            self._set_meta("baseline", str(max(versions_present, default=0)))
        self.baseline = int(self._meta["baseline"])
        self._clocks = {clock.version: clock for clock in releases}
        self._clocks_dirty: Set[int] = set()
        self._boxes = {record.box: record for record in boxes}
        self._dirty: Set[str] = set()
        self._touched: Set[str] = set()
        self._forgotten: Set[str] = set()
        self._logged_clients: Set[str] = set()
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._synced: Optional[Snapshot] = None
        self._progress: Dict[int, int] = {}
        self._pin_warnings: Set[str] = set()
        self._touch_written = self._forget_checked = time.monotonic()
        with self._lock:
            self._apply_policy(self.policy, stamp, time.time())

    # Requests ----------------------------------------------------------------

    def answer_latest(self, snapshot: Snapshot, report: BoxReport, client: str,
                      now: Optional[float] = None) -> Optional[Update]:
        """The update /latest gives this box, noting what it said and what it was offered."""
        now = time.time() if now is None else now
        with self._lock:
            if snapshot is not self._synced:
                self._sync(snapshot, now)
            record = self._record(report, client, now)
            before = (record.address, record.reported, record.offered, record.failed_version)
            record.address, record.last_seen = client, now
            if report.version is not None:
                record.reported = report.version
            if report.failed is not None:
                self._fail(record, report.failed, now, "it said so")
            if record.downloaded_version is not None:
                self._check_install(record, now)
            update = choose_update(snapshot.updates, self.policy, self._clocks, record, now)
            if update is not None:
                record.offered, record.offered_version = update.name, update.version
                if self.policy.pins:
                    self._warn_unoffered_pin(snapshot, record)
            self._changed(record, before != (record.address, record.reported, record.offered, record.failed_version))
        if report.malformed:
            self._log_malformed(report, client)
        return update

    def record_download(self, report: BoxReport, client: str, update: Update, complete: bool,
                        now: Optional[float] = None) -> None:
        """A download of an offered update ended, with every byte sent or not."""
        now = time.time() if now is None else now
        with self._lock:
            record = self._record(report, client, now)
            record.address, record.last_seen = client, now
            record.downloaded_version, record.download_complete = update.version, complete
            if complete:
                record.downloaded_at = now
            self._changed(record, True)

    def _record(self, report: BoxReport, client: str, now: float) -> BoxRecord:
        """The box's record; made when new, the longest unseen forgotten first beyond max_boxes (a hundredth
        of them at a time, so a flood of new ids costs a scan per hundredth, not one per request)."""
        box = report.box(client)
        record = self._boxes.get(box)
        if record is None:
            if len(self._boxes) >= self.max_boxes:
                excess = len(self._boxes) - self.max_boxes + max(1, self.max_boxes // 100)
                for oldest in heapq.nsmallest(excess, self._boxes.values(), key=lambda known: known.last_seen):
                    self._forget(oldest.box)
            record = self._boxes[box] = BoxRecord(box, report.box_id, client, now)
            self._forgotten.discard(box)
            self._dirty.add(box)
        return record

    def _changed(self, record: BoxRecord, more_than_seen: bool) -> None:
        """Queue the record for writing: soon when more than its last_seen changed."""
        if more_than_seen:
            if not self._dirty:
                self._wake.set()
            self._dirty.add(record.box)
        else:
            self._touched.add(record.box)

    def _forget(self, box: str) -> None:
        del self._boxes[box]
        self._dirty.discard(box)
        self._touched.discard(box)
        self._forgotten.add(box)

    def _fail(self, record: BoxRecord, version: int, now: float, how: str) -> None:
        """The box failed to install VERSION: counted once per box, and the release halts at the threshold."""
        if record.failed_version == version:
            return
        record.failed_version, record.failed_at = version, now
        logger.warning("rollout: box %s (%s) failed to install VERSION %d (%s)", record.box, record.address, version,
                       how)
        clock = self._clocks.get(version)
        if clock is None:
            return
        clock = clock._replace(failures=clock.failures + 1)
        threshold = self.policy.halt_after_failures
        if threshold and not clock.halted_by_failures and clock.failures - clock.forgiven >= threshold:
            clock = clock._replace(halted_by_failures=True)
        self._set_clock(clock)
        self._reconcile(now)

    def _check_install(self, record: BoxRecord, now: float) -> None:
        """install_timeout_minutes after a complete download, a box still reporting an older VERSION failed."""
        version = record.downloaded_version
        if (version is not None and record.download_complete and version == record.offered_version
                and record.reported is not None and record.reported < version and record.failed_version != version
                and record.downloaded_at is not None
                and now - record.downloaded_at >= self.policy.install_timeout_minutes * 60):
            self._fail(record, version, now, "still VERSION %d %.0f minutes after downloading it"
                       % (record.reported, (now - record.downloaded_at) / 60))

    def _warn_unoffered_pin(self, snapshot: Snapshot, record: BoxRecord) -> None:
        pinned = self.policy.pin_for(record.box_id, record.address)
        if pinned is not None and pinned != record.offered_version and record.box not in self._pin_warnings:
            if not any(update.version == pinned for update in snapshot.updates):
                self._pin_warnings.add(record.box)
                logger.warning("rollout: box %s is pinned to VERSION %d, which is not offered; the policy decides",
                               record.box, pinned)

    def _log_malformed(self, report: BoxReport, client: str) -> None:
        if client in self._logged_clients or len(self._logged_clients) >= self.MAX_LOGGED_CLIENTS:
            return
        self._logged_clients.add(client)
        logger.warning("rollout: %s sent a malformed %s, ignored (logged once per address)", client,
                       " and ".join(report.malformed))

    # Releases and their clocks -------------------------------------------------

    def _sync(self, snapshot: Snapshot, now: float) -> None:
        """Give every offered release a clock: it starts now (or counts as rolled out when the state was made)."""
        if snapshot is self._synced:
            return
        self._synced = snapshot
        for update in snapshot.updates:
            if update.version in self._clocks:
                continue
            if update.version <= self.baseline:
                self._set_clock(ReleaseClock(update.version, 0.0, 0.0, None, False, 0, 0))
            elif self.policy_problem is None:    # nobody gets what the last good policy would not have given
                self._set_clock(ReleaseClock(update.version, now, 0.0, None, False, 0, 0))
                self._progress[update.version] = -1
                logger.info("rollout: %s (VERSION %d) starts rolling out: canaries for %g h, then waves over %g h",
                            update.name, update.version, self.policy.canary_hours, self.policy.waves_hours)
            else:
                self._synced = None     # look again once the policy is fixed
        self._reconcile(now)

    def _reconcile(self, now: float) -> None:
        """Halt or resume each release as the policy and its failures say; a halt stops its clock."""
        snapshot = self._synced or self.snapshot()
        newest = snapshot.latest.version if snapshot.latest else None
        for version, clock in list(self._clocks.items()):
            by_file = self.policy.halt and version == newest
            halted = by_file or clock.halted_by_failures
            if halted and clock.halted_since is None:
                self._set_clock(clock._replace(halted_since=now))
                self.halts += 1
                cause = ("the policy file" if by_file else "%d failure(s) (halt_after_failures %d)"
                         % (clock.failures - clock.forgiven, self.policy.halt_after_failures))
                logger.warning("rollout: VERSION %d halted by %s", version, cause)
            elif not halted and clock.halted_since is not None:
                self._set_clock(clock._replace(halted_since=None, paused=clock.paused + now - clock.halted_since))
                logger.info("rollout: VERSION %d resumed", version)

    def _set_clock(self, clock: ReleaseClock) -> None:
        self._clocks[clock.version] = clock
        self._clocks_dirty.add(clock.version)
        self._wake.set()

    def _set_meta(self, key: str, value: str) -> None:
        self._meta[key] = value
        self._meta_dirty.add(key)

    # The policy ------------------------------------------------------------------

    def _stat_policy(self) -> Optional[FileIdentity]:
        try:
            return FileIdentity.from_stat(os.stat(self.policy_path))
        except OSError:
            return None

    def reload(self, force: bool = True) -> None:
        """Read the policy file again (SIGHUP, or its status changed); a broken one keeps the last good policy."""
        identity = self._stat_policy()
        if not force and identity == self._policy_identity:
            return
        self._policy_identity = identity
        now = time.time()
        try:
            policy, stamp = read_policy(self.policy_path)
        except PolicyError as error:
            problem = "rollout policy %s %s" % (self.policy_path, error)
            with self._lock:
                if problem != self.policy_problem:
                    logger.error("%s; the last good policy stays in force, and no new release starts", problem)
                self.policy_problem = problem
            return
        with self._lock:
            if self.policy_problem is not None:
                logger.info("rollout policy %s is usable again", self.policy_path)
            self.policy_problem = None
            self._apply_policy(policy, stamp, now)
        logger.info("rollout policy %s read", self.policy_path)

    def _apply_policy(self, policy: RolloutPolicy, stamp: str, now: float) -> None:
        """Put the policy in force; a resume acts once per write of the file (remembered across restarts)."""
        self.policy = policy
        self._pin_warnings = set()
        if stamp != self._meta.get("policy_stamp"):
            self._set_meta("policy_stamp", stamp)
            clock = self._clocks.get(policy.resume) if policy.resume is not None else None
            if clock is not None and clock.halted_by_failures:
                self._set_clock(clock._replace(halted_by_failures=False, forgiven=clock.failures))
                logger.info("rollout: the automatic halt of VERSION %d is released (resume in the policy file); "
                            "its %d failure(s) so far no longer count", clock.version, clock.failures)
        self._synced = None
        self._sync(self.snapshot(), now)

    # The rollout thread ------------------------------------------------------------

    def start(self) -> None:
        """Follow the policy file, log progress, write the state."""
        self._thread = threading.Thread(target=self._loop, name="rollout", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Write what is left and close the state."""
        self._stopping.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(10)
        self.flush(everything=True)
        self.store.close()

    def _loop(self) -> None:
        next_tick = 0.0
        while not self._stopping.is_set():
            self._wake.wait(max(0.0, next_tick - time.monotonic()))
            self._wake.clear()
            try:
                if time.monotonic() >= next_tick:
                    next_tick = time.monotonic() + self.TICK_SECONDS
                    self.reload(force=False)
                    self.tick(time.time())
                self.flush()
            except Exception:  # pylint: disable=broad-except
                logger.exception("rollout: the rollout thread failed")

    def tick(self, now: float) -> None:
        """Start releases, log canaries done and each tenth of the fleet reached; forget long silent boxes."""
        snapshot = self.snapshot()
        with self._lock:
            self._sync(snapshot, now)
            latest = snapshot.latest
            clock = self._clocks.get(latest.version) if latest else None
            if latest is not None and clock is not None and clock.started:
                step = self._step(clock, now)
                logged = self._progress.setdefault(latest.version, step)    # progress before a restart is not news
                if step > logged:
                    self._progress[latest.version] = step
                    if logged < 0:
                        logger.info("rollout: %s: canaries done, the waves begin", latest.name)
                    if step > 0:
                        logger.info("rollout: %s reached %d%% of the fleet", latest.name, step * 10)
            if time.monotonic() - self._forget_checked >= 60:
                self._forget_checked = time.monotonic()
                horizon = now - self.FORGET_AFTER_SILENT * self.silent_after
                for record in [record for record in self._boxes.values() if record.last_seen < horizon]:
                    self._forget(record.box)

    def _step(self, clock: ReleaseClock, now: float) -> int:
        """-1 while only the canaries have the release, then the tenths of the fleet its waves reached."""
        elapsed = rollout_elapsed(clock, now)
        return -1 if elapsed < self.policy.canary_hours * 3600 else int(wave_share(self.policy, elapsed) * 10)

    def flush(self, everything: bool = False) -> bool:
        """Write what changed in one transaction; on failure log it once, say so on /, and try again later."""
        with self._lock:
            if everything or time.monotonic() - self._touch_written >= self.TOUCH_SECONDS:
                self._dirty |= self._touched
                self._touched = set()
                self._touch_written = time.monotonic()
            if not (self._dirty or self._forgotten or self._clocks_dirty or self._meta_dirty):
                return True
            boxes, self._dirty = self._dirty, set()
            forgotten, self._forgotten = self._forgotten, set()
            clocks, self._clocks_dirty = self._clocks_dirty, set()
            meta, self._meta_dirty = self._meta_dirty, set()
            rows = [self._boxes[box].row() for box in boxes if box in self._boxes]
            clock_rows = [self._clocks[version] for version in clocks]
            meta_rows = {key: self._meta[key] for key in meta}
        try:
            self.store.write(meta_rows, clock_rows, rows, sorted(forgotten))
        except (sqlite3.Error, OSError) as error:
            with self._lock:
                self._dirty |= boxes
                self._forgotten |= forgotten - set(self._boxes)
                self._clocks_dirty |= clocks
                self._meta_dirty |= meta
                if self.state_problem is None:
                    logger.error("rollout: the state %s cannot be written: %s; kept in memory, retrying",
                                 self.store.path, error)
                self.state_problem = "the rollout state cannot be written: %s" % error
            return False
        if self.state_problem is not None:
            logger.info("rollout: the state %s is written again", self.store.path)
            self.state_problem = None
        return True

    # What operators see ----------------------------------------------------------------

    def summary(self, snapshot: Snapshot, now: float) -> Dict[str, Any]:
        """The rollout of the newest release, as /fleet shows it."""
        latest = snapshot.latest
        with self._lock:
            self._sync(snapshot, now)     # a release seen here first starts here
            clock = self._clocks.get(latest.version) if latest else None
            policy, policy_problem = self.policy, self.policy_problem
        summary: Dict[str, Any] = {
            "release": latest.name if latest else None, "version": latest.version if latest else None,
            "started": clock.started if clock and clock.started else None, "eligible_share": 0.0,
            "canaries_done": False, "failures": clock.failures if clock else 0, "halted": False, "halt_reason": None}
        if latest is None:
            return summary
        if clock is None:
            summary.update(halted=True, halt_reason="not started: %s" % (policy_problem or "waiting for the policy"))
            return summary
        elapsed = rollout_elapsed(clock, now) if clock.started else float("inf")
        summary["eligible_share"] = round(wave_share(policy, elapsed), 4)
        summary["canaries_done"] = elapsed >= policy.canary_hours * 3600
        if clock.halted_since is not None:
            reasons = []
            if policy.halt:
                reasons.append("halt in the policy file")
            if clock.halted_by_failures:
                reasons.append("%d failure(s), halt_after_failures %d (release with \"resume\": %d)"
                               % (clock.failures - clock.forgiven, policy.halt_after_failures, clock.version))
            summary.update(halted=True, halt_reason="; ".join(reasons) or "halted")
        return summary

    def fleet(self, snapshot: Snapshot, now: float) -> Dict[str, Any]:
        """The /fleet document: the rollout, and every box known."""
        newest = snapshot.latest.version if snapshot.latest else None
        with self._lock:    # copied as tuples under the lock; requests wait for no sorting or JSON
            rows = [(record.box, record.box_id, record.address, record.first_seen, record.last_seen, record.reported,
                     record.offered, record.offered_version, record.downloaded(),
                     record.state(newest, self.silent_after, now)) for record in self._boxes.values()]
        rows.sort()
        keys = ("box", "id", "address", "first_seen", "last_seen", "reported_version", "offered", "offered_version",
                "downloaded", "state")
        return {"rollout": self.summary(snapshot, now), "boxes": [dict(zip(keys, row)) for row in rows]}

    def health_notes(self, snapshot: Snapshot, now: float) -> Tuple[bool, List[str]]:
        """(whether the state can be written, what / should say)."""
        notes = []
        summary = self.summary(snapshot, now)
        if summary["halted"]:
            notes.append("rollout of %s halted: %s" % (summary["release"], summary["halt_reason"]))
        if self.policy_problem:
            notes.append(self.policy_problem + "; the last good policy stays in force")
        if self.state_problem:
            notes.append(self.state_problem)
        return self.state_problem is None, notes

    def metric_families(self, snapshot: Snapshot, now: float) -> List["MetricFamily"]:
        """Boxes by reported VERSION (offered ones; else "other" or "unknown") and by state, the share, failures,
        halts: labels stay bounded whatever boxes send."""
        offered = {update.version for update in snapshot.updates}
        newest = snapshot.latest.version if snapshot.latest else None
        by_version: Dict[str, int] = {}
        by_state = {state: 0 for state in BOX_STATES}
        with self._lock:
            for record in self._boxes.values():
                label = ("unknown" if record.reported is None
                         else str(record.reported) if record.reported in offered else "other")
                by_version[label] = by_version.get(label, 0) + 1
                by_state[record.state(newest, self.silent_after, now)] += 1
            halts = self.halts
        summary = self.summary(snapshot, now)
        return [
            ("box_update_server_rollout_boxes", "gauge", "Boxes known, by the VERSION they report.",
             [({"version": label}, count) for label, count in sorted(by_version.items())]),
            ("box_update_server_rollout_box_states", "gauge", "Boxes known, by rollout state.",
             [({"state": state}, count) for state, count in sorted(by_state.items())]),
            ("box_update_server_rollout_eligible_share", "gauge",
             "Share of the fleet the newest release's waves have reached.", [({}, summary["eligible_share"])]),
            ("box_update_server_rollout_failures", "gauge", "Boxes that failed to install the newest release.",
             [({}, summary["failures"])]),
            ("box_update_server_rollout_halted", "gauge", "1 when the newest release's rollout is halted.",
             [({}, int(summary["halted"]))]),
            ("box_update_server_rollout_halts_total", "counter", "Rollout halts since the server started.",
             [({}, halts)]),
        ]


def folder_versions(updates_dir: str) -> List[int]:
    """The VERSIONs of the update archives in the folder now (what a new rollout state counts as rolled out)."""
    try:
        names = os.listdir(updates_dir)
    except OSError:
        return []
    return [int(digits) for digits in (version_digits(name) for name in names) if digits is not None]


def open_rollout(settings: Settings, snapshot: Callable[[], Snapshot]) -> Optional[Rollout]:
    """The rollout these settings ask for (None without a policy); SettingsError when it cannot be used."""
    if settings.rollout is None or settings.state_dir is None:
        return None
    store = FleetStore(settings.state_dir)
    try:
        return Rollout(settings.rollout, store, snapshot, folder_versions(settings.updates_dir),
                       settings.silent_after_hours, settings.max_boxes)
    except SettingsError:
        store.close()
        raise


# ---------------------------------------------------------------------------
# 6. HTTP rules (RFC 9110, RFC 9112), pure functions
# ---------------------------------------------------------------------------

class BadRequest(Exception):
    """A request that is answered with an error status, after which the connection is closed."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


class RequestHead(NamedTuple):
    """A parsed request line and header section."""
    method: str
    target: str
    version: str                  # "HTTP/1.0" or "HTTP/1.1"
    headers: Dict[str, str]       # lower-case names; a repeated field's values joined by ", " (RFC 9110 §5.3)
    keep_alive: bool              # whether the connection may carry another request after this one


_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")          # RFC 9110 §5.6.2
_HTTP_VERSION = re.compile(r"HTTP/([0-9])\.([0-9])")         # RFC 9112 §2.3
_INVALID_IN_FIELD_VALUE = re.compile(r"[\x00\r\n]")          # RFC 9110 §5.5
_HOST = re.compile(r"(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9._~!$&'()*+,;=%-]*)(:[0-9]*)?")   # RFC 3986 §3.2.2
# RFC 9110 §8.6, §14.1.1: guard against "potentially large decimal numerals": 20 digits hold any 64-bit number,
# and bounding them first keeps int() clear of CPython's 4,300-digit limit (sys.set_int_max_str_digits)
_CONTENT_LENGTH = re.compile(r"[0-9]{1,20}")
_HTTP_DATE = re.compile(                                           # RFC 9110 §5.6.7
    r"[A-Z][a-z]{2}, [0-9]{2} [A-Z][a-z]{2} [0-9]{4} [0-9]{2}:[0-9]{2}:[0-9]{2} GMT"       # IMF-fixdate
    r"|[A-Z][a-z]{5,8}, [0-9]{2}-[A-Z][a-z]{2}-[0-9]{2} [0-9]{2}:[0-9]{2}:[0-9]{2} GMT"    # obsolete RFC 850
    r"|[A-Z][a-z]{2} [A-Z][a-z]{2} [ 0-9][0-9] [0-9]{2}:[0-9]{2}:[0-9]{2} [0-9]{4}")      # obsolete asctime


def request_line_text(raw: bytes) -> str:
    """A request or header line without its line ending; a bare CR inside is invalid (RFC 9112 §2.2)."""
    text = raw[:-2] if raw.endswith(b"\r\n") else raw.rstrip(b"\n")
    if b"\r" in text:
        raise BadRequest(400, "bare CR in the request head")
    return text.decode("latin-1")


def parse_request_line(line: str) -> Tuple[str, str, str]:
    """method SP request-target SP HTTP-version (RFC 9112 §3); HTTP/1.x only, any minor read as 1.1."""
    parts = line.split(" ")
    if len(parts) != 3 or not all(parts):
        raise BadRequest(400, "malformed request line")
    method, target, version = parts
    match = _HTTP_VERSION.fullmatch(version)
    if not match or match.group(1) != "1":
        raise BadRequest(400, "unsupported HTTP version")   # HTTP/2 in text is malformed HTTP/1.1 (RFC 9113 §3)
    if not _TOKEN.fullmatch(method):
        raise BadRequest(400, "malformed method")
    return method, target, "HTTP/1.0" if match.group(2) == "0" else "HTTP/1.1"


def parse_header_fields(lines: Sequence[str]) -> Tuple[Dict[str, str], Dict[str, int]]:
    """The header section: values by lower-case name, and how often each name appeared.

    Strict as RFC 9112 §5 asks of a server: no whitespace between a field name and its
    colon (§5.1), no obsolete line folding (§5.2), no CR, LF or NUL in a value.
    """
    headers: Dict[str, str] = {}
    counts: Dict[str, int] = {}
    for line in lines:
        if line[:1] in (" ", "\t"):
            raise BadRequest(400, "obsolete line folding in a header")
        name, colon, value = line.partition(":")
        if not colon or not _TOKEN.fullmatch(name):
            raise BadRequest(400, "malformed header line")
        value = value.strip(" \t")
        if _INVALID_IN_FIELD_VALUE.search(value):
            raise BadRequest(400, "invalid character in a header value")
        name = name.lower()
        counts[name] = counts.get(name, 0) + 1
        headers[name] = value if name not in headers else headers[name] + ", " + value
    return headers, counts


def check_framing(version: str, headers: Mapping[str, str], counts: Mapping[str, int]) -> bool:
    """Whether the connection may be kept after answering; BadRequest when the message framing is unsafe.

    RFC 9112 §6.3: Transfer-Encoding with Content-Length, a repeated or invalid
    Content-Length, or chunked not the final coding are 400; a coding we do not read is
    501 (§6.1).  Request bodies are never read, so a request that has one ends its
    connection, as does an HTTP/1.0 request with Transfer-Encoding (§6.1).
    """
    if counts.get("host", 0) > 1 or (version == "HTTP/1.1" and "host" not in headers) \
            or not _HOST.fullmatch(headers.get("host", "")):
        raise BadRequest(400, "missing, repeated or invalid Host")   # RFC 9112 §3.2
    if "transfer-encoding" in headers:
        if "content-length" in headers:
            raise BadRequest(400, "both Transfer-Encoding and Content-Length")
        codings = [coding.strip(" \t").lower() for coding in headers["transfer-encoding"].split(",")]
        if not all(codings) or codings[-1] != "chunked":
            raise BadRequest(400, "chunked is not the final transfer coding")
        if len(codings) > 1:
            raise BadRequest(501, "transfer coding %s is not implemented" % codings[0])
        return False
    if "content-length" in headers:
        if counts["content-length"] > 1 or not _CONTENT_LENGTH.fullmatch(headers["content-length"]):
            raise BadRequest(400, "repeated or invalid Content-Length")
        if int(headers["content-length"]) > 0:
            return False
    options = {option.strip(" \t").lower() for option in headers.get("connection", "").split(",")}
    if "close" in options:                                         # RFC 9112 §9.3
        return False
    return version == "HTTP/1.1" or "keep-alive" in options


def request_head(method: str, target: str, version: str, header_lines: Sequence[str]) -> RequestHead:
    """The whole head, its request line parsed already: what the handler answers, or BadRequest."""
    headers, counts = parse_header_fields(header_lines)
    return RequestHead(method, target, version, headers, check_framing(version, headers, counts))


def request_path(target: str) -> str:
    """The path of a request target, without query or fragment (RFC 9112 §3.2)."""
    if target[:8].lower().startswith(("http://", "https://")):  # absolute-form, as sent to proxies
        try:
            target = urllib.parse.urlsplit(target).path or "/"
        except ValueError:
            return ""
    return target.split("?", 1)[0].split("#", 1)[0]


def parse_address(text: str) -> Optional[Address]:
    """An IP address as the socket or a forwarding header gives it; IPv4-mapped IPv6 reads as IPv4.

    A zone (fe80::1%eth0) is dropped; an IPv4 octet with a leading zero (010.0.0.1: octal to
    some parsers) is no address, whichever Python reads it.
    """
    text = text.strip().partition("%")[0]
    dotted = text.rpartition(":")[2]
    if "." in dotted and any(len(octet) > 1 and octet[0] == "0" for octet in dotted.split(".")):
        return None
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def in_networks(address: Optional[Address], networks: Sequence[Network]) -> bool:
    """Whether an address lies in one of the networks (None, not an address, never does)."""
    return address is not None and any(address in network for network in networks)


def client_group(address: Address, ipv6_prefix: int) -> str:
    """What max_connections_per_client counts as one client: an IPv4 address, or an IPv6 address's /64.

    A home or site is given a whole /64 or more (RFC 6177), so counting single IPv6
    addresses would give one of them 2**64 shares of the server.
    """
    if isinstance(address, ipaddress.IPv6Address):
        return str(ipaddress.IPv6Network((address, ipv6_prefix), strict=False))
    return str(address)


UNKNOWN_CLIENT = "unknown"      # RFC 7239 §6.2: the proxy does not know the client, or hides it (§6.3)

_PORT = r"(?::(?:[0-9]{1,5}|_[A-Za-z0-9._-]+))?"                             # RFC 7239 §6: node-port, obfport
_NODE = re.compile(r"\[([0-9A-Fa-f:.]+)\]" + _PORT                           # [2001:db8::1]:443
                   + r"|([0-9.]+)" + _PORT                                    # 203.0.113.7:51234
                   + r"|([0-9A-Fa-f.]*:[0-9A-Fa-f:.]*)")                      # 2001:db8::1, as nginx's $remote_addr
_FORWARDED_PAIR = re.compile(r'([^=,;" \t]+)=("(?:[^"\\]|\\.)*"|[^,;" \t]*)')        # RFC 7239 §4
# An element's pairs, then "," or the end; each space can be read one way only (linear time).
_FORWARDED_ELEMENT = re.compile(r"(?P<pairs>(?:%s)?(?:[ \t]*;(?:[ \t]*%s)?)*)[ \t]*(?P<end>,|$)"
                                % (_FORWARDED_PAIR.pattern, _FORWARDED_PAIR.pattern))
_QUOTED_PAIR = re.compile(r"\\(.)")


def node_address(node: str) -> Optional[Address]:
    """The address in a forwarded node (RFC 7239 §6), its port dropped; None for "unknown", "_hidden" or garbage."""
    match = _NODE.fullmatch(node)
    if match is None:
        return None
    bracketed, ipv4, bare = match.groups()
    if bracketed is not None and ":" not in bracketed:
        return None                     # brackets hold IPv6 only
    return parse_address(bracketed or ipv4 or bare)


def forwarded_for(headers: Mapping[str, str], header: str) -> List[str]:
    """The client nodes one forwarding header reports, nearest proxy last (empty list elements ignored).

    X-Forwarded-For is a comma-separated list, as nginx's $proxy_add_x_forwarded_for.  In
    Forwarded (RFC 7239 §4) each element is one hop: its "for" parameter, unquoted, or ""
    (no address) when it has none, repeats it, or cannot be parsed, so that no hop is skipped.
    """
    value = headers.get(header.lower(), "")
    if header.lower() != "forwarded":
        return [part.strip(" \t") for part in value.split(",") if part.strip(" \t")]
    nodes: List[str] = []
    position = 0
    while True:
        while value[position:position + 1] in (" ", "\t"):    # here, not in the pattern: linear time
            position += 1
        element = _FORWARDED_ELEMENT.match(value, position)
        if element is None:
            return nodes + [""]             # malformed: the rest is one hop that names no one
        pairs = _FORWARDED_PAIR.findall(element.group("pairs"))
        if pairs:
            found = [node for key, node in pairs if key.lower() == "for"]
            node = found[0] if len(found) == 1 else ""
            nodes.append(_QUOTED_PAIR.sub(r"\1", node[1:-1]) if node.startswith('"') else node)
        if not element.group("end"):
            return nodes
        position = element.end()


def client_behind_proxies(peer: str, headers: Mapping[str, str], trusted_proxies: Sequence[Network],
                          forwarded_header: str) -> str:
    """Who sent a request: the peer, or behind trusted proxies the right-most node they did not add.

    Only forwarded_header is read, the one the proxies write: any other is the client's own.
    A node that is no address ("unknown", "_hidden") is UNKNOWN_CLIENT, never the proxy.
    Forwarding headers from anyone else are ignored, so no client can choose its address.
    """
    client = parse_address(peer)
    if not in_networks(client, trusted_proxies):
        return peer
    for node in reversed(forwarded_for(headers, forwarded_header)):
        address = node_address(node)
        if address is None:
            return UNKNOWN_CLIENT
        client = address
        if not in_networks(address, trusted_proxies):
            break
    return str(client)


class RangeNotSatisfiable(Exception):
    """The Range header is well formed but selects nothing: answer 416."""


_BYTE_RANGE = re.compile(r"([0-9]{0,20})-([0-9]{0,20})")     # longer numbers: ignored as malformed (see above)
_ENTITY_TAG = re.compile(r'\s*(W/)?("[\x21\x23-\x7e\x80-\xff]*")\s*(?:,|$)')


def parse_range(header: str, size: int) -> Optional[Tuple[int, int]]:
    """The (first, last) byte positions one byte range selects (RFC 9110 §14.1.2).

    None means ignore the header and send the whole file (malformed, a number of
    over 20 digits, another unit, or several ranges); RangeNotSatisfiable means answer 416.
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
        if suffix == 0:
            raise RangeNotSatisfiable()
        return (max(size - suffix, 0), size - 1) if size else None   # an empty file: send it whole (§14.1.1)
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
    """Seconds since the epoch of an HTTP-date (RFC 9110 §5.6.7), or None when it is not exactly one.

    A list of dates, or anything else, is not a date: the condition is ignored (§13.1.3, §13.1.4).
    """
    if not _HTTP_DATE.fullmatch(header.strip()):
        return None
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


def check_if_unmodified_since(header: Optional[str], modified: Optional[int]) -> bool:
    """RFC 9110 §13.1.4: false (412) when the file changed after the date."""
    since = http_date(header) if header is not None else None
    return since is None or modified is None or modified <= since


def check_if_none_match(header: Optional[str], etag: str) -> bool:
    """RFC 9110 §13.1.2: false (304) when a listed tag matches weakly."""
    if header is None:
        return True
    if header.strip() == "*":
        return False
    tags = entity_tags(header) or []
    return not any(tag == etag for _, tag in tags)


def check_if_modified_since(header: Optional[str], modified: Optional[int]) -> bool:
    """RFC 9110 §13.1.3: false (304) when the file has not changed since the date."""
    since = http_date(header) if header is not None else None
    return since is None or modified is None or modified > since


def check_if_range(header: Optional[str], etag: str, modified: int) -> bool:
    """RFC 9110 §13.1.5: whether to honour Range (a strong ETag match or the exact date)."""
    if header is None:
        return True
    header = header.strip()
    if header.startswith(('"', "W/")):
        return header == etag
    return http_date(header) == modified


def evaluate_preconditions(headers: Mapping[str, str], etag: str, modified: Optional[int]) -> Optional[int]:
    """The status a GET or HEAD ends with before any body: 412, 304, or None to go on.

    The order is RFC 9110 §13.2.2's; header names are lower-case.
    """
    if "if-match" in headers:
        if not check_if_match(headers["if-match"], etag):
            return 412
    elif not check_if_unmodified_since(headers.get("if-unmodified-since"), modified):
        return 412
    if "if-none-match" in headers:
        if not check_if_none_match(headers["if-none-match"], etag):
            return 304
    elif not check_if_modified_since(headers.get("if-modified-since"), modified):
        return 304
    return None


class DownloadPlan(NamedTuple):
    """What a request for a file gets, decided before a byte is sent."""
    status: int                     # 200, 206, 304, 412 or 416
    first: int                      # the first byte of the body
    length: int                     # the body's length
    content_range: Optional[str]    # for 206 and 416


def plan_download(method: str, headers: Mapping[str, str], size: int, etag: str, modified: int) -> DownloadPlan:
    """Preconditions (RFC 9110 §13.2.2), then a single byte Range for GET only (§14.2), as Go's serveContent."""
    precondition = evaluate_preconditions(headers, etag, modified)
    if precondition is not None:
        return DownloadPlan(precondition, 0, 0, None)
    whole = DownloadPlan(200, 0, size, None)
    if method != "GET" or "range" not in headers or not check_if_range(headers.get("if-range"), etag, modified):
        return whole
    try:
        selected = parse_range(headers["range"], size)
    except RangeNotSatisfiable:
        return DownloadPlan(416, 0, 0, "bytes */%d" % size)
    if selected is None:
        return whole
    first, last = selected
    return DownloadPlan(206, first, last - first + 1, "bytes %d-%d/%d" % (first, last, size))


def content_etag(body: bytes) -> str:
    """A strong ETag for a small generated body: it changes exactly when the body does."""
    return '"%s"' % hashlib.sha256(body).hexdigest()[:20]


def repr_digest(sha256: bytes) -> str:
    """The Repr-Digest field value for a SHA-256 (RFC 9530 §3)."""
    return "sha-256=:%s:" % base64.b64encode(sha256).decode("ascii")


# Control characters (and the backslash that escapes them) as \xNN, so a
# request can neither forge a log line nor send terminal escape sequences.
_LOG_ESCAPES = {code: "\\x%02x" % code for code in list(range(0x20)) + list(range(0x7F, 0xA0))}
_LOG_ESCAPES[ord("\\")] = "\\\\"


def escape_for_log(text: str) -> str:
    """Text from a request, safe to write into a log line."""
    return text.translate(_LOG_ESCAPES)


@functools.lru_cache(maxsize=64)
def format_http_date(seconds: int) -> str:
    """An HTTP-date (RFC 9110 §5.6.7); cached, since Date changes once a second and Last-Modified rarely."""
    return email.utils.formatdate(seconds, usegmt=True)


# An update's name carries its VERSION, so the bytes under it never change (RFC 9111 §5.2.2.1, RFC 8246);
# everything else names "the newest" or "now" and is revalidated on every use.
CACHE_IMMUTABLE = "public, max-age=31536000, immutable"
CACHE_REVALIDATE = "no-cache"
CACHE_NEVER = "no-store"
CACHE_PER_BOX = "private, no-store"     # /latest under a rollout policy: one box's own answer (RFC 9111 §5.2.2.7)


class FileBody(NamedTuple):
    """An open update file an answer streams from; the protocol layer sends it and closes the descriptor."""
    descriptor: int
    first: int                      # the first byte to send
    length: int
    identity: FileIdentity          # what the file must still be between pieces
    name: str
    ended: Optional[Callable[[bool], None]] = None     # told, once sent, whether every byte went out


class Answer(NamedTuple):
    """What a route answers. answer_fields turns it into header fields, the same way for every route."""
    status: int
    route: str = "other"             # the metrics label
    body: bytes = b""
    content_type: Optional[str] = "text/plain"
    fields: Tuple[Tuple[str, str], ...] = ()
    cache: str = CACHE_REVALIDATE    # Cache-Control of a success or a 304; every error is CACHE_REVALIDATE
    file: Optional[FileBody] = None  # the body comes from this file instead


def text_answer(status: int, text: str, route: str = "other", fields: Sequence[Tuple[str, str]] = ()) -> Answer:
    """A short plain-text answer, such as an error."""
    return Answer(status, route, text.encode("utf-8"), fields=tuple(fields))


def cacheable_answer(headers: Mapping[str, str], body: bytes, content_type: str, cache: str, route: str) -> Answer:
    """A small body with an ETag, so a client or cache revalidates it with a 304 (RFC 9110 §13.1.2)."""
    etag = content_etag(body)
    status = evaluate_preconditions(headers, etag, None) or 200
    return Answer(status, route, body, content_type, (("ETag", etag),), cache)


# Metadata of the representation sent (RFC 9110 §8.8, RFC 9530, RFC 6266): only with its content, 200 or 206.
REPRESENTATION_FIELDS = frozenset(("ETag", "Last-Modified", "Repr-Digest", "Content-Disposition", "Accept-Ranges"))
# RFC 9110 §15.4.5: a 304 carries those of these a 200 would (with Cache-Control and Date), and nothing else,
# as Go's writeNotModified.
NOT_MODIFIED_FIELDS = frozenset(("ETag", "Vary", "Content-Location", "Expires"))


def cache_control(status: int, cache: str) -> str:
    """A success, redirect or 304 keeps its route's policy; an error is revalidated on every use, so no cache
    keeps a 404 or a 412 as if it were the update (RFC 9111 §4.2.2 allows heuristic freshness otherwise)."""
    return cache if status < 400 else CACHE_REVALIDATE


def answer_fields(answer: Answer) -> List[Tuple[str, str]]:
    """The header fields of an answer (Date, Server and Connection aside), chosen by its status in one place."""
    if answer.status == 304:
        fields = [(name, value) for name, value in answer.fields if name in NOT_MODIFIED_FIELDS]
    else:
        fields = [("Content-Type", answer.content_type)] if answer.content_type else []
        fields.append(("Content-Length", str(answer.file.length if answer.file is not None else len(answer.body))))
        fields += [(name, value) for name, value in answer.fields
                   if answer.status in (200, 206) or name not in REPRESENTATION_FIELDS]
    fields.append(("Cache-Control", cache_control(answer.status, answer.cache)))
    return fields


def raw_answer(answer: Answer) -> bytes:
    """A whole answer that closes its connection, for sockets that never reach a handler thread."""
    lines = ["HTTP/1.1 %d %s" % (answer.status, http.client.responses[answer.status])]
    lines += ["%s: %s" % field for field in answer_fields(answer)] + ["Connection: close"]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + answer.body


@contextlib.contextmanager
def tcp_corked(connection: socket.socket) -> Iterator[None]:
    """Send only full segments while a file streams out, as nginx's tcp_nopush does.

    Linux TCP_CORK holds partial segments even with TCP_NODELAY on; uncorking at the end
    sends the last one at once.
    """
    cork = getattr(socket, "TCP_CORK", None)
    if cork is None:
        yield
        return
    connection.setsockopt(socket.IPPROTO_TCP, cork, 1)
    try:
        yield
    finally:
        try:
            connection.setsockopt(socket.IPPROTO_TCP, cork, 0)
        except OSError:
            pass  # the client is gone


# ---------------------------------------------------------------------------
# 7. Metrics
# ---------------------------------------------------------------------------

SMALL_ROUTES = ("/", "/ls", "/latest", "/version")
DURATION_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class ConnectionCounts(NamedTuple):
    """The connection table's figures at one moment, as the metrics show them."""
    open: int
    accepted: int
    evicted: int
    refused: Mapping[str, int]      # by reason: "full" or "client"


class Metrics:
    """What requests did, counted under one lock (taken once per request, so no increment is lost).

    Labels stay bounded: routes are a fixed set, statuses are the few this server sends,
    and update names are counted only for offered updates.
    """

    def __init__(self) -> None:
        self.started = time.time()
        self._lock = threading.Lock()
        self.requests: Dict[Tuple[str, int], int] = {}
        self.response_bytes: Dict[str, int] = {}
        self.downloads: Dict[Tuple[str, str], int] = {}
        self.range_requests = 0
        self.durations = {route: [0] * (len(DURATION_BUCKETS) + 1) for route in SMALL_ROUTES}
        self.duration_sums = {route: 0.0 for route in SMALL_ROUTES}

    def count(self, route: str, status: int, body_bytes: int, seconds: float,
              download: Optional[Tuple[str, bool]], ranged: bool) -> None:
        """One finished request; download is (update name, every byte sent) for an update's body."""
        with self._lock:
            key = (route, status)
            self.requests[key] = self.requests.get(key, 0) + 1
            self.response_bytes[route] = self.response_bytes.get(route, 0) + body_bytes
            if download is not None:
                outcome = (download[0], "completed" if download[1] else "cut")
                self.downloads[outcome] = self.downloads.get(outcome, 0) + 1
            if ranged:
                self.range_requests += 1
            buckets = self.durations.get(route)
            if buckets is not None:
                buckets[bisect_left(DURATION_BUCKETS, seconds)] += 1
                self.duration_sums[route] += seconds

    def render(self, snapshot: Snapshot, connections: ConnectionCounts, checking_seconds: float,
               extra: Sequence[MetricFamily] = ()) -> bytes:
        """The Prometheus text exposition format 0.0.4; extra families (the rollout's) at the end."""
        out = MetricsWriter()
        with self._lock:
            out.family("box_update_server_requests_total", "counter", "HTTP requests answered, by route and status.",
                       [({"route": route, "status": str(status)}, count)
                        for (route, status), count in sorted(self.requests.items())])
            out.family("box_update_server_response_bytes_total", "counter",
                       "Response body bytes sent, by route.",
                       [({"route": route}, count) for route, count in sorted(self.response_bytes.items())])
            out.family("box_update_server_update_downloads_total", "counter",
                       "Update downloads (200 or 206 GET), completed (every byte sent) or cut short.",
                       [({"update": name, "outcome": outcome}, count)
                        for (name, outcome), count in sorted(self.downloads.items())])
            out.family("box_update_server_range_requests_total", "counter",
                       "Update downloads answered with a byte range (206).", [({}, self.range_requests)])
            out.histogram("box_update_server_request_duration_seconds",
                          "Time to answer the small routes, from the request head to the last byte.",
                          self.durations, self.duration_sums)
        out.family("box_update_server_connections_open", "gauge", "Connections open now.",
                   [({}, connections.open)])
        out.family("box_update_server_connections_accepted_total", "counter", "Connections given a slot.",
                   [({}, connections.accepted)])
        out.family("box_update_server_connections_refused_total", "counter",
                   "Connections refused with 503 (server full, or too many from one client).",
                   [({"reason": reason}, count) for reason, count in sorted(connections.refused.items())])
        out.family("box_update_server_connections_evicted_total", "counter",
                   "Idle or stalled connections closed to make room for a new one.", [({}, connections.evicted)])
        latest = snapshot.latest
        for name, help_text, value in (
                ("updates_offered", "Updates offered to boxes.", len(snapshot.updates)),
                ("updates_rejected", "Files in the updates folder rejected by the checks.", snapshot.rejected),
                ("updates_waiting", "Files in the updates folder waiting to be checked.", snapshot.waiting),
                ("updates_unsigned", "Archives waiting for their signature.", snapshot.unsigned),
                ("latest_version", "VERSION of the newest offered update (0: none).", latest.version if latest else 0),
                ("updates_folder_ok", "1 when the updates folder can be read, else 0.", int(snapshot.problem is None)),
                ("folder_unchanged_seconds", "Seconds since the updates folder last changed.",
                 round(time.time() - snapshot.changed_at, 3))):
            out.family("box_update_server_" + name, "gauge", help_text, [({}, value)])
        out.family("box_update_server_check_seconds_total", "counter", "Seconds spent checking archives.",
                   [({}, round(checking_seconds, 6))])
        out.family("process_start_time_seconds", "gauge", "Start time of the process since the epoch, in seconds.",
                   [({}, round(self.started, 3))])
        out.family("box_update_server_build_info", "gauge", "This server's version and the Python running it.",
                   [({"version": __version__, "python": "%d.%d.%d" % sys.version_info[:3]}, 1)])
        for name, kind, help_text, samples in extra:
            out.family(name, kind, help_text, samples)
        return out.text().encode("utf-8")


class MetricsWriter:
    """Lines of the Prometheus text format: HELP and TYPE, then one sample a line."""

    def __init__(self) -> None:
        self.lines: List[str] = []

    def family(self, name: str, kind: str, help_text: str,
               samples: Iterable[Tuple[Mapping[str, str], Union[int, float]]]) -> None:
        """A metric family: its HELP and TYPE lines, then its samples."""
        self.lines += ["# HELP %s %s" % (name, help_text), "# TYPE %s %s" % (name, kind)]
        for labels, value in samples:
            self.sample(name, labels, value)

    def histogram(self, name: str, help_text: str, buckets: Mapping[str, List[int]],
                  sums: Mapping[str, float]) -> None:
        """A histogram by route: cumulative buckets up to +Inf, then _sum and _count."""
        self.lines += ["# HELP %s %s" % (name, help_text), "# TYPE %s histogram" % name]
        for route in sorted(buckets):
            cumulative = 0
            for bound, count in zip(DURATION_BUCKETS + (float("inf"),), buckets[route]):
                cumulative += count
                self.sample(name + "_bucket", {"route": route, "le": "+Inf" if bound == float("inf") else repr(bound)},
                            cumulative)
            self.sample(name + "_sum", {"route": route}, round(sums[route], 6))
            self.sample(name + "_count", {"route": route}, cumulative)

    def sample(self, name: str, labels: Mapping[str, str], value: Union[int, float]) -> None:
        """One sample line; label values escaped as the format asks."""
        text = ",".join('%s="%s"' % (key, label.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n"))
                        for key, label in labels.items())
        self.lines.append("%s{%s} %s" % (name, text, value) if text else "%s %s" % (name, value))

    def text(self) -> str:
        """The whole exposition, ending in a newline."""
        return "\n".join(self.lines) + "\n"


# ---------------------------------------------------------------------------
# 8. HTTP/1.1 connections: the protocol layer
# ---------------------------------------------------------------------------
# Reads request heads under their deadlines, frames answers, writes every answer through
# send_answer, logs one access line a request.  What a request means is the routes' business.

def set_socket_timeout(connection: socket.socket, option: int, seconds: float) -> None:
    """SO_RCVTIMEO or SO_SNDTIMEO: a blocking socket whose calls give up after seconds.

    Unlike socket.settimeout, which makes Python poll() before every recv and send, this
    costs nothing per call: a request is one recv and one send, and waits for the GIL
    twice instead of four times (which matters with a thousand connections).
    """
    whole = int(seconds)
    # A zero timeval means "no timeout": RequestReader's head deadline passes what remains of it, which can be
    # under a microsecond, so the clamp to 1 is what ends such a read (tests: SocketTimeoutTest).
    micro = max(1, int((seconds - whole) * 1e6)) if seconds < 1 else int((seconds - whole) * 1e6)
    connection.setsockopt(socket.SOL_SOCKET, option, struct.pack("ll", whole, micro))


class RequestReader(io.RawIOBase):
    """A connection's incoming bytes under two clocks, as nginx's keepalive and client_header timeouts.

    Waiting for a request to begin, each read may take idle_timeout.  Once its first
    byte has arrived, the whole head must arrive by one deadline, however it trickles.
    """

    def __init__(self, connection: socket.socket, idle_timeout: float, head_timeout: float) -> None:
        super().__init__()
        self.connection = connection
        self.idle_timeout = idle_timeout
        self.head_timeout = head_timeout
        self.deadline: Optional[float] = None
        self.head_started: Optional[float] = None    # when the current request's first byte arrived
        self.in_head = False
        self._timeout = idle_timeout
        set_socket_timeout(connection, socket.SO_RCVTIMEO, idle_timeout)

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        if self.deadline is not None:
            remaining = self.deadline - time.monotonic()
            if remaining <= 0:
                raise socket.timeout("the request head took longer than %g s" % self.head_timeout)
            self._set_timeout(min(remaining, self.idle_timeout))
        try:
            received = self.connection.recv_into(buffer)
        except BlockingIOError:      # SO_RCVTIMEO passed
            raise socket.timeout("no bytes for %g s" % self._timeout) from None
        if received and self.in_head and self.deadline is None:
            self.head_started = time.monotonic()
            self.deadline = self.head_started + self.head_timeout
        return received

    def await_request(self) -> None:
        """Between requests: the next byte starts the head deadline, and the request's clock."""
        self.in_head, self.deadline, self.head_started = True, None, None

    def head_begun(self) -> None:
        """The request line is here (maybe from the buffer, pipelined): the deadline runs from now at the latest."""
        if self.deadline is None:
            self.head_started = time.monotonic()
            self.deadline = self.head_started + self.head_timeout

    def head_complete(self) -> None:
        """The whole head is here: back to idle_timeout for the reads to come."""
        self.in_head, self.deadline = False, None
        self._set_timeout(self.idle_timeout)

    def _set_timeout(self, seconds: float) -> None:
        if seconds != self._timeout:
            set_socket_timeout(self.connection, socket.SO_RCVTIMEO, seconds)
            self._timeout = seconds


class DownloadCut(Exception):
    """A download ended before its last byte: the file changed, the client stopped reading or went away,
    or the server stopped."""


SIOCOUTQNSD = 0x894B     # Linux: bytes queued on a socket and not yet sent at all


def unsent_bytes(connection: socket.socket, in_flight: bool = True) -> int:
    """Bytes the kernel still holds for the client: not yet acknowledged (SIOCOUTQ), or with in_flight false
    not yet sent (SIOCOUTQNSD); 0 where that cannot be asked."""
    request = termios.TIOCOUTQ if in_flight else SIOCOUTQNSD
    try:
        return int(struct.unpack("i", fcntl.ioctl(connection.fileno(), request, b"\0\0\0\0"))[0])
    except (OSError, AttributeError):
        return 0


def abort_connection(connection: socket.socket) -> None:
    """Close with a reset (SO_LINGER 0, as nginx's reset_timedout_connection): nothing queued is sent after,
    and the kernel frees at once what a stalled client held."""
    try:
        connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass


class Request(NamedTuple):
    """A request as the routes see it."""
    method: str
    path: str                       # the target's path, without its query
    headers: Mapping[str, str]      # lower-case names
    client: str                     # the client's address, behind trusted proxies


class ProtocolContext(NamedTuple):
    """What the protocol layer needs from the server, handed to every connection."""
    idle_timeout: float
    head_timeout: float
    trusted_proxies: Tuple[Network, ...]
    forwarded_header: str
    connections: "ConnectionTable"
    access_log: "AccessLog"
    metrics: Metrics
    stopping: Callable[[], bool]     # true once a graceful stop began: each answer is the connection's last


class ConnectionHandler(http.server.BaseHTTPRequestHandler):
    """One connection: strict HTTP/1.1 heads in (RFC 9112), answers out through send_answer, an access line each.

    Writing the status line, Server and Date is http.server's (send_response); what a
    request means is respond's, a function from Request to Answer.  Per-request state is
    set in handle_one_request, as BaseHTTPRequestHandler does for its own.
    """
    # pylint: disable=attribute-defined-outside-init,too-many-instance-attributes

    server_version = "BoxUpdateServer/" + __version__
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True
    wbufsize = 1 << 16           # headers and small bodies leave in one send
    max_request_line = 8192      # longer: 414
    max_head_bytes = 32768       # the request line and header section together; more: 431
    max_header_fields = 100      # more: 431
    copy_chunk = 8 << 20         # bytes per sendfile call between checks that the file is unchanged
    min_send_rate = 1024         # bytes a second a download must average over idle_timeout, or it is cut

    def __init__(self, request: socket.socket, client_address: Any, server: socketserver.BaseServer,
                 context: ProtocolContext, respond: Callable[[Request], Answer]) -> None:
        self.context = context
        self.respond = respond
        super().__init__(request, client_address, server)

    def setup(self) -> None:
        """StreamRequestHandler's setup, reading through a RequestReader."""
        self.connection = self.request
        context = self.context
        self.reader = RequestReader(self.connection, context.idle_timeout, context.head_timeout)
        self.rfile = io.BufferedReader(self.reader)
        self.wfile = self.connection.makefile("wb", self.wbufsize)
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        set_socket_timeout(self.connection, socket.SO_SNDTIMEO, context.idle_timeout)
        self.peer = str(parse_address(self.client_address[0]) or self.client_address[0])
        self.slot = context.connections.slot_of(self.connection)

    # One request, from its first byte to its access line ---------------------

    def handle_one_request(self) -> None:
        """Read a request head, answer it, log it; a client that stalls or goes away just ends the connection."""
        self.started = time.monotonic()
        self.status: Optional[int] = None
        self.bytes_sent = 0
        self.command, self.path, self.request_version, self.requestline = "", "", "HTTP/1.0", ""
        self.raw_requestline = b""
        self.client = self.peer
        self.route_label = "other"
        self.download: Optional[Tuple[str, bool]] = None
        self.ranged = False
        self.cut: Optional[str] = None
        try:
            head = self.read_request_head()
            if head is None:
                self.close_connection = True
                return
            self.slot.begin_request()
            answer: Optional[Answer] = None
            try:
                answer = self.respond(self.request_from(head))
                self.send_answer(answer)
                self.wfile.flush()
            finally:
                self.slot.end_request()
                if answer is not None and answer.file is not None:
                    os.close(answer.file.descriptor)
        except BadRequest as error:
            self.answer_error(error.status, error.reason)
        except socket.timeout:
            if self.reader.deadline is not None:     # a head began but did not arrive in time
                self.answer_error(408, "Request timeout.")
            self.close_connection = True
        except DownloadCut as cut:
            self.cut = str(cut)
            self.close_connection = True
            abort_connection(self.connection)
        except (ConnectionError, BlockingIOError):   # BlockingIOError: SO_SNDTIMEO passed
            self.close_connection = True
        except Exception:  # pylint: disable=broad-except
            logger.exception("error while answering %s", escape_for_log(self.requestline))
            self.answer_error(500, "Internal server error.")
        finally:
            if self.status is not None:
                self.log_access()

    def read_request_head(self) -> Optional[RequestHead]:
        """The next request's head, within the limits; None when the client closed between requests."""
        self.reader.await_request()
        line = self.rfile.readline(self.max_request_line + 1)
        if line in (b"\r\n", b"\n"):       # one empty line before a request is ignored (RFC 9112 §2.2)
            line = self.rfile.readline(self.max_request_line + 1)
        if not line.endswith(b"\n") and len(line) <= self.max_request_line:
            return None                    # closed, maybe half-way through a line
        self.reader.head_begun()
        self.raw_requestline = line
        if len(line) > self.max_request_line:
            raise BadRequest(414, "URI too long.")
        self.requestline = request_line_text(line)
        self.command, self.path, self.request_version = parse_request_line(self.requestline)
        fields: List[str] = []
        size = len(line)
        while True:
            field = self.rfile.readline(self.max_head_bytes + 1 - size)
            size += len(field)
            if size > self.max_head_bytes:
                raise BadRequest(431, "Request header fields too large.")
            if not field.endswith(b"\n"):
                raise ConnectionResetError(errno.ECONNRESET, "closed during the request head")
            if field in (b"\r\n", b"\n"):
                break
            fields.append(request_line_text(field))
            if len(fields) > self.max_header_fields:
                raise BadRequest(431, "Too many header fields.")
        self.reader.head_complete()
        return request_head(self.command, self.path, self.request_version, fields)

    def request_from(self, head: RequestHead) -> Request:
        """The request the routes see: its client judged behind trusted proxies."""
        self.close_connection = not head.keep_alive or self.context.stopping()   # stopping: this is the last
        if self.slot.trusted:
            self.client = client_behind_proxies(self.peer, head.headers, self.context.trusted_proxies,
                                                self.context.forwarded_header)
        return Request(head.method, request_path(head.target), head.headers, self.client)

    # Writing answers: every answer takes this one path, GET and HEAD alike --

    def send_answer(self, answer: Answer) -> None:
        """The status line, the fields answer_fields chooses, then the body (none for HEAD or 304).

        A file body takes one of max_downloads first, so slow downloads never hold every
        slot: the rest are kept for short answers such as OPQ Health's.
        """
        if answer.file is not None and not self.slot.begin_download():
            answer = text_answer(503, "Too many downloads at once; try again in a few seconds.", answer.route,
                                 (("Retry-After", "5"),))
        self.route_label = answer.route
        self.send_response(answer.status)
        for name, value in answer_fields(answer):
            self.send_header(name, value)
        self.end_headers()
        if self.command == "HEAD" or answer.status == 304:
            return
        if answer.file is None:
            self.wfile.write(answer.body)
            self.bytes_sent += len(answer.body)
            return
        self.ranged = answer.status == 206
        self.download = (answer.file.name, False)
        try:
            with tcp_corked(self.connection):   # headers and body in full segments, as nginx's tcp_nopush
                self.wfile.flush()
                self.send_file_body(answer.file)
            self.download = (answer.file.name, True)
        finally:
            if answer.file.ended is not None:
                answer.file.ended(self.download[1])

    def send_file_body(self, body: FileBody) -> None:
        """sendfile(2) the body, looking between copy_chunk pieces that the file is unchanged.

        (After the last piece there is nothing left to protect: the client has every byte.)
        Cut (DownloadCut: the connection is reset) when the file changes, the client goes,
        the server stops, or when over a window of idle_timeout the client takes fewer than
        min_send_rate bytes a second: a slow download is never cut, a stalled one is.
        bytes_sent counts what left for the client, never less than it received.
        """
        target, source, count = self.connection.fileno(), body.descriptor, body.length
        idle_timeout = self.context.idle_timeout
        sent, checked_up_to = 0, 0
        window_start, window_sent = time.monotonic(), 0
        try:
            while sent < count:
                piece = min(count - sent, checked_up_to + self.copy_chunk - sent)
                try:        # blocks until the piece is out, or SO_SNDTIMEO (idle_timeout) passes
                    done: Optional[int] = os.sendfile(target, source, body.first + sent, piece)
                except BlockingIOError:
                    done = None         # nothing went out for idle_timeout
                except OSError as error:
                    raise DownloadCut("the server stopped" if self.context.stopping()
                                      else "the client went away (%s)" % (error.strerror or error)) from None
                if done == 0:
                    raise DownloadCut("the file changed")       # it ends before the size it had
                sent += done or 0
                if sent < count and sent - checked_up_to >= self.copy_chunk:     # more to come: still the same?
                    if FileIdentity.from_stat(os.fstat(source)) != body.identity:
                        raise DownloadCut("the file changed")
                    checked_up_to = sent
                now = time.monotonic()
                if now - window_start >= idle_timeout:      # slow is fine, stalled is not
                    delivered = sent - unsent_bytes(self.connection)
                    if delivered - window_sent < self.min_send_rate * (now - window_start):
                        raise DownloadCut("the client took %d bytes in %.0f s"
                                          % (delivered - window_sent, now - window_start))
                    window_start, window_sent = now, delivered
        except DownloadCut as cut:
            # Reset right after this: what is not sent yet never will be, what is in flight may arrive.
            sent -= unsent_bytes(self.connection, in_flight=False)
            raise DownloadCut("cut after %d of %d bytes: %s" % (sent, count, cut)) from None
        finally:
            self.bytes_sent += sent

    def end_headers(self) -> None:
        """Say when the connection ends after this answer, and keep-alive to an HTTP/1.0 client that asked."""
        if self.close_connection:
            self.send_header("Connection", "close")
        elif self.request_version == "HTTP/1.0":
            self.send_header("Connection", "keep-alive")
        super().end_headers()

    def answer_error(self, status: int, reason: str) -> None:
        """A request that cannot be answered as asked: a plain answer if nothing was sent yet, then the close."""
        self.close_connection = True
        if self.status is not None:      # part of an answer is out: only closing is left
            return
        try:
            self.send_answer(text_answer(status, reason if reason.endswith(".")
                                         else reason[:1].upper() + reason[1:] + "."))
            self.wfile.flush()
        except OSError:
            pass

    # Logging ---------------------------------------------------------------

    def date_time_string(self, timestamp: Optional[float] = None) -> str:
        """The Date header, formatted once a second rather than once a request."""
        return format_http_date(int(time.time() if timestamp is None else timestamp))

    def log_request(self, code: Union[int, str] = "-", size: Union[int, str] = "-") -> None:
        """Called by send_response: remember the status; log_access writes the line once the body is out."""
        self.status = int(code)

    def log_access(self) -> None:
        """client "METHOD path" status body-bytes duration [cut ...], and the same request in the metrics.

        The duration runs from the head's first byte to the answer's last, not from the wait before it.
        """
        seconds = time.monotonic() - (self.reader.head_started or self.started)
        if self.command:
            request = "%s %s" % (self.command, self.path)
        else:
            request = self.raw_requestline.rstrip(b"\r\n").decode("latin-1")
        status = self.status or 0
        self.context.access_log.write('%s "%s" %d %d %.1fms%s' % (
            self.client, escape_for_log(request), status, self.bytes_sent, seconds * 1000,
            " " + self.cut if self.cut else ""))
        self.context.metrics.count(self.route_label, status, self.bytes_sent, seconds, self.download, self.ranged)


# ---------------------------------------------------------------------------
# 9. Routes: the application
# ---------------------------------------------------------------------------

NOT_FOUND = "Resource not found."
NO_UPDATES = "Update dir does not contain any valid updates."


class UpdateRoutes:
    """What each route answers: /, /ls, /latest, /version, /metrics, /fleet and /update/<name>[.sha256|.sig].

    One instance serves every connection; each route is a function of the request and the
    catalog's snapshot, for GET and HEAD alike (the protocol layer leaves HEAD's body out).
    """

    def __init__(self, settings: Settings, catalog: Catalog, metrics: Metrics,
                 connection_counts: Callable[[], "ConnectionCounts"], rollout: Optional[Rollout] = None) -> None:
        self.settings = settings
        self.catalog = catalog
        self.metrics = metrics
        self.connection_counts = connection_counts
        self.rollout = rollout

    def respond(self, request: Request) -> Answer:
        """The table of contents."""
        if request.method not in ("GET", "HEAD"):
            return text_answer(405, "Method not allowed.", fields=(("Allow", "GET, HEAD"),))
        path = request.path
        if path == "/":
            return self.health()
        if path == "/ls":
            return self.listing(request)
        if path == "/latest":
            return self.latest(request)
        if path == "/version":
            return self.version(request)
        if path == "/metrics":
            return self.prometheus_metrics(request)
        if path == "/fleet":
            return self.fleet(request)
        if path == "/status":
            return self.status(request)
        if path.startswith("/update/") and path.endswith(".sha256"):
            return self.checksum(request, path[len("/update/"):-len(".sha256")])
        if path.startswith("/update/") and path.endswith(SIGNATURE_SUFFIX):
            return self.signature(request, path[len("/update/"):-len(SIGNATURE_SUFFIX)])
        if path.startswith("/update/"):
            return self.download(request, path[len("/update/"):])
        return text_answer(404, NOT_FOUND)

    def health(self) -> Answer:
        """The OPQ Health answer: still 200 when unhealthy, so the JSON says why."""
        snapshot = self.catalog.snapshot
        health: Dict[str, object] = {"name": "Box Update Server", "ok": not (snapshot.problem or snapshot.keys_problem),
                                     "timestamp": int(time.time()), "subcomponents": []}
        notes = [problem for problem in (snapshot.problem, snapshot.keys_problem) if problem]
        if not snapshot.first_look_done:
            notes.append("checking the updates folder")
        if snapshot.signatures_required:
            notes.append("signatures required")
        if snapshot.rejected:
            notes.append("%d file(s) in the updates folder rejected, see the log" % snapshot.rejected)
        if snapshot.unsigned:
            notes.append("%d update(s) waiting for a signature" % snapshot.unsigned)
        if snapshot.waiting:
            notes.append("%d file(s) waiting to be checked" % snapshot.waiting)
        if self.rollout is not None:
            state_ok, rollout_notes = self.rollout.health_notes(snapshot, time.time())
            health["ok"] = health["ok"] and state_ok
            notes += rollout_notes
        if notes:
            health["info"] = "; ".join(notes)
        return Answer(200, "/", json.dumps(health).encode("utf-8"), "application/json")

    def listing(self, request: Request) -> Answer:
        """/ls: offered names, oldest first, one a line, no trailing newline."""
        return cacheable_answer(request.headers, self.catalog.snapshot.listing, "text/plain", CACHE_REVALIDATE,
                                "/ls")

    def latest(self, request: Request) -> Answer:
        """303 to the newest update, relative so it also works under a proxy's path prefix; under a rollout
        policy, to the update the policy gives this box, an answer no cache may give another."""
        snapshot = self.catalog.snapshot
        if self.rollout is None:
            latest, cache = snapshot.latest, CACHE_REVALIDATE
        else:
            latest = self.rollout.answer_latest(snapshot, read_box_headers(request.headers), request.client)
            cache = CACHE_PER_BOX
        if latest is None:
            return text_answer(404, NOT_FOUND, "/latest") if snapshot.first_look_done else not_yet_answer("/latest")
        return Answer(303, "/latest", fields=(("Location", "update/" + latest.name),), cache=cache)

    def version(self, request: Request) -> Answer:
        """/version: the newest VERSION as text."""
        snapshot = self.catalog.snapshot
        latest = snapshot.latest
        if latest is None:
            return text_answer(404, NO_UPDATES, "/version") if snapshot.first_look_done else not_yet_answer("/version")
        return cacheable_answer(request.headers, str(latest.version).encode("ascii"), "text/plain", CACHE_REVALIDATE,
                                "/version")

    def prometheus_metrics(self, request: Request) -> Answer:
        """Prometheus metrics, for the addresses metrics_allow lists (judged on the client, not the proxy)."""
        if not in_networks(parse_address(request.client), self.settings.metrics_allow):
            return text_answer(404, NOT_FOUND, "/metrics")
        snapshot = self.catalog.snapshot
        extra = self.rollout.metric_families(snapshot, time.time()) if self.rollout is not None else []
        body = self.metrics.render(snapshot, self.connection_counts(), self.catalog.checking_seconds, extra)
        return Answer(200, "/metrics", body, "text/plain; version=0.0.4; charset=utf-8", cache=CACHE_NEVER)

    def fleet(self, request: Request) -> Answer:
        """/fleet: the rollout and every box known, as JSON, for the addresses metrics_allow lists."""
        if self.rollout is None or not in_networks(parse_address(request.client), self.settings.metrics_allow):
            return text_answer(404, NOT_FOUND, "/fleet")
        body = json.dumps(self.rollout.fleet(self.catalog.snapshot, time.time())).encode("utf-8")
        return Answer(200, "/fleet", body, "application/json", cache=CACHE_NEVER)

    def status(self, request: Request) -> Answer:
        """Every file in the updates folder with its verdict and why, for the addresses metrics_allow lists."""
        if not in_networks(parse_address(request.client), self.settings.metrics_allow):
            return text_answer(404, NOT_FOUND, "/status")
        body = json.dumps(self.catalog.report(), indent=1).encode("utf-8")
        return Answer(200, "/status", body, "application/json", cache=CACHE_NEVER)

    def checksum(self, request: Request, encoded_name: str) -> Answer:
        """``<hex>  <name>``, the format ``sha256sum -c`` reads."""
        update = resolve_update(self.catalog.snapshot, encoded_name)
        if update is None:
            return text_answer(404, NOT_FOUND, "/update.sha256")
        if update.sha256 is None:
            return text_answer(503, "Checksum not computed yet.", "/update.sha256", (("Retry-After", "1"),))
        body = ("%s  %s\n" % (update.sha256.hex(), update.name)).encode("ascii")
        return cacheable_answer(request.headers, body, "text/plain", CACHE_IMMUTABLE, "/update.sha256")

    def signature(self, request: Request, encoded_name: str) -> Answer:
        """The armored OpenSSH signature of an offered update, as ``ssh-keygen -Y verify -s`` reads it."""
        update = resolve_update(self.catalog.snapshot, encoded_name)
        if update is None or update.signature is None:
            return text_answer(404, NOT_FOUND, "/update.sig")
        return cacheable_answer(request.headers, update.signature, "text/plain", CACHE_IMMUTABLE, "/update.sig")

    def download(self, request: Request, encoded_name: str) -> Answer:
        """/update/<name>: an offered update's bytes, whole or a range; only the bytes that were checked."""
        update = resolve_update(self.catalog.snapshot, encoded_name)
        if update is None:
            return text_answer(404, NOT_FOUND, "/update")
        try:
            descriptor, status = open_regular(update.path)
        except OSError:             # removed since the last look
            self.catalog.suspect(update.name)
            return text_answer(404, NOT_FOUND, "/update")
        answer = None
        try:
            identity = FileIdentity.from_stat(status)
            if identity != update.identity:
                self.catalog.suspect(update.name)
                if update.checked:
                    return text_answer(404, NOT_FOUND, "/update")     # not the file that was checked
            answer = download_answer(request, update, identity, descriptor)
            if self.rollout is not None and answer.file is not None:
                answer = answer._replace(file=answer.file._replace(ended=functools.partial(
                    self.download_ended, request, update, answer.file.first + answer.file.length == identity.size)))
            return answer
        finally:
            if answer is None or answer.file is None:     # otherwise the protocol layer closes it once sent
                os.close(descriptor)

    def download_ended(self, request: Request, update: Update, to_the_end: bool, every_byte: bool) -> None:
        """The rollout notes who downloaded what: completely when every byte up to the file's end went out."""
        if self.rollout is not None and request.method == "GET":
            self.rollout.record_download(read_box_headers(request.headers), request.client, update,
                                         to_the_end and every_byte)


def not_yet_answer(route: str) -> Answer:
    """Nothing is offered yet because the first look at the folder is under way: ask again, not "none"."""
    return text_answer(503, "Checking the updates folder; ask again shortly.", route, (("Retry-After", "1"),))


def download_answer(request: Request, update: Update, identity: FileIdentity, descriptor: int) -> Answer:
    """An update file's answer: preconditions, then Range (plan_download), its fields, and the bytes to send."""
    plan = plan_download(request.method, request.headers, identity.size, identity.etag, identity.modified)
    fields = [("ETag", identity.etag), ("Last-Modified", format_http_date(identity.modified)),
              ("Content-Disposition", 'attachment; filename="%s"' % update.name), ("Accept-Ranges", "bytes")]
    if update.sha256 and identity == update.identity:
        fields.append(("Repr-Digest", repr_digest(update.sha256)))
    if plan.content_range:
        fields.append(("Content-Range", plan.content_range))
    if plan.status in (200, 206):
        return Answer(plan.status, "/update", b"", "application/octet-stream", tuple(fields), CACHE_IMMUTABLE,
                      FileBody(descriptor, plan.first, plan.length, identity, update.name))
    text = {304: "", 412: "Precondition failed.", 416: "Range not satisfiable."}[plan.status]
    return Answer(plan.status, "/update", text.encode("ascii"), "text/plain", tuple(fields), CACHE_IMMUTABLE)


# ---------------------------------------------------------------------------
# 10. Server
# ---------------------------------------------------------------------------

REFUSALS = {
    "full": raw_answer(text_answer(503, "Server busy.", fields=(("Retry-After", "5"),))),
    "client": raw_answer(text_answer(503, "Too many connections from your address.", fields=(("Retry-After", "5"),))),
}


class Slot:
    """One admitted connection, as the ConnectionTable sees it.

    Its thread (a request beginning) and the accept thread (evicting it) decide under the
    slot's own lock, so the hand-over holds without the GIL (CPython 3.13's free-threaded
    build has none): an uncontended lock, 0.1 to 0.15 us more a request, where the
    ConnectionTable's lock would make every request wait on the others.
    """
    __slots__ = ("connection", "client", "trusted", "busy", "waiting_since", "served", "evicted", "downloading",
                 "table", "lock")

    def __init__(self, connection: socket.socket, client: str, trusted: bool,
                 table: Optional["ConnectionTable"] = None) -> None:
        self.connection = connection
        self.client = client
        self.trusted = trusted            # a trusted proxy: exempt from the per-client cap
        self.busy = False                 # a request is being answered
        self.waiting_since = time.monotonic()
        self.served = False               # answered a request before: now an idle keep-alive connection
        self.evicted = False
        self.downloading = False          # holds one of the table's max_downloads (only its own thread writes it)
        self.table = table
        self.lock = threading.Lock()

    def begin_request(self) -> None:
        """A request from its head to its last byte: its connection is not evicted meanwhile.

        Either this comes first and give_up refuses, or the eviction came first and the
        request is not answered, as when a client's request meets the server's idle timeout.
        """
        with self.lock:
            if self.evicted:
                raise ConnectionAbortedError(errno.ECONNABORTED, "the connection gave its slot up")
            self.busy = True

    def begin_download(self) -> bool:
        """An update's bytes are about to go out: take one of max_downloads, or False when all are taken."""
        return self.table is None or self.table.begin_download(self)

    def end_request(self) -> None:
        """The answer is out: the connection idles, evictable again (and its download, if any, is over).

        No lock needed: only this thread raises busy, under the lock in begin_request, which
        also publishes this write before the next request begins; give_up seeing busy late
        only keeps the slot a moment longer.
        """
        if self.downloading and self.table is not None:
            self.table.end_download(self)
        self.busy, self.served, self.waiting_since = False, True, time.monotonic()

    def give_up(self) -> bool:
        """Marked evicted unless a request is in progress: the accept thread's half of the hand-over."""
        with self.lock:
            if self.busy:
                return False
            self.evicted = True
            return True


class ConnectionTable:
    """Who holds the server's connection slots, so that no client can take them all.

    A client (an IPv4 address, an IPv6 /64) may hold max_connections_per_client (trusted
    proxies are exempt).  When every slot is taken, the connection that has waited longest
    without a request in progress gives its slot to the newcomer: an idle keep-alive one at
    once, one that has not finished its first request head after EVICT_AFTER seconds.  Only
    when no one can give a slot up is the newcomer refused (503).

    Downloads may hold max_downloads slots at once; one more is answered 503, as nginx's
    limit_conn on a download location does.  The slots left over are kept for the short
    answers: slow readers filling the server with downloads (which are never evicted, as
    they are answering) cannot lock OPQ Health's / out.  The same lock counts the requests
    in flight, for the graceful stop.
    """

    EVICT_AFTER = 1.0

    def __init__(self, max_connections: int, per_client: int, max_downloads: Optional[int] = None) -> None:
        self.max_connections = max_connections
        self.per_client = per_client
        self.max_downloads = min(max_downloads or max_connections, max_connections)
        self.downloads = 0
        self.accepted = 0
        self.evicted = 0
        self.refused = {"full": 0, "client": 0}
        self._slots: Dict[socket.socket, Slot] = {}
        self._per_client: Dict[str, int] = {}
        self._lock = threading.Lock()

    def admit(self, connection: socket.socket, client: str, trusted: bool) -> Optional[str]:
        """Give the connection a slot, or say why not ("client" or "full"); runs on the accept thread."""
        with self._lock:
            if not trusted and self._per_client.get(client, 0) >= self.per_client:
                self.refused["client"] += 1
                return "client"
            if len(self._slots) >= self.max_connections and not self._evict_one():
                self.refused["full"] += 1
                return "full"
            self._slots[connection] = Slot(connection, client, trusted, self)
            self._per_client[client] = self._per_client.get(client, 0) + 1
            self.accepted += 1
            return None

    def _evict_one(self) -> bool:
        """Free the slot that has waited longest; busy is read here unlocked, and confirmed by give_up."""
        now = time.monotonic()
        waiting = [slot for slot in self._slots.values()
                   if not slot.busy and (slot.served or now - slot.waiting_since >= self.EVICT_AFTER)]
        while waiting:
            slot = min(waiting, key=lambda slot: slot.waiting_since)
            if slot.give_up():
                self._forget(slot)
                self.evicted += 1
                try:
                    slot.connection.shutdown(socket.SHUT_RDWR)    # its thread sees the end of the stream and leaves
                except OSError:
                    pass
                return True
            waiting.remove(slot)        # a request began meanwhile: it keeps its slot
        return False

    def begin_download(self, slot: Slot) -> bool:
        """One of max_downloads for the slot; False when they are all taken."""
        with self._lock:
            if self.downloads >= self.max_downloads:
                return False
            self.downloads += 1
        slot.downloading = True
        return True

    def end_download(self, slot: Slot) -> None:
        """The download is over, whole or cut: its place is free for the next."""
        with self._lock:
            self.downloads -= 1
        slot.downloading = False

    def slot_of(self, connection: socket.socket) -> Slot:
        """The slot a handler thread's connection was admitted with."""
        with self._lock:
            return self._slots.get(connection) or Slot(connection, "", False)

    def release(self, connection: socket.socket) -> None:
        """The connection closed: its slot is free (unless it was evicted, and so freed, already)."""
        with self._lock:
            slot = self._slots.get(connection)
            if slot is not None:
                self._forget(slot)

    def _forget(self, slot: Slot) -> None:
        del self._slots[slot.connection]
        remaining = self._per_client[slot.client] - 1
        if remaining:
            self._per_client[slot.client] = remaining
        else:
            del self._per_client[slot.client]

    def open_count(self) -> int:
        """Connections holding a slot now."""
        return len(self._slots)

    def counts(self) -> ConnectionCounts:
        """The figures /metrics shows."""
        return ConnectionCounts(len(self._slots), self.accepted, self.evicted, dict(self.refused))

    def wait_for_requests(self, grace: float) -> int:
        """Wait up to grace seconds for the requests being answered to end; return how many are left."""
        deadline = time.monotonic() + grace
        while True:
            with self._lock:
                busy = sum(1 for slot in self._slots.values() if slot.busy)
            if not busy or time.monotonic() >= deadline:
                return busy
            time.sleep(0.05)

    def cut_requests(self) -> None:
        """Shut the connections of the requests still being answered: their threads log what they sent."""
        with self._lock:
            busy = [slot.connection for slot in self._slots.values() if slot.busy]
        for connection in busy:
            try:
                connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


class AccessLog:
    """One line per request, formatted as the logging lines are (asctime LEVEL message).

    Written to a file descriptor with one write(2) each: no LogRecord, no handler
    lock, no buffer to grow under load, and lines of one connection stay in order.
    Without a descriptor (a server made inside a program) lines go to the logger.
    """

    def __init__(self, descriptor: Optional[int] = None) -> None:
        self.descriptor = descriptor
        self._second = -1
        self._prefix = ""

    def write(self, message: str) -> None:
        """One access line."""
        if self.descriptor is None:
            logger.info("%s", message)
            return
        now = time.time()
        second = int(now)
        if second != self._second:
            self._prefix = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(second))
            self._second = second
        line = "%s,%03d INFO %s\n" % (self._prefix, (now - second) * 1000, message)
        try:
            os.write(self.descriptor, line.encode("utf-8", "backslashreplace"))
        except OSError:
            pass    # a closed stderr must not take requests down with it


class BoxUpdateServer(http.server.ThreadingHTTPServer):
    """One thread per connection, admitted by the ConnectionTable; a graceful stop."""

    daemon_threads = True
    # stop() waits for requests itself; ThreadingMixIn's list of threads would cost O(threads) per accept.
    block_on_close = False
    request_queue_size = 1024
    KEYS_POLL_SECONDS = 0.5

    def __init__(self, settings: Settings, catalog: Catalog, access_log: Optional[AccessLog] = None,
                 routes: Callable[..., UpdateRoutes] = UpdateRoutes,
                 handler: Callable[..., ConnectionHandler] = ConnectionHandler,
                 rollout: Optional[Rollout] = None) -> None:
        self.settings = settings
        self.catalog = catalog
        self.rollout = rollout
        self.metrics = Metrics()
        self.connections = ConnectionTable(settings.max_connections, settings.max_connections_per_client,
                                           settings.max_downloads)
        self.stopping = False
        self.signers_file = WatchedFile(settings.allowed_signers or "")
        self.keys_judged_at = time.time()
        self._keys_stopping = threading.Event()
        self.routes = routes(settings, catalog, self.metrics, self.connections.counts, rollout=rollout)
        self.context = ProtocolContext(settings.idle_timeout, settings.request_header_timeout,
                                       settings.trusted_proxies, settings.forwarded_header, self.connections,
                                       access_log or AccessLog(), self.metrics, lambda: self.stopping)
        self.handler = handler
        if ":" in settings.host:
            self.address_family = socket.AF_INET6
        super().__init__((settings.host, settings.port), http.server.BaseHTTPRequestHandler)

    def finish_request(self, request: Any, client_address: Any) -> None:
        """Hand the connection its collaborators: the protocol context and the routes."""
        self.handler(request, client_address, self, self.context, self.routes.respond)

    def process_request(self, request: Any, client_address: Any) -> None:
        address = parse_address(client_address[0])
        client = client_group(address, self.settings.ipv6_client_prefix) if address else str(client_address[0])
        trusted = in_networks(address, self.settings.trusted_proxies)
        refusal = self.connections.admit(request, client, trusted)
        if refusal is None:
            try:
                super().process_request(request, client_address)
                return
            except RuntimeError:  # no thread could be started
                refusal = "full"
        self.refuse(request, refusal, client)

    def shutdown_request(self, request: Any) -> None:
        """Free the connection's slot, then close it: a client that sees the close may connect again at once."""
        self.connections.release(request)
        super().shutdown_request(request)

    def refuse(self, request: socket.socket, reason: str, client: str) -> None:
        """Answer 503 without a thread (a fresh socket's send buffer takes it at once), and log it."""
        answer, sent = REFUSALS[reason], 0
        try:
            request.setblocking(False)
            sent = request.send(answer)
        except OSError:
            pass
        self.shutdown_request(request)
        self.context.access_log.write('%s "-" 503 %d 0.0ms refused: %s' % (
            client, max(0, sent - answer.index(b"\r\n\r\n") - 4),
            "the server is full" if reason == "full" else "too many connections from this client"))

    def stop(self, grace: float) -> None:
        """Stop accepting, give in-flight requests up to grace seconds, then return."""
        self.stopping = True
        self._keys_stopping.set()
        self.server_close()
        left = self.connections.wait_for_requests(grace)
        if left:
            logger.warning("%d request(s) still in flight after %.1f s; cutting them", left, grace)
            self.connections.cut_requests()
            self.connections.wait_for_requests(1.0)     # each logs its access line

    def reload(self) -> None:
        """SIGHUP: rescan the folder, and read allowed_signers again."""
        if self.settings.allowed_signers:
            self.signers_file.look_again()
            self.reload_keys("SIGHUP")
        else:
            self.catalog.reload(None)
        if self.rollout is not None:
            self.rollout.reload()
        logger.info("SIGHUP: rescanned %s", self.settings.updates_dir)

    def reload_keys(self, why: str) -> None:
        """Read allowed_signers and judge every signature under what it lists now: never the keys read before.

        A file that cannot be read or lists no usable key offers no signed update until it is fixed.
        """
        path = self.settings.allowed_signers
        signers: List[AllowedSigner] = []
        try:
            loaded, problem = load_allowed_signers(path or "", self.settings.signer_principals), None
        except SettingsError as error:
            problem = "%s: no signed update is offered until it is fixed" % error
        else:
            signers = loaded.signers
            for warning in loaded.warnings:
                logger.warning("%s: allowed_signers %s: %s", why, path, warning)
            logger.info("%s: read %d key(s) from %s", why, len(signers), path)
        if problem and problem != self.catalog.keys.problem:
            logger.error("%s: %s", why, problem)
        self.catalog.reload(signers, problem)

    def watch_keys(self) -> None:
        """Edits to allowed_signers take effect within KEYS_POLL_SECONDS, as do valid-after and valid-before
        boundaries as time passes: revocation is an emergency, and must not wait for a SIGHUP."""
        while not self._keys_stopping.wait(self.KEYS_POLL_SECONDS):
            if self.signers_file.changed():
                self.reload_keys("allowed_signers changed")
            elif self.catalog.keys.signers and time.time() >= (next_validity_boundary(
                    self.catalog.keys.signers, self.keys_judged_at) or float("inf")):
                logger.info("a key's valid-after or valid-before passed: judging the signatures again")
                self.catalog.reload(self.catalog.keys.signers, self.catalog.keys.problem)
            else:
                continue
            self.keys_judged_at = time.time()


class WatchedFile:
    """A file read from time to time, and whether it changed since (inode, size, modification or change time)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.identity = self._identity()

    def _identity(self) -> Optional[Tuple[int, int, int, int]]:
        try:
            status = os.stat(self.path)
        except OSError:
            return None
        return (status.st_ino, status.st_size, status.st_mtime_ns, status.st_ctime_ns)

    def look_again(self) -> None:
        """Count the file as read now."""
        self.identity = self._identity()

    def changed(self) -> bool:
        """Whether the file differs from the last look (which this call becomes)."""
        identity = self._identity()
        changed, self.identity = identity != self.identity, identity
        return changed


def make_server(settings: Settings, access_log: Optional[AccessLog] = None) -> BoxUpdateServer:
    """Read the keys, check the updates folder, bind the port, start watching; SettingsError if any fails."""
    signers = None
    if settings.allowed_signers:
        loaded = load_allowed_signers(settings.allowed_signers, settings.signer_principals)
        for warning in loaded.warnings:
            logger.warning("allowed_signers %s: %s", settings.allowed_signers, warning)
        signers = loaded.signers
    check_updates_dir(settings.updates_dir)
    catalog = Catalog(settings.updates_dir, verify=settings.verify_updates, signers=signers,
                      principals=settings.signer_principals, max_expanded_bytes=settings.max_expanded_bytes,
                      verdicts=VerdictStore(settings.state_dir) if settings.state_dir else None)
    rollout = open_rollout(settings, lambda: catalog.snapshot)
    try:
        server = BoxUpdateServer(settings, catalog, access_log=access_log, rollout=rollout)
    except OSError as error:
        if rollout is not None:
            rollout.store.close()
        if error.errno == errno.EADDRINUSE:
            raise SettingsError("port %d is already in use" % settings.port) from None
        raise SettingsError("cannot listen on %s:%d: %s"
                            % (settings.host or "*", settings.port, error.strerror or error)) from None
    catalog.start()
    if settings.allowed_signers:
        threading.Thread(target=server.watch_keys, name="keys-watcher", daemon=True).start()
    if rollout is not None:
        rollout.start()
    return server


def serve(server: BoxUpdateServer) -> int:
    """Serve until SIGTERM or SIGINT, then stop gracefully (exit status 0).

    A second SIGTERM or SIGINT during the grace period exits at once with status 1;
    SIGHUP reloads (see BoxUpdateServer.reload) and never stops the server.
    """
    first_signal: List[str] = []

    def request_stop(signum: int, _frame: Optional[types.FrameType]) -> None:
        name = signal.Signals(signum).name
        if server.stopping:
            logger.warning("received %s during the graceful stop %s began: exiting now, cutting the requests "
                           "in flight", name, first_signal[0] if first_signal else "a stop")
            logging.shutdown()
            os._exit(1)  # pylint: disable=protected-access
        server.stopping = True
        first_signal.append(name)
        logger.info("received %s, stopping", name)
        threading.Thread(target=server.shutdown, daemon=True).start()

    def request_reload(_signum: int, _frame: Optional[types.FrameType]) -> None:
        logger.info("received SIGHUP, reloading")
        threading.Thread(target=server.reload, daemon=True).start()

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGHUP, request_reload)
    host, port = str(server.server_address[0]), int(server.server_address[1])
    logger.info("listening on http://%s:%d/ serving updates from %s (verify_updates=%s, signatures %s)",
                host if ":" not in host else "[%s]" % host, port, server.settings.updates_dir,
                str(server.settings.verify_updates).lower(),
                "required by %s" % server.settings.allowed_signers if server.settings.allowed_signers
                else "not required")
    if not server.settings.verify_updates:
        logger.warning("verify_updates is false: archives are not checked before they are offered")
    server.serve_forever()
    server.stop(server.settings.shutdown_grace)
    server.catalog.stop()
    if server.rollout is not None:
        server.rollout.stop()
    logger.info("stopped")
    return 0


# ---------------------------------------------------------------------------
# 11. Command line
# ---------------------------------------------------------------------------

def check_files(paths: Sequence[str], signers: Optional[Sequence[AllowedSigner]] = None,
                principals: Sequence[str] = (), max_expanded_bytes: int = MAX_EXPANDED_BYTES) -> int:
    """``check [--allowed-signers FILE [--principal NAME]...] [--max-expanded-bytes BYTES] ARCHIVE...``: the
    server's verdict on each, for operators before publishing; the principal printed is the one a box's
    ``ssh-keygen -Y verify -I`` uses."""
    failures = 0
    for path in paths:
        if path.endswith(SIGNATURE_SUFFIX) and version_digits(os.path.basename(path)[:-len(SIGNATURE_SUFFIX)]):
            if path[:-len(SIGNATURE_SUFFIX)] not in paths:      # otherwise judged with its archive
                print("SKIPPED   %s: a signature: check its archive, which this .sig goes with" % path)
            continue
        try:
            digits = version_digits(os.path.basename(path))
            if digits is None:
                raise ArchiveError("not named opq-box-update-<VERSION>.tar.bz2")
            if not stat.S_ISREG(os.lstat(path).st_mode):
                raise ArchiveError("not a regular file")     # never open a FIFO or a device
            if signers is not None and not os.path.lexists(path + SIGNATURE_SUFFIX):
                failures += 1       # as the server: not checked further until its .sig is there
                print("WAITING   %s: waits for its signature %s%s" % (path, os.path.basename(path), SIGNATURE_SUFFIX))
                continue
            with open_regular_file(path) as fileobj:
                digests = check_update_archive(fileobj, digits, max_expanded_bytes)
            signed_by = ""
            if signers is not None:
                armored = read_signature_file(path + SIGNATURE_SUFFIX, None)
                signature = parse_sshsig(armored or b"")
                digest = digests.for_algorithm(signature.hash_algorithm)
                signer = verify_sshsig(signature, digest, signers, SIGNATURE_NAMESPACE, principals=principals)
                signed_by = "  signed by %s" % signer
            print("OK        %s  %s%s" % (digests.sha256.hex(), path, signed_by))
        except (ArchiveError, SignatureError, OSError) as error:
            failures += 1
            reason = error.strerror if isinstance(error, OSError) and error.strerror else str(error)
            prefix = "signature: " if isinstance(error, SignatureError) else ""
            print("REJECTED  %s: %s%s" % (path, prefix, reason))
    return 1 if failures else 0


def ask_server(settings: Settings, path: str) -> Tuple[int, bytes]:
    """GET path from the server these settings describe (a wildcard address through loopback).

    OSError, its message naming the address, when it cannot be asked.
    """
    host = {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "::1"}.get(settings.host, settings.host)  # nosec
    address = "http://%s:%d%s" % ("[%s]" % host if ":" in host else host, settings.port, path)
    connection = http.client.HTTPConnection(host, settings.port, timeout=3)
    try:
        connection.request("GET", path)
        answer = connection.getresponse()
        return answer.status, answer.read()
    except (OSError, http.client.HTTPException) as error:
        raise OSError("%s: %s" % (address, error)) from None
    finally:
        connection.close()


def ask_server_report(settings: Settings, path: str, hint: str) -> Optional[Dict[str, Any]]:
    """The JSON object the server answers on path; None, after one line on stderr saying why, when there is none."""
    try:
        status, body = ask_server(settings, path)
        report = json.loads(body.decode("utf-8")) if status == 200 else None
    except (OSError, ValueError) as error:
        print("box_update_server: error: cannot ask the server: %s" % error, file=sys.stderr)
        return None
    if not isinstance(report, dict):
        print("box_update_server: error: the server answered %s with %d (%s)" % (path, status, hint), file=sys.stderr)
        return None
    return report


def probe_health(settings: Settings) -> int:
    """``health``: 0 when the server these settings describe answers ``"ok": true`` on /, else 1.

    The Docker HEALTHCHECK runs this with the Python already in the image.
    """
    try:
        status, body = ask_server(settings, "/")
        health = json.loads(body.decode("utf-8"))
    except (OSError, ValueError) as error:
        print("unhealthy: %s" % error)
        return 1
    healthy = status == 200 and isinstance(health, dict) and health.get("ok") is True
    print(("healthy: %s" if healthy else "unhealthy: %s") % json.dumps(health))
    return 0 if healthy else 1


def print_fleet(settings: Settings) -> int:
    """``fleet``: the running server's /fleet as a table: the rollout, then one line per box; 1 if it cannot say."""
    fleet = ask_server_report(settings, "/fleet", "is a rollout policy set, and this address in metrics_allow?")
    if fleet is None:
        return 1
    for line in fleet_table(fleet, time.time()):
        print(line)
    return 0


def fleet_table(fleet: Mapping[str, Any], now: float) -> List[str]:
    """The lines ``fleet`` prints: the rollout in a sentence, then the boxes in aligned columns."""
    rollout = fleet["rollout"]
    if rollout["release"] is None:
        lines = ["no update offered"]
    else:
        started = ("started %s" % time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(rollout["started"]))
                   if rollout["started"] else "rolled out before the rollout state existed")
        lines = ["%s (VERSION %d): %s; %.0f%% of the fleet eligible; canaries %s; %d failure(s)%s" % (
            rollout["release"], rollout["version"], started, rollout["eligible_share"] * 100,
            "done" if rollout["canaries_done"] else "only", rollout["failures"],
            "; HALTED: %s" % rollout["halt_reason"] if rollout["halted"] else "")]
    header = ("BOX", "ADDRESS", "REPORTED", "OFFERED", "DOWNLOADED", "STATE", "LAST SEEN")
    rows = [header] + [(box["box"], box["address"], str(box["reported_version"] or "-"),
                        str(box["offered_version"] or "-"), "yes" if box["downloaded"] else "no", box["state"],
                        "%.0f s ago" % max(0.0, now - box["last_seen"])) for box in fleet["boxes"]]
    widths = [max(len(row[column]) for row in rows) for column in range(len(header))]
    lines.append("%d box(es)" % len(fleet["boxes"]))
    lines += ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows]
    return lines


def print_status(settings: Settings) -> int:
    """``status``: every file in the running server's updates folder, its verdict and why; 1 if it cannot say."""
    report = ask_server_report(settings, "/status", "is this address in metrics_allow?")
    if report is None:
        return 1
    print("updates folder %s%s" % (report.get("folder"), ": %s" % report["problem"] if report.get("problem") else ""))
    for entry in report.get("files", []):
        details = [str(entry[key]) for key in ("reason", "sha256", "signer") if entry.get(key)]
        print("%-26s %s%s" % (entry["state"], entry["name"], "  (%s)" % "; ".join(details) if details else ""))
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    """Run the server (the default), ``health``, ``fleet`` or ``check``; return the exit status."""
    parser = argparse.ArgumentParser(
        prog="box_update_server.py",
        description="Serve OPQ Box updates. Configured by the JSON in %s." % SETTINGS_VARIABLE)
    parser.add_argument("--version", action="version", version="%(prog)s " + __version__)
    commands = parser.add_subparsers(dest="command")
    commands.add_parser("serve", help="run the server (the default)")
    commands.add_parser("health", help="exit 0 if the configured server answers ok on /, 1 if not")
    commands.add_parser("fleet", help="print the configured server's rollout and every box it knows (/fleet)")
    commands.add_parser("status", help="list every file in the configured server's updates folder, its verdict "
                                       "and why")
    check = commands.add_parser("check", help="check update archives as the server would, before publishing")
    check.add_argument("--allowed-signers", metavar="FILE",
                       help="also require ARCHIVE.sig to verify under a key in this OpenSSH allowed_signers file")
    check.add_argument("--principal", metavar="NAME", action="append", default=[],
                       help="require a key listed for this principal, as boxes verify with ssh-keygen -Y verify -I "
                            "NAME (repeatable; default: any listed principal)")
    check.add_argument("--max-expanded-bytes", metavar="BYTES", type=int, default=MAX_EXPANDED_BYTES,
                       help="reject an archive whose tar stream is longer (as the setting; default %(default)s)")
    check.add_argument("files", nargs="+", metavar="ARCHIVE")
    arguments = parser.parse_args(argv)
    if arguments.command == "check" and arguments.max_expanded_bytes < 1:
        parser.error("--max-expanded-bytes must be a positive number of bytes")
    try:
        if arguments.command == "check":
            signers = None
            if arguments.principal and not arguments.allowed_signers:
                raise SettingsError("check: --principal needs --allowed-signers")
            if arguments.allowed_signers:
                loaded = load_allowed_signers(arguments.allowed_signers, arguments.principal)
                for warning in loaded.warnings:
                    print("box_update_server: warning: allowed_signers %s: %s" % (arguments.allowed_signers, warning),
                          file=sys.stderr)
                signers = loaded.signers
            return check_files(arguments.files, signers, arguments.principal, arguments.max_expanded_bytes)
        settings, warnings = parse_settings(os.environ.get(SETTINGS_VARIABLE), os.getcwd())
        if arguments.command in ("health", "status") and settings.port == 0:
            raise SettingsError("%s needs the port the server listens on: port 0 lets it pick one at start"
                                % arguments.command)
        if arguments.command == "health":
            return probe_health(settings)
        if arguments.command == "fleet":
            return print_fleet(settings)
        if arguments.command == "status":
            return print_status(settings)
        logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(levelname)s %(message)s")
        for warning in warnings:
            logger.warning("%s", warning)
        server = make_server(settings, AccessLog(sys.stderr.fileno()))
    except SettingsError as error:
        print("box_update_server: error: %s" % error, file=sys.stderr)
        return 1
    return serve(server)


if __name__ == "__main__":
    sys.exit(main())
