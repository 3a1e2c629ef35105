"""
The data plane: C{ANY /vllm/{path}} relayed to a vLLM deployment.

L{Passthrough.serve} runs one call: check the raw path, authenticate, find
the model, route, forward the request (streaming its body), relay the
answer chunk by chunk with backpressure (L{dheera_tx.http.response_relay}), and
finish the L{Call} record.
The upstream request goes out through the lean client of
L{dheera_tx.upstream.client} on a shared pool of persistent connections:
no cookie jar, no decompression, no redirects, so bytes pass unchanged.
"""

import json
from typing import Dict, List, Optional, Tuple
from urllib.parse import unquote

from twisted.internet.defer import CancelledError, Deferred, ensureDeferred
from twisted.logger import Logger
from twisted.python.failure import Failure

from dheera_tx.accounting.call_accounting import CallAccounting, end_user_of, needs_usage_injection
from dheera_tx.accounting.full_windows import FullWindows, WindowFull
from dheera_tx.accounting.metering import DeclaredUsageMeter, DecodingMeter, JSONUsageMeter
from dheera_tx.call import Call, new_call_id
from dheera_tx.config import Deployment, ProxyConfig
from dheera_tx.errors import ProxyError, bad_request
from dheera_tx.http.hop_headers import first_header
from dheera_tx.http.paths import path_problem, split_target
from dheera_tx.http.relay_watch import RelayWatch
from dheera_tx.http.request_body import BodyAborted, BodyTooLarge
from dheera_tx.http.response_relay import ResponseRelay, answer_error, answer_json, cost_header, write_response_head
from dheera_tx.keys.auth import authorize_route, authorize_vllm_call, authorize_vllm_model
from dheera_tx.keys.tenancy import TenantRoutes, request_id_scope, scoped_document, scoped_path
from dheera_tx.realtime import RealtimeCalls
from dheera_tx.routing.affinity import call_affinity
from dheera_tx.routing.fair_queue import Slot, call_cost
from dheera_tx.routing.flow import GatewayQueue
from dheera_tx.routing.model_choice import (
    MULTIPART_PEEK_BYTES,
    body_model,
    header_or_query_model,
    is_json,
    multipart_boundary,
    multipart_model,
    parse_json_body,
)
from dheera_tx.routing.router import Route, Router
from dheera_tx.routing.sleep import sleep_operation
from dheera_tx.upstream.client import UpstreamUnreachable
from dheera_tx.upstream.refusal import held, may_be_refusal, read_body, refusal_reason
from dheera_tx.upstream_request import ClientGone, UpstreamTarget, raise_if_gone_or_late, send_upstream, upstream_body

log = Logger()


