"""
Tests of reusing pooled upstream connections (L{dheera_tx.upstream.client}),
over real loopback sockets: a connection with bytes or an end of stream
waiting is not reused, and an idempotent request lost with a pooled
connection the server closed as it arrived is sent again, once, on a
fresh connection.
"""

import fcntl
import os
import select
import socket
import struct
import termios
import time

from twisted.internet import reactor, ssl
from twisted.internet.defer import CancelledError
from twisted.internet.protocol import Factory
from twisted.trial.unittest import TestCase

from dheera_tx.upstream.client import UpstreamFailed, UpstreamPool
from tests.scripted_upstream import BytesBody, ScriptedConnection, ScriptedServer, read_body, wait_until
from tests.tls_upstream import self_signed_localhost


def answer(body: bytes) -> bytes:
    """
    :return: a keep-alive 200 response carrying C{body}.
    """
    return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)


def _unread(sock: socket.socket) -> int:
    """
    :return: how many bytes wait unread in C{sock}'s receive queue.
    """
    return struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.FIONREAD, b"\0\0\0\0"))[0]


def _await_in_socket(sock: socket.socket, condition, timeout: float = 5.0) -> None:
    """
    Wait, without running the reactor (which would read the socket),
    until C{condition(sock)} holds.
    """
    deadline = time.monotonic() + timeout
    while not condition(sock):
        if time.monotonic() > deadline:
            raise AssertionError("the bytes did not arrive in the socket")
        time.sleep(0.001)


class _ReuseCase(TestCase):
    """
    Gives each test a pool, closed in cleanup.
    """

    timeout = 20

    def setUp(self):
        self.pool = UpstreamPool(reactor)
        self.addCleanup(self.pool.close)

    def request(self, server, method=b"GET", body=None, host="127.0.0.1", **kw):
        return self.pool.request(host, server.port, 5.0, method, b"/x", [], body, **kw)

    def idle_socket(self) -> socket.socket:
        """
        :return: the socket of the pool's only idle connection (beneath
            TLS, if any).
        """
        [stack] = self.pool._idle.values()
        [connection] = stack
        return connection.transport.socket


class StrayBytesTests(_ReuseCase):
    """
    An idle connection with something unread on it is not reused (issue
    12 item 6): a late unsolicited answer never reaches the next call.
    """

    async def _stray_answer_not_taken(self, server, **kw) -> None:
        """
        After a first call, the server sends a second, unsolicited answer
        on the idle connection; it reaches the proxy's socket before the
        next call takes a connection (the reactor has not read it yet).
        The next call gets its own answer, on a new connection.
        """
        first = await read_body(await self.request(server, **kw))
        self.assertEqual(first.body, b"first")
        client_socket = self.idle_socket()
        server.connections[0].send_raw(answer(b"stray"))
        _await_in_socket(client_socket, lambda s: _unread(s) > 0)
        second = await read_body(await self.request(server, **kw))
        self.assertEqual(second.body, b"fresh")
        self.assertEqual(len(server.connections), 2)
        self.assertEqual(len(server.connections[0].requests), 1)

    async def test_stray_answer_not_taken(self):
        """
        Over TCP, an unsolicited answer waiting on an idle connection is
        never taken for the next call's.
        """
        server = _RawServer(_first_then_fresh).start(self)
        await self._stray_answer_not_taken(server)

    async def test_stray_answer_not_taken_tls(self):
        """
        Over TLS, the same: the encrypted bytes waiting beneath the TLS
        layer keep the connection out of use.
        """
        server = _RawServer(_first_then_fresh, tls=self._tls()).start(self)
        await self._stray_answer_not_taken(server, host="localhost", tls=True)

    async def test_closed_idle_connection_not_reused(self):
        """
        An idle connection whose end of stream is waiting unread (the
        server closed it, the reactor has not noticed yet) is not given
        the next request: the request goes out once, on a new connection.
        """
        server = ScriptedServer(lambda c, r: c.write(answer(b"ok"))).start(self)
        await read_body(await self.request(server))
        client_socket = self.idle_socket()
        server.connections[0].transport.socket.shutdown(socket.SHUT_WR)
        _await_in_socket(client_socket, lambda s: select.select([s], [], [], 0)[0] != [])
        sink = await read_body(await self.request(server))
        self.assertEqual(sink.body, b"ok")
        self.assertEqual(len(server.connections), 2)
        self.assertEqual(len(server.connections[0].requests), 1)

    async def test_quiet_connection_reused(self):
        """
        A connection with nothing waiting is reused, over TCP and over TLS
        (what a TLS 1.3 server sends after the handshake, its session
        tickets, does not make an idle connection look dirty).
        """
        server = ScriptedServer(lambda c, r: c.write(answer(b"ok"))).start(self)
        for _ in range(3):
            self.assertEqual((await read_body(await self.request(server))).body, b"ok")
        self.assertEqual(len(server.connections), 1)
        tls_server = _RawServer(lambda c, r: c.write(answer(b"ok")), tls=self._tls())
        tls_server.start(self)
        for _ in range(3):
            self.assertEqual((await read_body(await self.request(tls_server, host="localhost", tls=True))).body, b"ok")
        self.assertEqual(len(tls_server.connections), 1)

    def _tls(self):
        """
        :return: the server's TLS options; the pool trusts its certificate
            for the test (C{SSL_CERT_FILE}).
        """
        directory = self.mktemp()
        os.makedirs(directory)
        pem_path = self_signed_localhost(directory)
        old = os.environ.get("SSL_CERT_FILE")
        os.environ["SSL_CERT_FILE"] = pem_path
        self.addCleanup(lambda: os.environ.pop("SSL_CERT_FILE") if old is None else os.environ.update(SSL_CERT_FILE=old))
        with open(pem_path, "rb") as f:
            return ssl.PrivateCertificate.loadPEM(f.read()).options()


