"""
The request body of an upstream call, written by its producer.

L{dheera_tx.upstream.client} sends a body that is an C{IBodyProducer}
(a client's body still arriving) through a L{_BodyWriter}: the consumer
the producer writes to.  It frames the bytes (chunked when the length is
unknown, ended by the zero-length chunk), checks them against a declared
Content-Length (longer fails at once, shorter when the producer
finishes), holds what the producer writes while it starts so that the
head and those bytes go out in one write, and registers the producer with
the transport for backpressure.

The connection that owns the writer is passed in (C{_UpstreamConnection}
in L{dheera_tx.upstream.connection}); the writer uses only its C{transport}
and tells it that the producer finished or failed with C{body_done} and
C{body_failed}, so this module imports nothing from the client.  The
leading underscores mark names used only by the upstream client modules
(C{upstream_client}, C{upstream_connection}, C{upstream_response},
C{upstream_request_body}).
"""

from typing import List, Optional

from twisted.internet.defer import fail
from twisted.python.failure import Failure
from twisted.web.iweb import UNKNOWN_LENGTH

_OPEN = object()  # the outcome of a body whose producer has not finished yet


class _BodyWriter:
    """
    The consumer a request body producer writes to: frames the bytes
    (chunked when the length is unknown), holds what is written while
    C{_UpstreamConnection.start} builds its single first write, and ignores
    anything written once the body is over.

    :param connection: the connection the body goes out on.
    :param producer: the body, an C{IBodyProducer} (an int C{length} is a
        Content-Length, C{UNKNOWN_LENGTH} means chunked).
    """

    __slots__ = ("_connection", "producer", "chunked", "remaining", "pending", "open", "outcome", "registered")

    def __init__(self, connection, producer):
        self._connection = connection
        self.producer = producer
        self.chunked = chunked = producer.length is UNKNOWN_LENGTH
        self.remaining = 0 if chunked else producer.length
        self.pending: Optional[List[bytes]] = None
        self.open = True
        self.outcome = _OPEN
        self.registered = False

    def write(self, data: bytes) -> None:
        """
        Send C{data} (a part of the body).
        """
        if not self.open or not data:
            return
        if self.chunked:
            size = b"%x\r\n" % (len(data),)
            if self.pending is not None:
                self.pending += (size, data, b"\r\n")
            else:
                self._connection.transport.writeSequence((size, data, b"\r\n"))
            return
        self.remaining -= len(data)
        if self.remaining < 0:
            self._fail(Failure(ValueError("The request body is longer than its declared length.")))
        elif self.pending is not None:
            self.pending.append(data)
        else:
            self._connection.transport.write(data)

    def registerProducer(self, producer, streaming: bool) -> None:
        """
        Part of C{IConsumer}; the connection registers the body itself.
        """

    def unregisterProducer(self) -> None:
        """
        Part of C{IConsumer}.
        """

    # Driven by the connection.

    def start(self, head: bytes) -> List[bytes]:
        """
        Start the producer, holding what it writes at once.  Afterwards
        C{outcome} is C{_OPEN} while the producer goes on, L{None} if it
        has already finished, or the L{Failure} it failed with (and then
        nothing may be sent).

        :param head: the request head, the first of the held writes.
        :return: the held writes, C{head} first, for L{send_held}.
        """
        self.pending = pending = [head]
        try:
            finished = self.producer.startProducing(self)
        except BaseException:
            finished = fail()
        finished.addCallbacks(self._done, self._fail)
        self.pending = None
        return pending

    def send_held(self, held: List[bytes]) -> None:
        """
        Register a producer that goes on with the transport, and send the
        held writes in one write.

        :param held: what L{start} returned.
        """
        transport = self._connection.transport
        if self.outcome is _OPEN:
            self.registered = True
            transport.registerProducer(self.producer, True)
        transport.write(b"".join(held) if len(held) > 1 else held[0])

    def shortfall(self) -> Optional[Failure]:
        """
        :return: a failure if the finished body is shorter than its
            declared length, else L{None}.
        """
        if self.remaining:
            return Failure(ValueError("The request body is shorter than its declared length."))
        return None

    def finish(self) -> None:
        """
        The producer finished: unregister it and end a chunked body.
        """
        self.open = False
        transport = self._connection.transport
        if self.registered:
            transport.unregisterProducer()
        if self.chunked:
            transport.write(b"0\r\n\r\n")

    def stop(self) -> None:
        """
        Write nothing more: unregister the producer and stop it.
        """
        self.open = False
        if self.registered:
            self._connection.transport.unregisterProducer()
        self.producer.stopProducing()

    # The producer's Deferred.

    def _done(self, _) -> None:
        if self.pending is not None:
            if self.outcome is _OPEN:
                self.outcome = None
        else:
            self._connection.body_done(self)

    def _fail(self, failure: Failure) -> None:
        if self.pending is not None:
            if self.outcome is _OPEN:
                self.outcome = failure
        else:
            self._connection.body_failed(self, failure)
