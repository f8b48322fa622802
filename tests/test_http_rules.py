"""The HTTP rules of the server's section 5 (RFC 9110, RFC 9112, RFC 7239, RFC 9530), as pure functions: no sockets."""

import base64
import email.utils
import hashlib
import ipaddress
import time
import unittest

import support
import box_update_server as bus

del support  # imported only so that sys.path holds the repository root

ETAG = '"abc-1"'
MODIFIED = 1700000000
SIZE = 100
RFC_DATE = 784111777  # Sun, 06 Nov 1994 08:49:37 GMT, the example of RFC 9110 §5.6.7


def http_date(seconds):
    return email.utils.formatdate(seconds, usegmt=True)


def parse_head(request_line, header_lines):
    """A whole request head, as the handler reads it: the request line, then the header section."""
    return bus.request_head(*bus.parse_request_line(request_line), header_lines)


class BadRequestAssertions(unittest.TestCase):
    """Shared assertion: the function raises BadRequest with the given status."""

    def assertBadRequest(self, status, function, *args):
        with self.assertRaises(bus.BadRequest) as caught:
            function(*args)
        self.assertEqual(caught.exception.status, status)
        self.assertTrue(caught.exception.reason)
        return caught.exception


class RequestLineTextTest(BadRequestAssertions):
    """RFC 9112 §2.2: a line ends in CRLF or a bare LF; a bare CR anywhere else is invalid."""

    def test_line_endings_are_stripped_and_bytes_read_as_latin_1(self):
        cases = [(b"GET / HTTP/1.1\r\n", "GET / HTTP/1.1"),
                 (b"GET / HTTP/1.1\n", "GET / HTTP/1.1"),
                 (b"Host: box\r\n", "Host: box"),
                 (b"Host: box\n", "Host: box"),
                 (b"GET / HTTP/1.1", "GET / HTTP/1.1"),              # no ending: the caller's business
                 (b"Host: box \t\r\n", "Host: box \t"),              # only the line ending goes
                 (b"GET /caf\xe9 HTTP/1.1\r\n", "GET /caf\u00e9 HTTP/1.1"),
                 (b"X: \x80\xff\r\n", "X: \x80\xff"),
                 (b"\r\n", ""),
                 (b"\n", "")]
        for raw, expected in cases:
            with self.subTest(raw=raw):
                self.assertEqual(bus.request_line_text(raw), expected)

    def test_a_bare_cr_is_rejected(self):
        for raw in [b"GET /\r HTTP/1.1\r\n", b"GET / HTTP/1.1\r", b"GET / HTTP/1.1\r\r\n", b"\rGET / HTTP/1.1\r\n",
                    b"Host: a\rX-Smuggled: b\n", b"Host: a\r\rb\r\n", b"\r"]:
            with self.subTest(raw=raw):
                self.assertBadRequest(400, bus.request_line_text, raw)


class ParseRequestLineTest(BadRequestAssertions):
    """RFC 9112 §3 and §2.3: method SP request-target SP HTTP-version, HTTP/1.x only."""

    def test_valid_request_lines(self):
        cases = {"GET / HTTP/1.1": ("GET", "/", "HTTP/1.1"),
                 "HEAD /ls HTTP/1.1": ("HEAD", "/ls", "HTTP/1.1"),
                 "GET /update/x.tar.bz2?a=b HTTP/1.0": ("GET", "/update/x.tar.bz2?a=b", "HTTP/1.0"),
                 "POST /ls HTTP/1.1": ("POST", "/ls", "HTTP/1.1"),
                 "OPTIONS * HTTP/1.1": ("OPTIONS", "*", "HTTP/1.1"),
                 "M-SEARCH * HTTP/1.1": ("M-SEARCH", "*", "HTTP/1.1"),
                 "GET http://box/ls HTTP/1.1": ("GET", "http://box/ls", "HTTP/1.1"),
                 "get / HTTP/1.1": ("get", "/", "HTTP/1.1"),      # a token: answered 405 later, not 400
                 "GET / HTTP/1.2": ("GET", "/", "HTTP/1.1"),      # a later minor version reads as 1.1
                 "GET / HTTP/1.9": ("GET", "/", "HTTP/1.1")}
        for line, expected in cases.items():
            with self.subTest(line=line):
                self.assertEqual(bus.parse_request_line(line), expected)

    def test_malformed_request_lines_are_400(self):
        for line in ["", "GET", "GET /", "GET / HTTP/1.1 extra", "GET / HTTP/1.1 ", " GET / HTTP/1.1",
                     "GET  / HTTP/1.1", "GET /  HTTP/1.1", "GET\t/\tHTTP/1.1", "GET / \tHTTP/1.1"]:
            with self.subTest(line=line):
                self.assertBadRequest(400, bus.parse_request_line, line)

    def test_other_versions_are_400(self):
        for version in ["HTTP/2.0", "HTTP/0.9", "HTTP/01.01", "HTTP/1", "http/1.1", "HTTPS/1.1", "HTTP/1.1.1",
                        "HTTP/1.10", "HTTP/3", "HTTP/1.1\r", "HTTP/ 1.1", "HTTP/1.x"]:
            with self.subTest(version=version):
                self.assertBadRequest(400, bus.parse_request_line, "GET / " + version)
        self.assertBadRequest(400, bus.parse_request_line, "PRI * HTTP/2.0")  # the HTTP/2 preface, RFC 9113 §3.4

    def test_methods_that_are_not_tokens_are_400(self):
        for method in ["G\u00c9T", "G(T", "G)T", 'G"T', "G:T", "G/T", "G,T", "G;T", "G@T", "G\x00T", "G\x7fT", "{GET}"]:
            with self.subTest(method=method):
                self.assertBadRequest(400, bus.parse_request_line, method + " / HTTP/1.1")


