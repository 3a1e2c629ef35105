"""
The routing strategies of C{router_settings.routing_strategy}.

Each picks one of a route's healthy replicas and says why (the reason goes
into the call record and the C{dheera_routing_decisions_total} counter):

  - C{cache-aware} (the default): the replica ranked first for the call's
    affinity key (L{dheera_tx.routing.affinity}), the one most likely to
    hold its prompt prefix in vLLM's cache (reason C{affinity}); when that
    replica is saturated or its load would pass M{(1 + LOAD_BOUND)} times
    the mean, the next in the key's ranking (C{spill}), so that a hot key
    spreads over a stable few replicas instead of all of them.  A key that
    spilled keeps going where it went while that replica has room (each
    process remembers a bounded number of such keys): with few keys,
    hashing alone places them unevenly, and a key flipping between replicas
    pays a whole prefill each time.  A call with
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
        return _least(router, pool, lambda d: loads[d.id] + (SATURATED_PENALTY if router.saturated(d) else 0.0)), LOAD
    # The call itself counts in the mean, so an idle fleet takes it anywhere.
    mean = (sum(loads.values()) + 1.0) / len(pool)
    bound = max(math.ceil((1.0 + LOAD_BOUND) * mean), mean + LOAD_SLACK)
    ranked = rendezvous_order(affinity, pool, router.seeds())
    first = ranked[0]
    # A key that spilled before stays where it went while that replica
    # has room: its prefix is there now, and flipping back and forth
    # would pay a whole prefill each time.
    home = router.affinity_home(affinity)
    if home is not None and home is not first:
        ranked = [d for d in ranked if d.id == home.id] + [d for d in ranked if d.id != home.id]
    for deployment in ranked:
        if loads[deployment.id] < bound and not router.saturated(deployment):
            router.set_affinity_home(affinity, deployment, first)
            return deployment, AFFINITY if deployment is ranked[0] else SPILL
    # Everything is over the bound or saturated: the least loaded.
    return _least(router, pool, lambda d: loads[d.id] + (SATURATED_PENALTY if router.saturated(d) else 0.0)), LOAD


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
