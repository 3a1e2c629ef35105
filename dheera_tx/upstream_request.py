"""
What goes to the upstream for one call: where (L{UpstreamTarget}, from a
deployment's api_base), with which headers (L{upstream_headers}: hop-by-hop
and proxy headers out, the deployment's key in, a virtual key's request id
scoped, a virtual key's rank pin out) and which body (L{upstream_body}:
the client's bytes unchanged unless the served model name, the usage
request, scoped ids or the C{priority} field must be written into the
JSON, or a virtual key's engine-steering fields removed); and the sending
of it (L{send_upstream}: on the shared pool, within the deployment's
timeout, cancelled when the client leaves, its failures told as the client
sees them).
"""

from typing import List, Optional, Tuple
from urllib.parse import urlsplit

from twisted.internet.defer import CancelledError
from twisted.logger import Logger

from dheera_tx.accounting.call_accounting import with_usage_requested
from dheera_tx.call import Call
from dheera_tx.config import Deployment
from dheera_tx.errors import ProxyError
from dheera_tx.http.hop_headers import NOT_FORWARDED, connection_tokens
from dheera_tx.keys.tenancy import scoped_header
from dheera_tx.routing.model_choice import encode_document
from dheera_tx.routing.router import Route
from dheera_tx.upstream.client import UpstreamFailed, UpstreamMalformed, UpstreamUnreachable

log = Logger()


class UpstreamTarget:
    """
    Where a deployment's calls go: host, port, TLS and path prefix.
    """

    __slots__ = ("host", "port", "tls", "prefix")

    def __init__(self, api_base: str):
        parts = urlsplit(api_base)
        self.tls = parts.scheme == "https"
        self.host = parts.hostname or "127.0.0.1"
        self.port = parts.port or (443 if self.tls else 80)
        self.prefix = parts.path.rstrip("/").encode("utf-8")


def upstream_body(request, deployment: Deployment, route: Route, raw_json, progress):
    """
    :return: the body to send to C{deployment}: the client's bytes
        unchanged unless the served model name, the usage request,
        a virtual key's request ids or vLLM's C{priority} field (removed,
        or the key's with C{forward_priority}) must be written into the
        JSON, or a virtual key's L{OPERATOR_FIELDS} removed.
    """
    if raw_json is None:
        return request.body
    document = progress.forwarded if progress.forwarded is not None else progress.document
    if document is None:
        return raw_json if raw_json else None
    rename = (
        route.model_name is not None
        and not route.adapter
        and deployment.served_model
        and document.get("model") != deployment.served_model
    )
    priority = _priority(document, deployment, progress.priority)
    fenced = progress.id_scope is not None and any(name in document for name in OPERATOR_FIELDS)
    if not rename and not progress.strip_usage and progress.forwarded is None and priority is _KEEP and not fenced:
        return raw_json
    changed = with_usage_requested(document) if progress.strip_usage else dict(document)
    if rename:
        changed["model"] = deployment.served_model
    if fenced:
        for name in OPERATOR_FIELDS:
            changed.pop(name, None)
    if priority is _DROP:
        changed.pop("priority", None)
    elif priority is not _KEEP:
        changed["priority"] = priority
    return encode_document(changed)


_KEEP = object()
_DROP = object()

#: vLLM body fields that steer the engine itself, not one call's output:
#: where a prefill's KV cache or an encoder's output is fetched from
#: (disaggregated serving: a forged value makes vLLM connect where a tenant
#: says and read blocks it names) and extra arguments for the operator's
#: custom logits processors.  A virtual key's are removed; the master key's
#: are sent (a disaggregation router in front of the proxy uses them).
OPERATOR_FIELDS = ("kv_transfer_params", "ec_transfer_params", "vllm_xargs")
#: The header that pins a call to one data-parallel rank of a vLLM server;
#: a virtual key's is removed (a tenant must not pile calls on one rank).
OPERATOR_HEADER = b"x-data-parallel-rank"


def _priority(document: dict, deployment: Deployment, key_priority: Optional[int]):
    """
    What becomes of vLLM's C{priority} body field: a client's is removed
    (tenants must not jump vLLM's queue), unless the deployment sets
    C{forward_priority}: then a virtual key's priority is sent, and the
    master key's own value kept.

    :return: L{_KEEP}, L{_DROP} or the value to set.
    """
    if not deployment.forward_priority:
        return _DROP if "priority" in document else _KEEP
    if key_priority is None or document.get("priority", 0) == key_priority:
        return _KEEP
    return key_priority

