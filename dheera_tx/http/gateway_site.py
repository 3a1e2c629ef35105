"""
The listening factory both planes share: one L{GatewayConnection} per
client, up to C{max_connections} open (those over it get a 503 and are
closed), HTTP/1.1 offered over ALPN on TLS, and the control plane's
twisted.web Site (forms not parsed, no access log) behind the connections'
L{ControlBridge}.
"""

from typing import List, Optional

from twisted.internet.interfaces import IProtocolNegotiationFactory
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.web import server as webserver
from zope.interface import implementer

from dheera_tx.http.control_bridge import ControlBridge
from dheera_tx.http.control_requests import ControlGate
from dheera_tx.http.listener_limits import ConnectionLimitReached, HeadDeadlines, ListenerLimits
from dheera_tx.http.server import GatewayConnection

log = Logger()


@implementer(IProtocolNegotiationFactory)
class GatewaySite(Factory):
    """
    The listening factory both planes share.

    :param control: the control-plane resource (Klein, under
        L{dheera_tx.control.ControlRoot}).
    :param passthrough: the data plane (L{dheera_tx.forwarding.Passthrough}),
        or L{None} to serve the control plane only.
    :param limits: a L{ListenerLimits}.
    :param gate: the L{ControlGate} checking control-plane keys when the
        headers arrive (default: none, every request is read).
    :ivar open_connections: connections open now (in this process:
        C{max_connections} holds per worker).
    :ivar refused_connections: connections refused for being over the
        limit.
    """

    protocol = GatewayConnection

    def __init__(self, control, passthrough, limits: ListenerLimits, reactor, gate: Optional[ControlGate] = None):
        self.passthrough = passthrough
        self.limits = limits
        self.reactor = reactor
        self.gate = gate or ControlGate(None)
        # No handler reads a form; twisted.web would parse one on the
        # reactor (a 1 MiB urlencoded body is a quarter million fields).
        self.control_site = webserver.Site(control, reactor=reactor, parsePOSTFormSubmission=False)
        self.control_site.displayTracebacks = False
        # Pass-through calls are logged as call records (dheera_tx.call);
        # the stock access log would print URIs with secrets in queries.
        self.control_site.log = lambda request: None
        self.control = ControlBridge(self.control_site)
        self.deadlines = HeadDeadlines(reactor, limits.header_timeout)
        self.open_connections = 0
        self.refused_connections = 0
        self._at_limit = False

    def acceptableProtocols(self) -> List[bytes]:
        """
        Over TLS, the protocol ALPN may choose: HTTP/1.1 only.  (Twisted
        selects over ALPN on every TLS listener; with nothing to offer, a
        client that offers ALPN, as curl and httpx do, gets an alert.)
        """
        return [b"http/1.1"]

    def buildProtocol(self, addr):
        if self.open_connections >= self.limits.max_connections:
            self.refused_connections += 1
            if not self._at_limit:
                self._at_limit = True
                log.warn("{limit} connections open: refusing new ones", limit=self.limits.max_connections)
            protocol = ConnectionLimitReached()
            protocol.factory = self
            return protocol
        return self.protocol(self)

    def doStop(self) -> None:
        super().doStop()
        if not self.numPorts:
            self.deadlines.stop()

    def connection_opened(self) -> None:
        """
        A connection of this site opened.
        """
        self.open_connections += 1

    def connection_closed(self) -> None:
        """
        A connection of this site closed.
        """
        self.open_connections -= 1
        if self._at_limit and self.open_connections < self.limits.max_connections:
            self._at_limit = False
            log.info("Accepting connections again")
