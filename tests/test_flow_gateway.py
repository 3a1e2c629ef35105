"""
Flow control end to end: the proxy over a fake vLLM on loopback sockets,
with a deployment's C{max_parallel_requests}, the gateway queue's bounds,
and vLLM's C{priority} body field stripped or forwarded.
"""

import json

import treq
from twisted.internet import reactor
from twisted.internet.defer import ensureDeferred

from tests.passthrough_harness import ProxyTestCase, deployment, error_of, sim_fleet
from tests.scripted_upstream import sleep
from tests.sim_vllm import SimSettings
from tests.waiting import wait_until


class FlowGatewayTests(ProxyTestCase):
    """
    Calls through the proxy to a deployment with a parallel cap of 1.
    """

    async def start(self, router=None, **params):
        self.upstream = await self.fake()
        params.setdefault("max_parallel_requests", 1)
        self.proxy([deployment("alpha", "tiny", self.upstream, **params)], router=router)

    async def test_second_call_waits_for_the_first(self):
        """
        Two concurrent calls, cap 1: the second reaches vLLM only after the
        first has ended, then is served; its wait shows in C{/metrics}.
        """
        await self.start()
        first = ensureDeferred(self.chat(headers={"x-fake-fault": "slow_first_byte=0.5"}))
        await self.upstream.wait_for_requests(1)
        second = ensureDeferred(self.chat())
        await sleep(0.2)
        self.assertEqual(len(self.upstream.received), 1)
        response, _ = await first
        self.assertEqual(response.code, 200)
        first_done = reactor.seconds()
        response, body = await second
        self.assertEqual(response.code, 200, body)
        self.assertEqual(len(self.upstream.received), 2)
        self.assertGreaterEqual(self.upstream.received[1].body_done_at or 0, first_done - 0.05)
        _, metrics = await self.request(b"GET", "/metrics")
        self.assertIn(b'dheera_queue_wait_seconds_count{model="alpha",priority="0"} 1.0', metrics)

    async def test_queue_full_429_nothing_reaches_vllm(self):
        """
        With C{max_queue: 0}, a call finding the replica at its cap is
        refused with 429, C{Retry-After} and the OpenAI error shape, and
        vLLM never sees it.
        """
        await self.start(router={"max_queue": 0})
        first = ensureDeferred(self.chat(headers={"x-fake-fault": "slow_first_byte=0.3"}))
        await self.upstream.wait_for_requests(1)
        response, body = await self.chat()
        self.assertEqual(response.code, 429)
        self.assertTrue(response.headers.getRawHeaders(b"retry-after"))
        self.assertEqual(error_of(body)["code"], "queue_full")
        (await first)
        self.assertEqual(len(self.upstream.received), 1)
        _, metrics = await self.request(b"GET", "/metrics")
        self.assertIn(b'dheera_queue_shed_total{model="alpha",reason="queue_full"} 1.0', metrics)

    async def test_queue_wait_429(self):
        """
        A queued call still waiting after C{max_queue_wait} gets 429 with
        C{Retry-After} and never reaches vLLM.
        """
        await self.start(router={"max_queue_wait": 0.2})
        first = ensureDeferred(self.chat(headers={"x-fake-fault": "slow_first_byte=0.6"}))
        await self.upstream.wait_for_requests(1)
        response, body = await self.chat()
        self.assertEqual(response.code, 429)
        self.assertEqual(error_of(body)["code"], "queue_timeout")
        self.assertTrue(response.headers.getRawHeaders(b"retry-after"))
        (await first)
        self.assertEqual(len(self.upstream.received), 1)

    async def test_client_priority_stripped(self):
        """
        Without C{forward_priority}, a client's C{priority} body field is
        removed before the call reaches vLLM; a body without one is sent
        byte for byte.
        """
        await self.start(max_parallel_requests=None)
        response, _ = await self.chat(priority=-100)
        self.assertEqual(response.code, 200)
        self.assertNotIn("priority", self.upstream.received[0].json)
        response, _ = await self.chat()
        self.assertEqual(response.code, 200)
        self.assertNotIn(b"priority", self.upstream.received[1].body)

    async def test_priority_forwarded(self):
        """
        With C{forward_priority: true}, the master key's C{priority} reaches
        vLLM (a virtual key's own priority replaces a client's: see
        L{tests.test_flow.PriorityFieldTests}).
        """
        await self.start(max_parallel_requests=None, forward_priority=True)
        response, _ = await self.chat(priority=3)
        self.assertEqual(response.code, 200)
        self.assertEqual(self.upstream.received[0].json["priority"], 3)

    async def test_health_shows_saturation(self):
        """
        C{/health} tells each deployment's saturation.
        """
        await self.start()
        self.addCleanup(self.gateway.prober.stop)
        first = ensureDeferred(self.chat(headers={"x-fake-fault": "slow_first_byte=0.3"}))
        await self.upstream.wait_for_requests(1)
        response, body = await self.request(b"GET", "/health", {"authorization": "Bearer sk-test-master-key-0123456789"})
        self.assertIn('"saturated": true', json.dumps(json.loads(body)))
        await first

    async def test_client_leaving_frees_its_place(self):
        """
        A client that disconnects while its call is queued frees its place
        at once (queue depth 0, well before C{max_queue_wait}); its call
        never reaches vLLM and is recorded unbilled, as a client
        disconnect, with the time it waited.
        """
        await self.start()
        records = []
        emit = self.gateway.passthrough._on_call_end
        self.gateway.passthrough._on_call_end = lambda call: (records.append(call), emit(call))
        first = ensureDeferred(self.chat(headers={"x-fake-fault": "slow_first_byte=0.6"}))
        await self.upstream.wait_for_requests(1)
        client = await self.raw_connect()
        body = json.dumps({"model": "alpha", "messages": [{"role": "user", "content": "hi"}]}).encode()
        client.transport.write(
            b"POST /vllm/v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer sk-test-master-key-0123456789\r\n"
            b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
        )
        flow = self.gateway.passthrough.flow
        while not flow.depths():
            await sleep(0.01)
        await sleep(0.1)
        client.transport.abortConnection()
        await wait_until(lambda: flow.depths() == {} and any(r.error == "client_disconnected" for r in records), timeout=10)
        left = [r for r in records if r.error == "client_disconnected"]
        self.assertEqual(len(left), 1)
        self.assertIsNone(left[0].deployment)
        self.assertEqual(left[0].cost_nanos, 0)
        self.assertGreaterEqual(left[0].queued_ms, 100.0)
        response, _ = await first
        self.assertEqual(response.code, 200)
        self.assertEqual(len(self.upstream.received), 1)

    async def test_cap_holds_with_a_queue(self):
        """
        Four concurrent calls, cap 1: vLLM sees them one at a time (each
        queued call takes the replica as it leaves the queue, before the
        next is considered), and all are served.
        """
        await self.start()
        running = []
        calls = [ensureDeferred(self.chat(headers={"x-fake-fault": "slow_first_byte=0.15"})) for _ in range(4)]
        while not all(call.called for call in calls):
            running.append(self.upstream.requests_running)
            await sleep(0.01)
        for call in calls:
            response, _ = await call
            self.assertEqual(response.code, 200)
        self.assertEqual(len(self.upstream.received), 4)
        self.assertLessEqual(max(running), 1)


