"""
A fake vLLM OpenAI-compatible server for integration tests of the proxy.

It runs on the test's reactor, listens on 127.0.0.1 port 0, answers like
vLLM 0.32 (routes, SSE framing, usage objects, error shapes; see
``/work/shared/VLLM_API.md``) with deterministic token counts, records every
request it receives as the bytes arrive, and misbehaves on demand.

Faults come from :attr:`FakeVLLM.fault` or, for one request, the
``x-fake-fault`` header (which replaces the default; an empty header means no
fault). Both are comma-separated ``name`` or ``name=value`` items:

``slow_first_byte=S``  wait S seconds before the status line.
``slow_chunks=S``      wait S seconds between SSE events.
``reset_mid_stream=N`` abort the TCP connection after N SSE events (for a
                       non-streamed answer: after N bytes of its body).
``hang``               never answer; keep the connection open.
``status=CODE``        answer CODE with vLLM's error shape.
``garbage``            200 text/event-stream with bytes that are not SSE.
``huge_headers=N``     add about N bytes of extra response headers.
``chunks=N``           generate N completion tokens, whatever max_tokens says.
``big_body=N``         200 application/octet-stream of N bytes, produced in
                       64 KiB pieces by a push producer (backpressure).
``gzip``               gzip-compress JSON answers (Content-Encoding: gzip).
``gzip_if_accepted``   gzip-compress JSON answers when the request's
                       Accept-Encoding names gzip (a compressing proxy).
``reasoning``          stream the generated tokens as ``reasoning`` deltas.
``tool_calls``         stream the generated tokens as tool-call
                       ``arguments`` deltas.

Started with vLLM's queue caps (``FakeVLLM(max_num_queued_reqs=...,
max_num_queued_tokens=...)``), the fake refuses the engine calls it cannot
queue as vLLM does (:mod:`tests.vllm_admission`): a call is unfinished from
its arrival until its answer ends, and in prefill (its prompt words
counted) until its answer starts.
"""

import base64
import gzip as gziplib
import json
import math
import struct
import zlib
from io import BytesIO
from typing import Any, Callable, Optional

import attr
from twisted.internet.defer import Deferred, gatherResults, succeed
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.interfaces import IPushProducer
from twisted.web import http
from twisted.web.iweb import INonQueuedRequestFactory
from zope.interface import implementer, provider

from tests.vllm_admission import AdmissionControl, refusal_body, requested_sequences

MAX_KEPT_BODY = 1024 * 1024
BIG_BODY_PIECE = 64 * 1024
VLLM_VERSION = "0.32.0"
# The context length of the served model (vLLM's tiny test models: 512).
MAX_MODEL_LEN = 512

_ERROR_TYPES = {
    400: "BadRequestError",
    401: "UnauthorizedError",
    403: "ForbiddenError",
    404: "NotFoundError",
    429: "TooManyRequestsError",
    500: "InternalServerError",
    501: "NotImplementedError",
    502: "BadGatewayError",
    503: "ServiceUnavailableError",
    504: "GatewayTimeoutError",
}
_FAULT_VALUES: dict = {
    "slow_first_byte": float, "slow_chunks": float, "reset_mid_stream": int, "hang": None,
    "status": int, "garbage": None, "huge_headers": int, "chunks": int, "big_body": int,
    "gzip": None, "gzip_if_accepted": None, "reasoning": None, "tool_calls": None,
}
_GARBAGE = b"<html><body>502 upstream went weird</body></html>\r\n\x00\xff\xfe not-sse"


@attr.s(auto_attribs=True, eq=False)
class ReceivedRequest:
    """
    One request as the fake saw it; mutated while its body arrives.

    :ivar method: the request method as sent.
    :ivar uri: the raw path and query as sent.
    :ivar headers: lower-case header name -> every value, in order.
    :ivar index: position in :attr:`FakeVLLM.received`.
    :ivar body: the first :data:`MAX_KEPT_BODY` bytes of the body.
    :ivar body_length: bytes of body received so far (including discarded ones).
    :ivar first_body_byte_at: ``reactor.seconds()`` of the first body byte.
    :ivar body_done_at: ``reactor.seconds()`` when the body was complete.
    :ivar body_done: whether the whole body has arrived.
    :ivar form: multipart form fields (transcriptions): name -> text, or for
        a file part ``{"filename", "content_type", "size"}``.
    """

    method: bytes
    uri: bytes
    headers: dict
    index: int = -1
    body: bytes = b""
    body_length: int = 0
    first_body_byte_at: Optional[float] = None
    body_done_at: Optional[float] = None
    body_done: bool = False
    form: dict = attr.ib(factory=dict)

    @property
    def json(self) -> Any:
        """
        :return: the body parsed as JSON, or ``None`` if it is incomplete,
            truncated or not JSON.
        """
        if not self.body_done or len(self.body) != self.body_length:
            return None
        try:
            return json.loads(self.body)
        except ValueError:
            return None

    def header(self, name: str) -> Optional[str]:
        """
        :param name: a header name, any case.
        :return: the last value of that header, or ``None``.
        """
        values = self.headers.get(name.lower())
        return values[-1] if values else None


@attr.s(auto_attribs=True, eq=False)
class Answer:
    """
    What a route decided to send.

    :ivar status: HTTP status.
    :ivar content_type: the Content-Type, or ``None`` for none.
    :ivar body: the whole body (when ``events`` is ``None``).
    :ivar events: SSE events, each written separately, or ``None``.
    :ivar headers: extra response headers.
    """

    status: int = 200
    content_type: Optional[bytes] = b"application/json"
    body: bytes = b""
    events: Optional[list] = None
    headers: list = attr.ib(factory=list)


def dumps(value: Any) -> bytes:
    """
    :param value: a JSON-able value.
    :return: compact JSON, as vLLM's pydantic models write it.
    """
    return json.dumps(value, separators=(",", ":")).encode("utf-8")


def json_answer(value: Any, status: int = 200) -> Answer:
    """
    :param value: a JSON-able value.
    :param status: HTTP status.
    :return: an :class:`Answer` carrying ``value`` as JSON.
    """
    return Answer(status=status, body=dumps(value))


def error_answer(status: int, message: str, type: Optional[str] = None,
                 param: Optional[str] = None) -> Answer:
    """
    :param status: HTTP status, repeated as ``code``.
    :param message: the error message.
    :param type: the error type; derived from ``status`` when omitted.
    :param param: the request field at fault.
    :return: vLLM's ``{"error": {message, type, param, code}}`` answer.
    """
    if type is None:
        type = _ERROR_TYPES.get(status, "Error%d" % (status,))
    return json_answer(
        {"error": {"message": message, "type": type, "param": param, "code": status}},
        status,
    )


def parse_faults(spec: str) -> dict:
    """
    :param spec: comma-separated ``name`` or ``name=value`` items.
    :return: name -> value (an int or float, or ``None`` for a bare name).
    :raises ValueError: for an unknown fault or a missing or bad value.
    """
    faults: dict = {}
    for item in spec.split(","):
        item = item.strip()
        if not item:
            continue
        name, sep, value = (part.strip() for part in item.partition("="))
        if name not in _FAULT_VALUES:
            raise ValueError(f"unknown fake fault {name!r}")
        kind = _FAULT_VALUES[name]
        if kind is None:
            faults[name] = None
            continue
        try:
            faults[name] = kind(value)
        except ValueError:
            raise ValueError(f"fake fault {name!r} needs a number, not {value!r}") from None
    return faults


