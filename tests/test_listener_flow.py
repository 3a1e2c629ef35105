"""
Unit tests of the listener's flow control and framing rules
(L{dheera_tx.http.server}, L{dheera_tx.http.answer_flow},
L{dheera_tx.http.control_requests}) on an in-memory transport with an
injected clock: how far ahead pipelined requests are parsed, write
backpressure, a read full of upgrade requests, control requests held
until their key is checked, C{100 Continue} only once a body is wanted,
trailers, HTTP/1.0 chunked bodies and Connection tokens.
"""

import json
from typing import List

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from dheera_tx.config import GeneralSettings
from dheera_tx.errors import ProxyError, unauthorized
from dheera_tx.http.control_requests import ControlGate
from dheera_tx.http.gateway_site import GatewaySite
from dheera_tx.http.listener_limits import ListenerLimits
from dheera_tx.http.server import PIPELINE_DEPTH

KEY = b"sk-unit-master"


class Echo(Resource):
    """
    A control plane answering each request with its path and the form
    arguments twisted.web parsed, or holding the answer when told to.

    :ivar held: requests whose answers are held (C{/hold}).
    :ivar seen: every path requested, in order.
    """

    isLeaf = True

    def __init__(self):
        super().__init__()
        self.held: List = []
        self.seen: List[bytes] = []

    def render(self, request):
        self.seen.append(request.path)
        if request.path == b"/hold":
            self.held.append(request)
            return NOT_DONE_YET
        request.setHeader(b"content-type", b"application/json")
        args = sorted(k.decode() for k in request.args)
        return json.dumps({"path": request.path.decode(), "args": args, "body": request.content.read().decode()}).encode()


class Calls:
    """
    A data plane that records each call and answers it 200 when told to
    (or at once with C{answer_at_once}).
    """

    def __init__(self, answer_at_once: bool = False):
        self.calls: List = []
        self._at_once = answer_at_once

    def serve(self, exchange) -> None:
        self.calls.append(exchange)
        if self._at_once:
            self.answer(exchange)

    @staticmethod
    def answer(exchange) -> None:
        exchange.write_head(200, None, [(b"Content-Type", b"text/plain")], 2)
        exchange.write(b"ok")
        exchange.finish()


class Collecting(Calls):
    """
    A data plane that reads each call's body whole, then answers 200.

    :ivar bodies: the bodies read, in order.
    """

    def __init__(self):
        super().__init__()
        self.bodies: List[bytes] = []

    def serve(self, exchange) -> None:
        self.calls.append(exchange)
        if exchange.body is None:
            self.answer(exchange)
            return

        def read(body: bytes) -> None:
            self.bodies.append(body)
            self.answer(exchange)

        exchange.body.collect().addCallback(read)


class PendingKeys:
    """
    An authenticator whose lookups of C{sk-slow} wait until released; the
    master key passes at once, anything else is refused at once.
    """

    def __init__(self):
        self.waiting: List[Deferred] = []

    async def authenticate(self, headers):
        values = headers.getRawHeaders(b"authorization") or [b""]
        if values[0] == b"Bearer " + KEY:
            return "master"
        if values[0] == b"Bearer sk-slow":
            d = Deferred()
            self.waiting.append(d)
            return await d
        raise unauthorized()


def get(path: bytes, *headers: bytes, method: bytes = b"GET", version: bytes = b"HTTP/1.1") -> bytes:
    """
    :return: a raw request head.
    """
    return b"\r\n".join([method + b" " + path + b" " + version, b"Host: x", *headers]) + b"\r\n\r\n"


class ListenerTestCase(SynchronousTestCase):
    """
    A L{GatewaySite} on a L{Clock}, connections on L{StringTransport}s.
    """

    def site(self, passthrough=None, authenticator=None, **general) -> GatewaySite:
        self.clock = Clock()
        self.control = Echo()
        limits = ListenerLimits(GeneralSettings(**general))
        gate = ControlGate(authenticator) if authenticator is not None else None
        return GatewaySite(self.control, passthrough, limits, self.clock, gate)

    def connect(self, site: GatewaySite):
        transport = StringTransport()
        protocol = site.buildProtocol(None)
        protocol.makeConnection(transport)
        self.addCleanup(lambda: protocol.connectionLost(None) if not protocol._lost else None)
        return protocol, transport

    def settle(self, turns: int = 50) -> None:
        """
        Run the clock's pending zero-delay calls a few times over.
        """
        for _ in range(turns):
            self.clock.advance(0)


