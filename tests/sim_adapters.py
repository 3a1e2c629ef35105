"""
LoRA adapter slots and sleep mode of the simulated vLLM replica
(L{tests.sim_vllm}), kept apart from its scheduler.

L{LoraSlots} models vLLM's C{--max-loras}: at most C{max_lora} adapters are
loaded at once (GPU slots); a request for an adapter that is not loaded
waits until a slot is free or holds an idle adapter (the least recently
used idle one is evicted), then the adapter is loaded, which takes
C{lora_load_time} of the engine's time (the replica's prefill lane: loading
stalls the other requests' prefills too, as it does on a GPU).  Requests
for adapters that cannot get a slot are skipped, not blocking the queue
behind them, like vLLM's scheduler.  The loads are counted in
C{dheera_sim:lora_loads_total} (the simulator's own metric: vLLM has none),
and C{vllm:lora_requests_info} is exported as vLLM 0.32 exports it: labels
C{max_lora}, C{running_lora_adapters}, C{waiting_lora_adapters}, the value
the time the label set was last seen, every set ever seen kept (up to
L{MAX_SERIES}).

L{SleepSwitch} models vLLM's sleep mode (C{VLLM_SERVER_DEV_MODE=1}):
C{POST /sleep?level=N&mode=abort|wait|keep} (level 0 pauses scheduling,
1 and 2 also offload or drop the weights and KV cache: C{weights} and
C{kv_cache} sleep), C{POST /wake_up[?tags=...]} (fully awake once no tag
sleeps), C{GET /is_sleeping}, and C{vllm:engine_sleep_state}.  Requests
sent while asleep wait until the replica is fully awake.
"""

import collections
from typing import Dict, Iterable, List, Optional, Tuple
from urllib.parse import parse_qs

#: L{LoraSlots.take} verdicts.
READY = "ready"
LOAD = "load"
WAIT = "wait"
#: The most C{vllm:lora_requests_info} label sets kept (vLLM keeps all).
MAX_SERIES = 2000


class LoraSlots:
    """
    A replica's adapter slots, LRU.

    :param max_lora: the slots (vLLM's C{--max-loras}).
    """

    def __init__(self, max_lora: int):
        self.max_lora = max_lora
        # Adapter -> loaded (False while loading), least recently used first.
        self.slots: collections.OrderedDict[str, bool] = collections.OrderedDict()
        self.active: Dict[str, int] = {}
        self.loads_total = 0
        self._series: Dict[Tuple[str, str], float] = {}

    def take(self, adapter: str) -> str:
        """
        :return: L{READY} when C{adapter} is loaded (a request may run with
            it); L{LOAD} when a slot was just given to it and the caller
            must load it; L{WAIT} when it is loading or no slot is free.
        """
        state = self.slots.get(adapter)
        if state is not None:
            if not state:
                return WAIT
            self.slots.move_to_end(adapter)
            return READY
        if len(self.slots) >= self.max_lora:
            idle = next((name for name, loaded in self.slots.items() if loaded and not self.active.get(name)), None)
            if idle is None:
                return WAIT
            del self.slots[idle]
        self.slots[adapter] = False
        self.loads_total += 1
        return LOAD

    def loaded(self, adapter: str) -> None:
        """
        The load of C{adapter} is done.
        """
        if adapter in self.slots:
            self.slots[adapter] = True

    def started(self, adapter: str) -> None:
        self.active[adapter] = self.active.get(adapter, 0) + 1

    def ended(self, adapter: str) -> None:
        count = self.active.get(adapter, 0) - 1
        if count > 0:
            self.active[adapter] = count
        else:
            self.active.pop(adapter, None)

    def record(self, now: float, running: Iterable[str], waiting: Iterable[str]) -> None:
        """
        Set the series of the current running and waiting adapters (each
        named once, in the order of their first request) to C{now}, like
        vLLM's C{set_to_current_time()} on each stats update.
        """
        key = (",".join(dict.fromkeys(running)), ",".join(dict.fromkeys(waiting)))
        if key not in self._series and len(self._series) >= MAX_SERIES:
            del self._series[next(iter(self._series))]
        self._series[key] = now

    def metric_lines(self) -> List[str]:
        """
        :return: the C{/metrics} lines of the adapters (HELP and TYPE
            included), the label sets in the order they were first seen.
        """
        lines = ["# HELP vllm:lora_requests_info Running stats on lora requests.",
                 "# TYPE vllm:lora_requests_info gauge"]
        for (running, waiting), at in self._series.items():
            lines.append(f'vllm:lora_requests_info{{max_lora="{self.max_lora}",running_lora_adapters="{running}",'
                         f'waiting_lora_adapters="{waiting}"}} {at!r}')
        lines += ["# HELP dheera_sim:lora_loads_total Adapter loads into a slot (simulator only, not vLLM).",
                  "# TYPE dheera_sim:lora_loads_total counter",
                  f"dheera_sim:lora_loads_total {float(self.loads_total)!r}"]
        return lines


