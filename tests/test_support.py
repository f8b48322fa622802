"""The test helpers themselves: a server that does not start is stopped and reaped, never left running."""

import os
import unittest

from support import ServerProcess, TempDirTestCase, listening_port, python_executable

# What the server logs once it has bound its port (its start line), and what it says before and instead.
START_LINES = [
    ("2026-01-01 00:00:00,000 INFO listening on http://127.0.0.1:43211/ serving updates from /u", 43211),
    ("... INFO listening on http://[::]:8151/ serving updates from /u (verify_updates=true)", 8151),
    ("... INFO listening on http://0.0.0.0:1/ serving", 1),
    ("box_update_server: error: port 8151 is already in use", None),
    ("... INFO listening on http://127.0.0.1:4321", None),     # not yet the whole line
    ("", None),
]


class ListeningPortTest(unittest.TestCase):

    def test_the_port_comes_from_the_start_line(self):
        for text, port in START_LINES:
            with self.subTest(text=text):
                self.assertEqual(listening_port(text), port)


class ServerProcessTest(TempDirTestCase):

    def assert_gone(self, server):
        self.assertIsNotNone(server.process.returncode, "the process was not reaped")
        self.assertFalse(os.path.exists("/proc/%d" % server.process.pid), "the process is still there")

    def test_a_server_that_never_says_listening_is_stopped_and_reaped(self):
        server = ServerProcess(self.updates, command=[python_executable(), "-c", "import time; time.sleep(60)"])
        server.START_SECONDS = 1
        self.addCleanup(server.__exit__)
        with self.assertRaisesRegex(AssertionError, "server did not start: no 'listening on' line within 1 s"):
            server.start()
        self.assert_gone(server)

    def test_a_server_that_exits_is_reported_with_its_log(self):
        server = ServerProcess(self.updates, command=[python_executable(), "-c",
                                                      "import sys; sys.exit('box_update_server: error: no')"])
        self.addCleanup(server.__exit__)
        with self.assertRaisesRegex(AssertionError, "exited with status 1 before listening:\nbox_update_server: "
                                                    "error: no"):
            server.start()
        self.assert_gone(server)

    def test_a_failure_after_the_start_line_stops_the_server_too(self):
        server = ServerProcess(self.updates)
        self.addCleanup(server.__exit__)

        def broken_probe():
            raise RuntimeError("the probe broke")
        server.health = broken_probe
        with self.assertRaisesRegex(RuntimeError, "the probe broke"):
            server.start()
        self.assertIsNotNone(server.port)
        self.assert_gone(server)

    def test_two_servers_get_two_ports(self):
        first, second = ServerProcess(self.updates), ServerProcess(self.updates)
        for server in (first, second):
            self.addCleanup(server.__exit__)
            server.start()
        self.assertNotEqual(first.port, second.port)
        self.assertEqual([first.get("/").status, second.get("/").status], [200, 200])


if __name__ == "__main__":
    unittest.main()
