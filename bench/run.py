#!/usr/bin/env python3
"""Benchmarks: this server beside the peers a user would pick instead, measured in one run on loopback.

    python3 bench/run.py [--rounds 3] [--fleet 1000] [--duration 5] [--output FILE] [--quick]

Peers: ``python3 -m http.server``, nginx (one worker process, sendfile; installed from Debian's packages when
missing, skipped with a note when it cannot be had), and two ceilings for anything built on http.server: a
minimal keep-alive handler answering a fixed 33-byte body (``bench/ceiling_server.py``) and one that only
sendfile()s a file (``bench/sendfile_server.py``).  Every server writes its per-request log line to a file, as
in production (our access log goes to stderr, which Docker keeps).  Load comes from wrk and curl.

Figures that a target judges are medians of interleaved rounds (each contender in turn, --rounds times), so
drift on a shared machine hits all alike; beside req/s the server's CPU time per request (from /proc) is
shown, which other load on the machine disturbs less.  Measured:

- small routes at 1 and 8 connections, access log on, against the ceiling, http.server and nginx; the same
  with metrics counting switched off, and `Metrics.count` timed beside the CPU time of a request; our access
  log checked to hold one line per request, in today's format;
- 1 MiB downloads at 100 connections against the sendfile stub and nginx, and against this server as
  committed at HEAD, for "no worse than today against nginx";
- 1,000 keep-alive connections on ``/latest``: wrk's p50, p99, max, timeouts and errors, and how many of the
  connections the server had taken up (its thread count, sampled), since wrk reports nothing about requests
  still unanswered when it stops; then the memory each idle keep-alive connection costs;
- one large download, peak memory, ``/`` latency during slow downloads, cost growth with the folder's size;
- one Ed25519 and one RSA-3072 signature verification, and checking a large signed archive against
  ``bzip2 -dc | sha512sum``;
- ``/latest`` with a staged rollout under way and --boxes boxes known (each request from one of them, by
  ``X-OPQ-Box-Id``) against ``/latest`` without a policy, in turns; and the time to load that state at start.

Prints Markdown tables of every figure, the ratios (this server / peer) and a verdict for each target (the
list is ``targets()``).  The open-files limit is raised to its hard limit at start, for us and (inherited)
every process we start.
"""

import argparse
import bz2
import contextlib
import functools
import hashlib
import http.client
import json
import multiprocessing
import os
import platform
import re
import resource
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import timeit

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SERVER = os.path.join(ROOT, "box_update_server.py")
CEILING = os.path.join(ROOT, "bench", "ceiling_server.py")
SENDFILE = os.path.join(ROOT, "bench", "sendfile_server.py")
sys.path.insert(0, os.path.join(ROOT, "tests"))

import support  # noqa: E402  (tests/ on the path first: the archives the tests make, and the server module)

ROUTES = ["/", "/ls", "/latest", "/version"]
NAMESPACE = "opq-box-update"
HTTP_SERVER = "python3 -m http.server"
SMALL_VERSION, MIB_VERSION, LARGE_VERSION = 1700000000, 1750000000, 1800000000

# The access log line as it is today: asctime,ms INFO client "METHOD path" status body-bytes duration
ACCESS_LINE = re.compile(r'\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} INFO (\S+) "(\S+) (\S+)" (\d{3}) (\d+) \d+\.\dms')

# This server with metrics counting switched off (Metrics.count must exist, or this fails loudly).
NO_METRICS = ("import sys; sys.path.insert(0, %r); import box_update_server as server; server.Metrics.count; "
              "server.Metrics.count = lambda *args, **kwargs: None; sys.exit(server.main())" % ROOT)

NGINX_CONF = """
daemon off;
user root;
worker_processes 1;
pid {tmp}/nginx.pid;
error_log {tmp}/nginx-error.log;
events {{ worker_connections 4096; }}
http {{
    access_log {tmp}/nginx-access.log;
    sendfile on;
    tcp_nopush on;
    tcp_nodelay on;
    keepalive_requests 100000;
    default_type application/octet-stream;
    client_body_temp_path {tmp}/client_body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    server {{
        listen 127.0.0.1:{port};
        root {root};
    }}
}}
"""


# Targets ----------------------------------------------------------------------

def targets(options):
    """Every target this run judges, in the order of the Targets table: (key, text) pairs.

    The one list of them: each measurement judges its targets by key, and tests/test_bench.py checks that
    every one of them has a verdict.
    """
    top = max(options.connections)
    listed = []
    for route in options.routes:
        updates = " (%d updates)" % options.updates if route == "/ls" else ""
        listed.append(("ceiling " + route, "`%s`%s at %d connections, access log on, >= 0.8 x ceiling"
                       % (route, updates, top)))
    for route in options.routes:
        if route != "/ls":
            listed.append(("http.server " + route, "`%s` at %d connections >= 3 x `python3 -m http.server`"
                           % (route, top)))
    for route in options.routes:
        listed.append(("metrics " + route, "`%s` at %d connections with metrics >= 0.95 x without (by CPU time)"
                       % (route, top)))
    listed += [
        ("access log", "access log: one line per request, in today's format"),
        ("1 MiB sendfile", "1 MiB downloads at %d connections >= 0.9 x the sendfile stub"
         % options.download_connections),
        ("1 MiB nginx", "1 MiB downloads at %d connections: this server / nginx >= 0.95 x the same for --baseline-rev"
         % options.download_connections),
        ("fleet burst", "%d boxes at once, one connection and one `/latest` each: no request past 2 s, no errors"
         % options.fleet),
        ("fleet", "%d keep-alive connections on `/latest`: no request past 2 s, no errors" % options.fleet),
        ("connection memory", "%d idle keep-alive connections: RSS < 100 MB" % options.fleet),
        ("large download", "large download >= 0.9 x the faster of nginx and `http.server`"),
        ("peak RSS", "peak RSS < 40 MB after serving the large file"),
        ("flat RSS", "peak RSS for %d MB within 10%% of %d MB" % (options.rss_large_mb, options.large_mb)),
        ("slow downloads", "`/` p99 < 50 ms during the slow downloads"),
        ("growth", "`/latest` with %d updates >= 0.8 x with %d" % (max(options.scale), min(options.scale))),
        ("signed archive", "checking a signed %d MB archive >= 0.8 x `bzip2 -dc \\| sha512sum` (goal)"
         % options.large_mb),
        ("rollout", "`/latest` at %d connections with a rollout under way and %d boxes known >= 0.8 x without a "
         "policy (goal)" % (max(options.connections), options.boxes)),
        ("rollout load", "the state of %d boxes loaded at start in < 1 s" % options.boxes),
    ]
    return listed


