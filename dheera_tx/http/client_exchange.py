"""
The client's side of one C{/vllm} call on a lean connection.

A L{ClientExchange} is what the data plane (L{dheera_tx.forwarding}) sees
of a request: its method, raw target, headers, streaming body and the
client's address; and how it answers: a response head, body chunks (framed
with Content-Length, chunked, or to the connection's close), the end of
the answer, or an abort that shows the client the answer was cut short.
It is written straight to the client's transport; the connection
(L{dheera_tx.http.server.GatewayConnection}) learns when the answer is complete
and reads the next request.
"""

from typing import Callable, Dict, List, Optional, Tuple

from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.http_headers import Headers

from dheera_tx.errors import ProxyError, reason_phrase
from dheera_tx.http.request_body import BodyAborted, StreamingBody
from dheera_tx.socket_write import write_now

log = Logger()

_CRLF = b"\r\n"
_LAST_CHUNK = b"0\r\n\r\n"


class ClientExchange:
    """
    One request and its answer.

    :ivar method: the request method.
    :ivar uri: the raw request target.
    :ivar version: C{b"HTTP/1.1"} or C{b"HTTP/1.0"}.
    :ivar requestHeaders: the request headers (L{Headers}).
    :ivar raw_headers: the request headers as received, in order.
    :ivar body: the streaming body, or L{None} when the request has none.
    :ivar rejection: an error to answer without reading the body (too
        large, a target that is not a path), or L{None}.
    :ivar received_at: reactor time at which the headers had arrived.
    :ivar client_gone: the client connection was lost.
    :ivar startedWriting: the response head was written.
    :ivar finished: the answer is complete (or was aborted).
    :ivar keep_alive: the connection may carry another request after this
        answer.
    """

    __slots__ = (
        "method",
        "uri",
        "version",
        "requestHeaders",
        "raw_headers",
        "body",
        "form_watch",
        "rejection",
        "received_at",
        "client_gone",
        "startedWriting",
        "finished",
        "keep_alive",
        "_connection",
        "_transport",
        "_chunked",
        "_has_length",
        "_head",
        "_no_body",
        "_gone_callbacks",
        "_next_token",
        "_producer",
        "_refused",
        "switching",
    )

    def __init__(
        self,
        connection,
        method: bytes,
        uri: bytes,
        version: bytes,
        raw_headers: List[Tuple[bytes, bytes]],
        received_at: float,
        keep_alive: bool,
    ):
        self._connection = connection
        self._transport = connection.transport
        self.method = method
        self.uri = uri
        self.version = version
        self.raw_headers = raw_headers
        headers = Headers()
        for name, value in raw_headers:
            headers.addRawHeader(name, value)
        self.requestHeaders = headers
        self.body: Optional[StreamingBody] = None
        # Watches a multipart body's model parts as it streams.
        self.form_watch = None
        self.rejection: Optional[ProxyError] = None
        self.received_at = received_at
        self.client_gone = False
        self.startedWriting = False
        self.finished = False
        self.keep_alive = keep_alive
        self._chunked = False
        self._has_length = False
        self._head: Optional[bytes] = None
        self._no_body = method == b"HEAD"
        self._gone_callbacks: Optional[Dict[int, Callable[[], None]]] = None
        self._next_token = 0
        self._producer = None
        self._refused = False
        # A WebSocket upgrade the data plane may switch to (see take_over).
        self.switching = False

    # The request.

    def getHeader(self, name: bytes) -> Optional[bytes]:
        """
        :return: the last value of the request header C{name}, or L{None}.
        """
        values = self.requestHeaders.getRawHeaders(name)
        return values[-1] if values else None

    def getClientAddress(self):
        """
        :return: the client's address (an C{IAddress}).
        """
        return self._transport.getPeer()

    @property
    def body_complete(self) -> bool:
        """
        :return: whether the whole request body has been read.
        """
        return self.body is None or self.body.complete

    # The answer.

    @property
    def open_ended(self) -> bool:
        """
        :return: whether the answer's body has no declared length (it is
            chunked or ends with the connection), so more can be appended.
        """
        return not self._has_length

    def write_head(self, code: int, phrase: Optional[bytes], headers: List[Tuple[bytes, bytes]], length: Optional[int]) -> None:
        """
        Write the status line and headers.

        :param headers: C{(name, value)} pairs, without framing headers.
        :param length: the body's length (sent as Content-Length), or
            L{None} when it is not known: the body is then chunked (HTTP/1.1)
            or ends with the connection (HTTP/1.0).  A HEAD request's answer
            passes the length on but carries no body.
        """
        if self.finished or self.client_gone:
            return
        self.startedWriting = True
        if phrase is None:
            phrase = reason_phrase(code)
        lines = [b"%s %d %s\r\n" % (self.version, code, phrase)]
        for name, value in headers:
            lines.append(name + b": " + value + _CRLF)
        if code < 200 or code in (204, 304):
            self._no_body = True
            if code < 200:
                self.keep_alive = False
        elif length is not None:
            self._has_length = True
            lines.append(b"Content-Length: %d\r\n" % (length,))
        elif not self._no_body:
            if self.version == b"HTTP/1.1":
                self._chunked = True
                lines.append(b"Transfer-Encoding: chunked\r\n")
            else:
                self.keep_alive = False
        if not self.body_complete or self.rejection is not None:
            # The rest of the body would be read as the next request.
            self.keep_alive = False
        if not self.keep_alive:
            lines.append(b"Connection: close\r\n")
        elif self.version != b"HTTP/1.1":
            lines.append(b"Connection: keep-alive\r\n")
        lines.append(_CRLF)
        # Sent with the first part of the body (one send for both).
        self._head = b"".join(lines)

    def write(self, data: bytes) -> None:
        """
        Write part of the response body.
        """
        if self.finished or self.client_gone:
            return
        head, self._head = self._head, None
        if self._no_body or not data:
            if head is not None:
                write_now(self._transport, head)
            return
        if self._chunked:
            data = b"%x\r\n%s\r\n" % (len(data), data)
        write_now(self._transport, head + data if head is not None else data)

    def finish(self) -> None:
        """
        The answer is complete.
        """
        if self.finished:
            return
        self.finished = True
        if self.client_gone:
            return
        head, self._head = self._head, None
        if self._chunked:
            write_now(self._transport, head + _LAST_CHUNK if head is not None else _LAST_CHUNK)
        elif head is not None:
            write_now(self._transport, head)
        if not self.body_complete:
            self.keep_alive = False
        self._connection.exchange_done(self)

    def answer_error(self, error: ProxyError, extra: Tuple[Tuple[bytes, bytes], ...] = ()) -> int:
        """
        Answer C{error} in the OpenAI shape.

        :param extra: more headers.
        :return: the body bytes written.
        """
        body = error.body()
        headers = [(b"Content-Type", b"application/json")]
        headers.extend(extra)
        for name, value in error.headers.items():
            headers.append((name.encode("ascii"), str(value).encode("ascii")))
        self.write_head(error.status, None, headers, len(body))
        self.write(body)
        self.finish()
        return len(body)

    def abort_response(self) -> None:
        """
        End an answer that cannot be completed well-formed: drop the
        connection so the client sees it was cut short.
        """
        self.finished = True
        self._head = None
        if not self.client_gone:
            self._transport.abortConnection()

    def refuse(self, error: ProxyError) -> None:
        """
        End this call with C{error} whatever stage it is at (body too large,
        too slow, malformed): fail the body being streamed upstream, answer
        C{error} if no answer has started (else cut the answer short), and
        close the connection.
        """
        if self._refused:
            return
        self._refused = True
        self.keep_alive = False
        if self.body is not None:
            self.body.fail(Failure(error))
        if self.finished or self.client_gone:
            return
        if self.startedWriting:
            self.abort_response()
            return
        self.answer_error(error)

    # Switching protocols.

    def take_over(self, consumer):
        """
        After a C{101 Switching Protocols} (written by the caller): the
        connection stops being HTTP; every byte the client sends from now
        on goes to C{consumer.dataReceived}, and its end to
        C{consumer.connectionLost}.

        :return: the client's transport.
        """
        self.finished = True
        self.startedWriting = True
        return self._connection.take_over(consumer)

    # Backpressure of the answer.

    def registerProducer(self, producer, streaming: bool = True) -> None:
        """
        Let a slow client pause C{producer} (the upstream response).
        """
        if self.client_gone:
            return
        self._producer = producer
        self._connection.attach_producer(producer)

    def unregisterProducer(self) -> None:
        """
        Undo L{registerProducer}.
        """
        if self._producer is not None:
            self._producer = None
            if not self.client_gone:
                self._connection.detach_producer()

    # The client leaving.

    def on_client_gone(self, callback: Callable[[], None]) -> int:
        """
        Call C{callback} if the client connection is lost.

        :return: a token for L{forget_client_gone}.
        """
        if self._gone_callbacks is None:
            self._gone_callbacks = {}
        self._next_token += 1
        self._gone_callbacks[self._next_token] = callback
        return self._next_token

    def forget_client_gone(self, token: int) -> None:
        """
        Cancel a callback registered with L{on_client_gone}.
        """
        if self._gone_callbacks is not None:
            self._gone_callbacks.pop(token, None)

    def connection_lost(self) -> None:
        """
        The client connection closed (called by the connection).
        """
        if self.client_gone:
            return
        self.client_gone = True
        self._producer = None
        if self.body is not None and not self.body.complete:
            self.body.fail(Failure(BodyAborted()))
        callbacks, self._gone_callbacks = self._gone_callbacks, None
        if callbacks:
            for callback in callbacks.values():
                try:
                    callback()
                except Exception:
                    log.failure("client-gone callback failed")
