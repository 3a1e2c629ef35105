"""
Which vLLM deployment serves a call.

L{Router} maps the model a call names to the replicas configured under that
C{model_name} (or serving the LoRA adapter of that name), picks the least busy healthy one, and cools down a replica
whose connections keep failing.  Calls that name no configured model go to
the default upstream, if there is one.
"""

import random
from typing import Callable, Dict, List, Optional, Sequence

import attr

from dheera_tx.config import Deployment, ProxyConfig
from dheera_tx.errors import ProxyError


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
    """

    model_name: Optional[str]
    replicas: Sequence[Deployment]
    adapter: bool = False


@attr.s(slots=True)
class _ReplicaState:
    in_flight: int = attr.ib(default=0)
    failures: List[float] = attr.ib(factory=list)
    cooldown_until: float = attr.ib(default=0.0)


class Router:
    """
    Chooses deployments and keeps their in-flight counts and cooldowns.

    :param config: the proxy configuration.
    :param now: a clock returning seconds (the reactor's C{seconds}).
    :param shuffle: tie-breaker for replicas with equal load (injected in
        tests for determinism).
    :param adapters: the replicas serving a LoRA adapter, by its name
        (L{dheera_tx.routing.catalog.ModelCatalog.adapter_replicas}); by
        default the adapters the config declares.
    """

    FAILURE_WINDOW = 60.0

    def __init__(
        self,
        config: ProxyConfig,
        now: Callable[[], float],
        choice=random.choice,
        adapters: Optional[Callable[[str], Sequence[Deployment]]] = None,
    ):
        self._config = config
        self._adapters = config.adapter_replicas if adapters is None else adapters
        self._now = now
        self._choice = choice
        self._state: Dict[str, _ReplicaState] = {}
        for deployment in config.deployments:
            self._state[deployment.id] = _ReplicaState()
        if config.default_deployment is not None:
            self._state.setdefault(config.default_deployment.id, _ReplicaState())

    def route(self, model: Optional[str]) -> Route:
        """
        :param model: the model the call names, or L{None}.
        :return: the route for it.
        :raise ProxyError: 404 C{model_not_found} when the model is not
            configured and there is no default upstream.
        """
        if model is not None:
            replicas: Sequence[Deployment] = self._config.replicas(model)
            if replicas:
                return Route(model, replicas)
            replicas = self._adapters(model)
            if replicas:
                return Route(model, tuple(replicas), adapter=True)
        default = self._config.default_deployment
        if default is None:
            if model is None:
                message = "No model named and no default upstream configured."
            else:
                message = f"The model {model!r} is not configured on this proxy."
            raise ProxyError(404, message, type="invalid_request_error", code="model_not_found", param="model")
        return Route(None, (default,))

    def pick(self, route: Route, exclude: Sequence[Deployment] = ()) -> Optional[Deployment]:
        """
        Pick the least busy replica that is not cooling down.

        When every remaining replica is cooling down, the least busy of them
        is tried anyway: a call is better tried than refused.

        :param exclude: replicas already tried for this call.
        :return: a deployment, or L{None} when every replica was excluded.
        """
        candidates = [d for d in route.replicas if d not in exclude]
        if not candidates:
            return None
        now = self._now()
        healthy = [d for d in candidates if self._state[d.id].cooldown_until <= now]
        pool = healthy or candidates
        least = min(self._state[d.id].in_flight for d in pool)
        return self._choice([d for d in pool if self._state[d.id].in_flight == least])

    def started(self, deployment: Deployment) -> None:
        """
        Count a call that went to C{deployment}.
        """
        self._state[deployment.id].in_flight += 1

    def finished(self, deployment: Deployment) -> None:
        """
        Count the end of a call counted by L{started}.
        """
        self._state[deployment.id].in_flight -= 1

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