class Report:
    """Tables in the order measured, then notes, then every target with its verdict."""

    def __init__(self, planned):
        self.sections = []
        self.notes = []
        self.planned = planned
        self.verdicts = {}

    def table(self, title, header, rows, note=None):
        lines = ["### " + title, "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
        if note:
            lines += ["", note]
        self.sections.append("\n".join(lines))
        print(self.sections[-1] + "\n", flush=True)

    def note(self, text):
        self.notes.append(text)
        print("Note: " + text, flush=True)

    def judge(self, key, value, met):
        self._verdict(key, value, "met" if met else "NOT met")

    def skip(self, key, reason):
        self._verdict(key, reason, "skipped")

    def _verdict(self, key, value, verdict):
        if key not in dict(self.planned):
            raise KeyError("no such target: %r" % key)
        self.verdicts[key] = (value, verdict)

    def markdown(self, header):
        targets_table = ["### Targets", "", "| target | measured | verdict |", "|---|---|---|"]
        for key, text in self.planned:
            value, verdict = self.verdicts.get(key, ("-", "not measured"))
            targets_table.append("| %s | %s | %s |" % (text, value, verdict))
        sections = [header] + self.sections
        if self.notes:
            sections.append("\n".join(["Notes:", ""] + ["- " + note for note in self.notes]))
        return "\n\n".join(sections + ["\n".join(targets_table)]) + "\n"


def ratio(a, b):
    return a / b if b else float("nan")


def interleaved(contenders, rounds):
    """Call each (name, measure) in turn, rounds times, so drift hits all alike: {name: [results]}."""
    results = {name: [] for name, _ in contenders}
    for _ in range(rounds):
        for name, measure in contenders:
            results[name].append(measure())
    return results


def median(values):
    return statistics.median(values) if values else float("nan")


# Update folders ---------------------------------------------------------------

def write_small_updates(folder, count, first_version=SMALL_VERSION):
    """Real, small updates (tests/support.py's layout), settled a minute ago."""
    for version in range(first_version, first_version + count):
        support.make_update(folder, version, mtime=time.time() - 60)


def _compress(chunk):
    return bz2.compress(chunk, 1)


def tar_entry(name, data, mode=0o644, size=None):
    """One tar member: its header block, then its data padded to a whole block."""
    info = tarfile.TarInfo(name)
    info.size, info.mode = len(data) if size is None else size, mode
    return info.tobuf(tarfile.GNU_FORMAT) + data + b"\0" * ((-len(data)) % tarfile.BLOCKSIZE)


def write_large_update(folder, megabytes, version):
    """A real update whose payload is random (incompressible), so the archive is about megabytes MiB large.

    Compressed in parallel as a multi-stream bzip2 file, as pbzip2 writes them.
    """
    top = "opq-box-update-%d" % version
    payload = megabytes << 20
    head = (tar_entry(top + "/VERSION", b"%d\n" % version) +
            tar_entry(top + "/install_update.sh", b"#!/bin/sh\necho installing\n", 0o755) +
            tar_entry(top + "/box-config-daemon/firmware.img", b"", size=payload))
    chunk = 8 << 20
    pieces = [head] + [os.urandom(min(chunk, payload - offset)) for offset in range(0, payload, chunk)]
    pieces.append(b"\0" * ((-payload) % tarfile.BLOCKSIZE + 2 * tarfile.BLOCKSIZE))
    path = os.path.join(folder, "opq-box-update-%d.tar.bz2" % version)
    with multiprocessing.Pool(max(1, os.cpu_count() or 1)) as pool, open(path, "wb") as out:
        for compressed in pool.imap(_compress, pieces):
            out.write(compressed)
    os.utime(path, (time.time() - 60, time.time() - 60))
    return path


# Servers ---------------------------------------------------------------------

class Servers(contextlib.ExitStack):
    """The servers a group of measurements runs against, each stopped when the group ends (or fails)."""

    def add(self, process):
        self.callback(process.stop)
        return process


def log_file(workdir, name):
    return os.path.join(workdir, name + ".log")


def raise_open_files_limit():
    """Soft RLIMIT_NOFILE up to the hard limit, for us and (inherited) every server and wrk we start."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = 1 << 16 if hard == resource.RLIM_INFINITY else hard
    if soft != resource.RLIM_INFINITY and soft < wanted:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
        except (ValueError, OSError):
            pass
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def get(port, path, headers=None):
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        connection.request("GET", path, headers=headers or {})
        answer = connection.getresponse()
        return answer.status, answer.read()
    finally:
        connection.close()


class Process:
    """A server under test.  Its stdout goes to /dev/null and its stderr to log (a file) or /dev/null: never to
    our terminal.  port None: ours, on port 0, names its port in its start line (log is then required).
    path_of maps a small route to what this server answers in its place."""

    def __init__(self, name, command, port, env=None, cwd=None, log=None, path_of=None):
        self.name, self.port, self.log = name, port, log
        self.threaded = True     # a thread per connection (nginx: no)
        self.path_of = path_of or (lambda route: route)
        start = os.path.getsize(log) if log and os.path.exists(log) else 0    # a log may be appended to
        with open(log or os.devnull, "ab") as errors:
            self.process = support.track(subprocess.Popen(command, env=env, cwd=cwd, stdin=subprocess.DEVNULL,
                                                          stdout=subprocess.DEVNULL, stderr=errors))
        try:
            if self.port is None:
                self.port = support.wait_for_listening_port(self.process, lambda: self.read_log(start), 60)
            self.wait_until_answering()
        except AssertionError as error:
            self.stop()
            raise RuntimeError("%s did not start: %s" % (self.name, error)) from None
        except BaseException:
            self.stop()
            raise

    def read_log(self, start=0):
        with open(self.log, "rb") as log:
            log.seek(start)
            return log.read().decode(errors="replace")

    def wait_until_answering(self, timeout=60):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError("%s exited with status %d before answering%s" % (
                    self.name, self.process.returncode, "; its log: " + self.log if self.log else ""))
            try:
                get(self.port, "/")
                return
            except (OSError, http.client.HTTPException):
                time.sleep(0.05)
        raise RuntimeError("%s did not answer on port %d" % (self.name, self.port))

    def status(self, field):
        """A number from /proc/PID/status: VmRSS, VmHWM (kB), Threads."""
        with open("/proc/%d/status" % self.process.pid) as status:
            return int(re.search(field + r":\s+(\d+)", status.read()).group(1))

    def peak_rss_kb(self):
        return self.status("VmHWM")

    def cpu_seconds(self):
        """User and system CPU time used so far by the process and its children (nginx's worker)."""
        used = 0
        for pid in [self.process.pid] + support.child_pids(self.process.pid):
            try:
                with open("/proc/%d/stat" % pid) as stat:
                    fields = stat.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            used += int(fields[11]) + int(fields[12])
        return used / os.sysconf("SC_CLK_TCK")

    def settle(self, threads, timeout=15):
        """Wait until the process runs at most threads threads (the connections of a load have ended)."""
        deadline = time.monotonic() + timeout
        while self.status("Threads") > threads and time.monotonic() < deadline:
            time.sleep(0.1)

    def stop(self):
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def start_box_server(name, folder, log=None, command=None, verify=True, **settings):
    """This server (or command, given the same settings) on folder; returns once its checks are done.

    It binds port 0 and names its port in its start line (support.listening_port, as in the tests), so no other
    process can take the port first; a revision from before port 0 was allowed (--baseline-rev) is given a
    port picked beforehand.
    """
    if log is None:
        log = os.path.join(folder, os.pardir, "box-server-%d.log" % time.monotonic_ns())
    settings = dict({"port": 0, "updates_dir": folder, "host": "127.0.0.1", "verify_updates": verify}, **settings)
    try:
        server = Process(name, command or [sys.executable, SERVER], None, log=log,
                         env=dict(os.environ, BOX_UPDATE_SERVER_SETTINGS=json.dumps(settings)))
    except RuntimeError as error:
        if "port must be between 1 and 65535" not in str(error):
            raise
        settings["port"] = support.free_port()
        server = Process(name, command or [sys.executable, SERVER], settings["port"], log=log,
                         env=dict(os.environ, BOX_UPDATE_SERVER_SETTINGS=json.dumps(settings)))
    port = server.port
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:   # wait for the background checks, so they do not share the CPU
        info = json.loads(get(port, "/")[1]).get("info", "")
        if "waiting" not in info:
            break
        time.sleep(0.2)
    return server


def head_server(workdir, rev):
    """box_update_server.py as committed at rev, written into workdir: (path, None) or (None, why not)."""
    try:
        shown = subprocess.run(["git", "-C", ROOT, "show", "%s:box_update_server.py" % rev], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, check=True)
    except subprocess.CalledProcessError as error:
        return None, "the server at %s could not be read from git: %s" % (rev, error.stderr.decode().strip())
    except OSError as error:
        return None, "the server at %s could not be read from git: %s" % (rev, error)
    folder = os.path.join(workdir, "head")
    os.mkdir(folder)
    path = os.path.join(folder, "box_update_server.py")
    with open(path, "wb") as out:
        out.write(shown.stdout)
    return path, None


# The peers below are told their port on their command line or in their config: picked beforehand.

def start_http_server(root, log=None, path_of=None):
    port = support.free_port()
    return Process(HTTP_SERVER, [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1",
                                 "--directory", root], port, log=log, path_of=path_of)


def start_ceiling(log=None):
    port = support.free_port()
    return Process("ceiling (minimal http.server handler)", [sys.executable, CEILING, str(port)], port, log=log,
                   path_of=lambda route: "/")


def start_sendfile_stub(path, log=None):
    port = support.free_port()
    return Process("sendfile stub (minimal http.server handler)", [sys.executable, SENDFILE, str(port), path],
                   port, log=log)


def find_nginx():
    nginx = shutil.which("nginx") or (os.path.exists("/usr/sbin/nginx") and "/usr/sbin/nginx")
    if nginx or os.geteuid() != 0 or not shutil.which("apt-get"):
        return nginx or None, None if nginx else "nginx is not installed"
    installed = subprocess.run("apt-get update -qq && apt-get install -y -qq nginx-light || "
                               "apt-get install -y -qq nginx", shell=True, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE)
    nginx = shutil.which("nginx") or (os.path.exists("/usr/sbin/nginx") and "/usr/sbin/nginx")
    return nginx or None, None if nginx else "nginx could not be installed: %s" % installed.stderr.decode()[-200:]


def start_nginx(nginx, root, workdir, path_of=None):
    port = support.free_port()
    conf = os.path.join(workdir, "nginx.conf")
    with open(conf, "w") as out:
        out.write(NGINX_CONF.format(tmp=workdir, port=port, root=root))
    server = Process("nginx", [nginx, "-c", conf, "-p", workdir], port, log=os.path.join(workdir, "nginx.stderr"),
                     path_of=path_of)
    server.threaded = False
    return server


# Load ---------------------------------------------------------------------------

class WrkRun:
    """What wrk printed about one run: requests, req/s, latencies (ms), timeouts and errors."""

    UNITS_MS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60000.0}

    def __init__(self, output, connections):
        self.output, self.connections = output, connections
        self.requests = int(re.search(r"(\d+) requests in", output).group(1))
        self.rps = float(re.search(r"Requests/sec:\s+([\d.]+)", output).group(1))
        latency = re.search(r"Latency\s+([\d.]+)(\w+)\s+([\d.]+)(\w+)\s+([\d.]+)(\w+)", output)
        self.latency_ms = {"max": self._ms(latency.group(5), latency.group(6)) if latency else float("nan")}
        for percent, value, unit in re.findall(r"^\s+(50|99)%\s+([\d.]+)(\w+)\s*$", output, re.M):
            self.latency_ms["p" + percent] = self._ms(value, unit)
        socket_errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output)
        counts = [int(count) for count in socket_errors.groups()] if socket_errors else [0, 0, 0, 0]
        self.socket_errors, self.timeouts = sum(counts[:3]), counts[3]
        bad = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
        self.bad_statuses = int(bad.group(1)) if bad else 0

    def _ms(self, value, unit):
        return float(value) * self.UNITS_MS[unit]

    @property
    def errors(self):
        return self.socket_errors + self.timeouts + self.bad_statuses


