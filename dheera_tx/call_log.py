"""
The per-call log (SPEC section 7): one record for every call, handed to the
configured sinks.

L{call_record} turns a finished L{Call} into a JSON-safe dict with every
field of the contract, secrets scrubbed.  L{CallLog} builds that record once
per call and gives it to each sink; a sink's C{emit} only queues or writes
one line, never waits on the network and never raises, so a slow or dead
sink cannot slow a request down.  The sinks (C{callbacks} in
C{dheera_ai_settings}):

* C{json_log}: L{JSONLogSink}, JSON lines on stdout or in
  C{json_log_path}.
* C{redis_stream}: L{RedisStreamSink}, the capped C{<prefix>log} stream.
* C{webhook}: L{WebhookSink}, batched POSTs of JSON arrays through treq,
  retried with exponential back-off.

L{build_sinks} reads and checks their settings.
"""

import datetime
import json
import re
import sys
from collections import deque
from typing import Any, Dict, List, Optional, Sequence, TextIO
from urllib.parse import urlsplit

import treq
import treq.client
from twisted.internet.defer import Deferred, ensureDeferred, gatherResults, succeed
from twisted.logger import Logger
from zope.interface import Attribute, Interface, implementer

from dheera_tx.call import Call
from dheera_tx.config import ConfigError, ProxyConfig
from dheera_tx.outbound import outbound_client

log = Logger()

REDACTED = "[redacted]"

# A secret-bearing query parameter (as in /key/info?key=...), whatever its
# case; the value runs to the next separator.
_SECRET_PARAM = re.compile(
    r"(?i)([?&;](?:key|api_key|api-key|apikey|token|access_token|secret|password|master_key)=)[^&;#\s]*"
)
# Anything shaped like a proxy key (sk-...), wherever it turns up.
_KEY_SHAPE = re.compile(r"sk-[A-Za-z0-9_\-]{6,}")


def scrub(text: Optional[str]) -> Optional[str]:
    """
    Remove secrets from a free-text value: the values of key-like query
    parameters and anything shaped like an C{sk-} key.

    :param text: a path, URL or message, or L{None}.
    :return: the same text with secrets replaced by C{[redacted]}.
    """
    if text is None:
        return None
    text = _SECRET_PARAM.sub(lambda m: m.group(1) + REDACTED, text)
    return _KEY_SHAPE.sub(REDACTED, text)


def _iso(seconds: Optional[float]) -> Optional[str]:
    if seconds is None:
        return None
    try:
        moment = datetime.datetime.fromtimestamp(seconds, tz=datetime.timezone.utc)
    except (OverflowError, OSError, ValueError):
        return None
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _ms(start: Optional[float], end: Optional[float]) -> Optional[float]:
    if start is None or end is None:
        return None
    return round(max(0.0, end - start) * 1000.0, 3)


def call_record(call: Call) -> Dict[str, Any]:
    """
    The log record of one call (SPEC section 7).

    Times C{started_at}, C{first_byte_at} and C{ended_at} are the reactor's
    seconds, which are epoch seconds under the real reactor; C{time} is
    C{started_at} as ISO-8601 UTC.  Every free-text field is passed through
    L{scrub}; the key itself is never part of a L{Call}, only the first
    characters of its SHA-256.

    :param call: a finished call.
    :return: a dict of JSON-safe values.
    """
    return {
        "call_id": call.call_id,
        "time": _iso(call.started_at),
        "method": call.method,
        "path": scrub(call.path),
        "model_name": scrub(call.model_name),
        "deployment": scrub(call.deployment),
        "api_base": scrub(call.api_base),
        "status": call.status,
        "stream": bool(call.stream),
        "key_hash_prefix": call.key_hash_prefix,
        "key_alias": scrub(call.key_alias),
        "user_id": scrub(call.user_id),
        "team_id": scrub(call.team_id),
        "end_user": scrub(call.end_user),
        "prompt_tokens": int(call.prompt_tokens),
        "completion_tokens": int(call.completion_tokens),
        "usage_estimated": bool(call.usage_estimated),
        "cost": call.cost_nanos / 1e9,
        "cost_nanos": int(call.cost_nanos),
        "started_at": call.started_at,
        "first_byte_at": call.first_byte_at,
        "ended_at": call.ended_at,
        "ttfb_ms": _ms(call.started_at, call.first_byte_at),
        "duration_ms": _ms(call.started_at, call.ended_at),
        "overhead_ms": round(call.overhead_ms, 3),
        "bytes_in": int(call.bytes_in),
        "bytes_out": int(call.bytes_out),
        "error": scrub(call.error),
    }


