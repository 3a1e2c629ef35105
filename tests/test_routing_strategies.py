"""
Tests for L{dheera_tx.routing.strategies}, L{dheera_tx.routing.signals} and
L{dheera_tx.routing.shared_load}: reading vLLM's /metrics, staleness, load
estimates, saturation and each routing strategy's choice, on an injected
clock; in-flight counts shared through a real Redis.
"""

from twisted.internet import reactor
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase, TestCase

from dheera_tx.config import config_from_dict
from dheera_tx.routing.affinity import rendezvous_order
from dheera_tx.routing.homes import KeyHomes
from dheera_tx.routing.router import Router
from dheera_tx.routing.shared_load import SharedInFlight
from dheera_tx.routing.signals import LoadSample, MetricsUnreadable, Saturation, estimated_load, parse_metrics
from tests.redis_server import redis_for

# As vLLM 0.1x exports them (two engines, data parallel), with the lines
# around that a scraper must skip.
VLLM_METRICS = b"""# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="qwen"} 3.0
vllm:num_requests_running{engine="1",model_name="qwen"} 2.0
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{engine="0",model_name="qwen"} 1.0
vllm:num_requests_waiting{engine="1",model_name="qwen"} 0.0
vllm:kv_cache_usage_perc{engine="0",model_name="qwen"} 0.5
vllm:kv_cache_usage_perc{engine="1",model_name="qwen"} 0.7
vllm:prefix_cache_queries_total{engine="0",model_name="qwen"} 1000.0
vllm:prefix_cache_hits_total{engine="0",model_name="qwen"} 600.0
vllm:cache_config_info{block_size="16",cache_dtype="auto",enable_prefix_caching="True",engine="0",num_gpu_blocks="9000"} 1.0
vllm:lora_requests_info{max_lora="4",running_lora_adapters="a,b",waiting_lora_adapters=""} 1.7e+09
vllm:lora_requests_info{max_lora="4",running_lora_adapters="c",waiting_lora_adapters=""} 1.8e+09
vllm:time_to_first_token_seconds_bucket{engine="0",le="0.001",model_name="qwen"} 0.0
http_requests_total{handler="/metrics",method="GET",status="2xx"} 12.0
"""


def metrics(running=0, waiting=0, kv=0.0, old=False) -> bytes:
    kv_name = b"vllm:gpu_cache_usage_perc" if old else b"vllm:kv_cache_usage_perc"
    labels = b'{engine="0",model_name="q"}'
    return b"vllm:num_requests_running%s %d\nvllm:num_requests_waiting%s %d\n%s%s %f\n" % (
        labels, running, labels, waiting, kv_name, labels, kv)


class ParseTests(SynchronousTestCase):
    """
    Tests for L{parse_metrics}.
    """

    def test_vllm_metrics(self):
        """
        Requests are summed over engines, KV-cache use averaged; prefix
        cache counters, block size and the newest LoRA set are read; other
        metrics are skipped.
        """
        sample = parse_metrics(VLLM_METRICS, 5.0, in_flight=2)
        self.assertEqual((sample.running, sample.waiting), (5.0, 1.0))
        self.assertAlmostEqual(sample.kv_usage, 0.6)
        self.assertEqual((sample.prefix_queries, sample.prefix_hits), (1000.0, 600.0))
        self.assertEqual((sample.block_size, sample.running_loras), (16, "c"))
        self.assertEqual((sample.taken_at, sample.in_flight_at_sample), (5.0, 2))

    def test_old_names(self):
        """
        Old servers' C{vllm:gpu_cache_usage_perc} is read when the new name
        is absent.
        """
        self.assertAlmostEqual(parse_metrics(metrics(kv=0.25, old=True), 0).kv_usage, 0.25)

    def test_not_vllm(self):
        """
        An answer without vLLM's request gauges (HTML, another server's
        metrics, garbage) is refused.
        """
        for body in (b"<html>nope</html>", b"http_requests_total 3\n", b"\x00\xff" * 100, b""):
            self.assertRaises(MetricsUnreadable, parse_metrics, body, 0)

    def test_hostile_values(self):
        """
        NaN, infinities, negative and unparsable values and broken label
        sets never become a load: they are skipped or refused.
        """
        body = (b'vllm:num_requests_running{engine="0"} NaN\nvllm:num_requests_running{engine="1"} 2\n'
                b'vllm:num_requests_waiting{engine="0"} -5\nvllm:kv_cache_usage_perc{engine="0"} +Inf\n'
                b'vllm:num_requests_waiting{engine="1"} many\n')
        sample = parse_metrics(body, 0)
        self.assertEqual((sample.running, sample.waiting, sample.kv_usage), (2.0, 0.0, None))
        self.assertRaises(MetricsUnreadable, parse_metrics, b'vllm:num_requests_running{engine="0 3\n', 0)


