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
once.

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
"""

import heapq
import math
from typing import Callable, Dict, List, Optional, Tuple

from twisted.internet.defer import Deferred

from dheera_tx.errors import ProxyError
from dheera_tx.routing.router import Route, Router

#: Why a call was shed (the C{reason} label of C{dheera_queue_shed_total}).
SHED_REASONS = ("queue_full", "queue_timeout", "no_healthy_replica", "replicas_asleep")


class _Waiter:
    __slots__ = ("route", "key", "priority", "start", "finish", "seq", "deferred", "timer", "queued_at")

    def __init__(self, route: Route, key: str, priority: int, queued_at: float):
        self.route = route
        self.key = key
        self.priority = priority
        self.queued_at = queued_at
        self.start = 0.0
        self.finish = 0.0
        self.seq = 0
        self.deferred: Optional[Deferred] = None
        self.timer = None


class _Level:
    """One priority level of one model's queue."""

    __slots__ = ("heap", "virtual", "last_finish", "queued")

    def __init__(self) -> None:
        self.heap: List[Tuple[float, int, _Waiter]] = []
        self.virtual = 0.0
        # Only keys with calls queued here: nothing is kept for idle keys.
        self.last_finish: Dict[str, float] = {}
        self.queued: Dict[str, int] = {}

    def push(self, waiter: _Waiter, cost: float, weight: float) -> None:
        start = max(self.virtual, self.last_finish.get(waiter.key, self.virtual))
        waiter.start = start
        waiter.finish = self.last_finish[waiter.key] = start + cost / weight
        self.queued[waiter.key] = self.queued.get(waiter.key, 0) + 1
        heapq.heappush(self.heap, (waiter.finish, waiter.seq, waiter))

    def pop(self) -> _Waiter:
        waiter = heapq.heappop(self.heap)[2]
        self.virtual = max(self.virtual, waiter.start)
        self._left(waiter.key)
        return waiter

    def remove(self, waiter: _Waiter) -> None:
        for i, entry in enumerate(self.heap):
            if entry[2] is waiter:
                self.heap[i] = self.heap[-1]
                self.heap.pop()
                heapq.heapify(self.heap)
                self._left(waiter.key)
                return

    def _left(self, key: str) -> None:
        count = self.queued[key] - 1
        if count:
            self.queued[key] = count
        else:
            del self.queued[key]
            del self.last_finish[key]


