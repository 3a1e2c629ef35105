"""
Tests for L{dheera_tx.http.control_bridge}: control-plane requests parsed by a
lean connection (a minimal httptools Protocol here, standing in for the
listening connection of L{dheera_tx.http.server}) and answered by a twisted.web
Site with Klein, over real loopback sockets; and a few checks of the
exchange on an in-memory transport.
"""

import json
import os
from io import BytesIO
from typing import List, Sequence, Tuple

import attr
import httptools
from klein import Klein
from twisted.internet import reactor
from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP4ServerEndpoint, connectProtocol
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web import server, static
from twisted.web.client import Agent, FileBodyProducer, HTTPConnectionPool, readBody
from twisted.web.http_headers import Headers
from twisted.web.resource import Resource

from dheera_tx.control import ControlPlane, ControlRoot
from dheera_tx.http.control_bridge import ControlBridge
from dheera_tx.keys.api import KeyAPI
from dheera_tx.keys.auth import Authenticator
from tests.test_call_log import LoopbackServer, wait_until

MASTER = "sk-master-bridge-0123456789"


# The lean side: a minimal listening connection and a way to run it.


class LeanConnection(Protocol):
    """
    A minimal lean listening connection: parses requests with httptools and
    hands each whole request to a L{ControlBridge}, one at a time, reading
    on meanwhile (so that it notices a client going away).

    :ivar answered: the C{keep_alive} of every C{control_done}, in order.
    :ivar exchanges: every exchange served.
    :ivar gone: the connection was lost.
    """

    def __init__(self, bridge: ControlBridge):
        self._bridge = bridge
        self._parser = httptools.HttpRequestParser(self)
        self._pending: List[tuple] = []
        self._exchange = None
        self._serving = False
        self._closing = False
        self.answered: List[bool] = []
        self.exchanges: list = []
        self.gone = False

    # httptools callbacks.

    def on_message_begin(self) -> None:
        self._url = b""
        self._headers: List[Tuple[bytes, bytes]] = []
        self._body: List[bytes] = []

    def on_url(self, url: bytes) -> None:
        self._url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name, value))

    def on_body(self, body: bytes) -> None:
        self._body.append(body)

    def on_message_complete(self) -> None:
        version = b"HTTP/" + self._parser.get_http_version().encode("ascii")
        self._pending.append((self._parser.get_method(), self._url, version, self._headers, b"".join(self._body)))

    # The connection.

    def dataReceived(self, data: bytes) -> None:
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError:
            self.transport.abortConnection()
            return
        self._serve_next()

    def _serve_next(self) -> None:
        if self._serving:
            # control_done came while serve() runs: the loop below goes on.
            return
        self._serving = True
        try:
            while self._exchange is None and self._pending and not self._closing:
                method, target, version, headers, body = self._pending.pop(0)
                exchange = self._bridge.serve(self, method, target, version, headers, body)
                self.exchanges.append(exchange)
                if not exchange.done:
                    self._exchange = exchange
        finally:
            self._serving = False

    def control_done(self, keep_alive: bool) -> None:
        """
        The bridge has answered: close, or serve what came next.
        """
        self.answered.append(keep_alive)
        self._exchange = None
        if not keep_alive:
            self._closing = True
            self.transport.loseConnection()
        else:
            self._serve_next()

    def connectionLost(self, reason: Failure) -> None:
        self.gone = True
        exchange, self._exchange = self._exchange, None
        if exchange is not None:
            exchange.connection_lost(reason)


class _LeanFactory(Factory):
    def __init__(self, bridge: ControlBridge):
        self.bridge = bridge
        self.connections: List[LeanConnection] = []

    def buildProtocol(self, addr):
        connection = LeanConnection(self.bridge)
        connection.factory = self
        self.connections.append(connection)
        return connection


class LeanServer:
    """
    Lean connections on a loopback port, answering through a bridge to
    C{site}; L{stop} closes the port and every connection.
    """

    def __init__(self, site: server.Site):
        self.factory = _LeanFactory(ControlBridge(site))
        self.port = None

    @property
    def connections(self) -> List[LeanConnection]:
        """
        :return: every connection accepted so far.
        """
        return self.factory.connections

    async def start(self) -> "LeanServer":
        """
        Listen on a free loopback port.
        """
        self.port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(self.factory)
        return self

    async def stop(self) -> None:
        """
        Close the port, abort every connection and wait until they are gone.
        """
        await self.port.stopListening()
        for connection in self.connections:
            if not connection.gone:
                connection.transport.abortConnection()
        await wait_until(lambda: all(c.gone for c in self.connections))


# The client side: raw bytes, and a parser for the answers.


