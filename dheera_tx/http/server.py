"""
The listening side: one lean HTTP/1.1 connection protocol serving both
planes on one port.

L{GatewayConnection} parses requests with httptools (llhttp, strict: no
Content-Length with Transfer-Encoding, no second Content-Length, no folded
or malformed header lines, no bad chunk framing).  A C{/vllm} call becomes
a L{ClientExchange} as soon as its headers have arrived and is served by
the data plane (L{dheera_tx.forwarding.Passthrough}) while its body streams
on; every other request has its key checked when its headers arrive
(L{dheera_tx.http.control_requests}), is then read whole and handed to the
Klein control plane through L{dheera_tx.http.control_bridge}.  On top of the
parser the connection enforces what the proxy needs: a deadline for request
headers (and for an idle keep-alive connection), size and count limits on
the head (414/431), one Transfer-Encoding (plain C{chunked}), no second
copy of a header the proxy and vLLM could read differently, the body caps
(413) and the body's pace (408).  L{GatewaySite} caps the open connections.

What a client may make the connection hold is bounded: bytes are fed to
the parser a request at a time (L{_piece_end}), at most L{PIPELINE_DEPTH}
pipelined requests are parsed ahead of the one being answered, and while
the socket's send buffer is over its high-water mark
(L{dheera_tx.http.answer_flow}) no further request starts and nothing more
is read.  Whatever a client sends or leaves unread, a connection holds at
most one read of unparsed bytes, a few parsed heads and one buffer of
answer.

Every answer the listening side makes itself is in the OpenAI error shape
(L{dheera_tx.http.listener_limits}).
"""

from typing import List, Optional

import httptools
from twisted.internet.interfaces import IProtocolNegotiationFactory
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import server as webserver
from zope.interface import implementer

from dheera_tx.errors import ProxyError, bad_request
from dheera_tx.http.answer_flow import AnswerFlow
from dheera_tx.http.client_exchange import ClientExchange
from dheera_tx.http.control_bridge import ControlBridge
from dheera_tx.http.control_requests import ControlGate, ControlRequest
from dheera_tx.http.listener_limits import (
    CLOSE_GRACE,
    BodyPace,
    BodyStalled,
    ConnectionLimitReached,
    HeadDeadlines,
    ListenerLimits,
    raw_answer,
    request_timeout,
    too_large,
)
from dheera_tx.http.paths import is_passthrough
from dheera_tx.http.request_body import BodyTooLarge, StreamingBody
from dheera_tx.http.request_head import (
    MALFORMED,
    RequestHead,
    RequestLine,
    framing,
    headers_too_large,
    request_line_too_long,
)
from dheera_tx.routing.model_choice import MultipartModelWatch, is_json, multipart_boundary

log = Logger()

_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
_VERSIONS = {"1.1": b"HTTP/1.1", "1.0": b"HTTP/1.0"}
_HEAD_END = b"\r\n\r\n"

# Requests parsed ahead of the one being answered: enough for any client
# that pipelines in earnest, few enough that their heads cost little.
PIPELINE_DEPTH = 16


class _Stop(Exception):
    """
    Raised from a parser callback to stop parsing a refused request.
    """


_STARTING = object()


