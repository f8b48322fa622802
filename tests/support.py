"""Shared test helpers: real update archives, a real server process, raw HTTP."""

import atexit
import bz2
import http.client
import http.server
import io
import json
import logging
import os
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import unittest
import unittest.mock

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SERVER = os.path.join(ROOT, "box_update_server.py")
sys.path.insert(0, ROOT)

import box_update_server as bus  # noqa: E402  (the path above first)

# The heavy scenarios (100,000 files, a real Prometheus, archive bombs of hundreds of MB) run once per CI
# run, not once per CPython: BOX_UPDATE_TESTS=quick skips them, saying so.
QUICK = os.environ.get("BOX_UPDATE_TESTS") == "quick"
heavy = unittest.skipIf(QUICK, "heavy scenario, skipped in quick runs (BOX_UPDATE_TESTS=quick); CI runs it once")


# At the default verbosity unittest prints a skip as "s" and counts it: the reasons are printed once at exit,
# so a run on a machine without nginx, say, says what it did not test.
_SKIPPED = {}
_add_skip = unittest.TestResult.addSkip


def _note_skip(result, test, reason):
    _SKIPPED.setdefault(reason, []).append(test.id())
    _add_skip(result, test, reason)


def _print_skip_reasons():
    if _SKIPPED:
        lines = ["skipped %d test(s):" % sum(len(tests) for tests in _SKIPPED.values())]
        for reason, tests in sorted(_SKIPPED.items()):
            shown = ", ".join(test.rsplit(".", 2)[-2] + "." + test.rsplit(".", 1)[-1] for test in tests[:3])
            lines.append("  %d: %s (%s%s)" % (len(tests), reason, shown, ", ..." if len(tests) > 3 else ""))
        sys.stderr.write("\n".join(lines) + "\n")


unittest.TestResult.addSkip = _note_skip
atexit.register(_print_skip_reasons)


# Archives -------------------------------------------------------------------

def file_member(name, data, mode=0o644):
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = len(data), mode, 1700000000
    return info, data


def dir_member(name):
    info = tarfile.TarInfo(name)
    info.type, info.mode = tarfile.DIRTYPE, 0o755
    return info, None


def link_member(name, target, hard=False):
    info = tarfile.TarInfo(name)
    info.type, info.linkname = (tarfile.LNKTYPE if hard else tarfile.SYMTYPE), target
    return info, None


def device_member(name):
    info = tarfile.TarInfo(name)
    info.type, info.devmajor, info.devminor = tarfile.CHRTYPE, 1, 3
    return info, None


def update_members(version, version_content=None, installer=True):
    """The layout a box expects: top folder, VERSION, install_update.sh, box-config-daemon/."""
    top = "opq-box-update-%s" % version
    content = ("%s\n" % version if version_content is None else version_content).encode()
    members = [dir_member(top), file_member(top + "/VERSION", content)]
    if installer:
        members.append(file_member(top + "/install_update.sh", b"#!/bin/sh\necho installed\n", 0o755))
    members += [dir_member(top + "/box-config-daemon"),
                file_member(top + "/box-config-daemon/daemon.bin", os.urandom(2048))]
    return members


def tar_bytes(members):
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.GNU_FORMAT) as archive:
        for info, data in members:
            archive.addfile(info, io.BytesIO(data) if data is not None else None)
    return buffer.getvalue()


def pax_records(records):
    """The body of a pax extended header: each " key=value\\n" record led by its own length in decimal (POSIX pax)."""
    body = b""
    for key, value in records:
        record = b" %s=%s\n" % (key, value)
        length = len(record) + len(str(len(record)))
        length += len(str(length)) - len(str(len(record)))
        body += str(length).encode() + record
    return body


def archive_bytes(members):
    return bz2.compress(tar_bytes(members))


def make_update(folder, version, members=None, mtime=None):
    """Write opq-box-update-<version>.tar.bz2 into folder; return its path."""
    path = os.path.join(folder, "opq-box-update-%s.tar.bz2" % version)
    data = archive_bytes(members if members is not None else update_members(version))
    publish(path, data, mtime)
    return path


def publish(path, data, mtime=None):
    """Write data under a temporary name, then rename it into place, as the README says."""
    temporary = os.path.join(os.path.dirname(path), "." + os.path.basename(path) + ".part")
    with open(temporary, "wb") as out:
        out.write(data)
    if mtime is not None:
        os.utime(temporary, (mtime, mtime))
    os.replace(temporary, path)


# Servers --------------------------------------------------------------------

