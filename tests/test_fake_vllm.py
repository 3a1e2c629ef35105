"""
Self-tests of the fake vLLM upstream, over real loopback sockets.
"""

import gzip
import json
import socket
from io import BytesIO
from typing import Any, Optional

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.protocol import Protocol
from twisted.internet.task import deferLater
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.client import (
    Agent,
    FileBodyProducer,
    HTTPConnectionPool,
    ResponseDone,
    ResponseFailed,
    ResponseNeverReceived,
)
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers
from twisted.web.iweb import IBodyProducer
from zope.interface import implementer

from tests import fake_vllm
from tests.fake_vllm import MAX_KEPT_BODY, FakeVLLM, parse_faults


class _Collector(Protocol):
    """
    Collects a response body, noting when each piece arrived.
    """

    def __init__(self, done: Deferred) -> None:
        self.done = done
        self.pieces: list = []
        self.arrivals: list = []

    def dataReceived(self, data: bytes) -> None:
        self.pieces.append(data)
        self.arrivals.append(reactor.seconds())

    def connectionLost(self, reason: Any) -> None:
        if reason.check(ResponseDone, PotentialDataLoss):
            self.done.callback(self)
        else:
            self.done.errback(reason)

    @property
    def body(self) -> bytes:
        return b"".join(self.pieces)


@implementer(IBodyProducer)
class _SlowBody:
    """
    A request body sent in pieces with a pause between them.
    """

    def __init__(self, pieces: list, gap: float) -> None:
        self.pieces = pieces
        self.gap = gap
        self.length = sum(len(p) for p in pieces)
        self._call: Any = None

    def startProducing(self, consumer: Any) -> Deferred:
        done: Deferred = Deferred()

        def send(i: int) -> None:
            self._call = None
            if i == len(self.pieces):
                done.callback(None)
                return
            consumer.write(self.pieces[i])
            self._call = reactor.callLater(self.gap, send, i + 1)

        send(0)
        return done

    def stopProducing(self) -> None:
        if self._call is not None and self._call.active():
            self._call.cancel()

    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass


class _RawReader(Protocol):
    """
    A raw HTTP client with a small receive buffer that can stop reading.
    """

    def __init__(self) -> None:
        self.received = 0
        self.closed: Deferred = Deferred()

    def connectionMade(self) -> None:
        self.transport.getHandle().setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)

    def dataReceived(self, data: bytes) -> None:
        self.received += len(data)

    def connectionLost(self, reason: Any) -> None:
        self.closed.callback(self.received)


