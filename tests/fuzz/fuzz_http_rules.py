"""atheris fuzz target: request heads and their framing, client addresses, path resolution, the Range and
precondition parsers, the tar framing checks, allowed_signers lines and signature armor.

Run by .ci/run for a bounded time when atheris installs:
    python3 tests/fuzz/fuzz_http_rules.py -max_total_time=60
Properties checked on every input: nothing raises but the documented exceptions (BadRequest with a 4xx or
501, RangeNotSatisfiable, ArchiveError, SignatureError); a parsed head has a method, a target and HTTP/1.0 or
1.1; a range lies inside the file; only catalog entries ever resolve, and only from a path that names them; a
client address is the peer unless the peer is a trusted proxy, and is always an address or unknown; tar framing
never holds more than it may; an allowed_signers text never raises, every line is a key, a named warning, or a
comment, and a key's validity window is sane; accepted armor has OpenSSH's BEGIN line first and a line feed
before END.
"""

import ipaddress
import os
import sys
import urllib.parse

import atheris

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

with atheris.instrument_imports():
    import box_update_server as bus

UPDATES = tuple(bus.Update("opq-box-update-%d.tar.bz2" % version, version, "/u/opq-box-update-%d.tar.bz2" % version,
                           bus.FileIdentity(1, 2, 3, 4, True), True, None, None, None) for version in (1, 1700000000))
SNAPSHOT = bus.EMPTY_SNAPSHOT._replace(updates=UPDATES, by_name={update.name: update for update in UPDATES})
TRUSTED = (ipaddress.ip_network("10.0.0.0/8"),)
KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIIJAJNTdey9v7XI1FTFCwcnqRFzgiORbQ/RKrw9OStfK"
ARMOR_BEGIN = b"-----BEGIN SSH SIGNATURE-----\n"


def check_head(raw):
    lines = raw.split(b"\n")
    try:
        fields = [bus.request_line_text(line) for line in lines[1:]]
        head = bus.request_head(*bus.parse_request_line(bus.request_line_text(lines[0])), fields)
    except bus.BadRequest as error:
        assert 400 <= error.status < 500 or error.status == 501, error.status
        return None
    assert head.method and head.target and head.version in ("HTTP/1.0", "HTTP/1.1")
    return head


def check_allowed_signers(text, principal, now):
    """A fuzzed file, and a fuzzed line in front of a real key so that options and dates are reached."""
    for candidate in (text, "%s %s" % (text, KEY), "a@b %s %s" % (text, KEY)):
        parsed = bus.parse_allowed_signers(candidate)
        lines = candidate.count("\n") + 1
        for warning in parsed.warnings:
            assert warning.startswith("line ") and 1 <= int(warning[5:warning.index(":")]) <= lines, warning
        for signer in parsed.signers:
            assert 1 <= signer.line <= lines and signer.key_type in bus._KEY_TYPE_NAMES.values()
            assert signer.valid_after is None or signer.valid_after > 0
            assert signer.valid_before is None or signer.valid_before > (signer.valid_after or 0)
            found = bus.signer_principal(signer, [principal] if principal else [])
            assert found is None or (found == principal if principal else isinstance(found, str) and found)
            bus.signer_valid_at(signer, now)
        boundary = bus.next_validity_boundary(parsed.signers, now)
        assert boundary is None or boundary > now
        assert bus._match_pattern_list(principal, candidate.split(",")) in (-1, 0, 1)


def check_armor(data):
    """A leading + stands for the BEGIN line, so that the fuzzer reaches the base64 and the blob."""
    armored = ARMOR_BEGIN + data[1:] if data[:1] == b"+" else data
    try:
        signature = bus.parse_sshsig(armored)
    except bus.SignatureError:
        return
    assert armored.startswith(ARMOR_BEGIN) and b"\n-----END SSH SIGNATURE-----" in armored
    assert signature.hash_algorithm in ("sha256", "sha512") and signature.namespace


def test_one_input(data):
    provider = atheris.FuzzedDataProvider(data)
    size = provider.ConsumeIntInRange(0, 1 << 40)
    text = provider.ConsumeUnicodeNoSurrogates(256)

    head = check_head(provider.ConsumeBytes(512))
    peer = provider.PickValueInList(["10.1.2.3", "192.0.2.1", "::ffff:10.0.0.9"])
    header = provider.PickValueInList(list(bus.FORWARDED_HEADERS))
    client = bus.client_behind_proxies(peer, head.headers if head else {header.lower(): text}, TRUSTED, header)
    if not bus.in_networks(bus.parse_address(peer), TRUSTED):
        assert client == peer
    assert client == bus.UNKNOWN_CLIENT or bus.parse_address(client) is not None, client

    try:
        selected = bus.parse_range(text, size)
    except bus.RangeNotSatisfiable:
        selected = None
    if selected is not None:
        first, last = selected
        assert 0 <= first <= last < size, (text, size, selected)

    path = bus.request_path(text)
    assert "?" not in path and "#" not in path
    if path.startswith("/update/"):
        update = bus.resolve_update(SNAPSHOT, path[len("/update/"):])
        if update is not None:
            assert update in UPDATES
            assert urllib.parse.unquote(path[len("/update/"):]) == update.name

    etag, modified = '"1-2-3"', provider.ConsumeIntInRange(0, 1 << 34)
    headers = {"if-match": text, "if-none-match": text, "if-modified-since": text, "if-unmodified-since": text,
               "range": text}
    assert bus.evaluate_preconditions(headers, etag, modified) in (None, 304, 412)
    plan = bus.plan_download(provider.PickValueInList(["GET", "HEAD"]), headers, size, etag, modified)
    assert plan.status in (200, 206, 304, 412, 416) and 0 <= plan.first and plan.first + plan.length <= size
    bus.check_if_range(text, etag, modified)
    bus.escape_for_log(text)

    check_allowed_signers(text, provider.ConsumeUnicodeNoSurrogates(64), provider.ConsumeIntInRange(0, 1 << 34))
    check_armor(provider.ConsumeBytes(1024))

    framing = bus.TarFraming()
    try:
        framing.feed(provider.ConsumeBytes(4096))
    except bus.ArchiveError:
        pass
    assert len(framing.buffer) <= bus.MAX_TAR_METADATA + 512


if __name__ == "__main__":
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()
