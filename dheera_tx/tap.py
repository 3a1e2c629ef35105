"""
The twistd plugin's options and service: everything is assembled here, and
only here is the global reactor touched.
"""

import sys

from twisted.application import service, strports
from twisted.python import usage
from twisted.web.client import HTTPConnectionPool

from dheera_tx.auth import Authenticator
from dheera_tx.config import ConfigError, ProxyConfig, load_config
from dheera_tx.control import ControlPlane, ControlRoot
from dheera_tx.forwarding import Passthrough
from dheera_tx.routing import Router
from dheera_tx.server import ListenerLimits, ProxySite


class Options(usage.Options):
    """
    Options of C{twistd dheera}.
    """

    synopsis = "--config PATH [--listen ENDPOINT ...] [--workers N]"
    optParameters = [
        ["config", "c", None, "Path of the proxy's YAML config (required)."],
        ["workers", "w", "1", "Worker processes sharing the listening port (0 or auto: one per core)."],
    ]

    def __init__(self):
        super().__init__()
        self["listen"] = []

    def opt_listen(self, endpoint: str) -> None:
        """
        A Twisted endpoint to listen on (default tcp:4000); may repeat.
        """
        self["listen"].append(endpoint)

    def postOptions(self) -> None:
        if not self["config"]:
            raise usage.UsageError("--config PATH is required")
        if not self["listen"]:
            self["listen"] = ["tcp:4000"]
        try:
            self["proxy_config"] = load_config(self["config"])
        except ConfigError as e:
            # One clear line, never a traceback.
            sys.exit(str(e))


class _PoolService(service.Service):
    """
    Closes the upstream connection pool on shutdown.
    """

    def __init__(self, pool: HTTPConnectionPool):
        self._pool = pool

    def stopService(self):
        service.Service.stopService(self)
        return self._pool.closeCachedConnections()


def build_site(reactor, config: ProxyConfig, key_store=None, readiness_probes=None, branches=None):
    """
    Assemble the Site serving both planes.

    :return: C{(site, pool)}; the caller owns the upstream pool.
    """
    pool = HTTPConnectionPool(reactor, persistent=True)
    pool.maxPersistentPerHost = 128
    pool.retryAutomatically = False
    router = Router(config, now=reactor.seconds)
    authenticator = Authenticator(config.general.master_key, key_store)
    passthrough = Passthrough(reactor, config, router, authenticator, pool)
    control = ControlPlane(readiness_probes)
    root = ControlRoot(control.app.resource(), branches)
    site = ProxySite(root, passthrough, ListenerLimits(config.general), reactor)
    site.router = router
    site.authenticator = authenticator
    return site, pool


def makeService(options, reactor=None):
    """
    :return: the proxy's MultiService.
    """
    if reactor is None:
        from twisted.internet import reactor
    config = options["proxy_config"]
    top = service.MultiService()
    site, pool = build_site(reactor, config)
    _PoolService(pool).setServiceParent(top)
    for endpoint in options["listen"]:
        strports.service(endpoint, site, reactor=reactor).setServiceParent(top)
    return top
