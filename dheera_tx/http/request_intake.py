"""
Reading requests off a client connection.

L{RequestIntake} is the reading half of
L{dheera_tx.http.server.GatewayConnection}: it feeds what the client sends
to httptools (llhttp) and turns the parser's callbacks into requests, a
L{ClientExchange} for a C{/vllm} call (dispatched as soon as its head has
arrived, its body streamed on) or a L{ControlRequest} (read whole once its
key is checked).  It applies the rules on a request head
(L{dheera_tx.http.request_head}) and the body caps.

Bytes are fed a request at a time (L{RequestIntake._piece_end}: up to the
end of a head, of a Content-Length body, or past the empty line that ends
every chunked body; cutting inside chunk data is harmless) in a loop, so a
read full of pipelined or upgrade requests never recurses, and parsing
stops between requests (L{RequestIntake._parse_paused}) when
L{PIPELINE_DEPTH} requests wait, when the answers are not being read, while
a control request's key is checked, or before the body of a request that
is not being answered yet.  What is not parsed stays in one buffer (at
most about one read) and reading stops.
"""

from typing import Optional

import httptools
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from dheera_tx.errors import ProxyError, bad_request
from dheera_tx.http.client_exchange import ClientExchange
from dheera_tx.http.control_requests import ControlRequest
from dheera_tx.http.listener_limits import BodyPace, ListenerLimits, too_large
from dheera_tx.http.paths import is_passthrough
from dheera_tx.http.request_body import BodyTooLarge, StreamingBody
from dheera_tx.http.request_head import MALFORMED, RequestHead, RequestLine, framing, headers_too_large, request_line_too_long
from dheera_tx.http.websocket import is_websocket_upgrade
from dheera_tx.routing.model_choice import MultipartModelWatch, is_json, multipart_boundary

log = Logger()

_VERSIONS = {"1.1": b"HTTP/1.1", "1.0": b"HTTP/1.0"}
_HEAD_END = b"\r\n\r\n"

# Requests parsed ahead of the one being answered: enough for any client
# that pipelines in earnest, few enough that their heads cost little.
PIPELINE_DEPTH = 16
# ...and the most bytes their heads (and control bodies) may hold: 16 heads
# of max_header_bytes each would be a megabyte.
PIPELINE_BYTES = 64 * 1024

#: The upgrade target the data plane may switch to a WebSocket.
REALTIME_TARGET = b"/vllm/v1/realtime"
#: Bytes held after an upgrade request's head until the switch.
MAX_HELD_UPGRADE_BYTES = 65536


class Stop(Exception):
    """
    Raised from a parser callback to stop parsing a refused request.
    """


