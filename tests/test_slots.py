"""
L{dheera_tx.routing.slots.SlotClaimer} on a real redis-server: the cap
holds across processes, a dead process's slots and waiting ranks drop out,
the globally best waiting call gets the slot, and an unreachable Redis
neither stops nor hangs calls.
"""

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import TestCase

from dheera_tx.config import config_from_dict
from dheera_tx.routing.slots import DEAD_AFTER, SlotClaimer
from tests.redis_server import redis_for


def _deployments():
    config = config_from_dict({
        "model_list": [
            {"model_name": "m", "dheera_ai_params": {"model": "hosted_vllm/m", "api_base": "http://127.0.0.1:9000",
                                                       "max_parallel_requests": 1}},
            {"model_name": "m", "dheera_ai_params": {"model": "hosted_vllm/m", "api_base": "http://127.0.0.1:9001"}},
        ],
    })
    return config.replicas("m")


class SlotClaimerTests(TestCase):
    """
    Two or three claimers (processes) sharing one Redis, on an injected
    epoch clock.
    """

    def setUp(self):
        self.server, self.redis = redis_for(self)
        self.now = [1_800_000_000.0]
        self.capped, self.uncapped = _deployments()

    def claimer(self, name: str, redis=None) -> SlotClaimer:
        claimer = SlotClaimer(redis or self.redis, "t:", name, 1.0, 700.0, lambda: self.now[0], reactor)
        claimer.know([self.capped])
        return claimer

    def slots(self) -> dict:
        return self.server.command("HGETALL", "t:routing:slots:" + self.capped.id) or []

    async def test_cap_holds_across_processes(self):
        """
        With a cap of 1, one process's slot refuses the other's claim; once
        given back, the other's claim is granted.  Only capped deployments
        need claims.
        """
        a, b = self.claimer("a"), self.claimer("b")
        self.assertTrue(a.claims(self.capped))
        self.assertFalse(a.claims(self.uncapped))
        self.assertTrue(await a.claim(self.capped, "m", (0, 1.0), None))
        self.assertFalse(await b.claim(self.capped, "m", (0, 2.0), None))
        self.assertEqual(self.slots(), ["a", "1"])
        a.release(self.capped)
        await a.released()
        self.assertTrue(await b.claim(self.capped, "m", (0, 2.0), None))
        self.assertEqual(self.slots(), ["b", "1"])
        self.assertEqual((a.held, b.held), ({}, {self.capped.id: 1}))

    async def test_dead_process_slots_drop_out(self):
        """
        A process that stops heartbeating (killed) holds its slot and its
        waiting rank for at most L{DEAD_AFTER} intervals: then another
        process's claim is granted and the dead one's entries are deleted.
        """
        a, b = self.claimer("a"), self.claimer("b")
        await a.heartbeat()
        self.assertTrue(await a.claim(self.capped, "m", (0, 1.0), (0, 1.5)))
        self.now[0] += DEAD_AFTER - 0.5
        self.assertFalse(await b.claim(self.capped, "m", (0, 2.0), None))
        self.now[0] += 1.0
        self.assertTrue(await b.claim(self.capped, "m", (0, 2.0), None))
        self.assertEqual(self.slots(), ["b", "1"])
        self.assertEqual(self.server.command("HGET", "t:routing:waiting:m", "a"), None)

    async def test_best_waiting_call_gets_the_slot(self):
        """
        A claim for a call ranked behind another live process's best
        waiting call is refused even with room; that process's claim is
        granted.  A lower priority number wins over an earlier queued time.
        """
        a, b = self.claimer("a"), self.claimer("b")
        self.assertTrue(await a.claim(self.capped, "m", (0, 1.0), None))
        # b's call waits (refused: full), and so does a's next call.
        self.assertFalse(await b.claim(self.capped, "m", (1, 2.0), None))
        self.assertFalse(await a.claim(self.capped, "m", (0, 3.0), None))
        a.release(self.capped)
        await a.released()
        # Room now, but a's call (priority 0) waits: b's (priority 1) yields.
        self.assertFalse(await b.claim(self.capped, "m", (1, 2.0), None))
        self.assertEqual(self.slots(), [])
        self.assertTrue(await a.claim(self.capped, "m", (0, 3.0), None))
        # a has nothing waiting any more: b's next claim is judged on the cap.
        a.release(self.capped)
        await a.released()
        self.assertTrue(await b.claim(self.capped, "m", (1, 2.0), None))

    async def test_published_head_and_its_staleness(self):
        """
        A rank published with L{SlotClaimer.set_head} makes another
        process's later call yield; one not refreshed for L{DEAD_AFTER}
        intervals (a lost write) no longer does; L{None} withdraws it.
        """
        a, b = self.claimer("a"), self.claimer("b")
        await a.heartbeat()
        a.set_head("m", (0, 1.0))
        while self.server.command("HGET", "t:routing:waiting:m", "a") is None:
            await _turn()
        self.assertFalse(await b.claim(self.capped, "m", (0, 2.0), None))
        a.set_head("m", None)
        while self.server.command("HGET", "t:routing:waiting:m", "a") is not None:
            await _turn()
        self.assertTrue(await b.claim(self.capped, "m", (0, 2.0), None))
        b.release(self.capped)
        await b.released()
        a.set_head("m", (0, 1.0))
        while self.server.command("HGET", "t:routing:waiting:m", "a") is None:
            await _turn()
        self.now[0] += DEAD_AFTER + 1
        await a.heartbeat(beat=False)  # still live, but its rank is old
        self.assertTrue(await b.claim(self.capped, "m", (0, 2.0), None))

    async def test_stop_takes_the_process_out(self):
        """
        A process that stops (graceful shutdown) leaves no slot, rank or
        liveness entry behind.
        """
        a = self.claimer("a")
        await a.heartbeat()
        self.assertFalse(not await a.claim(self.capped, "m", (0, 1.0), (0, 2.0)))
        await a.stop()
        self.assertEqual(self.slots(), [])
        self.assertIsNone(self.server.command("HGET", "t:routing:waiting:m", "a"))
        self.assertIsNone(self.server.command("ZSCORE", "t:routing:claimers", "a"))

    async def test_redis_down_decides_here_then_writes_counts_back(self):
        """
        With Redis unreachable a claim is granted by this process alone
        (after at most the client's bound), a warning is logged once, and
        later claims do not touch Redis; when it answers again, the
        heartbeat writes the true counts back (a slot given back during the
        outage is gone from Redis) and the cap is shared again.
        """
        logged = []
        observer = logged.append
        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)
        a, b = self.claimer("a"), self.claimer("b")
        self.assertTrue(await a.claim(self.capped, "m", (0, 1.0), None))
        self.server.stop()
        started = reactor.seconds()
        self.assertTrue(await b.claim(self.capped, "m", (0, 2.0), None))
        self.assertLess(reactor.seconds() - started, 5.0)
        self.assertTrue(b.down)
        self.assertTrue(await b.claim(self.capped, "m", (0, 3.0), None))
        a.release(self.capped)  # lost: Redis is away
        await a.heartbeat()
        self.assertTrue(a.down)
        warnings = [e for e in logged if "judged by this process alone" in str(e.get("log_format", ""))]
        self.assertEqual(len(warnings), 2)  # once per process
        self.server.start()
        b.release(self.capped)
        for claimer in (a, b):
            while claimer.down:
                await claimer.heartbeat()
        # a holds nothing, b one of its two: Redis says so.
        self.assertEqual(self.slots(), ["b", "1"])
        self.assertFalse(await a.claim(self.capped, "m", (0, 4.0), None))


def _turn() -> Deferred:
    d: Deferred = Deferred()
    reactor.callLater(0.01, d.callback, None)
    return d
