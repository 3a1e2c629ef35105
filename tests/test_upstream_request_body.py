"""
Tests of L{dheera_tx.upstream.request_body} through
L{dheera_tx.upstream.client}: what the upstream receives (the request head
and its framing, a bytes or producer body, chunked or sized) and how the
body producer is driven (backpressure, an early answer, a producer that
fails or overruns its length), over real loopback sockets against scripted
raw servers.
"""

from twisted.internet.defer import Deferred
from twisted.python.failure import Failure
from twisted.web.iweb import IBodyProducer
from zope.interface import implementer

from dheera_tx.http.request_body import BodyTooLarge
from tests.scripted_upstream import (
    BytesBody,
    FloodBody,
    ScriptedBody,
    ScriptedServer,
    Sink,
    read_body,
    sleep,
    wait_until,
)
from tests.test_upstream_client import OK_HELLO, _PoolCase
from tests.waiting import stays_below


class RequestBodyTests(_PoolCase):
    """
    What the upstream receives, and how the body producer is driven.
    """

    async def test_request_head(self):
        """
        The request line, a Host header, the given headers in order and
        the framing arrive as written; a bytes body gets a Content-Length.
        """
        server = ScriptedServer(lambda c, r: c.write(OK_HELLO)).start(self)
        headers = [(b"X-One", b"1"), (b"Content-Type", b"application/json"), (b"X-One", b"2")]
        await read_body(await self.get(server, b"POST", b"/v1/a?b=c", headers, b'{"a":1}'))
        request = server.requests[0]
        self.assertEqual((request.method, request.target, request.body), (b"POST", b"/v1/a?b=c", b'{"a":1}'))
        self.assertEqual(request.headers, [
            (b"Host", b"127.0.0.1:%d" % (server.port,)), *headers, (b"Content-Length", b"7"),
        ])

    async def test_empty_post(self):
        """
        A POST without a body says Content-Length: 0; a GET says nothing.
        """
        server = ScriptedServer(lambda c, r: c.write(OK_HELLO)).start(self)
        await read_body(await self.get(server, b"POST"))
        await read_body(await self.get(server, b"GET"))
        post, get = server.requests
        self.assertEqual(post.header(b"content-length"), b"0")
        self.assertEqual([n for n, _ in get.headers], [b"Host"])

    async def test_header_injection_refused(self):
        """
        A header value with a line break is refused before anything is sent.
        """
        server = ScriptedServer(lambda c, r: c.write(OK_HELLO)).start(self)
        d = self.get(server, headers=[(b"X-A", b"1\r\nX-Evil: 1")])
        await self.assertFailure(d, ValueError)
        self.assertEqual(server.connections, [])

    async def test_bytes_body_producer(self):
        """
        A BytesBody is sent with its Content-Length, and the connection is
        reused.
        """
        server = ScriptedServer(lambda c, r: c.write(OK_HELLO)).start(self)
        for _ in range(2):
            await read_body(await self.get(server, b"POST", body=BytesBody(b"0123456789")))
        self.assertEqual([r.body for r in server.requests], [b"0123456789"] * 2)
        self.assertEqual(server.requests[0].header(b"content-length"), b"10")
        self.assertEqual(len(server.connections), 1)

    async def test_chunked_upload(self):
        """
        An UNKNOWN_LENGTH producer is sent chunked: the server sees the
        exact bytes, empty writes do not end the body, and the connection
        is reused afterwards.
        """
        server = ScriptedServer(lambda c, r: c.write(OK_HELLO)).start(self)
        body = ScriptedBody()
        d = self.get(server, b"POST", body=body)
        await wait_until(lambda: body.consumer is not None)
        body.consumer.write(b"first ")
        body.consumer.write(b"")
        await sleep(0.02)
        body.consumer.write(b"second")
        body.finished.callback(None)
        sink = await read_body(await d)
        self.assertEqual(sink.body, b"hello")
        request = server.requests[0]
        self.assertEqual((request.body, request.header(b"transfer-encoding")), (b"first second", b"chunked"))
        self.assertTrue(server.connections[0].raw.endswith(b"6\r\nfirst \r\n6\r\nsecond\r\n0\r\n\r\n"))
        self.assertEqual(self.pool.idle_connections(), 1)

    async def test_sized_producer(self):
        """
        A producer with an int length is streamed with that Content-Length.
        """
        server = ScriptedServer(lambda c, r: c.write(OK_HELLO)).start(self)
        body = ScriptedBody(length=8)
        d = self.get(server, b"PUT", body=body)
        await wait_until(lambda: body.consumer is not None)
        body.consumer.write(b"1234")
        await sleep(0.02)
        body.consumer.write(b"5678")
        body.finished.callback(None)
        await read_body(await d)
        self.assertEqual((server.requests[0].body, server.requests[0].header(b"content-length")), (b"12345678", b"8"))

    async def test_upload_backpressure(self):
        """
        A server that stops reading pauses the body producer: what it
        writes stays bounded (the kernel's socket buffers may still take a
        piece or two as they grow, never the whole body); once the server
        reads again the producer resumes and every byte arrives.
        """
        total = 64 * 1024 * 1024
        bound = total // 4
        server = ScriptedServer(lambda c, r: c.write(OK_HELLO), hold_reading=True).start(self)
        body = FloodBody(total)
        d = self.get(server, b"POST", body=body)
        await wait_until(lambda: body.paused or body.written >= bound, timeout=20)
        await stays_below(lambda: body.written, bound, 0.5)
        await wait_until(lambda: body.paused, timeout=20)
        server.connections[0].transport.resumeProducing()
        sink = await read_body(await d)
        self.assertEqual(sink.body, b"hello")
        self.assertGreater(body.resumes, 0)
        self.assertEqual(len(server.requests[0].body), total)

    async def test_early_answer(self):
        """
        An upstream that answers before the body is complete: the body
        producer is stopped and the connection is not reused.
        """
        server = ScriptedServer(lambda c, r: c.write(
            b"HTTP/1.1 413 Payload Too Large\r\nContent-Length: 4\r\n\r\nbig!"
        ), answer_at_head=True).start(self)
        body = ScriptedBody()
        d = self.get(server, b"POST", body=body)
        await wait_until(lambda: body.consumer is not None)
        body.consumer.write(b"some of it")
        response = await d
        self.assertEqual(response.code, 413)
        sink = await read_body(response)
        self.assertEqual((sink.body, sink.reason), (b"big!", None))
        self.assertIn("stop", body.events)
        self.assertEqual(self.pool.idle_connections(), 0)
        await wait_until(lambda: server.connections[0].lost)

    async def test_producer_failure_before_head(self):
        """
        A body producer that fails fails the request with that same
        failure, and the upstream connection is aborted.
        """
        server = ScriptedServer(lambda c, r: c.write(OK_HELLO)).start(self)
        body = ScriptedBody(length=100)
        d = self.get(server, b"POST", body=body)
        await wait_until(lambda: body.consumer is not None)
        body.consumer.write(b"partial")
        failure = Failure(BodyTooLarge())
        body.finished.errback(failure)
        caught = []
        d.addErrback(caught.append)
        await d
        self.assertIs(caught[0], failure)
        await wait_until(lambda: len(server.connections) == 1 and server.connections[0].lost)
        self.assertEqual(self.pool.idle_connections(), 0)

    async def test_producer_failed_before_start(self):
        """
        A body that has already failed fails the request with its failure
        without writing anything, and the connection stays usable.
        """
        server = ScriptedServer(lambda c, r: c.write(OK_HELLO)).start(self)
        await read_body(await self.get(server))

        @implementer(IBodyProducer)
        class Failed(ScriptedBody):
            def startProducing(self, consumer):
                d = Deferred()
                d.errback(BodyTooLarge())
                return d

        await self.assertFailure(self.get(server, b"POST", body=Failed(5)), BodyTooLarge)
        self.assertEqual(self.pool.idle_connections(), 1)
        sink = await read_body(await self.get(server))
        self.assertEqual(sink.body, b"hello")
        self.assertEqual(len(server.connections), 1)
        self.assertEqual(len(server.requests), 2)

    async def test_producer_failure_after_head(self):
        """
        A body producer failing after the response head arrived ends the
        response body with that failure.
        """
        server = ScriptedServer(lambda c, r: c.write(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n"
        ), answer_at_head=True).start(self)
        body = ScriptedBody()
        d = self.get(server, b"POST", body=body)
        await wait_until(lambda: body.consumer is not None)
        body.consumer.write(b"start")
        response = await d
        sink = Sink()
        response.deliver(sink)
        await wait_until(lambda: sink.body == b"abc")
        failure = Failure(BodyTooLarge())
        body.finished.errback(failure)
        await sink.done
        self.assertIs(sink.reason, failure)
        self.assertEqual(sink.ended, 1)

    async def test_producer_overrun(self):
        """
        A producer writing more than its declared length fails the request
        instead of sending bytes the server would take as the next request.
        """
        server = ScriptedServer(lambda c, r: c.write(OK_HELLO)).start(self)
        body = ScriptedBody(length=3)
        d = self.get(server, b"POST", body=body)
        await wait_until(lambda: body.consumer is not None)
        body.consumer.write(b"abcdef")
        await self.assertFailure(d, ValueError)
        self.assertIn("stop", body.events)