class RawClient(Protocol):
    """
    A client that sends raw bytes and keeps everything it receives.

    :ivar received: every byte received.
    :ivar closed: fires when the connection is gone.
    """

    def __init__(self):
        self.received = b""
        self.closed: Deferred = Deferred()
        self.gone = False
        self._waits: list = []

    def dataReceived(self, data: bytes) -> None:
        self.received += data
        for entry in list(self._waits):
            predicate, d = entry
            if predicate(self.received):
                self._waits.remove(entry)
                d.callback(self.received)

    def wait_for(self, predicate) -> Deferred:
        """
        :return: a Deferred firing once C{predicate(received)} holds, failing
            if the connection closes first or after 5 seconds.
        """
        if predicate(self.received):
            return succeed(self.received)
        d = Deferred()
        self._waits.append((predicate, d))
        return d.addTimeout(5, reactor)

    def answers(self, methods: Sequence[bytes]) -> Deferred:
        """
        :return: a Deferred firing with the answers to C{methods} once they
            have all arrived (length- or chunk-delimited).
        """
        return self.wait_for(lambda data: _complete(data, methods)).addCallback(
            lambda data: split_answers(data, methods)[0]
        )

    def connectionLost(self, reason: Failure) -> None:
        self.gone = True
        waits, self._waits = self._waits, []
        for _, d in waits:
            d.errback(AssertionError(f"closed before the awaited bytes; got {self.received!r}"))
        self.closed.callback(None)


@attr.s(frozen=True, slots=True, auto_attribs=True)
class Answer:
    """
    One HTTP answer as it came over the wire.

    :ivar chunks: the chunk payloads of a chunked answer, else empty.
    """

    version: bytes
    status: int
    headers: Headers
    body: bytes
    chunks: Tuple[bytes, ...] = ()

    def header(self, name: bytes):
        """
        :return: the values of header C{name}, or L{None}.
        """
        return self.headers.getRawHeaders(name)

    def json(self):
        """
        :return: the decoded JSON body.
        """
        return json.loads(self.body)


class Incomplete(Exception):
    """
    The bytes do not hold every answer yet.
    """


def split_answers(data: bytes, methods: Sequence[bytes], closed: bool = False) -> Tuple[List[Answer], bytes]:
    """
    Parse the answers to requests with C{methods} from C{data}.

    :param closed: the connection has closed, which ends an answer without
        a length.
    :return: the answers and the bytes after them.
    :raise Incomplete: not all of them are in C{data}.
    """
    answers = []
    for method in methods:
        head, sep, data = data.partition(b"\r\n\r\n")
        if not sep:
            raise Incomplete()
        lines = head.split(b"\r\n")
        version, status, _ = lines[0].split(b" ", 2)
        headers = Headers()
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            headers.addRawHeader(name, value.strip())
        code = int(status)
        chunks: Tuple[bytes, ...] = ()
        if method == b"HEAD" or code in (204, 304):
            body = b""
        elif headers.getRawHeaders(b"transfer-encoding") == [b"chunked"]:
            parts = []
            while True:
                size_line, sep, data = data.partition(b"\r\n")
                size = int(size_line, 16) if sep else -1
                if size < 0 or len(data) < size + 2:
                    raise Incomplete()
                chunk, data = data[:size], data[size + 2 :]
                if size == 0:
                    break
                parts.append(chunk)
            chunks = tuple(parts)
            body = b"".join(parts)
        elif headers.hasHeader(b"content-length"):
            length = int(headers.getRawHeaders(b"content-length")[0])
            if len(data) < length:
                raise Incomplete()
            body, data = data[:length], data[length:]
        elif closed:
            body, data = data, b""
        else:
            raise Incomplete()
        answers.append(Answer(version, code, headers, body, chunks))
    return answers, data


def _complete(data: bytes, methods: Sequence[bytes]) -> bool:
    try:
        split_answers(data, methods)
    except Incomplete:
        return False
    return True


def get(target: bytes, *headers: bytes, method: bytes = b"GET", version: bytes = b"HTTP/1.1") -> bytes:
    """
    :return: a request without a body, with C{Host} and C{headers}.
    """
    return b"%s %s %s\r\nHost: control.test\r\n%s\r\n" % (method, target, version, b"".join(h + b"\r\n" for h in headers))


def post(target: bytes, body: bytes, content_type: bytes, *headers: bytes) -> bytes:
    """
    :return: an HTTP/1.1 POST of C{body}.
    """
    extra = b"".join(h + b"\r\n" for h in headers)
    return b"POST %s HTTP/1.1\r\nHost: control.test\r\nContent-Type: %s\r\nContent-Length: %d\r\n%s\r\n%s" % (
        target,
        content_type,
        len(body),
        extra,
        body,
    )


# A control plane to serve.


