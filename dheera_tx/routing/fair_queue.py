"""
The gateway queue's parts (L{dheera_tx.routing.flow}): a queued call, one
priority level's weighted fair queue, one model's queue, the slot a call
leaves with, and a call's estimated cost in tokens.

Within a level, a call's finish tag is C{max(V, the key's last tag) + cost /
weight} (C{V}: the start tag of the last call dispatched); the lowest tag
leaves first.
"""

import heapq
from typing import TYPE_CHECKING, Dict, List, Optional, Sequence, Tuple

from twisted.internet.defer import Deferred

from dheera_tx.config import Deployment
from dheera_tx.routing.router import Route

if TYPE_CHECKING:
    from dheera_tx.routing.slots import SlotClaimer


class Slot:
    """
    The replica a call left the queue for, and the slot it took there (in
    Redis, for a capped deployment).

    :ivar deployment: where the call goes.
    :ivar reason: the routing decision's reason (L{dheera_tx.routing.strategies}).
    """

    __slots__ = ("deployment", "reason", "_claimer")

    def __init__(self, deployment: Deployment, reason: str, claimer: "Optional[SlotClaimer]"):
        self.deployment = deployment
        self.reason = reason
        self._claimer = claimer

    def release(self) -> None:
        """
        Give the slot back (once; later calls do nothing).
        """
        claimer, self._claimer = self._claimer, None
        if claimer is not None:
            claimer.release(self.deployment)


class Waiter:
    """
    One queued call: its place (priority, tags, order) and how it leaves
    (C{deferred}, fired with a L{Slot} or L{None}).
    """

    __slots__ = ("route", "key", "priority", "start", "finish", "seq", "deferred", "timer", "queued_at", "affinity",
                 "exclude", "refused", "fast", "queued")

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
        self.affinity: Optional[int] = None
        # Replicas this call must not go to (tried), and those whose slot
        # was refused in this round of claims.
        self.exclude: Sequence[Deployment] = ()
        self.refused: List[Deployment] = []
        # Entered with room and nobody ahead (it only claims).
        self.fast = False
        self.queued = False


class Level:
    """One priority level of one model's queue."""

    __slots__ = ("heap", "virtual", "last_finish", "queued")

    def __init__(self) -> None:
        self.heap: List[Tuple[float, int, Waiter]] = []
        self.virtual = 0.0
        # Only keys with calls queued here: nothing is kept for idle keys.
        self.last_finish: Dict[str, float] = {}
        self.queued: Dict[str, int] = {}

    def push(self, waiter: Waiter, cost: float, weight: float) -> None:
        start = max(self.virtual, self.last_finish.get(waiter.key, self.virtual))
        waiter.start = start
        waiter.finish = self.last_finish[waiter.key] = start + cost / weight
        self.queued[waiter.key] = self.queued.get(waiter.key, 0) + 1
        heapq.heappush(self.heap, (waiter.finish, waiter.seq, waiter))

    def pop(self) -> Waiter:
        waiter = heapq.heappop(self.heap)[2]
        self.virtual = max(self.virtual, waiter.start)
        self._left(waiter.key)
        return waiter

    def remove(self, waiter: Waiter) -> None:
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


class ModelQueue:
    """
    One model's queue: its priority levels, and its claim in flight.
    """

    __slots__ = ("route", "levels", "size", "claiming", "blocked")

    def __init__(self, route: Route):
        self.route = route
        self.levels: Dict[int, Level] = {}
        self.size = 0
        # The call whose claim is on its way (one at a time, in order).
        self.claiming: Optional[Waiter] = None
        # Every replica with room refused: no claim until capacity may
        # have returned (L{GatewayQueue.dispatch}).
        self.blocked = False

    def head(self) -> Waiter:
        """
        :return: the call that leaves next (the queue is not empty).
        """
        return self.levels[min(self.levels)].heap[0][2]


def call_cost(raw_json, document, default_max_tokens: int) -> float:
    """
    :return: the tokens a call is expected to cost, for fair share: its
        JSON body's bytes / 4 for the prompt, plus its C{max_tokens} (or
        C{max_completion_tokens}, else the default reservation).
    """
    prompt = len(raw_json) / 4.0 if raw_json else 1.0
    output = default_max_tokens
    if document is not None:
        named = document.get("max_tokens", document.get("max_completion_tokens"))
        if isinstance(named, int) and not isinstance(named, bool) and named >= 0:
            output = named
    return prompt + output
