"""
Tests for C{--workers N}: several processes on one port sharing one Redis,
restarted when they die, drained on SIGTERM.
"""

import json
import os
import signal

import treq
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import reactor
from twisted.internet.defer import ensureDeferred, gatherResults
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase

from tests.fake_vllm import FakeVLLM
from tests.proxy_process import ProxyProcess

MASTER = "sk-workers-master"


def _auth(key=MASTER):
    return {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}


class WorkerTests(TestCase):
    """
    A two-worker proxy over a fake vLLM.
    """

    timeout = 90

    async def setUp(self):
        self.fake = await FakeVLLM(reactor, served_model="tiny").start()
        self.addCleanup(self.fake.stop)
        self.proxy = ProxyProcess(
            reactor,
            {
                "model_list": [
                    {
                        "model_name": "m",
                        "dheera_ai_params": {
                            "model": "hosted_vllm/tiny",
                            "api_base": self.fake.url,
                            "input_cost_per_token": 0.000001,
                            "output_cost_per_token": 0.000002,
                        },
                    }
                ],
                "general_settings": {"master_key": MASTER, "graceful_shutdown_timeout": 10},
            },
            extra_args=["--workers", "2"],
        )
        self.addCleanup(self.proxy.cleanup)
        await self.proxy.start()

    async def _pids(self, n=40):
        pids = set()
        for _ in range(n):
            response = await treq.get(self.proxy.url + "/health/liveliness", persistent=False)
            pids.add((await response.json())["pid"])
        return pids

    async def test_both_workers_serve_and_share_limits(self):
        """
        New connections reach both workers (two distinct pids, neither the
        parent's), and a key with rpm_limit 10 lets exactly 10 calls through
        across both; /metrics, whichever worker answers, counts all 16
        calls of both workers.
        """
        pids = await self._pids()
        self.assertEqual(len(pids), 2)
        self.assertNotIn(self.proxy.process.pid, pids)
        response = await treq.post(
            self.proxy.url + "/key/generate", json.dumps({"rpm_limit": 10}).encode(), headers=_auth(), persistent=False
        )
        key = (await response.json())["key"]
        body = json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}).encode()

        async def call():
            r = await treq.post(self.proxy.url + "/vllm/v1/chat/completions", body, headers=_auth(key), persistent=False)
            await r.content()
            return r.code

        codes = await gatherResults([ensureDeferred(call()) for _ in range(16)])
        self.assertEqual(sorted(codes), [200] * 10 + [429] * 6)
        # Chat completions only: each worker also asks for /v1/models (model
        # discovery).
        self.assertEqual(len([r for r in self.fake.received if r.uri.startswith(b"/v1/chat/")]), 10)
        for _ in range(6):
            response = await treq.get(self.proxy.url + "/metrics", persistent=False)
            text = (await response.content()).decode()
            counts = {}
            for family in text_string_to_metric_families(text):
                if family.name == "dheera_requests":
                    for sample in family.samples:
                        if sample.name == "dheera_requests_total":
                            status = sample.labels["status"]
                            counts[status] = counts.get(status, 0) + sample.value
            self.assertEqual(counts, {"200": 10, "429": 6})

    async def test_dead_worker_restarted(self):
        """
        A worker killed with SIGKILL is replaced by a new process, and the
        port keeps answering.
        """
        before = await self._pids()
        victim = sorted(before)[0]
        os.kill(victim, signal.SIGKILL)
        for _ in range(100):
            await deferLater(reactor, 0.1, lambda: None)
            now = await self._pids(20)
            if len(now) == 2 and victim not in now:
                break
        self.assertEqual(len(now), 2)
        self.assertNotIn(victim, now)

    async def test_sigterm_drains_stream_in_flight(self):
        """
        SIGTERM while a stream is in flight: the stream still completes
        with [DONE], and then every process, embedded Redis included, exits.
        """
        body = json.dumps(
            {"model": "m", "stream": True, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 6}
        ).encode()
        headers = dict(_auth(), **{"x-fake-fault": "slow_chunks=0.3"})
        pending = treq.post(self.proxy.url + "/vllm/v1/chat/completions", body, headers=headers, persistent=False)
        await self.fake.wait_for_requests(1, b"/v1/chat/")
        self.proxy.process.send_signal(signal.SIGTERM)
        response = await pending
        text = (await response.content()).decode()
        self.assertEqual(response.code, 200)
        self.assertIn("data: [DONE]", text)
        code = await self.proxy.wait_exit(30)
        self.assertIn(code, (0, -15), self.proxy.log_tail())
        self.assertFalse(os.path.exists(os.path.join(self.proxy.directory, "dheera_data", "redis.sock")))