class SampleControl:
    """
    A small Klein control plane that says what reached it, and answers now,
    later, or in parts.

    :ivar gates: Deferreds that handlers wait on, for the test to fire.
    :ivar seen: the methods and paths that reached C{/echo}.
    :ivar waiting: the requests of C{/wait}.
    :ivar finished: the outcomes of C{notifyFinish} on C{/wait}.
    :ivar cancelled: C{/wait} requests whose handler was cancelled.
    """

    app = Klein()

    def __init__(self):
        self.gates: List[Deferred] = []
        self.seen: List[Tuple[bytes, bytes]] = []
        self.waiting: list = []
        self.finished: list = []
        self.cancelled: list = []

    def _gate(self) -> Deferred:
        gate = Deferred()
        self.gates.append(gate)
        return gate

    @app.route("/echo", methods=["GET", "POST"])
    def echo(self, request):
        """
        Describe the request in JSON (201 for a POST).
        """
        self.seen.append((request.method, request.path))
        request.setResponseCode(201 if request.method == b"POST" else 200)
        request.setHeader(b"content-type", b"application/json")
        request.setHeader(b"x-answer", b"echoed")
        document = {
            "method": request.method.decode(),
            "uri": request.uri.decode(),
            "path": request.path.decode(),
            "args": {k.decode(): [v.decode() for v in vs] for k, vs in request.args.items()},
            "probe": [v.decode() for v in request.requestHeaders.getRawHeaders(b"x-probe", [])],
            "content_type": (request.getHeader(b"content-type") or b"").decode(),
            "cookies": {k.decode(): v.decode() for k, v in request.received_cookies.items()},
            "body": request.content.read().decode(),
            "client": request.getClientAddress().host,
            "host_port": request.getHost().port,
            "secure": request.isSecure(),
            "hostname": request.getRequestHostname().decode(),
        }
        return json.dumps(document).encode()

    @app.route("/hello", methods=["GET"])
    def hello(self, request):
        """
        Fixed bytes with no content type of its own.
        """
        request.setHeader(b"x-served-by", b"control")
        return b"hello"

    @app.route("/plain", methods=["GET"])
    def plain(self, request):
        """
        A twisted.web resource, which answers with a Content-Length.
        """
        return static.Data(b"plain text", "text/plain")

    @app.route("/later", methods=["GET"])
    async def later(self, request):
        """
        Answer with what the test fires the gate with.
        """
        request.setHeader(b"content-type", b"text/plain")
        return await self._gate()

    @app.route("/stream", methods=["GET"])
    async def stream(self, request):
        """
        Answer in three writes, waiting for the test between the first two.
        """
        request.setHeader(b"content-type", b"text/event-stream")
        request.write(b"data: one\n\n")
        await self._gate()
        request.write(b"data: two\n\n")
        return b"data: [DONE]\n\n"

    @app.route("/wait", methods=["GET"])
    async def wait(self, request):
        """
        Wait on a gate, noting how the request ends.
        """
        self.waiting.append(request)
        request.notifyFinish().addBoth(self.finished.append)
        try:
            await self._gate()
        except CancelledError:
            self.cancelled.append(request)
            raise
        return b"too late"

    @app.route("/bye", methods=["GET"])
    def bye(self, request):
        """
        Write a part, then ask for the connection to be closed.
        """
        request.write(b"bye")
        request.loseConnection()
        return None

    @app.route("/boom", methods=["GET"])
    def boom(self, request):
        """
        Fail with an exception whose message must not reach the client.
        """
        raise ZeroDivisionError("secret detail 4242")


class BridgeTestCase(TestCase):
    """
    Starts servers and clients for a test and cleans them up.
    """

    async def lean(self, root, **kwargs) -> LeanServer:
        """
        :return: a started lean server for a Site on C{root}.
        """
        lean = await LeanServer(server.Site(root, **kwargs)).start()
        self.addCleanup(lean.stop)
        return lean

    async def connect(self, port) -> RawClient:
        """
        :return: a raw client connected to C{port}, aborted at cleanup.
        """
        client = RawClient()
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port)
        await connectProtocol(endpoint, client)

        async def close():
            if not client.gone:
                client.transport.abortConnection()
            await client.closed

        self.addCleanup(close)
        return client

    async def answers(self, lean: LeanServer, request: bytes, methods=(b"GET",)) -> Tuple[RawClient, List[Answer]]:
        """
        Send C{request} (one or more requests) on a new connection.

        :return: the client and the answers.
        """
        client = await self.connect(lean.port)
        client.transport.write(request)
        return client, await client.answers(methods)

    async def closing_answer(self, lean: LeanServer, request: bytes, method: bytes = b"GET") -> Answer:
        """
        Send C{request} and read until the server closes the connection.

        :return: the one answer, with nothing after it.
        """
        client = await self.connect(lean.port)
        client.transport.write(request)
        await client.closed
        answers, rest = split_answers(client.received, [method], closed=True)
        self.assertEqual(rest, b"")
        return answers[0]


