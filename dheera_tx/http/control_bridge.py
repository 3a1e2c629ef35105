"""
The control plane behind the lean listener.

The listening connection (L{dheera_tx.http.server}) parses every request itself
and serves C{/vllm} calls directly.  Every other request goes to the Klein
control plane, which needs twisted.web's own L{twisted.web.server.Request}:
L{ControlBridge} runs one request, already parsed and with its whole body
read, through a L{twisted.web.server.Site}'s resource tree, and a
L{ControlExchange} stands in for C{HTTPChannel} as that request's channel
(the way L{twisted.web._http2.H2Stream} does for one HTTP/2 stream).

The answer is exactly what C{HTTPChannel} would send: twisted.web's
C{Request} still adds its C{Server}, C{Date} and default C{Content-Type}
headers, chunks an HTTP/1.1 answer that has no C{Content-Length}, and
drops the body of a C{HEAD}, 204 or 304 answer.  Then the connection is told
whether it may read the next request (C{control_done}).  Persistence
follows C{HTTPChannel.checkPersistence} for HTTP/1.1 (kept unless the
request or the answer says C{Connection: close}); an HTTP/1.0 connection is
kept only when the request asked for C{keep-alive} and the answer carries a
length (it then says C{Connection: keep-alive}).  Klein answers carry no
length, so in practice HTTP/1.0 control requests close, as before.

There is no access log: the exchange has no C{factory}, so
C{Request.finish} does not call C{Site.log} (URIs may carry secrets).

This relies on parts of twisted.web that are not public interface, so
setup.py pins the Twisted range the tests run on:

  - what C{Request} calls on its channel: C{writeHeaders(version, code,
    reason, headers)} with a C{Headers} (or, in older releases, pairs),
    C{write}, C{writeSequence}, C{requestDone(request)},
    C{registerProducer}, C{unregisterProducer}, C{getPeer}, C{getHost},
    C{isSecure}, C{loseConnection}, C{_respondToBadRequestAndDisconnect},
    and the attributes C{transport} and C{site} (and C{factory}, only when
    present, for the access log);
  - C{server.Request.__init__} reading C{channel.site._parsePOSTFormSubmission};
  - the channel-side calls on C{Request}: C{parseCookies}, C{gotLength},
    C{handleContentChunk}, C{requestReceived}, C{connectionLost}.
"""

from typing import List, Protocol, Sequence, Tuple

from twisted.internet.interfaces import ISSLTransport, ITCPTransport
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.http import NO_BODY_CODES
from twisted.web.http_headers import Headers
from twisted.web.server import Site

from dheera_tx.errors import ProxyError, bad_request
from dheera_tx.http.hop_headers import connection_tokens
from dheera_tx.http.listener_limits import raw_answer

log = Logger()

HTTP_11 = b"HTTP/1.1"


class ControlConnection(Protocol):
    """
    What a L{ControlExchange} uses of the lean connection it answers on.

    :ivar transport: the connection's C{ITCPTransport}.
    """

    transport: ITCPTransport

    def control_done(self, keep_alive: bool) -> None:
        """
        The answer to the control request has been written: close the
        connection (C{keep_alive} false) or read the next request.
        """

    def attach_producer(self, producer) -> None:
        """
        Let the transport's backpressure pause and resume C{producer} (a
        connection registers its own producer on its transport, which
        takes one).
        """

    def detach_producer(self) -> None:
        """
        Undo L{attach_producer}.
        """


