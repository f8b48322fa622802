"""Settings: parsing without sockets, and every bad configuration ending the real process cleanly."""

import ipaddress
import json
import os
import re
import shutil
import socket
import stat
import subprocess
import tempfile
import time
import unittest

from support import (ROOT, SERVER, ServerProcess, TempDirTestCase, end_process, make_update, python_executable, record,
                     request, track, wait_for_listening_port, wait_until)

import box_update_server as bus


class ParseSettingsTest(unittest.TestCase):

    def test_minimal_settings_take_the_defaults(self):
        settings, warnings = bus.parse_settings('{"port": 8151, "updates_dir": "/srv/updates"}')
        self.assertEqual(settings, bus.Settings(port=8151, updates_dir="/srv/updates"))
        self.assertEqual(settings.host, "")
        self.assertTrue(settings.verify_updates)
        self.assertEqual(warnings, [])

    def test_numeric_string_port_is_accepted(self):
        settings, _ = bus.parse_settings('{"port": " 8151 ", "updates_dir": "/u"}')
        self.assertEqual(settings.port, 8151)

    def test_relative_updates_dir_is_taken_from_the_working_directory(self):
        settings, _ = bus.parse_settings('{"port": 1, "updates_dir": "examples/updates"}', cwd="/opt/box")
        self.assertEqual(settings.updates_dir, "/opt/box/examples/updates")

    def test_optional_settings_are_read(self):
        settings, _ = bus.parse_settings(json.dumps({
            "port": 80, "updates_dir": "/u", "host": "127.0.0.1", "idle_timeout": 2, "shutdown_grace": 0.5,
            "request_header_timeout": 3, "max_connections": 10, "max_connections_per_client": 7,
            "verify_updates": False, "trusted_proxies": ["10.1.2.3", "fd00::/8"], "metrics_allow": ["192.0.2.0/24"],
            "allowed_signers": "keys/allowed_signers"}), cwd="/opt/box")
        self.assertEqual((settings.host, settings.idle_timeout, settings.shutdown_grace,
                          settings.request_header_timeout, settings.max_connections,
                          settings.max_connections_per_client, settings.verify_updates),
                         ("127.0.0.1", 2.0, 0.5, 3.0, 10, 7, False))
        self.assertEqual(settings.trusted_proxies,
                         (ipaddress.ip_network("10.1.2.3/32"), ipaddress.ip_network("fd00::/8")))
        self.assertEqual(settings.metrics_allow, (ipaddress.ip_network("192.0.2.0/24"),))
        self.assertEqual(settings.allowed_signers, "/opt/box/keys/allowed_signers")

    def test_defaults_protect_out_of_the_box(self):
        settings, _ = bus.parse_settings('{"port": 80, "updates_dir": "/u"}')
        self.assertLessEqual(settings.request_header_timeout, 20)
        self.assertEqual(settings.max_connections_per_client, settings.max_connections // 4)
        self.assertEqual(settings.trusted_proxies, ())
        self.assertIsNone(settings.allowed_signers)
        for address, allowed in [("127.0.0.1", True), ("::1", True), ("10.9.8.7", True), ("172.20.0.1", True),
                                 ("192.168.1.1", True), ("fd12::1", True), ("8.8.8.8", False), ("2001:db8::1", False)]:
            with self.subTest(address=address):
                self.assertEqual(bus.in_networks(bus.parse_address(address), settings.metrics_allow), allowed)
        # a quarter of whatever max_connections is set to, unless set itself
        settings, _ = bus.parse_settings('{"port": 80, "updates_dir": "/u", "max_connections": 40}')
        self.assertEqual(settings.max_connections_per_client, 10)
        settings, _ = bus.parse_settings('{"port": 80, "updates_dir": "/u", "max_connections": 2}')
        self.assertEqual(settings.max_connections_per_client, 1)

    def test_port_0_lets_the_system_pick_one(self):
        settings, _ = bus.parse_settings('{"port": 0, "updates_dir": "/u"}')
        self.assertEqual(settings.port, 0)

    def test_a_missing_key_names_the_keys_that_were_not_understood(self):
        cases = [
            ('{"port": 80, "update_dir": "/u"}', "has no 'updates_dir' (unknown: 'update_dir')"),
            ('{"prot": 80, "updates_dir": "/u", "colour": 1}', "has no 'port' (unknown: 'colour', 'prot')"),
            ('{"port": 80}', "has no 'updates_dir'"),
        ]
        for text, expected in cases:
            with self.subTest(text=text):
                with self.assertRaises(bus.SettingsError) as caught:
                    bus.parse_settings(text)
                self.assertTrue(str(caught.exception).endswith(expected), str(caught.exception))

    def test_a_path_instead_of_json_says_so(self):
        cases = [
            ("config/box-update-server.config.json", True),
            (" /etc/box-update-server.json\n", True),
            ("settings.json", True),
            ("{port: 1}", False),
            ("not json", False),
            ("8151/updates", True),
            ('{"port": 80, "updates_dir": "/u"', False),
        ]
        for text, is_path in cases:
            with self.subTest(text=text):
                with self.assertRaises(bus.SettingsError) as caught:
                    bus.parse_settings(text)
                if is_path:
                    self.assertIn("BOX_UPDATE_SERVER_SETTINGS holds a path, %r, not JSON: it must hold the JSON "
                                  "itself, e.g. BOX_UPDATE_SERVER_SETTINGS=$(<%s)" % (text.strip(), text.strip()),
                                  str(caught.exception))
                else:
                    self.assertIn("is not valid JSON", str(caught.exception))

    def test_unknown_key_is_a_warning_not_an_error(self):
        settings, warnings = bus.parse_settings('{"port": 80, "updates_dir": "/u", "colour": "blue"}')
        self.assertEqual(settings.port, 80)
        self.assertEqual(len(warnings), 1)
        self.assertIn("colour", warnings[0])

    def test_bad_settings_name_the_problem(self):
        cases = [
            (None, "is not set"),
            ("   ", "is not set"),
            ("{port: 1}", "not valid JSON"),
            ("[1, 2]", "must be a JSON object"),
            ('{"updates_dir": "/u"}', "'port'"),
            ('{"port": 80}', "'updates_dir'"),
            ('{"port": "eighty", "updates_dir": "/u"}', "port must be an integer"),
            ('{"port": 80.5, "updates_dir": "/u"}', "port must be an integer"),
            ('{"port": true, "updates_dir": "/u"}', "port must be an integer"),
            ('{"port": -1, "updates_dir": "/u"}', "between 0 and 65535"),
            ('{"port": 65536, "updates_dir": "/u"}', "between 0 and 65535"),
            ('{"port": 80, "updates_dir": ""}', "updates_dir must be"),
            ('{"port": 80, "updates_dir": 7}', "updates_dir must be"),
            ('{"port": 80, "updates_dir": "/u", "idle_timeout": 0}', "idle_timeout"),
            ('{"port": 80, "updates_dir": "/u", "max_connections": "many"}', "max_connections"),
            ('{"port": 80, "updates_dir": "/u", "verify_updates": "yes"}', "verify_updates"),
            ('{"port": 80, "updates_dir": "/u", "request_header_timeout": -1}', "request_header_timeout"),
            ('{"port": 80, "updates_dir": "/u", "max_connections_per_client": 0}', "max_connections_per_client"),
            ('{"port": 80, "updates_dir": "/u", "trusted_proxies": "10.0.0.1"}', "trusted_proxies must be a list"),
            ('{"port": 80, "updates_dir": "/u", "trusted_proxies": ["10.0.0.300"]}', "'10.0.0.300' is not an address"),
            ('{"port": 80, "updates_dir": "/u", "metrics_allow": [7]}', "metrics_allow: 7 is not an address"),
            ('{"port": 80, "updates_dir": "/u", "allowed_signers": ""}', "allowed_signers must be a non-empty path"),
            ('{"port": 80, "updates_dir": "/u", "host": 5}', "host must be a string"),
        ]
        for text, expected in cases:
            with self.subTest(text=text):
                with self.assertRaises(bus.SettingsError) as caught:
                    bus.parse_settings(text)
                self.assertIn(expected, str(caught.exception))


def run_server(settings_text, timeout=10, user=None):
    """Run the server with the given BOX_UPDATE_SERVER_SETTINGS (None: unset); return (status, stderr)."""
    env = dict(os.environ)
    env.pop(bus.SETTINGS_VARIABLE, None)
    if settings_text is not None:
        env[bus.SETTINGS_VARIABLE] = settings_text
    command = [python_executable(), SERVER]
    if user is not None:
        command = ["setpriv", "--reuid", user, "--regid", "nogroup", "--clear-groups", "/usr/bin/python3", SERVER]
    try:
        finished = subprocess.run(command, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  timeout=timeout)
    except subprocess.TimeoutExpired:
        raise AssertionError("the server kept running on settings %r" % settings_text)
    return finished.returncode, finished.stderr.decode()


class BadConfigurationTest(TempDirTestCase):
    """Each bad configuration: exit status 1 and one clear line, never a traceback."""

    def assert_refused(self, settings_text, expected, user=None):
        status, stderr = run_server(settings_text, user=user)
        self.assertEqual(status, 1, stderr)
        self.assertNotIn("Traceback", stderr)
        lines = stderr.strip().splitlines()
        self.assertEqual(len(lines), 1, stderr)
        self.assertIn(expected, lines[0])

    def test_each_bad_configuration_is_one_line_and_exit_1(self):
        a_file = os.path.join(self.tmp, "a-file")
        open(a_file, "w").close()
        port = 0     # refused before it binds
        table = [
            (None, "BOX_UPDATE_SERVER_SETTINGS is not set"),
            ("", "BOX_UPDATE_SERVER_SETTINGS is not set"),
            ("not json", "not valid JSON"),
            ('"a string"', "must be a JSON object"),
            (json.dumps({"updates_dir": self.updates}), "has no 'port'"),
            (json.dumps({"port": port}), "has no 'updates_dir'"),
            (json.dumps({"port": "http", "updates_dir": self.updates}), "port must be an integer"),
            (json.dumps({"port": 70000, "updates_dir": self.updates}), "between 0 and 65535"),
            (json.dumps({"port": -1, "updates_dir": self.updates}), "between 0 and 65535"),
            (json.dumps({"port": 0, "update_dir": self.updates}), "has no 'updates_dir' (unknown: 'update_dir')"),
            ("config/box-update-server.config.json", "holds a path, 'config/box-update-server.config.json', not JSON"),
            (json.dumps({"port": port, "updates_dir": os.path.join(self.tmp, "missing")}), "is missing"),
            (json.dumps({"port": port, "updates_dir": a_file}), "is not a folder"),
        ]
        for settings_text, expected in table:
            with self.subTest(settings=settings_text):
                self.assert_refused(settings_text, expected)
        missing_keys = os.path.join(self.tmp, "no-such-allowed-signers")
        broken_keys = os.path.join(self.tmp, "allowed_signers")
        with open(broken_keys, "w") as keys:
            keys.write("# operators\n\nalice@example.org ssh-ed25519\n")
        table += [
            (json.dumps({"port": port, "updates_dir": self.updates, "allowed_signers": missing_keys}),
             "allowed_signers %s cannot be read" % missing_keys),
            (json.dumps({"port": port, "updates_dir": self.updates, "allowed_signers": broken_keys}), "line 3"),
            (json.dumps({"port": port, "updates_dir": self.updates, "trusted_proxies": ["proxy.example"]}),
             "'proxy.example' is not an address"),
        ]
        for settings_text, expected in table[-3:]:
            with self.subTest(settings=settings_text):
                self.assert_refused(settings_text, expected)
        record("Configuration faults", "%d bad configurations (unset, empty, not JSON, a file name instead of JSON, "
               "not an object, keys missing or misspelt, "
               "bad ports, updates folder missing or not a folder, allowed_signers missing or malformed, a proxy "
               "named by host name), plus port in use and an unreadable folder in their own tests" % len(table),
               "each: exit status 1 and one line naming the problem, no traceback")

    def test_port_in_use_is_named(self):
        with socket.socket() as holder:
            holder.bind(("127.0.0.1", 0))
            holder.listen()
            port = holder.getsockname()[1]
            self.assert_refused(json.dumps({"port": port, "updates_dir": self.updates, "host": "127.0.0.1"}),
                                "port %d is already in use" % port)

    def test_unreadable_updates_dir(self):
        os.chmod(self.updates, 0)
        self.addCleanup(os.chmod, self.updates, stat.S_IRWXU)
        settings = json.dumps({"port": 0, "updates_dir": self.updates})
        if os.geteuid() != 0:
            self.assert_refused(settings, "cannot be read")
            return
        # root reads any folder: run the server as nobody, with the system Python nobody can reach
        if not (shutil.which("setpriv") and os.path.exists("/usr/bin/python3")):
            self.skipTest("running as root without setpriv and /usr/bin/python3 to drop privileges")
        os.chmod(self.tmp, 0o755)
        probe = subprocess.run(["setpriv", "--reuid", "nobody", "--regid", "nogroup", "--clear-groups",
                                "/usr/bin/python3", "-c", "open(%r).close()" % SERVER], stderr=subprocess.PIPE)
        if probe.returncode != 0:
            self.skipTest("nobody cannot read the server file here: %s" % probe.stderr.decode().strip())
        self.assert_refused(settings, "cannot be read", user="nobody")

    def test_unknown_key_is_warned_about_and_the_server_runs(self):
        with ServerProcess(self.updates, colour="blue") as server:
            self.assertEqual(server.get("/").status, 200)
            self.assertIn("unknown setting 'colour' is ignored", server.log())


class CommandLineTest(TempDirTestCase):
    """--version, and health naming what it could not reach."""

    def run_command(self, arguments, settings=None):
        env = dict(os.environ)
        env.pop(bus.SETTINGS_VARIABLE, None)
        if settings is not None:
            env[bus.SETTINGS_VARIABLE] = json.dumps(settings)
        finished = subprocess.run([python_executable(), SERVER] + arguments, env=env, cwd=ROOT, timeout=30,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        return finished.returncode, finished.stdout.decode(), finished.stderr.decode()

    def test_version(self):
        self.assertEqual(self.run_command(["--version"]), (0, "box_update_server.py %s\n" % bus.__version__, ""))

    def test_health_names_the_address_it_could_not_reach(self):
        with socket.socket() as holder:    # bound, not listening: a connection is refused
            holder.bind(("127.0.0.1", 0))
            port = holder.getsockname()[1]
            for host, shown in [("127.0.0.1", "127.0.0.1"), ("", "127.0.0.1"), ("0.0.0.0", "127.0.0.1")]:
                with self.subTest(host=host):
                    status, output, _ = self.run_command(["health"], {"port": port, "updates_dir": self.updates,
                                                                      "host": host})
                    self.assertEqual(status, 1)
                    self.assertRegex(output, r"^unhealthy: http://%s:%d/: .*refused" % (re.escape(shown), port))

    def test_health_of_a_running_server(self):
        make_update(self.updates, 1700000000, mtime=time.time() - 60)
        server = self.start_server()
        status, output, _ = self.run_command(["health"], {"port": server.port, "updates_dir": self.updates,
                                                          "host": "127.0.0.1"})
        self.assertEqual((status, output.split(" ", 1)[0]), (0, "healthy:"), output)

    def test_health_refuses_port_0(self):
        status, output, errors = self.run_command(["health"], {"port": 0, "updates_dir": self.updates})
        self.assertEqual((status, output), (1, ""))
        self.assertEqual(errors, "box_update_server: error: health needs the port the server listens on: port 0 "
                                 "lets it pick one at start\n")


class ReadmeRunCommandTest(unittest.TestCase):
    """The README's run command, word for word, on the shipped configuration and example updates."""

    RUN_COMMAND = "BOX_UPDATE_SERVER_SETTINGS=$(<config/box-update-server.config.json) python3 box_update_server.py"

    def test_readme_shows_the_run_command(self):
        with open(os.path.join(ROOT, "README.md")) as readme:
            self.assertIn(self.RUN_COMMAND, readme.read())

    def test_run_command_serves_the_examples(self):
        """Word for word, in a copy of the checkout whose config differs only in "port": 0 (8151 may be taken)."""
        with open(os.path.join(ROOT, "config", "box-update-server.config.json")) as config:
            settings = json.load(config)
        self.assertEqual(settings.get("host"), "127.0.0.1", "the try-it command listens on loopback only")
        checkout = tempfile.mkdtemp(prefix="box-update-test-")
        self.addCleanup(shutil.rmtree, checkout, True)
        os.mkdir(os.path.join(checkout, "config"))
        with open(os.path.join(checkout, "config", "box-update-server.config.json"), "w") as config:
            json.dump(dict(settings, port=0), config)
        os.symlink(os.path.join(ROOT, "examples"), os.path.join(checkout, "examples"))
        os.symlink(SERVER, os.path.join(checkout, "box_update_server.py"))
        examples = sorted(os.listdir(os.path.join(ROOT, settings["updates_dir"])))
        self.assertGreaterEqual(len(examples), 2)
        command = self.RUN_COMMAND.replace(" python3 ", " exec %s " % python_executable())
        log_path = os.path.join(checkout, "stderr")
        with open(log_path, "wb") as log:
            process = track(subprocess.Popen(["bash", "-c", command], cwd=checkout, stdout=subprocess.DEVNULL,
                                             stderr=log))
        self.addCleanup(end_process, process)

        def read_log():
            with open(log_path, errors="replace") as log:
                return log.read()
        port = wait_for_listening_port(process, read_log)
        self.assertIn("listening on http://127.0.0.1:%d/" % port, read_log())
        self.assertTrue(wait_until(lambda: request(port, "GET", "/version").status == 200, 15))
        self.assertEqual(request(port, "GET", "/ls").body.decode().split("\n"), examples)
        self.assertEqual(request(port, "GET", "/version").body.decode(),
                         examples[-1][len("opq-box-update-"):-len(".tar.bz2")])
        self.assertEqual(end_process(process), 0, read_log())
