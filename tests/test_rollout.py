"""Staged rollout: the policy, wave positions, the decision, and the fleet's state, without sockets."""

import json
import logging
import os
import shutil
import sqlite3
import tempfile
import time
import unittest
import unittest.mock

from support import bus     # support puts the server on the path

HOUR = 3600.0
NOW = 1800000000.0


def update(version):
    identity = bus.FileIdentity(version, 100, 0, 0, True)
    return bus.Update("opq-box-update-%d.tar.bz2" % version, version, "/u/%d" % version, identity, True, None, None,
                      None)


def snapshot(*versions):
    updates = tuple(update(version) for version in sorted(versions))
    return bus.Snapshot(updates, {u.name: u for u in updates}, b"", None, 0, 0, 0, False, 0.0)


def policy(**fields):
    return bus.parse_policy(json.dumps(fields))


def clock(version, started, **fields):
    values = dict(version=version, started=started, paused=0.0, halted_since=None, halted_by_failures=False,
                  failures=0, forgiven=0)
    values.update(fields)
    return bus.ReleaseClock(**values)


def box(name="b1", box_id=None, address="10.0.0.1", reported=None, downloaded=None, failed=None):
    return bus.BoxView(name, box_id, address, reported, downloaded, failed)


class LogCapture:
    def __init__(self, test):
        self.lines = []
        handler = logging.Handler()
        handler.emit = lambda record: self.lines.append(record.getMessage())
        bus.logger.addHandler(handler)
        test.addCleanup(bus.logger.removeHandler, handler)
        test.addCleanup(bus.logger.setLevel, bus.logger.level)
        bus.logger.setLevel(logging.INFO)

    def matching(self, text):
        return [line for line in self.lines if text in line]


class ParsePolicyTest(unittest.TestCase):

    def test_the_issue_example_is_read(self):
        parsed = policy(canaries=["1001", "1002", "10.0.5.17", "10.0.6.0/24"], canary_hours=24, waves_hours=72,
                        pins={"1007": 1764547200}, halt=False, halt_after_failures=1, install_timeout_minutes=30)
        self.assertEqual(parsed.canary_ids, frozenset({"1001", "1002"}))
        self.assertEqual([str(network) for network in parsed.canary_networks], ["10.0.5.17/32", "10.0.6.0/24"])
        self.assertEqual(dict(parsed.pins), {"1007": 1764547200})
        self.assertEqual((parsed.canary_hours, parsed.waves_hours, parsed.halt, parsed.halt_after_failures,
                          parsed.install_timeout_minutes, parsed.resume), (24.0, 72.0, False, 1, 30.0, None))

    def test_every_key_is_optional(self):
        parsed = bus.parse_policy("{}")
        self.assertEqual((parsed.canary_ids, parsed.canary_networks, dict(parsed.pins), parsed.canary_hours,
                          parsed.waves_hours, parsed.halt, parsed.halt_after_failures,
                          parsed.install_timeout_minutes, parsed.resume),
                         (frozenset(), (), {}, 24.0, 72.0, False, 1, 30.0, None))

    def test_fractions_of_hours_and_a_resume(self):
        parsed = policy(canary_hours=0.001, waves_hours=0, resume=7, halt_after_failures=0, pins={"10.0.0.9": 3})
        self.assertEqual((parsed.canary_hours, parsed.waves_hours, parsed.resume, parsed.halt_after_failures),
                         (0.001, 0.0, 7, 0))
        self.assertEqual(dict(parsed.pins), {"10.0.0.9": 3})

    def test_bad_policies_are_refused_with_one_line(self):
        cases = [
            ("not json", "not valid JSON"),
            ("[]", "must be a JSON object"),
            ('{"canaries": [], "wave_hours": 3}', "unknown key 'wave_hours'"),
            ('{"canaries": "1001"}', "canaries must be a list"),
            ('{"canaries": ["bad id!"]}', "'bad id!' is neither a box id"),
            ('{"canaries": [1001]}', "1001 is neither a box id"),
            ('{"canaries": ["%s"]}' % ("x" * 65), "is neither a box id"),
            ('{"canary_hours": -1}', "canary_hours must be at least 0"),
            ('{"canary_hours": "24"}', "canary_hours must be a number"),
            ('{"waves_hours": true}', "waves_hours must be a number"),
            ('{"waves_hours": 1e9}', "at most"),
            ('{"pins": []}', "pins must be an object"),
            ('{"pins": {"1007": "5"}}', "pins must be a VERSION"),
            ('{"pins": {"1007": -5}}', "pins must be a VERSION"),
            ('{"pins": {"10.0.0.0/24": 5}}', "is a range"),
            ('{"pins": {"no way": 5}}', "neither a box id"),
            ('{"halt": "yes"}', "halt must be true or false"),
            ('{"halt_after_failures": 1.5}', "halt_after_failures must be an integer"),
            ('{"halt_after_failures": -1}', "at least 0"),
            ('{"install_timeout_minutes": 0}', "install_timeout_minutes must be above 0"),
            ('{"resume": "5"}', "resume must be a VERSION"),
            ('{"resume": false}', "resume must be a VERSION"),
        ]
        for text, expected in cases:
            with self.subTest(text=text):
                with self.assertRaises(bus.PolicyError) as raised:
                    bus.parse_policy(text)
                self.assertIn(expected, str(raised.exception))
                self.assertNotIn("\n", str(raised.exception))

    def test_canary_matching_by_id_and_range(self):
        parsed = policy(canaries=["1001", "10.0.6.0/24", "fd00::/8"])
        for box_id, address, expected in [("1001", "192.0.2.1", True), (None, "10.0.6.77", True),
                                          ("1002", "10.0.6.1", True), ("1002", "10.0.7.1", False),
                                          (None, "fd00::5", True), (None, "1001", False)]:
            with self.subTest(box_id=box_id, address=address):
                self.assertEqual(parsed.is_canary(box_id, address), expected)

    def test_a_pin_by_id_comes_before_one_by_address(self):
        parsed = policy(pins={"1001": 5, "10.0.0.1": 4})
        self.assertEqual(parsed.pin_for("1001", "10.0.0.1"), 5)
        self.assertEqual(parsed.pin_for("1002", "10.0.0.1"), 4)
        self.assertEqual(parsed.pin_for(None, "10.0.0.1"), 4)
        self.assertIsNone(parsed.pin_for(None, "10.0.0.2"))


