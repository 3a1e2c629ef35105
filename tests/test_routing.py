"""
Tests for L{dheera_tx.routing.router}: choosing replicas, cooldown, default upstream.
"""

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from dheera_tx.config import config_from_dict
from dheera_tx.errors import ProxyError
from dheera_tx.routing.router import Router


def _config(entries, environ=None, router=None):
    data = {
        "model_list": [
            {"model_name": name, "dheera_ai_params": {"model": "hosted_vllm/" + served, "api_base": base}}
            for name, served, base in entries
        ]
    }
    if router:
        data["router_settings"] = router
    return config_from_dict(data, environ=environ or {})


class RouterTests(SynchronousTestCase):
    """
    Tests for L{Router}.
    """

    def setUp(self):
        self.clock = Clock()
        self.config = _config(
            [("m", "qwen", "http://10.0.0.1:8000"), ("m", "qwen", "http://10.0.0.2:8000"), ("e", "embed", "http://10.0.0.3:8000")],
            router={"allowed_fails": 2, "cooldown_time": 30},
        )
        self.router = Router(self.config, now=self.clock.seconds, choice=lambda xs: xs[0])

    def test_model_name_routes_to_its_replicas(self):
        """
        A configured model name routes to every replica under that name.
        """
        route = self.router.route("m")
        self.assertEqual(route.model_name, "m")
        self.assertEqual([d.api_base for d in route.replicas], ["http://10.0.0.1:8000", "http://10.0.0.2:8000"])

    def test_unknown_model_without_default_is_404(self):
        """
        With several deployments and no default upstream, an unknown model
        is a 404 C{model_not_found}.
        """
        e = self.assertRaises(ProxyError, self.router.route, "nope")
        self.assertEqual((e.status, e.code), (404, "model_not_found"))
        e = self.assertRaises(ProxyError, self.router.route, None)
        self.assertEqual(e.status, 404)

    def test_default_upstream_takes_unknown_models(self):
        """
        With HOSTED_VLLM_API_BASE set, calls naming no configured model go
        there, with no model name to rewrite.
        """
        config = _config([("m", "qwen", "http://10.0.0.1:8000")] * 2, environ={"HOSTED_VLLM_API_BASE": "http://10.9.9.9:8000"})
        route = Router(config, now=self.clock.seconds).route("other")
        self.assertIsNone(route.model_name)
        self.assertEqual([d.api_base for d in route.replicas], ["http://10.9.9.9:8000"])

    def test_least_busy_replica(self):
        """
        The replica with the fewest calls in flight is picked.
        """
        route = self.router.route("m")
        first = self.router.pick(route)
        self.router.started(first)
        second = self.router.pick(route)
        self.assertNotEqual(first, second)
        self.router.started(second)
        self.router.finished(first)
        self.assertEqual(self.router.pick(route), first)

    def test_exclude_tried(self):
        """
        Replicas already tried for a call are not picked again; when all
        were tried there is none.
        """
        route = self.router.route("m")
        a = self.router.pick(route)
        b = self.router.pick(route, [a])
        self.assertNotEqual(a, b)
        self.assertIsNone(self.router.pick(route, [a, b]))

    def test_cooldown_after_allowed_fails(self):
        """
        A replica that fails C{allowed_fails} times within a minute is not
        picked while it cools down, and is picked again afterwards.
        """
        route = self.router.route("m")
        bad = route.replicas[0]
        self.router.failed(bad)
        self.assertFalse(self.router.cooling_down(bad))
        self.router.failed(bad)
        self.assertTrue(self.router.cooling_down(bad))
        for _ in range(5):
            self.assertEqual(self.router.pick(route), route.replicas[1])
        self.clock.advance(31)
        self.assertFalse(self.router.cooling_down(bad))
        self.assertEqual(self.router.pick(route), bad)

    def test_all_cooling_down_still_tried(self):
        """
        When every replica is cooling down, one is still tried rather than
        refusing the call.
        """
        route = self.router.route("e")
        only = route.replicas[0]
        self.router.failed(only)
        self.router.failed(only)
        self.assertTrue(self.router.cooling_down(only))
        self.assertEqual(self.router.pick(route), only)

    def test_old_failures_forgotten(self):
        """
        Failures more than a minute apart do not add up to a cooldown.
        """
        bad = self.router.route("m").replicas[0]
        self.router.failed(bad)
        self.clock.advance(61)
        self.router.failed(bad)
        self.assertFalse(self.router.cooling_down(bad))
