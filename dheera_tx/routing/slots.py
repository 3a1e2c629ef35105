"""
A deployment's C{max_parallel_requests} held across every worker and proxy
sharing one Redis: a call takes a slot in Redis, atomically, before it is
sent, and gives it back when it ends.

L{SlotClaimer.claim} runs one Lua script: it counts the slots held by live
processes, refuses when they reach the cap, and otherwise takes one for
this process.  Only deployments with a cap pay for it (one Redis round trip
per call); a process's slots are plain counts (C{HINCRBY}), so giving one
back (L{SlotClaimer.release}) is one command, sent before the gateway queue
looks for a call to take its place (a claim waits for the releases this
process has in flight: Redis sees them in that order).

A process is live while its heartbeat (every C{metrics_interval}) is less
than L{DEAD_AFTER} intervals old.  The script counts only the slots of live
processes and deletes a dead one's: a worker killed while it holds slots
holds them at most that long.  (The cap thus trusts a process that stalls
for longer than that to hold nothing: it may be exceeded until that
process's calls end.)

Fairness across processes: each process also publishes, per model, the
rank (priority, then the time it was queued) of the best call it has
waiting.  A claim made for a call ranked behind another live process's best
waiting call is refused (that process takes the slot on its next attempt:
on a call's end, on a sample, or on its poll timer), so one process's queue
cannot starve another's.  A published rank is refreshed by every claim and
every heartbeat and ignored once it is older than L{DEAD_AFTER} intervals.

When Redis cannot be reached, claims are decided by this process alone
(the queue only claims where this process sees room: its own calls against
the cap), and a warning is logged once; the heartbeat keeps trying and,
when Redis answers again, writes this process's true counts back (a
release lost in the outage would otherwise hold a slot) and logs that the
cap is shared again.  Calls never wait on an unreachable Redis for longer
than the client's bound (1 s), and only the first claim of an outage does.

Redis keys (under the configured prefix): C{routing:claimers}, a sorted set
of process ids by last heartbeat; C{routing:slots:<deployment id>}, a hash
of process id to slots held; C{routing:waiting:<model_name>}, a hash of
process id to its best waiting call's C{"<priority> <queued at> <written
at>"} (epoch seconds).
"""

from typing import Callable, Dict, Optional, Set, Tuple

from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from dheera_tx.config import Deployment

log = Logger()

#: Heartbeats a process may miss before its slots stop counting.
DEAD_AFTER = 5

#: A queued call's place across processes: C{(priority, queued at)}.
Rank = Tuple[int, float]

_RANKS_LUA = r"""
local function live(id, now, dead)
  local seen = redis.call('ZSCORE', KEYS[1], id)
  return seen and tonumber(seen) >= now - dead
end
local function rank(value)
  local p, t, w = string.match(value, '^(%S+) (%S+) (%S+)$')
  return tonumber(p), tonumber(t), tonumber(w)
end
"""

