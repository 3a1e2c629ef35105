"""
The listening side: one lean HTTP/1.1 connection protocol serving both
planes on one port.

L{GatewayConnection} parses requests with httptools (llhttp, strict: no
Content-Length with Transfer-Encoding, no second Content-Length, no folded
or malformed header lines, no bad chunk framing), reading them through its
L{dheera_tx.http.request_intake.RequestIntake} half.  A C{/vllm} call becomes
a L{ClientExchange} as soon as its headers have arrived and is served by
the data plane (L{dheera_tx.forwarding.Passthrough}) while its body streams
on; every other request has its key checked when its headers arrive
(L{dheera_tx.http.control_requests}), is then read whole and handed to the
Klein control plane through L{dheera_tx.http.control_bridge}.  On top of the
parser the connection enforces what the proxy needs: a deadline for request
headers (and for an idle keep-alive connection), size and count limits on
the head (414/431), one Transfer-Encoding (plain C{chunked}), no second
copy of a header the proxy and vLLM could read differently, the body caps
(413) and the body's pace (408).  L{dheera_tx.http.gateway_site.GatewaySite}
caps the open connections.

What a client may make the connection hold is bounded: bytes are fed to
the parser a request at a time, at most L{PIPELINE_DEPTH}
pipelined requests are parsed ahead of the one being answered, and while
the socket's send buffer is over its high-water mark
(L{dheera_tx.http.answer_flow}) no further request starts and nothing more
is read.  Whatever a client sends or leaves unread, a connection holds at
most one read of unparsed bytes, a few parsed heads and one buffer of
answer.

Every answer the listening side makes itself is in the OpenAI error shape
(L{dheera_tx.http.listener_limits}).
"""

from typing import List, Optional

from twisted.logger import Logger
from twisted.python.failure import Failure

from dheera_tx.errors import ProxyError, bad_request
from dheera_tx.http.answer_flow import AnswerFlow
from dheera_tx.http.client_exchange import ClientExchange
from dheera_tx.http.control_requests import ControlRequest
from dheera_tx.http.listener_limits import CLOSE_GRACE, BodyStalled, raw_answer, request_timeout
from dheera_tx.http.request_head import MALFORMED
from dheera_tx.http.request_intake import PIPELINE_DEPTH, RequestIntake

__all__ = ["PIPELINE_DEPTH", "GatewayConnection"]

log = Logger()

_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"

# The active request while a control request is being started (its answer
# may be complete before ControlBridge.serve returns).
_STARTING = object()