# The server's start line names the port it bound: settings may say "port": 0, so no test races another
# process for a port picked beforehand.
LISTENING = re.compile(r"listening on http://(?:\[[^\]]*\]|[^\s/:]*):(\d+)/")


def listening_port(log_text):
    """The port named by the server's start line ("listening on http://host:PORT/"), or None before it."""
    match = LISTENING.search(log_text)
    return int(match.group(1)) if match else None


def wait_for_listening_port(process, read_log, timeout=30):
    """The port from the start line once process has written it; AssertionError if it exits or takes too long.

    read_log returns the process's log (its stderr) so far.  The caller stops the process on failure.
    """
    if not wait_until(lambda: listening_port(read_log()) is not None or process.poll() is not None, timeout):
        raise AssertionError("no 'listening on' line within %s s:\n%s" % (timeout, read_log()))
    port = listening_port(read_log())
    if port is None:
        raise AssertionError("exited with status %s before listening:\n%s" % (process.poll(), read_log()))
    return port


def free_port():
    """A port free a moment ago, for a program that must be told its port before it starts (nginx's listen,
    Prometheus's --web.listen-address): another process may take it meanwhile, so prefer "port": 0 and
    listening_port for our server."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def python_executable():
    return os.environ.get("TEST_PYTHON", sys.executable)


def child_pids(pid):
    """The processes whose parent is pid (from /proc)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open("/proc/%s/stat" % entry) as stat:
                    if int(stat.read().rsplit(")", 1)[1].split()[1]) == pid:
                        found.append(int(entry))
            except OSError:
                pass
    return found


def open_connections(port):
    """How many connections to port its server still holds open (ESTABLISHED or CLOSE_WAIT), from /proc/net.

    The server frees a connection's slot before it closes it, so none of these left: no slot is held.
    """
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as listing:
                rows = listing.read().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            fields = row.split()
            if int(fields[1].rsplit(":", 1)[1], 16) == port and fields[3] in ("01", "08"):
                count += 1
    return count


def end_process(process, timeout=15):
    """Stop a process a test started (SIGTERM, then SIGKILL after timeout) and reap it; its exit status."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    return process.returncode


# Every process a test started through track() or ServerProcess; any still running at exit is stopped, reaped
# and named, so a test run leaves no process behind even when a test forgot one (.ci/run checks it too).
_TRACKED = []


def track(process):
    """Have process (a subprocess.Popen) stopped and reaped at exit if no test did so; returns it."""
    _TRACKED.append(process)
    return process


def _end_tracked():
    left = [process for process in _TRACKED if process.poll() is None]
    for process in left:
        end_process(process, timeout=5)
    if left:
        sys.stderr.write("support: stopped %d process(es) a test left running: %s\n" % (
            len(left), "; ".join(" ".join(map(str, process.args))[:120] for process in left)))


atexit.register(_end_tracked)


# Tests shorten the folder watcher's clocks instead of sleeping through them: class attributes, patched in
# this process (shorten_watcher_timing) or, for a server subprocess, by a launcher that sets them before
# main() runs (ServerProcess(timing=...)).  The product reads no test-only setting or environment variable.
QUICK_TIMING = {"FolderWatcher.POLL_SECONDS": 0.1, "FolderWatcher.RACY_SECONDS": 0.5, "CheckQueue.SETTLE_SECONDS": 0.2}


def settings_environment(settings):
    """This process's environment with BOX_UPDATE_SERVER_SETTINGS holding settings as JSON, as operators set it."""
    return dict(os.environ, BOX_UPDATE_SERVER_SETTINGS=json.dumps(settings))


def shorten_watcher_timing(test, timing=None):
    """Patch the watcher's timing constants (QUICK_TIMING by default) for the rest of test."""
    for name, seconds in (QUICK_TIMING if timing is None else timing).items():
        owner, attribute = name.split(".")
        patcher = unittest.mock.patch.object(getattr(bus, owner), attribute, seconds)
        patcher.start()
        test.addCleanup(patcher.stop)


def server_command(python, timing=None):
    """The command that runs the server file with python; with timing, its constants set first."""
    if not timing:
        return [python, SERVER]
    assignments = "".join("server.%s = %r; " % (name, seconds) for name, seconds in sorted(timing.items()))
    launcher = ("import sys; sys.path.insert(0, %r); sys.argv[0] = %r; import box_update_server as server; %s"
                "sys.exit(server.main())" % (ROOT, SERVER, assignments))
    return [python, "-c", launcher]