class _Refused(Exception):
    """
    A handler refuses the request with C{answer} (vLLM's validation error).
    """

    def __init__(self, answer: Answer):
        super().__init__(answer.status)
        self.answer = answer


@provider(INonQueuedRequestFactory)
class _RecordingRequest(http.Request):
    """
    A request that records its body as it streams in, keeps at most
    :data:`MAX_KEPT_BODY` bytes of it, and never spools to disk.
    """

    def __init__(self, channel: http.HTTPChannel) -> None:
        super().__init__(channel, parsePOSTFormSubmission=False)
        self.fake: FakeVLLM = channel.fake
        self.record: Optional[ReceivedRequest] = None

    def gotLength(self, length: Optional[int]) -> None:
        """
        Called once the headers are in: create the record now so a test can
        watch an upload in progress.

        :param length: the declared body length, or ``None`` (chunked).
        """
        headers: dict = {}
        for name, values in self.requestHeaders.getAllRawHeaders():
            headers[name.decode("latin-1").lower()] = [v.decode("latin-1") for v in values]
        self.record = ReceivedRequest(
            method=getattr(self.channel, "_command", b""),
            uri=getattr(self.channel, "_path", b""),
            headers=headers,
        )
        self.content = BytesIO()
        self.fake._add_record(self.record)

    def handleContentChunk(self, data: bytes) -> None:
        """
        :param data: the next piece of the request body.
        """
        record = self.record
        if record.first_body_byte_at is None:
            record.first_body_byte_at = self.fake.reactor.seconds()
        record.body_length += len(data)
        room = MAX_KEPT_BODY - len(record.body)
        if room > 0:
            record.body += data[:room]

    def requestReceived(self, command: bytes, path: bytes, version: bytes) -> None:
        """
        The body is complete: timestamp it and answer.
        """
        record = self.record
        record.body_done = True
        record.body_done_at = self.fake.reactor.seconds()
        self.content = BytesIO(record.body)
        super().requestReceived(command, path, version)
        self.fake._check_waiters()

    def process(self) -> None:
        """
        Hand the request to an :class:`_Exchange`.
        """
        _Exchange(self.fake, self).run()


class _TrackedChannel(http.HTTPChannel):
    """
    An HTTP channel that tells the fake when it opens and closes.
    """

    fake: "FakeVLLM"
    _realtime: Any = None
    _first_read = True

    def connectionMade(self) -> None:
        """
        Count the connection as open.
        """
        super().connectionMade()
        self.fake._channel_opened(self)

    def dataReceived(self, data: bytes) -> None:
        """
        A connection that starts with a realtime upgrade is a WebSocket
        session (:mod:`tests.fake_realtime`), not HTTP.
        """
        if self._realtime is not None:
            self._realtime.dataReceived(data)
            return
        if self._first_read and data.startswith(b"GET /v1/realtime"):
            from tests.fake_realtime import FakeRealtimeSession

            self._realtime = FakeRealtimeSession(self.fake, self.transport)
            self._realtime.dataReceived(data)
            return
        self._first_read = False
        super().dataReceived(data)

    def connectionLost(self, reason: Any) -> None:
        """
        Count the connection as closed and note when.
        """
        super().connectionLost(reason)
        self.fake._channel_closed(self)


class _FakeFactory(http.HTTPFactory):
    """
    Builds tracked channels; no access log, no log-date timer.
    """

    def __init__(self, fake: "FakeVLLM") -> None:
        super().__init__(reactor=fake.reactor, timeout=fake.idle_timeout)
        self.fake = fake

    def buildProtocol(self, addr: Any) -> _TrackedChannel:
        channel = _TrackedChannel()
        channel.factory = self
        channel.fake = self.fake
        channel.requestFactory = _RecordingRequest
        channel.callLater = self.reactor.callLater
        channel.timeOut = self.timeOut
        return channel

    def startFactory(self) -> None:
        pass

    def stopFactory(self) -> None:
        pass

    def log(self, request: Any) -> None:
        pass


@implementer(IPushProducer)
class _BigBodyProducer:
    """
    Writes ``total`` bytes in 64 KiB pieces while the transport wants them.
    """

    def __init__(self, exchange: "_Exchange", total: int) -> None:
        self._exchange = exchange
        self._remaining = total
        self._paused = False
        self._stopped = False
        self._scheduled = False

    def start(self) -> None:
        """
        Register as the response's push producer and begin writing.
        """
        self._exchange.request.registerProducer(self, True)
        self._schedule()

    def _schedule(self) -> None:
        if not self._scheduled and not self._stopped:
            self._scheduled = True
            self._exchange.later(0, self._produce)

    def _produce(self) -> None:
        self._scheduled = False
        request = self._exchange.request
        while self._remaining and not self._paused and not self._stopped:
            size = min(BIG_BODY_PIECE, self._remaining)
            self._remaining -= size
            self._exchange.fake.big_body_written += size
            request.write(b"x" * size)
        if not self._remaining and not self._stopped:
            self._stopped = True
            request.unregisterProducer()
            request.finish()

    def pauseProducing(self) -> None:
        """
        The transport's buffer is full: stop writing.
        """
        self._paused = True

    def resumeProducing(self) -> None:
        """
        The transport drained: write more on the next reactor turn.
        """
        self._paused = False
        self._schedule()

    def stopProducing(self) -> None:
        """
        The connection is gone: never write again.
        """
        self._stopped = True