class GatewayConnection(Protocol):
    """
    One client connection: requests parsed in order, answered in order.
    """

    def __init__(self, site: "GatewaySite"):
        self.site = site
        self._limits: ListenerLimits = site.limits
        self._parser = httptools.HttpRequestParser(self)
        self._counted = False
        self._refused = False
        self._closing = False
        self._lost = False
        self._close_timer = None
        self._held: set = set()
        # Bytes read but not parsed yet, and whether they are being parsed.
        self._unparsed = b""
        self._parsing = False
        self._reading_done = False
        # The last bytes fed while a head (or a chunked body) was
        # incomplete: its end may straddle two reads.
        self._tail = b""
        # Bytes left of a Content-Length body being parsed, or None.
        self._body_left: Optional[int] = None
        # The request being parsed.
        self._incoming = None
        self._in_head = False
        self._head_bytes = 0
        self._trailer_bytes = 0
        self._head = RequestHead(self._limits)
        self._body_limit = self._limits.max_request_body_bytes
        self._pace: Optional[BodyPace] = None
        self._form_watch: Optional[MultipartModelWatch] = None
        self._to_dispatch = None
        self._line = RequestLine(self._limits.max_header_bytes)
        # The request being answered, and those waiting for their turn.
        self._active = None
        self._queue: list = []
        # A control request with Expect: 100-continue whose 100 waits for
        # its key check or for the answer before it.
        self._continue_owed = None
        self._control_keep_alive = True
        self._flow = AnswerFlow(self._write_blocked, self._write_unblocked)

    # Connection events.

    def connectionMade(self) -> None:
        self._counted = True
        self.site.connection_opened()
        try:
            self.transport.setTcpNoDelay(True)
        except Exception:
            pass
        self._flow.register(self.transport)
        self.site.deadlines.watch(self)

    def dataReceived(self, data: bytes) -> None:
        if self._refused or self._reading_done:
            return
        self._unparsed = self._unparsed + data if self._unparsed else data
        self._parse()

    def _parse(self) -> None:
        """
        Feed the unparsed bytes to the parser a request (or the rest of a
        body) at a time, while requests may be parsed; keep the rest, and
        stop reading, until they may again.  A loop: a read full of
        pipelined (or upgrade) requests never recurses.
        """
        if self._parsing:
            # Called back from inside the loop: it goes on by itself.
            return
        self._parsing = True
        try:
            data, self._unparsed = self._unparsed, b""
            size = len(data)
            offset = 0
            view = None
            while offset < size and not self._refused and not self._lost and not self._parse_paused():
                end = self._piece_end(data, offset)
                if offset == 0 and end == size:
                    piece = data
                else:
                    if view is None:
                        view = memoryview(data)
                    piece = view[offset:end]
                offset += self._take(piece)
            if self._refused or self._lost:
                self._unparsed = b""
            elif offset < size:
                rest = data[offset:]
                self._unparsed = rest + self._unparsed if self._unparsed else rest
        finally:
            self._parsing = False
        if self._closing or self._lost:
            return
        if self._unparsed or self._parse_paused():
            self._hold(b"ahead")
        else:
            self._release(b"ahead")

    def _parse_paused(self) -> bool:
        """
        :return: whether no more bytes may be parsed now: the answers are
            not being read, enough requests wait, a control request's key
            is being checked, or the next bytes are the body of a request
            waiting for its turn.
        """
        if self._flow.is_blocked or len(self._queue) >= PIPELINE_DEPTH or self._reading_done:
            return True
        incoming = self._incoming
        if incoming is None or self._in_head:
            return False
        if isinstance(incoming, ControlRequest):
            return not incoming.admitted
        return incoming is not self._active

    def _piece_end(self, data: bytes, offset: int) -> int:
        """
        :return: where the piece of C{data} to feed next, from C{offset},
            ends: the end of a Content-Length body, else just past the next
            empty line (every head, and every chunked body, ends with one;
            a cut inside chunk data is harmless), else the end of the data.
        """
        left = self._body_left
        if left is not None and not self._in_head and self._incoming is not None:
            return min(len(data), offset + left)
        tail = self._tail
        if tail and offset == 0:
            at = (tail + data[:3]).find(_HEAD_END)
            if at >= 0:
                return at + 4 - len(tail)
        at = data.find(_HEAD_END, offset)
        return len(data) if at < 0 else at + 4

    def _take(self, piece) -> int:
        """
        Parse one piece of the input.

        :return: the bytes of it consumed (all, unless an upgrade request
            ended inside it: the rest is parsed as what follows).
        """
        starts = self._incoming is None
        if starts or self._in_head:
            self._head_bytes += len(piece)
            if starts:
                # A request starts with this piece: check its request line.
                self._line.start()
            if self._line.checking and not self._line.feed(bytes(piece)):
                self._refuse(bad_request(MALFORMED))
                return len(piece)
        consumed = self._feed(piece)
        self._tail = bytes(piece[-3:]) if self._incoming is not None and self._body_left is None else b""
        if self._to_dispatch is not None:
            exchange, self._to_dispatch = self._to_dispatch, None
            if not self._refused:
                self.site.passthrough.serve(exchange)
        incoming = self._incoming
        if incoming is None:
            return consumed
        if self._in_head:
            if self._head_bytes > self._limits.max_header_bytes:
                limit = self._limits.max_header_bytes
                self._refuse(headers_too_large(limit) if self._head.headers else request_line_too_long(limit))
        elif self._pace is None and not self._refused:
            self._pace = BodyPace(self.site.reactor, self._limits.body_timeout, self._body_too_slow)
            if self._held:
                self._pace.pause()
        return consumed

    def _feed(self, data) -> int:
        """
        Parse C{data}.

        :return: the bytes parsed: fewer than given after an upgrade
            request (answered as a plain request: upgrades are not
            supported), whose end the parser stops at.
        """
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade as e:
            return e.args[0] if e.args else len(data)
        except httptools.HttpParserCallbackError as e:
            if not isinstance(e.__context__, _Stop):
                log.failure("Request parsing failed", Failure(e.__context__ or e))
                self._malformed()
        except httptools.HttpParserError:
            self._malformed()
        return len(data)

    def connectionLost(self, reason: Failure = None) -> None:
        self._lost = True
        self._unparsed = b""
        self.site.deadlines.forget(self)
        self._stop_pace()
        if self._close_timer is not None:
            if self._close_timer.active():
                self._close_timer.cancel()
            self._close_timer = None
        if self._counted:
            self._counted = False
            self.site.connection_closed()
        waiting = [self._active, self._incoming] + self._queue
        self._active = self._incoming = None
        self._queue = []
        for exchange in waiting:
            if isinstance(exchange, ClientExchange):
                exchange.connection_lost()
            elif exchange is not None and hasattr(exchange, "connection_lost"):
                exchange.connection_lost(reason)

    # Parser callbacks.

    def on_message_begin(self) -> None:
        self._in_head = True
        self._head = RequestHead(self._limits)
        self._incoming = True
        self._body_left = None
        self._trailer_bytes = 0

    def on_url(self, fragment: bytes) -> None:
        self._head.url.append(fragment)

    def on_header(self, name: bytes, value: bytes) -> None:
        if self._refused:
            raise _Stop()
        if not self._in_head:
            # A trailer field of a chunked body: dropped (RFC 9110 6.5.1:
            # never merged into the header section), but counted.
            self._trailer_bytes += len(name) + len(value) + 4
            if self._trailer_bytes > self._limits.max_header_bytes:
                self._refuse_incoming(headers_too_large(self._limits.max_header_bytes))
                raise _Stop()
            return
        try:
            self._head.add_header(name, value)
        except ProxyError as e:
            self._refuse(e)
            raise _Stop()

    def on_headers_complete(self) -> None:
        if self._refused:
            raise _Stop()
        self._in_head = False
        self._head_bytes = 0
        self.site.deadlines.forget(self)
        parser = self._parser
        head = self._head
        try:
            target = head.target()
            head.check_connection()
        except ProxyError as e:
            self._refuse(e)
            raise _Stop()
        version = _VERSIONS.get(parser.get_http_version())
        if version is None:
            self._refuse(bad_request("Only HTTP/1.0 and HTTP/1.1 are served."))
            raise _Stop()
        method = parser.get_method()
        headers = head.headers
        length, chunked, expect = framing(headers)
        has_body = chunked or bool(length)
        if has_body and head.upgrade(method):
            # llhttp would read what follows the head as the upgraded
            # protocol: the body would be parsed as the next request.
            self._refuse(bad_request("Upgrade requests with a body are not served."))
            raise _Stop()
        if not target.startswith(b"/") and target != b"*":
            # Absolute-form ("http://host/...") and other targets that are
            # not a path: the host comes from config only.
            self._refuse(bad_request("The request target must be a path (origin-form), not a URL."))
            raise _Stop()
        # RFC 9112 6.1: an HTTP/1.0 message with Transfer-Encoding has
        # faulty framing: answer it, then close.
        keep_alive = parser.should_keep_alive() and not (chunked and version != b"HTTP/1.1")
        expect = expect and has_body and version == b"HTTP/1.1"
        if not chunked and length:
            self._body_left = length
        site = self.site
        if is_passthrough(target) and site.passthrough is not None:
            self._incoming_call(method, target, version, headers, length, chunked, has_body, expect, keep_alive)
            return
        request = ControlRequest(method, target, version, headers)
        request.keep_alive = keep_alive
        if length is not None and length > self._limits.max_control_body_bytes:
            request.rejection = too_large(self._limits.max_control_body_bytes)
        self._incoming = request
        if expect:
            self._continue_owed = request
        # Fires at once for the master key, no key or a public route.
        site.gate.check(target, headers).addCallbacks(
            self._admit_control, self._gate_failed, callbackArgs=(request,), errbackArgs=(request,)
        )

    def _incoming_call(self, method, target, version, headers, length, chunked, has_body, expect, keep_alive) -> None:
        """
        A C{/vllm} call's head has arrived: make its exchange, dispatched
        at once unless an answer is in progress.
        """
        site = self.site
        exchange = ClientExchange(self, method, target, version, headers, site.reactor.seconds(), keep_alive)
        if has_body:
            content_type = exchange.getHeader(b"content-type")
            # A JSON body is parsed whole: its own, smaller cap.
            limit = self._limits.max_json_body_bytes if is_json(content_type) else self._limits.max_request_body_bytes
            self._body_limit = limit
            if length is not None and length > limit:
                exchange.rejection = too_large(limit)
            else:
                try:
                    boundary = multipart_boundary(content_type)
                except ProxyError as e:
                    exchange.rejection = e
                else:
                    if boundary is not None:
                        self._form_watch = MultipartModelWatch(boundary)
                    exchange.body = StreamingBody(None if chunked else length, self._hold_body, self._release_body, limit)
                    if expect:
                        # Sent once the call wants its body: after the key,
                        # the route and the limits are checked.
                        exchange.body.on_demand = lambda: self._send_continue(exchange)
        self._incoming = exchange
        if self._active is None and not self._flow.is_blocked:
            self._active = exchange
            self._to_dispatch = exchange
        else:
            self._queue.append(exchange)

    def _send_continue(self, exchange: ClientExchange) -> None:
        """
        C{exchange} asks for its body: send its C{100 Continue}, unless
        its client started the body anyway (after its own expect timeout).
        """
        body = exchange.body
        if body is not None and body.received == 0 and not exchange.startedWriting and not self._closing and not self._lost:
            self.transport.write(_CONTINUE)

    def _admit_control(self, error: Optional[ProxyError], request: ControlRequest) -> None:
        """
        The key check of control request C{request} is done: let its body
        be read, or answer C{error} when its turn comes (its body unread).
        """
        if self._lost or self._refused:
            return
        if error is not None:
            request.rejection = error
        if request.rejection is not None:
            # Nothing more is read from this connection.
            self._continue_owed = None
            request.complete = True
            # Nothing after this request is read: it is answered and the
            # connection closed.
            self._unparsed = b""
            self._reading_done = True
            self._hold(b"done")
            if self._incoming is request:
                self._incoming = None
            self._enqueue_control(request)
            return
        request.admitted = True
        if self._active is None:
            self._pay_continue(request)
        if not self._parsing:
            self._parse()

    def _gate_failed(self, failure: Failure, request: ControlRequest) -> None:
        log.failure("Checking a control request's key failed", failure)
        self._admit_control(ProxyError(500, "The proxy failed to handle this request.", type="internal_error", code="500"), request)

    def _pay_continue(self, request) -> None:
        """
        Send C{request}'s owed C{100 Continue} (its key is good, and no
        other answer is being written), unless its client already started
        the body.
        """
        if request is not self._continue_owed or not request.admitted:
            return
        self._continue_owed = None
        if request.size == 0 and not self._closing and not self._lost:
            self.transport.write(_CONTINUE)

    def on_body(self, data: bytes) -> None:
        incoming = self._incoming
        if self._body_left is not None:
            self._body_left -= len(data)
        if self._pace is not None:
            self._pace.arrived(len(data))
            if self._refused:
                raise _Stop()
        if isinstance(incoming, ClientExchange):
            if incoming.rejection is not None or incoming.finished or incoming.body is None:
                return
            if self._form_watch is not None:
                try:
                    self._form_watch.feed(data)
                except ProxyError as e:
                    # Refused before this chunk goes on: vLLM never gets the
                    # whole form.
                    self._form_watch = None
                    incoming.refuse(e)
                    return
            body = incoming.body
            body.receive(data)
            failure = body.failure
            if failure is not None and failure.check(BodyTooLarge):
                self._stop_pace()
                incoming.refuse(too_large(failure.value.limit or self._body_limit))
        elif isinstance(incoming, ControlRequest):
            incoming.size += len(data)
            if incoming.size > self._limits.max_control_body_bytes:
                self._refuse(too_large(self._limits.max_control_body_bytes))
                raise _Stop()
            incoming.chunks.append(data)

    def on_message_complete(self) -> None:
        self._stop_pace()
        self._form_watch = None
        self._body_left = None
        incoming, self._incoming = self._incoming, None
        self._in_head = False
        self._head_bytes = 0
        self._body_limit = self._limits.max_request_body_bytes
        self._line.stop()
        if isinstance(incoming, ClientExchange):
            if incoming.body is not None:
                incoming.body.end()
        elif isinstance(incoming, ControlRequest):
            incoming.complete = True
            self._enqueue_control(incoming)

    def _enqueue_control(self, request: ControlRequest) -> None:
        if self._active is None and not self._queue and not self._flow.is_blocked:
            self._start_control(request)
        else:
            self._queue.append(request)

    # Answers done, next requests.

    def _start_control(self, request: ControlRequest) -> None:
        if request.rejection is not None:
            self._refused = True
            self._active = _STARTING
            self.transport.write(raw_answer(request.rejection))
            self._close()
            return
        # The answer may be complete before serve() returns.
        self._active = _STARTING
        self._control_keep_alive = request.keep_alive
        exchange = self.site.control.serve(
            self, request.method, request.target, request.version, request.headers, request.body()
        )
        if self._active is _STARTING:
            self._active = exchange

    def exchange_done(self, exchange: ClientExchange) -> None:
        """
        A pass-through call's answer is complete.
        """
        self._answer_done(exchange.keep_alive)

    def control_done(self, keep_alive: bool) -> None:
        """
        A control-plane request's answer is complete.
        """
        self._answer_done(keep_alive and self._control_keep_alive)

    def _answer_done(self, keep_alive: bool) -> None:
        self._active = None
        if self._lost or self._closing:
            return
        if not keep_alive or self._refused:
            self._close()
            return
        if self._queue:
            self.site.reactor.callLater(0, self._start_next)
            return
        if self._incoming is not None:
            # A control request still reading its body.
            self._pay_continue(self._incoming)
        elif not self._unparsed:
            # Between requests the connection gets the header deadline too,
            # so an idle keep-alive connection does not hold its place.
            self.site.deadlines.watch(self)
        self._parse()

    def _start_next(self) -> None:
        if self._active is not None or not self._queue or self._closing or self._lost or self._flow.is_blocked:
            return
        request = self._queue.pop(0)
        if isinstance(request, ClientExchange):
            self._active = request
            self.site.passthrough.serve(request)
        else:
            self._start_control(request)
        if self._active is None and self._incoming is None and not self._queue and not self._unparsed:
            self.site.deadlines.watch(self)
        self._parse()

    # Write backpressure (AnswerFlow).

    def _write_blocked(self) -> None:
        # Stop reading: requests read now could not be answered anyway.
        self._hold(b"write")

    def _write_unblocked(self) -> None:
        self._release(b"write")
        if self._lost or self._closing:
            return
        if self._queue and self._active is None:
            self._start_next()
        else:
            self._parse()

    def attach_producer(self, producer) -> None:
        """
        Let the connection's write backpressure pause and resume
        C{producer} (the producer of the answer being written).
        """
        self._flow.attach(producer)

    def detach_producer(self) -> None:
        """
        Undo L{attach_producer}.
        """
        self._flow.detach()

    # Refusals and closing.

    def head_too_slow(self) -> None:
        """
        The request head did not arrive in time (called by L{HeadDeadlines}).
        """
        if self._lost or self._refused or self._active is not None:
            return
        if self._incoming is None and self._head_bytes == 0:
            # Nothing of a request arrived: an idle (keep-alive) connection
            # is closed without an answer.
            self._close()
            return
        log.info("Dropping a client that did not send request headers in time")
        self._refuse(request_timeout("The request headers did not arrive in time."))

    def _malformed(self) -> None:
        self._refuse_incoming(bad_request(MALFORMED))

    def _refuse_incoming(self, error: ProxyError) -> None:
        """
        Refuse the request being parsed: a call already dispatched answers
        itself (and fails the body it is streaming upstream); anything else
        is answered on the raw connection.
        """
        incoming = self._incoming
        if isinstance(incoming, ClientExchange) and incoming is self._active and not incoming.finished:
            self._refused = True
            self._stop_pace()
            incoming.refuse(error)
            return
        self._refuse(error)

    def _body_too_slow(self, message: str) -> None:
        log.info("Dropping a client whose request body is too slow: {why}", why=message)
        self._pace = None
        self._refuse_incoming(BodyStalled(message))

    def _refuse(self, error: ProxyError) -> None:
        """
        Answer C{error} on the raw connection (unless an answer has started)
        and close it: for a request that cannot be parsed or may not go on.
        """
        if self._lost or self._refused:
            return
        self._refused = True
        self._unparsed = b""
        self.site.deadlines.forget(self)
        self._stop_pace()
        active = self._active
        if active is None or (isinstance(active, ClientExchange) and not active.startedWriting):
            if isinstance(active, ClientExchange):
                active.refuse(error)
                return
            self.transport.write(raw_answer(error))
            self._close()
        # Otherwise the answer in progress ends and the connection closes.

    def _close(self) -> None:
        self._closing = True
        self.site.deadlines.forget(self)
        # A transport whose producer is paused would wait for it instead of
        # closing once its buffer drains.
        self._flow.unregister()
        self.transport.loseConnection()
        if self._close_timer is None:
            self._close_timer = self.site.reactor.callLater(CLOSE_GRACE, self._cut_off)

    def _cut_off(self) -> None:
        self._close_timer = None
        if not self._lost:
            self.transport.abortConnection()

    # Reading pace and backpressure.

    def _stop_pace(self) -> None:
        if self._pace is not None:
            self._pace.stop()
            self._pace = None

    def _hold(self, reason: bytes) -> None:
        """
        Stop reading from the client (the upstream holds the body back, a
        pipelined request waits for its turn, the answers are not being
        read); the body's pace clock stops too.
        """
        if not self._held:
            self.transport.pauseProducing()
            if self._pace is not None:
                self._pace.pause()
        self._held.add(reason)

    def _release(self, reason: bytes) -> None:
        if reason in self._held:
            self._held.discard(reason)
            if not self._held and not self._lost and not self._closing:
                self.transport.resumeProducing()
                if self._pace is not None:
                    self._pace.resume()

    def _hold_body(self) -> None:
        self._hold(b"body")

    def _release_body(self) -> None:
        self._release(b"body")


