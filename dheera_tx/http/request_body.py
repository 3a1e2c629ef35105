"""
A client's request body, streamed to the upstream while it arrives.

L{StreamingBody} sits between the client connection (which feeds it with
L{StreamingBody.receive} as chunks arrive) and the upstream client
(L{dheera_tx.upstream.client}, which consumes it as an C{IBodyProducer}).  When the upstream cannot take more, the client
connection is paused; chunks that arrive before the upstream request is
connected wait in a small buffer, and over a high-water mark the client is
paused too.  So a 200 MB upload flows through with bounded memory.
"""

from typing import Callable, List, Optional

from twisted.internet.defer import Deferred, succeed
from twisted.python.failure import Failure
from twisted.web.iweb import UNKNOWN_LENGTH, IBodyProducer
from zope.interface import implementer


class BodyTooLarge(Exception):
    """
    The request body grew past its cap (C{max_request_body_bytes}, or
    C{max_json_body_bytes} for a body the proxy parses).

    :ivar limit: the cap, in bytes (L{None} when not known).
    """

    def __init__(self, limit: Optional[int] = None):
        super().__init__(limit)
        self.limit = limit


class BodyAborted(Exception):
    """
    The client went away before its request body was complete.
    """


@implementer(IBodyProducer)
class StreamingBody:
    """
    A request body that is still arriving.

    :param length: the declared Content-Length, or L{None} for chunked.
    :param pause_client: pauses reading from the client connection.
    :param resume_client: resumes it.
    :param limit: the most bytes accepted.
    :ivar on_demand: called once, the first time the body is asked for
        (collected, peeked at or produced upstream), or L{None}: the
        connection sends an owed C{100 Continue} then, so a client waiting
        for it sends nothing before the call is authenticated.
    """

    HIGH_WATER = 256 * 1024

    def __init__(
        self,
        length: Optional[int],
        pause_client: Callable[[], None],
        resume_client: Callable[[], None],
        limit: int,
    ):
        self.length = UNKNOWN_LENGTH if length is None else length
        self._pause_client = pause_client
        self._resume_client = resume_client
        self._limit = limit
        self._pending: List[bytes] = []
        self._pending_bytes = 0
        self.received = 0
        self.complete = False
        self.failure: Optional[Failure] = None
        self.started = False
        self._consumer = None
        self._paused = False
        self._client_paused = False
        self._stopped = False
        self._finished: Optional[Deferred] = None
        self._collectors: List[Deferred] = []
        self._on_chunk: Optional[Callable[[], None]] = None
        self.on_demand: Optional[Callable[[], None]] = None

    # The client side.

    def receive(self, data: bytes) -> None:
        """
        Take a chunk that arrived from the client.
        """
        if self.complete or self.failure is not None:
            return
        self.received += len(data)
        if self.received > self._limit:
            self.fail(Failure(BodyTooLarge(self._limit)))
            return
        if self._consumer is not None and not self._paused and not self._pending:
            self._consumer.write(data)
            return
        self._pending.append(data)
        self._pending_bytes += len(data)
        if self._pending_bytes > self.HIGH_WATER and self._collectors == []:
            self._hold_client()
        if self._on_chunk is not None:
            self._on_chunk()

    def end(self) -> None:
        """
        The client sent the last byte of the body.
        """
        if self.complete or self.failure is not None:
            return
        self.complete = True
        for d in self._take_collectors():
            d.callback(self._joined())
        if self._on_chunk is not None:
            self._on_chunk()
        self._maybe_finish()

    def fail(self, failure: Failure) -> None:
        """
        The body cannot be completed (client gone, too large, too slow).
        """
        if self.complete or self.failure is not None:
            return
        self.failure = failure
        self._pending = []
        self._pending_bytes = 0
        for d in self._take_collectors():
            d.errback(failure)
        if self._on_chunk is not None:
            self._on_chunk()
        finished, self._finished = self._finished, None
        if finished is not None and not self._stopped:
            finished.errback(failure)

    # Reading it whole or in part before forwarding.

    def collect(self) -> "Deferred[bytes]":
        """
        :return: a Deferred firing with the whole body once it has arrived
            (for JSON bodies that must be read before routing).
        """
        if self.on_demand is not None:
            self._demanded()
        if self.failure is not None:
            return _failed(self.failure)
        if self.complete:
            return succeed(self._joined())
        d = Deferred()
        self._collectors.append(d)
        self._release_client()
        return d

    def peek(self, enough: Callable[[bytes], bool], most: int) -> "Deferred[bytes]":
        """
        Wait until the buffered start of the body satisfies C{enough}, holds
        C{most} bytes, or the body is complete.

        :return: a Deferred firing with the buffered start of the body.
        """
        if self.on_demand is not None:
            self._demanded()
        d = Deferred()

        def check() -> None:
            if d.called:
                return
            if self.failure is not None:
                self._on_chunk = None
                d.errback(self.failure)
                return
            prefix = self._joined()
            if self.complete or len(prefix) >= most or enough(prefix):
                self._on_chunk = None
                d.callback(prefix)

        self._on_chunk = check
        self._release_client()
        check()
        return d

    def _demanded(self) -> None:
        demand, self.on_demand = self.on_demand, None
        if demand is not None:
            demand()

    def _joined(self) -> bytes:
        if len(self._pending) > 1:
            self._pending = [b"".join(self._pending)]
        return self._pending[0] if self._pending else b""

    def _take_collectors(self) -> List[Deferred]:
        collectors, self._collectors = self._collectors, []
        return collectors

    # The upstream side (IBodyProducer).

    def startProducing(self, consumer) -> Deferred:
        """
        The upstream request started: write what is buffered, then stream.
        """
        if self.on_demand is not None:
            self._demanded()
        self.started = True
        self._consumer = consumer
        self._finished = Deferred()
        finished = self._finished
        if self.failure is not None:
            self._finished = None
            return _failed(self.failure)
        self._flush()
        return finished

    def _flush(self) -> None:
        while self._pending and not self._paused and not self._stopped:
            chunk = self._pending.pop(0)
            self._pending_bytes -= len(chunk)
            self._consumer.write(chunk)
        if not self._pending:
            self._release_client()
        self._maybe_finish()

    def _maybe_finish(self) -> None:
        if self.complete and not self._pending and self._finished is not None and not self._stopped:
            finished, self._finished = self._finished, None
            finished.callback(None)

    def pauseProducing(self) -> None:
        """
        The upstream is not taking more: stop reading from the client.
        """
        self._paused = True
        self._hold_client()

    def resumeProducing(self) -> None:
        """
        The upstream takes more again.
        """
        self._paused = False
        if self._consumer is not None:
            self._flush()
        else:
            self._release_client()

    def stopProducing(self) -> None:
        """
        The upstream request ended before the body did; the Deferred from
        L{startProducing} never fires after this.
        """
        self._stopped = True
        self._finished = None

    def _hold_client(self) -> None:
        if not self._client_paused and not self.complete:
            self._client_paused = True
            self._pause_client()

    def _release_client(self) -> None:
        if self._client_paused:
            self._client_paused = False
            self._resume_client()


def _failed(failure: Failure) -> Deferred:
    d = Deferred()
    d.errback(failure)
    return d
