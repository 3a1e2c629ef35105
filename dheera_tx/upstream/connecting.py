"""
Making a new upstream connection: L{_Connecting}, one connection attempt
for one request.

A host name is resolved as Twisted's C{HostnameEndpoint} resolves it: with
the reactor's name resolver (C{getaddrinfo} in a thread, IPv6 and IPv4,
in the system's order of preference), and its addresses are tried as
C{HostnameEndpoint} tries them ("Happy Eyeballs", RFC 8305): the first at
once, the next when the previous one failed or after L{ATTEMPT_DELAY}
seconds without an answer, whichever comes first; the first to connect
carries the request and the others are stopped.  Each attempt has the
deployment's connect timeout.  Only when every address failed does the
request fail, with L{UpstreamUnreachable} naming the last error.
(C{reactor.connectTCP} with a name resolves IPv4 only and tries the first
address.)  An IP address, IPv6 included, is connected to without
resolving.

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

# How long an address may take to connect before the next one is tried
# alongside it: HostnameEndpoint's (and RFC 8305's) delay.
ATTEMPT_DELAY = 0.3


class _Connecting:
    """
    One connection attempt (the factory given to C{connectTCP}, once per
    address tried), holding the request that will go out on it.

    :ivar deferred: the request's Deferred, until it is handed on.
    :ivar tried: how many addresses were tried.
    """

    __slots__ = (
        "_pool", "key", "deferred", "head", "body", "is_head", "max_head", "timeout",
        "connection", "tried", "_addresses", "_pending", "_next", "_stopped",
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
        self.connection: Optional[_UpstreamConnection] = None
        self.tried = 0
        # Addresses not tried yet; connectors still connecting; the call
        # that starts the next address early.
        self._addresses: List[str] = []
        self._pending: list = []
        self._next = None
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

                connector = reactor.connectSSL(address, port, self, optionsForClientTLS(host), timeout=self.timeout)
            else:
                connector = reactor.connectTCP(address, port, self, timeout=self.timeout)
        except Exception as e:
            # e.g. no TLS support installed.
            self._attempt_failed(f"Cannot connect: {type(e).__name__}")
            return
        self._pending.append(connector)
        if self._addresses and self._next is None:
            self._next = reactor.callLater(ATTEMPT_DELAY, self._start_next)

    def _start_next(self) -> None:
        """
        The latest address has not answered in L{ATTEMPT_DELAY} seconds:
        try the next one alongside it.
        """
        self._next = None
        if not self._stopped and self.deferred is not None and self._addresses:
            self._connect(self._addresses.pop(0))

    def _attempt_failed(self, why: str) -> None:
        """
        One address failed: try the next at once, or fail the request when
        none is left and none is still connecting.
        """
        if self.connection is not None:
            return  # one that lost the race, stopped
        if not self._stopped and self.deferred is not None and self._addresses:
            self._cancel_next()
            self._connect(self._addresses.pop(0))
        elif not self._pending:
            self._fail(why)

    def _cancel_next(self) -> None:
        if self._next is not None:
            self._next.cancel()
            self._next = None

    def _fail(self, why: str) -> None:
        """
        Give up: the request fails with L{UpstreamUnreachable}.
        """
        self._stopped = True
        self._cancel_next()
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
        self._cancel_next()
        if not self._pending:
            # Still resolving: the answer will be ignored.
            self._fail("Connecting stopped")
            return
        # Each stopped connector reports its failure; the last one ends
        # the attempt.
        for connector in list(self._pending):
            try:
                connector.stopConnecting()
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
        """
        An address connected: it carries the request; stop the others.
        """
        self.connection = _UpstreamConnection(self._pool, self.key, self)
        self._cancel_next()
        self._addresses = []
        pending, self._pending = self._pending, []
        for connector in pending:
            try:
                # The winner is no longer connecting and says so.
                connector.stopConnecting()
            except NotConnectingError:
                pass
        return self.connection

    def clientConnectionFailed(self, connector, reason: Failure) -> None:
        if connector in self._pending:
            self._pending.remove(connector)
        self._attempt_failed(f"{reason.type.__name__}: {reason.getErrorMessage()}")

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
