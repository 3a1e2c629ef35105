"""
Cache-aware routing end to end: a two-worker proxy process over three
simulated vLLM replicas (L{tests.sim_vllm}), on real loopback sockets.
"""

import json

import treq
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import reactor
from twisted.internet.defer import ensureDeferred, gatherResults
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase

from dheera_tx.config import Deployment
from dheera_tx.routing.affinity import rendezvous_order, replica_weight, session_key
from tests.proxy_process import ProxyProcess
from tests.sim_vllm import SimSettings, listen

MASTER = "sk-routing-fleet"
HEADERS = {"Authorization": f"Bearer {MASTER}", "Content-Type": "application/json"}


class CacheAwareFleetTests(TestCase):
    """
    C{--workers 2}, C{routing_strategy: cache-aware}, three replicas.
    """

    timeout = 120

    async def setUp(self):
        self.replicas = []
        for _ in range(3):
            replica, port = listen(reactor, SimSettings(max_num_seqs=1, decode_interval=0.002, prefill_per_token=0.00001))
            self.addCleanup(port.stopListening)
            self.addCleanup(self._close, replica)
            self.replicas.append((replica, "http://127.0.0.1:%d" % port.getHost().port))
        self.proxy = ProxyProcess(
            reactor,
            {
                "model_list": [{"model_name": "chat", "dheera_ai_params": {"model": "hosted_vllm/sim", "api_base": url}}
                               for _, url in self.replicas],
                "general_settings": {"master_key": MASTER},
                "router_settings": {"routing_strategy": "cache-aware", "metrics_interval": 0.3},
                "dheera_ai_settings": {"callbacks": ["json_log"]},
            },
            extra_args=["--workers", "2"],
        )
        self.addCleanup(self.proxy.cleanup)
        await self.proxy.start(timeout=60)

    async def _close(self, replica):
        # After the proxy is gone: its pooled connections, and calls still
        # decoding, end here.
        for seq in list(replica.engine.running) + list(replica.engine.waiting):
            seq.cancelled = True
        replica.site.close_connections()
        while replica.engine.running or replica.site.connections:
            await deferLater(reactor, 0.05, lambda: None)
        await deferLater(reactor, 0.05, lambda: None)

    async def call(self, messages, headers=None):
        """
        :return: C{(replica url, answer)} of one chat call through the
            proxy, on a new connection (so that both workers take calls).
        """
        body = json.dumps({"model": "chat", "messages": messages, "max_tokens": 4}).encode()
        response = await treq.post(self.proxy.url + "/vllm/v1/chat/completions", body,
                                   headers=dict(HEADERS, **(headers or {})), persistent=False)
        answer = json.loads(await response.content())
        self.assertEqual(response.code, 200, answer)
        port = response.headers.getRawHeaders(b"x-sim-replica")[0].decode()
        return "http://127.0.0.1:" + port, answer

    async def wait_for(self, condition, what: str, timeout: float = 20.0):
        deadline = reactor.seconds() + timeout
        while not await condition():
            if reactor.seconds() > deadline:
                self.fail("timed out waiting for " + what)
            await deferLater(reactor, 0.1, lambda: None)

    async def test_conversations_stay_on_their_replica(self):
        """
        Every turn of a conversation reaches the same replica, whichever
        worker takes it (turns a moment apart, as users read), and later turns find their history cached
        (C{cached_tokens} in the usage and in the call record, reason
        C{affinity} after the first turn); different conversations spread
        over replicas.
        """
        system = {"role": "system", "content": "You are terse. " * 40}
        homes = {}
        for user in range(6):
            messages = [system, {"role": "user", "content": f"user {user} context " * 150}]
            seen = set()
            for turn in range(4):
                replica, answer = await self.call(messages)
                seen.add(replica)
                if turn:
                    self.assertGreater(answer["usage"]["prompt_tokens_details"]["cached_tokens"],
                                       answer["usage"]["prompt_tokens"] // 2)
                messages = messages + [answer["choices"][0]["message"], {"role": "user", "content": f"turn {turn}"}]
                # The user reads the answer: meanwhile a placement made by
                # one worker reaches the other (5 syncs per interval).
                await deferLater(reactor, 0.25, lambda: None)
            self.assertEqual(len(seen), 1, f"user {user} moved: {seen}")
            homes[user] = seen.pop()
        self.assertGreater(len(set(homes.values())), 1)

        async def logged():
            return len(self.proxy.records()) >= 24

        await self.wait_for(logged, "24 call records")
        records = self.proxy.records()
        # A conversation's first turn may go past its first-ranked replica
        # to balance conversations (spill); later turns follow it there.
        reasons = [r["routing_reason"] for r in records]
        self.assertLessEqual(set(reasons), {"affinity", "spill"})
        self.assertLessEqual(reasons.count("spill"), 6)
        # Turns after the first find their history; first turns may find
        # the shared system prompt.
        self.assertGreaterEqual(sum(1 for r in records if r["cached_tokens"] > 0), 18)

    async def test_session_header_and_saturated_replica(self):
        """
        Calls with the same session header go to the replica ranked first
        for it; once that replica's own queue (traffic sent to it
        directly) reaches max_waiting, they spill to the next one, and
        /health, /metrics and the call records say so.
        """
        deployments = [Deployment("chat", "sim", url, index=i) for i, (_, url) in enumerate(self.replicas)]
        seeds = {d.id: replica_weight(d) for d in deployments}
        order = rendezvous_order(session_key("chat", b"conv-42"), deployments, seeds)
        first, second = order[0].api_base, order[1].api_base
        for _ in range(3):
            replica, _ = await self.call([{"role": "user", "content": "hello"}], {"x-session-id": "conv-42"})
            self.assertEqual(replica, first)

        # Saturate the first replica from outside the proxy.
        hogs = []
        body = json.dumps({"model": "sim", "prompt": "x", "max_tokens": 2000}).encode()
        for _ in range(6):
            hogs.append(treq.post(first + "/v1/completions", body, persistent=False))
        self.addCleanup(lambda: [h.cancel() for h in hogs])

        async def seen_waiting():
            response = await treq.get(self.proxy.url + "/health", headers=HEADERS, persistent=False)
            document = await response.json()
            for entry in document["healthy_endpoints"]:
                sample = entry.get("load_sample")
                if entry["api_base"] == first and sample and sample["num_requests_waiting"] >= 4 and not sample["stale"]:
                    return True
            return False

        # Both workers scrape on their own; give them a round each.
        await self.wait_for(seen_waiting, "a sample of the saturated replica")
        await deferLater(reactor, 0.7, lambda: None)
        replicas = [(await self.call([{"role": "user", "content": "hello"}], {"x-session-id": "conv-42"}))[0]
                    for _ in range(4)]
        self.assertEqual(set(replicas), {second})

        families: dict = {}
        reasons: dict = {}

        async def counted():
            # A call is counted just after its answer's last byte.
            response = await treq.get(self.proxy.url + "/metrics", persistent=False)
            families.update({f.name: f for f in text_string_to_metric_families((await response.content()).decode())})
            reasons.update({s.labels["reason"]: s.value for s in families["dheera_routing_decisions"].samples
                            if s.name == "dheera_routing_decisions_total"})
            return sum(reasons.values()) >= 7

        await self.wait_for(counted, "7 routing decisions counted")
        # A worker that spilled the key before keeps sending it there, as
        # its affinity: 7 calls, at least one of the last 4 a spill.
        self.assertEqual(reasons.get("affinity", 0) + reasons.get("spill", 0), 7.0)
        self.assertGreaterEqual(reasons.get("spill", 0), 1.0)
        waiting = {s.labels["deployment"]: s.value for s in families["dheera_deployment_requests_waiting"].samples}
        self.assertEqual(len(waiting), 3)
        await gatherResults([ensureDeferred(self._drop(h)) for h in hogs])

    async def _drop(self, d):
        d.cancel()
        try:
            await d
        except Exception:
            pass
