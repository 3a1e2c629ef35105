"""
LoRA- and sleep-aware routing end to end: the proxy over simulated vLLM
replicas (L{tests.sim_vllm}) on real loopback sockets.
"""

import json

import treq
from twisted.internet import reactor
from twisted.internet.defer import ensureDeferred

from tests.passthrough_harness import ProxyTestCase, auth, error_of
from tests.sim_vllm import SimSettings, listen
from tests.waiting import sleep, wait_until

ADAPTERS = ("a", "b", "c", "d")
SIM = SimSettings(model="base", max_num_seqs=4, decode_interval=0.005, max_lora=2, lora_adapters=ADAPTERS,
                  lora_load_time=0.05)


class _At:
    """Something with a C{url}, for the model list."""

    def __init__(self, url: str):
        self.url = url


class FleetTestCase(ProxyTestCase):
    """
    A proxy over C{count} simulated replicas of model C{base}.
    """

    timeout = 60

    def fleet(self, count: int, settings: SimSettings = SIM, scrape: bool = False, **router):
        self.replicas = []
        for _ in range(count):
            replica, port = listen(reactor, settings)
            self.addCleanup(port.stopListening)
            self.addCleanup(self._close, replica)
            self.replicas.append((replica, "http://127.0.0.1:%d" % port.getHost().port))
        models = [{"model_name": "base", "dheera_ai_params": {
            "model": "hosted_vllm/base", "api_base": url, "lora_adapters": list(ADAPTERS)}} for _, url in self.replicas]
        self.proxy(models, router=dict({"metrics_interval": 0.1}, **router))
        if scrape:
            self.gateway.scraper.start()
            self.addCleanup(self.gateway.scraper.stop)
        self.deployments = self.config.replicas("base")

    async def _close(self, replica):
        for seq in list(replica.engine.running) + list(replica.engine.waiting):
            seq.cancelled = True
        replica.site.close_connections()
        await sleep(0.05)

    def index(self, response) -> int:
        """
        :return: which replica answered a call.
        """
        port = response.headers.getRawHeaders(b"x-sim-replica")[0].decode()
        return [url.endswith(":" + port) for _, url in self.replicas].index(True)

    async def operate(self, path: str):
        """
        :return: C{(response, document)} of an operator call through the
            proxy (master key, the model named in the query).
        """
        response, body = await self.request(b"POST", f"/vllm/{path}", auth())
        return response, json.loads(body)


class AdapterRoutingTests(FleetTestCase):
    """
    Adapter calls through the proxy.
    """

    async def test_calls_go_where_the_adapter_runs(self):
        """
        With adapter C{a} running on replica 1 (a long call sent to it
        directly, seen in its C{vllm:lora_requests_info}), every call for
        C{a} through the proxy goes to replica 1, and replica 0 never loads
        it.  (The calls are different conversations, which the default
        cache-aware strategy alone spreads over both replicas.)
        """
        self.fleet(2, scrape=True)
        long_call = json.dumps({"model": "a", "prompt": "x", "max_tokens": 2000}).encode()
        hog = treq.post(self.replicas[1][1] + "/v1/completions", long_call, persistent=False)
        router = self.gateway.router
        await wait_until(lambda: (router.fresh_sample(self.deployments[1]) is not None
                                  and "a" in router.fresh_sample(self.deployments[1]).adapters), timeout=10)
        for user in range(6):
            response, body = await self.chat(model="a", max_tokens=2, messages=[{"role": "user", "content": f"user {user}"}])
            self.assertEqual(response.code, 200, body)
            self.assertEqual(self.index(response), 1)
        self.assertEqual(self.replicas[0][0].engine.loras.loads_total, 0)
        self.assertEqual(self.replicas[1][0].engine.loras.loads_total, 1)
        for seq in self.replicas[1][0].engine.running:
            seq.cancelled = True
        await (await hog).content()