class ControlBridgeTests(BridgeTestCase):
    """
    Requests reach the Klein app with everything they carried, and its
    answers reach the client as twisted.web would send them.
    """

    def setUp(self):
        self.app = SampleControl()

    async def test_get_reaches_handler(self):
        """
        A GET reaches the handler with its method, raw target, path, query
        arguments, repeated headers in order, cookies, addresses and Host;
        the answer's status, headers and body come back, chunked (Klein
        gives no length), and the connection stays open.
        """
        lean = await self.lean(self.app.app.resource())
        client, (answer,) = await self.answers(
            lean,
            get(b"/echo?model=a%20b&model=c&x=1", b"X-Probe: first", b"x-probe: second", b"Cookie: session=abc; theme=dark"),
        )
        self.assertEqual((answer.version, answer.status), (b"HTTP/1.1", 200))
        self.assertEqual(answer.header(b"content-type"), [b"application/json"])
        self.assertEqual(answer.header(b"x-answer"), [b"echoed"])
        self.assertEqual(answer.header(b"transfer-encoding"), [b"chunked"])
        self.assertIsNone(answer.header(b"connection"))
        document = answer.json()
        self.assertEqual(document["method"], "GET")
        self.assertEqual(document["uri"], "/echo?model=a%20b&model=c&x=1")
        self.assertEqual(document["path"], "/echo")
        self.assertEqual(document["args"], {"model": ["a b", "c"], "x": ["1"]})
        self.assertEqual(document["probe"], ["first", "second"])
        self.assertEqual(document["cookies"], {"session": "abc", "theme": "dark"})
        self.assertEqual(document["client"], "127.0.0.1")
        self.assertEqual(document["host_port"], lean.port.getHost().port)
        self.assertEqual((document["secure"], document["hostname"]), (False, "control.test"))
        self.assertEqual(lean.connections[0].answered, [True])
        self.assertFalse(client.gone)

    async def test_post_json_body_with_agent(self):
        """
        A POST with a JSON body, sent by twisted.web's Agent, reaches the
        handler with its body and content type; Agent reads the 201 answer
        and its headers.
        """
        lean = await self.lean(self.app.app.resource())
        pool = HTTPConnectionPool(reactor, persistent=False)
        self.addCleanup(pool.closeCachedConnections)
        body = json.dumps({"key_alias": "tenant-a", "max_budget": 12.5}).encode()
        url = b"http://127.0.0.1:%d/echo?dry_run=1" % (lean.port.getHost().port,)
        response = await Agent(reactor, pool=pool).request(
            b"POST",
            url,
            Headers({b"content-type": [b"application/json"], b"x-probe": [b"agent"]}),
            FileBodyProducer(BytesIO(body)),
        )
        document = json.loads(await readBody(response))
        self.assertEqual(response.code, 201)
        self.assertEqual(response.headers.getRawHeaders(b"x-answer"), [b"echoed"])
        self.assertEqual(document["method"], "POST")
        self.assertEqual(document["args"], {"dry_run": ["1"]})
        self.assertEqual(document["content_type"], "application/json")
        self.assertEqual(document["probe"], ["agent"])
        self.assertEqual(json.loads(document["body"]), {"key_alias": "tenant-a", "max_budget": 12.5})

    async def test_keep_alive(self):
        """
        Two requests one after the other on one HTTP/1.1 connection are both
        answered on it; the connection stays open after each.
        """
        lean = await self.lean(self.app.app.resource())
        client = await self.connect(lean.port)
        client.transport.write(get(b"/echo?n=1"))
        (first,) = await client.answers([b"GET"])
        client.transport.write(post(b"/echo?n=2", b'{"n": 2}', b"application/json"))
        _, second = await client.answers([b"GET", b"POST"])
        self.assertEqual(first.json()["args"], {"n": ["1"]})
        self.assertEqual((second.status, second.json()["body"]), (201, '{"n": 2}'))
        self.assertEqual(len(lean.connections), 1)
        self.assertEqual(lean.connections[0].answered, [True, True])
        self.assertFalse(client.gone)

    async def test_connection_close(self):
        """
        An HTTP/1.1 request with C{Connection: close} is answered with
        C{Connection: close}, and the connection is closed after the answer.
        """
        lean = await self.lean(self.app.app.resource())
        answer = await self.closing_answer(lean, get(b"/echo", b"Connection: close"))
        self.assertEqual(answer.status, 200)
        self.assertEqual(answer.header(b"connection"), [b"close"])
        self.assertEqual(answer.json()["path"], "/echo")
        self.assertEqual(lean.connections[0].answered, [False])

    async def test_http10_closes(self):
        """
        An HTTP/1.0 request gets an HTTP/1.0 answer without chunking, ended
        by closing the connection.
        """
        lean = await self.lean(self.app.app.resource())
        answer = await self.closing_answer(lean, get(b"/echo?v=10", version=b"HTTP/1.0"))
        self.assertEqual((answer.version, answer.status), (b"HTTP/1.0", 200))
        self.assertIsNone(answer.header(b"transfer-encoding"))
        self.assertIsNone(answer.header(b"content-length"))
        self.assertEqual(answer.json()["args"], {"v": ["10"]})
        self.assertEqual(lean.connections[0].answered, [False])

    async def test_http10_keep_alive_without_length_closes(self):
        """
        An HTTP/1.0 request asking for keep-alive still gets a close when
        the answer has no length (a Klein answer), and is not told
        C{Connection: keep-alive}.
        """
        lean = await self.lean(self.app.app.resource())
        answer = await self.closing_answer(lean, get(b"/hello", b"Connection: keep-alive", version=b"HTTP/1.0"))
        self.assertEqual((answer.status, answer.body), (200, b"hello"))
        self.assertIsNone(answer.header(b"connection"))
        self.assertEqual(lean.connections[0].answered, [False])

    async def test_http10_keep_alive_with_length(self):
        """
        An HTTP/1.0 request asking for keep-alive whose answer has a
        Content-Length is told C{Connection: keep-alive} and the connection
        carries a second request.
        """
        lean = await self.lean(self.app.app.resource())
        client = await self.connect(lean.port)
        client.transport.write(get(b"/plain", b"Connection: keep-alive", version=b"HTTP/1.0"))
        (first,) = await client.answers([b"GET"])
        client.transport.write(get(b"/plain", version=b"HTTP/1.0"))
        await client.closed
        (_, second), rest = split_answers(client.received, [b"GET", b"GET"], closed=True)
        self.assertEqual((first.version, first.status, first.body), (b"HTTP/1.0", 200, b"plain text"))
        self.assertEqual(first.header(b"connection"), [b"keep-alive"])
        self.assertEqual(first.header(b"content-length"), [b"10"])
        self.assertEqual((second.body, second.header(b"connection"), rest), (b"plain text", None, b""))
        self.assertEqual(lean.connections[0].answered, [True, False])

    async def test_async_answer(self):
        """
        A handler that answers later (a Deferred fired after the request was
        handed over) has its answer delivered then, and not before.
        """
        lean = await self.lean(self.app.app.resource())
        client = await self.connect(lean.port)
        client.transport.write(get(b"/later"))
        await wait_until(lambda: self.app.gates)
        self.assertEqual((client.received, lean.connections[0].answered), (b"", []))
        self.app.gates[0].callback(b"ready now")
        (answer,) = await client.answers([b"GET"])
        self.assertEqual((answer.status, answer.body), (200, b"ready now"))
        self.assertEqual(answer.header(b"content-type"), [b"text/plain"])
        self.assertEqual(lean.connections[0].answered, [True])

    async def test_streamed_answer(self):
        """
        An answer written in several parts is sent chunked on HTTP/1.1, each
        part as it is written: the first part reaches the client while the
        handler still waits.
        """
        lean = await self.lean(self.app.app.resource())
        client = await self.connect(lean.port)
        client.transport.write(get(b"/stream"))
        await client.wait_for(lambda data: b"data: one\n\n" in data)
        self.assertEqual(lean.connections[0].answered, [])
        self.assertNotIn(b"data: two", client.received)
        self.app.gates[0].callback(None)
        (answer,) = await client.answers([b"GET"])
        self.assertEqual(answer.header(b"transfer-encoding"), [b"chunked"])
        self.assertEqual(answer.header(b"content-type"), [b"text/event-stream"])
        self.assertEqual(answer.chunks, (b"data: one\n\n", b"data: two\n\n", b"data: [DONE]\n\n"))
        self.assertEqual(lean.connections[0].answered, [True])

    async def test_head(self):
        """
        HEAD gets the GET answer's headers and no body, and the connection
        carries the next request (whose answer follows the head directly).
        """
        lean = await self.lean(self.app.app.resource())
        client, (head, after) = await self.answers(
            lean, get(b"/hello", method=b"HEAD") + get(b"/hello"), methods=[b"HEAD", b"GET"]
        )
        self.assertEqual(head.status, 200)
        self.assertEqual(head.header(b"x-served-by"), [b"control"])
        self.assertIsNone(head.header(b"transfer-encoding"))
        self.assertEqual(head.body, b"")
        self.assertEqual((after.status, after.body), (200, b"hello"))
        self.assertEqual(lean.connections[0].answered, [True, True])

    async def test_head_http10_closes_without_body(self):
        """
        An HTTP/1.0 HEAD is answered with headers only; nothing follows
        them before the close.
        """
        lean = await self.lean(self.app.app.resource())
        client = await self.connect(lean.port)
        client.transport.write(get(b"/plain", method=b"HEAD", version=b"HTTP/1.0"))
        await client.closed
        head, sep, rest = client.received.partition(b"\r\n\r\n")
        self.assertTrue(head.startswith(b"HTTP/1.0 200 OK\r\n"))
        self.assertIn(b"\r\nContent-Length: 10", head)
        self.assertEqual((sep, rest), (b"\r\n\r\n", b""))

    async def test_client_gone_while_waiting(self):
        """
        When the client disconnects while an async handler waits, the
        request's notifyFinish errbacks, Klein cancels the handler, nothing
        is written, C{control_done} is not called and no error is logged.
        """
        lean = await self.lean(self.app.app.resource())
        client = await self.connect(lean.port)
        client.transport.write(get(b"/wait"))
        await wait_until(lambda: self.app.waiting)
        client.transport.loseConnection()
        await wait_until(lambda: self.app.finished)
        (outcome,) = self.app.finished
        self.assertIsInstance(outcome, Failure)
        self.assertTrue(outcome.check(ConnectionDone, ConnectionLost))
        request = self.app.waiting[0]
        self.assertEqual(self.app.cancelled, [request])
        self.assertEqual((request.startedWriting, request.finished, request.sentLength), (0, 0, 0))
        connection = lean.connections[0]
        await wait_until(lambda: connection.gone)
        self.assertEqual(connection.answered, [])
        self.assertTrue(connection.exchanges[0].done)
        self.assertEqual(self.flushLoggedErrors(), [])

    async def test_handler_raises(self):
        """
        A handler that raises gets a 500 whose body shows neither a
        traceback nor the exception; the error is logged and the connection
        stays usable.
        """
        lean = await self.lean(self.app.app.resource())
        client, (answer,) = await self.answers(lean, get(b"/boom"))
        self.assertEqual(answer.status, 500)
        self.assertIn(b"Processing Failed", answer.body)
        for leak in (b"Traceback", b"ZeroDivisionError", b"secret detail 4242"):
            self.assertNotIn(leak, answer.body)
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)
        self.assertEqual(lean.connections[0].answered, [True])

    async def test_lose_connection_from_request(self):
        """
        A resource that calls C{request.loseConnection()} has the connection
        closed after what it wrote, and C{control_done} says not to keep it.
        """
        lean = await self.lean(self.app.app.resource())
        client = await self.connect(lean.port)
        client.transport.write(get(b"/bye"))
        await client.closed
        self.assertIn(b"\r\n\r\n3\r\nbye\r\n", client.received)
        self.assertEqual(lean.connections[0].answered, [False])

    async def test_malformed_form_body(self):
        """
        A POST whose multipart/form-data body twisted.web cannot parse gets
        a 400 in the OpenAI error shape and the connection is closed; the
        handler never runs.
        """
        lean = await self.lean(self.app.app.resource())
        answer = await self.closing_answer(lean, post(b"/echo", b"garbage", b"multipart/form-data; boundary=xyz"))
        self.assertEqual(answer.status, 400)
        self.assertEqual(answer.json()["error"]["type"], "invalid_request_error")
        self.assertEqual(self.app.seen, [])
        self.assertEqual(lean.connections[0].answered, [False])

    async def test_failure_outside_resource(self):
        """
        When twisted.web itself fails before the resource runs, the client
        gets a 500 in the OpenAI error shape (nothing of the exception) and
        the connection is closed; the failure is logged.
        """

        class NoRoomRequest(server.Request):
            def gotLength(self, length):
                raise OSError("no room for /tmp/secret-path")

        lean = await self.lean(self.app.app.resource(), requestFactory=NoRoomRequest)
        answer = await self.closing_answer(lean, post(b"/echo", b"{}", b"application/json"))
        self.assertEqual(answer.status, 500)
        self.assertEqual(answer.json()["error"]["type"], "internal_error")
        self.assertNotIn(b"secret-path", answer.body)
        self.assertEqual(len(self.flushLoggedErrors(OSError)), 1)
        self.assertEqual(lean.connections[0].answered, [False])


