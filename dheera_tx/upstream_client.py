"""
A lean HTTP/1.1 client for the data plane's upstream calls.

L{UpstreamPool.request} sends one request to a vLLM server over a
persistent connection and fires with an L{UpstreamResponse} once the
response head has arrived; the body is then pushed to a sink with
L{UpstreamResponse.deliver}.  It does far less per call than
C{twisted.web.client.Agent}: no Deferred per chunk, one C{transport.write}
for the head and an in-memory body, the llhttp parser (C{httptools}) for
the response, C{__slots__} on every per-call object, and TCP_NODELAY.

Connections are kept per C{(host, port)} in a LIFO stack of idle ones and
reused only after a complete response with keep-alive to a completely sent
request.  Idle connections are closed after C{idle_timeout} seconds (below
uvicorn's 5 s, so that the proxy does not reuse one the server is closing).

This module holds the pool, the connection protocol (sending the head,
parsing the response) and connecting; the response and the delivery of
its body are in L{dheera_tx.upstream_response}, the writing of a request
body from its producer in L{dheera_tx.upstream_request_body}.
"""

from typing import Dict, List, Optional, Set, Tuple

from httptools import HttpParserError, HttpResponseParser
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.error import ConnectionDone, NotConnectingError
from twisted.internet.interfaces import IProtocol
from twisted.python.failure import Failure
from twisted.web.iweb import UNKNOWN_LENGTH
from zope.interface import implementer

from dheera_tx.socket_write import write_now
from dheera_tx.upstream_request_body import _BodyWriter
from dheera_tx.upstream_response import UpstreamResponse

# Bytes of a response head (status line, interim heads, line ends) allowed
# beyond max_head_bytes before the head is declared malformed, so that a
# server cannot grow one header line forever.
HEAD_SLACK = 8192

_BODY_METHODS = frozenset([b"POST", b"PUT", b"PATCH"])
_VERSIONS = {"1.1": (1, 1), "1.0": (1, 0)}


class UpstreamUnreachable(Exception):
    """
    Nothing was sent: the connection could not be made (refused, timed
    out, name not found) or the pool is closed.

    :ivar reason: why, in a few words (never a header value).
    """

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class UpstreamFailed(Exception):
    """
    The connection was lost after (part of) the request was written and
    before the response head was complete.

    :ivar reused: whether the connection came from the pool (a keep-alive
        connection the server may have been closing).
    """

    def __init__(self, reused: bool, reason: str = "connection lost"):
        super().__init__(reason)
        self.reused = reused


class UpstreamMalformed(Exception):
    """
    The response could not be parsed, or its header lines are larger than
    allowed.
    """


class _HeadTooLarge(Exception):
    pass


class _Stop(Exception):
    """
    Raised from a parser callback to make C{feed_data} return at once.
    """


@implementer(IProtocol)
class _UpstreamConnection:
    """
    One connection to an upstream, carrying one request at a time.
    """

    __slots__ = (
        "transport", "_pool", "key", "_attempt", "_parser", "_new_parser",
        "busy", "idle", "idle_since", "_aborted", "_reading_paused",
        "_deferred", "_response", "_reused", "_is_head", "_max_head", "_head_seen",
        "_headers", "_head_bytes", "_phrase", "_content_length", "_chunked",
        "_interim", "_stop_after_head", "_complete", "_keep_alive",
        "_writer", "_sent", "_failure",
    )

    def __init__(self, pool: "UpstreamPool", key: tuple, attempt):
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
            if failure is None:
                why = "The upstream closed the connection before the response head ({})".format(
                    reason.type.__name__
                )
                failure = Failure(UpstreamFailed(self._reused, why))
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

    # Driven by the pool.

    def start(self, d: Deferred, head: bytes, body, is_head: bool, max_head: int, reused: bool) -> None:
        """
        Send a request and arrange for C{d} to fire with its response.
        """
        self.busy = True
        self._deferred = d
        self._reused = reused
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