class ParseHeaderFieldsTest(BadRequestAssertions):
    """RFC 9112 §5 and RFC 9110 §5.3, §5.5: field lines, strictly."""

    def test_values_by_lower_case_name_with_counts(self):
        headers, counts = bus.parse_header_fields(["Host: box", "Accept: */*", "CONTENT-LENGTH: 0", "range: bytes=0-"])
        self.assertEqual(headers, {"host": "box", "accept": "*/*", "content-length": "0", "range": "bytes=0-"})
        self.assertEqual(counts, {"host": 1, "accept": 1, "content-length": 1, "range": 1})
        self.assertEqual(bus.parse_header_fields([]), ({}, {}))

    def test_repeated_names_are_joined_and_counted(self):
        headers, counts = bus.parse_header_fields(["X-A: 1", "Host: box", "x-a: 2", "X-a:3"])
        self.assertEqual(headers, {"x-a": "1, 2, 3", "host": "box"})
        self.assertEqual(counts, {"x-a": 3, "host": 1})

    def test_ows_around_values_is_stripped(self):
        cases = {"X: value": "value", "X:value": "value", "X: \t value \t ": "value", "X: a \t b": "a \t b",
                 "X:": "", "X: \t ": "", "Host: [::1]:8080": "[::1]:8080", "X: caf\u00e9\x80": "caf\u00e9\x80",
                 "X: a:b: c": "a:b: c"}
        for line, expected in cases.items():
            with self.subTest(line=line):
                headers, _ = bus.parse_header_fields([line])
                self.assertEqual(headers, {"x": expected} if line.startswith("X") else {"host": expected})

    def test_obsolete_line_folding_is_400(self):
        for lines in [[" X: y"], ["\tX: y"], ["Host: a", " continued"], ["Host: a", "\tcontinued"],
                      ["Host: a", " Content-Length: 5"]]:
            with self.subTest(lines=lines):
                error = self.assertBadRequest(400, bus.parse_header_fields, lines)
                # RFC 9112 §5.2: reject "preferably with a representation explaining that obsolete line folding is
                # unacceptable"; the reason is the 400's body.
                self.assertIn("fold", error.reason.lower())

    def test_malformed_field_lines_are_400(self):
        for line in ["NoColon", "", "Content-Length : 5", "Host\t: x", "Host : x", ": x", ":", "X Y: z", "X(: z",
                     "G\u00e9: z", "X\x00: y", "X-\u00e9tag: y", "\"X\": y"]:
            with self.subTest(line=line):
                self.assertBadRequest(400, bus.parse_header_fields, ["Host: box", line])

    def test_nul_cr_and_lf_in_a_value_are_400(self):
        for line in ["X: a\x00b", "X: a\rb", "X: a\nb", "X: a\x00", "X: \r", "X: a\r\nY: b"]:
            with self.subTest(line=line):
                self.assertBadRequest(400, bus.parse_header_fields, [line])


class CheckFramingTest(BadRequestAssertions):
    """RFC 9112 §3.2 (Host), §6.1 and §6.3 (message body length), §9.3 (persistence)."""

    def framing(self, version, *lines):
        headers, counts = bus.parse_header_fields(lines)
        return bus.check_framing(version, headers, counts)

    def check_cases(self, cases):
        for version, lines, expected in cases:
            with self.subTest(version=version, lines=lines):
                if isinstance(expected, bool):
                    self.assertIs(self.framing(version, *lines), expected)
                else:
                    self.assertBadRequest(expected, self.framing, version, *lines)

    def test_host(self):
        self.check_cases([
            ("HTTP/1.1", [], 400),
            ("HTTP/1.1", ["Accept: */*"], 400),
            ("HTTP/1.1", ["Host: a", "Host: a"], 400),
            ("HTTP/1.1", ["Host: a", "Host: b"], 400),
            ("HTTP/1.0", ["Host: a", "Host: b"], 400),
            ("HTTP/1.0", ["Host: a", "host: a"], 400),
            ("HTTP/1.0", [], False),                # HTTP/1.0 need not send Host
            ("HTTP/1.1", ["Host: box"], True),
            ("HTTP/1.1", ["HOST: box"], True),
            ("HTTP/1.1", ["Host:"], True),          # empty when the target URI has no authority (RFC 9112 §3.2)
        ])

    def test_transfer_encoding_with_content_length_is_400(self):
        self.check_cases([
            ("HTTP/1.1", ["Host: a", "Transfer-Encoding: chunked", "Content-Length: 5"], 400),
            ("HTTP/1.1", ["Host: a", "Content-Length: 5", "Transfer-Encoding: chunked"], 400),
            ("HTTP/1.1", ["Host: a", "Content-Length: 0", "Transfer-Encoding: chunked"], 400),
            ("HTTP/1.0", ["Transfer-Encoding: chunked", "Content-Length: 5"], 400),
            ("HTTP/1.1", ["Host: a", "Transfer-Encoding: gzip, chunked", "Content-Length: 5"], 400),
        ])

    def test_repeated_or_invalid_content_length_is_400(self):
        cases = [("HTTP/1.1", ["Host: a", "Content-Length: 0", "Content-Length: 5"], 400),
                 ("HTTP/1.1", ["Host: a", "Content-Length: 5", "Content-Length: 5"], 400),
                 ("HTTP/1.1", ["Host: a", "Content-Length: 0", "Content-Length: 0"], 400),
                 ("HTTP/1.0", ["Content-Length: 5", "content-length: 5"], 400)]
        for value in ["-1", "abc", "1.0", "0x10", "+5", "5, 5", "5,5", "", "1_000", "1e3", "\u00b2", "\u0665",
                      "5 5"]:
            cases.append(("HTTP/1.1", ["Host: a", "Content-Length: " + value], 400))
        self.check_cases(cases)

    def test_repetition_is_judged_by_count_not_by_the_joined_value(self):
        # As a head whose repeated field kept one value would reach check_framing: the counts alone must refuse it.
        for headers, counts in [({"host": "a", "content-length": "5"}, {"host": 1, "content-length": 2}),
                                ({"host": "a", "content-length": "0"}, {"host": 1, "content-length": 2}),
                                ({"host": "a"}, {"host": 2})]:
            with self.subTest(headers=headers, counts=counts):
                self.assertBadRequest(400, bus.check_framing, "HTTP/1.1", headers, counts)

    def test_content_length(self):
        self.check_cases([
            ("HTTP/1.1", ["Host: a", "Content-Length: 5"], False),   # a body we never read: close after answering
            ("HTTP/1.1", ["Host: a", "Content-Length: 99999999999999999999"], False),
            ("HTTP/1.1", ["Host: a", "Content-Length: 0"], True),
            ("HTTP/1.1", ["Host: a", "Content-Length: 00"], True),
            ("HTTP/1.0", ["Content-Length: 0"], False),
            ("HTTP/1.0", ["Content-Length: 0", "Connection: keep-alive"], True),
            ("HTTP/1.0", ["Content-Length: 5", "Connection: keep-alive"], False),
            ("HTTP/1.1", ["Host: a", "Content-Length: 5", "Connection: keep-alive"], False),
        ])

    def test_transfer_encoding(self):
        self.check_cases([
            ("HTTP/1.1", ["Host: a", "Transfer-Encoding: chunked"], False),   # close after answering
            ("HTTP/1.1", ["Host: a", "Transfer-Encoding: Chunked"], False),
            ("HTTP/1.1", ["Host: a", "Transfer-Encoding: chunked", "Connection: keep-alive"], False),
            ("HTTP/1.0", ["Transfer-Encoding: chunked", "Connection: keep-alive"], False),  # RFC 9112 §6.1
            ("HTTP/1.1", ["Host: a", "Transfer-Encoding: , chunked"], 400),
            ("HTTP/1.1", ["Host: a", "Transfer-Encoding:"], 400),
            ("HTTP/1.1", ["Host: a", "Transfer-Encoding: chunked, gzip"], 400),
            ("HTTP/1.1", ["Host: a", "Transfer-Encoding: gzip"], 400),
            ("HTTP/1.1", ["Host: a", "Transfer-Encoding: identity"], 400),
            ("HTTP/1.1", ["Host: a", "Transfer-Encoding: chunked,"], 400),
            ("HTTP/1.1", ["Host: a", "Transfer-Encoding: xchunked"], 400),
            ("HTTP/1.1", ["Host: a", "Transfer-Encoding: gzip, chunked"], 501),
            ("HTTP/1.1", ["Host: a", "Transfer-Encoding: GZIP ,chunked"], 501),
            ("HTTP/1.1", ["Host: a", "Transfer-Encoding: gzip", "Transfer-Encoding: chunked"], 501),
        ])

    def test_connection_options(self):
        self.check_cases([
            ("HTTP/1.0", [], False),
            ("HTTP/1.0", ["Connection: keep-alive"], True),
            ("HTTP/1.0", ["Connection: Keep-Alive"], True),
            ("HTTP/1.0", ["Connection: Keep-Alive, foo"], True),
            ("HTTP/1.0", ["Connection: foo,keep-alive"], True),
            ("HTTP/1.0", ["Connection: foo", "Connection: KEEP-ALIVE"], True),
            ("HTTP/1.0", ["Connection: keep-alive-please"], False),
            ("HTTP/1.0", ["Connection: close"], False),
            ("HTTP/1.0", ["Keep-Alive: timeout=5"], False),
            ("HTTP/1.1", ["Host: a"], True),
            ("HTTP/1.1", ["Host: a", "Connection: keep-alive"], True),
            ("HTTP/1.1", ["Host: a", "Connection: close"], False),
            ("HTTP/1.1", ["Host: a", "Connection: Close"], False),
            ("HTTP/1.1", ["Host: a", "Connection: foo, close"], False),
            ("HTTP/1.1", ["Host: a", "Connection: keep-alive", "Connection: close"], False),
            ("HTTP/1.1", ["Host: a", "Connection: closed"], True),
        ])

    def test_close_wins_over_keep_alive_in_http_1_0(self):
        # RFC 9112 §9.3: "If the "close" connection option is present, the connection will not persist after the
        # current response; else, [...] If the received protocol is HTTP/1.0, the "keep-alive" connection option is
        # present [...], the connection will persist".  close is looked at first, whatever the version.
        self.check_cases([
            ("HTTP/1.0", ["Connection: keep-alive, close"], False),
            ("HTTP/1.0", ["Connection: close", "Connection: keep-alive"], False),
        ])

    def test_an_invalid_host_value_is_400(self):
        # RFC 9112 §3.2: "A server MUST respond with a 400 (Bad Request) status code to any HTTP/1.1 request
        # message that lacks a Host header field and to any request message that contains more than one Host
        # header field line or a Host header field with an invalid field value."  Host = uri-host [ ":" port ].
        self.check_cases([("HTTP/1.1", ["Host: " + value], 400)
                          for value in ["exa mple.org", "example.org/ls", "user@example.org", "example.org:http",
                                        "[::1", "example.org?x", "example.org#x"]])


