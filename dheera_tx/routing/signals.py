"""
Load signals of the vLLM deployments, scraped from their C{/metrics}.

L{MetricsScraper} asks every deployment C{GET {api_base}/metrics} every
C{router_settings.metrics_interval} seconds (with its C{api_key}, never
logged), with a timeout of half the interval and a cap on the answer's
size, and hands each parsed L{LoadSample} to the router.  vLLM counts what
reaches it from anywhere, so a sample sees traffic the proxy never sent
(other proxies, other workers, clients calling vLLM directly).

L{parse_metrics} reads vLLM's metric names as vLLM exports them (see
C{vllm/v1/metrics/loggers.py}): C{vllm:num_requests_running},
C{vllm:num_requests_waiting}, C{vllm:kv_cache_usage_perc} (or the older
C{vllm:gpu_cache_usage_perc}), C{vllm:prefix_cache_queries_total} and
C{vllm:prefix_cache_hits_total} (or the older C{vllm:gpu_prefix_cache_*}),
C{vllm:cache_config_info}, C{vllm:lora_requests_info} and
C{vllm:engine_sleep_state}.  Samples of several engines (data parallel) are
summed, KV-cache use averaged; a server is asleep when none of its engines
reports C{sleep_state="awake"} as 1.

C{vllm:lora_requests_info} is a gauge whose I{labels} carry the state
(C{max_lora}, C{running_lora_adapters}, C{waiting_lora_adapters}, adapter
names joined by commas) and whose I{value} is the time it was last set
(C{set_to_current_time()}); every label combination ever set stays in the
answer, so the current state is the series with the largest value, wherever
it sits among the others.

L{estimated_load} combines a sample with what this process did since it was
taken; a sample older than L{STALE_INTERVALS} intervals is stale and the
router falls back to its calls in flight.  L{Saturation} says when a replica
is saturated (waiting queue, KV-cache use, calls in flight), the one place
flow control's thresholds plug in.
"""

import math
import re
from typing import Callable, Dict, FrozenSet, Iterator, Optional, Tuple

import attr
import treq
from twisted.internet.defer import CancelledError, Deferred, gatherResults, succeed
from twisted.logger import Logger

from dheera_tx.config import Deployment, ProxyConfig
from dheera_tx.upstream.outbound import AnswerTooLarge, Rounds, bounded, failure_reason, outbound_client, read_capped

log = Logger()

# A vLLM /metrics answer is 20-200 KB (histograms per engine); more is not
# one, and must not cost the reactor more than a few milliseconds to read.
MAX_METRICS_BYTES = 2 * 1024 * 1024
STALE_INTERVALS = 3

RUNNING = b"vllm:num_requests_running"
WAITING = b"vllm:num_requests_waiting"
KV_USAGE = b"vllm:kv_cache_usage_perc"
OLD_KV_USAGE = b"vllm:gpu_cache_usage_perc"
PREFIX_QUERIES = b"vllm:prefix_cache_queries_total"
PREFIX_HITS = b"vllm:prefix_cache_hits_total"
OLD_PREFIX_QUERIES = b"vllm:gpu_prefix_cache_queries_total"
OLD_PREFIX_HITS = b"vllm:gpu_prefix_cache_hits_total"
CACHE_CONFIG = b"vllm:cache_config_info"
LORA_INFO = b"vllm:lora_requests_info"
SLEEP_STATE = b"vllm:engine_sleep_state"
_WANTED = frozenset([RUNNING, WAITING, KV_USAGE, OLD_KV_USAGE, PREFIX_QUERIES, PREFIX_HITS, OLD_PREFIX_QUERIES,
                     OLD_PREFIX_HITS, CACHE_CONFIG, LORA_INFO, SLEEP_STATE])
#: The most adapter names kept from one label (vLLM joins them all).
MAX_ADAPTER_NAMES = 256
_LABEL = re.compile(rb'\s*([a-zA-Z_][a-zA-Z0-9_]*)\s*=\s*"((?:[^"\\]|\\.)*)"\s*,?')


class MetricsUnreadable(Exception):
    """The answer is not a vLLM /metrics text."""


