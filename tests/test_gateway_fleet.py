"""
Integration tests of SPEC section 5 across processes: two real
C{twistd -n dheera} proxies (L{tests.proxy_process.ProxyProcess}) sharing
one redis-server and one in-test L{tests.fake_vllm.FakeVLLM}, with calls
split between them.  Spend and rpm limits must hold exactly, as if there
were one proxy.
"""

import json
import shutil
from decimal import Decimal

from twisted.internet import reactor
from twisted.internet.defer import ensureDeferred, gatherResults
from twisted.trial.unittest import TestCase
from twisted.web.client import Agent, HTTPConnectionPool, readBody
from twisted.web.http_headers import Headers

from tests.fake_vllm import FakeVLLM
from tests.passthrough_harness import MASTER_KEY, sleep
from tests.proxy_process import ProxyProcess
from tests.redis_server import RedisServer
from tests.scripted_upstream import BytesBody

INPUT_NANOS = 200  # input_cost_per_token 0.0000002 USD
OUTPUT_NANOS = 600  # output_cost_per_token 0.0000006 USD
PREFIX = "dheera:"


def chat_document(i: int) -> dict:
    """
    :return: the chat request of call C{i}: 1 to 5 prompt words, 1 to 7
        completion tokens, so that costs differ between calls.
    """
    words = " ".join(["word"] * (i % 5 + 1))
    return {"model": "alpha", "messages": [{"role": "user", "content": words}], "max_tokens": i % 7 + 1}


def expected_cost(i: int) -> int:
    """
    :return: the cost of call C{i} in nano-USD, from the fake's
        deterministic usage.
    """
    return (i % 5 + 1) * INPUT_NANOS + (i % 7 + 1) * OUTPUT_NANOS


def chat_calls(fake) -> list:
    """
    :return: the chat completions C{fake} received (not the proxies' own
        C{/v1/models} rounds of model discovery).
    """
    return [r for r in fake.received if r.uri.startswith(b"/v1/chat/completions")]


