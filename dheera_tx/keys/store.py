"""
Where virtual keys and end users live.

L{RedisKeyStore} keeps them in Redis (SPEC section 6), every mutation a
single Lua script, so that any number of proxy processes can share one
Redis::

    <prefix>key:<sha256>       hash    one key (fields: see dheera_tx.keys.records)
    <prefix>key_alias:<alias>  string  the sha256 of the key with that alias
    <prefix>keys               zset    every key's sha256, scored by created_at
    <prefix>end_user:<id>      hash    one end user of the default scope
    <prefix>team:<team>:end_user:<id>  hash  one end user of a team
                                       (see L{dheera_tx.accounting.end_users.end_user_name})
    <prefix>team:<team>        hash    a team's record (L{dheera_tx.keys.team_store})
    <prefix>teams              zset    every team id, scored by created_at

L{RedisKeyStore.get_key} reads a key and the record of the team it names
in one script (one round trip), so that the key's cached record carries
what it inherits from its team.

Every change to an existing key, team or end user is also published on
C{<prefix>invalidate}: the key's sha256, or the team's or end user's hash
name without the prefix (a new key
needs no announcement: nothing caches unknown keys).
L{dheera_tx.keys.cache.CachedKeyStore} listens there to keep an
in-process cache of key records consistent; an operator who edits a hash
with C{redis-cli} can C{PUBLISH <prefix>invalidate <sha256>} (or C{*} for
everything) to make the change take effect at once.

Scripts compute the alias key names they touch from the prefix, which
single-instance Redis and Sentinel allow (Redis Cluster is not supported).

L{tests.memory_key_store.MemoryKeyStore} has the same interface
(L{IKeyStore}) for unit tests.
"""

import time
from typing import Callable, List

import attr
from twisted.internet import defer
from zope.interface import Attribute, Interface, implementer

from dheera_tx.accounting.end_users import end_user_name
from dheera_tx.errors import ProxyError, bad_request
from dheera_tx.keys.fields import end_user_changes, key_changes
from dheera_tx.keys.records import EndUserRecord, KeyRecord, TeamRecord, generate_key, hash_key, redis_fields

MAX_PAGE_SIZE = 100
# Far beyond any real list, and small enough that Redis's 64-bit offsets hold.
MAX_PAGE = 1_000_000_000
_SCAN_CHUNK = 500


def not_found(what: str) -> ProxyError:
    """
    :return: a 404 for a key or end user that does not exist.
    """
    return ProxyError(404, f"{what} not found.", type="not_found_error", code="404")


def alias_taken(alias: str) -> ProxyError:
    return bad_request(f"The key_alias {alias!r} is already taken.", "key_alias")


def check_page(page: int, size: int):
    if not isinstance(page, int) or not 1 <= page <= MAX_PAGE:
        raise bad_request(f"page must be from 1 to {MAX_PAGE}.", "page")
    if not isinstance(size, int) or not 1 <= size <= MAX_PAGE_SIZE:
        raise bad_request(f"size must be from 1 to {MAX_PAGE_SIZE}.", "size")


