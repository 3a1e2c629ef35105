"""
Integration tests of admission under concurrency and of end users per team
(issue 13 items 5, 7 and 8): the proxy from L{dheera_tx.tap.build_gateway}
on a real redis-server, in front of L{tests.fake_vllm.FakeVLLM} over
loopback.

The fake's usage is deterministic: C{chat_body()} ("hi there", max_tokens
5) is 2 prompt and 5 completion tokens, 3400 nano-USD at the test prices.
"""

from twisted.internet.defer import ensureDeferred, gatherResults

from tests.passthrough_harness import error_of
from tests.test_gateway_spend import PREFIX, GatewayTestCase, chat_body, cost

ONE_CALL = cost(2, 5)
CONCURRENT = 20


class ConcurrentBudgetTests(GatewayTestCase):
    """
    Budgets and tpm hold when many calls of one key or end user arrive at
    once: a call's worst case is reserved at admission, so concurrent calls
    overrun a budget by at most one call's actual cost.
    """

    async def fire(self, key: str, headers=None, n: int = CONCURRENT, **fields):
        """
        Send C{n} chat calls at once (over C{n} connections) and wait for
        every answer and every settlement.

        :return: the C{(response, body)} pairs.
        """
        calls = [
            ensureDeferred(self.post("/v1/chat/completions", chat_body(**fields), key, headers=headers)) for _ in range(n)
        ]
        answers = await gatherResults(calls)
        admitted = sum(1 for response, _ in answers if response.code == 200)
        await self.settled(requests=admitted)
        await self.wait_for(lambda: not self.gateway.ledger.pending, 2.0, "settlements written")
        return answers

    def assertRefusedForBudget(self, answers, type: str = "budget_exceeded") -> int:
        """
        Assert every answer is a 200 or a 429 of C{type}.

        :return: how many were 200.
        """
        admitted = 0
        for response, body in answers:
            if response.code == 200:
                admitted += 1
            else:
                self.assertLimited(response, body, type)
        return admitted

    def reserved(self, holder: str) -> dict:
        """
        :return: the live reservation sums of a holder (C{key:<token>} or an
            end user's hash name), zero when none (they are kept negated,
            beside the calls in flight, in the hash C{reserved:<holder>}).
        """
        name = f"{PREFIX}reserved:{holder}"
        return {s: int(float(self.redis_server.command("HGET", name, s) or 0)) for s in ("nanos", "tokens")}

    async def test_concurrent_calls_hold_key_budget(self):
        """
        20 concurrent calls on a key with max_budget 10000 nano-USD (three
        calls' worth) spend at most the budget plus one call's cost; the
        calls refused get 429 C{budget_exceeded} and never reach the
        upstream; once all are settled nothing stays reserved.
        """
        budget = 10_000
        key, token = await self.new_key(max_budget=budget / 1e9)
        answers = await self.fire(key)
        admitted = self.assertRefusedForBudget(answers)
        spend = await self.key_spend(token)
        self.assertLessEqual(spend, budget + ONE_CALL)
        self.assertGreaterEqual(admitted, 1)
        self.assertEqual(spend, admitted * ONE_CALL)
        self.assertEqual(len(self.upstream.received), admitted)
        self.assertEqual(self.reserved(f"key:{token}"), {"nanos": 0, "tokens": 0})

    async def test_concurrent_calls_share_a_larger_budget(self):
        """
        With a budget of about two and a half worst cases (50000 nano-USD;
        a call reserves 20400 and costs 3400), several of 20 concurrent
        calls are admitted together, and still the spend stays within the
        budget plus one call's cost.
        """
        budget = 50_000
        key, token = await self.new_key(max_budget=budget / 1e9)
        answers = await self.fire(key)
        admitted = self.assertRefusedForBudget(answers)
        spend = await self.key_spend(token)
        self.assertGreaterEqual(admitted, 2)
        self.assertEqual(spend, admitted * ONE_CALL)
        self.assertLessEqual(spend, budget + ONE_CALL)

    async def test_concurrent_calls_hold_end_user_budget(self):
        """
        20 concurrent calls for one end user with max_budget 10000 nano-USD
        (from keys without a budget) spend at most the budget plus one
        call's cost.
        """
        budget = 10_000
        status, answer = await self.admin("POST", "/end_user/new", {"user_id": "eve", "max_budget": budget / 1e9})
        self.assertEqual(status, 200, answer)
        key, _ = await self.new_key()
        answers = await self.fire(key, headers={"x-dheera-end-user": "eve"})
        admitted = self.assertRefusedForBudget(answers)
        status, info = await self.admin("GET", "/end_user/info?end_user_id=eve")
        self.assertLessEqual(info["spend_nanos"], budget + ONE_CALL)
        self.assertEqual(info["spend_nanos"], admitted * ONE_CALL)
        self.assertEqual(self.reserved("end_user:eve"), {"nanos": 0, "tokens": 0})

    async def test_concurrent_calls_hold_tpm(self):
        """
        20 concurrent calls of 7 tokens each on a key with tpm_limit 20
        count at most 20 + 7 tokens in the window; the refused ones get 429
        C{rate_limit_error}.
        """
        key, token = await self.new_key(tpm_limit=20)
        answers = await self.fire(key)
        admitted = self.assertRefusedForBudget(answers, "rate_limit_error")
        counted = int(self.redis_server.command("GET", f"{PREFIX}rl:tpm:{token}") or 0)
        self.assertEqual(counted, 7 * admitted)
        self.assertLessEqual(counted, 20 + 7)
        self.assertEqual(self.reserved(f"key:{token}"), {"nanos": 0, "tokens": 0})

    async def test_failed_call_releases_reservation(self):
        """
        A call the upstream refuses (500) releases its reservation: nothing
        stays reserved and the next call is admitted.
        """
        key, token = await self.new_key(max_budget=0.00001)
        response, _ = await self.post("/v1/chat/completions", chat_body(), key, headers={"x-fake-fault": "status=500"})
        self.assertEqual(response.code, 500)
        await self.wait_for(lambda: self.reserved(f"key:{token}")["nanos"] == 0, 2.0, "reservation released")
        response, body = await self.post("/v1/chat/completions", chat_body(), key)
        self.assertEqual(response.code, 200, body)

    async def test_reservation_held_while_in_flight(self):
        """
        While a call is in flight its worst case (prompt estimate plus
        max_tokens, at the highest price) is reserved on its key; a call of
        the same key that arrives meanwhile is refused when spend plus the
        reservations reach the budget, and admitted again once the first
        call settled (its true cost, 3400, leaves room).
        """
        key, token = await self.new_key(max_budget=0.0001)
        client = await self.raw_stream(chat_body(stream=True, max_tokens=200), key, "slow_first_byte=0.5,chunks=5")
        await self.upstream.wait_for_requests(1)
        held = self.reserved(f"key:{token}")
        self.assertGreaterEqual(held["nanos"], 200 * 600)
        self.assertGreaterEqual(held["tokens"], 200)
        response, body = await self.post("/v1/chat/completions", chat_body(), key)
        self.assertLimited(response, body, "budget_exceeded")
        await self.wait_for(lambda: b"[DONE]" in client.data, 5.0, "stream done")
        await self.wait_for(lambda: self.reserved(f"key:{token}")["nanos"] == 0, 2.0, "reservation released")
        response, body = await self.post("/v1/chat/completions", chat_body(), key)
        self.assertEqual(response.code, 200, body)