class BoxHeadersTest(unittest.TestCase):

    def test_headers_table(self):
        cases = [
            ({}, (None, None, None, ())),
            ({"x-opq-box-id": "1001", "x-opq-box-version": "7"}, ("1001", 7, None, ())),
            ({"x-opq-box-id": "box.A_9-z", "x-opq-box-result": "failed 8"}, ("box.A_9-z", None, 8, ())),
            ({"x-opq-box-id": "1001, 1002"}, (None, None, None, ("X-OPQ-Box-Id",))),
            ({"x-opq-box-id": "x" * 65}, (None, None, None, ("X-OPQ-Box-Id",))),
            ({"x-opq-box-id": ""}, (None, None, None, ("X-OPQ-Box-Id",))),
            ({"x-opq-box-version": "7.1"}, (None, None, None, ("X-OPQ-Box-Version",))),
            ({"x-opq-box-version": "-7"}, (None, None, None, ("X-OPQ-Box-Version",))),
            ({"x-opq-box-version": "9" * 19}, (None, None, None, ("X-OPQ-Box-Version",))),
            ({"x-opq-box-result": "ok 8"}, (None, None, None, ("X-OPQ-Box-Result",))),
            ({"x-opq-box-result": "failed"}, (None, None, None, ("X-OPQ-Box-Result",))),
        ]
        for headers, expected in cases:
            with self.subTest(headers=headers):
                self.assertEqual(tuple(bus.read_box_headers(headers)), expected)

    def test_a_box_without_an_id_is_its_address(self):
        self.assertEqual(bus.read_box_headers({}).box("10.0.0.5"), "10.0.0.5")
        self.assertEqual(bus.read_box_headers({"x-opq-box-id": "1001"}).box("10.0.0.5"), "1001")


class WavesTest(unittest.TestCase):

    def test_positions_are_stable_spread_and_differ_between_releases(self):
        positions = [bus.wave_position("box-%d" % number, 5) for number in range(2000)]
        self.assertEqual(positions, [bus.wave_position("box-%d" % number, 5) for number in range(2000)])
        self.assertTrue(all(0 <= position < 1 for position in positions))
        for share in (0.05, 0.3, 0.7):
            self.assertAlmostEqual(sum(position < share for position in positions) / 2000, share, delta=0.04)
        self.assertNotEqual(positions[:10], [bus.wave_position("box-%d" % number, 6) for number in range(10)])

    def test_wave_share_table(self):
        parsed = policy(canary_hours=24, waves_hours=72)
        for elapsed, share in [(0, 0.0), (23.9 * HOUR, 0.0), (24 * HOUR, 0.0), (42 * HOUR, 0.25),
                               (96 * HOUR, 1.0), (500 * HOUR, 1.0)]:
            with self.subTest(elapsed=elapsed):
                self.assertAlmostEqual(bus.wave_share(parsed, elapsed), share)
        self.assertEqual(bus.wave_share(policy(canary_hours=0, waves_hours=0), 0), 1.0)
        self.assertEqual(bus.wave_share(policy(canary_hours=1, waves_hours=0), 0), 0.0)

    def test_a_halt_stops_the_clock(self):
        self.assertEqual(bus.rollout_elapsed(clock(5, NOW), NOW + 100), 100)
        self.assertEqual(bus.rollout_elapsed(clock(5, NOW, halted_since=NOW + 30), NOW + 100), 30)
        self.assertEqual(bus.rollout_elapsed(clock(5, NOW, paused=40.0), NOW + 100), 60)
        self.assertEqual(bus.rollout_elapsed(clock(5, NOW), NOW - 100), 0)     # the wall clock went back