class ControlBridge:
    """
    Runs control-plane requests on a twisted.web Site for lean connections.

    :param site: the L{Site} whose resource tree (and C{requestFactory},
        which must be L{twisted.web.server.Request} or a subclass needing
        nothing of its channel beyond what L{ControlExchange} offers) serves
        every non-C{/vllm} request.  It is never started or listened on.
    """

    __slots__ = ("_site",)

    def __init__(self, site: Site):
        self._site = site

    def serve(
        self,
        connection: ControlConnection,
        method: bytes,
        target: bytes,
        version: bytes,
        headers: Sequence[Tuple[bytes, bytes]],
        body: bytes,
    ) -> "ControlExchange":
        """
        Run one whole request through the Site, answering on C{connection}.

        C{connection.control_done} is called once the answer is written,
        possibly before this returns (a synchronous handler); the exchange's
        L{ControlExchange.done} says so.  While the exchange is not done, the
        connection must not serve another request, and must tell the
        exchange when it is lost (L{ControlExchange.connection_lost}).  A
        streaming producer may be registered on C{connection.transport}
        while the exchange runs, so the connection must not have one
        registered then.

        :param method: the request method, e.g. C{b"GET"}.
        :param target: the raw request target, e.g. C{b"/spend/report?group_by=model"}.
        :param version: C{b"HTTP/1.1"} or C{b"HTTP/1.0"}.
        :param headers: the header (name, value) pairs as received.
        :param body: the whole request body (C{b""} for none).
        :return: the exchange, the request's channel.
        """
        exchange = ControlExchange(self._site, connection, method, version)
        exchange.run(target, headers, body)
        return exchange


