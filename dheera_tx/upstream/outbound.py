"""
The proxy's own outbound HTTP calls (health probes, webhooks), through treq.

The forwarding hot path does not use this: it needs a plain Agent that
never decodes, redirects or keeps cookies (see L{dheera_tx.forwarding}).
"""

from typing import Tuple

import treq
from twisted.web.client import Agent, HTTPConnectionPool


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
