"""
vLLM's realtime API over WebSockets: C{GET /vllm/v1/realtime?model=...}
with C{Upgrade: websocket}, relayed frame by frame both ways.

L{RealtimeCalls.serve} authenticates the upgrade request (a bearer key,
C{x-api-key}, or the C{openai-insecure-api-key.<key>} subprotocol that
OpenAI's browser client sends), routes it by C{?model=} (or
C{x-dheera-model}), checks the key may use that model and route, admits it
against the key's limits, and opens a connection of its own to a replica
(the next one when a replica cannot be connected to).  The upgrade request
goes on with the client's own C{Sec-WebSocket-Key} (so the replica's
C{Sec-WebSocket-Accept} is the one the client checks), without the key's
subprotocol and without C{Sec-WebSocket-Extensions} (compressed frames could
not be read for usage), and with the deployment's api_key.  A replica that
does not switch protocols has its answer relayed as a plain answer.

After C{101 Switching Protocols} the connection belongs to
L{WebSocketRelay}: bytes pass unchanged both ways, each direction's
transport registered as the other's producer (a slow reader pauses the
writer's socket).  The frames are followed (L{FrameReader}) to count the
session's messages, find its close code and read the usage the server
reports (C{usage} of C{response.done}'s response, or of transcription
events), which is billed when the session ends.  The session is cut when
silent for the deployment's C{stream_timeout} or longer than its
C{timeout}.
"""

import json
from typing import List, Optional, Tuple
from urllib.parse import parse_qsl, urlencode

import httptools
from twisted.internet import error as ierror
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.ssl import optionsForClientTLS
from twisted.logger import Logger
from twisted.python.failure import Failure

from dheera_tx.accounting.metering import Usage, usage_from_object
from dheera_tx.call import Call
from dheera_tx.config import Deployment
from dheera_tx.errors import ProxyError, bad_request
from dheera_tx.http.websocket import FrameReader, ProtocolViolation, subprotocol_key
from dheera_tx.keys.auth import authorize_vllm_call
from dheera_tx.keys.tenancy import request_id_scope, scoped_header
from dheera_tx.routing.model_choice import header_or_query_model

log = Logger()

#: The path, below C{/vllm}, of vLLM's realtime API.
REALTIME_PATH = b"/v1/realtime"
#: The largest answer head (or refusal) read from a replica before the
#: upgrade.
MAX_UPSTREAM_HEAD = 65536
#: Request headers not sent to the replica: the proxy's own, the key, the
#: ones it sets itself, and compression (frames must stay readable).
_NOT_SENT = frozenset(
    {
        b"host",
        b"authorization",
        b"x-api-key",
        b"x-dheera-model",
        b"x-dheera-end-user",
        b"connection",
        b"upgrade",
        b"sec-websocket-protocol",
        b"sec-websocket-extensions",
        b"content-length",
        b"transfer-encoding",
        b"keep-alive",
        b"te",
        b"trailer",
        b"proxy-authorization",
        b"proxy-connection",
        b"cookie",
    }
)
#: Headers of the replica's 101 passed to the client.
_SWITCH_HEADERS = frozenset({b"upgrade", b"connection", b"sec-websocket-accept", b"sec-websocket-protocol"})


class RealtimeMeter:
    """
    The usage a realtime session's server reported, summed over its events
    (the meter L{dheera_tx.accounting.call_accounting.CallAccounting}
    settles from).
    """

    def __init__(self):
        self._prompt = 0
        self._completion = 0
        self._seen = False

    def server_text(self, message: bytes) -> None:
        """
        Read one text message the server sent.
        """
        if b'"usage"' not in message:
            return
        try:
            event = json.loads(message)
        except ValueError:
            return
        if not isinstance(event, dict):
            return
        response = event.get("response")
        holder: dict = response if isinstance(response, dict) else event
        usage = usage_from_object(holder.get("usage"))
        if usage is not None:
            self._prompt += usage.prompt_tokens
            self._completion += usage.completion_tokens
            self._seen = True

    def usage(self) -> Optional[Usage]:
        return Usage(self._prompt, self._completion) if self._seen else None

    def estimate(self) -> Optional[Usage]:
        return None


