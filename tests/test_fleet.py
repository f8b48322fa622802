"""Staged rollout end to end: the real server, a simulated fleet of 50 boxes with the real wget on 127.0.0.x.

Boxes 0 to 24 send an id (box-N), boxes 25 to 49 are plain wget boxes known by their address; each box
talks from its own loopback address.  Time is shortened through fractional hours in the policy.
"""

import json
import logging
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import threading
import time
import unittest

from support import (SERVER, TempDirTestCase, make_update, python_executable, request, require_binary,
                     settings_environment, wait_until)

from test_proxy import PREFIX, Nginx, find_nginx

import box_update_server as bus

OLD, NEW = 1700000000, 1700000100
OLD_NAME, NEW_NAME = "opq-box-update-%d.tar.bz2" % OLD, "opq-box-update-%d.tar.bz2" % NEW
BOXES = 50
SECOND = 1 / 3600.0      # in hours


class Box:
    """One simulated box: its address, its id (or none), and the VERSION it runs."""

    def __init__(self, number, with_id):
        self.number = number
        self.address = "127.0.0.%d" % (10 + number)
        self.box_id = "box-%d" % number if with_id else None
        self.key = self.box_id or self.address
        self.version = None

    def wget(self, url, extra=(), result=None, send_version=True):
        """wget from this box's address with its headers; (exit status, stderr with the server's headers)."""
        headers = []
        if self.box_id:
            headers.append("X-OPQ-Box-Id: %s" % self.box_id)
        if self.version is not None and send_version:
            headers.append("X-OPQ-Box-Version: %d" % self.version)
        if result is not None:
            headers.append("X-OPQ-Box-Result: failed %d" % result)
        command = ["wget", "-S", "--bind-address", self.address, "--tries", "1", "--timeout", "20"]
        command += ["--header=" + header for header in headers] + list(extra) + [url]
        finished = subprocess.run(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=60)
        return finished.returncode, finished.stderr.decode("utf-8", "replace")

    def ask(self, base, result=None):
        """The name /latest sends this box to (read from the 303, nothing downloaded)."""
        _, output = self.wget(base + "/latest", ["--max-redirect", "0", "-O", "/dev/null"], result)
        found = re.findall(r"Location: update/(\S+)", output)
        return found[-1] if found else None

    def download(self, base, folder):
        """What the box updater does: follow /latest to the update, download it whole; the name."""
        path = os.path.join(folder, "update-%d.tar.bz2" % self.number)
        status, output = self.wget(base + "/latest", ["-O", path])
        if status != 0:
            raise AssertionError("wget failed (%d):\n%s" % (status, output))
        return re.findall(r"Location: update/(\S+)", output)[-1]