class ServerProcess:
    """The real server as a subprocess, its log in a file, on a port it picks itself (port 0).

    timing: {"FolderWatcher.RACY_SECONDS": 0.5, ...} runs the server with those constants (see QUICK_TIMING).
    """

    START_SECONDS = 30     # for the start line, on a busy machine

    def __init__(self, updates_dir, user=None, command=None, timing=None, **settings):
        self.updates_dir = updates_dir
        self.user = user
        self.command = command
        self.timing = timing
        self.settings = dict(settings)
        self.log_file = tempfile.NamedTemporaryFile(prefix="box-update-server-", suffix=".log", delete=False)
        self.process = None
        self.port = None

    def __enter__(self):
        try:
            return self.start()
        except BaseException:
            os.unlink(self.log_file.name)
            raise

    def __exit__(self, *exc_info):
        self.stop()
        if os.path.exists(self.log_file.name):
            os.unlink(self.log_file.name)

    def start(self, wait_for_checks=True):
        """Start the server, wait for its start line (and its first checks); stopped and reaped if that fails."""
        settings = dict({"port": 0, "updates_dir": self.updates_dir, "host": "127.0.0.1"}, **self.settings)
        env = settings_environment(settings)
        self.log_file.truncate(0)
        command = self.command or server_command(python_executable(), self.timing)
        if self.user is not None:    # the system Python, which any user can run
            command = ["setpriv", "--reuid", self.user, "--regid", "nogroup", "--clear-groups"] + \
                server_command("/usr/bin/python3", self.timing)
        self.process = track(subprocess.Popen(command, env=env, cwd=ROOT, stdout=subprocess.DEVNULL,
                                              stderr=self.log_file))
        try:
            try:
                self.port = wait_for_listening_port(self.process, self.log, self.START_SECONDS)
            except AssertionError as error:
                raise AssertionError("server did not start: %s" % error) from None
            if wait_for_checks and not wait_until(
                    lambda: "waiting to be checked" not in self.health().get("info", ""), 60):
                raise AssertionError("the server kept files waiting to be checked:\n" + self.log())
            wait_until(lambda: not open_connections(self.port), 10)   # probes' slots freed
        except BaseException:
            end_process(self.process)
            raise
        return self

    def stop(self, signum=signal.SIGTERM, timeout=15):
        """Send signum, wait for the exit (killed after timeout: AssertionError), return the exit status."""
        if self.process is None or self.process.poll() is not None:
            return self.process.returncode if self.process else None
        self.process.send_signal(signum)
        return self.wait(timeout)

    def wait(self, timeout=15):
        """Wait for the process to exit by itself; return its exit status (killed and reaped after timeout)."""
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise AssertionError("server did not stop within %s s" % timeout)

    def log(self):
        with open(self.log_file.name, encoding="utf-8", errors="replace") as log:
            return log.read()

    def url(self, path="/"):
        return "http://127.0.0.1:%d%s" % (self.port, path)

    def request(self, method, path, headers=None, timeout=10):
        return request(self.port, method, path, headers, timeout)

    def get(self, path, headers=None):
        return self.request("GET", path, headers)

    def health(self):
        return json.loads(self.get("/").body)

    def fd_count(self):
        return len(os.listdir("/proc/%d/fd" % self.process.pid))

    def thread_count(self):
        return len(os.listdir("/proc/%d/task" % self.process.pid))

    def peak_rss_kb(self):
        with open("/proc/%d/status" % self.process.pid) as status:
            return int(re.search(r"VmHWM:\s+(\d+)", status.read()).group(1))

    def rss_kb(self):
        with open("/proc/%d/status" % self.process.pid) as status:
            return int(re.search(r"VmRSS:\s+(\d+)", status.read()).group(1))

    def cpu_seconds(self):
        """User and system CPU time the process has used."""
        with open("/proc/%d/stat" % self.process.pid) as stat_file:
            fields = stat_file.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def access_lines(self, request):
        """The access log lines of one request, e.g. '"GET /ls"'."""
        return [line for line in self.log().splitlines() if request in line and " INFO " in line]


class Response:
    def __init__(self, status, headers, body):
        self.status, self.headers, self.body = status, headers, body

    def header(self, name):
        return self.headers.get(name)


def request(port, method, path, headers=None, timeout=10, source=None):
    """One request on its own connection, from source (an address in 127.0.0.0/8) if given."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout,
                                            source_address=(source, 0) if source else None)
    try:
        connection.request(method, path, headers=headers or {})
        response = connection.getresponse()
        body = response.read()
        return Response(response.status, response.headers, body)
    finally:
        connection.close()


def raw_exchange(port, data, timeout=5, source="127.0.0.1"):
    """Send raw bytes, read until the server closes or goes quiet; return what came back."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout, source_address=(source, 0)) as connection:
        connection.sendall(data)
        try:
            connection.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        chunks = []
        try:
            while True:
                chunk = connection.recv(65536)
                if not chunk:
                    break
                chunks.append(chunk)
        except (socket.timeout, ConnectionResetError):
            pass
        return b"".join(chunks)