class RealtimeCalls:
    """
    Serves realtime WebSocket sessions for the data plane, with the same
    collaborators as L{dheera_tx.forwarding.Passthrough}.

    :param authenticator: turns credentials into a principal.
    :param router: routes and picks replicas, and counts their calls.
    :param accounting: admits sessions (L{CallAccounting}).
    :param tenant_routes: what virtual keys may call.
    :param upstream: a deployment -> L{dheera_tx.upstream_request.UpstreamTarget}
        lookup.
    """

    def __init__(self, reactor, authenticator, router, accounting, tenant_routes, upstream):
        self._reactor = reactor
        self._auth = authenticator
        self._router = router
        self._accounting = accounting
        self._tenant_routes = tenant_routes
        self._upstream = upstream

    async def serve(self, request, call: Call, progress, query: bytes) -> None:
        """
        Serve one upgrade request (its headers have arrived).

        :raise ProxyError: refused before any replica was asked (the caller
            answers it in the OpenAI shape).
        """
        headers = request.requestHeaders
        key, protocols = subprotocol_key(headers)
        if key is not None and not (headers.hasHeader(b"authorization") or headers.hasHeader(b"x-api-key")):
            headers = headers.copy()
            headers.setRawHeaders(b"authorization", [b"Bearer " + key.encode("latin-1")])
        principal = await self._auth.authenticate(headers)
        if principal.key is not None:
            call.key_hash_prefix = principal.key.token[:12]
            call.key_alias = principal.key.key_alias
            call.user_id = principal.key.user_id
            call.team_id = principal.key.team_id
        if request.method != b"GET" or not request.body_complete:
            raise bad_request("A WebSocket upgrade is a GET request without a body.")
        model = header_or_query_model(request.requestHeaders, query)
        authorize_vllm_call(principal, REALTIME_PATH[1:].decode(), model, self._tenant_routes)
        id_scope = None if principal.key is None else request_id_scope(principal.key.token).encode("ascii")
        route = self._router.route(model)
        call.model_name = route.model_name
        call.stream = True
        progress.meter = RealtimeMeter()
        # A session reserves what a generating call naming no max_tokens does
        # (general_settings.default_max_tokens_reservation).
        progress.admission = await self._accounting.admit(principal, None, call, REALTIME_PATH, None, 0, route.replicas)
        tried: List[Deployment] = []
        while True:
            deployment = self._router.pick(route, tried)
            if deployment is None:
                raise ProxyError(502, "The upstream vLLM server could not be reached.", type="upstream_error", code="502")
            tried.append(deployment)
            progress.deployment = deployment
            call.deployment, call.api_base = deployment.id, deployment.api_base
            self._router.started(deployment)
            try:
                upstream = await self._connect(deployment, request, query, protocols, route, call, id_scope)
            except (ierror.ConnectError, ierror.DNSLookupError, OSError) as e:
                self._router.finished(deployment)
                self._router.failed(deployment)
                log.info("Upstream {deployment} unreachable for a realtime call: {why}", deployment=deployment.id, why=type(e).__name__)
                if request.client_gone:
                    call.error = "client_disconnected"
                    return
                continue
            try:
                self._router.succeeded(deployment)
                await upstream.session(request, call, progress.meter, deployment)
            finally:
                self._router.finished(deployment)
            return

    async def _connect(
        self, deployment: Deployment, request, query: bytes, protocols, route, call: Call, id_scope: Optional[bytes]
    ) -> "_UpstreamSocket":
        upstream = self._upstream(deployment)
        endpoint: IStreamClientEndpoint = HostnameEndpoint(
            self._reactor, upstream.host, upstream.port, timeout=deployment.connect_timeout
        )
        if upstream.tls:
            endpoint = wrapClientTLS(optionsForClientTLS(upstream.host), endpoint)
        head = _upgrade_head(request, upstream, deployment, query, protocols, route, id_scope)
        socket = _UpstreamSocket(self._reactor, head)
        call.upstream_sent_at = self._reactor.seconds()
        await endpoint.connect(_Factory(socket))
        return socket


def _upgrade_head(request, upstream, deployment: Deployment, query: bytes, protocols, route, id_scope: Optional[bytes]) -> bytes:
    """
    :param id_scope: a virtual key's request-id namespace, or L{None}
        (L{dheera_tx.keys.tenancy}).
    :return: the upgrade request sent to the replica.
    """
    target = upstream.prefix + REALTIME_PATH + query
    if route.model_name is not None and not route.adapter and deployment.served_model:
        # The replica knows the model by its served name.
        target = upstream.prefix + REALTIME_PATH + _with_model(query, deployment.served_model)
    host = upstream.host.encode("idna") if ":" not in upstream.host else b"[" + upstream.host.encode() + b"]"
    lines = [
        b"GET " + target + b" HTTP/1.1",
        b"Host: " + host + b":%d" % (upstream.port,),
        b"Upgrade: websocket",
        b"Connection: Upgrade",
    ]
    for name, value in request.raw_headers:
        if name.lower() not in _NOT_SENT and not name.lower().startswith(b"proxy-"):
            if id_scope is not None and name.lower() == b"x-request-id":
                value = scoped_header(id_scope, value)
            lines.append(name + b": " + value)
    if protocols:
        lines.append(b"Sec-WebSocket-Protocol: " + b", ".join(protocols))
    if deployment.api_key:
        lines.append(b"Authorization: Bearer " + deployment.api_key.encode("utf-8"))
    return b"\r\n".join(lines) + b"\r\n\r\n"