class IKeyStore(Interface):
    """
    Virtual keys and end users.  Every method returns a Deferred (or is a
    coroutine function); errors the API should answer are L{ProxyError}s
    (400 for a taken alias, 404 for a missing key or end user).  Keys are
    named by their token (SHA-256 hex).  C{fields} arguments are the output
    of L{dheera_tx.keys.fields.validate_key_fields} /
    L{dheera_tx.keys.fields.validate_end_user_fields}.
    """

    invalidation_channel = Attribute("The pub/sub channel mutations are announced on, or None.")

    def create_key(fields):
        """
        :return: C{(key, KeyRecord)}; the key is shown only this once.
        """

    def get_key(token):
        """
        :return: the L{KeyRecord}, or L{None}.
        """

    def update_key(token, fields):
        """
        :return: the updated L{KeyRecord}.
        """

    def delete_keys(tokens):
        """
        :return: the tokens that existed and were deleted.
        """

    def delete_keys_by_alias(aliases):
        """
        :return: the tokens of the keys that were deleted.
        """

    def list_keys(page=1, size=10, user_id=None, team_id=None, key_alias=None):
        """
        Keys newest first.

        :return: C{(records on this page, total matching)}.
        """

    def regenerate_key(token):
        """
        Give the key a new secret; the old one stops working.

        :return: C{(new key, KeyRecord)}.
        """

    def block_key(token):
        """
        :return: the updated L{KeyRecord}.
        """

    def unblock_key(token):
        """
        :return: the updated L{KeyRecord}.
        """

    def new_end_user(fields, team_id=None):
        """
        End users are scoped: C{team_id} names the team whose keys it is
        the end user of (L{None}: the default scope, keys without a team).
        An end user the admin API made or changed persists; one known only
        from traffic expires.

        :return: the new L{EndUserRecord}; 400 if it already exists.
        """

    def get_end_user(user_id, team_id=None):
        """
        :return: the L{EndUserRecord}, or L{None}.
        """

    def update_end_user(user_id, fields, team_id=None):
        """
        :return: the updated L{EndUserRecord}.
        """

    def block_end_user(user_id, team_id=None):
        """
        Block an end user, creating it if it is not known yet.
        """

    def unblock_end_user(user_id, team_id=None):
        """
        :return: the updated L{EndUserRecord}.
        """

    def delete_end_user(user_id, team_id=None):
        """
        :return: whether it existed.
        """


# KEYS: key hash.  ARGV: prefix.  The team's hash name is computed here (as
# dheera_tx.accounting.end_users.team_name does) so that a key and its team
# take one round trip.
_GET_KEY = """
local key = redis.call('HGETALL', KEYS[1])
local team = {}
local team_id = redis.call('HGET', KEYS[1], 'team_id')
if team_id then
  team = redis.call('HGETALL', ARGV[1] .. 'team:' .. team_id:gsub('%%', '%%25'):gsub(':', '%%3A'))
end
return {key, team}
"""

_CREATE_KEY = """
local prefix, token, alias = ARGV[1], ARGV[3], ARGV[5]
if redis.call('EXISTS', KEYS[1]) == 1 then return 'token_taken' end
if alias ~= '' then
  local owner = redis.call('GET', prefix .. 'key_alias:' .. alias)
  if owner and redis.call('EXISTS', prefix .. 'key:' .. owner) == 1 then return 'alias_taken' end
  redis.call('SET', prefix .. 'key_alias:' .. alias, token)
end
redis.call('HSET', KEYS[1], unpack(ARGV, 6))
redis.call('ZADD', KEYS[2], ARGV[4], token)
return 'ok'
"""

# The end of a script that writes one record's hash (KEYS[1]), once it
# has set the locals `at` (the ARGV index of the count of fields to delete:
# their names follow it, then field, value pairs to set), `channel` and
# `message`: deletes and sets those fields, publishes the invalidation and
# returns {'ok', the hash's fields}.  Keys, end users and teams share it.
APPLY_FIELDS = """
local ndel = tonumber(ARGV[at])
if ndel > 0 then redis.call('HDEL', KEYS[1], unpack(ARGV, at + 1, at + ndel)) end
if #ARGV > at + ndel then redis.call('HSET', KEYS[1], unpack(ARGV, at + 1 + ndel)) end
redis.call('PUBLISH', channel, message)
local result = redis.call('HGETALL', KEYS[1])
table.insert(result, 1, 'ok')
return result
"""

# KEYS: key hash.  ARGV: prefix, channel, token, alias mode (keep|set|clear),
# new alias, n, n field names to delete, field, value, ...
_UPDATE_KEY = """
if redis.call('EXISTS', KEYS[1]) == 0 or redis.call('HEXISTS', KEYS[1], 'created_at') == 0 then
  return {'not_found'}
end
local prefix, token, mode, new = ARGV[1], ARGV[3], ARGV[4], ARGV[5]
local old = redis.call('HGET', KEYS[1], 'key_alias')
if mode == 'set' and new ~= old then
  local owner = redis.call('GET', prefix .. 'key_alias:' .. new)
  if owner and owner ~= token and redis.call('EXISTS', prefix .. 'key:' .. owner) == 1 then
    return {'alias_taken'}
  end
  redis.call('SET', prefix .. 'key_alias:' .. new, token)
end
if old and ((mode == 'set' and new ~= old) or mode == 'clear') then
  if redis.call('GET', prefix .. 'key_alias:' .. old) == token then
    redis.call('DEL', prefix .. 'key_alias:' .. old)
  end
end
local at, channel, message = 6, ARGV[2], token
""" + APPLY_FIELDS