class SleepRoutingTests(FleetTestCase):
    """
    Sleeping replicas through the proxy.
    """

    async def test_sleep_through_the_proxy(self):
        """
        A replica put to sleep through the proxy (C{POST /vllm/sleep}) gets
        no calls at once (no scrape runs) until woken through the proxy
        (C{/wake_up}, routed to the sleeping replica), then takes calls
        again.
        """
        self.fleet(2, routing_strategy="least-busy")
        response, answer = await self.operate("sleep?level=1&model=base")
        self.assertEqual((response.code, answer), (200, {"status": "sleeping", "level": 1}))
        asleep = [i for i, (replica, _) in enumerate(self.replicas) if replica.engine.sleep.asleep]
        self.assertEqual(len(asleep), 1)
        awake = 1 - asleep[0]
        for _ in range(4):
            response, body = await self.chat(model="base", max_tokens=1)
            self.assertEqual(response.code, 200, body)
            self.assertEqual(self.index(response), awake)
        self.assertEqual(self.replicas[asleep[0]][0].engine.requests_total, 0)
        response, answer = await self.operate("wake_up?model=base")
        self.assertEqual((response.code, answer["status"]), (200, "awake"))
        self.assertFalse(self.replicas[asleep[0]][0].engine.sleep.asleep)
        self.assertEqual(self.replicas[awake][0].engine.sleep.wake_ups, 0)
        seen = set()
        for _ in range(6):
            response, body = await self.chat(model="base", max_tokens=1)
            seen.add(self.index(response))
        self.assertEqual(seen, {0, 1})

    async def test_all_asleep_calls_wait_in_the_gateway(self):
        """
        With the only replica asleep, a call waits in the gateway queue (it
        never reaches vLLM) and is served once the replica is woken through
        the proxy; with C{max_queue: 0} a call is shed with 503
        C{replicas_asleep} and C{Retry-After}.
        """
        self.fleet(1)
        await self.operate("sleep?model=base")
        engine = self.replicas[0][0].engine
        call = ensureDeferred(self.chat(model="base", max_tokens=1))
        flow = self.gateway.passthrough.flow
        await wait_until(lambda: flow.depths() == {("base", 0): 1}, timeout=10)
        await sleep(0.2)
        self.assertFalse(call.called)
        self.assertEqual(engine.requests_total, 0)
        response, answer = await self.operate("wake_up?model=base")
        self.assertEqual(answer["status"], "awake")
        response, body = await call
        self.assertEqual(response.code, 200, body)
        self.assertEqual(engine.requests_total, 1)
        flow.max_queue = 0
        await self.operate("sleep?model=base")
        response, body = await self.chat(model="base", max_tokens=1)
        self.assertEqual(response.code, 503)
        self.assertEqual(error_of(body)["code"], "replicas_asleep")
        self.assertTrue(response.headers.getRawHeaders(b"retry-after"))

    async def test_sleep_seen_from_the_metric(self):
        """
        A replica put to sleep directly (not through the proxy) is seen
        asleep from its C{vllm:engine_sleep_state} and gets no calls; woken
        directly, it is seen awake and takes calls again.
        """
        self.fleet(2, scrape=True, routing_strategy="least-busy")
        router = self.gateway.router
        sleeper = self.deployments[0]
        await treq.post(self.replicas[0][1] + "/sleep?level=1", b"", persistent=False)
        await wait_until(lambda: router.asleep(sleeper), timeout=10)
        for _ in range(4):
            response, body = await self.chat(model="base", max_tokens=1)
            self.assertEqual(response.code, 200, body)
            self.assertEqual(self.index(response), 1)
        await treq.post(self.replicas[0][1] + "/wake_up", b"", persistent=False)
        await wait_until(lambda: not router.asleep(sleeper), timeout=10)
        seen = set()
        for _ in range(6):
            response, body = await self.chat(model="base", max_tokens=1)
            seen.add(self.index(response))
        self.assertEqual(seen, {0, 1})
        self.addCleanup(self.gateway.prober.stop)
        _, health = await self.request(b"GET", "/health", auth())
        self.assertIn('"asleep": false', health.decode())