class FleetTests(TestCase):
    """
    Two proxy processes, one Redis, one upstream.
    """

    timeout = 60

    def setUp(self):
        return ensureDeferred(self._start())

    async def _start(self) -> None:
        self.redis_server = RedisServer().start()
        self.addCleanup(self.redis_server.cleanup)
        self.upstream = FakeVLLM(reactor, served_model="tiny")
        await self.upstream.start()
        self.addCleanup(self.upstream.stop)
        config = {
            "model_list": [
                {
                    "model_name": "alpha",
                    "dheera_ai_params": {
                        "model": "hosted_vllm/tiny",
                        "api_base": self.upstream.url,
                        "input_cost_per_token": 0.0000002,
                        "output_cost_per_token": 0.0000006,
                    },
                }
            ],
            "general_settings": {"master_key": MASTER_KEY, "database_url": self.redis_server.url},
        }
        self.proxies = [ProxyProcess(reactor, config) for _ in range(2)]
        for proxy in self.proxies:
            self.addCleanup(shutil.rmtree, proxy.directory, True)
            self.addCleanup(proxy.cleanup)
        await gatherResults([ensureDeferred(proxy.start()) for proxy in self.proxies])
        self.pool = HTTPConnectionPool(reactor, persistent=False)
        self.addCleanup(self.pool.closeCachedConnections)
        self.agent = Agent(reactor, pool=self.pool)

    async def request(self, proxy: ProxyProcess, method: bytes, path: str, key: str = MASTER_KEY, document=None):
        """
        Make one call to C{proxy}.

        :return: C{(response, body)}.
        """
        headers = Headers({b"authorization": [b"Bearer " + key.encode("ascii")], b"content-type": [b"application/json"]})
        body = None if document is None else BytesBody(json.dumps(document).encode("utf-8"))
        response = await self.agent.request(method, (proxy.url + path).encode("ascii"), headers, body)
        return response, await readBody(response)

    async def new_key(self, **fields):
        """
        Generate a virtual key on the first proxy.

        :return: C{(key, token)}.
        """
        response, body = await self.request(self.proxies[0], b"POST", "/key/generate", document=fields)
        answer = json.loads(body)
        self.assertEqual(response.code, 200, answer)
        return answer["key"], answer["token"]

    async def chat_everywhere(self, key: str, n: int):
        """
        Make C{n} concurrent chat calls, call C{i} on proxy C{i % 2}.

        :return: the C{(response, body)} of each, in order.
        """
        calls = [
            ensureDeferred(self.request(self.proxies[i % 2], b"POST", "/vllm/v1/chat/completions", key, chat_document(i)))
            for i in range(n)
        ]
        return await gatherResults(calls, consumeErrors=True)

    def model_requests(self) -> int:
        """
        :return: the calls settled into the model's spend hash.
        """
        value = self.redis_server.command("HGET", f"{PREFIX}spend:model:alpha", "requests")
        return int(value or 0)

    async def wait_settled(self, n: int, timeout: float = 10.0) -> None:
        """
        Wait until C{n} calls are settled (by either process).
        """
        started = reactor.seconds()
        while self.model_requests() < n:
            if reactor.seconds() - started > timeout:
                self.fail(f"only {self.model_requests()} of {n} calls settled within {timeout} s")
            await sleep(0.02)

    async def test_spend_exact_across_processes(self):
        """
        200 concurrent calls with one virtual key (no limits), split across
        both proxies, are all answered; the key's recorded spend is exactly
        the sum of the per-call costs, as the answers' cost headers state
        them and as the fake's deterministic usage prices them.
        """
        key, token = await self.new_key(user_id="fleet-user")
        results = await self.chat_everywhere(key, 200)
        header_total = 0
        for i, (response, body) in enumerate(results):
            self.assertEqual(response.code, 200, (i, body))
            [value] = response.headers.getRawHeaders(b"x-dheera-response-cost")
            nanos = Decimal(value.decode("ascii")) * 10**9
            self.assertEqual(nanos, expected_cost(i), i)
            header_total += int(nanos)
        self.assertEqual(header_total, sum(expected_cost(i) for i in range(200)))
        self.assertEqual(len(chat_calls(self.upstream)), 200)
        await self.wait_settled(200)
        await sleep(0.2)
        self.assertEqual(self.model_requests(), 200)
        for proxy in self.proxies:
            response, body = await self.request(proxy, b"GET", f"/key/info?key={token}")
            self.assertEqual(response.code, 200, body)
            self.assertEqual(json.loads(body)["info"]["spend_nanos"], header_total)
        user = self.redis_server.command("HGET", f"{PREFIX}spend:user:fleet-user", "spend_nanos")
        self.assertEqual(int(user), header_total)

    async def test_rpm_exact_across_processes(self):
        """
        A key with rpm_limit 60 sending 100 concurrent calls split across
        both proxies gets exactly 60 answers and 40 refusals (429 with
        Retry-After); the upstream sees exactly 60 calls.
        """
        key, _ = await self.new_key(rpm_limit=60)
        results = await self.chat_everywhere(key, 100)
        codes = [response.code for response, _ in results]
        self.assertEqual((codes.count(200), codes.count(429)), (60, 40), codes)
        for response, body in results:
            if response.code == 429:
                self.assertEqual(json.loads(body)["error"]["type"], "rate_limit_error")
                [retry] = response.headers.getRawHeaders(b"retry-after")
                self.assertTrue(1 <= int(retry) <= 60, retry)
        self.assertEqual(len(chat_calls(self.upstream)), 60)
        # The limit was shared: each process let some calls through.
        by_proxy = [[results[i][0].code for i in range(p, 100, 2)] for p in (0, 1)]
        for codes_of_one in by_proxy:
            self.assertIn(200, codes_of_one)
        await self.wait_settled(60)