class _Connecting:
    """
    One connection attempt (the factory given to C{connectTCP}), holding
    the request that will go out on it.
    """

    __slots__ = ("_pool", "key", "deferred", "head", "body", "is_head", "max_head", "connector", "connection")

    def __init__(self, pool: "UpstreamPool", key: tuple, head: bytes, body, is_head: bool, max_head: int):
        self._pool = pool
        self.key = key
        self.head = head
        self.body = body
        self.is_head = is_head
        self.max_head = max_head
        self.deferred: Optional[Deferred] = None
        self.connector = None
        self.connection = None

    def cancel(self, d: Deferred) -> None:
        """
        The request was cancelled: stop connecting, or abort the connection.
        """
        if self.connection is not None:
            self.connection.cancel(d)
        elif self.deferred is d:
            self.deferred = None
            self.stop()

    def stop(self) -> None:
        """
        Give up connecting.
        """
        try:
            self.connector.stopConnecting()
        except NotConnectingError:
            pass

    # The client factory interface, as tcp.Connector uses it.

    def doStart(self) -> None:
        pass

    def doStop(self) -> None:
        pass

    def startedConnecting(self, connector) -> None:
        pass

    def buildProtocol(self, addr) -> _UpstreamConnection:
        self.connection = _UpstreamConnection(self._pool, self.key, self)
        return self.connection

    def clientConnectionFailed(self, connector, reason: Failure) -> None:
        d, self.deferred = self.deferred, None
        self.body = None
        self._pool._attempt_over(self)
        if d is not None:
            d.errback(UpstreamUnreachable("{}: {}".format(reason.type.__name__, reason.getErrorMessage())))

    def clientConnectionLost(self, connector, reason: Failure) -> None:
        pass


