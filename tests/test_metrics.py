"""
Tests for L{dheera_tx.observe.metrics} and the C{GET /metrics} route: counters and
histograms checked by parsing the Prometheus text back, bounded labels,
deployment health read from a real L{Router}, and the route's optional
master-key check over a real loopback socket.
"""

import io
import json
import os
from typing import Dict, FrozenSet, Tuple

from prometheus_client import values
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import reactor
from twisted.internet.defer import succeed
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.client import Agent, HTTPConnectionPool, readBody
from twisted.web.http_headers import Headers
from twisted.web.server import Site

from dheera_tx.config import config_from_dict
from dheera_tx.control import ControlPlane
from dheera_tx.keys.auth import Authenticator, hash_key
from dheera_tx.keys.records import KeyRecord
from dheera_tx.observe.call_log import CallLog
from dheera_tx.observe.log_sinks import JSONLogSink
from dheera_tx.observe.metrics import KNOWN_ROUTES, ProxyMetrics, route_label
from dheera_tx.routing.router import Router
from tests.test_call_log import LoopbackServer, make_call

MASTER_KEY = "sk-metrics-master-0123456789"
VIRTUAL_KEY = "sk-metrics-virtual-0123456789abcdef"

Samples = Dict[Tuple[str, FrozenSet[Tuple[str, str]]], float]


def parse(text: str) -> Samples:
    """
    :return: every sample of a Prometheus text, by name and label set.
    """
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return out


def sample(samples: Samples, name: str, **labels) -> float:
    """
    :return: the value of one sample (0 when absent).
    """
    return samples.get((name, frozenset(labels.items())), 0.0)


def two_model_config(environ=None):
    """
    :return: a config with C{chat} (two replicas) and C{embed}.
    """
    return config_from_dict(
        {
            "model_list": [
                {"model_name": "chat", "dheera_ai_params": {"model": "hosted_vllm/q", "api_base": "http://10.0.0.1:8000", "api_key": "upstream-secret"}},
                {"model_name": "chat", "dheera_ai_params": {"model": "hosted_vllm/q", "api_base": "http://10.0.0.2:8000"}},
                {"model_name": "embed", "dheera_ai_params": {"model": "hosted_vllm/e", "api_base": "http://10.0.0.3:8000"}},
            ],
            "router_settings": {"allowed_fails": 2, "cooldown_time": 30},
        },
        environ=environ or {},
    )


class MemoryKeys:
    """
    An in-memory key store holding one virtual key, for the master-key
    checks of control-plane routes.
    """

    def __init__(self, key: str = VIRTUAL_KEY):
        self._records = {hash_key(key): KeyRecord(token=hash_key(key), key_alias="tenant")}

    def get_key(self, token: str):
        """
        :return: a Deferred firing with the record of C{token}, or L{None}.
        """
        return succeed(self._records.get(token))


class RouteLabelTests(SynchronousTestCase):
    """
    Tests for L{route_label}.
    """

    def test_known_routes(self):
        """
        Known vLLM routes, with or without C{/vllm}, a trailing part or a
        query, map to themselves; anything else is C{other}.
        """
        self.assertEqual(route_label("/vllm/v1/chat/completions"), "/v1/chat/completions")
        self.assertEqual(route_label("/v1/chat/completions?x=1"), "/v1/chat/completions")
        self.assertEqual(route_label("/vllm/v1/responses/resp_123/cancel"), "/v1/responses")
        self.assertEqual(route_label("/vllm/score"), "/score")
        self.assertEqual(route_label("/vllm/v1/chat/completionsX"), "other")
        self.assertEqual(route_label("/vllm/random/sk-abcdefabcdef"), "other")
        self.assertEqual(route_label("/vllm"), "other")