class RequestIntake(Protocol):
    """
    The reading half of a client connection.

    The connection (the subclass) answers: it provides C{site} (with
    C{passthrough}, C{gate}, C{reactor}, C{deadlines}), the state
    C{_active}, C{_queue}, C{_queued_bytes}, C{_flow}, C{_held},
    C{_refused}, C{_lost}, C{_closing}, C{_continue_owed}, and the methods
    C{_queue_request}, C{_refuse}, C{_refuse_incoming},
    C{_malformed}, C{_admit_control}, C{_gate_failed},
    C{_enqueue_control}, C{_send_continue}, C{_body_too_slow},
    C{_stop_pace}, C{_hold}, C{_release}, C{_hold_body} and
    C{_release_body}.

    :param limits: the listener's limits.
    """

    def __init__(self, limits: ListenerLimits):
        self._limits = limits
        self._parser = httptools.HttpRequestParser(self)
        # Bytes read but not parsed yet, and whether they are being parsed.
        self._unparsed = b""
        self._parsing = False
        # Set once nothing more is to be read from the connection.
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
        self._head = RequestHead(limits)
        self._body_limit = limits.max_request_body_bytes
        self._pace: Optional[BodyPace] = None
        self._form_watch: Optional[MultipartModelWatch] = None
        self._to_dispatch = None
        self._line = RequestLine(limits.max_header_bytes)
        self._last_head_size = 0
        # A WebSocket upgrade waiting for the data plane's switch (what came
        # after its head waits unparsed), and the relay once switched.
        self._switching = None
        self._taken = None

    def dataReceived(self, data: bytes) -> None:
        if self._taken is not None:
            self._taken.dataReceived(data)
            return
        if self._refused or self._reading_done:
            return
        self._unparsed = self._unparsed + data if self._unparsed else data
        if self._switching is not None:
            if len(self._unparsed) > MAX_HELD_UPGRADE_BYTES:
                # A client sends frames only after the 101.
                self.transport.abortConnection()
            return
        self._parse()

    def _parse(self) -> None:
        """
        Feed the unparsed bytes to the parser a request (or the rest of a
        body) at a time, while requests may be parsed; keep the rest, and
        stop reading, until they may again.  A loop: a read full of
        pipelined (or upgrade) requests never recurses.

        A call whose head arrived is dispatched once the read is parsed
        (or parsing pauses), so that a call that came whole in one read
        finds its body complete.
        """
        if self._parsing:
            # Called back from inside the loop: it goes on by itself.
            return
        self._parsing = True
        try:
            while True:
                self._parse_some()
                exchange, self._to_dispatch = self._to_dispatch, None
                if exchange is None or self._refused:
                    break
                self.site.passthrough.serve(exchange)
                if not self._unparsed:
                    break
        finally:
            self._parsing = False
        if self._closing or self._lost:
            return
        if self._unparsed or self._parse_paused():
            self._hold(b"ahead")
        elif self._held:
            self._release(b"ahead")
        if self._pace is None and self._incoming is not None and not self._in_head and not self._refused:
            # A body is on its way: watch its pace (a body that came whole
            # with its head costs no timer).
            self._pace = BodyPace(self.site.reactor, self._limits.body_timeout, self._body_too_slow)
            if self._held:
                self._pace.pause()

    def _parse_some(self) -> None:
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

    def _parse_paused(self) -> bool:
        """
        :return: whether no more bytes may be parsed now: the answers are
            not being read, enough requests wait, a control request's key
            is being checked, or the next bytes are the body of a request
            waiting for its turn.
        """
        if self._flow.is_blocked or len(self._queue) >= PIPELINE_DEPTH or self._reading_done:
            return True
        if self._queued_bytes > PIPELINE_BYTES:
            return True
        if self._switching is not None:
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
        if at < 0:
            return len(data)
        end = at + 4
        if (
            end < len(data)
            and self._incoming is None
            and self._active is None
            and not self._queue
            and data.startswith(b" /vllm/", data.find(b" ", offset, offset + 16))
            and data.find(_HEAD_END, end) < 0
        ):
            # The common call: a head and its body in one read on an idle
            # connection.  No other request can complete in what follows
            # (it would need an empty line), and the call is answered
            # first, so its body may be fed with its head, in one go.
            return len(data)
        return end

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
        incoming = self._incoming
        if incoming is None:
            self._tail = b""
            return consumed
        self._tail = bytes(piece[-3:]) if self._body_left is None else b""
        if self._in_head and self._head_bytes > self._limits.max_header_bytes:
            limit = self._limits.max_header_bytes
            self._refuse(headers_too_large(limit) if self._head.headers else request_line_too_long(limit))
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
            upgraded = self._queue[-1] if self._queue else self._active
            if isinstance(upgraded, ClientExchange) and upgraded.switching:
                if self._queue:
                    # Behind unfinished answers: served as a plain request.
                    upgraded.switching = False
                else:
                    # The data plane may switch this connection to a
                    # WebSocket: what follows the head is not HTTP; it waits
                    # unparsed for the relay.
                    self._switching = upgraded
            return e.args[0] if e.args else len(data)
        except httptools.HttpParserCallbackError as e:
            if not isinstance(e.__context__, Stop):
                log.failure("Request parsing failed", Failure(e.__context__ or e))
                self._malformed()
        except httptools.HttpParserError:
            self._malformed()
        return len(data)

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
            raise Stop()
        if not self._in_head:
            # A trailer field of a chunked body: dropped (RFC 9110 6.5.1:
            # never merged into the header section), but counted.
            self._trailer_bytes += len(name) + len(value) + 4
            if self._trailer_bytes > self._limits.max_header_bytes:
                self._refuse_incoming(headers_too_large(self._limits.max_header_bytes))
                raise Stop()
            return
        try:
            self._head.add_header(name, value)
        except ProxyError as e:
            self._refuse(e)
            raise Stop()

    def on_headers_complete(self) -> None:
        if self._refused:
            raise Stop()
        self._in_head = False
        self._last_head_size = self._head_bytes
        self._head_bytes = 0
        self.site.deadlines.forget(self)
        parser = self._parser
        head = self._head
        try:
            target = head.target()
            if head.connection is not None:
                head.check_connection()
        except ProxyError as e:
            self._refuse(e)
            raise Stop()
        version = _VERSIONS.get(parser.get_http_version())
        if version is None:
            self._refuse(bad_request("Only HTTP/1.0 and HTTP/1.1 are served."))
            raise Stop()
        method = parser.get_method()
        headers = head.headers
        length, chunked, expect = framing(headers)
        has_body = chunked or bool(length)
        if has_body and (head.connection is not None or method == b"CONNECT") and head.upgrade(method):
            # llhttp would read what follows the head as the upgraded
            # protocol: the body would be parsed as the next request.
            self._refuse(bad_request("Upgrade requests with a body are not served."))
            raise Stop()
        if not target.startswith(b"/") and target != b"*":
            # Absolute-form ("http://host/...") and other targets that are
            # not a path: the host comes from config only.
            self._refuse(bad_request("The request target must be a path (origin-form), not a URL."))
            raise Stop()
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
        request.head_size = self._last_head_size
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
        if method == b"GET" and target.split(b"?", 1)[0] == REALTIME_TARGET and is_websocket_upgrade(exchange.requestHeaders):
            exchange.switching = True
            # Unless it switches, the connection ends with its answer: what
            # the client sent after the head is not HTTP.
            exchange.keep_alive = False
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
                        self._form_watch = exchange.form_watch = MultipartModelWatch(boundary)
                    exchange.body = StreamingBody(None if chunked else length, self._hold_body, self._release_body, limit)
                    if expect:
                        # Sent once the call wants its body: after the key,
                        # the route and the limits are checked.
                        exchange.body.on_demand = lambda: self._send_continue(exchange)
        self._incoming = exchange
        if self._active is None and not self._queue and not self._flow.is_blocked:
            self._active = exchange
            self._to_dispatch = exchange
        else:
            self._queue_request(exchange, self._last_head_size)

    def on_body(self, data: bytes) -> None:
        incoming = self._incoming
        if self._body_left is not None:
            self._body_left -= len(data)
        if self._pace is not None:
            self._pace.arrived(len(data))
            if self._refused:
                raise Stop()
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
                raise Stop()
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