def wrk(port, path, connections, duration, timeout=None, latency=False, script=None):
    """One wrk run over keep-alive connections (each request made by script, a Lua file, if given)."""
    command = ["wrk", "-t%d" % min(connections, 2), "-c%d" % connections, "-d%ds" % duration]
    command += ["--timeout", "%ds" % timeout] if timeout else []
    command += ["--latency"] if latency else []
    command += ["--script", script] if script else []
    finished = subprocess.run(command + ["http://127.0.0.1:%d%s" % (port, path)], stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, check=True)
    return WrkRun(finished.stdout.decode(), connections)


def loaded(server, measure):
    """measure() (a WrkRun), noting the CPU time the server used per request meanwhile as its cpu_us."""
    before = server.cpu_seconds()
    run = measure()
    run.cpu_us = (server.cpu_seconds() - before) * 1e6 / max(1, run.requests)
    return run


def wrk_clean(port, path, connections, duration):
    """Requests per second, where any error spoils the figure."""
    run = wrk(port, path, connections, duration)
    if run.errors:
        raise RuntimeError("wrk saw errors on %s: %s" % (path, run.output))
    return run


class LogTail:
    """The lines a server appends to its log from now on."""

    def __init__(self, path):
        self.path, self.offset = path, os.path.getsize(path)

    def new_lines(self, quiet=0.2, timeout=10):
        """Once the log has stopped growing for quiet seconds, the lines added since the last call."""
        deadline, size = time.monotonic() + timeout, -1
        while time.monotonic() < deadline and os.path.getsize(self.path) != size:
            size = os.path.getsize(self.path)
            time.sleep(quiet)
        with open(self.path, "rb") as log:
            log.seek(self.offset)
            data = log.read()
        self.offset += len(data)
        return data.decode("utf-8", "replace").splitlines()


def slowest_take_up(runs):
    """The worst, over runs, of the seconds until every connection had its thread."""
    seconds = [run.all_by for run in runs]
    return "never" if None in seconds else "%.1f s" % max(seconds)


class ThreadWatch(threading.Thread):
    """Samples a thread-per-connection server's thread count during a load: when did every connection have one?"""

    def __init__(self, server, interval=0.05):
        super().__init__(daemon=True)
        self.server, self.interval = server, interval
        self.base = server.status("Threads")
        self.samples = []     # (seconds since start, threads beyond the base)
        self.stopping = threading.Event()

    def __enter__(self):
        self.started = time.monotonic()
        self.start()
        return self

    def __exit__(self, *exc_info):
        self.stopping.set()
        self.join()

    def run(self):
        while not self.stopping.is_set():
            try:
                self.samples.append((time.monotonic() - self.started, self.server.status("Threads") - self.base))
            except (OSError, AttributeError):
                return
            self.stopping.wait(self.interval)

    def by(self, seconds):
        """The most connection threads seen by then."""
        return max([count for moment, count in self.samples if moment <= seconds] or [0])

    def all_by(self, count):
        """Seconds until count connection threads ran at once, or None."""
        return next((moment for moment, threads in self.samples if threads >= count), None)


def download_rate(port, path):
    """One whole download, in MB/s (curl to /dev/null)."""
    finished = subprocess.run(["curl", "-s", "-o", "/dev/null", "-w", "%{speed_download} %{http_code}",
                               "http://127.0.0.1:%d%s" % (port, path)], stdout=subprocess.PIPE, check=True)
    speed, code = finished.stdout.decode().split()
    if code != "200":
        raise RuntimeError("download of %s answered %s" % (path, code))
    return float(speed) / 1e6


def latency_during_slow_downloads(port, path, clients, rate_kb, probes):
    """/ latency (ms) as OPQ Health sees it while clients download path at rate_kb KB/s each."""
    downloads = [subprocess.Popen(["curl", "-s", "-o", "/dev/null", "--limit-rate", "%dK" % rate_kb,
                                   "http://127.0.0.1:%d%s" % (port, path)]) for _ in range(clients)]
    try:
        time.sleep(1.0)
        latencies = []
        for _ in range(probes):
            started = time.monotonic()
            status, _ = get(port, "/")
            latencies.append((time.monotonic() - started) * 1000)
            if status != 200:
                raise RuntimeError("/ answered %d during the slow downloads" % status)
            time.sleep(0.02)
        still_running = sum(1 for download in downloads if download.poll() is None)
    finally:
        for download in downloads:
            download.kill()
            download.wait()
    ordered = sorted(latencies)
    return {"p50": statistics.median(ordered), "p99": ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))],
            "max": ordered[-1], "downloads_running": still_running}


