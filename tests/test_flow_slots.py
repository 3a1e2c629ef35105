"""
The gateway queue (L{dheera_tx.routing.flow}) claiming slots of capped
deployments across processes, on a simulated clock with an in-memory
claimer (L{tests.memory_slots}): the call keeps its place while refused,
claims go one at a time in queue order, a refused replica gives way to
another with room, a slot whose call left is given back, and shutdown sheds
what waits.
"""

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from dheera_tx.config import config_from_dict
from dheera_tx.errors import ProxyError
from dheera_tx.routing.flow import GatewayQueue, Slot
from dheera_tx.routing.router import Router
from tests.memory_slots import MemoryClaimer, SlotLedger


def _setup(caps=(1,), max_queue=10, max_queue_wait=30.0, uncapped_model=True):
    model_list = [
        {"model_name": "m", "dheera_ai_params": {"model": "hosted_vllm/m", "api_base": f"http://127.0.0.1:{9000 + i}",
                                                   "max_parallel_requests": cap}}
        for i, cap in enumerate(caps)
    ]
    if uncapped_model:
        model_list.append({"model_name": "free", "dheera_ai_params": {"model": "hosted_vllm/f",
                                                                        "api_base": "http://127.0.0.1:9100"}})
    config = config_from_dict({
        "model_list": model_list,
        "router_settings": {"max_queue": max_queue, "max_queue_wait": max_queue_wait,
                            "routing_strategy": "least-busy"},
    })
    clock = Clock()
    router = Router(config, now=clock.seconds, choice=lambda seq: seq[0])
    ledger = SlotLedger()
    claimer = MemoryClaimer(ledger)
    shed: list = []
    queue = GatewayQueue(clock, router, max_queue, max_queue_wait, poll_interval=0.2,
                         on_shed=lambda m, r: shed.append((m, r)), claimer=claimer)  # type: ignore[arg-type]
    return clock, router, queue, claimer, ledger, shed


