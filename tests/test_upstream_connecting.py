"""
Tests of L{dheera_tx.upstream.connecting}: how the upstream pool resolves
a host name and which addresses it tries, over real loopback sockets
(IPv4 and IPv6) and in memory.

This machine's C{localhost} resolves to 127.0.0.1 only, so the tests that
need a name with both an IPv6 and an IPv4 address install a name resolver
whose C{getaddrinfo} answers as a system with C{::1 localhost} in
C{/etc/hosts} does (Twisted's own C{GAIResolver}, in a thread, with the
answer given); the connections themselves are real.
"""

import socket
import threading
import time

from twisted.internet import reactor
from twisted.internet._resolver import GAIResolver
from twisted.internet.defer import CancelledError
from twisted.internet.error import ConnectionRefusedError, TCPTimedOutError
from twisted.internet.testing import MemoryReactorClock
from twisted.python.failure import Failure
from twisted.trial.unittest import SkipTest, SynchronousTestCase, TestCase

from dheera_tx.upstream.client import UpstreamPool, UpstreamUnreachable
from tests.scripted_upstream import ScriptedServer, read_body, refused_port
from tests.test_upstream_client import OK_HELLO


def _has_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


def _answers(table):
    """
    :param table: host name -> list of addresses, in the order
        C{getaddrinfo} gives them.
    :return: a C{getaddrinfo} answering from C{table} (and failing for
        other names as the system's does).
    """

    def getaddrinfo(host, port, family=0, socktype=0, proto=0, flags=0):
        if host not in table:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        out = []
        for address in table[host]:
            if ":" in address:
                if family in (0, socket.AF_INET6):
                    out.append((socket.AF_INET6, socket.SOCK_STREAM, 6, "", (address, port, 0, 0)))
            elif family in (0, socket.AF_INET):
                out.append((socket.AF_INET, socket.SOCK_STREAM, 6, "", (address, port)))
        return out

    return getaddrinfo


class _ResolverCase(TestCase):
    """
    Installs a name resolver on the reactor for the test, restored in
    cleanup.
    """

    timeout = 20

    def resolve_with(self, getaddrinfo) -> None:
        previous = reactor.installNameResolver(GAIResolver(reactor, getaddrinfo=getaddrinfo))
        self.addCleanup(reactor.installNameResolver, previous)

    def setUp(self):
        self.pool = UpstreamPool(reactor)
        self.addCleanup(self.pool.close)

    def listen(self, interface: str) -> ScriptedServer:
        """
        :return: a scripted server answering OK_HELLO on C{interface} only.
        """
        return ScriptedServer(lambda c, r: c.write(OK_HELLO)).start(self, interface)


