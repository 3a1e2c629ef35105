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

Each event is still isolated from the others, as C{callWithLogger} does
for Twisted's loop: C{_doReadOrWrite} catches what C{doRead} and
C{doWrite} raise, but not what a protocol's C{connectionLost} raises
while the selectable is disconnected; L{GatewayReactor.doPoll} catches
that itself, logs it with the selectable's log prefix and goes on with the
rest of the batch.  The selectable was being disconnected: it is taken out
of the reactor altogether (C{_disconnectSelectable} removes it before
calling C{connectionLost}, but after a half-close only as a reader).  A
C{try} costs nothing in CPython 3.11 until something raises.

Installing it is explicit: L{dheera_tx.tap.makeService} calls L{install}
before it imports the global reactor, and L{dheera_tx.tap} imports nothing
at its top that does (Klein and txredisapi import the global reactor,
which installs the default one).  twistd parses C{--reactor} (and installs
that reactor) before C{makeService} runs, so C{twistd -r epoll dheera}
still runs on epoll, an explicit choice.  C{makeService} logs which
reactor runs and why (L{log_reactor}), with a warning when another reactor
was installed without being asked for (something imported
C{twisted.internet.reactor} first; C{twist} installs its default before
the plugin runs).
"""

import errno
import sys
from typing import Optional

from twisted.internet.epollreactor import EPollReactor
from twisted.logger import Logger
from twisted.python.reflect import qual

log = Logger()


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
                try:
                    handle(selectable, fd, event)
                except KeyboardInterrupt:
                    raise
                except BaseException:
                    _log_failure(selectable)
                    self._drop(selectable)

    def _drop(self, selectable) -> None:
        """
        Take a selectable that raised while being disconnected out of the
        reactor altogether, so that a half-done disconnection (a half-close
        whose handler raised) is not polled again and again.
        """
        try:
            self.removeReader(selectable)
            self.removeWriter(selectable)
        except Exception:
            _log_failure(selectable)

    # EPollReactor binds doIteration to its own doPoll at class creation.
    doIteration = doPoll


def _log_failure(selectable) -> None:
    """
    Log the exception being handled, raised while serving C{selectable},
    under its log prefix (as C{log.callWithLogger} would have).
    """
    try:
        prefix = selectable.logPrefix()
    except BaseException:
        prefix = "(buggy logPrefix method)"
    log.failure("Unhandled error while serving {prefix}", prefix=prefix)


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


def chosen_reactor(options) -> Optional[str]:
    """
    :param options: the plugin's options, whose C{parent} (set by twistd
        and C{twist}) holds the runner's own.
    :return: the reactor name given with C{--reactor}, or L{None}.
    """
    parent = getattr(options, "parent", None)
    if parent is None:
        return None
    # twistd keeps the name under "reactor"; twist under "reactorName" (and
    # the reactor object under "reactor").
    for key in ("reactorName", "reactor"):
        name = parent.get(key)
        if isinstance(name, str) and name != "default":
            return name
    return None


def log_reactor(reactor, chosen: Optional[str]) -> None:
    """
    Log which reactor the proxy runs on, and why.

    :param chosen: the name given with C{--reactor}, if any.
    """
    name = qual(type(reactor))
    if isinstance(reactor, GatewayReactor):
        log.info("Event loop: {reactor} (installed by the dheera plugin)", reactor=name)
    elif chosen is not None:
        log.info("Event loop: {reactor}, chosen with --reactor={chosen}", reactor=name, chosen=chosen)
    else:
        log.warn(
            "Event loop: {reactor}, not dheera_tx.event_loop.GatewayReactor: a reactor was installed before "
            "the dheera plugin could install its own (something imported twisted.internet.reactor first, "
            "or the runner installed its default); "
            "every socket event costs about 1 us more; pass --reactor to choose one explicitly",
            reactor=name,
        )
