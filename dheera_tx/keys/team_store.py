"""
Where team records live: a hash per team in Redis, beside the keys.

A team is, first of all, the C{team_id} its keys name: spend is counted
per team and end users are scoped to it whether or not the team has a
record.  A record adds what the team's keys inherit (the gateway queue's
C{priority} and C{weight}), an alias and metadata::

    <prefix>team:<team>   hash  one team (fields: see L{TeamRecord}); C{%}
                                and C{:} of the id written C{%25} and C{%3A}
    <prefix>teams         zset  every team id, scored by created_at

Every mutation is one Lua script that also publishes the team's hash name
without the prefix (C{team:<team>}) on C{<prefix>invalidate}, creation
included (a cached key naming a team that had no record must learn of
it).  L{dheera_tx.keys.cache.CachedKeyStore} drops the cached records of
the team's keys on that message, in every process, so a team change
reaches calls as fast as a key change does.  The keys read their team in
the same script as themselves (L{dheera_tx.keys.store.RedisKeyStore.get_key}).
"""

import time
import uuid
from typing import Callable, List, Optional

from dheera_tx.accounting.end_users import team_name
from dheera_tx.errors import bad_request
from dheera_tx.keys.fields import team_changes
from dheera_tx.keys.records import TeamRecord, redis_fields
from dheera_tx.keys.store import APPLY_FIELDS, flat_pairs, hash_pairs, not_found

_CHUNK = 500

# KEYS: team hash, teams zset.  ARGV: channel, message, mode (new|update),
# team id, created_at, n, n field names to delete, field, value, ...
_WRITE_TEAM = """
local mode = ARGV[3]
local exists = redis.call('EXISTS', KEYS[1]) == 1
if mode == 'new' and exists then return {'exists'} end
if mode == 'update' and not exists then return {'not_found'} end
if mode == 'new' then redis.call('ZADD', KEYS[2], ARGV[5], ARGV[4]) end
local at, channel, message = 6, ARGV[1], ARGV[2]
""" + APPLY_FIELDS

# KEYS: team hash, teams zset.  ARGV: channel, message, team id.
_DELETE_TEAM = """
local n = redis.call('DEL', KEYS[1])
redis.call('ZREM', KEYS[2], ARGV[3])
redis.call('PUBLISH', ARGV[1], ARGV[2])
return n
"""


class RedisTeamStore:
    """
    Team records in Redis.

    :param redis_client: a L{dheera_tx.redis.client.RedisClient}.
    :param prefix: the name prefix, e.g. C{"dheera:"}.
    :param now: a clock returning epoch seconds.
    """

    def __init__(self, redis_client, prefix: str = "dheera:", now: Callable[[], float] = time.time):
        self._redis = redis_client
        self.prefix = prefix
        self._now = now
        self.invalidation_channel = prefix + "invalidate"
        self._zset = prefix + "teams"

    def team_name(self, team_id: str) -> str:
        """
        :return: the name of the Redis hash of team C{team_id}.
        """
        return self.prefix + team_name(team_id)

    async def _write(self, team_id: str, mode: str, to_set: dict, to_delete=()) -> TeamRecord:
        now = self._now()
        reply = await self._redis.eval(
            _WRITE_TEAM,
            [self.team_name(team_id), self._zset],
            [self.invalidation_channel, team_name(team_id), mode, team_id, repr(now), len(to_delete), *to_delete,
             *flat_pairs(to_set)],
        )
        if reply[0] == "exists":
            raise bad_request(f"Team {team_id!r} already exists.", "team_id")
        if reply[0] == "not_found":
            raise not_found("Team")
        return TeamRecord.from_redis_hash(team_id, hash_pairs(reply[1:]))

    async def new_team(self, fields: dict) -> TeamRecord:
        """
        Make a team.

        :param fields: from L{dheera_tx.keys.fields.validate_team_fields};
            without C{team_id}, a new UUID is its id.
        :return: the new team; 400 if the id is taken.
        """
        team_id = fields.get("team_id") or str(uuid.uuid4())
        record = TeamRecord(team_id=team_id, created_at=self._now(), **team_changes(fields))
        return await self._write(team_id, "new", record.to_redis_hash())

    async def update_team(self, team_id: str, fields: dict) -> TeamRecord:
        """
        Change some fields of a team (C{null} clears one).

        :return: the updated team; 404 if it has no record.
        """
        to_set, to_delete = redis_fields(TeamRecord, team_changes(fields))
        return await self._write(team_id, "update", to_set, to_delete)

    async def get_team(self, team_id: str) -> Optional[TeamRecord]:
        """
        :return: the team's record, or L{None}.
        """
        mapping = hash_pairs(await self._redis.execute("HGETALL", self.team_name(team_id)))
        return TeamRecord.from_redis_hash(team_id, mapping) if mapping else None

    async def list_teams(self) -> List[TeamRecord]:
        """
        :return: every team with a record, oldest first.
        """
        team_ids = await self._redis.execute("ZRANGE", self._zset, 0, -1)
        records = []
        for i in range(0, len(team_ids), _CHUNK):
            chunk = team_ids[i : i + _CHUNK]
            replies = await self._redis.pipeline([("HGETALL", self.team_name(t)) for t in chunk])
            records += [TeamRecord.from_redis_hash(t, hash_pairs(r)) for t, r in zip(chunk, replies) if r]
        return records

    async def delete_teams(self, team_ids) -> List[str]:
        """
        Delete team records (the keys naming a team keep working, with
        nothing to inherit).

        :return: the ids of the teams that had a record.
        """
        deleted = []
        for team_id in dict.fromkeys(team_ids):
            n = await self._redis.eval(
                _DELETE_TEAM, [self.team_name(team_id), self._zset], [self.invalidation_channel, team_name(team_id), team_id]
            )
            if n == 1:
                deleted.append(team_id)
        return deleted

