"""
Integration tests of the vLLM pass-through (SPEC section 3) when things go
wrong: replicas refusing or failing, upstream timeouts, errors and resets,
and the request-body size limit.  Real loopback sockets, FakeVLLM
upstreams.
"""

import json

from twisted.internet import reactor
from twisted.internet.defer import ensureDeferred, gatherResults
from twisted.internet.protocol import Factory

from tests.fake_vllm import FakeVLLM, error_answer
from tests.passthrough_harness import (
    MASTER_KEY,
    CannedUpstream,
    ProxyTestCase,
    auth,
    deployment,
    error_of,
    multipart,
    parse_response,
    refusing_url,
    sleep,
)
from tests.waiting import wait_until

MB = 1024 * 1024


class ReplicaTests(ProxyTestCase):
    """
    Load balancing and retries over replicas of one model.
    """

    async def test_refusing_replica_retried_and_cooled_down(self):
        """
        With one replica refusing connections, every call succeeds through
        the other (the refused attempt is retried before anything was
        sent), and the bad replica ends up cooling down.
        """
        good = await self.fake(served_model="alpha")
        bad_url = refusing_url()
        self.proxy(
            [
                {"model_name": "alpha", "dheera_ai_params": {"model": "alpha", "api_base": bad_url}},
                deployment("alpha", "alpha", good),
            ],
            # least-busy: the same prompt 20 times would keep to one replica
            # under cache-aware, and the bad one might never be tried.
            router={"allowed_fails": 2, "cooldown_time": 60, "routing_strategy": "least-busy"},
        )
        for i in range(20):
            response, _ = await self.chat()
            self.assertEqual(response.code, 200, i)
        self.assertEqual(len(good.received), 20)
        bad, healthy = self.config.replicas("alpha")
        self.assertEqual(bad.api_base, bad_url)
        self.assertTrue(self.gateway.router.cooling_down(bad))
        self.assertFalse(self.gateway.router.cooling_down(healthy))

    async def test_streamed_body_retried_on_refusal(self):
        """
        A streamed upload (multipart, not read whole by the proxy) is also
        retried on the other replica when the first refuses the connection,
        and arrives there complete.
        """
        good = await self.fake(served_model="alpha")
        self.proxy(
            [
                {"model_name": "alpha", "dheera_ai_params": {"model": "alpha", "api_base": refusing_url()}},
                deployment("alpha", "alpha", good),
            ],
            router={"allowed_fails": 1, "cooldown_time": 60},
        )
        boundary = b"upload-boundary"
        body = multipart(boundary, [("model", b"alpha", None), ("file", b"\x01" * (MB // 2), "a.wav")])
        for _ in range(16):
            response, answer = await self.request(
                b"POST",
                "/vllm/v1/audio/transcriptions",
                dict(auth(), **{"content-type": "multipart/form-data; boundary=" + boundary.decode()}),
                body,
            )
            self.assertEqual(response.code, 200, answer)
        self.assertEqual([(r.body_length, r.body_done) for r in good.received], [(len(body), True)] * 16)
        self.assertEqual(good.received[0].form["file"]["size"], MB // 2)
        # The refusing replica was tried (and so cooled down) on some call:
        # each call picks either replica at random until then (odds 2 ** -16).
        bad = self.config.replicas("alpha")[0]
        self.assertTrue(self.gateway.router.cooling_down(bad))

    async def test_load_spread(self):
        """
        Concurrent calls spread evenly over two healthy replicas under
        least-busy (the least busy one is picked).
        """
        one = await self.fake(served_model="alpha")
        two = await self.fake(served_model="alpha")
        self.proxy([deployment("alpha", "alpha", one), deployment("alpha", "alpha", two)],
                   router={"routing_strategy": "least-busy"})
        calls = [ensureDeferred(self.chat(headers={"x-fake-fault": "slow_first_byte=0.3"})) for _ in range(20)]
        results = await gatherResults(calls)
        self.assertEqual([r.code for r, _ in results], [200] * 20)
        self.assertLessEqual(abs(len(one.received) - len(two.received)), 2)
        self.assertEqual(len(one.received) + len(two.received), 20)

    async def test_no_retry_after_request_sent(self):
        """
        A replica that takes the request and closes without answering gets
        a 502: the call is not retried on the other replica once bytes were
        sent, so no call reaches both.
        """
        requests: list = []
        port = reactor.listenTCP(0, Factory.forProtocol(lambda: CannedUpstream(b"", requests)), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        good = await self.fake(served_model="alpha")
        self.proxy(
            [
                {"model_name": "alpha", "dheera_ai_params": {"model": "alpha", "api_base": f"http://127.0.0.1:{port.getHost().port}"}},
                deployment("alpha", "alpha", good),
            ],
            # Identical prompts keep to one replica under cache-aware.
            router={"routing_strategy": "least-busy"},
        )
        codes = []
        for _ in range(20):
            response, body = await self.chat()
            codes.append(response.code)
            if response.code == 502:
                self.assertEqual(error_of(body)["type"], "upstream_error")
        self.assertEqual(codes.count(502), len(requests))
        self.assertEqual(codes.count(200), len(good.received))
        self.assertEqual(len(requests) + len(good.received), 20)
        # Either replica is picked at random: both were (odds 2 ** -19).
        self.assertGreater(len(requests), 0)
        self.assertGreater(len(good.received), 0)

    async def test_upstream_closing_idle_connections(self):
        """
        When the upstream closes idle keep-alive connections (uvicorn does
        after 5 s), the next call opens a new one and succeeds.
        """
        upstream = FakeVLLM(reactor, served_model="alpha")
        upstream.idle_timeout = 0.2
        await upstream.start()
        self.addCleanup(upstream.stop)
        self.proxy([deployment("alpha", "alpha", upstream)])
        for i in range(3):
            response, _ = await self.chat()
            self.assertEqual(response.code, 200)
            # The upstream closed the idle connection and the proxy saw it.
            await wait_until(lambda: len(upstream.connections_lost) == i + 1 and self.upstream_pool.idle_connections() == 0)
        self.assertEqual(len(upstream.connections_lost), 3)


class UpstreamFailureTests(ProxyTestCase):
    """
    Upstream failures and timeouts.
    """

    async def test_refused(self):
        """
        An upstream that refuses the connection gives 502 in the OpenAI
        error shape.
        """
        self.proxy([{"model_name": "alpha", "dheera_ai_params": {"model": "alpha", "api_base": refusing_url()}}])
        response, body = await self.chat()
        self.assertEqual(response.code, 502)
        self.assertEqual(error_of(body)["type"], "upstream_error")

    async def test_hang_times_out(self):
        """
        An upstream that never answers gives 504 after the deployment's
        timeout, and its connection is closed.
        """
        upstream = await self.fake(served_model="alpha")
        self.proxy([deployment("alpha", "alpha", upstream, timeout=0.5)])
        started = reactor.seconds()
        response, body = await self.chat(headers={"x-fake-fault": "hang"})
        elapsed = reactor.seconds() - started
        self.assertEqual(response.code, 504)
        self.assertEqual(error_of(body)["type"], "upstream_timeout")
        self.assertTrue(0.4 <= elapsed < 2.0, elapsed)
        for _ in range(100):
            if upstream.open_connections == 0:
                break
            await sleep(0.01)
        self.assertEqual(upstream.open_connections, 0)

    async def test_error_status_passed_through(self):
        """
        An upstream error answer (status and body) reaches the client
        unchanged.
        """
        upstream = await self.fake(served_model="alpha")
        self.proxy([deployment("alpha", "alpha", upstream)])
        for status in (500, 400, 429, 503):
            response, body = await self.chat(headers={"x-fake-fault": f"status={status}"})
            self.assertEqual(response.code, status)
            self.assertEqual(body, error_answer(status, f"fake vLLM fault: status {status}").body)

    async def test_reset_mid_stream(self):
        """
        An SSE stream the upstream breaks ends the client stream without
        C{[DONE]} and with an C{event: error} line, after the events that
        did arrive.
        """
        upstream = await self.fake(served_model="alpha")
        self.proxy([deployment("alpha", "alpha", upstream)])
        response, body = await self.chat(headers={"x-fake-fault": "reset_mid_stream=3"}, stream=True)
        self.assertEqual(response.code, 200)
        self.assertEqual(body.count(b"data: {"), 3 + 1)  # three events, then the error's data line
        self.assertNotIn(b"[DONE]", body)
        self.assertIn(b"\nevent: error\n", b"\n" + body)
        self.assertTrue(body.endswith(b"\n\n"))

    async def test_slow_first_byte_within_timeout(self):
        """
        An upstream slower to answer than usual but within the timeout
        succeeds.
        """
        upstream = await self.fake(served_model="alpha")
        self.proxy([deployment("alpha", "alpha", upstream, timeout=3)])
        response, body = await self.chat(headers={"x-fake-fault": "slow_first_byte=0.4"})
        self.assertEqual(response.code, 200)
        self.assertEqual(json.loads(body)["object"], "chat.completion")

    async def test_whole_call_timeout_mid_stream(self):
        """
        A stream that keeps going past the deployment's whole-call timeout
        is cut there (C{event: error}, no C{[DONE]}).
        """
        upstream = await self.fake(served_model="alpha")
        self.proxy([deployment("alpha", "alpha", upstream, timeout=1.0)])
        started = reactor.seconds()
        response, body = await self.chat(headers={"x-fake-fault": "slow_chunks=0.2,chunks=20"}, stream=True)
        elapsed = reactor.seconds() - started
        self.assertEqual(response.code, 200)
        self.assertTrue(0.9 <= elapsed < 2.0, elapsed)
        self.assertNotIn(b"[DONE]", body)
        self.assertIn(b"event: error", body)
        self.assertIn(b"upstream_timeout", body)

    async def test_reset_of_plain_answer(self):
        """
        A non-streamed JSON answer the upstream cuts short is held by the
        proxy until complete (for its cost header), so the client gets a
        clean 502 in the OpenAI shape, never a complete-looking short body.
        """
        upstream = await self.fake(served_model="alpha")
        self.proxy([deployment("alpha", "alpha", upstream)])
        response, body = await self.chat(headers={"x-fake-fault": "reset_mid_stream=20"})
        self.assertEqual(response.code, 502)
        error = json.loads(body)["error"]
        self.assertEqual(error["type"], "upstream_error")
        self.assertIn("upstream_reset", error["message"])

    async def test_stream_timeout(self):
        """
        Silence longer than the deployment's stream_timeout in the middle of
        a stream aborts it (C{event: error}, no C{[DONE]}) long before the
        upstream would have finished, and closes the upstream connection.
        """
        upstream = await self.fake(served_model="alpha")
        self.proxy([deployment("alpha", "alpha", upstream, stream_timeout=0.3)])
        started = reactor.seconds()
        response, body = await self.chat(headers={"x-fake-fault": "slow_chunks=1.0,chunks=10"}, stream=True)
        elapsed = reactor.seconds() - started
        self.assertEqual(response.code, 200)
        self.assertLess(elapsed, 2.0)
        self.assertNotIn(b"[DONE]", body)
        self.assertIn(b"event: error", body)
        self.assertIn(b"stream_timeout", body)
        for _ in range(100):
            if upstream.open_connections == 0:
                break
            await sleep(0.01)
        self.assertEqual(upstream.open_connections, 0)


class BodyLimitTests(ProxyTestCase):
    """
    C{max_request_body_bytes}.
    """

    async def _start(self):
        self.upstream = await self.fake(served_model="alpha")
        self.proxy([deployment("alpha", "alpha", self.upstream)], general={"max_request_body_bytes": 1000})

    async def test_declared_length_over_limit(self):
        """
        A Content-Length over the limit is answered 413 before any of the
        body is sent, and the upstream never sees the call.
        """
        await self._start()
        client = await self.raw_connect()
        client.transport.write(
            b"POST /vllm/v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + MASTER_KEY.encode()
            + b"\r\nContent-Type: application/json\r\nContent-Length: 5000\r\n\r\n"
        )
        raw = await client.closed()
        status, _, body = parse_response(raw)
        self.assertEqual(status, 413)
        self.assertEqual(error_of(body)["code"], "request_too_large")
        self.assertEqual(self.upstream.received, [])

    async def test_chunked_body_growing_over_limit(self):
        """
        A chunked body that grows past the limit while it is being
        forwarded gets 413 (or a dropped connection), and the upstream
        request is aborted before its body completed.
        """
        await self._start()
        client = await self.raw_connect()
        client.transport.write(
            b"POST /vllm/v1/audio/transcriptions?model=alpha HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
            + MASTER_KEY.encode() + b"\r\nContent-Type: application/octet-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
        )
        for _ in range(6):
            if not client.connected:
                break
            client.transport.write(b"190\r\n" + b"a" * 400 + b"\r\n")
            await sleep(0.05)
        raw = await client.closed()
        if raw:
            status, _, body = parse_response(raw)
            self.assertEqual(status, 413)
            self.assertEqual(error_of(body)["code"], "request_too_large")
        self.assertEqual(len(self.upstream.received), 1)
        record = self.upstream.received[0]
        self.assertGreater(record.body_length, 0)
        self.assertFalse(record.body_done)
        for _ in range(100):
            if self.upstream.open_connections == 0:
                break
            await sleep(0.01)
        self.assertEqual(self.upstream.open_connections, 0)