@attr.s(frozen=True, slots=True, auto_attribs=True)
class LoadSample:
    """
    What one scrape of a deployment's C{/metrics} said.

    :ivar taken_at: when the answer arrived (reactor seconds).
    :ivar running: requests vLLM is running (all engines).
    :ivar waiting: requests in vLLM's waiting queue.
    :ivar kv_usage: fraction of KV-cache blocks in use (0-1), or L{None}.
    :ivar prefix_queries: prefix-cache tokens queried since vLLM started.
    :ivar prefix_hits: of which found in the cache.
    :ivar block_size: the KV block size in tokens (C{cache_config_info}).
    :ivar running_loras: the LoRA adapters running now, comma-separated.
    :ivar waiting_loras: the LoRA adapters of requests waiting now,
        comma-separated.
    :ivar max_lora: how many adapters vLLM can run at once (its
        C{--max-loras}: the adapter slots), or L{None} when LoRA is off.
    :ivar adapters: the adapters running or waiting, as a set.
    :ivar running_adapters: the adapters running, as a set.
    :ivar asleep: whether C{vllm:engine_sleep_state} says the server is
        asleep; L{None} when the server does not export it.
    :ivar in_flight_at_sample: this process's calls in flight to the
        deployment when the answer arrived.
    """

    taken_at: float
    running: float
    waiting: float
    kv_usage: Optional[float] = None
    prefix_queries: Optional[float] = None
    prefix_hits: Optional[float] = None
    block_size: Optional[int] = None
    running_loras: Optional[str] = None
    in_flight_at_sample: int = 0
    waiting_loras: Optional[str] = None
    max_lora: Optional[int] = None
    adapters: FrozenSet[str] = frozenset()
    running_adapters: FrozenSet[str] = frozenset()
    asleep: Optional[bool] = None

    def shown(self, now: float) -> dict:
        """
        :return: the sample as C{/health} shows it, with its age.
        """
        return {
            "age_s": round(max(0.0, now - self.taken_at), 3),
            "num_requests_running": self.running,
            "num_requests_waiting": self.waiting,
            "kv_cache_usage_perc": self.kv_usage,
            "prefix_cache_queries": self.prefix_queries,
            "prefix_cache_hits": self.prefix_hits,
            "block_size": self.block_size,
            "running_lora_adapters": self.running_loras,
            "waiting_lora_adapters": self.waiting_loras,
            "max_lora": self.max_lora,
            "asleep": self.asleep,
        }


def _samples(body: bytes) -> Iterator[Tuple[bytes, Dict[bytes, bytes], float]]:
    """
    :return: C{(name, labels, value)} of each wanted sample line.
    """
    for line in body.split(b"\n"):
        if not line.startswith(b"vllm:"):
            continue
        brace = line.find(b"{")
        space = line.find(b" ")
        if brace != -1 and (space == -1 or brace < space):
            name = line[:brace]
            if name not in _WANTED:
                continue
            labels, end = _labels(line, brace + 1)
            rest = line[end:]
        else:
            name = line[:space] if space != -1 else line
            if name not in _WANTED:
                continue
            labels, rest = {}, line[len(name):]
        fields = rest.split()
        if not fields:
            continue
        try:
            value = float(fields[0])
        except ValueError:
            continue
        if math.isfinite(value):
            yield name, labels, value


def _labels(line: bytes, at: int) -> Tuple[Dict[bytes, bytes], int]:
    labels: Dict[bytes, bytes] = {}
    while at < len(line):
        if line[at:at + 1] == b"}":
            return labels, at + 1
        match = _LABEL.match(line, at)
        if match is None:
            break
        labels[match.group(1)] = match.group(2)
        at = match.end()
    raise MetricsUnreadable("malformed labels")