class SignalTests(SynchronousTestCase):
    """
    Tests for L{estimated_load}, L{Saturation} and staleness in the router.
    """

    def setUp(self):
        self.clock = Clock()
        self.config = config_from_dict({
            "model_list": [{"model_name": "m", "dheera_ai_params": {"model": "hosted_vllm/q", "api_base": f"http://10.0.0.{i}:8000"}}
                           for i in range(4)],
            "router_settings": {"metrics_interval": 1},
        })
        self.router = Router(self.config, now=self.clock.seconds, choice=lambda xs: xs[0])
        self.replicas = self.config.replicas("m")

    def test_estimated_load(self):
        """
        A sample's running and waiting requests count, plus the calls this
        process started since less those that ended; never less than the
        calls in flight.
        """
        sample = LoadSample(taken_at=0, running=4, waiting=2, in_flight_at_sample=1)
        self.assertEqual(estimated_load(sample, 1), 6.0)
        self.assertEqual(estimated_load(sample, 3), 8.0)
        self.assertEqual(estimated_load(LoadSample(taken_at=0, running=0, waiting=0, in_flight_at_sample=5), 2), 2.0)
        self.assertEqual(estimated_load(None, 3), 3.0)

    def test_stale_sample_falls_back_to_in_flight(self):
        """
        A sample counts for 3 intervals; then the load is the calls in
        flight alone, and saturation by queue is no longer assumed.
        """
        busy = self.replicas[0]
        self.router.record_metrics(busy, metrics(running=8, waiting=6), self.clock.seconds())
        self.assertEqual(self.router.load(busy), 14.0)
        self.assertTrue(self.router.saturated(busy))
        self.clock.advance(3.0)
        self.assertEqual(self.router.load(busy), 14.0)
        self.clock.advance(0.1)
        self.assertEqual(self.router.load(busy), 0.0)
        self.assertFalse(self.router.saturated(busy))
        self.assertTrue(self.router.signals(busy)["load_sample"]["stale"])

    def test_unreadable_answer_is_a_failed_scrape(self):
        """
        An answer that is not vLLM's keeps the last sample and records a
        short reason, shown by C{signals}.
        """
        replica = self.replicas[0]
        self.router.record_metrics(replica, metrics(running=1), 0)
        self.router.record_metrics(replica, b"<html>", 0)
        shown = self.router.signals(replica)
        self.assertEqual(shown["load_sample"]["num_requests_running"], 1.0)
        self.assertIn("not a vLLM /metrics answer", shown["metrics_error"])
        self.router.scrape_failed(replica, "connection refused")
        self.assertEqual(self.router.signals(replica)["metrics_error"], "connection refused")

    def test_saturation(self):
        """
        Saturated: waiting at C{max_waiting}, KV use at C{max_kv_usage}, or
        in-flight at C{max_in_flight}; unset limits are not checked.
        """
        rule = Saturation(max_waiting=4, max_kv_usage=0.9, max_in_flight=10)
        self.assertFalse(rule.saturated(LoadSample(0, running=8, waiting=3, kv_usage=0.8), 9))
        self.assertTrue(rule.saturated(LoadSample(0, running=8, waiting=4, kv_usage=0.8), 0))
        self.assertTrue(rule.saturated(LoadSample(0, running=8, waiting=0, kv_usage=0.9), 0))
        self.assertTrue(rule.saturated(None, 10))
        self.assertFalse(Saturation(max_waiting=None).saturated(LoadSample(0, running=8, waiting=100), 0))


