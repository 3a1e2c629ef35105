"""
Integration tests of the vLLM pass-through (SPEC section 3) over real
loopback sockets: methods, paths and queries, refused targets and framings,
the choice of deployment, headers both ways, and authentication.  Failures,
retries and limits are in L{tests.test_passthrough_failures}; streaming,
backpressure and disconnects in L{tests.test_passthrough_streaming}.
"""

import gzip
import json

from twisted.internet import reactor
from twisted.internet.protocol import Factory

from tests.passthrough_harness import (
    MASTER_KEY,
    UPSTREAM_KEY,
    CannedUpstream,
    ProxyTestCase,
    auth,
    deployment,
    error_of,
    multipart,
    parse_response,
    sleep,
)
from tests.scripted_upstream import poll
from tests.test_paths import ESCAPES


class MethodAndPathTests(ProxyTestCase):
    """
    Methods, paths and queries reach the upstream verbatim.
    """

    async def _start(self):
        self.upstream = await self.fake(served_model="alpha")
        self.proxy([deployment("alpha", "alpha", self.upstream)])

    async def test_all_methods_forwarded(self):
        """
        GET, POST, PUT, PATCH, DELETE, HEAD and OPTIONS reach the upstream
        with their method and path, and the upstream's status comes back.
        """
        await self._start()
        methods = [b"GET", b"POST", b"PUT", b"PATCH", b"DELETE", b"HEAD", b"OPTIONS"]
        for method in methods:
            response, body = await self.request(method, "/vllm/health", auth())
            # The fake serves /health for GET only, like vLLM.
            self.assertEqual(response.code, 200 if method == b"GET" else 405, method)
        self.assertEqual([r.method for r in self.upstream.received], methods)
        self.assertEqual({r.uri for r in self.upstream.received}, {b"/health"})

    async def test_raw_path_and_query_verbatim(self):
        """
        The path and query after C{/vllm} are appended to api_base as raw
        bytes: escapes are not decoded or re-encoded.
        """
        await self._start()
        response, _ = await self.request(b"GET", "/vllm/v1/chat/completions?x=1&y=%2Fz", auth())
        self.assertEqual(self.upstream.received[-1].uri, b"/v1/chat/completions?x=1&y=%2Fz")
        await self.request(b"GET", "/vllm/caf%C3%A9/a%20b?q=%e2%82%ac+1", auth())
        self.assertEqual(self.upstream.received[-1].uri, b"/caf%C3%A9/a%20b?q=%e2%82%ac+1")

    async def test_metrics_path(self):
        """
        C{/vllm/metrics} is vLLM's own C{/metrics}, body passed through.
        """
        await self._start()
        response, body = await self.request(b"GET", "/vllm/metrics", auth())
        self.assertEqual(response.code, 200)
        self.assertEqual(self.upstream.received[0].uri, b"/metrics")
        self.assertIn(b"vllm:num_requests_running", body)

    async def test_persistent_and_pipelined_connection(self):
        """
        Several calls on one client connection, one after the other and
        pipelined, are each forwarded and answered in order.
        """
        await self._start()
        client = await self.raw_connect()

        def call(path: bytes, last: bool = False) -> bytes:
            close = b"Connection: close\r\n" if last else b""
            return b"GET /vllm" + path + b" HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + MASTER_KEY.encode() + b"\r\n" + close + b"\r\n"

        client.transport.write(call(b"/version"))
        self.assertTrue(await poll(lambda: b'"version"' in client.data, 10), client.data)
        client.transport.write(call(b"/health") + call(b"/v1/models?model=alpha") + call(b"/version", last=True))
        raw = await client.closed()
        self.assertEqual(raw.count(b"HTTP/1.1 200 OK\r\n"), 4)
        self.assertEqual([r.uri for r in self.upstream.received], [b"/version", b"/health", b"/v1/models?model=alpha", b"/version"])
        self.assertLess(raw.index(b'"version"'), raw.index(b'"object":"list"'))

    async def test_pipelined_bodies_and_planes(self):
        """
        Pipelined requests of both planes, with bodies, sent in one write
        are answered in order, each body reaching its own call: a JSON
        call, a control-plane probe, a second JSON call, a GET.
        """
        await self._start()
        client = await self.raw_connect()
        key = MASTER_KEY.encode()

        def post(path: bytes, body: bytes) -> bytes:
            return (
                b"POST /vllm" + path + b" HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + key
                + b"\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body) + body
            )

        first = b'{"model":"alpha","prompt":"one two"}'
        second = b'{"model":"alpha","prompt":"three"}'
        client.transport.write(
            post(b"/tokenize", first)
            + b"GET /health/liveliness HTTP/1.1\r\nHost: x\r\n\r\n"
            + post(b"/tokenize", second)
            + b"GET /vllm/version HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + key + b"\r\nConnection: close\r\n\r\n"
        )
        raw = await client.closed()
        self.assertEqual(raw.count(b"HTTP/1.1 200 OK\r\n"), 4)
        self.assertEqual([r.uri for r in self.upstream.received], [b"/tokenize", b"/tokenize", b"/version"])
        self.assertEqual([r.body for r in self.upstream.received[:2]], [first, second])
        positions = [raw.index(b'"tokens"'), raw.index(b'"alive"'), raw.rindex(b'"tokens"'), raw.index(b'"version"')]
        self.assertEqual(positions, sorted(positions))
        self.assertEqual(len(set(positions)), 4)

    async def test_request_head_split_across_reads(self):
        """
        A request line and headers (values with spaces) arriving a few
        bytes at a time, for a first request and for one pipelined after
        it, are read as sent.
        """
        await self._start()
        client = await self.raw_connect()
        key = MASTER_KEY.encode()
        pieces = [
            b"GET /vl", b"lm/version HT", b"TP/1.1\r\nHost: x\r\nX-Note: a b c\r\nAuthorization: Bearer " + key + b"\r\n\r\n"
            b"GET /vllm/v1/mo", b"dels?model=alpha HTTP/1.1\r\nX-Note: d e", b" f g\r\nAuthorization: Bearer " + key,
            b"\r\nConnection: close\r\n\r\n",
        ]
        for piece in pieces:
            client.transport.write(piece)
            await sleep(0.02)
        raw = await client.closed()
        self.assertEqual(raw.count(b"HTTP/1.1 200 OK\r\n"), 2, raw[:300])
        self.assertEqual([r.uri for r in self.upstream.received], [b"/version", b"/v1/models?model=alpha"])

    async def test_pipelined_body_waits_without_timing_out(self):
        """
        A request pipelined behind a call that takes longer than
        C{body_timeout}, with part of its body sent, is not refused as a
        slow body while it waits its turn (reading is held, so its pace
        clock stops); it is served once the first answer is complete.
        """
        self.upstream = await self.fake(served_model="alpha")
        # The first call takes three body timeouts; the rest of the body is
        # sent as soon as its answer arrived, which leaves the proxy a whole
        # body timeout (not a few milliseconds) to read it.
        self.proxy([deployment("alpha", "alpha", self.upstream)], general={"body_timeout": 0.5})
        client = await self.raw_connect()
        key = MASTER_KEY.encode()
        body = b'{"model":"alpha","prompt":"later"}'
        client.transport.write(
            b"GET /vllm/version HTTP/1.1\r\nHost: x\r\nx-fake-fault: slow_first_byte=1.5\r\nAuthorization: Bearer " + key + b"\r\n\r\n"
            b"POST /vllm/tokenize HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + key
            + b"\r\nContent-Type: application/json\r\nConnection: close\r\nContent-Length: %d\r\n\r\n" % len(body)
            + body[:10]
        )
        self.assertTrue(await poll(lambda: b'"version"' in client.data, 10), client.data)
        self.assertNotIn(b"408 Request", client.data)
        client.transport.write(body[10:])
        raw = await client.closed()
        self.assertEqual(raw.count(b"HTTP/1.1 200 OK\r\n"), 2, raw[:400])
        self.assertEqual([r.uri for r in self.upstream.received], [b"/version", b"/tokenize"])
        self.assertEqual(self.upstream.received[1].body, body)

    async def test_upgrade_request_answered_plainly(self):
        """
        A request asking to upgrade the connection (WebSocket) is answered
        as a plain request (upgrades are not relayed, the Upgrade header is
        hop-by-hop), and a request pipelined after it is served too.
        """
        await self._start()
        key = MASTER_KEY.encode()
        raw = await self.raw(
            b"GET /vllm/version HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
            b"Authorization: Bearer " + key + b"\r\n\r\n"
            b"GET /vllm/version HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + key + b"\r\nConnection: close\r\n\r\n"
        )
        self.assertEqual(raw.count(b"HTTP/1.1 200 OK\r\n"), 2, raw[:300])
        self.assertEqual([r.uri for r in self.upstream.received], [b"/version", b"/version"])
        self.assertNotIn("upgrade", self.upstream.received[0].headers)

    def _expect_post(self, path: bytes, body: bytes, close: bool = False) -> bytes:
        """
        :return: the head of a POST with C{Expect: 100-continue} (its body
            is sent separately).
        """
        return (
            b"POST " + path + b" HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + MASTER_KEY.encode()
            + b"\r\nContent-Type: application/json\r\nExpect: 100-continue\r\n"
            + (b"Connection: close\r\n" if close else b"")
            + b"Content-Length: %d\r\n\r\n" % len(body)
        )

    async def test_expect_continue_before_body(self):
        """
        A call or a control-plane request sent with C{Expect: 100-continue}
        gets C{100 Continue} before its client sends the body, then its
        answer; one refused by its head (too large) gets the refusal and no
        100.
        """
        self.upstream = await self.fake(served_model="alpha")
        self.proxy([deployment("alpha", "alpha", self.upstream)], general={"max_request_body_bytes": 1000})
        body = b'{"model":"alpha","prompt":"one two"}'
        # This proxy has no key store: the control plane reads the body and
        # answers 404 for /key/generate.
        for path, sent, status in ((b"/vllm/tokenize", body, b"200 OK"), (b"/key/generate", b"{}", b"404 Not Found")):
            client = await self.raw_connect()
            client.transport.write(self._expect_post(path, sent, close=True))
            self.assertTrue(await poll(lambda: client.data == b"HTTP/1.1 100 Continue\r\n\r\n", 5), client.data)
            client.transport.write(sent)
            raw = await client.closed()
            self.assertTrue(raw.startswith(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 " + status), raw[:300])
        self.assertEqual(self.upstream.received[0].body, body)
        raw = await self.raw(self._expect_post(b"/vllm/tokenize", b"x" * 2000))
        self.assertTrue(raw.startswith(b"HTTP/1.1 413 "), raw[:200])
        self.assertNotIn(b"100 Continue", raw)

    async def test_pipelined_expect_continue_sent_on_its_turn(self):
        """
        A request with C{Expect: 100-continue} pipelined behind a slow call
        gets no 100 while that call is answered (a 100 would read as its
        answer), and gets it as soon as its turn comes, without waiting for
        its client to give up on the 100; both planes (this proxy has no
        key store, so the control plane answers 404 after reading the body).
        """
        self.upstream = await self.fake(served_model="alpha")
        self.proxy([deployment("alpha", "alpha", self.upstream)])
        key = MASTER_KEY.encode()
        slow = b"GET /vllm/version HTTP/1.1\r\nHost: x\r\nx-fake-fault: slow_first_byte=0.5\r\nAuthorization: Bearer " + key + b"\r\n\r\n"
        body = b'{"model":"alpha","prompt":"later"}'
        for path, sent, status in ((b"/vllm/tokenize", body, b"200 OK"), (b"/key/generate", b"{}", b"404 Not Found")):
            client = await self.raw_connect()
            client.transport.write(slow + self._expect_post(path, sent, close=True))
            await sleep(0.3)
            self.assertEqual(client.data, b"")
            self.assertTrue(await poll(lambda: client.data.endswith(b"HTTP/1.1 100 Continue\r\n\r\n"), 5), client.data[-200:])
            self.assertEqual(client.data.count(b"HTTP/1.1 200 OK\r\n"), 1)
            self.assertLess(client.data.index(b'"version"'), client.data.index(b"100 Continue"))
            client.transport.write(sent)
            raw = await client.closed()
            self.assertIn(b"100 Continue\r\n\r\nHTTP/1.1 " + status, raw, raw[-300:])
        self.assertEqual([r.uri for r in self.upstream.received], [b"/version", b"/tokenize", b"/version"])
        self.assertEqual(self.upstream.received[1].body, body)

    async def test_keepalive_timeout_per_deployment(self):
        """
        A deployment's C{keepalive_timeout} is how long the proxy keeps an
        idle connection to it: the connection is reused within it and
        closed after it.
        """
        self.upstream = await self.fake(served_model="alpha")
        self.proxy([deployment("alpha", "alpha", self.upstream, keepalive_timeout=0.3)])
        for _ in range(2):
            response, _ = await self.request(b"GET", "/vllm/version", auth())
            self.assertEqual(response.code, 200)
        self.assertEqual(self.upstream_pool.idle_connections(), 1)
        self.assertEqual((self.upstream.open_connections, self.upstream.connections_lost), (1, []))
        self.assertTrue(await poll(lambda: self.upstream.open_connections == 0, 2))
        self.assertEqual(self.upstream_pool.idle_connections(), 0)

    async def test_head_keeps_content_length(self):
        """
        A HEAD answer keeps the upstream's Content-Length and has no body.
        """
        requests: list = []
        answer = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 1234\r\n\r\n"
        port = reactor.listenTCP(0, Factory.forProtocol(lambda: CannedUpstream(answer, requests)), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        self.proxy([{"model_name": "m", "dheera_ai_params": {"model": "m", "api_base": f"http://127.0.0.1:{port.getHost().port}"}}])
        raw = await self.raw(b"HEAD /vllm/version HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + MASTER_KEY.encode() + b"\r\nConnection: close\r\n\r\n")
        head, _, rest = raw.partition(b"\r\n\r\n")
        self.assertIn(b"\r\nContent-Length: 1234", head)
        self.assertEqual(rest, b"")
        self.assertTrue(requests[0].startswith(b"HEAD /version HTTP/1.1\r\n"))

    async def test_api_base_path_prefix(self):
        """
        An api_base with a path prefix keeps it: the call's path is appended
        after it.
        """
        self.upstream = await self.fake(served_model="alpha")
        self.proxy([{"model_name": "alpha", "dheera_ai_params": {"model": "alpha", "api_base": self.upstream.url + "/prefix"}}])
        await self.request(b"GET", "/vllm/version?a=b", auth())
        self.assertEqual(self.upstream.received[0].uri, b"/prefix/version?a=b")


class RefusedRequestTests(ProxyTestCase):
    """
    Targets and framings that must never reach the upstream.
    """

    async def _start(self):
        self.upstream = await self.fake(served_model="alpha")
        self.evil = await self.fake(served_model="alpha")
        self.proxy([deployment("alpha", "alpha", self.upstream)])

    def _request(self, target: bytes, *headers: bytes, body: bytes = b"") -> bytes:
        lines = [b"GET " + target + b" HTTP/1.1", b"Host: 127.0.0.1", b"Authorization: Bearer " + MASTER_KEY.encode(), b"Connection: close"]
        return b"\r\n".join(lines + list(headers)) + b"\r\n\r\n" + body

    async def test_escape_corpus_refused(self):
        """
        Every path-escape form of the corpus, sent as raw bytes, is answered
        400 in the OpenAI error shape and nothing reaches the upstream.
        """
        await self._start()
        for path in ESCAPES:
            raw = await self.raw(self._request(b"/vllm" + path))
            status, headers, body = parse_response(raw)
            self.assertEqual(status, 400, path)
            self.assertEqual(error_of(body)["type"], "invalid_request_error", path)
        self.assertEqual(self.upstream.received, [])

    async def test_upstream_host_only_from_config(self):
        """
        An odd Host header, an absolute-form target naming another host, or
        an C{api_base} in the body never send the call anywhere but the
        configured upstream, which sees its own address as Host.
        """
        await self._start()
        evil_host = f"127.0.0.1:{self.evil.port}".encode()
        raw = await self.raw(
            b"GET /vllm/version HTTP/1.1\r\nHost: " + evil_host + b"\r\nAuthorization: Bearer "
            + MASTER_KEY.encode() + b"\r\nConnection: close\r\n\r\n"
        )
        self.assertEqual(parse_response(raw)[0], 200)
        raw = await self.raw(self._request(b"http://" + evil_host + b"/vllm/version"))
        self.assertNotEqual(parse_response(raw)[0], 200)
        body = json.dumps({"model": "alpha", "api_base": self.evil.url, "messages": []}).encode()
        response, _ = await self.request(
            b"POST", "/vllm/v1/chat/completions", dict(auth(), **{"content-type": "application/json", "host": evil_host.decode()}), body
        )
        self.assertEqual(response.code, 200)
        self.assertEqual(self.evil.received, [])
        self.assertEqual(len(self.upstream.received), 2)
        for record in self.upstream.received:
            self.assertEqual(record.headers["host"], [f"127.0.0.1:{self.upstream.port}"])

    async def test_content_length_with_transfer_encoding(self):
        """
        A request with both Content-Length and Transfer-Encoding is answered
        400 and not forwarded.
        """
        await self._start()
        raw = await self.raw(
            self._request(
                b"/vllm/version", b"Content-Length: 5", b"Transfer-Encoding: chunked", body=b"5\r\nhello\r\n0\r\n\r\n"
            )
        )
        status, _, body = parse_response(raw)
        self.assertEqual(status, 400)
        self.assertEqual(error_of(body)["type"], "invalid_request_error")
        self.assertEqual(self.upstream.received, [])

    async def test_duplicate_content_length(self):
        """
        A request with two Content-Length headers is answered 400 and not
        forwarded, whether the values agree or not.
        """
        await self._start()
        for second in (b"Content-Length: 5", b"Content-Length: 6"):
            raw = await self.raw(self._request(b"/vllm/version", b"Content-Length: 5", second, body=b"hello"))
            status, _, body = parse_response(raw)
            self.assertEqual(status, 400, second)
            self.assertEqual(error_of(body)["type"], "invalid_request_error")
        self.assertEqual(self.upstream.received, [])


class DeploymentChoiceTests(ProxyTestCase):
    """
    Which deployment a call goes to, and what happens to its body.
    """

    async def _start(self, environ=None):
        self.alpha = await self.fake(served_model="alpha")
        self.beta = await self.fake(served_model="beta")
        self.proxy(
            [
                deployment("alpha", "alpha", self.alpha),
                deployment("beta", "beta", self.beta),
                deployment("chat-alias", "beta", self.beta),
            ],
            environ=environ,
        )

    async def test_json_model_rewritten_to_served_name(self):
        """
        The C{model} of a JSON body picks the deployment, and the upstream
        body names the served model (C{hosted_vllm/} stripped); the other
        fields are unchanged.
        """
        await self._start()
        response, body = await self.chat("chat-alias", max_tokens=3, temperature=0.5)
        self.assertEqual(response.code, 200)
        self.assertEqual(self.alpha.received, [])
        sent = self.beta.received[0].json
        self.assertEqual(sent["model"], "beta")
        self.assertEqual(sent["max_tokens"], 3)
        self.assertEqual(sent["temperature"], 0.5)
        self.assertEqual(sent["messages"], [{"role": "user", "content": "hi there"}])
        self.assertEqual(json.loads(body)["model"], "beta")

    async def test_json_body_already_served_name_untouched(self):
        """
        A JSON body that already names the served model is forwarded byte
        for byte, not re-encoded.
        """
        await self._start()
        raw = b'{ "model" : "beta",\n  "messages": [{"role":"user","content":"caf\\u00e9"}] , "max_tokens":2}'
        response, _ = await self.request(
            b"POST", "/vllm/v1/chat/completions", dict(auth(), **{"content-type": "application/json"}), raw
        )
        self.assertEqual(response.code, 200)
        self.assertEqual(self.beta.received[0].body, raw)

    async def test_model_header(self):
        """
        Without a JSON body, the C{x-dheera-model} header picks the
        deployment.
        """
        await self._start()
        response, _ = await self.request(b"GET", "/vllm/version", dict(auth(), **{"x-dheera-model": "beta"}))
        self.assertEqual(response.code, 200)
        self.assertEqual([r.uri for r in self.beta.received], [b"/version"])
        self.assertEqual(self.alpha.received, [])

    async def test_model_query_parameter(self):
        """
        Without a JSON body or header, the C{model} query parameter picks the
        deployment, and the query still reaches the upstream verbatim.
        """
        await self._start()
        response, _ = await self.request(b"GET", "/vllm/version?model=beta&x=%2F", auth())
        self.assertEqual(response.code, 200)
        self.assertEqual([r.uri for r in self.beta.received], [b"/version?model=beta&x=%2F"])
        self.assertEqual(self.alpha.received, [])

    async def test_multipart_model_field(self):
        """
        A multipart upload whose C{model} field comes before the file part
        goes to that model's deployment, its body forwarded unchanged.
        """
        await self._start()
        boundary = b"----dheera-boundary-7"
        body = multipart(boundary, [("model", b"beta", None), ("file", b"RIFF" + b"\x00\x01" * 5000, "a.wav")])
        response, answer = await self.request(
            b"POST",
            "/vllm/v1/audio/transcriptions",
            dict(auth(), **{"content-type": "multipart/form-data; boundary=" + boundary.decode()}),
            body,
        )
        self.assertEqual(response.code, 200, answer)
        self.assertEqual(self.alpha.received, [])
        self.assertEqual(self.beta.received[0].body, body)
        self.assertEqual(self.beta.received[0].form["model"], "beta")
        self.assertIn("text", json.loads(answer))

    async def test_multipart_model_after_file_refused(self):
        """
        A multipart C{model} field that comes after the first file part
        does not choose the deployment (the proxy does not wait for it),
        and since vLLM would use it, it must name the model the call was
        authorized for: naming none, this call gets 400 C{model} and is
        not forwarded.
        """
        await self._start()
        boundary = b"b0undary"
        body = multipart(boundary, [("file", b"RIFF" + b"\x00" * 1000, "a.wav"), ("model", b"beta", None)])
        response, answer = await self.request(
            b"POST",
            "/vllm/v1/audio/transcriptions",
            dict(auth(), **{"content-type": "multipart/form-data; boundary=" + boundary.decode()}),
            body,
        )
        self.assertEqual(response.code, 400)
        self.assertEqual(error_of(answer)["param"], "model")
        self.assertEqual(self.alpha.received + self.beta.received, [])

    async def test_body_model_wins_over_header_and_query(self):
        """
        The JSON body's C{model} is used before the C{x-dheera-model} header
        and the C{model} query parameter.
        """
        await self._start()
        raw = b'{"model": "alpha", "messages": [{"role": "user", "content": "x"}]}'
        response, _ = await self.request(
            b"POST",
            "/vllm/v1/chat/completions?model=beta",
            dict(auth(), **{"content-type": "application/json", "x-dheera-model": "beta"}),
            raw,
        )
        self.assertEqual(response.code, 200)
        self.assertEqual(len(self.alpha.received), 1)
        self.assertEqual(self.beta.received, [])
        response, _ = await self.request(b"GET", "/vllm/version?model=alpha", dict(auth(), **{"x-dheera-model": "beta"}))
        self.assertEqual(len(self.beta.received), 1)

    async def test_unknown_model_goes_to_default_untouched(self):
        """
        A model that is not configured goes to the HOSTED_VLLM_API_BASE
        upstream with its body untouched.
        """
        default = await self.fake(served_model="other")
        await self._start(environ={"HOSTED_VLLM_API_BASE": default.url})
        raw = b'{"model": "other",  "messages": [{"role": "user", "content": "x"}]}'
        response, _ = await self.request(
            b"POST", "/vllm/v1/chat/completions", dict(auth(), **{"content-type": "application/json"}), raw
        )
        self.assertEqual(response.code, 200)
        self.assertEqual(default.received[0].body, raw)
        self.assertEqual(self.alpha.received + self.beta.received, [])

    async def test_unknown_model_without_default(self):
        """
        With no default upstream, an unknown model is answered 404
        C{model_not_found} and nothing is forwarded.
        """
        await self._start()
        response, body = await self.chat("nope")
        self.assertEqual(response.code, 404)
        self.assertEqual(error_of(body)["code"], "model_not_found")
        response, body = await self.request(b"GET", "/vllm/version", auth())
        self.assertEqual(response.code, 404)
        self.assertEqual(error_of(body)["code"], "model_not_found")
        self.assertEqual(self.alpha.received + self.beta.received, [])

    async def test_bad_json_refused(self):
        """
        A JSON body that does not parse, is not an object, or names C{model}
        twice is answered 400 C{invalid_request_error} and not forwarded.
        """
        await self._start()
        for raw in (
            b'{"model": "alpha", ',
            b'["model", "alpha"]',
            b'"alpha"',
            b'{"model": "alpha", "model": "beta"}',
            b'{"model": "alpha", "mod\\u0065l": "beta"}',
        ):
            response, body = await self.request(
                b"POST", "/vllm/v1/chat/completions", dict(auth(), **{"content-type": "application/json"}), raw
            )
            self.assertEqual(response.code, 400, raw)
            self.assertEqual(error_of(body)["type"], "invalid_request_error", raw)
        self.assertEqual(self.alpha.received + self.beta.received, [])


class HeaderTests(ProxyTestCase):
    """
    Which headers cross the proxy, in both directions.
    """

    async def test_request_headers(self):
        """
        The client's Authorization, x-api-key, Cookie, Connection, the
        headers Connection names and the other hop-by-hop headers are not
        forwarded; the deployment's api_key goes as Authorization: Bearer;
        X-Forwarded-For names the client; other headers pass unchanged.
        """
        upstream = await self.fake(served_model="alpha")
        self.proxy([deployment("alpha", "alpha", upstream, api_key=UPSTREAM_KEY)])
        raw = await self.raw(
            b"GET /vllm/version HTTP/1.1\r\nHost: client.example\r\n"
            b"Authorization: Bearer " + MASTER_KEY.encode() + b"\r\n"
            b"x-api-key: sk-other\r\nCookie: session=abc\r\n"
            b"Connection: X-Hop-Named, close\r\nX-Hop-Named: 1\r\nKeep-Alive: timeout=5\r\nTE: trailers\r\n"
            b"Trailer: X-T\r\nProxy-Authorization: Basic eDp5\r\nProxy-Foo: 1\r\n"
            b"X-Custom: Kept As Is\r\nUser-Agent: my-client/1.0\r\nX-Forwarded-For: 10.9.8.7\r\n"
            b"Accept-Encoding: gzip\r\nx-request-id: req-42\r\n\r\n"
        )
        self.assertEqual(parse_response(raw)[0], 200)
        headers = upstream.received[0].headers
        self.assertEqual(headers["authorization"], ["Bearer " + UPSTREAM_KEY])
        for name in ("x-api-key", "cookie", "x-hop-named", "keep-alive", "te", "trailer", "proxy-authorization", "proxy-foo"):
            self.assertNotIn(name, headers)
        self.assertNotIn("x-hop-named", " ".join(headers.get("connection", [])).lower())
        self.assertEqual(headers["x-custom"], ["Kept As Is"])
        self.assertEqual(headers["user-agent"], ["my-client/1.0"])
        self.assertEqual(headers["accept-encoding"], ["gzip"])
        self.assertEqual(headers["x-forwarded-for"], ["10.9.8.7, 127.0.0.1"])
        self.assertEqual(headers["host"], [f"127.0.0.1:{upstream.port}"])
        self.assertEqual(parse_response(raw)[1]["x-request-id"], [b"req-42"])

    async def test_no_deployment_key_no_authorization(self):
        """
        Without a deployment api_key, no Authorization header reaches the
        upstream (the client's is never forwarded).
        """
        upstream = await self.fake(served_model="alpha")
        self.proxy([deployment("alpha", "alpha", upstream)])
        response, _ = await self.request(b"GET", "/vllm/version", auth())
        self.assertEqual(response.code, 200)
        self.assertNotIn("authorization", upstream.received[0].headers)
        self.assertEqual(upstream.received[0].headers["x-forwarded-for"], ["127.0.0.1"])

    async def test_response_headers(self):
        """
        Upstream response headers pass unchanged (Set-Cookie, repeated
        headers, odd spacing, the reason phrase), except hop-by-hop ones;
        an upstream Set-Cookie is never replayed on a later upstream
        request.
        """
        requests: list = []
        answer = (
            b"HTTP/1.1 201 Made It\r\nContent-Type: application/x-thing; q=1\r\nContent-Length: 5\r\n"
            b"Connection: close, X-Up-Hop\r\nX-Up-Hop: 1\r\nKeep-Alive: timeout=5\r\n"
            b"Set-Cookie: upstream=1; Path=/\r\nX-Up: Value  With Spaces\r\nX-Multi: a\r\nX-Multi: b\r\n\r\nhello"
        )
        factory = Factory.forProtocol(lambda: CannedUpstream(answer, requests))
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        url = f"http://127.0.0.1:{port.getHost().port}"
        self.proxy([{"model_name": "m", "dheera_ai_params": {"model": "m", "api_base": url}}])
        for _ in range(2):
            response, body = await self.request(b"GET", "/vllm/x", auth())
            self.assertEqual((response.code, response.phrase, body), (201, b"Made It", b"hello"))
            h = response.headers
            self.assertEqual(h.getRawHeaders(b"content-type"), [b"application/x-thing; q=1"])
            self.assertEqual(h.getRawHeaders(b"set-cookie"), [b"upstream=1; Path=/"])
            self.assertEqual(h.getRawHeaders(b"x-up"), [b"Value  With Spaces"])
            self.assertEqual(h.getRawHeaders(b"x-multi"), [b"a", b"b"])
            # X-Up-Hop (named by the upstream's Connection) is not checked:
            # Agent hides the upstream's Connection header from the proxy.
            self.assertIsNone(h.getRawHeaders(b"keep-alive"))
        self.assertEqual(len(requests), 2)
        self.assertNotIn(b"\r\ncookie:", requests[1].lower())

    async def test_gzip_passed_through(self):
        """
        A gzip-encoded upstream answer reaches the client still encoded,
        with its Content-Encoding and the compressed length.
        """
        upstream = await self.fake(served_model="alpha")
        self.proxy([deployment("alpha", "alpha", upstream)])
        response, body = await self.chat(headers={"x-fake-fault": "gzip", "accept-encoding": "gzip"})
        self.assertEqual(response.code, 200)
        self.assertEqual(response.headers.getRawHeaders(b"content-encoding"), [b"gzip"])
        self.assertEqual(response.length, len(body))
        self.assertEqual(body[:2], b"\x1f\x8b")
        self.assertEqual(json.loads(gzip.decompress(body))["object"], "chat.completion")

    async def test_added_response_headers(self):
        """
        Every answer carries a fresh x-dheera-call-id and an
        x-dheera-overhead-duration-ms; the proxy's own errors carry the call
        id too.
        """
        upstream = await self.fake(served_model="alpha")
        self.proxy([deployment("alpha", "alpha", upstream)])
        ids = set()
        for _ in range(2):
            response, _ = await self.chat()
            self.assertEqual(response.code, 200)
            (call_id,) = response.headers.getRawHeaders(b"x-dheera-call-id")
            self.assertRegex(call_id, rb"^[0-9a-f]{32}$")
            ids.add(call_id)
            (overhead,) = response.headers.getRawHeaders(b"x-dheera-overhead-duration-ms")
            self.assertTrue(0 <= float(overhead) < 5000, overhead)
        self.assertEqual(len(ids), 2)
        response, _ = await self.request(b"GET", "/vllm/version")
        self.assertEqual(response.code, 401)
        self.assertRegex(response.headers.getRawHeaders(b"x-dheera-call-id")[0], rb"^[0-9a-f]{32}$")


class AuthTests(ProxyTestCase):
    """
    Authentication of pass-through calls.
    """

    async def _start(self):
        self.upstream = await self.fake(served_model="alpha")
        self.proxy([deployment("alpha", "alpha", self.upstream)])

    async def test_missing_or_wrong_key(self):
        """
        No key, a wrong bearer key, a wrong x-api-key, or a non-Bearer
        scheme are all 401 with one and the same body, and nothing is
        forwarded.
        """
        await self._start()
        bodies = []
        for headers in (
            {},
            auth("sk-wrong"),
            {"x-api-key": "sk-wrong"},
            {"authorization": "Basic " + MASTER_KEY},
            auth(MASTER_KEY + "x"),
        ):
            response, body = await self.request(b"GET", "/vllm/version", headers)
            self.assertEqual(response.code, 401, headers)
            bodies.append(body)
        self.assertEqual(len(set(bodies)), 1)
        self.assertEqual(error_of(bodies[0])["type"], "authentication_error")
        self.assertNotIn(MASTER_KEY.encode(), bodies[0])
        self.assertEqual(self.upstream.received, [])

    async def test_master_key(self):
        """
        The master key works as a Bearer token and as x-api-key.
        """
        await self._start()
        for headers in (auth(), {"x-api-key": MASTER_KEY}):
            response, _ = await self.request(b"GET", "/vllm/version", headers)
            self.assertEqual(response.code, 200, headers)
        self.assertEqual(len(self.upstream.received), 2)

    async def test_key_in_query_not_accepted(self):
        """
        A key in the query string (C{key}, C{api_key}, ...) does not
        authenticate, and nothing is forwarded.
        """
        await self._start()
        for name in ("key", "api_key", "x-api-key", "authorization"):
            response, body = await self.request(b"GET", f"/vllm/version?{name}={MASTER_KEY}")
            self.assertEqual(response.code, 401, name)
        self.assertEqual(self.upstream.received, [])