def open_idle_connections(port, count, path="/version"):
    """count keep-alive connections, each after one answered request, left open and idle."""
    request = ("GET %s HTTP/1.1\r\nHost: bench\r\n\r\n" % path).encode()
    connections = []
    try:
        for _ in range(count):
            connection = socket.create_connection(("127.0.0.1", port), timeout=10)
            connections.append(connection)
            connection.sendall(request)
            answer = b""
            while b"\r\n\r\n" not in answer:
                data = connection.recv(65536)
                if not data:
                    raise RuntimeError("connection %d closed before its answer" % len(connections))
                answer += data
            head, body = answer.split(b"\r\n\r\n", 1)
            if not head.startswith(b"HTTP/1.1 200"):
                raise RuntimeError("connection %d answered %r" % (len(connections), head.split(b"\r\n")[0]))
            length = int(re.search(rb"(?im)^content-length:\s*(\d+)", head).group(1))
            while len(body) < length:
                body += connection.recv(65536)
    except BaseException:
        close_all(connections)
        raise
    return connections


def close_all(connections):
    for connection in connections:
        connection.close()


# Measurements -------------------------------------------------------------------

class AccessLogCheck:
    """Our access log's lines for one route against the requests wrk counted, and their format."""

    def __init__(self, route, status, body_bytes):
        self.route, self.expected = route, (status, body_bytes)
        self.requests = self.slack = self.matching = self.other = self.malformed = 0

    def add(self, lines, run):
        for line in lines:
            if '"GET %s"' % self.route not in line:
                continue
            match = ACCESS_LINE.search(line)
            if not match or match.end() != len(line):
                self.malformed += 1
            elif (int(match.group(4)), int(match.group(5))) == self.expected:
                self.matching += 1
            else:
                self.other += 1
        self.requests += run.requests
        self.slack += run.connections     # answers in flight when wrk stopped: logged, but not counted by wrk

    def extra(self):
        return self.matching + self.other + self.malformed - self.requests

    def consistent(self):
        return 0 <= self.extra() <= self.slack and not self.other and not self.malformed

    def row(self):
        extra = self.extra()
        return [self.route, self.requests, self.matching, self.other, self.malformed,
                "lines = requests" if extra == 0 else "%+d" % extra]


METRICS_COUNT_CALLS = 200000


def metrics_count_cost_us():
    """Microseconds per `Metrics.count` call for a small route's answer: the best of five timings."""
    import box_update_server as server   # the module the server runs (on the path through tests/support)
    metrics = server.Metrics()
    count = functools.partial(metrics.count, "/latest", 302, 0, 0.0004, None, False)
    nothing = functools.partial(lambda *args: None, "/latest", 302, 0, 0.0004, None, False)
    best = min(timeit.timeit(count, number=METRICS_COUNT_CALLS) - timeit.timeit(nothing, number=METRICS_COUNT_CALLS)
               for _ in range(5))
    return max(0.0, best) * 1e6 / METRICS_COUNT_CALLS


def measure_small_routes(report, ours, no_metrics, ceiling, others, options):
    """Small routes, every server logging to a file: rates, the cost of metrics, and our access log's lines.

    At the top connection count, this server, the ceiling and this server without metrics take turns for
    options.rounds rounds; http.server and nginx, far from their targets, are measured once."""
    top = max(options.connections)
    count_us = metrics_count_cost_us()
    rows, cpu_rows, metrics_rows, log_checks = [], [], [], []
    tail = LogTail(ours.log)
    for route in options.routes:
        status, body = get(ours.port, route)
        tail.new_lines(quiet=0.05)
        log_checks.append(AccessLogCheck(route, status, len(body)))

        def ours_logged(connections, route=route, check=log_checks[-1]):
            run = loaded(ours, functools.partial(wrk_clean, ours.port, route, connections, options.duration))
            check.add(tail.new_lines(), run)
            return run

        def peer_run(peer, connections, route=route):
            return loaded(peer, functools.partial(wrk_clean, peer.port, peer.path_of(route), connections,
                                                  options.duration))

        for connections in options.connections:
            turns = [ceiling, no_metrics] if connections == top else [ceiling]
            runs = interleaved([(ours.name, functools.partial(ours_logged, connections))]
                               + [(peer.name, functools.partial(peer_run, peer, connections)) for peer in turns],
                               options.rounds if connections == top else 1)
            runs.update((peer.name, [peer_run(peer, connections)]) for peer in others)
            rps = {name: median([run.rps for run in measured]) for name, measured in runs.items()}
            cpu = {name: median([run.cpu_us for run in measured]) for name, measured in runs.items()}
            ours_rps = rps[ours.name]
            rows.append([route, connections, len(body), "%.0f" % ours_rps]
                        + ["%.0f (%.2f)" % (rps[peer.name], ratio(ours_rps, rps[peer.name]))
                           for peer in [ceiling] + others])
            if connections != top:
                continue
            cpu_rows.append([route, "%.0f" % cpu[ours.name]]
                            + ["%.0f (%.2f)" % (cpu[peer.name], ratio(cpu[peer.name], cpu[ours.name]))
                               for peer in [ceiling, no_metrics] + others])
            to_ceiling = ratio(ours_rps, rps[ceiling.name])
            report.judge("ceiling " + route, "%.2f" % to_ceiling, to_ceiling >= 0.8)
            if route != "/ls" and HTTP_SERVER in rps:
                to_http_server = ratio(ours_rps, rps[HTTP_SERVER])
                report.judge("http.server " + route, "%.2f" % to_http_server, to_http_server >= 3)
            with_metrics = ratio(ours_rps, rps[no_metrics.name])
            kept = 1 - count_us / cpu[ours.name]
            metrics_rows.append([route, "%.0f" % ours_rps, "%.0f" % rps[no_metrics.name], "%.3f" % with_metrics,
                                 " ".join("%.2f" % ratio(on.rps, off.rps)
                                          for on, off in zip(runs[ours.name], runs[no_metrics.name])),
                                 "%.2f" % count_us, "%.0f" % cpu[ours.name], "%.3f" % kept])
            report.judge("metrics " + route, "%.3f (wrk medians: %.3f)" % (kept, with_metrics), kept >= 0.95)
    report.table("Small routes, access log on (wrk, keep-alive, req/s; at %d connections the median of %d "
                 "interleaved runs; in brackets: this server / peer)" % (top, options.rounds),
                 ["route", "connections", "body bytes", "this server"] + [peer.name for peer in [ceiling] + others],
                 rows, "Every server writes its per-request log line to a file: ours its access log (stderr), the "
                 "stubs and `http.server` their default line (stderr), nginx its access_log.")
    report.table("Server CPU time per request at %d connections (us, medians; in brackets: the peer's / this "
                 "server's, the rate ratio it implies where CPU is the limit)" % top,
                 ["route", "this server"] + [peer.name for peer in [ceiling, no_metrics] + others], cpu_rows,
                 "Taken from /proc (user and system time of the server process and its children) around each wrk "
                 "run: less sensitive than req/s to other load on the machine.")
    report.table("Cost of metrics (%d connections, req/s, medians of %d interleaved runs)" % (top, options.rounds),
                 ["route", "metrics on", "metrics off (`Metrics.count` a no-op)", "on / off", "on / off by round",
                  "`Metrics.count` us per call", "server CPU us per request", "rate kept (1 - count / CPU)"],
                 metrics_rows, "Counting is the only work metrics add to a request.  The wrk ratio moves between "
                 "rounds by more than the effect measured (see its rounds), so the verdict takes the rate kept from "
                 "CPU time: the server is CPU-bound here, and `Metrics.count`, timed in this process "
                 "(%d calls), is that share of each request's CPU time." % METRICS_COUNT_CALLS)
    report.table("Access log: one line per request (this server's runs above)",
                 ["route", "requests wrk counted", "lines with the answer's status and bytes", "other lines",
                  "lines not in today's format", "lines - requests"], [check.row() for check in log_checks],
                 "wrk does not count the answers in flight when it stops, which the server has logged: up to one "
                 "more line than requests per connection and run is expected.")
    consistent = all(check.consistent() for check in log_checks)
    report.judge("access log", "consistent on every route" if consistent else "see the table", consistent)