def upstream_headers(request, deployment: Deployment, id_scope: Optional[bytes], identity: bool = False) -> List[Tuple[bytes, bytes]]:
    """
    :param id_scope: a virtual key's request-id namespace (its
        C{X-Request-Id} is moved into it and its L{OPERATOR_HEADER}
        removed), or L{None} for the master key.
    :param identity: ask for an uncompressed answer (the proxy rewrites
        it: the usage chunk it asked for is stripped).
    """
    incoming = request.raw_headers
    drop = NOT_FORWARDED | connection_tokens(incoming) if request.getHeader(b"connection") else NOT_FORWARDED
    headers = []
    forwarded = []
    for name, value in incoming:
        lower = name.lower()
        if lower in drop or lower.startswith(b"proxy-"):
            continue
        if lower == b"x-forwarded-for":
            forwarded.append(value)
            continue
        if id_scope is not None:
            if lower == b"x-request-id":
                value = scoped_header(id_scope, value)
            elif lower == OPERATOR_HEADER:
                continue
        if identity and lower == b"accept-encoding":
            continue
        headers.append((name, value))
    if identity:
        headers.append((b"Accept-Encoding", b"identity"))
    client_ip = getattr(request.getClientAddress(), "host", None)
    if client_ip:
        forwarded.append(client_ip.encode("ascii"))
    if forwarded:
        headers.append((b"X-Forwarded-For", b", ".join(forwarded)))
    if deployment.api_key:
        headers.append((b"Authorization", b"Bearer " + deployment.api_key.encode("utf-8")))
    return headers


async def send_upstream(
    reactor, pool, upstream: UpstreamTarget, request, call: Call, deployment: Deployment, target: bytes, body,
    id_scope: Optional[bytes], identity: bool, max_head_bytes: int,
):
    """
    Send one call's request to C{deployment} on C{pool}
    (L{dheera_tx.upstream.client.UpstreamPool}).

    :param target: the path and query below the deployment's api_base.
    :param body: what L{upstream_body} gave.
    :param identity: ask for an uncompressed answer.
    :return: the L{dheera_tx.upstream.client.UpstreamResponse} once its
        head has arrived.
    :raise UpstreamUnreachable: nothing was sent (the call may go to
        another replica).
    :raise ProxyError: 502 (the upstream failed or answered garbage), 504
        (no answer within the deployment's C{timeout}), or L{ClientGone}.
    """
    headers = upstream_headers(request, deployment, id_scope, identity)
    call.upstream_sent_at = reactor.seconds()
    d = pool.request(
        upstream.host,
        upstream.port,
        deployment.connect_timeout,
        request.method,
        upstream.prefix + target,
        headers,
        body,
        max_head_bytes=max_head_bytes,
        tls=upstream.tls,
        idle_timeout=deployment.keepalive_timeout,
    )
    timed_out = []

    def give_up():
        timed_out.append(True)
        d.cancel()

    timer = reactor.callLater(deployment.timeout, give_up)
    gone = request.on_client_gone(d.cancel)
    try:
        return await d
    except UpstreamUnreachable as e:
        raise_if_gone_or_late(request, call, timed_out)
        call.error = "upstream_unreachable"
        log.info("Upstream {deployment} unreachable: {why}", deployment=deployment.id, why=e.reason)
        raise
    except (UpstreamFailed, CancelledError):
        raise_if_gone_or_late(request, call, timed_out)
        if request.body is not None and request.body.failure is not None:
            request.body.failure.raiseException()
        call.error = "upstream_failed"
        raise ProxyError(502, "The upstream vLLM server closed the connection without answering.", type="upstream_error", code="502")
    except UpstreamMalformed:
        # The upstream's answer could not be parsed, or its head is over
        # the limit.
        call.error = "upstream_bad_response"
        raise ProxyError(502, "The upstream vLLM server sent a malformed answer.", type="upstream_error", code="502")
    finally:
        request.forget_client_gone(gone)
        if timer.active():
            timer.cancel()


class ClientGone(ProxyError):
    """
    The client left before its call was answered (nobody to answer).
    """

    def __init__(self):
        super().__init__(499, "client disconnected", type="client_disconnected")


def raise_if_gone_or_late(request, call: Call, timed_out) -> None:
    """
    Say why an upstream request ended early when it was the client leaving
    or the call's deadline passing.

    :raise ClientGone: the client left.
    :raise ProxyError: 504, C{timed_out} being true.
    """
    if request.client_gone:
        call.error = "client_disconnected"
        raise ClientGone()
    if timed_out:
        call.error = "upstream_timeout"
        raise ProxyError(504, "The upstream vLLM server did not answer in time.", type="upstream_timeout", code="504")
