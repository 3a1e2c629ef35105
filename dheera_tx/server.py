"""
The listening side: one twisted.web Site serving both planes on one port.

Stock twisted.web reads a whole request body before anything sees the
request.  L{ProxyRequest} instead dispatches a C{/vllm} call as soon as its
headers have arrived and streams the body on through a L{StreamingBody};
every other route (the Klein control plane) is handled the usual way.
L{ProxyChannel} adds what the proxy needs on the connection: a deadline for
request headers (and for an idle keep-alive connection), size and count
limits on the head answered 431, strict framing (one Transfer-Encoding,
plain C{chunked}; no folded header lines; no second copy of a header the
proxy and vLLM could read differently), body backpressure that
HTTPChannel's own pause/resume does not undo, and a guard for answers sent
before the body has been read.  L{ProxySite} caps the open connections.

Every answer the listening side makes itself is in the OpenAI error shape.
The limits, the framing rules, those answers and the watch on a body's
pace (L{dheera_tx.listener_limits.BodyPace}) are in
L{dheera_tx.listener_limits}; this module applies them.

This leans on HTTPChannel internals (C{_command}, C{_path}, C{_version},
C{_networkProducer}, C{_receivedHeaderSize}, C{_receivedHeaderCount},
LineReceiver's C{_buffer}); setup.py pins the Twisted range the tests run
on.
"""

from typing import Callable, Dict, Optional

from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import http, server

from dheera_tx.errors import ProxyError, bad_request
from dheera_tx.listener_limits import (
    CHUNKED,
    CLOSE_GRACE,
    SINGLE_HEADERS,
    BodyPace,
    BodyStalled,
    ConnectionLimitReached,
    ListenerLimits,
    head_too_large,
    raw_answer,
    request_timeout,
    too_large,
)
from dheera_tx.model_choice import MultipartModelWatch, multipart_boundary
from dheera_tx.paths import is_passthrough
from dheera_tx.request_body import BodyAborted, BodyTooLarge, StreamingBody

log = Logger()


