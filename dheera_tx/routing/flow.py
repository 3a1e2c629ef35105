"""
Flow control: calls wait in the gateway while every replica of their model
is saturated, and leave by priority and fair share.

A replica is saturated (L{dheera_tx.routing.router.Router.saturated}) while
its calls in flight reach its C{max_parallel_requests}, or a fresh sample of
its C{/metrics} shows C{router_settings.max_waiting} requests waiting or
C{max_kv_usage} of its KV cache in use.  When a call finds every replica of
its model saturated, L{GatewayQueue.admit} makes it wait here instead of
sending it; the queue is dispatched whenever capacity may have returned (a
call ended, a sample arrived, and on a short timer while calls wait, for
the counts other processes share through Redis).

Each model has its own queue, bounded by C{max_queue} calls, and a call
waits at most C{max_queue_wait} seconds: beyond either it is shed with 429
and C{Retry-After} (503 when no replica of the model is healthy), and
nothing reaches vLLM.  A client that leaves while queued frees its place at
once.  A full queue sheds the call that would leave last in favour of a
newcomer of a better priority, or of the same priority whose key holds at
least two places fewer than the heaviest key (L{GatewayQueue._push_out}):
a flooding key fills the queue with its own calls and then sheds them, not
another key's.

A sleeping replica (L{dheera_tx.routing.sleep}) has no room: when every
replica of a model sleeps, its calls wait here until one wakes (the proxy's
own C{/wake_up}, or a sample showing it awake).  A call shed then gets 503
C{replicas_asleep}, not 429: the model is unavailable, not busy, and it is
no fault of the caller's rate.  The sleep operations themselves
(C{/sleep}, C{/wake_up}, C{/is_sleeping}) never wait: a C{/wake_up} is what
makes room.

Queued calls leave by their key's C{priority} (lower first); within a
priority level, keys share capacity by weighted fair queuing: a call's
finish tag is C{max(V, the key's last tag) + cost / weight}, where the cost
is its estimated tokens (prompt and output) and C{V} the level's virtual
time (the start tag of the last call dispatched); the lowest tag leaves
first.  When a queued call ends, the tokens it served replace its estimate
in its key's tag (L{GatewayQueue.served}).  So a key with a thousand queued calls holds tags far ahead, and
another key's single call leaves next.

Deployments with a C{max_parallel_requests}, when the proxy has Redis, hold
their cap across every worker and proxy: a call to one of them takes a slot
in Redis first (L{dheera_tx.routing.slots.SlotClaimer}).  The claim is
asynchronous and L{GatewayQueue.dispatch} is not, so every call of a model
with such a replica goes through its queue, even when a replica has room:
the head of the queue (the fast path's call is the head of an empty queue)
claims a slot on a replica with room by this process's own count, one claim
at a time per model, and leaves with it (a L{Slot}, handed to the
forwarding) when it is granted.  A refused claim tries the model's other
replicas with room; when all refuse, the call keeps its place and the
queue claims again when capacity may have returned (a call ended, a sample
arrived, the poll timer), not before.  Other models, and models whose
replicas have no cap, pay nothing for this.

L{GatewayQueue.close} (the proxy's graceful shutdown) sheds every queued
call at once with 503, and any call that would wait from then on.
"""

import math
from typing import TYPE_CHECKING, Callable, Dict, List, Optional, Sequence, Tuple

from twisted.internet.defer import Deferred
from twisted.logger import Logger

from dheera_tx.config import Deployment
from dheera_tx.errors import ProxyError
from dheera_tx.routing.fair_queue import Level, ModelQueue, Slot, Waiter
from dheera_tx.routing.router import Route, Router

if TYPE_CHECKING:
    from dheera_tx.routing.slots import Rank, SlotClaimer

log = Logger()

#: Why a call was shed (the C{reason} label of C{dheera_queue_shed_total}).
SHED_REASONS = ("queue_full", "queue_timeout", "no_healthy_replica", "replicas_asleep", "shutdown")