class ProxyMetricsTests(SynchronousTestCase):
    """
    Tests for L{ProxyMetrics}.
    """

    def setUp(self):
        self.clock = Clock()
        self.config = two_model_config()
        self.router = Router(self.config, now=self.clock.seconds)
        self.metrics = ProxyMetrics(self.router, self.config)

    def scrape(self) -> Samples:
        """
        :return: the parsed samples of L{ProxyMetrics.render}.
        """
        body, content_type = self.metrics.render()
        self.assertTrue(content_type.startswith("text/plain"))
        return parse(body.decode("utf-8"))

    def test_counts_observed_calls(self):
        """
        Requests, latency histograms, tokens, spend and upstream errors
        match the calls observed.
        """
        calls = [make_call(n) for n in range(3)]
        calls.append(make_call(3, status=500, prompt_tokens=0, completion_tokens=0, cost_nanos=0))
        calls.append(make_call(4, status=502, error="upstream_unreachable", first_byte_at=None, prompt_tokens=0, completion_tokens=0, cost_nanos=0))
        calls.append(make_call(5, path="/vllm/v1/embeddings", model_name="embed", prompt_tokens=5, completion_tokens=0, cost_nanos=1000))
        calls.append(make_call(6, status=401, error="authentication_error", model_name=None, upstream_sent_at=None, first_byte_at=None, prompt_tokens=0, completion_tokens=0, cost_nanos=0))
        for call in calls:
            self.metrics.observe_call(call)
        s = self.scrape()
        chat = dict(route="/v1/chat/completions", model="chat")
        self.assertEqual(sample(s, "dheera_requests_total", status="200", **chat), 3)
        self.assertEqual(sample(s, "dheera_requests_total", status="500", **chat), 1)
        self.assertEqual(sample(s, "dheera_requests_total", status="502", **chat), 1)
        self.assertEqual(sample(s, "dheera_requests_total", route="/v1/embeddings", model="embed", status="200"), 1)
        self.assertEqual(sample(s, "dheera_requests_total", status="401", route="/v1/chat/completions", model="default"), 1)
        self.assertEqual(sample(s, "dheera_request_duration_seconds_count", **chat), 5)
        self.assertAlmostEqual(sample(s, "dheera_request_duration_seconds_sum", **chat), 7.5)
        self.assertEqual(sample(s, "dheera_time_to_first_byte_seconds_count", **chat), 4)
        self.assertAlmostEqual(sample(s, "dheera_time_to_first_byte_seconds_sum", **chat), 1.0)
        self.assertEqual(sample(s, "dheera_overhead_seconds_count", **chat), 5)
        self.assertEqual(sample(s, "dheera_overhead_seconds_bucket", le="0.005", **chat), 5)
        self.assertEqual(sample(s, "dheera_overhead_seconds_bucket", le="0.001", **chat), 0)
        self.assertEqual(sample(s, "dheera_prompt_tokens_total", model="chat"), 27)
        self.assertEqual(sample(s, "dheera_completion_tokens_total", model="chat"), 9)
        self.assertEqual(sample(s, "dheera_prompt_tokens_total", model="embed"), 5)
        self.assertAlmostEqual(sample(s, "dheera_spend_usd_total", model="chat"), 3 * 3.6e-6)
        self.assertEqual(sample(s, "dheera_upstream_errors_total", kind="upstream_unreachable"), 1)
        self.assertEqual(sample(s, "dheera_upstream_errors_total", kind="upstream_5xx"), 1)
        self.assertNotIn("authentication_error", self.metrics.render()[0].decode())

    def test_labels_bounded(self):
        """
        A model that is not configured is C{other}, an unknown route is
        C{other}; no key hash, alias, user, end user or client string is
        ever a label.
        """
        self.metrics.observe_call(make_call(1, model_name="gpt-4-from-client", path="/vllm/whatever/x"))
        self.metrics.observe_call(make_call(2, model_name=None, status=None))
        s = self.scrape()
        self.assertEqual(sample(s, "dheera_requests_total", route="other", model="other", status="200"), 1)
        self.assertEqual(sample(s, "dheera_requests_total", route="/v1/chat/completions", model="default", status="none"), 1)
        text = self.metrics.render()[0].decode()
        for value in ("gpt-4-from-client", "0123456789ab", "team-a-key", "enduser-7", "upstream-secret", "whatever"):
            self.assertNotIn(value, text)
        labels = {k for (_, ls) in s for k, _ in ls}
        self.assertTrue(labels <= {"route", "model", "status", "kind", "le", "deployment", "sink"}, labels)
        routes = {v for (_, ls) in s for k, v in ls if k == "route"}
        self.assertTrue(routes <= set(KNOWN_ROUTES) | {"other"}, routes)

    def test_in_flight(self):
        """
        The in-flight gauges follow the data plane's counters, read at
        scrape time.
        """
        counts = {"requests": 7, "streams": 4}
        self.metrics.read_in_flight(lambda: counts["requests"], lambda: counts["streams"])
        counts["requests"] = 9
        s = self.scrape()
        self.assertEqual((sample(s, "dheera_in_flight_requests"), sample(s, "dheera_in_flight_streams")), (9, 4))

    def test_queue_depth_shared_by_workers(self):
        """
        With several workers (C{PROMETHEUS_MULTIPROC_DIR} set),
        C{dheera_queue_depth} is a gauge every worker copies its queue into
        each second (L{ProxyMetrics.refresh}), summed over the live workers
        whichever worker answers the scrape; a queue that emptied reads 0.
        """
        directory = self.mktemp()
        os.makedirs(directory)
        self.patch(os, "environ", dict(os.environ, PROMETHEUS_MULTIPROC_DIR=directory))
        # What prometheus_client chooses at import in a worker, whose
        # parent set the directory before starting it.
        self.patch(values, "ValueClass", values.MultiProcessValue())
        metrics = ProxyMetrics(self.router, self.config)
        depths = {("chat", 0): 3, ("chat", 1): 2}
        metrics.read_queue(lambda: dict(depths))
        metrics.refresh()
        s = parse(metrics.render()[0].decode("utf-8"))
        self.assertEqual(sample(s, "dheera_queue_depth", model="chat", priority="0"), 3)
        self.assertEqual(sample(s, "dheera_queue_depth", model="chat", priority="1"), 2)
        del depths[("chat", 1)]
        metrics.refresh()
        s = parse(metrics.render()[0].decode("utf-8"))
        self.assertEqual(s[("dheera_queue_depth", frozenset({"model": "chat", "priority": "1"}.items()))], 0)
        # One family: the scrape-time reading is not added beside it.
        self.assertEqual(metrics.render()[0].count(b"# TYPE dheera_queue_depth gauge"), 1)

    def test_deployment_health_from_router(self):
        """
        Each deployment's health, cooldown and in-flight count are read from
        the router at scrape time, labelled by model name and deployment id.
        """
        first, second, embed = self.config.deployments
        s = self.scrape()
        self.assertEqual(sample(s, "dheera_deployment_healthy", model="chat", deployment="chat#0"), 1)
        self.assertEqual(sample(s, "dheera_deployment_healthy", model="embed", deployment="embed#2"), 1)
        self.router.failed(second)
        self.router.failed(second)
        self.router.started(first)
        s = self.scrape()
        self.assertEqual(sample(s, "dheera_deployment_healthy", model="chat", deployment="chat#1"), 0)
        self.assertEqual(sample(s, "dheera_deployment_cooling_down", model="chat", deployment="chat#1"), 1)
        self.assertEqual(sample(s, "dheera_deployment_cooling_down", model="chat", deployment="chat#0"), 0)
        self.assertEqual(sample(s, "dheera_deployment_in_flight", model="chat", deployment="chat#0"), 1)
        self.clock.advance(31)
        s = self.scrape()
        self.assertEqual(sample(s, "dheera_deployment_healthy", model="chat", deployment="chat#1"), 1)

    def test_saturation_and_sleep_per_deployment(self):
        """
        Flow control's saturation verdict and vLLM's sleep state are read
        from the router at scrape time, per deployment, 0 or 1.
        """
        first, second, embed = self.config.deployments
        busy = b"vllm:num_requests_running 8\nvllm:num_requests_waiting 6\n"
        self.router.record_metrics(first, busy, self.clock.seconds())
        asleep = b'vllm:num_requests_running 0\nvllm:num_requests_waiting 0\nvllm:engine_sleep_state{engine="0",model_name="q",sleep_state="awake"} 0\n'
        self.router.record_metrics(embed, asleep, self.clock.seconds())
        s = self.scrape()
        key = lambda name, model, deployment: (name, frozenset({"model": model, "deployment": deployment}.items()))  # noqa: E731
        self.assertEqual(s[key("dheera_deployment_saturated", "chat", "chat#0")], 1)
        self.assertEqual(s[key("dheera_deployment_saturated", "chat", "chat#1")], 0)
        self.assertEqual(s[key("dheera_deployment_asleep", "embed", "embed#2")], 1)
        self.assertEqual(s[key("dheera_deployment_asleep", "chat", "chat#0")], 0)

    def test_routing_signals_and_decisions(self):
        """
        A deployment's last scraped sample is exported with its age (none
        before the first scrape); routing decisions and cached tokens are
        counted by model and reason.
        """
        first = self.config.deployments[0]
        self.assertNotIn(("dheera_deployment_requests_running", frozenset({("model", "chat"), ("deployment", "chat#0")})),
                         self.scrape())
        body = (b'vllm:num_requests_running{engine="0"} 3\nvllm:num_requests_waiting{engine="0"} 2\n'
                b'vllm:kv_cache_usage_perc{engine="0"} 0.25\nvllm:prefix_cache_hits_total{engine="0"} 40\n')
        self.router.record_metrics(first, body, self.clock.seconds())
        self.clock.advance(1.5)
        for reason in ("affinity", "affinity", "spill"):
            self.metrics.observe_call(make_call(0, routing_reason=reason, cached_tokens=10))
        s = self.scrape()
        labels = {"model": "chat", "deployment": "chat#0"}
        self.assertEqual(sample(s, "dheera_deployment_requests_running", **labels), 3)
        self.assertEqual(sample(s, "dheera_deployment_requests_waiting", **labels), 2)
        self.assertEqual(sample(s, "dheera_deployment_kv_cache_usage", **labels), 0.25)
        self.assertEqual(sample(s, "dheera_deployment_prefix_cache_hits", **labels), 40)
        self.assertEqual(sample(s, "dheera_deployment_load_sample_age_seconds", **labels), 1.5)
        self.assertEqual(sample(s, "dheera_routing_decisions_total", model="chat", reason="affinity"), 2)
        self.assertEqual(sample(s, "dheera_routing_decisions_total", model="chat", reason="spill"), 1)
        self.assertEqual(sample(s, "dheera_cached_prompt_tokens_total", model="chat"), 30)

    def test_default_upstream(self):
        """
        The default upstream is reported as model C{default}.
        """
        config = two_model_config({"HOSTED_VLLM_API_BASE": "http://10.9.9.9:8000"})
        metrics = ProxyMetrics(Router(config, now=self.clock.seconds), config)
        s = parse(metrics.render()[0].decode())
        self.assertEqual(sample(s, "dheera_deployment_healthy", model="default", deployment="default"), 1)

    def test_sink_drops(self):
        """
        A L{CallLog} built with the metrics exports each sink's drop counter.
        """
        broken = io.StringIO()
        broken.close()
        calls = CallLog([JSONLogSink(stream=broken)], metrics=self.metrics)
        calls.emit(make_call(1))
        calls.emit(make_call(2))
        s = self.scrape()
        self.assertEqual(sample(s, "dheera_log_records_dropped_total", sink="json_log"), 2)
        self.assertEqual(sample(s, "dheera_requests_total", route="/v1/chat/completions", model="chat", status="200"), 2)

    def test_instances_independent(self):
        """
        Two instances keep separate registries: creating a second one does
        not collide, and each counts only its own calls.
        """
        other = ProxyMetrics()
        other.observe_call(make_call())
        self.metrics.observe_call(make_call())
        self.metrics.observe_call(make_call())
        key = ("dheera_requests_total", frozenset(dict(route="/v1/chat/completions", model="chat", status="200").items()))
        self.assertEqual(parse(other.render()[0].decode())[key], 1)
        self.assertEqual(self.scrape()[key], 2)