def _with_model(query: bytes, served: str) -> bytes:
    """
    :return: C{query} with its C{model} parameter set to C{served}.
    """
    pairs = [(k, v) for k, v in parse_qsl(query[1:].decode("utf-8", "replace"), keep_blank_values=True) if k != "model"]
    pairs.append(("model", served))
    return b"?" + urlencode(pairs).encode("ascii")


class _Factory(Factory):
    """
    A one-use client factory for L{HostnameEndpoint.connect}: it builds
    the one protocol it was given.
    """

    def __init__(self, protocol: Protocol):
        self._protocol = protocol

    def buildProtocol(self, addr) -> Protocol:
        return self._protocol


class _UpstreamSocket(Protocol):
    """
    The connection to the replica: the upgrade request, its answer, then
    the relayed session.
    """

    def __init__(self, reactor, head: bytes):
        self._reactor = reactor
        self._head = head
        self._buffer = b""
        self._status: Optional[int] = None
        self._headers: List[Tuple[bytes, bytes]] = []
        self._head_done = False
        self._relay: Optional[WebSocketRelay] = None
        self._answered: Optional[Deferred] = None
        self._lost = False

    def connectionMade(self) -> None:
        self.transport.write(self._head)

    async def session(self, request, call: Call, meter: RealtimeMeter, deployment: Deployment) -> None:
        """
        Wait for the replica's answer; relay a refusal as an answer, or the
        session until either side ends it.
        """
        self._answered = Deferred()
        gone = request.on_client_gone(self._client_left)
        timer = self._reactor.callLater(deployment.timeout, self._answer_late)
        try:
            await self._answered
        finally:
            request.forget_client_gone(gone)
            if timer.active():
                timer.cancel()
        if request.client_gone:
            call.error = call.error or "client_disconnected"
            self.transport.abortConnection()
            return
        if self._status is None:
            call.error = "upstream_failed"
            raise ProxyError(502, "The upstream vLLM server closed the connection without answering.", type="upstream_error", code="502")
        call.status = self._status
        call.first_byte_at = self._reactor.seconds()
        if self._status != 101:
            call.error = "upstream_refused_upgrade"
            self._answer_plainly(request, call)
            return
        relay = WebSocketRelay(self._reactor, request, self, call, meter, deployment)
        self._relay = relay
        relay.start(self._switch_head(call), self._buffer)
        self._buffer = b""
        await relay.done

    def _client_left(self) -> None:
        if self._answered is not None and not self._answered.called:
            self._answered.callback(None)

    def _answer_late(self) -> None:
        if self._answered is not None and not self._answered.called:
            self.transport.abortConnection()

    def _switch_head(self, call: Call) -> bytes:
        lines = [b"HTTP/1.1 101 Switching Protocols"]
        for name, value in self._headers:
            if name.lower() in _SWITCH_HEADERS:
                lines.append(name + b": " + value)
        lines.append(b"x-dheera-call-id: " + call.call_id.encode("ascii"))
        return b"\r\n".join(lines) + b"\r\n\r\n"

    def _answer_plainly(self, request, call: Call) -> None:
        body = self._buffer
        length = None
        for name, value in self._headers:
            if name.lower() == b"content-length" and value.strip().isdigit():
                length = int(value)
        body = body[:length] if length is not None else body
        headers = [(n, v) for n, v in self._headers if n.lower() not in (b"content-length", b"transfer-encoding", b"connection", b"keep-alive", b"upgrade")]
        headers.append((b"x-dheera-call-id", call.call_id.encode("ascii")))
        request.keep_alive = False
        request.write_head(self._status, None, headers, len(body))
        request.write(body)
        request.finish()
        call.bytes_out += len(body)
        self.transport.loseConnection()

    def dataReceived(self, data: bytes) -> None:
        if self._relay is not None:
            self._relay.from_upstream(data)
            return
        self._buffer += data
        if not self._head_done:
            self._parse_head()
        elif self._status != 101 and self._complete_refusal():
            self._fire()
        if len(self._buffer) > MAX_UPSTREAM_HEAD and self._answered is not None and not self._answered.called:
            self._buffer = self._buffer[:MAX_UPSTREAM_HEAD]
            self._fire()

    def _parse_head(self) -> None:
        end = self._buffer.find(b"\r\n\r\n")
        if end < 0:
            return
        head, self._buffer = self._buffer[: end + 4], self._buffer[end + 4 :]
        parser = httptools.HttpResponseParser(_HeadCollector(self))
        try:
            parser.feed_data(head)
        except httptools.HttpParserUpgrade:
            pass
        except httptools.HttpParserError:
            self._status = None
            self.transport.abortConnection()
            return
        self._status = parser.get_status_code()
        self._head_done = True
        if self._status == 101 or self._complete_refusal():
            self._fire()

    def _complete_refusal(self) -> bool:
        for name, value in self._headers:
            if name.lower() == b"content-length" and value.strip().isdigit():
                return len(self._buffer) >= int(value)
        return False

    def _fire(self) -> None:
        if self._answered is not None and not self._answered.called:
            self._answered.callback(None)

    def connectionLost(self, reason: Failure = None) -> None:
        self._lost = True
        if self._relay is not None:
            self._relay.upstream_lost()
        else:
            self._fire()