class Passthrough:
    """
    Serves the vLLM pass-through.

    :param reactor: the reactor (for timers and connections).
    :param config: the proxy configuration.
    :param router: chooses deployments.
    :param authenticator: turns credentials into a principal.
    :param pool: the upstream connection pool (owned by the caller, closed
        on shutdown).
    :param accounting: admits, meters and settles calls (L{CallAccounting}).
    :param on_call_end: called with each finished L{Call} (log sinks,
        metrics); must not raise.
    :param catalog: answers C{GET /v1/models} (a
        L{dheera_tx.routing.catalog.ModelCatalog}); L{None} passes it
        through to the default upstream.
    """

    def __init__(
        self, reactor, config: ProxyConfig, router: Router, authenticator, pool, accounting=None, on_call_end=None, catalog=None,
        metrics=None, claimer=None,
    ):
        self._reactor = reactor
        self._catalog = catalog
        self._config = config
        self._router = router
        self._auth = authenticator
        self._pool = pool
        self._upstreams: Dict[str, UpstreamTarget] = {}
        self._relay_watch = RelayWatch(reactor)
        self._full_windows = FullWindows(reactor)
        self._accounting = accounting or CallAccounting()
        self._on_call_end = on_call_end
        self.in_flight = 0
        self.streams_in_flight = 0
        self._max_response_head = config.general.max_header_bytes
        self._session_header = config.router.session_header.encode("ascii") if config.router.routing_strategy == "cache-aware" else None
        self._tenant_routes = TenantRoutes(config.general.tenant_routes)
        self._default_max_tokens = config.general.default_max_tokens_reservation
        self._realtime = RealtimeCalls(reactor, authenticator, router, self._accounting, self._tenant_routes, self._upstream)
        # router_settings.flow_control: false sends every call on at once.
        self._flow_control = config.router.flow_control
        self.flow = GatewayQueue(
            reactor, router, config.router.max_queue, config.router.max_queue_wait, config.router.metrics_interval / 5,
            on_wait=metrics.observe_queue_wait if metrics is not None else None,
            on_shed=metrics.count_shed if metrics is not None else None, claimer=claimer,
        )
        self._count_retry = metrics.count_retry if metrics is not None else None

    def _upstream(self, deployment: Deployment) -> UpstreamTarget:
        upstream = self._upstreams.get(deployment.id)
        if upstream is None:
            upstream = self._upstreams[deployment.id] = UpstreamTarget(deployment.api_base)
        return upstream

    def serve(self, request) -> Deferred:
        """
        Serve one pass-through call on C{request} (a L{dheera_tx.http.client_exchange.ClientExchange} whose
        headers have arrived; its body may still be arriving).

        :return: a Deferred that fires when the call has ended; it never
            fails.
        """
        call = Call(
            call_id=new_call_id(),
            method=request.method.decode("ascii", "replace"),
            path=request.uri.split(b"?", 1)[0].decode("utf-8", "replace"),
            started_at=request.received_at,
        )
        self.in_flight += 1
        progress = _Progress()
        d = ensureDeferred(self._serve(request, call, progress))
        d.addErrback(self._unexpected, request, call)
        d.addBoth(self._ended, call, progress)
        return d

    def _unexpected(self, failure: Failure, request, call: Call) -> None:
        log.failure("Unexpected error in call {call_id}", failure, call_id=call.call_id)
        call.error = call.error or "internal_error"
        answer_error(request, ProxyError(500, "The proxy failed to handle this call.", type="internal_error", code="500"), call)

    def _ended(self, _, call: Call, progress: "_Progress") -> None:
        self.in_flight -= 1
        call.ended_at = self._reactor.seconds()
        body_bytes = request_bytes(progress)
        call.bytes_in += body_bytes
        self._accounting.settle(
            call,
            progress.admission,
            progress.deployment,
            progress.meter,
            progress.document,
            progress.path,
            body_bytes,
        )
        if progress.slot is not None:
            # Taken in the queue, never sent (the call failed in between).
            progress.slot.release()
            progress.slot = None
        if progress.queued is not None and call.deployment is not None:
            self.flow.served(*progress.queued, call.prompt_tokens + call.completion_tokens)
        if self._on_call_end is not None:
            try:
                self._on_call_end(call)
            except Exception:
                log.failure("Call-end hook failed for call {call_id}", call_id=call.call_id)

    async def _serve(self, request, call: Call, progress: "_Progress") -> None:
        path, query = split_target(request.uri)
        progress.request = request
        progress.path = path
        try:
            if request.rejection is not None:
                raise request.rejection
            problem = path_problem(path, query)
            if problem is not None:
                raise bad_request(f"Refused request path: {problem}.")
            if request.switching:
                await self._realtime.serve(request, call, progress, query)
                return
            principal = await self._auth.authenticate(request.requestHeaders)
            if principal.key is not None:
                key = principal.key
                call.key_hash_prefix = key.token[:12]
                call.key_alias = key.key_alias
                call.user_id = key.user_id
                call.team_id = key.team_id
            named = header_or_query_model(request.requestHeaders, query)
            if self._catalog is not None and request.method == b"GET" and _names_models(path):
                if named is None:
                    await self._answer_models(request, call, principal, path)
                    return
            # What the head decides is refused before the body is read.
            route_path = path[1:].decode("utf-8", "replace")
            authorize_route(principal, route_path, self._tenant_routes)
            if principal.key is not None:
                self._full_windows.check(principal.key)
                if named is not None:
                    authorize_vllm_model(principal, named)
            document, raw_json = await self._json_document(request)
            progress.document = document
            model = body_model(document) if document is not None else None
            if model is None:
                model = named
                if request.body is not None and document is None:
                    # vLLM takes a form's model over any header: the model
                    # checked must be the model vLLM uses.
                    form_model = await self._multipart_model(request)
                    if form_model is not None and model is not None and form_model != model:
                        raise bad_request(
                            "The form's 'model' differs from the model named by header or query.", param="model"
                        )
                    model = form_model or model
            # Authorize before routing: a tenant learns nothing about which
            # models are configured from a call it may not make.
            authorize_vllm_call(principal, route_path, model, self._tenant_routes)
            form_watch = getattr(request, "form_watch", None)
            if form_watch is not None:
                # Every model part of the form, wherever it sits (also after
                # the file, where the peek above does not look), must be
                # the model just authorized: vLLM uses the form's.
                form_watch.authorize(model)
            if principal.key is not None:
                path = self._scope_ids(request, principal.key.token, path, document, progress)
            route = self._router.route(model, sleep_operation(request.method, path, query))
            call.model_name = route.model_name
            if document is not None:
                call.stream = document.get("stream") is True
            call.end_user = end_user_of(request.requestHeaders, document)
            try:
                progress.admission = await self._accounting.admit(
                    principal, call.end_user, call, path, document, len(raw_json) if raw_json else 0, route.replicas
                )
            except WindowFull as e:
                if principal.key is not None:
                    self._full_windows.remember(principal.key, e)
                raise
            progress.strip_usage = needs_usage_injection(path, document)
            affinity = call_affinity(self._session_header, request.getHeader, route, document)
            key = principal.key
            # The key's own priority and weight, else its team's (keys/records.py).
            owner, priority, weight = (key.token, key.flow_priority, key.flow_weight) if key is not None else ("", 0, 1.0)
            progress.priority = priority if key is not None else None
            cost = call_cost(raw_json, document, self._default_max_tokens)
            progress.ticket = (owner, priority, weight, cost)
            waiting = self.flow.admit(route, owner, priority, weight, cost, affinity) if self._flow_control else None
            if waiting is not None:
                progress.queued = (route.model_name, owner, priority, weight, cost)
                progress.slot = await self._queued(request, call, waiting)
            await self._forward(request, call, route, path + query, raw_json, progress, affinity)
        except ProxyError as e:
            call.error = call.error or e.type
            answer_error(request, e, call)
        except BodyTooLarge as e:
            call.error = "request_too_large"
            answer_error(request, _too_large(e.limit or self._config.general.max_request_body_bytes), call)
        except BodyAborted:
            # The client left while its body was being read: nobody to answer.
            call.error = "client_disconnected"

    def _scope_ids(self, request, token: str, path: bytes, document, progress: "_Progress"):
        """
        Move the request ids a virtual key names (header, body, Responses
        path) into the key's namespace (L{dheera_tx.keys.tenancy}).

        The client's document stays the call's (it is what is metered and
        estimated); the scoped one is only forwarded (C{progress.forwarded}).

        :return: the upstream path.
        """
        scope = request_id_scope(token)
        progress.id_scope = scope.encode("ascii")
        path = scoped_path(path, progress.id_scope)
        if document is not None:
            creates = request.method == b"POST" and path == b"/v1/responses"
            progress.forwarded = scoped_document(document, scope, creates)
        return path

    async def _answer_models(self, request, call: Call, principal, path: bytes) -> None:
        """
        Answer C{GET /v1/models} or C{GET /v1/models/{name}} from the
        catalog: the public names this caller may use.
        """
        authorize_route(principal, path[1:].decode("utf-8", "replace"), self._tenant_routes)
        if path == _MODELS:
            answer = await self._catalog.listing(principal, self._router.cooling_down)
        else:
            name = unquote(path[len(_MODELS) + 1 :].decode("utf-8", "replace"))
            answer = await self._catalog.model(principal, name, self._router.cooling_down)
            if answer is None:
                raise ProxyError(
                    404, f"The model {name!r} does not exist.", type="invalid_request_error", code="model_not_found", param="model"
                )
        answer_json(request, 200, json.dumps(answer, separators=(",", ":")).encode("utf-8"), call)

    async def _json_document(self, request):
        body = request.body
        if body is None or not is_json(request.getHeader(b"content-type")):
            return None, None
        raw = await body.collect()
        if not raw.strip():
            return None, raw
        return parse_json_body(raw), raw

    async def _multipart_model(self, request) -> Optional[str]:
        boundary = multipart_boundary(request.getHeader(b"content-type"))
        if boundary is None:
            return None
        prefix = await request.body.peek(
            lambda p: multipart_model(p, boundary)[0], MULTIPART_PEEK_BYTES
        )
        return multipart_model(prefix, boundary)[1]

    async def _queued(self, request, call: Call, waiting: Deferred) -> Optional[Slot]:
        """
        Wait in the gateway queue (L{dheera_tx.routing.flow}); a client that
        leaves frees its place at once.

        :return: the replica (and slot) the queue chose, or L{None}.
        """
        queued_at = self._reactor.seconds()
        gone = request.on_client_gone(waiting.cancel)
        if request.client_gone:
            waiting.cancel()
        try:
            return await waiting
        except CancelledError:
            call.error = "client_disconnected"
            raise ClientGone()
        finally:
            call.queued_ms = (self._reactor.seconds() - queued_at) * 1000.0
            request.forget_client_gone(gone)

    # Forwarding.

    async def _forward(self, request, call: Call, route: Route, target: bytes, raw_json, progress: "_Progress", affinity=None) -> None:
        tried: List[Deployment] = []
        # vLLM's queue-cap refusal is retried once, on another replica with
        # room, if the body can be sent again (in memory: JSON, or none).
        may_retry = request.body is None or raw_json is not None
        while True:
            chosen = None
            if progress.slot is None:
                chosen = self._router.choose(route, tried, affinity)
                if chosen is None:
                    raise ProxyError(502, "The upstream vLLM server could not be reached.", type="upstream_error", code="502")
                if self.flow.claims(chosen[0]):
                    # A retry to a capped replica takes a slot like any call.
                    waiting = self.flow.admit(route, *progress.ticket, affinity=affinity, exclude=tried)
                    assert waiting is not None
                    progress.slot = await self._queued(request, call, waiting)
            if progress.slot is not None:
                chosen = progress.slot.deployment, progress.slot.reason
            assert chosen is not None
            deployment, call.routing_reason = chosen
            tried.append(deployment)
            producer = upstream_body(request, deployment, route, raw_json, progress)
            progress.deployment = deployment
            call.deployment = deployment.id
            call.api_base = deployment.api_base
            call.attempts += 1
            self._router.started(deployment)
            try:
                response = await send_upstream(
                    self._reactor, self._pool, self._upstream(deployment), request, call, deployment, target, producer,
                    progress.id_scope, progress.strip_usage, self._max_response_head,
                )
            except UpstreamUnreachable:
                self._finished(deployment, progress)
                self._router.failed(deployment)
                if request.body is not None and request.body.started:
                    raise ProxyError(502, "The upstream vLLM server could not be reached.", type="upstream_error", code="502")
                self._retried(route, tried, "unreachable")
                continue
            except BaseException:
                self._finished(deployment, progress)
                raise
            try:
                extra: Tuple[Tuple[bytes, bytes], ...] = ()
                if may_be_refusal(response):
                    response, refused = await self._refusal(request, call, deployment, response)
                    if refused is not None:
                        self._router.refused(deployment)
                        if may_retry and self._room_elsewhere(route, tried):
                            may_retry = False
                            raise_if_gone_or_late(request, call, ())
                            self._retried(route, tried, refused)
                            continue
                        extra = ((b"Retry-After", b"%d" % (self.flow.retry_after,)),)
                self._router.succeeded(deployment)
                if route.operation is not None:
                    self._router.operated(deployment, route.operation, response.code)
                await self._relay(request, call, deployment, response, progress, extra)
            finally:
                self._finished(deployment, progress)
            return

    def _finished(self, deployment: Deployment, progress: "_Progress") -> None:
        """
        A call's attempt on C{deployment} ended: its slot is given back
        first (Redis must see it before the queue claims it again), then the
        router counts the end (and the queue dispatches).
        """
        slot = progress.slot
        if slot is not None:
            progress.slot = None
            slot.release()
        self._router.finished(deployment)

    def _room_elsewhere(self, route: Route, tried: List[Deployment]) -> bool:
        """
        :return: whether a replica not tried yet is healthy and not
            saturated (a refused call is not pushed past a parallel cap or
            into a full queue: it gets vLLM's 503 instead).
        """
        router = self._router
        return any(d not in tried and not router.cooling_down(d) and not router.asleep(d) and not router.saturated(d)
                   for d in route.replicas)

    def _retried(self, route: Route, tried: List[Deployment], reason: str) -> None:
        if self._count_retry is not None and len(tried) < len(route.replicas):
            self._count_retry(route.model_name, reason)

    async def _refusal(self, request, call: Call, deployment: Deployment, response):
        """
        Read an answer that may be vLLM's queue-cap refusal
        (L{dheera_tx.upstream.refusal}) whole.

        :return: C{(the answer, its body held, vLLM's reason or L{None})}.
        """
        d = read_body(self._reactor, response, deployment.stream_timeout)
        gone = request.on_client_gone(d.cancel)
        try:
            body = await d
        except Exception:
            raise_if_gone_or_late(request, call, ())
            call.error = "upstream_failed"
            raise ProxyError(502, "The upstream vLLM server closed the connection while answering.", type="upstream_error", code="502")
        finally:
            request.forget_client_gone(gone)
        return held(response, body), refusal_reason(body)

    async def _relay(self, request, call: Call, deployment: Deployment, response, progress: "_Progress", more=()) -> None:
        call.status = response.code
        content_type = first_header(response.headers, b"content-type") or b""
        sse = content_type.lower().startswith(b"text/event-stream")
        if sse:
            call.stream = True
        if request.client_gone:
            response.stopProducing()
            return
        headers = response.headers
        meter = self._accounting.meter_for(
            content_type,
            response.code,
            progress.strip_usage,
            first_header(headers, b"content-encoding"),
            first_header(headers, b"metadata"),
        )
        progress.meter = meter
        hold = (isinstance(meter, JSONUsageMeter) or (isinstance(meter, DecodingMeter) and not sse)) and (
            response.length is None or response.length <= ResponseRelay.HOLD_LIMIT
        ) and request.method != b"HEAD"
        if not hold and isinstance(meter, (JSONUsageMeter, DecodingMeter)):
            # Not held: read as it streams, never kept.
            meter.stream()
        rewritten = sse and progress.strip_usage and not isinstance(meter, DecodingMeter)
        head = lambda extra=(), length=None: write_response_head(request, response, call, (*more, *extra), rewritten, length)
        if isinstance(meter, DeclaredUsageMeter):
            # Usage declared in the head: the cost goes with it, no holding.
            head(cost_header(meter, deployment, response.code, call.model_name))
        elif not hold:
            head()
        relay = ResponseRelay(
            self._reactor, request, call, deployment, sse, meter, None if not hold else head, self._relay_watch
        )
        gone = request.on_client_gone(relay.abort)
        self.streams_in_flight += sse
        # Taken first: the relay lets go of it when the body ends, which
        # can happen inside deliver().
        done = relay.done
        try:
            request.registerProducer(response, True)
            relay.started(response)
            response.deliver(relay)
            await done
        finally:
            self.streams_in_flight -= sse
            request.forget_client_gone(gone)


