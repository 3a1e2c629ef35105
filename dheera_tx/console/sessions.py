"""
Console sessions: a key presented once at sign-in becomes an opaque session
kept in Redis.

The browser holds only the session id, in an C{HttpOnly}, C{SameSite=Strict}
cookie (C{Secure} on TLS).  Redis holds, under the SHA-256 of that id (so a
Redis dump cannot be replayed as cookies), who signed in (the master key, or
a virtual key by its token), the session's CSRF token and its expiry; the
hash expires with the session.  A virtual key's sessions are listed under its
token so that blocking, regenerating or deleting the key ends them
(L{ConsoleSessions.revoke_key}); they are also checked against the key
record on every request, which catches a key changed by another proxy.

Sign-in attempts are counted per client address in one-minute windows
(L{ConsoleSessions.attempt}).
"""

import hashlib
import hmac
import secrets
import time
from typing import Callable, Optional

import attr

#: Seconds a session lives (refreshed by nothing: sign in again).
SESSION_SECONDS = 8 * 3600
#: Sign-in attempts allowed per client address per minute.
ATTEMPTS_PER_MINUTE = 10


@attr.s(frozen=True, slots=True, auto_attribs=True)
class Session:
    """
    A signed-in operator or tenant.

    :ivar id_hash: SHA-256 of the session id (its Redis name).
    :ivar is_master: signed in with the master key.
    :ivar token: the virtual key's token, or L{None} for the master key.
    :ivar csrf: the token every state-changing form must carry.
    :ivar expires: epoch seconds.
    """

    id_hash: str
    is_master: bool
    token: Optional[str]
    csrf: str
    expires: float


def _digest(value: str) -> str:
    return hashlib.sha256(value.encode("utf-8")).hexdigest()


class ConsoleSessions:
    """
    Sessions and sign-in counters in Redis.

    :param redis: a L{dheera_tx.redis.client.RedisClient}.
    :param prefix: the Redis key prefix.
    :param master_key: the configured master key: a master session is valid
        only while it is unchanged.
    """

    def __init__(self, redis, prefix: str, master_key: Optional[str], now: Callable[[], float] = time.time):
        self._redis = redis
        self._prefix = prefix
        self._master_mark = _digest(master_key)[:32] if master_key else None
        self._now = now

    def _name(self, id_hash: str) -> str:
        return f"{self._prefix}console:session:{id_hash}"

    def _index(self, token: str) -> str:
        return f"{self._prefix}console:key_sessions:{token}"

    async def create(self, is_master: bool, token: Optional[str]) -> "tuple[str, Session]":
        """
        :return: C{(session id for the cookie, session)}.
        """
        session_id = secrets.token_urlsafe(32)
        id_hash = _digest(session_id)
        expires = self._now() + SESSION_SECONDS
        session = Session(id_hash, is_master, token, secrets.token_urlsafe(32), expires)
        fields = ["kind", "master" if is_master else "key", "csrf", session.csrf, "expires", repr(expires)]
        if is_master:
            fields += ["master_mark", self._master_mark or ""]
        else:
            fields += ["token", token]
        commands = [("HSET", self._name(id_hash), *fields), ("EXPIRE", self._name(id_hash), SESSION_SECONDS)]
        if token is not None:
            commands += [("SADD", self._index(token), id_hash), ("EXPIRE", self._index(token), SESSION_SECONDS)]
        await self._redis.pipeline(commands)
        return session_id, session

    async def get(self, session_id: Optional[str]) -> Optional[Session]:
        """
        :return: the live session for a cookie value, or L{None}.
        """
        if not session_id or len(session_id) > 100:
            return None
        id_hash = _digest(session_id)
        fields = await self._redis.execute("HGETALL", self._name(id_hash))
        if isinstance(fields, list):
            fields = dict(zip(fields[::2], fields[1::2]))
        if not fields:
            return None
        expires = float(fields.get("expires") or 0)
        if expires <= self._now():
            return None
        if fields.get("kind") == "master":
            if self._master_mark is None or not hmac.compare_digest(fields.get("master_mark", ""), self._master_mark):
                return None
            return Session(id_hash, True, None, fields["csrf"], expires)
        return Session(id_hash, False, fields.get("token"), fields["csrf"], expires)

    async def revoke(self, session: Session) -> None:
        """
        End one session (sign-out).
        """
        commands = [("DEL", self._name(session.id_hash))]
        if session.token is not None:
            commands.append(("SREM", self._index(session.token), session.id_hash))
        await self._redis.pipeline(commands)

    async def revoke_key(self, token: str) -> None:
        """
        End every session of the virtual key C{token} (blocked, regenerated
        or deleted).
        """
        members = await self._redis.execute("SMEMBERS", self._index(token))
        commands = [("DEL", self._name(id_hash)) for id_hash in members or ()]
        commands.append(("DEL", self._index(token)))
        await self._redis.pipeline(commands)

    async def attempt(self, address: str) -> bool:
        """
        Count a sign-in attempt from C{address}.

        :return: whether it is within the allowance.
        """
        window = int(self._now() // 60)
        name = f"{self._prefix}console:signin:{_digest(address)[:16]}:{window}"
        count, _ = await self._redis.pipeline([("INCR", name), ("EXPIRE", name, 120)])
        return int(count) <= ATTEMPTS_PER_MINUTE


class RevokingKeyStore:
    """
    The key store, with console sessions of a key ended when the key is
    blocked, regenerated or deleted (through the JSON API or the console).
    Everything else passes through.
    """

    def __init__(self, store, sessions: ConsoleSessions):
        self._store = store
        self._sessions = sessions

    def __getattr__(self, name):
        return getattr(self._store, name)

    async def block_key(self, token):
        record = await self._store.block_key(token)
        await self._sessions.revoke_key(token)
        return record

    async def regenerate_key(self, token):
        answer = await self._store.regenerate_key(token)
        await self._sessions.revoke_key(token)
        return answer

    async def delete_keys(self, tokens):
        deleted = await self._store.delete_keys(tokens)
        for token in tokens:
            await self._sessions.revoke_key(token)
        return deleted