class PipelineTests(ListenerTestCase):
    """
    Pipelined requests are parsed at most L{PIPELINE_DEPTH} ahead of the
    one being answered, and not at all while the answers are not read.
    """

    def test_parsed_ahead_bounded(self):
        """
        Behind an answer that does not come, 100 pipelined calls in one read
        give at most L{PIPELINE_DEPTH} waiting requests; the rest stays
        unparsed and reading stops until the answer is done.
        """
        calls = Calls()
        protocol, transport = self.connect(self.site(calls))
        protocol.dataReceived(get(b"/vllm/a") * 100)
        self.assertEqual(len(calls.calls), 1)
        self.assertEqual(len(protocol._queue), PIPELINE_DEPTH)
        self.assertEqual(transport.producerState, "paused")
        self.assertEqual(len(protocol._unparsed), len(get(b"/vllm/a")) * (100 - 1 - PIPELINE_DEPTH))
        calls.answer(calls.calls[0])
        self.settle()
        self.assertEqual(len(calls.calls), 2)
        self.assertLessEqual(len(protocol._queue), PIPELINE_DEPTH)

    def test_parsed_ahead_bytes_bounded(self):
        """
        Behind an answer that does not come, pipelined calls with big heads
        are parsed ahead only until their heads hold 64 KiB.
        """
        calls = Calls()
        protocol, transport = self.connect(self.site(calls))
        big = get(b"/vllm/a", b"X-Pad: " + b"p" * 10_000)
        protocol.dataReceived(big * 16)
        self.assertEqual(len(calls.calls), 1)
        self.assertEqual(len(protocol._queue), 7)
        self.assertEqual(transport.producerState, "paused")
        calls.answer(calls.calls[0])
        self.settle()
        self.assertEqual(len(calls.calls), 2)

    def test_all_answered_in_order(self):
        """
        100 pipelined calls answered one after the other are all served, in
        order, and reading resumes once nothing is left to parse.
        """
        calls = Calls(answer_at_once=True)
        protocol, transport = self.connect(self.site(calls))
        protocol.dataReceived(b"".join(get(b"/vllm/%d" % i) for i in range(100)))
        self.settle(300)
        self.assertEqual([c.uri for c in calls.calls], [b"/vllm/%d" % i for i in range(100)])
        self.assertEqual(transport.value().count(b"HTTP/1.1 200 OK"), 100)
        self.assertEqual(transport.producerState, "producing")

    def test_byte_at_a_time(self):
        """
        Pipelined requests arriving a byte at a time (heads ending across
        reads) are each served once, in order, bodies intact.
        """
        calls = Collecting()
        protocol, transport = self.connect(self.site(calls))
        stream = b"".join(
            get(b"/vllm/%d" % i, b"Content-Length: 3", b"Content-Type: application/octet-stream", method=b"POST") + b"a\r\n"
            for i in range(20)
        )
        for i in range(len(stream)):
            protocol.dataReceived(stream[i:i + 1])
            self.settle(2)
        self.assertEqual([c.uri for c in calls.calls], [b"/vllm/%d" % i for i in range(20)])
        self.assertEqual(calls.bodies, [b"a\r\n"] * 20)
        self.assertEqual(transport.value().count(b"HTTP/1.1 200 OK"), 20)

    def test_chunk_data_with_empty_lines(self):
        """
        Chunk data holding empty lines (where the input is cut, harmlessly)
        arrives whole, and the request pipelined after the body is served.
        """
        calls = Collecting()
        protocol, transport = self.connect(self.site(calls))
        data = b"\r\n\r\n0\r\n\r\n" * 50
        protocol.dataReceived(
            get(b"/vllm/a", b"Transfer-Encoding: chunked", b"Content-Type: application/octet-stream", method=b"POST")
            + b"%x\r\n%s\r\n0\r\n\r\n" % (len(data), data)
            + get(b"/vllm/b")
        )
        self.settle()
        self.assertEqual(calls.bodies, [data])
        self.assertEqual([c.uri for c in calls.calls], [b"/vllm/a", b"/vllm/b"])

    def test_unread_answers_stop_everything(self):
        """
        While the transport's buffer is over its high-water mark (it pauses
        the connection's producer), no queued request starts and nothing is
        read; once it drains, the queue goes on.
        """
        calls = Calls(answer_at_once=True)
        protocol, transport = self.connect(self.site(calls))
        # The first answer fills the buffer.
        protocol.dataReceived(get(b"/vllm/first"))
        transport.producer.pauseProducing()
        protocol.dataReceived(get(b"/vllm/a") * 40)
        self.settle()
        self.assertEqual(len(calls.calls), 1)
        self.assertEqual(protocol._queue, [])
        self.assertEqual(transport.producerState, "paused")
        transport.producer.resumeProducing()
        self.settle(200)
        self.assertEqual(len(calls.calls), 41)
        self.assertEqual(transport.producerState, "producing")

    def test_client_not_reading_dropped(self):
        """
        A client that reads nothing of its answers for C{body_timeout}
        seconds is dropped; one that reads a little in time is not.
        """
        calls = Calls(answer_at_once=True)
        protocol, transport = self.connect(self.site(calls, body_timeout=5))
        protocol.dataReceived(get(b"/vllm/a"))
        transport.producer.pauseProducing()
        self.clock.advance(4)
        transport.producer.resumeProducing()
        transport.producer.pauseProducing()
        self.clock.advance(4)
        self.assertFalse(transport.disconnecting)
        self.clock.advance(1)
        self.assertTrue(transport.disconnecting)

    def test_answer_producer_follows_backpressure(self):
        """
        The producer of an answer being written is paused and resumed with
        the transport's buffer, and paused at once when attached while the
        buffer is full.
        """
        calls = Calls()
        protocol, transport = self.connect(self.site(calls))
        protocol.dataReceived(get(b"/vllm/a"))
        producer = StringTransport()
        calls.calls[0].registerProducer(producer, True)
        transport.producer.pauseProducing()
        self.assertEqual(producer.producerState, "paused")
        transport.producer.resumeProducing()
        self.assertEqual(producer.producerState, "producing")
        calls.calls[0].unregisterProducer()
        transport.producer.pauseProducing()
        other = StringTransport()
        protocol.attach_producer(other)
        self.assertEqual(other.producerState, "paused")

    def test_closing_unregisters(self):
        """
        A connection closing unregisters its producer, so a transport whose
        buffer drains closes instead of waiting for it.
        """
        protocol, transport = self.connect(self.site(Calls()))
        protocol.dataReceived(b"GET /vllm/a HTTP/1.1\r\nHost: x\r\nContent-Length: x\r\n\r\n")
        self.assertTrue(transport.disconnecting)
        self.assertIsNone(transport.producer)

    def test_upgrades_in_one_read(self):
        """
        3000 upgrade requests in one read are answered in turn, by a loop:
        no recursion, however many one read holds.
        """
        calls = Calls(answer_at_once=True)
        protocol, transport = self.connect(self.site(calls))
        protocol.dataReceived(get(b"/vllm/", b"Upgrade: a", b"Connection: upgrade") * 3000)
        self.settle(4000)
        self.assertEqual(len(calls.calls), 3000)
        self.assertEqual(transport.value().count(b"HTTP/1.1 200 OK"), 3000)

    def test_upgrade_with_body_refused(self):
        """
        An upgrade request with a body is refused (400): llhttp would parse
        the body as the next request.
        """
        calls = Calls()
        protocol, transport = self.connect(self.site(calls))
        protocol.dataReceived(
            get(b"/vllm/a", b"Upgrade: a", b"Connection: upgrade", b"Content-Length: 24", method=b"POST")
            + get(b"/vllm/smuggled")[:24]
        )
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 400 "), transport.value())
        self.assertEqual(calls.calls, [])


