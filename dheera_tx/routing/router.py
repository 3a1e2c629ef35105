"""
Which vLLM deployment serves a call.

L{Router} maps the model a call names to the replicas configured under that
C{model_name} (or serving the LoRA adapter of that name), picks one of the
healthy ones by C{router_settings.routing_strategy}
(L{dheera_tx.routing.strategies}), and cools down a replica whose
connections keep failing.  Calls that name no configured model go to the
default upstream, if there is one.  It keeps each replica's calls in flight
in this process and the last load sample scraped from its C{/metrics}
(L{dheera_tx.routing.signals}).

A replica that refused a call for vLLM's queue caps (L{Router.refused})
counts as saturated until a load sample taken after the refusal arrives,
or for at most L{STALE_INTERVALS} scrape intervals (the life of a sample)
when none does (its model is not scraped): the gateway queue then holds
calls instead of sending them into more refusals.

Sleeping replicas (L{dheera_tx.routing.sleep}) get no calls but the
operator calls that wake them; a LoRA adapter's calls prefer the replicas
where it is loaded (L{dheera_tx.routing.adapters}).
"""

import random
from typing import TYPE_CHECKING, Callable, Dict, List, Optional, Sequence, Tuple

import attr

from dheera_tx.config import Deployment, ProxyConfig
from dheera_tx.errors import ProxyError
from dheera_tx.routing import adapters, sleep, strategies
from dheera_tx.routing.affinity import replica_weight
from dheera_tx.routing.homes import KeyHomes
from dheera_tx.routing.signals import (
    STALE_INTERVALS,
    LoadSample,
    MetricsUnreadable,
    Saturation,
    estimated_load,
    estimated_waiting,
    is_fresh,
    parse_metrics,
)

if TYPE_CHECKING:
    from dheera_tx.routing.shared_load import SharedInFlight

# Strategies that do not weigh saturation themselves.
_BLIND_TO_SATURATION = frozenset(["least-busy", "simple-shuffle"])


@attr.s(frozen=True, slots=True, auto_attribs=True)
class Route:
    """
    Where a call goes.

    :ivar model_name: the configured C{model_name} the call named, or
        L{None} when it goes to the default upstream.
    :ivar replicas: the deployments that may serve it.
    :ivar adapter: whether C{model_name} is a LoRA adapter of those
        deployments (vLLM serves it under that very name: the body's
        C{model} is not rewritten).
    :ivar operation: the sleep operation the call is
        (L{dheera_tx.routing.sleep.sleep_operation}), or L{None}.
    """

    model_name: Optional[str]
    replicas: Sequence[Deployment]
    adapter: bool = False
    operation: Optional[str] = None


@attr.s(slots=True)
class _ReplicaState:
    in_flight: int = attr.ib(default=0)
    failures: List[float] = attr.ib(factory=list)
    cooldown_until: float = attr.ib(default=0.0)
    sample: Optional[LoadSample] = attr.ib(default=None)
    scrape_error: Optional[str] = attr.ib(default=None)
    scrape_failed_at: Optional[float] = attr.ib(default=None)
    sleep_mark: Optional[sleep.SleepMark] = attr.ib(default=None)
    # LoRA adapters this process sent here, by when (oldest first).
    sent_adapters: Dict[str, float] = attr.ib(factory=dict)
    # When vLLM last refused a call for its queue caps (cleared by a later sample).
    refused_at: Optional[float] = attr.ib(default=None)
    # The most requests a sample ever showed running: the replica's slots.
    slots: float = attr.ib(default=0.0)


