"""
Admission: budgets, rpm, tpm and parallel limits, checked before the
upstream is called.

Every check and counter is one Lua script run in Redis, so limits hold
across any number of proxy processes sharing that Redis; Python never reads
a counter and writes it back.  One round trip admits a call; the matching
release (and the spend) is L{dheera_tx.accounting.spend.SpendLedger.settle}.

Spend is only known once a call has ended, so admission I{reserves} each
call's worst case (L{dheera_tx.accounting.reservation}) on its key and end
user, and budget and tpm checks count the reservations of the calls in
flight: a call is admitted while spend plus the reservations of the calls
already in flight stay under the budget (its own reservation is not
counted).  Whatever order concurrent calls come in, the last one admitted
found the others' worst cases under the budget, so together they overrun it
by at most its own actual cost.  Settlement takes the reservation back and
charges the truth.

Redis keys (all under the configured prefix):

* C{rl:rpm:<token>}: requests in the current 60 s window (the window opens
  with the first call it counts: the key expires 60 s after it).
* C{rl:tpm:<token>}: tokens in the current 60 s window, added at settle.
* C{rl:par:<token>}: a sorted set of the key's calls in flight, scored by
  start time; entries older than the longest call timeout are dropped, so a
  crashed proxy cannot leak slots forever.
* C{reserved:key:<token>}, C{reserved:<end user hash name>}: a hash of
  the reservations in flight: a field per call, C{<call id>|<nano-USD>|
  <tokens>}, whose value is the time after which it is stale (the longest
  call timeout after admission: a crashed proxy's reservations lapse then);
  the sums of the live ones under C{nanos} and C{tokens}; and under C{due}
  a time no later than the earliest of those deadlines, so that admission
  looks for lapsed reservations only once it has passed.  The hash expires
  with its last reservation, and goes when no call is in flight.
* C{end_user_new:<team or "">:<epoch day>}: how many new end user ids a
  team's calls named that day; past C{max_new_end_users_per_day}, calls are
  counted under the team's end user C{__overflow__}.
"""

from typing import List, Optional, Tuple

import attr
from twisted.internet.defer import Deferred, fail

from dheera_tx.accounting.admission_scripts import ADMIT_BATCH_SCRIPT, ADMIT_ONE_SCRIPT
from dheera_tx.accounting.end_users import OVERFLOW_END_USER, end_user_name
from dheera_tx.accounting.full_windows import WindowFull
from dheera_tx.accounting.reservation import NO_RESERVATION, Reservation
from dheera_tx.errors import ProxyError, forbidden, service_unavailable, unauthorized

WINDOW_MS = 60_000
_NEW_END_USER_COUNTER_TTL = 2 * 86400

