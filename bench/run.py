#!/usr/bin/env python3
"""Benchmarks: this server beside the peers a user would pick instead, measured in one run on loopback.

    python3 bench/run.py [--updates 200] [--large-mb 200] [--duration 5] [--output bench/results.md]

Peers: ``python3 -m http.server`` on the same folder, nginx serving it (installed from Debian's packages
when missing, skipped with a note when it cannot be had), and the ceiling: a minimal keep-alive
``http.server`` handler answering a fixed 33-byte body.  Load comes from wrk.  Prints a Markdown table
of every figure, the ratios (this server / peer) and whether each target is met.
"""

import argparse
import bz2
import http.client
import io
import json
import multiprocessing
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SERVER = os.path.join(ROOT, "box_update_server.py")
CEILING = os.path.join(ROOT, "bench", "ceiling_server.py")
ROUTES = ["/", "/ls", "/latest", "/version"]
NGINX_CONF = """
daemon off;
user root;
worker_processes auto;
pid {tmp}/nginx.pid;
error_log {tmp}/nginx-error.log;
events {{ worker_connections 1024; }}
http {{
    access_log off;
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


# Update folders ---------------------------------------------------------------

def small_update(version):
    """A real, small update archive as a box expects it."""
    top = "opq-box-update-%d" % version
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        for name, data, mode in ((top + "/VERSION", b"%d\n" % version, 0o644),
                                 (top + "/install_update.sh", b"#!/bin/sh\necho installing\n", 0o755),
                                 (top + "/box-config-daemon/README", b"box-config-daemon build\n", 0o644)):
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(data), mode
            archive.addfile(info, io.BytesIO(data))
    return bz2.compress(buffer.getvalue())


def write_small_updates(folder, count, first_version=1700000000):
    for version in range(first_version, first_version + count):
        path = os.path.join(folder, "opq-box-update-%d.tar.bz2" % version)
        with open(path, "wb") as out:
            out.write(small_update(version))
        os.utime(path, (time.time() - 60, time.time() - 60))


def _compress(chunk):
    return bz2.compress(chunk, 1)


def tar_entry(name, data, mode=0o644, size=None):
    """One tar member: its header block, then its data padded to a whole block."""
    info = tarfile.TarInfo(name)
    info.size, info.mode = len(data) if size is None else size, mode
    return info.tobuf(tarfile.GNU_FORMAT) + data + b"\0" * ((-len(data)) % tarfile.BLOCKSIZE)


def write_large_update(folder, megabytes, version):
    """A real update whose payload is random (incompressible), so the archive is about megabytes large.

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

def free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_for(port, path="/", timeout=60):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            connection.request("GET", path)
            connection.getresponse().read()
            connection.close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError("nothing answered on port %d" % port)


class Process:
    def __init__(self, name, command, port, env=None, cwd=None):
        self.name, self.port = name, port
        self.process = subprocess.Popen(command, env=env, cwd=cwd, stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL)
        wait_for(port)

    def peak_rss_kb(self):
        with open("/proc/%d/status" % self.process.pid) as status:
            return int(re.search(r"VmHWM:\s+(\d+)", status.read()).group(1))

    def stop(self):
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def start_box_server(folder, verify=True):
    port = free_port()
    settings = {"port": port, "updates_dir": folder, "host": "127.0.0.1", "verify_updates": verify}
    server = Process("box-update-server", [sys.executable, SERVER], port,
                     env=dict(os.environ, BOX_UPDATE_SERVER_SETTINGS=json.dumps(settings)))
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:   # wait for the background checks, so they do not share the CPU
        info = json.loads(get(port, "/")[1]).get("info", "")
        if "waiting" not in info:
            break
        time.sleep(0.2)
    return server


def start_http_server(folder):
    port = free_port()
    return Process("python3 -m http.server", [sys.executable, "-m", "http.server", str(port), "--bind",
                                              "127.0.0.1", "--directory", folder], port)


def start_ceiling():
    port = free_port()
    return Process("ceiling (minimal http.server handler)", [sys.executable, CEILING, str(port)], port)