def _first_then_fresh(connection, request) -> None:
    """
    Answer C{first} to the first request of the first connection,
    C{fresh} to any other.
    """
    first = connection is connection.server.connections[0] and len(connection.requests) == 1
    connection.write(answer(b"first" if first else b"fresh"))


class _RawConnection(ScriptedConnection):
    """
    A scripted server connection that can also send bytes at once, past
    the reactor (and through TLS, if any).
    """

    def send_raw(self, data: bytes) -> None:
        """
        Write C{data} and push it into the socket now.
        """
        self.transport.write(data)
        tcp = self.transport
        aggregator = getattr(self.transport, "_aggregator", None)
        if aggregator is not None:
            # TLS: encrypt now what the TLS layer would gather until the
            # next reactor turn, into the TCP transport beneath.
            aggregator.flush()
            tcp = self.transport.transport
        # Send the TCP transport's buffer as the reactor would when the
        # socket is writable.
        tcp.doWrite()


class _RawServer(ScriptedServer):
    """
    A scripted server of L{_RawConnection}s, over TLS when given options.
    """

    def __init__(self, respond, tls=None):
        super().__init__(respond)
        self._tls = tls

    def start(self, case, interface: str = "127.0.0.1"):
        factory = Factory.forProtocol(lambda: _RawConnection(self))
        factory.noisy = False
        if self._tls is None:
            self._listening = reactor.listenTCP(0, factory, interface=interface)
        else:
            self._listening = reactor.listenSSL(0, factory, self._tls, interface=interface)
        self.port = self._listening.getHost().port
        case.addCleanup(self.stop)
        return self