class ChooseUpdateTest(unittest.TestCase):
    """Release 5 is the old one, rolled out before the state existed; 6 starts at NOW."""

    updates = snapshot(4, 5, 6).updates
    policy = policy(canaries=["1001", "10.9.0.0/16"], canary_hours=1, waves_hours=10)
    clocks = {4: clock(4, 0.0), 5: clock(5, 0.0), 6: clock(6, NOW)}

    def choose(self, view, at=NOW, clocks=None, rules=None):
        chosen = bus.choose_update(self.updates, rules or self.policy, clocks or self.clocks, view, at)
        return chosen.version if chosen else None

    def test_canaries_by_id_or_range_get_it_at_once_the_rest_do_not(self):
        self.assertEqual(self.choose(box("1001", "1001")), 6)
        self.assertEqual(self.choose(box("10.9.3.4", address="10.9.3.4")), 6)
        self.assertEqual(self.choose(box("1002", "1002"), at=NOW + 0.99 * HOUR), 5)

    def test_waves_open_the_release_by_position(self):
        boxes = [box("box-%d" % number) for number in range(400)]
        for hours, share in [(1, 0.0), (3.5, 0.25), (6, 0.5), (11, 1.0)]:
            with self.subTest(hours=hours):
                got = [self.choose(view, at=NOW + hours * HOUR) for view in boxes]
                self.assertAlmostEqual(got.count(6) / len(got), share, delta=0.07)
                for view, version in zip(boxes, got):
                    self.assertEqual(version == 6, bus.wave_position(view.box, 6) < bus.wave_share(
                        self.policy, hours * HOUR))

    def test_an_answer_never_flips_back_as_time_passes(self):
        for number in range(100):
            view, given = box("box-%d" % number), False
            for hours in range(0, 13):
                now_given = self.choose(view, at=NOW + hours * HOUR) == 6
                self.assertFalse(given and not now_given)
                given = now_given

    def test_a_halted_or_unstarted_release_gives_the_one_before(self):
        halted = dict(self.clocks)
        halted[6] = clock(6, NOW, halted_since=NOW)
        self.assertEqual(self.choose(box("1001", "1001"), clocks=halted), 5)
        unstarted = {4: clock(4, 0.0), 5: clock(5, 0.0)}
        self.assertEqual(self.choose(box("1001", "1001"), clocks=unstarted), 5)
        both_halted = dict(halted)
        both_halted[5] = clock(5, 0.0, halted_since=NOW)
        self.assertEqual(self.choose(box("1001", "1001"), clocks=both_halted), 4)

    def test_a_halt_is_not_a_rollback(self):
        halted = dict(self.clocks)
        halted[6] = clock(6, NOW, halted_since=NOW)
        self.assertEqual(self.choose(box("b", reported=6), clocks=halted), 6)
        self.assertEqual(self.choose(box("b", downloaded=6), clocks=halted), 6)

    def test_never_older_than_what_the_box_reports_or_downloaded_when_offered(self):
        self.assertEqual(self.choose(box("b", reported=6)), 6)
        self.assertEqual(self.choose(box("b", downloaded=6)), 6)
        self.assertEqual(self.choose(box("b", reported=4)), 5)
        self.assertEqual(self.choose(box("b", reported=99)), 6)   # not offered: the newest there is

    def test_a_box_that_failed_a_release_is_not_offered_it_again(self):
        self.assertEqual(self.choose(box("1001", "1001", failed=6)), 5)
        self.assertEqual(self.choose(box("1001", "1001", downloaded=6, failed=6)), 5)
        self.assertEqual(self.choose(box("1001", "1001", reported=6, failed=6)), 6)

    def test_pins_win_while_offered(self):
        pinned = policy(canaries=["1001"], pins={"1001": 4, "10.0.0.7": 6, "1003": 99})
        self.assertEqual(self.choose(box("1001", "1001", reported=5), rules=pinned), 4)
        self.assertEqual(self.choose(box("10.0.0.7", address="10.0.0.7"), rules=pinned), 6)
        self.assertEqual(self.choose(box("1003", "1003"), rules=pinned), 5)       # 99 is not offered

    def test_nothing_offered_or_nothing_open(self):
        self.assertIsNone(bus.choose_update((), self.policy, self.clocks, box(), NOW))
        self.assertIsNone(bus.choose_update(snapshot(6).updates, self.policy, self.clocks, box(), NOW))