class ResolutionTests(_ResolverCase):
    """
    Upstream host names resolve to IPv6 and IPv4 addresses, and every
    address is tried until one connects.
    """

    def setUp(self):
        super().setUp()
        if not _has_ipv6_loopback():
            raise SkipTest("no IPv6 loopback on this machine")

    async def test_ipv6_only_server_by_name(self):
        """
        A name resolving to 127.0.0.1 then ::1 reaches a server listening
        on ::1 only: the refused IPv4 address is not the end.
        """
        server = self.listen("::1")
        self.resolve_with(_answers({"localhost": ["127.0.0.1", "::1"]}))
        response = await self.pool.request("localhost", server.port, 5.0, b"GET", b"/x", [], None)
        self.assertEqual((await read_body(response)).body, b"hello")
        self.assertEqual(server.requests[0].header(b"host"), b"localhost:%d" % (server.port,))

    async def test_ipv4_only_server_by_name(self):
        """
        A name resolving to ::1 first (as C{localhost} does on most
        systems) reaches a server listening on 127.0.0.1 only.
        """
        server = self.listen("127.0.0.1")
        self.resolve_with(_answers({"localhost": ["::1", "127.0.0.1"]}))
        response = await self.pool.request("localhost", server.port, 5.0, b"GET", b"/x", [], None)
        self.assertEqual((await read_body(response)).body, b"hello")

    async def test_ipv6_resolution(self):
        """
        A name with only an IPv6 address is reached over IPv6.
        """
        server = self.listen("::1")
        self.resolve_with(_answers({"v6.example": ["::1"]}))
        response = await self.pool.request("v6.example", server.port, 5.0, b"GET", b"/x", [], None)
        self.assertEqual((await read_body(response)).body, b"hello")

    async def test_ipv6_address(self):
        """
        An IPv6 address (an api_base C{http://[::1]:PORT}) is connected to
        without resolving, and sent as C{Host: [::1]:PORT}.
        """
        server = self.listen("::1")
        self.resolve_with(_answers({}))
        response = await self.pool.request("::1", server.port, 5.0, b"GET", b"/x", [], None)
        self.assertEqual((await read_body(response)).body, b"hello")
        self.assertEqual(server.requests[0].header(b"host"), b"[::1]:%d" % (server.port,))

    async def test_silent_address_overtaken(self):
        """
        A name whose first address never answers (its listen queue is full:
        the connection attempt hangs) reaches the server on its second
        address about 0.3 s later, well before the connect timeout.
        """
        server = self.listen("::1")
        silent = socket.socket()
        self.addCleanup(silent.close)
        try:
            silent.bind(("127.0.0.1", server.port))
        except OSError:
            raise SkipTest("the port is taken on 127.0.0.1") from None
        silent.listen(0)
        filler = socket.create_connection(("127.0.0.1", server.port))
        self.addCleanup(filler.close)
        self.resolve_with(_answers({"localhost": ["127.0.0.1", "::1"]}))
        started = time.monotonic()
        response = await self.pool.request("localhost", server.port, 30.0, b"GET", b"/x", [], None)
        self.assertEqual((await read_body(response)).body, b"hello")
        # 0.3 s on an idle machine; the margin is for a loaded one.
        self.assertLess(time.monotonic() - started, 10.0)

    async def test_every_address_refused(self):
        """
        When every address refuses, the request fails with
        UpstreamUnreachable naming the refusal and how many addresses were
        tried.
        """
        port = refused_port()
        self.resolve_with(_answers({"localhost": ["::1", "127.0.0.1"]}))
        e = await self.assertFailure(self.pool.request("localhost", port, 5.0, b"GET", b"/x", [], None), UpstreamUnreachable)
        self.assertIn("refused", e.reason.lower())
        self.assertIn("2 addresses tried", e.reason)


class NameFailureTests(_ResolverCase):
    """
    Names that do not resolve, and cancelling while resolving.
    """

    async def test_unknown_name(self):
        """
        A name that does not resolve fails the request with
        UpstreamUnreachable naming the lookup.
        """
        self.resolve_with(_answers({}))
        e = await self.assertFailure(self.pool.request("nowhere.invalid", 80, 5.0, b"GET", b"/", [], None), UpstreamUnreachable)
        self.assertIn("DNSLookupError", e.reason)
        self.assertIn("nowhere.invalid", e.reason)

    async def test_cancel_while_resolving(self):
        """
        A request cancelled while its host name is being resolved fails
        with CancelledError; the late answer connects nowhere, and the pool
        closes.
        """
        release = threading.Event()
        asked = threading.Event()
        table = _answers({"slow.example": ["127.0.0.1"]})

        def slow(*args):
            asked.set()
            release.wait(10)
            return table(*args)

        self.resolve_with(slow)
        self.addCleanup(release.set)
        d = self.pool.request("slow.example", 9, 5.0, b"GET", b"/", [], None)
        d.cancel()
        await self.assertFailure(d, CancelledError)
        await self.pool.close()
        release.set()

    async def test_close_while_resolving(self):
        """
        Closing the pool while a name is being resolved fails that request
        with UpstreamUnreachable and the close completes at once.
        """
        release = threading.Event()
        table = _answers({"slow.example": ["127.0.0.1"]})
        self.resolve_with(lambda *args: (release.wait(10), table(*args))[1])
        self.addCleanup(release.set)
        d = self.pool.request("slow.example", 9, 5.0, b"GET", b"/", [], None)
        closed = self.pool.close()
        await self.assertFailure(d, UpstreamUnreachable)
        await closed
        release.set()


class _Resolver:
    """
    A synchronous C{IHostnameResolver} answering from a table, for the
    in-memory reactor.
    """

    def __init__(self, table):
        self.table = table

    def resolveHostName(self, receiver, hostName, portNumber=0, addressTypes=None, transportSemantics="TCP"):
        from twisted.internet.address import IPv4Address, IPv6Address

        receiver.resolutionBegan(None)
        for address in self.table.get(hostName, []):
            kind = IPv6Address if ":" in address else IPv4Address
            receiver.addressResolved(kind("TCP", address, portNumber))
        receiver.resolutionComplete()


