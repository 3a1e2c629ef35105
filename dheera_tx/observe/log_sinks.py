"""
Where call records go: the log sinks (C{callbacks} in C{dheera_ai_settings}).

A sink's C{emit} (L{ICallSink}) only queues or writes one line, never waits
on the network and never raises, so a slow or dead sink cannot slow a
request down.

* C{json_log}: L{JSONLogSink}, JSON lines on stdout or in
  C{json_log_path}.
* C{redis_stream}: L{RedisStreamSink}, the capped C{<prefix>log} stream.
* C{webhook}: L{WebhookSink}, batched POSTs of JSON arrays through treq,
  retried with exponential back-off.

The two network sinks share one batching queue, which drops (and counts)
records when it is full.  The records come from
L{dheera_tx.observe.call_log.call_record}; L{dheera_tx.observe.call_log.build_sinks} makes
the sinks from the configuration.
"""

import json
import sys
from collections import deque
from typing import Any, Dict, List, Optional, TextIO, Tuple

import treq
import treq.client
from twisted.internet.defer import Deferred, ensureDeferred, succeed
from twisted.logger import Logger
from zope.interface import Attribute, Interface, implementer

from dheera_tx.upstream.outbound import outbound_client

log = Logger()


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
        self._stream: TextIO
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

    :param redis: a L{dheera_tx.redis.client.RedisClient} (each call bounded
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
        self._pause: Optional[Tuple[Deferred, Any]] = None
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
        timed_out: List[bool] = []

        def on_timeout(result, _):
            timed_out.append(True)
            return result

        d.addTimeout(timeout, self._clock, onTimeoutCancel=on_timeout)
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
