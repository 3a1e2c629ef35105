"""
Tests for L{dheera_tx.observe.call_log} and L{dheera_tx.observe.log_sinks}: the call
record, its sinks (a JSON-lines file, a real redis-server's stream, a real
local webhook receiver over loopback, and a webhook target that never
answers), and that no secret reaches any of them.
"""

import io
import json
import time
from typing import List

from twisted.internet import reactor
from twisted.internet.defer import Deferred, succeed
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock, deferLater
from twisted.logger import globalLogPublisher
from twisted.protocols.policies import WrappingFactory
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.resource import Resource
from twisted.web.server import Site
from zope.interface.verify import verifyObject

from dheera_tx.call import Call
from dheera_tx.config import ConfigError, config_from_dict
from dheera_tx.observe.call_log import CallLog, build_sinks, call_record, scrub
from dheera_tx.observe.log_sinks import ICallSink, JSONLogSink, RedisStreamSink, WebhookSink
from dheera_tx.observe.metrics import ProxyMetrics
from dheera_tx.redis.client import connect
from tests.redis_server import RedisServer

CANARY = "sk-canary-4f1d9a7b2c3e5d6f8a9b"
RECORD_FIELDS = {
    "call_id", "time", "method", "path", "model_name", "deployment", "api_base", "routing_reason", "queued_ms", "status",
    "stream", "key_hash_prefix", "key_alias", "user_id", "team_id", "end_user", "prompt_tokens", "completion_tokens",
    "cached_tokens", "usage_estimated", "cost", "cost_nanos", "started_at", "first_byte_at", "ended_at", "ttfb_ms",
    "duration_ms", "overhead_ms", "bytes_in", "bytes_out", "error", "close_code", "attempts",
}


def make_call(n: int = 0, **fields) -> Call:
    """
    :return: a finished 200 chat call (its id ends in C{n}), with C{fields}
        overriding any attribute.
    """
    values = dict(
        call_id=f"call{n:04d}",
        method="POST",
        path="/vllm/v1/chat/completions",
        started_at=1700000000.0,
        model_name="chat",
        deployment="chat#0",
        api_base="http://127.0.0.1:8000",
        status=200,
        key_hash_prefix="0123456789ab",
        key_alias="team-a-key",
        user_id="u1",
        team_id="t1",
        end_user="enduser-7",
        prompt_tokens=9,
        completion_tokens=3,
        cost_nanos=3600,
        upstream_sent_at=1700000000.002,
        first_byte_at=1700000000.25,
        ended_at=1700000001.5,
        bytes_in=120,
        bytes_out=800,
    )
    values.update(fields)
    return Call(**values)


def canary_call() -> Call:
    """
    :return: a call whose every free-text field could carry the canary key.
    """
    return make_call(
        path=f"/vllm/key/info?key={CANARY}&api_key={CANARY}&token=tok-{CANARY}",
        error=f"upstream said Bearer {CANARY}",
        end_user=f"{CANARY}",
        model_name="chat",
    )


def wait_until(predicate, timeout: float = 5.0) -> Deferred:
    """
    :return: a Deferred that fires once C{predicate()} holds (polled every
        10 ms of real time), or fails after C{timeout} seconds.
    """

    async def poll():
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline:
                raise AssertionError("condition not reached in time")
            await deferLater(reactor, 0.01, lambda: None)

    return Deferred.fromCoroutine(poll())


class _Tracking(WrappingFactory):
    """
    Keeps the open connections of a server, to abort them and wait for
    their end.
    """

    def __init__(self, wrapped):
        super().__init__(wrapped)
        self.made = 0
        self._idle: List[Deferred] = []

    def registerProtocol(self, p):
        super().registerProtocol(p)
        self.made += 1

    def unregisterProtocol(self, p):
        super().unregisterProtocol(p)
        if not self.protocols:
            idle, self._idle = self._idle, []
            for d in idle:
                d.callback(None)

    def when_idle(self) -> Deferred:
        """
        :return: a Deferred that fires once no connection is open.
        """
        if not self.protocols:
            return succeed(None)
        d = Deferred()
        self._idle.append(d)
        return d