def measure_fleet_downloads(report, contenders, size, options, stub, head=None):
    """1 MiB downloads at 100 connections: contenders are (server, path), this server first; stub and head are
    the sendfile stub and this server at HEAD among them."""
    connections = options.download_connections

    def load(server, path):
        with ThreadWatch(server) as watch:
            run = loaded(server, functools.partial(wrk, server.port, path, connections, options.duration))
        run.all_by = watch.all_by(connections) if server.threaded else None
        server.settle(watch.base + 2)
        return run

    runs = interleaved([(server.name, functools.partial(load, server, path)) for server, path in contenders],
                       options.rounds)
    threaded = {server.name: server.threaded for server, _ in contenders}
    names = [server.name for server, _ in contenders]
    rps = {name: median([run.rps for run in runs[name]]) for name in names}
    ours = names[0]
    report.table("1 MiB downloads (an update archive of %d bytes) at %d connections (wrk -t2 -c%d, keep-alive; "
                 "medians of %d interleaved runs)" % (size, connections, connections, options.rounds),
                 ["server", "req/s", "MB/s", "this server / it", "server CPU us per download", "timeouts",
                  "socket errors", "statuses >= 400", "all %d connection threads by" % connections],
                 [[name, "%.0f" % rps[name], "%.0f" % (rps[name] * size / 1e6), "%.2f" % ratio(rps[ours], rps[name]),
                   "%.0f" % median([run.cpu_us for run in runs[name]]), sum(run.timeouts for run in runs[name]),
                   sum(run.socket_errors for run in runs[name]), sum(run.bad_statuses for run in runs[name]),
                   slowest_take_up(runs[name]) if threaded[name] else "-"]
                  for name in names],
                 "The sendfile stub answers every GET with the file, opened once; nginx runs one worker process "
                 "with sendfile and tcp_nopush on; the last row is this server as committed at --baseline-rev "
                 "(git), for the comparison with it.")
    report.judge("1 MiB sendfile", "%.2f" % ratio(rps[ours], rps[stub.name]), rps[ours] >= 0.9 * rps[stub.name])
    if "nginx" in rps and head:
        now, then = ratio(rps[ours], rps["nginx"]), ratio(rps[head.name], rps["nginx"])
        report.judge("1 MiB nginx", "%.2f (baseline: %.2f)" % (now, then), now >= 0.95 * then)
    else:
        report.skip("1 MiB nginx", "no nginx" if "nginx" not in rps else "no server at HEAD")


def measure_fleet_connections(report, servers, options):
    """options.fleet keep-alive connections on /latest: this server (first) and the ceiling.

    wrk writes its first request as soon as the kernel has completed a connection, whether or not the server
    has taken it up; a request never answered before wrk stops appears nowhere in wrk's figures.  So the
    server's thread count is watched too: a connection without its thread after 2 s had a request waiting
    longer than that."""
    def load(server):
        with ThreadWatch(server) as watch:
            run = wrk(server.port, "/latest", options.fleet, options.fleet_duration, timeout=2, latency=True)
        run.threads_at_2s, run.all_by = watch.by(2.0), watch.all_by(options.fleet)
        run.threads_at_end = watch.by(float("inf"))
        server.settle(watch.base + 2)
        return run

    runs = interleaved([(server.name, functools.partial(load, server)) for server in servers], options.rounds)
    rows = []
    for server in servers:
        measured = runs[server.name]
        rows.append([server.name, "%.0f" % median([run.rps for run in measured])]
                    + ["%.1f" % median([run.latency_ms.get(key, float("nan")) for run in measured])
                       for key in ("p50", "p99")]
                    + ["%.1f" % max(run.latency_ms["max"] for run in measured),
                       sum(run.timeouts for run in measured), sum(run.socket_errors for run in measured),
                       sum(run.bad_statuses for run in measured), min(run.threads_at_2s for run in measured),
                       min(run.threads_at_end for run in measured), slowest_take_up(measured)])
    report.table("%d keep-alive connections on `/latest` (wrk -t2 -c%d -d%ds --timeout 2s; %d interleaved runs: "
                 "medians, the worst max, totals, the fewest threads)" % (options.fleet, options.fleet,
                                                                          options.fleet_duration, options.rounds),
                 ["server", "req/s", "p50 ms", "p99 ms", "max ms", "timeouts", "socket errors", "statuses >= 400",
                  "connection threads at 2 s", "at the end", "all %d by" % options.fleet],
                 rows, "This server runs with max_connections and max_connections_per_client at %d (wrk connects "
                 "from one address).  wrk counts a timeout for each answer that took longer than 2 s and leaves it "
                 "out of its latencies; a request still unanswered when it stops is counted nowhere.  The thread "
                 "columns are the server's threads beyond those it had idle (one per connection taken up), sampled "
                 "every 50 ms: a connection still without one after 2 s had its first request waiting longer."
                 % (2 * options.fleet))
    ours = runs[servers[0].name]
    worst = max(run.latency_ms["max"] for run in ours)
    errors = sum(run.errors for run in ours)
    taken_up = min(run.threads_at_2s for run in ours)
    report.judge("fleet", "max %.0f ms, p99 %.0f ms, %d timeouts or errors, %d of %d connections taken up by 2 s"
                 % (worst, median([run.latency_ms.get("p99", float("nan")) for run in ours]), errors, taken_up,
                    options.fleet), worst < 2000 and not errors and taken_up >= options.fleet)


def measure_fleet_burst(report, servers, options):
    """options.fleet boxes arriving at once, each with one connection and one /latest: the moment an update is
    announced.  ab (apache2-utils) opens them all together; its longest request includes the wait to be
    taken up, which wrk's figures leave out."""
    ab = shutil.which("ab")
    if not ab:
        report.skip("fleet burst", "ab is not installed (apt-get install apache2-utils)")
        return
    rows, ours_worst, ours_failed = [], None, None
    for server in servers:
        worst, failed, idle_threads = [], 0, server.status("Threads")
        for _ in range(options.rounds):
            finished = subprocess.run([ab, "-q", "-r", "-s", "10", "-n", str(3 * options.fleet), "-c",
                                       str(options.fleet), "http://127.0.0.1:%d/latest" % server.port],
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=120)
            output = finished.stdout.decode("utf-8", "replace")
            longest = re.search(r"100%\s+(\d+)", output)
            worst.append(int(longest.group(1)) if longest else float("inf"))
            failures = re.search(r"Failed requests:\s+(\d+)", output)
            failed += int(failures.group(1)) if failures else 3 * options.fleet
            server.settle(idle_threads + 2)
        rows.append([server.name, "%.0f" % median(worst), "%.0f" % max(worst), failed])
        if ours_worst is None:
            ours_worst, ours_failed = max(worst), failed
    report.table("%d boxes at once on `/latest`, one connection each (ab -c%d -n%d, %d runs)"
                 % (options.fleet, options.fleet, 3 * options.fleet, options.rounds),
                 ["server", "longest request ms (median of runs)", "longest request ms (worst run)", "failed"],
                 rows, "Each of ab's connections makes one request and closes, as a box does; the longest request "
                 "counts from ab's connect, so it includes the wait for the server to take the connection up.")
    report.judge("fleet burst", "longest %.0f ms, %d failed" % (ours_worst, ours_failed),
                 ours_worst < 2000 and not ours_failed)