class ControlGateTests(ListenerTestCase):
    """
    Control requests: the key is checked when the head arrives, the body
    read only after, capped at C{max_control_body_bytes}; forms are not
    parsed.
    """

    def test_no_key_refused_before_body(self):
        """
        Without a key, a control request is answered 401 from its head and
        the connection closed; its body is never read.
        """
        protocol, transport = self.connect(self.site(authenticator=PendingKeys()))
        protocol.dataReceived(get(b"/key/generate", b"Content-Length: 100000000", method=b"POST") + b"x" * 1000)
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 401 "), transport.value())
        self.assertTrue(transport.disconnecting)
        self.assertEqual(self.control.seen, [])

    def test_body_waits_for_key(self):
        """
        While a key is being looked up, the body is not parsed and reading
        stops; no C{100 Continue} is sent before the key is good.
        """
        keys = PendingKeys()
        protocol, transport = self.connect(self.site(authenticator=keys))
        protocol.dataReceived(
            get(b"/key/generate", b"Authorization: Bearer sk-slow", b"Content-Length: 2", b"Expect: 100-continue", method=b"POST")
        )
        self.assertEqual(transport.value(), b"")
        self.assertEqual(transport.producerState, "paused")
        keys.waiting[0].callback("virtual")
        self.assertEqual(transport.value(), b"HTTP/1.1 100 Continue\r\n\r\n")
        self.assertEqual(transport.producerState, "producing")
        protocol.dataReceived(b"{}")
        self.assertEqual(self.control.seen, [b"/key/generate"])

    def test_slow_key_refused(self):
        """
        A key found bad after a lookup gets 401 without its body being read.
        """
        keys = PendingKeys()
        protocol, transport = self.connect(self.site(authenticator=keys))
        protocol.dataReceived(get(b"/key/list", b"Authorization: Bearer sk-slow", b"Content-Length: 5", method=b"POST") + b"hello")
        keys.waiting[0].errback(unauthorized())
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 401 "), transport.value())
        self.assertEqual(self.control.seen, [])

    def test_public_routes(self):
        """
        The health routes and C{/metrics} need no key.
        """
        protocol, transport = self.connect(self.site(authenticator=PendingKeys()))
        protocol.dataReceived(get(b"/health/liveliness") + get(b"/health/readiness") + get(b"/metrics?x=1"))
        self.settle()
        self.assertEqual(self.control.seen, [b"/health/liveliness", b"/health/readiness", b"/metrics"])

    def test_body_cap(self):
        """
        With a good key, a control body declared over
        C{max_control_body_bytes} gets 413 from its head; a chunked one as
        it grows past.
        """
        site = self.site(authenticator=PendingKeys(), max_control_body_bytes=10)
        auth = b"Authorization: Bearer " + KEY
        protocol, transport = self.connect(site)
        protocol.dataReceived(get(b"/key/generate", auth, b"Content-Length: 11", method=b"POST"))
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 413 "), transport.value())
        protocol, transport = self.connect(site)
        protocol.dataReceived(get(b"/key/generate", auth, b"Transfer-Encoding: chunked", method=b"POST") + b"6\r\nabcdef\r\n")
        self.assertEqual(transport.value(), b"")
        protocol.dataReceived(b"6\r\nabcdef\r\n")
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 413 "), transport.value())
        self.assertEqual(self.control.seen, [])

    def test_form_not_parsed(self):
        """
        An urlencoded body reaches the control plane as bytes: twisted.web
        does not parse it into C{request.args}.
        """
        protocol, transport = self.connect(self.site())
        protocol.dataReceived(
            get(b"/x?q=1", b"Content-Type: application/x-www-form-urlencoded", b"Content-Length: 7", method=b"POST") + b"a=1&b=2"
        )
        answer = transport.value()
        document = json.loads(answer[answer.index(b"{"):answer.rindex(b"}") + 1])
        self.assertEqual(document, {"path": "/x", "args": ["q"], "body": "a=1&b=2"})