class ParseRequestHeadTest(BadRequestAssertions):
    """RFC 9112 §2.1 and §11.2: the whole head, and the request-smuggling shapes it must refuse."""

    def test_a_normal_head(self):
        head = parse_head("GET /update/x.tar.bz2?y=1 HTTP/1.1",
                          ["Host: box", "User-Agent: Wget/1.21", "Range: bytes=10-", "X-A: 1", "x-a: 2"])
        self.assertIsInstance(head, bus.RequestHead)
        self.assertEqual(head, bus.RequestHead("GET", "/update/x.tar.bz2?y=1", "HTTP/1.1",
                                               {"host": "box", "user-agent": "Wget/1.21", "range": "bytes=10-",
                                                "x-a": "1, 2"}, True))
        self.assertEqual((head.method, head.target, head.version, head.keep_alive),
                         ("GET", "/update/x.tar.bz2?y=1", "HTTP/1.1", True))

    def test_an_http_1_0_head(self):
        self.assertEqual(parse_head("HEAD /ls HTTP/1.0", []),
                         bus.RequestHead("HEAD", "/ls", "HTTP/1.0", {}, False))
        self.assertEqual(parse_head("HEAD /ls HTTP/1.0", ["Connection: keep-alive"]),
                         bus.RequestHead("HEAD", "/ls", "HTTP/1.0", {"connection": "keep-alive"}, True))
        self.assertFalse(parse_head("GET / HTTP/1.1", ["Host: a", "Connection: close"]).keep_alive)

    def test_each_part_is_checked(self):
        self.assertBadRequest(400, parse_head, "GET / HTTP/2.0", ["Host: a"])
        self.assertBadRequest(400, parse_head, "GET / HTTP/1.1", ["Host: a", " folded"])
        self.assertBadRequest(400, parse_head, "GET / HTTP/1.1", [])
        self.assertBadRequest(501, parse_head, "GET / HTTP/1.1",
                              ["Host: a", "Transfer-Encoding: br, chunked"])

    def test_request_smuggling_shapes_are_400(self):
        cases = {"two Content-Length, 0 then N": ["Host: a", "Content-Length: 0", "Content-Length: 44"],
                 "empty Transfer-Encoding, then chunked": ["Host: a", "Transfer-Encoding:",
                                                           "Transfer-Encoding: chunked"],
                 "a line without a colon before Content-Length": ["Host: a", "X-Junk", "Content-Length: 5"],
                 "space before the colon": ["Host: a", "Content-Length : 5"],
                 "space before the colon of Transfer-Encoding": ["Host: a", "Transfer-Encoding : chunked"],
                 "tab before the colon": ["Host: a", "Content-Length\t: 5"],
                 "folded Content-Length": ["Host: a", "Content-Length:", " 5"],
                 "Transfer-Encoding and Content-Length": ["Host: a", "Transfer-Encoding: chunked", "Content-Length: 3"],
                 "CR inside a value": ["Host: a", "X: a\rContent-Length: 5"],
                 "two Host": ["Host: a", "Host: b"]}
        for shape, lines in cases.items():
            with self.subTest(shape=shape):
                self.assertBadRequest(400, parse_head, "GET / HTTP/1.1", lines)


