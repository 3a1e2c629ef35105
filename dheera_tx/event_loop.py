"""
The proxy's reactor: Twisted's epoll reactor without the per-event log
context.

For every ready socket, L{EPollReactor.doPoll} calls
C{log.callWithLogger}, which asks the protocol for its C{logPrefix} and
runs the handler inside a fresh legacy-log context (two dict copies and
three nested calls).  That costs about 2 us per event on this machine, a
sixth of the Python time of a relayed SSE chunk.  L{GatewayReactor}
dispatches the same events to the same C{_doReadOrWrite}, which already
logs and disconnects a selectable whose handler raises.  The only visible
difference: legacy C{twisted.python.log} lines emitted from inside a
handler carry the system C{-} instead of the protocol's prefix (the proxy
logs with C{twisted.logger} namespaces, which are unaffected).

L{install} installs it when nothing has installed a reactor yet; the
C{dheera} twistd plugin calls it before importing anything that imports the
global reactor, so C{twistd -r REACTOR dheera} still runs on REACTOR.
"""

import errno
import sys

from twisted.internet.epollreactor import EPollReactor


class GatewayReactor(EPollReactor):
    """
    An epoll reactor that dispatches socket events without a log context.
    """

    def doPoll(self, timeout):
        """
        Poll for events and handle each ready selectable.
        """
        if timeout is None:
            timeout = -1
        try:
            events = self._poller.poll(timeout, len(self._selectables))
        except OSError as err:
            if err.errno == errno.EINTR:
                return
            raise
        selectables = self._selectables
        handle = self._doReadOrWrite
        for fd, event in events:
            selectable = selectables.get(fd)
            if selectable is not None:
                handle(selectable, fd, event)

    # EPollReactor binds doIteration to its own doPoll at class creation.
    doIteration = doPoll


def install() -> bool:
    """
    Install L{GatewayReactor} as the global reactor, unless one is already
    installed (by C{twistd -r}, trial, or an earlier import).

    :return: whether it was installed.
    """
    if "twisted.internet.reactor" in sys.modules:
        return False
    from twisted.internet.main import installReactor

    installReactor(GatewayReactor())
    return True