# KEYS: 1 live processes, 2 the deployment's slots, 3 the model's waiting
#       calls
# ARGV: 1 now (s), 2 seconds after which a silent process is dead, 3 this
#       process's id, 4 the cap, 5 seconds the slots hash is kept, 6 the
#       claiming call's "<priority> <queued at>", 7 this process's best
#       waiting call after a grant ("" for none)
# Returns {1} when a slot was taken, {0, held} when the cap is reached,
# {0, -1} when a better call waits in another process.
CLAIM_SCRIPT = _RANKS_LUA + r"""
local now, dead, me = tonumber(ARGV[1]), tonumber(ARGV[2]), ARGV[3]
redis.call('ZADD', KEYS[1], now, me)
redis.call('EXPIRE', KEYS[1], math.ceil(tonumber(ARGV[5])))
local held = 0
local slots = redis.call('HGETALL', KEYS[2])
for i = 1, #slots, 2 do
  if slots[i] == me or live(slots[i], now, dead) then
    held = held + tonumber(slots[i + 1])
  else
    redis.call('HDEL', KEYS[2], slots[i])
  end
end
local p, t = string.match(ARGV[6], '^(%S+) (%S+)$')
p, t = tonumber(p), tonumber(t)
local better = false
local heads = redis.call('HGETALL', KEYS[3])
for i = 1, #heads, 2 do
  if heads[i] ~= me then
    local hp, ht, written = rank(heads[i + 1])
    if not hp or written < now - dead or not live(heads[i], now, dead) then
      redis.call('HDEL', KEYS[3], heads[i])
    elseif hp < p or (hp == p and ht < t) then
      better = true
    end
  end
end
if better or held >= tonumber(ARGV[4]) then
  redis.call('HSET', KEYS[3], me, ARGV[6] .. ' ' .. ARGV[1])
  redis.call('EXPIRE', KEYS[3], math.ceil(tonumber(ARGV[5])))
  if better then return {0, -1} end
  return {0, held}
end
redis.call('HINCRBY', KEYS[2], me, 1)
redis.call('EXPIRE', KEYS[2], math.ceil(tonumber(ARGV[5])))
if ARGV[7] ~= '' then
  redis.call('HSET', KEYS[3], me, ARGV[7] .. ' ' .. ARGV[1])
  redis.call('EXPIRE', KEYS[3], math.ceil(tonumber(ARGV[5])))
else
  redis.call('HDEL', KEYS[3], me)
end
return {1}
"""

# KEYS: 1 the deployment's slots.  ARGV: 1 this process's id.
RELEASE_SCRIPT = r"""
if redis.call('HINCRBY', KEYS[1], ARGV[1], -1) <= 0 then redis.call('HDEL', KEYS[1], ARGV[1]) end
return 1
"""

# KEYS: 1 live processes.
# ARGV: 1 now, 2 seconds after which a silent process is dead, 3 this
#       process's id, 4 seconds hashes are kept, 5 key prefix of slots
#       hashes, 6 of waiting hashes, 7 number of slot counts to write
#       (pairs: deployment id, count; 0 writes none), then pairs of model
#       name, rank ("" for none) to write
# Returns 1.
HEARTBEAT_SCRIPT = r"""
local now, dead, me, keep = tonumber(ARGV[1]), tonumber(ARGV[2]), ARGV[3], math.ceil(tonumber(ARGV[4]))
redis.call('ZADD', KEYS[1], now, me)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - dead)
redis.call('EXPIRE', KEYS[1], keep)
local n = tonumber(ARGV[7])
for i = 8, 7 + 2 * n, 2 do
  local key = ARGV[5] .. ARGV[i]
  if tonumber(ARGV[i + 1]) > 0 then
    redis.call('HSET', key, me, ARGV[i + 1])
    redis.call('EXPIRE', key, keep)
  else
    redis.call('HDEL', key, me)
  end
end
for i = 8 + 2 * n, #ARGV, 2 do
  local key = ARGV[6] .. ARGV[i]
  if ARGV[i + 1] ~= '' then
    redis.call('HSET', key, me, ARGV[i + 1] .. ' ' .. ARGV[1])
    redis.call('EXPIRE', key, keep)
  else
    redis.call('HDEL', key, me)
  end
end
return 1
"""


def rank_text(rank: Rank) -> str:
    """
    :return: a rank as the scripts read it.
    """
    return "%d %r" % (rank[0], rank[1])