class LoopbackServer:
    """
    A server on 127.0.0.1 for one test; L{stop} closes the port and every
    connection.
    """

    def __init__(self, factory):
        self.factory = _Tracking(factory)
        self.port = None
        self.url = ""

    async def start(self) -> "LoopbackServer":
        """
        Listen on a free loopback port; L{url} says where.
        """
        self.port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(self.factory)
        self.url = f"http://127.0.0.1:{self.port.getHost().port}"
        return self

    async def stop(self) -> None:
        """
        Close the port, abort every connection and wait until they are gone.
        """
        if self.port is not None:
            await self.port.stopListening()
        for p in list(self.factory.protocols):
            p.transport.abortConnection()
        await self.factory.when_idle()


class _Collect(Resource):
    isLeaf = True

    def __init__(self, receiver):
        super().__init__()
        self._receiver = receiver

    def render_POST(self, request):
        body = request.content.read()
        self._receiver.posts.append((dict((k.decode().lower(), v[-1].decode()) for k, v in request.requestHeaders.getAllRawHeaders()), body))
        status = self._receiver.statuses.pop(0) if self._receiver.statuses else 200
        request.setResponseCode(status)
        return b"ok"


class WebhookReceiver(LoopbackServer):
    """
    A real twisted.web server that records every POST.

    :ivar posts: C{(headers, body)} of each POST, in order.
    :ivar statuses: statuses to answer, one per POST, then 200.
    """

    def __init__(self):
        self.posts: list = []
        self.statuses: List[int] = []
        site = Site(_Collect(self), timeout=None)
        site.log = lambda request: None
        super().__init__(site)

    def batches(self) -> List[list]:
        """
        :return: the JSON array of each POST.
        """
        return [json.loads(body) for _, body in self.posts]


class HangingServer(LoopbackServer):
    """
    Accepts connections, reads whatever comes, never answers.
    """

    def __init__(self):
        super().__init__(Factory.forProtocol(Protocol))


class CallRecordTests(SynchronousTestCase):
    """
    Tests for L{call_record} and L{scrub}.
    """

    def test_every_field(self):
        """
        The record holds exactly the SPEC 7 fields, with times derived from
        the call: ISO-8601 UTC time, TTFB, duration, overhead and cost.
        """
        record = call_record(make_call())
        self.assertEqual(set(record), RECORD_FIELDS)
        self.assertEqual(record["time"], "2023-11-14T22:13:20.000Z")
        self.assertEqual(record["ttfb_ms"], 250.0)
        self.assertEqual(record["duration_ms"], 1500.0)
        self.assertAlmostEqual(record["overhead_ms"], 2.0, places=2)
        self.assertEqual(record["cost_nanos"], 3600)
        self.assertAlmostEqual(record["cost"], 0.0000036)
        self.assertEqual((record["prompt_tokens"], record["completion_tokens"]), (9, 3))
        self.assertEqual(json.loads(json.dumps(record)), record)

    def test_unfinished_times_are_null(self):
        """
        A call that never got a first byte has null TTFB, and one without an
        end has a null duration.
        """
        record = call_record(make_call(first_byte_at=None, ended_at=None, upstream_sent_at=None))
        self.assertIsNone(record["ttfb_ms"])
        self.assertIsNone(record["duration_ms"])
        self.assertEqual(record["overhead_ms"], 0.0)

    def test_query_secrets_redacted(self):
        """
        Values of C{key=}, C{api_key=} and C{token=} in a query string are
        redacted, whatever their case; other parameters stay.
        """
        self.assertEqual(
            scrub("/key/info?key=abc&x=1&API_KEY=def;token=ghi"),
            "/key/info?key=[redacted]&x=1&API_KEY=[redacted];token=[redacted]",
        )
        record = call_record(canary_call())
        self.assertNotIn(CANARY, json.dumps(record))
        self.assertIn("key=[redacted]", record["path"])

    def test_key_shapes_redacted(self):
        """
        Anything shaped like an C{sk-} key is redacted from free text.
        """
        self.assertEqual(scrub(f"Bearer {CANARY} failed"), "Bearer [redacted] failed")
        self.assertIsNone(scrub(None))