class RequestPathTest(unittest.TestCase):
    """RFC 9112 §3.2: origin-form and absolute-form targets, without query or fragment."""

    def test_paths(self):
        cases = {"/": "/", "/ls": "/ls", "/ls?box=7": "/ls", "/latest#x": "/latest", "/a?b#c": "/a", "/a#b?c": "/a",
                 "/?x": "/", "/update/x.tar.bz2": "/update/x.tar.bz2", "*": "*",
                 "http://example.org/version?a": "/version", "https://example.org:8443/update/x#f": "/update/x",
                 "http://example.org": "/", "http://example.org?x": "/", "http://[::1]:8080/ls": "/ls",
                 "http://[::1": ""}
        for target, expected in cases.items():
            with self.subTest(target=target):
                self.assertEqual(bus.request_path(target), expected)

    def test_absolute_form_scheme_is_case_insensitive(self):
        # RFC 9110 §4.2.3: "The scheme and host are case-insensitive"; RFC 9112 §3.2.2: "A server MUST accept the
        # absolute-form in requests".
        for target in ["HTTP://example.org/version", "Https://example.org/version?a"]:
            with self.subTest(target=target):
                self.assertEqual(bus.request_path(target), "/version")


class ClientAddressTest(unittest.TestCase):
    """RFC 7239 §4-§6 and X-Forwarded-For: who sent a request, believed only from trusted proxies."""

    TRUSTED = (ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("fd00::/8"))
    XFF, FORWARDED = "X-Forwarded-For", "Forwarded"

    def test_parse_address(self):
        cases = {"192.0.2.1": ipaddress.IPv4Address("192.0.2.1"), " 192.0.2.1 ": ipaddress.IPv4Address("192.0.2.1"),
                 "2001:db8::1": ipaddress.IPv6Address("2001:db8::1"), "::1": ipaddress.IPv6Address("::1"),
                 "::ffff:10.0.0.1": ipaddress.IPv4Address("10.0.0.1"),
                 "::ffff:a00:1": ipaddress.IPv4Address("10.0.0.1"),
                 "fe80::1%eth0": ipaddress.IPv6Address("fe80::1"),                 # a socket's zone is dropped
                 "garbage": None, "": None, "unknown": None, "10.0.0.1:80": None, "[2001:db8::1]": None,
                 "999.0.0.1": None, "_hidden": None,
                 "010.0.0.1": None, "10.0.0.01": None, "::ffff:10.0.0.01": None}  # octal to some parsers
        for text, expected in cases.items():
            with self.subTest(text=text):
                self.assertEqual(bus.parse_address(text), expected)

    def test_in_networks(self):
        cases = [("10.1.2.3", True), ("192.0.2.1", False), ("fd12::1", True), ("2001:db8::1", False),
                 ("::ffff:10.1.2.3", True), ("::ffff:192.0.2.1", False), ("garbage", False)]
        for text, expected in cases:
            with self.subTest(text=text):
                self.assertIs(bus.in_networks(bus.parse_address(text), self.TRUSTED), expected)
        self.assertFalse(bus.in_networks(None, self.TRUSTED))
        self.assertFalse(bus.in_networks(ipaddress.ip_address("10.0.0.1"), ()))

    def test_client_group_is_an_ipv6_prefix(self):
        cases = [("192.0.2.7", 64, "192.0.2.7"), ("2001:db8:1:2:aaaa::1", 64, "2001:db8:1:2::/64"),
                 ("2001:db8:1:2:ffff:ffff:ffff:ffff", 64, "2001:db8:1:2::/64"),
                 ("2001:db8:1:2:aaaa::1", 56, "2001:db8:1::/56"), ("2001:db8::1", 128, "2001:db8::1/128"),
                 ("::ffff:192.0.2.7", 64, "192.0.2.7")]
        for text, prefix, expected in cases:
            with self.subTest(text=text, prefix=prefix):
                self.assertEqual(bus.client_group(bus.parse_address(text), prefix), expected)

    def test_node_address(self):
        """RFC 7239 §6 nodes, and what nginx writes: an address with a port is that address; anything else is None."""
        v4, v6 = ipaddress.IPv4Address("203.0.113.7"), ipaddress.IPv6Address("2001:db8::1")
        cases = {"203.0.113.7": v4, "203.0.113.7:51234": v4, "203.0.113.7:_obf": v4, "[2001:db8::1]:443": v6,
                 "[2001:db8::1]": v6, "2001:db8::1": v6, "[2001:db8::1]:_x.y-z": v6, "::ffff:203.0.113.7": v4,
                 "[::ffff:203.0.113.7]:80": v4,
                 "unknown": None, "_hidden": None, "_SEVKISEK": None, "": None, "[203.0.113.7]": None,
                 "203.0.113.7:": None, "203.0.113.7:123456": None, "[2001:db8::1]:": None, "2001:db8::1]:443": None,
                 '"203.0.113.7"': None, "203.0.113.7:80:80": None, "host.example": None, "0203.0.113.7": None}
        for text, expected in cases.items():
            with self.subTest(text=text):
                self.assertEqual(bus.node_address(text), expected)

    def test_forwarded_for(self):
        cases = [({}, self.XFF, []),
                 ({"x-forwarded-for": "203.0.113.7"}, self.XFF, ["203.0.113.7"]),
                 ({"x-forwarded-for": "203.0.113.7, 10.0.0.2 ,10.0.0.3"}, self.XFF,
                  ["203.0.113.7", "10.0.0.2", "10.0.0.3"]),
                 ({"x-forwarded-for": " , 203.0.113.7,,"}, self.XFF, ["203.0.113.7"]),   # RFC 9110 §5.6.1.2
                 ({"x-forwarded-for": "[2001:db8::1]:443, unknown"}, self.XFF, ["[2001:db8::1]:443", "unknown"]),
                 ({"forwarded": "for=192.0.2.60;proto=http;by=203.0.113.43"}, self.FORWARDED, ["192.0.2.60"]),
                 ({"forwarded": "proto=https;For=192.0.2.60"}, self.FORWARDED, ["192.0.2.60"]),
                 ({"forwarded": 'for="192.0.2.60:8080"'}, self.FORWARDED, ["192.0.2.60:8080"]),
                 ({"forwarded": 'for="[2001:db8:cafe::17]:4711"'}, self.FORWARDED, ["[2001:db8:cafe::17]:4711"]),
                 ({"forwarded": 'for="_gazonk"'}, self.FORWARDED, ["_gazonk"]),
                 ({"forwarded": "for=192.0.2.43, for=198.51.100.17"}, self.FORWARDED, ["192.0.2.43", "198.51.100.17"]),
                 ({"forwarded": 'for=192.0.2.43,for="[2001:db8:cafe::17]:4711";proto=https'}, self.FORWARDED,
                  ["192.0.2.43", "[2001:db8:cafe::17]:4711"]),
                 ({"forwarded": "for=192.0.2.43 ; proto=http , for=198.51.100.17"}, self.FORWARDED,
                  ["192.0.2.43", "198.51.100.17"]),
                 ({"forwarded": "for=2001:db8::1"}, self.FORWARDED, ["2001:db8::1"]),    # nginx "for=$remote_addr"
                 ({"forwarded": 'for="a,b;c", for=192.0.2.43'}, self.FORWARDED, ["a,b;c", "192.0.2.43"]),
                 ({"forwarded": r'for="\"x\\"'}, self.FORWARDED, ['"x\\']),                  # quoted-pair
                 ({"forwarded": ", ,for=192.0.2.43,"}, self.FORWARDED, ["192.0.2.43"]),
                 # every element is a hop: one that names no one, or that cannot be read, is "" (no address)
                 ({"forwarded": "by=10.0.0.1;proto=https"}, self.FORWARDED, [""]),
                 ({"forwarded": "for=192.0.2.43;for=192.0.2.44"}, self.FORWARDED, [""]),
                 ({"forwarded": 'for=192.0.2.43, for="198.51.100.17'}, self.FORWARDED, ["192.0.2.43", ""]),
                 ({"forwarded": 'for="x, for=192.0.2.43'}, self.FORWARDED, [""]),   # a quote swallows the comma
                 ({"forwarded": "for = 192.0.2.43"}, self.FORWARDED, [""]),
                 ({"forwarded": "garbage, for=192.0.2.43"}, self.FORWARDED, [""]),    # past it nothing is sure
                 # only the header named is read, never whichever is present
                 ({"x-forwarded-for": "198.51.100.1", "forwarded": "for=192.0.2.60"}, self.XFF, ["198.51.100.1"]),
                 ({"x-forwarded-for": "198.51.100.1", "forwarded": "for=192.0.2.60"}, self.FORWARDED, ["192.0.2.60"]),
                 ({"x-forwarded-for": "198.51.100.1"}, self.FORWARDED, []),
                 ({"forwarded": "for=192.0.2.60"}, self.XFF, [])]
        for headers, header, expected in cases:
            with self.subTest(headers=headers, header=header):
                self.assertEqual(bus.forwarded_for(headers, header), expected)

    def test_forwarded_is_read_in_linear_time(self):
        """Header values reach 32 KB: no pattern may backtrack over spaces (' ' * 30000 took 9 s once)."""
        for value in [" " * 30000 + '"', " ;" * 15000 + '"', "a=b" + " " * 30000 + '"', "for=1;" * 5000 + " x",
                      ", " * 15000 + '"', 'for="' + "\\a" * 10000, "for=1," * 5000]:
            with self.subTest(value=value[:12]):
                started = time.monotonic()
                bus.forwarded_for({"forwarded": value}, self.FORWARDED)
                self.assertLess(time.monotonic() - started, 0.5)

    def test_without_trusted_proxies_the_peer_is_the_client(self):
        spoofs = [{}, {"x-forwarded-for": "198.51.100.1"}, {"forwarded": "for=198.51.100.1"},
                  {"x-forwarded-for": "10.0.0.5, 198.51.100.1"}, {"x-forwarded-for": "unknown"}]
        for peer, trusted in [("203.0.113.9", ()), ("203.0.113.9", self.TRUSTED), ("10.0.0.1", ()),
                              ("2001:db8::9", self.TRUSTED)]:
            for headers in spoofs:
                for header in (self.XFF, self.FORWARDED):
                    with self.subTest(peer=peer, trusted=trusted, headers=headers, header=header):
                        self.assertEqual(bus.client_behind_proxies(peer, headers, trusted, header), peer)

    def test_behind_trusted_proxies(self):
        unknown = bus.UNKNOWN_CLIENT
        cases = [("10.0.0.1", {}, self.XFF, "10.0.0.1"),                          # the proxy, forwarding no one
                 ("10.0.0.1", {"x-forwarded-for": "198.51.100.1"}, self.XFF, "198.51.100.1"),
                 ("10.0.0.1", {"x-forwarded-for": "198.51.100.1, 203.0.113.5"}, self.XFF, "203.0.113.5"),  # a claim
                 ("10.0.0.1", {"x-forwarded-for": "198.51.100.1, 203.0.113.5, 10.0.0.7"}, self.XFF, "203.0.113.5"),
                 ("10.0.0.1", {"x-forwarded-for": "198.51.100.1, 10.0.0.8, 10.0.0.7"}, self.XFF, "198.51.100.1"),
                 ("10.0.0.1", {"x-forwarded-for": "10.0.0.9, 10.0.0.8"}, self.XFF, "10.0.0.9"),      # all trusted
                 ("10.0.0.1", {"x-forwarded-for": "198.51.100.1, garbage, 10.0.0.7"}, self.XFF, unknown),
                 ("10.0.0.1", {"x-forwarded-for": "198.51.100.1, garbage"}, self.XFF, unknown),
                 ("10.0.0.1", {"x-forwarded-for": "garbage, 198.51.100.1"}, self.XFF, "198.51.100.1"),
                 ("10.0.0.1", {"x-forwarded-for": "unknown"}, self.XFF, unknown),
                 ("10.0.0.1", {"x-forwarded-for": ""}, self.XFF, "10.0.0.1"),
                 ("10.0.0.1", {"x-forwarded-for": "203.0.113.7:51234"}, self.XFF, "203.0.113.7"),
                 ("10.0.0.1", {"x-forwarded-for": "[2001:db8::1]:443"}, self.XFF, "2001:db8::1"),
                 ("10.0.0.1", {"x-forwarded-for": "10.0.0.5:8080"}, self.XFF, "10.0.0.5"),     # a trusted proxy
                 ("10.0.0.1", {"x-forwarded-for": "::ffff:198.51.100.1"}, self.XFF, "198.51.100.1"),
                 ("::ffff:10.0.0.1", {"x-forwarded-for": "198.51.100.1"}, self.XFF, "198.51.100.1"),   # mapped peer
                 ("::ffff:10.0.0.1", {}, self.XFF, "10.0.0.1"),
                 ("fd00::1", {"x-forwarded-for": "2001:db8::5"}, self.XFF, "2001:db8::5"),
                 ("10.0.0.1", {"forwarded": 'for="[2001:db8::1]:4711"'}, self.FORWARDED, "2001:db8::1"),
                 ("10.0.0.1", {"forwarded": 'for="198.51.100.1:8080", for=10.0.0.3'}, self.FORWARDED, "198.51.100.1"),
                 ("10.0.0.1", {"forwarded": "for=_hidden, for=10.0.0.3"}, self.FORWARDED, unknown),
                 ("10.0.0.1", {"forwarded": "for=unknown"}, self.FORWARDED, unknown),
                 ("10.0.0.1", {"forwarded": "for=_hidden"}, self.FORWARDED, unknown),
                 ("10.0.0.1", {"forwarded": "proto=https"}, self.FORWARDED, unknown),     # the proxy names no one
                 ("10.0.0.1", {"forwarded": 'for=198.51.100.1, for="203.0.113.7'}, self.FORWARDED, unknown),
                 # the header the proxy writes wins, whatever the client sent in the other
                 ("10.0.0.1", {"x-forwarded-for": "10.1.2.3", "forwarded": "for=192.0.2.60"}, self.FORWARDED,
                  "192.0.2.60"),
                 ("10.0.0.1", {"x-forwarded-for": "198.51.100.1", "forwarded": "for=10.1.2.3"}, self.XFF,
                  "198.51.100.1")]
        for peer, headers, header, expected in cases:
            with self.subTest(peer=peer, headers=headers, header=header):
                self.assertEqual(bus.client_behind_proxies(peer, headers, self.TRUSTED, header), expected)


