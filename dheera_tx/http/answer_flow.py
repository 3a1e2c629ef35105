"""
Write backpressure on a client connection.

A client that sends requests and never reads their answers must not make
the proxy hold answers in memory: L{AnswerFlow} is registered, for the
connection's whole life, as the streaming producer of the connection's
transport, so the transport tells it when its send buffer goes over its
high-water mark (C{bufferSize}, 64 KiB) and when it has drained.  While it
is over, the connection (L{dheera_tx.http.server.GatewayConnection}) starts
no queued request and reads nothing more; the producer of the answer being
written (an upstream response relayed with backpressure, or a control
answer's producer) is attached here and paused and resumed with it, as
if it were registered on the transport itself (a transport takes one
producer).
"""

from typing import Callable, Optional

from twisted.internet.interfaces import IPushProducer
from zope.interface import implementer


@implementer(IPushProducer)
class AnswerFlow:
    """
    The producer a client connection registers on its transport.

    :param blocked: called when the transport's buffer goes over its
        high-water mark.
    :param unblocked: called when it has drained again.
    :ivar is_blocked: whether the transport's buffer is over its mark.
    """

    __slots__ = ("_blocked", "_unblocked", "_transport", "_producer", "is_blocked")

    def __init__(self, blocked: Callable[[], None], unblocked: Callable[[], None]):
        self._blocked = blocked
        self._unblocked = unblocked
        self._transport = None
        self._producer = None
        self.is_blocked = False

    def register(self, transport) -> None:
        """
        Register on C{transport} (when the connection is made).
        """
        self._transport = transport
        transport.registerProducer(self, True)

    def unregister(self) -> None:
        """
        Unregister from the transport: a closing connection must, or a
        transport whose producer is paused when its buffer drains resumes
        the producer instead of closing.
        """
        transport, self._transport = self._transport, None
        if transport is not None:
            transport.unregisterProducer()

    def attach(self, producer) -> None:
        """
        Let the transport's backpressure pause and resume C{producer} (an
        C{IPushProducer}) until L{detach}; paused at once if the buffer is
        over its mark now.
        """
        self._producer = producer
        if self.is_blocked:
            producer.pauseProducing()

    def detach(self) -> None:
        """
        Undo L{attach}.
        """
        self._producer = None

    @property
    def attached(self) -> Optional[object]:
        """
        :return: the attached producer, or L{None}.
        """
        return self._producer

    # IPushProducer, called by the transport.

    def pauseProducing(self) -> None:
        if self.is_blocked:
            return
        self.is_blocked = True
        if self._producer is not None:
            self._producer.pauseProducing()
        self._blocked()

    def resumeProducing(self) -> None:
        if not self.is_blocked:
            return
        self.is_blocked = False
        if self._producer is not None:
            self._producer.resumeProducing()
        self._unblocked()

    def stopProducing(self) -> None:
        # The connection is lost: the answer's producer stops too (its
        # upstream response is dropped), as when it was the transport's.
        producer, self._producer = self._producer, None
        self._transport = None
        if producer is not None:
            producer.stopProducing()
