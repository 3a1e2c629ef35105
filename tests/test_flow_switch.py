"""
C{router_settings.flow_control: false}: the gateway queue is off, and a
call to a saturated model goes to vLLM at once, as before flow control.
"""

from twisted.internet.defer import ensureDeferred

from tests.passthrough_harness import ProxyTestCase, deployment
from tests.scripted_upstream import sleep


class FlowControlOffTests(ProxyTestCase):
    """
    Calls through the proxy to a deployment with a parallel cap of 1.
    """

    async def start(self, flow_control: bool):
        self.upstream = await self.fake()
        self.proxy([deployment("alpha", "tiny", self.upstream, max_parallel_requests=1)],
                   router={"flow_control": flow_control})

    async def test_saturated_call_reaches_vllm_at_once(self):
        """
        With flow control off, a second call while the first holds the
        replica's only slot (the model saturated) is not queued: vLLM
        receives it while the first is still running, and both are served.
        """
        await self.start(False)
        first = ensureDeferred(self.chat(headers={"x-fake-fault": "slow_first_byte=0.5"}))
        await self.upstream.wait_for_requests(1)
        self.assertTrue(self.gateway.router.saturated(self.config.replicas("alpha")[0]))
        second = ensureDeferred(self.chat())
        await self.upstream.wait_for_requests(2)
        self.assertFalse(first.called, "the first call ended before the second reached vLLM")
        self.assertEqual(self.gateway.passthrough.flow.depths(), {})
        for call in (first, second):
            response, body = await call
            self.assertEqual(response.code, 200, body)

    async def test_saturated_call_waits_with_flow_control_on(self):
        """
        The same two calls with flow control on (the default): the second
        waits in the gateway queue while the first runs.
        """
        await self.start(True)
        first = ensureDeferred(self.chat(headers={"x-fake-fault": "slow_first_byte=0.5"}))
        await self.upstream.wait_for_requests(1)
        second = ensureDeferred(self.chat())
        flow = self.gateway.passthrough.flow
        while not flow.depths():
            await sleep(0.01)
        self.assertEqual(len(self.upstream.received), 1)
        for call in (first, second):
            response, body = await call
            self.assertEqual(response.code, 200, body)
        self.assertEqual(len(self.upstream.received), 2)
