"""The Docker image, without a Docker engine: its file agrees with the server, and its command line works."""

import json
import os
import re
import shutil
import signal
import subprocess
import unittest

from support import (ROOT, SERVER, TempDirTestCase, end_process, make_update, python_executable, request, track,
                     settings_environment, wait_for_listening_port, wait_until)


def dockerfile_instructions():
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    with open(os.path.join(ROOT, "Dockerfile")) as dockerfile:
        text = re.sub(r"\\\n", " ", dockerfile.read())
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]
    return [tuple(line.split(None, 1)) for line in lines]


def instruction(name):
    found = [arguments for keyword, arguments in dockerfile_instructions() if keyword.upper() == name]
    assert len(found) == 1, "%s appears %d times" % (name, len(found))
    return found[0]


def compose_example():
    """The environment and volume of the README's docker compose service."""
    with open(os.path.join(ROOT, "README.md")) as readme:
        block = re.search(r"```yaml\n(services:.*?)```", readme.read(), re.S).group(1)
    settings = re.search(r"BOX_UPDATE_SERVER_SETTINGS: '(.*)'", block).group(1)
    volume = re.search(r"- (\S+):(\S+):ro", block)
    port = re.search(r'- "(\d+):(\d+)"', block)
    return json.loads(settings), volume.group(2), int(port.group(2))


class DockerfileTest(unittest.TestCase):

    def test_base_image_is_an_argument_defaulting_to_official_python_pinned_to_a_minor_version(self):
        self.assertEqual(instruction("FROM"), "${BASE_IMAGE}")
        name, default = instruction("ARG").split("=", 1)
        self.assertEqual(name, "BASE_IMAGE")
        self.assertRegex(default, r"^python:3\.\d+-(alpine|slim)[\w.-]*$")

    def test_nothing_runs_in_the_base_image(self):
        # no shell, package manager or account tool is needed, so any base with python3 on PATH works
        self.assertNotIn("RUN", [keyword.upper() for keyword, _ in dockerfile_instructions()])

    def test_entrypoint_is_exec_form_and_runs_the_server_file(self):
        entrypoint = json.loads(instruction("ENTRYPOINT"))
        self.assertEqual(entrypoint, ["python3", "box_update_server.py"])
        workdir = instruction("WORKDIR")
        copy = instruction("COPY").split()
        self.assertEqual(copy[0], "--chmod=0644")   # readable by uid 8151 whatever the checkout's umask
        self.assertEqual(copy[1], "box_update_server.py")
        self.assertIn(copy[2], ("./", workdir, workdir + "/"))
        with open(os.path.join(ROOT, ".dockerignore")) as ignore:
            self.assertIn("!box_update_server.py", ignore.read().split())

    def test_expose_and_healthcheck_agree_with_the_server_and_nothing_hides_a_forgotten_mount(self):
        settings, mount, container_port = compose_example()
        self.assertEqual(instruction("EXPOSE"), str(container_port))
        self.assertEqual(settings["port"], container_port)
        with open(os.path.join(ROOT, "config", "box-update-server.config.json")) as config:
            self.assertEqual(json.load(config)["port"], container_port)
        # no VOLUME: without -v the server must refuse to start, not serve an empty anonymous volume
        self.assertNotIn("VOLUME", [keyword.upper() for keyword, _ in dockerfile_instructions()])
        self.assertEqual(settings["updates_dir"], mount)
        healthcheck = instruction("HEALTHCHECK")
        command = json.loads(healthcheck.split("CMD", 1)[1])
        self.assertEqual(command, ["python3", "box_update_server.py", "health"])

    def test_runs_as_a_numeric_non_root_user_without_an_account(self):
        self.assertEqual(instruction("USER"), "8151:8151")


class ImageCommandLineTest(TempDirTestCase):
    """The ENTRYPOINT command line as the image's user would run it, with the README compose environment."""

    def setUp(self):
        super().setUp()
        self.settings, self.mount, _ = compose_example()
        self.settings["port"] = 0    # the compose port may be taken here: the server picks one, named in its log
        # the image's WORKDIR holds only the server file; the volume is the updates folder, read-only
        self.workdir = os.path.join(self.tmp, "box-update-server")
        os.mkdir(self.workdir)
        shutil.copy(SERVER, self.workdir)
        make_update(self.updates, 1764547200)
        self.settings["updates_dir"] = self.updates     # what the bind mount does
        self.python = python_executable()
        self.as_user = []
        if os.geteuid() == 0:   # the image runs unprivileged: drop root as it does
            if not (shutil.which("setpriv") and os.path.exists("/usr/bin/python3")):
                self.skipTest("running as root without setpriv and /usr/bin/python3 to drop privileges")
            for path in (self.tmp, self.workdir, self.updates):
                os.chmod(path, 0o755)
            self.as_user = ["setpriv", "--reuid", "nobody", "--regid", "nogroup", "--clear-groups"]
            self.python = "/usr/bin/python3"

    def command(self, *arguments):
        entrypoint = json.loads(instruction("ENTRYPOINT"))
        return self.as_user + [self.python if entrypoint[0] == "python3" else entrypoint[0]] + entrypoint[1:] + \
            list(arguments)

    def environment(self):
        return settings_environment(self.settings)

    def healthcheck(self):
        command = json.loads(instruction("HEALTHCHECK").split("CMD", 1)[1])
        finished = subprocess.run(self.as_user + [self.python] + command[1:], cwd=self.workdir,
                                  env=self.environment(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                  timeout=20)
        return finished.returncode, finished.stdout.decode()

    def test_entrypoint_serves_and_the_healthcheck_follows_the_health_answer(self):
        log_path = os.path.join(self.tmp, "stderr")
        with open(log_path, "wb") as log:
            process = track(subprocess.Popen(self.command(), cwd=self.workdir, env=self.environment(),
                                             stdout=subprocess.DEVNULL, stderr=log))
        self.addCleanup(end_process, process)

        def read_log():
            with open(log_path, errors="replace") as log:
                return log.read()
        try:
            self.port = self.settings["port"] = wait_for_listening_port(process, read_log)
            self.assertIn("listening on http://0.0.0.0:%d/" % self.port, read_log(), "every interface, as -p needs")
            self.assertTrue(wait_until(lambda: request(self.port, "GET", "/version").status == 200, 15),
                            "the server did not start: %s" % " ".join(self.command()))
            self.assertTrue(json.loads(request(self.port, "GET", "/").body)["ok"])
            self.assertEqual(self.healthcheck()[0], 0)
            moved = self.updates + ".gone"
            os.rename(self.updates, moved)
            self.assertTrue(wait_until(lambda: self.healthcheck()[0] == 1, 5))
            self.assertIn('"ok": false', self.healthcheck()[1])
            os.rename(moved, self.updates)
            self.assertTrue(wait_until(lambda: self.healthcheck()[0] == 0, 5))
        finally:
            process.send_signal(signal.SIGTERM)     # what docker stop sends
            self.assertEqual(process.wait(15), 0)
        self.assertEqual(self.healthcheck()[0], 1, "no server: unhealthy")


if __name__ == "__main__":
    unittest.main()