def encode_record(record: Dict[str, Any]) -> str:
    """
    :return: C{record} as one line of JSON (no newline), ASCII only.
    """
    return json.dumps(record, separators=(",", ":"), default=str)


class ICallSink(Interface):
    """
    Somewhere call records go.
    """

    name = Attribute("The sink's name in C{callbacks}, a metric label (e.g. C{json_log}).")
    dropped = Attribute("How many records this sink has dropped (queue full, target down).")

    def emit(record: Dict[str, Any]) -> None:
        """
        Take one record.  Never raises, never waits on I/O that may block.
        """

    def stop() -> Deferred:
        """
        Flush what is queued (bounded in time) and release resources.

        :return: a Deferred that fires when done; never fails.
        """


@implementer(ICallSink)
class JSONLogSink:
    """
    One JSON line per record, on a stream (the process's real stdout by
    default) or appended to a file.

    Each line is written and flushed at once, so C{tail -f} shows it.  The
    default is C{sys.__stdout__}, not C{sys.stdout}: under twistd,
    C{sys.stdout} is a log file object that would wrap every line in a log
    prefix.

    :param stream: a text stream to write to; ignored when C{path} is given.
    :param path: a file to append to (opened here, closed by L{stop}).
    :raise OSError: the file cannot be opened.
    """

    name = "json_log"

    def __init__(self, stream: Optional[TextIO] = None, path: Optional[str] = None):
        self._owned = path is not None
        if path is not None:
            self._stream = open(path, "a", encoding="utf-8")
        else:
            self._stream = stream if stream is not None else (sys.__stdout__ or sys.stdout)
        self.dropped = 0

    def emit(self, record: Dict[str, Any]) -> None:
        """
        Write C{record} as one line; a failed write is counted as dropped.
        """
        try:
            self._stream.write(encode_record(record) + "\n")
            self._stream.flush()
        except Exception:
            self.dropped += 1

    def stop(self) -> Deferred:
        """
        Flush, and close the file if this sink opened it.
        """
        try:
            self._stream.flush()
            if self._owned:
                self._stream.close()
        except Exception:
            pass
        return succeed(None)


class _BatchingSink:
    """
    The queue shared by the network sinks: L{emit} only appends (or drops
    and counts when C{max_queue} records wait); a batch of up to
    C{batch_size} goes out C{flush_interval} seconds after the first record
    waits, or at once when a full batch waits, with never more than one
    batch in flight.  Subclasses send a batch in L{_send}.
    """

    name = ""

    def __init__(self, clock, batch_size: int, flush_interval: float, max_queue: int):
        self._clock = clock
        self._batch_size = batch_size
        self._flush_interval = flush_interval
        self._max_queue = max_queue
        self._queue: deque = deque()
        self._timer = None
        self._in_flight: Optional[Deferred] = None
        self._stopping = False
        self._failing = False
        self.dropped = 0
        self.written = 0
        self.batches = 0

    def emit(self, record: Dict[str, Any]) -> None:
        """
        Queue C{record} for the next batch; never waits, never raises.
        """
        if self._stopping or len(self._queue) >= self._max_queue:
            self.dropped += 1
            return
        self._queue.append(self._encode(record))
        self._schedule()

    @property
    def pending(self) -> int:
        """
        :return: records queued and not yet sent.
        """
        return len(self._queue)

    def _encode(self, record: Dict[str, Any]):
        return encode_record(record)

    def _schedule(self) -> None:
        if self._in_flight is not None or self._stopping or not self._queue:
            return
        delay = 0 if len(self._queue) >= self._batch_size else self._flush_interval
        if self._timer is not None and self._timer.active():
            if self._timer.getTime() <= self._clock.seconds() + delay:
                return
            self._timer.cancel()
        self._timer = self._clock.callLater(delay, self._flush)

    def _take(self) -> list:
        return [self._queue.popleft() for _ in range(min(len(self._queue), self._batch_size))]

    def _flush(self) -> None:
        self._timer = None
        if self._in_flight is not None or not self._queue:
            return
        self._in_flight = ensureDeferred(self._deliver(self._take()))
        self._in_flight.addBoth(self._delivered)

    def _delivered(self, _) -> None:
        self._in_flight = None
        self._schedule()

    async def _deliver(self, batch: list, timeout: Optional[float] = None) -> bool:
        self.batches += 1
        try:
            why = await self._send(batch, timeout)
        except Exception as e:
            why = type(e).__name__
        if why is None:
            self.written += len(batch)
            if self._failing:
                self._failing = False
                log.info("Call log: {sink} takes records again", sink=self._describe())
            return True
        self.dropped += len(batch)
        if not self._failing:
            self._failing = True
            log.warn("Call log: {sink} is not taking records ({why}); dropping them", sink=self._describe(), why=why)
        return False

    async def _send(self, batch: list, timeout: Optional[float]) -> Optional[str]:
        """
        Send one batch.

        :param timeout: seconds left before L{stop} gives up, or L{None}.
        :return: L{None} when sent, else a short reason (no secret).
        """
        raise NotImplementedError()

    def _describe(self) -> str:
        return self.name

    def stop(self) -> Deferred:
        """
        Stop taking records and send what is queued: the batch in flight may
        finish, then each queued batch gets one try, within C{stop_timeout}
        seconds (if set); after the first failure the rest is dropped.
        """
        return ensureDeferred(self._drain())

    _stop_timeout: Optional[float] = None

    def _interrupt(self) -> None:
        """Cut short anything the batch in flight is waiting for."""

    async def _close(self) -> None:
        """Release resources once the queue is drained."""

    async def _drain(self) -> None:
        self._stopping = True
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        self._interrupt()
        deadline = None if self._stop_timeout is None else self._clock.seconds() + self._stop_timeout
        if self._in_flight is not None:
            await self._in_flight
        while self._queue:
            left = None if deadline is None else deadline - self._clock.seconds()
            if (left is not None and left <= 0) or not await self._deliver(self._take(), left):
                break
        self.dropped += len(self._queue)
        self._queue.clear()
        await self._close()


