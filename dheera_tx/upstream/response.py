"""
The response side of an upstream call: L{UpstreamResponse}.

L{dheera_tx.upstream.client} fires a request's Deferred with an
L{UpstreamResponse} once the response head has arrived; the body then
goes to a sink with L{UpstreamResponse.deliver} (C{data_received} per
chunk, C{body_ended} once).  The response is the C{IPushProducer} the
sink's consumer pauses and resumes: chunks that arrive while it is paused,
or before it has a sink, are held and the upstream connection stops
reading until they are delivered.

The connection reading the response (C{_UpstreamConnection} in
L{dheera_tx.upstream.connection}) is passed in; the response uses only its
C{pause_reading}, C{resume_reading} and C{abort}, so this module imports
nothing from the client.  The connection in turn drives the response
through C{_hold}, C{_end}, C{_flowing} and C{_sink}: the leading
underscores mark names used only by the upstream client modules
(C{upstream_client}, C{upstream_connection}, C{upstream_response},
C{upstream_request_body}).
"""

from typing import List, Optional

from twisted.internet.error import ConnectionAborted
from twisted.internet.interfaces import IPushProducer
from twisted.python.failure import Failure
from zope.interface import implementer

_OPEN = object()  # an UpstreamResponse body that has not ended yet


@implementer(IPushProducer)
class UpstreamResponse:
    """
    A response whose head has arrived; its body follows through
    L{deliver}.

    :ivar code: the status code.
    :ivar phrase: the reason phrase (may be empty).
    :ivar version: the HTTP version, e.g. C{(1, 1)}.
    :ivar headers: C{(name, value)} pairs as received, in order.
    :ivar length: the Content-Length when the body is not chunked, 0 when
        there is no body (HEAD, 204, 304, 101), L{None} when unknown.
    :ivar head_bytes: the sum of C{len(name) + len(value) + 4} over the
        header lines.
    """

    __slots__ = (
        "code", "phrase", "version", "headers", "length", "head_bytes",
        "_connection", "_sink", "_buffer", "_flowing", "_paused", "_stopped", "_ended", "_told",
    )

    def __init__(self, connection, code: int, phrase: bytes, version: tuple, headers: list, length, head_bytes: int):
        self.code = code
        self.phrase = phrase
        self.version = version
        self.headers = headers
        self.length = length
        self.head_bytes = head_bytes
        self._connection = connection
        self._sink = None
        self._buffer: List[bytes] = []
        self._flowing = False  # sink set, not paused, nothing buffered, not stopped
        self._paused = False
        self._stopped = False
        self._ended = _OPEN
        self._told = False

    def deliver(self, sink) -> None:
        """
        Send the body to C{sink}: C{sink.data_received(data)} per chunk,
        then C{sink.body_ended(reason)} exactly once, with L{None} for a
        complete body or a L{Failure}.  Chunks that arrived earlier were
        buffered (with the connection paused) and come first.

        :param sink: an object with C{data_received} and C{body_ended}.
        """
        if self._sink is not None:
            raise RuntimeError("The response body is already being delivered.")
        self._sink = sink
        self._drain()

    def pauseProducing(self) -> None:
        """
        Stop reading from the upstream (and delivering) until
        L{resumeProducing}.
        """
        self._paused = True
        self._flowing = False
        connection = self._connection
        if connection is not None:
            connection.pause_reading()

    def resumeProducing(self) -> None:
        """
        Deliver what was held back and read from the upstream again.
        """
        self._paused = False
        self._drain()

    def stopProducing(self) -> None:
        """
        Abort the upstream connection; the sink then gets C{body_ended}
        with a L{Failure} (after the connection is gone, or at once if the
        whole response had already arrived).
        """
        if self._told or self._stopped:
            return
        self._stopped = True
        self._flowing = False
        self._buffer = []
        connection = self._connection
        if connection is not None:
            connection.abort()
        else:
            self._ended = Failure(ConnectionAborted("The response was stopped."))
            self._drain()

    # Called by the connection.

    def _hold(self, data: bytes) -> None:
        if self._stopped:
            return
        self._buffer.append(data)
        connection = self._connection
        if connection is not None:
            connection.pause_reading()

    def _end(self, reason: Optional[Failure]) -> None:
        if self._ended is not _OPEN:
            return
        self._connection = None
        self._ended = reason
        self._flowing = False
        self._drain()

    def _drain(self) -> None:
        sink = self._sink
        if sink is None or self._told:
            return
        while self._buffer and not self._paused:
            sink.data_received(self._buffer.pop(0))
        if self._buffer:
            return
        if self._ended is not _OPEN:
            self._told = True
            # The sink usually holds this response: no cycle outlives the body.
            self._sink = None
            sink.body_ended(self._ended)
        elif not self._paused and not self._stopped:
            self._flowing = True
            connection = self._connection
            if connection is not None:
                connection.resume_reading()
