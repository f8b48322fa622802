"""nginx in front: examples/nginx/box-update-server.conf run by the real nginx, as the public deployment runs it.

The example is started with only its "per host:" lines changed (ports, paths, the upstream address, the
per-client limit), so what is tested is what a user copies.  nginx comes from the Debian package "nginx";
without it these cases are skipped (.ci/run installs it).
"""

import difflib
import hashlib
import os
import re
import shutil
import signal
import socket
import subprocess
import threading
import time
import unittest
import urllib.parse

from support import (ROOT, TempDirTestCase, archive_bytes, child_pids, file_member, free_port, heavy, make_update,
                     publish, record, request, track, update_members, wait_until)

EXAMPLE = os.path.join(ROOT, "examples", "nginx", "box-update-server.conf")
PREFIX = "/box-update-server"
BOXES = 50
PER_CLIENT = 200          # every test box shares 127.0.0.1, so the example's per-client limit is raised
VERSION = 1700000000
BOX_COMMAND = "wget -q {0}/latest -O update.tar.bz2 && tar xf update.tar.bz2"
# How long nginx's one download of the new update takes over the slowed link: longer than the 5 s that
# proxy_cache_lock_timeout and proxy_cache_lock_age default to, so that only the example's longer values
# keep it to one download.  (Over plain loopback the download is over before most boxes ask, and even
# proxy_cache_lock off would pass.)
FILL_SECONDS = 6.0


def find_nginx():
    """nginx on PATH, or where Debian puts it (/usr/sbin is not on every user's PATH)."""
    found = shutil.which("nginx")
    if found is None and os.access("/usr/sbin/nginx", os.X_OK):
        found = "/usr/sbin/nginx"
    return found


def substitute(text, pattern, replace, count):
    """Replace what pattern (a multi-line regex anchored on a directive name) matches, exactly count times.

    Another count means the example's structure changed: the test fails here, naming the directive,
    rather than testing a configuration the example no longer describes.
    """
    matches = len(re.findall(pattern, text, flags=re.MULTILINE))
    if matches != count:
        raise AssertionError("%s: expected %d line(s) matching %r, found %d; update tests/test_proxy.py with the "
                             "example's structure" % (EXAMPLE, count, pattern, matches))
    return re.sub(pattern, replace, text, flags=re.MULTILINE)


def template(text, folder, listen_port, upstream_port):
    """The example with its per-host lines set for this test, and nothing else changed (checked)."""
    listens = iter(["listen 127.0.0.1:%d;" % listen_port])
    changed = substitute(text, r"^(?P<indent>[ \t]*)listen[ \t]+[^;#\n]+;", lambda match: match.group("indent")
                         + next(listens, "# (this test listens on one address only)"), 2)
    changed = substitute(changed, r"^(?P<head>[ \t]*server[ \t]+)[0-9.]+:[0-9]+(?=;)",
                         lambda match: "%s127.0.0.1:%d" % (match.group("head"), upstream_port), 1)
    paths = {"pid": "nginx.pid", "error_log": "error.log", "access_log": "access.log", "proxy_cache_path": "cache"}
    for directive, name in paths.items():
        changed = substitute(changed, r"^(?P<head>[ \t]*%s[ \t]+)/[^ \t;\n]+" % directive,
                             lambda match, name=name: match.group("head") + os.path.join(folder, name), 1)
    changed = substitute(changed, r"^(?P<head>[ \t]*(?:client_body|proxy|fastcgi|uwsgi|scgi)_temp_path[ \t]+)"
                         r"/[^ \t;\n]+/(?P<name>[^/ \t;\n]+)",
                         lambda match: match.group("head") + os.path.join(folder, "temp", match.group("name")), 5)
    changed = substitute(changed, r"^(?P<head>[ \t]*limit_conn[ \t]+per_client[ \t]+)[0-9]+",
                         lambda match: "%s%d" % (match.group("head"), PER_CLIENT), 1)
    for line in difflib.ndiff(text.splitlines(), changed.splitlines()):
        if line.startswith("- ") and "# per host:" not in line:
            raise AssertionError("the test changed a line the example does not mark per host: " + line[2:])
    return changed


