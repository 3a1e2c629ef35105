"""
The answer's way back: an upstream response relayed to the client.

L{ResponseRelay} writes the body chunk by chunk as it arrives (with the
upstream as the client transport's producer), meters it, holds a small JSON
answer until complete so its head can carry the cost, and ends the answer
well-formed, or visibly cut short, however the upstream ends.
L{write_response_head} copies the upstream's status and headers;
L{answer_error} answers a call that failed before its answer started.
"""

from typing import List, Optional

from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

from dheera_tx.accounting.metering import deployment_cost_nanos
from dheera_tx.call import Call
from dheera_tx.config import Deployment
from dheera_tx.errors import ProxyError
from dheera_tx.http.hop_headers import NOT_RELAYED, connection_tokens, first_header
from dheera_tx.http.relay_watch import RelayWatch


def write_response_head(request, response, call: Call, extra=(), rewritten: bool = False, length=None) -> None:
    """
    Copy the upstream's status and headers to the client, minus hop-by-hop
    headers, plus the proxy's own.

    :param extra: more C{(name, value)} headers, e.g. the response cost.
    :param rewritten: the body is altered on the way (usage chunk
        stripped), so the upstream's Content-Length no longer holds.
    :param length: the length of a body held whole, or L{None} to take
        the upstream's.
    """
    upstream = response.headers
    drop = NOT_RELAYED | connection_tokens(upstream) if first_header(upstream, b"connection") else NOT_RELAYED
    headers = [(name, value) for name, value in upstream if name.lower() not in drop]
    if rewritten:
        length = None
    elif length is None:
        if request.method == b"HEAD":
            declared = first_header(upstream, b"content-length")
            length = int(declared) if declared is not None and declared.isdigit() else None
        else:
            length = response.length
    headers.append((b"x-dheera-call-id", call.call_id.encode("ascii")))
    headers.append((b"x-dheera-overhead-duration-ms", b"%.3f" % (call.overhead_ms,)))
    headers.extend(extra)
    request.write_head(response.code, response.phrase or None, headers, length)


def answer_error(request, error: ProxyError, call: Call) -> None:
    """
    Answer C{error} in the OpenAI shape, unless the client is gone or the
    answer already started.
    """
    if call.status is None:
        call.status = error.status
    if request.client_gone or request.finished:
        return
    if request.startedWriting:
        request.abort_response()
        return
    call.bytes_out += request.answer_error(error, ((b"x-dheera-call-id", call.call_id.encode("ascii")),))


def answer_json(request, status: int, body: bytes, call: Call) -> None:
    """
    Answer with a JSON document the proxy made itself (the model list),
    unless the client is gone.
    """
    call.status = status
    if request.client_gone or request.finished:
        return
    headers = [(b"Content-Type", b"application/json"), (b"x-dheera-call-id", call.call_id.encode("ascii"))]
    request.write_head(status, None, headers, len(body))
    request.write(body)
    request.finish()
    call.bytes_out += len(body)


