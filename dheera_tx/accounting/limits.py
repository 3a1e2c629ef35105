"""
Admission: budgets, rpm, tpm and parallel limits, checked before the
upstream is called.

Every check and counter is one Lua script run in Redis, so limits hold
across any number of proxy processes sharing that Redis; Python never reads
a counter and writes it back.  One round trip admits a call; the matching
release (and the spend) is L{dheera_tx.accounting.spend.SpendLedger.settle}.

Redis keys (all under the configured prefix):

* C{rl:rpm:<token>}: requests in the current 60 s window (the window opens
  with the first call it counts: the key expires 60 s after it).
* C{rl:tpm:<token>}: tokens in the current 60 s window, added at settle.
* C{rl:par:<token>}: a sorted set of the key's calls in flight, scored by
  start time; entries older than the longest call timeout are dropped, so a
  crashed proxy cannot leak slots forever.
"""

from typing import List, Optional, Tuple

import attr
from twisted.internet.defer import Deferred, fail

from dheera_tx.accounting.full_windows import WindowFull
from dheera_tx.errors import ProxyError, forbidden, service_unavailable, unauthorized

WINDOW_MS = 60_000

# KEYS: 1 key hash ("" for none), 2 end-user hash (""), 3 rpm counter,
#       4 tpm counter, 5 parallel set
# ARGV: 1 now (s), 2 call id, 3 rpm limit, 4 tpm limit, 5 parallel limit
#       (0 = none), 6 seconds after which a parallel slot is stale,
#       7 window ms
# Returns {0} when admitted, else {reason, retry_after_ms}.
ADMIT_SCRIPT = r"""
local now = tonumber(ARGV[1])
local function seconds(d)
  if not d then return nil end
  local n, u = string.match(d, "^(%d+)([smhd])$")
  if not n then return nil end
  local mult = {s = 1, m = 60, h = 3600, d = 86400}
  return tonumber(n) * mult[u]
end
local function over_budget(hash)
  local f = redis.call('HMGET', hash, 'max_budget', 'budget_duration',
                       'budget_reset_at', 'budget_spend_nanos', 'spend_nanos')
  if not f[1] then return false end
  -- Rounded to whole nano-USD: a float budget times 1e9 can land a hair
  -- above the exact amount (1.54e-05 * 1e9 = 15400.000000000002), and a
  -- spend that reached the budget exactly would still be let through.
  local limit = math.floor(tonumber(f[1]) * 1e9 + 0.5)
  local duration = seconds(f[2])
  local spent
  if duration then
    local reset = tonumber(f[3] or '0') or 0
    if now >= reset then
      redis.call('HSET', hash, 'budget_spend_nanos', '0',
                 'budget_reset_at', string.format('%.3f', now + duration))
      spent = 0
    else
      spent = tonumber(f[4] or '0') or 0
    end
  else
    spent = tonumber(f[5] or '0') or 0
  end
  return spent >= limit
end
if KEYS[2] ~= '' then
  if redis.call('HGET', KEYS[2], 'blocked') == '1' then
    return {'end_user_blocked', 0}
  end
  if over_budget(KEYS[2]) then return {'end_user_budget', 0} end
end
if KEYS[1] ~= '' then
  if redis.call('EXISTS', KEYS[1]) == 0 then return {'key_gone', 0} end
  if over_budget(KEYS[1]) then return {'budget', 0} end
  -- milliseconds until a full window reopens, or nil when it has room
  local function full(counter, limit)
    if limit <= 0 or tonumber(redis.call('GET', counter) or '0') < limit then return nil end
    local ttl = redis.call('PTTL', counter)
    if ttl < 0 then redis.call('PEXPIRE', counter, ARGV[7]); ttl = tonumber(ARGV[7]) end
    return ttl
  end
  local rpm = tonumber(ARGV[3])
  local wait = full(KEYS[3], rpm)
  if wait then return {'rpm', wait} end
  wait = full(KEYS[4], tonumber(ARGV[4]))
  if wait then return {'tpm', wait} end
  local parallel = tonumber(ARGV[5])
  if parallel > 0 then
    redis.call('ZREMRANGEBYSCORE', KEYS[5], '-inf', now - tonumber(ARGV[6]))
    if redis.call('ZCARD', KEYS[5]) >= parallel then return {'parallel', 1000} end
    redis.call('ZADD', KEYS[5], now, ARGV[2])
    redis.call('EXPIRE', KEYS[5], math.ceil(tonumber(ARGV[6])))
  end
  if rpm > 0 then
    if redis.call('INCR', KEYS[3]) == 1 then redis.call('PEXPIRE', KEYS[3], ARGV[7]) end
  end
end
return {0}
"""

