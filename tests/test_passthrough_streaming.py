"""
Integration tests of the pass-through's streaming (SPEC section 3): SSE
relayed as it arrives, uploads forwarded while they arrive, backpressure
both ways with bounded memory, and client disconnects aborting the
upstream call.  Real loopback sockets, L{tests.fake_vllm.FakeVLLM}
upstreams; the proxy runs in this process, so its memory is this
process's resident set.
"""

import json
import os
from typing import List, Optional, Tuple

from twisted.internet import reactor
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.endpoints import SSL4ClientEndpoint, TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import LoopingCall
from twisted.trial.unittest import TestCase
from twisted.web.http_headers import Headers
from twisted.web.iweb import IBodyProducer
from zope.interface import implementer

from tests.passthrough_harness import MASTER_KEY, ProxyHarness, RawClient, deployment, parse_response
from tests.scripted_upstream import BytesBody, poll
from tests.waiting import settled, stays_below

MB = 1024 * 1024


def resident_bytes() -> int:
    """
    :return: this process's resident set size now (Linux C{/proc}).
    """
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class MemoryWatch:
    """
    Samples the resident set every 20 ms; L{growth} is the peak over the
    baseline taken at start.
    """

    def __init__(self):
        self.baseline = resident_bytes()
        self.peak = self.baseline
        self._loop = LoopingCall(self._sample)
        self._loop.clock = reactor
        self._loop.start(0.02)

    def _sample(self) -> None:
        self.peak = max(self.peak, resident_bytes())

    def stop(self) -> None:
        """
        Take a last sample and stop sampling.
        """
        if self._loop.running:
            self._sample()
            self._loop.stop()

    @property
    def growth(self) -> int:
        """
        :return: peak resident bytes over the baseline.
        """
        return self.peak - self.baseline


class CountingClient(RawClient):
    """
    A raw client that keeps only the start of what it receives and counts
    the rest (so a 100 MB download does not grow the test's own memory).
    """

    KEEP = 64 * 1024

    def __init__(self):
        super().__init__()
        self.received = 0
        self._head = b""

    def dataReceived(self, data: bytes) -> None:
        self.received += len(data)
        if len(self._head) < self.KEEP:
            self._head += data[: self.KEEP - len(self._head)]

    @property
    def data(self) -> bytes:
        return self._head


@implementer(IBodyProducer)
class GeneratedUpload:
    """
    A request body of C{total} bytes generated a few pieces per reactor
    turn, honouring pause and resume from the transport.

    :ivar sent: bytes written so far.
    :ivar finished_at: reactor time of the last write, or L{None}.
    """

    PIECE = 256 * 1024

    def __init__(self, total: int):
        self.length = total
        self.sent = 0
        self.finished_at: Optional[float] = None
        self._piece = b"u" * self.PIECE
        self._paused = False
        self._stopped = False
        self._scheduled = False
        self._consumer = None
        self._done: Optional[Deferred] = None

    def startProducing(self, consumer) -> Deferred:
        self._consumer = consumer
        self._done = Deferred()
        self._schedule()
        return self._done

    def _schedule(self) -> None:
        if not self._scheduled and not self._paused and not self._stopped:
            self._scheduled = True
            reactor.callLater(0, self._produce)

    def _produce(self) -> None:
        self._scheduled = False
        for _ in range(4):
            if self._paused or self._stopped or self.sent >= self.length:
                break
            size = min(self.PIECE, self.length - self.sent)
            self.sent += size
            self._consumer.write(self._piece if size == self.PIECE else self._piece[:size])
        if self.sent >= self.length and not self._stopped:
            self._stopped = True
            self.finished_at = reactor.seconds()
            self._done.callback(None)
        else:
            self._schedule()

    def pauseProducing(self) -> None:
        self._paused = True

    def resumeProducing(self) -> None:
        self._paused = False
        self._schedule()

    def stopProducing(self) -> None:
        self._stopped = True


class ArrivalRecorder(Protocol):
    """
    Records each chunk of a response body with its arrival time and how
    many requests the upstream was still serving at that moment.
    """

    def __init__(self, fake):
        self._fake = fake
        self.chunks: List[Tuple[float, bytes, int]] = []
        self.done: Deferred = Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.chunks.append((reactor.seconds(), data, self._fake.requests_running))

    def connectionLost(self, reason) -> None:
        self.done.callback(b"".join(data for _, data, _ in self.chunks))