class BoxStateTest(unittest.TestCase):

    def record(self, **fields):
        record = bus.BoxRecord("b", None, "10.0.0.1", NOW)
        for name, value in fields.items():
            setattr(record, name, value)
        return record

    def test_states_table(self):
        silent = 48 * HOUR
        cases = [
            ({}, "offered"),
            ({"offered_version": 6}, "offered"),
            ({"offered_version": 6, "downloaded_version": 6, "download_complete": False}, "offered"),
            ({"offered_version": 6, "downloaded_version": 6, "download_complete": True}, "downloaded"),
            ({"offered_version": 5, "reported": 5}, "installed"),
            ({"offered_version": 6, "reported": 6}, "current"),
            ({"offered_version": 6, "reported": 6, "downloaded_version": 6, "download_complete": True}, "installed"),
            ({"offered_version": 6, "reported": 7, "downloaded_version": 6, "download_complete": True}, "installed"),
            ({"offered_version": 6, "reported": 5, "failed_version": 6}, "failed"),
            ({"offered_version": 5, "reported": 6, "failed_version": 6}, "current"),
            ({"offered_version": 6, "reported": 6, "last_seen": NOW - silent}, "silent"),
        ]
        for fields, state in cases:
            with self.subTest(fields=fields):
                self.assertEqual(self.record(**fields).state(6, silent, NOW), state)

    def test_rows_round_trip(self):
        record = self.record(reported=5, offered="o", offered_version=6, downloaded_version=6,
                             download_complete=True, downloaded_at=NOW, failed_version=4, failed_at=NOW)
        self.assertEqual(bus.BoxRecord.from_row(record.row()).row(), record.row())


class SettingsTest(unittest.TestCase):

    def test_rollout_settings(self):
        settings, warnings = bus.parse_settings(json.dumps({
            "port": 1, "updates_dir": "/u", "rollout": "rollout.json", "state_dir": "state",
            "silent_after_hours": 0.5, "max_boxes": 10}), cwd="/srv")
        self.assertEqual((settings.rollout, settings.state_dir, settings.silent_after_hours, settings.max_boxes),
                         ("/srv/rollout.json", "/srv/state", 0.5, 10))
        self.assertEqual(warnings, [])
        settings, _ = bus.parse_settings('{"port": 1, "updates_dir": "/u"}')
        self.assertEqual((settings.rollout, settings.state_dir, settings.silent_after_hours, settings.max_boxes),
                         (None, None, 48.0, 100000))

    def test_bad_rollout_settings(self):
        for extra, expected in [({"rollout": "r.json"}, "rollout needs state_dir"),
                                ({"silent_after_hours": 0}, "silent_after_hours must be a number of hours"),
                                ({"silent_after_hours": "48"}, "silent_after_hours must be a number of hours"),
                                ({"max_boxes": 0}, "max_boxes must be a positive integer"),
                                ({"state_dir": ""}, "state_dir must be a non-empty path")]:
            with self.subTest(extra=extra):
                with self.assertRaises(bus.SettingsError) as raised:
                    bus.parse_settings(json.dumps(dict({"port": 1, "updates_dir": "/u"}, **extra)))
                self.assertIn(expected, str(raised.exception))