def parse_metrics(body: bytes, taken_at: float, in_flight: int = 0) -> LoadSample:
    """
    :param body: a C{/metrics} answer (Prometheus text format).
    :return: the load sample it gives.
    :raise MetricsUnreadable: when it has no vLLM request gauges.
    """
    sums: Dict[bytes, float] = {}
    kv: Dict[bytes, list] = {}
    block_size = None
    loras: Optional[Tuple[float, Dict[bytes, bytes]]] = None
    awake: Optional[bool] = None
    try:
        for name, labels, value in _samples(body):
            if name in (KV_USAGE, OLD_KV_USAGE):
                kv.setdefault(name, []).append(value)
            elif name == CACHE_CONFIG:
                size = labels.get(b"block_size", b"")
                if size.isdigit():
                    block_size = int(size)
            elif name == LORA_INFO:
                # One series per adapter set, set to the time it was seen:
                # the newest is the current one.
                if loras is None or value > loras[0]:
                    loras = (value, labels)
            elif name == SLEEP_STATE:
                if labels.get(b"sleep_state") == b"awake":
                    awake = bool(awake) or value >= 0.5
            else:
                sums[name] = sums.get(name, 0.0) + value
    except MetricsUnreadable:
        raise
    if RUNNING not in sums or WAITING not in sums:
        raise MetricsUnreadable("no vllm:num_requests_running / vllm:num_requests_waiting")
    usage = kv.get(KV_USAGE) or kv.get(OLD_KV_USAGE)
    running_loras = waiting_loras = None
    max_lora = None
    running_names: Tuple[str, ...] = ()
    waiting_names: Tuple[str, ...] = ()
    if loras is not None:
        running_loras, running_names = _adapter_names(loras[1].get(b"running_lora_adapters", b""))
        waiting_loras, waiting_names = _adapter_names(loras[1].get(b"waiting_lora_adapters", b""))
        slots = loras[1].get(b"max_lora", b"")
        max_lora = int(slots) if slots.isdigit() else None
    return LoadSample(
        taken_at=taken_at,
        running=max(0.0, sums[RUNNING]),
        waiting=max(0.0, sums[WAITING]),
        kv_usage=min(1.0, max(0.0, sum(usage) / len(usage))) if usage else None,
        prefix_queries=sums.get(PREFIX_QUERIES, sums.get(OLD_PREFIX_QUERIES)),
        prefix_hits=sums.get(PREFIX_HITS, sums.get(OLD_PREFIX_HITS)),
        block_size=block_size,
        running_loras=running_loras,
        in_flight_at_sample=in_flight,
        waiting_loras=waiting_loras,
        max_lora=max_lora,
        adapters=frozenset(running_names + waiting_names),
        running_adapters=frozenset(running_names),
        asleep=None if awake is None else not awake,
    )


def _adapter_names(label: bytes) -> Tuple[str, Tuple[str, ...]]:
    """
    :return: an adapters label as text (bounded) and its names.
    """
    text = label.decode("utf-8", "replace")
    names = tuple(name for name in text.split(",", MAX_ADAPTER_NAMES)[:MAX_ADAPTER_NAMES] if name)
    return text[:1024], names


def is_fresh(sample: Optional[LoadSample], now: float, interval: float) -> bool:
    """
    :return: whether C{sample} is recent enough to route by: taken no more
        than L{STALE_INTERVALS} scrape intervals ago.
    """
    return sample is not None and now - sample.taken_at <= STALE_INTERVALS * interval


def estimated_load(sample: Optional[LoadSample], in_flight: int) -> float:
    """
    The requests a replica has now, as far as this process can tell: the
    sample's running and waiting requests, plus the calls this process
    started there since the sample less those that ended (never less than
    this process's own calls in flight).

    :param sample: a fresh sample, or L{None} (stale or none yet): then the
        calls in flight alone.
    :param in_flight: this process's calls in flight to the replica now.
    """
    if sample is None:
        return float(in_flight)
    return max(float(in_flight), sample.running + sample.waiting + in_flight - sample.in_flight_at_sample)


def estimated_waiting(sample: LoadSample, in_flight: int, slots: float) -> float:
    """
    vLLM's waiting queue now, as far as this process can tell: the sample's
    running and waiting requests, plus the calls this process started there
    since the sample less those that ended, beyond the replica's sequence
    slots.  Without it, every call sent between two samples would find the
    replica as the last sample left it, and a burst would pass a waiting
    limit many times over before the next sample showed it.

    :param sample: a fresh sample.
    :param in_flight: this process's calls in flight to the replica now.
    :param slots: the most requests the replica was ever seen running (its
        C{max_num_seqs}, once it has been full; until then a lower bound,
        so that the estimate errs towards waiting).
    """
    started_since = in_flight - sample.in_flight_at_sample
    return max(0.0, sample.running + sample.waiting + started_since - max(slots, sample.running))


@attr.s(frozen=True, slots=True, auto_attribs=True)
class Saturation:
    """
    When a replica takes no more calls for now: its waiting queue, KV-cache
    use or calls in flight at a limit.  A limit of L{None} is not checked;
    the queue and KV limits need a fresh sample.
    """

    max_waiting: Optional[float] = 4.0
    max_kv_usage: Optional[float] = None
    max_in_flight: Optional[int] = None

    def saturated(self, sample: Optional[LoadSample], in_flight: int, waiting: Optional[float] = None) -> bool:
        """
        :param sample: a fresh sample, or L{None}.
        :param waiting: the waiting queue now (L{estimated_waiting}), or
            L{None} for the sample's.
        """
        if self.max_in_flight is not None and in_flight >= self.max_in_flight:
            return True
        if sample is None:
            return False
        if self.max_waiting is not None and (sample.waiting if waiting is None else waiting) >= self.max_waiting:
            return True
        return self.max_kv_usage is not None and sample.kv_usage is not None and sample.kv_usage >= self.max_kv_usage