_KEYS_PER_CALL = 5
_ARGS_PER_CALL = 7

# The admissions of one reactor tick in one script run: KEYS and ARGV are
# those of ADMIT_SCRIPT for each call in turn; returns one reply per call.
ADMIT_BATCH_SCRIPT = (
    "local function admit(KEYS, ARGV)\n"
    + ADMIT_SCRIPT
    + "\nend\nlocal out = {}\n"
    + f"for i = 0, #KEYS / {_KEYS_PER_CALL} - 1 do\n"
    + "  local k, a = {}, {}\n"
    + f"  for j = 1, {_KEYS_PER_CALL} do k[j] = KEYS[i * {_KEYS_PER_CALL} + j] end\n"
    + f"  for j = 1, {_ARGS_PER_CALL} do a[j] = ARGV[i * {_ARGS_PER_CALL} + j] end\n"
    + "  out[i + 1] = admit(k, a)\n"
    + "end\nreturn out\n"
)


class AdmissionBatch:
    """
    Gathers the admissions asked for during one reactor tick and runs them
    in one script: one Redis round trip (and one script run) for all the
    calls that arrived together, still one round trip before each call.

    :param redis: a L{dheera_tx.redis.client.RedisClient}.
    :param reactor: an C{IReactorTime}.
    """

    def __init__(self, redis, reactor):
        self._redis = redis
        self._reactor = reactor
        self._pending: List[Tuple[tuple, tuple, Deferred]] = []

    def admit(self, keys: tuple, args: tuple) -> Deferred:
        """
        :return: a Deferred firing with this admission's script reply, or
            failing as the Redis call failed; failing at once, alone, when
            a key name or argument is text that cannot be encoded.
        """
        try:
            # Encoded here, once (the command encoder passes bytes through),
            # so that text that cannot be encoded fails this admission alone:
            # in the batch it would fail every call of the tick.
            keys = tuple(v.encode("utf-8") if type(v) is str else v for v in keys)
            args = tuple(v.encode("utf-8") if type(v) is str else v for v in args)
        except UnicodeEncodeError as e:
            return fail(e)
        d = Deferred()
        if not self._pending:
            self._reactor.callLater(0, self._flush)
        self._pending.append((keys, args, d))
        return d

    def _flush(self) -> None:
        batch, self._pending = self._pending, []
        keys: list = []
        args: list = []
        for k, a, _ in batch:
            keys.extend(k)
            args.extend(a)
        Deferred.fromCoroutine(self._redis.eval(ADMIT_BATCH_SCRIPT, keys, args)).addCallbacks(
            self._answered, self._failed, callbackArgs=(batch,), errbackArgs=(batch,)
        )

    @staticmethod
    def _answered(replies, batch) -> None:
        for (_, _, d), reply in zip(batch, replies):
            d.callback(reply)

    @staticmethod
    def _failed(failure, batch) -> None:
        for _, _, d in batch:
            d.errback(failure)


@attr.s(frozen=True, slots=True, auto_attribs=True)
class Admission:
    """
    A call let through: what L{dheera_tx.accounting.spend.SpendLedger.settle} needs
    to release and bill it.
    """

    call_id: str
    token: Optional[str]
    end_user: Optional[str]
    holds_parallel_slot: bool
    counts_tokens: bool


def _limit(value: Optional[int]) -> int:
    return int(value) if value else 0


