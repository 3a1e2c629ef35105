"""
The proxy's own Prometheus metrics, served on C{GET /metrics} (SPEC
section 7).  C{/vllm/metrics} stays vLLM's.

L{ProxyMetrics} keeps its metrics in a C{CollectorRegistry} of its own (not
prometheus_client's global one), so several instances (tests, or several
proxies in one process) never collide.  Every label is bounded: the route
is one of vLLM's known routes or C{other}, the model is a configured
C{model_name} (or C{default} for the default upstream, C{other} for
anything unexpected), never the string a client sent; no key, key hash,
user or end user is ever a label.

Exported (counters carry the C{_total} suffix)::

    dheera_requests_total{route,model,status}
    dheera_request_duration_seconds{route,model}        histogram
    dheera_overhead_seconds{route,model}                histogram
    dheera_time_to_first_byte_seconds{route,model}      histogram
    dheera_prompt_tokens_total{model}
    dheera_completion_tokens_total{model}
    dheera_spend_usd_total{model}
    dheera_upstream_errors_total{kind}
    dheera_in_flight_requests, dheera_in_flight_streams
    dheera_deployment_healthy{model,deployment}         read from the router at scrape time
    dheera_deployment_cooling_down{model,deployment}
    dheera_deployment_in_flight{model,deployment}
    dheera_deployment_saturated{model,deployment}       flow control's verdict (routing/router.py)
    dheera_deployment_asleep{model,deployment}          vLLM's sleep mode, as the router knows it
    dheera_routing_decisions_total{model,reason}        reason: affinity, spill, load, least_busy, random, only
    dheera_cached_prompt_tokens_total{model}            vLLM's usage.prompt_tokens_details.cached_tokens
    dheera_deployment_requests_running{model,deployment}   from the last scrape of the deployment's /metrics
    dheera_deployment_requests_waiting{model,deployment}
    dheera_deployment_kv_cache_usage{model,deployment}
    dheera_deployment_prefix_cache_queries{model,deployment}, ..._hits   vLLM's counters, as last read
    dheera_deployment_load_sample_age_seconds{model,deployment}
    dheera_log_records_dropped_total{sink}              read from the log sinks at scrape time
    dheera_queue_depth{model,priority}                  calls waiting in the gateway queue (every worker's)
    dheera_queue_wait_seconds{model,priority}           histogram: time queued calls waited before they went
    dheera_queue_shed_total{model,reason}               reason: queue_full, queue_timeout, no_healthy_replica,
                                                        replicas_asleep
    dheera_upstream_retries_total{model,reason}         calls sent again to another replica; reason: unreachable,
                                                        max_num_queued_reqs, max_num_queued_tokens (vLLM's refusals)

Multiprocess mode (C{--workers N}): the worker parent sets
C{PROMETHEUS_MULTIPROC_DIR} for every worker, so prometheus_client keeps
counters and histograms in shared mmap files; L{render} then aggregates
every worker's files (C{MultiProcessCollector}), whichever worker a scrape
reaches.  The in-flight gauges are C{livesum} gauges that each worker
refreshes every second (L{ProxyMetrics.refresh}); the parent marks a dead
worker's gauges gone; so is C{dheera_queue_depth} (each worker's queue,
summed).  Deployment health and sink drops are read from the worker that
answers the scrape.
"""

import os
from typing import Callable, Iterable, List, Optional, Tuple

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest, multiprocess
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from dheera_tx.accounting.metering import nanos_to_usd
from dheera_tx.call import Call
from dheera_tx.http.paths import PREFIX

