"""A smoke test of the benchmark harness (tiny sizes), so it cannot rot. It asserts no speed."""

import os
import re
import subprocess
import tempfile
import unittest

from support import ROOT, python_executable, require_binary


class BenchSmokeTest(unittest.TestCase):

    def test_quick_run_produces_every_table_and_target(self):
        require_binary("wrk")
        require_binary("curl")
        with tempfile.TemporaryDirectory() as tmp:
            output = os.path.join(tmp, "bench.md")
            finished = subprocess.run([python_executable(), os.path.join(ROOT, "bench", "run.py"), "--quick",
                                       "--no-nginx", "--output", output], stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, timeout=300)
            self.assertEqual(finished.returncode, 0, finished.stdout.decode()[-3000:])
            with open(output) as report:
                markdown = report.read()
        for heading in ["Requests per second", "Large download", "Peak RSS", "latency while", "Cost growth",
                        "Targets"]:
            self.assertIn(heading, markdown)
        self.assertRegex(markdown, r"\| / \| 1 \| \d+ \| \d+ \| \d+ \([\d.]+\) \| \d+ \([\d.]+\) \|")
        verdicts = re.findall(r"\| (met|NOT met) \|", markdown)
        self.assertEqual(len(verdicts), 7, markdown)
        self.assertIn("nginx skipped", markdown)


if __name__ == "__main__":
    unittest.main()