class ControlExchange:
    """
    The channel of one twisted.web C{Request} on a lean connection.

    :ivar site: the L{Site} (twisted.web reads C{channel.site}).
    :ivar transport: the connection's transport (C{Request.transport}).
    :ivar persistent: whether the connection may carry another request
        after this answer; code holding C{request.channel} may set it false
        (as with C{HTTPChannel}) to close after the answer.
    """

    __slots__ = ("site", "transport", "persistent", "_connection", "_method", "_version", "_request", "_done", "_lost")

    def __init__(self, site: Site, connection: ControlConnection, method: bytes, version: bytes):
        self.site = site
        self.transport = connection.transport
        self.persistent = False
        self._connection = connection
        self._method = method
        self._version = version
        self._request = None
        self._done = False
        self._lost = False

    @property
    def done(self) -> bool:
        """
        :return: whether C{control_done} has been called or the connection
            was lost: the exchange has nothing more to do on the connection.
        """
        return self._done

    def run(self, target: bytes, headers: Sequence[Tuple[bytes, bytes]], body: bytes) -> None:
        """
        Feed the parsed request to a new C{Request} of the Site, which
        renders it (see L{ControlBridge.serve}).
        """
        try:
            request = self._request = self.site.requestFactory(self)
            request_headers = request.requestHeaders
            for name, value in headers:
                request_headers.addRawHeader(name, value)
            request.parseCookies()
            tokens = connection_tokens(headers)
            if self._version == HTTP_11:
                self.persistent = b"close" not in tokens
                if not self.persistent:
                    # As HTTPChannel.checkPersistence does.
                    request.responseHeaders.setRawHeaders(b"Connection", [b"close"])
            else:
                self.persistent = b"keep-alive" in tokens
            request.gotLength(len(body))
            if body:
                request.handleContentChunk(body)
            request.requestReceived(self._method, target, self._version)
        except Exception:
            # Request.process catches what the resource raises; this is
            # twisted.web failing before or after it.
            log.failure("A control-plane request failed outside its resource")
            self._answer_failure()

    def _answer_failure(self) -> None:
        if self._done:
            return
        request = self._request
        self.persistent = False
        if request is not None and request.startedWriting:
            # Cut short: the client must not take a partial answer as whole.
            self.transport.abortConnection()
        else:
            self.transport.write(raw_answer(_internal_error()))
        self._end(False)

    def _end(self, keep_alive: bool) -> None:
        if self._done:
            return
        self._done = True
        self._connection.control_done(keep_alive)

    def connection_lost(self, reason: Failure) -> None:
        """
        The client connection is gone: an unfinished request sees
        C{connectionLost} (its C{notifyFinish} Deferreds errback with
        C{reason}); nothing is written and C{control_done} is not called
        afterwards.
        """
        if self._lost:
            return
        self._lost = True
        self._done = True
        request, self._request = self._request, None
        if request is not None and not request.finished:
            request.connectionLost(reason)

    # What twisted.web.http.Request calls on its channel.

    def writeHeaders(self, version: bytes, code: bytes, reason: bytes, headers) -> None:
        """
        Write the status line and C{headers} (a C{Headers}, or (name, value)
        pairs), deciding first whether the connection outlives this answer.
        """
        if self._lost:
            return
        if not isinstance(headers, Headers):
            pairs, headers = headers, Headers()
            for name, value in pairs:
                headers.addRawHeader(name, value)
        self._settle_persistence(int(code), headers)
        head: List[bytes] = [version, b" ", code, b" ", reason, b"\r\n"]
        for name, values in headers.getAllRawHeaders():
            for value in values:
                head.extend((name, b": ", value, b"\r\n"))
        head.append(b"\r\n")
        self.transport.writeSequence(head)

    def _settle_persistence(self, code: int, headers: Headers) -> None:
        if self.persistent and (
            b"close" in connection_tokens((b"connection", v) for v in headers.getRawHeaders(b"connection", ()))
            or not self._delimited(code, headers)
        ):
            self.persistent = False
        if self._version == HTTP_11:
            if not self.persistent:
                headers.setRawHeaders(b"Connection", [b"close"])
        elif self.persistent:
            # An HTTP/1.0 client assumes a close unless told otherwise.
            headers.setRawHeaders(b"Connection", [b"keep-alive"])

    def _delimited(self, code: int, headers: Headers) -> bool:
        """
        :return: whether the client can tell where this answer ends without
            the connection closing.
        """
        if self._method == b"HEAD" or code in NO_BODY_CODES or code < 200:
            return True
        if headers.hasHeader(b"content-length"):
            return True
        codings = headers.getRawHeaders(b"transfer-encoding")
        return (
            self._version == HTTP_11
            and codings is not None
            and codings[-1].rsplit(b",", 1)[-1].strip().lower() == b"chunked"
        )

    def write(self, data: bytes) -> None:
        """
        Write part of the answer (already chunk-framed by the request).
        """
        if not self._lost:
            self.transport.write(data)

    def writeSequence(self, data: Sequence[bytes]) -> None:
        """
        Write parts of the answer.
        """
        if not self._lost:
            self.transport.writeSequence(data)

    def requestDone(self, request) -> None:
        """
        The request has finished its answer: hand the connection back.
        """
        self._request = None
        keep_alive = self.persistent and not getattr(self.transport, "disconnecting", False)
        self._end(keep_alive)

    def registerProducer(self, producer, streaming: bool) -> None:
        """
        Have the connection's write backpressure pause and resume the
        request's producer.
        """
        if not streaming:
            # No resource of the control plane streams from a pull
            # producer; the connection's backpressure drives push ones.
            raise ValueError("Control-plane answers need a streaming (push) producer.")
        self._connection.attach_producer(producer)

    def unregisterProducer(self) -> None:
        """
        Undo L{registerProducer}.
        """
        self._connection.detach_producer()

    def getPeer(self):
        """
        :return: the client's address.
        """
        return self.transport.getPeer()

    def getHost(self):
        """
        :return: the listening side's address.
        """
        return self.transport.getHost()

    def isSecure(self) -> bool:
        """
        :return: whether the connection is TLS.
        """
        return ISSLTransport(self.transport, None) is not None

    def loseConnection(self) -> None:
        """
        Close the connection once what was written has been sent (as
        C{HTTPChannel.loseConnection}, for C{Request.loseConnection}).
        """
        self.persistent = False
        self.transport.loseConnection()

    def abortConnection(self) -> None:
        """
        Drop the connection at once, e.g. to cut short an answer that cannot
        be completed well-formed.
        """
        self.persistent = False
        self.transport.abortConnection()

    def _respondToBadRequestAndDisconnect(self) -> None:
        # Request.requestReceived calls this for a multipart/form-data body
        # it cannot parse; the proxy's own errors use the OpenAI shape.
        if self._done:
            return
        self.persistent = False
        self.transport.write(raw_answer(bad_request("The request body could not be parsed.")))
        self._end(False)


def _internal_error() -> ProxyError:
    return ProxyError(500, "The proxy failed to handle this request.", type="internal_error", code="500")
