"""Who the client is, against the real server: slots kept for short answers while slow downloads fill the
server, an IPv6 client counted by its /64, the forwarded client read from the one header the proxy writes, and
IPv4-mapped addresses in the settings."""

import ipaddress
import json
import os
import socket
import time
import unittest

from support import (InProcessServer, SlowDownload, TempDirTestCase, publish, read_response_head, record, request,
                     status_of, wait_until)

import box_update_server as bus


def percentile(values, fraction):
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


class SettingsTest(unittest.TestCase):
    """The settings of this part, parsed without sockets."""

    def parse(self, **extra):
        return bus.parse_settings(json.dumps(dict({"port": 80, "updates_dir": "/u"}, **extra)))[0]

    def test_defaults(self):
        settings = self.parse()
        self.assertEqual((settings.max_downloads, settings.ipv6_client_prefix, settings.forwarded_header),
                         (950, 64, "X-Forwarded-For"), "X-Forwarded-For: what examples/nginx writes")
        for max_connections, max_downloads in [(1000, 950), (100, 95), (40, 38), (20, 18), (3, 1), (1, 1)]:
            with self.subTest(max_connections=max_connections):
                self.assertEqual(self.parse(max_connections=max_connections).max_downloads, max_downloads)

    def test_the_nginx_example_writes_the_default_header(self):
        with open(os.path.join(os.path.dirname(bus.__file__), "examples", "nginx", "box-update-server.conf")) as conf:
            written = [line.split()[1] for line in conf if line.strip().startswith("proxy_set_header")
                       and line.split()[1].lower() in ("x-forwarded-for", "forwarded")]
        self.assertEqual(written, [bus.Settings(port=1, updates_dir="/u").forwarded_header])

    def test_values_are_read(self):
        settings = self.parse(max_connections=20, max_downloads=10, ipv6_client_prefix=56, forwarded_header="forwarded")
        self.assertEqual((settings.max_downloads, settings.ipv6_client_prefix, settings.forwarded_header),
                         (10, 56, "Forwarded"))
        self.assertEqual(self.parse(forwarded_header="x-forwarded-for").forwarded_header, "X-Forwarded-For")
        self.assertEqual(self.parse(max_connections=20, max_downloads=20).max_downloads, 20)

    def test_bad_values_name_the_problem(self):
        cases = [({"max_connections": 20, "max_downloads": 21}, "max_downloads (21) must not exceed max_connections"),
                 ({"max_downloads": 0}, "max_downloads"), ({"max_downloads": True}, "max_downloads"),
                 ({"ipv6_client_prefix": 0}, "ipv6_client_prefix must be a prefix length from 1 to 128"),
                 ({"ipv6_client_prefix": 129}, "ipv6_client_prefix"),
                 ({"ipv6_client_prefix": "64"}, "ipv6_client_prefix"),
                 ({"ipv6_client_prefix": True}, "ipv6_client_prefix"),
                 ({"forwarded_header": "X-Real-IP"}, "forwarded_header must be 'X-Forwarded-For' or 'Forwarded'"),
                 ({"forwarded_header": 1}, "forwarded_header must be")]
        for extra, expected in cases:
            with self.subTest(extra=extra):
                with self.assertRaises(bus.SettingsError) as caught:
                    self.parse(**extra)
                self.assertIn(expected, str(caught.exception))

    def test_ipv4_mapped_ranges_read_as_ipv4(self):
        """The server sees a mapped peer as IPv4, so ::ffff:127.0.0.1 must mean 127.0.0.1, not nothing."""
        entries = ["::ffff:127.0.0.1", "::ffff:10.0.0.0/104", "::ffff:0:0/96", "::ffff:7f00:2", "::/0", "fd00::/8"]
        expected = tuple(ipaddress.ip_network(text) for text in
                         ["127.0.0.1/32", "10.0.0.0/8", "0.0.0.0/0", "127.0.0.2/32", "::/0", "fd00::/8"])
        settings = self.parse(metrics_allow=entries, trusted_proxies=entries)
        self.assertEqual((settings.metrics_allow, settings.trusted_proxies), (expected, expected))
        self.assertTrue(bus.in_networks(bus.parse_address("::ffff:127.0.0.1"), settings.metrics_allow[:1]))


def write_big_update(folder, size, version=1700000000):
    path = os.path.join(folder, "opq-box-update-%d.tar.bz2" % version)
    publish(path, os.urandom(size), mtime=time.time() - 60)
    return "/update/" + os.path.basename(path)


