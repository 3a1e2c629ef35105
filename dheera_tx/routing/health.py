"""
Health of the vLLM deployments: C{GET /health} (SPEC section 7) and the
background check that cools down replicas that stop answering.

L{DeploymentProber} asks every configured deployment (and the default
upstream) C{GET {api_base}/health} at once; vLLM answers 200 with an empty
body while its engine lives, 503 when it is dead.  A server without
C{/health} (404) is asked C{GET /v1/models} instead.  The deployment's
C{api_key} goes along as C{Authorization: Bearer}, but never appears in an
answer: an unhealthy endpoint's C{error} is a short reason made here
(C{"HTTP 503"}, C{"connection refused"}, C{"timed out after 5 s"}), never
an exception's text.
"""

from typing import List

import treq
import treq.client
from twisted.internet.defer import CancelledError, Deferred, gatherResults, succeed
from twisted.logger import Logger

from dheera_tx.config import Deployment, ProxyConfig
from dheera_tx.upstream.outbound import Rounds, bounded, failure_reason, outbound_client

log = Logger()


class DeploymentProber:
    """
    Probes the deployments' health endpoints.

    :param reactor: the reactor (timers and, for the default client,
        connections).
    :param config: the proxy configuration; its deployments are probed.
    :param router: the L{dheera_tx.routing.router.Router} that the background check
        marks (C{set_health}); may be L{None} when only L{probe_all} is used.
    :param http_client: a L{treq.client.HTTPClient}; by default one on an
        C{Agent} with a small connection pool of its own, closed by L{stop}.
    :param timeout: seconds each probe may take.
    """

    def __init__(self, reactor, config: ProxyConfig, router=None, http_client=None, timeout: float = 5.0):
        self._reactor = reactor
        self._config = config
        self._router = router
        self._timeout = timeout
        self._pool = None
        if http_client is None:
            http_client, self._pool = outbound_client(reactor, timeout, per_host=2)
        self._client = http_client
        self._rounds = Rounds(reactor, self.check, "Background health check")

    def deployments(self) -> List[Deployment]:
        """
        :return: every deployment to probe, the default upstream included,
            each once, in config order.
        """
        return list(self._config.all_deployments())

    async def probe_all(self) -> dict:
        """
        Probe every deployment concurrently.

        :return: C{{"healthy_endpoints": [...], "unhealthy_endpoints": [...],
            "healthy_count": n, "unhealthy_count": m}}; each endpoint is
            C{{"model_name", "api_base", "deployment", "latency_ms"}}, plus
            C{"error"} for an unhealthy one.  C{model_name} is L{None} for
            the default upstream.
        """
        return _summary(await self._probe_each())

    async def _probe_each(self) -> list:
        deployments = self.deployments()
        if not deployments:
            return []
        ds = [Deferred.fromCoroutine(self.probe(d)) for d in deployments]
        verdicts = await gatherResults(ds, consumeErrors=True)
        return [(d, ok, entry) for d, (ok, entry) in zip(deployments, verdicts)]

    async def probe(self, deployment: Deployment):
        """
        Probe one deployment.

        :return: C{(healthy, entry)}, C{entry} as in L{probe_all}.  Never
            raises.
        """
        started = self._reactor.seconds()
        try:
            status = await bounded(self._get(deployment, "/health"), self._timeout, self._reactor)
            if status == 404:
                status = await bounded(self._get(deployment, "/v1/models"), self._timeout, self._reactor)
            error = None if 200 <= status < 300 else f"HTTP {status}"
        except CancelledError:
            raise
        except Exception as e:
            error = self._reason(e)
        entry = {
            "model_name": deployment.model_name or None,
            "api_base": deployment.api_base,
            "deployment": deployment.id,
            "latency_ms": round((self._reactor.seconds() - started) * 1000.0, 3),
        }
        if error is not None:
            entry["error"] = error
        if self._router is not None:
            try:
                entry.update(self._router.signals(deployment))
            except KeyError:
                pass
        return error is None, entry

    async def _get(self, deployment: Deployment, path: str) -> int:
        headers = {}
        if deployment.api_key:
            headers["Authorization"] = "Bearer " + deployment.api_key
        response = await self._client.get(
            deployment.api_base + path,
            headers=headers,
            allow_redirects=False,
            unbuffered=True,
            reactor=self._reactor,
        )
        await treq.collect(response, lambda data: None)
        return response.code

    def _reason(self, e: Exception) -> str:
        return failure_reason(e, self._timeout, "probe")

    # -- background check ------------------------------------------------------

    async def check(self) -> dict:
        """
        Probe every deployment and mark each healthy or not on the router.

        :return: what L{probe_all} returns.
        """
        results = await self._probe_each()
        if self._router is not None and not self._rounds.stopped:
            for deployment, ok, entry in results:
                try:
                    self._router.set_health(deployment, ok)
                except KeyError:
                    continue
                if not ok:
                    log.info("Deployment {deployment} unhealthy: {error}", deployment=entry["deployment"], error=entry["error"])
        return _summary(results)

    def start_background(self, interval: float) -> None:
        """
        Run L{check} now and every C{interval} seconds (a round that takes
        longer delays the next one; rounds never overlap).
        """
        self._rounds.start(interval)

    def stop(self) -> Deferred:
        """
        Stop the background check (cancelling a round in progress) and close
        the default client's connections.
        """
        self._rounds.stop()
        if self._pool is not None:
            return self._pool.closeCachedConnections()
        return succeed(None)


def _summary(results) -> dict:
    healthy = [entry for _, ok, entry in results if ok]
    unhealthy = [entry for _, ok, entry in results if not ok]
    return {
        "healthy_endpoints": healthy,
        "unhealthy_endpoints": unhealthy,
        "healthy_count": len(healthy),
        "unhealthy_count": len(unhealthy),
    }
