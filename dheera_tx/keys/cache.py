"""
The in-process cache of key records, kept consistent over pub/sub.

L{CachedKeyStore} wraps an L{IKeyStore} (in the proxy, a
L{dheera_tx.keys.store.RedisKeyStore}) and caches its C{get_key} answers.
It subscribes to the store's invalidation channel and drops what each
message names: a key's token drops that key, a team's hash name
(C{team:<team>}) every cached key of that team (a cached record carries its
team's record, L{dheera_tx.keys.records.KeyRecord.team}), C{*}
everything; while the subscription is down the
cache is emptied and bypassed.  Every other method passes through to the
store; one that changes or removes a key also drops that key's entry.
"""

from typing import Any, Dict, List

from twisted.internet.defer import Deferred
from twisted.python.failure import Failure
from zope.interface import implementer

from dheera_tx.accounting.end_users import team_of_name
from dheera_tx.keys.store import IKeyStore


@implementer(IKeyStore)
class CachedKeyStore:
    """
    An L{IKeyStore} that caches L{get_key} answers in this process.

    Consistency: every mutation, by any process, is published on the
    store's invalidation channel, and this cache drops what it names (a
    team's name drops the team's keys, C{*} everything), so a revoked key
    stops working, and a team's new priority applies, everywhere within
    moments.  While the subscription is down (a Redis outage, or a
    subscriber connection that stopped answering its heartbeat) the cache is
    emptied and bypassed: a revocation published meanwhile cannot be missed.
    Entries also expire after C{ttl} seconds, which bounds how long an edit
    made behind the proxy's back (C{redis-cli HSET} without a PUBLISH) goes
    unseen.

    Unknown keys are not cached: a key must work everywhere the moment
    /key/generate answers, and a lookup of an unknown key costs one HGETALL.
    Lookups of one token that miss the cache at the same time share one
    read (a burst of calls with a fresh key makes one HGETALL, not one
    each); a lookup that starts after an invalidation does not join a read
    that started before it.

    The C{spend_nanos} of a cached record is stale; budget checks read Redis.

    :param store: the store to cache (with an C{invalidation_channel}).
    :param redis_client: a L{dheera_tx.redis.client.RedisClient} to
        subscribe with.
    :param reactor: gives the time (C{seconds()}) for C{ttl}.
    :param ttl: seconds an entry is trusted at most.
    :param max_entries: the cache's size bound (oldest entries go first).
    """

    def __init__(self, store, redis_client, reactor, ttl: float = 10.0, max_entries: int = 100_000):
        self._store = store
        self._reactor = reactor
        self._ttl = ttl
        self._max_entries = max_entries
        self._cache: Dict[str, Any] = {}
        self._generation = 0
        # token -> (generation the read started in, Deferreds of the
        # lookups waiting for it)
        self._reading: Dict[str, Any] = {}
        self.invalidation_channel = store.invalidation_channel
        self.subscription = redis_client.subscribe(self.invalidation_channel, self._invalidate, self._subscription_state)

    @property
    def trusted(self) -> bool:
        """
        Whether the cache is in use (the subscription is up).
        """
        return self.subscription.active

    def close(self):
        """
        End the subscription.

        :return: a Deferred that fires once its connection is closed.
        """
        return self.subscription.stop()

    def _forget(self, token=None):
        self._generation += 1
        if token is None:
            self._cache.clear()
        else:
            self._cache.pop(token, None)

    def _invalidate(self, message: str):
        if message == "*":
            self._forget()
            return
        team_id = team_of_name(message)
        if team_id is None:
            self._forget(message)
            return
        # Team changes are rare; a scan of the cache beats an index kept up
        # on every miss.
        self._generation += 1
        for token in [t for t, (record, _) in self._cache.items() if record.team_id == team_id]:
            del self._cache[token]

    def _subscription_state(self, active: bool):
        # Whether going down or coming back: messages may have been missed.
        self._forget()

    async def get_key(self, token):
        now = self._reactor.seconds()
        if self.trusted:
            entry = self._cache.get(token)
            if entry is not None:
                if entry[1] > now:
                    return entry[0]
                del self._cache[token]
        generation = self._generation
        reading = self._reading.get(token)
        if reading is not None and reading[0] == generation:
            waiter: Deferred = Deferred()
            reading[1].append(waiter)
            return await waiter
        waiters: List[Deferred] = []
        self._reading[token] = (generation, waiters)
        try:
            record = await self._store.get_key(token)
        except BaseException:
            failure = Failure()
            for waiter in waiters:
                waiter.errback(failure)
            raise
        finally:
            if self._reading.get(token, (None, None))[1] is waiters:
                del self._reading[token]
        for waiter in waiters:
            waiter.callback(record)
        if record is not None and self.trusted and generation == self._generation:
            if len(self._cache) >= self._max_entries:
                del self._cache[next(iter(self._cache))]
            self._cache[token] = (record, now + self._ttl)
        return record

    async def create_key(self, fields):
        return await self._store.create_key(fields)

    async def update_key(self, token, fields):
        try:
            return await self._store.update_key(token, fields)
        finally:
            self._forget(token)

    async def delete_keys(self, tokens):
        tokens = list(tokens)
        try:
            return await self._store.delete_keys(tokens)
        finally:
            for token in tokens:
                self._forget(token)

    async def delete_keys_by_alias(self, aliases):
        deleted = []
        try:
            deleted = await self._store.delete_keys_by_alias(aliases)
            return deleted
        finally:
            for token in deleted:
                self._forget(token)

    async def list_keys(self, page=1, size=10, user_id=None, team_id=None, key_alias=None):
        return await self._store.list_keys(page, size, user_id, team_id, key_alias)

    async def regenerate_key(self, token):
        try:
            return await self._store.regenerate_key(token)
        finally:
            self._forget(token)

    async def block_key(self, token):
        try:
            return await self._store.block_key(token)
        finally:
            self._forget(token)

    async def unblock_key(self, token):
        try:
            return await self._store.unblock_key(token)
        finally:
            self._forget(token)

    async def new_end_user(self, fields, team_id=None):
        return await self._store.new_end_user(fields, team_id)

    async def get_end_user(self, user_id, team_id=None):
        return await self._store.get_end_user(user_id, team_id)

    async def update_end_user(self, user_id, fields, team_id=None):
        return await self._store.update_end_user(user_id, fields, team_id)

    async def block_end_user(self, user_id, team_id=None):
        return await self._store.block_end_user(user_id, team_id)

    async def unblock_end_user(self, user_id, team_id=None):
        return await self._store.unblock_end_user(user_id, team_id)

    async def delete_end_user(self, user_id, team_id=None):
        return await self._store.delete_end_user(user_id, team_id)
