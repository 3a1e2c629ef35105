"""
Tests of L{dheera_tx.upstream.client}: over real loopback sockets against
scripted raw servers (which make the edge cases reachable) and the fake
vLLM, plus a few in-memory checks of what goes on the wire.
"""

import json
import os
from typing import List

from twisted.internet import reactor
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.error import ConnectionAborted, ConnectionDone, ConnectionLost
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase

from dheera_tx.upstream.client import (
    UpstreamFailed,
    UpstreamMalformed,
    UpstreamPool,
    UpstreamUnreachable,
)
from tests.fake_vllm import FakeVLLM
from tests.scripted_upstream import (
    BytesBody,
    ScriptedBody,
    ScriptedServer,
    Sink,
    read_body,
    refused_port,
    sleep,
    wait_until,
)
from tests.tls_upstream import TLSUpstream, self_signed_localhost
from tests.waiting import settled, stays_below

OK_HELLO = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-Answer: yes\r\n\r\nhello"


class _PoolCase(TestCase):
    """
    Gives each test a pool, closed in cleanup.
    """

    idle_timeout = 4.0
    max_idle = 128
    timeout = 20

    def setUp(self):
        self.pool = UpstreamPool(reactor, max_idle_per_endpoint=self.max_idle, idle_timeout=self.idle_timeout)
        self.addCleanup(self.pool.close)

    def get(self, server, method=b"GET", target=b"/x", headers=(), body=None, **kw) -> Deferred:
        """
        :return: the response Deferred of a request to C{server}.
        """
        return self.pool.request("127.0.0.1", server.port, 5.0, method, target, list(headers), body, **kw)