class SameAnswersTests(BridgeTestCase):
    """
    The bridge's answers are byte for byte those of twisted.web's own
    HTTPChannel serving the same Site (but for the Date).
    """

    async def stock(self, site: server.Site, request: bytes) -> bytes:
        """
        :return: what twisted.web's HTTPChannel answers to C{request} (sent
            with C{Connection: close}).
        """
        stock = await LoopbackServer(site).start()
        self.addCleanup(stock.stop)
        client = await self.connect(stock.port)
        client.transport.write(request)
        await client.closed
        return client.received

    async def assert_same(self, request: bytes) -> bytes:
        """
        Check that the lean connection and HTTPChannel answer C{request}
        alike.

        :return: the bridge's answer.
        """
        site = server.Site(SampleControl().app.resource())
        lean = await LeanServer(site).start()
        self.addCleanup(lean.stop)
        client = await self.connect(lean.port)
        client.transport.write(request)
        await client.closed
        expected = await self.stock(site, request)
        self.assertEqual(_undated(client.received), _undated(expected))
        return client.received

    async def test_same_get(self):
        """
        A GET answered from bytes: same status line and headers (Server,
        the default Content-Type, chunking, Connection: close) and body.
        """
        answer = await self.assert_same(get(b"/hello", b"Connection: close"))
        self.assertIn(b"\r\nServer: TwistedWeb/", answer)
        self.assertIn(b"\r\nDate: ", answer)
        self.assertIn(b"\r\nContent-Type: text/html", answer)

    async def test_same_head(self):
        """
        A HEAD: same headers, no body.
        """
        await self.assert_same(get(b"/plain", b"Connection: close", method=b"HEAD"))

    async def test_same_http10(self):
        """
        An HTTP/1.0 GET.
        """
        await self.assert_same(get(b"/plain", version=b"HTTP/1.0"))

    async def test_same_not_found(self):
        """
        A route Klein does not know.
        """
        answer = await self.assert_same(get(b"/nowhere", b"Connection: close"))
        self.assertTrue(answer.startswith(b"HTTP/1.1 404 Not Found\r\n"))