class SlotClaimer:
    """
    Takes and gives back slots of capped deployments in Redis
    (see the module docstring).

    :param redis: a L{dheera_tx.redis.client.RedisClient}.
    :param prefix: the Redis key prefix.
    :param process_id: this process's id (the one it shares in-flight
        counts under, L{dheera_tx.routing.shared_load}).
    :param interval: seconds between heartbeats (C{metrics_interval}).
    :param keep: seconds Redis keeps a slots hash after its last claim:
        longer than any call may last (a leftover of processes that all
        died goes away then).
    :param now: epoch seconds (shared by every process).
    :param clock: the reactor (timers).
    """

    def __init__(self, redis, prefix: str, process_id: str, interval: float, keep: float,
                 now: Callable[[], float], clock):
        self._redis = redis
        self.process_id = process_id
        self._claimers = f"{prefix}routing:claimers"
        self._slots_prefix = f"{prefix}routing:slots:"
        self._waiting_prefix = f"{prefix}routing:waiting:"
        self._interval = interval
        self._dead = DEAD_AFTER * interval
        self._keep = keep
        self._now = now
        self._clock = clock
        #: Slots this process holds, by deployment id.
        self.held: Dict[str, int] = {}
        #: The rank of this process's best waiting call, by model name, as
        #: last written (or to be written).
        self._heads: Dict[str, Optional[Rank]] = {}
        self._heads_dirty: Set[str] = set()
        self._flush_call = None
        self._releasing: Set[Deferred] = set()
        self._pending = 0
        #: Whether Redis is being done without (claims decided here).
        self.down = False
        # Redis may hold counts that are not this process's (a release lost,
        # a claim that timed out here but ran there): written back on the
        # next heartbeat.
        self._dirty = False
        self._loop: Optional[LoopingCall] = None

    @staticmethod
    def claims(deployment: Deployment) -> bool:
        """
        :return: whether calls to C{deployment} need a slot (it has a cap).
        """
        return deployment.max_parallel_requests is not None

    def claim(self, deployment: Deployment, model: Optional[str], rank: Rank, next_rank: Optional[Rank]) -> Deferred:
        """
        Take a slot of C{deployment} for a call of C{model} ranked C{rank}.

        :param next_rank: the rank of this process's best call still
            waiting for the model once this one has gone (L{None}: none).
        :return: a Deferred firing with whether the slot was taken; it
            never fails (an unreachable Redis grants it: see the module
            docstring).
        """
        if self.down:
            self._took(deployment)
            return succeed(True)
        model_key = model or ""
        self._heads[model_key] = next_rank
        self._heads_dirty.discard(model_key)
        return Deferred.fromCoroutine(self._claim(deployment, model_key, rank, next_rank))

    async def _claim(self, deployment: Deployment, model: str, rank: Rank, next_rank: Optional[Rank]) -> bool:
        self._pending += 1
        try:
            if self._releasing:
                # Redis must see this process's slots given back first.
                await self.released()
            if self.down:
                self._took(deployment)
                return True
            keys = (self._claimers, self._slots_prefix + deployment.id, self._waiting_prefix + model)
            args = (repr(self._now()), repr(self._dead), self.process_id, str(deployment.max_parallel_requests),
                    repr(self._keep), rank_text(rank), rank_text(next_rank) if next_rank is not None else "")
            try:
                reply = await self._redis.eval(CLAIM_SCRIPT, keys, args)
            except Exception as e:
                self._went_down(e)
                self._took(deployment)
                return True
            if int(reply[0]) == 1:
                self._took(deployment)
                return True
            # Refused: this call still waits, and is published as waiting.
            self._heads[model] = rank
            return False
        finally:
            self._pending -= 1

    def _took(self, deployment: Deployment) -> None:
        self.held[deployment.id] = self.held.get(deployment.id, 0) + 1

    def release(self, deployment: Deployment) -> None:
        """
        Give back a slot taken by L{claim}.
        """
        count = self.held.get(deployment.id, 0) - 1
        if count > 0:
            self.held[deployment.id] = count
        else:
            self.held.pop(deployment.id, None)
        if self.down:
            self._dirty = True
            return
        d = Deferred.fromCoroutine(self._release(deployment))
        if not d.called:
            self._releasing.add(d)
            d.addBoth(lambda _: self._releasing.discard(d))

    def released(self) -> Deferred:
        """
        :return: a Deferred that fires when the slots given back so far have
            reached Redis (or failed to).
        """
        return DeferredList(list(self._releasing))

    async def _release(self, deployment: Deployment) -> None:
        self._pending += 1
        try:
            await self._redis.eval(RELEASE_SCRIPT, (self._slots_prefix + deployment.id,), (self.process_id,))
        except Exception as e:
            self._went_down(e)
        finally:
            self._pending -= 1

    def set_head(self, model: Optional[str], rank: Optional[Rank]) -> None:
        """
        Publish the rank of this process's best call waiting for C{model}
        (L{None}: none waits), in the next reactor turn.
        """
        model_key = model or ""
        if self._heads.get(model_key) == rank:
            return
        self._heads[model_key] = rank
        self._heads_dirty.add(model_key)
        if self._flush_call is None and not self.down:
            self._flush_call = self._clock.callLater(0, self._flush_heads)

    def _flush_heads(self) -> None:
        self._flush_call = None
        if self._heads_dirty:
            Deferred.fromCoroutine(self.heartbeat(beat=False))

    def _went_down(self, why: Exception) -> None:
        self._dirty = True
        if not self.down:
            self.down = True
            log.warn(
                "Redis unreachable ({why}): max_parallel_requests is judged by this process alone until it returns",
                why=type(why).__name__,
            )

    async def heartbeat(self, beat: bool = True) -> None:
        """
        Say this process is live; write the waiting ranks that changed and,
        after an outage (when no claim or release is on its way), this
        process's true slot counts.
        """
        models = sorted(self._heads_dirty) if not self.down else sorted(self._heads)
        rewrite = self._dirty and self._pending == 0
        counts = []
        if rewrite:
            for deployment_id in sorted(set(self.held) | set(self._known_deployments)):
                counts += [deployment_id, str(self.held.get(deployment_id, 0))]
        ranks = []
        for model in models:
            rank = self._heads.get(model)
            ranks += [model, rank_text(rank) if rank is not None else ""]
        args = [repr(self._now()), repr(self._dead), self.process_id, repr(self._keep), self._slots_prefix,
                self._waiting_prefix, str(len(counts) // 2)] + counts + ranks
        self._heads_dirty.difference_update(models)
        try:
            await self._redis.eval(HEARTBEAT_SCRIPT, (self._claimers,), args)
        except Exception as e:
            self._heads_dirty.update(models)
            if beat:
                self._went_down(e)
            return
        if rewrite:
            self._dirty = False
        if self.down and not self._dirty:
            self.down = False
            log.info("Redis answers again: max_parallel_requests is held across processes again")
        elif self.down:
            # Back, but counts still to be written (a claim or release was
            # on its way): the next heartbeat does it.
            pass

    #: Deployment ids whose counts a rewrite sets (0 for those held none).
    _known_deployments: Tuple[str, ...] = ()

    def know(self, deployments) -> None:
        """
        :param deployments: the capped deployments: a rewrite after an
            outage clears this process's count of those it holds none of.
        """
        self._known_deployments = tuple(d.id for d in deployments if self.claims(d))

    def start(self) -> None:
        """
        Heartbeat now and every interval.
        """
        self._loop = LoopingCall(lambda: Deferred.fromCoroutine(self.heartbeat()))
        self._loop.clock = self._clock
        self._loop.start(self._interval, now=True).addErrback(lambda f: log.failure("Slot heartbeat stopped", f))

    async def stop(self) -> None:
        """
        Stop the heartbeat and take this process out of Redis: its slots
        (none once calls have drained), its waiting ranks, its liveness.
        """
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        if self._flush_call is not None and self._flush_call.active():
            self._flush_call.cancel()
        self._flush_call = None
        await self.released()
        commands = [("ZREM", self._claimers, self.process_id)]
        for deployment_id in set(self.held) | set(self._known_deployments):
            commands.append(("HDEL", self._slots_prefix + deployment_id, self.process_id))
        for model in self._heads:
            commands.append(("HDEL", self._waiting_prefix + model, self.process_id))
        try:
            await self._redis.pipeline(commands)
        except Exception:
            pass
