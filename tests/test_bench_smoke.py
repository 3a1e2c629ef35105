"""
The benchmark suite's smoke mode (C{python bench/run.py --smoke}) keeps
working: it needs C{wrk} and C{nginx} on C{PATH} (C{apt-get install wrk
nginx}) and skips itself without them.
"""

import json
import os
import shutil
import subprocess
import sys

from twisted.trial.unittest import SynchronousTestCase

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MISSING = [command for command in ("wrk", "nginx") if shutil.which(command) is None]
TARGETS = {"direct", "nginx", "dheera-master", "dheera-vkey", "dheera-vkey-w2"}


class BenchSmokeTests(SynchronousTestCase):
    """
    Tests for C{bench/run.py --smoke}.
    """

    if MISSING:
        skip = f"the benchmark smoke run needs {' and '.join(MISSING)} on PATH (apt-get install wrk nginx)"

    def test_smoke_run_measures_every_target(self):
        """
        The smoke run exits 0 and writes C{results.json} with requests at
        c=1, 32 and 128, three SSE runs and both transfers measured for
        every target, and C{RESULTS.md} with the issue's targets table.
        """
        out = os.path.abspath(self.mktemp())
        done = subprocess.run(
            [sys.executable, os.path.join(ROOT, "bench", "run.py"), "--smoke", "--out", out],
            cwd=ROOT,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=300,
        )
        self.assertEqual(done.returncode, 0, done.stdout[-4000:] + done.stderr[-4000:])
        with open(os.path.join(out, "results.json")) as f:
            results = json.load(f)
        self.assertEqual(results["mode"], "smoke")
        self.assertEqual(set(results["requests"]), TARGETS)
        for key, entry in results["requests"].items():
            for run in ("c1", "c32", "c128"):
                self.assertGreater(entry[run]["requests"], 0, f"{key} {run}")
                self.assertGreater(entry[run]["latency_us"]["p50"], 0, f"{key} {run}")
        self.assertEqual(set(results["streams"]), TARGETS)
        for key, entry in results["streams"].items():
            for run in ("sse_small", "sse_large", "sse_saturate"):
                self.assertGreater(entry[run]["content_chunks"], 0, f"{key} {run}")
                self.assertIsNotNone(entry[run]["chunk_delay_ms"]["p99"], f"{key} {run}")
        self.assertEqual(set(results["transfers"]), {"direct", "nginx", "dheera-vkey"})
        for key, entry in results["transfers"].items():
            self.assertTrue(entry["upload"]["ok"], f"{key} upload: {entry['upload']}")
            self.assertTrue(entry["download"]["ok"], f"{key} download: {entry['download']}")
        with open(os.path.join(out, "RESULTS.md")) as f:
            markdown = f.read()
        self.assertIn("## Issue 6 targets", markdown)
        self.assertIn("dheera_tx virtual key + metering (1 worker)", markdown)