class JSONLogSinkTests(SynchronousTestCase):
    """
    Tests for L{JSONLogSink}.
    """

    def test_lines_to_file(self):
        """
        Each record is one JSON line appended to the file, readable before
        the sink stops; L{JSONLogSink.stop} closes the file.
        """
        path = self.mktemp()
        sink = JSONLogSink(path=path)
        verifyObject(ICallSink, sink)
        sink.emit(call_record(make_call(1)))
        sink.emit(call_record(make_call(2)))
        with open(path) as f:
            lines = f.read().splitlines()
        self.assertEqual([json.loads(line)["call_id"] for line in lines], ["call0001", "call0002"])
        self.successResultOf(sink.stop())
        self.assertEqual(sink.dropped, 0)

    def test_stream(self):
        """
        Without a path, lines go to the given stream.
        """
        out = io.StringIO()
        sink = JSONLogSink(stream=out)
        sink.emit(call_record(make_call(3)))
        self.assertEqual(json.loads(out.getvalue())["call_id"], "call0003")

    def test_failed_write_counted(self):
        """
        A write that fails (closed stream) is counted as dropped, not raised.
        """
        out = io.StringIO()
        out.close()
        sink = JSONLogSink(stream=out)
        sink.emit(call_record(make_call()))
        self.assertEqual(sink.dropped, 1)


class _BrokenSink:
    name = "broken"
    dropped = 0

    def emit(self, record):
        raise RuntimeError("boom")

    def stop(self):
        return succeed(None)


class CallLogTests(SynchronousTestCase):
    """
    Tests for L{CallLog}.
    """

    def test_failing_sink_isolated(self):
        """
        A sink that raises neither stops the other sinks nor reaches the
        caller; the metrics see the call too.
        """
        out = io.StringIO()
        metrics = ProxyMetrics()
        calls = CallLog([_BrokenSink(), JSONLogSink(stream=out)], metrics=metrics)
        calls.emit(make_call(5))
        self.assertEqual(json.loads(out.getvalue())["call_id"], "call0005")
        self.assertEqual(metrics.registry.get_sample_value("dheera_requests_total", {"route": "/v1/chat/completions", "model": "chat", "status": "200"}), 1.0)
        self.flushLoggedErrors(RuntimeError)

    def test_dropped_by_sink(self):
        """
        L{CallLog.dropped} reports each sink's drop counter by name.
        """
        clock = Clock()
        redis_sink = RedisStreamSink(None, "p:", clock, max_queue=1)
        calls = CallLog([redis_sink])
        calls.emit(make_call(1))
        calls.emit(make_call(2))
        self.assertEqual(calls.dropped(), {"redis_stream": 1})


class BuildSinksTests(SynchronousTestCase):
    """
    Tests for L{build_sinks}: settings and their one-line errors.
    """

    def config(self, **settings):
        """
        :return: a config whose C{dheera_ai_settings} is C{settings}.
        """
        return config_from_dict({"dheera_ai_settings": settings})

    def test_sinks_in_order(self):
        """
        The sinks named in C{callbacks} are built in order, with their
        settings.
        """
        path = self.mktemp()
        config = self.config(
            callbacks=["webhook", "json_log", "redis_stream"],
            json_log_path=path,
            webhook_url="https://hooks.example/in",
            webhook_headers={"Authorization": "Bearer x"},
            webhook_batch_size=5,
            webhook_flush_interval=0.5,
            redis_stream_maxlen=50,
        )
        sinks = build_sinks(config, Clock(), redis_client=object())
        self.assertEqual([s.name for s in sinks], ["webhook", "json_log", "redis_stream"])
        self.assertEqual(sinks[2].stream_key, "dheera:log")
        for sink in sinks:
            self.successResultOf(sink.stop())

    def test_webhook_needs_url(self):
        """
        The webhook sink without C{webhook_url} is a one-line config error
        naming the setting.
        """
        e = self.assertRaises(ConfigError, build_sinks, self.config(callbacks=["webhook"]), Clock())
        self.assertIn("dheera_ai_settings.webhook_url", str(e))
        self.assertNotIn("\n", str(e))

    def test_bad_values(self):
        """
        Wrong types and ranges are config errors naming the setting, never
        quoting the value (a webhook URL may carry a token).
        """
        cases = [
            (dict(webhook_url=f"ftp://x/{CANARY}"), "webhook_url"),
            (dict(webhook_url="https://h/", webhook_batch_size=0), "webhook_batch_size"),
            (dict(webhook_url="https://h/", webhook_batch_size=True), "webhook_batch_size"),
            (dict(webhook_url="https://h/", webhook_flush_interval="soon"), "webhook_flush_interval"),
            (dict(webhook_url="https://h/", webhook_headers=["a"]), "webhook_headers"),
            (dict(webhook_url="https://h/", webhook_headers={"X": "a\r\nb"}), "webhook_headers"),
        ]
        for settings, field in cases:
            e = self.assertRaises(ConfigError, build_sinks, self.config(callbacks=["webhook"], **settings), Clock())
            self.assertIn(f"dheera_ai_settings.{field}", str(e))
            self.assertNotIn(CANARY, str(e))
        e = self.assertRaises(
            ConfigError, build_sinks, self.config(callbacks=["redis_stream"], redis_stream_maxlen=-1), Clock(), object()
        )
        self.assertIn("redis_stream_maxlen", str(e))

    def test_unwritable_log_path(self):
        """
        A C{json_log_path} that cannot be opened is a config error.
        """
        config = self.config(callbacks=["json_log"], json_log_path=self.mktemp() + "/missing/dir/log.jsonl")
        e = self.assertRaises(ConfigError, build_sinks, config, Clock())
        self.assertIn("json_log_path", str(e))

    def test_redis_stream_needs_redis(self):
        """
        C{redis_stream} without a Redis client is a config error.
        """
        e = self.assertRaises(ConfigError, build_sinks, self.config(callbacks=["redis_stream"]), Clock(), None)
        self.assertIn("redis_stream", str(e))


