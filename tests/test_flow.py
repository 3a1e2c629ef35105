"""
The gateway queue (L{dheera_tx.routing.flow}) on a simulated clock: calls
wait while every replica is saturated, leave by priority and weighted fair
share, and are shed with 429/503 beyond the queue's bounds.
"""

import json

from twisted.internet.defer import CancelledError
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from dheera_tx.config import Deployment, config_from_dict
from dheera_tx.errors import ProxyError
from dheera_tx.forwarding import _Progress
from dheera_tx.routing.flow import GatewayQueue
from dheera_tx.routing.router import Route, Router
from dheera_tx.upstream_request import upstream_body


def _setup(replicas=1, cap=1, max_queue=10, max_queue_wait=30.0):
    config = config_from_dict({
        "model_list": [
            {"model_name": "m", "dheera_ai_params": {"model": "hosted_vllm/m", "api_base": f"http://127.0.0.1:{9000 + i}",
                                                       "max_parallel_requests": cap}}
            for i in range(replicas)
        ],
        "router_settings": {"max_queue": max_queue, "max_queue_wait": max_queue_wait},
    })
    clock = Clock()
    router = Router(config, now=clock.seconds)
    shed = []
    waits = []
    queue = GatewayQueue(clock, router, config.router.max_queue, config.router.max_queue_wait,
                         on_wait=lambda m, p, s: waits.append((m, p, s)), on_shed=lambda m, r: shed.append((m, r)))
    return clock, router, queue, router.route("m"), shed, waits