class ParseRangeTest(unittest.TestCase):
    """RFC 9110 §14.1.2 byte ranges."""

    def test_satisfiable_ranges(self):
        cases = {"bytes=0-9": (0, 9), "bytes=10-": (10, 99), "bytes=-10": (90, 99), "bytes=90-500": (90, 99),
                 "bytes=-500": (0, 99), "BYTES = 5-5": (5, 5), "bytes=0-9,": (0, 9), "bytes=99-99": (99, 99),
                 "bytes=0-0": (0, 0), "bytes=-1": (99, 99), "bytes=-100": (0, 99), "bytes= 0-9 ": (0, 9)}
        for header, expected in cases.items():
            with self.subTest(header=header):
                self.assertEqual(bus.parse_range(header, SIZE), expected)

    def test_unsatisfiable_ranges(self):
        for header, size in [("bytes=100-", 100), ("bytes=100-200", 100), ("bytes=-0", 100), ("bytes=0-", 0),
                             ("bytes=101-", 100), ("bytes=0-0", 0)]:
            with self.subTest(header=header, size=size):
                with self.assertRaises(bus.RangeNotSatisfiable):
                    bus.parse_range(header, size)

    def test_a_suffix_range_of_an_empty_file_sends_it_whole(self):
        """RFC 9110 §14.1.1: for a zero-length representation a non-zero suffix-range is satisfiable."""
        self.assertIsNone(bus.parse_range("bytes=-5", 0))

    def test_malformed_or_multiple_ranges_are_ignored(self):
        for header in ["bytes=", "bytes=-", "bytes=a-b", "bytes=5-1", "items=0-9", "bytes 0-9", "bytes=0-9,20-29",
                       "bytes=\u0661-\u0662", "bytes=1.5-2", "bytes=--1", "bytes=0x10-", "", "bytes=1-2-3",
                       "bytes=0-9,100-", "bytes=+1-2", "bytes=0 - 9", "none=0-9"]:
            with self.subTest(header=header):
                self.assertIsNone(bus.parse_range(header, SIZE))