class Router:
    """
    Chooses deployments and keeps their in-flight counts and cooldowns.

    :param config: the proxy configuration.
    :param now: a clock returning seconds (the reactor's C{seconds}).
    :param choice: tie-breaker for replicas with equal load, and the
        random pick of C{simple-shuffle} (injected in tests for determinism).
    :param adapters: the replicas serving a LoRA adapter, by its name
        (L{dheera_tx.routing.catalog.ModelCatalog.adapter_replicas}); by
        default the adapters the config declares.
    :param saturation: when a replica counts as saturated (cache-aware
        spills away from it, load-aware avoids it).
    """

    FAILURE_WINDOW = 60.0

    def __init__(
        self,
        config: ProxyConfig,
        now: Callable[[], float],
        choice=random.choice,
        adapters: Optional[Callable[[str], Sequence[Deployment]]] = None,
        saturation: Optional[Saturation] = None,
    ):
        self._config = config
        self._adapters = config.adapter_replicas if adapters is None else adapters
        self._now = now
        self._choice = choice
        if saturation is None:
            saturation = Saturation(config.router.max_waiting, config.router.max_kv_usage)
        self.saturation = saturation
        # Called when a replica may have room again (a call ended, a sample
        # arrived): the gateway queue (L{dheera_tx.routing.flow}) dispatches.
        self.on_capacity: Optional[Callable[[], None]] = None
        self.strategy = config.router.routing_strategy
        self._interval = config.router.metrics_interval
        self.adapter_aware = config.router.adapter_aware_routing
        self._state: Dict[str, _ReplicaState] = {}
        self._seeds: Dict[str, int] = {}
        self.homes = KeyHomes(now)
        # Other processes' calls in flight (L{dheera_tx.routing.shared_load}), when shared.
        self.shared: Optional[SharedInFlight] = None
        for deployment in config.all_deployments():
            self._state.setdefault(deployment.id, _ReplicaState())
            self._seeds[deployment.id] = replica_weight(deployment)

    def route(self, model: Optional[str], operation: Optional[str] = None) -> Route:
        """
        :param model: the model the call names, or L{None}.
        :param operation: the call's sleep operation, or L{None}.
        :return: the route for it.
        :raise ProxyError: 404 C{model_not_found} when the model is not
            configured and there is no default upstream.
        """
        if model is not None:
            replicas: Sequence[Deployment] = self._config.replicas(model)
            if replicas:
                return Route(model, replicas, operation=operation)
            replicas = self._adapters(model)
            if replicas:
                return Route(model, tuple(replicas), adapter=True, operation=operation)
        default = self._config.default_deployment
        if default is None:
            if model is None:
                message = "No model named and no default upstream configured."
            else:
                message = f"The model {model!r} is not configured on this proxy."
            raise ProxyError(404, message, type="invalid_request_error", code="model_not_found", param="model")
        return Route(None, (default,), operation=operation)

    def pick(self, route: Route, exclude: Sequence[Deployment] = (), affinity: Optional[int] = None) -> Optional[Deployment]:
        """
        :return: the deployment L{choose} picks, or L{None}.
        """
        chosen = self.choose(route, exclude, affinity)
        return chosen[0] if chosen is not None else None

    def choose(
        self, route: Route, exclude: Sequence[Deployment] = (), affinity: Optional[int] = None
    ) -> Optional[Tuple[Deployment, str]]:
        """
        Pick a replica that is not cooling down, by the routing strategy.

        When every remaining replica is cooling down, one of them is tried
        anyway: a call is better tried than refused.  Sleeping replicas are
        left out while any other remains (the gateway queue holds calls
        while all sleep); C{/wake_up} prefers them and C{/sleep} avoids
        them.  An adapter's call chooses among the replicas
        L{adapters.adapter_pool} keeps.

        :param exclude: replicas already tried for this call.
        :param affinity: the call's affinity key
            (L{dheera_tx.routing.affinity}), or L{None}.
        :return: C{(deployment, reason)}, the reason one of
            L{strategies.REASONS}; or L{None} when every replica was
            excluded.
        """
        candidates = [d for d in route.replicas if d not in exclude]
        if not candidates:
            return None
        if len(candidates) == 1:
            return candidates[0], strategies.ONLY
        now = self._now()
        healthy = [d for d in candidates if self._state[d.id].cooldown_until <= now]
        pool: Sequence[Deployment] = healthy or candidates
        operation = route.operation
        if operation is None:
            pool = [d for d in pool if not self.asleep(d)] or pool
        elif operation == sleep.SLEEP:
            pool = [d for d in pool if not self.asleep(d)] or pool
        elif operation != sleep.IS_SLEEPING:
            pool = [d for d in pool if self.asleep(d)] or pool
        if route.adapter and self.adapter_aware and operation is None and route.model_name is not None:
            pool = adapters.adapter_pool(self, pool, route.model_name)
        if self.on_capacity is not None and self.strategy in _BLIND_TO_SATURATION:
            # Flow control: a replica at its limits takes no call while
            # another has room (cache-aware and load-aware see to it themselves).
            free = [d for d in pool if not self.saturated(d)]
            pool = free or pool
        chosen = strategies.choose(self.strategy, self, pool, affinity)
        if route.adapter and route.model_name is not None:
            adapters.remember(self._state[chosen[0].id].sent_adapters, route.model_name, now, self._adapter_window())
        return chosen

    # -- sleep and adapters ---------------------------------------------------------

    def asleep(self, deployment: Deployment) -> bool:
        """
        :return: whether the deployment is asleep
            (L{dheera_tx.routing.sleep}: the proxy's own mark, else a fresh
            sample's C{vllm:engine_sleep_state}).
        """
        state = self._state[deployment.id]
        if state.sleep_mark is None and (state.sample is None or state.sample.asleep is not True):
            return False
        return sleep.is_asleep(state.sleep_mark, self.fresh_sample(deployment))

    def operated(self, deployment: Deployment, operation: str, status: int) -> None:
        """
        Record the answer to a sleep operation sent to C{deployment}: a
        successful C{/sleep} or C{/wake_up} changes its state at once; a
        woken replica may take queued calls.
        """
        mark = sleep.mark_after(operation, status, self._now())
        if mark is None:
            return
        self._state[deployment.id].sleep_mark = mark
        if not mark.asleep and self.on_capacity is not None:
            self.on_capacity()

    def recent_adapters(self, deployment: Deployment) -> Dict[str, float]:
        """
        :return: the LoRA adapters this process sent to the deployment
            recently (L{adapters.RECENT_INTERVALS}), by when.
        """
        return adapters.recent(self._state[deployment.id].sent_adapters, self._now(), self._adapter_window())

    def _adapter_window(self) -> float:
        return adapters.RECENT_INTERVALS * self._interval

    # -- load signals -------------------------------------------------------------

    def seeds(self) -> Dict[str, int]:
        """
        :return: each deployment's rendezvous seed, by id.
        """
        return self._seeds

    def now(self) -> float:
        """
        :return: the router's clock.
        """
        return self._now()

    def last_sample(self, deployment: Deployment) -> Optional[LoadSample]:
        """
        :return: the deployment's last load sample, fresh or not, or L{None}.
        """
        return self._state[deployment.id].sample

    def fresh_sample(self, deployment: Deployment) -> Optional[LoadSample]:
        """
        :return: the deployment's last load sample if it is fresh, else
            L{None}.
        """
        sample = self._state[deployment.id].sample
        return sample if is_fresh(sample, self._now(), self._interval) else None

    def load(self, deployment: Deployment) -> float:
        """
        :return: the requests the deployment has now, as far as this
            process can tell (L{estimated_load}); without a fresh sample,
            the calls in flight of every process sharing this Redis.
        """
        state = self._state[deployment.id]
        sample = state.sample
        if is_fresh(sample, self._now(), self._interval):
            return estimated_load(sample, state.in_flight)
        return estimated_load(None, self.in_flight_everywhere(deployment))

    def in_flight_everywhere(self, deployment: Deployment) -> int:
        """
        :return: the calls in flight to the deployment from this process and,
            when shared, from every other process (as of the last sync).
        """
        others = self.shared.others(deployment.id) if self.shared is not None else 0
        return self._state[deployment.id].in_flight + others

    def local_in_flight(self) -> Dict[str, int]:
        """
        :return: this process's calls in flight, by deployment id.
        """
        return {deployment_id: state.in_flight for deployment_id, state in self._state.items()}

    def saturated(self, deployment: Deployment, everywhere: bool = True) -> bool:
        """
        :return: whether the deployment is saturated now (L{Saturation}):
            its calls in flight (every process's) at its
            C{max_parallel_requests}, or a fresh sample's KV-cache use or
            its waiting queue as this process's calls since have changed it
            (L{estimated_waiting}) at the limit, or vLLM refusing calls for
            its queue caps (L{refused}).  A stale sample (the scrapes
            stopped answering) saturates a deployment that has a parallel
            cap: its operator asked for a bound the proxy can no longer
            check against what the server holds.  Without a cap a stale
            sample judges nothing, and the calls in flight (and refusals)
            decide.
        :param everywhere: count the other processes' calls in flight as of
            the last sync; L{False}: this process's only (where a slot
            claimed in Redis decides the cap across processes,
            L{dheera_tx.routing.slots}).
        """
        if self._state[deployment.id].refused_at is not None and self._refusing(deployment):
            return True
        in_flight = self.in_flight_everywhere(deployment) if everywhere else self._state[deployment.id].in_flight
        cap = deployment.max_parallel_requests
        if cap is not None and in_flight >= cap:
            return True
        sample = self.fresh_sample(deployment)
        state = self._state[deployment.id]
        if sample is None:
            if cap is not None and state.sample is not None:
                return True
            return self.saturation.saturated(None, in_flight)
        return self.saturation.saturated(sample, in_flight, estimated_waiting(sample, state.in_flight, state.slots))

    def refused(self, deployment: Deployment) -> None:
        """
        Record that vLLM refused a call for its queue caps
        (C{--max-num-queued-reqs}, C{--max-num-queued-tokens}): the
        deployment counts as saturated until a sample taken after now
        arrives, or for at most L{STALE_INTERVALS} scrape intervals.
        """
        self._state[deployment.id].refused_at = self._now()

    def _refusing(self, deployment: Deployment) -> bool:
        """
        :return: whether the deployment's last refusal still holds (else it
            is forgotten).
        """
        state = self._state[deployment.id]
        refused_at = state.refused_at
        assert refused_at is not None
        sample = state.sample
        if (sample is not None and sample.taken_at > refused_at) or self._now() - refused_at >= STALE_INTERVALS * self._interval:
            state.refused_at = None
            return False
        return True

    def record_metrics(self, deployment: Deployment, body: bytes, taken_at: float) -> None:
        """
        Read a scraped C{/metrics} answer into the deployment's load sample;
        an answer that is not vLLM's counts as a failed scrape.
        """
        state = self._state.get(deployment.id)
        if state is None:
            return
        try:
            state.sample = parse_metrics(body, taken_at, state.in_flight)
        except MetricsUnreadable as e:
            self.scrape_failed(deployment, f"not a vLLM /metrics answer: {e}")
            return
        state.scrape_error = None
        if state.sleep_mark is not None and state.sleep_mark.superseded_by(state.sample, self._interval):
            state.sleep_mark = None
        state.slots = max(state.slots, state.sample.running)
        if self.on_capacity is not None:
            self.on_capacity()

    def scrape_failed(self, deployment: Deployment, reason: str) -> None:
        """
        Record why a scrape failed; the last sample stays until it is stale.
        """
        state = self._state.get(deployment.id)
        if state is not None:
            state.scrape_error = reason
            state.scrape_failed_at = self._now()

    def signals(self, deployment: Deployment) -> dict:
        """
        :return: the deployment's last sample and scrape error, as
            C{/health} shows them.
        """
        state = self._state[deployment.id]
        now = self._now()
        shown: dict = {"in_flight": state.in_flight, "saturated": self.saturated(deployment),
                       "asleep": self.asleep(deployment), "load_sample": None}
        if state.sleep_mark is not None:
            shown["sleep_mark"] = state.sleep_mark.shown(now)
        if state.sample is not None:
            shown["load_sample"] = state.sample.shown(now)
            shown["load_sample"]["stale"] = not is_fresh(state.sample, now, self._interval)
        if state.scrape_error is not None:
            shown["metrics_error"] = state.scrape_error
        return shown

    def started(self, deployment: Deployment) -> None:
        """
        Count a call that went to C{deployment}.
        """
        self._state[deployment.id].in_flight += 1

    def finished(self, deployment: Deployment) -> None:
        """
        Count the end of a call counted by L{started}; a queued call may
        take its place.
        """
        self._state[deployment.id].in_flight -= 1
        if self.on_capacity is not None:
            self.on_capacity()

    def failed(self, deployment: Deployment) -> None:
        """
        Record a connection-level failure; enough of them within a minute
        cool the replica down for C{router_settings.cooldown_time}.
        """
        state = self._state[deployment.id]
        now = self._now()
        state.failures = [t for t in state.failures if t > now - self.FAILURE_WINDOW]
        state.failures.append(now)
        if len(state.failures) >= self._config.router.allowed_fails:
            state.cooldown_until = now + self._config.router.cooldown_time
            state.failures = []

    def succeeded(self, deployment: Deployment) -> None:
        """
        Record that C{deployment} answered: its failure count starts over.
        """
        state = self._state[deployment.id]
        state.failures = []
        state.cooldown_until = 0.0

    def set_health(self, deployment: Deployment, healthy: bool) -> None:
        """
        Record the verdict of a background health check: an unhealthy
        replica is cooled down like one whose connections fail.
        """
        state = self._state[deployment.id]
        if healthy:
            state.cooldown_until = 0.0
        else:
            state.cooldown_until = self._now() + self._config.router.cooldown_time

    def cooling_down(self, deployment: Deployment) -> bool:
        """
        :return: whether C{deployment} is cooling down now.
        """
        return self._state[deployment.id].cooldown_until > self._now()

    def in_flight(self, deployment: Deployment) -> int:
        """
        :return: the calls in flight to C{deployment}.
        """
        return self._state[deployment.id].in_flight