@implementer(ICallSink)
class RedisStreamSink(_BatchingSink):
    """
    Appends records to the capped Redis stream C{<prefix>log}, in batches
    (one pipelined C{XADD <prefix>log MAXLEN ~ maxlen * call_id ... record
    <json>} per record).  A batch Redis does not take (down, slow, error) is
    dropped and counted, like records that find the queue full.

    :param redis: a L{dheera_tx.redis_client.RedisClient} (each call bounded
        by its timeout).
    :param prefix: the Redis key prefix (C{general_settings.redis_key_prefix}).
    :param clock: the reactor (for the flush timer).
    :param maxlen: approximate cap of the stream's length.
    :param batch_size: records per batch.
    :param flush_interval: the longest a record waits, in seconds.
    :param max_queue: records kept waiting.
    """

    name = "redis_stream"

    def __init__(self, redis, prefix: str, clock, maxlen: int = 10000, batch_size: int = 100,
                 flush_interval: float = 0.2, max_queue: int = 10000):
        super().__init__(clock, batch_size, flush_interval, max_queue)
        self._redis = redis
        self._maxlen = maxlen
        self.stream_key = prefix + "log"

    def _encode(self, record: Dict[str, Any]):
        return (record.get("call_id") or "", encode_record(record))

    def _describe(self) -> str:
        return f"Redis stream {self.stream_key}"

    async def _send(self, batch: list, timeout: Optional[float]) -> Optional[str]:
        xadd = ("XADD", self.stream_key, "MAXLEN", "~", self._maxlen, "*")
        try:
            await self._redis.pipeline([xadd + ("call_id", call_id, "record", line) for call_id, line in batch])
        except Exception as e:
            return type(e).__name__
        return None


def _target(url: str) -> str:
    """
    :return: C{scheme://host[:port]} of C{url}: a webhook's path or query
        may hold a token, so logs name only where it goes.
    """
    scheme, _, rest = url.partition("://")
    return scheme + "://" + rest.split("/", 1)[0].split("?", 1)[0].rpartition("@")[2]