class RolloutStateTest(unittest.TestCase):
    """The Rollout with a real SQLite state in a temporary folder and a catalog snapshot the test sets."""

    def setUp(self):
        self.tmp = tempfile.mkdtemp(prefix="box-rollout-test-")
        self.addCleanup(shutil.rmtree, self.tmp, True)
        self.state_dir = os.path.join(self.tmp, "state")
        os.mkdir(self.state_dir)
        self.policy_path = os.path.join(self.tmp, "rollout.json")
        self.log = LogCapture(self)
        self.offered = snapshot(5)
        self.write_policy(canaries=["1001"], canary_hours=1, waves_hours=10)

    def write_policy(self, text=None, **fields):
        with open(self.policy_path, "w") as policy_file:
            policy_file.write(text if text is not None else json.dumps(fields))
        # a new mtime each write, as an editor's save (the stat poll sees every one)
        stamp = time.time() + len(self.log.lines) + getattr(self, "writes", 0)
        self.writes = getattr(self, "writes", 0) + 1
        os.utime(self.policy_path, (stamp, stamp))

    def open(self, folder=(5,), max_boxes=1000, silent_hours=48.0):
        rollout = bus.Rollout(self.policy_path, bus.FleetStore(self.state_dir), lambda: self.offered, folder,
                              silent_hours, max_boxes)
        self.addCleanup(rollout.store.close)
        return rollout

    def ask(self, rollout, box_id=None, address="10.0.0.1", version=None, failed=None, at=NOW):
        headers = {}
        if box_id:
            headers["x-opq-box-id"] = box_id
        if version is not None:
            headers["x-opq-box-version"] = str(version)
        if failed is not None:
            headers["x-opq-box-result"] = "failed %d" % failed
        chosen = rollout.answer_latest(self.offered, bus.read_box_headers(headers), address, now=at)
        return chosen.version if chosen else None

    def rows(self, query):
        with sqlite3.connect(os.path.join(self.state_dir, "fleet.sqlite3")) as connection:
            return connection.execute(query).fetchall()

    def test_what_the_folder_held_at_the_start_counts_as_rolled_out(self):
        rollout = self.open(folder=(3, 5))
        self.assertEqual(self.ask(rollout, "1002"), 5)
        self.offered = snapshot(5, 6)
        self.assertEqual(self.ask(rollout, "1002"), 5)
        self.assertEqual(self.ask(rollout, "1001"), 6)
        self.assertTrue(self.log.matching("opq-box-update-6.tar.bz2 (VERSION 6) starts rolling out"))

    def test_the_clock_starts_when_first_offered_and_survives_a_restart(self):
        rollout = self.open()
        self.offered = snapshot(5, 6)
        self.ask(rollout, "1001", at=NOW)
        self.assertTrue(rollout.flush())
        rollout.store.close()
        self.assertEqual(self.rows("SELECT version, started FROM releases ORDER BY version"), [(5, 0.0), (6, NOW)])
        again = self.open(folder=(5, 6))   # the baseline of the first start stays
        self.assertEqual(again.summary(self.offered, NOW + 2 * HOUR)["started"], NOW)
        self.assertAlmostEqual(again.summary(self.offered, NOW + 6 * HOUR)["eligible_share"], 0.5)
        self.assertEqual(again.fleet(self.offered, NOW)["boxes"][0]["offered_version"], 6)

    def test_every_answer_is_kept_across_a_restart(self):
        rollout = self.open()
        self.offered = snapshot(5, 6)
        rollout.tick(NOW)
        answers = {number: self.ask(rollout, "box-%d" % number, at=NOW + 5 * HOUR) for number in range(50)}
        self.assertIn(5, answers.values())
        self.assertIn(6, answers.values())
        rollout.flush()
        rollout.store.close()
        again = self.open()
        self.assertEqual({number: self.ask(again, "box-%d" % number, at=NOW + 5 * HOUR) for number in range(50)},
                         answers)

    def test_automatic_halt_after_failures_then_resume_once_per_write(self):
        self.write_policy(canaries=["1001", "1002", "1003"], canary_hours=1, waves_hours=0, halt_after_failures=2)
        rollout = self.open()
        self.offered = snapshot(5, 6)
        self.assertEqual(self.ask(rollout, "1001"), 6)
        self.ask(rollout, "1001", version=5, failed=6, at=NOW + 60)
        self.ask(rollout, "1001", version=5, failed=6, at=NOW + 61)     # the same box again: counted once
        self.assertEqual(self.ask(rollout, "1003", at=NOW + 62), 6)
        self.ask(rollout, "1002", version=5, failed=6, address="10.0.0.2", at=NOW + 120)
        self.assertTrue(self.log.matching("box 1002 (10.0.0.2) failed to install VERSION 6 (it said so)"))
        self.assertTrue(self.log.matching("VERSION 6 halted by 2 failure(s) (halt_after_failures 2)"))
        self.assertEqual(self.ask(rollout, "1004", at=NOW + 2 * HOUR), 5)     # the waves would have opened it
        self.assertEqual(self.ask(rollout, "1003", at=NOW + 2 * HOUR), 5)      # offered, never downloaded
        summary = rollout.summary(self.offered, NOW + 2 * HOUR)
        self.assertEqual((summary["halted"], summary["failures"]), (True, 2))
        self.assertIn("halt_after_failures 2", summary["halt_reason"])
        ok, notes = rollout.health_notes(self.offered, NOW)
        self.assertTrue(ok)
        self.assertIn("rollout of opq-box-update-6.tar.bz2 halted", notes[0])
        self.write_policy(canaries=["1001", "1002", "1003"], canary_hours=1, waves_hours=0, halt_after_failures=2)
        rollout.reload()
        self.assertEqual(self.ask(rollout, "1004", at=NOW + 2 * HOUR), 5)      # "halt": false does not release it
        self.write_policy(canaries=["1001", "1002", "1003"], canary_hours=1, waves_hours=0, halt_after_failures=2,
                          resume=6)
        rollout.reload()
        self.assertTrue(self.log.matching("automatic halt of VERSION 6 is released"))
        self.assertTrue(self.log.matching("VERSION 6 resumed"))
        self.assertEqual(self.ask(rollout, "1004", at=NOW + 3 * HOUR), 6)
        rollout.reload()       # SIGHUP, the file unchanged: the resume does not act again
        self.ask(rollout, "1003", version=5, failed=6, at=NOW + 3 * HOUR)
        self.assertEqual(self.ask(rollout, "1005", at=NOW + 3 * HOUR), 6)     # 1 new failure of 2
        self.ask(rollout, "1004", version=5, failed=6, at=NOW + 3 * HOUR)
        self.assertEqual(self.ask(rollout, "1005", at=NOW + 3 * HOUR), 5)
        # the halt and the resume are in the state: a restart keeps them
        rollout.flush()
        rollout.store.close()
        again = self.open()
        self.assertEqual(self.ask(again, "1006", at=NOW + 3 * HOUR), 5)
        self.assertEqual(again.summary(self.offered, NOW + 3 * HOUR)["failures"], 4)

    def test_install_timeout_counts_as_a_failure(self):
        self.write_policy(canaries=["1001"], canary_hours=1, halt_after_failures=1, install_timeout_minutes=30)
        rollout = self.open()
        self.offered = snapshot(5, 6)
        self.assertEqual(self.ask(rollout, "1001", version=5), 6)
        rollout.record_download(bus.read_box_headers({"x-opq-box-id": "1001"}), "10.0.0.1", update(6), True,
                                now=NOW + 60)
        self.assertEqual(rollout.fleet(self.offered, NOW + 61)["boxes"][0]["state"], "downloaded")
        self.assertEqual(self.ask(rollout, "1001", version=5, at=NOW + 29 * 60), 6)    # still installing
        self.assertFalse(rollout.summary(self.offered, NOW + 29 * 60)["halted"])
        self.assertEqual(self.ask(rollout, "1001", version=5, at=NOW + 32 * 60), 5)
        self.assertTrue(self.log.matching("box 1001 (10.0.0.1) failed to install VERSION 6 (still VERSION 5"))
        self.assertTrue(rollout.summary(self.offered, NOW + 32 * 60)["halted"])
        self.assertEqual(rollout.fleet(self.offered, NOW + 32 * 60)["boxes"][0]["state"], "failed")

    def test_a_cut_download_is_recorded_but_is_not_downloaded(self):
        rollout = self.open()
        self.offered = snapshot(5, 6)
        self.ask(rollout, "1001")
        rollout.record_download(bus.read_box_headers({"x-opq-box-id": "1001"}), "10.0.0.1", update(6), False,
                                now=NOW)
        entry = rollout.fleet(self.offered, NOW)["boxes"][0]
        self.assertEqual((entry["downloaded"], entry["state"]), (False, "offered"))
        self.write_policy(halt=True)
        rollout.reload()
        self.assertEqual(self.ask(rollout, "1001"), 6)      # it was seen downloading: no flip back

    def test_a_halt_by_file_pauses_the_clock(self):
        rollout = self.open()
        self.offered = snapshot(5, 6)
        rollout.tick(NOW)
        self.write_policy(canaries=["1001"], canary_hours=1, waves_hours=10, halt=True)
        with unittest.mock.patch("time.time", return_value=NOW + 2 * HOUR):
            rollout.reload()
        self.assertTrue(self.log.matching("VERSION 6 halted by the policy file"))
        self.assertEqual(self.ask(rollout, "1001", at=NOW + 3 * HOUR), 5)
        self.assertEqual(rollout.summary(self.offered, NOW + 50 * HOUR)["eligible_share"], 0.1)
        self.write_policy(canaries=["1001"], canary_hours=1, waves_hours=10)
        with unittest.mock.patch("time.time", return_value=NOW + 50 * HOUR):
            rollout.reload()
        self.assertAlmostEqual(rollout.summary(self.offered, NOW + 51 * HOUR)["eligible_share"], 0.2)
        self.assertEqual(self.ask(rollout, "1001", at=NOW + 51 * HOUR), 6)

    def test_a_broken_policy_keeps_the_last_good_one_and_starts_nothing_new(self):
        rollout = self.open()
        self.write_policy('{"canaries": ["1001"], "canary_hour": 1}')
        rollout.reload(force=False)
        problem = "rollout policy %s unknown key 'canary_hour'" % self.policy_path
        self.assertEqual(len(self.log.matching(problem)), 1)
        rollout.reload()
        self.assertEqual(len(self.log.matching(problem)), 1)      # logged once
        self.assertIn(problem, rollout.health_notes(self.offered, NOW)[1][0])
        self.offered = snapshot(5, 6)
        self.assertEqual(self.ask(rollout, "1001"), 5)              # 6 had not started: it does not
        summary = rollout.summary(self.offered, NOW)
        self.assertEqual((summary["halted"], summary["started"]), (True, None))
        self.write_policy(canaries=["1001"], canary_hours=1)
        rollout.reload(force=False)
        self.assertEqual(self.ask(rollout, "1001"), 6)
        self.assertEqual(rollout.health_notes(self.offered, NOW), (True, []))

    def test_a_broken_policy_at_start_is_a_settings_error(self):
        self.write_policy('{"halt": "no"}')
        with self.assertRaises(bus.SettingsError) as raised:
            self.open()
        self.assertIn("rollout policy %s halt must be true or false" % self.policy_path, str(raised.exception))
        os.unlink(self.policy_path)
        with self.assertRaises(bus.SettingsError) as raised:
            self.open()
        self.assertIn("cannot be read", str(raised.exception))

    def test_a_pin_to_a_version_not_offered_is_logged_once(self):
        self.write_policy(pins={"1001": 9})
        rollout = self.open()
        self.assertEqual(self.ask(rollout, "1001"), 5)
        self.assertEqual(self.ask(rollout, "1001"), 5)
        self.assertEqual(len(self.log.matching("box 1001 is pinned to VERSION 9, which is not offered")), 1)

    def test_malformed_headers_are_logged_once_per_address(self):
        rollout = self.open()
        for _ in range(3):
            rollout.answer_latest(self.offered, bus.read_box_headers({"x-opq-box-id": "no good"}), "10.0.0.8")
        self.assertEqual(len(self.log.matching("10.0.0.8 sent a malformed X-OPQ-Box-Id")), 1)
        self.assertEqual([entry["box"] for entry in rollout.fleet(self.offered, time.time())["boxes"]], ["10.0.0.8"])

    def test_growth_is_bounded(self):
        rollout = self.open(max_boxes=3, silent_hours=1)
        for number in range(5):
            self.ask(rollout, "box-%d" % number, at=NOW + number)
        self.assertEqual([entry["box"] for entry in rollout.fleet(self.offered, NOW)["boxes"]],
                         ["box-2", "box-3", "box-4"])
        rollout.flush()
        self.assertEqual(self.rows("SELECT box FROM boxes ORDER BY box"), [("box-2",), ("box-3",), ("box-4",)])
        self.ask(rollout, "box-2", at=NOW + 6 * HOUR)
        rollout._forget_checked = 0       # the sweep is due
        rollout.tick(NOW + 7.5 * HOUR)
        self.assertEqual([entry["box"] for entry in rollout.fleet(self.offered, NOW)["boxes"]], ["box-2"])
        states = {entry["box"]: entry["state"] for entry in rollout.fleet(self.offered, NOW + 6.5 * HOUR)["boxes"]}
        self.assertEqual(states, {"box-2": "offered"})

    def test_last_seen_alone_is_written_later_the_rest_at_once(self):
        rollout = self.open()
        self.ask(rollout, "1001", at=NOW)
        rollout.flush()
        self.ask(rollout, "1001", at=NOW + 5)
        rollout.flush()
        self.assertEqual(self.rows("SELECT last_seen FROM boxes"), [(NOW,)])
        self.ask(rollout, "1001", version=5, at=NOW + 6)
        rollout.flush()
        self.assertEqual(self.rows("SELECT last_seen, reported FROM boxes"), [(NOW + 6, 5)])
        self.ask(rollout, "1001", version=5, at=NOW + 7)
        rollout.flush(everything=True)
        self.assertEqual(self.rows("SELECT last_seen FROM boxes"), [(NOW + 7,)])

    def test_a_write_failure_is_logged_once_said_on_health_and_retried(self):
        rollout = self.open()
        real_write, failing = rollout.store.write, [True]

        def write(*arguments):
            if failing[0]:
                raise sqlite3.OperationalError("disk I/O error")
            return real_write(*arguments)

        rollout.store.write = write
        self.ask(rollout, "1001")
        self.assertFalse(rollout.flush())
        self.ask(rollout, "1002")
        self.assertFalse(rollout.flush())
        self.assertEqual(len(self.log.matching("cannot be written: disk I/O error")), 1)
        ok, notes = rollout.health_notes(self.offered, NOW)
        self.assertFalse(ok)
        self.assertIn("the rollout state cannot be written: disk I/O error", notes)
        self.assertEqual(self.ask(rollout, "1003"), 5)         # still answered
        failing[0] = False
        self.assertTrue(rollout.flush())
        self.assertEqual(rollout.health_notes(self.offered, NOW), (True, []))
        self.assertEqual(self.rows("SELECT box FROM boxes ORDER BY box"), [("1001",), ("1002",), ("1003",)])

    def test_progress_is_logged_canaries_then_each_tenth(self):
        rollout = self.open()
        self.offered = snapshot(5, 6)
        for minutes in range(0, 12 * 60, 15):
            rollout.tick(NOW + minutes * 60)
        self.assertEqual(len(self.log.matching("opq-box-update-6.tar.bz2: canaries done")), 1)
        self.assertEqual([line.rsplit(" ", 4)[-4] for line in self.log.matching("of the fleet")],
                         ["%d%%" % (10 * step) for step in range(1, 11)])

    def test_canaries_done_is_logged_when_the_policy_ends_their_time_before_a_tick(self):
        rollout = self.open()
        self.offered = snapshot(5, 6)
        self.ask(rollout, "1001", at=NOW)          # the release starts on a request, before any tick
        self.write_policy(canaries=["1001"], canary_hours=0, waves_hours=10)
        rollout.reload()
        rollout.tick(NOW + 1)
        self.assertEqual(len(self.log.matching("opq-box-update-6.tar.bz2: canaries done")), 1)

    def test_metrics_labels_stay_bounded(self):
        rollout = self.open()
        for number in range(20):
            self.ask(rollout, "box-%d" % number, version=1000 + number)
        self.ask(rollout, "box-x", version=5)
        self.ask(rollout, "box-y")
        families = {name: samples for name, _, _, samples in rollout.metric_families(self.offered, NOW)}
        self.assertEqual(families["box_update_server_rollout_boxes"],
                         [({"version": "5"}, 1), ({"version": "other"}, 20), ({"version": "unknown"}, 1)])
        self.assertEqual(sorted(labels["state"] for labels, _ in families["box_update_server_rollout_box_states"]),
                         sorted(bus.BOX_STATES))