class _HeadCollector:
    def __init__(self, socket: _UpstreamSocket):
        self._socket = socket

    def on_header(self, name: bytes, value: bytes) -> None:
        self._socket._headers.append((name, value))


class WebSocketRelay:
    """
    One switched session: the client's connection and the replica's,
    relayed byte for byte with backpressure, followed frame by frame.

    :ivar done: fires when both sides are closed.
    """

    def __init__(self, reactor, request, upstream: _UpstreamSocket, call: Call, meter: RealtimeMeter, deployment: Deployment):
        self._reactor = reactor
        self._request = request
        self._upstream = upstream
        self._call = call
        self._client_frames = FrameReader()
        self._server_frames = FrameReader(meter.server_text)
        self._reading = True
        self._idle = deployment.stream_timeout
        self._last = reactor.seconds()
        self._deadline = reactor.seconds() + deployment.timeout
        self._timer = None
        self.done: Deferred = Deferred()

    def start(self, head: bytes, early: bytes) -> None:
        """
        Send the client the 101, take its connection over and relay what
        the replica sent after its head.
        """
        self._client = self._request.take_over(self)
        self._client.write(head)
        self._client.registerProducer(self._upstream.transport, True)
        self._upstream.transport.registerProducer(self._client, True)
        self._timer = self._reactor.callLater(min(self._idle, self._deadline - self._reactor.seconds()), self._check_time)
        if early:
            self.from_upstream(early)

    def from_upstream(self, data: bytes) -> None:
        self._last = self._reactor.seconds()
        self._call.bytes_out += len(data)
        if self._reading:
            try:
                self._server_frames.feed(data)
            except ProtocolViolation:
                self._reading = False
        self._client.write(data)

    def dataReceived(self, data: bytes) -> None:
        """
        Bytes from the client (the listener hands them over after the
        switch).
        """
        self._last = self._reactor.seconds()
        self._call.bytes_in += len(data)
        if self._reading:
            try:
                self._client_frames.feed(data)
            except ProtocolViolation:
                self._reading = False
        self._upstream.transport.write(data)

    def _check_time(self) -> None:
        now = self._reactor.seconds()
        if now >= self._deadline:
            self._call.error = "timeout"
            self._end(abort=True)
            return
        if now - self._last >= self._idle:
            self._call.error = "stream_timeout"
            self._end(abort=True)
            return
        self._timer = self._reactor.callLater(min(self._last + self._idle, self._deadline) - now, self._check_time)

    def upstream_lost(self) -> None:
        self._end(abort=False)

    def connectionLost(self, reason=None) -> None:
        """
        The client's connection closed.
        """
        if not self.done.called:
            self._upstream.transport.loseConnection()
        self._end(abort=False)

    def _end(self, abort: bool) -> None:
        if self.done.called:
            return
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._call.close_code = self._server_frames.close_code or self._client_frames.close_code
        if abort:
            self._upstream.transport.abortConnection()
            self._client.abortConnection()
        else:
            self._upstream.transport.loseConnection()
            self._client.loseConnection()
        self.done.callback(None)