# vLLM's routes (SPEC section 3, VLLM_API.md).  A call's route label is the
# longest of these that its path is, or starts with followed by "/".
KNOWN_ROUTES = (
    "/v1/chat/completions",
    "/v1/chat/completions/batch",
    "/v1/completions",
    "/v1/responses",
    "/v1/messages",
    "/v1/messages/count_tokens",
    "/v1/embeddings",
    "/v1/models",
    "/v1/audio/transcriptions",
    "/v1/audio/translations",
    "/v1/score",
    "/v1/rerank",
    "/v2/rerank",
    "/v2/embed",
    "/v1/load_lora_adapter",
    "/v1/unload_lora_adapter",
    "/score",
    "/rerank",
    "/pooling",
    "/classify",
    "/tokenize",
    "/detokenize",
    "/invocations",
    "/generative_scoring",
    "/health",
    "/ping",
    "/version",
    "/load",
    "/metrics",
    "/sleep",
    "/wake_up",
    "/is_sleeping",
    "/reset_prefix_cache",
    "/collective_rpc",
    "/start_profile",
    "/stop_profile",
    "/adapters",
)
_BY_LENGTH = sorted(KNOWN_ROUTES, key=len, reverse=True)

# The call.error values that say the upstream failed.
UPSTREAM_ERRORS = frozenset(
    ["upstream_unreachable", "upstream_timeout", "upstream_failed", "upstream_reset", "upstream_error", "stream_timeout",
     "upstream_bad_response"]
)

DURATION_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)
TTFB_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
OVERHEAD_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)
QUEUE_WAIT_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0)


def priority_label(priority: int) -> str:
    """
    :return: a bounded label for a key's priority (-100 to 100, else C{other}).
    """
    return str(priority) if -100 <= priority <= 100 else "other"


def route_label(path: str) -> str:
    """
    :param path: the call's path, with or without the C{/vllm} prefix and
        query.
    :return: the known vLLM route it addresses, or C{"other"}.
    """
    path = path.split("?", 1)[0]
    prefix = PREFIX.decode("ascii")
    if path == prefix or path.startswith(prefix + "/"):
        path = path[len(prefix):] or "/"
    for route in _BY_LENGTH:
        if path == route or path.startswith(route + "/"):
            return route
    return "other"


def _status_label(status: Optional[int]) -> str:
    if isinstance(status, int) and 100 <= status <= 599:
        return str(status)
    return "none"