class FleetTableTest(unittest.TestCase):

    def test_the_fleet_command_prints_the_rollout_then_aligned_boxes(self):
        fleet = {"rollout": {"release": "opq-box-update-6.tar.bz2", "version": 6, "started": NOW,
                             "eligible_share": 0.25, "canaries_done": True, "failures": 2, "halted": True,
                             "halt_reason": "halt in the policy file"},
                 "boxes": [{"box": "1001", "id": "1001", "address": "10.0.0.1", "first_seen": NOW,
                            "last_seen": NOW - 30, "reported_version": 5, "offered": "o", "offered_version": 6,
                            "downloaded": True,
                            "state": "downloaded"},
                           {"box": "10.0.0.20", "id": None, "address": "10.0.0.20", "first_seen": NOW,
                            "last_seen": NOW, "reported_version": None, "offered": None, "offered_version": None,
                            "downloaded": False, "state": "offered"}]}
        lines = bus.fleet_table(fleet, NOW)
        self.assertRegex(lines[0], r"^opq-box-update-6\.tar\.bz2 \(VERSION 6\): started .*; 25% of the fleet "
                                   r"eligible; canaries done; 2 failure\(s\); HALTED: halt in the policy file$")
        self.assertEqual(lines[1], "2 box(es)")
        self.assertEqual(lines[2].split(), ["BOX", "ADDRESS", "REPORTED", "OFFERED", "DOWNLOADED", "STATE", "LAST",
                                            "SEEN"])
        self.assertEqual(lines[3].split(), ["1001", "10.0.0.1", "5", "6", "yes", "downloaded", "30", "s", "ago"])
        self.assertEqual(lines[4].split(), ["10.0.0.20", "10.0.0.20", "-", "-", "no", "offered", "0", "s", "ago"])
        self.assertEqual(lines[2].index("STATE"), lines[3].index("downloaded"))      # aligned columns
        self.assertEqual(lines[2].index("STATE"), lines[4].index("offered"))
        empty = bus.fleet_table({"rollout": dict(fleet["rollout"], release=None), "boxes": []}, NOW)
        self.assertEqual(empty[:2], ["no update offered", "0 box(es)"])