class FlowTests(SynchronousTestCase):
    """
    L{GatewayQueue.admit} and dispatch.
    """

    def later(self, d):
        """
        :return: C{d}, whose shedding at the test's end is expected.
        """
        return d.addErrback(lambda f: f.trap(ProxyError))

    def take(self, router, route, order, name):
        """
        A waiter's continuation: take the replica (as C{_forward} does) and
        note the call's name.
        """
        def go(_):
            router.started(route.replicas[0])
            order.append(name)
        return go

    def test_room_now_passes_without_waiting(self):
        """
        With a replica below its cap and nobody queued, admit returns
        L{None}: the call goes at once.
        """
        clock, router, queue, route, shed, _ = _setup()
        self.assertIsNone(queue.admit(route, "a"))
        self.assertEqual(queue.depths(), {})

    def test_waits_until_capacity_returns(self):
        """
        A call finding the only replica at C{max_parallel_requests} waits,
        and goes when the call in flight ends (C{Router.finished}); it
        records how long it waited.
        """
        clock, router, queue, route, shed, waits = _setup()
        router.started(route.replicas[0])
        d = queue.admit(route, "a")
        self.assertIsNotNone(d)
        self.assertNoResult(d)
        self.assertEqual(queue.depths(), {("m", 0): 1})
        clock.advance(2)
        router.finished(route.replicas[0])
        self.successResultOf(d)
        self.assertEqual(queue.depths(), {})
        self.assertEqual(waits, [("m", 0, 2.0)])

    def test_priority_order(self):
        """
        Queued calls leave by priority, lower first, whatever order they
        came in.
        """
        clock, router, queue, route, shed, _ = _setup()
        replica = route.replicas[0]
        router.started(replica)
        order: list = []
        for name, priority in (("low", 5), ("high", 0), ("mid", 2)):
            queue.admit(route, name, priority=priority).addCallback(self.take(router, route, order, name))
        for _ in range(3):
            router.finished(replica)
        self.assertEqual(order, ["high", "mid", "low"])

    def test_single_call_is_not_starved(self):
        """
        Key A has 1000 calls queued; key B's single call, queued after them
        at the same priority, leaves next.
        """
        clock, router, queue, route, shed, _ = _setup(max_queue=2000)
        replica = route.replicas[0]
        router.started(replica)
        order: list = []
        for i in range(1000):
            self.later(queue.admit(route, "A", cost=100).addCallback(self.take(router, route, order, "A%d" % i)))
        queue.admit(route, "B", cost=100).addCallback(self.take(router, route, order, "B"))
        router.finished(replica)
        router.finished(replica)
        self.assertEqual(order, ["A0", "B"])
        # Cleanup: the rest are shed at the deadline.
        clock.advance(31)
        self.assertEqual(queue.depths(), {})

    def test_weights_share_capacity(self):
        """
        Two keys with many calls queued at one priority: the key of weight 3
        gets 3 of every 4 places.
        """
        clock, router, queue, route, shed, _ = _setup(max_queue=200)
        replica = route.replicas[0]
        router.started(replica)
        order: list = []
        for _ in range(40):
            self.later(queue.admit(route, "heavy", weight=3.0, cost=10).addCallback(self.take(router, route, order, "heavy")))
            self.later(queue.admit(route, "light", weight=1.0, cost=10).addCallback(self.take(router, route, order, "light")))
        for _ in range(40):
            router.finished(replica)
        self.assertEqual(order.count("heavy"), 30)
        self.assertEqual(order.count("light"), 10)
        clock.advance(31)

    def test_tokens_served_move_the_tag(self):
        """
        Two keys queue calls estimated alike; key A's first call served ten
        times its estimate: A's next queued call goes after B's two.
        """
        clock, router, queue, route, shed, _ = _setup()
        replica = route.replicas[0]
        router.started(replica)
        order: list = []
        self.later(queue.admit(route, "A", cost=100).addCallback(self.take(router, route, order, "A1")))
        queue.served("m", "A", 0, 1.0, 100, 1000)
        self.later(queue.admit(route, "A", cost=100).addCallback(self.take(router, route, order, "A2")))
        for name in ("B1", "B2"):
            self.later(queue.admit(route, "B", cost=100).addCallback(self.take(router, route, order, name)))
        for _ in range(4):
            router.finished(replica)
        self.assertEqual(order, ["A1", "B1", "B2", "A2"])

    def test_queue_full_429(self):
        """
        Beyond C{max_queue} waiting calls, the next is refused at once with
        429, C{Retry-After}, code C{queue_full}.
        """
        clock, router, queue, route, shed, _ = _setup(max_queue=2)
        router.started(route.replicas[0])
        self.later(queue.admit(route, "a"))
        self.later(queue.admit(route, "a"))
        e = self.assertRaises(ProxyError, queue.admit, route, "a")
        self.assertEqual((e.status, e.code, e.type), (429, "queue_full", "rate_limit_error"))
        self.assertIn("Retry-After", e.headers)
        self.assertEqual(shed, [("m", "queue_full")])
        clock.advance(31)

    def test_full_queue_sheds_the_heaviest_key(self):
        """
        A full queue holding only key A's calls takes key B's call and sheds
        A's call that would leave last (429 C{queue_full}); B's next calls
        push out A's until the two hold places within one of each other,
        then B's call is refused itself.  The calls that stay leave in
        their fair order.
        """
        clock, router, queue, route, shed, _ = _setup(max_queue=4)
        router.started(route.replicas[0])
        a = [queue.admit(route, "a") for _ in range(4)]
        b1 = queue.admit(route, "b")
        self.assertEqual(self.failureResultOf(a[3], ProxyError).value.code, "queue_full")
        b2 = queue.admit(route, "b")
        self.assertEqual(self.failureResultOf(a[2], ProxyError).value.code, "queue_full")
        with self.assertRaises(ProxyError) as refused:
            queue.admit(route, "b")
        self.assertEqual(refused.exception.code, "queue_full")
        self.assertEqual(shed, [("m", "queue_full")] * 3)
        for d in (a[0], a[1], b1, b2):
            self.assertNoResult(d)
        order = []
        for name, d in (("a0", a[0]), ("a1", a[1]), ("b1", b1), ("b2", b2)):
            d.addCallback(lambda _, name=name: order.append(name))
        for _ in range(4):
            router.finished(route.replicas[0])
            router.started(route.replicas[0])
        self.assertEqual(order, ["a0", "b1", "a1", "b2"])

    def test_full_queue_takes_a_better_priority(self):
        """
        A full queue of priority-1 calls takes a priority-0 call, shedding
        the priority-1 call that would leave last; a priority-2 call finds
        no worse call to shed and is refused.
        """
        clock, router, queue, route, shed, _ = _setup(max_queue=2)
        router.started(route.replicas[0])
        batch = [queue.admit(route, "batch", priority=1) for _ in range(2)]
        urgent = queue.admit(route, "chat", priority=0)
        self.assertEqual(self.failureResultOf(batch[1], ProxyError).value.code, "queue_full")
        with self.assertRaises(ProxyError):
            queue.admit(route, "bulk", priority=2)
        self.assertNoResult(batch[0])
        router.finished(route.replicas[0])
        self.assertIsNone(self.successResultOf(urgent))
        self.later(batch[0])

    def test_wait_bounded_429(self):
        """
        A call waiting C{max_queue_wait} seconds is shed with 429 and
        C{Retry-After}, code C{queue_timeout}; its place is free.
        """
        clock, router, queue, route, shed, _ = _setup(max_queue_wait=5)
        router.started(route.replicas[0])
        d = queue.admit(route, "a")
        clock.advance(4.9)
        self.assertNoResult(d)
        clock.advance(0.2)
        e = self.failureResultOf(d, ProxyError).value
        self.assertEqual((e.status, e.code), (429, "queue_timeout"))
        self.assertEqual(e.headers["Retry-After"], str(queue.retry_after))
        self.assertEqual(queue.depths(), {})
        self.assertEqual(shed, [("m", "queue_timeout")])

    def test_no_healthy_replica_503(self):
        """
        When every replica of the model is cooling down, a shed call gets
        503 (C{no_healthy_replica}), not 429.
        """
        clock, router, queue, route, shed, _ = _setup(max_queue=0)
        router.started(route.replicas[0])
        router.set_health(route.replicas[0], False)
        e = self.assertRaises(ProxyError, queue.admit, route, "a")
        self.assertEqual((e.status, e.code), (503, "no_healthy_replica"))
        self.assertEqual(shed, [("m", "no_healthy_replica")])

    def test_cancel_frees_place(self):
        """
        A waiter cancelled (the client left) leaves the queue at once: its
        place is free for another call and it is never dispatched.
        """
        clock, router, queue, route, shed, _ = _setup(max_queue=1)
        router.started(route.replicas[0])
        d = queue.admit(route, "a")
        d.cancel()
        self.failureResultOf(d, CancelledError)
        self.assertEqual(queue.depths(), {})
        d2 = queue.admit(route, "b")
        router.finished(route.replicas[0])
        self.successResultOf(d2)

    def test_other_replica_with_room(self):
        """
        With two replicas, one at its cap, calls pass at once: only when
        every replica is saturated do they wait.
        """
        clock, router, queue, route, shed, _ = _setup(replicas=2)
        router.started(route.replicas[0])
        self.assertIsNone(queue.admit(route, "a"))
        router.started(route.replicas[1])
        d = queue.admit(route, "a")
        self.assertNoResult(d)
        router.finished(route.replicas[1])
        self.successResultOf(d)

    def test_shuffle_skips_saturated_replica(self):
        """
        Under C{simple-shuffle} (which weighs no load), a replica at its
        parallel cap is not chosen while another has room.
        """
        config = config_from_dict({
            "model_list": [{"model_name": "m", "dheera_ai_params": {"model": "hosted_vllm/m", "api_base": f"http://h{i}",
                                                                      "max_parallel_requests": 1}} for i in range(2)],
            "router_settings": {"routing_strategy": "simple-shuffle"},
        })
        clock = Clock()
        router = Router(config, now=clock.seconds, choice=lambda replicas: replicas[0])
        GatewayQueue(clock, router, 10, 30.0)
        route = router.route("m")
        router.started(route.replicas[0])
        self.assertEqual(router.pick(route), route.replicas[1])

    def test_sample_saturation(self):
        """
        A fresh sample with C{max_waiting} requests waiting saturates a
        replica without a parallel cap; the next sample with room
        dispatches the queued call.
        """
        config = config_from_dict({
            "model_list": [{"model_name": "m", "dheera_ai_params": {"model": "hosted_vllm/m", "api_base": f"http://h{i}"}}
                           for i in range(2)],
        })
        clock = Clock()
        router = Router(config, now=clock.seconds)
        queue = GatewayQueue(clock, router, 10, 30.0)
        route = router.route("m")
        busy = b"vllm:num_requests_running 8\nvllm:num_requests_waiting 4\n"
        for replica in route.replicas:
            router.record_metrics(replica, busy, clock.seconds())
        d = queue.admit(route, "a")
        self.assertNoResult(d)
        router.record_metrics(route.replicas[1], b"vllm:num_requests_running 8\nvllm:num_requests_waiting 0\n", clock.seconds())
        self.successResultOf(d)
        # A stale sample judges nothing: without a cap the replica has room.
        router.record_metrics(route.replicas[1], busy, clock.seconds())
        clock.advance(10)
        self.assertFalse(router.saturated(route.replicas[1]))

    def test_stale_sample_saturates_capped_deployment(self):
        """
        A deployment with C{max_parallel_requests} whose samples went stale
        (its scrapes stopped answering) counts as saturated, even with calls
        in flight under its cap: calls wait in the gateway queue, and the
        next fresh sample lets them go.  Before any sample, the cap alone
        decides.
        """
        clock, router, queue, route, shed, _ = _setup(replicas=1, cap=4)
        replica = route.replicas[0]
        self.assertFalse(router.saturated(replica))
        idle = b"vllm:num_requests_running 0\nvllm:num_requests_waiting 0\n"
        router.record_metrics(replica, idle, clock.seconds())
        self.assertFalse(router.saturated(replica))
        clock.advance(10)
        self.assertTrue(router.saturated(replica))
        d = queue.admit(route, "a")
        self.assertNoResult(d)
        router.record_metrics(replica, idle, clock.seconds())
        self.assertIsNone(self.successResultOf(d))


