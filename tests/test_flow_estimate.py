"""
Saturation between samples: the router judges vLLM's waiting queue as the
last sample left it plus this process's calls since
(L{dheera_tx.routing.signals.estimated_waiting}), so a burst arriving
between two samples cannot pass C{max_waiting} many times over.  Unit tests
on an injected clock; end to end through the proxy on simulated replicas.
"""

import json

from twisted.internet.defer import ensureDeferred
from twisted.internet.task import Clock, LoopingCall
from twisted.trial.unittest import SynchronousTestCase

from dheera_tx.config import config_from_dict
from dheera_tx.routing.router import Router
from dheera_tx.routing.signals import LoadSample, estimated_waiting
from tests.passthrough_harness import ProxyTestCase, sim_fleet
from tests.scripted_upstream import sleep
from tests.sim_vllm import SimSettings


def metrics(running: int, waiting: int) -> bytes:
    return (b'vllm:num_requests_running{engine="0",model_name="q"} %d.0\n'
            b'vllm:num_requests_waiting{engine="0",model_name="q"} %d.0\n' % (running, waiting))


class EstimatedWaitingTests(SynchronousTestCase):
    """
    Tests for L{estimated_waiting} and L{Router.saturated} with samples.
    """

    def test_estimate(self):
        """
        Calls started since the sample add to the waiting queue beyond the
        replica's slots, calls ended take from it, and it is never below 0.
        """
        full = LoadSample(0, running=4, waiting=2, in_flight_at_sample=6)
        self.assertEqual(estimated_waiting(full, 6, 4), 2.0)
        self.assertEqual(estimated_waiting(full, 9, 4), 5.0)
        self.assertEqual(estimated_waiting(full, 3, 4), 0.0)
        room = LoadSample(0, running=1, waiting=0, in_flight_at_sample=1)
        # Three free slots take three calls before anything waits.
        self.assertEqual(estimated_waiting(room, 4, 4), 0.0)
        self.assertEqual(estimated_waiting(room, 6, 4), 2.0)
        # Slots never seen full: the sample's running requests are the bound.
        self.assertEqual(estimated_waiting(room, 3, 0), 2.0)

    def setUp(self):
        self.clock = Clock()
        config = config_from_dict({
            "model_list": [{"model_name": "m", "dheera_ai_params": {"model": "hosted_vllm/q", "api_base": f"http://10.0.0.{i}:8000"}}
                           for i in range(2)],
            "router_settings": {"max_waiting": 2, "metrics_interval": 1},
        })
        self.router = Router(config, now=self.clock.seconds)
        self.replica = config.replicas("m")[0]

    def test_calls_since_the_sample_saturate(self):
        """
        A sample of a full replica with room in its waiting queue: the calls
        this process sends after it fill that room and saturate the
        replica before the next sample; one ending frees it again.
        """
        self.router.record_metrics(self.replica, metrics(4, 0), self.clock.seconds())
        self.assertFalse(self.router.saturated(self.replica))
        self.router.started(self.replica)
        self.assertFalse(self.router.saturated(self.replica))
        self.router.started(self.replica)
        self.assertTrue(self.router.saturated(self.replica))
        self.router.finished(self.replica)
        self.assertFalse(self.router.saturated(self.replica))

    def test_slots_learned_from_samples(self):
        """
        The replica's slots are the most requests a sample showed running:
        once a sample showed 4 running, a later sample with 1 running leaves
        room for 3 more calls plus the waiting limit.
        """
        self.router.record_metrics(self.replica, metrics(4, 1), self.clock.seconds())
        self.clock.advance(1)
        self.router.record_metrics(self.replica, metrics(1, 0), self.clock.seconds())
        for _ in range(4):
            self.assertFalse(self.router.saturated(self.replica))
            self.router.started(self.replica)
        self.assertFalse(self.router.saturated(self.replica))
        self.router.started(self.replica)
        self.assertTrue(self.router.saturated(self.replica))

    def test_stale_sample_judges_nothing(self):
        """
        A stale sample's queue, estimated or not, saturates nothing.
        """
        self.router.record_metrics(self.replica, metrics(4, 9), self.clock.seconds())
        self.assertTrue(self.router.saturated(self.replica))
        self.clock.advance(10)
        self.assertFalse(self.router.saturated(self.replica))


class BurstTests(ProxyTestCase):
    """
    A burst through the proxy to two simulated replicas.
    """

    timeout = 60

    async def test_burst_holds_the_waiting_limit(self):
        """
        Twenty concurrent calls to two replicas of one sequence slot each,
        C{max_waiting} 1, samples every 0.5 s (the burst arrives between
        two): vLLM's waiting queue, read on every 5 ms, never passes
        C{max_waiting} + 1 on either replica; the rest wait in the gateway
        queue, and every call is served.
        """
        fleet = sim_fleet(self, "chat", 2, SimSettings(model="sim", max_num_seqs=1, decode_interval=0.005))
        replicas = [(replica, url) for replica, url, _ in fleet]
        self.proxy([entry for _, _, entry in fleet],
                   router={"max_waiting": 1, "metrics_interval": 0.5, "routing_strategy": "least-busy"})
        self.gateway.scraper.start()
        self.addCleanup(self.gateway.scraper.stop)
        router = self.gateway.router
        while not all(router.fresh_sample(d) for d in self.config.replicas("chat")):
            await sleep(0.01)
        seen = []
        watch = LoopingCall(lambda: seen.append(max(len(r.engine.waiting) for r, _ in replicas)))
        watch.start(0.005)
        self.addCleanup(lambda: watch.running and watch.stop())
        flow = self.gateway.passthrough.flow
        queued = []
        calls = [ensureDeferred(self.chat(model="chat", max_tokens=4)) for _ in range(20)]
        while not all(call.called for call in calls):
            queued.append(sum(flow.depths().values()))
            await sleep(0.005)
        for call in calls:
            response, body = await call
            self.assertEqual(response.code, 200, body)
            self.assertEqual(len(json.loads(body)["choices"]), 1)
        self.assertLessEqual(max(seen), 2, seen)
        self.assertGreater(max(queued), 0)