class SampledSaturationTests(ProxyTestCase):
    """
    Saturation read from scraped C{/metrics}: two simulated replicas
    (L{tests.sim_vllm}) each running one sequence with one more waiting.
    """

    timeout = 60

    async def test_call_waits_for_a_sample_with_room(self):
        """
        With both replicas' waiting queues at C{max_waiting} (traffic sent
        to them directly), a call through the proxy waits in the gateway
        and reaches a replica only once a sample shows room; it is then
        served.
        """
        fleet = sim_fleet(self, "chat", 2, SimSettings(model="sim", max_num_seqs=1, decode_interval=0.005))
        replicas = [(replica, url) for replica, url, _ in fleet]
        self.proxy([entry for _, _, entry in fleet],
                   router={"max_waiting": 1, "metrics_interval": 0.1, "routing_strategy": "load-aware"})
        self.gateway.scraper.start()
        self.addCleanup(self.gateway.scraper.stop)
        hog = json.dumps({"model": "sim", "prompt": "x", "max_tokens": 100}).encode()
        hogs = [treq.post(url + "/v1/completions", hog, persistent=False) for _, url in replicas for _ in range(2)]
        router = self.gateway.router
        deadline = reactor.seconds() + 10
        while not all(router.saturated(d) for d in self.config.replicas("chat")):
            self.assertLess(reactor.seconds(), deadline, "replicas never seen saturated")
            await sleep(0.02)
        flow = self.gateway.passthrough.flow
        call = ensureDeferred(self.chat(model="chat", max_tokens=2))
        while not flow.depths():
            self.assertFalse(call.called, "the call was not queued")
            await sleep(0.01)
        response, body = await call
        self.assertEqual(response.code, 200, body)
        self.assertEqual(flow.depths(), {})
        for d in hogs:
            await (await d).content()