class RetryTests(_ReuseCase):
    """
    A pooled connection the server closes as a request arrives, before
    answering a byte (issue 17 item 4): an idempotent request is sent
    again, once, on a fresh connection; any other is not.
    """

    def closes_second_request(self, close=None):
        """
        :return: a server answering the first request on each connection
            and closing the connection (FIN, or C{close}) when a second
            one arrives on it; the answer names the method and the body.
        """

        def respond(c, r):
            if len(c.requests) == 1:
                c.write(answer(r.method + b" " + r.body))
            elif close is not None:
                close(c)
            else:
                c.transport.loseConnection()

        return ScriptedServer(respond).start(self)

    async def _retried(self, server, method, body=None) -> None:
        await read_body(await self.request(server))
        sink = await read_body(await self.request(server, method, body))
        expected = b"" if method == b"HEAD" else method + b" " + (body or b"")
        self.assertEqual(sink.body, expected)
        self.assertEqual(len(server.connections), 2)
        # The first connection got the request too, and never answered.
        self.assertEqual(len(server.connections[0].requests), 2)
        self.assertEqual(server.connections[1].requests[0].method, method)

    async def test_get_retried(self):
        """
        A GET lost with a pooled connection closed (FIN) as it arrived
        succeeds on a fresh connection.
        """
        await self._retried(self.closes_second_request(), b"GET")

    async def test_get_retried_after_reset(self):
        """
        The same when the server resets the connection.
        """
        await self._retried(self.closes_second_request(lambda c: c.transport.abortConnection()), b"GET")

    async def test_idempotent_methods_retried(self):
        """
        HEAD, OPTIONS, DELETE and a PUT with its body in memory are sent
        again too, the PUT with the same body.
        """
        for method, body in [(b"HEAD", None), (b"OPTIONS", None), (b"DELETE", None), (b"PUT", b'{"a": 1}')]:
            server = self.closes_second_request()
            await self._retried(server, method, body)

    async def test_post_not_retried(self):
        """
        A POST (not idempotent: the server may have acted on it) fails
        with UpstreamFailed, reused, and is not sent again.
        """
        server = self.closes_second_request()
        await read_body(await self.request(server))
        e = await self.assertFailure(self.request(server, b"POST", b"{}"), UpstreamFailed)
        self.assertTrue(e.reused)
        self.assertEqual(len(server.connections), 1)

    async def test_streamed_body_not_retried(self):
        """
        A PUT whose body comes from a producer (it cannot be read twice)
        is not sent again.
        """
        server = self.closes_second_request()
        await read_body(await self.request(server))
        await self.assertFailure(self.request(server, b"PUT", BytesBody(b"{}")), UpstreamFailed)
        self.assertEqual(len(server.connections), 1)

    async def test_retried_once(self):
        """
        When the fresh connection is lost too, the request fails (reused
        False): one retry, no more.
        """
        fresh = []

        def respond(c, r):
            if c is server.connections[0] and len(c.requests) == 1:
                c.write(answer(b"ok"))
            else:
                fresh.append(c)
                c.transport.loseConnection()

        server = ScriptedServer(respond).start(self)
        await read_body(await self.request(server))
        e = await self.assertFailure(self.request(server), UpstreamFailed)
        self.assertFalse(e.reused)
        self.assertEqual(len(server.connections), 2)
        self.assertEqual(len(fresh), 2)

    async def test_partial_answer_not_retried(self):
        """
        A connection lost after a byte of the answer arrived is not retried
        (the server saw and began answering the request).
        """

        def respond(c, r):
            if len(c.requests) == 1:
                c.write(answer(b"ok"))
            else:
                c.write(b"HTTP/1.1 200 OK\r\n")
                c.transport.loseConnection()

        server = ScriptedServer(respond).start(self)
        await read_body(await self.request(server))
        e = await self.assertFailure(self.request(server), UpstreamFailed)
        self.assertTrue(e.reused)
        self.assertEqual(len(server.connections), 1)

    async def test_cancel_during_retry(self):
        """
        Cancelling the request while it waits on the fresh connection
        aborts that connection and fails with CancelledError.
        """

        def respond(c, r):
            if c is server.connections[0]:
                if len(c.requests) == 1:
                    c.write(answer(b"ok"))
                else:
                    c.transport.loseConnection()
            # The fresh connection never answers.

        server = ScriptedServer(respond).start(self)
        await read_body(await self.request(server))
        d = self.request(server)
        await wait_until(lambda: len(server.connections) == 2 and server.connections[1].requests)
        d.cancel()
        await self.assertFailure(d, CancelledError)
        await wait_until(lambda: server.connections[1].lost)