@implementer(ICallSink)
class WebhookSink(_BatchingSink):
    """
    POSTs records to a URL as JSON arrays, in batches, through treq.

    At most one POST is in flight, each bounded by C{timeout}; a batch that
    fails (connection error, timeout, 408, 429 or 5xx) is retried after
    C{backoff}, twice that, four times that, ... up to C{max_attempts}
    tries, then dropped and counted.  Other statuses drop it at once.  A
    slow or hanging target never delays a call: L{emit} only queues.

    :param reactor: the reactor (timers and, for the default client,
        connections).
    :param url: where to POST.
    :param headers: extra request headers (e.g. C{Authorization}).
    :param batch_size: records per POST.
    :param flush_interval: the longest a record waits before its POST
        starts (when none is in flight), in seconds.
    :param max_queue: records kept waiting.
    :param max_attempts: tries per batch.
    :param backoff: seconds before the first retry.
    :param timeout: seconds one POST may take, response body included; also
        how long L{stop} may spend on what is queued.
    :param http_client: a L{treq.client.HTTPClient}; by default one on an
        C{Agent} with a connection pool of its own, closed by L{stop}.
    """

    name = "webhook"

    def __init__(self, reactor, url: str, headers: Optional[Dict[str, str]] = None, batch_size: int = 100,
                 flush_interval: float = 1.0, max_queue: int = 10000, max_attempts: int = 5,
                 backoff: float = 0.5, timeout: float = 10.0, http_client=None):
        super().__init__(reactor, batch_size, flush_interval, max_queue)
        self._url = url
        self._headers = {"Content-Type": "application/json"}
        for name, value in (headers or {}).items():
            self._headers = {k: v for k, v in self._headers.items() if k.lower() != name.lower()}
            self._headers[name] = value
        self._max_attempts = max_attempts
        self._backoff = backoff
        self._timeout = self._stop_timeout = timeout
        self._pool = None
        if http_client is None:
            http_client, self._pool = outbound_client(reactor, timeout, per_host=1)
        self._client = http_client
        self._pause = None
        self.posts = 0

    @property
    def delivered(self) -> int:
        """
        :return: records the target took (2xx).
        """
        return self.written

    def _describe(self) -> str:
        return f"webhook {_target(self._url)}"

    async def _send(self, batch: list, timeout: Optional[float]) -> Optional[str]:
        body = ("[" + ",".join(batch) + "]").encode("utf-8")
        attempt = 0
        while True:
            attempt += 1
            why, retry = await self._post_once(body, min(self._timeout, timeout or self._timeout))
            if why is None or not retry or attempt >= self._max_attempts or self._stopping:
                return why
            await self._sleep(self._backoff * 2 ** (attempt - 1))
            if self._stopping:
                # One last try on the way out.
                return (await self._post_once(body, self._timeout))[0]

    def _sleep(self, seconds: float) -> Deferred:
        d: Deferred = Deferred()
        self._pause = (d, self._clock.callLater(seconds, d.callback, None))
        return d

    def _interrupt(self) -> None:
        if self._pause is not None:
            d, call = self._pause
            self._pause = None
            if call.active():
                call.cancel()
                d.callback(None)

    async def _post_once(self, body: bytes, timeout: float):
        self.posts += 1
        d = Deferred.fromCoroutine(self._post(body))
        timed_out = []
        d.addTimeout(timeout, self._clock, onTimeoutCancel=lambda result, _: timed_out.append(True) or result)
        try:
            status = await d
        except Exception as e:
            return (f"no answer within {timeout:g} s" if timed_out else type(e).__name__), True
        if 200 <= status < 300:
            return None, False
        return f"HTTP {status}", status in (408, 429) or status >= 500

    async def _post(self, body: bytes) -> int:
        response = await self._client.post(
            self._url, data=body, headers=self._headers, allow_redirects=False, unbuffered=True, reactor=self._clock
        )
        # Read the answer to the end so that the connection can be reused.
        await treq.collect(response, lambda data: None)
        return response.code

    async def _close(self) -> None:
        if self._pool is not None:
            await self._pool.closeCachedConnections()


# -- configuration -----------------------------------------------------------

_SECTION = "dheera_ai_settings"


def _setting(config: ProxyConfig, name: str, check, default):
    settings = config.dheera_ai_settings or {}
    value = settings.get(name)
    if value is None:
        return default
    try:
        return check(value)
    except ValueError as e:
        raise ConfigError(str(e), path=config.path, where=f"{_SECTION}.{name}") from None


