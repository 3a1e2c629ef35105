"""
The admin API for virtual keys and end users (SPEC section 4), a Klein app.

Routes, all answering JSON (errors in the OpenAI shape)::

    POST /key/generate      {key_alias, duration, models, ...}  -> the key, once
    GET  /key/info?key=<key or hash>   (a virtual key may read its own)
    POST /key/update        {"key", ...fields}
    POST /key/delete        {"keys": [...]} or {"key_aliases": [...]}
    GET  /key/list?page=&size=&user_id=&team_id=&key_alias=&return_full_object=true
    POST /key/regenerate    {"key"}
    POST /key/block         {"key"}
    POST /key/unblock       {"key"}
    POST /end_user/new      {"user_id", "team_id", "max_budget", "budget_duration", "blocked", "metadata"}
    GET  /end_user/info?end_user_id=ID&team_id=TEAM
    POST /end_user/update   {"user_id", "team_id", ...fields}
    POST /end_user/block    {"user_ids": [...]} (or {"user_id"}), "team_id"; unknown ones are created blocked
    POST /end_user/unblock  {"user_ids": [...]} (or {"user_id"}), "team_id"
    POST /end_user/delete   {"user_ids": [...]} (or {"user_id"}), "team_id"

End users are scoped to the team of the calling key: C{team_id} (optional
everywhere) addresses the end users of that team's keys; without it, those
of keys without a team (the default scope).

Every route takes the master key only (403 for a virtual key, 401 without a
valid key), except that a virtual key may read its own /key/info.  Keys are
named by the key itself or by its SHA-256 hex (the C{token}); answers name
them by token, and only /key/generate and /key/regenerate show a key.
Nothing here logs a key.
"""

import functools
import json
import math
import time
import traceback
from typing import Callable

from klein import Klein
from twisted.internet import defer
from twisted.logger import Logger
from werkzeug.exceptions import MethodNotAllowed, NotFound

from dheera_tx.errors import ProxyError, bad_request, forbidden, service_unavailable
from dheera_tx.keys.auth import require_master
from dheera_tx.keys.fields import GENERATE_FIELDS, UPDATE_FIELDS, validate_end_user_fields, validate_key_fields
from dheera_tx.keys.records import MAX_NAME_LENGTH, token_of
from dheera_tx.keys.store import MAX_PAGE_SIZE, not_found
from dheera_tx.redis.client import RedisUnavailable

log = Logger()

def json_route(handler):
    """
    Wrap a handler C{async (self, request, principal) -> dict} into a route
    that authenticates the caller and answers JSON, errors included.
    """

    @functools.wraps(handler)
    async def route(self, request):
        request.setHeader(b"content-type", b"application/json")
        request.setHeader(b"cache-control", b"no-store")
        try:
            principal = await self._authenticator.authenticate(request.requestHeaders)
            answer = await handler(self, request, principal)
            status = 200
        except defer.CancelledError:
            raise
        except ProxyError as e:
            return error_answer(request, e)
        except RedisUnavailable:
            return error_answer(request, service_unavailable("The key store is unavailable; try again shortly."))
        except Exception as e:
            # The exception's message may quote request data: log its type
            # and where it happened, not what it says.
            log.error(
                "Unexpected {error} in {route}:\n{where}",
                error=type(e).__name__,
                route=handler.__name__,
                where="".join(traceback.format_tb(e.__traceback__)),
            )
            return error_answer(request, ProxyError(500, "Internal error.", type="internal_server_error", code="500"))
        request.setResponseCode(status)
        return json.dumps(answer).encode("utf-8")

    return route


def error_answer(request, error: ProxyError) -> bytes:
    request.setResponseCode(error.status)
    for name, value in error.headers.items():
        request.setHeader(name, value)
    return error.body()


def not_found_answer(request, failure) -> bytes:
    """
    Answer an unknown path of a JSON admin app with a JSON 404 (Klein's
    C{NotFound} handler).
    """
    request.setHeader(b"content-type", b"application/json")
    return error_answer(request, ProxyError(404, "Not found.", type="not_found_error", code="404"))


def method_not_allowed_answer(request, failure) -> bytes:
    """
    Answer a known path asked with the wrong method with a JSON 405
    (Klein's C{MethodNotAllowed} handler).
    """
    request.setHeader(b"content-type", b"application/json")
    request.setHeader(b"allow", ", ".join(failure.value.valid_methods or ()).encode("ascii"))
    return error_answer(request, ProxyError(405, "Method not allowed.", type="invalid_request_error", code="405"))