class _Exchange:
    """
    Answers one request: faults, then the route's :class:`Answer`.
    """

    def __init__(self, fake: "FakeVLLM", request: _RecordingRequest) -> None:
        self.fake = fake
        self.request = request
        self.record = request.record
        self.faults: dict = {}
        self._calls: set = set()
        self._gone = False
        self._producer: Optional[_BigBodyProducer] = None

    def later(self, delay: float, f: Callable, *args: Any) -> None:
        """
        Call ``f`` after ``delay`` seconds unless the connection goes first.
        """
        def fire() -> None:
            self._calls.discard(call)
            f(*args)

        call = self.fake.reactor.callLater(delay, fire)
        self._calls.add(call)

    def _finished(self, result: None) -> None:
        self.fake.requests_running -= 1
        self.fake._admitted_ended(self)
        self._unpost()

    def _unpost(self) -> None:
        if getattr(self, "_posted", False):
            self._posted = False
            self.fake.posts_running -= 1

    def _lost(self, reason: Any) -> None:
        self.fake.requests_running -= 1
        self.fake._admitted_ended(self)
        self._unpost()
        self._gone = True
        for call in self._calls:
            if call.active():
                call.cancel()
        self._calls.clear()
        if self._producer is not None:
            self._producer.stopProducing()

    def fault_value(self, name: str) -> Any:
        """
        :return: the numeric value of fault ``name``, or ``None``.
        """
        return self.faults.get(name)

    def run(self) -> None:
        """
        Apply the faults and answer.
        """
        request = self.request
        self.fake.requests_running += 1
        if request.method == b"POST":
            self._posted = True
            self.fake.posts_running += 1
            self.fake.most_running = max(self.fake.most_running, self.fake.posts_running)
        request.notifyFinish().addCallbacks(self._finished, self._lost)
        headers = request.responseHeaders
        headers.setRawHeaders(b"x-fake-request-index", [b"%d" % (self.record.index,)])
        request_id = request.requestHeaders.getRawHeaders(b"x-request-id")
        if request_id:
            headers.setRawHeaders(b"x-request-id", request_id[-1:])
        header_fault = self.record.header("x-fake-fault")
        spec = header_fault if header_fault is not None else (self.fake.fault or "")
        try:
            self.faults = parse_faults(spec)
        except ValueError as e:
            self._send(error_answer(400, f"fake vLLM: {e}", "FakeFaultError"))
            return
        if self.fake.admission.capped and request.path in ENGINE_ROUTES and not self.fake._admit(self):
            return
        if "hang" in self.faults:
            return
        delay = self.faults.get("slow_first_byte")
        if delay:
            self.later(delay, self._answer)
        else:
            self._answer()

    def _answer(self) -> None:
        status = self.fault_value("status")
        if status is not None:
            answer = error_answer(status, f"fake vLLM fault: status {status}")
        elif "garbage" in self.faults:
            answer = Answer(content_type=b"text/event-stream", events=[_GARBAGE])
        elif "big_body" in self.faults:
            self._start_big_body(self.fault_value("big_body"))
            return
        else:
            try:
                answer = self.fake.routes.answer(self)
            except Exception as e:
                # A request shape the fake did not foresee must not hang the test.
                answer = error_answer(500, f"fake vLLM could not answer: {e!r}")
        self._send(answer)

    def _write_head(self, answer: Answer) -> None:
        request = self.request
        request.setResponseCode(answer.status)
        headers = request.responseHeaders
        headers.setRawHeaders(b"date", [http.datetimeToString(self.fake.reactor.seconds())])
        headers.setRawHeaders(b"server", [b"uvicorn"])
        if answer.content_type is not None:
            headers.setRawHeaders(b"content-type", [answer.content_type])
        for name, value in answer.headers:
            headers.addRawHeader(name, value)
        pad = self.fault_value("huge_headers")
        if pad:
            for i in range(math.ceil(pad / 4000)):
                size = min(4000, pad - i * 4000)
                headers.setRawHeaders(b"x-fake-pad-%d" % (i,), [b"p" * max(size - 16, 1)])

    def _send(self, answer: Answer) -> None:
        if self._gone:
            return
        # The answer starts: the call has left prefill.
        self.fake._prefilling.pop(self, None)
        request = self.request
        self._write_head(answer)
        reset = self.fault_value("reset_mid_stream")
        if answer.events is not None:
            request.write(b"")
            self._write_events(answer.events, 0, reset)
            return
        body = answer.body
        accepted = b"gzip" in (self.request.getHeader(b"accept-encoding") or b"").lower()
        gzip_fault = "gzip" in self.faults or ("gzip_if_accepted" in self.faults and accepted)
        if gzip_fault and (answer.content_type or b"").startswith(b"application/json"):
            body = gziplib.compress(body, mtime=0)
            request.responseHeaders.setRawHeaders(b"content-encoding", [b"gzip"])
        request.responseHeaders.setRawHeaders(b"content-length", [b"%d" % (len(body),)])
        if reset is not None:
            request.write(body[: min(reset, max(len(body) - 1, 0))])
            self._abort_when_flushed(0)
            return
        request.write(body)
        request.finish()

    def _write_events(self, events: list, i: int, reset: Optional[int]) -> None:
        if self._gone:
            return
        if reset is not None and i >= min(reset, len(events)):
            self._abort_when_flushed(0)
            return
        if i == len(events):
            self.request.finish()
            return
        self.request.write(events[i])
        gap = self.faults.get("slow_chunks") or 0
        self.later(gap, self._write_events, events, i + 1, reset)

    def _abort_when_flushed(self, tries: int) -> None:
        # abortConnection() discards unsent bytes; let what was "sent" leave.
        if self._gone:
            return
        transport = self.request.transport
        pending = len(getattr(transport, "dataBuffer", b"")) - getattr(transport, "offset", 0)
        pending += getattr(transport, "_tempDataLen", 0)
        if pending > 0 and tries < 200:
            self.later(0.005, self._abort_when_flushed, tries + 1)
        else:
            transport.abortConnection()

    def _start_big_body(self, total: int) -> None:
        answer = Answer(content_type=b"application/octet-stream")
        self._write_head(answer)
        self.request.responseHeaders.setRawHeaders(b"content-length", [b"%d" % (total,)])
        self._producer = _BigBodyProducer(self, total)
        self._producer.start()


# The routes whose calls reach vLLM's engine, and so its admission check.
ENGINE_ROUTES = frozenset([
    b"/v1/chat/completions", b"/v1/completions", b"/v1/responses", b"/v1/embeddings", b"/score", b"/v1/score",
    b"/rerank", b"/v1/rerank", b"/v2/rerank", b"/pooling", b"/classify", b"/v1/audio/transcriptions",
    b"/v1/audio/translations", b"/invocations",
])


def prompt_of(payload: Any) -> int:
    """
    :return: the prompt words of an engine call's JSON body, as the fake
        counts them (chat messages, a prompt, an input), at least 1.
    """
    if not isinstance(payload, dict):
        return 1
    if isinstance(payload.get("messages"), list):
        count = sum(content_words(m.get("content")) for m in payload["messages"] if isinstance(m, dict))
    elif "prompt" in payload:
        count = prompt_words(payload["prompt"])
    else:
        count = input_words(payload.get("input"))
    return max(1, count)


def words(text: Any) -> int:
    """
    :return: the number of whitespace-separated words in ``text`` (0 if not a str).
    """
    return len(text.split()) if isinstance(text, str) else 0


def content_words(content: Any) -> int:
    """
    :param content: a chat message's content: a str or a list of parts.
    :return: the words of its text.
    """
    if isinstance(content, list):
        return sum(words(part.get("text")) for part in content if isinstance(part, dict))
    return words(content)


def prompt_words(prompt: Any) -> int:
    """
    :param prompt: a str, a list of token ids, or a list of those.
    :return: its token count: words, or ids.
    """
    if isinstance(prompt, list):
        if prompt and all(isinstance(p, int) for p in prompt):
            return len(prompt)
        return sum(prompt_words(p) for p in prompt)
    return words(prompt)


def input_words(value: Any) -> int:
    """
    :param value: a Responses API ``input``: a str or a list of items.
    :return: the words of its text.
    """
    if isinstance(value, list):
        return sum(content_words(item.get("content")) for item in value if isinstance(item, dict))
    return words(value)


def sse(value: Any) -> bytes:
    """
    :return: one ``data:`` event, framed like vLLM's.
    """
    return b"data: " + dumps(value) + b"\n\n"


def parse_multipart(body: bytes, boundary: bytes) -> dict:
    """
    :param body: a multipart/form-data body (maybe truncated).
    :param boundary: its boundary.
    :return: name -> text for fields, name -> ``{"filename", "content_type",
        "size"}`` for files.
    """
    form: dict = {}
    for part in body.split(b"--" + boundary)[1:]:
        if part.startswith(b"--"):
            break
        if part.startswith(b"\r\n"):
            part = part[2:]
        head, sep, content = part.partition(b"\r\n\r\n")
        if not sep:
            continue
        if content.endswith(b"\r\n"):
            content = content[:-2]
        params: dict = {}
        content_type = None
        for line in head.split(b"\r\n"):
            key, _, value = line.partition(b":")
            key = key.strip().lower()
            if key == b"content-type":
                content_type = value.strip().decode("latin-1")
            elif key == b"content-disposition":
                for item in value.split(b";")[1:]:
                    k, _, v = item.strip().partition(b"=")
                    params[k.lower().decode("latin-1")] = v.strip(b'"').decode("utf-8", "replace")
        name = params.get("name")
        if name is None:
            continue
        if "filename" in params:
            form[name] = {"filename": params["filename"], "content_type": content_type,
                          "size": len(content)}
        else:
            form[name] = content.decode("utf-8", "replace")
    return form