class StrategyTests(SynchronousTestCase):
    """
    Tests for the strategies, through L{Router.choose}.
    """

    def setUp(self):
        self.clock = Clock()

    def strategy(self, name: str, **router):
        config = config_from_dict({
            "model_list": [{"model_name": "m", "dheera_ai_params": {"model": "hosted_vllm/q", "api_base": f"http://10.0.0.{i}:8000"}}
                           for i in range(4)],
            "router_settings": dict(router, routing_strategy=name, metrics_interval=1),
        })
        self.router = Router(config, now=self.clock.seconds, choice=lambda xs: xs[0])
        self.replicas = config.replicas("m")
        return self.router.route("m")

    def ranked(self, key: int):
        return rendezvous_order(key, self.replicas, self.router.seeds())

    def test_cache_aware_affinity(self):
        """
        A new key goes to its first-ranked replica (reason C{affinity}) and
        keeps going there; different keys spread.
        """
        for key in (1, 2, 3, 99):
            route = self.strategy("cache-aware")
            for _ in range(3):
                self.assertEqual(self.router.choose(route, (), key), (self.ranked(key)[0], "affinity"))
        firsts = {self.router.choose(route, (), key)[0].id for key in range(200)}
        self.assertEqual(len(firsts), 4)

    def test_cache_aware_balances_keys(self):
        """
        16 new keys land 4 per replica (a key whose first replica holds its
        share goes to the next in its ranking, reason C{spill}), and each
        keeps its replica afterwards, with reason C{affinity}.
        """
        route = self.strategy("cache-aware")
        placed = {key: self.router.choose(route, (), key) for key in range(100, 116)}
        counts = {}
        for deployment, _ in placed.values():
            counts[deployment.id] = counts.get(deployment.id, 0) + 1
        self.assertEqual(sorted(counts.values()), [4, 4, 4, 4])
        for key, (deployment, reason) in placed.items():
            self.assertEqual(reason, "affinity" if deployment is self.ranked(key)[0] else "spill")
            self.assertEqual(self.router.choose(route, (), key), (deployment, "affinity"))

    def test_cache_aware_spills_over_the_bound(self):
        """
        When the key's replica is over the load bound, the call spills to
        the next in the key's ranking, and the key stays there while that
        replica has room; when it has none, the key goes back.
        """
        route = self.strategy("cache-aware")
        first, second = self.ranked(7)[:2]
        for _ in range(6):
            self.router.started(first)
        self.assertEqual(self.router.choose(route, (), 7), (second, "spill"))
        for _ in range(6):
            self.router.finished(first)
        self.assertEqual(self.router.choose(route, (), 7), (second, "affinity"))
        for _ in range(6):
            self.router.started(second)
        self.assertEqual(self.router.choose(route, (), 7), (first, "affinity"))
        self.assertEqual(self.router.homes.home(7), first.id)

    def test_cache_aware_spills_from_saturated(self):
        """
        A replica whose vLLM queue is at C{max_waiting} (from its metrics,
        traffic the proxy never sent) is left for the key's next replica.
        """
        route = self.strategy("cache-aware")
        first, second = self.ranked(11)[:2]
        for replica in self.replicas:
            self.router.record_metrics(replica, metrics(running=8, waiting=3), 0)
        self.assertEqual(self.router.choose(route, (), 11), (first, "affinity"))
        # Its load stays within the bound: the queue alone makes it spill.
        self.router.record_metrics(first, metrics(running=8, waiting=4), 0)
        self.assertEqual(self.router.choose(route, (), 11), (second, "spill"))

    def test_cache_aware_without_key_is_least_loaded(self):
        """
        A call with no affinity key goes to the least loaded replica
        (reason C{load}), counting load from metrics.
        """
        route = self.strategy("cache-aware")
        for i, replica in enumerate(self.replicas):
            self.router.record_metrics(replica, metrics(running=3 - i if i < 3 else 5), 0)
        self.assertEqual(self.router.choose(route, (), None), (self.replicas[2], "load"))

    def test_cache_aware_all_saturated_least_loaded(self):
        """
        When every replica is saturated, the least loaded still takes the
        call (flow control may queue it instead, later).
        """
        route = self.strategy("cache-aware")
        for i, replica in enumerate(self.replicas):
            self.router.record_metrics(replica, metrics(running=8, waiting=10 - i), 0)
        self.assertEqual(self.router.choose(route, (), 5), (self.replicas[3], "load"))

    def test_load_aware(self):
        """
        load-aware prefers the shortest vLLM queue, then the emptier KV
        cache, ignoring affinity.
        """
        route = self.strategy("load-aware")
        self.router.record_metrics(self.replicas[0], metrics(running=2, waiting=1, kv=0.1), 0)
        self.router.record_metrics(self.replicas[1], metrics(running=2, waiting=0, kv=0.9), 0)
        self.router.record_metrics(self.replicas[2], metrics(running=2, waiting=0, kv=0.2), 0)
        self.router.record_metrics(self.replicas[3], metrics(running=4, waiting=0, kv=0.0), 0)
        self.assertEqual(self.router.choose(route, (), 123), (self.replicas[2], "load"))

    def test_least_busy_and_shuffle(self):
        """
        least-busy counts only this process's calls in flight (metrics are
        ignored); simple-shuffle picks with the injected random choice.
        """
        route = self.strategy("least-busy")
        self.router.record_metrics(self.replicas[0], metrics(running=50, waiting=50), 0)
        self.router.started(self.replicas[1])
        self.assertEqual(self.router.choose(route, (), 1), (self.replicas[0], "least_busy"))
        route = self.strategy("simple-shuffle")
        self.router._choice = lambda xs: xs[-1]
        self.assertEqual(self.router.choose(route, (), 1), (self.replicas[3], "random"))

    def test_cooldown_and_exclusion_hold_for_every_strategy(self):
        """
        Every strategy skips replicas already tried and cooling down.
        """
        for name in ("cache-aware", "load-aware", "least-busy", "simple-shuffle"):
            route = self.strategy(name, allowed_fails=1)
            first = self.ranked(3)[0]
            self.router.failed(first)
            for _ in range(5):
                chosen, _ = self.router.choose(route, (self.replicas[1],), 3)
                self.assertNotIn(chosen, (first, self.replicas[1]), name)


