"""
The routing strategies of C{router_settings.routing_strategy}.

Each picks one of a route's healthy replicas and says why (the reason goes
into the call record and the C{dheera_routing_decisions_total} counter):

  - C{cache-aware} (the default): the replica ranked first for the call's
    affinity key (L{dheera_tx.routing.affinity}), the one most likely to
    hold its prompt prefix in vLLM's cache (reason C{affinity}); when that
    replica is saturated or its load would pass M{(1 + LOAD_BOUND)} times
    the mean, the next in the key's ranking (C{spill}), so that a hot key
    spreads over a stable few replicas instead of all of them.  A new key
    takes the first replica in its ranking that holds no more than its
    share of the recently active keys, and keeps going there while it has
    room (L{dheera_tx.routing.homes}): with few keys, hashing alone places
    them unevenly, and a key flipping between replicas pays a whole prefill
    each time.  A call with
    no key goes to the least loaded replica (C{load}).
  - C{load-aware}: the replica with the lowest load score, from vLLM's
    waiting queue, KV-cache use and the calls in flight (C{load}).
  - C{least-busy}: the fewest calls in flight from this process, as before
    load signals existed (C{least_busy}).
  - C{simple-shuffle}: any replica, at random (C{random}).

Loads are L{dheera_tx.routing.signals.estimated_load}: a fresh scraped
sample plus what this process did since, or the calls in flight alone when
the sample is stale.
"""

import math
from typing import Optional, Sequence, Tuple

from dheera_tx.config import Deployment
from dheera_tx.routing.affinity import rendezvous_order

AFFINITY = "affinity"
SPILL = "spill"
LOAD = "load"
LEAST_BUSY = "least_busy"
RANDOM = "random"
ONLY = "only"
REASONS = (AFFINITY, SPILL, LOAD, LEAST_BUSY, RANDOM, ONLY)

# Consistent hashing with bounded loads (Mirrokni, Thorup, Zadimoghaddam):
# a replica takes a call while its load stays under ceil((1 + e) * mean).
LOAD_BOUND = 0.25
# ... and never under the mean plus this many requests: at a handful of
# requests per replica, load differences are noise, while a spill costs a
# whole prefill on a replica without the prefix.
LOAD_SLACK = 1.0
# load-aware: a waiting request costs more than a running one (it has not
# even been scheduled), and a nearly full KV cache means preemptions.
WAITING_WEIGHT = 2.0
KV_WEIGHT = 4.0
SATURATED_PENALTY = 1e6


def choose(strategy: str, router, pool: Sequence[Deployment], affinity: Optional[int]) -> Tuple[Deployment, str]:
    """
    :param router: the L{dheera_tx.routing.router.Router}, for loads,
        saturation, in-flight counts, seeds and its tie-breaking choice.
    :param pool: the candidate replicas (at least one).
    :param affinity: the call's affinity key, or L{None}.
    :return: C{(deployment, reason)}.
    """
    if strategy == "cache-aware":
        return cache_aware(router, pool, affinity)
    if strategy == "load-aware":
        return _least(router, pool, lambda d: load_score(router, d)), LOAD
    if strategy == "simple-shuffle":
        return router._choice(list(pool)), RANDOM
    return _least(router, pool, router.in_flight), LEAST_BUSY


def cache_aware(router, pool: Sequence[Deployment], affinity: Optional[int]) -> Tuple[Deployment, str]:
    """
    The C{cache-aware} choice (see the module's docstring).
    """
    loads = {d.id: router.load(d) for d in pool}
    if affinity is None:
        return _least_loaded(router, pool, loads), LOAD
    # The call itself counts in the mean, so an idle fleet takes it anywhere.
    mean = (sum(loads.values()) + 1.0) / len(pool)
    bound = max(math.ceil((1.0 + LOAD_BOUND) * mean), mean + LOAD_SLACK)

    def has_room(deployment: Deployment) -> bool:
        return loads[deployment.id] < bound and not router.saturated(deployment)

    homes = router.homes
    home = homes.home(affinity)
    for deployment in pool:
        if deployment.id == home and has_room(deployment):
            homes.place(affinity, deployment.id)
            return deployment, AFFINITY
    ranked = rendezvous_order(affinity, pool, router.seeds())
    # A new key (or one whose home is full) takes the first replica in its
    # ranking that holds no more than its share of the active keys.
    keys = sum(homes.count(d.id) for d in pool) + (0 if home is not None else 1)
    share = math.ceil(keys / len(pool))
    for rank, deployment in enumerate(ranked):
        if deployment.id != home and homes.count(deployment.id) < share and has_room(deployment):
            homes.place(affinity, deployment.id, share=True)
            return deployment, AFFINITY if rank == 0 else SPILL
    for rank, deployment in enumerate(ranked):
        if deployment.id != home and has_room(deployment):
            homes.place(affinity, deployment.id, share=True)
            return deployment, AFFINITY if rank == 0 else SPILL
    # Everything is over the bound or saturated: the least loaded.
    return _least_loaded(router, pool, loads), LOAD


def _least_loaded(router, pool: Sequence[Deployment], loads) -> Deployment:
    return _least(router, pool, lambda d: loads[d.id] + (SATURATED_PENALTY if router.saturated(d) else 0.0))


def load_score(router, deployment: Deployment) -> float:
    """
    :return: the C{load-aware} score of a replica, lower is better: its
        load, plus its waiting queue again and its KV-cache use, weighted,
        when a fresh sample says them; saturated replicas come last.
    """
    score = router.load(deployment)
    sample = router.fresh_sample(deployment)
    if sample is not None:
        score += WAITING_WEIGHT * sample.waiting
        if sample.kv_usage is not None:
            score += KV_WEIGHT * sample.kv_usage
    if router.saturated(deployment):
        score += SATURATED_PENALTY
    return score


def _least(router, pool: Sequence[Deployment], score) -> Deployment:
    scores = [(score(d), d) for d in pool]
    least = min(s for s, _ in scores)
    return router._choice([d for s, d in scores if s == least])
