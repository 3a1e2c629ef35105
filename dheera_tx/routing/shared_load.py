"""
Calls in flight per deployment, and where affinity keys were placed, shared
by every worker and every proxy process using the same Redis, without a
Redis round trip per call.

Once per C{router_settings.metrics_interval}, L{SharedInFlight} runs one
script that writes this process's in-flight counts (a hash of its own,
expiring after L{STALE_INTERVALS} intervals: a process that dies leaks
nothing for longer) and reads every other live process's.  The router adds
the others' counts to its own when no fresh C{/metrics} sample says what a
replica holds (a fresh sample already counts every process's calls).

The same script passes on the key placements the router queued
(L{dheera_tx.routing.homes.KeyHomes.outbox}: new keys and keys that moved)
and reads the other processes' placements since the last sync.

Redis keys (under the configured prefix): C{routing:procs}, a sorted set of
process ids (C{<host>:<pid>:<random>}) by last write; C{routing:inflight:<id>}, one hash per process,
deployment id to calls in flight; C{routing:homes}, a sorted set of recent
placements (C{<key>|<deployment id>|<process id>}) by time, kept for 3 sync
periods (long enough for every live process to read them once).
"""

import os
import socket
from typing import Callable, Dict, Optional

from twisted.internet.defer import Deferred
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from dheera_tx.routing.homes import KeyHomes
from dheera_tx.routing.signals import STALE_INTERVALS

log = Logger()

# Syncs per metrics_interval: a new conversation placed by one worker must
# be known to the others before its next turn arrives (one small script
# run each time, whatever the traffic).
SYNCS_PER_INTERVAL = 5

# KEYS: 1 process set, 2 this process's hash, 3 shared placements
# ARGV: 1 now (s), 2 seconds after which a process is gone, 3 this process's
#       id, 4 hash key prefix, 5 number of in-flight items (2 per
#       deployment), 6 read placements newer than this (s), 7 seconds a
#       placement is kept, then deployment id, count pairs, then placements
#       ("<key>|<deployment id>")
# Returns {the other live processes' deployment, count pairs, flattened;
#          the other processes' placements since ARGV[6]}.
SYNC_SCRIPT = r"""
local now, ttl = tonumber(ARGV[1]), tonumber(ARGV[2])
local n = tonumber(ARGV[5])
redis.call('DEL', KEYS[2])
if n > 0 then
  redis.call('HSET', KEYS[2], unpack(ARGV, 8, 7 + n))
  redis.call('EXPIRE', KEYS[2], math.ceil(ttl))
end
redis.call('ZADD', KEYS[1], now, ARGV[3])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - ttl)
redis.call('EXPIRE', KEYS[1], math.ceil(ttl))
local counts = {}
for _, id in ipairs(redis.call('ZRANGE', KEYS[1], 0, -1)) do
  if id ~= ARGV[3] then
    local fields = redis.call('HGETALL', ARGV[4] .. id)
    for i = 1, #fields do counts[#counts + 1] = fields[i] end
  end
end
local placed = {}
for _, entry in ipairs(redis.call('ZRANGEBYSCORE', KEYS[3], '(' .. ARGV[6], '+inf')) do
  if string.sub(entry, -#ARGV[3] - 1) ~= '|' .. ARGV[3] then placed[#placed + 1] = entry end
end
for i = 8 + n, #ARGV do
  redis.call('ZADD', KEYS[3], now, ARGV[i] .. '|' .. ARGV[3])
end
redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now - tonumber(ARGV[7]))
redis.call('EXPIRE', KEYS[3], math.ceil(tonumber(ARGV[7])))
return {counts, placed}
"""


def _text(value) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


class SharedInFlight:
    """
    Shares this process's calls in flight per deployment through Redis.

    :param redis: a L{dheera_tx.redis.client.RedisClient}.
    :param prefix: the Redis key prefix.
    :param interval: seconds between syncs (C{metrics_interval}).
    :param local: returns this process's calls in flight, by deployment id.
    :param now: epoch seconds (shared by every process).
    :param clock: the reactor (timers).
    """

    def __init__(self, redis, prefix: str, interval: float, local: Callable[[], Dict[str, int]], now, clock,
                 homes: Optional[KeyHomes] = None):
        self._redis = redis
        self._homes = homes
        self._read_since = 0.0
        self._placements = f"{prefix}routing:homes"
        self._procs = f"{prefix}routing:procs"
        self._hash_prefix = f"{prefix}routing:inflight:"
        # Host and pid first: who holds what shows in redis-cli.
        self.process_id = f"{socket.gethostname()}:{os.getpid()}:{os.urandom(4).hex()}"
        self._interval = interval
        self._local = local
        self._now = now
        self._clock = clock
        self._others: Dict[str, int] = {}
        self._synced_at: Optional[float] = None
        self._loop: Optional[LoopingCall] = None

    def others(self, deployment_id: str) -> int:
        """
        :return: the calls other processes have in flight to the deployment,
            as of the last sync; 0 when that is stale.
        """
        if self._synced_at is None or self._clock.seconds() - self._synced_at > STALE_INTERVALS * self._interval:
            return 0
        return self._others.get(deployment_id, 0)

    async def sync(self) -> None:
        """
        Write this process's counts and read the others'.  A failure (Redis
        away) keeps the last counts until they are stale.
        """
        pairs = []
        for deployment_id, count in self._local().items():
            if count > 0:
                pairs += [deployment_id, str(count)]
        placed = []
        if self._homes is not None:
            placed = ["%x|%s" % (key, deployment_id) for key, deployment_id in self._homes.outbox]
            self._homes.outbox = []
        now = self._now()
        keys = (self._procs, self._hash_prefix + self.process_id, self._placements)
        args = [repr(now), repr(STALE_INTERVALS * self._interval), self.process_id, self._hash_prefix, str(len(pairs)),
                repr(self._read_since), repr(STALE_INTERVALS * self._interval)] + pairs + placed
        try:
            counts, placements = await self._redis.eval(SYNC_SCRIPT, keys, args)
        except Exception as e:
            log.debug("Routing state sync failed: {why}", why=type(e).__name__)
            return
        # Read again a little before this sync next time: clocks of other
        # machines may be behind (reading twice is harmless).
        self._read_since = now - 2 * self._interval
        others: Dict[str, int] = {}
        for i in range(0, len(counts) - 1, 2):
            name = _text(counts[i])
            try:
                others[name] = others.get(name, 0) + int(counts[i + 1])
            except (TypeError, ValueError):
                continue
        self._others = others
        self._synced_at = self._clock.seconds()
        if self._homes is not None:
            for entry in placements:
                key, _, rest = _text(entry).partition("|")
                deployment_id, _, origin = rest.rpartition("|")
                try:
                    self._homes.learn(int(key, 16), deployment_id, origin, self.process_id)
                except ValueError:
                    continue

    def start(self) -> None:
        """
        Sync now and every interval (syncs never overlap).
        """
        self._loop = LoopingCall(lambda: Deferred.fromCoroutine(self.sync()))
        self._loop.clock = self._clock
        self._loop.start(self._interval, now=True).addErrback(lambda f: log.failure("In-flight sync stopped", f))

    async def stop(self) -> None:
        """
        Stop syncing and take this process's counts out at once.
        """
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        try:
            await self._redis.execute("DEL", self._hash_prefix + self.process_id)
            await self._redis.execute("ZREM", self._procs, self.process_id)
        except Exception:
            pass
