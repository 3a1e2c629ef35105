"""
A scripted upstream for the tests of L{dheera_tx.upstream.client}.

L{ScriptedServer} is a raw HTTP server on a loopback port that parses each
request and lets the test answer it with whatever bytes it likes, which
makes the edge cases of response framing, keep-alive and failure
reachable.  Beside it: request body producers the test drives
(L{ScriptedBody} piece by piece, L{FloodBody} as fast as it is let),
L{Sink} and L{read_body} to collect a response body, and a helper to
find a refused port (waiting in real time: L{tests.waiting}).
"""

import socket
from typing import Callable, List, Optional

from httptools import HttpRequestParser
from twisted.internet import reactor
from twisted.internet.defer import Deferred, succeed
from twisted.internet.protocol import Factory, Protocol
from twisted.trial.unittest import TestCase
from twisted.web.iweb import UNKNOWN_LENGTH, IBodyProducer
from zope.interface import implementer

from tests.waiting import poll, sleep, wait_until  # noqa: F401 (re-exported)


class RequestRecord:
    """
    One request as a scripted server parsed it.
    """

    def __init__(self):
        self.method = b""
        self.target = b""
        self.headers: List[tuple] = []
        self.pieces: List[bytes] = []
        self.complete = False

    @property
    def body(self) -> bytes:
        """
        :return: the body received so far (chunked framing removed).
        """
        return b"".join(self.pieces)

    def header(self, name: bytes) -> Optional[bytes]:
        """
        :return: the last value of header C{name} (any case), or L{None}.
        """
        values = [v for n, v in self.headers if n.lower() == name.lower()]
        return values[-1] if values else None


class ScriptedConnection(Protocol):
    """
    A server connection that parses requests and lets the test answer
    them with raw bytes.
    """

    def __init__(self, server: "ScriptedServer"):
        self.server = server
        self.received: List[bytes] = []
        self.requests: List[RequestRecord] = []
        self.current: Optional[RequestRecord] = None
        self.lost = False
        self.parser = HttpRequestParser(self)

    def connectionMade(self) -> None:
        self.server.connections.append(self)
        if self.server.hold_reading:
            self.transport.pauseProducing()

    def dataReceived(self, data: bytes) -> None:
        self.received.append(data)
        self.parser.feed_data(data)

    def connectionLost(self, reason) -> None:
        self.lost = True

    @property
    def raw(self) -> bytes:
        """
        :return: every byte received.
        """
        return b"".join(self.received)

    def write(self, data: bytes) -> None:
        """
        Write raw bytes to the client.
        """
        self.transport.write(data)

    def on_message_begin(self) -> None:
        self.current = RequestRecord()
        self.requests.append(self.current)

    def on_url(self, url: bytes) -> None:
        self.current.target += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.current.headers.append((name, value))

    def on_headers_complete(self) -> None:
        self.current.method = self.parser.get_method()
        if self.server.answer_at_head:
            self.server.respond(self, self.current)

    def on_body(self, data: bytes) -> None:
        self.current.pieces.append(data)

    def on_message_complete(self) -> None:
        self.current.complete = True
        if not self.server.answer_at_head:
            self.server.respond(self, self.current)


class ScriptedServer:
    """
    A loopback HTTP server whose answers the test scripts.

    :param respond: called with C{(connection, request)} when a request
        has arrived (at its head if C{answer_at_head}).
    """

    def __init__(self, respond: Callable, answer_at_head: bool = False, hold_reading: bool = False):
        self.respond = respond
        self.answer_at_head = answer_at_head
        self.hold_reading = hold_reading
        self.connections: List[ScriptedConnection] = []
        self.port = 0
        self._listening = None

    def start(self, case: TestCase, interface: str = "127.0.0.1") -> "ScriptedServer":
        """
        Listen on C{interface} (a free port); C{case} stops it in cleanup.
        """
        factory = Factory.forProtocol(lambda: ScriptedConnection(self))
        factory.noisy = False
        self._listening = reactor.listenTCP(0, factory, interface=interface)
        self.port = self._listening.getHost().port
        case.addCleanup(self.stop)
        return self

    async def stop(self) -> None:
        """
        Stop listening and abort every connection.
        """
        await self._listening.stopListening()
        for connection in self.connections:
            if not connection.lost:
                connection.transport.abortConnection()
        await wait_until(lambda: all(c.lost for c in self.connections))

    @property
    def requests(self) -> List[RequestRecord]:
        """
        :return: every request received, in order.
        """
        return [r for c in self.connections for r in c.requests]


