"""
Tests for L{dheera_tx.accounting.limits} and L{dheera_tx.accounting.spend} against a real Redis:
admission scripts, spend settlement, reports.
"""

import datetime

from twisted.internet import reactor
from twisted.internet.defer import ensureDeferred, gatherResults
from twisted.trial.unittest import TestCase

from dheera_tx.accounting.limits import CallLimiter
from dheera_tx.accounting.spend import Settlement, SpendLedger
from dheera_tx.errors import ProxyError
from dheera_tx.keys.auth import MASTER, Principal
from dheera_tx.keys.records import KeyRecord
from tests.redis_server import redis_for

PREFIX = "dheera:"


def _record(token="t" * 64, **fields):
    base = dict(
        token=token,
        key_alias=None,
        models=(),
        allowed_routes=(),
        max_budget=None,
        budget_duration=None,
        budget_reset_at=None,
        rpm_limit=None,
        tpm_limit=None,
        max_parallel_requests=None,
        user_id="alice",
        team_id="red",
        metadata={},
        blocked=False,
        expires=None,
        created_at=0.0,
        spend_nanos=0,
    )
    base.update(fields)
    return KeyRecord(**base)


class LimitsTests(TestCase):
    """
    Admission and settlement scripts on a real redis-server.
    """

    def setUp(self):
        self.server, self.redis = redis_for(self)
        self.now = [1_800_000_000.0]
        # As the proxy runs it: the admissions of one reactor tick batched.
        self.limiter = CallLimiter(self.redis, PREFIX, lambda: self.now[0], stale_after=660, reactor=reactor)
        self.ledger = SpendLedger(self.redis, PREFIX, self.limiter, reactor)

    def _store(self, record):
        fields = record.to_redis_hash()
        args = [x for kv in fields.items() for x in kv]
        self.server.command("HSET", f"{PREFIX}key:{record.token}", *args)
        return record

    async def _admit_many(self, principal, n, end_user=None):
        outcomes = []
        for i in range(n):
            try:
                outcomes.append(await self.limiter.admit(principal, end_user, f"call-{i}"))
            except ProxyError as e:
                outcomes.append(e)
        return outcomes

    def _settle(self, admission, cost=0, prompt=0, completion=0, model="m"):
        record_user = "alice" if admission.token else None
        return self.ledger.settle(
            Settlement(admission, cost, prompt, completion, record_user, "red" if record_user else None, model, self.now[0])
        )

    def test_admissions_of_one_tick_share_one_script_run(self):
        """
        Calls asked to be admitted in the same reactor tick are judged in
        one script run, each against its own key's limits: of six calls on
        a key with rpm_limit 2, two pass; calls of a key without room
        (budget spent) get 429, calls of the master key with an end user
        pass; one EVALSHA/EVAL runs for all of them.
        """
        limited = self._store(_record(token="a" * 64, rpm_limit=2))
        broke = self._store(_record(token="b" * 64, max_budget=0.000001, spend_nanos=5000))
        self.server.command("CONFIG", "RESETSTAT")

        async def go():
            calls = [self.limiter.admit(Principal(False, limited), None, f"a-{i}") for i in range(6)]
            calls += [self.limiter.admit(Principal(False, broke), None, f"b-{i}") for i in range(2)]
            calls += [self.limiter.admit(MASTER, "bob", f"m-{i}") for i in range(2)]
            outcomes = []
            for d in [ensureDeferred(c) for c in calls]:
                try:
                    outcomes.append(await d)
                except ProxyError as e:
                    outcomes.append(e)
            kinds = [o.type if isinstance(o, ProxyError) else "ok" for o in outcomes]
            self.assertEqual(kinds[:6].count("ok"), 2)
            self.assertEqual(kinds[:6].count("rate_limit_error"), 4)
            self.assertEqual(kinds[6:8], ["budget_exceeded"] * 2)
            self.assertEqual(kinds[8:], ["ok", "ok"])
            stats = self.server.command("INFO", "commandstats")
            runs = sum(
                int(line.split("calls=")[1].split(",")[0])
                for line in stats.splitlines()
                if line.startswith(("cmdstat_evalsha:", "cmdstat_eval:"))
            )
            # An EVALSHA answered NOSCRIPT is followed by an EVAL: at most 2.
            self.assertIn(runs, (1, 2))

        return ensureDeferred(go())

    def test_unencodable_admission_fails_alone(self):
        """
        An admission whose key names or arguments hold text that cannot be
        encoded (a lone surrogate: the proxy refuses such end user ids
        earlier, this is the second line) fails on its own, at once, as
        unavailable; the other admissions of the same tick run as usual.
        """
        good = self._store(_record(token="c" * 64))

        async def go():
            bad = ensureDeferred(self.limiter.admit(Principal(False, good), "x\ud800", "bad"))
            fine = [ensureDeferred(self.limiter.admit(Principal(False, good), "bob", f"g-{i}")) for i in range(2)]
            with self.assertRaises(ProxyError) as refused:
                await bad
            self.assertEqual(refused.exception.status, 503)
            admitted = await gatherResults(fine)
            self.assertEqual([a.call_id for a in admitted], ["g-0", "g-1"])

        return ensureDeferred(go())

    def test_rpm_limit(self):
        """
        With rpm_limit 3, exactly 3 calls are admitted in the window; the
        next is 429 with Retry-After; the window reopens after 60 s.
        """
        record = self._store(_record(rpm_limit=3))
        principal = Principal(False, record)

        async def go():
            outcomes = await self._admit_many(principal, 5)
            rejected = [o for o in outcomes if isinstance(o, ProxyError)]
            self.assertEqual(len(rejected), 2)
            self.assertEqual(rejected[0].status, 429)
            self.assertEqual(rejected[0].type, "rate_limit_error")
            self.assertTrue(1 <= int(rejected[0].headers["Retry-After"]) <= 60)
            self.server.command("PEXPIRE", f"{PREFIX}rl:rpm:{record.token}", 1)
            await _sleep(0.05)
            again = await self._admit_many(principal, 1)
            self.assertNotIsInstance(again[0], ProxyError)

        return ensureDeferred(go())

    def test_parallel_slot_released_by_settle(self):
        """
        max_parallel_requests 2: a third concurrent call is refused; once a
        call settles, its slot is free again.
        """
        record = self._store(_record(max_parallel_requests=2))
        principal = Principal(False, record)

        async def go():
            first, second, third = await self._admit_many(principal, 3)
            self.assertIsInstance(third, ProxyError)
            self.assertEqual(third.status, 429)
            await self._settle(first)
            (fourth,) = await self._admit_many(principal, 1)
            self.assertNotIsInstance(fourth, ProxyError)
            self.assertEqual(self.server.command("ZCARD", f"{PREFIX}rl:par:{record.token}"), 2)

        return ensureDeferred(go())

    def test_budget_exhaustion(self):
        """
        A key whose spend reached max_budget gets 429 budget_exceeded; the
        settled spend is visible to the very next check.
        """
        record = self._store(_record(max_budget=0.001))
        principal = Principal(False, record)

        async def go():
            (a,) = await self._admit_many(principal, 1)
            await self._settle(a, cost=1_000_000, prompt=10, completion=5)
            (b,) = await self._admit_many(principal, 1)
            self.assertIsInstance(b, ProxyError)
            self.assertEqual((b.status, b.type), (429, "budget_exceeded"))

        return ensureDeferred(go())

    def test_budget_window_resets(self):
        """
        With budget_duration 1h the budgeted spend resets when the window
        ends, while lifetime spend_nanos keeps counting.
        """
        record = self._store(_record(max_budget=0.001, budget_duration="1h"))
        principal = Principal(False, record)

        async def go():
            (a,) = await self._admit_many(principal, 1)
            await self._settle(a, cost=2_000_000)
            (b,) = await self._admit_many(principal, 1)
            self.assertIsInstance(b, ProxyError)
            self.now[0] += 3601
            (c,) = await self._admit_many(principal, 1)
            self.assertNotIsInstance(c, ProxyError)
            spend = self.server.command("HGET", f"{PREFIX}key:{record.token}", "spend_nanos")
            self.assertEqual(int(spend), 2_000_000)

        return ensureDeferred(go())

    def test_tpm_limit(self):
        """
        Tokens settled count against tpm_limit: once 100 tokens were used in
        the window, the next call is 429.
        """
        record = self._store(_record(tpm_limit=100))
        principal = Principal(False, record)

        async def go():
            (a,) = await self._admit_many(principal, 1)
            await self._settle(a, prompt=60, completion=40)
            (b,) = await self._admit_many(principal, 1)
            self.assertIsInstance(b, ProxyError)
            self.assertEqual(b.status, 429)
            self.assertIn("tokens per minute", b.message)

        return ensureDeferred(go())

    def test_end_user_blocked_and_budget(self):
        """
        A blocked end user gets 403, one over budget 429, even with the
        master key.
        """
        self.server.command("HSET", f"{PREFIX}end_user:bob", "blocked", "1")
        self.server.command("HSET", f"{PREFIX}end_user:carol", "blocked", "0", "max_budget", "0.000001", "spend_nanos", "5000")

        async def go():
            (bob,) = await self._admit_many(MASTER, 1, end_user="bob")
            self.assertEqual(bob.status, 403)
            (carol,) = await self._admit_many(MASTER, 1, end_user="carol")
            self.assertEqual((carol.status, carol.type), (429, "budget_exceeded"))
            (dave,) = await self._admit_many(MASTER, 1, end_user="dave")
            self.assertNotIsInstance(dave, ProxyError)

        return ensureDeferred(go())

    def test_spend_everywhere_and_report(self):
        """
        Settlement adds spend atomically to the key, user, team, end user
        and model, and the per-day report sums it by group.
        """
        record = self._store(_record())
        principal = Principal(False, record)

        async def go():
            admissions = await self._admit_many(principal, 50, end_user="erin")
            await gatherResults([self._settle(a, cost=123, prompt=2, completion=3) for a in admissions])
            c = self.server.command
            self.assertEqual(int(c("HGET", f"{PREFIX}key:{record.token}", "spend_nanos")), 50 * 123)
            self.assertEqual(int(c("HGET", f"{PREFIX}spend:user:alice", "spend_nanos")), 50 * 123)
            self.assertEqual(int(c("HGET", f"{PREFIX}spend:team:red", "requests")), 50)
            # The key is of team red: its end users are red's.
            self.assertEqual(int(c("HGET", f"{PREFIX}team:red:end_user:erin", "spend_nanos")), 50 * 123)
            self.assertEqual(int(c("HGET", f"{PREFIX}spend:model:m", "completion_tokens")), 150)
            day = datetime.datetime.fromtimestamp(self.now[0], datetime.timezone.utc).date()
            rows = await self.ledger.report("model", day, day)
            self.assertEqual(rows[0]["id"], "m")
            self.assertEqual(rows[0]["spend_nanos"], 50 * 123)
            self.assertEqual(rows[0]["requests"], 50)

        return ensureDeferred(go())

    def test_batch_sums_calls_of_the_same_identity(self):
        """
        Calls settled in one batch are summed per key, user, team, end user
        and model before they reach Redis: totals stay exact for each of
        two keys, two models and their shared user and team, every parallel slot is released, a call
        of the next day lands on that day, and Redis runs far fewer
        HINCRBYs than one set per call (30 calls, 3 entries).
        """
        one = self._store(_record(token="c" * 64, max_parallel_requests=100, tpm_limit=10**9))
        two = self._store(_record(token="d" * 64))

        async def go():
            first = await self._admit_many(Principal(False, one), 20)
            second = await self._admit_many(Principal(False, two), 10)
            self.assertEqual(int(self.server.command("ZCARD", f"{PREFIX}rl:par:{one.token}")), 20)
            self.server.command("CONFIG", "RESETSTAT")
            settled = [self._settle(a, cost=7, prompt=1, completion=2, model="m") for a in first[:15]]
            # The same key, the next day: its own entry and its own day.
            self.now[0] += 86400
            settled += [self._settle(a, cost=7, prompt=1, completion=2, model="m") for a in first[15:]]
            settled += [self._settle(a, cost=5, prompt=3, completion=4, model="n") for a in second]
            await gatherResults(settled)
            c = self.server.command
            self.assertEqual(int(c("HGET", f"{PREFIX}key:{one.token}", "spend_nanos")), 20 * 7)
            self.assertEqual(int(c("HGET", f"{PREFIX}key:{two.token}", "spend_nanos")), 10 * 5)
            self.assertEqual(int(c("HGET", f"{PREFIX}spend:model:m", "requests")), 20)
            self.assertEqual(int(c("HGET", f"{PREFIX}spend:model:n", "prompt_tokens")), 30)
            self.assertEqual(int(c("HGET", f"{PREFIX}spend:team:red", "completion_tokens")), 20 * 2 + 10 * 4)
            self.assertEqual(int(c("HGET", f"{PREFIX}spend:user:alice", "requests")), 30)
            self.assertEqual(int(c("GET", f"{PREFIX}rl:tpm:{one.token}")), 20 * 3)
            self.assertEqual(int(c("ZCARD", f"{PREFIX}rl:par:{one.token}")), 0)
            day = datetime.datetime.fromtimestamp(self.now[0], datetime.timezone.utc).date()
            rows = {r["id"]: r for r in await self.ledger.report("key", day - datetime.timedelta(days=1), day - datetime.timedelta(days=1))}
            self.assertEqual(rows[one.token]["requests"], 15)
            rows = {r["id"]: r for r in await self.ledger.report("key", day, day)}
            self.assertEqual(rows[one.token]["requests"], 5)
            stats = c("INFO", "commandstats")
            hincrby = [line for line in stats.splitlines() if line.startswith("cmdstat_hincrby:")]
            calls = int(hincrby[0].split("calls=")[1].split(",")[0])
            # One set per entry: 2 key fields + 3 hashes x 4 + 4 daily groups x 4 = 30 at most.
            self.assertLessEqual(calls, 3 * 30)

        return ensureDeferred(go())

    def test_deleted_key_refused(self):
        """
        A key deleted after it was cached is refused by the admission
        script (401), not counted.
        """
        record = _record(rpm_limit=5)

        async def go():
            (a,) = await self._admit_many(Principal(False, record), 1)
            self.assertEqual(a.status, 401)

        return ensureDeferred(go())

    def test_redis_down_fails_closed_for_virtual_keys(self):
        """
        With Redis stopped, a limited virtual key gets 503 quickly; the
        master key is admitted anyway; settlements wait in the backlog and
        are written when Redis is back.
        """
        record = self._store(_record(rpm_limit=5))

        async def go():
            (a,) = await self._admit_many(Principal(False, record), 1)
            self.server.stop()
            start = reactor.seconds()
            (b,) = await self._admit_many(Principal(False, record), 1)
            self.assertEqual(b.status, 503)
            self.assertLess(reactor.seconds() - start, 2.0)
            (m,) = await self._admit_many(MASTER, 1, end_user="frank")
            self.assertNotIsInstance(m, ProxyError)
            await self._settle(m, cost=7)
            self.assertEqual(self.ledger.pending, 1)
            self.server.start()
            for _ in range(50):
                if self.ledger.pending == 0:
                    break
                await _sleep(0.1)
            self.assertEqual(self.ledger.pending, 0)
            self.assertEqual(int(self.server.command("HGET", f"{PREFIX}spend:model:m", "spend_nanos")), 7)

        return ensureDeferred(go())


def _sleep(seconds):
    from twisted.internet.task import deferLater

    return deferLater(reactor, seconds, lambda: None)