def status_of(raw_response):
    match = re.match(rb"HTTP/1\.[01] (\d{3}) ", raw_response)
    return int(match.group(1)) if match else None


def wait_until(predicate, timeout, interval=0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if predicate():
                return True
        except (OSError, ValueError, http.client.HTTPException):
            pass
        time.sleep(interval)
    return False


def require_binary(name):
    path = shutil.which(name)
    if path is None:
        raise unittest.SkipTest("%s is not installed, so this case is skipped" % name)
    return path


class TempDirTestCase(unittest.TestCase):
    """A fresh temporary folder per test, with an updates folder inside it."""

    def setUp(self):
        self.tmp = tempfile.mkdtemp(prefix="box-update-test-")
        self.addCleanup(shutil.rmtree, self.tmp, True)
        self.updates = os.path.join(self.tmp, "updates")
        os.mkdir(self.updates)

    def start_server(self, wait_for_checks=True, **settings):
        server = ServerProcess(self.updates, **settings)
        self.addCleanup(server.__exit__)
        return server.start(wait_for_checks)

    def start_server_as(self, user, wait_for_checks=True, **settings):
        """The server as another user (root reads every file whatever its mode), or as ourselves if not root."""
        if os.geteuid() != 0:
            return self.start_server(wait_for_checks, **settings)
        if not (shutil.which("setpriv") and os.path.exists("/usr/bin/python3")):
            raise unittest.SkipTest("running as root without setpriv and /usr/bin/python3 to drop privileges")
        os.chmod(self.tmp, 0o755)
        server = ServerProcess(self.updates, user=user, **settings)
        self.addCleanup(server.__exit__)
        return server.start(wait_for_checks)


class PrefixProxy:
    """A minimal reverse proxy mounting a backend under a path prefix, as the public deployment does."""

    def __init__(self, prefix, backend_port):
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self):
                if not self.path.startswith(prefix + "/"):
                    self.send_response(404)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                upstream = http.client.HTTPConnection("127.0.0.1", backend_port, timeout=10)
                upstream.request("GET", self.path[len(prefix):])
                answer = upstream.getresponse()
                body = answer.read()
                proxy.seen.append(self.path)
                self.send_response(answer.status)
                for name, value in answer.getheaders():
                    if name.lower() not in ("server", "date", "connection", "transfer-encoding"):
                        self.send_header(name, value)
                self.end_headers()
                self.wfile.write(body)
                upstream.close()

            def log_message(self, *args):
                pass

        self.seen = []
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.httpd.server_address[1]
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


# Reliability report ------------------------------------------------------------

_REPORT = []


def record(area, tried, outcome):
    """Note one row of the README's Reliability table; written when RELIABILITY_REPORT names a file."""
    _REPORT.append((area, tried, outcome))


def _write_report():
    path = os.environ.get("RELIABILITY_REPORT")
    if not path or not _REPORT:
        return
    order = ["Load", "Slow and idle clients", "Hostile input", "Faults during downloads", "Configuration faults"]
    rows = sorted(_REPORT, key=lambda row: (order.index(row[0]) if row[0] in order else len(order), row[0]))
    with open(path, "w") as report:
        report.write("| area | what was tried | outcome |\n|---|---|---|\n")
        for area, tried, outcome in rows:
            report.write("| %s | %s | %s |\n" % (area, tried, outcome))


atexit.register(_write_report)


def connect(port, source="127.0.0.1", timeout=10):
    """A TCP connection to the server from an address in 127.0.0.0/8 (each one is a different client)."""
    return socket.create_connection(("127.0.0.1", port), timeout=timeout, source_address=(source, 0))


def hold_connections(port, count, source="127.0.0.1"):
    """count idle connections (no request sent) that each hold one of the server's slots.

    A connection made while an earlier client's slot is still being released is refused (503);
    such connections are replaced until every one of them is held.
    """
    held = [connect(port, source) for _ in range(count)]
    for _ in range(20):
        time.sleep(0.2)
        refused = select.select(held, [], [], 0)[0]
        if not refused:
            return held
        for connection in refused:
            held.remove(connection)
            connection.close()
            held.append(connect(port, source))
    close_all(held)
    raise AssertionError("the server kept refusing connections below its limit")