@implementer(IProtocolNegotiationFactory)
class GatewaySite(Factory):
    """
    The listening factory both planes share.

    :param control: the control-plane resource (Klein, under
        L{dheera_tx.control.ControlRoot}).
    :param passthrough: the data plane (L{dheera_tx.forwarding.Passthrough}),
        or L{None} to serve the control plane only.
    :param limits: a L{ListenerLimits}.
    :param gate: the L{ControlGate} checking control-plane keys when the
        headers arrive (default: none, every request is read).
    :ivar open_connections: connections open now (in this process:
        C{max_connections} holds per worker).
    :ivar refused_connections: connections refused for being over the
        limit.
    """

    protocol = GatewayConnection

    def __init__(self, control, passthrough, limits: ListenerLimits, reactor, gate: Optional[ControlGate] = None):
        self.passthrough = passthrough
        self.limits = limits
        self.reactor = reactor
        self.gate = gate or ControlGate(None)
        # No handler reads a form; twisted.web would parse one on the
        # reactor (a 1 MiB urlencoded body is a quarter million fields).
        self.control_site = webserver.Site(control, reactor=reactor, parsePOSTFormSubmission=False)
        self.control_site.displayTracebacks = False
        # Pass-through calls are logged as call records (dheera_tx.call);
        # the stock access log would print URIs with secrets in queries.
        self.control_site.log = lambda request: None
        self.control = ControlBridge(self.control_site)
        self.deadlines = HeadDeadlines(reactor, limits.header_timeout)
        self.open_connections = 0
        self.refused_connections = 0
        self._at_limit = False

    def acceptableProtocols(self) -> List[bytes]:
        """
        Over TLS, the protocol ALPN may choose: HTTP/1.1 only.  (Twisted
        selects over ALPN on every TLS listener; with nothing to offer, a
        client that offers ALPN, as curl and httpx do, gets an alert.)
        """
        return [b"http/1.1"]

    def buildProtocol(self, addr):
        if self.open_connections >= self.limits.max_connections:
            self.refused_connections += 1
            if not self._at_limit:
                self._at_limit = True
                log.warn("{limit} connections open: refusing new ones", limit=self.limits.max_connections)
            protocol = ConnectionLimitReached()
            protocol.factory = self
            return protocol
        return self.protocol(self)

    def doStop(self) -> None:
        super().doStop()
        if not self.numPorts:
            self.deadlines.stop()

    def connection_opened(self) -> None:
        """
        A connection of this site opened.
        """
        self.open_connections += 1

    def connection_closed(self) -> None:
        """
        A connection of this site closed.
        """
        self.open_connections -= 1
        if self._at_limit and self.open_connections < self.limits.max_connections:
            self._at_limit = False
            log.info("Accepting connections again")