class SlowReadersTest(TempDirTestCase):
    """Downloads that are slow but moving are never cut nor evicted: slots kept for short answers serve OPQ Health."""

    def test_health_is_answered_while_slow_downloads_hold_every_download_slot(self):
        path = write_big_update(self.updates, 4 << 20)
        server = self.start_server(verify_updates=False, max_connections=20, shutdown_grace=1)
        downloads = [SlowDownload(server.port, path, 2048, source="127.0.0.%d" % (2 + address))
                     for address in range(4) for _ in range(5)]          # 5 each: max_connections_per_client
        for download in downloads:
            download.start()
        self.assertTrue(all(download.headers_received.wait(20) for download in downloads))
        statuses = sorted(download.status for download in downloads)
        self.assertEqual(statuses, [200] * 18 + [503] * 2, "max_downloads is 18 of 20: two kept for short answers")
        latencies, answers = [], []
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            for route in ("/", "/ls", "/latest"):
                started = time.monotonic()
                answers.append((route, request(server.port, "GET", route, timeout=2, source="127.0.0.6").status))
                latencies.append(time.monotonic() - started)
            time.sleep(0.1)
        self.assertEqual({answer for answer in answers}, {("/", 200), ("/ls", 200), ("/latest", 303)})
        self.assertLess(max(latencies), 2.0, "OPQ Health gives up after 2 s")
        moving = [download for download in downloads if download.status == 200]
        self.assertTrue(all(download.is_alive() and not download.closed_early for download in moving),
                        "every slow download kept going meanwhile")
        record("Slow and idle clients", "slow readers: 4 addresses x 5 downloads at 2 kB/s (max_connections 20)",
               "18 downloads kept going (max_downloads: all but two slots), the other two got 503 at once; "
               "/, /ls and /latest from a fifth address answered %d times meanwhile, p50 %.0f ms, max %.0f ms"
               % (len(latencies), percentile(latencies, 0.5) * 1000, max(latencies) * 1000))

    def test_a_download_over_max_downloads_gets_503_and_a_short_answer_does_not(self):
        path = write_big_update(self.updates, 4 << 20)
        server = self.start_server(verify_updates=False, max_connections=10, max_connections_per_client=10,
                                   max_downloads=2, shutdown_grace=1)
        downloads = [SlowDownload(server.port, path, 0) for _ in range(2)]     # stalled: they keep their slots
        for download in downloads:
            download.start()
        self.assertTrue(all(download.headers_received.wait(10) for download in downloads))
        self.assertEqual([download.status for download in downloads], [200, 200])
        refused = request(server.port, "GET", path)
        self.assertEqual((refused.status, refused.header("Cache-Control")), (503, "no-cache"))
        self.assertIn(b"Too many downloads", refused.body)
        self.assertEqual(refused.header("Retry-After"), "5")
        self.assertEqual(request(server.port, "HEAD", path).status, 503, "HEAD answers as GET would")
        self.assertEqual(request(server.port, "GET", path + ".sha256").status, 200)
        self.assertEqual(request(server.port, "GET", path, {"If-None-Match": "*"}).status, 304, "no body, no slot")
        for download in downloads:
            download.resume.set()
            download.join(30)
            self.assertEqual(len(download.body), 4 << 20)
        self.assertEqual(request(server.port, "GET", path, {"Range": "bytes=0-9"}).status, 206,
                         "a download's slot is given back when it ends")


class IPv6ClientTest(TempDirTestCase):
    """max_connections_per_client counts an IPv6 /64 as one client (one home or site gets a whole /64)."""

    def connect_as(self, server, address):
        """A real loopback connection, handed to the server as if it came from address; its request's status."""
        with socket.socket() as listener:
            listener.bind(("127.0.0.1", 0))
            listener.listen(1)
            client = socket.create_connection(listener.getsockname(), timeout=10)
            accepted, _ = listener.accept()
        self.addCleanup(client.close)
        server.server.process_request(accepted, (address, 40000, 0, 0))
        client.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        head, body = read_response_head(client)
        return status_of(head), body

    def test_one_ipv6_64_is_one_client(self):
        server = InProcessServer(self, self.updates, max_connections_per_client=2)
        self.assertEqual(self.connect_as(server, "2001:db8:1:2::a")[0], 200)
        self.assertEqual(self.connect_as(server, "2001:db8:1:2::b")[0], 200)
        self.assertEqual(self.connect_as(server, "2001:db8:1:2:ffff:ffff:ffff:ffff"),
                         (503, b"Too many connections from your address."), "the same /64: over its share")
        self.assertEqual(self.connect_as(server, "2001:db8:1:3::a")[0], 200, "the next /64 is another client")
        self.assertEqual(self.connect_as(server, "192.0.2.1")[0], 200)
        self.assertEqual(self.connect_as(server, "192.0.2.2")[0], 200, "IPv4: one address is one client")
        self.assertTrue(wait_until(lambda: any(line.startswith('2001:db8:1:2::b "GET /"') for line in server.log), 5),
                        "the access log names the address itself")

    def test_the_prefix_is_a_setting(self):
        server = InProcessServer(self, self.updates, max_connections_per_client=2, ipv6_client_prefix=128)
        for address in ("2001:db8:1:2::a", "2001:db8:1:2::b", "2001:db8:1:2::c"):
            self.assertEqual(self.connect_as(server, address)[0], 200, address)
        server = InProcessServer(self, self.updates, max_connections_per_client=2, ipv6_client_prefix=48)
        for address in ("2001:db8:1:2::a", "2001:db8:1:3::a"):
            self.assertEqual(self.connect_as(server, address)[0], 200, address)
        self.assertEqual(self.connect_as(server, "2001:db8:1:4::a")[0], 503, "the same /48")