class SharedInFlightTests(TestCase):
    """
    L{SharedInFlight} on a real redis-server: processes see each other's
    calls in flight, and a process that stops or dies drops out.
    """

    def setUp(self):
        self.server, self.redis = redis_for(self)
        self.now = [1_800_000_000.0]

    def process(self, counts: dict) -> SharedInFlight:
        return SharedInFlight(self.redis, "t:", 1.0, lambda: dict(counts), now=lambda: self.now[0], clock=reactor)

    async def test_processes_share_counts(self):
        """
        Each process reads the sum of the others' counts, not its own; one
        that stops is gone at once, one that dies is gone after 3 intervals
        (its hash expires and the others drop it).
        """
        a_counts, b_counts, c_counts = {"m#0": 2, "m#1": 0}, {"m#0": 3, "m#1": 1}, {"m#1": 4}
        a, b, c = self.process(a_counts), self.process(b_counts), self.process(c_counts)
        for p in (a, b, c, a, b):
            await p.sync()
        self.assertEqual((a.others("m#0"), a.others("m#1")), (3, 5))
        self.assertEqual((b.others("m#0"), b.others("m#1")), (2, 4))
        await b.stop()
        await a.sync()
        self.assertEqual((a.others("m#0"), a.others("m#1")), (0, 4))
        # c dies (stops syncing): 3 intervals later it no longer counts.
        self.now[0] += 3.5
        await a.sync()
        self.assertEqual(a.others("m#1"), 0)
        self.assertEqual(self.server.command("EXISTS", "t:routing:inflight:" + b.process_id), 0)

    async def test_placements_are_shared(self):
        """
        A key placed off its first replica by one process is learned by the
        others at their next sync; when two placed it apart, both keep the
        smaller process id's placement.
        """
        a_homes, b_homes = KeyHomes(reactor.seconds), KeyHomes(reactor.seconds)
        a = SharedInFlight(self.redis, "t:", 1.0, dict, now=lambda: self.now[0], clock=reactor, homes=a_homes)
        b = SharedInFlight(self.redis, "t:", 1.0, dict, now=lambda: self.now[0], clock=reactor, homes=b_homes)
        a.process_id, b.process_id = "aaaa", "bbbb"
        a_homes.place(0xABC, "m#2", share=True)
        a_homes.place(0xDEF, "m#0")  # a first choice: not shared
        await a.sync()
        await b.sync()
        self.assertEqual((b_homes.home(0xABC), b_homes.home(0xDEF)), ("m#2", None))
        a_homes.place(0x123, "m#1", share=True)
        b_homes.place(0x123, "m#3", share=True)
        self.now[0] += 0.5
        await a.sync()
        await b.sync()
        await a.sync()
        self.assertEqual((a_homes.home(0x123), b_homes.home(0x123)), ("m#1", "m#1"))

    async def test_router_counts_other_processes_without_a_sample(self):
        """
        Without a fresh sample the router's load and saturation count the
        other processes' calls in flight too.
        """
        config = config_from_dict({
            "model_list": [{"model_name": "m", "dheera_ai_params": {"model": "hosted_vllm/q", "api_base": f"http://10.0.0.{i}:8000"}}
                           for i in range(2)],
        })
        router = Router(config, now=reactor.seconds, saturation=Saturation(max_in_flight=5))
        first = config.replicas("m")[0]
        other = self.process({first.id: 4})
        await other.sync()
        router.shared = self.process({})
        router.started(first)
        await router.shared.sync()
        self.assertEqual(router.load(first), 5.0)
        self.assertTrue(router.saturated(first))
        self.assertEqual(router.in_flight(first), 1)


class KeyHomesTests(SynchronousTestCase):
    """
    Tests for L{KeyHomes}.
    """

    def test_window_and_capacity(self):
        """
        A key unseen for the window stops counting; beyond the capacity the
        least recently seen key goes; placing a key again moves it.
        """
        clock = Clock()
        homes = KeyHomes(clock.seconds, window=10, capacity=3)
        homes.place(1, "a")
        clock.advance(6)
        homes.place(2, "a")
        homes.place(3, "b")
        self.assertEqual((homes.count("a"), homes.count("b")), (2, 1))
        clock.advance(5)
        self.assertIsNone(homes.home(1))
        self.assertEqual((homes.count("a"), len(homes)), (1, 2))
        homes.place(3, "a")
        homes.place(4, "c")
        homes.place(5, "c")
        self.assertIsNone(homes.home(2))
        self.assertEqual((homes.count("a"), homes.count("b"), homes.count("c")), (1, 0, 2))
        self.assertEqual(homes.outbox, [])
        homes.place(6, "b", share=True)
        homes.place(6, "b", share=True)
        self.assertEqual(homes.outbox, [(6, "b")])