class ResponseRelay:
    """
    Writes an upstream response body to the client as each chunk arrives
    (the sink of L{dheera_tx.upstream.client.UpstreamResponse.deliver}).

    The upstream response is registered as the client's producer, so a
    slow client pauses the upstream read instead of growing memory.
    Silence longer than the deployment's C{stream_timeout}, or a call longer
    than its C{timeout}, aborts the upstream.  Every chunk passes through
    the call's usage meter, which may hold back or drop the usage chunk the
    proxy asked for.  A non-streaming JSON answer up to L{HOLD_LIMIT} bytes
    is held until complete, so that its head can carry the response cost.

    :param write_head: for a held answer, writes the response head with
        extra headers and the body's length; L{None} when the head was
        already written.
    :ivar done: fires when the relay has ended (never fails).
    """

    HOLD_LIMIT = 8 * 1024 * 1024

    __slots__ = (
        "_reactor", "_request", "_call", "_deployment", "_sse", "_meter", "_write_head", "_held",
        "_held_bytes", "stream_timeout", "deadline", "last_heard", "_watch", "_failure_kind", "_response", "done",
    )

    def __init__(
        self, reactor, request, call: Call, deployment: Deployment, sse: bool, meter=None, write_head=None, watch=None
    ):
        self._reactor = reactor
        self._request = request
        self._call = call
        self._deployment = deployment
        self._sse = sse
        self._meter = meter
        self._write_head = write_head
        self._held: Optional[List[bytes]] = [] if write_head is not None else None
        self._held_bytes = 0
        self.stream_timeout = deployment.stream_timeout
        self.deadline = call.started_at + deployment.timeout
        self.last_heard = reactor.seconds()
        self._watch = watch or RelayWatch(reactor)
        self._watch.watch(self)
        self._failure_kind: Optional[str] = None
        self._response = None
        self.done: Deferred = Deferred()

    def started(self, response) -> None:
        """
        The relay is attached to C{response} (to stop it on a timeout).
        """
        self._response = response

    def data_received(self, data: bytes) -> None:
        call = self._call
        self.last_heard = now = self._reactor.seconds()
        if call.first_byte_at is None:
            call.first_byte_at = now
        if self._request.client_gone:
            return
        if self._meter is not None:
            data = self._meter.feed(data)
        if self._held is not None:
            self._held.append(data)
            self._held_bytes += len(data)
            if self._held_bytes > self.HOLD_LIMIT:
                self._release_held()
            return
        if data:
            call.bytes_out += len(data)
            self._request.write(data)

    def _release_held(self, extra=(), complete: bool = False) -> None:
        held, self._held = self._held, None
        self._write_head(extra, self._held_bytes if complete else None)
        for chunk in held:
            self._call.bytes_out += len(chunk)
            self._request.write(chunk)

    def _cost_header(self):
        return cost_header(self._meter, self._deployment, self._call.status, self._call.model_name)

    def timed_out(self, kind: str) -> None:
        """
        The call's deadline passed or the upstream fell silent for too
        long (called by L{RelayWatch}): close the upstream connection.
        """
        self._failure_kind = kind
        if self._response is not None:
            self._response.stopProducing()

    def abort(self) -> None:
        """
        The client went away: close the upstream connection now.
        """
        self._failure_kind = "client_disconnected"
        if self._response is not None:
            self._response.stopProducing()

    def body_ended(self, reason: Optional[Failure]) -> None:
        self._watch.forget(self)
        # Break the relay's cycles (response, head writer) so that the call
        # is freed by reference counting, not by the garbage collector.
        self._response = None
        request = self._request
        clean = reason is None and self._failure_kind is None
        if not clean:
            self._call.error = self._failure_kind or "upstream_reset"
        if not request.client_gone and not request.finished:
            request.unregisterProducer()
            if clean:
                if self._held is not None:
                    self._release_held(self._cost_header(), complete=True)
                elif self._meter is not None:
                    tail = self._meter.flush() if hasattr(self._meter, "flush") else b""
                    if tail:
                        self._call.bytes_out += len(tail)
                        request.write(tail)
                request.finish()
            elif self._held is not None:
                # Nothing was written yet: the client gets a proper error.
                self._call.status = 502
                answer_error(request, early_end(self._call.error), self._call)
            elif self._sse and request.open_ended:
                # An SSE client sees why its stream ended, and no [DONE].
                request.write(b"event: error\ndata: " + early_end(self._call.error).body() + b"\n\n")
                request.finish()
            else:
                request.abort_response()
        self._write_head = None
        done, self.done = self.done, None
        done.callback(None)


def cost_header(meter, deployment: Deployment, status: int, model: Optional[str] = None):
    """
    :param model: the name the call was routed by (a LoRA adapter may have
        its own prices).
    :return: the C{x-dheera-response-cost} header (decimal USD) of an answer
        whose usage its meter read, or no header.
    """
    usage = meter.usage() if meter is not None else None
    if usage is None or status >= 400:
        return ()
    nanos = deployment_cost_nanos(usage, deployment, model)
    usd = (b"%d.%09d" % divmod(nanos, 1_000_000_000)).rstrip(b"0").rstrip(b".")
    return ((b"x-dheera-response-cost", usd),)


def early_end(kind: str) -> ProxyError:
    return ProxyError(502, f"The upstream answer ended early ({kind}).", type="upstream_error", code="502")