class ProxyChannel(http.HTTPChannel):
    """
    An HTTPChannel with head limits and deadlines and body backpressure.
    """

    _header_timer = None
    _close_timer = None
    _body_held = False
    _refused = False
    _counted = False

    def connectionMade(self) -> None:
        super().connectionMade()
        if isinstance(self.factory, ProxySite):
            self._counted = True
            self.factory.connection_opened()
        self._start_header_deadline()

    def dataReceived(self, data: bytes) -> None:
        if self._header_timer is None and self._awaiting_headers():
            self._start_header_deadline()
        super().dataReceived(data)

    def _awaiting_headers(self) -> bool:
        return not self._handlingRequest and getattr(self, "_command", None) is None and self.line_mode

    def _in_head(self) -> bool:
        return getattr(self, "_command", None) is not None and self.line_mode

    # Deadlines.

    def _start_header_deadline(self) -> None:
        self._cancel_header_deadline()
        self._header_timer = self.callLater(self.site.limits.header_timeout, self._headers_too_slow)

    def _cancel_header_deadline(self) -> None:
        if self._header_timer is not None:
            if self._header_timer.active():
                self._header_timer.cancel()
            self._header_timer = None

    def _headers_too_slow(self) -> None:
        self._header_timer = None
        if self.transport is None or self._refused:
            return
        if not self._buffer and getattr(self, "_command", None) is None:
            # Nothing of a request arrived: an idle (keep-alive) connection
            # is closed without an answer.
            self.persistent = False
            self._close()
            return
        log.info("Dropping a client that did not send request headers in time")
        self.refuse(request_timeout("The request headers did not arrive in time."))

    def allHeadersReceived(self) -> None:
        self._cancel_header_deadline()
        super().allHeadersReceived()

    def allContentReceived(self) -> None:
        # A request answered before its body was read has left the queue.
        if not self.requests:
            return
        super().allContentReceived()

    # Limits and framing of the request head.

    def lineReceived(self, line: bytes) -> None:
        if self._refused:
            return
        if self._receivedHeaderSize + len(line) > self.totalHeadersSize:
            self._head_too_large()
            return
        if self._in_head() and line[:1] in (b" ", b"\t"):
            self.refuse(bad_request("Folded header lines (obs-fold) are not accepted."))
            return
        super().lineReceived(line)

    def lineLengthExceeded(self, line: bytes) -> None:
        self._head_too_large()

    def _head_too_large(self) -> None:
        if getattr(self, "_command", None) is None:
            self.refuse(head_too_large(f"The request line is longer than {self.totalHeadersSize} bytes.", status=414))
        else:
            self.refuse(head_too_large(f"The request headers are larger than {self.totalHeadersSize} bytes."))

    def headerReceived(self, line: bytes) -> bool:
        if self._refused:
            return False
        if self._receivedHeaderCount >= self.maxHeaders:
            self.refuse(head_too_large(f"The request has more than {self.maxHeaders} headers."))
            return False
        name, _, value = line.partition(b":")
        lower = name.lower()
        if lower in SINGLE_HEADERS and self.requests and self.requests[-1].requestHeaders.hasHeader(lower):
            self.refuse(bad_request(f"The {name.decode('latin-1')} header appears more than once."))
            return False
        if lower == b"transfer-encoding" and not CHUNKED.fullmatch(value):
            self.refuse(bad_request("The only Transfer-Encoding accepted is 'chunked'."))
            return False
        return super().headerReceived(line)

    def _respondToBadRequestAndDisconnect(self) -> None:
        # HTTPChannel answers a malformed request (request line with NUL,
        # control bytes or spaces in the target, bad headers, Content-Length
        # with Transfer-Encoding, two Content-Lengths, bad chunking) with a
        # bare "400 Bad Request" and no body; errors the proxy makes use the
        # OpenAI shape.  A call already dispatched answers through its
        # request, which also fails the body it is streaming upstream.
        error = bad_request("The request is malformed (request line, headers or body framing).")
        request = self.requests[-1] if self.requests else None
        if isinstance(request, ProxyRequest) and request.dispatched and not request.finished:
            request.refuse(error)
        else:
            self.refuse(error)

    def refuse(self, error: ProxyError) -> None:
        """
        Answer C{error} on the raw connection (unless an answer has started)
        and close it: for a request that cannot be parsed or may not go on.
        """
        if self.transport is None or self._refused:
            return
        self._refused = True
        self._cancel_header_deadline()
        if not any(getattr(r, "startedWriting", False) for r in self.requests):
            self.transport.write(raw_answer(error))
        self.persistent = False
        self._close()

    def _close(self) -> None:
        self.loseConnection()
        if self._close_timer is None and self.transport is not None:
            self._close_timer = self.callLater(CLOSE_GRACE, self._cut_off)

    def _cut_off(self) -> None:
        self._close_timer = None
        if self.transport is not None:
            self.transport.abortConnection()

    def _send100Continue(self) -> None:
        if self.requests and (self.requests[-1].rejection is not None or self._refused):
            return
        super()._send100Continue()

    # Body backpressure.

    def hold_body(self) -> None:
        """
        Stop reading the request body: the upstream cannot take more.
        """
        self._body_held = True
        self._networkProducer.pauseProducing()

    def release_body(self) -> None:
        """
        Read the request body again.
        """
        if self._body_held:
            self._body_held = False
            if not self._waitingForTransport:
                self._networkProducer.resumeProducing()

    def resumeProducing(self) -> None:
        # HTTPChannel resumes reading whenever the client drains our writes;
        # it must not resume a body the upstream asked to hold.
        self._waitingForTransport = False
        if self._requestProducer is not None:
            self._requestProducer.resumeProducing()
        if not self._handlingRequest and not self._body_held:
            self._networkProducer.resumeProducing()

    def requestDone(self, request) -> None:
        self._body_held = False
        super().requestDone(request)
        # Between requests the connection gets the header deadline too, so
        # an idle keep-alive connection does not hold its place for ever.
        if (
            self.persistent
            and self.transport is not None
            and not self.transport.disconnecting
            and self._header_timer is None
            and self._awaiting_headers()
        ):
            self._start_header_deadline()

    def connectionLost(self, reason) -> None:
        self._cancel_header_deadline()
        if self._close_timer is not None:
            if self._close_timer.active():
                self._close_timer.cancel()
            self._close_timer = None
        if self._counted:
            self._counted = False
            self.factory.connection_closed()
        super().connectionLost(reason)