class VLLMRoutes:
    """
    The vLLM endpoints the fake serves, answering deterministically.

    :param fake: the :class:`FakeVLLM` whose model, key and counters to use.
    """

    def __init__(self, fake: "FakeVLLM") -> None:
        self.fake = fake
        post, get = b"POST", b"GET"
        self._table = {
            b"/v1/chat/completions": (post, self.chat, True),
            b"/v1/completions": (post, self.completions, True),
            b"/v1/responses": (post, self.responses, True),
            b"/v1/embeddings": (post, self.embeddings, True),
            b"/score": (post, self.score, True),
            b"/v1/score": (post, self.score, True),
            b"/rerank": (post, self.rerank, True),
            b"/v1/rerank": (post, self.rerank, True),
            b"/v2/rerank": (post, self.rerank, True),
            b"/pooling": (post, self.pooling, True),
            b"/classify": (post, self.classify, True),
            b"/tokenize": (post, self.tokenize, True),
            b"/detokenize": (post, self.detokenize, True),
            b"/v1/audio/transcriptions": (post, self.transcriptions, False),
            b"/v1/audio/translations": (post, self.translations, False),
            b"/invocations": (post, self.invocations, True),
            b"/v1/models": (get, self.models, False),
            b"/health": (get, self.health, False),
            b"/version": (get, self.version, False),
            b"/metrics": (get, self.metrics, False),
            b"/sleep": (post, self.sleep, False),
            b"/wake_up": (post, self.wake_up, False),
            b"/is_sleeping": (get, self.is_sleeping, False),
        }

    def answer(self, exchange: _Exchange) -> Answer:
        """
        :param exchange: the request being answered (body complete).
        :return: what vLLM would answer.
        """
        request = exchange.request
        path, method = request.path, request.method
        key = self.fake.api_key
        if (key is not None and method != b"OPTIONS"
                and path.startswith((b"/v1", b"/v2", b"/inference", b"/cohere"))):
            scheme, _, token = (request.getHeader(b"authorization") or b"").partition(b" ")
            if scheme.lower() != b"bearer" or token.strip() != key.encode("utf-8"):
                return json_answer({"error": "Unauthorized"}, 401)
        route = self._table.get(path)
        if route is None and path.startswith(b"/v1/responses/"):
            return self.stored_response(exchange, path[len(b"/v1/responses/"):])
        if route is None:
            return json_answer({"detail": "Not Found"}, 404)
        allowed, handler, wants_json = route
        if method != allowed:
            answer = json_answer({"detail": "Method Not Allowed"}, 405)
            answer.headers.append((b"allow", allowed))
            return answer
        if not wants_json:
            return handler(exchange)
        media_type = (request.getHeader(b"content-type") or b"").split(b";")[0].strip().lower()
        if media_type != b"application/json":
            return error_answer(
                400, "Unsupported Media Type: Only 'application/json' is allowed", "Bad Request")
        try:
            payload = json.loads(exchange.record.body)
        except ValueError as e:
            return error_answer(400, f"JSON decode error: {e}", "Bad Request")
        if not isinstance(payload, dict):
            return error_answer(400, "Input should be a valid dictionary", "Bad Request")
        unknown = self._unknown_model(payload.get("model"))
        if unknown is not None:
            return unknown
        try:
            return handler(exchange, payload)
        except _Refused as refused:
            return refused.answer

    def _unknown_model(self, model: Any) -> Optional[Answer]:
        if model is None or model == self.fake.served_model or model in self.fake.lora_modules:
            return None
        return error_answer(404, f"The model `{model}` does not exist.", "NotFoundError", "model")

    def _ids(self, exchange: _Exchange, payload: dict) -> tuple:
        # Like vLLM's _base_request_id: the header, else the body's
        # request_id, else a new id.
        request_id = (exchange.record.header("x-request-id") or payload.get("request_id")
                      or "fake%028x" % (exchange.record.index,))
        return request_id, int(self.fake.reactor.seconds()), payload.get("model") or self.fake.served_model

    @staticmethod
    def _generation(exchange: _Exchange, payload: dict, *limits: str) -> tuple:
        """
        :return: how many tokens to generate and the finish reason.
        :raise _Refused: with vLLM's 400 for a limit outside 1 to the
            model's context (vLLM checks this before generating anything).
        """
        chunks = exchange.fault_value("chunks")
        if chunks is not None:
            return chunks, "length"
        for key in limits:
            value = payload.get(key)
            if isinstance(value, int) and not isinstance(value, bool):
                if value < 1:
                    raise _Refused(error_answer(400, f"{key} must be at least 1, got {value}.", "BadRequestError", key))
                if value > MAX_MODEL_LEN:
                    raise _Refused(error_answer(
                        400, f"{key}={value} cannot be greater than max_model_len={MAX_MODEL_LEN}. Please request "
                        "fewer output tokens.", "BadRequestError", key))
                return value, "length"
        return 8, "stop"

    @staticmethod
    def _usage(prompt: int, completion: int) -> dict:
        return {"prompt_tokens": prompt, "total_tokens": prompt + completion,
                "completion_tokens": completion}

    def _stream(self, head: dict, prompt: int, deltas: list, final: dict,
                options: Any, with_role: bool = False, role: Optional[dict] = None,
                tokens: Optional[int] = None) -> Answer:
        # vLLM: StreamOptions.include_usage defaults to true, so any
        # stream_options object asks for usage unless it says false (or
        # null); continuous_usage_stats counts only with it.
        if isinstance(options, dict):
            include = bool(options.get("include_usage", True))
            continuous = include and bool(options.get("continuous_usage_stats", False))
        else:
            include = continuous = False

        def chunk(choice: dict, done: int) -> bytes:
            value = dict(head, choices=[choice])
            if continuous:
                value["usage"] = self._usage(prompt, done)
            return sse(value)

        events = [chunk(role, 0)] if with_role else []
        events += [chunk(delta, i + 1) for i, delta in enumerate(deltas)]
        generated = len(deltas) if tokens is None else tokens
        events.append(chunk(final, generated))
        if include:
            events.append(sse(dict(head, choices=[], usage=self._usage(prompt, generated),
                                   system_fingerprint=f"vllm-{VLLM_VERSION}-fake")))
        events.append(b"data: [DONE]\n\n")
        return Answer(content_type=b"text/event-stream; charset=utf-8", events=events)

    def chat(self, exchange: _Exchange, payload: dict) -> Answer:
        """
        ``POST /v1/chat/completions``.  The ``reasoning`` and ``tool_calls``
        faults stream the tokens as reasoning or tool-call argument deltas;
        ``prompt_logprobs`` and ``return_token_ids`` add their vLLM fields,
        after ``usage`` as vLLM's response model orders them.
        """
        messages = payload.get("messages")
        prompt = sum(content_words(m.get("content")) for m in messages or [] if isinstance(m, dict))
        count, finish = self._generation(exchange, payload, "max_completion_tokens", "max_tokens")
        request_id, created, model = self._ids(exchange, payload)
        tokens = [f"tok{i} " for i in range(count)]
        self.fake.account(prompt, count, finish)
        head = {"id": "chatcmpl-" + request_id, "object": "chat.completion.chunk",
                "created": created, "model": model}
        if payload.get("stream"):
            if "reasoning" in exchange.faults:
                deltas = [{"reasoning": t} for t in tokens]
            elif "tool_calls" in exchange.faults:
                # The opening tool-call delta names the function; each
                # token then comes as a piece of its arguments.
                deltas = [{"tool_calls": [{"index": 0, "id": "call_0", "type": "function",
                                           "function": {"name": "lookup", "arguments": ""}}]}]
                deltas += [{"tool_calls": [{"index": 0, "function": {"arguments": t}}]} for t in tokens]
            else:
                deltas = [{"content": t} for t in tokens]
            events = [{"index": 0, "delta": d, "logprobs": None, "finish_reason": None} for d in deltas]
            return self._stream(
                head, prompt, events,
                {"index": 0, "delta": {"content": ""}, "logprobs": None,
                 "finish_reason": finish, "stop_reason": None},
                payload.get("stream_options"), with_role=True,
                role={"index": 0, "delta": {"role": "assistant", "content": ""},
                      "logprobs": None, "finish_reason": None}, tokens=count)
        message = {"role": "assistant", "content": "".join(tokens), "refusal": None,
                   "annotations": None, "audio": None, "function_call": None,
                   "tool_calls": [], "reasoning": None}
        prompt_ids = [1000 + i for i in range(prompt)] if payload.get("return_token_ids") else None
        choice = {"index": 0, "message": message, "logprobs": self._logprobs(payload, tokens),
                  "finish_reason": finish, "stop_reason": None}
        if prompt_ids is not None:
            choice["token_ids"] = [2000 + i for i in range(count)]
        logprobs = None
        wanted = payload.get("prompt_logprobs")
        if isinstance(wanted, int) and not isinstance(wanted, bool) and wanted >= 0:
            logprobs = [None] + [{str(1000 + i): {"logprob": -1.25, "rank": 1, "decoded_token": f"w{i}"}}
                                 for i in range(1, prompt)]
        return json_answer(dict(
            head, object="chat.completion", choices=[choice],
            service_tier=None, system_fingerprint=None,
            usage=dict(self._usage(prompt, count), prompt_tokens_details=None),
            prompt_logprobs=logprobs, prompt_token_ids=prompt_ids, kv_transfer_params=None))

    @staticmethod
    def _logprobs(payload: dict, tokens: list) -> Optional[dict]:
        """
        :return: a chat choice's ``logprobs`` when the request asked for
            them (``logprobs: true``, ``top_logprobs`` alternatives each).
        """
        if payload.get("logprobs") is not True:
            return None
        top = payload.get("top_logprobs")
        top = top if isinstance(top, int) and not isinstance(top, bool) and top > 0 else 0

        def entry(token: str) -> dict:
            return {"token": token, "logprob": -0.5, "bytes": list(token.encode("utf-8"))}

        return {"content": [dict(entry(t), top_logprobs=[entry(t)] * top) for t in tokens]}

    def completions(self, exchange: _Exchange, payload: dict) -> Answer:
        """
        ``POST /v1/completions``.
        """
        prompt = prompt_words(payload.get("prompt"))
        count, finish = self._generation(exchange, payload, "max_tokens")
        request_id, created, model = self._ids(exchange, payload)
        tokens = [f"tok{i} " for i in range(count)]
        self.fake.account(prompt, count, finish)
        head = {"id": "cmpl-" + request_id, "object": "text_completion",
                "created": created, "model": model}
        if payload.get("stream"):
            return self._stream(
                head, prompt,
                [{"index": 0, "text": t, "logprobs": None, "finish_reason": None,
                  "stop_reason": None} for t in tokens],
                {"index": 0, "text": "", "logprobs": None, "finish_reason": finish,
                 "stop_reason": None},
                payload.get("stream_options"))
        return json_answer(dict(
            head,
            choices=[{"index": 0, "text": "".join(tokens), "logprobs": None,
                      "finish_reason": finish, "stop_reason": None, "prompt_logprobs": None}],
            service_tier=None, system_fingerprint=None,
            usage=dict(self._usage(prompt, count), prompt_tokens_details=None),
            kv_transfer_params=None))

    def responses(self, exchange: _Exchange, payload: dict) -> Answer:
        """
        ``POST /v1/responses``: JSON, or named SSE events ending with
        ``response.completed`` (no ``[DONE]``).
        """
        previous = payload.get("previous_response_id")
        if previous is not None and previous not in self.fake.responses:
            return self._response_not_found(previous)
        prompt = words(payload.get("instructions")) + input_words(payload.get("input"))
        count, finish = self._generation(exchange, payload, "max_output_tokens")
        _, created, model = self._ids(exchange, payload)
        # The Responses API names a response by the body's request_id alone
        # (vLLM ignores X-Request-Id here), default resp_<random>.
        response_id = payload.get("request_id") or "resp_fake%028x" % (exchange.record.index,)
        tokens = [f"tok{i} " for i in range(count)]
        text = "".join(tokens)
        self.fake.account(prompt, count, finish)
        item_id = "msg_" + response_id
        usage = {"input_tokens": prompt, "input_tokens_details": {"cached_tokens": 0},
                 "output_tokens": count, "output_tokens_details": {"reasoning_tokens": 0},
                 "total_tokens": prompt + count}
        part = {"type": "output_text", "text": text, "annotations": [], "logprobs": None}
        item = {"id": item_id, "type": "message", "role": "assistant", "status": "completed",
                "content": [part]}

        def response(status: str, output: list, usage: Optional[dict]) -> dict:
            return {"id": response_id, "object": "response", "created_at": created,
                    "model": model, "status": status, "output": output, "usage": usage,
                    "instructions": payload.get("instructions"),
                    "max_output_tokens": payload.get("max_output_tokens"),
                    "parallel_tool_calls": True, "tool_choice": "auto", "tools": [],
                    "background": False, "previous_response_id": previous,
                    "text": {"format": {"type": "text"}}, "incomplete_details": None,
                    "error": None, "metadata": None}

        if payload.get("store") is not False:
            self.fake.responses[response_id] = response("completed", [item], usage)
        if not payload.get("stream"):
            return json_answer(response("completed", [item], usage))
        events: list = []

        def event(kind: str, **fields: Any) -> None:
            value = dict({"type": kind, "sequence_number": len(events)}, **fields)
            events.append(b"event: " + kind.encode("ascii") + b"\ndata: " + dumps(value) + b"\n\n")

        where = {"item_id": item_id, "output_index": 0, "content_index": 0}
        event("response.created", response=response("in_progress", [], None))
        event("response.in_progress", response=response("in_progress", [], None))
        event("response.output_item.added", output_index=0,
              item=dict(item, status="in_progress", content=[]))
        event("response.content_part.added", part=dict(part, text=""), **where)
        for token in tokens:
            event("response.output_text.delta", delta=token, logprobs=[], **where)
        event("response.output_text.done", text=text, logprobs=[], **where)
        event("response.content_part.done", part=part, **where)
        event("response.output_item.done", output_index=0, item=item)
        event("response.completed", response=response("completed", [item], usage))
        return Answer(content_type=b"text/event-stream; charset=utf-8", events=events)

    def stored_response(self, exchange: _Exchange, rest: bytes) -> Answer:
        """
        ``GET /v1/responses/{id}`` (a stored response) and
        ``POST /v1/responses/{id}/cancel`` (400: only background responses
        can be cancelled, and the fake has none); 404 for an unknown id.
        """
        response_id, _, action = rest.decode("utf-8", "replace").partition("/")
        method = exchange.request.method
        if action not in ("", "cancel") or method != (b"POST" if action else b"GET"):
            return json_answer({"detail": "Not Found"}, 404)
        stored = self.fake.responses.get(response_id)
        if stored is None:
            return self._response_not_found(response_id)
        if action == "cancel":
            return error_answer(400, "Cannot cancel a synchronous response.", "invalid_request_error")
        return json_answer(stored)

    @staticmethod
    def _response_not_found(response_id: str) -> Answer:
        return error_answer(404, f"Response with id '{response_id}' not found.", "invalid_request_error")

    def _pooled(self, exchange: _Exchange, payload: dict, prefix: str, data: list,
                prompt: int, **extra: Any) -> Answer:
        request_id, created, model = self._ids(exchange, payload)
        self.fake.account(prompt, 0, None)
        return json_answer(dict(
            {"id": prefix + request_id, "object": "list", "created": created, "model": model,
             "data": data, "usage": {"prompt_tokens": prompt, "total_tokens": prompt,
                                     "completion_tokens": 0, "prompt_tokens_details": None}},
            **extra))

    @staticmethod
    def _inputs(value: Any) -> list:
        if isinstance(value, list) and value and not all(isinstance(v, int) for v in value):
            return value
        return [value]

    def embeddings(self, exchange: _Exchange, payload: dict) -> Answer:
        """
        ``POST /v1/embeddings`` (float or base64 encoding).
        """
        inputs = self._inputs(payload.get("input"))
        encoding = payload.get("encoding_format")
        if encoding in ("bytes", "bytes_only"):
            return self._embeddings_bytes(exchange, payload, inputs, encoding)
        encode = embedding_base64 if encoding == "base64" else embedding
        data = [{"index": i, "object": "embedding", "embedding": encode(i)}
                for i in range(len(inputs))]
        return self._pooled(exchange, payload, "embd-", data, prompt_words(inputs))

    def _embeddings_bytes(self, exchange: _Exchange, payload: dict, inputs: list, encoding: str) -> Answer:
        """
        ``encoding_format: "bytes"``: the float32 vectors back to back as
        ``application/octet-stream``; id, model, shapes and usage in the
        ``metadata`` header as JSON (``bytes_only``: no header).
        """
        request_id, created, model = self._ids(exchange, payload)
        prompt = prompt_words(inputs)
        self.fake.account(prompt, 0, None)
        body, items = b"", []
        for i in range(len(inputs)):
            vector = struct.pack("<%df" % (8,), *embedding(i))
            items.append({"index": i, "embed_dtype": "float32", "endianness": "little",
                          "start": len(body), "end": len(body) + len(vector), "shape": [8]})
            body += vector
        answer = Answer(content_type=b"application/octet-stream", body=body)
        if encoding == "bytes":
            metadata = {"id": "embd-" + request_id, "created": created, "model": model, "data": items,
                        "usage": {"prompt_tokens": prompt, "total_tokens": prompt, "completion_tokens": 0,
                                  "prompt_tokens_details": None}}
            answer.headers.append((b"metadata", json.dumps(metadata).encode("utf-8")))
        return answer

    def invocations(self, exchange: _Exchange, payload: dict) -> Answer:
        """
        ``POST /invocations`` (SageMaker): a chat body is served as chat, a
        completions body as completions, streams included.
        """
        if "messages" in payload:
            return self.chat(exchange, payload)
        if "prompt" in payload:
            return self.completions(exchange, payload)
        if "input" in payload:
            return self.embeddings(exchange, payload)
        return error_answer(400, "The request matches no task of this model.", "BadRequestError")

    def pooling(self, exchange: _Exchange, payload: dict) -> Answer:
        """
        ``POST /pooling``.
        """
        inputs = self._inputs(payload.get("input"))
        data = [{"index": i, "object": "pooling", "data": embedding(i)} for i in range(len(inputs))]
        return self._pooled(exchange, payload, "pool-", data, prompt_words(inputs))

    def classify(self, exchange: _Exchange, payload: dict) -> Answer:
        """
        ``POST /classify``.
        """
        inputs = self._inputs(payload.get("input"))
        data = [{"index": i, "label": "LABEL_0", "probs": [0.75, 0.25], "num_classes": 2}
                for i in range(len(inputs))]
        return self._pooled(exchange, payload, "classify-", data, prompt_words(inputs))

    def score(self, exchange: _Exchange, payload: dict) -> Answer:
        """
        ``POST /score`` and ``/v1/score``, in any of vLLM's request forms.
        """
        for first, second in (("queries", "documents"), ("queries", "items"),
                              ("data_1", "data_2"), ("text_1", "text_2")):
            if first in payload and second in payload:
                left, right = payload[first], payload[second]
                break
        else:
            return error_answer(400, "Field required: queries, documents", "Bad Request")
        left = left if isinstance(left, list) else [left]
        right = right if isinstance(right, list) else [right]
        if len(left) == 1:
            left = left * len(right)
        pairs = list(zip(left, right))
        data = [{"index": i, "object": "score", "score": round(1.0 / (i + 2), 4)}
                for i in range(len(pairs))]
        prompt = sum(prompt_words(a) + prompt_words(b) for a, b in pairs)
        return self._pooled(exchange, payload, "score-", data, prompt)

    def rerank(self, exchange: _Exchange, payload: dict) -> Answer:
        """
        ``POST /rerank``, ``/v1/rerank``, ``/v2/rerank``: usage has only
        prompt and total tokens.
        """
        query = payload.get("query")
        texts = [d.get("text") if isinstance(d, dict) else d for d in payload.get("documents") or []]
        prompt = sum(words(query) + words(t) for t in texts)
        results = [{"index": i, "document": {"text": t, "multi_modal": None},
                    "relevance_score": round(1.0 / (i + 2), 4)} for i, t in enumerate(texts)]
        top_n = payload.get("top_n")
        if isinstance(top_n, int) and top_n > 0:
            results = results[:top_n]
        request_id, _, model = self._ids(exchange, payload)
        self.fake.account(prompt, 0, None)
        return json_answer({"id": "rerank-" + request_id, "model": model,
                            "usage": {"prompt_tokens": prompt, "total_tokens": prompt},
                            "results": results})

    def tokenize(self, exchange: _Exchange, payload: dict) -> Answer:
        """
        ``POST /tokenize`` with ``prompt`` or ``messages``.
        """
        if "messages" in payload:
            texts = []
            for message in payload.get("messages") or []:
                content = message.get("content") if isinstance(message, dict) else None
                if isinstance(content, list):
                    texts += [p.get("text") or "" for p in content if isinstance(p, dict)]
                elif isinstance(content, str):
                    texts.append(content)
            pieces = " ".join(texts).split()
        else:
            prompt = payload.get("prompt")
            pieces = prompt.split() if isinstance(prompt, str) else []
        tokens = [zlib.crc32(p.encode("utf-8")) % 32000 for p in pieces]
        return json_answer({"count": len(tokens), "max_model_len": MAX_MODEL_LEN, "tokens": tokens,
                            "token_strs": pieces if payload.get("return_token_strs") else None})

    def detokenize(self, exchange: _Exchange, payload: dict) -> Answer:
        """
        ``POST /detokenize``.
        """
        return json_answer({"prompt": "".join(f"tok{t} " for t in payload.get("tokens") or [])})

    def transcriptions(self, exchange: _Exchange) -> Answer:
        """
        ``POST /v1/audio/transcriptions``: multipart form, JSON or SSE answer.
        """
        content_type = exchange.request.getHeader(b"content-type") or b""
        media_type, _, params = content_type.partition(b";")
        boundary = None
        for param in params.split(b";"):
            key, _, value = param.strip().partition(b"=")
            if key.lower() == b"boundary":
                boundary = value.strip(b'"')
        if media_type.strip().lower() != b"multipart/form-data" or not boundary:
            return error_answer(400, "Expected multipart/form-data", "Bad Request")
        form = parse_multipart(exchange.record.body, boundary)
        exchange.record.form = form
        audio = form.get("file")
        if not isinstance(audio, dict):
            return error_answer(400, "Field required: file", "Bad Request", "file")
        unknown = self._unknown_model(form.get("model"))
        if unknown is not None:
            return unknown
        count, finish = self._generation(exchange, {})
        prompt = 1 + words(form.get("prompt"))
        tokens = [f"tok{i} " for i in range(count)]
        self.fake.account(prompt, count, finish)
        if form.get("stream") != "true":
            seconds = max(1, math.ceil(audio["size"] / 32000))
            return json_answer({"text": "".join(tokens),
                                "usage": {"type": "duration", "seconds": seconds}})
        request_id, created, model = self._ids(exchange, form)
        head = {"id": "trsc-" + request_id, "object": "transcription.chunk",
                "created": created, "model": model}
        options = {"include_usage": form.get("stream_include_usage") == "true",
                   "continuous_usage_stats": form.get("stream_continuous_usage_stats") == "true"}
        return self._stream(
            head, prompt,
            [{"delta": {"content": t}, "finish_reason": None, "stop_reason": None} for t in tokens],
            {"delta": {"content": ""}, "finish_reason": finish, "stop_reason": None}, options)

    def translations(self, exchange: _Exchange) -> Answer:
        """
        ``POST /v1/audio/translations``: like a transcription, but vLLM's
        ``TranslationResponse`` has only ``text`` (no usage).
        """
        answer = self.transcriptions(exchange)
        if answer.status == 200 and answer.events is None:
            answer = json_answer({"text": json.loads(answer.body)["text"]})
        return answer

    def models(self, exchange: _Exchange) -> Answer:
        """
        ``GET /v1/models``.
        """
        name, created = self.fake.served_model, int(self.fake.reactor.seconds())
        permission = {"id": "modelperm-fake", "object": "model_permission", "created": created,
                      "allow_create_engine": False, "allow_sampling": True,
                      "allow_logprobs": True, "allow_search_indices": False, "allow_view": True,
                      "allow_fine_tuning": False, "organization": "*", "group": None,
                      "is_blocking": False}
        # vLLM lists the base model, then each LoRA adapter with its path
        # as root, the base model as parent and no max_model_len
        # (vllm/entrypoints/openai/serving_models.py, show_available_models).
        cards = [{"id": name, "object": "model", "created": created, "owned_by": "vllm",
                  "root": name, "parent": None, "max_model_len": MAX_MODEL_LEN, "permission": [permission]}]
        cards += [{"id": lora, "object": "model", "created": created, "owned_by": "vllm",
                   "root": path, "parent": name, "max_model_len": None, "permission": [permission]}
                  for lora, path in self.fake.lora_modules.items()]
        return json_answer({"object": "list", "data": cards})

    def health(self, exchange: _Exchange) -> Answer:
        """
        ``GET /health``: 200, empty body, no content type.
        """
        return Answer(content_type=None)

    def version(self, exchange: _Exchange) -> Answer:
        """
        ``GET /version``.
        """
        return json_answer({"version": VLLM_VERSION})

    def metrics(self, exchange: _Exchange) -> Answer:
        """
        ``GET /metrics``: a few live vllm: samples in Prometheus text format.
        """
        fake = self.fake
        labels = f'engine="0",model_name="{fake.served_model}"'
        lines = []
        for name, kind, value in (
            ("vllm:num_requests_running", "gauge", fake.requests_running - 1),
            ("vllm:num_requests_waiting", "gauge", 0),
            ("vllm:engine_sleep_state", "gauge", int(fake.sleeping)),
            ("vllm:prompt_tokens_total", "counter", fake.prompt_tokens_total),
            ("vllm:generation_tokens_total", "counter", fake.generation_tokens_total),
        ):
            lines += [f"# HELP {name} {name} (fake).", f"# TYPE {name} {kind}",
                      f"{name}{{{labels}}} {float(value)}"]
        lines += ["# HELP vllm:request_success_total Count of successfully processed requests.",
                  "# TYPE vllm:request_success_total counter"]
        for reason in ("abort", "length", "stop"):
            lines.append(f'vllm:request_success_total{{engine="0",finished_reason="{reason}",'
                         f'model_name="{fake.served_model}"}} '
                         f"{float(fake.request_success.get(reason, 0))}")
        lines += fake.admission.metrics_lines(fake.served_model)
        return Answer(content_type=b"text/plain; version=1.0.0; charset=utf-8",
                      body=("\n".join(lines) + "\n").encode("utf-8"))

    def sleep(self, exchange: _Exchange) -> Answer:
        """
        ``POST /sleep?level=N`` (does not block generation in the fake).
        """
        level = exchange.request.args.get(b"level", [b"1"])[0]
        self.fake.sleeping = True
        return json_answer({"status": "sleeping", "level": int(level) if level.isdigit() else 1})

    def wake_up(self, exchange: _Exchange) -> Answer:
        """
        ``POST /wake_up?tags=...``.
        """
        tags = exchange.request.args.get(b"tags")
        self.fake.sleeping = False
        return json_answer({"status": "awake",
                            "tags": [t.decode("utf-8") for t in tags] if tags else None})

    def is_sleeping(self, exchange: _Exchange) -> Answer:
        """
        ``GET /is_sleeping``.
        """
        return json_answer({"is_sleeping": self.fake.sleeping})


