"""
Tests for LoRA- and sleep-aware routing on an injected clock: reading
C{vllm:lora_requests_info} and C{vllm:engine_sleep_state} as vLLM exports
them (L{dheera_tx.routing.signals}), the sleep rules
(L{dheera_tx.routing.sleep}), the adapter tiers
(L{dheera_tx.routing.adapters}) through L{Router.choose}, and the gateway
queue holding calls while every replica sleeps (L{dheera_tx.routing.flow}).
"""

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from dheera_tx.config import config_from_dict
from dheera_tx.errors import ProxyError
from dheera_tx.routing.flow import GatewayQueue
from dheera_tx.routing.router import Router
from dheera_tx.routing.signals import parse_metrics
from dheera_tx.routing.sleep import IS_SLEEPING, PARTIAL_WAKE_UP, SLEEP, WAKE_UP, sleep_operation

# As vLLM 0.32 (vllm/v1/metrics/loggers.py) exports them: the LoRA gauge's
# value is the time its label set was last seen, and every set ever seen
# stays; the newest ("b,c" running, "d" waiting) is neither the first nor
# the last line.  The sleep gauge has one series per state and engine.
LORA_METRICS = b"""# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="base"} 3.0
vllm:num_requests_waiting{engine="0",model_name="base"} 1.0
# HELP vllm:lora_requests_info Running stats on lora requests.
# TYPE vllm:lora_requests_info gauge
vllm:lora_requests_info{max_lora="4",running_lora_adapters="",waiting_lora_adapters=""} 1.7652e+09
vllm:lora_requests_info{max_lora="4",running_lora_adapters="b,c",waiting_lora_adapters="d"} 1.7653000012e+09
vllm:lora_requests_info{max_lora="4",running_lora_adapters="a,b,c,e",waiting_lora_adapters=""} 1.7653000011e+09
vllm:lora_requests_info{max_lora="4",running_lora_adapters="a",waiting_lora_adapters="b"} 1.765299e+09
# HELP vllm:engine_sleep_state Engine sleep state; awake = 0 means engine is sleeping.
# TYPE vllm:engine_sleep_state gauge
vllm:engine_sleep_state{engine="0",model_name="base",sleep_state="awake"} 1.0
vllm:engine_sleep_state{engine="0",model_name="base",sleep_state="weights_offloaded"} 0.0
vllm:engine_sleep_state{engine="0",model_name="base",sleep_state="discard_all"} 0.0
"""


def metrics(running=(), waiting=(), max_lora=4, awake=None, queue=0) -> bytes:
    """
    :return: a vLLM-shaped C{/metrics} answer with one LoRA set (after an
        older, empty one) and, unless C{awake} is L{None}, the sleep gauge.
    """
    lines = [
        'vllm:num_requests_running{engine="0",model_name="base"} %d' % len(running),
        'vllm:num_requests_waiting{engine="0",model_name="base"} %d' % queue,
        'vllm:lora_requests_info{max_lora="%d",running_lora_adapters="",waiting_lora_adapters=""} 1.0' % max_lora,
        'vllm:lora_requests_info{max_lora="%d",running_lora_adapters="%s",waiting_lora_adapters="%s"} 2.0'
        % (max_lora, ",".join(running), ",".join(waiting)),
    ]
    if awake is not None:
        lines.append('vllm:engine_sleep_state{engine="0",model_name="base",sleep_state="awake"} %d' % awake)
        lines.append('vllm:engine_sleep_state{engine="0",model_name="base",sleep_state="weights_offloaded"} %d'
                     % (1 - awake))
    return ("\n".join(lines) + "\n").encode()


def fleet(replicas=3, **router) -> dict:
    """
    :return: a config of model C{base} on C{replicas} replicas, each serving
        the adapters C{a} to C{e}.
    """
    return config_from_dict({
        "model_list": [{"model_name": "base", "dheera_ai_params": {
            "model": "hosted_vllm/base", "api_base": f"http://10.0.0.{i}:8000", "lora_adapters": list("abcde")}}
            for i in range(replicas)],
        "router_settings": dict({"metrics_interval": 1, "routing_strategy": "least-busy"}, **router),
    })


