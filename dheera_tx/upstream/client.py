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
request, and only if nothing waits unread on the socket when a request
takes it (a non-blocking peek, about 0.9 us): bytes there would be a late
answer nobody asked for, taken for the next request's, and an end of
stream means the server closed it.  A request on a reused connection that
the server closes before a byte of the answer (it was closing the idle
connection as the request came) is sent again, once, on a fresh
connection if its method is idempotent (RFC 9110: GET, HEAD, OPTIONS,
TRACE, PUT, DELETE) and its body is in memory, as Twisted's
C{HTTPConnectionPool} does; never a POST or PATCH.  Idle connections are
closed after C{idle_timeout} seconds (below uvicorn's 5 s, so that the
proxy does not reuse one the server is closing), or after an endpoint's
own timeout (a deployment's C{keepalive_timeout}).

This module holds the pool; making a new connection (resolving the host
name, IPv6 and IPv4, and trying its addresses as C{HostnameEndpoint}
does) is in L{dheera_tx.upstream.connecting}, the connection protocol
(sending the head, parsing the response) in
L{dheera_tx.upstream.connection}, the response and the delivery of its
body in L{dheera_tx.upstream.response}, the writing of a request body
from its producer in L{dheera_tx.upstream.request_body}.  Every error a
request fails with (L{UpstreamUnreachable}, L{UpstreamFailed},
L{UpstreamMalformed}, defined in L{dheera_tx.upstream.errors}) and
L{UpstreamResponse} can be imported from here.
"""

from socket import MSG_DONTWAIT, MSG_PEEK
from typing import Dict, List, Optional, Set, Tuple

from twisted.internet.defer import Deferred, fail, succeed
from twisted.web.iweb import UNKNOWN_LENGTH

from dheera_tx.upstream.connecting import _Connecting
from dheera_tx.upstream.connection import _UpstreamConnection
from dheera_tx.upstream.errors import UpstreamFailed, UpstreamMalformed, UpstreamUnreachable
from dheera_tx.upstream.response import UpstreamResponse

__all__ = [
    "UpstreamPool",
    "UpstreamResponse",
    "UpstreamUnreachable",
    "UpstreamFailed",
    "UpstreamMalformed",
]

_BODY_METHODS = frozenset([b"POST", b"PUT", b"PATCH"])
_PEEK = MSG_PEEK | MSG_DONTWAIT
# RFC 9110 section 9.2.2: sending one of these twice has the effect of
# sending it once, so a request lost with a closing pooled connection may
# be sent again.  Never POST or PATCH: the server may have acted on it.
_IDEMPOTENT = frozenset([b"GET", b"HEAD", b"OPTIONS", b"TRACE", b"PUT", b"DELETE"])


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
        # Endpoints whose idle timeout is not the pool's.
        self._idle_timeouts: Dict[tuple, float] = {}
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
        idle_timeout: Optional[float] = None,
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
        :param idle_timeout: seconds this endpoint's connections are kept
            idle (keep it under the server's own keep-alive timeout), or
            L{None} for the pool's.
        :return: a Deferred firing with the L{UpstreamResponse} once its
            head has arrived, or failing with L{UpstreamUnreachable},
            L{UpstreamFailed}, L{UpstreamMalformed}, the body producer's own
            failure, or C{CancelledError} when cancelled.
        """
        if self._closed:
            return fail(UpstreamUnreachable("The upstream pool is closed."))
        key = (host, port, tls)
        if idle_timeout is not None:
            self._idle_timeouts[key] = idle_timeout
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
            d: Deferred[UpstreamResponse] = Deferred(connection.cancel)
            # Only a body in memory can be sent again.
            if method in _IDEMPOTENT and (body is None or isinstance(body, bytes)):
                replay = (head, body, connect_timeout)
            else:
                replay = None
            connection.start(d, head, body, is_head, max_head_bytes, True, replay)
            return d
        attempt = _Connecting(self, key, head, body, is_head, max_head_bytes, connect_timeout)
        d = attempt.deferred = Deferred(attempt.cancel)
        self._attempts.add(attempt)
        attempt.begin(self._reactor.nameResolver)
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
        d: Deferred[None] = Deferred()
        self._close_waiters.append(d)
        return d

    # Bookkeeping, called by connections and attempts.

    def _take(self, key: tuple) -> Optional[_UpstreamConnection]:
        stack = self._idle.get(key)
        if not stack:
            return None
        timeout = self._idle_timeouts.get(key, self._idle_timeout)
        now = self._reactor.seconds()
        while stack:
            connection = stack.pop()
            connection.idle = False
            if now - connection.idle_since >= timeout:
                # The sweep is late: this one and every older one have
                # expired.
                connection.close()
                for older in stack:
                    older.idle = False
                    older.close()
                stack.clear()
                return None
            if _quiet(connection.transport):
                return connection
            # Bytes nobody asked for (a late answer would be taken for this
            # request's), or the server's close not read yet.
            connection.abort()
        return None

    def _connected(self, connection: _UpstreamConnection, attempt: _Connecting) -> None:
        self._attempts.discard(attempt)
        self._connections.add(connection)
        d, attempt.deferred = attempt.deferred, None
        head, body = attempt.head, attempt.body
        attempt.head, attempt.body = b"", None
        if d is None or self._closed:
            connection.close()
            return
        connection.start(d, head, body, attempt.is_head, attempt.max_head, False)

    def _replay(self, d: Deferred, key: tuple, replay: tuple, is_head: bool, max_head: int) -> Optional[_Connecting]:
        """
        Send a request again on a new connection, its pooled one having
        closed before any byte of the answer.

        :param replay: C{(head, body, connect timeout)}.
        :return: the new connection attempt, now in charge of C{d}, or
            L{None} when the pool is closed.
        """
        if self._closed:
            return None
        head, body, timeout = replay
        attempt = _Connecting(self, key, head, body, is_head, max_head, timeout)
        attempt.deferred = d
        self._attempts.add(attempt)
        attempt.begin(self._reactor.nameResolver)
        return attempt

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
        connection.idle_since = now = self._reactor.seconds()
        stack.append(connection)
        due = now + self._idle_timeouts.get(connection.key, self._idle_timeout)
        if self._sweep is None:
            self._sweep = self._reactor.callLater(due - now, self._expire)
        elif due < self._sweep.getTime():
            self._sweep.reset(due - now)

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
        Close the connections idle for their endpoint's idle timeout; come
        back when the next one will be.
        """
        self._sweep = None
        now = self._reactor.seconds()
        next_due = None
        for key, stack in list(self._idle.items()):
            timeout = self._idle_timeouts.get(key, self._idle_timeout)
            # A little slack: the timer fires at since + timeout, give or
            # take the rounding of that sum.
            deadline = now - timeout + 0.001
            expired = 0
            while expired < len(stack) and stack[expired].idle_since <= deadline:
                expired += 1
            for connection in stack[:expired]:
                connection.idle = False
                connection.close()
            del stack[:expired]
            if not stack:
                del self._idle[key]
            elif next_due is None or stack[0].idle_since + timeout < next_due:
                next_due = stack[0].idle_since + timeout
        if next_due is not None:
            self._sweep = self._reactor.callLater(max(next_due - now, 0.0), self._expire)


def _quiet(transport) -> bool:
    """
    :return: whether nothing waits unread on the socket under C{transport}:
        no byte and no end of stream (a non-blocking peek, one system
        call).  Under TLS this is the TCP socket beneath the TLS layer
        (C{TLSMemoryBIOProtocol} forwards C{socket} to it), which is enough:
        the TLS layer hands on every byte it decrypts at once, and an idle
        connection drops what it is handed.  A transport without a socket
        (in memory) is taken as quiet.
    """
    sock = getattr(transport, "socket", None)
    if sock is None:
        return True
    try:
        sock.recv(1, _PEEK)
    except BlockingIOError:
        return True
    except OSError:
        return False
    return False


def _host_header(host: str, port: int) -> bytes:
    """
    :return: the Host header value for C{host:port} (the port always given).
    """
    name = host.encode("idna") if not host.isascii() else host.encode("ascii")
    if b":" in name:
        name = b"[" + name + b"]"
    return b"%s:%d" % (name, port)