def find_nginx():
    nginx = shutil.which("nginx") or (os.path.exists("/usr/sbin/nginx") and "/usr/sbin/nginx")
    if nginx or os.geteuid() != 0 or not shutil.which("apt-get"):
        return nginx or None, None if nginx else "nginx is not installed"
    installed = subprocess.run("apt-get update -qq && apt-get install -y -qq nginx-light || "
                               "apt-get install -y -qq nginx", shell=True, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE)
    nginx = shutil.which("nginx") or (os.path.exists("/usr/sbin/nginx") and "/usr/sbin/nginx")
    return nginx or None, None if nginx else "nginx could not be installed: %s" % installed.stderr.decode()[-200:]


def start_nginx(nginx, folder, workdir):
    port = free_port()
    conf = os.path.join(workdir, "nginx.conf")
    with open(conf, "w") as out:
        out.write(NGINX_CONF.format(tmp=workdir, port=port, root=folder))
    return Process("nginx", [nginx, "-c", conf, "-p", workdir], port)


def get(port, path, headers=None):
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        connection.request("GET", path, headers=headers or {})
        answer = connection.getresponse()
        return answer.status, answer.read()
    finally:
        connection.close()


# Measurements ------------------------------------------------------------------

def wrk(port, path, connections, duration):
    """Requests per second over keep-alive connections, by wrk."""
    threads = min(connections, 2)
    finished = subprocess.run(["wrk", "-t%d" % threads, "-c%d" % connections, "-d%ds" % duration,
                               "http://127.0.0.1:%d%s" % (port, path)], stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, check=True)
    output = finished.stdout.decode()
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)|Socket errors: .*", output)
    if errors:
        raise RuntimeError("wrk saw errors on %s: %s" % (path, errors.group(0)))
    return float(re.search(r"Requests/sec:\s+([\d.]+)", output).group(1))


def download_rate(port, path):
    """One whole download, in MB/s (curl to /dev/null)."""
    finished = subprocess.run(["curl", "-s", "-o", "/dev/null", "-w", "%{speed_download} %{http_code}",
                               "http://127.0.0.1:%d%s" % (port, path)], stdout=subprocess.PIPE, check=True)
    speed, code = finished.stdout.decode().split()
    if code != "200":
        raise RuntimeError("download of %s answered %s" % (path, code))
    return float(speed) / 1e6


def download_rates(targets, runs):
    """runs downloads for each (name, port, path), taken in turns so drift hits all alike; MB/s lists."""
    rates = {name: [] for name, _, _ in targets}
    for _ in range(runs):
        for name, port, path in targets:
            rates[name].append(download_rate(port, path))
    return rates


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


# The run --------------------------------------------------------------------------