class FakeVLLMTests(TestCase):
    """
    Tests for L{FakeVLLM} through a real Agent over loopback.
    """

    def setUp(self) -> Deferred:
        self.fake = FakeVLLM(reactor)
        self.addCleanup(self.fake.stop)
        pool = HTTPConnectionPool(reactor)
        self.addCleanup(pool.closeCachedConnections)
        self.agent = Agent(reactor, pool=pool)
        return self.fake.start()

    def request(self, method: bytes, path: str, body: Any = None,
                headers: Optional[dict] = None) -> Deferred:
        """
        :param body: bytes, an IBodyProducer, or ``None``.
        :return: a Deferred firing with ``(response, collector)``.
        """
        if isinstance(body, bytes):
            body = FileBodyProducer(BytesIO(body))
        raw = Headers({k: [v] for k, v in (headers or {}).items()})

        async def go() -> tuple:
            response = await self.agent.request(
                method, (self.fake.url + path).encode("ascii"), raw, body)
            done: Deferred = Deferred()
            response.deliverBody(_Collector(done))
            return response, await done

        return Deferred.fromCoroutine(go())

    def post_json(self, path: str, payload: Any, headers: Optional[dict] = None) -> Deferred:
        """
        :return: :meth:`request` for a JSON POST of ``payload``.
        """
        all_headers = {"content-type": "application/json"}
        all_headers.update(headers or {})
        return self.request(b"POST", path, json.dumps(payload).encode(), all_headers)

    async def test_chat_stream_framing_and_usage_chunk(self) -> None:
        """
        A streamed chat answer is text/event-stream of ``data: {json}\\n\\n``
        events: a role chunk, one chunk per token, a finish chunk, the
        include_usage chunk (``choices: []``, usage, system_fingerprint) and
        ``[DONE]``; only the usage chunk carries usage.
        """
        response, body = await self.post_json("/v1/chat/completions", {
            "model": "tiny", "stream": True, "max_tokens": 3,
            "stream_options": {"include_usage": True},
            "messages": [{"role": "user", "content": "hello there world"}]})
        self.assertEqual(response.code, 200)
        self.assertTrue(response.headers.getRawHeaders(b"content-type")[0]
                        .startswith(b"text/event-stream"))
        events = body.body.split(b"\n\n")
        self.assertEqual(events[-1], b"")
        self.assertEqual(events[-2], b"data: [DONE]")
        for event in events[:-1]:
            self.assertTrue(event.startswith(b"data: "), event)
        chunks = [json.loads(e[len(b"data: "):]) for e in events[:-2]]
        self.assertEqual(len(chunks), 6)
        self.assertEqual(chunks[0]["choices"][0]["delta"]["role"], "assistant")
        self.assertEqual([c["choices"][0]["delta"]["content"] for c in chunks[1:4]],
                         ["tok0 ", "tok1 ", "tok2 "])
        self.assertEqual(chunks[4]["choices"][0]["finish_reason"], "length")
        self.assertEqual(chunks[5]["choices"], [])
        self.assertEqual(chunks[5]["usage"],
                         {"prompt_tokens": 3, "total_tokens": 6, "completion_tokens": 3})
        self.assertIn("system_fingerprint", chunks[5])
        self.assertEqual([c for c in chunks[:5] if "usage" in c], [])
        self.assertEqual({c["id"] for c in chunks}, {chunks[0]["id"]})
        self.assertEqual({c["object"] for c in chunks}, {"chat.completion.chunk"})

    async def test_slow_chunks_writes_events_separately(self) -> None:
        """
        With ``slow_chunks`` and ``continuous_usage_stats``, completion
        events arrive one at a time, spaced out, each with a running usage.
        """
        response, body = await self.post_json("/v1/completions", {
            "prompt": "a b", "stream": True, "max_tokens": 4,
            "stream_options": {"include_usage": True, "continuous_usage_stats": True}},
            {"x-fake-fault": "slow_chunks=0.05"})
        events = [e for e in body.body.split(b"\n\n") if e]
        self.assertEqual(len(events), 7)
        self.assertGreaterEqual(len(body.arrivals), 7)
        self.assertGreaterEqual(body.arrivals[-1] - body.arrivals[0], 0.2)
        chunks = [json.loads(e[len(b"data: "):]) for e in events[:-1]]
        self.assertEqual([c["usage"]["completion_tokens"] for c in chunks], [1, 2, 3, 4, 4, 4])
        self.assertEqual(chunks[0]["object"], "text_completion")

    async def test_non_stream_usage(self) -> None:
        """
        Non-streamed chat and completions carry deterministic usage: prompt
        tokens are the words of every message part or prompt string,
        completion tokens are ``max_tokens`` or 8; the answer echoes the
        request id and its index.
        """
        response, body = await self.post_json("/v1/chat/completions", {
            "messages": [{"role": "system", "content": "x y"},
                         {"role": "user", "content": [{"type": "text", "text": "a b"},
                                                      {"type": "text", "text": "c"}]}]},
            {"x-request-id": "abc"})
        answer = json.loads(body.body)
        self.assertEqual(answer["usage"], {"prompt_tokens": 5, "total_tokens": 13,
                                           "completion_tokens": 8, "prompt_tokens_details": None})
        self.assertEqual(answer["choices"][0]["message"]["content"],
                         "".join(f"tok{i} " for i in range(8)))
        self.assertEqual(answer["id"], "chatcmpl-abc")
        self.assertEqual(response.headers.getRawHeaders(b"x-request-id"), [b"abc"])
        self.assertEqual(response.headers.getRawHeaders(b"x-fake-request-index"), [b"0"])
        self.assertEqual(response.headers.getRawHeaders(b"content-type"), [b"application/json"])
        self.assertEqual(response.length, len(body.body))
        response, body = await self.post_json(
            "/v1/completions", {"prompt": ["one two", "three"], "max_tokens": 2})
        self.assertEqual(json.loads(body.body)["usage"]["prompt_tokens"], 3)
        self.assertEqual(json.loads(body.body)["usage"]["completion_tokens"], 2)
        self.assertEqual(response.headers.getRawHeaders(b"x-fake-request-index"), [b"1"])
        self.assertEqual(self.fake.received[1].json["prompt"], ["one two", "three"])

    async def test_not_found(self) -> None:
        """
        An unknown path gives FastAPI's 404; an unknown model gives vLLM's
        404 NotFoundError with ``param: model``.
        """
        response, body = await self.request(b"GET", "/v1/nope?x=1")
        self.assertEqual((response.code, json.loads(body.body)), (404, {"detail": "Not Found"}))
        self.assertEqual(self.fake.received[0].uri, b"/v1/nope?x=1")
        response, body = await self.post_json("/v1/embeddings", {"model": "big", "input": "a"})
        self.assertEqual(response.code, 404)
        self.assertEqual(json.loads(body.body), {"error": {
            "message": "The model `big` does not exist.", "type": "NotFoundError",
            "param": "model", "code": 404}})

    async def test_max_tokens_outside_context_refused(self) -> None:
        """
        Like vLLM, a C{max_tokens} (or C{max_completion_tokens}) above the
        model's context, or below 1, is a 400 BadRequestError naming it,
        answered at once (nothing is generated); the largest allowed is
        generated.
        """
        for path, key, value in (
            ("/v1/completions", "max_tokens", 10**23),
            ("/v1/chat/completions", "max_completion_tokens", 513),
            ("/v1/chat/completions", "max_tokens", 0),
        ):
            document = {key: value, "prompt": "a", "messages": [{"role": "user", "content": "a"}]}
            response, body = await self.post_json(path, document)
            error = json.loads(body.body)["error"]
            self.assertEqual((response.code, error["type"], error["param"], error["code"]), (400, "BadRequestError", key, 400))
        response, body = await self.post_json("/v1/completions", {"prompt": "a", "max_tokens": 512})
        self.assertEqual(json.loads(body.body)["usage"]["completion_tokens"], 512)

    async def test_api_key_and_content_type(self) -> None:
        """
        With an api_key, /v1 paths need the bearer key (401 with vLLM's flat
        body otherwise) while /health does not; a JSON route refuses another
        content type with 400 "Bad Request".
        """
        self.fake.api_key = "sk-up"
        response, body = await self.request(b"GET", "/v1/models")
        self.assertEqual((response.code, json.loads(body.body)), (401, {"error": "Unauthorized"}))
        response, body = await self.request(b"GET", "/v1/models",
                                            headers={"authorization": "bearer sk-up"})
        self.assertEqual(json.loads(body.body)["data"][0]["id"], "tiny")
        response, body = await self.request(b"GET", "/health")
        self.assertEqual((response.code, body.body), (200, b""))
        response, body = await self.request(b"POST", "/tokenize", b"{}", {"content-type": "text/plain"})
        self.assertEqual(response.code, 400)
        self.assertEqual(json.loads(body.body)["error"]["type"], "Bad Request")

    async def test_status_and_gzip_faults(self) -> None:
        """
        ``status=503`` answers vLLM's error shape with that status; ``gzip``
        answers JSON compressed, with Content-Encoding: gzip.
        """
        self.fake.fault = "status=503"
        response, body = await self.post_json("/v1/chat/completions", {"messages": []})
        self.assertEqual(response.code, 503)
        self.assertEqual(json.loads(body.body)["error"]["code"], 503)
        response, body = await self.request(b"GET", "/version", headers={"x-fake-fault": "gzip"})
        self.assertEqual(response.headers.getRawHeaders(b"content-encoding"), [b"gzip"])
        self.assertEqual(json.loads(gzip.decompress(body.body)), {"version": "0.32.0"})

    async def test_responses_stream(self) -> None:
        """
        A streamed /v1/responses answer is named events ending with
        response.completed, whose usage counts input and output tokens;
        there is no [DONE].
        """
        response, body = await self.post_json("/v1/responses", {
            "input": "one two three", "instructions": "be", "stream": True,
            "max_output_tokens": 2})
        events = [e for e in body.body.split(b"\n\n") if e]
        kinds = [e.split(b"\n")[0] for e in events]
        self.assertEqual(kinds[0], b"event: response.created")
        self.assertEqual(kinds.count(b"event: response.output_text.delta"), 2)
        self.assertEqual(kinds[-1], b"event: response.completed")
        self.assertNotIn(b"[DONE]", body.body)
        last = json.loads(events[-1].split(b"\ndata: ", 1)[1])
        self.assertEqual(last["response"]["usage"]["input_tokens"], 4)
        self.assertEqual(last["response"]["usage"]["output_tokens"], 2)
        self.assertEqual(last["response"]["usage"]["total_tokens"], 6)

    async def test_transcription_form(self) -> None:
        """
        A multipart transcription is parsed into ``form`` and answered with
        a duration usage.
        """
        parts = [b'--XyZ\r\nContent-Disposition: form-data; name="model"\r\n\r\ntiny\r\n',
                 b'--XyZ\r\nContent-Disposition: form-data; name="file"; filename="a.wav"\r\n'
                 b"Content-Type: audio/wav\r\n\r\n" + b"\x00" * 64000 + b"\r\n",
                 b"--XyZ--\r\n"]
        response, body = await self.request(
            b"POST", "/v1/audio/transcriptions", b"".join(parts),
            {"content-type": "multipart/form-data; boundary=XyZ"})
        self.assertEqual(json.loads(body.body)["usage"], {"type": "duration", "seconds": 2})
        self.assertEqual(self.fake.received[0].form, {
            "model": "tiny",
            "file": {"filename": "a.wav", "content_type": "audio/wav", "size": 64000}})

    async def test_reset_mid_stream(self) -> None:
        """
        ``reset_mid_stream=3`` delivers exactly three SSE events, then aborts
        the TCP connection: the client sees a failed response body.
        """
        response = await self.agent.request(
            b"POST", (self.fake.url + "/v1/completions").encode(),
            Headers({"content-type": ["application/json"],
                     "x-fake-fault": ["reset_mid_stream=3"]}),
            FileBodyProducer(BytesIO(b'{"prompt": "a", "stream": true}')))
        self.assertEqual(response.code, 200)
        done: Deferred = Deferred()
        collector = _Collector(done)
        response.deliverBody(collector)
        await self.assertFailure(done, ResponseFailed)
        self.assertEqual(collector.body.count(b"data: "), 3)
        self.assertEqual(self.fake.open_connections, 0)
        self.assertEqual(len(self.fake.connections_lost), 1)

    async def test_body_streaming_timestamps(self) -> None:
        """
        The record exists as soon as the headers arrive and is updated while
        the body streams in; only the first MiB is kept while the length
        counts every byte.
        """
        piece = 512 * 1024
        pieces = [bytes([65 + i]) * piece for i in range(3)]
        d = self.request(b"POST", "/upload", _SlowBody(pieces, 0.3))
        received = await self.fake.wait_for_requests(1)
        record = received[0]
        self.assertEqual((record.method, record.uri), (b"POST", b"/upload"))
        await deferLater(reactor, 0.1, lambda: None)
        self.assertFalse(record.body_done)
        self.assertIsNotNone(record.first_body_byte_at)
        self.assertTrue(0 < record.body_length < 3 * piece, record.body_length)
        response, _ = await d
        self.assertEqual(response.code, 404)
        self.assertTrue(record.body_done)
        self.assertEqual(record.body_length, 3 * piece)
        self.assertEqual(record.body, b"".join(pieces)[:MAX_KEPT_BODY])
        self.assertGreaterEqual(record.body_done_at - record.first_body_byte_at, 0.55)
        self.assertIsNone(record.json)

    async def test_big_body_backpressure(self) -> None:
        """
        ``big_body`` stops producing while the reader does not read, and
        delivers every byte once it reads again.
        """
        total = 32 * 1024 * 1024
        reader = _RawReader()
        await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", self.fake.port), reader)
        reader.transport.write(b"GET /v1/models HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                               b"x-fake-fault: big_body=%d\r\n\r\n" % (total,))
        reader.transport.pauseProducing()
        await deferLater(reactor, 0.5, lambda: None)
        self.assertLess(self.fake.big_body_written, 8 * 1024 * 1024)
        reader.transport.resumeProducing()
        received = await reader.closed
        self.assertEqual(self.fake.big_body_written, total)
        self.assertGreater(received, total)

    async def test_stop_leaves_clean_reactor(self) -> None:
        """
        stop() closes the port, aborts hanging and delayed answers, and
        leaves none of the fake's delayed calls on the reactor.
        """
        hang = self.request(b"GET", "/health", headers={"x-fake-fault": "hang"})
        slow = self.request(b"GET", "/health", headers={"x-fake-fault": "slow_first_byte=100"})
        await self.fake.wait_for_bodies(2)

        def ours() -> list:
            return [c for c in reactor.getDelayedCalls()
                    if getattr(c.func, "__module__", None) == fake_vllm.__name__]

        self.assertEqual(self.fake.open_connections, 2)
        self.assertEqual(len(ours()), 1)
        await self.fake.stop()
        self.assertEqual(self.fake.open_connections, 0)
        self.assertEqual(len(self.fake.connections_lost), 2)
        self.assertEqual(ours(), [])
        await self.assertFailure(hang, ResponseNeverReceived)
        await self.assertFailure(slow, ResponseNeverReceived)
        await self.assertFailure(
            self.agent.request(b"GET", (self.fake.url + "/health").encode()),
            ConnectionRefusedError)


class ParseFaultsTests(SynchronousTestCase):
    """
    Tests for L{parse_faults}.
    """

    def test_values(self) -> None:
        """
        Bare names map to None and valued faults to numbers; an unknown
        name or a non-numeric value is refused.
        """
        self.assertEqual(parse_faults(" hang, slow_chunks=0.5 ,chunks=3,"),
                         {"hang": None, "slow_chunks": 0.5, "chunks": 3})
        self.assertEqual(parse_faults(""), {})
        self.assertRaises(ValueError, parse_faults, "explode")
        self.assertRaises(ValueError, parse_faults, "status=abc")
        self.assertRaises(ValueError, parse_faults, "status")