def measure_connection_memory(report, folder, log, options):
    """RSS of a fresh server before and with options.fleet idle keep-alive connections."""
    server = start_box_server("this server", folder, log=log, max_connections=2 * options.fleet,
                              max_connections_per_client=2 * options.fleet)
    try:
        time.sleep(0.5)
        before, threads_before = server.status("VmRSS"), server.status("Threads")
        connections = open_idle_connections(server.port, options.fleet)
        try:
            time.sleep(1.0)
            after, threads_after = server.status("VmRSS"), server.status("Threads")
        finally:
            close_all(connections)
    finally:
        server.stop()
    per_connection = (after - before) / options.fleet
    report.table("Memory per open connection (%d idle keep-alive connections, each after one request)"
                 % options.fleet, ["case", "VmRSS kB", "threads"],
                 [["fresh server", before, threads_before],
                  ["with %d idle connections" % options.fleet, after, threads_after],
                  ["per connection", "%.1f" % per_connection, "%.2f" % ((threads_after - threads_before)
                                                                        / options.fleet)]])
    report.judge("connection memory", "%.1f MB (%.1f kB per connection)" % (after / 1024, per_connection),
                 after < 100 * 1024)


def measure_large_download(report, ours, peers, large, options):
    """One whole download at a time, the servers in turns: best and median MB/s."""
    contenders = [(ours.name, functools.partial(download_rate, ours.port, "/update/" + large))]
    contenders += [(peer.name, functools.partial(download_rate, peer.port, "/large/" + large)) for peer in peers]
    all_rates = interleaved(contenders, options.runs)
    rates = {name: max(runs) for name, runs in all_rates.items()}
    fastest_peer = max(rate for name, rate in rates.items() if name != ours.name)
    report.table("Large download (%d MB, %d runs each in turns, MB/s)" % (options.large_mb, options.runs),
                 ["server", "best", "this server / it (best)", "median", "this server / it (median)"],
                 [[name, "%.0f" % rate, "%.2f" % ratio(rates[ours.name], rate),
                   "%.0f" % median(all_rates[name]),
                   "%.2f" % ratio(median(all_rates[ours.name]), median(all_rates[name]))]
                  for name, rate in rates.items()])
    report.judge("large download", "%.2f" % ratio(rates[ours.name], fastest_peer),
                 rates[ours.name] >= 0.9 * fastest_peer)


def measure_peak_rss(report, ours, workdir, options):
    """VmHWM after checking and serving the large archive, and after hashing and serving raw files."""
    rss_rows = [["this server, checked and served the %d MB archive" % options.large_mb, ours.peak_rss_kb()]]
    raw_rss = []
    for megabytes in [options.large_mb, options.rss_large_mb]:
        raw_folder = os.path.join(workdir, "raw-%d" % megabytes)
        os.mkdir(raw_folder)
        with open(os.path.join(raw_folder, "opq-box-update-1.tar.bz2"), "wb") as raw:
            for _ in range(megabytes):
                raw.write(os.urandom(1 << 20))
        raw_server = start_box_server("this server", raw_folder, log=os.path.join(workdir, "raw.log"), verify=False)
        try:
            download_rate(raw_server.port, "/update/opq-box-update-1.tar.bz2")
            raw_rss.append(raw_server.peak_rss_kb())
        finally:
            raw_server.stop()
            shutil.rmtree(raw_folder)
        rss_rows.append(["this server, hashed and served a %d MB file" % megabytes, raw_rss[-1]])
    report.table("Peak RSS (VmHWM, kB)", ["case", "kB"], rss_rows)
    peak = max(row[1] for row in rss_rows)
    report.judge("peak RSS", "%.1f MB" % (peak / 1024), peak < 40 * 1024)
    report.judge("flat RSS", "%+.1f%%" % (100 * (raw_rss[1] / raw_rss[0] - 1)), raw_rss[1] <= raw_rss[0] * 1.1)


def measure_slow_downloads(report, ours, large, options):
    latency = latency_during_slow_downloads(ours.port, "/update/" + large, options.slow_clients, 512,
                                            options.probes)
    report.table("`/` latency while %d clients download at 512 KB/s (ms)" % options.slow_clients,
                 ["p50", "p99", "max", "downloads still running at the end"],
                 [["%.1f" % latency["p50"], "%.1f" % latency["p99"], "%.1f" % latency["max"],
                   latency["downloads_running"]]])
    report.judge("slow downloads", "%.1f ms" % latency["p99"], latency["p99"] < 50)


def measure_growth(report, workdir, options):
    """/latest and /ls as the folder grows: one server per folder size, taking turns on /latest."""
    top = max(options.connections)
    with Servers() as servers:
        scaled = []
        for count in options.scale:
            folder = os.path.join(workdir, "scale-%d" % count)
            os.mkdir(folder)
            write_small_updates(folder, count)
            scaled.append((count, servers.add(start_box_server("this server, %d updates" % count, folder,
                                                               log=log_file(workdir, "scale-%d" % count)))))
        latest = interleaved([(count, functools.partial(wrk_clean, server.port, "/latest", top, options.duration))
                              for count, server in scaled], options.rounds)
        latest_rps = {count: median([run.rps for run in runs]) for count, runs in latest.items()}
        rows = [[count, "%.0f" % latest_rps[count], "%.0f" % wrk_clean(server.port, "/ls", top, options.duration).rps,
                 len(get(server.port, "/ls")[1])] for count, server in scaled]
    report.table("Cost growth (wrk, %d connections, req/s; `/latest` the median of %d interleaved runs, `/ls` one "
                 "run)" % (top, options.rounds), ["updates in the folder", "/latest", "/ls", "/ls body bytes"], rows)
    smallest, largest = min(options.scale), max(options.scale)
    report.judge("growth", "%.2f" % ratio(latest_rps[largest], latest_rps[smallest]),
                 latest_rps[largest] >= 0.8 * latest_rps[smallest])


# Each request from one of the known boxes, at random (math.random: each wrk thread has its own Lua state).
ROLLOUT_WRK_SCRIPT = """
request = function()
   return wrk.format(nil, nil, {["X-OPQ-Box-Id"] = "box-" .. math.random(0, %d - 1),
                                ["X-OPQ-Box-Version"] = "%d"})
end
"""


def write_rollout_state(state_dir, boxes, old, new, started):
    """A state of boxes boxes (each offered one of two releases, as the waves would have it), new rolling out."""
    bus = support.bus
    store = bus.FleetStore(state_dir)
    now = time.time()
    rows = []
    for number in range(boxes):
        record = bus.BoxRecord("box-%d" % number, "box-%d" % number, "10.%d.%d.%d" % (
            number >> 16 & 255, number >> 8 & 255, number & 255), now - 86400)
        record.last_seen, record.reported = now - number, old
        record.offered_version = new if bus.wave_position(record.box, new) < 0.5 else old
        record.offered = "opq-box-update-%d.tar.bz2" % record.offered_version
        rows.append(record.row())
    clocks = [bus.ReleaseClock(old, 0.0, 0.0, None, False, 0, 0),
              bus.ReleaseClock(new, started, 0.0, None, False, 0, 0)]
    store.write({"baseline": str(old)}, clocks, rows, [])
    store.close()


