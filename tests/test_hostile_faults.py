"""
Faults around the pass-through (issue 7): upstreams that refuse, never
connect, hang, dribble, reset, answer garbage, errors or huge heads;
clients that leave at every stage; and secrets that must never show in a
log line, an error, C{/metrics} or C{/health}.  Real loopback sockets,
FakeVLLM upstreams, and a real redis-server for the secrets test.
"""

import io
import json
import socket

from twisted.internet import reactor
from twisted.internet.defer import ensureDeferred
from twisted.internet.protocol import Factory
from twisted.trial.unittest import TestCase
from twisted.web.client import ResponseFailed

from dheera_tx.config import config_from_dict
from tests.fake_vllm import _GARBAGE, error_answer
from tests.hostile import HostileTestCase, LogWatch, request_head, wait_until
from tests.passthrough_harness import (
    MASTER_KEY,
    CannedUpstream,
    deployment,
    error_of,
    refusing_url,
    sleep,
)
from tests.redis_server import RedisServer
from tests.test_gateway_keys import GatewayHarness


def unanswered_url(test: TestCase) -> str:
    """
    :return: the URL of a loopback port whose accept queue is full, so a
        new connection to it is neither accepted nor refused (the SYN is
        dropped) and connecting times out; closed at cleanup.
    """
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    address = listener.getsockname()
    fillers = []
    for _ in range(3):
        filler = socket.socket()
        filler.setblocking(False)
        filler.connect_ex(address)
        fillers.append(filler)
    for s in [listener] + fillers:
        test.addCleanup(s.close)
    return f"http://127.0.0.1:{address[1]}"