# KEYS: key hash, keys zset.  ARGV: prefix, channel, token.
_DELETE_KEY = """
local prefix, token = ARGV[1], ARGV[3]
local alias = redis.call('HGET', KEYS[1], 'key_alias')
local n = redis.call('DEL', KEYS[1])
redis.call('ZREM', KEYS[2], token)
if alias and redis.call('GET', prefix .. 'key_alias:' .. alias) == token then
  redis.call('DEL', prefix .. 'key_alias:' .. alias)
end
redis.call('PUBLISH', ARGV[2], token)
return n
"""

# KEYS: old hash, new hash, keys zset.  ARGV: prefix, channel, old, new.
_REGENERATE_KEY = """
local prefix, old, new = ARGV[1], ARGV[3], ARGV[4]
if redis.call('EXISTS', KEYS[1]) == 0 or redis.call('HEXISTS', KEYS[1], 'created_at') == 0 then
  return {'not_found'}
end
if redis.call('EXISTS', KEYS[2]) == 1 then return {'token_taken'} end
local score = redis.call('ZSCORE', KEYS[3], old) or redis.call('HGET', KEYS[1], 'created_at')
redis.call('RENAME', KEYS[1], KEYS[2])
redis.call('ZREM', KEYS[3], old)
redis.call('ZADD', KEYS[3], score, new)
local alias = redis.call('HGET', KEYS[2], 'key_alias')
if alias and redis.call('GET', prefix .. 'key_alias:' .. alias) == old then
  redis.call('SET', prefix .. 'key_alias:' .. alias, new)
end
redis.call('PUBLISH', ARGV[2], old)
local result = redis.call('HGETALL', KEYS[2])
table.insert(result, 1, 'ok')
return result
"""

# KEYS: end user hash.  ARGV: channel, message, mode (new|update|upsert),
# created_at, n, n field names to delete, field, value, ...
# An end user known only from traffic (spend, no created_at, expiring) may
# be made with /end_user/new; its spend is kept.  Whatever the admin API
# writes is an end user the operator manages: it gets a created_at and
# stops expiring (a budget set on a traffic end user must not vanish).
_WRITE_END_USER = """
local mode = ARGV[3]
local made = redis.call('HEXISTS', KEYS[1], 'created_at') == 1
if mode == 'new' and made then return {'exists'} end
if mode == 'update' and redis.call('EXISTS', KEYS[1]) == 0 then return {'not_found'} end
if not made then redis.call('HSET', KEYS[1], 'created_at', ARGV[4]) end
redis.call('PERSIST', KEYS[1])
redis.call('HINCRBY', KEYS[1], 'spend_nanos', 0)
local at, channel, message = 5, ARGV[1], ARGV[2]
""" + APPLY_FIELDS

# KEYS: end user hash.  ARGV: channel, message.
_DELETE_END_USER = """
local n = redis.call('DEL', KEYS[1])
redis.call('PUBLISH', ARGV[1], ARGV[2])
return n
"""


def hash_pairs(reply) -> dict:
    """
    :return: a C{HGETALL}-shaped reply (field, value, ...) as a dict.
    """
    return dict(zip(reply[0::2], reply[1::2]))


def flat_pairs(mapping: dict) -> list:
    """
    :return: C{mapping} as the field, value, ... arguments of C{HSET}.
    """
    out = []
    for name, value in mapping.items():
        out += [name, value]
    return out


def _is_key(mapping: dict) -> bool:
    # A hash without created_at is not a key: it is what a late spend
    # update (HINCRBY) leaves behind after a delete or regenerate.
    return bool(mapping) and "created_at" in mapping


