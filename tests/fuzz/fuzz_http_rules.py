"""atheris fuzz target: request heads and their framing, client addresses, path resolution, the Range and
precondition parsers, and the tar framing checks.

Run by .ci/run for a bounded time when atheris installs:
    python3 tests/fuzz/fuzz_http_rules.py -max_total_time=60
Properties checked on every input: nothing raises but the documented exceptions (BadRequest with a 4xx or
501, RangeNotSatisfiable, ArchiveError); a parsed head has a method, a target and HTTP/1.0 or 1.1; a range
lies inside the file; only catalog entries ever resolve, and only from a path that names them; a client
address is the peer unless the peer is a trusted proxy, and is always an address or unknown; tar framing never
holds more than it may.
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

    framing = bus.TarFraming()
    try:
        framing.feed(provider.ConsumeBytes(4096))
    except bus.ArchiveError:
        pass
    assert len(framing.buffer) <= bus.MAX_TAR_METADATA + 512


if __name__ == "__main__":
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()