class ParseTests(SynchronousTestCase):
    """
    L{parse_metrics} on vLLM's LoRA and sleep gauges.
    """

    def test_newest_lora_series_wins(self):
        """
        The LoRA state is the label set with the largest value (the newest),
        wherever it sits among the stale ones: running C{b,c}, waiting
        C{d}, C{max_lora} 4.
        """
        sample = parse_metrics(LORA_METRICS, 5.0)
        self.assertEqual(sample.running_adapters, frozenset("bc"))
        self.assertEqual(sample.adapters, frozenset("bcd"))
        self.assertEqual((sample.running_loras, sample.waiting_loras, sample.max_lora), ("b,c", "d", 4))
        self.assertIs(sample.asleep, False)
        shown = sample.shown(5.0)
        self.assertEqual((shown["waiting_lora_adapters"], shown["max_lora"], shown["asleep"]), ("d", 4, False))

    def test_sleep_state(self):
        """
        C{awake} 0 means asleep; a server that does not export the gauge
        (older vLLM) says nothing (L{None}); with two engines, asleep only
        when neither is awake.
        """
        self.assertIs(parse_metrics(metrics(awake=0), 0).asleep, True)
        self.assertIs(parse_metrics(metrics(awake=1), 0).asleep, False)
        self.assertIsNone(parse_metrics(metrics(), 0).asleep)
        two = metrics(awake=0) + b'vllm:engine_sleep_state{engine="1",model_name="base",sleep_state="awake"} 1.0\n'
        self.assertIs(parse_metrics(two, 0).asleep, False)

    def test_no_lora(self):
        """
        Without the LoRA gauge (LoRA off) no adapters and no slots are
        read.
        """
        sample = parse_metrics(b'vllm:num_requests_running 0\nvllm:num_requests_waiting 0\n', 0)
        self.assertEqual((sample.adapters, sample.max_lora, sample.running_loras), (frozenset(), None, None))


class SleepOperationTests(SynchronousTestCase):
    """
    L{sleep_operation}.
    """

    def test_operations(self):
        """
        C{POST /sleep}, C{POST /wake_up} (partial when it names C{tags}),
        C{/is_sleeping}; anything else is no operation.
        """
        self.assertEqual(sleep_operation(b"POST", b"/sleep", b"?level=1"), SLEEP)
        self.assertEqual(sleep_operation(b"POST", b"/wake_up", b""), WAKE_UP)
        self.assertEqual(sleep_operation(b"POST", b"/wake_up", b"?model=m"), WAKE_UP)
        self.assertEqual(sleep_operation(b"POST", b"/wake_up", b"?tags=weights"), PARTIAL_WAKE_UP)
        self.assertEqual(sleep_operation(b"GET", b"/is_sleeping", b""), IS_SLEEPING)
        self.assertIsNone(sleep_operation(b"GET", b"/sleep", b""))
        self.assertIsNone(sleep_operation(b"POST", b"/v1/chat/completions", b""))