class EntityTagsTest(unittest.TestCase):
    """RFC 9110 §8.8.3 and §13.1.1: entity-tag lists."""

    def test_valid_lists(self):
        cases = {'"a"': [(False, '"a"')], 'W/"a"': [(True, '"a"')], '""': [(False, '""')],
                 '"a", W/"b" ,"c"': [(False, '"a"'), (True, '"b"'), (False, '"c"')], '"a",': [(False, '"a"')],
                 ' "a" ': [(False, '"a"')], '"caf\u00e9"': [(False, '"caf\u00e9"')], "": [],
                 '"a-1/b"': [(False, '"a-1/b"')]}
        for header, expected in cases.items():
            with self.subTest(header=header):
                self.assertEqual(bus.entity_tags(header), expected)

    def test_malformed_lists(self):
        for header in ["a", '"a', 'a"', '"a" "b"', 'w/"a"', '"a b"', '"a"b', "*", 'W/ "a"', '"a\x7f"', "W/a"]:
            with self.subTest(header=header):
                self.assertIsNone(bus.entity_tags(header))


class HttpDateTest(unittest.TestCase):
    """RFC 9110 §5.6.7: recipients accept IMF-fixdate, rfc850-date and asctime-date."""

    def test_the_three_formats(self):
        for header in ["Sun, 06 Nov 1994 08:49:37 GMT", "Sunday, 06-Nov-94 08:49:37 GMT", "Sun Nov  6 08:49:37 1994"]:
            with self.subTest(header=header):
                self.assertEqual(bus.http_date(header), RFC_DATE)
        self.assertEqual(bus.http_date(http_date(MODIFIED)), MODIFIED)

    def test_not_dates(self):
        for header in ["", "yesterday", "0", "Sun, 32 Foo 1994 25:61:61 GMT", "\x00"]:
            with self.subTest(header=header):
                self.assertIsNone(bus.http_date(header))


class ConditionTest(unittest.TestCase):
    """RFC 9110 §13.1.1-§13.1.5: each precondition by itself."""

    def test_if_match(self):
        # true unless no listed tag matches strongly (412)
        cases = [(None, True), ("*", True), (" * ", True), (ETAG, True), ('"x", "abc-1"', True),
                 ('W/"abc-1"', False), ('"other"', False), ("garbage", False), ('"abc-1" garbage', False), ("", False)]
        for header, expected in cases:
            with self.subTest(header=header):
                self.assertIs(bus.check_if_match(header, ETAG), expected)

    def test_if_none_match(self):
        # false (304) when a listed tag matches weakly
        cases = [(None, True), ("*", False), (ETAG, False), ('W/"abc-1"', False), ('"x", W/"abc-1"', False),
                 ('"other"', True), ('W/"other"', True), ("garbage", True)]
        for header, expected in cases:
            with self.subTest(header=header):
                self.assertIs(bus.check_if_none_match(header, ETAG), expected)

    def test_if_modified_since(self):
        # false (304) when the file has not changed since the date
        cases = [(None, MODIFIED, True), (http_date(MODIFIED), MODIFIED, False),
                 (http_date(MODIFIED + 1), MODIFIED, False), (http_date(MODIFIED - 1), MODIFIED, True),
                 ("yesterday", MODIFIED, True), (http_date(MODIFIED), None, True)]
        for header, modified, expected in cases:
            with self.subTest(header=header, modified=modified):
                self.assertIs(bus.check_if_modified_since(header, modified), expected)

    def test_if_unmodified_since(self):
        # false (412) when the file changed after the date
        cases = [(None, MODIFIED, True), (http_date(MODIFIED), MODIFIED, True),
                 (http_date(MODIFIED + 1), MODIFIED, True), (http_date(MODIFIED - 1), MODIFIED, False),
                 ("yesterday", MODIFIED, True), (http_date(0), None, True)]
        for header, modified, expected in cases:
            with self.subTest(header=header, modified=modified):
                self.assertIs(bus.check_if_unmodified_since(header, modified), expected)

    def test_a_list_of_dates_is_ignored(self):
        # RFC 9110 §13.1.3: "A recipient MUST ignore the If-Modified-Since header field if the received field value
        # is not a valid HTTP-date, the field value has more than one member, [...]"; §13.1.4: "A recipient MUST
        # ignore the If-Unmodified-Since header field if the received field value is not a valid HTTP-date
        # (including when the field value appears to be a list of dates)".  Two fields join as "date, date".
        cases = [(bus.check_if_modified_since, http_date(MODIFIED) + ", " + http_date(MODIFIED)),
                 (bus.check_if_unmodified_since, http_date(0) + ", " + http_date(0))]
        for check, listed in cases:
            with self.subTest(check=check.__name__):
                self.assertIs(check(listed, MODIFIED), True)

    def test_if_range(self):
        cases = [(None, True), (ETAG, True), (" " + ETAG + " ", True), ('W/"abc-1"', False), ('"old"', False),
                 (http_date(MODIFIED), True), (http_date(MODIFIED + 1), False), (http_date(MODIFIED - 1), False),
                 ("not a date", False), ("", False)]
        for header, expected in cases:
            with self.subTest(header=header):
                self.assertIs(bus.check_if_range(header, ETAG, MODIFIED), expected)


