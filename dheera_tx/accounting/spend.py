"""
The spend ledger: each finished call's cost and tokens, added atomically in
Redis to its key, user, team, end user and model, and to per-day counters
for reports.

L{SpendLedger.settle} runs one Lua script per batch of calls that ended
within a few milliseconds (which also releases each call's parallel slot and
reservations, and counts its tokens against tpm).  When Redis cannot
be reached the settlement waits in a bounded in-memory backlog and is
retried every second; what is in that backlog is lost if the process dies
(see the README's guarantees).

Redis keys (under the configured prefix): the C{spend_nanos} and
C{budget_spend_nanos} fields of C{key:<sha256>} and of the end user's hash
(L{dheera_tx.accounting.end_users.end_user_name}; one seen only in traffic expires
C{end_user_ttl_days} after its last call); hashes C{spend:user:<id>},
C{spend:team:<id>}, C{spend:model:<name>} with C{spend_nanos},
C{prompt_tokens}, C{completion_tokens}, C{requests}; and
C{spend:daily:<YYYY-MM-DD>} hashes whose fields are
C{<group>:<id>:<counter>} (group: key, user, team, end_user, model; an end
user of a team is C{team_end_user:<team>:<id>},
L{dheera_tx.accounting.end_users.end_user_report_id}).
"""

import datetime
import uuid
from collections import deque
from typing import Deque, Dict, List, Optional

import attr
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from dheera_tx.accounting.admission_scripts import RESERVATIONS_LUA
from dheera_tx.accounting.end_users import end_user_report_id, parse_end_user_report_id
from dheera_tx.accounting.limits import WINDOW_MS, Admission, CallLimiter
from dheera_tx.accounting.metering import nanos_to_usd

log = Logger()

GROUPS = ("key", "user", "team", "end_user", "model")
COUNTERS = ("spend_nanos", "prompt_tokens", "completion_tokens", "requests")

# KEYS: 1 the batch's "settled" marker, then per entry: 1 key hash,
#       2 user spend, 3 team spend, 4 end-user hash, 5 model spend, 6 tpm
#       counter, 7 parallel set, 8 daily hash, 9 the key's reservations,
#       10 the end user's reservations (a key of "" is skipped)
# ARGV: 1 marker TTL, then per entry: 1 cost nanos, 2 prompt,
#       3 completion, 4 call ids ("," between them), 5 window ms, 6..10 the
#       "<group>:<id>" of key, user, team, end user, model (daily fields),
#       11 daily TTL seconds, 12 "1" to bill, "0" to only release the
#       parallel slots and reservations, 13 the number of calls, 14 the
#       calls' reservation members ("," between them), 15 seconds an end
#       user seen only in traffic is kept
# An entry sums the calls of a batch that bill the same key, user, team,
# end user and model on the same day.
SETTLE_SCRIPT = RESERVATIONS_LUA + r"""
-- A batch retried after a lost reply was already applied: apply it once.
if not redis.call('SET', KEYS[1], '1', 'NX', 'EX', ARGV[1]) then return 0 end
local function release_slots(set, ids)
  for id in string.gmatch(ids, '[^,]+') do redis.call('ZREM', set, id) end
end
for n = 0, (#KEYS - 1) / 10 - 1 do
  local K, A = 1 + n * 10, 1 + n * 15
  local cost, prompt, completion = tonumber(ARGV[A + 1]), tonumber(ARGV[A + 2]), tonumber(ARGV[A + 3])
  local calls = tonumber(ARGV[A + 13])
  -- Reservations go back whatever the outcome: the truth replaces them.
  if ARGV[A + 14] ~= '' then
    if KEYS[K + 9] ~= '' then release(KEYS[K + 9], ARGV[A + 14]) end
    if KEYS[K + 10] ~= '' then release(KEYS[K + 10], ARGV[A + 14]) end
  end
  if ARGV[A + 12] == '0' then
    -- Only release the parallel slots of calls whose admission was lost.
    if KEYS[K + 7] ~= '' then release_slots(KEYS[K + 7], ARGV[A + 4]) end
  else
  local function add(hash)
    redis.call('HINCRBY', hash, 'spend_nanos', cost)
    redis.call('HINCRBY', hash, 'prompt_tokens', prompt)
    redis.call('HINCRBY', hash, 'completion_tokens', completion)
    redis.call('HINCRBY', hash, 'requests', calls)
  end
  if KEYS[K + 1] ~= '' and redis.call('EXISTS', KEYS[K + 1]) == 1 then
    redis.call('HINCRBY', KEYS[K + 1], 'spend_nanos', cost)
    redis.call('HINCRBY', KEYS[K + 1], 'budget_spend_nanos', cost)
  end
  if KEYS[K + 4] ~= '' then
    redis.call('HINCRBY', KEYS[K + 4], 'spend_nanos', cost)
    redis.call('HINCRBY', KEYS[K + 4], 'budget_spend_nanos', cost)
    -- Seen only in traffic (or deleted while the call ran): expiring.
    if redis.call('HEXISTS', KEYS[K + 4], 'created_at') == 0 then
      redis.call('EXPIRE', KEYS[K + 4], ARGV[A + 15])
    end
  end
  for _, i in ipairs({2, 3, 5}) do
    if KEYS[K + i] ~= '' then add(KEYS[K + i]) end
  end
  if KEYS[K + 6] ~= '' then
    local tokens = prompt + completion
    if tokens > 0 then
      local total = redis.call('INCRBY', KEYS[K + 6], tokens)
      if total == tokens or redis.call('PTTL', KEYS[K + 6]) < 0 then
        redis.call('PEXPIRE', KEYS[K + 6], ARGV[A + 5])
      end
    end
  end
  if KEYS[K + 7] ~= '' then release_slots(KEYS[K + 7], ARGV[A + 4]) end
  for g = 1, 5 do
    local base = ARGV[A + 5 + g]
    if base ~= '' then
      base = base .. ':'
      redis.call('HINCRBY', KEYS[K + 8], base .. 'spend_nanos', cost)
      redis.call('HINCRBY', KEYS[K + 8], base .. 'prompt_tokens', prompt)
      redis.call('HINCRBY', KEYS[K + 8], base .. 'completion_tokens', completion)
      redis.call('HINCRBY', KEYS[K + 8], base .. 'requests', calls)
    end
  end
  redis.call('EXPIRE', KEYS[K + 8], ARGV[A + 11])
  end
end
return (#KEYS - 1) / 10
"""


