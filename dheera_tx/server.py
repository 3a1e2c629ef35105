"""
The listening side: one twisted.web Site serving both planes on one port.

Stock twisted.web reads a whole request body before anything sees the
request.  L{ProxyRequest} instead dispatches a C{/vllm} call as soon as its
headers have arrived and streams the body on through a L{StreamingBody};
every other route (the Klein control plane) is handled the usual way.
L{ProxyChannel} adds what the proxy needs on the connection: a deadline for
request headers, body backpressure that HTTPChannel's own pause/resume does
not undo, and a guard for answers sent before the body has been read.

This leans on HTTPChannel internals (C{_command}, C{_path}, C{_version},
C{_networkProducer}); setup.py pins the Twisted range the tests run on.
"""

from typing import Callable, Dict, Optional

from twisted.logger import Logger
from twisted.web import http, server

from dheera_tx.errors import ProxyError, bad_request
from dheera_tx.paths import is_passthrough
from dheera_tx.request_body import BodyAborted, StreamingBody

log = Logger()


class BodyStalled(Exception):
    """
    The client stopped sending its request body.
    """


class ProxyChannel(http.HTTPChannel):
    """
    An HTTPChannel with a request-header deadline and body backpressure.
    """

    _header_timer = None
    _body_held = False

    def connectionMade(self) -> None:
        super().connectionMade()
        self._start_header_deadline()

    def dataReceived(self, data: bytes) -> None:
        if self._header_timer is None and self._awaiting_headers():
            self._start_header_deadline()
        super().dataReceived(data)

    def _awaiting_headers(self) -> bool:
        return not self._handlingRequest and getattr(self, "_command", None) is None and self.line_mode

    def _start_header_deadline(self) -> None:
        timeout = self.site.limits.header_timeout
        self._header_timer = self.callLater(timeout, self._headers_too_slow)

    def _cancel_header_deadline(self) -> None:
        if self._header_timer is not None:
            if self._header_timer.active():
                self._header_timer.cancel()
            self._header_timer = None

    def _headers_too_slow(self) -> None:
        self._header_timer = None
        if self.transport is None:
            return
        log.info("Dropping a client that did not send request headers in time")
        self.transport.write(
            b"HTTP/1.1 408 Request Timeout\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"
        )
        self.persistent = False
        self.loseConnection()

    def allHeadersReceived(self) -> None:
        self._cancel_header_deadline()
        super().allHeadersReceived()

    def allContentReceived(self) -> None:
        # A request answered before its body was read has left the queue.
        if not self.requests:
            return
        super().allContentReceived()

    def _respondToBadRequestAndDisconnect(self) -> None:
        # HTTPChannel answers a malformed request (request line with NUL,
        # control bytes or spaces in the target, bad headers, Content-Length
        # with Transfer-Encoding, two Content-Lengths, bad chunking) with a
        # bare "400 Bad Request" and no body; errors the proxy makes use the
        # OpenAI shape.  Once a response has started, a second status line
        # would corrupt it: only close the connection then.
        if self.transport is None:
            return
        if not any(getattr(r, "startedWriting", False) for r in self.requests):
            body = bad_request("The request is malformed (request line, headers or body framing).").body()
            self.transport.write(
                b"HTTP/1.1 400 Bad Request\r\nConnection: close\r\nContent-Type: application/json\r\n"
                b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
            )
        self.persistent = False
        self.loseConnection()

    def _send100Continue(self) -> None:
        if self.requests and self.requests[-1].rejection is not None:
            return
        super()._send100Continue()

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
        if self.persistent and self.transport is not None:
            self._header_timer = None

    def connectionLost(self, reason) -> None:
        self._cancel_header_deadline()
        super().connectionLost(reason)