class EndUserScopeTests(GatewayTestCase):
    """
    End users are scoped to the calling key's team: the same id in two
    teams is two end users, with their own spend, budget and block.
    """

    async def call_as(self, key: str, user: str):
        return await self.post("/v1/chat/completions", chat_body(), key, headers={"x-dheera-end-user": user})

    async def test_tenant_cannot_spend_another_teams_end_user(self):
        """
        Team blue's end user C{alice} has a budget of two calls; team red
        sending C{user: alice} many times spends red's own C{alice}, never
        blue's: blue's calls keep being admitted until blue itself reaches
        the budget.
        """
        status, answer = await self.admin(
            "POST", "/end_user/new", {"user_id": "alice", "team_id": "blue", "max_budget": 2 * ONE_CALL / 1e9}
        )
        self.assertEqual(status, 200, answer)
        self.assertEqual(answer["team_id"], "blue")
        red, _ = await self.new_key(team_id="red")
        blue, _ = await self.new_key(team_id="blue")
        for _ in range(4):
            response, body = await self.post("/v1/chat/completions", chat_body(user="alice"), red)
            self.assertEqual(response.code, 200, body)
        await self.settled(requests=4)
        status, info = await self.admin("GET", "/end_user/info?end_user_id=alice&team_id=blue")
        self.assertEqual((status, info["spend_nanos"]), (200, 0))
        status, info = await self.admin("GET", "/end_user/info?end_user_id=alice&team_id=red")
        self.assertEqual((status, info["spend_nanos"], info["team_id"]), (200, 4 * ONE_CALL, "red"))
        for n in (1, 2):
            response, body = await self.call_as(blue, "alice")
            self.assertEqual(response.code, 200, body)
            await self.settled(requests=4 + n)
        response, body = await self.call_as(blue, "alice")
        self.assertLimited(response, body, "budget_exceeded")
        # Red's alice has no budget: still admitted.
        response, body = await self.call_as(red, "alice")
        self.assertEqual(response.code, 200, body)

    async def test_block_applies_to_one_team(self):
        """
        Blocking C{mallory} in team red refuses her calls from red's keys
        (403) and from no one else's: keys of team blue and keys without a
        team (the default scope) still get through.
        """
        status, answer = await self.admin("POST", "/end_user/block", {"user_ids": ["mallory"], "team_id": "red"})
        self.assertEqual(status, 200, answer)
        red, _ = await self.new_key(team_id="red")
        blue, _ = await self.new_key(team_id="blue")
        teamless, _ = await self.new_key()
        response, body = await self.call_as(red, "mallory")
        self.assertEqual(response.code, 403, body)
        error_of(body)
        for key in (blue, teamless):
            response, body = await self.call_as(key, "mallory")
            self.assertEqual(response.code, 200, body)
        status, answer = await self.admin("POST", "/end_user/unblock", {"user_id": "mallory", "team_id": "red"})
        self.assertEqual(status, 200, answer)
        response, body = await self.call_as(red, "mallory")
        self.assertEqual(response.code, 200, body)

    async def test_end_user_api_addresses_a_scope(self):
        """
        /end_user/new, info, update and delete take C{team_id}; without it
        they address the default scope, which a team's end user is not in.
        """
        status, answer = await self.admin("POST", "/end_user/new", {"user_id": "bob", "team_id": "red", "max_budget": 1.0})
        self.assertEqual(status, 200, answer)
        status, _ = await self.admin("GET", "/end_user/info?end_user_id=bob")
        self.assertEqual(status, 404)
        status, answer = await self.admin("POST", "/end_user/new", {"user_id": "bob", "max_budget": 2.0})
        self.assertEqual((status, answer["team_id"]), (200, None), answer)
        status, answer = await self.admin("POST", "/end_user/update", {"user_id": "bob", "team_id": "red", "max_budget": 3.0})
        self.assertEqual((status, answer["max_budget"]), (200, 3.0), answer)
        status, answer = await self.admin("GET", "/end_user/info?end_user_id=bob")
        self.assertEqual(answer["max_budget"], 2.0)
        status, answer = await self.admin("POST", "/end_user/delete", {"user_id": "bob", "team_id": "red"})
        self.assertEqual(status, 200, answer)
        status, _ = await self.admin("GET", "/end_user/info?end_user_id=bob&team_id=red")
        self.assertEqual(status, 404)
        status, _ = await self.admin("GET", "/end_user/info?end_user_id=bob")
        self.assertEqual(status, 200)

    async def test_spend_report_per_team(self):
        """
        /spend/report?group_by=end_user lists each end user with its
        team_id; with C{team_id} it lists only that team's end users;
        C{team_id} with another grouping, or empty, is a 400.
        """
        red, _ = await self.new_key(team_id="red:one")
        teamless, _ = await self.new_key()
        for key in (red, teamless):
            response, _ = await self.call_as(key, "carol")
            self.assertEqual(response.code, 200)
        await self.settled(requests=2)
        status, report = await self.admin("GET", "/spend/report?group_by=end_user")
        self.assertEqual(status, 200, report)
        rows = sorted((row["id"], row["team_id"] or "", row["spend_nanos"]) for row in report["spend"])
        self.assertEqual(rows, [("carol", "", ONE_CALL), ("carol", "red:one", ONE_CALL)])
        self.assertIsNone([r for r in report["spend"] if r["team_id"] != "red:one"][0]["team_id"])
        status, report = await self.admin("GET", "/spend/report?group_by=end_user&team_id=red:one")
        self.assertEqual([(r["id"], r["team_id"]) for r in report["spend"]], [("carol", "red:one")])
        for query in ("group_by=model&team_id=red:one", "group_by=end_user&team_id="):
            status, answer = await self.admin("GET", "/spend/report?" + query)
            self.assertEqual((status, answer["error"]["param"]), (400, "team_id"), query)

    async def test_unscoped_hash_of_older_versions_is_the_default_scope(self):
        """
        An end user hash written by an older version (C{end_user:<id>})
        is the end user of the default scope: its budget applies to keys
        without a team and /end_user/info without team_id shows it.
        """
        self.redis_server.command("HSET", f"{PREFIX}end_user:legacy", "spend_nanos", "5000", "max_budget", "0.000001")
        teamless, _ = await self.new_key()
        red, _ = await self.new_key(team_id="red")
        response, body = await self.call_as(teamless, "legacy")
        self.assertLimited(response, body, "budget_exceeded")
        response, body = await self.call_as(red, "legacy")
        self.assertEqual(response.code, 200, body)
        status, info = await self.admin("GET", "/end_user/info?end_user_id=legacy")
        self.assertEqual((status, info["spend_nanos"]), (200, 5000))