class ResponseFramingTests(_PoolCase):
    """
    Response bodies delimited every way HTTP/1.1 allows.
    """

    async def test_content_length(self):
        """
        A Content-Length body arrives whole, with the head as received, and
        the connection goes back to the pool.
        """
        server = ScriptedServer(lambda c, r: c.write(OK_HELLO)).start(self)
        response = await self.get(server)
        self.assertEqual((response.code, response.phrase, response.version), (200, b"OK", (1, 1)))
        self.assertEqual(response.headers, [(b"Content-Length", b"5"), (b"X-Answer", b"yes")])
        self.assertEqual(response.length, 5)
        self.assertEqual(response.head_bytes, len(b"Content-Length5") + 4 + len(b"X-Answeryes") + 4)
        sink = await read_body(response)
        self.assertEqual((sink.body, sink.reason, sink.ended), (b"hello", None, 1))
        self.assertEqual(self.pool.idle_connections(), 1)

    async def test_chunked(self):
        """
        A chunked body arrives without its framing, length None, and the
        connection is reused.
        """
        server = ScriptedServer(lambda c, r: c.write(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"3\r\nabc\r\n5;ext=1\r\ndefgh\r\n0\r\n\r\n"
        )).start(self)
        response = await self.get(server)
        self.assertIsNone(response.length)
        sink = await read_body(response)
        self.assertEqual((sink.body, sink.reason), (b"abcdefgh", None))
        self.assertEqual(self.pool.idle_connections(), 1)

    async def test_close_delimited(self):
        """
        A body without Content-Length or chunking ends cleanly when the
        server closes the connection, which is not reused.
        """
        def respond(c, r):
            c.write(b"HTTP/1.1 200 OK\r\n\r\npart one, ")
            reactor.callLater(0.05, c.write, b"part two")
            reactor.callLater(0.1, c.transport.loseConnection)

        server = ScriptedServer(respond).start(self)
        response = await self.get(server)
        self.assertIsNone(response.length)
        sink = await read_body(response)
        self.assertEqual((sink.body, sink.reason), (b"part one, part two", None))
        self.assertEqual(self.pool.idle_connections(), 0)

    async def test_close_delimited_reset(self):
        """
        A close-delimited body cut by a reset ends with a Failure.
        """
        def respond(c, r):
            c.write(b"HTTP/1.1 200 OK\r\n\r\npart one")
            reactor.callLater(0.05, c.transport.abortConnection)

        server = ScriptedServer(respond).start(self)
        sink = await read_body(await self.get(server))
        self.assertEqual(sink.body, b"part one")
        self.assertTrue(sink.reason.check(ConnectionLost))

    async def test_truncated_content_length(self):
        """
        A Content-Length body cut short by a clean close ends with a
        Failure, not as complete.
        """
        def respond(c, r):
            c.write(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
            c.transport.loseConnection()

        server = ScriptedServer(respond).start(self)
        sink = await read_body(await self.get(server))
        self.assertEqual(sink.body, b"abc")
        self.assertIsInstance(sink.reason, Failure)

    async def test_head_with_content_length(self):
        """
        The answer to HEAD has no body even with a Content-Length, and the
        connection carries the next request.
        """
        def respond(c, r):
            if r.method == b"HEAD":
                c.write(b"HTTP/1.1 200 OK\r\nContent-Length: 1234\r\n\r\n")
            else:
                c.write(OK_HELLO)

        server = ScriptedServer(respond).start(self)
        response = await self.get(server, method=b"HEAD")
        self.assertEqual(response.length, 0)
        self.assertIn((b"Content-Length", b"1234"), response.headers)
        sink = await read_body(response)
        self.assertEqual((sink.body, sink.reason), (b"", None))
        self.assertEqual(self.pool.idle_connections(), 1)
        sink = await read_body(await self.get(server))
        self.assertEqual((sink.body, sink.reason), (b"hello", None))
        self.assertEqual(len(server.connections), 1)

    async def test_head_with_trailing_bytes(self):
        """
        Bytes after the head of a HEAD answer (a body the server should not
        send) make the connection unusable: it is not reused.
        """
        server = ScriptedServer(lambda c, r: c.write(
            b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello"
        )).start(self)
        sink = await read_body(await self.get(server, method=b"HEAD"))
        self.assertEqual((sink.body, sink.reason), (b"", None))
        self.assertEqual(self.pool.idle_connections(), 0)

    async def test_no_content(self):
        """
        A 204 has no body (length 0) and keeps the connection.
        """
        server = ScriptedServer(lambda c, r: c.write(b"HTTP/1.1 204 No Content\r\n\r\n")).start(self)
        response = await self.get(server, method=b"DELETE")
        self.assertEqual((response.code, response.length), (204, 0))
        sink = await read_body(response)
        self.assertEqual((sink.body, sink.reason), (b"", None))
        self.assertEqual(self.pool.idle_connections(), 1)

    async def test_interim_responses_skipped(self):
        """
        100 and 103 interim responses are skipped: the Deferred fires with
        the final response and its own headers only.
        """
        def respond(c, r):
            c.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            c.write(b"HTTP/1.1 103 Early Hints\r\nLink: </a>; rel=preload\r\n\r\n")
            reactor.callLater(0.02, c.write, OK_HELLO)

        server = ScriptedServer(respond).start(self)
        response = await self.get(server)
        self.assertEqual(response.code, 200)
        self.assertEqual([n for n, _ in response.headers], [b"Content-Length", b"X-Answer"])
        sink = await read_body(response)
        self.assertEqual(sink.body, b"hello")
        self.assertEqual(self.pool.idle_connections(), 1)

    async def test_switching_protocols_not_reused(self):
        """
        A 101 is a complete response without a body, and its connection is
        closed rather than reused.
        """
        server = ScriptedServer(lambda c, r: c.write(
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\nframes"
        )).start(self)
        response = await self.get(server)
        self.assertEqual((response.code, response.length), (101, 0))
        sink = await read_body(response)
        self.assertEqual((sink.body, sink.reason), (b"", None))
        self.assertEqual(self.pool.idle_connections(), 0)
        await wait_until(lambda: server.connections[0].lost)


class KeepAliveTests(_PoolCase):
    """
    The pool of persistent connections.
    """

    def small_pool(self, **kw) -> UpstreamPool:
        """
        :return: a pool with other settings, closed in cleanup.
        """
        pool = UpstreamPool(reactor, **kw)
        self.addCleanup(pool.close)
        return pool

    async def test_reuse(self):
        """
        Two sequential requests go over one connection.
        """
        server = ScriptedServer(lambda c, r: c.write(OK_HELLO)).start(self)
        for _ in range(2):
            sink = await read_body(await self.get(server))
            self.assertEqual(sink.body, b"hello")
        self.assertEqual(len(server.connections), 1)
        self.assertEqual(len(server.connections[0].requests), 2)

    async def test_connection_close_not_reused(self):
        """
        A response with Connection: close leaves nothing in the pool.
        """
        server = ScriptedServer(lambda c, r: c.write(
            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok"
        )).start(self)
        sink = await read_body(await self.get(server))
        self.assertEqual((sink.body, sink.reason), (b"ok", None))
        self.assertEqual(self.pool.idle_connections(), 0)
        await wait_until(lambda: server.connections[0].lost)

    async def test_bytes_after_response_not_reused(self):
        """
        Bytes after the end of a response (nothing asked for them) keep the
        connection out of the pool.
        """
        server = ScriptedServer(lambda c, r: c.write(OK_HELLO + b"HTTP/1.1 200 OK\r\n")).start(self)
        sink = await read_body(await self.get(server))
        self.assertEqual((sink.body, sink.reason), (b"hello", None))
        self.assertEqual(self.pool.idle_connections(), 0)

    async def test_unsolicited_bytes_on_idle_connection(self):
        """
        An idle connection that receives bytes is dropped from the pool.
        """
        server = ScriptedServer(lambda c, r: c.write(OK_HELLO)).start(self)
        await read_body(await self.get(server))
        self.assertEqual(self.pool.idle_connections(), 1)
        server.connections[0].write(b"HTTP/1.1 408 Request Timeout\r\n\r\n")
        await wait_until(lambda: server.connections[0].lost, timeout=1.0)
        self.assertEqual(self.pool.idle_connections(), 0)

    async def test_idle_timeout(self):
        """
        An idle connection is closed after idle_timeout.
        """
        self.pool = self.small_pool(idle_timeout=0.3)
        server = ScriptedServer(lambda c, r: c.write(OK_HELLO)).start(self)
        await read_body(await self.get(server))
        await sleep(0.1)
        self.assertEqual(self.pool.idle_connections(), 1)
        self.assertFalse(server.connections[0].lost)
        await wait_until(lambda: server.connections[0].lost, timeout=1.0)
        self.assertEqual(self.pool.idle_connections(), 0)
        sink = await read_body(await self.get(server))
        self.assertEqual(sink.body, b"hello")
        self.assertEqual(len(server.connections), 2)

    async def test_server_closes_idle(self):
        """
        An idle connection the server closes leaves the pool; the next
        request gets a new connection and succeeds.
        """
        server = ScriptedServer(lambda c, r: c.write(OK_HELLO)).start(self)
        await read_body(await self.get(server))
        server.connections[0].transport.loseConnection()
        await wait_until(lambda: self.pool.idle_connections() == 0, timeout=1.0)
        sink = await read_body(await self.get(server))
        self.assertEqual((sink.body, sink.reason), (b"hello", None))
        self.assertEqual(len(server.connections), 2)

    async def test_max_idle_per_endpoint(self):
        """
        At most max_idle_per_endpoint connections stay idle; the oldest
        extra one is closed.
        """
        self.pool = self.small_pool(max_idle_per_endpoint=2)
        held = []
        server = ScriptedServer(lambda c, r: held.append(c)).start(self)
        ds = [self.get(server) for _ in range(3)]
        await wait_until(lambda: len(held) == 3)
        for c in held:
            c.write(OK_HELLO)
        for d in ds:
            await read_body(await d)
        self.assertEqual(self.pool.idle_connections(), 2)
        await wait_until(lambda: sum(c.lost for c in held) == 1)


class ResponseFlowTests(_PoolCase):
    """
    Delivering the response body: buffering, backpressure, stopping.
    """

    async def test_buffered_before_deliver(self):
        """
        Body bytes that arrive before deliver() are kept and delivered
        first, in order.
        """
        def respond(c, r):
            c.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n")
            reactor.callLater(0.05, c.write, b"3\r\ndef\r\n")
            reactor.callLater(0.1, c.write, b"0\r\n\r\n")

        server = ScriptedServer(respond).start(self)
        response = await self.get(server)
        await sleep(0.2)
        sink = await read_body(response)
        self.assertEqual((sink.body, sink.reason), (b"abcdef", None))
        self.assertEqual(self.pool.idle_connections(), 1)

    async def test_response_backpressure(self):
        """
        A paused response delivers nothing more and stops reading, so the
        upstream's producer stalls: what it writes stays bounded (socket
        buffers may still take a piece as they grow); resuming delivers the
        rest.
        """
        fake = FakeVLLM(reactor)
        await fake.start()
        self.addCleanup(fake.stop)
        total = 64 * 1024 * 1024
        response = await self.pool.request(
            "127.0.0.1", fake.port, 5.0, b"GET", b"/v1/models", [(b"x-fake-fault", b"big_body=%d" % (total,))], None
        )
        self.assertEqual(response.length, total)
        sink = Sink(pause_after=1)
        sink.response = response
        response.deliver(sink)
        await wait_until(lambda: sink.chunks)
        bound = total // 4
        await settled(lambda: min(fake.big_body_written, bound))
        await stays_below(lambda: fake.big_body_written, bound, 0.5)
        # Nothing was delivered while paused (no kernel involved: exact).
        self.assertEqual(len(sink.chunks), 1)
        sink._pause_after = None
        response.resumeProducing()
        await sink.done
        self.assertEqual((len(sink.body), sink.reason), (total, None))

    async def test_stop_producing(self):
        """
        stopProducing mid-body aborts the connection; the sink gets
        body_ended(Failure) once, and nothing is pooled.
        """
        server = ScriptedServer(lambda c, r: c.write(
            b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nsome"
        )).start(self)
        response = await self.get(server)
        sink = Sink()
        response.deliver(sink)
        await wait_until(lambda: sink.chunks)
        response.stopProducing()
        await sink.done
        self.assertTrue(sink.reason.check(ConnectionAborted))
        await wait_until(lambda: server.connections[0].lost)
        self.assertEqual((sink.ended, self.pool.idle_connections()), (1, 0))


class FailureTests(_PoolCase):
    """
    How a request fails.
    """

    async def test_connect_refused(self):
        """
        A refused connection fails with UpstreamUnreachable.
        """
        d = self.pool.request("127.0.0.1", refused_port(), 5.0, b"GET", b"/", [], None)
        e = await self.assertFailure(d, UpstreamUnreachable)
        self.assertIn("refused", e.reason.lower())

    async def test_reset_before_head(self):
        """
        A connection lost before the head fails with UpstreamFailed, with
        reused False on a new connection and True on a pooled one (for a
        POST, which is never sent again).
        """
        answers = [OK_HELLO, None]

        def respond(c, r):
            answer = answers.pop(0)
            if answer is None:
                c.transport.abortConnection()
            else:
                c.write(answer)

        server = ScriptedServer(respond).start(self)
        await read_body(await self.get(server))
        e = await self.assertFailure(self.get(server, method=b"POST", body=b"{}"), UpstreamFailed)
        self.assertTrue(e.reused)
        server.respond = lambda c, r: c.transport.abortConnection()
        e = await self.assertFailure(self.get(server), UpstreamFailed)
        self.assertFalse(e.reused)
        self.assertEqual(self.pool.idle_connections(), 0)

    async def test_oversized_head(self):
        """
        Response header lines over max_head_bytes fail with
        UpstreamMalformed and the connection is aborted.
        """
        big = b"HTTP/1.1 200 OK\r\n" + b"".join(b"X-Pad-%d: %s\r\n" % (i, b"p" * 1000) for i in range(10)) + b"\r\n"
        server = ScriptedServer(lambda c, r: c.write(big)).start(self)
        await self.assertFailure(self.get(server, max_head_bytes=4000), UpstreamMalformed)
        await wait_until(lambda: server.connections[0].lost)
        response = await self.get(server, max_head_bytes=20000)
        self.assertEqual(len(response.headers), 10)
        response.stopProducing()

    async def test_endless_header_line(self):
        """
        One header line that never ends is cut off once it passes the
        head limit.
        """
        server = ScriptedServer(lambda c, r: c.write(b"HTTP/1.1 200 OK\r\nX-Long: " + b"a" * 50000)).start(self)
        await self.assertFailure(self.get(server, max_head_bytes=1000), UpstreamMalformed)

    async def test_garbage_head(self):
        """
        A head that is not HTTP fails with UpstreamMalformed.
        """
        server = ScriptedServer(lambda c, r: c.write(b"SSH-2.0-OpenSSH\r\n\r\n")).start(self)
        await self.assertFailure(self.get(server), UpstreamMalformed)

    async def test_bad_chunk_framing(self):
        """
        A body that breaks its chunked framing ends with a Failure.
        """
        server = ScriptedServer(lambda c, r: c.write(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\nzz\r\n"
        )).start(self)
        sink = await read_body(await self.get(server))
        self.assertTrue(sink.reason.check(UpstreamMalformed))
        self.assertEqual(self.pool.idle_connections(), 0)

    async def test_cancel_before_head(self):
        """
        Cancelling before the head fails with CancelledError, aborts the
        connection and stops the body; nothing is pooled.
        """
        server = ScriptedServer(lambda c, r: None).start(self)
        body = ScriptedBody()
        d = self.get(server, b"POST", body=body)
        await wait_until(lambda: server.requests)
        d.cancel()
        await self.assertFailure(d, CancelledError)
        self.assertIn("stop", body.events)
        await wait_until(lambda: server.connections[0].lost)
        self.assertEqual(self.pool.idle_connections(), 0)

    async def test_cancel_while_connecting(self):
        """
        Cancelling while the connection is being made stops the attempt.
        """
        server = ScriptedServer(lambda c, r: c.write(OK_HELLO)).start(self)
        d = self.get(server)
        d.cancel()
        await self.assertFailure(d, CancelledError)
        await sleep(0.05)
        self.assertEqual(server.requests, [])
        self.assertEqual(self.pool.idle_connections(), 0)

    async def test_close(self):
        """
        close() aborts requests in flight, closes idle connections, fails
        later requests, and fires once every connection is gone.
        """
        server = ScriptedServer(lambda c, r: c.write(OK_HELLO) if r.target == b"/fast" else None).start(self)
        await read_body(await self.get(server, target=b"/fast"))
        waiting = self.get(server, target=b"/slow")
        await wait_until(lambda: len(server.requests) == 2)
        connecting = self.get(server, target=b"/slow")
        await self.pool.close()
        await self.assertFailure(waiting, UpstreamFailed)
        await self.assertFailure(connecting, UpstreamUnreachable, UpstreamFailed)
        self.assertEqual(self.pool.idle_connections(), 0)
        await self.assertFailure(self.get(server), UpstreamUnreachable)
        await wait_until(lambda: all(c.lost for c in server.connections))


class FakeVLLMTests(_PoolCase):
    """
    Real vLLM-shaped answers from the fake upstream.
    """

    async def _fake(self) -> FakeVLLM:
        fake = FakeVLLM(reactor, served_model="tiny")
        await fake.start()
        self.addCleanup(fake.stop)
        return fake

    async def test_chat_completion(self):
        """
        A chat completion comes back as JSON with its usage, and a second
        one reuses the connection.
        """
        fake = await self._fake()
        document = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
        for _ in range(2):
            response = await self.pool.request(
                "127.0.0.1", fake.port, 5.0, b"POST", b"/v1/chat/completions",
                [(b"Content-Type", b"application/json")], json.dumps(document).encode(),
            )
            self.assertEqual(response.code, 200)
            sink = await read_body(response)
            self.assertIsNone(sink.reason)
            self.assertEqual(len(sink.body), response.length)
            answer = json.loads(sink.body)
            self.assertEqual(answer["object"], "chat.completion")
            self.assertEqual(answer["usage"]["completion_tokens"], 4)
        self.assertEqual(fake.received[0].json, document)
        self.assertEqual(len(fake.connections_lost), 0)
        self.assertEqual(fake.open_connections, 1)

    async def test_sse_stream(self):
        """
        A streamed chat completion arrives as SSE events ending in [DONE].
        """
        fake = await self._fake()
        document = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3,
                    "stream": True}
        response = await self.pool.request(
            "127.0.0.1", fake.port, 5.0, b"POST", b"/v1/chat/completions",
            [(b"Content-Type", b"application/json")], BytesBody(json.dumps(document).encode()),
        )
        content_type = dict((n.lower(), v) for n, v in response.headers)[b"content-type"]
        self.assertTrue(content_type.startswith(b"text/event-stream"))
        sink = await read_body(response)
        self.assertIsNone(sink.reason)
        events = [e for e in sink.body.split(b"\n\n") if e]
        self.assertEqual(events[-1], b"data: [DONE]")
        chunks = [json.loads(e[len(b"data: "):]) for e in events[:-1]]
        self.assertTrue(all(c["object"] == "chat.completion.chunk" for c in chunks))
        self.assertEqual(self.pool.idle_connections(), 1)