def measure_rollout(report, workdir, options):
    """/latest with a rollout half-way through its waves and options.boxes boxes known, against no policy."""
    top = max(options.connections)
    folder, state = os.path.join(workdir, "rollout-updates"), os.path.join(workdir, "rollout-state")
    os.mkdir(folder)
    os.mkdir(state)
    old, new = SMALL_VERSION, SMALL_VERSION + 1
    write_small_updates(folder, 2, old)
    policy = os.path.join(workdir, "rollout.json")
    with open(policy, "w") as policy_file:
        json.dump({"canaries": ["box-0", "box-1"], "canary_hours": 0, "waves_hours": 2}, policy_file)
    write_rollout_state(state, options.boxes, old, new, time.time() - 3600)

    bus = support.bus
    settings = bus.Settings(port=1, updates_dir=folder, rollout=policy, state_dir=state)
    load_ms = []
    for _ in range(5):
        started = time.perf_counter()
        loaded_rollout = bus.open_rollout(settings, lambda: bus.EMPTY_SNAPSHOT)
        load_ms.append((time.perf_counter() - started) * 1000)
        loaded_rollout.store.close()

    script = os.path.join(workdir, "rollout.lua")
    with open(script, "w") as lua:
        lua.write(ROLLOUT_WRK_SCRIPT % (options.boxes, old))
    with Servers() as servers:
        plain = servers.add(start_box_server("no policy", folder, log=log_file(workdir, "rollout-off")))
        rolling = servers.add(start_box_server("rollout", folder, log=log_file(workdir, "rollout-on"),
                                               rollout=policy, state_dir=state))
        fleet = json.loads(get(rolling.port, "/fleet")[1])
        if len(fleet["boxes"]) != options.boxes or not 0 < fleet["rollout"]["eligible_share"] < 1:
            raise RuntimeError("the rollout state is not as written: %d boxes, share %s"
                               % (len(fleet["boxes"]), fleet["rollout"]["eligible_share"]))

        def latest(server):
            run = wrk(server.port, "/latest", top, options.duration, script=script)
            if run.errors:
                raise RuntimeError("wrk saw errors on /latest: %s" % run.output)
            return run

        runs = interleaved([(name, functools.partial(loaded, server, functools.partial(latest, server)))
                            for name, server in (("off", plain), ("on", rolling))], options.rounds)
    rps = {name: median([run.rps for run in results]) for name, results in runs.items()}
    cpu = {name: median([run.cpu_us for run in results]) for name, results in runs.items()}
    report.table("`/latest` with a rollout under way (%d boxes known, %d connections, req/s and server CPU us per "
                 "request, medians of %d interleaved runs)" % (options.boxes, top, options.rounds),
                 ["policy", "req/s", "CPU us/request"],
                 [["none", "%.0f" % rps["off"], "%.0f" % cpu["off"]],
                  ["rollout, waves half-way", "%.0f (%.2f)" % (rps["on"], ratio(rps["on"], rps["off"])),
                   "%.0f" % cpu["on"]]])
    report.table("Loading the rollout state at start (%d boxes; `open_rollout`, 5 runs, ms)" % options.boxes,
                 ["median", "max"], [["%.0f" % median(load_ms), "%.0f" % max(load_ms)]])
    report.judge("rollout", "%.2f" % ratio(rps["on"], rps["off"]), rps["on"] >= 0.8 * rps["off"])
    report.judge("rollout load", "%.0f ms" % median(load_ms), median(load_ms) < 1000)


def measure_signatures(report, workdir, archive, options):
    """One Ed25519 and one RSA-3072 verification, then a signed archive checked against bzip2 -dc | sha512sum."""
    keygen = shutil.which("ssh-keygen")
    if not keygen:
        report.note("ssh-keygen is not installed: signature costs not measured")
        report.skip("signed archive", "no ssh-keygen")
        return
    import box_update_server as server   # the module the server runs (on the path through tests/support)
    folder = os.path.join(workdir, "signatures")
    os.mkdir(folder)
    environment = {name: value for name, value in os.environ.items() if name != "SSH_AUTH_SOCK"}

    def keygen_run(arguments, stdin=subprocess.DEVNULL):
        return subprocess.run([keygen] + arguments, stdin=stdin, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              env=environment, check=True).stdout

    message = os.urandom(1024)
    with open(os.path.join(folder, "message"), "wb") as out:
        out.write(message)
    rows, signers = [], {}
    for name, arguments in (("Ed25519", ["-t", "ed25519"]), ("RSA-3072", ["-t", "rsa", "-b", "3072"])):
        key = os.path.join(folder, name)
        keygen_run(["-q", "-N", "", "-C", "bench", "-f", key] + arguments)
        with open(key + ".pub") as public:
            signers[name] = server.parse_allowed_signers("bench@example.com %s\n"
                                                         % " ".join(public.read().split()[:2])).signers
        with open(os.path.join(folder, "message")) as stdin:
            armored = keygen_run(["-Y", "sign", "-n", NAMESPACE, "-f", key], stdin)
        algorithm = server.parse_sshsig(armored).hash_algorithm
        digest = hashlib.new(algorithm, message).digest()
        times = []
        for _ in range(options.signature_runs):
            started = time.perf_counter()
            server.verify_sshsig(server.parse_sshsig(armored), digest, signers[name], NAMESPACE)
            times.append((time.perf_counter() - started) * 1000)
        rows.append([name, algorithm, "%.2f" % median(times), "%.2f" % min(times)])
    report.table("Signature verification (`parse_sshsig` + `verify_sshsig`, %d runs, ms)" % options.signature_runs,
                 ["key", "hash", "median", "best"], rows)

    with open(archive, "rb") as stdin:
        armored = keygen_run(["-Y", "sign", "-n", NAMESPACE, "-f", os.path.join(folder, "Ed25519")], stdin)
    digits = server.version_digits(os.path.basename(archive))

    def check_signed():
        started = time.monotonic()
        with server.open_regular_file(archive) as fileobj:
            digests = server.check_update_archive(fileobj, digits)
        signature = server.parse_sshsig(armored)
        server.verify_sshsig(signature, getattr(digests, signature.hash_algorithm), signers["Ed25519"], NAMESPACE)
        return time.monotonic() - started

    def pipeline():
        started = time.monotonic()
        subprocess.run("bzip2 -dc -- %s | sha512sum" % shlex.quote(archive), shell=True, stdout=subprocess.DEVNULL,
                       check=True)
        return time.monotonic() - started

    ours_name, shell_name = "check_update_archive + verify_sshsig (one thread)", "`bzip2 -dc \\| sha512sum`"
    seconds = interleaved([(ours_name, check_signed), (shell_name, pipeline)], options.rounds)
    size = os.path.getsize(archive)
    took = {name: median(runs) for name, runs in seconds.items()}
    report.table("Checking a signed %d MB archive (medians of %d interleaved runs)" % (options.large_mb,
                                                                                       options.rounds),
                 ["pass", "seconds", "MB/s", "our MB/s / its"],
                 [[name, "%.2f" % took[name], "%.1f" % (size / 1e6 / took[name]),
                   "%.2f" % ratio(took[name], took[ours_name])] for name in (ours_name, shell_name)],
                 "Our pass decompresses, follows the tar framing and computes SHA-256 and SHA-512 on one core; "
                 "the pipeline runs bzip2 and sha512sum as two processes, on two cores.")
    to_pipeline = ratio(took[shell_name], took[ours_name])
    report.judge("signed archive", "%.2f" % to_pipeline, to_pipeline >= 0.8)


# The run --------------------------------------------------------------------------

def peer_path(route):
    """Where the file peers (http.server, nginx) keep a file the size of a small route's answer."""
    return "/peers/peer%s.bin" % route.replace("/", "-")