class RedisStreamSinkTests(TestCase):
    """
    L{RedisStreamSink} against a real redis-server (small stream nodes, so
    that approximate trimming shows).
    """

    def setUp(self):
        self.server = RedisServer(extra=["--stream-node-max-entries", "4"]).start()
        self.addCleanup(self.server.cleanup)
        self.redis = connect(reactor, self.server.url, timeout=0.3)
        self.addCleanup(self.redis.disconnect)

    async def test_records_in_stream(self):
        """
        Records land in C{<prefix>log} in order, each with its call id and
        the JSON record, within the flush interval; batches hold up to
        C{batch_size} records.
        """
        sink = RedisStreamSink(self.redis, "dx:", reactor, batch_size=10, flush_interval=0.05)
        verifyObject(ICallSink, sink)
        for n in range(25):
            sink.emit(call_record(make_call(n)))
        await wait_until(lambda: sink.written == 25)
        entries = self.server.command("XRANGE", "dx:log", "-", "+")
        self.assertEqual(len(entries), 25)
        fields = dict(zip(entries[0][1][::2], entries[0][1][1::2]))
        self.assertEqual(fields["call_id"], "call0000")
        self.assertEqual(set(json.loads(fields["record"])), RECORD_FIELDS)
        self.assertEqual([dict(zip(e[1][::2], e[1][1::2]))["call_id"] for e in entries], [f"call{n:04d}" for n in range(25)])
        self.assertEqual(sink.dropped, 0)
        await sink.stop()

    async def test_maxlen(self):
        """
        The stream is capped near C{maxlen} (C{MAXLEN ~}: at most one stream
        node more).
        """
        sink = RedisStreamSink(self.redis, "dx:", reactor, maxlen=10, batch_size=7, flush_interval=0.01)
        for n in range(100):
            sink.emit(call_record(make_call(n)))
        await sink.stop()
        length = self.server.command("XLEN", "dx:log")
        self.assertTrue(10 <= length <= 14, length)
        self.assertEqual(sink.written, 100)

    async def test_redis_down_drops(self):
        """
        With Redis gone, records are dropped and counted; L{emit} stays
        synchronous and never raises; stop does not wait out one timeout per
        batch.
        """
        sink = RedisStreamSink(self.redis, "dx:", reactor, batch_size=5, flush_interval=0.01)
        sink.emit(call_record(make_call(0)))
        await wait_until(lambda: sink.written == 1)
        self.server.kill()
        for n in range(1, 26):
            self.assertIsNone(sink.emit(call_record(make_call(n))))
        await wait_until(lambda: sink.dropped >= 5)
        started = time.monotonic()
        await sink.stop()
        # One 1 s Redis timeout, not one per batch (5 s and more).
        self.assertLess(time.monotonic() - started, 4.0)
        self.assertEqual(sink.dropped + sink.written, 26)

    def test_queue_bound(self):
        """
        A full queue drops new records and counts them.
        """
        sink = RedisStreamSink(self.redis, "dx:", reactor, max_queue=3, flush_interval=60)
        for n in range(8):
            sink.emit(call_record(make_call(n)))
        self.assertEqual((sink.pending, sink.dropped), (3, 5))
        return sink.stop()