class FakeVLLM:
    """
    A vLLM look-alike on the given reactor.

    :param reactor: the reactor to listen on and time with.
    :param served_model: the one served model name.
    :param api_key: if given, ``/v1`` and ``/v2`` paths need
        ``Authorization: Bearer <api_key>``.
    :param lora_modules: LoRA adapters served beside the base model, name ->
        path (vLLM's ``--lora-modules name=path``).
    :param max_num_queued_reqs: vLLM's ``--max-num-queued-reqs``: engine
        calls beyond this many unfinished ones are refused with vLLM's 503.
    :param max_num_queued_tokens: vLLM's ``--max-num-queued-tokens``: engine
        calls arriving while this many prompt tokens are in prefill are
        refused with vLLM's 503.

    :ivar fault: the default fault spec for every request.
    :ivar received: every request, in arrival order, from its headers on.
    :ivar open_connections: TCP connections open now.
    :ivar connections_lost: ``reactor.seconds()`` of each connection's close.
    :ivar idle_timeout: idle keep-alive timeout, read at :meth:`start`
        (``None``: never; uvicorn, in front of vLLM, uses 5 seconds).
    :ivar big_body_written: bytes the ``big_body`` producers have written.
    :ivar sleeping: whether ``POST /sleep`` was called without a ``/wake_up``.
    :ivar admission: the queue caps and refusal counts
        (:class:`tests.vllm_admission.AdmissionControl`).
    :ivar unfinished: engine calls admitted under the caps and not ended.
    """

    def __init__(self, reactor: Any, served_model: str = "tiny",
                 api_key: Optional[str] = None, lora_modules: Optional[dict] = None,
                 max_num_queued_reqs: Optional[int] = None, max_num_queued_tokens: Optional[int] = None) -> None:
        self.reactor = reactor
        self.served_model = served_model
        self.lora_modules = dict(lora_modules or {})
        self.api_key = api_key
        self.fault: Optional[str] = None
        self.received: list = []
        self.open_connections = 0
        self.connections_lost: list = []
        self.idle_timeout: Optional[float] = None
        self.big_body_written = 0
        self.sleeping = False
        # Stored Responses API answers by id (vLLM's response store).
        self.responses: dict = {}
        self.realtime_sessions = 0
        self.requests_running = 0
        # POST requests (inference calls, not /metrics or /v1/models) running
        # now, and the most ever running at once (a parallel cap's check).
        self.posts_running = 0
        self.most_running = 0
        self.prompt_tokens_total = 0
        self.generation_tokens_total = 0
        self.request_success: dict = {}
        self.admission = AdmissionControl(max_num_queued_reqs, max_num_queued_tokens)
        self.unfinished = 0
        self._admitted: set = set()
        self._prefilling: dict = {}
        self.routes = VLLMRoutes(self)
        self.port = 0
        self.url = ""
        self._listening: Any = None
        self._channels: set = set()
        self._request_waiters: list = []
        self._close_waiters: list = []

    def start(self, port: int = 0) -> Deferred:
        """
        Listen on ``127.0.0.1``, on ``port`` (default: a free one).

        :return: a Deferred firing with ``self`` once listening.
        """
        endpoint = TCP4ServerEndpoint(self.reactor, port, interface="127.0.0.1")

        def listening(port: Any) -> "FakeVLLM":
            self._listening = port
            self.port = port.getHost().port
            self.url = f"http://127.0.0.1:{self.port}"
            return self

        return endpoint.listen(_FakeFactory(self)).addCallback(listening)

    def stop(self) -> Deferred:
        """
        Stop listening and abort every open connection.

        :return: a Deferred firing once the port is closed and every
            connection is gone.
        """
        waits = []
        if self._listening is not None:
            port, self._listening = self._listening, None
            waits.append(port.stopListening())
        for channel in list(self._channels):
            if channel.transport is not None:
                channel.transport.abortConnection()
        if self._channels:
            closed: Deferred = Deferred()
            self._close_waiters.append(closed)
            waits.append(closed)
        if not waits:
            return succeed(None)
        return gatherResults(waits).addCallback(lambda _: None)

    def wait_for_requests(self, n: int, path: Optional[bytes] = None) -> Deferred:
        """
        :param n: how many requests to wait for.
        :param path: count only requests whose target starts with this
            (a proxy also asks ``/v1/models`` on its own, for discovery).
        :return: a Deferred firing with :attr:`received` once it holds ``n``
            records (headers arrived; bodies may still be arriving).
        """
        if path is None:
            return self._wait(lambda: len(self.received) >= n)
        return self._wait(lambda: sum(1 for r in self.received if r.uri.startswith(path)) >= n)

    def wait_for_bodies(self, n: int) -> Deferred:
        """
        :param n: how many requests to wait for.
        :return: a Deferred firing with :attr:`received` once ``n`` requests
            have their whole body.
        """
        return self._wait(lambda: sum(1 for r in self.received if r.body_done) >= n)

    def _wait(self, ready: Callable[[], bool]) -> Deferred:
        d: Deferred = Deferred()
        self._request_waiters.append((ready, d))
        self._check_waiters()
        return d

    def _check_waiters(self) -> None:
        # A waiter's callback may wait again (re-entering here): it must
        # find a list without the waiters being fired.
        waiters, self._request_waiters = self._request_waiters, []
        for ready, d in waiters:
            if ready():
                d.callback(self.received)
            else:
                self._request_waiters.append((ready, d))

    def _add_record(self, record: ReceivedRequest) -> None:
        record.index = len(self.received)
        self.received.append(record)
        self._check_waiters()

    def _channel_opened(self, channel: _TrackedChannel) -> None:
        self._channels.add(channel)
        self.open_connections += 1

    def _channel_closed(self, channel: _TrackedChannel) -> None:
        self._channels.discard(channel)
        self.open_connections -= 1
        self.connections_lost.append(self.reactor.seconds())
        if not self._channels:
            waiters, self._close_waiters = self._close_waiters, []
            for d in waiters:
                d.callback(None)

    def _admit(self, exchange: _Exchange) -> bool:
        """
        vLLM's admission check for an engine call whose body has arrived:
        refuse it (answered here) or count it as unfinished and in prefill.

        :return: whether it was admitted.
        """
        try:
            payload = json.loads(exchange.record.body or b"null")
        except ValueError:
            payload = None
        reason = self.admission.check(self.unfinished, sum(self._prefilling.values()), requested_sequences(payload))
        if reason is not None:
            exchange._send(Answer(status=503, body=refusal_body(reason)))
            return False
        self.unfinished += 1
        self._admitted.add(exchange)
        self._prefilling[exchange] = prompt_of(payload)
        return True

    def _admitted_ended(self, exchange: _Exchange) -> None:
        self._prefilling.pop(exchange, None)
        if exchange in self._admitted:
            self._admitted.discard(exchange)
            self.unfinished -= 1

    def account(self, prompt_tokens: int, completion_tokens: int,
                finish_reason: Optional[str]) -> None:
        """
        Count a finished generation for ``/metrics``.
        """
        self.prompt_tokens_total += prompt_tokens
        self.generation_tokens_total += completion_tokens
        if finish_reason is not None:
            self.request_success[finish_reason] = self.request_success.get(finish_reason, 0) + 1


