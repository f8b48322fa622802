"""GET /metrics: the Prometheus text format 0.0.4, exact counts, who may read it, and a real Prometheus.

Counts are asserted as differences between two scrapes of one server, so the health polls that start a
server do not matter.  The server counts a request after its last byte has left, so a scrape right after a
request may not see it yet: every comparison polls until the counts settle, then asserts them exactly.
"""

import http.client
import json
import os
import re
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import unittest
import urllib.parse
import urllib.request

from support import (ROOT, TempDirTestCase, bus, close_all, free_port, heavy, hold_connections, make_update, publish,
                     raw_exchange, read_response_head, request, require_binary, status_of, track, wait_until)

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
PREFIX = "box_update_server_"
# Every route label the server may use: the route a request took, never its path.
ROUTES = {"/", "/ls", "/latest", "/version", "/metrics", "/update", "/update.sha256", "/update.sig", "other"}
SETTLE_SECONDS = 15
# What the issue asks for, by name and type (the server may have more).
FAMILIES = {
    PREFIX + "requests_total": "counter",
    PREFIX + "response_bytes_total": "counter",
    PREFIX + "update_downloads_total": "counter",
    PREFIX + "range_requests_total": "counter",
    PREFIX + "connections_open": "gauge",
    PREFIX + "connections_accepted_total": "counter",
    PREFIX + "connections_refused_total": "counter",
    PREFIX + "updates_offered": "gauge",
    PREFIX + "updates_rejected": "gauge",
    PREFIX + "updates_waiting": "gauge",
    PREFIX + "latest_version": "gauge",
    PREFIX + "updates_folder_ok": "gauge",
    PREFIX + "folder_unchanged_seconds": "gauge",
    PREFIX + "check_seconds_total": "counter",
    PREFIX + "request_duration_seconds": "histogram",
    PREFIX + "build_info": "gauge",
    "process_start_time_seconds": "gauge",
}


# The text exposition format 0.0.4 ----------------------------------------------------------------------------