def start_head_server(report, workdir, folder, options, **settings):
    """This server as committed at --baseline-rev, on folder; None (and a note) when git cannot show it."""
    path, why_not = head_server(workdir, options.baseline_rev)
    if not path:
        report.note(why_not)
        return None
    with open(path, "rb") as then, open(SERVER, "rb") as now:
        if then.read() == now.read():
            report.note("the server at %s is this server: the comparison with it shows only the noise"
                        % options.baseline_rev)
    return start_box_server("this server at %s (git)" % options.baseline_rev, folder, log=log_file(workdir, "head"),
                            command=[sys.executable, path], **settings)


def fleet_measurements(report, workdir, folder, mib_path, nginx, options):
    """Small routes, 1 MiB downloads, many connections and what they cost in memory: the folder of small updates
    (and the 1 MiB one, the latest), this server allowing twice options.fleet connections, from one address too."""
    limits = {"max_connections": 2 * options.fleet, "max_connections_per_client": 2 * options.fleet}
    with Servers() as servers:
        ours = servers.add(start_box_server("this server", folder, log=log_file(workdir, "ours"), **limits))
        no_metrics = servers.add(start_box_server("this server, metrics off", folder, log=log_file(workdir, "off"),
                                                  command=[sys.executable, "-c", NO_METRICS], **limits))
        ceiling = servers.add(start_ceiling(log=log_file(workdir, "ceiling")))
        os.mkdir(os.path.join(workdir, "peers"))
        for route in ROUTES:
            with open(os.path.join(workdir, peer_path(route).lstrip("/")), "wb") as peer_file:
                peer_file.write(b"x" * len(get(ours.port, route)[1]))
        others = [servers.add(start_http_server(workdir, log=log_file(workdir, "http-server"), path_of=peer_path))]
        if nginx:
            others.append(servers.add(start_nginx(nginx, workdir, workdir, path_of=peer_path)))
        measure_small_routes(report, ours, no_metrics, ceiling, others, options)
        no_metrics.stop()

        mib = os.path.basename(mib_path)
        sendfile = servers.add(start_sendfile_stub(mib_path, log=log_file(workdir, "sendfile")))
        contenders = [(ours, "/update/" + mib), (sendfile, "/")]
        contenders += [(peer, "/updates/" + mib) for peer in others if peer.name == "nginx"]
        head = None
        if nginx and options.baseline_rev:
            head = start_head_server(report, workdir, folder, options, **limits)
        if head:
            servers.add(head)
            contenders.append((head, "/update/" + mib))
        measure_fleet_downloads(report, contenders, os.path.getsize(mib_path), options, sendfile, head)
        for server in [sendfile, head] + others:
            if server:
                server.stop()
        measure_fleet_burst(report, [ours, ceiling], options)
        measure_fleet_connections(report, [ours, ceiling], options)
    measure_connection_memory(report, folder, log_file(workdir, "memory"), options)


def large_archive_measurements(report, workdir, large_folder, large, nginx, options):
    """One large archive: its download rate beside the file peers, peak memory, latency beside slow downloads."""
    with Servers() as servers:
        ours = servers.add(start_box_server("this server", large_folder, log=log_file(workdir, "large")))
        peers = [servers.add(start_http_server(workdir, log=log_file(workdir, "http-server")))]
        if nginx:
            peers.append(servers.add(start_nginx(nginx, workdir, workdir)))
        measure_large_download(report, ours, peers, large, options)
        measure_peak_rss(report, ours, workdir, options)
        measure_slow_downloads(report, ours, large, options)


def run(options):
    report = Report(targets(options))
    open_files = raise_open_files_limit()
    if open_files < options.fleet + 200:
        report.note("the open-files limit is %d, too low for %d connections" % (open_files, options.fleet))
    nginx, nginx_note = find_nginx() if not options.no_nginx else (None, "nginx skipped (--no-nginx)")
    if nginx_note:
        report.note(nginx_note)
    workdir = tempfile.mkdtemp(prefix="box-update-bench-")
    try:
        folder, large_folder = os.path.join(workdir, "updates"), os.path.join(workdir, "large")
        os.mkdir(folder)
        os.mkdir(large_folder)
        print("making %d updates (one of 1 MiB) and one of %d MB in %s" % (options.updates, options.large_mb,
                                                                           workdir), flush=True)
        write_small_updates(folder, options.updates - 1)
        mib_path = write_large_update(folder, 1, MIB_VERSION)
        large_path = write_large_update(large_folder, options.large_mb, LARGE_VERSION)

        fleet_measurements(report, workdir, folder, mib_path, nginx, options)
        large_archive_measurements(report, workdir, large_folder, os.path.basename(large_path), nginx, options)
        measure_growth(report, workdir, options)
        measure_signatures(report, workdir, large_path, options)
        measure_rollout(report, workdir, options)
        return report
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def parse_options(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--updates", type=int, default=200, help="updates in the folder, one of 1 MiB (200)")
    parser.add_argument("--large-mb", type=int, default=200, help="size of the large update in MB (200)")
    parser.add_argument("--rss-large-mb", type=int, default=1024, help="file size for the RSS comparison (1024)")
    parser.add_argument("--duration", type=int, default=5, help="seconds per wrk measurement (5)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds, medians taken (3)")
    parser.add_argument("--runs", type=int, default=7, help="large downloads per server, best taken (7)")
    parser.add_argument("--download-connections", type=int, default=100,
                        help="connections for the 1 MiB downloads (100)")
    parser.add_argument("--fleet", type=int, default=1000,
                        help="keep-alive connections on /latest, and idle ones for the memory figure (1000)")
    parser.add_argument("--fleet-duration", type=int, default=4, help="seconds per run on /latest (4)")
    parser.add_argument("--slow-clients", type=int, default=16, help="clients downloading at 512 KB/s (16)")
    parser.add_argument("--probes", type=int, default=200, help="/ requests during the slow downloads (200)")
    parser.add_argument("--scale", type=int, nargs="+", default=[100, 1000, 10000], help="folder sizes")
    parser.add_argument("--routes", nargs="+", default=ROUTES, help="routes to load")
    parser.add_argument("--connections", type=int, nargs="+", default=[1, 8], help="wrk connections")
    parser.add_argument("--signature-runs", type=int, default=50, help="verifications timed per key (50)")
    parser.add_argument("--baseline-rev", default="HEAD",
                        help="git revision of the server for 'no worse than today against nginx' (HEAD; '' for none)")
    parser.add_argument("--boxes", type=int, default=10000, help="boxes known to the rollout (10000)")
    parser.add_argument("--no-nginx", action="store_true", help="leave nginx out")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, for the smoke test")
    parser.add_argument("--output", help="also write the Markdown report to this file")
    options = parser.parse_args(argv)
    if options.quick:
        options.updates, options.large_mb, options.rss_large_mb, options.duration = 5, 2, 4, 1
        options.runs, options.slow_clients, options.probes, options.scale = 1, 2, 10, [5, 20]
        options.routes, options.connections, options.rounds = ["/"], [1, 8], 1
        options.fleet, options.fleet_duration, options.signature_runs = 200, 3, 5
        options.boxes = 200
    return options


def main(argv=None):
    arguments = sys.argv[1:] if argv is None else argv
    options = parse_options(arguments)
    if not shutil.which("wrk") or not shutil.which("curl"):
        print("wrk and curl are needed: apt-get install wrk curl", file=sys.stderr)
        return 2
    started = time.monotonic()
    report = run(options)
    header = "Produced by `python3 bench/run.py%s` on %s (%d cores, CPython %s) in %.1f minutes." % (
        "".join(" " + shlex.quote(argument) for argument in arguments), time.strftime("%Y-%m-%d"),
        os.cpu_count() or 1, platform.python_version(), (time.monotonic() - started) / 60)
    markdown = report.markdown(header)
    print(markdown)
    if options.output:
        with open(options.output, "w") as out:
            out.write(markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