class SleepRouterTests(SynchronousTestCase):
    """
    Sleeping replicas in L{Router}.
    """

    def setUp(self):
        self.clock = Clock()
        self.clock.advance(100)
        self.config = fleet(2)
        self.router = Router(self.config, now=self.clock.seconds, choice=lambda xs: xs[0])
        self.one, self.two = self.config.replicas("base")

    def choose(self, operation=None):
        return self.router.choose(self.router.route("base", operation))[0]

    def test_sleeping_replica_gets_no_calls(self):
        """
        A replica whose fresh sample shows it asleep is not chosen; once the
        sample is stale (3 intervals) it judges nothing and the replica is
        chosen again.
        """
        self.router.record_metrics(self.one, metrics(awake=0), self.clock.seconds())
        self.router.record_metrics(self.two, metrics(awake=1), self.clock.seconds())
        self.assertTrue(self.router.asleep(self.one))
        self.assertEqual(self.choose(), self.two)
        self.router.started(self.two)
        self.assertEqual(self.choose(), self.two)
        self.assertTrue(self.router.signals(self.one)["asleep"])
        self.clock.advance(3.1)
        self.assertFalse(self.router.asleep(self.one))
        self.assertEqual(self.choose(), self.one)

    def test_own_sleep_and_wake_up(self):
        """
        The proxy's own successful C{/sleep} marks a replica asleep at once,
        over a fresh sample saying awake, and holds past the sample's
        staleness; C{/wake_up} marks it awake at once; a failed call changes
        nothing.
        """
        self.router.record_metrics(self.one, metrics(awake=1), self.clock.seconds())
        self.router.operated(self.one, SLEEP, 500)
        self.assertFalse(self.router.asleep(self.one))
        self.router.operated(self.one, SLEEP, 200)
        self.assertTrue(self.router.asleep(self.one))
        self.assertEqual(self.router.signals(self.one)["sleep_mark"], {"asleep": True, "age_s": 0.0})
        self.assertEqual(self.choose(), self.two)
        self.clock.advance(30)
        self.assertTrue(self.router.asleep(self.one))
        self.router.operated(self.one, WAKE_UP, 200)
        self.assertFalse(self.router.asleep(self.one))

    def test_newer_sample_replaces_the_mark(self):
        """
        A sample requested after the mark (taken more than an interval
        later) that reports the sleep state replaces it: vLLM woken behind
        the proxy's back is used again.  A sample taken within the interval
        (maybe requested before the call) or not exporting the gauge does
        not.
        """
        self.router.operated(self.one, SLEEP, 200)
        self.router.record_metrics(self.one, metrics(awake=1), self.clock.seconds() + 0.5)
        self.assertTrue(self.router.asleep(self.one))
        self.clock.advance(2)
        self.router.record_metrics(self.one, metrics(), self.clock.seconds())
        self.assertTrue(self.router.asleep(self.one))
        self.router.record_metrics(self.one, metrics(awake=1), self.clock.seconds())
        self.assertFalse(self.router.asleep(self.one))
        self.assertNotIn("sleep_mark", self.router.signals(self.one))

    def test_partial_wake_up_stays_asleep(self):
        """
        A C{/wake_up?tags=...} leaves the replica asleep until a sample
        shows it fully awake.
        """
        self.router.operated(self.one, SLEEP, 200)
        self.router.operated(self.one, PARTIAL_WAKE_UP, 200)
        self.assertTrue(self.router.asleep(self.one))
        self.clock.advance(1.5)
        self.router.record_metrics(self.one, metrics(awake=1), self.clock.seconds())
        self.assertFalse(self.router.asleep(self.one))

    def test_operations_routed_by_sleep(self):
        """
        C{/wake_up} goes to a sleeping replica, C{/sleep} to an awake one,
        even where the strategy would pick the other.
        """
        self.router.operated(self.two, SLEEP, 200)
        self.assertEqual(self.choose(WAKE_UP), self.two)
        self.assertEqual(self.choose(PARTIAL_WAKE_UP), self.two)
        self.assertEqual(self.choose(SLEEP), self.one)
        self.assertEqual(self.choose(), self.one)

    def test_all_asleep_falls_back(self):
        """
        With every replica asleep, L{Router.choose} still names one (the
        gateway queue, not the router, holds calls back).
        """
        self.router.operated(self.one, SLEEP, 200)
        self.router.operated(self.two, SLEEP, 200)
        self.assertIn(self.choose(), (self.one, self.two))


