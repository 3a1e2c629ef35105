"""
What a virtual key may reach on vLLM, and how its request ids are kept
apart from every other key's.

B{Tenant routes.}  vLLM serves its operator API (C{/sleep},
C{/inference/v1/abort_requests}, C{/collective_rpc}, C{/server_info},
C{/openapi.json}, ...) on the same port as inference, and each release adds
routes.  So what a virtual key may call is an allow-list, L{TENANT_API},
widened by C{general_settings.tenant_routes}; every other route needs the
master key.  A route is matched exactly against the raw path, which
L{dheera_tx.http.paths.path_problem} has already checked names the route
vLLM will serve; a C{*} segment stands for one path segment (an id).

B{Request ids.}  vLLM takes a client's C{X-Request-Id} header (else the
body's C{request_id}) as the request's id in its engine, its logs and its
Responses store, where C{GET /v1/responses/{id}}, C{.../cancel} and
C{previous_response_id} find a response by it.  A virtual key's ids are
moved into the key's own namespace before they are forwarded: they get the
key's L{request_id_scope} in front unless they already start with it.  Two
keys' ids are then never equal, and an id a key names only ever reaches its
own requests.  vLLM's answers carry the scoped id (C{chatcmpl-<scope><id>},
a response's C{id}): sending back what vLLM returned works, and so does an
id the client chose itself.  The master key's ids are forwarded unchanged.
"""

import re
import uuid
from typing import Iterable, Optional, Tuple

# The tenant API: inference (realtime WebSockets included), pooling and
# tokenizer routes, model listing (the proxy answers /v1/models and
# /v1/models/{name} itself).  Not here (master-only unless widened):
# /v1/chat/completions/batch and the render routes, /v2/embed and
# /cohere/v2/chat (no usage the proxy can bill), /generative_scoring, and
# every operator route.
TENANT_API: Tuple[str, ...] = (
    "v1/chat/completions",
    "v1/completions",
    "v1/responses",
    "v1/responses/*",
    "v1/responses/*/cancel",
    "v1/messages",
    "v1/messages/count_tokens",
    "v1/embeddings",
    "pooling",
    "score",
    "v1/score",
    "rerank",
    "v1/rerank",
    "v2/rerank",
    "classify",
    "tokenize",
    "detokenize",
    "v1/audio/transcriptions",
    "v1/audio/translations",
    "v1/models",
    "v1/models/*",
    "v1/realtime",
    "invocations",
)

SCOPE_LENGTH = 16
_RESPONSES = b"/v1/responses/"


class TenantRoutes:
    """
    The routes a virtual key may call: L{TENANT_API} and the operator's
    additions.

    :param extra: more routes (C{general_settings.tenant_routes}), without
        the leading slash; a C{*} segment matches any one segment.
    """

    def __init__(self, extra: Iterable[str] = ()):
        routes = TENANT_API + tuple(extra)
        self._exact = frozenset(r for r in routes if "*" not in r.split("/"))
        patterns = [
            "/".join("[^/]+" if s == "*" else re.escape(s) for s in r.split("/"))
            for r in routes
            if "*" in r.split("/")
        ]
        self._pattern = re.compile("|".join(patterns)) if patterns else None

    def allows(self, path: str) -> bool:
        """
        :param path: the upstream path without leading slash and query,
            e.g. C{"v1/chat/completions"}.
        :return: whether a virtual key may call it.
        """
        if path in self._exact:
            return True
        return self._pattern is not None and self._pattern.fullmatch(path) is not None


def request_id_scope(token: str) -> str:
    """
    :param token: a virtual key's SHA-256 hex.
    :return: the prefix that puts a request id into the key's namespace:
        16 hex digits of the key's hash and a dash.  Every key's prefix has
        the same length, so one key's scoped ids never start with
        another's prefix.
    """
    return token[:SCOPE_LENGTH] + "-"


def scoped_header(scope: bytes, value: bytes) -> bytes:
    """
    :return: the C{X-Request-Id} value C{value} in the namespace C{scope}.
    """
    return value if value.startswith(scope) else scope + value


def scoped_document(document: dict, scope: str, creates_response: bool) -> Optional[dict]:
    """
    Put the ids a JSON body names into the caller's namespace.

    :param document: the parsed request body.
    :param scope: the caller's L{request_id_scope}.
    :param creates_response: the call is C{POST /v1/responses}: a body
        without C{request_id} gets a scoped one, so that the stored response
        can be found again by its owner (vLLM would name it
        C{resp_<random>}, outside every namespace).
    :return: the body to forward, or L{None} when it names no id.  A body
        naming one is always re-encoded, so that vLLM reads the id the proxy
        checked even if the raw JSON names it twice.
    """
    changed = None
    for field in ("request_id", "previous_response_id"):
        value = document.get(field)
        if value is None:
            continue
        if changed is None:
            changed = dict(document)
        if isinstance(value, str) and not value.startswith(scope):
            changed[field] = scope + value
    if creates_response and document.get("request_id") is None:
        if changed is None:
            changed = dict(document)
        changed["request_id"] = scope + "resp_" + uuid.uuid4().hex
    return changed


def scoped_path(path: bytes, scope: bytes) -> bytes:
    """
    :param path: the raw upstream path, starting with C{/}.
    :return: C{path} with the response id of C{/v1/responses/{id}} (and
        C{/v1/responses/{id}/cancel}) in the namespace C{scope}; any other
        path unchanged.
    """
    if not path.startswith(_RESPONSES) or len(path) == len(_RESPONSES):
        return path
    response_id, slash, rest = path[len(_RESPONSES):].partition(b"/")
    if response_id.startswith(scope):
        return path
    return _RESPONSES + scope + response_id + slash + rest