class ControlRootTests(BridgeTestCase):
    """
    The proxy's own control plane (L{ControlRoot} over L{ControlPlane} and
    the key API) answers through the bridge.
    """

    def setUp(self):
        self.gates: List[Deferred] = []

        async def redis_answers() -> bool:
            gate = Deferred()
            self.gates.append(gate)
            return await gate

        authenticator = Authenticator(MASTER, None)
        control = ControlPlane({"redis": redis_answers}, authenticator=authenticator)
        key_api = KeyAPI(authenticator, None).app.resource()
        self.root = ControlRoot(control.app.resource(), {b"key": key_api, b"end_user": key_api})

    async def test_liveness(self):
        """
        C{GET /health/liveliness} answers 200 with this process's pid.
        """
        lean = await self.lean(self.root)
        _, (answer,) = await self.answers(lean, get(b"/health/liveliness"))
        self.assertEqual(answer.status, 200)
        self.assertEqual(answer.json(), {"status": "alive", "pid": os.getpid()})
        self.assertEqual(answer.header(b"content-type"), [b"application/json"])

    async def test_readiness_waits_for_probe(self):
        """
        C{GET /health/readiness} answers once its (asynchronous) probe has,
        with the probe's verdict.
        """
        lean = await self.lean(self.root)
        client = await self.connect(lean.port)
        client.transport.write(get(b"/health/readiness"))
        await wait_until(lambda: self.gates)
        self.assertEqual(client.received, b"")
        self.gates[0].callback(False)
        (answer,) = await client.answers([b"GET"])
        self.assertEqual(answer.status, 503)
        self.assertEqual(answer.json(), {"status": "not ready", "config": "loaded", "redis": "unreachable"})

    async def test_unknown_route(self):
        """
        An unknown path gets the control plane's 404 in the OpenAI shape.
        """
        lean = await self.lean(self.root)
        _, (answer,) = await self.answers(lean, get(b"/no/such/route"))
        self.assertEqual(answer.status, 404)
        self.assertEqual(answer.json()["error"]["type"], "not_found_error")

    async def test_key_api_reads_json_body(self):
        """
        A C{POST /key/generate} reaches the key API through L{ControlRoot}:
        without a key it is refused 401; with the master key its JSON body
        is read and an unknown field answered 400, naming it.
        """
        lean = await self.lean(self.root)
        body = json.dumps({"no_such_field": 1}).encode()
        request = post(b"/key/generate", body, b"application/json")
        authorized = post(b"/key/generate", body, b"application/json", b"Authorization: Bearer " + MASTER.encode())
        _, (refused, checked) = await self.answers(lean, request + authorized, methods=[b"POST", b"POST"])
        self.assertEqual(refused.status, 401)
        self.assertEqual(refused.json()["error"]["type"], "authentication_error")
        self.assertEqual(checked.status, 400)
        self.assertIn("no_such_field", checked.json()["error"]["message"])