class SleepSwitch:
    """
    A replica's sleep state, as vLLM's engine keeps it.
    """

    def __init__(self) -> None:
        self.asleep = False
        self.level = 0
        self.sleeping_tags: set = set()
        self.sleeps = 0
        self.wake_ups = 0

    def sleep(self, level: int) -> None:
        self.asleep = True
        self.level = level
        self.sleeping_tags = {"weights", "kv_cache"} if level >= 1 else set()
        self.sleeps += 1

    def wake_up(self, tags: Optional[List[str]]) -> bool:
        """
        :param tags: the tags to wake (L{None}: all).
        :return: whether the replica is fully awake now.
        """
        self.wake_ups += 1
        if tags is None:
            self.sleeping_tags.clear()
        else:
            self.sleeping_tags.difference_update(tags)
        if not self.sleeping_tags:
            self.asleep = False
            self.level = 0
        return not self.asleep

    def metric_lines(self, labels: str) -> List[str]:
        """
        :return: the C{vllm:engine_sleep_state} lines, vLLM's way.
        """
        awake = 0 if self.asleep else 1
        offloaded = 1 if self.asleep and self.level == 1 else 0
        discarded = 1 if self.asleep and self.level == 2 else 0
        lines = ["# HELP vllm:engine_sleep_state Engine sleep state; awake = 0 means engine is sleeping; "
                 "awake = 1 means engine is awake; weights_offloaded = 1 means sleep level 1; "
                 "discard_all = 1 means sleep level 2.",
                 "# TYPE vllm:engine_sleep_state gauge"]
        for state, value in (("awake", awake), ("weights_offloaded", offloaded), ("discard_all", discarded)):
            lines.append(f'vllm:engine_sleep_state{{{labels},sleep_state="{state}"}} {float(value)!r}')
        return lines


def sleep_engine(engine, level: int, mode: str) -> None:
    """
    vLLM's C{/sleep} on a L{tests.sim_vllm.SimEngine}: with C{mode}
    C{abort} (vLLM's default) every request ends at once, with what it has;
    new ones wait until woken.  Level 1 and up drop the prefix cache.
    """
    if mode == "abort":
        for seq in engine.running:
            seq.cancelled = True
        while engine.waiting:
            seq = engine.waiting.popleft()
            seq.cancelled = True
            seq.on_done(seq)
    if level >= 1:
        engine.cache.clear()
    engine.sleep.sleep(level)


def wake_engine(engine, tags: Optional[List[str]]) -> bool:
    """
    vLLM's C{/wake_up} on a L{tests.sim_vllm.SimEngine}.

    :return: whether it is fully awake (then its waiting requests are
        scheduled).
    """
    awake = engine.sleep.wake_up(tags)
    if awake:
        engine._schedule()
    return awake


def sleep_route(engine, method: bytes, path: bytes, uri: bytes) -> Optional[dict]:
    """
    Serve vLLM's sleep routes on a L{tests.sim_vllm.SimEngine}.

    :return: the JSON answer (200), or L{None} when C{path} is not one.
    """
    query = parse_qs(uri.partition(b"?")[2].decode("latin-1"))
    if method == b"GET" and path == b"/is_sleeping":
        return {"is_sleeping": engine.sleep.asleep}
    if method == b"POST" and path == b"/sleep":
        level = int(query.get("level", ["1"])[0])
        sleep_engine(engine, level, query.get("mode", ["abort"])[0])
        return {"status": "sleeping", "level": level}
    if method == b"POST" and path == b"/wake_up":
        tags = query.get("tags")
        return {"status": "awake" if wake_engine(engine, tags) else "sleeping", "tags": tags}
    return None