class ProxyRequest(server.Request):
    """
    A request that dispatches C{/vllm} calls when their headers arrive.

    :ivar body: the streaming body of a pass-through call, or L{None} when
        it has none.
    :ivar rejection: an error to answer without reading the body (too
        large, a target that is not a path), or L{None}.
    :ivar client_gone: the client connection was lost.
    :ivar dispatched: the call was handed to the pass-through.
    :ivar received_at: reactor time at which the headers had arrived.
    """

    channel = None
    body: Optional[StreamingBody] = None
    rejection: Optional[ProxyError] = None
    client_gone = False
    dispatched = False
    received_at = 0.0
    _passthrough = False
    _refused = False
    _pace: Optional[BodyPace] = None
    _form_watch: Optional[MultipartModelWatch] = None
    _control_bytes = 0

    def __init__(self, channel, queued=None):
        super().__init__(channel)
        self._gone_callbacks: Dict[int, Callable[[], None]] = {}
        self._next_token = 0

    def gotLength(self, length: Optional[int]) -> None:
        channel = self.channel
        site = channel.site
        self.received_at = site.reactor.seconds()
        limit = site.limits.max_request_body_bytes
        target = channel._path
        if not target.startswith(b"/") and target != b"*":
            # Absolute-form ("http://host/...") and other targets that are
            # not a path: the host comes from config only.
            self.rejection = bad_request("The request target must be a path (origin-form), not a URL.")
        elif length is not None and length > limit:
            self.rejection = too_large(limit)
        if not is_passthrough(target) or site.passthrough is None:
            if self.rejection is not None:
                self._prepare(target)
                site.reactor.callLater(0, self._answer_rejection)
            else:
                super().gotLength(length)
                if length != 0:
                    self._watch_body()
            return
        self._passthrough = True
        self._prepare(target)
        self.defaultContentType = None
        if length != 0 and self.rejection is None:
            try:
                boundary = multipart_boundary(self.requestHeaders.getRawHeaders(b"content-type", [None])[0])
            except ProxyError as e:
                self.rejection = e
            else:
                if boundary is not None:
                    self._form_watch = MultipartModelWatch(boundary)
                self.body = StreamingBody(length, self._hold_body, self._release_body, limit)
                self._watch_body()
        # The call outlives the idle timeout while the upstream works;
        # requestDone restores it for the next request on this connection.
        if channel.timeOut:
            channel._savedTimeOut = channel.setTimeout(None)
        self.dispatched = True
        site.reactor.callLater(0, site.passthrough.serve, self)

    def _watch_body(self) -> None:
        site = self.channel.site
        self._pace = BodyPace(site.reactor, site.limits.body_timeout, self._body_too_slow)

    def _stop_watching(self) -> None:
        if self._pace is not None:
            self._pace.stop()

    def _prepare(self, target: bytes) -> None:
        channel = self.channel
        self.method = channel._command
        self.uri = target
        self.clientproto = channel._version
        self.path = target.split(b"?", 1)[0]
        self.args = {}
        if self.content is not None:
            self.content.close()
        self.content = None

    def _answer_rejection(self) -> None:
        if self.client_gone or self.finished or self._refused:
            return
        self._answer(self.rejection)

    def _answer(self, error: ProxyError) -> None:
        body = error.body()
        self.setResponseCode(error.status)
        self.responseHeaders.setRawHeaders(b"content-type", [b"application/json"])
        self.responseHeaders.setRawHeaders(b"content-length", [b"%d" % len(body)])
        self.write(body)
        self.finish()

    def refuse(self, error: ProxyError) -> None:
        """
        End this request with C{error} whatever stage it is at (body too
        large, too slow, malformed): fail the body being streamed upstream,
        answer C{error} if no answer has started (else cut the answer
        short), and close the connection.
        """
        if self._refused:
            return
        self._refused = True
        self._stop_watching()
        if self.body is not None:
            self.body.fail(Failure(error))
        if self.finished or self.client_gone or self.channel is None:
            return
        self.channel.persistent = False
        if self.startedWriting:
            self.abort_response()
            return
        if not self._passthrough:
            self._prepare(self.channel._path)
        self._answer(error)

    def handleContentChunk(self, data: bytes) -> None:
        if self._refused or self.finished:
            return
        limit = self.channel.site.limits.max_request_body_bytes
        if self._pace is not None:
            self._pace.arrived(len(data))
            if self._refused:
                return
        if self._form_watch is not None:
            try:
                self._form_watch.feed(data)
            except ProxyError as e:
                # Refused before this chunk goes on: vLLM never gets the
                # whole form.
                self.refuse(e)
                return
        if self.body is not None:
            # Failing the body can end the call (and this request) at once.
            self.body.receive(data)
            failure = self.body.failure
            if failure is not None:
                self._stop_watching()
                if failure.check(BodyTooLarge):
                    self.refuse(too_large(limit))
        elif not self._passthrough and self.rejection is None:
            self._control_bytes += len(data)
            if self._control_bytes > limit:
                self.refuse(too_large(limit))
            else:
                super().handleContentChunk(data)

    def requestReceived(self, command: bytes, path: bytes, version: bytes) -> None:
        self._stop_watching()
        if self._passthrough:
            if self.body is not None:
                self.body.end()
            return
        if self.rejection is not None or self._refused:
            return
        super().requestReceived(command, path, version)

    @property
    def body_complete(self) -> bool:
        """
        :return: whether the whole request body has been read.
        """
        return self.body is None or self.body.complete

    def _hold_body(self) -> None:
        if self._pace is not None:
            self._pace.pause()
        if self.channel is not None:
            self.channel.hold_body()

    def _release_body(self) -> None:
        if self.channel is not None:
            self.channel.release_body()
            if self._pace is not None:
                self._pace.resume()

    def _body_too_slow(self, message: str) -> None:
        log.info("Dropping a client whose request body is too slow: {why}", why=message)
        self.refuse(BodyStalled(message))

    def finish(self) -> None:
        self._stop_watching()
        if self.channel is not None and (not self.body_complete or self.rejection is not None or self._refused):
            # The rest of the body would be read as the next request.
            self.channel.persistent = False
        super().finish()

    def abort_response(self) -> None:
        """
        End a response that cannot be completed well-formed: drop the
        connection so the client sees it was cut short.
        """
        if self.channel is not None and self.channel.transport is not None:
            self.channel.transport.abortConnection()

    def on_client_gone(self, callback: Callable[[], None]) -> int:
        """
        Call C{callback} if the client connection is lost.

        :return: a token for L{forget_client_gone}.
        """
        self._next_token += 1
        self._gone_callbacks[self._next_token] = callback
        return self._next_token

    def forget_client_gone(self, token: int) -> None:
        """
        Cancel a callback registered with L{on_client_gone}.
        """
        self._gone_callbacks.pop(token, None)

    def connectionLost(self, reason) -> None:
        self._stop_watching()
        self.client_gone = True
        if self.body is not None and not self.body.complete:
            self.body.fail(Failure(BodyAborted()))
        super().connectionLost(reason)
        callbacks, self._gone_callbacks = self._gone_callbacks, {}
        for callback in callbacks.values():
            try:
                callback()
            except Exception:
                log.failure("client-gone callback failed")