class FramingTests(ListenerTestCase):
    """
    Request framing details: trailers, HTTP/1.0 with Transfer-Encoding,
    Connection tokens naming headers the proxy reads, C{100 Continue} for
    calls.
    """

    def test_trailers_dropped(self):
        """
        Trailer fields of a chunked body are not merged into the call's
        headers (RFC 9110 6.5.1).
        """
        calls = Calls()
        protocol, transport = self.connect(self.site(calls))
        protocol.dataReceived(
            get(b"/vllm/a", b"Transfer-Encoding: chunked", b"Content-Type: application/octet-stream", method=b"POST")
            + b"2\r\nhi\r\n0\r\nX-Evil: 1\r\nAuthorization: Bearer sk-other\r\n\r\n"
        )
        exchange = calls.calls[0]
        self.assertTrue(exchange.body.complete)
        names = [name.lower() for name, _ in exchange.raw_headers]
        self.assertNotIn(b"x-evil", names)
        self.assertNotIn(b"authorization", names)
        self.assertIsNone(exchange.getHeader(b"x-evil"))

    def test_trailers_bounded(self):
        """
        Trailers over C{max_header_bytes} get the call refused (431).
        """
        calls = Calls()
        protocol, transport = self.connect(self.site(calls, max_header_bytes=200))
        protocol.dataReceived(get(b"/vllm/a", b"Transfer-Encoding: chunked", method=b"POST") + b"0\r\n")
        for i in range(10):
            protocol.dataReceived(b"X-T%d: %s\r\n" % (i, b"v" * 40))
        self.assertIn(b" 431 ", transport.value())

    def test_http10_chunked_closes(self):
        """
        An HTTP/1.0 request with Transfer-Encoding is answered and the
        connection closed (RFC 9112 6.1), even when it asked for
        keep-alive.
        """
        calls = Calls(answer_at_once=True)
        protocol, transport = self.connect(self.site(calls))
        protocol.dataReceived(
            get(b"/vllm/a", b"Connection: keep-alive", b"Transfer-Encoding: chunked", method=b"POST", version=b"HTTP/1.0")
            + b"0\r\n\r\n" + get(b"/vllm/b")
        )
        self.settle()
        self.assertEqual([c.uri for c in calls.calls], [b"/vllm/a"])
        self.assertIn(b"Connection: close", transport.value())
        self.assertTrue(transport.disconnecting)

    def test_connection_naming_read_headers(self):
        """
        A Connection header naming a header the proxy reads (and vLLM must
        see) is refused (400); C{keep-alive} and other names are fine.
        """
        for name in (b"content-type", b"Content-Length", b"transfer-encoding", b"host", b"authorization", b"x-forwarded-for"):
            calls = Calls()
            protocol, transport = self.connect(self.site(calls))
            protocol.dataReceived(get(b"/vllm/a", b"Connection: keep-alive, " + name))
            self.assertTrue(transport.value().startswith(b"HTTP/1.1 400 "), (name, transport.value()))
            self.assertEqual(calls.calls, [])
        calls = Calls()
        protocol, transport = self.connect(self.site(calls))
        protocol.dataReceived(get(b"/vllm/a", b"Connection: keep-alive, x-custom"))
        self.assertEqual(len(calls.calls), 1)

    def test_continue_when_body_wanted(self):
        """
        A call with C{Expect: 100-continue} gets its C{100 Continue} when
        the data plane asks for the body (after its checks), not when the
        head arrives; a call refused first never gets one.
        """
        calls = Calls()
        protocol, transport = self.connect(self.site(calls))
        protocol.dataReceived(get(b"/vllm/a", b"Content-Length: 2", b"Expect: 100-continue", b"Content-Type: application/json", method=b"POST"))
        self.assertEqual(transport.value(), b"")
        collected = calls.calls[0].body.collect()
        self.assertEqual(transport.value(), b"HTTP/1.1 100 Continue\r\n\r\n")
        protocol.dataReceived(b"{}")
        self.assertEqual(self.successResultOf(collected), b"{}")
        protocol, transport = self.connect(self.site(calls))
        protocol.dataReceived(get(b"/vllm/b", b"Content-Length: 2", b"Expect: 100-continue", method=b"POST"))
        calls.calls[-1].answer_error(ProxyError(401, "no"))
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 401 "), transport.value())

    def test_json_cap(self):
        """
        A JSON call body (or one without Content-Type) gets
        C{max_json_body_bytes}; an upload keeps C{max_request_body_bytes}.
        """
        calls = Calls()
        site = self.site(calls, max_json_body_bytes=10, max_request_body_bytes=100)
        for content_type, status in ((b"application/json", b" 413 "), (b"multipart/form-data; boundary=x", None)):
            protocol, transport = self.connect(site)
            protocol.dataReceived(get(b"/vllm/a", b"Content-Type: " + content_type, b"Content-Length: 50", method=b"POST"))
            if status is None:
                self.assertIsNone(calls.calls[-1].rejection)
            else:
                self.assertIn(b"10 bytes", calls.calls[-1].rejection.message.encode())