class ForwardedClientTest(TempDirTestCase):
    """Behind a trusted proxy (127.0.0.1 here) the client is read from the one header the proxy writes."""

    def metrics_from_proxy(self, server, headers):
        """The status of /metrics through the proxy, and the client its access line names."""
        before = len(server.access_lines('"GET /metrics"'))
        status = request(server.port, "GET", "/metrics", headers, source="127.0.0.1").status
        self.assertTrue(wait_until(lambda: len(server.access_lines('"GET /metrics"')) > before, 5))
        return status, server.access_lines('"GET /metrics"')[-1].split(" INFO ")[1].split(" ")[0]

    def test_x_forwarded_for_as_proxies_write_it(self):
        server = self.start_server(trusted_proxies=["127.0.0.1"])     # metrics_allow: loopback and private
        cases = [({"X-Forwarded-For": "203.0.113.7:51234"}, (404, "203.0.113.7")),       # a port: that address
                 ({"X-Forwarded-For": "[2001:db8::1]:443"}, (404, "2001:db8::1")),
                 ({"X-Forwarded-For": "10.1.2.3:8080"}, (200, "10.1.2.3")),
                 ({"X-Forwarded-For": "unknown"}, (404, "unknown")),                     # never the proxy itself
                 ({"X-Forwarded-For": "10.1.2.3, _hidden"}, (404, "unknown")),
                 ({"Forwarded": "for=203.0.113.7"}, (200, "127.0.0.1")),     # not the header this proxy writes
                 ({}, (200, "127.0.0.1"))]
        for headers, expected in cases:
            with self.subTest(headers=headers):
                self.assertEqual(self.metrics_from_proxy(server, headers), expected)

    def test_forwarded_as_rfc_7239_and_nginx_write_it(self):
        server = self.start_server(trusted_proxies=["127.0.0.1"], forwarded_header="Forwarded")
        cases = [({"Forwarded": "for=203.0.113.7", "X-Forwarded-For": "10.1.2.3"}, (404, "203.0.113.7")),
                 ({"Forwarded": 'for="[2001:db8::1]:443";proto=https'}, (404, "2001:db8::1")),
                 ({"Forwarded": "for=2001:db8::1"}, (404, "2001:db8::1")),               # nginx "for=$remote_addr"
                 ({"Forwarded": "for=10.1.2.3"}, (200, "10.1.2.3")),
                 ({"Forwarded": "for=unknown"}, (404, "unknown")),
                 ({"Forwarded": "for=_hidden"}, (404, "unknown")),
                 ({"Forwarded": 'for="_SEVKISEK:_obf"'}, (404, "unknown")),
                 ({"Forwarded": "proto=https"}, (404, "unknown")),
                 ({"X-Forwarded-For": "10.1.2.3"}, (200, "127.0.0.1"))]    # a client's own header: not read
        for headers, expected in cases:
            with self.subTest(headers=headers):
                self.assertEqual(self.metrics_from_proxy(server, headers), expected)


class MappedAddressTest(TempDirTestCase):
    """::ffff:127.0.0.1 in metrics_allow or trusted_proxies means 127.0.0.1, on an IPv4 or a dual-stack socket."""

    def check(self, server):
        self.assertEqual(request(server.port, "GET", "/metrics", source="127.0.0.1").status, 200)
        self.assertEqual(request(server.port, "GET", "/metrics", source="127.0.0.3").status, 404)
        self.assertEqual(request(server.port, "GET", "/metrics", {"X-Forwarded-For": "127.0.0.1"},
                                 source="127.0.0.2").status, 200, "127.0.0.2 is a trusted proxy")
        self.assertEqual(request(server.port, "GET", "/metrics", {"X-Forwarded-For": "203.0.113.7"},
                                 source="127.0.0.2").status, 404)
        self.assertTrue(wait_until(lambda: server.access_lines('203.0.113.7 "GET /metrics" 404'), 5))

    def test_mapped_entries_in_the_settings(self):
        self.check(self.start_server(metrics_allow=["::ffff:127.0.0.1"], trusted_proxies=["::ffff:127.0.0.2"]))

    def test_mapped_peers_on_a_dual_stack_socket(self):
        try:
            with socket.socket(socket.AF_INET6) as probe:
                probe.bind(("::1", 0))
        except OSError:
            self.skipTest("IPv6 loopback is not configured here")
        self.check(self.start_server(host="::", metrics_allow=["127.0.0.1"], trusted_proxies=["::ffff:127.0.0.2"]))


if __name__ == "__main__":
    unittest.main()