class PreconditionsTest(unittest.TestCase):
    """RFC 9110 §13.2.2: the order preconditions are evaluated in, for GET and HEAD."""

    def evaluate(self, headers, modified=MODIFIED):
        return bus.evaluate_preconditions(headers, ETAG, modified)

    def test_no_conditions(self):
        self.assertIsNone(self.evaluate({}))
        self.assertIsNone(self.evaluate({"range": "bytes=0-", "if-range": '"old"'}))

    def test_if_none_match(self):
        self.assertEqual(self.evaluate({"if-none-match": ETAG}), 304)
        self.assertEqual(self.evaluate({"if-none-match": '"x", W/"abc-1"'}), 304)  # weak comparison
        self.assertEqual(self.evaluate({"if-none-match": "*"}), 304)
        self.assertIsNone(self.evaluate({"if-none-match": '"other"'}))
        self.assertIsNone(self.evaluate({"if-none-match": "garbage"}))

    def test_if_modified_since(self):
        self.assertEqual(self.evaluate({"if-modified-since": http_date(MODIFIED)}), 304)
        self.assertEqual(self.evaluate({"if-modified-since": http_date(MODIFIED + 60)}), 304)
        self.assertIsNone(self.evaluate({"if-modified-since": http_date(MODIFIED - 1)}))
        self.assertIsNone(self.evaluate({"if-modified-since": "yesterday"}))
        # If-None-Match takes precedence over If-Modified-Since (step 4 only without If-None-Match)
        self.assertIsNone(self.evaluate({"if-none-match": '"other"', "if-modified-since": http_date(MODIFIED)}))
        self.assertEqual(self.evaluate({"if-none-match": ETAG, "if-modified-since": http_date(MODIFIED - 1)}), 304)

    def test_if_match_and_if_unmodified_since(self):
        self.assertIsNone(self.evaluate({"if-match": ETAG}))
        self.assertIsNone(self.evaluate({"if-match": "*"}))
        self.assertEqual(self.evaluate({"if-match": '"other"'}), 412)
        self.assertEqual(self.evaluate({"if-match": 'W/"abc-1"'}), 412)  # strong comparison
        self.assertEqual(self.evaluate({"if-unmodified-since": http_date(MODIFIED - 1)}), 412)
        self.assertIsNone(self.evaluate({"if-unmodified-since": http_date(MODIFIED)}))
        # If-Match takes precedence over If-Unmodified-Since (step 2 only without If-Match)
        self.assertIsNone(self.evaluate({"if-match": ETAG, "if-unmodified-since": http_date(0)}))
        self.assertEqual(self.evaluate({"if-match": '"other"', "if-unmodified-since": http_date(MODIFIED)}), 412)

    def test_412_is_decided_before_304(self):
        self.assertEqual(self.evaluate({"if-match": '"other"', "if-none-match": ETAG}), 412)
        self.assertEqual(self.evaluate({"if-unmodified-since": http_date(0), "if-none-match": ETAG}), 412)
        self.assertEqual(self.evaluate({"if-unmodified-since": http_date(0),
                                        "if-modified-since": http_date(MODIFIED)}), 412)

    def test_without_a_modification_date_dates_are_not_compared(self):
        # RFC 9110 §13.1.3, §13.1.4: the date fields are ignored when the resource has no modification date
        self.assertIsNone(self.evaluate({"if-modified-since": http_date(MODIFIED)}, None))
        self.assertIsNone(self.evaluate({"if-unmodified-since": http_date(0)}, None))
        self.assertEqual(self.evaluate({"if-none-match": ETAG}, None), 304)
        self.assertEqual(self.evaluate({"if-match": '"other"'}, None), 412)