class WebhookSinkTests(TestCase):
    """
    L{WebhookSink} against real local servers over loopback, through its
    default treq client.
    """

    async def receiver(self) -> WebhookReceiver:
        """
        :return: a started receiver, stopped at cleanup.
        """
        receiver = await WebhookReceiver().start()
        self.addCleanup(receiver.stop)
        return receiver

    def sink(self, url: str, **kwargs) -> WebhookSink:
        """
        :return: a sink to C{url}, stopped at cleanup.
        """
        kwargs.setdefault("flush_interval", 0.02)
        kwargs.setdefault("backoff", 0.02)
        sink = WebhookSink(reactor, url, **kwargs)
        self.addCleanup(sink.stop)
        return sink

    async def test_batches(self):
        """
        Records are POSTed as JSON arrays of at most C{batch_size}, in order,
        with the configured headers and a JSON content type.
        """
        receiver = await self.receiver()
        sink = self.sink(receiver.url + "/in", headers={"X-Hook-Token": "t0k"}, batch_size=3)
        verifyObject(ICallSink, sink)
        for n in range(7):
            sink.emit(call_record(make_call(n)))
        await wait_until(lambda: sink.delivered == 7)
        batches = receiver.batches()
        self.assertEqual([len(b) for b in batches], [3, 3, 1])
        self.assertEqual([r["call_id"] for b in batches for r in b], [f"call{n:04d}" for n in range(7)])
        headers = receiver.posts[0][0]
        self.assertEqual((headers["x-hook-token"], headers["content-type"]), ("t0k", "application/json"))

    async def test_retry_after_500(self):
        """
        A batch answered with 500 is sent again after a back-off and then
        counted as delivered.
        """
        receiver = await self.receiver()
        receiver.statuses = [500, 503]
        sink = self.sink(receiver.url, batch_size=10)
        for n in range(4):
            sink.emit(call_record(make_call(n)))
        await wait_until(lambda: sink.delivered == 4)
        self.assertEqual(len(receiver.posts), 3)
        self.assertEqual(receiver.batches()[0], receiver.batches()[2])
        self.assertEqual(sink.dropped, 0)

    async def test_gives_up(self):
        """
        After C{max_attempts} failures the batch is dropped and counted; a
        4xx other than 408/429 is not retried.
        """
        receiver = await self.receiver()
        receiver.statuses = [500, 500, 400]
        sink = self.sink(receiver.url, batch_size=2, max_attempts=2)
        sink.emit(call_record(make_call(1)))
        sink.emit(call_record(make_call(2)))
        await wait_until(lambda: sink.dropped == 2)
        sink.emit(call_record(make_call(3)))
        await wait_until(lambda: sink.dropped == 3)
        self.assertEqual(len(receiver.posts), 3)
        sink.emit(call_record(make_call(4)))
        await wait_until(lambda: sink.delivered == 1)

    async def test_closed_port_retried_then_dropped(self):
        """
        A target that refuses connections costs retries, then a drop.
        """
        receiver = await WebhookReceiver().start()
        url = receiver.url
        await receiver.stop()
        sink = self.sink(url, max_attempts=3)
        sink.emit(call_record(make_call()))
        await wait_until(lambda: sink.dropped == 1)
        self.assertEqual(sink.posts, 3)

    async def test_hanging_target(self):
        """
        While a POST hangs on a target that never answers, L{CallLog.emit}
        returns at once (nothing waits: the JSON sink beside it has every
        line before the reactor runs again), the webhook queue stays bounded
        and counts what it drops, and L{WebhookSink.stop} gives up after
        its timeout.
        """
        target = await HangingServer().start()
        self.addCleanup(target.stop)
        webhook = WebhookSink(reactor, target.url, batch_size=2, flush_interval=0.01, max_queue=50, timeout=0.5)
        self.addCleanup(webhook.stop)
        out = io.StringIO()
        calls = CallLog([webhook, JSONLogSink(stream=out)])
        calls.emit(make_call(0))
        await wait_until(lambda: target.factory.made == 1 and webhook.pending == 0)
        started = time.monotonic()
        results = [calls.emit(make_call(n)) for n in range(1, 1001)]
        elapsed = time.monotonic() - started
        self.assertEqual(results, [None] * 1000)
        self.assertEqual(len(out.getvalue().splitlines()), 1001)
        # Synchronous: never waits for the hanging webhook (which would
        # take its 0.5 s timeout per batch).
        self.assertLess(elapsed, 5.0)
        self.assertEqual((webhook.pending, webhook.dropped), (50, 950))
        started = time.monotonic()
        await webhook.stop()
        # One 0.5 s timeout, not one per batch (12 s and more).
        self.assertLess(time.monotonic() - started, 6.0)
        self.assertEqual(webhook.delivered, 0)
        self.assertEqual(webhook.dropped, 1001)