@implementer(IKeyStore)
class RedisKeyStore:
    """
    L{IKeyStore} in Redis.

    :param redis_client: a L{dheera_tx.redis.client.RedisClient}.
    :param prefix: the name prefix, e.g. C{"dheera:"}.
    :param now: a clock returning epoch seconds.
    """

    def __init__(self, redis_client, prefix: str = "dheera:", now: Callable[[], float] = time.time):
        self._redis = redis_client
        self.prefix = prefix
        self._now = now
        self.invalidation_channel = prefix + "invalidate"
        self._zset = prefix + "keys"

    def key_name(self, token: str) -> str:
        """
        :return: the name of the Redis hash of the key with this token.
        """
        return f"{self.prefix}key:{token}"

    def end_user_name(self, user_id: str, team_id=None) -> str:
        """
        :return: the name of the Redis hash of this end user of C{team_id}
            (L{None}: the default scope).
        """
        return self.prefix + end_user_name(user_id, team_id)

    # -- keys --

    async def create_key(self, fields):
        now = self._now()
        changes = key_changes(fields, now)
        alias = changes.get("key_alias")
        while True:
            key = generate_key()
            record = KeyRecord(token=hash_key(key), created_at=now, **changes)
            status = await self._redis.eval(
                _CREATE_KEY,
                [self.key_name(record.token), self._zset],
                [self.prefix, self.invalidation_channel, record.token, repr(now), alias or "", *flat_pairs(record.to_redis_hash())],
            )
            if status == "alias_taken":
                raise alias_taken(alias)
            if status == "ok":
                return key, record
            # "token_taken": 256 bits of chance said no; draw again.

    async def get_key(self, token):
        key, team = await self._redis.eval(_GET_KEY, [self.key_name(token)], [self.prefix])
        mapping = hash_pairs(key)
        if not _is_key(mapping):
            return None
        record = KeyRecord.from_redis_hash(token, mapping)
        if team and record.team_id is not None:
            record = attr.evolve(record, team=TeamRecord.from_redis_hash(record.team_id, hash_pairs(team)))
        return record

    async def update_key(self, token, fields):
        changes = key_changes(fields, self._now())
        to_set, to_delete = redis_fields(KeyRecord, changes)
        if "key_alias" not in changes:
            mode, alias = "keep", ""
        elif changes["key_alias"] is None:
            mode, alias = "clear", ""
        else:
            mode, alias = "set", changes["key_alias"]
        reply = await self._redis.eval(
            _UPDATE_KEY,
            [self.key_name(token)],
            [self.prefix, self.invalidation_channel, token, mode, alias, len(to_delete), *to_delete, *flat_pairs(to_set)],
        )
        if reply[0] == "not_found":
            raise not_found("Key")
        if reply[0] == "alias_taken":
            raise alias_taken(alias)
        return KeyRecord.from_redis_hash(token, hash_pairs(reply[1:]))

    async def _delete(self, token) -> bool:
        n = await self._redis.eval(
            _DELETE_KEY, [self.key_name(token), self._zset], [self.prefix, self.invalidation_channel, token]
        )
        return n == 1

    async def delete_keys(self, tokens):
        tokens = list(dict.fromkeys(tokens))
        try:
            results = await defer.gatherResults(
                [defer.Deferred.fromCoroutine(self._delete(t)) for t in tokens], consumeErrors=True
            )
        except defer.FirstError as e:
            e.subFailure.raiseException()
        return [t for t, deleted in zip(tokens, results) if deleted]

    async def delete_keys_by_alias(self, aliases):
        aliases = list(dict.fromkeys(aliases))
        if not aliases:
            return []
        owners = await self._redis.pipeline([("GET", f"{self.prefix}key_alias:{a}") for a in aliases])
        return await self.delete_keys([t for t in owners if t])

    async def list_keys(self, page=1, size=10, user_id=None, team_id=None, key_alias=None):
        check_page(page, size)
        start = (page - 1) * size
        if key_alias is not None:
            token = await self._redis.execute("GET", f"{self.prefix}key_alias:{key_alias}")
            record = await self.get_key(token) if token else None
            matching = [record] if record is not None and _matches(record, user_id, team_id, key_alias) else []
            return matching[start : start + size], len(matching)
        if user_id is None and team_id is None:
            total = await self._redis.execute("ZCARD", self._zset)
            tokens = await self._redis.execute("ZREVRANGE", self._zset, start, start + size - 1)
            return await self._records(tokens), total
        matching = []
        everything = await self._redis.execute("ZREVRANGE", self._zset, 0, -1)
        for i in range(0, len(everything), _SCAN_CHUNK):
            chunk = everything[i : i + _SCAN_CHUNK]
            owners = await self._redis.pipeline(
                [("HMGET", self.key_name(t), "user_id", "team_id", "created_at") for t in chunk]
            )
            for token, (uid, tid, created) in zip(chunk, owners):
                if created is not None and (user_id is None or uid == user_id) and (team_id is None or tid == team_id):
                    matching.append(token)
        return await self._records(matching[start : start + size]), len(matching)

    async def _records(self, tokens) -> List[KeyRecord]:
        replies = await self._redis.pipeline([("HGETALL", self.key_name(t)) for t in tokens])
        records = []
        for token, reply in zip(tokens, replies):
            mapping = hash_pairs(reply)
            if _is_key(mapping):
                records.append(KeyRecord.from_redis_hash(token, mapping))
        return records

    async def regenerate_key(self, token):
        while True:
            key = generate_key()
            new = hash_key(key)
            reply = await self._redis.eval(
                _REGENERATE_KEY,
                [self.key_name(token), self.key_name(new), self._zset],
                [self.prefix, self.invalidation_channel, token, new],
            )
            if reply[0] == "not_found":
                raise not_found("Key")
            if reply[0] == "ok":
                return key, KeyRecord.from_redis_hash(new, hash_pairs(reply[1:]))

    async def block_key(self, token):
        return await self.update_key(token, {"blocked": True})

    async def unblock_key(self, token):
        return await self.update_key(token, {"blocked": False})

    # -- end users --

    async def _write_end_user(self, user_id, fields, mode, team_id) -> EndUserRecord:
        now = self._now()
        to_set, to_delete = redis_fields(EndUserRecord, end_user_changes(fields, now))
        reply = await self._redis.eval(
            _WRITE_END_USER,
            [self.end_user_name(user_id, team_id)],
            [
                self.invalidation_channel,
                end_user_name(user_id, team_id),
                mode,
                repr(now),
                len(to_delete),
                *to_delete,
                *flat_pairs(to_set),
            ],
        )
        if reply[0] == "exists":
            raise bad_request(f"End user {user_id!r} already exists.", "user_id")
        if reply[0] == "not_found":
            raise not_found("End user")
        return EndUserRecord.from_redis_hash(user_id, hash_pairs(reply[1:]), team_id)

    async def new_end_user(self, fields, team_id=None):
        return await self._write_end_user(fields["user_id"], fields, "new", team_id)

    async def get_end_user(self, user_id, team_id=None):
        mapping = hash_pairs(await self._redis.execute("HGETALL", self.end_user_name(user_id, team_id)))
        return EndUserRecord.from_redis_hash(user_id, mapping, team_id) if mapping else None

    async def update_end_user(self, user_id, fields, team_id=None):
        return await self._write_end_user(user_id, fields, "update", team_id)

    async def block_end_user(self, user_id, team_id=None):
        return await self._write_end_user(user_id, {"blocked": True}, "upsert", team_id)

    async def unblock_end_user(self, user_id, team_id=None):
        return await self._write_end_user(user_id, {"blocked": False}, "update", team_id)

    async def delete_end_user(self, user_id, team_id=None):
        n = await self._redis.eval(
            _DELETE_END_USER,
            [self.end_user_name(user_id, team_id)],
            [self.invalidation_channel, end_user_name(user_id, team_id)],
        )
        return n == 1

def _matches(record: KeyRecord, user_id, team_id, key_alias) -> bool:
    return (
        (user_id is None or record.user_id == user_id)
        and (team_id is None or record.team_id == team_id)
        and (key_alias is None or record.key_alias == key_alias)
    )