class AddressOrderTests(SynchronousTestCase):
    """
    The addresses are tried in the resolver's order, each with the connect
    timeout, the next one at once when the previous failed or alongside it
    after 0.3 s without an answer (as HostnameEndpoint does), in memory.
    """

    def setUp(self):
        self.clock = MemoryReactorClock()
        self.clock.installNameResolver(_Resolver({"up.example": ["fd00::1", "10.0.0.1", "10.0.0.2"]}))
        self.pool = UpstreamPool(self.clock)

    def test_silent_address_overtaken(self):
        """
        An address that neither connects nor fails within 0.3 s is joined
        by the next; the first to connect carries the request and the
        others are stopped; no timer is left behind.
        """
        from tests.test_upstream_client import _RecordingTransport

        d = self.pool.request("up.example", 8000, 9.0, b"GET", b"/", [], None)
        self.assertEqual([c[0] for c in self.clock.tcpClients], ["fd00::1"])
        self.clock.advance(0.29)
        self.assertEqual(len(self.clock.tcpClients), 1)
        self.clock.advance(0.02)
        self.assertEqual([c[0] for c in self.clock.tcpClients], ["fd00::1", "10.0.0.1"])
        self.clock.advance(0.3)
        self.assertEqual([c[0] for c in self.clock.tcpClients], ["fd00::1", "10.0.0.1", "10.0.0.2"])
        # The second answers first.
        factory = self.clock.tcpClients[1][2]
        protocol = factory.buildProtocol(None)
        transport = _RecordingTransport()
        protocol.makeConnection(transport)
        self.assertEqual(transport.writes, [b"GET / HTTP/1.1\r\nHost: up.example:8000\r\n\r\n"])
        self.assertTrue(self.clock.connectors[0].stoppedConnecting)
        self.assertTrue(self.clock.connectors[2].stoppedConnecting)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        # A stopped one reporting its failure changes nothing.
        factory.clientConnectionFailed(self.clock.connectors[0], Failure(ConnectionRefusedError()))
        protocol.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
        self.assertEqual(self.successResultOf(d).code, 200)
        self.assertEqual(len(self.clock.tcpClients), 3)

    def test_fails_when_the_last_fails(self):
        """
        With attempts overlapping, the request fails only when every
        address has failed, with the last error.
        """
        d = self.pool.request("up.example", 8000, 9.0, b"GET", b"/", [], None)
        self.clock.advance(0.3)
        self.clock.advance(0.3)
        factory = self.clock.tcpClients[0][2]
        factory.clientConnectionFailed(self.clock.connectors[2], Failure(ConnectionRefusedError()))
        factory.clientConnectionFailed(self.clock.connectors[0], Failure(ConnectionRefusedError()))
        self.assertNoResult(d)
        factory.clientConnectionFailed(self.clock.connectors[1], Failure(TCPTimedOutError()))
        e = self.failureResultOf(d, UpstreamUnreachable).value
        self.assertIn("TCPTimedOutError", e.reason)
        self.assertIn("3 addresses tried", e.reason)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_each_address_in_order(self):
        """
        After a failed attempt the next address is tried, with the same
        port and timeout; a repeated address is tried once.
        """
        clock = MemoryReactorClock()
        clock.installNameResolver(_Resolver({"up.example": ["fd00::1", "10.0.0.1", "fd00::1", "10.0.0.2"]}))
        pool = UpstreamPool(clock)
        d = pool.request("up.example", 8000, 2.5, b"GET", b"/", [], None)
        seen = []
        for _ in range(3):
            host, port, factory, timeout, _ = clock.tcpClients[-1]
            seen.append((host, port, timeout))
            factory.clientConnectionFailed(clock.connectors[-1], Failure(ConnectionRefusedError()))
        self.assertEqual(seen, [("fd00::1", 8000, 2.5), ("10.0.0.1", 8000, 2.5), ("10.0.0.2", 8000, 2.5)])
        self.assertEqual(len(clock.tcpClients), 3)
        e = self.failureResultOf(d, UpstreamUnreachable).value
        self.assertIn("3 addresses tried", e.reason)