class PausedSink(Protocol):
    """
    An upstream that reads the request head and then stops reading until
    told to go on; it counts the body and answers C{200 ok} once it is
    complete.

    :ivar body_received: body bytes read so far.
    """

    def __init__(self, sinks: list):
        self.body_received = 0
        self._head = b""
        self._length: Optional[int] = None
        sinks.append(self)

    def dataReceived(self, data: bytes) -> None:
        if self._length is None:
            self._head += data
            if b"\r\n\r\n" not in self._head:
                return
            head, _, data = self._head.partition(b"\r\n\r\n")
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    self._length = int(value)
            self.transport.pauseProducing()
        self.body_received += len(data)
        if self.body_received >= self._length:
            self.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")
            self.transport.loseConnection()

    def go_on(self) -> None:
        """
        Read the body again.
        """
        self.transport.resumeProducing()


class StreamingTests(ProxyHarness, TestCase):
    """
    Both directions stream, with backpressure and bounded memory.
    """

    def setUp(self):
        self.harness()

    async def _start(self, **params):
        self.upstream = await self.fake(served_model="alpha")
        self.proxy([deployment("alpha", "alpha", self.upstream, **params)], general={"max_request_body_bytes": 400 * MB})

    async def test_sse_relayed_as_it_arrives(self):
        """
        Each SSE event reaches the client while the upstream is still
        streaming, spaced like the upstream sent them, not all at the end.
        """
        await self._start()
        gap = 0.2
        body = json.dumps({"model": "alpha", "stream": True, "messages": [{"role": "user", "content": "hi"}]})
        headers = Headers(
            {
                b"authorization": [b"Bearer " + MASTER_KEY.encode()],
                b"content-type": [b"application/json"],
                b"x-fake-fault": [b"slow_chunks=%.1f,chunks=4" % gap],
            }
        )
        response = await self.agent.request(
            b"POST", (self.base + "/vllm/v1/chat/completions").encode(), headers, BytesBody(body.encode())
        )
        self.assertEqual(response.code, 200)
        self.assertTrue(response.headers.getRawHeaders(b"content-type")[0].startswith(b"text/event-stream"))
        recorder = ArrivalRecorder(self.upstream)
        response.deliverBody(recorder)
        text = await recorder.done
        # role, four tokens, the final chunk, [DONE]: seven events.
        self.assertEqual(text.count(b"\n\n"), 7)
        self.assertTrue(text.endswith(b"data: [DONE]\n\n"))
        events = [(t, running) for t, data, running in recorder.chunks if data.strip()]
        self.assertGreaterEqual(len(events), 6)
        # The first events arrived while the upstream was still sending.
        self.assertEqual(events[0][1], 1)
        self.assertEqual(events[3][1], 1)
        times = [t for t, _ in events]
        self.assertGreater(times[-1] - times[0], gap * 4)
        for earlier, later in zip(times[:4], times[1:5]):
            self.assertGreater(later - earlier, gap / 2)

    async def test_upload_streams_with_bounded_memory(self):
        """
        A 200 MB upload reaches the upstream long before the client has
        sent its last byte, arrives whole, and the proxy's memory stays
        bounded (under 100 MB of growth).
        """
        await self._start()
        total = 200 * MB
        upload = GeneratedUpload(total)
        progress_at_first_byte = []

        def watch_first_byte():
            record = self.upstream.received[0] if self.upstream.received else None
            if record is not None and record.first_body_byte_at is not None and not progress_at_first_byte:
                progress_at_first_byte.append(upload.sent)
            return bool(progress_at_first_byte)

        memory = MemoryWatch()
        self.addCleanup(memory.stop)
        request = ensureDeferred(
            self.request(
                b"POST",
                "/vllm/v1/audio/transcriptions?model=alpha",
                {"authorization": "Bearer " + MASTER_KEY, "content-type": "application/octet-stream"},
                upload,
            )
        )
        self.assertTrue(await poll(watch_first_byte, 10))
        response, _ = await request
        memory.stop()
        record = self.upstream.received[0]
        # The fake answers a non-multipart transcription 400, after the body.
        self.assertEqual(response.code, 400)
        self.assertEqual(record.body_length, total)
        self.assertTrue(record.body_done)
        self.assertLess(progress_at_first_byte[0], total // 4)
        self.assertLess(record.first_body_byte_at, upload.finished_at)
        self.assertLess(memory.growth, 100 * MB, memory.growth)

    async def test_stalled_upstream_pauses_upload(self):
        """
        While the upstream does not read, the proxy stops reading the
        client's upload (the client's producer is paused well short of the
        whole body) and its memory stays bounded; when the upstream reads
        again the whole body arrives.
        """
        sinks: list = []
        port = reactor.listenTCP(0, Factory.forProtocol(lambda: PausedSink(sinks)), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        url = f"http://127.0.0.1:{port.getHost().port}"
        self.proxy(
            [{"model_name": "alpha", "dheera_ai_params": {"model": "alpha", "api_base": url}}],
            general={"max_request_body_bytes": 400 * MB},
        )
        total = 200 * MB
        upload = GeneratedUpload(total)
        memory = MemoryWatch()
        self.addCleanup(memory.stop)
        request = ensureDeferred(
            self.request(
                b"POST",
                "/vllm/upload?model=alpha",
                {"authorization": "Bearer " + MASTER_KEY, "content-type": "application/octet-stream"},
                upload,
            )
        )
        self.addCleanup(lambda: [sink.transport.abortConnection() for sink in sinks if sink.transport.connected])
        self.assertTrue(await poll(lambda: bool(sinks)))
        # The upload comes to rest well short of the whole body, and stays
        # bounded (socket buffers may still take a piece as they grow).
        await settled(lambda: min(upload.sent, 40 * MB))
        await stays_below(lambda: upload.sent, 40 * MB, 0.5)
        stalled_growth = memory.growth
        sinks[0].go_on()
        response, body = await request
        memory.stop()
        self.assertEqual((response.code, body), (200, b"ok"))
        self.assertEqual(sinks[0].body_received, total)
        self.assertLess(stalled_growth, 100 * MB)
        self.assertLess(memory.growth, 100 * MB)

    async def test_slow_reader_pauses_upstream(self):
        """
        A client that stops reading a 100 MB answer pauses the upstream
        (the upstream's producer stops well short of the whole body) and the
        proxy's memory stays bounded; once the client reads again, the
        whole body arrives.
        """
        await self._start()
        total = 100 * MB
        memory = MemoryWatch()
        self.addCleanup(memory.stop)
        client = CountingClient()
        await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", self.port), client)
        self.addCleanup(lambda: client.transport.abortConnection() if client.connected else None)
        client.transport.pauseProducing()
        client.transport.write(
            b"GET /vllm/big HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + MASTER_KEY.encode()
            + b"\r\nx-fake-fault: big_body=%d\r\nConnection: close\r\n\r\n" % total
        )
        self.assertTrue(await poll(lambda: self.upstream.big_body_written > 0))
        # Stalled: the upstream's producer comes to rest well short of the
        # whole body while the client does not read, and stays bounded.
        await settled(lambda: min(self.upstream.big_body_written, 40 * MB))
        await stays_below(lambda: self.upstream.big_body_written, 40 * MB, 0.5)
        paused_growth = memory.growth
        client.transport.resumeProducing()
        await client.closed(30)
        memory.stop()
        status, headers, _ = parse_response(client.data)
        self.assertEqual(status, 200)
        self.assertEqual(headers["content-length"], [b"%d" % total])
        head_length = client.data.index(b"\r\n\r\n") + 4
        self.assertEqual(client.received - head_length, total)
        self.assertLess(paused_growth, 100 * MB)
        self.assertLess(memory.growth, 100 * MB)

    async def _abort_and_time(self, client: RawClient) -> float:
        aborted_at = reactor.seconds()
        client.transport.abortConnection()
        self.assertTrue(await poll(lambda: self.upstream.open_connections == 0, 3))
        return self.upstream.connections_lost[-1] - aborted_at

    async def test_disconnect_mid_stream_aborts_upstream(self):
        """
        A client that disconnects in the middle of an SSE stream makes the
        proxy close the upstream connection within a second.
        """
        await self._start()
        client = await self.raw_connect()
        body = json.dumps({"model": "alpha", "stream": True, "messages": [{"role": "user", "content": "hi"}]}).encode()
        client.transport.write(
            b"POST /vllm/v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + MASTER_KEY.encode()
            + b"\r\nContent-Type: application/json\r\nx-fake-fault: slow_chunks=0.3,chunks=30\r\nContent-Length: %d\r\n\r\n%s"
            % (len(body), body)
        )
        self.assertTrue(await poll(lambda: b"data: " in client.data))
        self.assertEqual(self.upstream.requests_running, 1)
        self.assertLess(await self._abort_and_time(client), 1.0)
        self.assertEqual(self.upstream.requests_running, 0)

    async def test_disconnect_before_answer_aborts_upstream(self):
        """
        A client that disconnects while the upstream has not answered yet
        makes the proxy close the upstream connection within a second.
        """
        await self._start()
        client = await self.raw_connect()
        client.transport.write(
            b"GET /vllm/version HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + MASTER_KEY.encode()
            + b"\r\nx-fake-fault: hang\r\n\r\n"
        )
        self.assertTrue(await poll(lambda: self.upstream.received and self.upstream.open_connections == 1))
        self.assertLess(await self._abort_and_time(client), 1.0)

    async def test_disconnect_during_upload_aborts_upstream(self):
        """
        A client that disconnects in the middle of its request body makes
        the proxy close the upstream connection (whose body never
        completes) within a second.
        """
        await self._start()
        client = await self.raw_connect()
        client.transport.write(
            b"POST /vllm/v1/audio/transcriptions?model=alpha HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
            + MASTER_KEY.encode() + b"\r\nContent-Type: application/octet-stream\r\nContent-Length: 1000000\r\n\r\n"
            + b"x" * 100000
        )
        self.assertTrue(await poll(lambda: self.upstream.received and self.upstream.received[0].body_length > 0))
        self.assertLess(await self._abort_and_time(client), 1.0)
        self.assertFalse(self.upstream.received[0].body_done)


class TLSListenerTests(ProxyHarness, TestCase):
    """
    The proxy serves both planes over TLS (C{--listen ssl:...}): its direct
    socket writes must go through the encryption, not around it.
    """

    def setUp(self):
        self.harness()

    async def _start(self):
        from tests.tls_upstream import self_signed_localhost

        directory = self.mktemp()
        os.makedirs(directory)
        self.upstream = await self.fake(served_model="alpha")
        self.pem = self_signed_localhost(directory)
        self.proxy([deployment("alpha", "alpha", self.upstream)], tls_pem=self.pem)

    async def test_json_stream_and_control_plane(self):
        """
        A chat completion, a streamed one (every SSE event, usage chunk
        stripped as usual) and a control-plane call all answer correctly
        over TLS, on one kept-alive connection each.
        """
        await self._start()
        response, body = await self.chat("alpha")
        self.assertEqual(response.code, 200, body)
        self.assertEqual(json.loads(body)["object"], "chat.completion")
        response, body = await self.chat("alpha", stream=True)
        self.assertEqual(response.code, 200, body)
        events = [e for e in body.split(b"\n\n") if e.strip()]
        self.assertEqual(events[-1], b"data: [DONE]")
        for event in events[:-1]:
            self.assertEqual(json.loads(event[len(b"data: "):])["object"], "chat.completion.chunk")
        response, body = await self.request(b"GET", "/health/liveliness")
        self.assertEqual((response.code, json.loads(body)["status"]), (200, "alive"))

    async def test_alpn_client_gets_http11(self):
        """
        A client that offers ALPN (h2 and http/1.1, as curl and httpx do)
        gets its answer over HTTP/1.1; it used to get a TLS alert.
        """
        from twisted.internet import ssl

        await self._start()
        with open(self.pem, "rb") as f:
            trust = ssl.Certificate.loadPEM(f.read())
        options = ssl.optionsForClientTLS("localhost", trustRoot=trust, acceptableProtocols=[b"h2", b"http/1.1"])
        client = await connectProtocol(SSL4ClientEndpoint(reactor, "127.0.0.1", self.port, options), RawClient())
        client.transport.write(b"GET /health/liveliness HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        raw = await client.closed()
        self.assertTrue(raw.startswith(b"HTTP/1.1 200 OK\r\n"), raw[:200])
