"""
Calls in flight per deployment, shared by every worker and every proxy
process using the same Redis, without a Redis round trip per call.

Once per C{router_settings.metrics_interval}, L{SharedInFlight} runs one
script that writes this process's in-flight counts (a hash of its own,
expiring after L{STALE_INTERVALS} intervals: a process that dies leaks
nothing for longer) and reads every other live process's.  The router adds
the others' counts to its own when no fresh C{/metrics} sample says what a
replica holds (a fresh sample already counts every process's calls).

Redis keys (under the configured prefix): C{routing:procs}, a sorted set of
process ids by last write; C{routing:inflight:<id>}, one hash per process,
deployment id to calls in flight.
"""

import os
from typing import Callable, Dict, Optional

from twisted.internet.defer import Deferred
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from dheera_tx.routing.signals import STALE_INTERVALS

log = Logger()

# KEYS: 1 process set, 2 this process's hash
# ARGV: 1 now (s), 2 seconds after which a process is gone, 3 this process's
#       id, 4 hash key prefix, then deployment id, count pairs
# Returns the other live processes' deployment, count pairs, flattened.
SYNC_SCRIPT = r"""
local now, ttl = tonumber(ARGV[1]), tonumber(ARGV[2])
redis.call('DEL', KEYS[2])
if #ARGV > 4 then
  redis.call('HSET', KEYS[2], unpack(ARGV, 5))
  redis.call('EXPIRE', KEYS[2], math.ceil(ttl))
end
redis.call('ZADD', KEYS[1], now, ARGV[3])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - ttl)
redis.call('EXPIRE', KEYS[1], math.ceil(ttl))
local out = {}
for _, id in ipairs(redis.call('ZRANGE', KEYS[1], 0, -1)) do
  if id ~= ARGV[3] then
    local fields = redis.call('HGETALL', ARGV[4] .. id)
    for i = 1, #fields do out[#out + 1] = fields[i] end
  end
end
return out
"""


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

    def __init__(self, redis, prefix: str, interval: float, local: Callable[[], Dict[str, int]], now, clock):
        self._redis = redis
        self._procs = f"{prefix}routing:procs"
        self._hash_prefix = f"{prefix}routing:inflight:"
        self.process_id = os.urandom(8).hex()
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
        keys = (self._procs, self._hash_prefix + self.process_id)
        args = [repr(self._now()), repr(STALE_INTERVALS * self._interval), self.process_id, self._hash_prefix] + pairs
        try:
            reply = await self._redis.eval(SYNC_SCRIPT, keys, args)
        except Exception as e:
            log.debug("In-flight sync failed: {why}", why=type(e).__name__)
            return
        others: Dict[str, int] = {}
        for i in range(0, len(reply) - 1, 2):
            name = reply[i].decode("utf-8", "replace") if isinstance(reply[i], bytes) else str(reply[i])
            try:
                others[name] = others.get(name, 0) + int(reply[i + 1])
            except (TypeError, ValueError):
                continue
        self._others = others
        self._synced_at = self._clock.seconds()

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
