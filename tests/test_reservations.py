"""
Tests for worst-case reservations at admission
(L{dheera_tx.accounting.reservation}, the reservation parts of the
admission and settlement scripts) and for end users scoped per team with
expiring, capped state, against a real Redis with an injected clock.
"""

import attr
from twisted.internet import reactor
from twisted.internet.defer import ensureDeferred, gatherResults
from twisted.trial.unittest import SynchronousTestCase, TestCase

from dheera_tx.accounting.end_users import end_user_name, end_user_report_id, parse_end_user_report_id
from dheera_tx.accounting.limits import CallLimiter
from dheera_tx.accounting.reservation import Reservation, completion_tokens, worst_case
from dheera_tx.accounting.spend import Settlement, SpendLedger
from dheera_tx.config import Deployment
from dheera_tx.errors import ProxyError
from dheera_tx.keys.auth import MASTER, Principal
from tests.redis_server import redis_for
from tests.test_limits import PREFIX, _record

STALE_AFTER = 30.0
CHAT = b"/v1/chat/completions"


def _deployment(input_cost: float, output_cost: float) -> Deployment:
    return Deployment("m", "m", "http://127.0.0.1:1", input_cost_per_token=input_cost, output_cost_per_token=output_cost)


class WorstCaseTests(SynchronousTestCase):
    """
    What a call reserves, from its request alone.
    """

    def test_max_tokens_and_prompt_bytes(self):
        """
        A chat call reserves its JSON body's bytes / 3 (rounded up) plus its
        max_tokens, at the highest per-token price of its replicas.
        """
        replicas = [_deployment(0.0000002, 0.0000006), _deployment(0.000001, 0.0000005)]
        r = worst_case(CHAT, {"max_tokens": 10}, 31, replicas, 4096)
        self.assertEqual(r, Reservation(nanos=(11 + 10) * 1000, tokens=11 + 10))

    def test_limit_fields_and_choices(self):
        """
        max_completion_tokens and max_output_tokens count as max_tokens;
        C{n} (or C{best_of}) multiplies them.
        """
        self.assertEqual(completion_tokens(CHAT, {"max_completion_tokens": 7, "n": 3}, 4096), 21)
        self.assertEqual(completion_tokens(b"/v1/responses", {"max_output_tokens": 9}, 4096), 9)
        self.assertEqual(completion_tokens(b"/v1/completions", {"max_tokens": 2, "best_of": 5, "n": 2}, 4096), 10)

    def test_default_only_on_generating_routes(self):
        """
        Without a limit (or with a malformed one), a generating route
        reserves the configured default; embeddings, tokenize and other
        routes that never generate reserve no completion.
        """
        self.assertEqual(completion_tokens(CHAT, {"max_tokens": "many"}, 4096), 4096)
        self.assertEqual(completion_tokens(b"/v1/audio/transcriptions", None, 100), 100)
        self.assertEqual(completion_tokens(b"/v1/embeddings", {"input": "x"}, 4096), 0)
        self.assertEqual(completion_tokens(b"/tokenize", {"prompt": "x"}, 4096), 0)

    def test_absurd_requests_stay_exact_in_lua(self):
        """
        A request naming a huge C{n} reserves a bounded amount that Lua's
        doubles hold exactly (and that is over any budget).
        """
        r = worst_case(CHAT, {"max_tokens": 10**9, "n": 10**9}, 0, [_deployment(1.0, 1.0)], 4096)
        self.assertLessEqual(r.tokens, 2**53)
        self.assertLessEqual(r.nanos, 2**53)


