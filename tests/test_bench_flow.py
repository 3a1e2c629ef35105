"""
The flow-control benchmark's quick mode (C{python bench/flow.py --quick})
keeps working: simulated replicas, real proxy processes and their embedded
Redis, nothing to install.
"""

import json
import os
import subprocess
import sys

from twisted.trial.unittest import SynchronousTestCase

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class FlowBenchQuickTests(SynchronousTestCase):
    """
    Tests for C{bench/flow.py --quick}.
    """

    def test_quick_run_measures_every_part(self):
        """
        The quick run exits 0 and writes C{flow.json} with the capacity,
        both ramp runs (flow control off and on), the fair-share run and
        the CPU rounds, and C{FLOW.md} with the targets table.  What holds
        whatever the machine's speed is asserted too: with flow control on
        no replica's waiting queue passed C{max_waiting} + 1; in both runs
        no call was lost and each key's books balance (client, call log
        and Redis spend agree, shed calls cost nothing).
        """
        out = os.path.abspath(self.mktemp())
        done = subprocess.run(
            [sys.executable, os.path.join(ROOT, "bench", "flow.py"), "--quick", "--out", out],
            cwd=ROOT, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=180,
        )
        self.assertEqual(done.returncode, 0, done.stdout[-4000:] + done.stderr[-4000:])
        with open(os.path.join(out, "flow.json")) as f:
            results = json.load(f)
        self.assertEqual(results["mode"], "quick")
        self.assertGreater(results["capacity"]["measured_batch_calls_per_s"], 0)
        limit = results["settings"]["router"]["max_waiting"] + 1
        for name in ("off", "on"):
            run = results["ramp"][name]
            self.assertEqual(set(run["per_key"]), {"interactive", "batch"})
            self.assertGreater(run["samples"], 0)
            self.assertIsNotNone(run["per_key"]["interactive"]["ttft_p99_s"])
            for kind, entry in run["per_key"].items():
                self.assertEqual(entry["lost"], 0, (name, kind))
                self.assertEqual(entry["answered"] + entry["shed"], entry["offered"], (name, kind))
            for kind, books in run["accounting"].items():
                self.assertTrue(books["ok"], (name, kind, books))
        self.assertLessEqual(results["ramp"]["on"]["summary"]["max_waiting"], limit)
        fair = results["fairness"]
        self.assertEqual(set(fair["tokens"]), {"heavy", "light"})
        self.assertGreater(min(fair["tokens"].values()), 0)
        self.assertIsNotNone(fair["jain_index"])
        cpu = results["cpu"]
        self.assertEqual(len(cpu["cpu_us_per_call"]["on"]), cpu["rounds"])
        self.assertEqual(cpu["failed"], {"on": 0, "off": 0})
        with open(os.path.join(out, "FLOW.md")) as f:
            markdown = f.read()
        self.assertIn("## Targets", markdown)
        self.assertIn("interactive TTFT p99", markdown)
        self.assertIn("Jain's index", markdown)