class GatewayConnection(RequestIntake):
    """
    One client connection: requests parsed in order, answered in order.

    This half answers: it starts each request in its turn, sends C{100
    Continue} when due, follows write backpressure, refuses and closes.
    """

    def __init__(self, site):
        super().__init__(site.limits)
        self.site = site
        self._counted = False
        self._refused = False
        self._closing = False
        self._lost = False
        self._close_timer = None
        self._held: set = set()
        # The request being answered, and those waiting for their turn.
        self._active = None
        self._queue: list = []
        # The bytes each waiting request holds, and their sum.
        self._queue_sizes: List[int] = []
        self._queued_bytes = 0
        # A control request with Expect: 100-continue whose 100 waits for
        # its key check or for the answer before it.
        self._continue_owed = None
        self._control_keep_alive = True
        self._flow = AnswerFlow(self._write_blocked, self._write_unblocked)
        # Runs while the answers wait in a full send buffer.
        self._unread_timer = None

    # Connection events.

    def connectionMade(self) -> None:
        self._counted = True
        self.site.connection_opened()
        try:
            self.transport.setTcpNoDelay(True)
        except Exception:
            pass
        self._flow.register(self.transport)
        self.site.deadlines.watch(self)

    def take_over(self, consumer):
        """
        Hand the connection to C{consumer} after a protocol switch (see
        L{ClientExchange.take_over}): from now on every byte goes to
        C{consumer.dataReceived}, and the connection's reading and write
        backpressure are the consumer's to drive.

        :return: the transport.
        """
        self._taken = consumer
        self._switching = None
        self.site.deadlines.forget(self)
        self._stop_pace()
        self._cancel_unread_timer()
        if self._close_timer is not None and self._close_timer.active():
            self._close_timer.cancel()
        # The relay registers its own producers on the transport.
        self._flow.unregister()
        if self._held:
            self._held.clear()
            self.transport.resumeProducing()
        held, self._unparsed = self._unparsed, b""
        if held:
            self.site.reactor.callLater(0, consumer.dataReceived, held)
        return self.transport

    def connectionLost(self, reason: Failure = None) -> None:
        if self._taken is not None:
            taken, self._taken = self._taken, None
            taken.connectionLost(reason)
        self._lost = True
        self._unparsed = b""
        self._cancel_unread_timer()
        self.site.deadlines.forget(self)
        self._stop_pace()
        if self._close_timer is not None:
            if self._close_timer.active():
                self._close_timer.cancel()
            self._close_timer = None
        if self._counted:
            self._counted = False
            self.site.connection_closed()
        waiting = [self._active, self._incoming] + self._queue
        self._active = self._incoming = None
        self._queue = []
        self._queue_sizes = []
        self._queued_bytes = 0
        for exchange in waiting:
            if isinstance(exchange, ClientExchange):
                exchange.connection_lost()
            elif exchange is not None and hasattr(exchange, "connection_lost"):
                exchange.connection_lost(reason)

    def _send_continue(self, exchange: ClientExchange) -> None:
        """
        C{exchange} asks for its body: send its C{100 Continue}, unless
        its client started the body anyway (after its own expect timeout).
        """
        body = exchange.body
        if body is not None and body.received == 0 and not exchange.startedWriting and not self._closing and not self._lost:
            self.transport.write(_CONTINUE)

    def _admit_control(self, error: Optional[ProxyError], request: ControlRequest) -> None:
        """
        The key check of control request C{request} is done: let its body
        be read, or answer C{error} when its turn comes (its body unread).
        """
        if self._lost or self._refused:
            return
        if error is not None:
            request.rejection = error
        if request.rejection is not None:
            # Nothing more is read from this connection.
            self._continue_owed = None
            request.complete = True
            # Nothing after this request is read: it is answered and the
            # connection closed.
            self._unparsed = b""
            self._reading_done = True
            self._hold(b"done")
            if self._incoming is request:
                self._incoming = None
            self._enqueue_control(request)
            return
        request.admitted = True
        if self._active is None:
            self._pay_continue(request)
        if not self._parsing:
            self._parse()

    def _gate_failed(self, failure: Failure, request: ControlRequest) -> None:
        log.failure("Checking a control request's key failed", failure)
        self._admit_control(ProxyError(500, "The proxy failed to handle this request.", type="internal_error", code="500"), request)

    def _pay_continue(self, request) -> None:
        """
        Send C{request}'s owed C{100 Continue} (its key is good, and no
        other answer is being written), unless its client already started
        the body.
        """
        if request is not self._continue_owed or not request.admitted:
            return
        self._continue_owed = None
        if request.size == 0 and not self._closing and not self._lost:
            self.transport.write(_CONTINUE)

    def _enqueue_control(self, request: ControlRequest) -> None:
        if self._active is None and not self._queue and not self._flow.is_blocked:
            self._start_control(request)
        else:
            self._queue_request(request, request.head_size + request.size)

    def _queue_request(self, request, size: int) -> None:
        """
        Put C{request} behind the others, counting the C{size} bytes it
        holds against L{PIPELINE_BYTES}.
        """
        self._queue.append(request)
        self._queue_sizes.append(size)
        self._queued_bytes += size

    # Answers done, next requests.

    def _start_control(self, request: ControlRequest) -> None:
        if request.rejection is not None:
            self._refused = True
            self._active = _STARTING
            self.transport.write(raw_answer(request.rejection))
            self._close()
            return
        # The answer may be complete before serve() returns.
        self._active = _STARTING
        self._control_keep_alive = request.keep_alive
        exchange = self.site.control.serve(
            self, request.method, request.target, request.version, request.headers, request.body()
        )
        if self._active is _STARTING:
            self._active = exchange

    def exchange_done(self, exchange: ClientExchange) -> None:
        """
        A pass-through call's answer is complete.
        """
        self._answer_done(exchange.keep_alive)

    def control_done(self, keep_alive: bool) -> None:
        """
        A control-plane request's answer is complete.
        """
        self._answer_done(keep_alive and self._control_keep_alive)

    def _answer_done(self, keep_alive: bool) -> None:
        self._active = None
        if self._lost or self._closing:
            return
        if not keep_alive or self._refused:
            self._close()
            return
        if self._queue:
            self.site.reactor.callLater(0, self._start_next)
            return
        if self._incoming is not None:
            # A control request still reading its body.
            self._pay_continue(self._incoming)
        elif not self._unparsed:
            # Between requests the connection gets the header deadline too,
            # so an idle keep-alive connection does not hold its place.
            self.site.deadlines.watch(self)
        self._parse()

    def _start_next(self) -> None:
        if self._active is not None or not self._queue or self._closing or self._lost or self._flow.is_blocked:
            return
        request = self._queue.pop(0)
        self._queued_bytes -= self._queue_sizes.pop(0)
        if isinstance(request, ClientExchange):
            self._active = request
            self.site.passthrough.serve(request)
        else:
            self._start_control(request)
        if self._active is None and self._incoming is None and not self._queue and not self._unparsed:
            self.site.deadlines.watch(self)
        self._parse()

    # Write backpressure (AnswerFlow).

    def _write_blocked(self) -> None:
        # Stop reading: requests read now could not be answered anyway.
        self._hold(b"write")
        if self._unread_timer is None:
            self._unread_timer = self.site.reactor.callLater(self._limits.body_timeout, self._answers_unread)

    def _write_unblocked(self) -> None:
        self._cancel_unread_timer()
        self._release(b"write")
        if self._lost or self._closing:
            return
        if self._queue and self._active is None:
            self._start_next()
        else:
            self._parse()

    def _answers_unread(self) -> None:
        """
        The client read nothing of its answers for C{body_timeout}
        seconds: it holds a connection and a buffer it does not use.
        """
        self._unread_timer = None
        log.info("Dropping a client that read none of its answer for {timeout} s", timeout=self._limits.body_timeout)
        self._closing = True
        self.transport.abortConnection()

    def _cancel_unread_timer(self) -> None:
        timer, self._unread_timer = self._unread_timer, None
        if timer is not None and timer.active():
            timer.cancel()

    def attach_producer(self, producer) -> None:
        """
        Let the connection's write backpressure pause and resume
        C{producer} (the producer of the answer being written).
        """
        self._flow.attach(producer)

    def detach_producer(self) -> None:
        """
        Undo L{attach_producer}.
        """
        self._flow.detach()

    # Refusals and closing.

    def head_too_slow(self) -> None:
        """
        The request head did not arrive in time (called by L{HeadDeadlines}).
        """
        if self._lost or self._refused or self._active is not None:
            return
        if self._incoming is None and self._head_bytes == 0:
            # Nothing of a request arrived: an idle (keep-alive) connection
            # is closed without an answer.
            self._close()
            return
        log.info("Dropping a client that did not send request headers in time")
        self._refuse(request_timeout("The request headers did not arrive in time."))

    def _malformed(self) -> None:
        self._refuse_incoming(bad_request(MALFORMED))

    def _refuse_incoming(self, error: ProxyError) -> None:
        """
        Refuse the request being parsed: a call already dispatched answers
        itself (and fails the body it is streaming upstream); anything else
        is answered on the raw connection.
        """
        incoming = self._incoming
        if isinstance(incoming, ClientExchange) and incoming is self._active and not incoming.finished:
            self._refused = True
            self._stop_pace()
            incoming.refuse(error)
            return
        self._refuse(error)

    def _body_too_slow(self, message: str) -> None:
        log.info("Dropping a client whose request body is too slow: {why}", why=message)
        self._pace = None
        self._refuse_incoming(BodyStalled(message))

    def _refuse(self, error: ProxyError) -> None:
        """
        Answer C{error} on the raw connection (unless an answer has started)
        and close it: for a request that cannot be parsed or may not go on.
        """
        if self._lost or self._refused:
            return
        self._refused = True
        self._unparsed = b""
        self.site.deadlines.forget(self)
        self._stop_pace()
        active = self._active
        if active is None or (isinstance(active, ClientExchange) and not active.startedWriting):
            if isinstance(active, ClientExchange):
                active.refuse(error)
                return
            self.transport.write(raw_answer(error))
            self._close()
        # Otherwise the answer in progress ends and the connection closes.

    def _close(self) -> None:
        self._closing = True
        # Whatever else arrives is not parsed.
        self._reading_done = True
        self._unparsed = b""
        self.site.deadlines.forget(self)
        # A transport whose producer is paused would wait for it instead of
        # closing once its buffer drains.
        self._flow.unregister()
        self.transport.loseConnection()
        if self._close_timer is None:
            self._close_timer = self.site.reactor.callLater(CLOSE_GRACE, self._cut_off)

    def _cut_off(self) -> None:
        self._close_timer = None
        if not self._lost:
            self.transport.abortConnection()

    # Reading pace and backpressure.

    def _stop_pace(self) -> None:
        if self._pace is not None:
            self._pace.stop()
            self._pace = None

    def _hold(self, reason: bytes) -> None:
        """
        Stop reading from the client (the upstream holds the body back, a
        pipelined request waits for its turn, the answers are not being
        read); the body's pace clock stops too.
        """
        if not self._held:
            self.transport.pauseProducing()
            if self._pace is not None:
                self._pace.pause()
        self._held.add(reason)

    def _release(self, reason: bytes) -> None:
        if reason in self._held:
            self._held.discard(reason)
            if not self._held and not self._lost and not self._closing:
                self.transport.resumeProducing()
                if self._pace is not None:
                    self._pace.resume()

    def _hold_body(self) -> None:
        self._hold(b"body")

    def _release_body(self) -> None:
        self._release(b"body")
