"""The box side (box/opq-box-update): the real script under dash and busybox sh, on a fake box, against the real
server (and, where the real server cannot be made to serve what a box must refuse, a small HTTP server in the
test), with the real wget, tar, bzip2, sha256sum and ssh-keygen."""

import hashlib
import http.server
import json
import os
import re
import shutil
import socket
import stat
import subprocess
import threading
import time
import unittest

from support import (ROOT, TempDirTestCase, archive_bytes, device_member, dir_member, file_member, free_port,
                     heavy, link_member, make_update, require_binary, wait_until)

import box_update_server as bus

BOX = os.path.join(ROOT, "box")
UPDATER = os.path.join(BOX, "opq-box-update")
SCRIPTS = [UPDATER, os.path.join(BOX, "updater.sh"), os.path.join(BOX, "install_update.snippet.sh")]
OLD = 1700000000        # the VERSION a fake box has installed
NEW = 1700000100        # the update the server offers
NAME = "opq-box-update-%d.tar.bz2" % NEW
INSTALLER = b"""#!/bin/sh
# the update's install step on a fake box: note the run, then install VERSION where the box keeps it
set -e
test -f VERSION    # run from the top folder
touch "$FAKE_BOX/installing"
sleep "${FAKE_INSTALL_SLEEP:-0}"
cat VERSION >>"$FAKE_BOX/installs"
if [ -n "${FAKE_INSTALL_FAIL:-}" ]; then
    echo "install step failed on purpose" >&2
    exit 7
fi
cat VERSION >"$OPQ_INSTALLED_VERSION_FILE"
echo "installed $(cat VERSION)"
"""


# Archives and keys -------------------------------------------------------------

def box_members(version, installer=INSTALLER, installer_mode=0o755, version_content=None, extra=()):
    """An update whose install_update.sh installs its VERSION on the fake box it runs on."""
    top = "opq-box-update-%d" % version
    content = ("%d\n" % version if version_content is None else version_content).encode()
    members = [dir_member(top), file_member(top + "/VERSION", content)]
    if installer is not None:
        members.append(file_member(top + "/install_update.sh", installer, installer_mode))
    members += [dir_member(top + "/box-config-daemon"), file_member(top + "/box-config-daemon/daemon.py", b"pass\n")]
    return members + list(extra)


def fifo_member(name):
    member, data = device_member(name)
    member.type = b"6"   # tarfile.FIFOTYPE
    return member, data


