"""
Hostile input on the listening side (issue 7): limits on the request head
and body, slow clients, the connection cap, request smuggling, path and
Host tricks, and hostile JSON and multipart bodies.  Real loopback sockets,
raw clients, FakeVLLM upstreams; every test also checks that nothing was
logged as a failure.
"""

import json

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet import reactor
from twisted.internet.protocol import Factory, Protocol

from dheera_tx.http.paths import path_problem, split_target
from tests.hostile import HostileTestCase, request_head, trickle, wait_until
from tests.passthrough_harness import (
    MASTER_KEY,
    auth,
    deployment,
    error_of,
    multipart,
    parse_response,
    sleep,
)
from tests.test_paths import ESCAPES

OCTETS = b"Content-Type: application/octet-stream"


class HeadLimitTests(HostileTestCase):
    """
    C{max_header_bytes}, C{max_headers} and C{header_timeout}.
    """

    async def _start(self, **general):
        self.upstream = await self.fake(served_model="alpha")
        limits = dict({"header_timeout": 1, "max_header_bytes": 4096, "max_headers": 20}, **general)
        self.proxy([deployment("alpha", "alpha", self.upstream)], general=limits)

    async def test_header_bytes_over_limit(self):
        """
        A request head over C{max_header_bytes} (one big header, or many
        small ones) gets 431 in the OpenAI shape, a request line over it
        414, at once and never forwarded; a head just under it works.
        """
        await self._start()
        error = await self.refused(request_head(b"/vllm/v1/models", b"X-Big: " + b"a" * 5000), 431)
        self.assertEqual(error["code"], "request_header_fields_too_large")
        many = [b"X-H%d: %s" % (i, b"b" * 300) for i in range(15)]
        await self.refused(request_head(b"/vllm/v1/models", *many), 431)
        await self.refused(request_head(b"/vllm/v1/" + b"m" * 5000), 414)
        self.assertEqual(self.upstream.received, [])
        answer = await self.raw(request_head(b"/vllm/v1/models", b"X-Big: " + b"a" * 3000))
        self.assertEqual(parse_response(answer)[0], 200)
        self.assertCleanLog()

    async def test_header_count_over_limit(self):
        """
        More than C{max_headers} headers get 431 and are never forwarded;
        exactly C{max_headers} work.
        """
        await self._start()
        # request_head adds Host, Authorization and Connection.
        await self.refused(request_head(b"/vllm/v1/models", *[b"X-H%d: 1" % i for i in range(18)]), 431)
        self.assertEqual(self.upstream.received, [])
        answer = await self.raw(request_head(b"/vllm/v1/models", *[b"X-H%d: 1" % i for i in range(17)]))
        self.assertEqual(parse_response(answer)[0], 200)
        self.assertCleanLog()

    async def test_slowloris_dropped_at_header_timeout(self):
        """
        Request headers trickled a byte at a time are dropped with 408 once
        C{header_timeout} has passed since the connection opened, although
        bytes keep arriving; nothing reaches the upstream.
        """
        await self._start()
        client = await self.raw_connect()
        started = reactor.seconds()
        sending = trickle(client, request_head(b"/vllm/v1/models") * 4, 0.1)
        answer = await client.closed(5)
        elapsed = reactor.seconds() - started
        await sending
        self.assertTrue(0.9 <= elapsed < 2.0, elapsed)
        status, _, body = parse_response(answer)
        self.assertEqual(status, 408)
        self.assertEqual(error_of(body)["code"], "request_timeout")
        self.assertEqual(self.upstream.received, [])
        self.assertCleanLog()

    async def test_idle_connections_closed(self):
        """
        A connection that sends nothing, and a keep-alive connection idle
        after its answer, are closed C{header_timeout} later, without an
        answer of their own.
        """
        await self._start()
        silent = await self.raw_connect()
        started = reactor.seconds()
        self.assertEqual(await silent.closed(5), b"")
        self.assertTrue(0.9 <= reactor.seconds() - started < 2.0)
        client = await self.raw_connect()
        client.transport.write(b"GET /vllm/v1/models HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + MASTER_KEY.encode() + b"\r\n\r\n")
        self.assertTrue(await wait_until(lambda: b"\r\n\r\n" in client.data))
        answered = reactor.seconds()
        raw = await client.closed(5)
        self.assertTrue(0.8 <= reactor.seconds() - answered < 2.0)
        self.assertEqual(parse_response(raw)[0], 200)
        self.assertEqual(raw.count(b"HTTP/1.1 "), 1)
        self.assertCleanLog()


class BodyLimitTests(HostileTestCase):
    """
    C{max_request_body_bytes} and C{body_timeout}, on both planes.
    """

    async def _start(self):
        self.upstream = await self.fake(served_model="alpha")
        self.proxy(
            [deployment("alpha", "alpha", self.upstream)],
            general={"body_timeout": 1, "max_request_body_bytes": 100_000},
        )

    def _upload(self, target: bytes, *headers: bytes) -> bytes:
        return request_head(target, OCTETS, *headers, method=b"POST")

    async def _upstream_aborted(self) -> None:
        self.assertTrue(await wait_until(lambda: self.upstream.open_connections == 0))
        self.assertFalse(any(r.body_done for r in self.upstream.received))

    async def test_declared_length_over_limit(self):
        """
        A Content-Length over the limit is answered 413 before any of the
        body is sent, on the pass-through and on the control plane; the
        upstream never sees the call.
        """
        await self._start()
        for target in (b"/vllm/v1/audio/transcriptions", b"/key/generate"):
            client = await self.raw_connect()
            client.transport.write(self._upload(target, b"Content-Length: 100001"))
            self.assertTrue(await wait_until(lambda: b"\r\n\r\n" in client.data, 1.0), target)
            status, _, body = parse_response(await client.closed())
            self.assertEqual(status, 413)
            self.assertEqual(error_of(body)["code"], "request_too_large")
        self.assertEqual(self.upstream.received, [])
        self.assertCleanLog()

    async def test_chunked_body_growing_over_limit(self):
        """
        A chunked body that grows past the limit gets 413 as the byte over
        the limit arrives (while the client is still sending), on the
        pass-through (whose upstream request is aborted before its body
        completed) and on the control plane.
        """
        await self._start()
        for target in (b"/vllm/v1/audio/transcriptions", b"/health"):
            client = await self.raw_connect()
            client.transport.write(self._upload(target, b"Transfer-Encoding: chunked"))
            sending = trickle(client, (b"2710\r\n" + b"a" * 10_000 + b"\r\n") * 30, 0.02, size=10_006)
            status, _, body = parse_response(await client.closed())
            self.assertFalse(sending.called, target)
            await sending
            self.assertEqual(status, 413, target)
            self.assertEqual(error_of(body)["code"], "request_too_large")
        self.assertEqual(len(self.upstream.received), 1)
        self.assertLessEqual(self.upstream.received[0].body_length, 100_000)
        await self._upstream_aborted()
        self.assertCleanLog()

    async def test_silent_body_dropped(self):
        """
        A body that stops arriving for C{body_timeout} is answered 408 and
        its connection closed; the pass-through's upstream request is
        aborted.
        """
        await self._start()
        for target in (b"/vllm/v1/audio/transcriptions", b"/health"):
            client = await self.raw_connect()
            client.transport.write(self._upload(target, b"Content-Length: 5000") + b"x" * 100)
            started = reactor.seconds()
            status, _, body = parse_response(await client.closed(5))
            self.assertTrue(0.9 <= reactor.seconds() - started < 2.0)
            self.assertEqual(status, 408, target)
            self.assertIn("stopped arriving", error_of(body)["message"])
        self.assertEqual(len(self.upstream.received), 1)
        await self._upstream_aborted()
        self.assertCleanLog()

    async def test_trickled_body_dropped(self):
        """
        A body trickled below the minimum rate, though never silent for
        C{body_timeout}, is answered 408 about C{body_timeout} after it
        started, and the upstream request is aborted.
        """
        await self._start()
        client = await self.raw_connect()
        client.transport.write(self._upload(b"/vllm/v1/audio/transcriptions", b"Content-Length: 5000"))
        started = reactor.seconds()
        sending = trickle(client, b"y" * 5000, 0.1, size=20)
        status, _, body = parse_response(await client.closed(5))
        elapsed = reactor.seconds() - started
        await sending
        self.assertTrue(0.9 <= elapsed < 2.0, elapsed)
        self.assertEqual(status, 408)
        self.assertIn("too slowly", error_of(body)["message"])
        await self._upstream_aborted()
        self.assertCleanLog()

    async def test_steady_body_not_dropped(self):
        """
        A body sent in pieces over more than C{body_timeout}, but well over
        the minimum rate, is forwarded whole.
        """
        await self._start()
        client = await self.raw_connect()
        client.transport.write(self._upload(b"/vllm/v1/audio/transcriptions", b"Content-Length: 60000"))
        sending = trickle(client, b"z" * 60_000, 0.1, size=4000)
        raw = await client.closed(5)
        await sending
        self.assertNotEqual(parse_response(raw)[0], 408)
        self.assertEqual([(r.body_length, r.body_done) for r in self.upstream.received], [(60_000, True)])
        self.assertCleanLog()


    async def test_held_body_not_dropped(self):
        """
        A body the upstream stops taking (so the proxy stops reading it) is
        not dropped as slow, however long the upstream holds it.
        """
        factory = Factory.forProtocol(NotReading)
        # A paused connection is out of the reactor's sight: held here so
        # the garbage collector cannot close (and reset) it mid-test.
        factory.connections = []
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        api_base = f"http://127.0.0.1:{port.getHost().port}"
        self.proxy(
            [{"model_name": "alpha", "dheera_ai_params": {"model": "alpha", "api_base": api_base, "timeout": 30}}],
            general={"body_timeout": 0.5, "max_request_body_bytes": 100_000_000},
        )
        client = await self.raw_connect()
        client.transport.write(self._upload(b"/vllm/v1/audio/transcriptions", b"Content-Length: 40000000") + b"w" * 40_000_000)
        await sleep(2.0)
        self.assertTrue(client.connected, client.data[:300])
        self.assertEqual(client.data, b"")
        self.assertCleanLog()


class NotReading(Protocol):
    """
    An upstream that accepts a connection and never reads from it.
    """

    def connectionMade(self):
        self.factory.connections.append(self)
        self.transport.pauseProducing()


class ConnectionCapTests(HostileTestCase):
    """
    C{general_settings.max_connections}.
    """

    async def test_connections_over_cap_closed(self):
        """
        With C{max_connections} connections open, the next one is answered
        503 in the OpenAI shape and closed at once; once one closes, a new
        connection is served again.
        """
        upstream = await self.fake(served_model="alpha")
        site = self.proxy([deployment("alpha", "alpha", upstream)], general={"max_connections": 3})
        held = [await self.raw_connect() for _ in range(3)]
        self.assertTrue(await wait_until(lambda: site.open_connections == 3))
        started = reactor.seconds()
        raw = await self.raw(request_head(b"/vllm/v1/models"), wait=2)
        self.assertLess(reactor.seconds() - started, 1.0)
        status, _, body = parse_response(raw)
        self.assertEqual(status, 503)
        self.assertEqual(error_of(body)["type"], "service_unavailable")
        self.assertEqual(upstream.received, [])
        self.assertEqual(site.refused_connections, 1)
        held[0].transport.abortConnection()
        self.assertTrue(await wait_until(lambda: site.open_connections == 2))
        raw = await self.raw(request_head(b"/vllm/v1/models"))
        self.assertEqual(parse_response(raw)[0], 200)
        self.assertTrue(await wait_until(lambda: site.open_connections == 2))


class SmugglingTests(HostileTestCase):
    """
    Ambiguous framing and duplicated headers: 400, never forwarded.
    """

    BODY = b"5\r\nhello\r\n0\r\n\r\n"

    FRAMINGS = [
        (b"Content-Length: 5", b"Transfer-Encoding: chunked"),
        (b"Transfer-Encoding: chunked", b"Content-Length: 5"),
        (b"Content-Length: 5", b"Content-Length: 5"),
        (b"Content-Length: 5", b"Content-Length: 6"),
        (b"Content-Length: +5",),
        (b"Content-Length: 5, 5",),
        (b"Transfer-Encoding: chunked, identity",),
        (b"Transfer-Encoding: identity, chunked",),
        (b"Transfer-Encoding: identity",),
        (b"Transfer-Encoding: xchunked",),
        (b"Transfer-Encoding: chunked ",),
        (b"Transfer-Encoding : chunked",),
        (b"Transfer-Encoding: chunked", b"Transfer-Encoding: chunked"),
        (b"Transfer-Encoding: chunked", b"Transfer-Encoding: identity"),
        (b"X-Folded: a", b" Transfer-Encoding: chunked"),
        (b"Transfer-Encoding:", b"\tchunked"),
    ]

    async def _start(self):
        self.upstream = await self.fake(served_model="alpha")
        self.proxy([deployment("alpha", "alpha", self.upstream)])

    async def test_plain_chunked_forwarded(self):
        """
        The one framing accepted, C{Transfer-Encoding: chunked}, is
        forwarded with its body (so the refusals below are about framing).
        """
        await self._start()
        raw = await self.raw(request_head(b"/vllm/tokenize", OCTETS, b"Transfer-Encoding: chunked", method=b"POST") + self.BODY)
        self.assertLess(parse_response(raw)[0], 500)
        self.assertEqual([(r.body, r.body_done) for r in self.upstream.received], [(b"hello", True)])
        self.assertCleanLog()

    async def test_whitespace_before_chunked(self):
        """
        Whitespace between the colon and C{chunked} is optional whitespace
        (RFC 9112): the body is read as chunked and forwarded with its own
        framing, so no parser downstream can read it differently.
        """
        await self._start()
        for framing in (b"Transfer-Encoding:  chunked", b"Transfer-Encoding:\tchunked"):
            before = len(self.upstream.received)
            raw = await self.raw(request_head(b"/vllm/tokenize", OCTETS, framing, method=b"POST") + self.BODY)
            self.assertLess(parse_response(raw)[0], 500, framing)
            received = self.upstream.received[before:]
            self.assertEqual([(r.body, r.body_done) for r in received], [(b"hello", True)], framing)
        self.assertCleanLog()

    async def test_ambiguous_framing_refused(self):
        """
        Content-Length with Transfer-Encoding, two Content-Lengths, any
        Transfer-Encoding but a plain C{chunked} (lists, identity, odd
        whitespace, a second header), and folded header lines are answered
        400 in the OpenAI shape; nothing reaches the upstream.
        """
        await self._start()
        for framing in self.FRAMINGS:
            raw = request_head(b"/vllm/v1/models", OCTETS, *framing, method=b"POST") + self.BODY
            error = await self.refused(raw)
            self.assertEqual(error["type"], "invalid_request_error", framing)
        self.assertEqual(self.upstream.received, [])
        self.assertCleanLog()

    async def test_malformed_chunk_mid_body(self):
        """
        A chunked upload that turns malformed after it started streaming
        upstream is answered 400 in the OpenAI shape, and the upstream
        request is aborted before its body completed.
        """
        await self._start()
        client = await self.raw_connect()
        client.transport.write(
            request_head(b"/vllm/v1/audio/transcriptions", OCTETS, b"Transfer-Encoding: chunked", method=b"POST")
            + b"400\r\n" + b"a" * 1024 + b"\r\n"
        )
        self.assertTrue(await wait_until(lambda: self.upstream.received and self.upstream.received[0].body_length == 1024))
        client.transport.write(b"zz\r\nnot a chunk\r\n")
        status, _, body = parse_response(await client.closed())
        self.assertEqual(status, 400)
        self.assertEqual(error_of(body)["type"], "invalid_request_error")
        self.assertTrue(await wait_until(lambda: self.upstream.open_connections == 0))
        self.assertFalse(self.upstream.received[0].body_done)
        self.assertCleanLog()

    async def test_duplicated_headers_refused(self):
        """
        A second Host, Content-Type, Authorization, x-api-key or
        x-dheera-model (which the proxy and vLLM could each read
        differently) is answered 400 and not forwarded.
        """
        await self._start()
        for duplicated in (
            (b"Host: evil",),
            (b"Authorization: Bearer sk-other",),
            (b"Content-Type: application/json", b"content-type: text/plain"),
            (b"x-api-key: sk-one", b"X-API-Key: sk-two"),
            (b"x-dheera-model: alpha", b"X-Dheera-Model: beta"),
        ):
            # request_head already sends one Host and one Authorization.
            error = await self.refused(request_head(b"/vllm/v1/models", *duplicated))
            self.assertIn("more than once", error["message"])
        self.assertEqual(self.upstream.received, [])
        self.assertCleanLog()


class TargetTests(HostileTestCase):
    """
    Request targets and Host headers that try to leave the configured
    upstream or the pass-through.
    """

    EXTRA = [
        b"/v1/models;x",
        b"/sleep;/x",
        b"/v1/models%3Bx",
        b"/sl%65ep",
        b"/v1/%6Dodels",
        b"/%2e%2e%2fkey/list",
        b"/v1/models\x00",
        b"/\xc0\xae\xc0\xae/key/list",
        b"/%c0%af%c0%afkey",
        b"/%e0%80%ae%e0%80%ae/x",
        b"/a\nb",
        b"/a\rb",
        b"/a\tb",
        b"/caf\xc3\xa9",
    ]

    async def _start(self):
        self.upstream = await self.fake(served_model="alpha")
        self.evil = await self.fake(served_model="alpha")
        self.proxy([deployment("alpha", "alpha", self.upstream)])

    async def test_escapes_refused(self):
        """
        The path-escape corpus, path parameters, escaped unreserved
        characters (C{/sl%65ep} would be C{/sleep} to vLLM), NUL, overlong
        UTF-8 and raw control or non-ASCII bytes are answered 400 in the
        OpenAI shape; the upstream sees none of them.
        """
        await self._start()
        for path in ESCAPES + self.EXTRA:
            error = await self.refused(request_head(b"/vllm" + path))
            self.assertEqual(error["type"], "invalid_request_error", path)
        self.assertEqual(self.upstream.received, [])
        self.assertCleanLog()

    async def test_absolute_form_and_host_tricks(self):
        """
        Absolute-form targets (naming another host, for the pass-through
        or an admin route) are answered 400; targets with C{//host} or a
        dot segment in front of C{/vllm} never reach an upstream; odd Host
        headers are ignored: the configured upstream is called with its
        own Host.
        """
        await self._start()
        evil = f"127.0.0.1:{self.evil.port}".encode()
        for target in (b"http://" + evil + b"/vllm/v1/models", b"https://evil/vllm/v1/models", b"http://evil/key/list", b"evil/vllm/v1/models"):
            await self.refused(request_head(target))
        for target in (b"//" + evil + b"/vllm/v1/models", b"/./vllm/v1/models", b"/x/../vllm/v1/models", b"/vllm/..//" + evil + b"/v1/models"):
            status = parse_response(await self.raw(request_head(target)))[0]
            self.assertTrue(400 <= status < 500, (target, status))
        for host in (evil, b"evil.example", b"", b"127.0.0.1:1", evil + b"/v1/models", b"user@" + evil):
            raw = b"GET /vllm/version HTTP/1.1\r\nHost: " + host + b"\r\nAuthorization: Bearer " + MASTER_KEY.encode() + b"\r\nConnection: close\r\n\r\n"
            self.assertEqual(parse_response(await self.raw(raw))[0], 200, host)
        self.assertEqual(self.evil.received, [])
        self.assertEqual(len(self.upstream.received), 6)
        for record in self.upstream.received:
            self.assertEqual(record.headers["host"], [f"127.0.0.1:{self.upstream.port}"])
            self.assertEqual(record.uri, b"/version")
        self.assertCleanLog()

    async def test_generated_targets(self):
        """
        For generated raw targets below C{/vllm} (built from dots, slashes,
        escapes, semicolons, NUL, spaces, high bytes, queries), the proxy
        always answers in time and never with a 5xx; a target the path
        check refuses never reaches the upstream, and one that reaches it
        arrives byte for byte.
        """
        pieces = [
            b"/", b".", b"..", b"%", b"%2e", b"%2E", b"%2f", b"%5c", b"\\", b";", b"%3b", b"\x00", b"%00",
            b" ", b"\t", b"%c0%ae", b"\xc0", b"\xff", b"\xc3\xa9", b"%c3%a9", b"%65", b"%20", b"%25", b"?",
            b"#", b"&", b"=", b"model", b"v1", b"sleep", b"a", b"~", b"-", b"+", b"@", b":", b"//",
        ]
        targets = []

        @settings(max_examples=150, database=None, deadline=None)
        @given(st.lists(st.sampled_from(pieces), max_size=8))
        def collect(chosen):
            targets.append(b"/vllm/" + b"".join(chosen))

        collect()
        await self._start()
        for target in targets:
            before = len(self.upstream.received)
            answer = await self.raw(request_head(target), wait=3)
            status = parse_response(answer)[0]
            self.assertLess(status, 500, target)
            path, query = split_target(target)
            hits = self.upstream.received[before:]
            if path_problem(path, query) is not None:
                self.assertEqual((status, hits), (400, []), target)
            # The target goes upstream byte for byte (an empty query too).
            sent = path + query
            for record in hits:
                self.assertEqual(record.uri, sent, target)
        self.assertEqual(self.evil.received, [])
        self.assertCleanLog()


class JSONBodyTests(HostileTestCase):
    """
    Hostile JSON bodies: clear 400s, and the model checked is the model
    forwarded.
    """

    async def _start(self):
        self.alpha = await self.fake(served_model="alpha-served")
        self.beta = await self.fake(served_model="beta-served")
        self.proxy(
            [deployment("alpha", "alpha-served", self.alpha), deployment("beta", "beta-served", self.beta)],
            general={"max_request_body_bytes": 1_000_000},
        )

    async def _post(self, body: bytes, content_type="application/json", headers=None):
        h = dict(auth(), **(headers or {}))
        if content_type is not None:
            h["content-type"] = content_type
        return await self.request(b"POST", "/vllm/v1/chat/completions", h, body)

    async def _refused(self, body: bytes, content_type="application/json") -> dict:
        response, answer = await self._post(body, content_type)
        self.assertEqual(response.code, 400, (body[:80], answer))
        error = error_of(answer)
        self.assertEqual(error["type"], "invalid_request_error")
        return error

    def _no_upstream(self) -> None:
        self.assertEqual((self.alpha.received, self.beta.received), ([], []))

    def _chat(self, **fields) -> dict:
        return dict({"model": "alpha", "messages": [{"role": "user", "content": "hi"}]}, **fields)

    async def test_malformed_and_non_object(self):
        """
        Bodies that are not JSON, not UTF-8 (UTF-16, a byte-order mark,
        Latin-1) or not a JSON object get 400 in the OpenAI shape and are
        not forwarded.
        """
        await self._start()
        document = json.dumps(self._chat())
        bodies = [
            b"{", b'{"model": "alpha",}', b"{'model': 'alpha'}", b"\x00\x01\x02", document.encode() + b" trailing",
            document.encode("utf-16"), b"\xef\xbb\xbf" + document.encode(), b'{"model": "caf\xe9"}',
            b"[]", b'"alpha"', b"1", b"null", b"true", b"NaN", b"[" + document.encode() + b"]",
            b'{"model": "alpha", "n": ' + b"9" * 5000 + b"}",
        ]
        for body in bodies:
            await self._refused(body)
        self._no_upstream()
        self.assertCleanLog()

    async def test_deeply_nested(self):
        """
        100k nested brackets (alone or inside an object) get 400, not a
        crash; nesting a few hundred deep is forwarded.
        """
        await self._start()
        await self._refused(b"[" * 100_000)
        await self._refused(b'{"model": "alpha", "x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}")
        self._no_upstream()
        body = json.dumps(self._chat()).encode()[:-1] + b', "x": ' + b"[" * 300 + b"]" * 300 + b"}"
        response, _ = await self._post(body)
        self.assertEqual(response.code, 200)
        self.assertEqual(self.alpha.received[0].json["model"], "alpha-served")
        self.assertCleanLog()

    async def test_near_the_size_limit(self):
        """
        A valid body just under C{max_request_body_bytes} is forwarded (its
        model rewritten); one byte over the limit gets 413.
        """
        await self._start()
        base = json.dumps(self._chat(pad="")).encode()
        body = json.dumps(self._chat(pad="p" * (1_000_000 - len(base)))).encode()
        self.assertEqual(len(body), 1_000_000)
        response, _ = await self._post(body)
        self.assertEqual(response.code, 200)
        self.assertEqual(self.alpha.received[0].json["model"], "alpha-served")
        response, answer = await self._post(body[:-1] + b' }')
        self.assertEqual(response.code, 413)
        self.assertEqual(error_of(answer)["code"], "request_too_large")
        self.assertEqual(len(self.alpha.received), 1)
        self.assertCleanLog()

    async def test_model_named_twice(self):
        """
        C{model} twice, also as a C{\\u} escape, gets 400; a model named
        only through an escape is the model routed and forwarded; a
        C{model} field nested deeper is not a second one.
        """
        await self._start()
        await self._refused(b'{"model": "alpha", "model": "beta", "messages": []}')
        await self._refused(b'{"model": "alpha", "mod\\u0065l": "beta", "messages": []}')
        await self._refused(b'{"\\u006dodel": "beta", "model": "alpha", "messages": []}')
        self._no_upstream()
        response, _ = await self._post(b'{"mod\\u0065l": "beta", "messages": [{"role": "user", "content": "hi"}]}')
        self.assertEqual(response.code, 200)
        self.assertEqual([r.json["model"] for r in self.beta.received], ["beta-served"])
        nested = self._chat(messages=[{"role": "user", "content": "hi", "model": "beta"}])
        response, _ = await self._post(json.dumps(nested).encode())
        self.assertEqual(response.code, 200)
        self.assertEqual(len(self.alpha.received), 1)
        self.assertCleanLog()

    async def test_content_types(self):
        """
        A body with no Content-Type is read as JSON (as FastAPI, in front
        of vLLM, reads it), so its model, not the header's, is checked and
        routed, and a non-JSON one gets 400; JSON media types in any case
        or with parameters are parsed too; a text/plain body is forwarded
        untouched, routed by the header.
        """
        await self._start()
        header = {"x-dheera-model": "alpha"}
        await self._post(json.dumps(self._chat(model="beta")).encode(), None, header)
        self.assertEqual((len(self.alpha.received), len(self.beta.received)), (0, 1))
        response, _ = await self._post(b"not json", None, header)
        self.assertEqual(response.code, 400)
        for kind in ("APPLICATION/JSON", "application/json; charset=utf-8", "application/vnd.x+json"):
            await self._post(json.dumps(self._chat(model="beta")).encode(), kind, header)
        self.assertEqual((len(self.alpha.received), len(self.beta.received)), (0, 4))
        self.assertEqual(self.beta.received[2].json["model"], "beta-served")
        plain = json.dumps(self._chat(model="beta")).encode()
        await self._post(plain, "text/plain", header)
        self.assertEqual(len(self.alpha.received), 1)
        self.assertEqual(self.alpha.received[0].body, plain)
        self.assertCleanLog()

    async def test_lone_surrogate(self):
        """
        A lone surrogate escape in a body whose model is rewritten is
        forwarded as valid JSON, the escape kept.
        """
        await self._start()
        body = b'{"model": "alpha", "messages": [{"role": "user", "content": "\\ud800 hi"}]}'
        response, _ = await self._post(body)
        self.assertEqual(response.code, 200)
        forwarded = self.alpha.received[0].json
        self.assertEqual(forwarded["model"], "alpha-served")
        self.assertEqual(forwarded["messages"][0]["content"], "\ud800 hi")
        self.assertCleanLog()


class MultipartTests(HostileTestCase):
    """
    Multipart forms read the way vLLM reads them.
    """

    BOUNDARY = b"hostile-boundary"

    async def _start(self):
        self.alpha = await self.fake(served_model="alpha")
        self.beta = await self.fake(served_model="beta")
        self.proxy([deployment("alpha", "alpha", self.alpha), deployment("beta", "beta", self.beta)])

    async def _upload(self, body: bytes, content_type: bytes = None):
        content_type = content_type or b"multipart/form-data; boundary=" + self.BOUNDARY
        return await self.request(
            b"POST", "/vllm/v1/audio/transcriptions", dict(auth(), **{"content-type": content_type.decode()}), body
        )

    def _form(self, *parts: bytes) -> bytes:
        out = b""
        for part in parts:
            out += b"--" + self.BOUNDARY + b"\r\n" + part + b"\r\n"
        return out + b"--" + self.BOUNDARY + b"--\r\n"

    FILE = b'Content-Disposition: form-data; name="file"; filename="a.wav"\r\nContent-Type: audio/wav\r\n\r\n' + b"\x01" * 5000

    async def test_model_named_twice(self):
        """
        A form naming C{model} twice, before or after the file part (vLLM
        takes the last), gets 400 and the upstream never gets the whole
        form.
        """
        await self._start()
        model = b'Content-Disposition: form-data; name="model"\r\n\r\n'
        for body in (
            self._form(model + b"alpha", model + b"beta", self.FILE),
            self._form(model + b"alpha", self.FILE, model + b"beta"),
            self._form(model + b"alpha", self.FILE, b"Content-Disposition: form-data; name=model\r\n\r\nbeta"),
        ):
            response, answer = await self._upload(body)
            self.assertEqual(response.code, 400, answer)
            self.assertEqual(error_of(answer)["param"], "model")
        self.assertFalse(any(r.body_done for r in self.alpha.received + self.beta.received))
        self.assertCleanLog()

    async def test_form_model_wins_over_header(self):
        """
        vLLM uses the form's C{model}: a header or query naming another
        model gets 400 (so a restricted key cannot pass the check with one
        model and use another); naming the same model, or only the form,
        routes by the form.
        """
        await self._start()
        model = b'Content-Disposition: form-data; name="model"\r\n\r\n'
        body = self._form(model + b"beta", self.FILE)
        for extra in ({"x-dheera-model": "alpha"},):
            response, answer = await self.request(
                b"POST",
                "/vllm/v1/audio/transcriptions",
                dict(auth(), **{"content-type": "multipart/form-data; boundary=" + self.BOUNDARY.decode()}, **extra),
                body,
            )
            self.assertEqual(response.code, 400, answer)
            self.assertEqual(error_of(answer)["param"], "model")
        response, answer = await self.request(
            b"POST",
            "/vllm/v1/audio/transcriptions?model=alpha",
            dict(auth(), **{"content-type": "multipart/form-data; boundary=" + self.BOUNDARY.decode()}),
            body,
        )
        self.assertEqual(response.code, 400, answer)
        self.assertEqual(self.alpha.received, [])
        response, answer = await self.request(
            b"POST",
            "/vllm/v1/audio/transcriptions",
            dict(auth(), **{"content-type": "multipart/form-data; boundary=" + self.BOUNDARY.decode(), "x-dheera-model": "beta"}),
            body,
        )
        self.assertEqual(response.code, 200, answer)
        self.assertEqual(len(self.beta.received), 1)
        self.assertEqual(self.alpha.received, [])
        self.assertCleanLog()

    async def test_parameters_parsed_like_vllm(self):
        """
        An unquoted or RFC 2231 C{name}, and a C{boundary} after a look-alike
        parameter, are read as vLLM reads them, so the model is found; a
        boundary given twice gets 400.
        """
        await self._start()
        for disposition in (b"form-data; name=model", b'form-data; NAME = "model"', b"form-data; name*=utf-8''model"):
            body = self._form(b"Content-Disposition: " + disposition + b"\r\n\r\nbeta", self.FILE)
            response, answer = await self._upload(body)
            self.assertNotEqual(response.code, 404, (disposition, answer))
        body = multipart(self.BOUNDARY, [("model", b"beta", None), ("file", b"\x01" * 100, "a.wav")])
        response, _ = await self._upload(body, b"multipart/form-data; xboundary=nope; boundary=" + self.BOUNDARY)
        self.assertEqual(response.code, 200)
        self.assertEqual(len(self.beta.received), 4)
        response, answer = await self._upload(body, b"multipart/form-data; boundary=nope; boundary=" + self.BOUNDARY)
        self.assertEqual(response.code, 400)
        self.assertEqual(self.alpha.received, [])
        self.assertEqual(len(self.beta.received), 4)
        self.assertCleanLog()
