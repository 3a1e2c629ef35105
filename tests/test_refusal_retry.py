"""
vLLM's queue-cap refusals retried once on another replica (issue 15 item
4), end to end: the proxy with a real Redis in front of two fake vLLM
servers over loopback, one started with C{max_num_queued_reqs: 0} (vLLM
refuses every call with its 503), the other taking calls.

The router's strategy is C{least-busy}, and the proxy's own count of calls
in flight on the taking replica is raised by one (C{Router.started}) for
each test, so that the refusing replica, the least busy, is tried first.
"""

import io
import json

from twisted.internet import reactor
from twisted.internet.defer import ensureDeferred

from dheera_tx.config import config_from_dict
from dheera_tx.redis.client import connect
from dheera_tx.tap import build_gateway
from tests.passthrough_harness import MASTER_KEY, auth, deployment, error_of, multipart
from tests.redis_server import RedisServer
from tests.test_gateway_spend import PRICES, GatewayTestCase, chat_body, cost, sse_events
from tests.vllm_admission import refusal_body
from tests.waiting import wait_until

BUSY = refusal_body("max_num_queued_reqs")


class RefusalCase(GatewayTestCase):
    """
    Model C{alpha} on two replicas: C{self.refuser} (vLLM with
    C{--max-num-queued-reqs 0}) and C{self.upstream}, which answers unless
    C{taker_cap} says otherwise.  No tests of its own.
    """

    # The second replica's vLLM queue cap (None: it takes every call).
    taker_cap = None
    # The second replica's max_parallel_requests (None: none).
    taker_parallel = None

    async def _start(self) -> None:
        self.redis_server = RedisServer().start()
        self.addCleanup(self.redis_server.cleanup)
        self.redis = connect(reactor, self.redis_server.url)
        self.addCleanup(self.redis.disconnect)
        self.refuser = await self.fake(served_model="tiny", max_num_queued_reqs=0)
        self.upstream = await self.fake(served_model="tiny", max_num_queued_reqs=self.taker_cap)
        config = config_from_dict({
            "model_list": [deployment("alpha", "tiny", self.refuser, **PRICES),
                           deployment("alpha", "tiny", self.upstream, **self.taker_params())],
            "general_settings": {"master_key": MASTER_KEY},
            "router_settings": {"routing_strategy": "least-busy"},
            "dheera_ai_settings": {"callbacks": ["json_log"]},
        })
        self.config = config
        self.log_stream = io.StringIO()
        gateway = build_gateway(reactor, config, self.redis, stdout=self.log_stream)
        self.gateway = gateway
        self.addCleanup(lambda: ensureDeferred(self._stop_gateway(gateway)))
        self.listen(gateway)
        router = gateway.router
        self.refusing, self.taking = sorted(config.replicas("alpha"), key=lambda d: d.api_base != self.refuser.url)
        router.started(self.taking)
        self.addCleanup(router.finished, self.taking)

    def taker_params(self) -> dict:
        params = dict(PRICES)
        if self.taker_parallel is not None:
            params["max_parallel_requests"] = self.taker_parallel
        return params

    async def record(self) -> dict:
        """
        :return: the one call record, once written.
        """
        await wait_until(lambda: self.records(), timeout=10)
        [record] = self.records()
        return record

    async def metrics(self) -> bytes:
        _, body = await self.request(b"GET", "/metrics")
        return body

    def assertPoolClean(self) -> None:
        """
        The refused answer's connection went back to the pool: one idle
        connection per replica, none busy, none closed by the proxy.
        """
        self.assertEqual(self.gateway.pool.idle_connections(), 2)
        self.assertEqual(self.refuser.open_connections, 1)
        self.assertEqual(self.refuser.connections_lost, [])