class Nginx:
    """The real nginx in the foreground, on the templated example, under one test's folder."""

    def __init__(self, binary, folder, upstream_port, edit=None):
        self.binary = binary
        self.folder = folder
        self.upstream_port = upstream_port
        self.edit = edit or (lambda text: text)      # a variant of the example a test names
        self.conf = os.path.join(folder, "nginx.conf")
        self.process = None
        self.port = None
        os.makedirs(os.path.join(folder, "temp"))
        if os.geteuid() == 0:        # workers drop to an unprivileged user, which must reach the cache and temp paths
            for path in (os.path.dirname(folder), folder, os.path.join(folder, "temp")):
                os.chmod(path, 0o755)

    def command(self, *arguments):
        return [self.binary, "-p", self.folder + "/", "-c", self.conf] + list(arguments)

    def start(self):
        with open(EXAMPLE, encoding="utf-8") as example:
            text = example.read()
        for _ in range(3):     # nginx's listen needs the port in its config: another process may take it first
            self.port = free_port()
            with open(self.conf, "w", encoding="utf-8") as conf:
                conf.write(self.edit(template(text, self.folder, self.port, self.upstream_port)))
            checked = subprocess.run(self.command("-t"), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
            if checked.returncode != 0:
                raise AssertionError("nginx -t refused the templated example:\n" + checked.stdout.decode())
            stderr = open(os.path.join(self.folder, "stderr.log"), "wb")
            self.process = track(subprocess.Popen(self.command("-g", "daemon off;"), stdout=stderr, stderr=stderr,
                                                  start_new_session=True))
            stderr.close()
            up = wait_until(lambda: self.process.poll() is not None or self.answers(), 10)
            if up and self.process.poll() is None:
                return self
            self.kill()
            if "Address already in use" not in self.stderr():
                break
        raise AssertionError("nginx did not start:\n" + self.stderr())

    def answers(self):
        return os.path.exists(os.path.join(self.folder, "nginx.pid")) and self.request("GET", "/").status == 404

    def stderr(self):
        logs = []
        for name in ("stderr.log", "error.log"):
            try:
                with open(os.path.join(self.folder, name), encoding="utf-8", errors="replace") as log:
                    logs.append(log.read())
            except OSError:
                pass
        return "\n".join(logs)

    def request(self, method, path, headers=None, source=None, timeout=30):
        return request(self.port, method, path, headers, timeout, source)

    def url(self, path):
        return "http://127.0.0.1:%d%s" % (self.port, path)

    def children(self):
        """The master's child processes (workers, cache manager and loader), as pids."""
        return child_pids(self.process.pid)

    def quit(self, timeout=15):
        """nginx -s quit (graceful: the pid file, then SIGQUIT), then the master's exit status."""
        subprocess.run(self.command("-s", "quit"), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, check=True)
        return self.process.wait(timeout)

    def kill(self):
        """Cleanup after a failure: the master and anything it started (its own session)."""
        if self.process is not None and self.process.poll() is None:
            try:
                os.killpg(self.process.pid, signal.SIGKILL)
            except OSError:
                pass
            self.process.wait()


class SlowLink:
    """A TCP relay between nginx and the server that carries the server's answers at rate bytes a second.

    The slow uplink between a proxy and the server, on loopback.  Each connection is paced on its own,
    with no credit for time it sat idle.  The server sees the relay's address (127.0.0.1) as its peer,
    and the X-Forwarded-For that nginx sent passes through untouched.
    """

    CHUNK = 16384

    def __init__(self, target_port, rate):
        self.target_port = target_port
        self.rate = rate
        self.sockets = []
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(64)
        self.port = self.listener.getsockname()[1]
        threading.Thread(target=self.accept, daemon=True).start()

    def accept(self):
        while True:
            try:
                near, _ = self.listener.accept()
                far = socket.create_connection(("127.0.0.1", self.target_port))
            except OSError:
                return
            self.sockets += [near, far]
            threading.Thread(target=self.pump, args=(near, far, None), daemon=True).start()
            threading.Thread(target=self.pump, args=(far, near, self.rate), daemon=True).start()

    @classmethod
    def pump(cls, source, target, rate):
        allowed_at = 0.0
        try:
            while True:
                chunk = source.recv(cls.CHUNK)
                if not chunk:
                    target.shutdown(socket.SHUT_WR)
                    return
                if rate:
                    allowed_at = max(allowed_at, time.monotonic())
                    time.sleep(max(0.0, allowed_at - time.monotonic()))
                    allowed_at += len(chunk) / rate
                target.sendall(chunk)
        except OSError:
            for end in (source, target):
                try:
                    end.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self):
        self.listener.close()
        for end in self.sockets:
            end.close()