def fleet_of(count=BOXES):
    return [Box(number, number < count // 2) for number in range(count)]


class FleetTestCase(TempDirTestCase):

    def setUp(self):
        super().setUp()
        require_binary("wget")
        self.state = os.path.join(self.tmp, "state")
        os.mkdir(self.state)
        self.policy_path = os.path.join(self.tmp, "rollout.json")
        make_update(self.updates, OLD)
        self.boxes = fleet_of()
        self.downloads = os.path.join(self.tmp, "downloads")
        os.mkdir(self.downloads)

    def write_policy(self, **fields):
        temporary = self.policy_path + ".new"
        with open(temporary, "w") as policy_file:
            json.dump(fields, policy_file)
        os.replace(temporary, self.policy_path)

    def start(self, **settings):
        settings = dict({"rollout": self.policy_path, "state_dir": self.state}, **settings)
        self.server = self.start_server(**settings)
        self.base = self.server.url("").rstrip("/")
        return self.server

    def publish_new(self):
        make_update(self.updates, NEW)
        self.assertTrue(wait_until(lambda: self.fleet()["rollout"]["version"] == NEW, 30), self.server.log())
        return self.fleet()["rollout"]

    def fleet(self, server=None):
        answer = (server or self.server).get("/fleet")
        self.assertEqual(answer.status, 200, answer.body)
        return json.loads(answer.body)

    def answers(self, boxes=None):
        return {box.key: box.ask(self.base) for box in (boxes or self.boxes)}

    def wait_for_log(self, text, timeout=10):
        self.assertTrue(wait_until(lambda: text in self.server.log(), timeout), "no %r in:\n%s"
                        % (text, self.server.log()))

    def state_rows(self, query):
        connection = sqlite3.connect("file:%s?mode=ro" % os.path.join(self.state, "fleet.sqlite3"), uri=True)
        try:
            return connection.execute(query).fetchall()
        finally:
            connection.close()


class CanariesAndWavesTest(FleetTestCase):

    def test_canaries_first_then_waves_that_grow_and_never_flip_back(self):
        canaries = {"box-0", "box-1", "127.0.0.40"}            # two by id, one plain box by address
        self.write_policy(canaries=sorted(canaries), canary_hours=1, waves_hours=1)
        self.start()
        self.assertEqual(set(self.answers().values()), {OLD_NAME})     # what the folder held counts as rolled out
        rollout = self.publish_new()
        self.assertIsNotNone(rollout["started"])
        self.assertFalse(rollout["canaries_done"])
        self.wait_for_log("%s (VERSION %d) starts rolling out" % (NEW_NAME, NEW))
        answers = self.answers()
        self.assertEqual({key for key, name in answers.items() if name == NEW_NAME}, canaries)
        self.assertEqual(sum(name == OLD_NAME for name in answers.values()), BOXES - 3)

        # waves: the canaries' time over at once, the rest over 20 s from now on (the clock has run a while)
        elapsed = time.time() - rollout["started"]
        self.write_policy(canaries=sorted(canaries), canary_hours=0, waves_hours=(elapsed + 20) * SECOND)
        self.wait_for_log("canaries done")
        given, shares, rounds = set(), [], 0
        deadline = time.monotonic() + 90
        while len(given) < BOXES and time.monotonic() < deadline:
            now_given = {key for key, name in self.answers().items() if name == NEW_NAME}
            self.assertLessEqual(given, now_given, "a box's answer flipped back")
            given = now_given
            shares.append(len(given - canaries) / (BOXES - 3))
            rounds += 1
        self.assertEqual(len(given), BOXES, shares)
        self.assertTrue(any(0 < share < 1 for share in shares), shares)
        self.assertTrue(wait_until(lambda: self.fleet()["rollout"]["eligible_share"] == 1.0, 30))
        self.wait_for_log("%s reached 100%% of the fleet" % NEW_NAME)

    def test_pins_and_a_halt_by_the_file(self):
        self.write_policy(canaries=["box-0", "box-1"], canary_hours=1, pins={"box-2": NEW, "127.0.0.41": NEW,
                                                                             "box-1": OLD})
        self.start()
        self.publish_new()
        box0, box1, box2, plain = self.boxes[0], self.boxes[1], self.boxes[2], self.boxes[31]
        self.assertEqual((box0.ask(self.base), box1.ask(self.base), box2.ask(self.base), plain.ask(self.base)),
                         (NEW_NAME, OLD_NAME, NEW_NAME, NEW_NAME))
        self.assertEqual(box0.download(self.base, self.downloads), NEW_NAME)
        self.write_policy(canaries=["box-0", "box-1", "box-3"], canary_hours=1, halt=True)
        self.wait_for_log("VERSION %d halted by the policy file" % NEW)
        self.assertEqual(box0.ask(self.base), NEW_NAME)           # it downloaded it: a halt is not a rollback
        self.assertEqual(self.boxes[3].ask(self.base), OLD_NAME)  # a canary that did not have it yet
        self.boxes[4].version = NEW
        self.assertEqual(self.boxes[4].ask(self.base), NEW_NAME)  # it says it runs it
        rollout = self.fleet()["rollout"]
        self.assertEqual((rollout["halted"], rollout["halt_reason"]), (True, "halt in the policy file"))
        health = self.server.health()
        self.assertIn("rollout of %s halted: halt in the policy file" % NEW_NAME, health["info"])
        self.assertTrue(health["ok"])
        self.assertEqual(health["subcomponents"], [])
        self.write_policy(canaries=["box-0", "box-1", "box-3"], canary_hours=1)
        self.wait_for_log("VERSION %d resumed" % NEW)
        self.assertEqual(self.boxes[3].ask(self.base), NEW_NAME)


class FailuresTest(FleetTestCase):

    def test_automatic_halt_by_reported_failures_and_resume(self):
        self.write_policy(canaries=["box-0", "box-1", "box-2"], canary_hours=1, halt_after_failures=2)
        self.start()
        self.publish_new()
        box0, box1, box2 = self.boxes[:3]
        for box in (box0, box1):
            self.assertEqual(box.download(self.base, self.downloads), NEW_NAME)
            box.version = OLD
            self.assertEqual(box.ask(self.base, result=NEW), OLD_NAME)    # not offered again what failed
        self.wait_for_log("box box-1 (127.0.0.11) failed to install VERSION %d (it said so)" % NEW)
        self.wait_for_log("VERSION %d halted by 2 failure(s) (halt_after_failures 2)" % NEW)
        box2.version = OLD
        self.assertEqual(box2.ask(self.base), OLD_NAME)
        fleet = self.fleet()
        self.assertEqual((fleet["rollout"]["halted"], fleet["rollout"]["failures"]), (True, 2))
        states = {entry["box"]: entry["state"] for entry in fleet["boxes"]}
        self.assertEqual((states["box-0"], states["box-1"], states["box-2"]), ("failed", "failed", "installed"))
        self.assertIn("halted: 2 failure(s)", self.server.health()["info"])
        self.write_policy(canaries=["box-0", "box-1", "box-2"], canary_hours=1, halt_after_failures=2, resume=NEW)
        self.wait_for_log("the automatic halt of VERSION %d is released" % NEW)
        self.assertEqual(box2.ask(self.base), NEW_NAME)
        self.assertFalse(self.fleet()["rollout"]["halted"])

    def test_install_timeout_counts_as_a_failure_and_halts(self):
        self.write_policy(canaries=["box-0", "box-1"], canary_hours=1, halt_after_failures=1,
                          install_timeout_minutes=2 / 60.0)
        self.start()
        self.publish_new()
        box0 = self.boxes[0]
        box0.version = OLD
        self.assertEqual(box0.download(self.base, self.downloads), NEW_NAME)
        self.assertTrue(wait_until(lambda: {entry["box"]: entry for entry in self.fleet()["boxes"]}["box-0"]
                                   ["state"] == "downloaded", 10))
        self.assertEqual(box0.ask(self.base), NEW_NAME)       # still installing
        time.sleep(2.2)
        self.assertEqual(box0.ask(self.base), OLD_NAME)
        self.wait_for_log("box box-0 (127.0.0.10) failed to install VERSION %d (still VERSION %d" % (NEW, OLD))
        self.assertEqual(self.boxes[1].ask(self.base), OLD_NAME)
        self.assertTrue(self.fleet()["rollout"]["halted"])

    def test_a_box_that_installs_the_release_it_downloaded_is_installed(self):
        self.write_policy(canaries=["box-0"], canary_hours=1)
        self.start()
        self.publish_new()
        box0 = self.boxes[0]
        box0.version = OLD
        box0.download(self.base, self.downloads)
        box0.version = NEW
        self.assertEqual(box0.ask(self.base), NEW_NAME)
        entry = [entry for entry in self.fleet()["boxes"] if entry["box"] == "box-0"][0]
        self.assertEqual((entry["id"], entry["address"], entry["reported_version"], entry["offered"],
                          entry["offered_version"], entry["downloaded"], entry["state"]),
                         ("box-0", "127.0.0.10", NEW, NEW_NAME, NEW, True, "installed"))
        self.boxes[1].version = NEW         # it runs the newest, never seen downloading it here
        self.assertEqual(self.boxes[1].ask(self.base), NEW_NAME)
        entry = [entry for entry in self.fleet()["boxes"] if entry["box"] == "box-1"][0]
        self.assertEqual(entry["state"], "current")

    def test_a_part_of_the_file_is_not_a_complete_download(self):
        self.write_policy(canaries=["box-0"], canary_hours=1)
        server = self.start()
        self.publish_new()
        headers = {"X-OPQ-Box-Id": "box-0", "Range": "bytes=0-99"}
        self.assertEqual(request(server.port, "GET", "/update/" + NEW_NAME, headers, source="127.0.0.10").status, 206)
        self.assertEqual(self.boxes[0].ask(self.base), NEW_NAME)
        entry = [entry for entry in self.fleet()["boxes"] if entry["box"] == "box-0"][0]
        self.assertEqual((entry["downloaded"], entry["state"]), (False, "offered"))
        headers["Range"] = "bytes=100-"     # the rest, as wget -c resumes
        self.assertEqual(request(server.port, "GET", "/update/" + NEW_NAME, headers, source="127.0.0.10").status, 206)
        entry = [entry for entry in self.fleet()["boxes"] if entry["box"] == "box-0"][0]
        self.assertEqual((entry["downloaded"], entry["state"]), (True, "downloaded"))


class StateWriteFailureTest(TempDirTestCase):
    """A write that fails at run time: logged, / says "ok": false, requests still answered (in-process, so the
    store's write can fail on purpose)."""

    def test_requests_are_answered_and_health_says_so(self):
        logged = []
        handler = logging.Handler()
        handler.emit = lambda record: logged.append(record.getMessage())
        bus.logger.addHandler(handler)
        self.addCleanup(bus.logger.removeHandler, handler)
        make_update(self.updates, OLD)
        policy_path = os.path.join(self.tmp, "rollout.json")
        with open(policy_path, "w") as policy_file:
            policy_file.write("{}")
        os.mkdir(os.path.join(self.tmp, "state"))
        settings = bus.Settings(port=0, updates_dir=self.updates, host="127.0.0.1", rollout=policy_path,
                                state_dir=os.path.join(self.tmp, "state"))
        catalog = bus.Catalog(self.updates)
        rollout = bus.open_rollout(settings, lambda: catalog.snapshot)

        def failing_write(*_arguments):
            raise sqlite3.OperationalError("database or disk is full")

        rollout.store.write = failing_write
        server = bus.BoxUpdateServer(settings, catalog, rollout=rollout)
        catalog.start()
        rollout.start()
        threading.Thread(target=server.serve_forever, daemon=True).start()
        self.addCleanup(rollout.stop)
        self.addCleanup(catalog.stop)
        self.addCleanup(server.server_close)
        self.addCleanup(server.shutdown)
        port = server.server_address[1]
        self.assertTrue(wait_until(lambda: request(port, "GET", "/latest").status == 303, 30))
        self.assertTrue(wait_until(lambda: json.loads(request(port, "GET", "/").body)["ok"] is False, 10))
        health = json.loads(request(port, "GET", "/").body)
        self.assertIn("the rollout state cannot be written: database or disk is full", health["info"])
        self.assertEqual(request(port, "GET", "/latest", source="127.0.0.5").status, 303)
        time.sleep(1.5)      # the writer tries again, and again fails
        self.assertEqual(len([line for line in logged if "cannot be written: database or disk is full" in line]), 1)


class RestartTest(FleetTestCase):

    def rollout_mid_way(self):
        self.write_policy(canary_hours=0, waves_hours=40 * SECOND)
        self.start()
        rollout = self.publish_new()
        self.assertTrue(wait_until(lambda: self.fleet()["rollout"]["eligible_share"] > 0.3, 30))
        return rollout

    def check_kept(self, before, rollout):
        after = self.answers()
        given_before = {key for key, name in before.items() if name == NEW_NAME}
        given_after = {key for key, name in after.items() if name == NEW_NAME}
        self.assertLessEqual(given_before, given_after, "a box lost the release it was given")
        kept = self.fleet()["rollout"]
        self.assertEqual(kept["started"], rollout["started"])
        self.assertGreater(kept["eligible_share"], 0.3)

    def test_a_restart_keeps_every_answer_and_the_clock(self):
        rollout = self.rollout_mid_way()
        before = self.answers()
        self.assertTrue(0 < sum(name == NEW_NAME for name in before.values()) < BOXES, before)
        self.assertEqual(self.server.stop(), 0)
        self.server.start()
        self.base = self.server.url("").rstrip("/")
        self.check_kept(before, rollout)

    def test_a_kill_9_keeps_every_committed_answer_and_the_clock(self):
        rollout = self.rollout_mid_way()
        before = self.answers()
        offered = sum(name == NEW_NAME for name in before.values())
        self.assertTrue(wait_until(lambda: self.state_rows(
            "SELECT count(*) FROM boxes WHERE offered_version = %d" % NEW)[0][0] >= offered, 10))
        self.server.stop(signal.SIGKILL)
        self.server.start()
        self.base = self.server.url("").rstrip("/")
        self.check_kept(before, rollout)


class ThroughNginxTest(FleetTestCase):
    """examples/nginx/box-update-server.conf in front: /latest reaches the server for every box, downloads are
    cached."""

    def test_latest_is_never_cached_and_updates_are(self):
        binary = find_nginx()
        if binary is None:
            raise unittest.SkipTest("nginx is not installed, so this case is skipped")
        canaries = {"box-0", "box-1", "127.0.0.40"}
        self.write_policy(canaries=sorted(canaries), canary_hours=1)
        server = self.start(trusted_proxies=["127.0.0.1/32"])
        self.publish_new()
        nginx = Nginx(binary, os.path.join(self.tmp, "nginx"), server.port)
        self.addCleanup(nginx.kill)
        nginx.start()
        base = nginx.url(PREFIX)
        for _ in range(2):
            answers = {box.key: box.ask(base) for box in self.boxes}
            self.assertEqual({key for key, name in answers.items() if name == NEW_NAME}, canaries)
        self.assertEqual(len(server.access_lines('"GET /latest"')), 2 * BOXES)
        through = nginx.request("GET", PREFIX + "/latest", source="127.0.0.40")
        self.assertEqual((through.status, through.header("Cache-Control"), through.header("X-Cache-Status")),
                         (303, "private, no-store", None))
        for box in self.boxes:
            if box.key in canaries:
                self.assertEqual(box.download(base, self.downloads), NEW_NAME)
        self.assertEqual(len(server.access_lines('"GET /update/%s"' % NEW_NAME)), 1)
        boxes = {entry["box"]: entry for entry in self.fleet()["boxes"]}
        self.assertEqual(len(boxes), BOXES)                        # plain boxes by their own address, not nginx's
        self.assertEqual(boxes["127.0.0.40"]["offered"], NEW_NAME)
        self.assertEqual(nginx.quit(), 0)


class AccessAndCommandTest(FleetTestCase):

    def test_fleet_follows_metrics_allow_and_the_command_prints_a_table(self):
        self.write_policy(canaries=["box-0"], canary_hours=1)
        server = self.start()
        self.publish_new()
        self.boxes[0].download(self.base, self.downloads)
        self.boxes[30].ask(self.base)
        command = subprocess.run([python_executable(), SERVER, "fleet"], stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, timeout=30, env=settings_environment(
                                     {"port": server.port, "updates_dir": self.updates, "host": "127.0.0.1"}))
        self.assertEqual(command.returncode, 0, command.stderr)
        table = command.stdout.decode()
        self.assertIn(NEW_NAME, table)
        self.assertRegex(table, r"(?m)^box-0 +127\.0\.0\.10 .*%d +yes +downloaded" % NEW)
        self.assertRegex(table, r"(?m)^127\.0\.0\.40 +127\.0\.0\.40 .*offered")
        self.assertEqual(request(server.port, "GET", "/fleet", source="127.0.0.77").status, 200)

    def test_fleet_is_private_beyond_metrics_allow(self):
        self.write_policy()
        server = self.start(metrics_allow=["10.0.0.0/8"])
        answer = server.get("/fleet")
        self.assertEqual(answer.status, 404)
        command = subprocess.run([python_executable(), SERVER, "fleet"], stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, timeout=30, env=settings_environment(
                                     {"port": server.port, "updates_dir": self.updates, "host": "127.0.0.1"}))
        self.assertEqual(command.returncode, 1)
        self.assertIn("404", command.stderr.decode())

    def test_latest_is_private_with_a_policy_and_as_today_without(self):
        self.write_policy()
        server = self.start()
        answer = server.get("/latest")
        self.assertEqual((answer.status, answer.header("Location"), answer.header("Cache-Control")),
                         (303, "update/" + OLD_NAME, "private, no-store"))
        self.assertEqual(server.get("/update/" + OLD_NAME).header("Cache-Control"),
                         "public, max-age=31536000, immutable")
        plain = self.start_server()
        answer = plain.get("/latest")
        self.assertEqual((answer.status, answer.header("Location"), answer.header("Cache-Control")),
                         (303, "update/" + OLD_NAME, "no-cache"))
        self.assertEqual(plain.get("/fleet").status, 404)

    def test_metrics_count_boxes_by_version_and_state(self):
        self.write_policy(canaries=["box-0"], canary_hours=1)
        server = self.start()
        self.publish_new()
        self.boxes[0].version = OLD
        self.boxes[0].ask(self.base)
        self.boxes[1].version = 123     # not offered: counted as "other"
        self.boxes[1].ask(self.base)
        self.boxes[30].ask(self.base)
        metrics = server.get("/metrics").body.decode()
        for line in ['box_update_server_rollout_boxes{version="%d"} 1' % OLD,
                     'box_update_server_rollout_boxes{version="other"} 1',
                     'box_update_server_rollout_boxes{version="unknown"} 1',
                     'box_update_server_rollout_box_states{state="offered"} 3',
                     'box_update_server_rollout_box_states{state="silent"} 0',
                     "box_update_server_rollout_eligible_share 0.0",
                     "box_update_server_rollout_failures 0", "box_update_server_rollout_halted 0"]:
            self.assertIn(line, metrics)
        promtool = shutil.which("promtool")
        if promtool:        # Prometheus' own linter, where installed (Debian package prometheus, in .ci/run)
            checked = subprocess.run([promtool, "check", "metrics"], input=metrics.encode(), stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, timeout=60)
            self.assertEqual((checked.returncode, checked.stdout.decode(errors="replace")), (0, ""), metrics)


class BadInputTest(FleetTestCase):

    def test_malformed_headers_are_ignored_and_logged_once(self):
        self.write_policy()
        server = self.start()
        for _ in range(2):
            answer = request(server.port, "GET", "/latest", {"X-OPQ-Box-Id": "no/good", "X-OPQ-Box-Version": "7x"},
                             source="127.0.0.9")
            self.assertEqual(answer.status, 303)
        self.wait_for_log("127.0.0.9 sent a malformed X-OPQ-Box-Id and X-OPQ-Box-Version")
        self.assertEqual(server.log().count("127.0.0.9 sent a malformed"), 1)
        self.assertEqual([entry["box"] for entry in self.fleet()["boxes"]], ["127.0.0.9"])

    def exits_with(self, expected):
        settings = {"port": 1, "updates_dir": self.updates, "host": "127.0.0.1", "rollout": self.policy_path,
                    "state_dir": self.state}
        finished = subprocess.run([python_executable(), SERVER], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  timeout=30, env=settings_environment(settings))
        stderr = finished.stderr.decode()
        self.assertEqual(finished.returncode, 1, stderr)
        self.assertEqual(len(stderr.splitlines()), 1, stderr)
        self.assertIn("box_update_server: error: ", stderr)
        self.assertIn(expected, stderr)

    def test_a_policy_with_an_unknown_key_stops_the_start(self):
        self.write_policy(canaries=[], halt_after_failure=1)
        self.exits_with("rollout policy %s unknown key 'halt_after_failure'" % self.policy_path)

    def test_a_corrupt_state_stops_the_start(self):
        self.write_policy()
        with open(os.path.join(self.state, "fleet.sqlite3"), "wb") as corrupt:
            corrupt.write(os.urandom(8192))
        self.exits_with("cannot be used: file is not a database")

    def test_a_read_only_state_folder_stops_the_start(self):
        self.write_policy()
        if os.geteuid() == 0:       # root writes anywhere: the server runs as nobody, for whom the folder is read-only
            os.chmod(self.tmp, 0o755)
            os.chmod(self.updates, 0o755)
            os.chmod(self.policy_path, 0o644)
            finished = subprocess.run(
                ["setpriv", "--reuid", "nobody", "--regid", "nogroup", "--clear-groups", "/usr/bin/python3", SERVER],
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=30, env=settings_environment(
                    {"port": 1, "updates_dir": self.updates, "host": "127.0.0.1", "rollout": self.policy_path,
                     "state_dir": self.state}))
            stderr = finished.stderr.decode()
            self.assertEqual((finished.returncode, len(stderr.splitlines())), (1, 1), stderr)
            self.assertIn("cannot be used: ", stderr)
        else:
            os.chmod(self.state, 0o555)
            self.addCleanup(os.chmod, self.state, 0o755)
            self.exits_with("cannot be used: ")

    def test_a_policy_broken_at_run_time_keeps_the_last_good_one(self):
        self.write_policy(canaries=["box-0"], canary_hours=1)
        server = self.start()
        with open(self.policy_path, "w") as policy_file:
            policy_file.write('{"canaries": ["box-0"], "canary_hours": 1, "halt": "yes"}')
        self.wait_for_log("halt must be true or false, not 'yes'; the last good policy stays in force")
        self.assertIn("halt must be true or false", server.health()["info"])
        make_update(self.updates, NEW)
        self.assertTrue(wait_until(lambda: self.fleet()["rollout"]["version"] == NEW, 30))
        self.assertEqual(self.boxes[0].ask(self.base), OLD_NAME)     # NEW had not started: it does not
        rollout = self.fleet()["rollout"]
        self.assertEqual((rollout["started"], rollout["halted"]), (None, True))
        self.write_policy(canaries=["box-0"], canary_hours=1)
        self.wait_for_log("is usable again")
        self.assertEqual(self.boxes[0].ask(self.base), NEW_NAME)

    def test_a_pin_to_a_version_not_offered_is_logged_and_the_policy_decides(self):
        self.write_policy(pins={"box-0": 42})
        self.start()
        self.assertEqual(self.boxes[0].ask(self.base), OLD_NAME)
        self.wait_for_log("box box-0 is pinned to VERSION 42, which is not offered")

    def test_sighup_reads_the_policy_again(self):
        self.write_policy(canaries=["box-0"], canary_hours=1)
        server = self.start()
        read = "rollout policy %s read" % self.policy_path
        self.assertEqual(server.log().count(read), 0)       # read at start, unchanged since: not again
        server.process.send_signal(signal.SIGHUP)
        self.assertTrue(wait_until(lambda: server.log().count(read) == 1, 10), server.log())


if __name__ == "__main__":
    unittest.main()
