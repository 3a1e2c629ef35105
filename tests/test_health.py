"""
Tests for L{dheera_tx.routing.health} and the C{GET /health} route, against real
local servers over loopback: fake vLLMs answering C{/health} 200 and 503,
a server without C{/health}, one that never answers, and a closed port.
"""

import json

from twisted.internet import reactor
from twisted.trial.unittest import TestCase
from twisted.web.client import Agent, HTTPConnectionPool, readBody
from twisted.web.http_headers import Headers
from twisted.web.resource import Resource
from twisted.web.server import Site

from dheera_tx.config import config_from_dict
from dheera_tx.control import ControlPlane
from dheera_tx.keys.auth import Authenticator
from dheera_tx.routing.health import DeploymentProber
from dheera_tx.routing.router import Router
from tests.fake_vllm import FakeVLLM
from tests.passthrough_harness import refusing_url
from tests.test_call_log import HangingServer, LoopbackServer, wait_until
from tests.test_metrics import MASTER_KEY, VIRTUAL_KEY, MemoryKeys

UPSTREAM_KEY = "sk-upstream-health-secret-42"


def closed_port_url() -> str:
    """
    :return: the URL of a loopback port that refuses connections.
    """
    return refusing_url()


def entry(name: str, url: str, **params) -> dict:
    """
    :return: a C{model_list} entry for C{name} at C{url}.
    """
    return {"model_name": name, "dheera_ai_params": dict({"model": "hosted_vllm/tiny", "api_base": url}, **params)}


class _ModelsOnly(Resource):
    """
    A server with C{/v1/models} but no C{/health} (404), as some
    OpenAI-compatible servers are.
    """

    isLeaf = True

    def render_GET(self, request):
        if request.path == b"/v1/models":
            return b'{"object": "list", "data": []}'
        request.setResponseCode(404)
        return b'{"detail": "Not Found"}'


class ProberTests(TestCase):
    """
    Tests for L{DeploymentProber} through its default treq client.
    """

    async def fake(self, **kwargs) -> FakeVLLM:
        """
        :return: a started fake vLLM, stopped at cleanup.
        """
        fake = await FakeVLLM(reactor, **kwargs).start()
        self.addCleanup(fake.stop)
        return fake

    def prober(self, config, router=None, timeout: float = 2.0) -> DeploymentProber:
        """
        :return: a prober, stopped at cleanup.
        """
        prober = DeploymentProber(reactor, config, router, timeout=timeout)
        self.addCleanup(prober.stop)
        return prober

    async def test_healthy_dead_and_closed(self):
        """
        A deployment answering C{/health} 200 is healthy; one answering 503
        and a closed port are unhealthy with a short reason; the
        deployment's key is sent as a bearer token and appears nowhere in
        the answer.
        """
        good = await self.fake(api_key=UPSTREAM_KEY)
        dead = await self.fake()
        dead.fault = "status=503"
        closed = closed_port_url()
        config = config_from_dict(
            {"model_list": [entry("chat", good.url, api_key=UPSTREAM_KEY), entry("chat", dead.url), entry("embed", closed)]}
        )
        result = await self.prober(config).probe_all()
        self.assertEqual((result["healthy_count"], result["unhealthy_count"]), (1, 2))
        healthy = result["healthy_endpoints"][0]
        self.assertEqual(
            {k: healthy[k] for k in ("model_name", "api_base", "deployment")},
            {"model_name": "chat", "api_base": good.url, "deployment": "chat#0"},
        )
        self.assertNotIn("error", healthy)
        self.assertIsInstance(healthy["latency_ms"], float)
        errors = {e["deployment"]: e["error"] for e in result["unhealthy_endpoints"]}
        self.assertEqual(errors, {"chat#1": "HTTP 503", "embed#2": "connection refused"})
        self.assertEqual([r.uri for r in good.received], [b"/health"])
        self.assertEqual(good.received[0].header("authorization"), "Bearer " + UPSTREAM_KEY)
        self.assertIsNone(dead.received[0].header("authorization"))
        self.assertNotIn(UPSTREAM_KEY, json.dumps(result))
        self.assertNotIn(UPSTREAM_KEY[3:], json.dumps(result))

    async def test_models_fallback(self):
        """
        A server whose C{/health} is 404 is asked C{/v1/models}, and is
        healthy when that answers 200.
        """
        site = Site(_ModelsOnly(), timeout=None)
        site.log = lambda request: None
        server = await LoopbackServer(site).start()
        self.addCleanup(server.stop)
        config = config_from_dict({"model_list": [entry("m", server.url)]})
        result = await self.prober(config).probe_all()
        self.assertEqual(result["healthy_count"], 1)

    async def test_hanging_and_default_upstream(self):
        """
        A server that never answers is unhealthy after the timeout; the
        default upstream is probed too, with a null model name.
        """
        hanging = await HangingServer().start()
        self.addCleanup(hanging.stop)
        good = await self.fake()
        config = config_from_dict(
            {"model_list": [entry("a", hanging.url), entry("b", good.url)]},
            environ={"HOSTED_VLLM_API_BASE": good.url},
        )
        result = await self.prober(config, timeout=0.3).probe_all()
        self.assertEqual(result["unhealthy_endpoints"][0]["error"], "timed out after 0.3 s")
        self.assertEqual(
            sorted((e["deployment"], e["model_name"]) for e in result["healthy_endpoints"]),
            [("b#1", "b"), ("default", None)],
        )

    async def test_background_marks_router(self):
        """
        The background check cools down a deployment whose C{/health} fails
        and clears it once it answers again; a healthy one stays usable.
        """
        good = await self.fake()
        bad = await self.fake()
        bad.fault = "status=503"
        config = config_from_dict(
            {"model_list": [entry("chat", good.url), entry("chat", bad.url)], "router_settings": {"cooldown_time": 60}}
        )
        router = Router(config, now=reactor.seconds)
        good_dep, bad_dep = config.deployments
        prober = self.prober(config, router)
        prober.start_background(0.05)
        await wait_until(lambda: router.cooling_down(bad_dep))
        self.assertFalse(router.cooling_down(good_dep))
        self.assertEqual(router.pick(router.route("chat")), good_dep)
        bad.fault = None
        await wait_until(lambda: not router.cooling_down(bad_dep))
        rounds = len(good.received)
        self.assertGreaterEqual(rounds, 2)
        await prober.stop()
        self.assertFalse(router.cooling_down(good_dep))