class AdmissionBatch:
    """
    Gathers the admissions asked for during one reactor tick and runs them
    in one script: one Redis round trip (and one script run) for all the
    calls that arrived together, still one round trip before each call.

    :param redis: a L{dheera_tx.redis.client.RedisClient}.
    :param reactor: an C{IReactorTime}.
    :param constants: the script's C{C} arguments, the same for every call.
    """

    def __init__(self, redis, reactor, constants: tuple):
        self._redis = redis
        self._reactor = reactor
        self._constants = constants
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
        args: list = list(self._constants)
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

    :ivar end_user: the end user billed: the one the call named, or the
        team's overflow end user when the team named too many new ones.
    :ivar team_id: the end user's scope, the team of the calling key
        (L{None}: the default scope).
    :ivar reservation: the worst case held for the call.
    :ivar key_reserves: the reservation was held on the key (it has a
        budget or a tpm limit).
    """

    call_id: str
    token: Optional[str]
    end_user: Optional[str]
    holds_parallel_slot: bool
    counts_tokens: bool
    team_id: Optional[str] = None
    reservation: Reservation = NO_RESERVATION
    key_reserves: bool = False

    @property
    def reservation_member(self) -> str:
        """
        :return: the reservation's member in the reservation sets, or C{""}
            when nothing is reserved.
        """
        r = self.reservation
        if not (r.nanos or r.tokens):
            return ""
        return f"{self.call_id}|{r.nanos}|{r.tokens}"


@attr.s(frozen=True, slots=True, auto_attribs=True)
class RedisNames:
    """
    The Redis keys of one call's key and end user.
    """

    key: str
    end_user: str
    rpm: str
    tpm: str
    parallel: str
    key_reservations: str
    end_user_reservations: str


def _limit(value: Optional[int]) -> int:
    return int(value) if value else 0


class CallLimiter:
    """
    Admits calls against the limits of their key and end user.

    :param redis: a L{dheera_tx.redis.client.RedisClient}.
    :param prefix: the Redis key prefix.
    :param now: epoch seconds.
    :param stale_after: seconds after which a parallel slot or a
        reservation is forgotten (longer than any call may last).
    :param reactor: when given, the admissions of one reactor tick share
        one script run (L{AdmissionBatch}).
    :param end_user_ttl: seconds an end user seen only in traffic is kept
        after its last call.
    :param new_end_users_per_day: new end user ids a team's calls may name
        a day before they are counted under the overflow end user.
    """

    def __init__(
        self,
        redis,
        prefix: str,
        now,
        stale_after: float,
        reactor=None,
        end_user_ttl: int = 35 * 86400,
        new_end_users_per_day: int = 10000,
    ):
        self._redis = redis
        self._prefix = prefix
        self._now = now
        self.end_user_ttl = end_user_ttl
        self._constants = (stale_after, WINDOW_MS, end_user_ttl, new_end_users_per_day, _NEW_END_USER_COUNTER_TTL)
        self._batch = AdmissionBatch(redis, reactor, self._constants) if reactor is not None else None

    def names(self, admission: Admission) -> RedisNames:
        """
        :return: the Redis keys of a call's key and end user ("" where it
            has none), as the admission and settlement scripts take them.
        """
        p = self._prefix
        token = admission.token
        if token is None:
            key = rpm = tpm = par = key_rsv = ""
        else:
            key, rpm, tpm, par = f"{p}key:{token}", f"{p}rl:rpm:{token}", f"{p}rl:tpm:{token}", f"{p}rl:par:{token}"
            key_rsv = f"{p}reserved:key:{token}" if admission.key_reserves else ""
        user = user_rsv = ""
        if admission.end_user:
            name = end_user_name(admission.end_user, admission.team_id)
            user, user_rsv = p + name, f"{p}reserved:{name}"
        return RedisNames(key, user, rpm, tpm, par, key_rsv, user_rsv)

    @staticmethod
    def may_reserve(principal, end_user: Optional[str]) -> bool:
        """
        :return: whether a call can hold a reservation: its key has a budget
            or a tpm limit, or it names an end user (who may have a
            budget).  Other calls need not reckon their worst case.
        """
        record = principal.key
        if end_user:
            return True
        return record is not None and (record.max_budget is not None or _limit(record.tpm_limit) > 0)

    @staticmethod
    def admission_of(
        principal, end_user: Optional[str], call_id: str, reservation: Reservation = NO_RESERVATION
    ) -> Admission:
        """
        :return: what admitting this call holds (whether it takes a parallel
            slot, whether its tokens count against tpm, what it reserves
            where).
        """
        record = principal.key
        if record is None:
            return Admission(call_id, None, end_user, False, False, None, reservation, False)
        return Admission(
            call_id,
            record.token,
            end_user,
            _limit(record.max_parallel_requests) > 0,
            _limit(record.tpm_limit) > 0,
            record.team_id,
            reservation,
            record.max_budget is not None or _limit(record.tpm_limit) > 0,
        )

    async def admit(
        self, principal, end_user: Optional[str], call_id: str, reservation: Reservation = NO_RESERVATION
    ) -> Admission:
        """
        Check the call's limits, count it and reserve its worst case.

        :param principal: the caller (L{dheera_tx.keys.auth.Principal}).
        :param end_user: the end user the call is made for, or L{None}.
        :param reservation: the call's worst case
            (L{dheera_tx.accounting.reservation.worst_case}).
        :raise ProxyError: 429 over a limit or budget (with C{Retry-After}),
            403 for a blocked end user, 401 for a key deleted meanwhile,
            503 when Redis cannot be reached for a virtual key.
        """
        admission = self.admission_of(principal, end_user, call_id, reservation)
        record = principal.key
        rpm = tpm = parallel = 0
        if record is not None:
            rpm, tpm, parallel = _limit(record.rpm_limit), _limit(record.tpm_limit), _limit(record.max_parallel_requests)
        if record is not None and not (rpm or tpm or parallel or record.max_budget is not None) and not end_user:
            return admission
        if record is None and not end_user:
            return admission
        n = self.names(admission)
        now = self._now()
        if end_user:
            p = self._prefix
            scope = admission.team_id if admission.team_id is not None else ""
            overflow = end_user_name(OVERFLOW_END_USER, admission.team_id)
            per_day = (f"{p}end_user_new:{scope}:{int(now // 86400)}", p + overflow, f"{p}reserved:{overflow}")
        else:
            per_day = ("", "", "")
        keys = (n.key, n.end_user, n.rpm, n.tpm, n.parallel, n.key_reservations, n.end_user_reservations, *per_day)
        args = (repr(now), call_id, rpm, tpm, parallel, admission.reservation_member)
        try:
            if self._batch is not None:
                result = await self._batch.admit(keys, args)
            else:
                result = await self._redis.eval(ADMIT_ONE_SCRIPT, keys, self._constants + args)
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
            if len(result) > 1:
                # The team named too many new end users today.
                return attr.evolve(admission, end_user=OVERFLOW_END_USER)
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
        if reason in ("rpm", "tpm") and retry_ms > 1000:
            # Full until the window reopens: remembered, so that the key's
            # next calls are refused before their bodies are read.  (1000 ms
            # is the script's guess for a window full only with the calls
            # in flight, which may end sooner: not remembered.)
            raise WindowFull(f"Rate limit exceeded: {names[reason]} of this key.", retry_ms)
        raise ProxyError(
            429,
            f"Rate limit exceeded: {names.get(reason, reason)} of this key.",
            type="rate_limit_error",
            code="429",
            headers=retry_after,
        )