def alive(pid):
    """Whether pid is a process that has not exited (a zombie has)."""
    try:
        with open("/proc/%d/stat" % pid) as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def access_clients(server, request_text):
    """The client addresses of the server's access lines for one request, e.g. '"GET /version?probe"'."""
    return re.findall(r" INFO (\S+) %s " % re.escape(request_text), server.log())


class ProxyTest(TempDirTestCase):
    """The box flow, the cache, forwarding and metrics through the example configuration."""

    def setUp(self):
        super().setUp()
        binary = find_nginx()
        if binary is None:
            self.skipTest("nginx is not installed (Debian package nginx; .ci/run installs it)")
        self.binary = binary

    def start(self, members=None, fill_seconds=None, edit=None, **settings):
        """An update, the server trusting nginx's address, and nginx in front of it.

        With fill_seconds, nginx reaches the server over a SlowLink that carries the update in that time;
        edit changes the example, settings are the server's.
        """
        self.update_path = make_update(self.updates, VERSION, members, mtime=time.time() - 60)
        self.name = os.path.basename(self.update_path)
        with open(self.update_path, "rb") as archive:
            self.data = archive.read()
        self.server = self.start_server(trusted_proxies=["127.0.0.1/32"], **settings)
        upstream_port = self.server.port
        if fill_seconds:
            link = SlowLink(self.server.port, len(self.data) / fill_seconds)
            self.addCleanup(link.close)
            upstream_port = link.port
        self.nginx = Nginx(self.binary, os.path.join(self.tmp, "nginx"), upstream_port, edit)
        self.addCleanup(self.nginx.kill)
        return self.nginx.start()

    def run_boxes(self, count):
        """count boxes run the box's update command through the proxy at once; their folders."""
        folders = [os.path.join(self.tmp, "box-%d" % number) for number in range(count)]
        barrier = threading.Barrier(count)
        results = [None] * count

        def box(number):
            os.mkdir(folders[number])
            barrier.wait(30)
            results[number] = subprocess.run(["bash", "-c", BOX_COMMAND.format(self.nginx.url(PREFIX))],
                                             cwd=folders[number], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                             timeout=120)

        threads = [threading.Thread(target=box, args=(number,)) for number in range(count)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(150)
        for number, result in enumerate(results):
            self.assertIsNotNone(result, "box %d did not finish" % number)
            self.assertEqual(result.returncode, 0, "box %d: %s" % (number, result.stdout.decode(errors="replace")))
        return folders

    def full_downloads(self):
        return self.server.access_lines('"GET /update/%s" 200 %d ' % (self.name, len(self.data)))

    @heavy
    def test_fifty_boxes_cause_one_download_from_the_server(self):
        """A new update asked for by many boxes at once reaches them all from one download (proxy_cache_lock)."""
        firmware = os.urandom(4000000)        # incompressible, so the archive is about 4 MB on the wire
        self.start(update_members(VERSION) + [
            file_member("opq-box-update-%d/box-config-daemon/firmware.bin" % VERSION, firmware)], FILL_SECONDS)
        started = time.monotonic()
        folders = self.run_boxes(BOXES)
        seconds = time.monotonic() - started
        expected = hashlib.sha256(self.data).hexdigest()
        for folder in folders:
            with open(os.path.join(folder, "update.tar.bz2"), "rb") as archive:
                self.assertEqual(hashlib.sha256(archive.read()).hexdigest(), expected, folder)
            with open(os.path.join(folder, "opq-box-update-%d" % VERSION, "VERSION")) as version:
                self.assertEqual(version.read(), "%d\n" % VERSION, folder)
        self.assertTrue(wait_until(self.full_downloads, 10), self.server.log())
        update_lines = self.server.access_lines("/update/%s" % self.name)
        self.assertEqual(update_lines, self.full_downloads(), "only one full download reached the server")
        self.assertEqual(len(update_lines), 1, "\n".join(update_lines))
        self.assertEqual(len(self.server.access_lines('"GET /latest" 303 ')), BOXES, "/latest is not cached")

        # a second round, and a box resuming its download, are served from nginx's cache
        answers = [None] * 10

        def download(number):
            answers[number] = self.nginx.request("GET", PREFIX + "/update/" + self.name)

        threads = [threading.Thread(target=download, args=(number,)) for number in range(len(answers))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        for answer in answers:
            self.assertEqual((answer.status, answer.header("X-Cache-Status")), (200, "HIT"))
            self.assertEqual(answer.body, self.data)
        resumed = self.nginx.request("GET", PREFIX + "/update/%s?from=box" % self.name, {"Range": "bytes=1000-"})
        self.assertEqual((resumed.status, resumed.header("X-Cache-Status")), (206, "HIT"))
        self.assertEqual(resumed.body, self.data[1000:])
        self.assertEqual(len(self.server.access_lines("/update/%s" % self.name)), 1, self.server.log())
        tried = ("%d boxes at once ran the box's wget and tar through nginx (examples/nginx) for a new %.1f MB "
                 "update, which nginx fetched over a link slowed to take %g s"
                 % (BOXES, len(self.data) / 1e6, FILL_SECONDS))
        record("Load", tried, "all done in %.1f s with identical bytes; 1 full download reached the server; 10 more "
               "downloads and a resumed one were cache hits" % seconds)

    def test_a_resumed_download_on_a_cold_cache_is_one_full_download(self):
        """A box resuming (Range) before anyone filled the cache gets its range; the server sends the update whole.

        nginx does not pass Range upstream for a cached location, so what it stores is the whole update.
        """
        self.start()
        resumed = self.nginx.request("GET", PREFIX + "/update/" + self.name, {"Range": "bytes=100-"})
        self.assertEqual((resumed.status, resumed.header("X-Cache-Status")), (206, "MISS"))
        self.assertEqual(resumed.body, self.data[100:])
        whole = self.nginx.request("GET", PREFIX + "/update/" + self.name)
        self.assertEqual((whole.status, whole.header("X-Cache-Status"), whole.body), (200, "HIT", self.data))
        self.assertEqual(whole.header("Cache-Control"), "public, max-age=31536000, immutable")
        self.assertTrue(wait_until(self.full_downloads, 5), self.server.log())
        self.assertEqual(self.server.access_lines("/update/" + self.name), self.full_downloads())

    def test_the_server_logs_the_address_nginx_forwards(self):
        """X-Forwarded-For carries the box's address, which the server logs instead of nginx's."""
        self.start()
        answer = self.nginx.request("GET", PREFIX + "/version?probe=1", source="127.0.0.2")
        self.assertEqual((answer.status, answer.body), (200, str(VERSION).encode()))
        self.assertTrue(wait_until(lambda: access_clients(self.server, '"GET /version?probe=1" 200'), 5),
                        self.server.log())
        self.assertEqual(access_clients(self.server, '"GET /version?probe=1" 200'), ["127.0.0.2"])
        # a box cannot choose its address: nginx appends the one it sees, and the server reads from the right
        forged = self.nginx.request("GET", PREFIX + "/version?probe=2", {"X-Forwarded-For": "203.0.113.9"},
                                    source="127.0.0.2")
        self.assertEqual(forged.status, 200)
        self.assertTrue(wait_until(lambda: access_clients(self.server, '"GET /version?probe=2" 200'), 5),
                        self.server.log())
        self.assertEqual(access_clients(self.server, '"GET /version?probe=2" 200'), ["127.0.0.2"])

    def test_behind_nginx_writing_only_forwarded_a_box_cannot_name_itself(self):
        """nginx sets only Forwarded "for=$remote_addr" (forwarded_header "Forwarded"): a box's own
        X-Forwarded-For, which nginx passes on untouched, is never read."""
        def forwarded_only(text):
            return substitute(text, r"^(?P<indent>[ \t]*)proxy_set_header[ \t]+X-Forwarded-For[ \t].*$",
                              lambda match: match.group("indent") + 'proxy_set_header Forwarded "for=$remote_addr";', 1)

        self.start(edit=forwarded_only, forwarded_header="Forwarded")
        answer = self.nginx.request("GET", PREFIX + "/version?probe=3", {"X-Forwarded-For": "10.1.2.3"},
                                    source="127.0.0.2")
        self.assertEqual(answer.status, 200)
        self.assertTrue(wait_until(lambda: access_clients(self.server, '"GET /version?probe=3" 200'), 5),
                        self.server.log())
        self.assertEqual(access_clients(self.server, '"GET /version?probe=3" 200'), ["127.0.0.2"])

    def test_a_newer_update_is_seen_through_the_proxy_within_2_s(self):
        """/latest is not cached: a newly published VERSION reaches boxes through the proxy at once."""
        self.start()
        self.assertEqual(self.nginx.request("GET", PREFIX + "/latest").header("Location"), "update/" + self.name)
        newer = "opq-box-update-%d.tar.bz2" % (VERSION + 100)
        data = archive_bytes(update_members(VERSION + 100))
        published = time.monotonic()
        publish(os.path.join(self.updates, newer), data)     # written, then renamed into place

        def sees_newer():
            return self.nginx.request("GET", PREFIX + "/latest").header("Location") == "update/" + newer

        self.assertTrue(wait_until(sees_newer, 10, interval=0.05), self.server.log())
        seconds = time.monotonic() - published
        self.assertLessEqual(seconds, 2.0, "the proxy's /latest named the new update after %.2f s" % seconds)
        # the relative Location resolves under the prefix, to the new bytes
        location = urllib.parse.urljoin(PREFIX + "/latest", "update/" + newer)
        self.assertEqual(location, PREFIX + "/update/" + newer)
        answer = self.nginx.request("GET", location)
        self.assertEqual((answer.status, answer.body), (200, data))

    def test_metrics_are_not_served_through_the_proxy(self):
        """/metrics stays private behind nginx, under every spelling nginx normalizes to it."""
        self.start()
        logged_before = len(self.server.log())
        for path in ["/metrics", "//metrics", "/%6Detrics", "/metrics?format=text", "/update/../metrics",
                     "/./metrics", "/metrics/"]:
            for method in ("GET", "HEAD"):
                with self.subTest(path=path, method=method):
                    self.assertIn(self.nginx.request(method, PREFIX + path, source="127.0.0.2").status, (403, 404))
        self.assertEqual(re.findall(r'.*"(?:GET|HEAD) /metrics[?"].*', self.server.log()[logged_before:]), [],
                         "no request for /metrics reached the server")
        direct = self.server.get("/metrics")
        self.assertEqual(direct.status, 200)
        self.assertIn(b"box_update_server_requests_total", direct.body)

    def test_nginx_quits_cleanly(self):
        """nginx -s quit ends the master and every process it started; as root, its workers are not root."""
        nginx = self.start()
        self.assertEqual(nginx.request("GET", PREFIX + "/update/" + self.name).status, 200)
        workers = nginx.children()
        self.assertTrue(workers, "nginx started no worker process")
        if os.geteuid() == 0:
            for pid in workers:
                with open("/proc/%d/status" % pid) as status:
                    uid = re.search(r"^Uid:\s+(\d+)", status.read(), re.MULTILINE).group(1)
                self.assertNotEqual(uid, "0", "nginx process %d runs as root" % pid)
        self.assertEqual(nginx.quit(), 0, nginx.stderr())
        self.assertEqual([pid for pid in workers if alive(pid)], [], "nginx processes left behind")
        self.assertFalse(os.path.exists(os.path.join(nginx.folder, "nginx.pid")), "the pid file was left behind")


if __name__ == "__main__":
    unittest.main()
