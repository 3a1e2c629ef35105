"""
Making a new upstream connection: L{_Connecting}, one connection attempt
for one request.

A host name is resolved as Twisted's C{HostnameEndpoint} resolves it: with
the reactor's name resolver (C{getaddrinfo} in a thread, IPv6 and IPv4,
in the system's order of preference), and every address is tried in turn
until one connects; only when all fail does the request fail, with
L{UpstreamUnreachable} naming the last error.  (C{reactor.connectTCP}
with a name resolves IPv4 only and tries the first address.)  An IP
address, IPv6 included, is connected to without resolving.  Unlike
C{HostnameEndpoint}, the next address is tried when the previous attempt
failed, not 0.3 s after it started ("Happy Eyeballs"): each attempt has the
deployment's connect timeout.

For an C{https} upstream the connection is made with TLS, the server's
certificate verified for the host name (not the address connected to).
"""

from typing import List, Optional

from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.defer import Deferred
from twisted.internet.error import NotConnectingError
from twisted.internet.interfaces import IResolutionReceiver
from twisted.python.failure import Failure
from zope.interface import implementer

from dheera_tx.upstream.connection import _UpstreamConnection
from dheera_tx.upstream.errors import UpstreamUnreachable


class _Connecting:
    """
    One connection attempt (the factory given to C{connectTCP}), holding
    the request that will go out on it.

    :ivar deferred: the request's Deferred, until it is handed on.
    :ivar tried: how many addresses were tried.
    """

    __slots__ = (
        "_pool", "key", "deferred", "head", "body", "is_head", "max_head", "timeout",
        "connector", "connection", "tried", "_addresses", "_stopped",
    )

    def __init__(self, pool, key: tuple, head: bytes, body, is_head: bool, max_head: int, timeout: float):
        self._pool = pool
        self.key = key
        self.head = head
        self.body = body
        self.is_head = is_head
        self.max_head = max_head
        self.timeout = timeout
        self.deferred: Optional[Deferred] = None
        self.connector = None
        self.connection: Optional[_UpstreamConnection] = None
        self.tried = 0
        self._addresses: List[str] = []
        self._stopped = False

    def begin(self, resolver) -> None:
        """
        Resolve the host (unless it is an address) and connect.

        :param resolver: an C{IHostnameResolver}.
        """
        host = self.key[0]
        if isIPAddress(host) or isIPv6Address(host):
            self._connect(host)
            return
        try:
            resolver.resolveHostName(_Resolution(self), host, portNumber=self.key[1], transportSemantics="TCP")
        except Exception as e:
            self._fail(f"Cannot resolve: {type(e).__name__}")

    def resolved(self, addresses: List[str]) -> None:
        """
        The host name resolved to C{addresses}: connect to the first.
        """
        if self._stopped:
            return
        if not addresses:
            self._fail(f"DNSLookupError: no address found for {self.key[0]!r}")
            return
        self._addresses = addresses[1:]
        self._connect(addresses[0])

    def _connect(self, address: str) -> None:
        host, port, tls = self.key
        reactor = self._pool._reactor
        self.tried += 1
        try:
            if tls:
                from twisted.internet.ssl import optionsForClientTLS

                self.connector = reactor.connectSSL(address, port, self, optionsForClientTLS(host), timeout=self.timeout)
            else:
                self.connector = reactor.connectTCP(address, port, self, timeout=self.timeout)
        except Exception as e:
            # e.g. no TLS support installed, or a host name that is not text.
            self._fail(f"Cannot connect: {type(e).__name__}")

    def _fail(self, why: str) -> None:
        """
        Give up: the request fails with L{UpstreamUnreachable}.
        """
        self._stopped = True
        d, self.deferred = self.deferred, None
        self.body = None
        self._pool._attempt_over(self)
        if d is not None:
            if self.tried > 1:
                why = f"{why} ({self.tried} addresses tried)"
            d.errback(UpstreamUnreachable(why))

    def cancel(self, d) -> None:
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
        Give up connecting (the request, if still waiting, fails).
        """
        if self._stopped:
            return
        self._stopped = True
        if self.connector is None:
            # Still resolving: the answer will be ignored.
            self._fail("Connecting stopped")
            return
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
        if not self._stopped and self.deferred is not None and self._addresses:
            self._connect(self._addresses.pop(0))
            return
        self._fail(f"{reason.type.__name__}: {reason.getErrorMessage()}")

    def clientConnectionLost(self, connector, reason: Failure) -> None:
        pass


@implementer(IResolutionReceiver)
class _Resolution:
    """
    Collects the addresses a host name resolves to, in order, without
    repeats, for a L{_Connecting}.
    """

    __slots__ = ("_attempt", "_addresses")

    def __init__(self, attempt: _Connecting):
        self._attempt = attempt
        self._addresses: List[str] = []

    def resolutionBegan(self, resolution) -> None:
        pass

    def addressResolved(self, address) -> None:
        if address.host not in self._addresses:
            self._addresses.append(address.host)

    def resolutionComplete(self) -> None:
        self._attempt.resolved(self._addresses)