class UpstreamFaultTests(HostileTestCase):
    """
    What the client gets when the upstream misbehaves (SPEC section 3).
    """

    async def _start(self, **params):
        self.upstream = await self.fake(served_model="alpha")
        self.proxy([deployment("alpha", "alpha", self.upstream, **params)])

    def _alpha_at(self, url: str, **params) -> None:
        self.proxy([{"model_name": "alpha", "dheera_ai_params": dict({"model": "alpha", "api_base": url}, **params)}])

    async def _upstream_closed(self) -> None:
        self.assertTrue(await wait_until(lambda: self.upstream.open_connections == 0))

    async def test_refused(self):
        """
        An upstream refusing the connection gives 502 C{upstream_error} at
        once.
        """
        self._alpha_at(refusing_url())
        started = reactor.seconds()
        response, body = await self.chat()
        self.assertLess(reactor.seconds() - started, 1.0)
        self.assertEqual(response.code, 502)
        self.assertEqual(error_of(body)["type"], "upstream_error")
        self.assertCleanLog()

    async def test_connect_timeout(self):
        """
        An upstream that never completes the TCP handshake gives 502
        C{upstream_error} after the deployment's connect_timeout, well
        before its whole-call timeout.
        """
        self._alpha_at(unanswered_url(self), connect_timeout=0.5, timeout=10)
        started = reactor.seconds()
        response, body = await self.chat()
        elapsed = reactor.seconds() - started
        self.assertTrue(0.4 <= elapsed < 2.0, elapsed)
        self.assertEqual(response.code, 502)
        self.assertEqual(error_of(body)["type"], "upstream_error")
        self.assertCleanLog()

    async def test_hang_before_headers(self):
        """
        An upstream that takes the request and never answers gives 504
        C{upstream_timeout} after the deployment's timeout, and its
        connection is closed.
        """
        await self._start(timeout=0.5)
        started = reactor.seconds()
        response, body = await self.chat(headers={"x-fake-fault": "hang"})
        self.assertTrue(0.4 <= reactor.seconds() - started < 2.0)
        self.assertEqual(response.code, 504)
        self.assertEqual(error_of(body)["type"], "upstream_timeout")
        await self._upstream_closed()
        self.assertCleanLog()

    async def test_slow_first_byte(self):
        """
        A first byte slower than usual but within the timeout is relayed
        (200); one later than the timeout gives 504.
        """
        await self._start(timeout=0.6)
        response, body = await self.chat(headers={"x-fake-fault": "slow_first_byte=0.3"})
        self.assertEqual(response.code, 200)
        self.assertEqual(json.loads(body)["object"], "chat.completion")
        response, body = await self.chat(headers={"x-fake-fault": "slow_first_byte=1.5"})
        self.assertEqual(response.code, 504)
        await self._upstream_closed()
        self.assertCleanLog()

    async def test_reset_mid_stream(self):
        """
        A stream the upstream resets ends with the events that arrived and
        an C{event: error}, without C{[DONE]}; a plain answer it resets
        gives 502.
        """
        await self._start()
        response, body = await self.chat(headers={"x-fake-fault": "reset_mid_stream=2"}, stream=True)
        self.assertEqual(response.code, 200)
        self.assertEqual(body.count(b"data: {"), 2 + 1)
        self.assertIn(b"event: error\n", body)
        self.assertNotIn(b"[DONE]", body)
        response, body = await self.chat(headers={"x-fake-fault": "reset_mid_stream=10"})
        self.assertEqual(response.code, 502)
        self.assertEqual(error_of(body)["type"], "upstream_error")
        self.assertCleanLog()

    async def test_garbage_relayed(self):
        """
        Bytes that are not SSE under a C{text/event-stream} head are relayed
        as they are, byte for byte.
        """
        await self._start()
        response, body = await self.chat(headers={"x-fake-fault": "garbage"}, stream=True)
        self.assertEqual(response.code, 200)
        self.assertEqual(response.headers.getRawHeaders(b"content-type"), [b"text/event-stream"])
        self.assertEqual(body, _GARBAGE)
        self.assertCleanLog()

    async def test_error_status_passed_through(self):
        """
        Upstream 5xx answers reach the client with their status and body
        unchanged.
        """
        await self._start()
        for status in (500, 502, 503, 504):
            response, body = await self.chat(headers={"x-fake-fault": f"status={status}"})
            self.assertEqual(response.code, status)
            self.assertEqual(body, error_answer(status, f"fake vLLM fault: status {status}").body)
        self.assertCleanLog()

    async def _canned(self, answer: bytes) -> list:
        requests: list = []
        port = reactor.listenTCP(0, Factory.forProtocol(lambda: CannedUpstream(answer, requests)), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        self._alpha_at(f"http://127.0.0.1:{port.getHost().port}")
        return requests

    async def test_big_response_head_relayed(self):
        """
        A big but ordinary response head (8 KB over two headers) is relayed
        whole.
        """
        await self._start()
        response, _ = await self.chat(headers={"x-fake-fault": "huge_headers=8000"})
        self.assertEqual(response.code, 200)
        self.assertEqual(len(response.headers.getRawHeaders(b"x-fake-pad-0")[0]), 3984)
        self.assertEqual(len(response.headers.getRawHeaders(b"x-fake-pad-1")[0]), 3984)
        self.assertCleanLog()

    async def test_huge_response_header_line(self):
        """
        A single response header line over C{max_header_bytes} (64 KiB
        by default) gives 502 in the OpenAI shape and logs no failure.
        """
        await self._canned(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nX-Big: " + b"h" * 70000 + b"\r\nContent-Length: 2\r\n\r\n{}")
        response, body = await self.chat()
        logged = self.flushLoggedErrors(ResponseFailed)
        self.assertEqual(response.code, 502)
        self.assertEqual(error_of(body)["type"], "upstream_error")
        self.assertEqual(logged, [])
        self.assertCleanLog()


    async def test_huge_response_head_bounded(self):
        """
        Response heads bigger than C{max_header_bytes} in total (many lines
        each under the line limit) give 502 instead of being relayed.
        """
        upstream = await self.fake(served_model="alpha")
        self.proxy([deployment("alpha", "alpha", upstream)], general={"max_header_bytes": 65536})
        response, body = await self.chat(headers={"x-fake-fault": "huge_headers=300000"})
        self.assertEqual(response.code, 502)
        self.assertEqual(error_of(body)["type"], "upstream_error")



class ClientFaultTests(HostileTestCase):
    """
    Clients that leave at every stage: the upstream call ends within a
    second, and nothing is logged as a failure.
    """

    async def _start(self):
        self.upstream = await self.fake(served_model="alpha")
        self.proxy([deployment("alpha", "alpha", self.upstream)], general={"header_timeout": 5})

    async def _leave(self, client) -> float:
        left = reactor.seconds()
        client.transport.abortConnection()
        self.assertTrue(await wait_until(lambda: self.upstream.open_connections == 0, 3))
        self.assertTrue(await wait_until(lambda: self.gateway.passthrough.in_flight == 0, 3))
        self.assertTrue(await wait_until(lambda: self.site.open_connections == 0, 3))
        lost = self.upstream.connections_lost
        return (lost[-1] - left) if lost else 0.0

    async def test_leave_before_headers_complete(self):
        """
        A client that leaves in the middle of its request head costs
        nothing upstream and leaves no call or connection behind.
        """
        await self._start()
        client = await self.raw_connect()
        client.transport.write(request_head(b"/vllm/v1/models")[:40])
        self.assertTrue(await wait_until(lambda: self.site.open_connections == 1))
        await self._leave(client)
        self.assertEqual(self.upstream.received, [])
        self.assertCleanLog()

    async def test_leave_mid_json_upload(self):
        """
        A client that leaves while its JSON body (read whole before
        routing) is arriving ends the call quietly; the upstream is never
        called.
        """
        await self._start()
        client = await self.raw_connect()
        client.transport.write(
            request_head(b"/vllm/v1/chat/completions", b"Content-Type: application/json", b"Content-Length: 200000", method=b"POST")
            + b'{"model": "alpha", "messages": [{"role": "user", "content": "' + b"x" * 50_000
        )
        self.assertTrue(await wait_until(lambda: self.gateway.passthrough.in_flight == 1))
        await sleep(0.05)
        await self._leave(client)
        self.assertEqual(self.upstream.received, [])
        self.assertCleanLog()

    async def test_leave_mid_streamed_upload(self):
        """
        A client that leaves while its body streams upstream makes the
        proxy abort the upstream call within a second, its body incomplete.
        """
        await self._start()
        client = await self.raw_connect()
        client.transport.write(
            request_head(b"/vllm/v1/audio/transcriptions", b"Content-Type: application/octet-stream", b"Content-Length: 1000000", method=b"POST")
            + b"x" * 100_000
        )
        self.assertTrue(await wait_until(lambda: self.upstream.received and self.upstream.received[0].body_length > 0))
        self.assertLess(await self._leave(client), 1.0)
        self.assertFalse(self.upstream.received[0].body_done)
        self.assertCleanLog()

    async def test_leave_while_upstream_thinks(self):
        """
        A client that leaves before the upstream answered makes the proxy
        abort the upstream call within a second.
        """
        await self._start()
        client = await self.raw_connect()
        client.transport.write(request_head(b"/vllm/version", b"x-fake-fault: hang"))
        self.assertTrue(await wait_until(lambda: len(self.upstream.received) == 1))
        self.assertLess(await self._leave(client), 1.0)
        self.assertCleanLog()

    async def test_leave_mid_stream(self):
        """
        A client that leaves in the middle of an SSE stream makes the proxy
        abort the upstream call within a second.
        """
        await self._start()
        client = await self.raw_connect()
        body = json.dumps({"model": "alpha", "stream": True, "messages": [{"role": "user", "content": "hi"}]}).encode()
        client.transport.write(
            request_head(
                b"/vllm/v1/chat/completions",
                b"Content-Type: application/json",
                b"x-fake-fault: slow_chunks=0.2,chunks=50",
                b"Content-Length: %d" % len(body),
                method=b"POST",
            )
            + body
        )
        self.assertTrue(await wait_until(lambda: b"data: " in client.data))
        self.assertLess(await self._leave(client), 1.0)
        self.assertEqual(self.upstream.requests_running, 0)
        self.assertCleanLog()


class SecretTests(GatewayHarness, LogWatch, TestCase):
    """
    A virtual key and the master key never show up where they must not.
    """

    def setUp(self):
        self.harness()
        self.watch_log()
        return ensureDeferred(self._start())

    async def _start(self):
        server = RedisServer().start()
        self.addCleanup(server.cleanup)
        self.upstream = await self.fake(served_model="tiny")
        general = {"master_key": MASTER_KEY, "database_url": server.url, "header_timeout": 2, "body_timeout": 1, "max_headers": 30}
        config = config_from_dict(
            {
                "model_list": [deployment("alpha", "tiny", self.upstream)],
                "general_settings": general,
                "dheera_ai_settings": {"callbacks": ["json_log"]},
            }
        )
        self.json_log = io.StringIO()
        gateway = self.assemble(config, stdout=self.json_log)
        # GET /health probes the upstream on a pool of the prober's own.
        self.addCleanup(gateway.prober.stop)
        await gateway.key_store.subscription.whenActive()

    async def test_keys_never_shown(self):
        """
        Through good calls, 401s, malformed requests and
        C{/key/info?key=<key>} calls, a canary virtual key and the master
        key appear in no log line, no error body, no call record, no
        C{/metrics} and no C{/health} answer.
        """
        status, content = await self.call(b"POST", "/key/generate", MASTER_KEY, {"key_alias": "canary"})
        self.assertEqual(status, 200)
        canary = json.loads(content)["key"]
        secrets = (canary, MASTER_KEY)
        answers = []

        async def call(method, path, key, body=None, headers=None):
            status, content = await self.call(method, path, key, body, headers)
            answers.append(content)
            return status

        self.assertEqual(await call(b"POST", "/vllm/v1/chat/completions", canary, {"model": "alpha", "messages": []}), 200)
        self.assertEqual(await call(b"POST", "/vllm/v1/chat/completions", canary[:-1] + "x", {"model": "alpha"}), 401)
        self.assertEqual(await call(b"GET", "/vllm/v1/models?key=" + canary, None), 401)
        self.assertEqual(await call(b"GET", "/vllm/v1/models", None, headers={"x-api-key": MASTER_KEY}), 200)
        self.assertEqual(await call(b"GET", "/key/info?key=" + canary, MASTER_KEY), 200)
        self.assertEqual(await call(b"GET", "/key/info?key=" + canary, canary), 200)
        self.assertEqual(await call(b"GET", "/key/info?key=" + canary, None), 401)
        self.assertEqual(await call(b"GET", "/key/info?key=" + canary, canary[:-1] + "x"), 401)
        self.assertEqual(await call(b"POST", "/vllm/sleep", canary), 403)
        self.assertEqual(await call(b"POST", "/key/generate", canary, {"key_alias": "x"}), 403)
        self.assertEqual(await call(b"GET", "/health", MASTER_KEY), 200)
        self.assertEqual(await call(b"GET", "/health/readiness", None), 200)
        self.assertEqual(await call(b"GET", "/metrics", None), 200)
        for raw in (
            request_head(b"/vllm/v1/models?key=" + canary.encode(), *[b"X-H%d: 1" % i for i in range(40)], key=canary),
            request_head(b"http://evil/key/info?key=" + canary.encode(), key=MASTER_KEY),
            request_head(b"/vllm/v1/models", b"Authorization: Bearer " + canary.encode(), key=MASTER_KEY),
            request_head(b"/vllm/%2e%2e/key/info?key=" + canary.encode(), key=canary),
            request_head(b"/key/info?key=" + canary.encode(), b"Content-Length: 10", key=canary),
        ):
            answers.append(await self.raw(raw, wait=5))
        self.assertTrue(self.events)
        logged = self.logged_text()
        records = self.json_log.getvalue()
        self.assertGreaterEqual(len(records.splitlines()), 4)
        for secret in secrets:
            self.assertNotIn(secret, logged)
            self.assertNotIn(secret, records)
            for answer in answers:
                self.assertNotIn(secret.encode(), answer)
        self.assertCleanLog()
