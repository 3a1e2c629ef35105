"""
The listening side: one lean HTTP/1.1 connection protocol serving both
planes on one port.

L{GatewayConnection} parses requests with httptools (llhttp, strict: no
Content-Length with Transfer-Encoding, no second Content-Length, no folded
or malformed header lines, no bad chunk framing).  A C{/vllm} call becomes
a L{ClientExchange} as soon as its headers have arrived and is served by
the data plane (L{dheera_tx.forwarding.Passthrough}) while its body streams
on; every other request is read whole and handed to the Klein control
plane through L{dheera_tx.http.control_bridge}.  On top of the parser the
connection enforces what the proxy needs: a deadline for request headers
(and for an idle keep-alive connection), size and count limits on the
head (414/431), one Transfer-Encoding (plain C{chunked}), no second copy of
a header the proxy and vLLM could read differently, the body size limit
(413) and the body's pace (408).  L{GatewaySite} caps the open connections.

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
from dheera_tx.http.client_exchange import ClientExchange
from dheera_tx.http.control_bridge import ControlBridge
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
from dheera_tx.http.request_head import MALFORMED, RequestHead, RequestLine, framing, headers_too_large, request_line_too_long
from dheera_tx.http.websocket import is_websocket_upgrade
from dheera_tx.routing.model_choice import MultipartModelWatch, multipart_boundary

log = Logger()

_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
_VERSIONS = {"1.1": b"HTTP/1.1", "1.0": b"HTTP/1.0"}


#: The upgrade target the data plane may switch to a WebSocket.
REALTIME_TARGET = b"/vllm/v1/realtime"
#: Bytes held after an upgrade request's head until the switch.
MAX_HELD_UPGRADE_BYTES = 65536


class _Stop(Exception):
    """
    Raised from a parser callback to stop parsing a refused request.
    """


_STARTING = object()


class _ControlRequest:
    """
    A control-plane request being read whole.
    """

    __slots__ = ("method", "target", "version", "headers", "chunks", "size", "complete")

    def __init__(self, method: bytes, target: bytes, version: bytes, headers):
        self.method = method
        self.target = target
        self.version = version
        self.headers = headers
        self.chunks: List[bytes] = []
        self.size = 0
        self.complete = False


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
        # The request being parsed.
        self._incoming = None
        self._in_head = False
        self._head_bytes = 0
        self._head = RequestHead(self._limits)
        self._body_limit = self._limits.max_request_body_bytes
        self._pace: Optional[BodyPace] = None
        self._form_watch: Optional[MultipartModelWatch] = None
        self._to_dispatch = None
        self._line = RequestLine(self._limits.max_header_bytes)
        # The request being answered, and those waiting for their turn.
        self._active = None
        self._queue: list = []
        # A request with Expect: 100-continue that arrived behind an
        # unfinished answer: its 100 goes out when its turn comes.
        self._continue_owed = None
        # A WebSocket upgrade waiting for the data plane's switch, the bytes
        # that came after its head, and the relay once switched.
        self._switching = None
        self._upgrade_rest = b""
        self._taken = None

    # Connection events.

    def connectionMade(self) -> None:
        self._counted = True
        self.site.connection_opened()
        try:
            self.transport.setTcpNoDelay(True)
        except Exception:
            pass
        self.site.deadlines.watch(self)

    def dataReceived(self, data: bytes) -> None:
        if self._taken is not None:
            self._taken.dataReceived(data)
            return
        if self._switching is not None:
            self._held_upgrade(data)
            return
        if self._refused:
            return
        if self._incoming is None or self._in_head:
            self._head_bytes += len(data)
            if self._incoming is None:
                # A request starts with this read: check its request line.
                self._line.start()
            if self._line.checking and not self._line.feed(data):
                self._refuse(bad_request(MALFORMED))
                return
        rest = self._feed(data)
        if self._to_dispatch is not None:
            exchange, self._to_dispatch = self._to_dispatch, None
            if not self._refused:
                self.site.passthrough.serve(exchange)
        if rest:
            self.dataReceived(rest)
            return
        incoming = self._incoming
        if incoming is None:
            return
        if self._in_head:
            if self._head_bytes > self._limits.max_header_bytes:
                limit = self._limits.max_header_bytes
                self._refuse(headers_too_large(limit) if self._head.headers else request_line_too_long(limit))
        elif self._pace is None and not self._refused:
            self._pace = BodyPace(self.site.reactor, self._limits.body_timeout, self._body_too_slow)
            if self._held:
                self._pace.pause()

    def _feed(self, data: bytes) -> bytes:
        """
        Parse C{data}.

        :return: bytes left to parse after an upgrade request (answered as
            a plain request: upgrades are not supported), else C{b""}.
        """
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade as e:
            offset = e.args[0] if e.args else len(data)
            upgraded = self._queue[-1] if self._queue else self._active
            if isinstance(upgraded, ClientExchange) and upgraded.switching and self._queue:
                # Behind unfinished answers: served as a plain request.
                upgraded.switching = False
            elif isinstance(upgraded, ClientExchange) and upgraded.switching:
                # The data plane may switch this connection to a WebSocket:
                # what follows the head is not HTTP; hold it for the relay.
                self._switching = upgraded
                self._held_upgrade(data[offset:])
                return b""
            return data[offset:]
        except httptools.HttpParserCallbackError as e:
            if not isinstance(e.__context__, _Stop):
                log.failure("Request parsing failed", Failure(e.__context__ or e))
                self._malformed()
        except httptools.HttpParserError:
            self._malformed()
        return b""

    def _held_upgrade(self, data: bytes) -> None:
        self._upgrade_rest += data
        if len(self._upgrade_rest) > MAX_HELD_UPGRADE_BYTES:
            # A client sends frames only after the 101.
            self.transport.abortConnection()

    def take_over(self, consumer):
        """
        Hand the connection to C{consumer} after a protocol switch (see
        L{ClientExchange.take_over}).

        :return: the transport.
        """
        self._taken = consumer
        self._switching = None
        self.site.deadlines.forget(self)
        self._stop_pace()
        if self._close_timer is not None and self._close_timer.active():
            self._close_timer.cancel()
        held, self._upgrade_rest = self._upgrade_rest, b""
        if held:
            self.site.reactor.callLater(0, consumer.dataReceived, held)
        return self.transport

    def connectionLost(self, reason: Failure = None) -> None:
        if self._taken is not None:
            taken, self._taken = self._taken, None
            taken.connectionLost(reason)
        self._lost = True
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

    def on_url(self, fragment: bytes) -> None:
        self._head.url.append(fragment)

    def on_header(self, name: bytes, value: bytes) -> None:
        if self._refused:
            raise _Stop()
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
        try:
            target = self._head.target()
        except ProxyError as e:
            self._refuse(e)
            raise _Stop()
        version = _VERSIONS.get(parser.get_http_version())
        if version is None:
            self._refuse(bad_request("Only HTTP/1.0 and HTTP/1.1 are served."))
            raise _Stop()
        method = parser.get_method()
        headers = self._head.headers
        length, chunked, expect = framing(headers)
        rejection = None
        if not target.startswith(b"/") and target != b"*":
            # Absolute-form ("http://host/...") and other targets that are
            # not a path: the host comes from config only.
            rejection = bad_request("The request target must be a path (origin-form), not a URL.")
        elif length is not None and length > self._body_limit:
            rejection = too_large(self._body_limit)
        has_body = chunked or bool(length)
        keep_alive = parser.should_keep_alive()
        site = self.site
        if is_passthrough(target) and site.passthrough is not None:
            exchange = ClientExchange(self, method, target, version, headers, site.reactor.seconds(), keep_alive)
            exchange.rejection = rejection
            if method == b"GET" and target.split(b"?", 1)[0] == REALTIME_TARGET and is_websocket_upgrade(exchange.requestHeaders):
                exchange.switching = True
                # Unless it switches, the connection ends with its answer:
                # what the client sent after the head is not HTTP.
                exchange.keep_alive = False
            if has_body and rejection is None:
                try:
                    boundary = multipart_boundary(exchange.getHeader(b"content-type"))
                except ProxyError as e:
                    exchange.rejection = rejection = e
                else:
                    if boundary is not None:
                        self._form_watch = exchange.form_watch = MultipartModelWatch(boundary)
                    exchange.body = StreamingBody(
                        None if chunked else length, self._hold_body, self._release_body, self._body_limit
                    )
            self._incoming = exchange
            # Never before an earlier answer: a request pipelined with
            # Expect gets its 100 when its turn comes.
            if expect and has_body and rejection is None and version == b"HTTP/1.1":
                self._expects_continue(exchange)
            if self._active is None:
                self._active = exchange
                self._to_dispatch = exchange
            else:
                self._queue.append(exchange)
                self._hold(b"queue")
            return
        if rejection is not None:
            self._refuse(rejection)
            raise _Stop()
        self._incoming = _ControlRequest(method, target, version, headers)
        if expect and has_body and version == b"HTTP/1.1":
            self._expects_continue(self._incoming)

    def _expects_continue(self, request) -> None:
        """
        Send C{100 Continue} for C{request} now, or once the answer before
        it is complete.
        """
        if self._active is None:
            self.transport.write(_CONTINUE)
        else:
            self._continue_owed = request

    def _pay_continue(self, request) -> None:
        """
        C{request}'s turn came: send its owed C{100 Continue}, unless its
        client already started the body (after its own expect timeout).
        """
        if request is not self._continue_owed:
            return
        self._continue_owed = None
        if isinstance(request, _ControlRequest):
            started = request.size > 0
        else:
            started = request.body is None or request.body.received > 0
        if not started and not self._closing and not self._lost:
            self.transport.write(_CONTINUE)

    def on_body(self, data: bytes) -> None:
        incoming = self._incoming
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
                incoming.refuse(too_large(self._body_limit))
        elif isinstance(incoming, _ControlRequest):
            incoming.size += len(data)
            if incoming.size > self._body_limit:
                self._refuse(too_large(self._body_limit))
                raise _Stop()
            incoming.chunks.append(data)

    def on_message_complete(self) -> None:
        self._stop_pace()
        self._form_watch = None
        incoming, self._incoming = self._incoming, None
        self._in_head = False
        self._head_bytes = 0
        # Only a request line that starts a read is checked.
        self._line.stop()
        if isinstance(incoming, ClientExchange):
            if incoming.body is not None:
                incoming.body.end()
        elif isinstance(incoming, _ControlRequest):
            incoming.complete = True
            if self._active is None:
                self._start_control(incoming)
            else:
                self._queue.append(incoming)
                self._hold(b"queue")

    # Answers done, next requests.

    def _start_control(self, request: _ControlRequest) -> None:
        # The answer may be complete before serve() returns.
        self._active = _STARTING
        exchange = self.site.control.serve(
            self, request.method, request.target, request.version, request.headers, b"".join(request.chunks)
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
        self._answer_done(keep_alive)

    def _answer_done(self, keep_alive: bool) -> None:
        self._active = None
        if self._lost or self._closing:
            return
        if not keep_alive or self._refused:
            self._close()
            return
        if self._queue:
            self.site.reactor.callLater(0, self._start_next)
        elif self._incoming is not None:
            # A control request still reading its body.
            self._pay_continue(self._incoming)
        else:
            # Between requests the connection gets the header deadline too,
            # so an idle keep-alive connection does not hold its place.
            self.site.deadlines.watch(self)

    def _start_next(self) -> None:
        if self._active is not None or not self._queue or self._closing or self._lost:
            return
        request = self._queue.pop(0)
        self._pay_continue(request)
        if not self._queue:
            self._release(b"queue")
        if isinstance(request, ClientExchange):
            self._active = request
            self.site.passthrough.serve(request)
        else:
            self._start_control(request)
        if self._active is None and self._incoming is None and not self._queue:
            self.site.deadlines.watch(self)

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
        error = bad_request(MALFORMED)
        incoming = self._incoming
        if isinstance(incoming, ClientExchange) and incoming is self._active and not incoming.finished:
            # A call already dispatched answers itself, and fails the body
            # it is streaming upstream.
            self._refused = True
            self._stop_pace()
            incoming.refuse(error)
            return
        self._refuse(error)

    def _body_too_slow(self, message: str) -> None:
        log.info("Dropping a client whose request body is too slow: {why}", why=message)
        error = BodyStalled(message)
        incoming = self._incoming
        self._pace = None
        if isinstance(incoming, ClientExchange) and incoming is self._active:
            self._refused = True
            incoming.refuse(error)
            return
        self._refuse(error)

    def _refuse(self, error: ProxyError) -> None:
        """
        Answer C{error} on the raw connection (unless an answer has started)
        and close it: for a request that cannot be parsed or may not go on.
        """
        if self._lost or self._refused:
            return
        self._refused = True
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
        Stop reading from the client (the upstream holds the body back, or
        a pipelined request waits for its turn); the body's pace clock
        stops too.
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
    :ivar open_connections: connections open now (in this process:
        C{max_connections} holds per worker).
    :ivar refused_connections: connections refused for being over the
        limit.
    """

    protocol = GatewayConnection

    def __init__(self, control, passthrough, limits: ListenerLimits, reactor):
        self.passthrough = passthrough
        self.limits = limits
        self.reactor = reactor
        self.control_site = webserver.Site(control, reactor=reactor)
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