class Keys:
    """ed25519 keys made by the real ssh-keygen, signatures as operators make them."""

    def __init__(self, folder):
        self.ssh_keygen = require_binary("ssh-keygen")
        self.folder = folder

    def make(self, name):
        path = os.path.join(self.folder, name)
        subprocess.run([self.ssh_keygen, "-q", "-t", "ed25519", "-N", "", "-C", name, "-f", path], check=True)
        return path

    @staticmethod
    def allowed_signers_line(key, principal="opq-box-update"):
        with open(key + ".pub") as public:
            key_type, blob = public.read().split()[:2]
        return '%s namespaces="opq-box-update" %s %s\n' % (principal, key_type, blob)

    def sign(self, key, path, namespace="opq-box-update"):
        subprocess.run([self.ssh_keygen, "-q", "-Y", "sign", "-f", key, "-n", namespace, path], check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        return path + ".sig"


# The fake box -------------------------------------------------------------------

class FakeBox:
    """A folder standing in for /etc/opq, /usr/local/box-config-daemon and /var/lib/opq-box-update; its reboot
    command a stub that notes each call."""

    def __init__(self, root, shell, endpoint, box_id="1001", installed=OLD):
        self.root, self.shell = root, shell
        self.etc = os.path.join(root, "etc", "opq")
        self.daemon = os.path.join(root, "usr", "local", "box-config-daemon")
        self.state = os.path.join(root, "var", "lib", "opq-box-update")
        for folder in (self.etc, self.daemon):
            os.makedirs(folder)
        self.config = os.path.join(self.etc, "opqbox_config.json")
        self.version_file = os.path.join(self.daemon, "VERSION")
        self.allowed_signers = os.path.join(self.etc, "allowed_signers")
        self.reboot = os.path.join(root, "reboot-stub")
        with open(self.reboot, "w") as stub:
            stub.write('#!/bin/sh\necho reboot >>"%s"\n' % os.path.join(root, "reboots"))
        os.chmod(self.reboot, 0o755)
        self.configure(endpoint, box_id)
        with open(self.version_file, "w") as version:
            version.write("%d\n" % installed)
        self.extra_env = {}

    def configure(self, endpoint, box_id="1001"):
        with open(self.config, "w") as config:
            json.dump({"box_id": int(box_id) if box_id.isdigit() else box_id, "updates_ep": endpoint,
                       "box_config_daemon_port": 8888}, config)

    def trust(self, *lines):
        with open(self.allowed_signers, "w") as signers:
            signers.writelines(lines)

    def env(self, **extra):
        env = {key: value for key, value in os.environ.items() if not key.startswith("OPQ_")}
        env.update(OPQ_BOX_CONFIG=self.config, OPQ_INSTALLED_VERSION_FILE=self.version_file,
                   OPQ_ALLOWED_SIGNERS=self.allowed_signers, OPQ_STATE_DIR=self.state, OPQ_REBOOT=self.reboot,
                   FAKE_BOX=self.root)
        env.update(self.extra_env)
        env.update(extra)
        return env

    def command(self):
        return self.shell + [UPDATER]

    def run(self, timeout=120, **extra):
        return subprocess.run(self.command(), env=self.env(**extra), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              timeout=timeout, universal_newlines=True)

    def start(self, **extra):
        return subprocess.Popen(self.command(), env=self.env(**extra), stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, universal_newlines=True)

    def read(self, name, default=None):
        path = os.path.join(self.root, name)
        if not os.path.exists(path):
            return default
        with open(path) as file:
            return file.read()

    def installed_version(self):
        with open(self.version_file) as version:
            return int(version.read())

    def reboots(self):
        return len((self.read("reboots") or "").splitlines())

    def installs(self):
        return [int(line) for line in (self.read("installs") or "").split()]

    def state_files(self, *parts):
        path = os.path.join(self.state, *parts)
        return sorted(os.listdir(path)) if os.path.isdir(path) else None


# A small update server the test controls ---------------------------------------

class FakeUpdateServer:
    """Serves /latest, /update/<name>, .sha256 and .sig like the real server, from a dict the test fills, so
    it can serve what the real server would refuse to (a wrong checksum, a bad archive), cut a download half
    way, or answer 503; it records every request's path and headers."""

    def __init__(self, test):
        fake = self
        self.files, self.requests, self.cut, self.status = {}, [], set(), {}
        self.latest = None

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self):
                fake.requests.append((self.path, dict(self.headers.items())))
                status = fake.status.get(self.path)
                if status is not None:
                    self.answer(status, b"unavailable\n")
                elif self.path == "/latest" and fake.latest:
                    self.answer(303, b"", [("Location", "update/" + fake.latest)])
                elif self.path.startswith("/update/") and self.path[len("/update/"):] in fake.files:
                    name = self.path[len("/update/"):]
                    data = fake.files[name]
                    if name in fake.cut:   # the whole length promised, half of it sent, then the connection cut
                        self.send_response(200)
                        self.send_header("Content-Length", str(len(data)))
                        self.end_headers()
                        self.wfile.write(data[:len(data) // 2])
                        self.wfile.flush()
                        self.close_connection = True
                        self.connection.shutdown(socket.SHUT_RDWR)
                        return
                    self.answer(200, data)
                else:
                    self.answer(404, b"Resource not found.")

            def answer(self, status, body, headers=()):
                self.send_response(status)
                self.send_header("Content-Length", str(len(body)))
                for name, value in headers:
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        test.addCleanup(self.httpd.server_close)
        test.addCleanup(self.httpd.shutdown)
        self.url = "http://127.0.0.1:%d" % self.httpd.server_address[1]

    def offer(self, name, data, checksum=None, signature=None):
        """Offer data as the newest update name, with its .sha256 (or checksum instead) and a .sig if given."""
        self.latest = name
        self.files[name] = data
        self.files[name + ".sha256"] = ("%s  %s\n" % (checksum or hashlib.sha256(data).hexdigest(), name)).encode()
        if signature is not None:
            self.files[name + ".sig"] = signature

    def paths(self):
        return [path for path, _ in self.requests]

    def latest_headers(self):
        return [headers for path, headers in self.requests if path == "/latest"]


# The tests, once per shell ------------------------------------------------------

class BoxUpdaterCase(TempDirTestCase):
    """A fake box running the updater under SHELL; subclasses name the shell."""

    SHELL = None

    def setUp(self):
        super().setUp()
        self.shell = self.shell_command()
        require_binary("wget")
        require_binary("bzip2")
        self.keys = Keys(os.path.join(self.tmp, "keys"))
        os.mkdir(self.keys.folder)
        self.box_count = 0

    def shell_command(self):
        return [require_binary(self.SHELL[0])] + list(self.SHELL[1:])

    def box(self, endpoint, box_id="1001", installed=OLD):
        self.box_count += 1
        return FakeBox(os.path.join(self.tmp, "box%d" % self.box_count), self.shell, endpoint, box_id, installed)

    def start_run(self, box, **extra):
        """A run in the background, stopped and reaped after the test whatever happens."""
        process = box.start(**extra)

        def reap():
            if process.poll() is None:
                process.kill()
            process.communicate()
        self.addCleanup(reap)
        return process

    def publish_update(self, version=NEW, members=None, key=None):
        path = make_update(self.updates, version, members or box_members(version), mtime=time.time() - 60)
        if key is not None:
            self.keys.sign(key, path)
        return path

    # what every outcome must show

    def assert_status(self, result, status):
        self.assertEqual(result.returncode, status, "stdout:\n%s\nstderr:\n%s" % (result.stdout, result.stderr))
        if status:
            lines = result.stderr.splitlines()
            self.assertEqual(len(lines), 1, "one line on stderr for a non-zero status, got:\n" + result.stderr)
            self.assertTrue(lines[0].startswith("opq-box-update: error: "), lines[0])
        else:
            self.assertEqual(result.stderr, "")

    def assert_nothing_installed(self, box, result, status):
        self.assert_status(result, status)
        self.assertEqual(box.installed_version(), OLD)
        self.assertEqual(box.installs(), [])
        self.assertEqual(box.reboots(), 0)
        self.assertFalse(os.path.exists(os.path.join(box.state, "work")), "the work folder is cleaned")
        self.assertFalse(os.path.exists(os.path.join(box.root, "installing")))

    # 1: a newer signed update

    def test_a_newer_signed_update_is_installed_then_the_box_reboots_once(self):
        key = self.keys.make("operator")
        signers = os.path.join(self.tmp, "allowed_signers")
        with open(signers, "w") as file:
            file.write(self.keys.allowed_signers_line(key))
        self.publish_update(OLD - 100)
        self.publish_update(NEW, key=key)
        self.keys.sign(key, os.path.join(self.updates, "opq-box-update-%d.tar.bz2" % (OLD - 100)))
        server = self.start_server(allowed_signers=signers)
        box = self.box(server.url("/"))
        box.trust(self.keys.allowed_signers_line(key))

        result = box.run()
        self.assert_status(result, 0)
        self.assertIn("signature verified", result.stdout)
        self.assertEqual(box.installed_version(), NEW)
        self.assertEqual(box.installs(), [NEW])
        self.assertEqual(box.reboots(), 1)
        self.assertEqual(box.read("var/lib/opq-box-update/installed"), "%d\n" % NEW)
        self.assertEqual(box.read("var/lib/opq-box-update/install.log"), "installed %d\n" % NEW)
        self.assertEqual(box.state_files(), ["install.log", "installed", "lock"], "work and download cleaned")
        self.assertEqual(len(server.access_lines('"GET /update/%s"' % NAME)), 1)
        self.assertEqual(len(server.access_lines('"GET /update/%s.sig"' % NAME)), 1)

        again = box.run()    # after the reboot: nothing to do
        self.assert_status(again, 0)
        self.assertIn("nothing to do", again.stdout)
        self.assertEqual((box.installs(), box.reboots()), ([NEW], 1))

    def test_updates_url_overrides_the_configured_endpoint(self):
        self.publish_update()
        server = self.start_server()
        box = self.box("http://127.0.0.1:%d/nowhere" % free_port())
        result = box.run(OPQ_UPDATES_URL=server.url("/"))
        self.assert_status(result, 0)
        self.assertEqual(box.installed_version(), NEW)
        self.assertIn("is not checked", result.stdout)    # no keys installed: no signature asked for
        self.assertEqual(server.access_lines(".sig"), [])

    def test_the_install_runs_in_a_fresh_folder_and_its_output_goes_to_syslog(self):
        self.publish_update()
        server = self.start_server()
        box = self.box(server.url())
        leftover = os.path.join(box.state, "work", "extract", "opq-box-update-%d" % NEW)
        os.makedirs(leftover)    # what a run killed during an install left behind
        with open(os.path.join(leftover, "install_update.sh"), "w") as stale:
            stale.write("#!/bin/sh\necho stale >>\"$FAKE_BOX/installs\"\n")
        os.chmod(os.path.join(leftover, "install_update.sh"), 0o755)
        bin_dir = os.path.join(self.tmp, "bin")
        os.mkdir(bin_dir)
        with open(os.path.join(bin_dir, "logger"), "w") as logger:   # syslog, as the test can see it
            logger.write('#!/bin/sh\necho "logger $*" >>"$FAKE_BOX/syslog"\ncat >>"$FAKE_BOX/syslog"\n')
        os.chmod(os.path.join(bin_dir, "logger"), 0o755)
        self.assert_status(box.run(PATH=bin_dir + os.pathsep + os.environ["PATH"]), 0)
        self.assertEqual(box.installs(), [NEW])
        self.assertEqual(box.read("syslog"), "logger -t opq-box-update\ninstalled %d\n" % NEW)

    def test_an_endpoint_with_white_space_is_refused(self):
        box = self.box("http://127.0.0.1:1/x y")
        result = box.run()
        self.assert_nothing_installed(box, result, 1)
        self.assertIn("white space", result.stderr)

    # 2: nothing newer

    def test_an_update_already_installed_downloads_nothing(self):
        self.publish_update(OLD)
        server = self.start_server()
        box = self.box(server.url())
        self.assert_nothing_installed(box, box.run(), 0)
        self.assertEqual(len(server.access_lines('"GET /latest"')), 1)
        self.assertEqual(server.access_lines('"GET /update'), [])

    def test_an_older_update_is_never_installed(self):
        self.publish_update(OLD - 100)
        server = self.start_server()
        box = self.box(server.url())
        result = box.run()
        self.assert_nothing_installed(box, result, 0)
        self.assertIn("VERSION %d is installed and the server offers %d: nothing to do" % (OLD, OLD - 100),
                      result.stdout)
        self.assertEqual(len(server.access_lines('"GET /latest"')), 1)
        self.assertEqual(server.access_lines('"GET /update'), [])

    def test_what_the_updater_installed_counts_even_if_the_version_file_lags(self):
        self.publish_update(NEW)
        server = self.start_server()
        box = self.box(server.url())
        os.makedirs(box.state)
        with open(os.path.join(box.state, "installed"), "w") as record:
            record.write("%d\n" % NEW)
        self.assert_nothing_installed(box, box.run(), 0)
        self.assertEqual(server.access_lines('"GET /update'), [])

    # 3: refused (exit 2)

    def test_a_wrong_signature_is_refused_when_keys_are_installed(self):
        trusted, stranger = self.keys.make("operator"), self.keys.make("stranger")
        self.publish_update(NEW, key=stranger)    # the server checks nothing: it only serves the .sig
        server = self.start_server()
        box = self.box(server.url())
        box.trust(self.keys.allowed_signers_line(trusted))
        result = box.run()
        self.assert_nothing_installed(box, result, 2)
        self.assertIn("signature of %s does not verify" % NAME, result.stderr)
        self.assertIsNone(box.state_files("download"), "a refused download is not kept")

    def test_a_signature_under_another_principal_is_refused(self):
        key = self.keys.make("operator")
        self.publish_update(NEW, key=key)
        server = self.start_server()
        box = self.box(server.url())
        box.trust(self.keys.allowed_signers_line(key, principal="someone-else"))
        self.assert_nothing_installed(box, box.run(), 2)
        self.assert_status(box.run(OPQ_SIGNER_PRINCIPAL="someone-else"), 0)
        self.assertEqual(box.installed_version(), NEW)

    def test_a_missing_signature_is_refused_when_keys_are_installed(self):
        self.publish_update(NEW)
        server = self.start_server()
        box = self.box(server.url())
        box.trust(self.keys.allowed_signers_line(self.keys.make("operator")))
        result = box.run()
        self.assert_nothing_installed(box, result, 2)
        self.assertIn("has no signature", result.stderr)

    def test_a_checksum_mismatch_is_refused(self):
        fake = FakeUpdateServer(self)
        fake.offer(NAME, archive_bytes(box_members(NEW)), checksum="0" * 64)
        box = self.box(fake.url)
        result = box.run()
        self.assert_nothing_installed(box, result, 2)
        self.assertIn("does not match its .sha256", result.stderr)
        self.assertIsNone(box.state_files("download"))

    def test_a_bad_archive_is_refused_before_anything_is_extracted(self):
        top = "opq-box-update-%d" % NEW
        cases = {   # what is wrong: (the members, the reason the box gives)
            "outside the top folder": (box_members(NEW, extra=[file_member("elsewhere/evil", b"x")]),
                                       "'elsewhere/evil' is outside the top folder"),
            "a second top folder": (box_members(NEW, extra=[dir_member("opq-box-update-1")]), "outside the top folder"),
            "an absolute path": (box_members(NEW, extra=[file_member("/tmp/evil", b"x")]), "absolute path or a '..'"),
            "a '..' part": (box_members(NEW, extra=[file_member(top + "/../evil", b"x")]), "absolute path or a '..'"),
            "a link out": (box_members(NEW, extra=[link_member(top + "/box-config-daemon/out", "../../evil")]),
                           "link '%s/box-config-daemon/out' points outside" % top),
            "an absolute link": (box_members(NEW, extra=[link_member(top + "/etc", "/etc")]), "points outside"),
            "a hard link out": (box_members(NEW, extra=[link_member(top + "/passwd", "etc/passwd", hard=True)]),
                                "hard link '%s/passwd' points outside" % top),
            "a device": (box_members(NEW, extra=[device_member(top + "/null")]), "is a device, FIFO"),
            "a FIFO": (box_members(NEW, extra=[fifo_member(top + "/fifo")]), "is a device, FIFO"),
            "a VERSION that does not match the name": (box_members(NEW, version_content="%d\n" % (NEW + 1)),
                                                       "VERSION says '%d', the name says %d" % (NEW + 1, NEW)),
            "two VERSION files": (box_members(NEW, extra=[file_member("./%s/VERSION" % top, b"%d\n" % NEW)]),
                                  "holds 2 %s/VERSION files" % top),
            "no install_update.sh": (box_members(NEW, installer=None), "has no %s/install_update.sh" % top),
            "an install_update.sh that is not executable": (box_members(NEW, installer_mode=0o644),
                                                            "install_update.sh is not an executable regular file"),
            "not bzip2": (None, "not a complete bzip2 file"),
        }
        fake = FakeUpdateServer(self)
        for case, (members, reason) in cases.items():
            with self.subTest(case):
                data = archive_bytes(members) if members is not None else b"BZh9 not really\n"
                fake.offer(NAME, data)
                box = self.box(fake.url)
                result = box.run()
                self.assert_nothing_installed(box, result, 2)
                self.assertIn("%s is refused: " % NAME, result.stderr)
                self.assertIn(reason, result.stderr)
                self.assertIsNone(box.state_files("download"))

    def test_links_and_dot_paths_inside_the_top_folder_are_accepted(self):
        top = "opq-box-update-%d" % NEW
        fake = FakeUpdateServer(self)
        fake.offer(NAME, archive_bytes(box_members(NEW, extra=[
            link_member(top + "/box-config-daemon/link", "../VERSION"),
            link_member(top + "/box-config-daemon/hard", top + "/VERSION", hard=True),
            file_member("./%s/./box-config-daemon/a b -> c" % top, b"x")])))
        box = self.box(fake.url)
        self.assert_status(box.run(), 0)
        self.assertEqual((box.installed_version(), box.reboots()), (NEW, 1))

    # 4: could not ask or download (exit 1)

    def test_server_down(self):
        box = self.box("http://127.0.0.1:%d" % free_port())
        result = box.run()
        self.assert_nothing_installed(box, result, 1)
        self.assertIn("cannot reach", result.stderr)

    def test_no_update_published_404(self):
        server = self.start_server()
        box = self.box(server.url())
        result = box.run()
        self.assert_nothing_installed(box, result, 1)
        self.assertIn("HTTP 404", result.stderr)

    def test_service_unavailable_503(self):
        fake = FakeUpdateServer(self)
        fake.status["/latest"] = 503
        box = self.box(fake.url)
        result = box.run()
        self.assert_nothing_installed(box, result, 1)
        self.assertIn("HTTP 503", result.stderr)
        fake.status.clear()
        fake.offer(NAME, archive_bytes(box_members(NEW)))
        fake.status["/update/" + NAME] = 503
        result = box.run()
        self.assert_nothing_installed(box, result, 1)
        self.assertIn("downloading %s: HTTP 503" % NAME, result.stderr)

    def test_a_download_cut_half_way_is_resumed_by_the_next_run(self):
        path = self.publish_update(NEW, box_members(NEW, extra=[
            file_member("opq-box-update-%d/box-config-daemon/firmware.bin" % NEW, os.urandom(200000))]))
        with open(path, "rb") as archive:
            data = archive.read()
        fake = FakeUpdateServer(self)
        fake.offer(NAME, data)
        fake.cut.add(NAME)
        box = self.box(fake.url)
        result = box.run()
        self.assert_nothing_installed(box, result, 1)
        self.assertIn("kept to resume", result.stderr)
        partial = os.path.join(box.state, "download", NAME)
        self.assertEqual(os.path.getsize(partial), len(data) // 2)

        server = self.start_server()
        box.configure(server.url())
        self.assert_status(box.run(), 0)
        self.assertEqual((box.installed_version(), box.reboots()), (NEW, 1))
        downloads = server.access_lines('"GET /update/%s"' % NAME)
        self.assertEqual(len(downloads), 1)
        self.assertIn(" 206 %d " % (len(data) - len(data) // 2), downloads[0], "only the rest was fetched")

    # 5: install_update.sh fails (exit 3)

    def test_a_failed_install_is_not_rebooted_and_is_reported_until_an_install_succeeds(self):
        fake = FakeUpdateServer(self)
        fake.offer(NAME, archive_bytes(box_members(NEW)))
        box = self.box(fake.url, box_id="box-7.a_1")
        result = box.run(FAKE_INSTALL_FAIL="1")
        self.assert_status(result, 3)
        self.assertIn("exited with status 7", result.stderr)
        self.assertEqual((box.installed_version(), box.installs(), box.reboots()), (OLD, [NEW], 0))
        self.assertEqual(box.read("var/lib/opq-box-update/failed"), "%d\n" % NEW)
        self.assertIn("install step failed on purpose", box.read("var/lib/opq-box-update/install.log"))
        first, report = fake.latest_headers()
        self.assertEqual((first.get("X-OPQ-Box-Id"), first.get("X-OPQ-Box-Version")), ("box-7.a_1", str(OLD)))
        self.assertNotIn("X-OPQ-Box-Result", first)
        self.assertEqual(report.get("X-OPQ-Box-Result"), "failed %d" % NEW, "reported at once")
        downloads = [headers for path, headers in fake.requests if path.startswith("/update/")]
        self.assertEqual(len(downloads), 2)    # the archive and its .sha256, each saying which box asks
        for headers in downloads:
            self.assertEqual((headers.get("X-OPQ-Box-Id"), headers.get("X-OPQ-Box-Version")), ("box-7.a_1", str(OLD)))
            self.assertNotIn("X-OPQ-Box-Result", headers)
        self.assertFalse(os.path.exists(os.path.join(box.state, "work")))

        fake.requests.clear()
        result = box.run()    # the next check reports it again, and (still offered) installs it this time
        self.assert_status(result, 0)
        self.assertEqual(fake.latest_headers()[0].get("X-OPQ-Box-Result"), "failed %d" % NEW)
        self.assertEqual((box.installed_version(), box.installs(), box.reboots()), (NEW, [NEW, NEW], 1))
        self.assertIsNone(box.read("var/lib/opq-box-update/failed"))

        fake.requests.clear()
        self.assert_status(box.run(), 0)
        self.assertEqual([headers.get("X-OPQ-Box-Result") for headers in fake.latest_headers()], [None])
        self.assertEqual(fake.latest_headers()[0].get("X-OPQ-Box-Version"), str(NEW))

    def test_a_failure_is_no_longer_reported_once_that_version_is_installed_otherwise(self):
        fake = FakeUpdateServer(self)
        fake.offer(NAME, archive_bytes(box_members(NEW)))
        box = self.box(fake.url, installed=NEW)    # e.g. installed by hand after the failed attempt
        os.makedirs(box.state)
        with open(os.path.join(box.state, "failed"), "w") as record:
            record.write("%d\n" % NEW)
        self.assert_status(box.run(), 0)
        self.assertNotIn("X-OPQ-Box-Result", fake.latest_headers()[0])
        self.assertIsNone(box.read("var/lib/opq-box-update/failed"))

    def test_a_box_id_that_is_not_a_header_value_is_not_sent(self):
        fake = FakeUpdateServer(self)
        for box_id in ("10 01", "1001:2", "1001\r\nX-Evil: 1", "1" * 65):
            with self.subTest(box_id=box_id):
                fake.requests.clear()
                box = self.box(fake.url, box_id=box_id)
                result = box.run()
                self.assert_nothing_installed(box, result, 1)    # /latest answers 404: no update
                self.assertIn("box_id", result.stdout)
                headers = fake.latest_headers()[0]
                self.assertNotIn("X-OPQ-Box-Id", headers)
                self.assertNotIn("X-Evil", headers)
                self.assertEqual(headers.get("X-OPQ-Box-Version"), str(OLD))

    # 6: one run at a time

    def test_two_runs_at_once_install_once(self):
        self.publish_update()
        server = self.start_server()
        box = self.box(server.url())
        first = self.start_run(box, FAKE_INSTALL_SLEEP="3")
        self.assertTrue(wait_until(lambda: os.path.exists(os.path.join(box.root, "installing")), 60))
        second = box.run()
        self.assert_status(second, 1)
        self.assertIn("another run holds", second.stderr)
        out, err = first.communicate(timeout=120)
        self.assertEqual(first.returncode, 0, out + err)
        self.assertEqual((box.installs(), box.reboots()), ([NEW], 1))
        self.assertEqual(len(server.access_lines('"GET /latest"')), 1, "the second run asked nothing")

    def test_without_flock_a_mkdir_lock_is_held_and_a_stale_one_taken_over(self):
        bin_dir = os.path.join(self.tmp, "bin")
        os.mkdir(bin_dir)
        for command in ("wget", "tar", "bzip2", "sha256sum", "python3", "sed", "grep", "tr", "cut", "wc", "tail",
                        "mkdir", "rm", "cat", "sleep", "touch", "sh", "chmod", "mv", "head"):
            os.symlink(require_binary(command), os.path.join(bin_dir, command))
        path = {"PATH": bin_dir}
        self.publish_update()
        server = self.start_server()
        box = self.box(server.url())
        first = self.start_run(box, FAKE_INSTALL_SLEEP="3", **path)
        self.assertTrue(wait_until(lambda: os.path.exists(os.path.join(box.root, "installing")), 60))
        self.assertTrue(os.path.isdir(os.path.join(box.state, "lock.d")))
        second = box.run(**path)
        self.assert_status(second, 1)
        self.assertIn("lock.d", second.stderr)
        out, err = first.communicate(timeout=120)
        self.assertEqual(first.returncode, 0, out + err)
        self.assertEqual((box.installs(), box.reboots()), ([NEW], 1))
        self.assertFalse(os.path.exists(os.path.join(box.state, "lock.d")), "released")

        # a lock left by a run that died (its process is gone), and one from before a reboot
        dead = subprocess.Popen(["true"])
        dead.wait()
        with open("/proc/sys/kernel/random/boot_id") as boot:
            boot_id = boot.read().strip()
        for owner in ("%d %s\n" % (dead.pid, boot_id), "%d another-boot\n" % os.getpid(), ""):
            with self.subTest(owner=owner):
                os.makedirs(os.path.join(box.state, "lock.d"))
                with open(os.path.join(box.state, "lock.d", "owner"), "w") as file:
                    file.write(owner)
                result = box.run(**path)
                self.assert_status(result, 0)
                self.assertIn("taking over the stale lock", result.stdout)
                self.assertFalse(os.path.exists(os.path.join(box.state, "lock.d")))
        # and one whose holder lives is respected
        os.makedirs(os.path.join(box.state, "lock.d"))
        with open(os.path.join(box.state, "lock.d", "owner"), "w") as file:
            file.write("%d %s\n" % (os.getpid(), boot_id))
        self.assert_status(box.run(**path), 1)

    def test_busybox_tar_and_wget_are_not_taken_for_gnu_ones(self):
        busybox = require_binary("busybox")
        self.publish_update()
        server = self.start_server()
        box = self.box(server.url())
        for command in ("tar", "wget"):
            with self.subTest(command):
                bin_dir = os.path.join(self.tmp, "bin-" + command)
                os.mkdir(bin_dir)
                os.symlink(busybox, os.path.join(bin_dir, command))
                result = box.run(PATH=bin_dir + os.pathsep + os.environ["PATH"])
                self.assert_nothing_installed(box, result, 1)
                self.assertIn("'%s' must be GNU" % command, result.stderr)

    def test_bad_configuration_exits_1_with_one_line(self):
        box = self.box("ftp://example.org")
        result = box.run()
        self.assert_nothing_installed(box, result, 1)
        self.assertIn("not an http:// or https:// address", result.stderr)
        os.unlink(box.config)
        result = box.run()
        self.assert_status(result, 1)
        self.assertIn("OPQ_UPDATES_URL is not set", result.stderr)
        with open(box.config, "w") as config:
            config.write("{not json")
        self.assert_status(box.run(), 1)
        os.unlink(box.config)
        with open(box.version_file, "w") as version:
            version.write("not a version\n")
        result = box.run(OPQ_UPDATES_URL="http://127.0.0.1:1")
        self.assert_status(result, 1)
        self.assertIn("does not hold a VERSION", result.stderr)


class DashTests(BoxUpdaterCase):
    SHELL = ("dash",)


class BusyboxShTests(BoxUpdaterCase):
    SHELL = ("busybox", "sh")


del BoxUpdaterCase    # only its subclasses run


# The units, the scripts, rolling out with the old updater ------------------------------------

class BoxFilesTests(TempDirTestCase):

    def test_shellcheck_finds_nothing(self):
        shellcheck = require_binary("shellcheck")
        result = subprocess.run([shellcheck, "-s", "sh"] + SCRIPTS, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                universal_newlines=True)
        self.assertEqual(result.returncode, 0, result.stdout)

    def test_the_units_pass_systemd_analyze_verify(self):
        analyze = shutil.which("systemd-analyze")
        if analyze is None:
            self.skipTest("systemd-analyze is not installed (Debian: systemd), so the units are not verified")
        # verify wants ExecStart= to exist: the script where it lies in this checkout instead of /usr/local/bin
        for unit in ("opq-box-update.service", "opq-box-update.timer"):
            with open(os.path.join(BOX, unit)) as source, open(os.path.join(self.tmp, unit), "w") as copy:
                copy.write(source.read().replace("ExecStart=/usr/local/bin/opq-box-update", "ExecStart=" + UPDATER))
        result = subprocess.run([analyze, "verify", "--man=no", "opq-box-update.service", "opq-box-update.timer"],
                                cwd=self.tmp, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, universal_newlines=True)
        if re.search(r"Failed to (initialize|set up|setup|create) (the )?manager", result.stdout):
            self.skipTest("systemd-analyze cannot run here: " + result.stdout.strip().splitlines()[-1])
        self.assertEqual((result.returncode, result.stdout), (0, ""))

    def test_the_timer_spreads_daily_checks(self):
        with open(os.path.join(BOX, "opq-box-update.timer")) as timer:
            lines = set(timer.read().splitlines())
        self.assertTrue({"OnCalendar=daily", "RandomizedDelaySec=1h", "Persistent=true"} <= lines)
        with open(os.path.join(BOX, "opq-box-update.service")) as service:
            self.assertIn("Type=oneshot", service.read().splitlines())

    def test_the_old_updater_installs_the_new_one_from_an_update(self):
        """The first release through this server, fetched by today's updater.sh, installs the updater."""
        for command in ("wget", "tar", "bzip2"):
            require_binary(command)
        top = "opq-box-update-%d" % NEW
        installer = (b"#!/bin/sh\nset -e\ncat VERSION >\"$OPQ_INSTALL_ROOT/usr/local/box-config-daemon/VERSION\"\n"
                     b". ./box-updater/install_update.snippet.sh\n")
        members = box_members(NEW, installer=installer) + [dir_member(top + "/box-updater")]
        for name in ("opq-box-update", "opq-box-update.service", "opq-box-update.timer", "updater.sh",
                     "install_update.snippet.sh"):
            with open(os.path.join(BOX, name), "rb") as source:
                members.append(file_member(top + "/box-updater/" + name, source.read(), 0o755))
        members.append(file_member(top + "/box-updater/allowed_signers", b"# the fleet's keys\n"))
        make_update(self.updates, NEW, members, mtime=time.time() - 60)
        server = self.start_server()
        root = os.path.join(self.tmp, "root")
        os.makedirs(os.path.join(root, "usr", "local", "box-config-daemon", "updater"))
        old_updater = os.path.join(root, "usr", "local", "box-config-daemon", "updater", "updater.sh")
        with open(old_updater, "w") as old:   # today's updater.sh, as issue 21 quotes it (sudo and reboot left out)
            old.write('#!/bin/sh\ncd "$1"\nwget -q "$2/latest" -O update.tar.bz2\ntar xf update.tar.bz2\n'
                      'cd opq-box-update-*\n./install_update.sh\n')
        work = os.path.join(self.tmp, "old-updater")
        os.mkdir(work)
        result = subprocess.run(["dash" if shutil.which("dash") else "sh", old_updater, work, server.url("")],
                                env=dict(os.environ, OPQ_INSTALL_ROOT=root), stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, universal_newlines=True, timeout=60)
        self.assertEqual(result.returncode, 0, result.stdout)
        self.assertIn("the OPQ Box updater is installed", result.stdout)
        for path, source, mode in (("usr/local/bin/opq-box-update", "opq-box-update", 0o755),
                                   ("etc/systemd/system/opq-box-update.service", "opq-box-update.service", 0o644),
                                   ("etc/systemd/system/opq-box-update.timer", "opq-box-update.timer", 0o644),
                                   ("usr/local/box-config-daemon/updater/updater.sh", "updater.sh", 0o755)):
            with open(os.path.join(root, path), "rb") as installed, open(os.path.join(BOX, source), "rb") as shipped:
                self.assertEqual(installed.read(), shipped.read(), path)
            self.assertEqual(stat.S_IMODE(os.stat(os.path.join(root, path)).st_mode), mode, path)
        with open(os.path.join(root, "etc", "opq", "allowed_signers")) as signers:
            self.assertEqual(signers.read(), "# the fleet's keys\n")

        # the installed updater, on that box, then finds nothing to do
        box_env = dict(os.environ, OPQ_UPDATES_URL=server.url(""), OPQ_BOX_CONFIG=os.path.join(root, "none.json"),
                       OPQ_INSTALLED_VERSION_FILE=os.path.join(root, "usr/local/box-config-daemon/VERSION"),
                       OPQ_ALLOWED_SIGNERS=os.path.join(root, "none"), OPQ_STATE_DIR=os.path.join(root, "state"),
                       OPQ_REBOOT="false")
        result = subprocess.run([os.path.join(root, "usr/local/bin/opq-box-update")], env=box_env,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, universal_newlines=True, timeout=60)
        self.assertEqual(result.returncode, 0, result.stdout)
        self.assertIn("nothing to do", result.stdout)

    def test_a_failing_copy_fails_the_install(self):
        files = os.path.join(self.tmp, "box-updater")
        os.mkdir(files)
        shutil.copy(UPDATER, files)   # the units and updater.sh are missing
        script = os.path.join(self.tmp, "install_update.sh")
        with open(script, "w") as install:
            install.write(". %s\necho not reached\n" % os.path.join(BOX, "install_update.snippet.sh"))
        env = dict(os.environ, OPQ_BOX_UPDATER_FILES=files, OPQ_INSTALL_ROOT=os.path.join(self.tmp, "root"))
        result = subprocess.run(["sh", script], env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, universal_newlines=True)
        self.assertEqual(result.returncode, 1, result.stdout)
        self.assertIn("installing the OPQ Box updater failed", result.stdout)
        self.assertNotIn("not reached", result.stdout)


# With the staged rollout of issue 20 in the server --------------------------------------------

@unittest.skipUnless("rollout" in bus.Settings._fields, "needs the staged rollout of issue 20 in the server")
class RolloutTests(TempDirTestCase):
    """The updater's headers driving the server's rollout: the fleet view, the automatic halt, a fleet of 20."""

    def setUp(self):
        super().setUp()
        self.shell = [require_binary("dash")]
        require_binary("wget")
        self.state_dir = os.path.join(self.tmp, "state")
        os.mkdir(self.state_dir)
        self.policy = os.path.join(self.tmp, "rollout.json")
        self.boxes = {}

    def start_rollout(self, **policy):
        """The server with OLD, which every box has; then NEW, published once the rollout runs, so its clock
        starts when the server first offers it."""
        self.publish(OLD)
        with open(self.policy, "w") as file:
            json.dump(dict({"canaries": [], "canary_hours": 0, "waves_hours": 0}, **policy), file)
        self.server = self.start_server(rollout=self.policy, state_dir=self.state_dir)
        self.publish(NEW)
        self.assertTrue(wait_until(lambda: self.server.get("/version").body == str(NEW).encode(), 30))
        return self.server

    def box(self, box_id, installed=OLD):
        root = os.path.join(self.tmp, "box-" + box_id)
        box = FakeBox(root, self.shell, self.server.url(), box_id, installed)
        self.boxes[box_id] = box
        return box

    def fleet(self):
        answer = self.server.get("/fleet")
        self.assertEqual(answer.status, 200, answer.body)
        return json.loads(answer.body)

    def fleet_box(self, box_id):
        found = [entry for entry in self.fleet()["boxes"] if entry.get("id") == box_id or entry.get("box") == box_id]
        self.assertEqual(len(found), 1, self.fleet())
        return found[0]

    def test_the_fleet_view_shows_a_box_installed(self):
        self.start_rollout()
        box = self.box("1001")
        self.assertEqual(box.run().returncode, 0)
        self.assertEqual((box.installed_version(), box.reboots()), (NEW, 1))
        self.assertEqual(box.run().returncode, 0)    # after the reboot it checks in with the new VERSION
        entry = self.fleet_box("1001")
        self.assertEqual((entry["state"], entry["reported_version"], entry["offered"], entry["downloaded"]),
                         ("installed", NEW, NAME, True))

    def test_one_failed_install_halts_the_rollout_for_the_next_box(self):
        self.start_rollout(halt_after_failures=1)
        first = self.box("1001")
        result = first.run(FAKE_INSTALL_FAIL="1")
        self.assertEqual(result.returncode, 3, result.stderr)
        self.assertTrue(wait_until(lambda: self.fleet()["rollout"]["halted"], 30), self.fleet())
        self.assertEqual(self.fleet_box("1001")["state"], "failed")
        self.assertGreaterEqual(self.fleet()["rollout"]["failures"], 1)
        second = self.box("1002")
        result = second.run()
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertEqual((second.installed_version(), second.installs(), second.reboots()), (OLD, [], 0))
        self.assertEqual(len(self.server.access_lines('"GET /update/%s"' % NAME)), 1, "only the first box")

    @heavy
    def test_a_fleet_of_20_canaries_first_then_waves_and_a_failing_canary_halts_the_rest(self):
        # One pass over the fleet takes a few seconds (each box runs the real script): the canaries' window
        # is long enough for a whole pass on a loaded machine.
        canary_seconds, wave_seconds = 20.0, 10.0
        ids = [str(2001 + number) for number in range(20)]
        started = time.monotonic()
        self.start_rollout(canaries=ids[:2], canary_hours=canary_seconds / 3600, waves_hours=wave_seconds / 3600,
                           halt_after_failures=1)
        for box_id in ids:
            self.box(box_id)

        def run_fleet(version, **env):
            """Run the updater on every box that does not have version yet; the boxes that have it."""
            for box_id in ids:
                box = self.boxes[box_id]
                if box.installed_version() < version:
                    result = box.run(**env)
                    self.assertIn(result.returncode, (0, 3), result.stderr)
            return {box_id for box_id in ids if self.boxes[box_id].installed_version() >= version}

        first = run_fleet(NEW)
        self.assertLess(time.monotonic() - started, canary_seconds, "a pass over the fleet outlasted the canaries")
        self.assertEqual(first, set(ids[:2]), "only the canaries at first")
        self.assertFalse(self.fleet()["rollout"]["canaries_done"])
        counts, have = [], first
        while len(have) < len(ids) and time.monotonic() - started < canary_seconds + wave_seconds + 120:
            time.sleep(0.5)
            now = run_fleet(NEW)
            self.assertTrue(have <= now, "no box goes back")
            have = now
            counts.append(len(now))
        self.assertEqual(have, set(ids), "the waves reached every box")
        self.assertTrue(any(2 < count < len(ids) for count in counts), "in waves, not all at once: %s" % counts)
        for box_id in ids:
            self.boxes[box_id].run()    # each checks in with the new VERSION
        self.assertEqual({entry["state"] for entry in self.fleet()["boxes"]}, {"installed"})

        # the next release: its first canary fails, the rollout halts, and after the whole window no other box
        # has been offered it
        newer = NEW + 100
        self.publish(newer)
        self.assertTrue(wait_until(lambda: self.server.get("/version").body == str(newer).encode(), 30))
        failing = self.boxes[ids[0]]
        self.assertEqual(failing.run(FAKE_INSTALL_FAIL="1").returncode, 3)
        self.assertTrue(wait_until(lambda: self.fleet()["rollout"]["halted"], 30), self.fleet())
        time.sleep(canary_seconds + wave_seconds)
        self.assertEqual(run_fleet(newer), set())
        self.assertEqual(len(self.server.access_lines('"GET /update/opq-box-update-%d.tar.bz2"' % newer)), 1)
        self.assertTrue(self.fleet()["rollout"]["halted"])

    def publish(self, version):
        make_update(self.updates, version, box_members(version), mtime=time.time() - 60)


if __name__ == "__main__":
    unittest.main()