@attr.s(frozen=True, slots=True, auto_attribs=True)
class Settlement:
    """
    What one call adds to the ledger.
    """

    admission: Admission
    cost_nanos: int
    prompt_tokens: int
    completion_tokens: int
    user_id: Optional[str]
    team_id: Optional[str]
    model_name: Optional[str]
    at: float
    billable: bool = True


@attr.s(slots=True, auto_attribs=True)
class _Batch:
    """
    Settlements written by one script run, under one id, so that a retry
    after a lost reply is not applied twice.
    """

    id: str
    settlements: List[Settlement]


class SpendLedger:
    """
    Adds each call's spend to Redis atomically: the calls that end within a
    few milliseconds of each other are settled by one script run.

    :param redis: a L{dheera_tx.redis.client.RedisClient}.
    :param prefix: the Redis key prefix.
    :param limiter: the L{CallLimiter} whose key names are shared.
    :param clock: an C{IReactorTime} for the backlog's retry loop.
    :param daily_ttl_days: how long per-day counters are kept.
    :param max_backlog: settlements kept while Redis is away.
    """

    BATCH_DELAY = 0.002
    BATCH_SIZE = 200
    # How long Redis remembers that a batch was applied: longer than any
    # retry of a batch whose reply was lost takes to come.
    SETTLED_MARKER_TTL = 3600

    def __init__(self, redis, prefix: str, limiter: CallLimiter, clock, daily_ttl_days: int = 400, max_backlog: int = 100_000):
        self._redis = redis
        self._prefix = prefix
        self._limiter = limiter
        self._daily_ttl = daily_ttl_days * 86400
        self._clock = clock
        self._batch: List = []
        self._flush_call = None
        self._writing: set = set()
        self._stopped = False
        self._backlog: Deque[_Batch] = deque()
        self._queued = 0
        self._max_backlog = max_backlog
        self.dropped = 0
        self._days: Dict[int, str] = {}
        self._retry = LoopingCall(self._drain)
        self._retry.clock = clock
        self._draining = False

    def settle(self, settlement: Settlement) -> Deferred:
        """
        Record a finished call.  Settlements made within L{BATCH_DELAY} go
        to Redis together, as one script run; failures go to the backlog.
        Never fails.

        :return: a Deferred that fires once it is recorded or queued.
        """
        d = Deferred()
        self._batch.append((settlement, d))
        if self._flush_call is None:
            self._flush_call = self._clock.callLater(self.BATCH_DELAY, self._flush_batch)
        elif len(self._batch) >= self.BATCH_SIZE:
            self._flush_call.cancel()
            self._flush_batch()
        return d

    def _flush_batch(self) -> None:
        self._flush_call = None
        batch, self._batch = self._batch, []
        d = ensureDeferred(self._settle_batch(batch))
        self._writing.add(d)
        d.addBoth(lambda result: self._writing.discard(d))

    async def _settle_batch(self, batch) -> None:
        if batch:
            await self._write_or_queue(_Batch(uuid.uuid4().hex, [s for s, _ in batch]))
        for _, d in batch:
            d.callback(None)

    async def _write_or_queue(self, batch: "_Batch") -> None:
        if self._backlog:
            self._queue(batch)
            return
        try:
            await self._write(batch)
        except Exception:
            log.warn("Spend not recorded yet (Redis unavailable or late); queued for retry")
            self._queue(batch)

    def release_lost_slot(self, admission: Admission) -> None:
        """
        Release the parallel slot and reservations of a call whose
        admission script may have run although its reply was lost (the call
        was refused with 503).
        """
        if admission.holds_parallel_slot or admission.reservation_member:
            release = Settlement(admission, 0, 0, 0, None, None, None, 0.0, billable=False)
            d = ensureDeferred(self._write_or_queue(_Batch(uuid.uuid4().hex, [release])))
            # flush() waits for it like for any write under way.
            self._writing.add(d)
            d.addBoth(lambda result: self._writing.discard(d))

    def _queue(self, batch: "_Batch") -> None:
        if self._queued + len(batch.settlements) > self._max_backlog:
            self.dropped += len(batch.settlements)
            return
        self._backlog.append(batch)
        self._queued += len(batch.settlements)
        if not self._retry.running and not self._stopped:
            self._retry.start(1.0, now=False).addErrback(lambda f: log.failure("spend retry loop", f))

    async def _drain_async(self) -> None:
        while self._backlog:
            batch = self._backlog[0]
            try:
                await self._write(batch)
            except Exception:
                return
            self._backlog.popleft()
            self._queued -= len(batch.settlements)
        if self._retry.running:
            self._retry.stop()

    def _drain(self):
        if self._draining:
            return None
        self._draining = True
        d = ensureDeferred(self._drain_async())

        def done(result):
            self._draining = False
            return result

        return d.addBoth(done)

    @property
    def pending(self) -> int:
        """
        :return: settlements waiting for Redis.
        """
        return self._queued + len(self._batch)

    def flush(self) -> Deferred:
        """
        Write the current batch and try once to write the backlog (on
        shutdown).
        """
        if self._flush_call is not None:
            self._flush_call.cancel()
            self._flush_call = None
        batch, self._batch = self._batch, []

        async def flush_all():
            await self._settle_batch(batch)
            # Writes already under way land (or join the backlog) first.
            for d in list(self._writing):
                await d
            await self._drain_async()
            self.stop()

        return ensureDeferred(flush_all())

    def stop(self) -> None:
        """
        Stop retrying the backlog (what is left in it is lost).
        """
        self._stopped = True
        if self._retry.running:
            self._retry.stop()
        if self._backlog:
            log.warn("{n} settlements could not be written to Redis and are lost", n=self._queued)

    async def _write(self, batch: "_Batch") -> None:
        keys: List[str] = [f"{self._prefix}settled:{batch.id}"]
        args: List = [self.SETTLED_MARKER_TTL]
        for entry in self._entries(batch.settlements):
            k, a = self._script_arguments(*entry)
            keys.extend(k)
            args.extend(a)
        await self._redis.eval(SETTLE_SCRIPT, keys, args)

    def _entries(self, settlements: List[Settlement]):
        """
        Sum the settlements that bill the same key, user, team, end user
        and model on the same day: Redis does the work once per entry, not
        once per call.

        :return: C{[settlement, day, cost, prompt, completion, call ids,
            reservation members]} lists, the settlement standing for its
            entry's identity.
        """
        entries: Dict[tuple, list] = {}
        days = self._days
        for s in settlements:
            a = s.admission
            epoch_day = int(s.at // 86400)
            day = days.get(epoch_day)
            if day is None:
                day = days[epoch_day] = datetime.datetime.fromtimestamp(
                    epoch_day * 86400, datetime.timezone.utc
                ).strftime("%Y-%m-%d")
            identity = (
                a.token, a.end_user, a.team_id, a.counts_tokens, a.holds_parallel_slot, a.key_reserves,
                s.user_id, s.team_id, s.model_name, day, s.billable,
            )
            member = a.reservation_member
            entry = entries.get(identity)
            if entry is None:
                entries[identity] = [
                    s, day, s.cost_nanos, s.prompt_tokens, s.completion_tokens, [a.call_id], [member] if member else []
                ]
            else:
                entry[2] += s.cost_nanos
                entry[3] += s.prompt_tokens
                entry[4] += s.completion_tokens
                entry[5].append(a.call_id)
                if member:
                    entry[6].append(member)
        return entries.values()

    def _script_arguments(
        self, s: Settlement, day: str, cost: int, prompt: int, completion: int, call_ids: List[str], members: List[str]
    ):
        a = s.admission
        p = self._prefix
        names = self._limiter.names(a)
        model = s.model_name or ""
        keys = [
            names.key,
            f"{p}spend:user:{s.user_id}" if s.user_id else "",
            f"{p}spend:team:{s.team_id}" if s.team_id else "",
            names.end_user,
            f"{p}spend:model:{model}" if model else "",
            names.tpm if a.counts_tokens else "",
            names.parallel if a.holds_parallel_slot else "",
            f"{p}spend:daily:{day}",
            names.key_reservations,
            names.end_user_reservations,
        ]
        args = [
            cost,
            prompt,
            completion,
            ",".join(call_ids) if a.holds_parallel_slot else "",
            WINDOW_MS,
            f"key:{a.token}" if a.token else "",
            f"user:{s.user_id}" if s.user_id else "",
            f"team:{s.team_id}" if s.team_id else "",
            end_user_report_id(a.end_user, a.team_id) if a.end_user else "",
            f"model:{model}" if model else "",
            self._daily_ttl,
            "1" if s.billable else "0",
            len(call_ids),
            ",".join(members),
            self._limiter.end_user_ttl,
        ]
        return keys, args

    async def report(
        self, group: str, start: datetime.date, end: datetime.date, team_id: Optional[str] = None
    ) -> List[Dict]:
        """
        Sum the per-day counters of C{group} from C{start} to C{end}
        (inclusive).

        :param team_id: for C{end_user}: only the end users of this team.
        :return: one row per id, highest spend first; C{end_user} rows also
            name their C{team_id} (L{None}: the default scope).
        """
        if group not in GROUPS:
            raise ValueError(group)
        groups = ("end_user", "team_end_user") if group == "end_user" else (group,)
        totals: Dict[tuple, Dict[str, int]] = {}
        day = start
        while day <= end:
            fields = await self._redis.execute("HGETALL", f"{self._prefix}spend:daily:{day.isoformat()}")
            for name, value in _pairs(fields):
                g, _, rest = name.partition(":")
                if g not in groups:
                    continue
                ident, _, counter = rest.rpartition(":")
                row = totals.setdefault((g, ident), dict.fromkeys(COUNTERS, 0))
                if counter in row:
                    row[counter] += int(value)
            day += datetime.timedelta(days=1)
        rows = []
        for (g, ident), row in totals.items():
            extra = {}
            if group == "end_user":
                team, ident = parse_end_user_report_id(g, ident)
                if team_id is not None and team != team_id:
                    continue
                extra["team_id"] = team
            rows.append({"group_by": group, "id": ident, **extra, **row, "spend": nanos_to_usd(row["spend_nanos"])})
        rows.sort(key=lambda r: -r["spend_nanos"])
        return rows


def _pairs(fields):
    if isinstance(fields, dict):
        items = fields.items()
    else:
        items = zip(fields[::2], fields[1::2])
    for name, value in items:
        if isinstance(name, bytes):
            name = name.decode("utf-8", "replace")
        if isinstance(value, bytes):
            value = value.decode()
        yield name, value
