"""
The proxy's own outbound HTTP calls (health probes, metrics scrapes, webhooks),
through treq, each bounded in time.

The forwarding hot path does not use this: it needs a plain Agent that
never decodes, redirects or keeps cookies (see L{dheera_tx.forwarding}).
"""

from typing import Any, Callable, Coroutine, Optional, Tuple

import treq
from twisted.internet import error as ierror
from twisted.internet.defer import Deferred
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.web.client import Agent, HTTPConnectionPool, ResponseNeverReceived

log = Logger()


def outbound_client(reactor, timeout: float, per_host: int) -> Tuple[treq.client.HTTPClient, HTTPConnectionPool]:
    """
    :param timeout: seconds to connect.
    :param per_host: persistent connections kept per host.
    :return: a treq client on its own pool; the caller closes the pool
        (C{closeCachedConnections}) when it stops.
    """
    pool = HTTPConnectionPool(reactor, persistent=True)
    pool.maxPersistentPerHost = per_host
    pool.retryAutomatically = False
    return treq.client.HTTPClient(Agent(reactor, connectTimeout=timeout, pool=pool)), pool


def bounded(coroutine: Coroutine[Any, Any, Any], timeout: float, reactor) -> Deferred:
    """
    Run C{coroutine} (an outbound call) for at most C{timeout} seconds.

    A cancelled Agent request fails with C{ResponseNeverReceived}, not
    C{CancelledError}: this remembers that the timeout fired and fails
    with L{TimeoutError} then, so callers can say "timed out".

    :return: a Deferred of the coroutine's result.
    """
    d = Deferred.fromCoroutine(coroutine)
    timed_out = []

    def on_timeout(result, timeout):
        timed_out.append(True)
        return result

    def why(failure):
        if timed_out:
            raise TimeoutError()
        return failure

    d.addTimeout(timeout, reactor, onTimeoutCancel=on_timeout)
    return d.addErrback(why)


class AnswerTooLarge(Exception):
    """
    An outbound call's answer is over the reader's cap (L{read_capped}).
    """


async def read_capped(response, limit: int) -> bytes:
    """
    Read an answer's body, at most C{limit} bytes: an answer that declares
    a longer length is refused unread (its connection closed), and one that
    grows past the cap stops being read.

    :raise AnswerTooLarge: beyond the cap.
    """
    length = response.length
    if isinstance(length, int) and length > limit:
        response.deliverBody(_Discard())
        raise AnswerTooLarge()
    parts = []
    size = [0]

    def take(data: bytes) -> None:
        size[0] += len(data)
        if size[0] > limit:
            raise AnswerTooLarge()
        parts.append(data)

    await treq.collect(response, take)
    return b"".join(parts)


class _Discard:
    """Drops a body that will not be read (and closes its connection)."""

    def makeConnection(self, transport):
        transport.stopProducing()

    def dataReceived(self, data):
        pass

    def connectionLost(self, reason):
        pass


def failure_reason(e: Exception, timeout: float, what: str) -> str:
    """
    A short reason of our own for a failed outbound call (an exception's
    text may name the URL, and so a key in it).

    :param what: the call, for the last resort: C{"probe"}, C{"scrape"}.
    """
    if isinstance(e, (ierror.TimeoutError, TimeoutError)):
        return f"timed out after {timeout:g} s"
    if isinstance(e, ierror.ConnectionRefusedError):
        return "connection refused"
    if isinstance(e, ierror.DNSLookupError):
        return "host not found"
    if isinstance(e, ierror.ConnectError):
        return "cannot connect"
    if isinstance(e, ResponseNeverReceived):
        return "connection closed without an answer"
    return f"{what} failed: " + type(e).__name__


class Rounds:
    """
    Runs rounds of outbound calls in the background: now and every
    C{interval} seconds, one round at a time (a round that takes longer
    delays the next).  L{stop} ends the loop and cancels the round in
    flight; a round that fails after L{stop} is not logged.

    :param round: makes one round (a coroutine function).
    :param what: the rounds' name in log lines, e.g. C{"Metrics scrape"}.
    :ivar stopped: L{stop} was called (and L{start} not since).
    """

    def __init__(self, reactor, round: Callable[[], Coroutine[Any, Any, Any]], what: str):
        self._reactor = reactor
        self._round_function = round
        self._what = what
        self._loop: Optional[LoopingCall] = None
        self._round: Optional[Deferred] = None
        self.stopped = False

    def start(self, interval: float) -> None:
        """
        Start the loop (nothing if it runs already).
        """
        if self._loop is not None and self._loop.running:
            return
        self.stopped = False
        self._loop = LoopingCall(self._tick)
        self._loop.clock = self._reactor
        self._loop.start(interval, now=True).addErrback(lambda f: log.failure(self._what + " loop stopped", f))

    def _tick(self) -> Deferred:
        self._round = Deferred.fromCoroutine(self._round_function())
        self._round.addErrback(lambda f: None if self.stopped else log.failure(self._what + " failed", f))
        self._round.addBoth(self._ticked)
        return self._round

    def _ticked(self, _) -> None:
        self._round = None

    def stop(self) -> None:
        """
        Stop the loop and cancel the round in flight.
        """
        self.stopped = True
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        if self._round is not None:
            self._round.cancel()