class PriorityFieldTests(SynchronousTestCase):
    """
    vLLM's C{priority} body field in L{upstream_body}: removed unless the
    deployment forwards priorities, then the key's.
    """

    def body(self, document, key_priority, forward):
        deployment = Deployment("m", "m", "http://h", forward_priority=forward, index=0)
        progress = _Progress()
        progress.document = document
        progress.priority = key_priority
        raw = json.dumps(document).encode()
        return raw, upstream_body(None, deployment, Route("m", (deployment,)), raw, progress)

    def test_virtual_key_priority_replaces_clients(self):
        """
        With C{forward_priority}, a virtual key's priority replaces the
        client's: a tenant cannot jump vLLM's queue.
        """
        _, sent = self.body({"model": "m", "priority": -50}, 7, True)
        self.assertEqual(json.loads(sent)["priority"], 7)

    def test_stripped_without_forward(self):
        """
        Without C{forward_priority}, the client's priority is removed.
        """
        _, sent = self.body({"model": "m", "priority": -50}, 7, False)
        self.assertNotIn("priority", json.loads(sent))

    def test_common_path_unchanged(self):
        """
        No C{priority} in the body and nothing to set (priority 0 is vLLM's
        default): the client's bytes go unchanged, not re-encoded.
        """
        raw, sent = self.body({"model": "m"}, 0, True)
        self.assertIs(sent, raw)
        raw, sent = self.body({"model": "m"}, None, False)
        self.assertIs(sent, raw)