class CallLimiter:
    """
    Admits calls against the limits of their key and end user.

    :param redis: a L{dheera_tx.redis.client.RedisClient}.
    :param prefix: the Redis key prefix.
    :param now: epoch seconds.
    :param stale_after: seconds after which a parallel slot is forgotten
        (longer than any call may last).
    :param reactor: when given, the admissions of one reactor tick share
        one script run (L{AdmissionBatch}).
    """

    def __init__(self, redis, prefix: str, now, stale_after: float, reactor=None):
        self._redis = redis
        self._prefix = prefix
        self._now = now
        self._stale_after = stale_after
        self._batch = AdmissionBatch(redis, reactor) if reactor is not None else None

    def key_names(self, token: Optional[str], end_user: Optional[str]):
        """
        :return: the Redis keys of a call's key and end user, in the order
            the scripts take them.
        """
        p = self._prefix
        if token is None:
            key = rpm = tpm = par = ""
        else:
            key, rpm, tpm, par = (
                f"{p}key:{token}",
                f"{p}rl:rpm:{token}",
                f"{p}rl:tpm:{token}",
                f"{p}rl:par:{token}",
            )
        user = f"{p}end_user:{end_user}" if end_user else ""
        return key, user, rpm, tpm, par

    @staticmethod
    def admission_of(principal, end_user: Optional[str], call_id: str) -> Admission:
        """
        :return: what admitting this call holds (whether it takes a parallel
            slot, whether its tokens count against tpm).
        """
        record = principal.key
        if record is None:
            return Admission(call_id, None, end_user, False, False)
        return Admission(
            call_id, record.token, end_user, _limit(record.max_parallel_requests) > 0, _limit(record.tpm_limit) > 0
        )

    async def admit(self, principal, end_user: Optional[str], call_id: str) -> Admission:
        """
        Check the call's limits and count it.

        :param principal: the caller (L{dheera_tx.keys.auth.Principal}).
        :param end_user: the end user the call is made for, or L{None}.
        :raise ProxyError: 429 over a limit or budget (with C{Retry-After}),
            403 for a blocked end user, 401 for a key deleted meanwhile,
            503 when Redis cannot be reached for a virtual key.
        """
        admission = self.admission_of(principal, end_user, call_id)
        record = principal.key
        token = admission.token
        rpm = tpm = parallel = 0
        if record is not None:
            rpm, tpm, parallel = _limit(record.rpm_limit), _limit(record.tpm_limit), _limit(record.max_parallel_requests)
        if record is not None and not (rpm or tpm or parallel or record.max_budget is not None) and not end_user:
            return admission
        if record is None and not end_user:
            return admission
        keys = self.key_names(token, end_user)
        args = (repr(self._now()), call_id, rpm, tpm, parallel, self._stale_after, WINDOW_MS)
        try:
            if self._batch is not None:
                result = await self._batch.admit(keys, args)
            else:
                result = await self._redis.eval(ADMIT_SCRIPT, keys, args)
        except Exception:
            if record is None:
                # The master key keeps working while Redis is away.
                return attr.evolve(admission, end_user=None)
            raise service_unavailable("The rate limiter is unavailable; try again shortly.")
        return self._judge(result, admission)

    def _judge(self, result, admission: Admission) -> Admission:
        reason = result[0]
        if isinstance(reason, bytes):
            reason = reason.decode()
        if reason == 0 or reason == "0":
            return admission
        retry_ms = int(result[1]) if len(result) > 1 else 0
        retry_after = {"Retry-After": str(max(1, -(-retry_ms // 1000)))}
        if reason == "end_user_blocked":
            raise forbidden("This end user is blocked.")
        if reason == "key_gone":
            raise unauthorized()
        if reason in ("budget", "end_user_budget"):
            who = "key" if reason == "budget" else "end user"
            raise ProxyError(429, f"Budget exceeded for this {who}.", type="budget_exceeded", code="429", headers=retry_after)
        names = {"rpm": "requests per minute", "tpm": "tokens per minute", "parallel": "parallel requests"}
        if reason in ("rpm", "tpm"):
            # Full until the window reopens: remembered, so that the key's
            # next calls are refused before their bodies are read.
            raise WindowFull(f"Rate limit exceeded: {names[reason]} of this key.", retry_ms)
        raise ProxyError(
            429,
            f"Rate limit exceeded: {names.get(reason, reason)} of this key.",
            type="rate_limit_error",
            code="429",
            headers=retry_after,
        )
