"""
The settings a configuration is made of: one deployment (a C{model_list}
entry), C{general_settings} and C{router_settings}, as frozen values with
their defaults, and the check applied to each field
(L{dheera_tx.config_values}).  L{dheera_tx.config} reads a file into them.
"""

from typing import Any, Callable, Dict, Optional, Tuple

import attr

from dheera_tx import config_values


@attr.s(frozen=True, slots=True, auto_attribs=True)
class Deployment:
    """
    One vLLM server that serves a C{model_name}.

    :ivar model_name: the name clients send, or C{""} for the environment's
        default upstream.
    :ivar served_model: the name vLLM serves (C{hosted_vllm/} stripped), or
        L{None} for the default upstream.
    :ivar api_base: the server root, C{http(s)://host[:port][/prefix]}, no
        trailing slash.
    :ivar keepalive_timeout: seconds an idle connection to the server is
        kept for reuse; under the server's own keep-alive timeout, so that
        the proxy never sends on a connection the server is closing.
    :ivar lora_adapters: the LoRA adapters this server serves, declared in
        the config: C{(name, input cost, output cost)}, a cost L{None} where
        the base model's applies.
    :ivar index: position in C{model_list}; -1 for the default upstream.
    """

    model_name: str
    served_model: Optional[str]
    api_base: str
    api_key: Optional[str] = attr.ib(default=None, repr=False)
    input_cost_per_token: float = 0.0
    output_cost_per_token: float = 0.0
    input_cost_per_second: float = 0.0
    timeout: float = 600.0
    stream_timeout: float = 60.0
    connect_timeout: float = 10.0
    keepalive_timeout: float = 4.0
    lora_adapters: Tuple[Tuple[str, Optional[float], Optional[float]], ...] = ()
    max_parallel_requests: Optional[int] = None
    forward_priority: bool = False
    index: int = -1

    def prices_for(self, model: Optional[str]) -> Tuple[float, float]:
        """
        :param model: the name the call was routed by (a C{model_name} or
            one of this deployment's LoRA adapters).
        :return: C{(input, output)} USD per token: an adapter's own prices
            where it has them, else this deployment's.
        """
        for name, input_cost, output_cost in self.lora_adapters:
            if name == model:
                return (
                    self.input_cost_per_token if input_cost is None else input_cost,
                    self.output_cost_per_token if output_cost is None else output_cost,
                )
        return self.input_cost_per_token, self.output_cost_per_token

    @property
    def id(self) -> str:
        """
        :return: C{"<model_name>#<index>"}, or C{"default"} for the default
            upstream.
        """
        return "default" if self.index == -1 else f"{self.model_name}#{self.index}"


@attr.s(frozen=True, slots=True, auto_attribs=True)
class GeneralSettings:
    """The C{general_settings} section (see the shipped C{conf/proxy.yaml})."""

    master_key: Optional[str] = attr.ib(default=None, repr=False)
    database_url: Optional[str] = attr.ib(default=None, repr=False)
    redis_key_prefix: str = "dheera:"
    max_request_body_bytes: int = 104857600
    max_json_body_bytes: int = 16777216
    max_control_body_bytes: int = 1048576
    metrics_require_auth: bool = False
    tenant_routes: Tuple[str, ...] = ()
    data_dir: str = "dheera_data"
    header_timeout: float = 30.0
    body_timeout: float = 60.0
    max_header_bytes: int = 65536
    max_headers: int = 100
    graceful_shutdown_timeout: float = 30.0
    background_health_checks: bool = False
    health_check_interval: float = 30.0
    max_connections: int = 10000
    # Admission (SPEC 9): the completion tokens reserved for a call that
    # names no max_tokens; end users seen only in traffic.
    default_max_tokens_reservation: int = 4096
    end_user_ttl_days: int = 35
    max_new_end_users_per_day: int = 10000


@attr.s(frozen=True, slots=True, auto_attribs=True)
class RouterSettings:
    """
    The C{router_settings} section: a replica that fails C{allowed_fails}
    times in a row is cooled down for C{cooldown_time} seconds; replicas
    are chosen by C{routing_strategy} (see L{dheera_tx.routing.strategies}),
    from load samples of every deployment's C{/metrics} taken every
    C{metrics_interval} seconds; C{session_header} names the header that
    keeps a conversation on one replica; C{adapter_aware_routing} sends a
    LoRA adapter's calls where it is loaded (L{dheera_tx.routing.adapters}).
    With C{flow_control} false the gateway queue (L{dheera_tx.routing.flow})
    is off: no call waits or is shed there, each goes straight to the
    replica chosen.
    """

    allowed_fails: int = 3
    cooldown_time: float = 30.0
    routing_strategy: str = "cache-aware"
    metrics_interval: float = 1.0
    session_header: str = "x-session-id"
    max_waiting: float = 4.0
    max_kv_usage: float = 0.9
    max_queue: int = 1000
    max_queue_wait: float = 30.0
    adapter_aware_routing: bool = True
    flow_control: bool = True


_positive = config_values.number(0, inclusive=False)
# router_settings.routing_strategy: dheera_tx.routing.strategies implements each.
ROUTING_STRATEGIES = ("cache-aware", "load-aware", "least-busy", "simple-shuffle")
GENERAL_CHECKS: Dict[str, Callable[[Any], Any]] = {
    "master_key": config_values.master_key,
    "database_url": config_values.text,
    "redis_key_prefix": config_values.text,
    "max_request_body_bytes": config_values.whole(1),
    "max_json_body_bytes": config_values.whole(1),
    "max_control_body_bytes": config_values.whole(1),
    "metrics_require_auth": config_values.flag,
    "tenant_routes": config_values.routes,
    "data_dir": config_values.text,
    "header_timeout": _positive,
    "body_timeout": _positive,
    "max_header_bytes": config_values.whole(1),
    "max_headers": config_values.whole(1),
    "graceful_shutdown_timeout": _positive,
    "background_health_checks": config_values.flag,
    "health_check_interval": _positive,
    "max_connections": config_values.whole(1),
    "default_max_tokens_reservation": config_values.whole(0),
    "end_user_ttl_days": config_values.whole(1),
    "max_new_end_users_per_day": config_values.whole(0),
}
ROUTER_CHECKS: Dict[str, Callable[[Any], Any]] = {
    "allowed_fails": config_values.whole(1),
    "cooldown_time": config_values.number(0, inclusive=True),
    "routing_strategy": config_values.one_of(ROUTING_STRATEGIES),
    "metrics_interval": config_values.number(0.05, inclusive=True),
    "session_header": config_values.header_name,
    "max_waiting": config_values.number(0, inclusive=True),
    "max_kv_usage": config_values.number(0, inclusive=True),
    "max_queue": config_values.whole(0),
    "max_queue_wait": config_values.number(0, inclusive=True),
    "adapter_aware_routing": config_values.flag,
    "flow_control": config_values.flag,
}
PARAM_CHECKS: Dict[str, Callable[[Any], Any]] = {
    "model": config_values.served_model,
    "api_base": config_values.api_base,
    "api_key": config_values.token,
    "input_cost_per_token": config_values.number(0, inclusive=True),
    "output_cost_per_token": config_values.number(0, inclusive=True),
    "input_cost_per_second": config_values.number(0, inclusive=True),
    "timeout": _positive,
    "stream_timeout": _positive,
    "connect_timeout": _positive,
    "keepalive_timeout": _positive,
    "lora_adapters": config_values.lora_adapters,
    "max_parallel_requests": config_values.whole(1),
    "forward_priority": config_values.flag,
}
PARAMS = tuple(PARAM_CHECKS)