class ProxySite(server.Site):
    """
    The Site both planes share.

    :param control: the control-plane resource (Klein).
    :param passthrough: the data plane (L{dheera_tx.forwarding.Passthrough}).
    :param limits: a L{ListenerLimits}.
    :ivar open_connections: connections open now (in this process:
        C{max_connections} holds per worker).
    :ivar refused_connections: connections refused for being over the
        limit.
    """

    protocol = ProxyChannel
    requestFactory = ProxyRequest

    def __init__(self, control, passthrough, limits: ListenerLimits, reactor):
        super().__init__(control, reactor=reactor)
        self.passthrough = passthrough
        self.limits = limits
        self.reactor = reactor
        self.displayTracebacks = False
        self.open_connections = 0
        self.refused_connections = 0
        self._at_limit = False

    def buildProtocol(self, addr):
        if self.open_connections >= self.limits.max_connections:
            self.refused_connections += 1
            if not self._at_limit:
                self._at_limit = True
                log.warn("{limit} connections open: refusing new ones", limit=self.limits.max_connections)
            protocol = ConnectionLimitReached()
            protocol.factory = self
            return protocol
        channel = super().buildProtocol(addr)
        channel.totalHeadersSize = self.limits.max_header_bytes
        channel.MAX_LENGTH = self.limits.max_header_bytes
        channel.maxHeaders = self.limits.max_headers
        return channel

    def connection_opened(self) -> None:
        """
        A channel of this site connected.
        """
        self.open_connections += 1

    def connection_closed(self) -> None:
        """
        A channel of this site closed.
        """
        self.open_connections -= 1
        if self._at_limit and self.open_connections < self.limits.max_connections:
            self._at_limit = False
            log.info("Accepting connections again")

    def log(self, request) -> None:
        # Pass-through calls are logged as call records (dheera_tx.call);
        # the stock access log would print URIs with secrets in queries.
        pass