METRIC_NAME = r"[a-zA-Z_:][a-zA-Z0-9_:]*"
COMMENT = re.compile(r"# (HELP|TYPE) (%s)(?: (.*))?$" % METRIC_NAME)
SAMPLE = re.compile(r"(%s)(?:\{(.*)\})? (\S+)(?: (-?[0-9]+))?$" % METRIC_NAME)
LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\\n]|\\[\\"n])*)"(,?)')
TYPES = {"counter", "gauge", "histogram", "summary", "untyped"}
UNESCAPE = {"\\\\": "\\", '\\"': '"', "\\n": "\n"}


class ExpositionError(AssertionError):
    """The server's output is not valid text format 0.0.4."""


class Exposition:
    """One scrape, parsed strictly: HELP and TYPE by family, samples keyed by (name, frozenset(labels.items())).

    Strict where Prometheus is: a family's samples come together, after its TYPE, and no sample twice.
    """

    def __init__(self, text, scrapes_before=0):
        self.text = text
        self.scrapes_before = scrapes_before   # scrapes of this server completed before this one began
        self.help, self.type = {}, {}
        self.samples = {}
        self.order = []                        # (sample name, labels) as they came
        self.families = []                     # family names in the order their lines came
        if not text.endswith("\n"):
            raise ExpositionError("the last line does not end with a line feed")
        for number, line in enumerate(text.split("\n")[:-1], 1):
            try:
                self._line(line)
            except ExpositionError as error:
                raise ExpositionError("line %d: %s: %r" % (number, error, line)) from None

    def _line(self, line):
        if not line.strip():
            return
        if line.startswith("#"):
            match = COMMENT.match(line)
            if match is None:
                return                         # a plain comment
            kind, name, rest = match.groups()
            table = self.help if kind == "HELP" else self.type
            if name in table:
                raise ExpositionError("a second %s" % kind)
            if kind == "TYPE" and rest not in TYPES:
                raise ExpositionError("unknown type")
            if kind == "TYPE" and any(sample == name or self.family(sample) == name for sample, _ in self.order):
                raise ExpositionError("TYPE after the family's samples")
            table[name] = rest or ""
            self._enter(name)
            return
        match = SAMPLE.match(line)
        if match is None:
            raise ExpositionError("not a sample")
        name, label_text, value, _timestamp = match.groups()
        labels = self._labels(label_text or "")
        try:
            number = float(value)
        except ValueError:
            raise ExpositionError("not a number") from None
        key = (name, frozenset(labels.items()))
        if key in self.samples:
            raise ExpositionError("a second sample of one series")
        self._enter(self.family(name))
        self.samples[key] = number
        self.order.append((name, labels))

    def _enter(self, family):
        """Lines of one family stay together: once another family began, it may not come back."""
        if self.families and self.families[-1] == family:
            return
        if family in self.families:
            raise ExpositionError("%s again, after other families" % family)
        self.families.append(family)

    @staticmethod
    def _labels(text):
        labels, position = {}, 0
        while position < len(text):
            match = LABEL.match(text, position)
            if match is None:
                raise ExpositionError("bad labels")
            name, raw, comma = match.groups()
            if name in labels:
                raise ExpositionError("label %s twice" % name)
            labels[name] = re.sub(r'\\[\\"n]', lambda escape: UNESCAPE[escape.group(0)], raw)
            position = match.end()
            if not comma and position < len(text):
                raise ExpositionError("labels not separated by commas")
        return labels

    def family(self, name):
        """The family of a sample name: a histogram's for its _bucket, _sum and _count series, else its own."""
        for suffix in ("_bucket", "_sum", "_count"):
            base = name[:-len(suffix)]
            if name.endswith(suffix) and self.type.get(base) == "histogram":
                return base
        return name

    def value(self, name, **labels):
        """A sample's value, or None when the server did not write it."""
        return self.samples.get((name, frozenset(labels.items())))

    def series(self, name):
        """{frozenset(labels): value} of every sample with this name."""
        return {labels: value for (sample, labels), value in self.samples.items() if sample == name}

    def label_values(self, label):
        return {dict(labels)[label] for (_name, labels) in self.samples if label in dict(labels)}


def deltas(before, after, name):
    """What changed in one sample name between two scrapes, as {frozenset(labels): increase}, zeros left out."""
    old, new = before.series(name), after.series(name)
    changes = {labels: value - old.get(labels, 0) for labels, value in new.items()}
    return {labels: change for labels, change in changes.items() if change}


def counted_requests(scrape):
    """The request and download counters, less the scrapes' own."""
    return {key: value for key, value in scrape.samples.items()
            if key[0] in (PREFIX + "requests_total", PREFIX + "update_downloads_total")
            and ("route", "/metrics") not in key[1]}


def own_scrapes(scrape):
    """How many /metrics requests the scrape counted."""
    return scrape.series(PREFIX + "requests_total").get(labels(route="/metrics", status="200"), 0)


def labels(**pairs):
    return frozenset(pairs.items())


class Scraper:
    """Scrapes one server, numbering the scrapes so the /metrics route's own count can be predicted exactly."""

    def __init__(self, port, source=None):
        self.port, self.source = port, source
        self.made = 0

    def get(self, headers=None):
        return request(self.port, "GET", "/metrics", headers, source=self.source)

    def baseline(self):
        """A scrape to count from: the first that agrees with the one before it, requests and downloads alike.

        A request is counted just after its answer left, so the last health poll of ServerProcess.start
        may land after a scrape taken at once; two scrapes in a row that agree leave no such straggler.
        """
        previous = self.scrape()
        deadline = time.monotonic() + SETTLE_SECONDS
        while True:
            current = self.scrape()
            # the scrape before this one was counted before this one was rendered: no /metrics straggler either
            own_counted = own_scrapes(current) == own_scrapes(previous) + 1
            if (counted_requests(current) == counted_requests(previous) and own_counted) \
                    or time.monotonic() > deadline:
                return current
            previous = current

    def scrape(self):
        began_after = self.made
        answer = self.get()
        if answer.status != 200:
            raise AssertionError("GET /metrics: %d %r" % (answer.status, answer.body[:200]))
        self.made += 1
        return Exposition(answer.body.decode("utf-8"), began_after)


class ExpositionParserTest(unittest.TestCase):
    """The parser is the yardstick of the format test, so it must reject what Prometheus rejects."""

    GOOD = (
        '# HELP a_total Things.\n# TYPE a_total counter\na_total{x="q\\"uote\\\\ and\\nline",y="2"} 3\n'
        '# HELP h Time.\n# TYPE h histogram\nh_bucket{le="0.5"} 1\nh_bucket{le="+Inf"} 2\nh_sum 0.7\nh_count 2\n'
        '# a plain comment\nplain_gauge 1.5e3 1700000000000\n')

    def test_values_labels_and_escapes(self):
        scrape = Exposition(self.GOOD)
        self.assertEqual(scrape.value("a_total", x='q"uote\\ and\nline', y="2"), 3)
        self.assertEqual(scrape.value("h_bucket", le="+Inf"), 2)
        self.assertEqual(scrape.value("plain_gauge"), 1500)
        self.assertEqual(scrape.families, ["a_total", "h", "plain_gauge"])
        self.assertEqual((scrape.type["h"], scrape.help["a_total"]), ("histogram", "Things."))

    def test_invalid_text_is_rejected(self):
        cases = [("a 1", "no final line feed"),
                 ('a{x="1"} 1\na{x="1"} 2\n', "one series twice"),
                 ("a 1\n# TYPE a gauge\n", "TYPE after the samples"),
                 ('a 1\nb 1\na{x="2"} 1\n', "a family split in two"),
                 ("# TYPE a gauge\n# TYPE a counter\na 1\n", "two TYPEs"),
                 ("# TYPE a meter\na 1\n", "no such type"),
                 ("a{x=1} 1\n", "an unquoted label value"),
                 ('a{x="1" y="2"} 1\n', "labels without a comma"),
                 ('a{x="\\t"} 1\n', "an escape the format does not have"),
                 ("a one\n", "not a number"),
                 ("1a 1\n", "not a metric name")]
        for text, why in cases:
            with self.subTest(why=why):
                self.assertRaises(ExpositionError, Exposition, text)


# Helpers for clients ----------------------------------------------------------------------------------------

def prometheus_tool(name):
    """promtool or prometheus, from Debian's prometheus package, which .ci/run installs; else the test is skipped."""
    try:
        return require_binary(name)
    except unittest.SkipTest:
        raise unittest.SkipTest("%s is not installed (Debian package prometheus, which .ci/run installs), "
                                "so this case is skipped" % name) from None


def abandon_download(port, path, receive_buffer=32768):
    """Read a download's headers, then close the connection with most of the body unread (a reset).

    The body must be larger than what the kernel buffers hold (the server's send buffer is at most
    net.ipv4.tcp_wmem's 4 MB here), so the server is still sending when the client goes: cut, always.
    """
    with socket.socket() as connection:
        connection.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
        connection.settimeout(30)
        connection.connect(("127.0.0.1", port))
        connection.sendall(b"GET %s HTTP/1.1\r\nHost: x\r\n\r\n" % path.encode())
        head, _ = read_response_head(connection)
        connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        return status_of(head)


class MetricsTestCase(TempDirTestCase):
    """Waiting for counts to settle, then asserting them exactly."""

    def settle(self, scraper, before, expected):
        """Scrape until every {sample name: {labels: increase}} in expected holds; return the last scrape.

        The /metrics route's own 200s are added to the requests counter's expectation: each scrape after
        `before` (and `before` itself) counts once, so a scrape sees exactly those that completed before it.
        """
        def changes(after):
            expect = {name: dict(increases) for name, increases in expected.items()}
            own = after.scrapes_before - before.scrapes_before
            requests = expect.get(PREFIX + "requests_total")
            if requests is not None and own:
                requests[labels(route="/metrics", status="200")] = own
            seen = {name: deltas(before, after, name) for name in expect}
            return seen, expect

        state = {}

        def settled():
            state["after"] = scraper.scrape()
            seen, expect = changes(state["after"])
            return seen == expect

        wait_until(settled, SETTLE_SECONDS)
        seen, expect = changes(state["after"])
        for name in expect:
            self.assertEqual(readable(seen[name]), readable(expect[name]), "increase of %s" % name)
        return state["after"]


def readable(increases):
    """{labels: n} as sorted text, so a failed comparison shows which series differ."""
    return sorted(("{%s}" % ",".join('%s="%s"' % pair for pair in sorted(key)), value)
                  for key, value in increases.items())


# The format and exact counts --------------------------------------------------------------------------------

class MetricsCountTest(MetricsTestCase):
    """A server offering a small update and a 16 MB one (too large for the kernel buffers, so it can be cut)."""

    BIG_SIZE = 16 << 20

    def setUp(self):
        super().setUp()
        self.small_path = make_update(self.updates, 1700000100, mtime=time.time() - 60)
        self.small = os.path.basename(self.small_path)
        self.small_size = os.path.getsize(self.small_path)
        self.big = "opq-box-update-1700000200.tar.bz2"     # not an archive: verify_updates is off
        publish(os.path.join(self.updates, self.big), os.urandom(self.BIG_SIZE), mtime=time.time() - 60)
        self.server = self.start_server(verify_updates=False)
        self.scraper = Scraper(self.server.port)

    def get(self, path, headers=None):
        return request(self.server.port, "GET", path, headers)

    def some_of_everything(self):
        """Traffic that gives every family samples: small routes, a download, a range, a 404, a cut download."""
        for path in ["/", "/ls", "/latest", "/version", "/no/such/thing", "/update/" + self.small,
                     "/update/%s.sha256" % self.small, "/update/%s.sig" % self.small]:
            self.get(path)
        self.get("/update/" + self.small, {"Range": "bytes=0-9"})
        abandon_download(self.server.port, "/update/" + self.big)
        self.assertTrue(wait_until(lambda: self.scraper.scrape().value(
            PREFIX + "update_downloads_total", update=self.big, outcome="cut"), SETTLE_SECONDS))

    def test_content_type_families_names_and_histograms_follow_the_format(self):
        """What Prometheus needs to read the answer, and the naming conventions the issue asks for."""
        self.some_of_everything()
        answer = self.scraper.get()
        self.assertEqual(answer.status, 200)
        self.assertEqual(answer.header("Content-Type"), CONTENT_TYPE)
        scrape = Exposition(answer.body.decode("utf-8"))
        self.assertEqual({name: kind for name, kind in scrape.type.items() if name in FAMILIES}, FAMILIES,
                         "the families the issue asks for, with their types")

        for family in scrape.families:
            with self.subTest(family=family):
                self.assertIn(family, scrape.type, "every family has a TYPE")
                self.assertTrue(scrape.help.get(family), "every family has a non-empty HELP")
                self.assertTrue(family.startswith(PREFIX) or family == "process_start_time_seconds",
                                "our own families share the %s prefix" % PREFIX)
                # counters, and only counters, end in _total (Prometheus naming conventions)
                self.assertEqual(scrape.type[family] == "counter", family.endswith("_total"))
                self.assertNotRegex(family, r"milli|micro|kilo|mega|_ms$|_kb$|_minutes|_hours", "base units only")

        self.check_histogram(scrape, PREFIX + "request_duration_seconds")
        self.assertEqual(scrape.label_values("route") - ROUTES, set(), "route labels are bounded")

        info = scrape.series(PREFIX + "build_info")
        self.assertEqual(list(info.values()), [1])
        self.assertEqual(dict(next(iter(info))), {"version": bus.__version__,
                                                  "python": "%d.%d.%d" % sys.version_info[:3]})
        started = scrape.value("process_start_time_seconds")
        self.assertLessEqual(started, time.time())
        self.assertGreater(started, time.time() - 300, "process_start_time_seconds is seconds since the epoch")

    def check_histogram(self, scrape, family):
        """For every label set: buckets in ascending le, cumulative, the last +Inf and equal to _count; a _sum."""
        groups = {}
        for name, pairs in scrape.order:      # in the order written: Prometheus wants le ascending
            if name == family + "_bucket":
                rest = frozenset((key, value) for key, value in pairs.items() if key != "le")
                groups.setdefault(rest, []).append((float(pairs["le"]), scrape.samples[(name, frozenset(
                    pairs.items()))]))
        self.assertTrue(groups, "the histogram has buckets")
        for rest, buckets in groups.items():
            with self.subTest(histogram=dict(rest)):
                bounds = [bound for bound, _count in buckets]
                counts = [count for _bound, count in buckets]
                self.assertEqual(bounds, sorted(set(bounds)), "le ascends, each bound once")
                self.assertEqual(counts, sorted(counts), "buckets are cumulative")
                self.assertEqual(bounds[-1], float("inf"), "a +Inf bucket")
                self.assertEqual(counts[-1], scrape.samples.get((family + "_count", rest)), "+Inf equals _count")
                self.assertGreaterEqual(scrape.samples.get((family + "_sum", rest), -1), 0, "a _sum")

    def test_exact_counts_after_a_known_sequence_of_requests(self):
        """Every request lands once under its route and status; downloads by outcome; labels stay bounded."""
        before = self.scraper.baseline()
        bodies = {"/": 0, "/ls": 0, "other": 0}
        for _ in range(5):
            bodies["/"] += len(self.get("/").body)
        for _ in range(4):
            bodies["/ls"] += len(self.get("/ls").body)
        raw_404 = self.get("/no/such/thing?x=1")
        self.assertEqual(raw_404.status, 404)
        bodies["other"] += len(raw_404.body)
        garbage = raw_exchange(self.server.port, b"NONSENSE\r\n\r\n")
        self.assertEqual(status_of(garbage), 400)
        bodies["other"] += len(garbage.split(b"\r\n\r\n", 1)[1])
        for _ in range(3):
            self.assertEqual(len(self.get("/update/" + self.small).body), self.small_size)
        head = request(self.server.port, "HEAD", "/update/" + self.small)
        self.assertEqual((head.status, head.body), (200, b""), "HEAD: headers only, not a download")
        ranged = self.get("/update/" + self.small, {"Range": "bytes=0-99"})
        self.assertEqual((ranged.status, len(ranged.body)), (206, 100))
        not_offered = "opq-box-update-1234567.tar.bz2"
        self.assertEqual(self.get("/update/" + not_offered).status, 404)
        self.assertEqual(abandon_download(self.server.port, "/update/" + self.big), 200)

        after = self.settle(self.scraper, before, {
            PREFIX + "requests_total": {
                labels(route="/", status="200"): 5, labels(route="/ls", status="200"): 4,
                labels(route="other", status="404"): 1, labels(route="other", status="400"): 1,
                labels(route="/update", status="200"): 3 + 1 + 1,      # 3 GET, the HEAD, the cut one
                labels(route="/update", status="206"): 1, labels(route="/update", status="404"): 1},
            PREFIX + "update_downloads_total": {
                labels(update=self.small, outcome="completed"): 3 + 1,   # the 206 is a download too
                labels(update=self.big, outcome="cut"): 1},
            PREFIX + "range_requests_total": {labels(): 1},
            PREFIX + "request_duration_seconds_count": {labels(route="/"): 5, labels(route="/ls"): 4},
        })

        response_bytes = deltas(before, after, PREFIX + "response_bytes_total")
        for route, size in bodies.items():
            self.assertEqual(response_bytes.get(labels(route=route)), size, "response bytes of %s" % route)
        full = 3 * self.small_size + 100
        cut = response_bytes[labels(route="/update")] - full
        self.assertTrue(0 <= cut < self.BIG_SIZE // 2,
                        "the cut download counts the bytes that left, not its length: %d" % cut)
        self.assertEqual(deltas(before, after, PREFIX + "request_duration_seconds_bucket")[
            labels(route="/ls", le="+Inf")], 4)

        # bounded labels: no raw path, no query, no name of an update that is not offered
        self.assertNotIn(not_offered, after.label_values("update"))
        self.assertEqual(after.label_values("update"), {self.small, self.big})
        for text in ["no/such", "x=1", "1234567", "NONSENSE"]:
            self.assertNotIn(text, after.text)
        self.assertEqual(after.label_values("route") - ROUTES, set())

    def test_counters_lose_no_increment_under_concurrent_keep_alive_load(self):
        """8 keep-alive clients at once: one lost increment in 2,000 requests shows as a wrong total."""
        threads, per_thread = 8, 250
        before = self.scraper.baseline()
        version = self.get("/version").body
        errors, barrier = [], threading.Barrier(threads)

        def client():
            connection = http.client.HTTPConnection("127.0.0.1", self.server.port, timeout=30)
            try:
                barrier.wait(30)
                for index in range(per_thread):
                    path = "/version" if index % 2 else "/update/" + self.small
                    connection.request("GET", path)
                    answer = connection.getresponse()
                    body = answer.read()
                    if answer.status != 200 or answer.will_close:
                        errors.append((path, answer.status, answer.will_close))
                        return
                    if len(body) != (len(version) if index % 2 else self.small_size):
                        errors.append((path, len(body)))
            except Exception as error:  # the test asserts on it
                errors.append(repr(error))
            finally:
                connection.close()

        workers = [threading.Thread(target=client) for _ in range(threads)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join(120)
        self.assertEqual(errors, [])
        half = threads * per_thread // 2
        after = self.settle(self.scraper, before, {
            PREFIX + "requests_total": {labels(route="/version", status="200"): half + 1,
                                        labels(route="/update", status="200"): half},
            PREFIX + "update_downloads_total": {labels(update=self.small, outcome="completed"): half},
            PREFIX + "request_duration_seconds_count": {labels(route="/version"): half + 1},
        })
        response_bytes = deltas(before, after, PREFIX + "response_bytes_total")
        self.assertEqual(response_bytes[labels(route="/version")], (half + 1) * len(version))
        self.assertEqual(response_bytes[labels(route="/update")], half * self.small_size)
        self.assertEqual(deltas(before, after, PREFIX + "connections_accepted_total")[labels()],
                         threads + 1 + (after.scrapes_before - before.scrapes_before),
                         "one connection per keep-alive client, the /version one, and one per scrape")

    def test_promtool_accepts_the_output(self):
        """Prometheus' own linter (format and naming conventions) on output where every family has samples."""
        promtool = prometheus_tool("promtool")
        self.some_of_everything()
        body = self.scraper.get().body
        checked = subprocess.run([promtool, "check", "metrics"], input=body, stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT, timeout=60)
        self.assertEqual((checked.returncode, checked.stdout.decode(errors="replace")), (0, ""),
                         "promtool check metrics on:\n" + body.decode())


class ConnectionMetricsTest(MetricsTestCase):

    def test_refused_and_open_connections(self):
        """A client over max_connections_per_client is refused and counted; held connections show as open."""
        server = self.start_server(max_connections_per_client=2)
        scraper = Scraper(server.port)
        before = scraper.baseline()
        held = hold_connections(server.port, 2, source="127.0.0.3")
        try:
            refused = raw_exchange(server.port, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", source="127.0.0.3")
            self.assertEqual(status_of(refused), 503)
            after = self.settle(scraper, before, {
                PREFIX + "connections_refused_total": {labels(reason="client"): 1}})
            self.assertEqual(after.value(PREFIX + "connections_open"), 3, "the two held, and the scrape's own")
            self.assertEqual(deltas(before, after, PREFIX + "connections_accepted_total")[labels()],
                             2 + after.scrapes_before - before.scrapes_before,
                             "the held two and every scrape since `before`; not the refused one")
        finally:
            close_all(held)
        self.assertTrue(wait_until(lambda: scraper.scrape().value(PREFIX + "connections_open") == 1,
                                   SETTLE_SECONDS), "closed connections leave the gauge")


# Catalog gauges ---------------------------------------------------------------------------------------------

class CatalogMetricsTest(MetricsTestCase):

    def test_catalog_gauges_follow_the_folder(self):
        """The gauges an operator alerts on: what is offered and rejected, the newest VERSION, the folder's health."""
        make_update(self.updates, 5, mtime=time.time() - 60)
        make_update(self.updates, 7, mtime=time.time() - 60)
        publish(os.path.join(self.updates, "opq-box-update-9.tar.bz2"), b"BZh9junk", mtime=time.time() - 60)
        server = self.start_server()
        scraper = Scraper(server.port)
        first = scraper.scrape()
        gauges = {name: first.value(PREFIX + name) for name in
                  ["updates_offered", "updates_rejected", "updates_waiting", "updates_unsigned",
                   "latest_version", "updates_folder_ok"]}
        self.assertEqual(gauges, {"updates_offered": 2, "updates_rejected": 1, "updates_waiting": 0,
                                  "updates_unsigned": 0, "latest_version": 7, "updates_folder_ok": 1},
                         "the corrupt archive is rejected, so it is not the newest version")
        self.assertGreater(first.value(PREFIX + "check_seconds_total"), 0)
        since = first.value(PREFIX + "folder_unchanged_seconds")
        self.assertTrue(0 <= since <= time.time() - first.value("process_start_time_seconds") + 1, since)
        self.assertTrue(wait_until(lambda: scraper.scrape().value(PREFIX + "folder_unchanged_seconds")
                                   >= since + 1, 10), "the age grows while the folder stands still: from %s to %s\n%s"
                        % (since, scraper.scrape().value(PREFIX + "folder_unchanged_seconds"), server.log()))

        grown = scraper.scrape().value(PREFIX + "folder_unchanged_seconds")
        make_update(self.updates, 11)
        self.assertTrue(wait_until(lambda: scraper.scrape().value(PREFIX + "latest_version") == 11, 30),
                        "%s\n%s" % (sorted(os.listdir(self.updates)), server.log()))
        now = scraper.scrape()
        self.assertEqual(now.value(PREFIX + "updates_offered"), 3)
        self.assertLess(now.value(PREFIX + "folder_unchanged_seconds"), grown, "a change resets the age")

        away = self.updates + ".away"
        os.rename(self.updates, away)
        self.assertTrue(wait_until(lambda: scraper.scrape().value(PREFIX + "updates_folder_ok") == 0, 10),
                        "a folder that cannot be read shows as updates_folder_ok 0")
        os.rename(away, self.updates)
        self.assertTrue(wait_until(lambda: scraper.scrape().value(PREFIX + "updates_folder_ok") == 1, 10))
        self.assertTrue(wait_until(lambda: scraper.scrape().value(PREFIX + "updates_offered") == 3, 30))

    def test_folder_unchanged_seconds_is_not_seconds_since_the_epoch_for_an_empty_folder(self):
        """An empty folder never changes: its age must still count from no earlier than the server's start."""
        server = self.start_server()
        scrape = Scraper(server.port).scrape()
        self.assertEqual((scrape.value(PREFIX + "updates_offered"), scrape.value(PREFIX + "latest_version")), (0, 0))
        uptime = time.time() - scrape.value("process_start_time_seconds")
        self.assertLessEqual(scrape.value(PREFIX + "folder_unchanged_seconds"), uptime + 1)


# Who may read the metrics -----------------------------------------------------------------------------------

class MetricsAccessTest(TempDirTestCase):
    """metrics_allow is judged on the client: the peer, or behind trusted proxies the right-most untrusted hop."""

    def metrics_status(self, server, source, headers=None):
        answer = request(server.port, "GET", "/metrics", headers, source=source)
        if answer.status == 200:
            self.assertIn(b"# TYPE " + PREFIX.encode(), answer.body)
        else:
            self.assertNotIn(PREFIX.encode(), answer.body, "a refused client learns nothing of the metrics")
        return answer.status

    def test_loopback_may_read_by_default(self):
        server = self.start_server()
        for source in ["127.0.0.1", "127.0.0.9"]:
            self.assertEqual(self.metrics_status(server, source), 200)

    def test_a_client_outside_metrics_allow_gets_404(self):
        server = self.start_server(metrics_allow=["10.0.0.0/8"])
        answer = request(server.port, "GET", "/metrics")
        self.assertEqual((answer.status, answer.body), (404, b"Resource not found."),
                         "the same answer as a path that does not exist")
        self.assertEqual(self.metrics_status(server, "127.0.0.1"), 404)
        self.assertEqual(request(server.port, "GET", "/").status, 200, "only /metrics is restricted")

    def test_behind_a_trusted_proxy_the_forwarded_client_is_judged(self):
        server = self.start_server(trusted_proxies=["127.0.0.1"], metrics_allow=["127.0.0.0/8"])
        cases = [
            ({"X-Forwarded-For": "203.0.113.7"}, 404),               # a public client through the proxy
            ({"X-Forwarded-For": "127.0.0.5"}, 200),
            ({"X-Forwarded-For": "127.0.0.5, 203.0.113.7"}, 404),    # the left part is the client's to write
            ({"Forwarded": "for=203.0.113.7"}, 200),                 # not the header it writes (forwarded_header)
            ({}, 200),                                               # the proxy itself, forwarding no one
        ]
        for headers, status in cases:
            with self.subTest(headers=headers):
                self.assertEqual(self.metrics_status(server, "127.0.0.1", headers), status)

    def test_forwarding_headers_from_an_untrusted_peer_are_ignored(self):
        server = self.start_server(trusted_proxies=["127.0.0.1"], metrics_allow=["10.0.0.0/8"])
        self.assertEqual(self.metrics_status(server, "127.0.0.1", {"X-Forwarded-For": "10.1.1.1"}), 200,
                         "through the trusted proxy, 10.1.1.1 may read")
        for headers in [{"X-Forwarded-For": "10.1.1.1"}, {"Forwarded": "for=10.1.1.1"}]:
            with self.subTest(headers=headers):
                self.assertEqual(self.metrics_status(server, "127.0.0.2", headers), 404,
                                 "127.0.0.2 is no proxy: it cannot claim to be 10.1.1.1")


# A real Prometheus ------------------------------------------------------------------------------------------

PROMETHEUS_CONFIG = """\
global:
  scrape_interval: 1s
  evaluation_interval: 1s
scrape_configs:
  - job_name: box-update-server
    scrape_interval: 1s
    scrape_timeout: 1s
    static_configs:
      - targets: ["127.0.0.1:%d"]
"""


class PrometheusTest(TempDirTestCase):
    """The Debian package's Prometheus scrapes the server: up == 1, and the download counter it stores is ours.

    It runs on a free loopback port with its data in the test's folder, never the system's 9090 or
    /var/lib/prometheus.
    """

    @heavy
    def test_a_real_prometheus_scrapes_the_server(self):
        prometheus = prometheus_tool("prometheus")
        update = os.path.basename(make_update(self.updates, 1700000300, mtime=time.time() - 60))
        server = self.start_server()
        config = os.path.join(self.tmp, "prometheus.yml")
        with open(config, "w") as out:
            out.write(PROMETHEUS_CONFIG % server.port)
        port = free_port()     # --web.listen-address needs it before the start (a port 0 would not be logged)
        log = tempfile.TemporaryFile()
        self.addCleanup(log.close)
        process = track(subprocess.Popen(
            [prometheus, "--config.file=" + config, "--storage.tsdb.path=" + os.path.join(self.tmp, "tsdb"),
             "--web.listen-address=127.0.0.1:%d" % port, "--log.level=warn"],
            cwd=self.tmp, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT))
        self.addCleanup(self.stop_prometheus, process)

        def query(expression):
            url = "http://127.0.0.1:%d/api/v1/query?%s" % (port, urllib.parse.urlencode({"query": expression}))
            with urllib.request.urlopen(url, timeout=5) as answer:
                result = json.loads(answer.read().decode())["data"]["result"]
            return [float(sample["value"][1]) for sample in result]

        def output():
            log.seek(0)
            return log.read().decode(errors="replace")[-4000:]

        self.assertTrue(wait_until(lambda: process.poll() is None and query('up{job="box-update-server"}') == [1],
                                   60, interval=0.5), "Prometheus never saw the server up:\n" + output())
        downloads = 3
        for _ in range(downloads):
            self.assertEqual(request(server.port, "GET", "/update/" + update).status, 200)
        expression = 'box_update_server_update_downloads_total{job="box-update-server",update="%s",' \
                     'outcome="completed"}' % update
        self.assertTrue(wait_until(lambda: query(expression) == [downloads], 60, interval=0.5),
                        "Prometheus stored %s, not [%d]:\n%s" % (query(expression), downloads, output()))
        self.assertEqual(query('box_update_server_updates_offered{job="box-update-server"}'), [1])
        self.assertEqual(self.stop_prometheus(process), 0, "Prometheus stops cleanly on SIGTERM:\n" + output())

    @staticmethod
    def stop_prometheus(process):
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        return process.returncode


class ReadmeMonitoringTest(unittest.TestCase):
    """The README's scrape config and alert rules are what promtool accepts."""

    def test_scrape_config_and_alert_rules_pass_promtool(self):
        promtool = prometheus_tool("promtool")
        with open(os.path.join(ROOT, "README.md")) as readme:
            text = readme.read()
        blocks = dict(re.findall(r"```yaml\n# (\S+)\n(.*?)```", text, re.S))
        self.assertEqual(set(blocks), {"prometheus.yml", "box-update-server.rules.yml"})
        with tempfile.TemporaryDirectory() as folder:
            for name, content in blocks.items():
                with open(os.path.join(folder, name), "w") as out:
                    out.write(content)
            checked = subprocess.run([promtool, "check", "config", "prometheus.yml"], cwd=folder,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=60)
        self.assertEqual(checked.returncode, 0, checked.stdout.decode())
        self.assertIn("SUCCESS: 4 rules found", checked.stdout.decode())


if __name__ == "__main__":
    unittest.main()