_MODELS = b"/v1/models"


def _names_models(path: bytes) -> bool:
    """
    :return: whether C{path} is the model list or one model's entry.
    """
    return path == _MODELS or (path.startswith(_MODELS + b"/") and len(path) > len(_MODELS) + 1)


def _too_large(limit: int) -> ProxyError:
    return ProxyError(
        413,
        f"The request body is larger than {limit} bytes.",
        type="invalid_request_error",
        code="request_too_large",
    )


class _Progress:
    """
    What a call has got to, for settling it however it ends.
    """

    __slots__ = ("request", "path", "document", "admission", "deployment", "meter", "strip_usage", "id_scope", "forwarded",
                 "priority", "queued", "ticket", "slot")

    def __init__(self):
        self.request = None
        self.path = b""
        self.document = None
        self.admission = None
        self.deployment = None
        self.meter = None
        self.strip_usage = False
        # A virtual key's request-id namespace, and the body with its ids
        # moved into it (None: forwarded as the client wrote it).
        self.id_scope: Optional[bytes] = None
        self.forwarded: Optional[dict] = None
        # The key's priority (vLLM's priority field where a deployment forwards it).
        self.priority: Optional[int] = None
        # A queued call's (model, key, priority, weight, estimated tokens), for fair share.
        self.queued: Optional[Tuple[Optional[str], str, int, float, float]] = None
        # The call's (key, priority, weight, estimated tokens) for the queue.
        self.ticket: Tuple[str, int, float, float] = ("", 0, 1.0, 1.0)
        # The replica and slot the queue gave the call (given back as it ends).
        self.slot: Optional[Slot] = None


def request_bytes(progress: _Progress) -> int:
    """
    :return: the request body bytes the client sent.
    """
    request = progress.request
    if request is None or request.body is None:
        return 0
    return request.body.received