class Report:
    def __init__(self):
        self.sections = []
        self.targets = []

    def table(self, title, header, rows):
        lines = ["### " + title, "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
        self.sections.append("\n".join(lines))
        print(self.sections[-1] + "\n", flush=True)

    def target(self, text, value, met):
        self.targets.append((text, value, "met" if met else "NOT met"))

    def markdown(self, command):
        targets = ["### Targets", "", "| target | measured | verdict |", "|---|---|---|"]
        targets += ["| %s | %s | %s |" % row for row in self.targets]
        return "\n\n".join(["Produced by `%s` on %s." % (command, time.strftime("%Y-%m-%d"))]
                           + self.sections + ["\n".join(targets)]) + "\n"


def ratio(a, b):
    return a / b if b else float("nan")


def run(options):
    report = Report()
    nginx, nginx_note = find_nginx() if not options.no_nginx else (None, "nginx skipped (--no-nginx)")
    workdir = tempfile.mkdtemp(prefix="box-update-bench-")
    processes = []
    try:
        folder = os.path.join(workdir, "updates")
        os.mkdir(folder)
        print("making %d small updates and one of %d MB in %s" % (options.updates, options.large_mb, folder),
              flush=True)
        write_small_updates(folder, options.updates)
        large = os.path.basename(write_large_update(folder, options.large_mb, 1800000000))

        ours = start_box_server(folder)
        processes.append(ours)
        # each peer serves a file the size of what the route answers
        for route in ROUTES:
            with open(os.path.join(folder, "peer%s.bin" % route.replace("/", "-")), "wb") as peer_file:
                peer_file.write(b"x" * len(get(ours.port, route)[1]))
        peers = [start_http_server(folder), start_ceiling()]
        if nginx:
            peers.append(start_nginx(nginx, folder, workdir))
        processes += peers
        http_server, ceiling = peers[0], peers[1]

        # Requests per second ------------------------------------------------------
        rows, rps = [], {}
        for route in options.routes:
            peer_path = "/peer%s.bin" % route.replace("/", "-")
            for connections in options.connections:
                ours_rps = wrk(ours.port, route, connections, options.duration)
                peer_rps = {peer.name: wrk(peer.port, "/" if peer is ceiling else peer_path, connections,
                                           options.duration) for peer in peers}
                rps[route, connections] = (ours_rps, peer_rps)
                rows.append([route, connections, len(get(ours.port, route)[1]), "%.0f" % ours_rps]
                            + ["%.0f (%.2f)" % (peer_rps[peer.name], ratio(ours_rps, peer_rps[peer.name]))
                               for peer in peers])
        report.table("Requests per second (wrk, keep-alive; in brackets: this server / peer)",
                     ["route", "connections", "body bytes", "this server"] + [peer.name for peer in peers], rows)
        top = max(options.connections)
        for route in options.routes:
            ours_rps, peer_rps = rps[route, top]
            to_ceiling = ratio(ours_rps, peer_rps[ceiling.name])
            to_http_server = ratio(ours_rps, peer_rps[http_server.name])
            if route == "/ls":
                report.target("`/ls` (%d updates) at %d connections >= 0.5 x ceiling" % (options.updates, top),
                              "%.2f" % to_ceiling, to_ceiling >= 0.5)
            else:
                report.target("`%s` at %d connections >= 0.6 x ceiling" % (route, top), "%.2f" % to_ceiling,
                              to_ceiling >= 0.6)
                report.target("`%s` at %d connections >= 3 x `python3 -m http.server`" % (route, top),
                              "%.2f" % to_http_server, to_http_server >= 3)

        # Large downloads -------------------------------------------------------------
        all_rates = download_rates([("this server", ours.port, "/update/" + large)] +
                                   [(peer.name, peer.port, "/" + large) for peer in peers if peer is not ceiling],
                                   options.runs)
        rates = {name: max(runs) for name, runs in all_rates.items()}
        fastest_peer = max(rate for name, rate in rates.items() if name != "this server")
        report.table("Large download (%d MB, %d runs each in turns, MB/s)" % (options.large_mb, options.runs),
                     ["server", "best", "this server / it (best)", "median", "this server / it (median)"],
                     [[name, "%.0f" % rate, "%.2f" % ratio(rates["this server"], rate),
                       "%.0f" % statistics.median(all_rates[name]),
                       "%.2f" % ratio(statistics.median(all_rates["this server"]), statistics.median(all_rates[name]))]
                      for name, rate in rates.items()])
        report.target("large download >= 0.9 x the faster of nginx and `http.server`",
                      "%.2f" % ratio(rates["this server"], fastest_peer),
                      rates["this server"] >= 0.9 * fastest_peer)

        # Memory ------------------------------------------------------------------------
        rss_rows = [["this server, checked and served the %d MB archive" % options.large_mb, ours.peak_rss_kb()]]
        raw_sizes = [options.large_mb, options.rss_large_mb]
        raw_rss = []
        for megabytes in raw_sizes:
            raw_folder = os.path.join(workdir, "raw-%d" % megabytes)
            os.mkdir(raw_folder)
            with open(os.path.join(raw_folder, "opq-box-update-1.tar.bz2"), "wb") as raw:
                for _ in range(megabytes):
                    raw.write(os.urandom(1 << 20))
            raw_server = start_box_server(raw_folder, verify=False)
            download_rate(raw_server.port, "/update/opq-box-update-1.tar.bz2")
            raw_rss.append(raw_server.peak_rss_kb())
            raw_server.stop()
            shutil.rmtree(raw_folder)
            rss_rows.append(["this server, hashed and served a %d MB file" % megabytes, raw_rss[-1]])
        report.table("Peak RSS (VmHWM, kB)", ["case", "kB"], rss_rows)
        peak = max(row[1] for row in rss_rows)
        report.target("peak RSS < 40 MB after serving the large file", "%.1f MB" % (peak / 1024), peak < 40 * 1024)
        report.target("peak RSS for %d MB within 10%% of %d MB" % (options.rss_large_mb, options.large_mb),
                      "%+.1f%%" % (100 * (raw_rss[1] / raw_rss[0] - 1)), raw_rss[1] <= raw_rss[0] * 1.1)

        # Latency during slow downloads ---------------------------------------------------
        latency = latency_during_slow_downloads(ours.port, "/update/" + large, options.slow_clients, 512,
                                                options.probes)
        report.table("`/` latency while %d clients download at 512 KB/s (ms)" % options.slow_clients,
                     ["p50", "p99", "max", "downloads still running at the end"],
                     [["%.1f" % latency["p50"], "%.1f" % latency["p99"], "%.1f" % latency["max"],
                       latency["downloads_running"]]])
        report.target("`/` p99 < 50 ms during the slow downloads", "%.1f ms" % latency["p99"], latency["p99"] < 50)

        for process in processes:
            process.stop()
        processes = []

        # Cost growth with the number of updates ----------------------------------------------
        growth_rows, latest_rps = [], {}
        for count in options.scale:
            scale_folder = os.path.join(workdir, "scale-%d" % count)
            os.mkdir(scale_folder)
            write_small_updates(scale_folder, count)
            server = start_box_server(scale_folder)
            latest_rps[count] = wrk(server.port, "/latest", top, options.duration)
            ls_rps = wrk(server.port, "/ls", top, options.duration)
            growth_rows.append([count, "%.0f" % latest_rps[count], "%.0f" % ls_rps,
                                len(get(server.port, "/ls")[1])])
            server.stop()
            shutil.rmtree(scale_folder)
        report.table("Cost growth (wrk, %d connections, req/s)" % top,
                     ["updates in the folder", "/latest", "/ls", "/ls body bytes"], growth_rows)
        smallest, largest = min(options.scale), max(options.scale)
        report.target("`/latest` with %d updates >= 0.8 x with %d" % (largest, smallest),
                      "%.2f" % ratio(latest_rps[largest], latest_rps[smallest]),
                      latest_rps[largest] >= 0.8 * latest_rps[smallest])
        if nginx_note:
            report.sections.append("Note: " + nginx_note)
        return report
    finally:
        for process in processes:
            process.stop()
        shutil.rmtree(workdir, ignore_errors=True)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--updates", type=int, default=200, help="small updates in the folder (200)")
    parser.add_argument("--large-mb", type=int, default=200, help="size of the large update in MB (200)")
    parser.add_argument("--rss-large-mb", type=int, default=1024, help="file size for the RSS comparison (1024)")
    parser.add_argument("--duration", type=int, default=5, help="seconds per wrk measurement (5)")
    parser.add_argument("--runs", type=int, default=7, help="large downloads per server, best taken (7)")
    parser.add_argument("--slow-clients", type=int, default=16, help="clients downloading at 512 KB/s (16)")
    parser.add_argument("--probes", type=int, default=200, help="/ requests during the slow downloads (200)")
    parser.add_argument("--scale", type=int, nargs="+", default=[100, 1000, 10000], help="folder sizes")
    parser.add_argument("--routes", nargs="+", default=ROUTES, help="routes to load")
    parser.add_argument("--connections", type=int, nargs="+", default=[1, 8], help="wrk connections")
    parser.add_argument("--no-nginx", action="store_true", help="leave nginx out")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, for the smoke test")
    parser.add_argument("--output", help="also write the Markdown report to this file")
    options = parser.parse_args(argv)
    if options.quick:
        options.updates, options.large_mb, options.rss_large_mb, options.duration = 5, 2, 4, 1
        options.runs, options.slow_clients, options.probes, options.scale = 1, 2, 10, [5, 20]
        options.routes, options.connections = ["/"], [1]
    if not shutil.which("wrk") or not shutil.which("curl"):
        print("wrk and curl are needed: apt-get install wrk curl", file=sys.stderr)
        return 2
    report = run(options)
    markdown = report.markdown("python3 bench/run.py " + " ".join(argv if argv is not None else sys.argv[1:]))
    print(markdown)
    if options.output:
        with open(options.output, "w") as out:
            out.write(markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