class _RecordingTransport(StringTransport):
    """
    An in-memory transport that records each write and TCP_NODELAY.
    """

    def __init__(self):
        super().__init__()
        self.writes: List[bytes] = []
        self.no_delay = False

    def write(self, data):
        self.writes.append(data)
        super().write(data)

    def setTcpNoDelay(self, enabled):
        self.no_delay = enabled


class WireTests(SynchronousTestCase):
    """
    What goes on the wire, checked in memory with a fake clock.
    """

    def setUp(self):
        self.reactor = MemoryReactorClock()
        self.pool = UpstreamPool(self.reactor, idle_timeout=4.0)

    def connect(self, d_ignored=None):
        """
        Complete the latest connection attempt over a recording transport.

        :return: the protocol and its transport.
        """
        host, port, factory, timeout, _ = self.reactor.tcpClients[-1]
        protocol = factory.buildProtocol(None)
        transport = _RecordingTransport()
        protocol.makeConnection(transport)
        return protocol, transport

    def test_one_write_and_no_delay(self):
        """
        The head and an in-memory body go out in one write, with
        TCP_NODELAY set and the connect timeout passed on.
        """
        self.pool.request("10.1.2.3", 8000, 7.5, b"POST", b"/v1/x", [(b"A", b"b")], b"body")
        self.assertEqual(self.reactor.tcpClients[0][:2], ("10.1.2.3", 8000))
        self.assertEqual(self.reactor.tcpClients[0][3], 7.5)
        _, transport = self.connect()
        self.assertTrue(transport.no_delay)
        self.assertEqual(transport.writes, [
            b"POST /v1/x HTTP/1.1\r\nHost: 10.1.2.3:8000\r\nA: b\r\nContent-Length: 4\r\n\r\nbody"
        ])
        bytes_body = BytesBody(b"json")
        self.pool.request("10.1.2.3", 8001, 7.5, b"POST", b"/v1/x", [], bytes_body)
        _, transport = self.connect()
        self.assertEqual(transport.writes, [b"POST /v1/x HTTP/1.1\r\nHost: 10.1.2.3:8001\r\nContent-Length: 4\r\n\r\njson"])
        self.assertIsNone(transport.producer)

    def test_idle_timeout(self):
        """
        An idle connection is reused before idle_timeout and closed at it.
        """
        d = self.pool.request("10.1.2.3", 8000, 1.0, b"GET", b"/", [], None)
        protocol, transport = self.connect()
        protocol.dataReceived(OK_HELLO)
        self.assertEqual(self.successResultOf(d).code, 200)
        self.assertEqual(self.pool.idle_connections(), 1)
        self.reactor.advance(3.9)
        self.pool.request("10.1.2.3", 8000, 1.0, b"GET", b"/", [], None)
        self.assertEqual(len(self.reactor.tcpClients), 1)
        protocol.dataReceived(OK_HELLO)
        self.reactor.advance(3.9)
        self.assertFalse(transport.disconnecting)
        self.reactor.advance(0.2)
        self.assertTrue(transport.disconnecting)
        self.assertEqual(self.pool.idle_connections(), 0)
        protocol.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(self.reactor.getDelayedCalls(), [])
        self.assertEqual(self.successResultOf(self.pool.close()), None)

    def test_idle_timeout_per_endpoint(self):
        """
        An endpoint given its own idle timeout (a deployment's
        C{keepalive_timeout}) has its idle connections closed at that
        timeout, earlier than the pool's, and not reused after it; another
        endpoint keeps the pool's.
        """
        short = self.pool.request("10.1.2.3", 8000, 1.0, b"GET", b"/", [], None, idle_timeout=1.5)
        short_protocol, short_transport = self.connect()
        short_protocol.dataReceived(OK_HELLO)
        plain = self.pool.request("10.1.2.3", 8001, 1.0, b"GET", b"/", [], None)
        plain_protocol, plain_transport = self.connect()
        plain_protocol.dataReceived(OK_HELLO)
        self.successResultOf(short)
        self.successResultOf(plain)
        self.assertEqual(self.pool.idle_connections(), 2)
        self.reactor.advance(1.4)
        self.assertFalse(short_transport.disconnecting)
        self.reactor.advance(0.2)
        self.assertTrue(short_transport.disconnecting)
        self.assertFalse(plain_transport.disconnecting)
        self.assertEqual(self.pool.idle_connections(), 1)
        self.reactor.advance(2.5)
        self.assertTrue(plain_transport.disconnecting)
        short_protocol.connectionLost(Failure(ConnectionDone()))
        plain_protocol.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(self.reactor.getDelayedCalls(), [])

    def test_expired_connection_not_reused_before_the_sweep(self):
        """
        A connection idle past its endpoint's timeout is not taken for a
        request even if the sweep has not run yet: a new one is made.
        """
        d = self.pool.request("10.1.2.3", 8000, 1.0, b"GET", b"/", [], None, idle_timeout=1.0)
        protocol, transport = self.connect()
        protocol.dataReceived(OK_HELLO)
        self.successResultOf(d)
        # The clock jumps without running the sweep.
        self.reactor.rightNow += 1.5
        self.pool.request("10.1.2.3", 8000, 1.0, b"GET", b"/", [], None, idle_timeout=1.0)
        self.assertEqual(len(self.reactor.tcpClients), 2)
        self.assertTrue(transport.disconnecting)

    def test_body_before_deliver_pauses(self):
        """
        Body bytes with no sink yet pause the transport; deliver() resumes
        it after handing them over.
        """
        d = self.pool.request("10.1.2.3", 8000, 1.0, b"GET", b"/", [], None)
        protocol, transport = self.connect()
        protocol.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nabc")
        response = self.successResultOf(d)
        self.assertEqual(transport.producerState, "paused")
        sink = Sink()
        response.deliver(sink)
        self.assertEqual((sink.body, transport.producerState), (b"abc", "producing"))
        response.pauseProducing()
        protocol.dataReceived(b"def")
        self.assertEqual(sink.body, b"abc")
        self.assertEqual(self.pool.idle_connections(), 1)
        self.assertEqual(sink.ended, 0)
        response.resumeProducing()
        self.assertEqual((sink.body, sink.reason, sink.ended), (b"abcdef", None, 1))


