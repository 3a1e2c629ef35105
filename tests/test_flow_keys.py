"""
Key priorities end to end: virtual keys made through the key API with a
C{priority} and C{weight}, calls queued at a deployment with a parallel cap
of 1 leaving by priority, and the key's priority forwarded as vLLM's
C{priority} field (C{forward_priority: true}); a real C{redis-server}.
"""

from twisted.internet.defer import ensureDeferred
from twisted.trial.unittest import TestCase

from dheera_tx.config import config_from_dict
from tests.passthrough_harness import MASTER_KEY, deployment, error_of, sleep
from tests.redis_server import RedisServer
from tests.test_gateway_keys import GatewayHarness


class FlowKeysTests(GatewayHarness, TestCase):
    """
    Virtual keys with priorities through a gateway queue.
    """

    async def setUp(self):
        self.harness()
        server = RedisServer().start()
        self.addCleanup(server.cleanup)
        self.upstream = await self.fake()
        config = config_from_dict({
            "model_list": [deployment("alpha", "tiny", self.upstream, max_parallel_requests=1, forward_priority=True)],
            "general_settings": {"master_key": MASTER_KEY, "database_url": server.url},
        })
        gateway = self.assemble(config)
        await gateway.key_store.subscription.whenActive()

    async def test_fields_checked_and_shown(self):
        """
        C{priority} must be a whole number and C{weight} a number from
        0.001 to 1000 (400 otherwise, in the OpenAI error shape); the key's
        info shows what was set, and null for what was not (then the key's
        team's values apply, else 0 and 1: see L{tests.test_team_api}).
        """
        status, body = await self.call(b"POST", "/key/generate", body={"priority": "high"})
        self.assertEqual((status, error_of(body)["param"]), (400, "priority"))
        status, body = await self.call(b"POST", "/key/generate", body={"weight": 0})
        self.assertEqual((status, error_of(body)["param"]), (400, "weight"))
        made = await self.admin("/key/generate", {"priority": -2, "weight": 2.5})
        self.assertEqual((made["priority"], made["weight"]), (-2, 2.5))
        plain = await self.admin("/key/generate", {})
        self.assertEqual((plain["priority"], plain["weight"]), (None, None))
        updated = await self.admin("/key/update", {"key": plain["key"], "priority": 3})
        self.assertEqual(updated["priority"], 3)

    async def test_queued_calls_leave_by_key_priority(self):
        """
        With the replica busy, a priority-5 key's call queued first and a
        priority-1 key's call queued next: the priority-1 call reaches vLLM
        first, each carrying its key's priority (the client's own value is
        replaced).
        """
        low = (await self.admin("/key/generate", {"priority": 5}))["key"]
        high = (await self.admin("/key/generate", {"priority": 1}))["key"]
        hog = ensureDeferred(self.call(b"POST", "/vllm/v1/chat/completions",
                                       body={"model": "alpha", "messages": [{"role": "user", "content": "x"}]},
                                       headers={"x-fake-fault": "slow_first_byte=0.4"}))
        await self.upstream.wait_for_requests(1)
        body = {"model": "alpha", "messages": [{"role": "user", "content": "hi"}], "priority": -1000}
        first = ensureDeferred(self.call(b"POST", "/vllm/v1/chat/completions", key=low, body=body))
        flow = self.gateway.passthrough.flow
        while not flow.depths():
            await sleep(0.01)
        second = ensureDeferred(self.call(b"POST", "/vllm/v1/chat/completions", key=high, body=body))
        while sum(flow.depths().values()) < 2:
            await sleep(0.01)
        self.assertEqual(flow.depths(), {("alpha", 5): 1, ("alpha", 1): 1})
        for call in (hog, first, second):
            status, content = await call
            self.assertEqual(status, 200, content)
        self.assertEqual([r.json["priority"] for r in self.upstream.received[1:]], [1, 5])