class EndUserNameTests(SynchronousTestCase):
    """
    End user hash names and report ids per scope.
    """

    def test_names(self):
        """
        The default scope keeps the unscoped name of older versions; a
        team's name escapes C{%} and C{:} so that no two scopes share a name.
        """
        self.assertEqual(end_user_name("alice", None), "end_user:alice")
        self.assertEqual(end_user_name("alice", "red"), "team:red:end_user:alice")
        self.assertNotEqual(end_user_name("b:c", "a"), end_user_name("c", "a:b"))
        self.assertEqual(end_user_name("c", "a:b%"), "team:a%3Ab%25:end_user:c")

    def test_report_ids_read_back(self):
        """
        Report ids read back as the scope and id they were made of.
        """
        for team, user in ((None, "x:y"), ("a:b%3A", "c:d"), ("red", "alice")):
            group, _, ident = end_user_report_id(user, team).partition(":")
            self.assertEqual(parse_end_user_report_id(group, ident), (team, user))


class ReservationScriptTests(TestCase):
    """
    Reservations held and released by the admission and settlement scripts.
    """

    def setUp(self):
        self.server, self.redis = redis_for(self)
        self.now = [1_800_000_000.0]
        self.limiter = CallLimiter(
            self.redis, PREFIX, lambda: self.now[0], stale_after=STALE_AFTER, reactor=reactor, new_end_users_per_day=2
        )
        self.ledger = SpendLedger(self.redis, PREFIX, self.limiter, reactor)

    def _store(self, record):
        fields = record.to_redis_hash()
        self.server.command("HSET", f"{PREFIX}key:{record.token}", *[x for kv in fields.items() for x in kv])
        return record

    async def _admit(self, principal, call_id, reservation, end_user=None):
        try:
            return await self.limiter.admit(principal, end_user, call_id, reservation)
        except ProxyError as e:
            return e

    def _settle(self, admission, cost=0, prompt=0, completion=0, billable=True):
        return self.ledger.settle(
            Settlement(admission, cost, prompt, completion, None, None, "m", self.now[0], billable=billable)
        )

    def reserved(self, holder: str) -> dict:
        name = f"{PREFIX}reserved:{holder}"
        return {s: int(float(self.server.command("HGET", name, s) or 0)) for s in ("nanos", "tokens")}

    def test_budget_counts_reservations_in_flight(self):
        """
        With max_budget 1000 nano-USD, a call reserving 600 is admitted
        alone (its own reservation is not counted: it may overrun the budget
        by its own cost), a second is admitted (0 + 600 < 1000), a third is
        refused (0 + 1200 >= 1000); settling the first at its true cost 100
        makes room again (100 + 600 < 1000).
        """
        record = self._store(_record(max_budget=0.000001))
        principal = Principal(False, record)
        r = Reservation(600, 10)

        async def go():
            first = await self._admit(principal, "c1", r)
            second = await self._admit(principal, "c2", r)
            self.assertNotIsInstance(first, ProxyError)
            self.assertNotIsInstance(second, ProxyError)
            third = await self._admit(principal, "c3", r)
            self.assertEqual((third.status, third.type), (429, "budget_exceeded"))
            self.assertEqual(self.reserved(f"key:{record.token}"), {"nanos": 1200, "tokens": 20})
            await self._settle(first, cost=100)
            self.assertEqual(self.reserved(f"key:{record.token}"), {"nanos": 600, "tokens": 10})
            fourth = await self._admit(principal, "c4", r)
            self.assertNotIsInstance(fourth, ProxyError)

        return ensureDeferred(go())

    def test_unbatched_admission_reserves_alike(self):
        """
        A limiter without a reactor (one script run per call) holds and
        counts reservations as the batched one does.
        """
        record = self._store(_record(max_budget=0.000001))
        principal = Principal(False, record)
        limiter = CallLimiter(self.redis, PREFIX, lambda: self.now[0], stale_after=STALE_AFTER)

        async def go():
            first = await limiter.admit(principal, "u", "c1", Reservation(600, 10))
            self.assertEqual(first.reservation_member, "c1|600|10")
            await limiter.admit(principal, "u", "c2", Reservation(600, 10))
            with self.assertRaises(ProxyError) as refused:
                await limiter.admit(principal, "u", "c3", Reservation(600, 10))
            self.assertEqual(refused.exception.type, "budget_exceeded")
            self.assertEqual(self.reserved(f"key:{record.token}"), {"nanos": 1200, "tokens": 20})
            self.assertTrue(0 < self.server.command("TTL", f"{PREFIX}team:red:end_user:u") <= limiter.end_user_ttl)

        return ensureDeferred(go())

    def test_alone_a_large_reservation_is_admitted(self):
        """
        A call whose worst case is far over the budget left is admitted
        when nothing else is in flight and spend is under the budget: the
        least restrictive rule that bounds the overrun by one call's cost.
        """
        record = self._store(_record(max_budget=0.000001, spend_nanos=900))
        principal = Principal(False, record)

        async def go():
            alone = await self._admit(principal, "big", Reservation(10**9, 10**6))
            self.assertNotIsInstance(alone, ProxyError)

        return ensureDeferred(go())

    def test_tpm_counts_reservations_in_flight(self):
        """
        With tpm_limit 100, calls reserving 60 tokens: the second is
        refused while the first is in flight, with a Retry-After of about a
        second (only calls in flight fill the window), and admitted once
        the first settled at 10 tokens.
        """
        record = self._store(_record(tpm_limit=100))
        principal = Principal(False, record)
        r = Reservation(0, 60)

        async def go():
            first = await self._admit(principal, "c1", r)
            second = await self._admit(principal, "c2", r)
            self.assertNotIsInstance(first, ProxyError)
            self.assertNotIsInstance(second, ProxyError)
            third = await self._admit(principal, "c3", r)
            self.assertEqual(third.status, 429)
            self.assertEqual(third.headers["Retry-After"], "1")
            await self._settle(first, prompt=4, completion=6)
            await self._settle(second, prompt=4, completion=6)
            fourth = await self._admit(principal, "c4", r)
            self.assertNotIsInstance(fourth, ProxyError)

        return ensureDeferred(go())

    def test_crashed_proxy_reservation_lapses(self):
        """
        A reservation never settled (its proxy crashed) holds the budget
        until the longest call timeout has passed (30 s here), then lapses:
        the next admission drops it and is admitted.
        """
        record = self._store(_record(max_budget=0.000001))
        principal = Principal(False, record)
        r = Reservation(5000, 10)

        async def go():
            await self._admit(principal, "lost", r)
            self.now[0] += STALE_AFTER - 1
            refused = await self._admit(principal, "c2", r)
            self.assertEqual(refused.type, "budget_exceeded")
            self.now[0] += 2
            admitted = await self._admit(principal, "c3", r)
            self.assertNotIsInstance(admitted, ProxyError)
            self.assertEqual(self.reserved(f"key:{record.token}"), {"nanos": 5000, "tokens": 10})
            ttl = self.server.command("TTL", f"{PREFIX}reserved:key:{record.token}")
            self.assertTrue(0 < ttl <= STALE_AFTER, ttl)

        return ensureDeferred(go())

    def held(self, holder: str) -> dict:
        """
        :return: the reservation hash of a holder, numbers read as floats.
        """
        fields = self.server.command("HGETALL", f"{PREFIX}reserved:{holder}") or []
        return {k: float(v) for k, v in zip(fields[::2], fields[1::2])}

    def test_lapse_among_live_reservations(self):
        """
        Reservations made at t0, t0+10 and t0+20 (the second settled): at
        t0+31 the first has lapsed and is dropped, the third still counts,
        and C{due} moves to the third's deadline, t0+50; before that no
        reservation lapses; at t0+51 the third lapses too.
        """
        record = self._store(_record(max_budget=1.0))
        principal = Principal(False, record)
        r = Reservation(5000, 10)
        t0 = self.now[0]
        holder = f"key:{record.token}"

        async def go():
            await self._admit(principal, "a", r)
            self.now[0] = t0 + 10
            b = await self._admit(principal, "b", r)
            self.now[0] = t0 + 20
            await self._admit(principal, "c", r)
            await self._settle(b, cost=1)
            self.assertEqual(self.held(holder)["due"], t0 + STALE_AFTER)
            self.now[0] = t0 + 31
            await self._admit(principal, "d", r)
            self.assertEqual(
                self.held(holder),
                {"c|5000|10": t0 + 50, "d|5000|10": t0 + 61, "nanos": 10000, "tokens": 20, "due": t0 + 50},
            )
            self.now[0] = t0 + 49
            await self._admit(principal, "e", r)
            self.assertEqual(self.reserved(holder), {"nanos": 15000, "tokens": 30})
            self.now[0] = t0 + 51
            await self._admit(principal, "f", r)
            self.assertEqual(self.reserved(holder), {"nanos": 15000, "tokens": 30})
            self.assertEqual(
                sorted(m for m in self.held(holder) if "|" in m), ["d|5000|10", "e|5000|10", "f|5000|10"]
            )
            self.assertEqual(self.held(holder)["due"], t0 + 61)

        return ensureDeferred(go())

    def test_settled_earliest_leaves_due_behind(self):
        """
        When the reservation C{due} stood for was settled, the look for
        lapsed reservations once C{due} passes finds none, takes nothing
        from the sums, and moves C{due} to the earliest deadline left.
        """
        record = self._store(_record(max_budget=1.0))
        principal = Principal(False, record)
        r = Reservation(5000, 10)
        t0 = self.now[0]
        holder = f"key:{record.token}"

        async def go():
            a = await self._admit(principal, "a", r)
            self.now[0] = t0 + 5
            await self._admit(principal, "b", r)
            await self._settle(a, cost=1)
            self.assertEqual(self.held(holder)["due"], t0 + STALE_AFTER)
            self.now[0] = t0 + STALE_AFTER + 1
            await self._admit(principal, "c", r)
            self.assertEqual(self.reserved(holder), {"nanos": 10000, "tokens": 20})
            self.assertEqual(self.held(holder)["due"], t0 + 5 + STALE_AFTER)

        return ensureDeferred(go())

    def test_calls_of_one_batch_see_each_other(self):
        """
        Five calls of one key admitted in one script run (one reactor
        turn), budget 1000 nano-USD, 600 reserved each: the first two are
        admitted (0, then 600, under the budget), the other three refused
        (1200 reserved by the two before them in the same run); the two
        admitted hold their reservations.
        """
        record = self._store(_record(max_budget=0.000001))
        principal = Principal(False, record)
        self.server.command("CONFIG", "RESETSTAT")

        async def go():
            results = await gatherResults(
                [ensureDeferred(self._admit(principal, f"c{i}", Reservation(600, 10))) for i in range(5)]
            )
            refused = [x for x in results if isinstance(x, ProxyError)]
            self.assertEqual([x.type for x in refused], ["budget_exceeded"] * 3)
            self.assertEqual([x.call_id for x in results[:2]], ["c0", "c1"])
            stats = self.server.command("INFO", "commandstats")
            self.assertIn("cmdstat_evalsha:calls=1,", stats)
            self.assertEqual(self.reserved(f"key:{record.token}"), {"nanos": 1200, "tokens": 20})
            self.assertEqual(
                sorted(m for m in self.held(f"key:{record.token}") if "|" in m), ["c0|600|10", "c1|600|10"]
            )

        return ensureDeferred(go())

    def test_release_is_idempotent(self):
        """
        Settling a call whose reservation already lapsed takes nothing back
        twice; a reservation released by a lost admission's clean-up and
        then by its settlement is released once.
        """
        record = self._store(_record(max_budget=0.001))
        principal = Principal(False, record)
        r = Reservation(5000, 10)

        async def go():
            late = await self._admit(principal, "late", r)
            self.now[0] += STALE_AFTER + 1
            other = await self._admit(principal, "other", r)
            self.assertEqual(self.reserved(f"key:{record.token}")["nanos"], 5000)
            await self._settle(late, cost=7)
            self.assertEqual(self.reserved(f"key:{record.token}")["nanos"], 5000)
            await self._settle(other, billable=False)
            await self._settle(other, cost=7)
            self.assertEqual(self.reserved(f"key:{record.token}"), {"nanos": 0, "tokens": 0})
            self.assertEqual(self.server.command("EXISTS", f"{PREFIX}reserved:key:{record.token}"), 0)
            self.assertEqual(int(self.server.command("HGET", f"{PREFIX}key:{record.token}", "spend_nanos")), 14)

        return ensureDeferred(go())

    def test_lost_admission_reply_releases_reservation(self):
        """
        When an admission's reply is lost (503), the clean-up settlement
        takes back the reservation it may have made.
        """
        record = self._store(_record(max_budget=0.001))
        principal = Principal(False, record)
        r = Reservation(5000, 10)

        async def go():
            await self._admit(principal, "lost-reply", r)
            self.ledger.release_lost_slot(self.limiter.admission_of(principal, None, "lost-reply", r))
            await self.ledger.flush()
            self.assertEqual(self.reserved(f"key:{record.token}"), {"nanos": 0, "tokens": 0})

        return ensureDeferred(go())

    def test_end_user_reservation_only_with_a_budget(self):
        """
        An end user with a budget holds reservations (and counts them); one
        without holds none.
        """
        self.server.command("HSET", f"{PREFIX}end_user:rich", "max_budget", "1", "created_at", "1")
        r = Reservation(5000, 10)

        async def go():
            rich = await self._admit(MASTER, "c1", r, end_user="rich")
            await self._admit(MASTER, "c2", r, end_user="plain")
            self.assertEqual(self.reserved("end_user:rich"), {"nanos": 5000, "tokens": 10})
            self.assertEqual(self.server.command("EXISTS", f"{PREFIX}reserved:end_user:plain"), 0)
            await self._settle(rich, cost=1)
            self.assertEqual(self.reserved("end_user:rich"), {"nanos": 0, "tokens": 0})

        return ensureDeferred(go())

    def test_new_end_users_overflow_per_team(self):
        """
        With a cap of 2 new ids a team a day, the third new id of team red
        is admitted as red's overflow end user (whose block applies to it);
        a known id is never overflowed; team blue and the next day have
        their own counts.
        """
        red = self._store(_record(token="r" * 64, team_id="red"))
        blue = self._store(_record(token="b" * 64, team_id="blue"))
        as_red, as_blue = Principal(False, red), Principal(False, blue)

        async def go():
            a = await self._admit(as_red, "1", Reservation(), "a")
            b = await self._admit(as_red, "2", Reservation(), "b")
            c = await self._admit(as_red, "3", Reservation(), "c")
            self.assertEqual([x.end_user for x in (a, b, c)], ["a", "b", "__overflow__"])
            self.assertEqual((await self._admit(as_red, "4", Reservation(), "a")).end_user, "a")
            self.assertEqual((await self._admit(as_blue, "5", Reservation(), "c")).end_user, "c")
            self.server.command("HSET", f"{PREFIX}team:red:end_user:__overflow__", "blocked", "1")
            refused = await self._admit(as_red, "6", Reservation(), "d")
            self.assertEqual(refused.status, 403)
            self.now[0] += 86400
            self.assertEqual((await self._admit(as_red, "7", Reservation(), "e")).end_user, "e")
            self.assertEqual(attr.evolve(c, end_user="x").team_id, "red")

        return ensureDeferred(go())

    def test_traffic_end_user_ttl_refreshed(self):
        """
        An end user seen only in traffic expires C{end_user_ttl} after its
        last call (each call sets the TTL again); a managed one (with
        created_at) never gets a TTL.
        """
        self.server.command("HSET", f"{PREFIX}end_user:managed", "created_at", "1")

        async def go():
            await self._admit(MASTER, "1", Reservation(), "passing")
            name = f"{PREFIX}end_user:passing"
            self.assertTrue(0 < self.server.command("TTL", name) <= self.limiter.end_user_ttl)
            self.server.command("EXPIRE", name, 5)
            await self._admit(MASTER, "2", Reservation(), "passing")
            self.assertGreater(self.server.command("TTL", name), 5)
            await self._admit(MASTER, "3", Reservation(), "managed")
            self.assertEqual(self.server.command("TTL", f"{PREFIX}end_user:managed"), -1)

        return ensureDeferred(go())
