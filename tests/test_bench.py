"""A smoke test of the benchmark harness (tiny sizes), so it cannot rot. It asserts no speed."""

import importlib.util
import os
import re
import shutil
import subprocess
import tempfile
import unittest

from support import ROOT, heavy, python_executable, require_binary

HARNESS = os.path.join(ROOT, "bench", "run.py")
ARGUMENTS = ["--quick", "--no-nginx"]


def load_harness():
    """bench/run.py as a module, for its list of targets."""
    spec = importlib.util.spec_from_file_location("bench_run", HARNESS)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class BenchSmokeTest(unittest.TestCase):

    @heavy
    def test_quick_run_produces_every_table_and_target(self):
        require_binary("wrk")
        require_binary("curl")
        harness = load_harness()
        planned = harness.targets(harness.parse_options(ARGUMENTS))
        with tempfile.TemporaryDirectory() as tmp:
            output = os.path.join(tmp, "bench.md")
            finished = subprocess.run([python_executable(), HARNESS] + ARGUMENTS + ["--output", output],
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=300)
            self.assertEqual(finished.returncode, 0, finished.stdout.decode()[-3000:])
            with open(output) as report:
                markdown = report.read()
        headings = ["Small routes, access log on", "Cost of metrics", "Access log: one line per request",
                    "1 MiB downloads", "keep-alive connections on `/latest`", "Memory per open connection",
                    "Large download", "Peak RSS", "latency while", "Cost growth", "Targets"]
        if shutil.which("ssh-keygen"):
            headings += ["Signature verification", "Checking a signed"]
        if shutil.which("ab"):
            headings.append("boxes at once")
        for heading in headings:
            self.assertRegex(markdown, r"(?m)^### .*" + re.escape(heading), heading)
        self.assertRegex(markdown, r"\| / \| 1 \| \d+ \| \d+ \| \d+ \([\d.]+\) \| \d+ \([\d.]+\) \|")

        # every target the harness lists, in its order, each with a verdict; the only skips are explained
        targets_table = markdown.split("### Targets", 1)[1]
        rows = re.findall(r"(?m)^\| (.+) \| (.+) \| (met|NOT met|skipped|not measured) \|$", targets_table)
        self.assertEqual([text for text, _, _ in rows], [text for _, text in planned], markdown)
        self.assertGreaterEqual(len(planned), 14)
        skipped = {text for text, _, verdict in rows if verdict == "skipped"}
        allowed = {text for key, text in planned
                   if key == "1 MiB nginx" or (key == "signed archive" and not shutil.which("ssh-keygen"))
                   or (key == "fleet burst" and not shutil.which("ab"))}
        self.assertLessEqual(skipped, allowed, markdown)
        self.assertNotIn("not measured", [verdict for _, _, verdict in rows])
        self.assertIn("nginx skipped", markdown)


if __name__ == "__main__":
    unittest.main()