class PlanDownloadTest(unittest.TestCase):
    """RFC 9110 §13.2.2 then §14.2: preconditions, then one byte range for GET only (200/206/304/412/416)."""

    def test_the_matrix(self):
        whole = bus.DownloadPlan(200, 0, SIZE, None)
        not_modified = bus.DownloadPlan(304, 0, 0, None)
        failed = bus.DownloadPlan(412, 0, 0, None)
        first_ten = bus.DownloadPlan(206, 0, 10, "bytes 0-9/100")
        resumed = bus.DownloadPlan(206, 40, 60, "bytes 40-99/100")
        past_the_end = bus.DownloadPlan(416, 0, 0, "bytes */100")
        now, before, after = http_date(MODIFIED), http_date(MODIFIED - 1), http_date(MODIFIED + 1)
        cases = [
            ("no headers", "GET", {}, SIZE, whole),
            ("no headers, HEAD", "HEAD", {}, SIZE, whole),
            ("Range", "GET", {"range": "bytes=0-9"}, SIZE, first_ten),
            ("open Range", "GET", {"range": "bytes=40-"}, SIZE, resumed),
            ("suffix Range", "GET", {"range": "bytes=-10"}, SIZE, bus.DownloadPlan(206, 90, 10, "bytes 90-99/100")),
            ("Range past the end clipped", "GET", {"range": "bytes=90-500"}, SIZE,
             bus.DownloadPlan(206, 90, 10, "bytes 90-99/100")),
            ("Range on HEAD is ignored", "HEAD", {"range": "bytes=0-9"}, SIZE, whole),
            ("unsatisfiable Range on HEAD is ignored", "HEAD", {"range": "bytes=100-"}, SIZE, whole),
            ("unsatisfiable Range", "GET", {"range": "bytes=100-"}, SIZE, past_the_end),
            ("zero suffix", "GET", {"range": "bytes=-0"}, SIZE, past_the_end),
            ("empty file", "GET", {}, 0, bus.DownloadPlan(200, 0, 0, None)),
            ("empty file, bytes=0-", "GET", {"range": "bytes=0-"}, 0, bus.DownloadPlan(416, 0, 0, "bytes */0")),
            ("malformed Range", "GET", {"range": "bytes=a-b"}, SIZE, whole),
            ("reversed Range", "GET", {"range": "bytes=5-1"}, SIZE, whole),
            ("other unit", "GET", {"range": "items=0-9"}, SIZE, whole),
            ("multiple ranges", "GET", {"range": "bytes=0-9,20-29"}, SIZE, whole),
            ("If-Range ETag matches", "GET", {"range": "bytes=0-9", "if-range": ETAG}, SIZE, first_ten),
            ("If-Range ETag stale", "GET", {"range": "bytes=0-9", "if-range": '"old"'}, SIZE, whole),
            ("If-Range weak ETag", "GET", {"range": "bytes=0-9", "if-range": 'W/"abc-1"'}, SIZE, whole),
            ("If-Range date matches", "GET", {"range": "bytes=40-", "if-range": now}, SIZE, resumed),
            ("If-Range date stale", "GET", {"range": "bytes=40-", "if-range": before}, SIZE, whole),
            ("If-Range stale, unsatisfiable", "GET", {"range": "bytes=100-", "if-range": '"old"'}, SIZE, whole),
            ("If-Range matches, unsatisfiable", "GET", {"range": "bytes=100-", "if-range": ETAG}, SIZE, past_the_end),
            ("If-Range without Range", "GET", {"if-range": ETAG}, SIZE, whole),
            ("If-None-Match matches", "GET", {"if-none-match": ETAG}, SIZE, not_modified),
            ("If-None-Match matches, HEAD", "HEAD", {"if-none-match": ETAG}, SIZE, not_modified),
            ("If-None-Match matches, with Range", "GET", {"if-none-match": ETAG, "range": "bytes=0-9"}, SIZE,
             not_modified),
            ("If-None-Match differs, with Range", "GET", {"if-none-match": '"old"', "range": "bytes=0-9"}, SIZE,
             first_ten),
            ("If-Match differs", "GET", {"if-match": '"old"'}, SIZE, failed),
            ("If-Match differs, with Range", "GET", {"if-match": '"old"', "range": "bytes=0-9"}, SIZE, failed),
            ("If-Match differs, unsatisfiable Range", "GET", {"if-match": '"old"', "range": "bytes=100-"}, SIZE,
             failed),
            ("If-Match matches, with Range", "GET", {"if-match": ETAG, "range": "bytes=0-9"}, SIZE, first_ten),
            ("If-Match *, with Range", "GET", {"if-match": "*", "range": "bytes=0-9"}, SIZE, first_ten),
            ("If-Unmodified-Since before modified", "GET", {"if-unmodified-since": before}, SIZE, failed),
            ("If-Unmodified-Since equal", "GET", {"if-unmodified-since": now}, SIZE, whole),
            ("If-Modified-Since equal", "GET", {"if-modified-since": now}, SIZE, not_modified),
            ("If-Modified-Since later", "GET", {"if-modified-since": after}, SIZE, not_modified),
            ("If-Modified-Since before", "GET", {"if-modified-since": before}, SIZE, whole),
            ("If-Modified-Since equal, with Range", "GET", {"if-modified-since": now, "range": "bytes=0-9"}, SIZE,
             not_modified),
            ("If-None-Match over If-Modified-Since", "GET", {"if-none-match": '"old"', "if-modified-since": now},
             SIZE, whole),
            ("If-Match over If-Unmodified-Since", "GET", {"if-match": ETAG, "if-unmodified-since": before}, SIZE,
             whole),
            ("If-Match before If-None-Match", "GET", {"if-match": '"old"', "if-none-match": ETAG}, SIZE, failed),
        ]
        for name, method, headers, size, expected in cases:
            with self.subTest(name):
                self.assertEqual(bus.plan_download(method, headers, size, ETAG, MODIFIED), expected)


class ValidatorsTest(unittest.TestCase):
    """RFC 9110 §8.8.3 strong ETags for generated bodies, RFC 9530 §3 Repr-Digest."""

    def test_content_etag(self):
        bodies = [b"", b"1700000000", b"1700000001", b"opq-box-update-1.tar.bz2", bytes(range(256))]
        tags = [bus.content_etag(body) for body in bodies]
        self.assertEqual(len(set(tags)), len(bodies))              # changes when the body does
        for body, tag in zip(bodies, tags):
            with self.subTest(body=body):
                self.assertEqual(bus.content_etag(bytes(bytearray(body))), tag)   # and only then
                self.assertEqual(bus.entity_tags(tag), [(False, tag)])          # one strong entity-tag
                self.assertFalse(bus.check_if_none_match(tag, tag))
                self.assertTrue(bus.check_if_match(tag, tag))

    def test_repr_digest(self):
        for body in [b"", b'{"hello": "world"}', bytes(range(256)) * 64]:
            digest = hashlib.sha256(body).digest()
            with self.subTest(body=body[:20]):
                self.assertEqual(bus.repr_digest(digest),
                                 "sha-256=:" + base64.b64encode(digest).decode("ascii") + ":")
        self.assertEqual(bus.repr_digest(hashlib.sha256(b"").digest()),
                         "sha-256=:47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU=:")


class EscapeForLogTest(unittest.TestCase):
    """Access log lines: control characters and the backslash escaped, nothing else (no forged lines)."""

    def test_control_characters_are_escaped(self):
        for code in list(range(0x20)) + list(range(0x7F, 0xA0)):
            with self.subTest(code=code):
                self.assertEqual(bus.escape_for_log("a" + chr(code) + "b"), "a\\x%02xb" % code)

    def test_backslash_is_escaped(self):
        self.assertEqual(bus.escape_for_log("\\"), "\\\\")
        self.assertEqual(bus.escape_for_log("a\\x0ab"), "a\\\\x0ab")
        self.assertNotEqual(bus.escape_for_log("\\x0a"), bus.escape_for_log("\n"))  # escapes stay unambiguous

    def test_nothing_else_is_escaped(self):
        printable = "".join(chr(code) for code in range(0x20, 0x7F) if chr(code) != "\\")
        latin_1 = "".join(chr(code) for code in range(0xA0, 0x100))
        for text in [printable, latin_1, "GET /update/opq-box-update-1.tar.bz2 HTTP/1.1", '"quoted" %41 \u20ac', ""]:
            with self.subTest(text=text):
                self.assertEqual(bus.escape_for_log(text), text)

    def test_a_forged_log_line(self):
        self.assertEqual(bus.escape_for_log('GET /\r\n127.0.0.1 "GET / HTTP/1.1" 200 0\x1b[2J'),
                         'GET /\\x0d\\x0a127.0.0.1 "GET / HTTP/1.1" 200 0\\x1b[2J')


if __name__ == "__main__":
    unittest.main()