def embedding(seed: int, dims: int = 8) -> list:
    """
    :param seed: which input this is.
    :return: a deterministic vector of ``dims`` floats.
    """
    return [round(((seed * 7 + j * 3) % 11) / 10.0 - 0.5, 4) for j in range(dims)]


def embedding_base64(seed: int) -> str:
    """
    :param seed: which input this is.
    :return: :func:`embedding` as base64 little-endian float32, like vLLM.
    """
    vector = embedding(seed)
    return base64.b64encode(struct.pack("<%df" % (len(vector),), *vector)).decode("ascii")


def main(argv=None) -> None:
    """
    Serve the fake on a fixed port, to try the proxy without a GPU:
    ``python -m tests.fake_vllm --port 8000 --model qwen2.5-7b-instruct``.
    """
    import argparse

    from twisted.internet import reactor

    parser = argparse.ArgumentParser(description="A fake vLLM server (OpenAI-compatible, deterministic).")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--model", default="qwen2.5-7b-instruct")
    parser.add_argument("--lora-modules", nargs="*", default=[], metavar="NAME=PATH",
                        help="LoRA adapters to serve beside the model, as vLLM's flag")
    args = parser.parse_args(argv)
    loras = dict(module.partition("=")[::2] for module in args.lora_modules)
    fake = FakeVLLM(reactor, served_model=args.model, lora_modules=loras)
    fake.start(args.port).addCallback(lambda f: print(f"fake vLLM serving {args.model!r} on {f.url}", flush=True))
    reactor.run()


if __name__ == "__main__":
    main()