class HealthRouteTests(TestCase):
    """
    C{GET /health} of L{ControlPlane} over a real loopback socket.
    """

    async def get(self, url: str, key: str = None):
        """
        :return: C{(status, body)} of C{GET url}.
        """
        pool = HTTPConnectionPool(reactor, persistent=False)
        headers = Headers({b"authorization": [b"Bearer " + key.encode()]} if key else {})
        response = await Agent(reactor, pool=pool).request(b"GET", url.encode(), headers)
        return response.code, await readBody(response)

    async def serve(self, **kwargs) -> str:
        """
        :return: the URL of a control plane built with C{kwargs}.
        """
        site = Site(ControlPlane(**kwargs).app.resource(), timeout=None)
        site.log = lambda request: None
        server = await LoopbackServer(site).start()
        self.addCleanup(server.stop)
        return server.url

    async def test_master_key_only(self):
        """
        C{/health} needs the master key: none gets 401, a virtual key 403,
        both in the OpenAI error shape; the master key gets the probe
        results, without the deployment's key.
        """
        fake = await FakeVLLM(reactor).start()
        self.addCleanup(fake.stop)
        config = config_from_dict({"model_list": [entry("chat", fake.url, api_key=UPSTREAM_KEY), entry("x", closed_port_url())]})
        prober = DeploymentProber(reactor, config, timeout=2)
        self.addCleanup(prober.stop)
        url = await self.serve(prober=prober, authenticator=Authenticator(MASTER_KEY, MemoryKeys()))
        status, body = await self.get(url + "/health")
        self.assertEqual(status, 401)
        self.assertEqual(set(json.loads(body)["error"]), {"message", "type", "param", "code"})
        status, body = await self.get(url + "/health", VIRTUAL_KEY)
        self.assertEqual((status, json.loads(body)["error"]["type"]), (403, "permission_error"))
        self.assertEqual(fake.received, [])
        status, body = await self.get(url + "/health", MASTER_KEY)
        self.assertEqual(status, 200)
        document = json.loads(body)
        self.assertEqual((document["healthy_count"], document["unhealthy_count"]), (1, 1))
        self.assertEqual(document["healthy_endpoints"][0]["api_base"], fake.url)
        self.assertNotIn(UPSTREAM_KEY.encode(), body)

    async def test_without_authenticator(self):
        """
        A control plane built without an authenticator keeps C{/health}
        closed (401).
        """
        config = config_from_dict({"model_list": [entry("x", closed_port_url())]})
        prober = DeploymentProber(reactor, config)
        self.addCleanup(prober.stop)
        url = await self.serve(prober=prober)
        status, _ = await self.get(url + "/health", MASTER_KEY)
        self.assertEqual(status, 401)