class FleetStoreTest(unittest.TestCase):

    def setUp(self):
        self.tmp = tempfile.mkdtemp(prefix="box-rollout-store-")
        self.addCleanup(shutil.rmtree, self.tmp, True)

    def test_a_missing_or_non_folder_state_dir(self):
        with self.assertRaisesRegex(bus.SettingsError, "state_dir .* is missing"):
            bus.FleetStore(os.path.join(self.tmp, "nowhere"))
        path = os.path.join(self.tmp, "file")
        open(path, "w").close()
        with self.assertRaisesRegex(bus.SettingsError, "state_dir .* is not a folder"):
            bus.FleetStore(path)

    def test_a_corrupt_state_is_a_settings_error(self):
        with open(os.path.join(self.tmp, bus.FleetStore.FILE), "wb") as corrupt:
            corrupt.write(b"this is not a database" * 100)
        with self.assertRaises(bus.SettingsError) as raised:
            bus.FleetStore(self.tmp)
        self.assertIn("cannot be used: file is not a database", str(raised.exception))

    def test_a_damaged_page_is_found(self):
        store = bus.FleetStore(self.tmp)
        store.write({}, [], [bus.BoxRecord("box-%d" % n, None, "10.0.0.1", NOW).row() for n in range(2000)], [])
        store.close()
        path = os.path.join(self.tmp, bus.FleetStore.FILE)
        with sqlite3.connect(path) as connection:
            connection.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            page_size = connection.execute("PRAGMA page_size").fetchone()[0]
            # the index of box keys: nothing but the check reads it at start
            root = connection.execute("SELECT rootpage FROM sqlite_master WHERE name = 'sqlite_autoindex_boxes_1'"
                                      ).fetchone()[0]
        with open(path, "r+b") as damaged:
            damaged.seek(page_size * (root - 1))
            damaged.write(b"\xff" * page_size)
        with self.assertRaisesRegex(bus.SettingsError, "cannot be used: corrupt"):
            bus.FleetStore(self.tmp)

    def test_a_newer_schema_is_refused(self):
        with sqlite3.connect(os.path.join(self.tmp, bus.FleetStore.FILE)) as connection:
            connection.execute("PRAGMA user_version = 99")
        with self.assertRaisesRegex(bus.SettingsError, "newer server"):
            bus.FleetStore(self.tmp)

    @unittest.skipIf(os.geteuid() == 0, "root writes to a read-only folder; the end-to-end test runs as nobody")
    def test_a_read_only_folder_is_a_settings_error(self):
        os.chmod(self.tmp, 0o555)
        self.addCleanup(os.chmod, self.tmp, 0o755)
        with self.assertRaisesRegex(bus.SettingsError, "cannot be used"):
            bus.FleetStore(self.tmp)

    def test_the_state_is_write_ahead_logged(self):
        bus.FleetStore(self.tmp).close()
        with sqlite3.connect(os.path.join(self.tmp, bus.FleetStore.FILE)) as connection:
            self.assertEqual(connection.execute("PRAGMA journal_mode").fetchone()[0], "wal")


if __name__ == "__main__":
    unittest.main()
