"""
L{MemoryKeyStore}: the key store's interface (L{IKeyStore}) kept in dicts,
for unit tests, beside the Redis one in L{dheera_tx.keys.store}.
"""

import time
from typing import Callable

import attr
from zope.interface import implementer

from dheera_tx.errors import bad_request
from dheera_tx.keys.fields import end_user_changes, key_changes
from dheera_tx.keys.records import EndUserRecord, KeyRecord, generate_key, hash_key
from dheera_tx.keys.store import IKeyStore, alias_taken, check_page, not_found


@implementer(IKeyStore)
class MemoryKeyStore:
    """
    L{IKeyStore} in a dict, for unit tests.

    :param now: a clock returning epoch seconds.
    """

    invalidation_channel = None

    def __init__(self, now: Callable[[], float] = time.time):
        self._now = now
        self._keys = {}
        self._aliases = {}
        self._end_users = {}

    async def create_key(self, fields):
        alias = fields.get("key_alias")
        if alias is not None and alias in self._aliases:
            raise alias_taken(alias)
        key = generate_key()
        now = self._now()
        record = KeyRecord(token=hash_key(key), created_at=now, **key_changes(fields, now))
        self._keys[record.token] = record
        if alias is not None:
            self._aliases[alias] = record.token
        return key, record

    async def get_key(self, token):
        return self._keys.get(token)

    async def update_key(self, token, fields):
        record = self._keys.get(token)
        if record is None:
            raise not_found("Key")
        changes = key_changes(fields, self._now())
        alias = changes.get("key_alias", record.key_alias)
        if alias != record.key_alias:
            if alias is not None and self._aliases.get(alias, token) != token:
                raise alias_taken(alias)
            self._aliases.pop(record.key_alias, None)
            if alias is not None:
                self._aliases[alias] = token
        record = self._keys[token] = attr.evolve(record, **changes)
        return record

    async def delete_keys(self, tokens):
        deleted = []
        for token in tokens:
            record = self._keys.pop(token, None)
            if record is not None:
                self._aliases.pop(record.key_alias, None)
                deleted.append(token)
        return deleted

    async def delete_keys_by_alias(self, aliases):
        return await self.delete_keys([self._aliases[a] for a in aliases if a in self._aliases])

    async def list_keys(self, page=1, size=10, user_id=None, team_id=None, key_alias=None):
        check_page(page, size)
        records = sorted(self._keys.values(), key=lambda r: r.created_at, reverse=True)
        records = [
            r
            for r in records
            if (user_id is None or r.user_id == user_id)
            and (team_id is None or r.team_id == team_id)
            and (key_alias is None or r.key_alias == key_alias)
        ]
        return records[(page - 1) * size : page * size], len(records)

    async def regenerate_key(self, token):
        record = self._keys.pop(token, None)
        if record is None:
            raise not_found("Key")
        key = generate_key()
        record = attr.evolve(record, token=hash_key(key))
        self._keys[record.token] = record
        if record.key_alias is not None:
            self._aliases[record.key_alias] = record.token
        return key, record

    async def block_key(self, token):
        return await self.update_key(token, {"blocked": True})

    async def unblock_key(self, token):
        return await self.update_key(token, {"blocked": False})

    async def new_end_user(self, fields, team_id=None):
        user_id = fields["user_id"]
        old = self._end_users.get((team_id, user_id))
        if old is not None and old.created_at is not None:
            raise bad_request(f"End user {user_id!r} already exists.", "user_id")
        now = self._now()
        record = EndUserRecord(
            user_id=user_id,
            team_id=team_id,
            created_at=now,
            spend_nanos=old.spend_nanos if old else 0,
            **end_user_changes(fields, now),
        )
        self._end_users[(team_id, user_id)] = record
        return record

    async def get_end_user(self, user_id, team_id=None):
        return self._end_users.get((team_id, user_id))

    async def update_end_user(self, user_id, fields, team_id=None, create=False):
        record = self._end_users.get((team_id, user_id))
        if record is None:
            if not create:
                raise not_found("End user")
            record = EndUserRecord(user_id=user_id, team_id=team_id, created_at=self._now())
        changes = end_user_changes(fields, self._now())
        if record.created_at is None:
            changes["created_at"] = self._now()
        record = self._end_users[(team_id, user_id)] = attr.evolve(record, **changes)
        return record

    async def block_end_user(self, user_id, team_id=None):
        return await self.update_end_user(user_id, {"blocked": True}, team_id, create=True)

    async def unblock_end_user(self, user_id, team_id=None):
        return await self.update_end_user(user_id, {"blocked": False}, team_id)

    async def delete_end_user(self, user_id, team_id=None):
        return self._end_users.pop((team_id, user_id), None) is not None

# -- Redis -------------------------------------------------------------------

# KEYS: key hash, keys zset.  ARGV: prefix, channel, token, created_at,
# alias ('' for none), field, value, ...
