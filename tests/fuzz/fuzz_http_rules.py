"""atheris fuzz target: resolving a request path to an update, and the Range and precondition parsers.

Run by .ci/run for a bounded time when atheris installs:
    python3 tests/fuzz/fuzz_http_rules.py -max_total_time=60
Properties checked on every input: nothing raises but RangeNotSatisfiable; a range lies inside the file;
only catalog entries ever resolve, and only from a path that names them.
"""

import os
import sys
import urllib.parse

import atheris

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

with atheris.instrument_imports():
    import box_update_server as bus

UPDATES = tuple(bus.Update("opq-box-update-%d.tar.bz2" % version, version, "/u/opq-box-update-%d.tar.bz2" % version,
                           (1, 2, 3), None) for version in (1, 1700000000))
SNAPSHOT = bus.EMPTY_SNAPSHOT._replace(updates=UPDATES, by_name={update.name: update for update in UPDATES})


def test_one_input(data):
    provider = atheris.FuzzedDataProvider(data)
    size = provider.ConsumeIntInRange(0, 1 << 40)
    text = provider.ConsumeUnicodeNoSurrogates(256)

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
    headers = {"If-Match": text, "If-None-Match": text, "If-Modified-Since": text, "If-Unmodified-Since": text}
    assert bus.evaluate_preconditions(headers, etag, modified) in (None, 304, 412)
    bus.check_if_range(text, etag, modified)
    bus.escape_for_log(text)


if __name__ == "__main__":
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()