class UpstreamPool:
    """
    Persistent HTTP/1.1 connections to upstreams, and requests over them.

    :param reactor: the reactor to connect and time with.
    :param max_idle_per_endpoint: the most idle connections kept per
        C{(host, port)}; more are closed, oldest first.
    :param idle_timeout: seconds an idle connection is kept.
    """

    def __init__(self, reactor, max_idle_per_endpoint: int = 128, idle_timeout: float = 4.0):
        self._reactor = reactor
        self._max_idle = max_idle_per_endpoint
        self._idle_timeout = idle_timeout
        self._idle: Dict[tuple, List[_UpstreamConnection]] = {}
        self._connections: Set[_UpstreamConnection] = set()
        self._attempts: Set[_Connecting] = set()
        self._host_headers: Dict[tuple, bytes] = {}
        self._sweep = None
        self._closed = False
        self._close_waiters: List[Deferred] = []

    def request(
        self,
        host: str,
        port: int,
        connect_timeout: float,
        method: bytes,
        target: bytes,
        headers: List[Tuple[bytes, bytes]],
        body,
        max_head_bytes: int = 65536,
        tls: bool = False,
    ) -> "Deferred[UpstreamResponse]":
        """
        Send a request to C{host:port}.

        :param method: the request method.
        :param target: the request target (path and query).
        :param headers: the headers to send, in order; never Host,
            Content-Length, Transfer-Encoding or Connection, which this
            sets.
        :param body: L{None}, C{bytes} (sent with the head in one write;
            the cheapest), or an C{IBodyProducer} (an int C{length} is sent
            as Content-Length, C{UNKNOWN_LENGTH} chunked).
        :param max_head_bytes: the most bytes of response header lines.
        :param tls: connect with TLS (an C{https} deployment), verifying
            the server's certificate for C{host}.
        :return: a Deferred firing with the L{UpstreamResponse} once its
            head has arrived, or failing with L{UpstreamUnreachable},
            L{UpstreamFailed}, L{UpstreamMalformed}, the body producer's own
            failure, or C{CancelledError} when cancelled.
        """
        if self._closed:
            return fail(UpstreamUnreachable("The upstream pool is closed."))
        key = (host, port, tls)
        host_header = self._host_headers.get(key)
        if host_header is None:
            host_header = self._host_headers[key] = _host_header(host, port)
        parts = [method, b" ", target, b" HTTP/1.1\r\nHost: ", host_header, b"\r\n"]
        for name, value in headers:
            parts += (name, b": ", value, b"\r\n")
        if body is None:
            parts.append(b"Content-Length: 0\r\n\r\n" if method in _BODY_METHODS else b"\r\n")
        elif isinstance(body, bytes):
            parts.append(b"Content-Length: %d\r\n\r\n" % (len(body),))
        elif body.length is UNKNOWN_LENGTH:
            parts.append(b"Transfer-Encoding: chunked\r\n\r\n")
        else:
            parts.append(b"Content-Length: %d\r\n\r\n" % (body.length,))
        head = b"".join(parts)
        lines = len(headers) + (4 if parts[-1] != b"\r\n" else 3)
        if head.count(b"\n") != lines or head.count(b"\r") != lines or b" " in target:
            return fail(ValueError("A request line or header contains a line break, or the target a space."))
        is_head = method == b"HEAD"
        connection = self._take(key)
        if connection is not None:
            d = Deferred(connection.cancel)
            connection.start(d, head, body, is_head, max_head_bytes, True)
            return d
        attempt = _Connecting(self, key, head, body, is_head, max_head_bytes)
        d = attempt.deferred = Deferred(attempt.cancel)
        self._attempts.add(attempt)
        try:
            if tls:
                from twisted.internet.ssl import optionsForClientTLS

                attempt.connector = self._reactor.connectSSL(
                    host, port, attempt, optionsForClientTLS(host), timeout=connect_timeout
                )
            else:
                attempt.connector = self._reactor.connectTCP(host, port, attempt, timeout=connect_timeout)
        except Exception as e:
            # e.g. no TLS support installed, or a host name that is not text.
            self._attempts.discard(attempt)
            attempt.deferred = None
            return fail(UpstreamUnreachable("Cannot connect: {}".format(type(e).__name__)))
        return d

    def idle_connections(self) -> int:
        """
        :return: how many idle connections the pool holds.
        """
        return sum(len(stack) for stack in self._idle.values())

    def close(self) -> Deferred:
        """
        Abort connections in use and connection attempts, close idle ones.

        :return: a Deferred firing when every connection is gone.
        """
        self._closed = True
        if self._sweep is not None:
            self._sweep.cancel()
            self._sweep = None
        idle, self._idle = self._idle, {}
        for stack in idle.values():
            for connection in stack:
                connection.idle = False
                connection.close()
        for connection in list(self._connections):
            if connection.busy:
                connection.abort()
        for attempt in list(self._attempts):
            attempt.stop()
        if not self._connections and not self._attempts:
            return succeed(None)
        d = Deferred()
        self._close_waiters.append(d)
        return d

    # Bookkeeping, called by connections and attempts.

    def _take(self, key: tuple) -> Optional[_UpstreamConnection]:
        stack = self._idle.get(key)
        if not stack:
            return None
        connection = stack.pop()
        connection.idle = False
        if self._reactor.seconds() - connection.idle_since < self._idle_timeout:
            return connection
        # The sweep is late: this one and every older one have expired.
        connection.close()
        for older in stack:
            older.idle = False
            older.close()
        stack.clear()
        return None

    def _connected(self, connection: _UpstreamConnection, attempt: _Connecting) -> None:
        self._attempts.discard(attempt)
        self._connections.add(connection)
        d, attempt.deferred = attempt.deferred, None
        head, body = attempt.head, attempt.body
        attempt.head = attempt.body = None
        if d is None or self._closed:
            connection.close()
            return
        connection.start(d, head, body, attempt.is_head, attempt.max_head, False)

    def _attempt_over(self, attempt: _Connecting) -> None:
        self._attempts.discard(attempt)
        self._check_closed()

    def _release(self, connection: _UpstreamConnection, reuse: bool) -> None:
        if not reuse or self._closed or self._max_idle <= 0:
            connection.close()
            return
        stack = self._idle.get(connection.key)
        if stack is None:
            stack = self._idle[connection.key] = []
        elif len(stack) >= self._max_idle:
            oldest = stack.pop(0)
            oldest.idle = False
            oldest.close()
        connection.idle = True
        connection.idle_since = self._reactor.seconds()
        stack.append(connection)
        if self._sweep is None:
            self._sweep = self._reactor.callLater(self._idle_timeout, self._expire)

    def _forget_idle(self, connection: _UpstreamConnection) -> None:
        if connection.idle:
            connection.idle = False
            stack = self._idle.get(connection.key)
            if stack is not None:
                stack.remove(connection)
                if not stack:
                    del self._idle[connection.key]

    def _gone(self, connection: _UpstreamConnection) -> None:
        self._forget_idle(connection)
        self._connections.discard(connection)
        self._check_closed()

    def _check_closed(self) -> None:
        if self._closed and not self._connections and not self._attempts:
            waiters, self._close_waiters = self._close_waiters, []
            for d in waiters:
                d.callback(None)

    def _expire(self) -> None:
        """
        Close the connections idle for C{idle_timeout}; come back when the
        next one will be.
        """
        self._sweep = None
        now = self._reactor.seconds()
        # A little slack: the timer fires at since + timeout, give or take
        # the rounding of that sum.
        deadline = now - self._idle_timeout + 0.001
        oldest = None
        for key, stack in list(self._idle.items()):
            expired = 0
            while expired < len(stack) and stack[expired].idle_since <= deadline:
                expired += 1
            for connection in stack[:expired]:
                connection.idle = False
                connection.close()
            del stack[:expired]
            if not stack:
                del self._idle[key]
            elif oldest is None or stack[0].idle_since < oldest:
                oldest = stack[0].idle_since
        if oldest is not None:
            self._sweep = self._reactor.callLater(max(oldest + self._idle_timeout - now, 0.0), self._expire)


def _host_header(host: str, port: int) -> bytes:
    """
    :return: the Host header value for C{host:port} (the port always given).
    """
    name = host.encode("idna") if not host.isascii() else host.encode("ascii")
    if b":" in name:
        name = b"[" + name + b"]"
    return b"%s:%d" % (name, port)