class GatewayQueue:
    """
    The gateway queues of every model served by this process.

    :param reactor: timers and the clock (a C{task.Clock} in tests).
    :param router: says which replicas are saturated or cooling down; its
        C{on_capacity} hook is set to L{dispatch}.
    :param max_queue: calls that may wait per model (0: none wait).
    :param max_queue_wait: seconds a call may wait.
    :param poll_interval: seconds between dispatch attempts while calls
        wait (other processes' calls ending are only seen this way).
    :param on_wait: called with C{(model_name, priority, seconds)} when a
        queued call leaves for an upstream.
    :param on_shed: called with C{(model_name, reason)} for each shed call.
    :param claimer: takes slots of capped deployments across processes
        (a L{dheera_tx.routing.slots.SlotClaimer}); L{None}: each process
        judges the caps alone.
    """

    def __init__(self, reactor, router: Router, max_queue: int, max_queue_wait: float, poll_interval: float = 0.2,
                 on_wait: Optional[Callable[[Optional[str], int, float], None]] = None,
                 on_shed: Optional[Callable[[Optional[str], str], None]] = None,
                 claimer: "Optional[SlotClaimer]" = None):
        self._reactor = reactor
        self._router = router
        self.max_queue = max_queue
        self.max_queue_wait = max_queue_wait
        self._poll_interval = poll_interval
        self._on_wait = on_wait
        self._on_shed = on_shed
        self._claimer = claimer
        self._queues: Dict[Optional[str], ModelQueue] = {}
        self._seq = 0
        self._waiting = 0
        self._poll = None
        self._dispatching = False
        self._again = False
        self._closed = False
        self.retry_after = max(1, int(math.ceil(min(max_queue_wait, 30.0) / 10.0)))
        router.on_capacity = self.dispatch

    def claims(self, deployment: Deployment) -> bool:
        """
        :return: whether a call to C{deployment} needs a slot claimed
            through the queue (it is capped and the cap is shared).
        """
        return self._claimer is not None and self._claimer.claims(deployment)

    def _claimed_route(self, route: Route) -> bool:
        return self._claimer is not None and any(self._claimer.claims(d) for d in route.replicas)

    def admit(self, route: Route, key: str, priority: int = 0, weight: float = 1.0, cost: float = 1.0,
              affinity: Optional[int] = None, exclude: Sequence[Deployment] = ()) -> Optional[Deferred]:
        """
        Let a call through now, or make it wait.

        :param key: whose call it is (fair share is per key).
        :param priority: lower leaves first.
        :param weight: the key's share within its priority level (> 0).
        :param cost: the call's estimated tokens, prompt and output.
        :param affinity: the call's affinity key (which replica it prefers).
        :param exclude: replicas the call must not go to (already tried).
        :return: L{None} when a replica has room now, nobody waits before
            the call and no slot needs claiming; else a Deferred that fires
            when the call may go (with a L{Slot} when the queue chose its
            replica, else L{None}), fails with L{ProxyError} 429/503 when it
            is shed, and whose C{cancel()} (the client left) frees its place.
        :raise ProxyError: 429 (or 503) at once when the queue is full, or
            503 when the proxy is shutting down and the call would wait.
        """
        if route.operation is not None:
            return None
        queue = self._queues.get(route.model_name)
        empty = queue is None or not queue.size
        claimed = self._claimer is not None and self._claimed_route(route)
        if empty and not claimed and self._has_room(route):
            return None
        if queue is None:
            queue = self._queues[route.model_name] = ModelQueue(route)
        # A capped model's call that finds nobody ahead only claims a slot:
        # it does not count against max_queue unless refused.
        fast = empty and claimed
        if self._closed and not fast:
            raise self._shed(route, "shutdown")
        if not fast and queue.size >= self.max_queue and not self._push_out(queue, key, priority):
            raise self._shed(route, "queue_full")
        waiter = Waiter(route, key, priority, self._reactor.seconds())
        waiter.affinity = affinity
        waiter.exclude = exclude
        waiter.fast = fast
        self._seq += 1
        waiter.seq = self._seq
        level = queue.levels.get(priority)
        if level is None:
            level = queue.levels[priority] = Level()
        level.push(waiter, max(1.0, cost), weight if weight > 0 else 1.0)
        waiter.queued = True
        queue.size += 1
        self._waiting += 1
        waiter.deferred = Deferred(lambda d: self._remove(waiter))
        waiter.timer = self._reactor.callLater(self.max_queue_wait, self._expire, waiter)
        self._arm_poll()
        # Capacity may be there already (a call queued behind others).
        self._run()
        return waiter.deferred

    def served(self, model_name: Optional[str], key: str, priority: int, weight: float, estimate: float,
               tokens: int) -> None:
        """
        A queued call ended having served C{tokens} (prompt and output)
        against the C{estimate} it was queued with: the difference moves the
        key's finish tag for the calls it queues next, so that shares follow
        tokens served.  Nothing is kept for a key with no calls queued.
        """
        queue = self._queues.get(model_name)
        level = queue.levels.get(priority) if queue is not None else None
        if level is None or key not in level.last_finish:
            return
        level.last_finish[key] += (tokens - max(1.0, estimate)) / (weight if weight > 0 else 1.0)

    def depths(self) -> Dict[Tuple[Optional[str], int], int]:
        """
        :return: calls waiting, by C{(model_name, priority)}.
        """
        return {
            (name, priority): len(level.heap)
            for name, queue in self._queues.items() for priority, level in queue.levels.items()
        }

    def close(self) -> None:
        """
        The proxy is shutting down: every queued call is shed at once with
        503 (and so is any call that would wait from now on), instead of
        being held until C{max_queue_wait} or the drain's grace period.
        """
        self._closed = True
        for queue in list(self._queues.values()):
            for level in list(queue.levels.values()):
                for _, _, waiter in list(level.heap):
                    if self._take_out(queue, waiter):
                        assert waiter.deferred is not None
                        waiter.deferred.errback(self._shed(waiter.route, "shutdown"))

    def dispatch(self) -> None:
        """
        Capacity may have returned (a call ended, a sample arrived, the
        poll timer): let queued calls go while their model has a replica
        with room, the lowest priority level first, the lowest finish tag
        within it; models whose claims were all refused claim again.
        """
        for queue in self._queues.values():
            queue.blocked = False
        self._run()

    def _run(self) -> None:
        if self._dispatching:
            self._again = True
            return
        if not self._waiting:
            return
        self._dispatching = True
        try:
            again = True
            while again:
                self._again = False
                for queue in list(self._queues.values()):
                    if self._claimer is not None and self._claimed_route(queue.route):
                        self._claim_for(queue)
                        continue
                    while queue.size and self._has_room(queue.route):
                        self._leave(queue, queue.head(), None)
                again = self._again
        finally:
            self._dispatching = False

    def _leave(self, queue: ModelQueue, waiter: Waiter, slot: Optional[Slot]) -> None:
        """
        C{waiter} goes (to C{slot}'s replica, or where the router sends it):
        each call takes its replica (C{Router.started}) as it resumes,
        before the next is considered.
        """
        level = queue.levels[waiter.priority]
        if level.heap[0][2] is waiter:
            level.pop()
        else:
            level.remove(waiter)
            level.virtual = max(level.virtual, waiter.start)
        if not level.heap:
            del queue.levels[waiter.priority]
        self._gone(queue, waiter)
        if self._on_wait is not None and not waiter.fast:
            self._on_wait(queue.route.model_name, waiter.priority, self._reactor.seconds() - waiter.queued_at)
        assert waiter.deferred is not None
        waiter.deferred.callback(slot)

    # -- slots claimed across processes -------------------------------------------

    def _claim_for(self, queue: ModelQueue) -> None:
        """
        Claim slots for the head of a capped model's queue, one claim at a
        time, while replicas have room by this process's count.
        """
        while queue.size and queue.claiming is None and not queue.blocked:
            waiter = queue.head()
            free = self._free_replicas(queue.route, waiter)
            if not free:
                break
            self._claim(queue, waiter, free)
            if queue.claiming is not None:
                return
        self._publish(queue)

    def _claim(self, queue: ModelQueue, waiter: Waiter, free: List[Deployment]) -> None:
        assert self._claimer is not None
        route = queue.route
        chosen = self._router.choose(route, [d for d in route.replicas if d not in free], waiter.affinity)
        assert chosen is not None
        deployment, reason = chosen
        if not self._claimer.claims(deployment):
            self._leave(queue, waiter, Slot(deployment, reason, None))
            return
        queue.claiming = waiter
        d = self._claimer.claim(deployment, route.model_name, (waiter.priority, waiter.queued_at),
                                self._next_rank(queue, waiter))
        d.addCallback(self._claimed, queue, waiter, deployment, reason)
        d.addErrback(lambda f: log.failure("Slot claim failed", f))

    def _claimed(self, granted: bool, queue: ModelQueue, waiter: Waiter, deployment: Deployment, reason: str) -> None:
        queue.claiming = None
        assert self._claimer is not None
        if not waiter.queued:
            # Left while its claim was on its way (client gone, timed out).
            if granted:
                self._claimer.release(deployment)
        elif granted:
            self._leave(queue, waiter, Slot(deployment, reason, self._claimer))
        else:
            waiter.fast = False
            waiter.refused.append(deployment)
            # A fast call arrived at an empty queue, so once refused it is
            # over the bound only when nothing may wait (max_queue 0).
            if self._closed or self.max_queue == 0:
                self._take_out(queue, waiter)
                assert waiter.deferred is not None
                waiter.deferred.errback(self._shed(queue.route, "shutdown" if self._closed else "queue_full"))
            elif not self._free_replicas(queue.route, waiter):
                # Every replica with room refused: this call keeps its place
                # until capacity may have returned.
                waiter.refused = []
                queue.blocked = True
        self._publish(queue)
        self._run()

    def _free_replicas(self, route: Route, waiter: Waiter) -> List[Deployment]:
        """
        :return: the replicas C{waiter} may claim a slot of now: awake,
            not cooling down (unless all are), not saturated by this process's
            own count for capped ones, neither excluded nor refused.
        """
        router = self._router
        candidates = [d for d in route.replicas
                      if d not in waiter.exclude and d not in waiter.refused and not router.asleep(d)]
        healthy = [d for d in candidates if not router.cooling_down(d)]
        pool = healthy or candidates
        return [d for d in pool if not router.saturated(d, everywhere=not self.claims(d))]

    def _next_rank(self, queue: ModelQueue, waiter: Waiter) -> "Optional[Rank]":
        """
        :return: the rank of the call that heads the queue once C{waiter}
            (its head) has gone, or L{None}.
        """
        best: Optional[Tuple[float, int, Waiter]] = None
        for priority in sorted(queue.levels):
            heap = queue.levels[priority].heap
            for entry in heap[:3]:
                if entry[2] is not waiter and (best is None or entry[:2] < best[:2]):
                    best = entry
            if best is not None:
                return best[2].priority, best[2].queued_at
        return None

    def _publish(self, queue: ModelQueue) -> None:
        """
        Tell the other processes the rank of this model's best waiting
        call (nothing is sent when it did not change).
        """
        if self._claimer is None or queue.claiming is not None or not self._claimed_route(queue.route):
            return
        rank = None
        if queue.size:
            head = queue.head()
            rank = (head.priority, head.queued_at)
        self._claimer.set_head(queue.route.model_name, rank)

    # -- room, shedding, leaving ----------------------------------------------

    def _has_room(self, route: Route) -> bool:
        router = self._router
        anyone_healthy = False
        for deployment in route.replicas:
            if router.cooling_down(deployment) or router.asleep(deployment):
                continue
            anyone_healthy = True
            if not router.saturated(deployment):
                return True
        if anyone_healthy:
            return False
        # Every awake replica cooling down: the router tries one anyway.
        for deployment in route.replicas:
            if not router.asleep(deployment) and not router.saturated(deployment):
                return True
        return False

    def _healthy(self, route: Route) -> bool:
        return any(not self._router.cooling_down(d) for d in route.replicas)

    def _shed(self, route: Route, reason: str) -> ProxyError:
        if reason != "shutdown" and not self._healthy(route):
            reason = "no_healthy_replica"
        elif reason != "shutdown" and all(self._router.asleep(d) for d in route.replicas if not self._router.cooling_down(d)):
            reason = "replicas_asleep"
        if self._on_shed is not None:
            self._on_shed(route.model_name, reason)
        headers = {"Retry-After": str(self.retry_after)}
        if reason == "shutdown":
            return ProxyError(503, "The proxy is shutting down and this call had not started; try again.",
                              type="service_unavailable", code="shutting_down", headers=headers)
        if reason == "no_healthy_replica":
            return ProxyError(503, "No replica of this model is healthy; try again later.", type="service_unavailable",
                              code="no_healthy_replica", headers=headers)
        if reason == "replicas_asleep":
            return ProxyError(503, "Every replica of this model is asleep; try again later.", type="service_unavailable",
                              code="replicas_asleep", headers=headers)
        why = "too many calls are waiting" if reason == "queue_full" else "the call waited too long"
        return ProxyError(429, f"Every replica of this model is busy and {why}; try again later.",
                          type="rate_limit_error", code=reason, headers=headers)

    def _push_out(self, queue: ModelQueue, key: str, priority: int) -> bool:
        """
        The queue is full and a call of C{key} at C{priority} arrives: make
        room by shedding the queued call that would leave last, when it is
        of a worse priority, or of the same priority and of a key holding
        at least two more places than C{key} (the heaviest key's).  So a
        flooding key sheds its own calls rather than a light key's, and a
        full queue of batch calls still takes an interactive one.

        :return: whether a place was freed (the victim got 429
            C{queue_full}).
        """
        worst = max(queue.levels, default=None)
        if worst is None or worst < priority:
            return False
        level = queue.levels[worst]
        if worst == priority:
            if not level.queued:
                return False
            heaviest = max(level.queued, key=level.queued.__getitem__)
            if level.queued[heaviest] < level.queued.get(key, 0) + 2:
                return False
            candidates = [entry for entry in level.heap if entry[2].key == heaviest]
        else:
            candidates = level.heap
        victims = [entry for entry in candidates if not entry[2].fast and entry[2] is not queue.claiming]
        if not victims:
            return False
        victim = max(victims)[2]
        if not self._take_out(queue, victim):
            return False
        assert victim.deferred is not None
        victim.deferred.errback(self._shed(victim.route, "queue_full"))
        return True

    def _expire(self, waiter: Waiter) -> None:
        waiter.timer = None
        queue = self._queues.get(waiter.route.model_name)
        if queue is None or not self._take_out(queue, waiter):
            return
        assert waiter.deferred is not None
        waiter.deferred.errback(self._shed(waiter.route, "queue_timeout"))

    def _remove(self, waiter: Waiter) -> None:
        """The client left: its place is freed at once."""
        queue = self._queues.get(waiter.route.model_name)
        if queue is not None:
            self._take_out(queue, waiter)

    def _take_out(self, queue: ModelQueue, waiter: Waiter) -> bool:
        level = queue.levels.get(waiter.priority)
        if level is None or not waiter.queued:
            return False
        level.remove(waiter)
        if not level.heap:
            del queue.levels[waiter.priority]
        self._gone(queue, waiter)
        if queue.claiming is None:
            self._publish(queue)
        return True

    def _gone(self, queue: ModelQueue, waiter: Waiter) -> None:
        waiter.queued = False
        queue.size -= 1
        if not queue.size:
            queue.blocked = False
        self._waiting -= 1
        if not self._waiting and self._poll is not None and self._poll.active():
            self._poll.cancel()
            self._poll = None
        if waiter.timer is not None and waiter.timer.active():
            waiter.timer.cancel()
        waiter.timer = None

    def _arm_poll(self) -> None:
        if self._poll is None or not self._poll.active():
            self._poll = self._reactor.callLater(self._poll_interval, self._polled)

    def _polled(self) -> None:
        self._poll = None
        self.dispatch()
        if self._waiting:
            self._arm_poll()
