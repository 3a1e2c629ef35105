"""
LoRA awareness: a call naming a LoRA adapter goes where the adapter is
loaded.

vLLM runs at most C{--max-loras} adapters at once (its adapter slots); a
call for an adapter that is not loaded waits until a slot frees, and then
pays for loading it (from CPU memory or disk into the GPU), which stalls
the server's other calls too.  Adapter-blind routing spreads each adapter's
calls over every replica, so with more adapters than slots every replica
keeps loading and evicting them.

C{vllm:lora_requests_info} (L{dheera_tx.routing.signals}) says, per replica,
the adapters running and waiting now and C{max_lora}; it does not say which
idle adapters still sit in a slot.  So L{adapter_pool} narrows a call's
candidates, among the replicas that are not saturated (all of them when
every one is), to the first non-empty tier of:

  1. replicas where the adapter is running or waiting (a fresh sample), or
     where this process sent it within the last L{RECENT_INTERVALS} scrape
     intervals (so it is probably still loaded, and calls sent between two
     samples agree);
  2. replicas with a free slot: fewer distinct adapters running, waiting or
     sent there recently than C{max_lora} (a waiting adapter is about to
     take a slot);
  3. the rest;

and the configured routing strategy chooses within that tier.  The tier
never overrides saturation: an adapter that is hot on one replica spills to
a second one when the first is saturated, and is then running on both.
C{router_settings.adapter_aware_routing: false} turns this off (the
benchmark's adapter-blind baseline).
"""

from typing import Dict, List, Sequence

from dheera_tx.config import Deployment

#: How long a call sent with an adapter marks the replica as holding it, in
#: scrape intervals (the same as a sample's freshness).
RECENT_INTERVALS = 3.0


def adapter_pool(router, pool: Sequence[Deployment], adapter: str) -> Sequence[Deployment]:
    """
    :param router: the L{dheera_tx.routing.router.Router} (fresh samples,
        saturation, the adapters it sent recently).
    :param pool: the candidate replicas (healthy and awake), at least one.
    :param adapter: the adapter the call names.
    :return: the replicas to choose among (see the module's docstring).
    """
    room = [d for d in pool if not router.saturated(d)] or list(pool)
    loaded: List[Deployment] = []
    free: List[Deployment] = []
    for deployment in room:
        sample = router.fresh_sample(deployment)
        recent = router.recent_adapters(deployment)
        if adapter in recent or (sample is not None and adapter in sample.adapters):
            loaded.append(deployment)
        elif sample is not None and sample.max_lora:
            in_use = len(sample.adapters.union(recent)) if recent else len(sample.adapters)
            if in_use < sample.max_lora:
                free.append(deployment)
    return loaded or free or room


def remember(sent: Dict[str, float], adapter: str, now: float, window: float) -> None:
    """
    Record that a call with C{adapter} was sent to a replica now, forgetting
    the adapters sent there longer than C{window} seconds ago.

    :param sent: the replica's adapters, by when they were last sent.
    """
    sent.pop(adapter, None)
    # Oldest first (re-inserted on each send): stop at the first recent one.
    for name, at in list(sent.items()):
        if at >= now - window:
            break
        del sent[name]
    sent[adapter] = now


def recent(sent: Dict[str, float], now: float, window: float) -> Dict[str, float]:
    """
    :return: the adapters of C{sent} sent within the last C{window} seconds.
    """
    if not sent:
        return sent
    cutoff = now - window
    return {name: at for name, at in sent.items() if at >= cutoff}
