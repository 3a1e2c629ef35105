"""
Control-plane requests on the listener: who may send a body, and how big.

Every request that is not C{/vllm} is read whole and then run through the
Klein control plane (L{dheera_tx.http.control_bridge}).  Reading a body
costs memory and time, so it is earned first: L{ControlGate} checks the
caller's key as soon as the headers have arrived (every route but the
public health and metrics routes, and the console, which checks its own
session cookie, needs one), and the connection reads no
byte of the body until the key is good; a body is capped at
C{max_control_body_bytes} (413 from the Content-Length, or as soon as it
grows past).  A L{ControlRequest} is one such request on its way.
"""

from typing import List, Optional, Tuple

from twisted.internet.defer import Deferred, ensureDeferred
from twisted.web.http_headers import Headers

from dheera_tx.errors import ProxyError

# Routes anyone may call: load balancers and orchestrators probe them
# without credentials.  Their handlers take no body.
PUBLIC_ROUTES = frozenset([b"/health/liveliness", b"/health/liveness", b"/health/readiness"])
METRICS_ROUTE = b"/metrics"
# The console signs in with a form and then checks its own session cookie
# on every request (dheera_tx.console): no key header to check here; its
# bodies are small forms, capped like any control body.
CONSOLE_ROOT = b"/ui"


class ControlRequest:
    """
    A control-plane request being read whole.

    :ivar admitted: the key check passed (or the route is public): the
        body may be read.
    :ivar rejection: the error to answer instead of serving it, or L{None}.
    :ivar keep_alive: the connection may outlive the answer as far as the
        request's framing goes (not after an HTTP/1.0 chunked body).
    :ivar head_size: the bytes of its head.
    """

    __slots__ = (
        "method",
        "target",
        "version",
        "headers",
        "chunks",
        "size",
        "complete",
        "admitted",
        "rejection",
        "keep_alive",
        "head_size",
    )

    def __init__(self, method: bytes, target: bytes, version: bytes, headers: List[Tuple[bytes, bytes]]):
        self.method = method
        self.target = target
        self.version = version
        self.headers = headers
        self.chunks: List[bytes] = []
        self.size = 0
        self.complete = False
        self.admitted = False
        self.rejection: Optional[ProxyError] = None
        self.keep_alive = True
        self.head_size = 0

    def body(self) -> bytes:
        """
        :return: the whole body read.
        """
        return b"".join(self.chunks)


class ControlGate:
    """
    Decides, from a control request's head, whether its body may be read.

    :param authenticator: a L{dheera_tx.keys.auth.Authenticator}, or
        L{None} to let every request through (a listener without keys).
    :param metrics_require_auth: C{/metrics} needs a key too.
    """

    def __init__(self, authenticator, metrics_require_auth: bool = False):
        self._authenticator = authenticator
        self._public = PUBLIC_ROUTES if metrics_require_auth else PUBLIC_ROUTES | {METRICS_ROUTE}

    def is_public(self, target: bytes) -> bool:
        """
        :return: whether C{target}'s route needs no key header (public, or
            the console's, which authenticates with its session cookie).
        """
        path = target.split(b"?", 1)[0]
        return path in self._public or path == CONSOLE_ROOT or path.startswith(CONSOLE_ROOT + b"/")

    def check(self, target: bytes, headers: List[Tuple[bytes, bytes]]) -> "Deferred[Optional[ProxyError]]":
        """
        Check the key a request presents (the route's own handler checks
        which key it needs: this only keeps callers without a valid key
        from sending bodies).

        :return: a Deferred firing with L{None} when the request may go on,
            else with the error to answer (401, or 503 when the key store
            is unreachable); synchronously when no lookup is needed.
        """
        if self._authenticator is None or self.is_public(target):
            d: Deferred = Deferred()
            d.callback(None)
            return d
        request_headers = Headers()
        for name, value in headers:
            request_headers.addRawHeader(name, value)
        return ensureDeferred(self._authenticated(request_headers))

    async def _authenticated(self, headers: Headers) -> Optional[ProxyError]:
        try:
            await self._authenticator.authenticate(headers)
        except ProxyError as e:
            return e
        return None