class ProxyMetrics:
    """
    The proxy's metrics and their Prometheus text.

    :param router: a L{dheera_tx.routing.router.Router}, read at scrape time for
        per-deployment health; or L{None}.
    :param config: the L{dheera_tx.config.ProxyConfig}: its deployments are
        reported, and only its model names become labels.

    :ivar registry: this instance's own C{CollectorRegistry}.
    """

    def __init__(self, router=None, config=None):
        self._router = router
        self._config = config
        self._model_names = frozenset(config.model_names) if config is not None else None
        self._sinks: List = []
        self._in_flight_source: Tuple[Optional[Callable[[], int]], Optional[Callable[[], int]]] = (None, None)
        self._children = {}
        self._decision_children: dict = {}
        self.registry = registry = CollectorRegistry()
        route_model = ["route", "model"]
        self.requests = Counter(
            "dheera_requests", "Calls through the /vllm pass-through.", ["route", "model", "status"], registry=registry
        )
        self.duration = Histogram(
            "dheera_request_duration_seconds", "Whole call duration, as the client saw it.",
            route_model, buckets=DURATION_BUCKETS, registry=registry,
        )
        self.overhead = Histogram(
            "dheera_overhead_seconds", "Time spent in the proxy before the upstream request left.",
            route_model, buckets=OVERHEAD_BUCKETS, registry=registry,
        )
        self.ttfb = Histogram(
            "dheera_time_to_first_byte_seconds", "Time from the call's start to the first upstream body byte.",
            route_model, buckets=TTFB_BUCKETS, registry=registry,
        )
        self.prompt_tokens = Counter("dheera_prompt_tokens", "Prompt tokens, from vLLM's usage.", ["model"], registry=registry)
        self.completion_tokens = Counter(
            "dheera_completion_tokens", "Completion tokens, from vLLM's usage.", ["model"], registry=registry
        )
        self.spend = Counter("dheera_spend_usd", "Spend in USD.", ["model"], registry=registry)
        self.cached_tokens = Counter(
            "dheera_cached_prompt_tokens", "Prompt tokens vLLM found in its prefix cache, from its usage.", ["model"],
            registry=registry,
        )
        self.routing_decisions = Counter(
            "dheera_routing_decisions", "Replica choices, by the routing strategy's reason.", ["model", "reason"],
            registry=registry,
        )
        self.upstream_errors = Counter(
            "dheera_upstream_errors", "Calls whose upstream failed, by kind.", ["kind"], registry=registry
        )
        self.queue_wait = Histogram(
            "dheera_queue_wait_seconds", "Time queued calls waited in the gateway before they went upstream.",
            ["model", "priority"], buckets=QUEUE_WAIT_BUCKETS, registry=registry,
        )
        self.queue_shed = Counter(
            "dheera_queue_shed", "Calls shed by flow control, by reason.", ["model", "reason"], registry=registry
        )
        self.upstream_retries = Counter(
            "dheera_upstream_retries", "Calls sent again to another replica, by why the first could not take them.",
            ["model", "reason"], registry=registry,
        )
        self._queue_depths: Optional[Callable[[], dict]] = None
        self.multiprocess_dir = os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None
        self.in_flight_requests = Gauge(
            "dheera_in_flight_requests", "Calls in flight.", registry=registry, multiprocess_mode="livesum"
        )
        self.in_flight_streams = Gauge(
            "dheera_in_flight_streams", "Streamed answers being relayed.", registry=registry, multiprocess_mode="livesum"
        )
        # Multiprocess mode: each worker's queue depths, summed over live
        # workers (copied by refresh()); else read at scrape time.
        self.queue_depth: Optional[Gauge] = None
        if self.multiprocess_dir:
            self.queue_depth = Gauge(
                "dheera_queue_depth", "Calls waiting in the gateway queue.", ["model", "priority"], registry=registry,
                multiprocess_mode="livesum",
            )
        self._depth_labels: set = set()
        registry.register(_LiveCollector(self))

    # -- what the data plane reports -----------------------------------------

    def model_label(self, model_name: Optional[str]) -> str:
        """
        :return: the bounded model label of a call's configured model name.
        """
        if not model_name:
            return "default"
        if self._model_names is not None and model_name not in self._model_names:
            return "other"
        return model_name

    def observe_call(self, call: Call) -> None:
        """
        Count one finished call.
        """
        route = route_label(call.path or "")
        model = self.model_label(call.model_name)
        status = _status_label(call.status)
        children = self._children.get((route, model, status))
        if children is None:
            # labels() costs more than the observation; the label sets are
            # bounded, so their children are kept.
            children = self._children[(route, model, status)] = (
                self.requests.labels(route, model, status),
                self.duration.labels(route, model),
                self.ttfb.labels(route, model),
                self.overhead.labels(route, model),
                self.prompt_tokens.labels(model),
                self.completion_tokens.labels(model),
                self.spend.labels(model),
            )
        requests, duration, ttfb, overhead, prompt_tokens, completion_tokens, spend = children
        requests.inc()
        if call.ended_at is not None:
            duration.observe(max(0.0, call.ended_at - call.started_at))
        if call.first_byte_at is not None:
            ttfb.observe(max(0.0, call.first_byte_at - call.started_at))
        if call.upstream_sent_at is not None:
            overhead.observe(call.overhead_ms / 1000.0)
        if call.prompt_tokens:
            prompt_tokens.inc(max(0, call.prompt_tokens))
        if call.completion_tokens:
            completion_tokens.inc(max(0, call.completion_tokens))
        if call.cost_nanos > 0:
            spend.inc(nanos_to_usd(call.cost_nanos))
        if call.routing_reason is not None:
            decisions = self._decision_children.get((model, call.routing_reason))
            if decisions is None:
                # Bounded: reasons are the router's few constants.
                decisions = self._decision_children[(model, call.routing_reason)] = (
                    self.routing_decisions.labels(model, call.routing_reason)
                )
            decisions.inc()
        if call.cached_tokens > 0:
            self.cached_tokens.labels(model).inc(call.cached_tokens)
        kind = self.upstream_error_kind(call)
        if kind is not None:
            self.upstream_errors.labels(kind).inc()

    def observe_queue_wait(self, model_name: Optional[str], priority: int, seconds: float) -> None:
        """
        Count a queued call that left for an upstream after C{seconds}.
        """
        self.queue_wait.labels(self.model_label(model_name), priority_label(priority)).observe(max(0.0, seconds))

    def count_shed(self, model_name: Optional[str], reason: str) -> None:
        """
        Count a call shed by flow control.
        """
        self.queue_shed.labels(self.model_label(model_name), reason).inc()

    def count_retry(self, model_name: Optional[str], reason: str) -> None:
        """
        Count a call sent again to another replica: C{reason} is
        C{unreachable} or vLLM's refusal reason (C{max_num_queued_reqs},
        C{max_num_queued_tokens}).
        """
        self.upstream_retries.labels(self.model_label(model_name), reason).inc()

    def read_queue(self, depths: Callable[[], dict]) -> None:
        """
        :param depths: returns the calls waiting by C{(model_name, priority)}.
        """
        self._queue_depths = depths

    @staticmethod
    def upstream_error_kind(call: Call) -> Optional[str]:
        """
        :return: the kind of upstream failure of C{call} (one of
            L{UPSTREAM_ERRORS}, or C{upstream_5xx} for a 5xx answer vLLM
            sent), or L{None}.
        """
        if call.error in UPSTREAM_ERRORS:
            return call.error
        # The proxy sets call.error for every error it answers itself; a
        # 5xx without one was vLLM's own answer.
        if call.error is None and call.upstream_sent_at is not None and isinstance(call.status, int) and call.status >= 500:
            return "upstream_5xx"
        return None

    def read_in_flight(self, requests: Optional[Callable[[], int]] = None, streams: Optional[Callable[[], int]] = None) -> None:
        """
        Read the in-flight gauges from counters the data plane keeps (e.g.
        C{lambda: passthrough.in_flight}) at scrape time.  In multiprocess
        mode they are copied by L{refresh} instead, which the worker calls
        every second.
        """
        self._in_flight_source = (requests, streams)
        if self.multiprocess_dir:
            return
        if requests is not None:
            self.in_flight_requests.set_function(lambda: max(0, requests()))
        if streams is not None:
            self.in_flight_streams.set_function(lambda: max(0, streams()))

    def refresh(self) -> None:
        """
        Copy the in-flight counts into the shared gauges (multiprocess mode).
        """
        requests, streams = self._in_flight_source
        if requests is not None:
            self.in_flight_requests.set(max(0, requests()))
        if streams is not None:
            self.in_flight_streams.set(max(0, streams()))
        if self._queue_depths is not None and self.queue_depth is not None:
            labels = set()
            for (model_name, priority), count in self._queue_depths().items():
                label = (self.model_label(model_name), priority_label(priority))
                labels.add(label)
                self.queue_depth.labels(*label).set(count)
            # A queue that emptied reads 0 (its series stays, like a counter's).
            for label in self._depth_labels - labels:
                self.queue_depth.labels(*label).set(0)
            self._depth_labels |= labels

    def add_sinks(self, sinks: Iterable) -> None:
        """
        Export the drop counters of these log sinks (each has C{name} and
        C{dropped}).
        """
        self._sinks.extend(sinks)

    # -- scraping ---------------------------------------------------------------

    def deployments(self) -> list:
        """
        :return: every configured deployment, the default upstream included,
            each once.
        """
        if self._config is None:
            return []
        return list(self._config.all_deployments())

    def render(self) -> Tuple[bytes, str]:
        """
        :return: C{(body, content_type)} of the Prometheus text exposition.
        """
        if not self.multiprocess_dir:
            return generate_latest(self.registry), CONTENT_TYPE_LATEST
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry, path=self.multiprocess_dir)
        registry.register(_LiveCollector(self))
        return generate_latest(registry), CONTENT_TYPE_LATEST