class AdapterRouterTests(SynchronousTestCase):
    """
    The LoRA adapter tiers through L{Router.choose}.
    """

    def setUp(self):
        self.clock = Clock()
        self.clock.advance(100)

    def start(self, **router):
        self.config = fleet(3, **router)
        self.router = Router(self.config, now=self.clock.seconds, choice=lambda xs: xs[0])
        self.replicas = self.config.replicas("base")

    def sample(self, index, **fields):
        self.router.record_metrics(self.replicas[index], metrics(**fields), self.clock.seconds())

    def choose(self, model):
        return self.replicas.index(self.router.choose(self.router.route(model))[0])

    def test_running_then_free_slot_then_rest(self):
        """
        An adapter's call goes where it runs (or waits), else to a replica
        with a free slot (adapters running, waiting or just sent there
        under C{max_lora}), else anywhere; the base model's calls are not
        steered.
        """
        self.start()
        self.sample(0, running="wxyz")
        self.sample(1, running="abyz", waiting="")
        self.sample(2, running="wx", waiting="c")
        self.assertEqual(self.choose("a"), 1)
        self.assertEqual(self.choose("c"), 2)
        self.assertEqual(self.choose("d"), 2)
        self.clock.advance(5)
        self.sample(0, running="wxyz")
        self.sample(1, running="vwxy")
        self.sample(2, running="stuv")
        self.assertEqual(self.choose("e"), 0)
        self.assertEqual(self.choose("base"), 0)

    def test_calls_sent_between_samples_count(self):
        """
        A call this process sent with an adapter marks its replica as
        holding it (and its slot as taken) until the samples catch up: the
        next call for it follows, another adapter does not take that slot.
        """
        self.start()
        self.sample(0, running="wxy")
        self.sample(1, running="wxy")
        self.sample(2, running="wxyz")
        first = self.choose("a")
        self.assertEqual(first, 0)
        self.router.started(self.replicas[0])
        self.assertEqual(self.choose("a"), 0)
        self.assertEqual(self.choose("b"), 1)
        self.clock.advance(3.5)
        self.sample(0, running="wxy")
        self.sample(1, running="wxy")
        self.sample(2, running="wxyz")
        self.router.finished(self.replicas[0])
        self.assertEqual(self.choose("b"), 0)

    def test_saturation_wins(self):
        """
        A saturated replica is passed over even where the adapter runs: the
        call goes to one with a free slot.
        """
        self.start()
        self.sample(0, running="a", queue=4)
        self.sample(1, running="wxyz")
        self.sample(2, running="w")
        self.assertEqual(self.choose("a"), 2)

    def test_turned_off(self):
        """
        C{adapter_aware_routing: false} routes adapters like any model.
        """
        self.start(adapter_aware_routing=False)
        self.sample(0, running="wxyz")
        self.sample(1, running="wxyz")
        self.sample(2, running="a")
        self.assertEqual(self.choose("a"), 0)

    def test_sleeping_replica_skipped_for_adapters(self):
        """
        A sleeping replica gets no adapter call even where the adapter was
        running.
        """
        self.start()
        self.sample(0, running="a", awake=0)
        self.sample(1, running="wxyz", awake=1)
        self.sample(2, running="wxyz", awake=1)
        self.assertEqual(self.choose("a"), 1)


class SleepQueueTests(SynchronousTestCase):
    """
    The gateway queue while every replica of a model sleeps.
    """

    def setUp(self):
        self.clock = Clock()
        self.config = fleet(2)
        self.router = Router(self.config, now=self.clock.seconds, choice=lambda xs: xs[0])
        self.queue = GatewayQueue(self.clock, self.router, max_queue=2, max_queue_wait=10)
        self.one, self.two = self.config.replicas("base")
        self.router.operated(self.one, SLEEP, 200)
        self.router.operated(self.two, SLEEP, 200)

    def test_waits_until_woken(self):
        """
        Calls wait while every replica sleeps and leave when the proxy wakes
        one; the sleep operations themselves never wait.
        """
        self.assertIsNone(self.queue.admit(self.router.route("base", WAKE_UP), "k"))
        waiting = self.queue.admit(self.router.route("base"), "k")
        self.assertIsNotNone(waiting)
        self.assertFalse(waiting.called)
        self.clock.advance(5)
        self.assertFalse(waiting.called)
        self.router.operated(self.two, WAKE_UP, 200)
        self.assertTrue(waiting.called)

    def test_woken_by_a_sample(self):
        """
        A sample showing a replica awake (vLLM woken directly) lets queued
        calls go.
        """
        waiting = self.queue.admit(self.router.route("base"), "k")
        self.clock.advance(1.5)
        self.router.record_metrics(self.one, metrics(awake=1), self.clock.seconds())
        self.assertTrue(waiting.called)

    def test_shed_503_when_asleep(self):
        """
        A call shed while every replica sleeps gets 503 C{replicas_asleep}
        with C{Retry-After}, after C{max_queue_wait} or at once when the
        queue is full.
        """
        first = self.queue.admit(self.router.route("base"), "k")
        failures = []
        first.addErrback(failures.append)
        self.queue.admit(self.router.route("base"), "k").addErrback(lambda f: f.trap(ProxyError))
        error = self.assertRaises(ProxyError, self.queue.admit, self.router.route("base"), "k")
        self.assertEqual((error.status, error.code), (503, "replicas_asleep"))
        self.clock.advance(10)
        error = failures[0].value
        self.assertEqual((error.status, error.code), (503, "replicas_asleep"))
        self.assertIn("Retry-After", error.headers)
