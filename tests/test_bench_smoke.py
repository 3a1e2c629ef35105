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
        The smoke run exits 0 and writes C{results.json} with the commit it
        measured and whether the tree was dirty, requests at c=1, 32 and
        128, the SSE runs (the 2-worker rate run offered twice the streams)
        and both transfers measured for every target, and C{RESULTS.md}
        with the issue's targets table naming the commit.
        """
        head = subprocess.run(["git", "-C", ROOT, "rev-parse", "HEAD"], capture_output=True, text=True)
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
        if head.returncode == 0:
            self.assertEqual(results["source"]["commit"], head.stdout.strip())
            self.assertIsInstance(results["source"]["dirty"], bool)
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
        streams = {key: entry["sse_rate"]["streams"] for key, entry in results["streams"].items()}
        self.assertEqual(streams["dheera-vkey-w2"], 2 * streams["dheera-vkey"], streams)
        self.assertEqual(set(results["transfers"]), {"direct", "nginx", "dheera-vkey"})
        for key, entry in results["transfers"].items():
            self.assertTrue(entry["upload"]["ok"], f"{key} upload: {entry['upload']}")
            self.assertTrue(entry["download"]["ok"], f"{key} download: {entry['download']}")
        with open(os.path.join(out, "RESULTS.md")) as f:
            markdown = f.read()
        self.assertIn("## Issue 6 targets", markdown)
        self.assertIn("dheera_tx virtual key + metering (1 worker)", markdown)
        if head.returncode == 0:
            self.assertIn(f"Commit {head.stdout.strip()}, tree ", markdown)


class MedianRunTests(SynchronousTestCase):
    """
    C{bench/run.py}'s choice among repeated 1,000-stream runs.
    """

    def setUp(self):
        sys.path.insert(0, os.path.join(ROOT, "bench"))
        self.addCleanup(sys.path.remove, os.path.join(ROOT, "bench"))
        import run

        self.median_run = run._median_run

    def _result(self, p99, ok=True, failed=0):
        return {"ok": ok, "failed": failed, "chunk_delay_ms": {"p99": p99}}

    def test_single_run_unchanged(self):
        """
        One run is reported as it is, without a list of runs.
        """
        only = self._result(4.0)
        self.assertIs(self.median_run([only]), only)

    def test_median_of_three_with_every_p99(self):
        """
        Of three runs the one with the middle delay p99 is reported, and all
        three p99s are listed in the order they ran.
        """
        chosen = self.median_run([self._result(30.0), self._result(5.0), self._result(12.0)])
        self.assertEqual(chosen["chunk_delay_ms"]["p99"], 12.0)
        self.assertEqual(chosen["runs_delay_p99_ms"], [30.0, 5.0, 12.0])

    def test_median_of_five_with_spread(self):
        """
        Of five runs the middle one is reported, with the lowest and highest
        p99 as the spread.
        """
        chosen = self.median_run([self._result(p) for p in (7.0, 3.0, 11.0, 5.0, 9.0)])
        self.assertEqual(chosen["chunk_delay_ms"]["p99"], 7.0)
        self.assertEqual(chosen["runs_delay_p99_spread_ms"], [3.0, 11.0])

    def test_failed_run_counts_as_worst(self):
        """
        A run with failed streams ranks as the worst whatever its p99, so
        the median is the worse of the two complete runs.
        """
        chosen = self.median_run([self._result(1.0, ok=False, failed=3), self._result(8.0), self._result(9.0)])
        self.assertEqual(chosen["chunk_delay_ms"]["p99"], 9.0)
        self.assertEqual(chosen["runs_delay_p99_ms"], [1.0, 8.0, 9.0])
        self.assertIsNone(chosen["runs_delay_p99_spread_ms"])
