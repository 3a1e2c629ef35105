"""
The connection of an upstream call: L{_UpstreamConnection}, the HTTP/1.1
protocol that carries one request at a time.

L{dheera_tx.upstream.client} hands a connection its request with
C{start}: the head goes out in one C{transport.write} (with the body when
it is C{bytes}), or ahead of a producer's body through a C{_BodyWriter}
(L{dheera_tx.upstream.request_body}).  The response is parsed by the
llhttp parser (C{httptools}), whose callbacks skip interim responses,
bound the size of the head, fire the request's Deferred with an
C{UpstreamResponse} (L{dheera_tx.upstream.response}) once the head is
complete and pass the body on to it.  The answer to a HEAD request is fed
line by line, since the parser cannot be told that it has no body.  A
request fails with L{UpstreamFailed} when the connection is lost before
the response head, with L{UpstreamUnreachable} when it is lost in the TLS
handshake (no request byte reached the server, so another replica may be
tried), with L{UpstreamMalformed} when the head cannot be parsed or is too
large (the three are defined in L{dheera_tx.upstream.errors};
L{dheera_tx.upstream.client} re-exports them).

The pool that owns the connection (C{UpstreamPool} in
L{dheera_tx.upstream.client}) is passed in; the connection uses only its
C{_connected}, C{_release}, C{_forget_idle}, C{_gone} and C{_replay}
(which sends a request again on a fresh connection, when the pool gave
this connection the means to: see C{start}), so this module
imports nothing from the client.  The leading underscores mark names used
only by the upstream client modules (C{upstream_client},
C{upstream_connection}, C{upstream_response}, C{upstream_request_body}).
"""

from typing import Optional

from httptools import HttpParserError, HttpResponseParser
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IHandshakeListener, IProtocol
from twisted.python.failure import Failure
from zope.interface import implementer

from dheera_tx.socket_write import write_now
from dheera_tx.upstream.errors import UpstreamFailed, UpstreamMalformed, UpstreamUnreachable
from dheera_tx.upstream.request_body import _BodyWriter
from dheera_tx.upstream.response import UpstreamResponse

# Bytes of a response head (status line, interim heads, line ends) allowed
# beyond max_head_bytes before the head is declared malformed, so that a
# server cannot grow one header line forever.
HEAD_SLACK = 8192

_VERSIONS = {"1.1": (1, 1), "1.0": (1, 0)}


class _HeadTooLarge(Exception):
    pass


class _Stop(Exception):
    """
    Raised from a parser callback to make C{feed_data} return at once.
    """