def json_body(request) -> dict:
    raw = request.content.read() if request.content is not None else b""
    if not raw.strip():
        return {}
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise bad_request("The request body is not valid JSON.") from None
    if not isinstance(body, dict):
        raise bad_request("The request body must be a JSON object.")
    if b"\\u" in raw:
        try:
            # A \uD800-style escape decodes to text no store can encode.
            json.dumps(body, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            raise bad_request("The request body has a lone surrogate escape (not Unicode text).") from None
    return body


def query_arg(request, name: str):
    values = request.args.get(name.encode("ascii"))
    if not values:
        return None
    try:
        return values[-1].decode("utf-8")
    except UnicodeDecodeError:
        raise bad_request(f"{name} is not valid UTF-8.", name) from None


def _query_int(request, name: str, default: int) -> int:
    text = query_arg(request, name)
    if text is None or text == "":
        return default
    if not (text.isascii() and text.isdigit()):
        raise bad_request(f"{name} must be a whole number.", name)
    return int(text)


def only_fields(body: dict, allowed) -> None:
    unknown = sorted(set(body) - set(allowed))
    if unknown:
        raise bad_request("Unknown field(s): " + ", ".join(unknown) + ".", unknown[0])


def name_list(body: dict, field: str) -> list:
    names = body.get(field)
    if (
        not isinstance(names, list)
        or not names
        or not all(isinstance(n, str) and n and len(n) <= MAX_NAME_LENGTH for n in names)
    ):
        raise bad_request(f"{field} must be a non-empty list of non-empty strings.", field)
    return names


def _user_ids(body: dict):
    """
    :return: C{(end user ids, team_id or None)} of an /end_user/block,
        unblock or delete body.
    """
    only_fields(body, ("user_ids", "user_id", "team_id"))
    if ("user_ids" in body) == ("user_id" in body):
        raise bad_request("Give user_ids (a list) or user_id.", "user_ids")
    team_id = team_arg(body.get("team_id"))
    if "user_id" in body:
        return name_list({"user_id": [body["user_id"]]}, "user_id"), team_id
    return name_list(body, "user_ids"), team_id


def team_arg(value):
    """
    :return: an end user's scope from a C{team_id} given in a body or query
        (L{None}: the default scope).
    """
    if value is None:
        return None
    if not isinstance(value, str) or not value or len(value) > MAX_NAME_LENGTH:
        raise bad_request(f"team_id must be a non-empty string of at most {MAX_NAME_LENGTH} characters.", "team_id")
    return value


class KeyAPI:
    """
    The /key/ and /end_user/ routes.  Mount C{KeyAPI(...).app.resource()}.

    :param authenticator: a L{dheera_tx.keys.auth.Authenticator}.
    :param key_store: an L{dheera_tx.keys.store.IKeyStore} provider.
    :param now: a clock returning epoch seconds (expiry and budget windows
        are computed by the key store with its own clock; this one is kept
        for the agreed signature and for handlers that need the time).
    """

    app = Klein()

    def __init__(self, authenticator, key_store, now: Callable[[], float] = time.time):
        self._authenticator = authenticator
        self._store = key_store
        self._now = now

    # -- keys --

    @app.route("/key/generate", methods=["POST"])
    @json_route
    async def generate(self, request, principal):
        """
        Make a key; the answer is the only place the key is ever shown.
        """
        require_master(principal)
        fields = validate_key_fields(json_body(request), allowed=GENERATE_FIELDS)
        key, record = await self._store.create_key(fields)
        log.info("Key {token}... generated (alias {alias!r})", token=record.token[:12], alias=record.key_alias)
        return record.to_api(key=key)

    @app.route("/key/info", methods=["GET"])
    @json_route
    async def info(self, request, principal):
        """
        Describe a key: any key for the master key, its own for a virtual key.
        """
        given = query_arg(request, "key")
        if given is None:
            if principal.is_master:
                raise bad_request("key is required.", "key")
            token = principal.token
        else:
            token = token_of(given)
        if not principal.is_master and token != principal.token:
            raise forbidden("A virtual key may only read its own info.")
        record = await self._store.get_key(token)
        if record is None:
            raise not_found("Key")
        return {"key": token, "info": record.to_api()}

    @app.route("/key/update", methods=["POST"])
    @json_route
    async def update(self, request, principal):
        """
        Change some fields of a key.
        """
        require_master(principal)
        fields = validate_key_fields(json_body(request), allowed=UPDATE_FIELDS)
        token = fields.pop("key")
        record = await self._store.update_key(token, fields)
        log.info("Key {token}... updated ({fields})", token=token[:12], fields=", ".join(sorted(fields)))
        return record.to_api()

    @app.route("/key/delete", methods=["POST"])
    @json_route
    async def delete(self, request, principal):
        """
        Delete keys named by key/hash (C{keys}) or by alias (C{key_aliases}).
        """
        require_master(principal)
        body = json_body(request)
        only_fields(body, ("keys", "key_aliases"))
        if ("keys" in body) == ("key_aliases" in body):
            raise bad_request("Give keys or key_aliases (a list).", "keys")
        if "keys" in body:
            tokens = [token_of(k, "keys") for k in name_list(body, "keys")]
            deleted = await self._store.delete_keys(tokens)
        else:
            deleted = await self._store.delete_keys_by_alias(name_list(body, "key_aliases"))
        if not deleted:
            raise not_found("Key")
        log.info("Deleted {n} key(s): {tokens}", n=len(deleted), tokens=", ".join(t[:12] + "..." for t in deleted))
        return {"deleted_keys": deleted}

    @app.route("/key/list", methods=["GET"])
    @json_route
    async def list_keys(self, request, principal):
        """
        Page through keys, newest first: tokens, or whole records with
        C{return_full_object=true}.
        """
        require_master(principal)
        page = _query_int(request, "page", 1)
        size = _query_int(request, "size", 10)
        full = (query_arg(request, "return_full_object") or "false").lower()
        if full not in ("true", "false"):
            raise bad_request("return_full_object must be true or false.", "return_full_object")
        if size > MAX_PAGE_SIZE:
            raise bad_request(f"size must be from 1 to {MAX_PAGE_SIZE}.", "size")
        records, total = await self._store.list_keys(
            page=page,
            size=size,
            user_id=query_arg(request, "user_id"),
            team_id=query_arg(request, "team_id"),
            key_alias=query_arg(request, "key_alias"),
        )
        return {
            "keys": [r.to_api() if full == "true" else r.token for r in records],
            "total_count": total,
            "current_page": page,
            "total_pages": math.ceil(total / size) if size else 0,
        }

    @app.route("/key/regenerate", methods=["POST"])
    @json_route
    async def regenerate(self, request, principal):
        """
        Give a key a new secret (shown once); the old one stops working.
        """
        require_master(principal)
        token = self._key_only(request)
        key, record = await self._store.regenerate_key(token)
        log.info("Key {old}... regenerated as {new}...", old=token[:12], new=record.token[:12])
        return record.to_api(key=key)

    @app.route("/key/block", methods=["POST"])
    @json_route
    async def block(self, request, principal):
        """
        Block a key: it gets 401 until unblocked.
        """
        require_master(principal)
        record = await self._store.block_key(self._key_only(request))
        log.info("Key {token}... blocked", token=record.token[:12])
        return record.to_api()

    @app.route("/key/unblock", methods=["POST"])
    @json_route
    async def unblock(self, request, principal):
        """
        Unblock a key.
        """
        require_master(principal)
        record = await self._store.unblock_key(self._key_only(request))
        log.info("Key {token}... unblocked", token=record.token[:12])
        return record.to_api()

    def _key_only(self, request) -> str:
        body = json_body(request)
        only_fields(body, ("key",))
        if body.get("key") is None:
            raise bad_request("key is required.", "key")
        return token_of(body["key"])

    # -- end users --

    @app.route("/end_user/new", methods=["POST"])
    @json_route
    async def end_user_new(self, request, principal):
        """
        Make an end user (400 if it exists).
        """
        require_master(principal)
        fields = validate_end_user_fields(json_body(request))
        record = await self._store.new_end_user(fields, fields.pop("team_id", None))
        return record.to_api()

    @app.route("/end_user/info", methods=["GET"])
    @json_route
    async def end_user_info(self, request, principal):
        """
        Describe an end user (of team C{team_id}, or of the default scope).
        """
        require_master(principal)
        user_id = query_arg(request, "end_user_id")
        if not user_id:
            raise bad_request("end_user_id is required.", "end_user_id")
        record = await self._store.get_end_user(user_id, team_arg(query_arg(request, "team_id")))
        if record is None:
            raise not_found("End user")
        return record.to_api()

    @app.route("/end_user/update", methods=["POST"])
    @json_route
    async def end_user_update(self, request, principal):
        """
        Change some fields of an end user.
        """
        require_master(principal)
        fields = validate_end_user_fields(json_body(request))
        team_id = fields.pop("team_id", None)
        record = await self._store.update_end_user(fields.pop("user_id"), fields, team_id)
        return record.to_api()

    @app.route("/end_user/block", methods=["POST"])
    @json_route
    async def end_user_block(self, request, principal):
        """
        Block end users (creating unknown ones blocked).
        """
        require_master(principal)
        user_ids, team_id = _user_ids(json_body(request))
        for user_id in user_ids:
            await self._store.block_end_user(user_id, team_id)
        return {"blocked_users": user_ids}

    @app.route("/end_user/unblock", methods=["POST"])
    @json_route
    async def end_user_unblock(self, request, principal):
        """
        Unblock end users (404 if one is unknown).
        """
        require_master(principal)
        user_ids, team_id = _user_ids(json_body(request))
        for user_id in user_ids:
            await self._store.unblock_end_user(user_id, team_id)
        return {"unblocked_users": user_ids}

    @app.route("/end_user/delete", methods=["POST"])
    @json_route
    async def end_user_delete(self, request, principal):
        """
        Delete end users (404 if none existed).
        """
        require_master(principal)
        user_ids, team_id = _user_ids(json_body(request))
        deleted = [u for u in user_ids if await self._store.delete_end_user(u, team_id)]
        if not deleted:
            raise not_found("End user")
        return {"deleted_end_users": deleted}

    # -- everything else under /key/ and /end_user/ --

    @app.handle_errors(NotFound)
    def _not_found(self, request, failure):
        """
        Unknown paths get a JSON 404.
        """
        return not_found_answer(request, failure)

    @app.handle_errors(MethodNotAllowed)
    def _method_not_allowed(self, request, failure):
        """
        A known path with the wrong method gets a JSON 405.
        """
        return method_not_allowed_answer(request, failure)