class TLSTests(_PoolCase):
    """
    Upstreams behind TLS (C{https} api_bases), against a real TLS server
    with a self-signed certificate.
    """

    def setUp(self):
        super().setUp()
        self.pem = self_signed_localhost(self._directory())
        self.server = TLSUpstream(reactor, self.pem, OK_HELLO)
        self.addCleanup(self.server.stop)

    def _directory(self) -> str:
        path = self.mktemp()
        os.makedirs(path)
        return path

    def _trust(self, path: str) -> None:
        """
        Make OpenSSL's default trust (what the pool verifies against) the
        file C{path}, as an operator does with C{SSL_CERT_FILE}.
        """
        old = os.environ.get("SSL_CERT_FILE")
        os.environ["SSL_CERT_FILE"] = path

        def restore():
            if old is None:
                os.environ.pop("SSL_CERT_FILE", None)
            else:
                os.environ["SSL_CERT_FILE"] = old

        self.addCleanup(restore)

    def request(self) -> Deferred:
        return self.pool.request("localhost", self.server.number, 5.0, b"GET", b"/x", [], None, tls=True)

    async def test_trusted_certificate_answers(self):
        """
        With the server's certificate trusted, the request goes out
        encrypted, the answer is read, and the connection is reused for the
        next call.
        """
        self._trust(self.pem)
        response = await self.request()
        self.assertEqual(response.code, 200)
        sink = await read_body(response)
        self.assertEqual((sink.body, sink.reason), (b"hello", None))
        self.assertIn(b"GET /x HTTP/1.1", b"".join(self.server.received))
        self.assertEqual(self.pool.idle_connections(), 1)
        sink = await read_body(await self.request())
        self.assertEqual((sink.body, sink.reason), (b"hello", None))
        self.assertEqual(self.pool.idle_connections(), 1)

    async def test_untrusted_certificate_unreachable(self):
        """
        A certificate that fails verification fails the request with
        UpstreamUnreachable (so another replica may be tried), naming the
        TLS handshake, and the server never decrypts a request byte.
        """
        self._trust(self_signed_localhost(self._directory()))
        e = await self.assertFailure(self.request(), UpstreamUnreachable)
        self.assertIn("TLS handshake failed", e.reason)
        self.assertEqual(self.server.received, [])
        self.assertEqual(self.pool.idle_connections(), 0)