class ProxyRequest(server.Request):
    """
    A request that dispatches C{/vllm} calls when their headers arrive.

    :ivar body: the streaming body of a pass-through call, or L{None} when
        it has none.
    :ivar rejection: an error to answer without reading the body (too
        large), or L{None}.
    :ivar client_gone: the client connection was lost.
    :ivar received_at: reactor time at which the headers had arrived.
    """

    body: Optional[StreamingBody] = None
    rejection: Optional[ProxyError] = None
    client_gone = False
    received_at = 0.0
    _passthrough = False
    _body_timer = None

    def __init__(self, channel, queued=None):
        super().__init__(channel)
        self._gone_callbacks: Dict[int, Callable[[], None]] = {}
        self._next_token = 0

    def gotLength(self, length: Optional[int]) -> None:
        channel = self.channel
        site = channel.site
        self.received_at = site.reactor.seconds()
        limit = site.limits.max_request_body_bytes
        too_large = length is not None and length > limit
        if too_large:
            self.rejection = ProxyError(
                413,
                f"The request body is larger than {limit} bytes.",
                type="invalid_request_error",
                code="request_too_large",
            )
        target = channel._path
        if not is_passthrough(target) or site.passthrough is None:
            if too_large:
                self._prepare(target)
                site.reactor.callLater(0, self._answer_rejection)
            else:
                super().gotLength(length)
            return
        self._passthrough = True
        self._prepare(target)
        self.defaultContentType = None
        if length != 0 and not too_large:
            self.body = StreamingBody(length, self._hold_body, self._release_body, limit)
            self._body_timeout = site.limits.body_timeout
            self._body_timer = site.reactor.callLater(self._body_timeout, self._body_stalled)
        # The call outlives the idle timeout while the upstream works;
        # requestDone restores it for the next request on this connection.
        if channel.timeOut:
            channel._savedTimeOut = channel.setTimeout(None)
        site.reactor.callLater(0, site.passthrough.serve, self)

    def _prepare(self, target: bytes) -> None:
        channel = self.channel
        self.method = channel._command
        self.uri = target
        self.clientproto = channel._version
        self.path = target.split(b"?", 1)[0]
        self.args = {}
        self.content = None

    def _answer_rejection(self) -> None:
        if self.client_gone or self.finished:
            return
        body = self.rejection.body()
        self.setResponseCode(self.rejection.status)
        self.responseHeaders.setRawHeaders(b"content-type", [b"application/json"])
        self.responseHeaders.setRawHeaders(b"content-length", [b"%d" % len(body)])
        self.write(body)
        self.finish()

    def handleContentChunk(self, data: bytes) -> None:
        if self.body is not None:
            self.body.receive(data)
            if self._body_timer is not None and self._body_timer.active():
                self._body_timer.reset(self._body_timeout)
            if self.body.failure is not None:
                self._cancel_body_timer()
        elif not self._passthrough and self.rejection is None:
            super().handleContentChunk(data)

    def requestReceived(self, command: bytes, path: bytes, version: bytes) -> None:
        if self._passthrough:
            self._cancel_body_timer()
            if self.body is not None:
                self.body.end()
            return
        if self.rejection is not None:
            return
        super().requestReceived(command, path, version)

    @property
    def body_complete(self) -> bool:
        """
        :return: whether the whole request body has been read.
        """
        return self.body is None or self.body.complete

    def _hold_body(self) -> None:
        self._cancel_body_timer()
        if self.channel is not None:
            self.channel.hold_body()

    def _release_body(self) -> None:
        if self.channel is not None:
            self.channel.release_body()
            if self.body is not None and not self.body.complete and self.body.failure is None:
                self._body_timer = self.channel.site.reactor.callLater(self._body_timeout, self._body_stalled)

    def _cancel_body_timer(self) -> None:
        if self._body_timer is not None and self._body_timer.active():
            self._body_timer.cancel()
        self._body_timer = None

    def _body_stalled(self) -> None:
        self._body_timer = None
        from twisted.python.failure import Failure

        self.body.fail(Failure(BodyStalled()))
        if self.channel is not None and not self.startedWriting:
            self.channel.persistent = False
            self.setResponseCode(408)
            self.responseHeaders.setRawHeaders(b"content-length", [b"0"])
            self.finish()
        elif self.channel is not None:
            self.abort_response()

    def finish(self) -> None:
        if self.channel is not None and not self.body_complete:
            # The rest of the body would be read as the next request.
            self.channel.persistent = False
        if self.rejection is not None and self.channel is not None:
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
        self._cancel_body_timer()
        self.client_gone = True
        if self.body is not None and not self.body.complete:
            from twisted.python.failure import Failure

            self.body.fail(Failure(BodyAborted()))
        super().connectionLost(reason)
        callbacks, self._gone_callbacks = self._gone_callbacks, {}
        for callback in callbacks.values():
            try:
                callback()
            except Exception:
                log.failure("client-gone callback failed")


class ListenerLimits:
    """
    The listening side's limits, from C{general_settings}.
    """

    def __init__(self, general):
        self.header_timeout = general.header_timeout
        self.body_timeout = general.body_timeout
        self.max_request_body_bytes = general.max_request_body_bytes
        self.max_header_bytes = general.max_header_bytes
        self.max_headers = general.max_headers


class ProxySite(server.Site):
    """
    The Site both planes share.

    :param control: the control-plane resource (Klein).
    :param passthrough: the data plane (L{dheera_tx.forwarding.Passthrough}).
    :param limits: a L{ListenerLimits}.
    """

    protocol = ProxyChannel
    requestFactory = ProxyRequest

    def __init__(self, control, passthrough, limits: ListenerLimits, reactor):
        super().__init__(control, reactor=reactor)
        self.passthrough = passthrough
        self.limits = limits
        self.reactor = reactor
        self.displayTracebacks = False

    def buildProtocol(self, addr):
        channel = super().buildProtocol(addr)
        channel.totalHeadersSize = self.limits.max_header_bytes
        channel.maxHeaders = self.limits.max_headers
        return channel

    def log(self, request) -> None:
        # Pass-through calls are logged as call records (dheera_tx.call);
        # the stock access log would print URIs with secrets in queries.
        pass