class _LiveCollector:
    """
    Values read at scrape time: deployment health from the router, and the
    log sinks' drop counters.
    """

    def __init__(self, metrics: ProxyMetrics):
        self._metrics = metrics

    def collect(self):
        metrics = self._metrics
        router = metrics._router
        if router is not None:
            labels = ["model", "deployment"]
            healthy = GaugeMetricFamily(
                "dheera_deployment_healthy", "1 if the deployment is not cooling down.", labels=labels
            )
            cooling = GaugeMetricFamily(
                "dheera_deployment_cooling_down", "1 while the deployment is cooled down after failures.", labels=labels
            )
            in_flight = GaugeMetricFamily("dheera_deployment_in_flight", "Calls in flight to the deployment.", labels=labels)
            saturated = GaugeMetricFamily(
                "dheera_deployment_saturated", "1 while flow control counts the deployment as saturated.", labels=labels
            )
            asleep = GaugeMetricFamily(
                "dheera_deployment_asleep", "1 while the deployment is asleep (vLLM's sleep mode).", labels=labels
            )
            scraped = {
                "running": GaugeMetricFamily(
                    "dheera_deployment_requests_running", "vLLM's num_requests_running, last scraped.", labels=labels),
                "waiting": GaugeMetricFamily(
                    "dheera_deployment_requests_waiting", "vLLM's num_requests_waiting, last scraped.", labels=labels),
                "kv_usage": GaugeMetricFamily(
                    "dheera_deployment_kv_cache_usage", "vLLM's kv_cache_usage_perc (0-1), last scraped.", labels=labels),
                "prefix_queries": GaugeMetricFamily(
                    "dheera_deployment_prefix_cache_queries", "vLLM's prefix_cache_queries_total, last scraped.",
                    labels=labels),
                "prefix_hits": GaugeMetricFamily(
                    "dheera_deployment_prefix_cache_hits", "vLLM's prefix_cache_hits_total, last scraped.", labels=labels),
            }
            age = GaugeMetricFamily(
                "dheera_deployment_load_sample_age_seconds", "Age of the last /metrics sample of the deployment.",
                labels=labels,
            )
            now = router.now()
            for deployment in metrics.deployments():
                values = [metrics.model_label(deployment.model_name), deployment.id]
                try:
                    down = router.cooling_down(deployment)
                    busy = router.in_flight(deployment)
                    sample = router.last_sample(deployment)
                    full = router.saturated(deployment)
                    sleeping = router.asleep(deployment)
                except KeyError:
                    continue
                healthy.add_metric(values, 0.0 if down else 1.0)
                cooling.add_metric(values, 1.0 if down else 0.0)
                in_flight.add_metric(values, float(busy))
                saturated.add_metric(values, 1.0 if full else 0.0)
                asleep.add_metric(values, 1.0 if sleeping else 0.0)
                if sample is None:
                    continue
                age.add_metric(values, max(0.0, now - sample.taken_at))
                for field, family in scraped.items():
                    value = getattr(sample, field)
                    if value is not None:
                        family.add_metric(values, float(value))
            yield healthy
            yield cooling
            yield in_flight
            yield saturated
            yield asleep
            yield from scraped.values()
            yield age
        if metrics._queue_depths is not None and not metrics.multiprocess_dir:
            depth = GaugeMetricFamily(
                "dheera_queue_depth", "Calls waiting in the gateway queue.", labels=["model", "priority"]
            )
            for (model_name, priority), count in sorted(metrics._queue_depths().items(), key=str):
                depth.add_metric([metrics.model_label(model_name), priority_label(priority)], float(count))
            yield depth
        if metrics._sinks:
            dropped = CounterMetricFamily(
                "dheera_log_records_dropped", "Call records a log sink dropped (queue full or target down).", labels=["sink"]
            )
            for sink in metrics._sinks:
                dropped.add_metric([sink.name], float(sink.dropped))
            yield dropped