class MetricsRouteTests(TestCase):
    """
    C{GET /metrics} of L{ControlPlane} over a real loopback socket.
    """

    async def serve(self, **kwargs) -> str:
        """
        :return: the URL of a control plane built with C{kwargs}.
        """
        site = Site(ControlPlane(**kwargs).app.resource(), timeout=None)
        site.log = lambda request: None
        server = await LoopbackServer(site).start()
        self.addCleanup(server.stop)
        return server.url

    async def get(self, url: str, key: str = None):
        """
        :return: C{(status, content type, body)} of C{GET url}.
        """
        pool = HTTPConnectionPool(reactor, persistent=False)
        headers = Headers({b"authorization": [b"Bearer " + key.encode()]} if key else {})
        response = await Agent(reactor, pool=pool).request(b"GET", url.encode(), headers)
        body = await readBody(response)
        content_type = (response.headers.getRawHeaders(b"content-type") or [b""])[0].decode()
        return response.code, content_type, body

    async def test_metrics_open(self):
        """
        Without C{metrics_require_auth}, C{/metrics} answers the Prometheus
        text to anyone, and its counters match the calls observed.
        """
        metrics = ProxyMetrics()
        for n in range(4):
            metrics.observe_call(make_call(n))
        url = await self.serve(metrics=metrics)
        status, content_type, body = await self.get(url + "/metrics")
        self.assertEqual(status, 200)
        self.assertTrue(content_type.startswith("text/plain"))
        s = parse(body.decode())
        self.assertEqual(sample(s, "dheera_requests_total", route="/v1/chat/completions", model="chat", status="200"), 4)
        self.assertEqual(sample(s, "dheera_prompt_tokens_total", model="chat"), 36)

    async def test_metrics_require_auth(self):
        """
        With C{metrics_require_auth}, no key gets 401 and a virtual key 403
        (OpenAI error shape); the master key gets the metrics.
        """
        authenticator = Authenticator(MASTER_KEY, MemoryKeys())
        url = await self.serve(metrics=ProxyMetrics(), authenticator=authenticator, metrics_require_auth=True)
        status, content_type, body = await self.get(url + "/metrics")
        self.assertEqual((status, content_type), (401, "application/json"))
        self.assertEqual(set(json.loads(body)["error"]), {"message", "type", "param", "code"})
        status, _, body = await self.get(url + "/metrics", VIRTUAL_KEY)
        self.assertEqual(status, 403)
        self.assertEqual(json.loads(body)["error"]["type"], "permission_error")
        status, _, body = await self.get(url + "/metrics", MASTER_KEY)
        self.assertEqual(status, 200)
        self.assertIn(b"dheera_requests_total", body)

    async def test_metrics_disabled(self):
        """
        A control plane without metrics answers C{/metrics} with a 404 in
        the OpenAI shape; the other routes still work.
        """
        url = await self.serve()
        status, _, body = await self.get(url + "/metrics")
        self.assertEqual(status, 404)
        self.assertIn("error", json.loads(body))
        status, _, _ = await self.get(url + "/health/liveliness")
        self.assertEqual(status, 200)
