"""
The proxy's own outbound HTTP calls (health probes, metrics scrapes, webhooks),
through treq, each bounded in time.

The forwarding hot path does not use this: it needs a plain Agent that
never decodes, redirects or keeps cookies (see L{dheera_tx.forwarding}).
"""

from typing import Any, Coroutine, Tuple

import treq
from twisted.internet import error as ierror
from twisted.internet.defer import Deferred
from twisted.web.client import Agent, HTTPConnectionPool, ResponseNeverReceived


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
