"""
Who is calling, and may they make this call.

L{Authenticator} turns the request's credentials into a L{Principal}: the
master key (compared in constant time) or a virtual key looked up by its
SHA-256 in the key store.  Every failure is the same 401, so a caller cannot
tell a missing key from an unknown, expired or blocked one.  Keys are never
taken from the URL.
"""

import functools
import hashlib
import hmac
import re
import time
from typing import Callable, Optional, Tuple

import attr

from dheera_tx.errors import ProxyError, forbidden, service_unavailable, unauthorized
from dheera_tx.keys.tenancy import TenantRoutes


@attr.s(frozen=True, slots=True, auto_attribs=True)
class Principal:
    """
    An authenticated caller.

    :ivar is_master: the caller presented the master key.
    :ivar key: the virtual key's record (a L{dheera_tx.keys.records.KeyRecord}), or
        L{None} for the master key.
    """

    is_master: bool
    key: Optional[object] = None

    @property
    def token(self) -> Optional[str]:
        """
        :return: the SHA-256 hex of the virtual key, or L{None}.
        """
        return None if self.key is None else self.key.token


MASTER = Principal(is_master=True)


def hash_key(key: str) -> str:
    """
    :return: the SHA-256 hex digest under which a virtual key is stored.
    """
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def presented_key(headers) -> Optional[str]:
    """
    Read the caller's key from C{Authorization: Bearer} or C{x-api-key}.

    :param headers: the request's L{twisted.web.http_headers.Headers}.
    :return: the key, or L{None} when none was presented.
    """
    auth = headers.getRawHeaders(b"authorization")
    if auth:
        scheme, _, value = auth[0].strip().partition(b" ")
        if scheme.lower() == b"bearer" and value.strip():
            return value.strip().decode("latin-1")
        return None
    api_key = headers.getRawHeaders(b"x-api-key")
    if api_key and api_key[0].strip():
        return api_key[0].strip().decode("latin-1")
    return None


class Authenticator:
    """
    Authenticates callers against the master key and the virtual-key store.

    :param master_key: the configured master key, or L{None} (then only
        virtual keys work, and admin routes are closed).
    :param key_store: an object with C{get_key(token) -> Deferred[KeyRecord
        or None]}, or L{None} while no key store is configured.
    :param now: a clock returning epoch seconds (injected in tests).
    """

    def __init__(self, master_key: Optional[str], key_store=None, now: Callable[[], float] = time.time):
        self._master = master_key.encode("utf-8") if master_key else None
        self._key_store = key_store
        self._now = now

    async def authenticate(self, headers) -> Principal:
        """
        :param headers: the request's headers.
        :return: the caller.
        :raise ProxyError: 401 for a missing, unknown, expired or blocked
            key; 503 when the key store cannot be reached.
        """
        key = presented_key(headers)
        if key is None:
            raise unauthorized()
        raw = key.encode("utf-8", "surrogateescape")
        if self._master is not None and hmac.compare_digest(raw, self._master):
            return MASTER
        if self._key_store is None or not key.startswith("sk-"):
            raise unauthorized()
        try:
            record = await self._key_store.get_key(hash_key(key))
        except ProxyError:
            raise
        except Exception:
            raise service_unavailable("The key store is unavailable; try again shortly.")
        if record is None or record.blocked:
            raise unauthorized()
        if record.expires is not None and record.expires <= self._now():
            raise unauthorized()
        return Principal(is_master=False, key=record)


def require_master(principal: Principal) -> None:
    """
    :raise ProxyError: 403 unless the caller holds the master key.
    """
    if not principal.is_master:
        raise forbidden("This route needs the master key.")


def authorize_vllm_call(
    principal: Principal,
    path: str,
    model_name: Optional[str],
    tenant_routes: TenantRoutes,
) -> None:
    """
    Check that C{principal} may make this pass-through call.

    :param path: the upstream path without leading slash and query.
    :param model_name: the model the call names, or L{None}.
    :param tenant_routes: the routes virtual keys may call.
    :raise ProxyError: 403 when the key may not call this route or model.
    """
    authorize_route(principal, path, tenant_routes)
    authorize_vllm_model(principal, model_name)


def authorize_vllm_model(principal: Principal, model_name: Optional[str]) -> None:
    """
    The model part of L{authorize_vllm_call}; also applied, before the
    body is read, to a model named by header or query.

    :raise ProxyError: 403 when the key may not use C{model_name}.
    """
    if principal.is_master:
        return
    key = principal.key
    if key.models and model_name not in key.models:
        if model_name is None:
            raise forbidden("This key is restricted to certain models: name one in the body, the x-dheera-model header or the model query parameter.")
        raise forbidden(f"This key may not use model {model_name!r}.")


def authorize_route(principal: Principal, path: str, tenant_routes: TenantRoutes) -> None:
    """
    Check that C{principal} may call the route C{path}, whatever the model
    (also for calls the proxy answers itself, such as the model list).

    :param path: the upstream path without leading slash and query.
    :param tenant_routes: the routes virtual keys may call.
    :raise ProxyError: 403 for a route outside the tenant API or outside
        the key's C{allowed_routes}.
    """
    if principal.is_master:
        return
    if not tenant_routes.allows(path):
        raise forbidden("This vLLM route needs the master key.")
    allowed = principal.key.allowed_routes
    if allowed and _allowed_routes(allowed).match("/" + path) is None:
        raise forbidden("This key may not call this route.")


@functools.lru_cache(maxsize=1024)
def _allowed_routes(prefixes: Tuple[str, ...]) -> "re.Pattern[str]":
    """
    :param prefixes: a key's C{allowed_routes}, path prefixes with or
        without C{/vllm}.
    :return: a pattern matching the paths (with leading slash) at or below
        one of them, compiled once per distinct list.
    """
    alternatives = []
    for prefix in prefixes:
        prefix = "/" + prefix.strip("/")
        if prefix.startswith("/vllm/") or prefix == "/vllm":
            prefix = prefix[len("/vllm"):] or "/"
        if prefix == "/":
            return re.compile("")
        alternatives.append(re.escape(prefix))
    return re.compile("(?:" + "|".join(alternatives) + ")(?:/|$)")