class Sink:
    """
    Collects a response body; C{done} fires with the sink once it ended.
    """

    def __init__(self, pause_after: Optional[int] = None):
        self.chunks: List[bytes] = []
        self.reason = "not ended"
        self.ended = 0
        self.done: Deferred = Deferred()
        self.response = None
        self._pause_after = pause_after

    def data_received(self, data: bytes) -> None:
        self.chunks.append(data)
        if self._pause_after is not None and len(self.chunks) >= self._pause_after:
            self.response.pauseProducing()

    def body_ended(self, reason) -> None:
        self.ended += 1
        self.reason = reason
        self.done.callback(self)

    @property
    def body(self) -> bytes:
        """
        :return: the body received so far.
        """
        return b"".join(self.chunks)


async def read_body(response) -> Sink:
    """
    :return: the sink holding C{response}'s whole body.
    """
    sink = Sink()
    sink.response = response
    response.deliver(sink)
    return await sink.done


@implementer(IBodyProducer)
class ScriptedBody:
    """
    A request body the test writes piece by piece.

    :param length: the declared length, or L{UNKNOWN_LENGTH}.
    """

    def __init__(self, length=UNKNOWN_LENGTH):
        self.length = length
        self.consumer = None
        self.finished: Optional[Deferred] = None
        self.events: List[str] = []

    def startProducing(self, consumer) -> Deferred:
        self.consumer = consumer
        self.finished = Deferred()
        return self.finished

    def pauseProducing(self) -> None:
        self.events.append("pause")

    def resumeProducing(self) -> None:
        self.events.append("resume")

    def stopProducing(self) -> None:
        self.events.append("stop")


@implementer(IBodyProducer)
class FloodBody:
    """
    A chunked body that writes 256 KiB each reactor turn while it is not
    paused, until C{total} bytes are out.
    """

    PIECE = 256 * 1024

    def __init__(self, total: int):
        self.length = UNKNOWN_LENGTH
        self.total = total
        self.written = 0
        self.paused = False
        self.pauses = 0
        self.resumes = 0
        self._consumer = None
        self._finished: Optional[Deferred] = None
        self._call = None

    def startProducing(self, consumer) -> Deferred:
        self._consumer = consumer
        self._finished = Deferred()
        self._schedule()
        return self._finished

    def _schedule(self) -> None:
        if self._call is None and self._finished is not None:
            self._call = reactor.callLater(0, self._produce)

    def _produce(self) -> None:
        self._call = None
        if self.paused or self._finished is None:
            return
        size = min(self.PIECE, self.total - self.written)
        self.written += size
        self._consumer.write(b"x" * size)
        if self.written == self.total:
            finished, self._finished = self._finished, None
            finished.callback(None)
        else:
            self._schedule()

    def pauseProducing(self) -> None:
        self.paused = True
        self.pauses += 1

    def resumeProducing(self) -> None:
        self.paused = False
        self.resumes += 1
        self._schedule()

    def stopProducing(self) -> None:
        self._finished = None
        if self._call is not None:
            self._call.cancel()
            self._call = None


@implementer(IBodyProducer)
class BytesBody:
    """
    A request body already in memory, for clients that take an
    C{IBodyProducer} (Agent in the tests; the proxy itself sends bytes).
    """

    def __init__(self, data: bytes):
        self.length = len(data)
        self._data = data

    def startProducing(self, consumer) -> Deferred:
        consumer.write(self._data)
        return succeed(None)

    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass

    def stopProducing(self) -> None:
        pass


# Bound, never listening, kept open: no other process can take their ports.
_HELD: List[socket.socket] = []


def refused_port() -> int:
    """
    :return: a loopback port that refuses connections for as long as the
        test process runs: bound by a socket that never listens and is kept
        open (a port bound and closed again could be taken by another
        process meanwhile).
    """
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    _HELD.append(s)
    return s.getsockname()[1]