class _Connection:
    """
    A lean connection on an in-memory transport that records
    C{control_done}.
    """

    def __init__(self):
        self.transport = StringTransport()
        self.answered: List[bool] = []

    def control_done(self, keep_alive: bool) -> None:
        self.answered.append(keep_alive)


class _Later(Resource):
    """
    Answers only when the test says: keeps its requests.
    """

    isLeaf = True

    def __init__(self):
        super().__init__()
        self.requests: list = []

    def render_GET(self, request):
        self.requests.append(request)
        return server.NOT_DONE_YET


class ControlExchangeTests(SynchronousTestCase):
    """
    The exchange on an in-memory transport.
    """

    def setUp(self):
        self.resource = _Later()
        self.bridge = ControlBridge(server.Site(self.resource))
        self.connection = _Connection()

    def serve(self, *headers: Tuple[bytes, bytes], version: bytes = b"HTTP/1.1"):
        """
        :return: the exchange and the request of a GET.
        """
        exchange = self.bridge.serve(self.connection, b"GET", b"/x", version, list(headers), b"")
        return exchange, self.resource.requests[-1]

    def test_control_done_once(self):
        """
        C{control_done} is called once, when the request finishes, and a
        later C{connection_lost} changes nothing for the finished request.
        """
        exchange, request = self.serve()
        finished = request.notifyFinish()
        self.assertEqual((self.connection.answered, exchange.done), ([], False))
        request.write(b"partial")
        request.finish()
        self.assertEqual((self.connection.answered, exchange.done), ([True], True))
        self.assertIsNone(self.successResultOf(finished))
        exchange.connection_lost(Failure(ConnectionDone()))
        self.assertEqual(self.connection.answered, [True])
        self.assertTrue(self.connection.transport.value().endswith(b"7\r\npartial\r\n0\r\n\r\n"))

    def test_transport_closing(self):
        """
        When the transport is already closing as the request finishes, the
        connection is not kept.
        """
        exchange, request = self.serve()
        request.write(b"x")
        self.connection.transport.loseConnection()
        request.finish()
        self.assertEqual(self.connection.answered, [False])

    def test_persistent_false_closes(self):
        """
        Code that sets C{request.channel.persistent = False} (as it could on
        HTTPChannel) before the answer starts gets C{Connection: close} and
        a connection that is not kept.
        """
        exchange, request = self.serve()
        request.channel.persistent = False
        request.finish()
        self.assertIn(b"\r\nConnection: close\r\n", self.connection.transport.value())
        self.assertEqual(self.connection.answered, [False])

    def test_answer_says_close(self):
        """
        An answer that carries C{Connection: close} of its own ends the
        connection after it.
        """
        exchange, request = self.serve()
        request.setHeader(b"connection", b"close")
        request.finish()
        self.assertIn(b"\r\nConnection: close\r\n", self.connection.transport.value())
        self.assertEqual(self.connection.answered, [False])

    def test_failure_after_answer_started(self):
        """
        When twisted.web fails after the answer has started, the connection
        is aborted (the client must not take a partial answer as whole) and
        not kept; the failure is logged.
        """

        class FailingAfterStart(server.Request):
            def requestReceived(self, command, path, version):
                super().requestReceived(command, path, version)
                self.write(b"partial")
                raise OSError("late failure")

        bridge = ControlBridge(server.Site(self.resource, requestFactory=FailingAfterStart))
        exchange = bridge.serve(self.connection, b"GET", b"/x", b"HTTP/1.1", [], b"")
        self.assertTrue(self.connection.transport.disconnected)
        self.assertEqual(self.connection.answered, [False])
        self.assertTrue(exchange.done)
        self.assertNotIn(b"500", self.connection.transport.value())
        self.assertEqual(len(self.flushLoggedErrors(OSError)), 1)

    def test_header_pairs(self):
        """
        C{writeHeaders} also takes the headers as (name, value) pairs, as
        older twisted.web releases pass them.
        """
        exchange, request = self.serve()
        exchange.writeHeaders(b"HTTP/1.1", b"200", b"OK", [(b"X-One", b"1"), (b"Content-Length", b"0")])
        self.assertEqual(
            self.connection.transport.value(), b"HTTP/1.1 200 OK\r\nX-One: 1\r\nContent-Length: 0\r\n\r\n"
        )

    def test_lost_before_answer(self):
        """
        A connection lost before the answer: notifyFinish errbacks with the
        reason, C{control_done} is never called, and the request's later
        writes send nothing.
        """
        exchange, request = self.serve()
        finished = request.notifyFinish()
        exchange.connection_lost(Failure(ConnectionLost()))
        self.failureResultOf(finished, ConnectionLost)
        request.write(b"late")
        exchange.write(b"late")
        self.assertEqual((self.connection.transport.value(), self.connection.answered), (b"", []))
        self.assertTrue(exchange.done)


def _undated(answer: bytes) -> bytes:
    """
    :return: C{answer} with the value of its Date header blanked.
    """
    head, sep, body = answer.partition(b"\r\n\r\n")
    lines = [b"Date: -" if line.startswith(b"Date: ") else line for line in head.split(b"\r\n")]
    return b"\r\n".join(lines) + sep + body