@implementer(IProtocol, IHandshakeListener)
class _UpstreamConnection:
    """
    One connection to an upstream, carrying one request at a time.

    :ivar _secured: the TLS handshake is done (always, without TLS).
    """

    __slots__ = (
        "transport", "_pool", "key", "_attempt", "_parser", "_new_parser",
        "busy", "idle", "idle_since", "_aborted", "_reading_paused",
        "_deferred", "_response", "_reused", "_is_head", "_max_head", "_head_seen",
        "_headers", "_head_bytes", "_phrase", "_content_length", "_chunked",
        "_interim", "_stop_after_head", "_complete", "_keep_alive",
        "_writer", "_sent", "_failure", "_secured", "_replay", "_retry",
    )

    def __init__(self, pool, key: tuple, attempt):
        self.transport = None
        self._pool = pool
        self.key = key
        self._attempt = attempt
        self._parser = HttpResponseParser(self)
        self._new_parser = False
        self.busy = False
        self.idle = False
        self.idle_since = 0.0
        self._aborted = False
        self._reading_paused = False
        self._deferred = None
        self._response = None
        self._writer = None
        self._failure = None
        self._sent = True
        self._secured = not key[2]
        self._replay = None
        self._retry = None

    # IProtocol

    def makeConnection(self, transport) -> None:
        """
        Connected: send the request this connection was made for.
        """
        self.transport = transport
        self.connectionMade()

    def connectionMade(self) -> None:
        self.transport.setTcpNoDelay(True)
        attempt, self._attempt = self._attempt, None
        self._pool._connected(self, attempt)

    def dataReceived(self, data: bytes) -> None:
        """
        Parse the response; bytes on an idle connection drop it.
        """
        if not self.busy:
            # Bytes nobody asked for: this connection cannot be trusted.
            self._pool._forget_idle(self)
            self.abort()
            return
        if self._is_head and self._response is None:
            self._feed_lines(data)
        else:
            try:
                self._parser.feed_data(data)
            except HttpParserError as e:
                self._parse_stopped(e)
        if self._aborted:
            return
        if self._complete:
            self._message_done()
        elif self._response is None:
            self._head_seen += len(data)
            if self._head_seen > self._max_head + HEAD_SLACK:
                self._malformed("The response head is too large.")

    def connectionLost(self, reason: Failure) -> None:
        """
        Fail the request or end the response body, unless already done.
        """
        self._aborted = True
        self._stop_body()
        failure = self._failure
        d, self._deferred = self._deferred, None
        response, self._response = self._response, None
        self.busy = False
        if d is not None:
            if failure is None and not self._secured:
                # The request is still encrypted in the TLS buffer.
                why = "TLS handshake failed ({}: {})".format(reason.type.__name__, reason.getErrorMessage())
                failure = Failure(UpstreamUnreachable(why))
            elif failure is None:
                replay, self._replay = self._replay, None
                if replay is not None and self._head_seen == 0:
                    # A pooled connection the server closed as the request
                    # came, not a byte answered: send it again, once, on a
                    # fresh connection, as Twisted's pool does.
                    self._retry = self._pool._replay(d, self.key, replay, self._is_head, self._max_head)
                if self._retry is None:
                    why = "The upstream closed the connection before the response head ({})".format(
                        reason.type.__name__
                    )
                    failure = Failure(UpstreamFailed(self._reused, why))
            if self._retry is None:
                d.errback(failure)
        elif response is not None:
            if (
                failure is None
                and response.length is None
                and not self._chunked
                and reason.check(ConnectionDone)
            ):
                response._end(None)  # the body was delimited by the close
            else:
                response._end(failure or reason)
        self._pool._gone(self)

    # IHandshakeListener

    def handshakeCompleted(self) -> None:
        """
        The TLS handshake succeeded: the request can reach the server.
        """
        self._secured = True

    # Driven by the pool.

    def start(self, d: Deferred, head: bytes, body, is_head: bool, max_head: int, reused: bool, replay=None) -> None:
        """
        Send a request and arrange for C{d} to fire with its response.

        :param replay: for a request that may be sent again on a fresh
            connection if this (pooled) one is closed before any byte of
            the answer, what the pool needs to do so:
            C{(head, body, connect timeout)}.
        """
        self.busy = True
        self._deferred = d
        self._reused = reused
        self._replay = replay
        self._is_head = is_head
        self._max_head = max_head
        self._head_seen = 0
        self._interim = False
        self._stop_after_head = False
        self._complete = False
        self._keep_alive = False
        self._sent = True
        if self._new_parser:
            self._parser = HttpResponseParser(self)
            self._new_parser = False
        transport = self.transport
        if body is None:
            write_now(transport, head)
            return
        if isinstance(body, bytes):
            write_now(transport, head + body)
            return
        writer = _BodyWriter(self, body)
        self._writer = writer
        self._sent = False
        held = writer.start(head)
        outcome = writer.outcome
        if isinstance(outcome, Failure):
            # Nothing was written: the connection stays as good as it was.
            self._writer = None
            self.busy = False
            self._deferred = None
            self._sent = True
            writer.stop()
            self._pool._release(self, True)
            d.errback(outcome)
            return
        writer.send_held(held)
        if outcome is None:
            self.body_done(writer)

    def cancel(self, d: Deferred) -> None:
        """
        The request Deferred C{d} was cancelled before its head arrived.
        """
        if self._deferred is d:
            self._deferred = None
            self.abort()
        elif self._retry is not None:
            self._retry.cancel(d)

    def abort(self, failure: Optional[Failure] = None) -> None:
        """
        Abort the connection; a response in progress ends with C{failure}
        (or the abort's own failure).
        """
        if self._aborted:
            return
        self._aborted = True
        if failure is not None and self._failure is None:
            self._failure = failure
        self._stop_body()
        self.transport.abortConnection()

    def close(self) -> None:
        """
        Close a connection that is not carrying a request.
        """
        self._aborted = True
        if self._sent:
            self.transport.loseConnection()
        else:
            self.transport.abortConnection()

    def pause_reading(self) -> None:
        """
        Stop reading from the upstream (the response is paused, or has no
        sink yet).
        """
        if not self._reading_paused:
            self._reading_paused = True
            self.transport.pauseProducing()

    def resume_reading(self) -> None:
        """
        Read from the upstream again.
        """
        if self._reading_paused:
            self._reading_paused = False
            self.transport.resumeProducing()

    # The request body.

    def body_done(self, writer: _BodyWriter) -> None:
        """
        The body producer finished.
        """
        if writer is not self._writer:
            return
        short = writer.shortfall()
        if short is not None:
            self.body_failed(writer, short)
            return
        self._writer = None
        writer.finish()
        self._sent = True

    def body_failed(self, writer: _BodyWriter, failure: Failure) -> None:
        """
        The body producer failed (client body too large, stalled, gone):
        the request fails with that same failure.
        """
        if writer is not self._writer:
            return None
        self._stop_body()
        d, self._deferred = self._deferred, None
        if d is not None:
            self.abort()
            d.errback(failure)
        else:
            self.abort(failure)
        return None

    def _stop_body(self) -> None:
        writer = self._writer
        if writer is None:
            return
        self._writer = None
        writer.stop()

    # Parsing the response.

    def _feed_lines(self, data: bytes) -> None:
        """
        Feed the answer to a HEAD request line by line until its head is
        complete, so that the end of the head is known exactly: the parser
        cannot be told that this response has no body.
        """
        lines = data.split(b"\n")
        last = len(lines) - 1
        for i, line in enumerate(lines):
            piece = line + b"\n" if i < last else line
            if not piece:
                continue
            try:
                self._parser.feed_data(piece)
            except HttpParserError as e:
                if self._parse_stopped(e) and (i < last - 1 or (i < last and lines[last])):
                    self._keep_alive = False  # bytes after a HEAD response's head
                return
            if self._aborted:
                return

    def _parse_stopped(self, e: HttpParserError) -> bool:
        """
        :return: whether the message is complete after C{feed_data} raised.
        """
        if self._aborted:
            return False
        if self._complete:
            self._keep_alive = False  # bytes after the end of the response
            return True
        if self._stop_after_head:
            self._complete = True
            self._new_parser = True
            return True
        cause = e.__context__
        if self._response is None:
            if isinstance(cause, _HeadTooLarge):
                self._malformed("The response header lines are larger than {} bytes.".format(self._max_head))
            else:
                self._malformed("The response head could not be parsed ({}).".format(type(e).__name__))
        elif cause is not None and not isinstance(cause, _Stop):
            self.abort(Failure(cause))  # raised by the sink
        else:
            self.abort(Failure(UpstreamMalformed("The response body could not be parsed.")))
        return False

    def _malformed(self, why: str) -> None:
        d, self._deferred = self._deferred, None
        self.abort()
        if d is not None:
            d.errback(UpstreamMalformed(why))

    # The parser's callbacks.

    def on_message_begin(self) -> None:
        """
        A response (interim or final) begins.
        """
        if self._complete or self._aborted:
            raise _Stop()
        self._headers = []
        self._head_bytes = 0
        self._phrase = b""
        self._content_length = None
        self._chunked = False

    def on_status(self, status: bytes) -> None:
        """
        A piece of the reason phrase.
        """
        self._phrase += status

    def on_header(self, name: bytes, value: bytes) -> None:
        """
        One whole header line; the framing headers are noted.
        """
        self._headers.append((name, value))
        self._head_bytes += len(name) + len(value) + 4
        if self._head_bytes > self._max_head:
            raise _HeadTooLarge()
        size = len(name)
        if size == 14:
            if name.lower() == b"content-length":
                self._content_length = value
        elif size == 17 and name.lower() == b"transfer-encoding":
            self._chunked = value.rstrip().lower().endswith(b"chunked")

    def on_headers_complete(self) -> None:
        """
        The head is complete: skip an interim response, or fire the
        request Deferred with the final one.
        """
        if self._aborted:
            raise _Stop()
        parser = self._parser
        code = parser.get_status_code()
        if code < 200 and code != 101:
            self._interim = True
            return
        if self._is_head or code == 101 or code == 204 or code == 304:
            length = 0
        elif self._chunked:
            length = None
        elif self._content_length is not None:
            length = int(self._content_length)
        else:
            length = None
        version = parser.get_http_version()
        response = UpstreamResponse(
            self, code, self._phrase, _VERSIONS.get(version) or tuple(int(p) for p in version.split(".")),
            self._headers, length, self._head_bytes,
        )
        self._response = response
        self._replay = None
        if self._is_head or code == 101:
            self._stop_after_head = True
            self._keep_alive = code != 101 and parser.should_keep_alive()
        d, self._deferred = self._deferred, None
        if d is not None:
            d.callback(response)
        if self._stop_after_head or self._aborted:
            raise _Stop()

    def on_body(self, data: bytes) -> None:
        """
        A piece of the body, without chunked framing.
        """
        response = self._response
        if response._flowing:
            response._sink.data_received(data)
        else:
            response._hold(data)

    def on_message_complete(self) -> None:
        """
        A response ended (an interim one is ignored).
        """
        if self._interim:
            self._interim = False
            return
        if self._aborted:
            raise _Stop()
        self._complete = True
        self._keep_alive = self._parser.should_keep_alive()

    def _message_done(self) -> None:
        """
        The whole response has arrived: end its body, then put the
        connection back in the pool or close it.
        """
        response, self._response = self._response, None
        self.busy = False
        self._complete = False
        reuse = self._keep_alive and self._writer is None
        # An upstream that answered before the whole body was sent.
        self._stop_body()
        self.resume_reading()
        self._pool._release(self, reuse)
        response._end(None)