def routed_deployments(config: ProxyConfig) -> list:
    """
    :return: the deployments whose load decides a choice: the replicas of
        every model served by more than one (whose in-flight counts are
        shared between processes).
    """
    return [d for name in config.model_names for d in config.replicas(name) if len(config.replicas(name)) > 1]


def scraped_deployments(config: ProxyConfig) -> list:
    """
    :return: the deployments whose C{/metrics} are scraped: every
        configured one (flow control and sleep awareness need a lone
        replica's signals too), but not the default upstream of
        C{HOSTED_VLLM_API_BASE}, which need not be vLLM.
    """
    return list(config.deployments)


class MetricsScraper:
    """
    Scrapes every deployment's C{/metrics} on a timer.

    :param reactor: the reactor (timers and, for the default client,
        connections).
    :param config: the proxy configuration: its deployments and
        C{router_settings.metrics_interval}.
    :param on_sample: called with C{(deployment, body, taken_at)} for each
        answer (the router parses it and stamps its own in-flight count).
    :param on_failure: called with C{(deployment, reason)}; C{reason} is a
        short text made here, never an exception's (it may hold the URL).
    :param http_client: a L{treq.client.HTTPClient}; by default one with a
        small pool of its own, closed by L{stop}.
    """

    def __init__(self, reactor, config: ProxyConfig, on_sample: Callable, on_failure: Callable, http_client=None):
        self._reactor = reactor
        self._interval = config.router.metrics_interval
        self.timeout = min(2.0, self._interval / 2.0)
        self.deployments = scraped_deployments(config)
        self._on_sample = on_sample
        self._on_failure = on_failure
        self._pool = None
        if http_client is None:
            http_client, self._pool = outbound_client(reactor, self.timeout, per_host=1)
        self._client = http_client
        self._rounds = Rounds(reactor, self.scrape_all, "Metrics scrape")

    def start(self) -> None:
        """
        Scrape now and every interval (a slow round delays the next; rounds
        never overlap).
        """
        self._rounds.start(self._interval)

    async def scrape_all(self) -> None:
        """
        Scrape every deployment once, concurrently.
        """
        await gatherResults([Deferred.fromCoroutine(self.scrape(d)) for d in self.deployments], consumeErrors=True)

    async def scrape(self, deployment: Deployment) -> None:
        """
        Scrape one deployment and report the answer or the failure.
        Never raises.
        """
        try:
            body = await bounded(self._get(deployment), self.timeout, self._reactor)
        except CancelledError:
            if self._rounds.stopped:
                return
            reason = f"timed out after {self.timeout:g} s"
        except Exception as e:
            reason = _reason(e, self.timeout)
        else:
            if not self._rounds.stopped:
                self._on_sample(deployment, body, self._reactor.seconds())
            return
        if not self._rounds.stopped:
            self._on_failure(deployment, reason)

    async def _get(self, deployment: Deployment) -> bytes:
        headers = {"Accept": "text/plain"}
        if deployment.api_key:
            headers["Authorization"] = "Bearer " + deployment.api_key
        response = await self._client.get(
            deployment.api_base + "/metrics", headers=headers, allow_redirects=False, unbuffered=True,
            reactor=self._reactor,
        )
        if response.code != 200:
            await treq.collect(response, lambda data: None)
            raise _HTTPStatus(response.code)
        return await read_capped(response, MAX_METRICS_BYTES)

    def stop(self) -> Deferred:
        """
        Stop scraping (cancelling a round in progress) and close the default
        client's connections.
        """
        self._rounds.stop()
        if self._pool is not None:
            return self._pool.closeCachedConnections()
        return succeed(None)


class _HTTPStatus(Exception):
    def __init__(self, code: int):
        self.code = code


def _reason(e: Exception, timeout: float) -> str:
    if isinstance(e, _HTTPStatus):
        return f"HTTP {e.code}"
    if isinstance(e, AnswerTooLarge):
        return f"answer over {MAX_METRICS_BYTES} bytes"
    return failure_reason(e, timeout, "scrape")