class RefusalRetryTests(RefusalCase):
    """
    One replica refuses, the other answers.
    """

    async def test_json_call_served_by_the_other_replica(self):
        """
        A JSON call refused by vLLM's queue cap is sent once to the other
        replica and served; it is billed once (key spend, model spend,
        record), its record shows two attempts, C{/metrics} counts the
        retry by vLLM's reason, and no connection is leaked.
        """
        key, token = await self.new_key()
        response, body = await self.post("/v1/chat/completions", chat_body(max_tokens=5), key)
        self.assertEqual(response.code, 200, body)
        self.assertEqual(len(self.refuser.received), 1)
        self.assertEqual(len(self.upstream.received), 1)
        self.assertEqual(self.refuser.received[0].body, self.upstream.received[0].body)
        expected = cost(2, 5)
        self.assertEqual(json.loads(body)["usage"]["completion_tokens"], 5)
        await self.settled()
        record = await self.record()
        self.assertEqual((record["attempts"], record["deployment"], record["status"]), (2, self.taking.id, 200))
        self.assertEqual(record["cost_nanos"], expected)
        self.assertEqual(await self.key_spend(token), expected)
        self.assertEqual(self.hash("spend:model:alpha")["requests"], 1)
        self.assertIn(b'dheera_upstream_retries_total{model="alpha",reason="max_num_queued_reqs"} 1.0', await self.metrics())
        self.assertPoolClean()

    async def test_stream_served_by_the_other_replica(self):
        """
        A streamed call refused by vLLM (its JSON 503 comes before any
        stream) is streamed from the other replica, billed once.
        """
        key, token = await self.new_key()
        response, body = await self.post("/v1/chat/completions", chat_body(max_tokens=4, stream=True), key)
        self.assertEqual(response.code, 200, body)
        self.assertEqual(response.headers.getRawHeaders(b"content-type")[0][:17], b"text/event-stream")
        self.assertEqual(sse_events(body)[-1], b"data: [DONE]")
        await self.settled()
        self.assertEqual(await self.key_spend(token), cost(2, 4))
        record = await self.record()
        self.assertEqual((record["attempts"], record["deployment"], record["stream"]), (2, self.taking.id, True))
        self.assertEqual((len(self.refuser.received), len(self.upstream.received)), (1, 1))
        self.assertPoolClean()

    async def test_refusing_replica_held_saturated(self):
        """
        After a refusal the refusing replica counts as saturated (no
        sample has come since): the next call goes straight to the other
        replica, the refusing one sees it not.
        """
        response, _ = await self.post("/v1/chat/completions", chat_body())
        self.assertEqual(response.code, 200)
        self.assertTrue(self.gateway.router.saturated(self.refusing))
        response, _ = await self.post("/v1/chat/completions", chat_body())
        self.assertEqual(response.code, 200)
        self.assertEqual((len(self.refuser.received), len(self.upstream.received)), (1, 2))

    async def test_multipart_upload_not_retried(self):
        """
        A multipart upload (streamed to vLLM, not in memory) refused by
        vLLM is not sent again: the client gets vLLM's 503 as vLLM wrote
        it, with C{Retry-After}; the other replica sees nothing.
        """
        boundary = b"----dheera-boundary-9"
        upload = multipart(boundary, [("model", b"alpha", None), ("file", b"RIFF" + b"\x00\x01" * 5000, "a.wav")])
        response, body = await self.request(
            b"POST", "/vllm/v1/audio/transcriptions",
            dict(auth(), **{"content-type": "multipart/form-data; boundary=" + boundary.decode()}), upload,
        )
        self.assertEqual(response.code, 503)
        self.assertEqual(body, BUSY)
        self.assertTrue(response.headers.getRawHeaders(b"retry-after"))
        self.assertEqual((len(self.refuser.received), len(self.upstream.received)), (1, 0))
        record = await self.record()
        self.assertEqual((record["attempts"], record["cost_nanos"]), (1, 0))

    async def test_client_leaving_during_the_retry_not_billed(self):
        """
        A client that disconnects while its retried call waits for the
        other replica's answer is not billed; the record says so.
        """
        key, token = await self.new_key()
        client = await self.raw_stream(chat_body(stream=True), key, "slow_first_byte=5")
        await self.upstream.wait_for_requests(1)
        client.transport.abortConnection()
        record = await self.record()
        self.assertEqual((record["error"], record["attempts"], record["cost_nanos"]), ("client_disconnected", 2, 0))
        self.assertEqual(record["prompt_tokens"] + record["completion_tokens"], 0)
        await self.settled()
        self.assertEqual(await self.key_spend(token), 0)
        self.assertEqual(self.parallel_slots(token), 0)


class BothRefusingTests(RefusalCase):
    """
    Both replicas refuse (both vLLMs started with
    C{--max-num-queued-reqs 0}).
    """

    taker_cap = 0

    async def test_one_retry_then_503(self):
        """
        A call refused by both replicas is sent twice, no more: the client
        gets vLLM's 503 (its OpenAI-shaped body) with C{Retry-After}, and
        pays nothing.
        """
        key, token = await self.new_key()
        response, body = await self.post("/v1/chat/completions", chat_body(stream=True), key)
        self.assertEqual(response.code, 503)
        error = error_of(body)
        self.assertEqual((error["type"], error["code"]), ("Service Unavailable", 503))
        self.assertEqual(self.retry_after(response), self.gateway.passthrough.flow.retry_after)
        self.assertEqual((len(self.refuser.received), len(self.upstream.received)), (1, 1))
        record = await self.record()
        self.assertEqual((record["attempts"], record["status"], record["cost_nanos"]), (2, 503, 0))
        await self.settled()
        self.assertEqual(await self.key_spend(token), 0)
        self.assertPoolClean()



class OtherReplicaFullTests(RefusalCase):
    """
    The answering replica is at its C{max_parallel_requests} (1, taken by
    the proxy's own count).
    """

    taker_parallel = 1

    async def test_not_pushed_past_a_cap(self):
        """
        A refused call is not retried on a replica that is saturated (its
        parallel cap reached): the client gets vLLM's 503 with
        C{Retry-After}, and that replica sees nothing.
        """
        response, body = await self.post("/v1/chat/completions", chat_body())
        self.assertEqual(response.code, 503)
        self.assertEqual(body, BUSY)
        self.assertTrue(response.headers.getRawHeaders(b"retry-after"))
        self.assertEqual((len(self.refuser.received), len(self.upstream.received)), (1, 0))
        self.assertEqual((await self.record())["attempts"], 1)
