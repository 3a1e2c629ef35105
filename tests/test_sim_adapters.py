"""
Tests for the simulated replica's LoRA slots and sleep mode
(L{tests.sim_adapters} in L{tests.sim_vllm}), in simulated time, and that
the proxy's parser reads what it exports.
"""

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from dheera_tx.routing.signals import parse_metrics
from tests.sim_adapters import sleep_engine, wake_engine
from tests.sim_vllm import SimEngine, SimSettings

SETTINGS = SimSettings(max_num_seqs=8, max_lora=2, lora_adapters=("a", "b", "c"), lora_load_time=0.5,
                       decode_interval=0.01, prefill_per_token=0.0, prefill_overhead=0.001)


def advance(clock: Clock, seconds: float, step: float = 0.001) -> None:
    """
    Advance C{clock} in small steps, so that chained timers run in order
    (one C{advance} moves the clock first, then runs what was due).
    """
    for _ in range(int(round(seconds / step))):
        clock.advance(step)


class LoraSlotTests(SynchronousTestCase):
    """
    Adapters in C{max_lora} slots.
    """

    def setUp(self):
        self.clock = Clock()
        self.clock.advance(1000)
        self.engine = SimEngine(self.clock, SETTINGS)
        self.done = []

    def submit(self, adapter, tokens=10):
        return self.engine.submit("hello", tokens, lambda t: None, self.done.append, adapter)

    def run_until_idle(self):
        while self.engine.running or self.engine.waiting:
            advance(self.clock, 0.01)

    def test_load_costs_time_and_is_counted(self):
        """
        A request for an unloaded adapter waits for its load (the load
        time), counted once; the next request for it runs at once.
        """
        first = self.submit("a", tokens=1)
        self.assertEqual(self.engine.loras.loads_total, 1)
        advance(self.clock, 0.4)
        self.assertEqual(first.generated, 0)
        advance(self.clock, 0.2)
        self.run_until_idle()
        self.assertEqual(first.generated, 1)
        self.submit("a", tokens=1)
        self.run_until_idle()
        self.assertEqual(self.engine.loras.loads_total, 1)

    def test_full_slots_wait_and_evict_lru(self):
        """
        With both slots busy a third adapter waits (base requests behind it
        run); when a slot's adapter goes idle, the least recently used idle
        one is evicted and the third loads.
        """
        a = self.submit("a", tokens=200)
        b = self.submit("b", tokens=5)
        c = self.submit("c", tokens=1)
        base = self.submit(None, tokens=1)
        advance(self.clock, 1.2)
        self.assertEqual(base.generated, 1)
        self.assertEqual(c.generated, 0)
        self.assertIn(c, self.engine.waiting)
        self.run_until_idle()
        self.assertEqual((a.generated, b.generated, c.generated), (200, 5, 1))
        self.assertEqual(self.engine.loras.loads_total, 3)
        self.assertEqual(set(self.engine.loras.slots), {"a", "c"})

    def test_metrics_as_vllm_exports_them(self):
        """
        C{vllm:lora_requests_info} keeps every label set seen, valued by
        time, and the proxy's parser reads the newest: running C{a,b},
        waiting C{c}; the simulator's load counter is exported.
        """
        self.submit("a", tokens=1)
        self.run_until_idle()
        advance(self.clock, 1)
        self.submit("a", tokens=1000)
        self.submit("b", tokens=1000)
        self.submit("c", tokens=1000)
        advance(self.clock, 1.5)
        text = self.engine.metrics_text()
        self.assertGreater(text.count(b"vllm:lora_requests_info{"), 2)
        self.assertIn(b"dheera_sim:lora_loads_total 2.0", text)
        sample = parse_metrics(text, 0)
        self.assertEqual((sample.running_loras, sample.waiting_loras, sample.max_lora), ("a,b", "c", 2))


class SleepTests(SynchronousTestCase):
    """
    vLLM's sleep mode in the simulated engine.
    """

    def setUp(self):
        self.clock = Clock()
        self.engine = SimEngine(self.clock, SETTINGS)

    def test_requests_wait_while_asleep(self):
        """
        A request sent while asleep waits until a full wake-up; a partial
        one (C{tags=weights} after level 1) leaves it asleep; the gauge says
        C{awake} 0 meanwhile.
        """
        sleep_engine(self.engine, 1, "abort")
        seq = self.engine.submit("hi", 1, lambda t: None, lambda s: None)
        advance(self.clock, 5)
        self.assertEqual(seq.generated, 0)
        self.assertTrue(parse_metrics(self.engine.metrics_text(), 0).asleep)
        self.assertFalse(wake_engine(self.engine, ["weights"]))
        advance(self.clock, 5)
        self.assertEqual(seq.generated, 0)
        self.assertTrue(wake_engine(self.engine, ["kv_cache"]))
        advance(self.clock, 1)
        self.assertEqual(seq.generated, 1)
        self.assertIs(parse_metrics(self.engine.metrics_text(), 0).asleep, False)

    def test_abort_ends_running_requests(self):
        """
        C{/sleep} in vLLM's default C{abort} mode ends the requests running
        and waiting.
        """
        ended = []
        running = self.engine.submit("hi", 1000, lambda t: None, ended.append)
        advance(self.clock, 0.1)
        sleep_engine(self.engine, 1, "abort")
        advance(self.clock, 0.1)
        self.assertEqual(ended, [running])
        self.assertLess(running.generated, 1000)

    def test_no_gauge_when_off(self):
        """
        With C{sleep_metric} off (older vLLM) the gauge is not exported.
        """
        engine = SimEngine(self.clock, SimSettings(sleep_metric=False))
        self.assertNotIn(b"vllm:engine_sleep_state", engine.metrics_text())
        self.assertIsNone(parse_metrics(engine.metrics_text(), 0).asleep)