class CanaryTests(TestCase):
    """
    A key planted in every field of a call that could carry one never shows
    in any sink's output, the debug log line, or the metrics text.
    """

    async def test_canary_never_written(self):
        """
        The canary is absent from the JSON log file, the Redis stream, the
        webhook's POST bodies, the twisted.logger events, and /metrics.
        """
        server = RedisServer().start()
        self.addCleanup(server.cleanup)
        redis = connect(reactor, server.url, timeout=0.5)
        self.addCleanup(redis.disconnect)
        receiver = await WebhookReceiver().start()
        self.addCleanup(receiver.stop)
        path = self.mktemp()
        config = config_from_dict(
            {
                "model_list": [{"model_name": "chat", "dheera_ai_params": {"model": "hosted_vllm/q", "api_base": "http://127.0.0.1:9", "api_key": CANARY}}],
                "dheera_ai_settings": {
                    "callbacks": ["json_log", "redis_stream", "webhook"],
                    "json_log_path": path,
                    "webhook_url": receiver.url,
                    "webhook_flush_interval": 0.01,
                },
            }
        )
        events = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        metrics = ProxyMetrics(config=config)
        calls = CallLog(build_sinks(config, reactor, redis), metrics=metrics)
        calls.emit(canary_call())
        calls.emit(make_call(2, model_name=CANARY, path=f"/vllm/{CANARY}", key_alias=CANARY))
        await calls.stop()
        self.assertEqual(len(receiver.posts), 1)
        with open(path) as f:
            written = {
                "file": f.read(),
                "stream": json.dumps(server.command("XRANGE", "dheera:log", "-", "+")),
                "webhook": b"".join(body for _, body in receiver.posts).decode(),
                "metrics": metrics.render()[0].decode(),
                "log": repr([{k: v for k, v in e.items() if k != "log_logger"} for e in events]),
            }
        self.assertIn("call0002", written["file"] + written["stream"] + written["webhook"])
        for where, text in written.items():
            self.assertNotIn(CANARY, text, where)
            self.assertNotIn(CANARY[3:], text, where)


class CallIdTests(SynchronousTestCase):
    """
    L{dheera_tx.call.new_call_id}.
    """

    def test_unique_hex(self):
        """
        Call ids are 32 lower-case hex digits and do not repeat (100,000
        in a row).
        """
        from dheera_tx.call import new_call_id

        ids = [new_call_id() for _ in range(100_000)]
        self.assertEqual(len(set(ids)), len(ids))
        for call_id in ids[:100]:
            self.assertRegex(call_id, r"^[0-9a-f]{32}$")

    def test_forked_child_draws_its_own_prefix(self):
        """
        A process forked after ids were drawn (a worker) gets a different
        id prefix, so parent and child never hand out the same id.
        """
        import os

        from dheera_tx.call import new_call_id

        parent_id = new_call_id()
        read_end, write_end = os.pipe()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - runs in the child
            try:
                os.write(write_end, new_call_id().encode("ascii"))
            finally:
                os._exit(0)
        os.close(write_end)
        child_id = os.read(read_end, 64).decode("ascii")
        os.close(read_end)
        os.waitpid(pid, 0)
        self.assertRegex(child_id, r"^[0-9a-f]{32}$")
        self.assertNotEqual(child_id[:16], parent_id[:16])