class ClaimingQueueTests(SynchronousTestCase):
    """
    L{GatewayQueue} with a claimer.
    """

    def go(self, router, taken):
        """
        A waiter's continuation: take the replica its slot names, as
        C{_forward} does, and note it.
        """
        def went(slot):
            router.started(slot.deployment)
            taken.append(slot)
            return slot
        return went

    def test_fast_path_claims_uncapped_does_not(self):
        """
        A call to a capped model with room and nobody ahead claims a slot
        and leaves with it (no wait recorded); a call to a model without a
        cap goes at once without any claim.
        """
        clock, router, queue, claimer, ledger, _ = _setup()
        self.assertIsNone(queue.admit(router.route("free"), "k"))
        self.assertEqual(claimer.claims_sent, [])
        slot = self.successResultOf(queue.admit(router.route("m"), "k"))
        self.assertIsInstance(slot, Slot)
        self.assertEqual(slot.deployment, router.route("m").replicas[0])
        self.assertEqual(ledger.held(slot.deployment.id), 1)
        slot.release()
        slot.release()
        self.assertEqual(ledger.held(slot.deployment.id), 0)
        self.assertEqual(queue.depths(), {})

    def test_refused_call_keeps_its_place(self):
        """
        While another process holds the only slot, the call waits (in this
        process the replica has room); a better-priority call queued later
        still leaves first once the slot is back; claims are not retried
        before capacity may have returned (poll or a call's end).
        """
        clock, router, queue, claimer, ledger, _ = _setup()
        route = router.route("m")
        replica = route.replicas[0]
        ledger.slots[replica.id] = {"other": 1}
        taken: list = []
        low = queue.admit(route, "a", priority=5).addCallback(self.go(router, taken))
        self.assertNoResult(low)
        self.assertEqual(len(claimer.claims_sent), 1)
        high = queue.admit(route, "b", priority=0).addCallback(self.go(router, taken))
        self.assertEqual(len(claimer.claims_sent), 1)
        self.assertEqual(queue.depths(), {("m", 5): 1, ("m", 0): 1})
        del ledger.slots[replica.id]["other"]
        clock.advance(0.2)
        self.assertEqual([s.deployment for s in taken], [replica])
        self.successResultOf(high)
        self.assertNoResult(low)
        # The high-priority call's end gives its slot back: the other goes.
        taken[0].release()
        router.finished(replica)
        self.successResultOf(low)
        self.assertEqual(queue.depths(), {})

    def test_claims_one_at_a_time_in_order(self):
        """
        While a claim is on its way no other call of the model claims; the
        calls leave in queue order as their claims are granted.
        """
        clock, router, queue, claimer, ledger, _ = _setup(caps=(3,))
        claimer.hold = True
        route = router.route("m")
        taken: list = []
        calls = [queue.admit(route, "k%d" % i).addCallback(self.go(router, taken)) for i in range(3)]
        self.assertEqual(len(claimer.claims_sent), 1)
        for i in range(3):
            self.assertEqual(len(taken), i)
            claimer.answer()
            self.successResultOf(calls[i])
        self.assertEqual([rank[1] for _, rank in claimer.claims_sent], [0.0, 0.0, 0.0])
        self.assertEqual(len(claimer.claims_sent), 3)

    def test_refused_replica_gives_way_to_another(self):
        """
        With two capped replicas, a claim refused on one (its slot held
        elsewhere) is tried on the other, and the call goes there.
        """
        clock, router, queue, claimer, ledger, _ = _setup(caps=(1, 1))
        route = router.route("m")
        first, second = route.replicas
        ledger.slots[first.id] = {"other": 1}
        slot = self.successResultOf(queue.admit(route, "k"))
        self.assertEqual(slot.deployment, second)
        self.assertEqual([d for d, _ in claimer.claims_sent], [first.id, second.id])

    def test_yields_to_better_call_elsewhere(self):
        """
        A slot free in Redis is not taken while another live process's
        better-ranked call waits for the model.
        """
        clock, router, queue, claimer, ledger, _ = _setup()
        route = router.route("m")
        ledger.heads["m"] = {"other": (0, -1.0)}
        d = queue.admit(route, "k")
        self.assertNoResult(d)
        del ledger.heads["m"]["other"]
        clock.advance(0.2)
        self.assertIsInstance(self.successResultOf(d), Slot)

    def test_left_while_claiming_gives_slot_back(self):
        """
        A client that leaves (or a call that times out) while its claim is
        on its way frees its place; the slot granted afterwards is given
        back at once.
        """
        clock, router, queue, claimer, ledger, _ = _setup(max_queue_wait=1.0)
        claimer.hold = True
        route = router.route("m")
        replica = route.replicas[0]
        d = queue.admit(route, "k")
        d.cancel()
        self.failureResultOf(d)
        self.assertEqual(queue.depths(), {})
        claimer.answer()
        self.assertEqual(ledger.held(replica.id), 0)
        late = queue.admit(route, "k")
        clock.advance(1.0)
        self.failureResultOf(late).trap(ProxyError)
        claimer.answer()
        self.assertEqual(ledger.held(replica.id), 0)

    def test_max_queue_zero_sheds_refused(self):
        """
        With C{max_queue: 0}, a call whose claim is refused gets 429
        C{queue_full} at once (no call may wait).
        """
        clock, router, queue, claimer, ledger, shed = _setup(max_queue=0)
        route = router.route("m")
        ledger.slots[route.replicas[0].id] = {"other": 1}
        error = self.failureResultOf(queue.admit(route, "k")).value
        self.assertEqual((error.status, error.code), (429, "queue_full"))
        self.assertEqual(shed, [("m", "queue_full")])

    def test_close_sheds_waiting_calls(self):
        """
        L{GatewayQueue.close} sheds every queued call at once with 503
        C{service_unavailable} and C{Retry-After}; a call that would wait
        from then on is refused the same way, one with room still goes.
        """
        clock, router, queue, claimer, ledger, shed = _setup(uncapped_model=True)
        route = router.route("m")
        ledger.slots[route.replicas[0].id] = {"other": 1}
        waiting = [queue.admit(route, "k%d" % i) for i in range(3)]
        queue.close()
        for d in waiting:
            error = self.failureResultOf(d).value
            self.assertEqual((error.status, error.type, error.code), (503, "service_unavailable", "shutting_down"))
            self.assertIn("Retry-After", error.headers)
        self.assertEqual(queue.depths(), {})
        self.assertEqual(shed, [("m", "shutdown")] * 3)
        late = queue.admit(route, "late")
        self.assertEqual(self.failureResultOf(late).value.code, "shutting_down")
        self.assertEqual(queue.depths(), {})
        del ledger.slots[route.replicas[0].id]["other"]
        self.assertIsInstance(self.successResultOf(queue.admit(route, "room")), Slot)
        self.assertIsNone(queue.admit(router.route("free"), "k"))


class UnclaimedCloseTests(SynchronousTestCase):
    """
    L{GatewayQueue.close} without a claimer.
    """

    def test_close_sheds_without_claimer(self):
        """
        Calls waiting for a saturated replica (judged in this process) are
        shed with 503 at shutdown, not held until C{max_queue_wait}.
        """
        config = config_from_dict({"model_list": [{"model_name": "m", "dheera_ai_params": {
            "model": "hosted_vllm/m", "api_base": "http://127.0.0.1:9000", "max_parallel_requests": 1}}]})
        clock = Clock()
        router = Router(config, now=clock.seconds)
        queue = GatewayQueue(clock, router, 10, 30.0)
        route = router.route("m")
        router.started(route.replicas[0])
        d = queue.admit(route, "k")
        self.assertNoResult(d)
        queue.close()
        self.assertEqual(self.failureResultOf(d).value.status, 503)
        with self.assertRaises(ProxyError):
            queue.admit(route, "k")