def close_all(connections):
    for connection in connections:
        connection.close()


def read_response_head(connection):
    """(head, the body bytes that came with it) of the answer arriving on a raw socket."""
    received = b""
    while b"\r\n\r\n" not in received:
        chunk = connection.recv(4096)
        if not chunk:
            raise ConnectionError("closed before the headers")
        received += chunk
    head, body = received.split(b"\r\n\r\n", 1)
    return head, body


class SlowDownload(threading.Thread):
    """A raw-socket download read at a fixed rate through a small receive buffer, as on a thin home link.

    rate 0 reads nothing after the headers until resume is set, then reads the rest at once: a client
    that stalled.
    """

    def __init__(self, port, path, rate, extra_headers=b"", source="127.0.0.1"):
        super().__init__(daemon=True)
        self.port, self.path, self.rate, self.extra_headers, self.source = port, path, rate, extra_headers, source
        self.status = self.content_length = None
        self.body = b""
        self.closed_early = False
        self.error = None
        self.headers_received = threading.Event()
        self.resume = threading.Event()

    def run(self):
        try:
            with socket.socket() as connection:
                connection.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 32768)
                connection.settimeout(60)
                connection.bind((self.source, 0))
                connection.connect(("127.0.0.1", self.port))
                connection.sendall(b"GET %s HTTP/1.1\r\nHost: x\r\n%s\r\n" % (self.path.encode(), self.extra_headers))
                head, body = read_response_head(connection)
                self.status = status_of(head)
                self.content_length = int(re.search(rb"Content-Length: (\d+)", head).group(1))
                self.headers_received.set()
                if self.rate == 0:
                    self.resume.wait(60)
                parts, total, started = [body], len(body), time.monotonic()
                while total < self.content_length:
                    try:
                        chunk = connection.recv(16384)
                    except ConnectionResetError:    # a cut download is reset
                        chunk = b""
                    if not chunk:
                        self.closed_early = True
                        break
                    parts.append(chunk)
                    total += len(chunk)
                    delay = total / self.rate - (time.monotonic() - started) if self.rate else 0
                    if delay > 0:
                        time.sleep(delay)
                self.body = b"".join(parts)
        except Exception as error:  # the test asserts on it
            self.error = error
        finally:
            self.headers_received.set()


class HealthWatcher(threading.Thread):
    """OPQ Health's probe, every 100 ms while a test runs, with its 2 s timeout."""

    def __init__(self, port, source="127.0.0.1"):
        super().__init__(daemon=True)
        self.port, self.source = port, source
        self.stopping, self.latencies, self.failures = threading.Event(), [], []

    def run(self):
        while not self.stopping.is_set():
            started = time.monotonic()
            try:
                answer = request(self.port, "GET", "/", timeout=2, source=self.source)
                if answer.status != 200:
                    self.failures.append(answer.status)
            except Exception as error:  # noted as a failure
                self.failures.append(repr(error))
            self.latencies.append(time.monotonic() - started)
            self.stopping.wait(0.1)

    def stop(self):
        self.stopping.set()
        self.join(10)
        return self


class InProcessServer:
    """The server inside the test process, for a handler or routes a test changes (a bug, a smaller copy_chunk).

    Its log lines (access lines included) are collected in .log; the logger is restored afterwards.
    """

    def __init__(self, test, updates_dir, handler=bus.ConnectionHandler, routes=bus.UpdateRoutes, wait_for_checks=True,
                 **settings):
        settings = bus.Settings(port=1, updates_dir=updates_dir, host="127.0.0.1")._replace(port=0, **settings)
        self.log = []
        log_handler = logging.Handler()
        log_handler.emit = lambda record: self.log.append(record.getMessage())
        bus.logger.addHandler(log_handler)
        test.addCleanup(bus.logger.removeHandler, log_handler)
        test.addCleanup(bus.logger.setLevel, bus.logger.level)
        bus.logger.setLevel(logging.INFO)
        self.catalog = bus.Catalog(updates_dir, verify=settings.verify_updates)
        self.catalog.start()
        test.addCleanup(self.catalog.stop)
        self.server = bus.BoxUpdateServer(settings, self.catalog, routes=routes, handler=handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        test.addCleanup(self.server.server_close)
        test.addCleanup(self.server.shutdown)
        self.port = self.server.server_address[1]
        if wait_for_checks and not wait_until(lambda: self.catalog.snapshot.waiting == 0, 60):
            raise AssertionError("the catalog kept files waiting to be checked")

    def get(self, path, headers=None):
        return request(self.port, "GET", path, headers)