def _count(value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError("expected a whole number of at least 1")
    return value


def _seconds(value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 86400:
        raise ValueError("expected a number of seconds greater than 0")
    return float(value)


def _text(value) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValueError("expected a non-empty string")
    return value


def _url(value) -> str:
    if not isinstance(value, str):
        raise ValueError("expected an http:// or https:// URL")
    try:
        parts = urlsplit(value)
        parts.port
    except ValueError:
        raise ValueError("expected an http:// or https:// URL (it does not parse as one)") from None
    if parts.scheme.lower() not in ("http", "https") or not parts.hostname or any(c.isspace() for c in value):
        raise ValueError("expected an http:// or https:// URL")
    return value


def _headers(value) -> Dict[str, str]:
    if not isinstance(value, dict):
        raise ValueError("expected a mapping of header names to values")
    headers = {}
    for name, text in value.items():
        if not isinstance(name, str) or not re.fullmatch(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+", name):
            raise ValueError("a header name is not a valid HTTP token")
        if isinstance(text, bool) or not isinstance(text, (str, int, float)):
            raise ValueError(f"the value of header {name} must be a string")
        text = str(text)
        if any(c in text for c in "\r\n\x00"):
            raise ValueError(f"the value of header {name} holds a line break")
        headers[name] = text
    return headers


def build_sinks(config: ProxyConfig, reactor, redis_client=None, stdout: Optional[TextIO] = None) -> List[ICallSink]:
    """
    Make the sinks named in C{dheera_ai_settings.callbacks}, checking their
    settings: C{json_log_path}, C{redis_stream_maxlen}, C{webhook_url},
    C{webhook_headers} (a mapping), C{webhook_batch_size},
    C{webhook_flush_interval}, and optionally C{webhook_max_queue},
    C{webhook_max_attempts}, C{webhook_timeout}.

    :param config: the proxy configuration.
    :param reactor: the reactor.
    :param redis_client: the proxy's L{dheera_tx.redis_client.RedisClient}
        (needed by C{redis_stream}).
    :param stdout: where C{json_log} writes without C{json_log_path}
        (default the process's real stdout, C{sys.__stdout__}).
    :raise ConfigError: a setting is wrong (one line; values are never
        quoted, a webhook URL may hold a token).
    """
    sinks: List[ICallSink] = []
    for name in config.callbacks:
        if name == "json_log":
            path = _setting(config, "json_log_path", _text, None)
            try:
                sinks.append(JSONLogSink(stream=stdout, path=path))
            except OSError as e:
                raise ConfigError(
                    f"cannot open the file: {e.strerror or type(e).__name__}", path=config.path, where=f"{_SECTION}.json_log_path"
                ) from None
        elif name == "redis_stream":
            maxlen = _setting(config, "redis_stream_maxlen", _count, 10000)
            if redis_client is None:
                raise ConfigError("the redis_stream log sink needs Redis", path=config.path, where=f"{_SECTION}.callbacks")
            sinks.append(RedisStreamSink(redis_client, config.general.redis_key_prefix, reactor, maxlen=maxlen))
        elif name == "webhook":
            url = _setting(config, "webhook_url", _url, None)
            if url is None:
                raise ConfigError(
                    "missing; the webhook log sink needs the URL to POST records to",
                    path=config.path,
                    where=f"{_SECTION}.webhook_url",
                )
            sinks.append(
                WebhookSink(
                    reactor,
                    url,
                    headers=_setting(config, "webhook_headers", _headers, {}),
                    batch_size=_setting(config, "webhook_batch_size", _count, 100),
                    flush_interval=_setting(config, "webhook_flush_interval", _seconds, 1.0),
                    max_queue=_setting(config, "webhook_max_queue", _count, 10000),
                    max_attempts=_setting(config, "webhook_max_attempts", _count, 5),
                    timeout=_setting(config, "webhook_timeout", _seconds, 10.0),
                )
            )
        else:
            raise ConfigError(f"unknown log sink {name}", path=config.path, where=f"{_SECTION}.callbacks")
    return sinks


class CallLog:
    """
    Hands every finished call to the log sinks and the metrics.

    :param sinks: providers of L{ICallSink}.
    :param metrics: a L{dheera_tx.metrics.ProxyMetrics}, or L{None}; it is
        told about the sinks so that it can export their drop counters.
    """

    def __init__(self, sinks: Sequence[ICallSink] = (), metrics=None):
        self.sinks: List[ICallSink] = list(sinks)
        self._metrics = metrics
        if metrics is not None:
            metrics.add_sinks(self.sinks)

    def emit(self, call: Call) -> None:
        """
        Log one finished call.  Never raises.
        """
        if self._metrics is not None:
            try:
                self._metrics.observe_call(call)
            except Exception:
                log.failure("Metrics failed for call {call_id}", call_id=call.call_id)
        if not self.sinks:
            return
        try:
            record = call_record(call)
        except Exception:
            log.failure("Could not build the log record of call {call_id}", call_id=call.call_id)
            return
        for sink in self.sinks:
            try:
                sink.emit(record)
            except Exception:
                log.failure("Log sink {sink} failed", sink=getattr(sink, "name", repr(sink)))

    __call__ = emit

    def dropped(self) -> Dict[str, int]:
        """
        :return: records dropped so far, by sink name.
        """
        return {sink.name: sink.dropped for sink in self.sinks}

    def stop(self) -> Deferred:
        """
        Flush and stop every sink.

        :return: a Deferred that fires once all are done; never fails.
        """
        ds = []
        for sink in self.sinks:
            try:
                ds.append(Deferred.fromCoroutine(_settle(sink.stop())))
            except Exception:
                log.failure("Log sink {sink} failed to stop", sink=sink.name)
        return gatherResults(ds).addCallback(lambda _: None)


async def _settle(d: Deferred) -> None:
    try:
        await d
    except Exception:
        log.failure("A log sink failed while stopping")