class _ModelQueue:
    __slots__ = ("route", "levels", "size")

    def __init__(self, route: Route):
        self.route = route
        self.levels: Dict[int, _Level] = {}
        self.size = 0


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
    """

    def __init__(self, reactor, router: Router, max_queue: int, max_queue_wait: float, poll_interval: float = 0.2,
                 on_wait: Optional[Callable[[Optional[str], int, float], None]] = None,
                 on_shed: Optional[Callable[[Optional[str], str], None]] = None):
        self._reactor = reactor
        self._router = router
        self.max_queue = max_queue
        self.max_queue_wait = max_queue_wait
        self._poll_interval = poll_interval
        self._on_wait = on_wait
        self._on_shed = on_shed
        self._queues: Dict[Optional[str], _ModelQueue] = {}
        self._seq = 0
        self._waiting = 0
        self._poll = None
        self._dispatching = False
        self._again = False
        self.retry_after = max(1, int(math.ceil(min(max_queue_wait, 30.0) / 10.0)))
        router.on_capacity = self.dispatch

    def admit(self, route: Route, key: str, priority: int = 0, weight: float = 1.0, cost: float = 1.0) -> Optional[Deferred]:
        """
        Let a call through now, or make it wait.

        :param key: whose call it is (fair share is per key).
        :param priority: lower leaves first.
        :param weight: the key's share within its priority level (> 0).
        :param cost: the call's estimated tokens, prompt and output.
        :return: L{None} when a replica has room now and nobody waits
            before the call; else a Deferred that fires (with L{None}) when
            the call may go, fails with L{ProxyError} 429/503 when it is
            shed, and whose C{cancel()} (the client left) frees its place.
        :raise ProxyError: 429 (or 503) at once when the queue is full.
        """
        if route.operation is not None:
            return None
        queue = self._queues.get(route.model_name)
        if (queue is None or not queue.size) and self._has_room(route):
            return None
        if queue is None:
            queue = self._queues[route.model_name] = _ModelQueue(route)
        if queue.size >= self.max_queue:
            raise self._shed(route, "queue_full")
        waiter = _Waiter(route, key, priority, self._reactor.seconds())
        self._seq += 1
        waiter.seq = self._seq
        level = queue.levels.get(priority)
        if level is None:
            level = queue.levels[priority] = _Level()
        level.push(waiter, max(1.0, cost), weight if weight > 0 else 1.0)
        queue.size += 1
        self._waiting += 1
        waiter.deferred = Deferred(lambda d: self._remove(waiter))
        waiter.timer = self._reactor.callLater(self.max_queue_wait, self._expire, waiter)
        self._arm_poll()
        # Capacity may be there already (a call queued behind others).
        self.dispatch()
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

    def dispatch(self) -> None:
        """
        Let queued calls go while their model has a replica with room:
        the lowest priority level first, the lowest finish tag within it.
        Each call takes its replica (C{Router.started}) as it resumes, before
        the next is considered.
        """
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
                    while queue.size and self._has_room(queue.route):
                        priority = min(queue.levels)
                        level = queue.levels[priority]
                        waiter = level.pop()
                        if not level.heap:
                            del queue.levels[priority]
                        self._gone(queue, waiter)
                        if self._on_wait is not None:
                            self._on_wait(queue.route.model_name, priority, self._reactor.seconds() - waiter.queued_at)
                        assert waiter.deferred is not None
                        waiter.deferred.callback(None)
                again = self._again
        finally:
            self._dispatching = False

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
        if not self._healthy(route):
            reason = "no_healthy_replica"
        elif all(self._router.asleep(d) for d in route.replicas if not self._router.cooling_down(d)):
            reason = "replicas_asleep"
        if self._on_shed is not None:
            self._on_shed(route.model_name, reason)
        if reason == "no_healthy_replica":
            return ProxyError(503, "No replica of this model is healthy; try again later.", type="service_unavailable",
                              code="no_healthy_replica", headers={"Retry-After": str(self.retry_after)})
        if reason == "replicas_asleep":
            return ProxyError(503, "Every replica of this model is asleep; try again later.", type="service_unavailable",
                              code="replicas_asleep", headers={"Retry-After": str(self.retry_after)})
        why = "too many calls are waiting" if reason == "queue_full" else "the call waited too long"
        return ProxyError(429, f"Every replica of this model is busy and {why}; try again later.",
                          type="rate_limit_error", code=reason, headers={"Retry-After": str(self.retry_after)})

    def _expire(self, waiter: _Waiter) -> None:
        waiter.timer = None
        queue = self._queues.get(waiter.route.model_name)
        if queue is None or not self._take_out(queue, waiter):
            return
        assert waiter.deferred is not None
        waiter.deferred.errback(self._shed(waiter.route, "queue_timeout"))

    def _remove(self, waiter: _Waiter) -> None:
        """The client left: its place is freed at once."""
        queue = self._queues.get(waiter.route.model_name)
        if queue is not None:
            self._take_out(queue, waiter)

    def _take_out(self, queue: _ModelQueue, waiter: _Waiter) -> bool:
        level = queue.levels.get(waiter.priority)
        if level is None or waiter.key not in level.queued:
            return False
        before = len(level.heap)
        level.remove(waiter)
        if len(level.heap) == before:
            return False
        if not level.heap:
            del queue.levels[waiter.priority]
        self._gone(queue, waiter)
        return True

    def _gone(self, queue: _ModelQueue, waiter: _Waiter) -> None:
        queue.size -= 1
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