class EndUserStateTests(GatewayTestCase):
    """
    End users seen only in traffic leave expiring state, and at most
    C{max_new_end_users_per_day} new ones per team per day; the rest are
    counted under one overflow id.
    """

    general_settings = {"max_new_end_users_per_day": 3, "end_user_ttl_days": 2}

    def ttl(self, name: str) -> int:
        return self.redis_server.command("TTL", PREFIX + name)

    async def test_traffic_end_user_expires(self):
        """
        An end user seen only in a call has a hash that expires (2 days
        here); one made with /end_user/new does not, and making a traffic
        end user with /end_user/new keeps its spend and stops its expiry.
        """
        key, _ = await self.new_key()
        response, _ = await self.post("/v1/chat/completions", chat_body(user="drifter"), key)
        self.assertEqual(response.code, 200)
        await self.settled()
        self.assertTrue(0 < self.ttl("end_user:drifter") <= 2 * 86400, self.ttl("end_user:drifter"))
        status, answer = await self.admin("POST", "/end_user/new", {"user_id": "drifter"})
        self.assertEqual((status, answer["spend_nanos"]), (200, ONE_CALL), answer)
        self.assertEqual(self.ttl("end_user:drifter"), -1)
        response, _ = await self.post("/v1/chat/completions", chat_body(user="drifter"), key)
        await self.settled(requests=2)
        self.assertEqual(self.ttl("end_user:drifter"), -1)

    async def test_new_end_users_capped_per_team_per_day(self):
        """
        With a cap of 3, six new end user ids from team red leave three
        end user hashes; the other three calls are billed to the team's
        overflow end user; team blue has its own cap.
        """
        red, _ = await self.new_key(team_id="red")
        blue, _ = await self.new_key(team_id="blue")
        for i in range(6):
            response, body = await self.post("/v1/chat/completions", chat_body(user=f"u{i}"), red)
            self.assertEqual(response.code, 200, body)
        response, body = await self.post("/v1/chat/completions", chat_body(user="u0"), blue)
        self.assertEqual(response.code, 200, body)
        await self.settled(requests=7)
        names = self.redis_server.command("KEYS", f"{PREFIX}team:red:end_user:*")
        self.assertEqual(
            sorted(n[len(PREFIX):] for n in names),
            ["team:red:end_user:__overflow__", "team:red:end_user:u0", "team:red:end_user:u1", "team:red:end_user:u2"],
        )
        self.assertEqual(self.hash("team:red:end_user:__overflow__")["spend_nanos"], 3 * ONE_CALL)
        self.assertEqual(self.hash("team:blue:end_user:u0")["spend_nanos"], ONE_CALL)
        status, report = await self.admin("GET", "/spend/report?group_by=end_user&team_id=red")
        self.assertEqual(
            sorted((r["id"], r["requests"]) for r in report["spend"]),
            [("__overflow__", 3), ("u0", 1), ("u1", 1), ("u2", 1)],
        )
        # A known id is not new: it is still its own end user.
        response, _ = await self.post("/v1/chat/completions", chat_body(user="u1"), red)
        await self.settled(requests=8)
        self.assertEqual(self.hash("team:red:end_user:u1")["spend_nanos"], 2 * ONE_CALL)
