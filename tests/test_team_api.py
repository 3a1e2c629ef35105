"""
Teams end to end, in process: the team API (C{/team/*}) over a real
loopback socket with a real C{redis-server}, keys inheriting their team's
C{priority} and C{weight}, a team change reaching a key the proxy has
cached, and the gateway queue ordering a team's keys by the team's
priority (a deployment with a parallel cap of 1 and C{forward_priority},
so vLLM sees each call's effective priority).
"""

import json
import time

from twisted.internet import reactor
from twisted.internet.defer import ensureDeferred
from twisted.trial.unittest import TestCase

from dheera_tx.config import config_from_dict
from dheera_tx.redis.client import connect
from tests.passthrough_harness import MASTER_KEY, deployment, error_of
from tests.redis_server import RedisServer
from tests.test_gateway_keys import GatewayHarness
from tests.waiting import sleep, wait_until

CHAT = {"model": "alpha", "messages": [{"role": "user", "content": "hi"}]}


class TeamHarness(GatewayHarness):
    """
    The gateway with Redis, one model C{alpha} on the fake vLLM with a
    parallel cap of 1 and C{forward_priority: true}.
    """

    async def setUp(self):
        self.harness()
        self.server = RedisServer().start()
        self.addCleanup(self.server.cleanup)
        self.upstream = await self.fake()
        config = config_from_dict({
            "model_list": [deployment("alpha", "tiny", self.upstream, max_parallel_requests=1, forward_priority=True)],
            "general_settings": {"master_key": MASTER_KEY, "database_url": self.server.url},
        })
        gateway = self.assemble(config)
        await gateway.key_store.subscription.whenActive()

    def chats(self) -> list:
        """
        :return: the chat calls vLLM received (not the catalog's own
            C{/v1/models} calls).
        """
        return [r for r in self.upstream.received if r.uri.startswith(b"/v1/chat/completions")]

    async def priority_seen(self, key: str) -> int:
        """
        Make one chat call with C{key}.

        :return: the C{priority} vLLM received with it (0, vLLM's default,
            when the body had none: the proxy adds no field for it).
        """
        status, content = await self.call(b"POST", "/vllm/v1/chat/completions", key=key, body=CHAT)
        self.assertEqual(status, 200, content)
        return self.chats()[-1].json.get("priority", 0)

    async def assertPriorityWithin(self, key: str, expected: int, seconds: float) -> None:
        """
        Call with C{key} until vLLM sees priority C{expected}; fail if a
        call that started more than C{seconds} after this was called still
        carried another.
        """
        changed = time.monotonic()
        while True:
            started = time.monotonic() - changed
            seen = await self.priority_seen(key)
            if seen == expected:
                return
            if started > seconds:
                self.fail(f"a call made {started:.2f} s after the change still had priority {seen}")
            await sleep(0.05)


class TeamAPITests(TeamHarness, TestCase):
    """
    C{/team/new}, C{/team/update}, C{/team/info}, C{/team/list},
    C{/team/delete}.
    """

    async def redis_hash(self, name: str) -> dict:
        """
        :return: the Redis hash C{name}, read with a client of the test's
            own.
        """
        client = connect(reactor, self.server.url)
        try:
            reply = await client.execute("HGETALL", name)
        finally:
            await client.disconnect()
        return dict(zip(reply[0::2], reply[1::2]))

    async def test_round_trip(self):
        """
        A team made with every field answers them back, is stored as the
        hash C{dheera:team:<id>}, and is shown by /team/info (with the
        tokens of its keys) and /team/list; /team/update changes some
        fields and clears those given as null; /team/delete removes it
        (then /team/info is 404 and a second delete 404).
        """
        made = await self.admin("/team/new", {
            "team_id": "red", "team_alias": "Red team", "priority": 2, "weight": 3, "metadata": {"owner": "ops"},
        })
        self.assertEqual(
            {k: made[k] for k in ("team_id", "team_alias", "priority", "weight", "metadata")},
            {"team_id": "red", "team_alias": "Red team", "priority": 2, "weight": 3.0, "metadata": {"owner": "ops"}},
        )
        stored = await self.redis_hash("dheera:team:red")
        self.assertEqual((stored["priority"], stored["weight"], stored["team_alias"]), ("2", "3.0", "Red team"))
        key = await self.generate(team_id="red")
        info = await self.admin("/team/info?team_id=red", method=b"GET")
        self.assertEqual((info["team_id"], info["team_info"], info["keys"]), ("red", made, [key["token"]]))
        self.assertEqual(await self.admin("/team/list", method=b"GET"), [made])
        updated = await self.admin("/team/update", {"team_id": "red", "priority": 7, "weight": None})
        self.assertEqual((updated["priority"], updated["weight"], updated["team_alias"]), (7, None, "Red team"))
        self.assertNotIn("weight", await self.redis_hash("dheera:team:red"))
        self.assertEqual(await self.admin("/team/delete", {"team_ids": ["red", "never"]}), {"deleted_teams": ["red"]})
        status, body = await self.call(b"GET", "/team/info?team_id=red")
        self.assertEqual((status, error_of(body)["type"]), (404, "not_found_error"))
        status, _ = await self.call(b"POST", "/team/delete", body={"team_ids": ["red"]})
        self.assertEqual(status, 404)
        self.assertEqual(await self.redis_hash("dheera:team:red"), {})
        self.assertEqual(await self.admin("/team/list", method=b"GET"), [])

    async def test_generated_id_and_taken_id(self):
        """
        Without C{team_id} the team gets a new id; making a team whose id
        has a record is a 400 naming C{team_id}.
        """
        first = await self.admin("/team/new", {"team_alias": "a"})
        second = await self.admin("/team/new", {"team_alias": "b"})
        self.assertNotEqual(first["team_id"], second["team_id"])
        self.assertEqual((first["priority"], first["weight"]), (None, None))
        status, body = await self.call(b"POST", "/team/new", body={"team_id": first["team_id"]})
        self.assertEqual((status, error_of(body)["param"]), (400, "team_id"))

    async def test_errors_in_openai_shape(self):
        """
        Bad fields, unknown fields, a missing or unknown team, a wrong
        method and an unknown path each get the OpenAI error shape with the
        right status and C{param}.
        """
        cases = [
            (b"POST", "/team/new", {"priority": "high"}, 400, "priority"),
            (b"POST", "/team/new", {"weight": 0}, 400, "weight"),
            (b"POST", "/team/new", {"team_alias": 5}, 400, "team_alias"),
            (b"POST", "/team/new", {"models": ["x"]}, 400, "models"),
            (b"POST", "/team/update", {"priority": 1}, 400, "team_id"),
            (b"POST", "/team/update", {"team_id": "ghost", "priority": 1}, 404, None),
            (b"GET", "/team/info", None, 400, "team_id"),
            (b"POST", "/team/delete", {"team_ids": []}, 400, "team_ids"),
            (b"POST", "/team/delete", {"team_id": "x"}, 400, "team_id"),
            (b"GET", "/team/new", None, 405, None),
            (b"GET", "/team/nope", None, 404, None),
        ]
        for method, path, body, status, param in cases:
            got, content = await self.call(method, path, body=body)
            error = error_of(content)
            self.assertEqual((got, error["param"]), (status, param), (method, path, body, content))
            self.assertEqual(set(json.loads(content)["error"]), {"message", "type", "param", "code"})

    async def test_master_key_only(self):
        """
        Every team route refuses a virtual key with 403 and a caller
        without a key with 401, and changes nothing.
        """
        key = (await self.generate())["key"]
        calls = [
            (b"POST", "/team/new", {"team_id": "sneaky"}),
            (b"POST", "/team/update", {"team_id": "sneaky", "priority": -5}),
            (b"GET", "/team/info?team_id=sneaky", None),
            (b"GET", "/team/list", None),
            (b"POST", "/team/delete", {"team_ids": ["sneaky"]}),
        ]
        for method, path, body in calls:
            status, _ = await self.call(method, path, key=key, body=body)
            self.assertEqual(status, 403, path)
            status, _ = await self.call(method, path, key=None, body=body)
            self.assertEqual(status, 401, path)
        self.assertEqual(await self.admin("/team/list", method=b"GET"), [])

    async def test_key_of_a_team_without_record(self):
        """
        A key naming a team that has no record works, with priority 0; its
        own priority and weight show as null (not set) and can be set and
        cleared again.
        """
        key = await self.generate(team_id="ghost")
        self.assertEqual((key["priority"], key["weight"]), (None, None))
        self.assertEqual(await self.priority_seen(key["key"]), 0)
        updated = await self.admin("/key/update", {"key": key["key"], "priority": 3, "weight": 2})
        self.assertEqual((updated["priority"], updated["weight"]), (3, 2.0))
        cleared = await self.admin("/key/update", {"key": key["key"], "priority": None})
        self.assertEqual((cleared["priority"], cleared["weight"]), (None, 2.0))


class TeamInheritanceTests(TeamHarness, TestCase):
    """
    What vLLM sees of a key's effective priority as its team changes.
    """

    async def test_team_change_reaches_cached_key(self):
        """
        A key of team C{red} (setting no priority of its own) is cached by
        the proxy at priority 0; a team record made for C{red}, then its
        update, then its deletion each reach the key's next calls within a
        second (the cache entry would otherwise be trusted for 10 s).
        """
        key = (await self.generate(team_id="red"))["key"]
        self.assertEqual(await self.priority_seen(key), 0)
        self.assertEqual(await self.priority_seen(key), 0)
        await self.admin("/team/new", {"team_id": "red", "priority": 4})
        await self.assertPriorityWithin(key, 4, 1.0)
        await self.admin("/team/update", {"team_id": "red", "priority": 9})
        await self.assertPriorityWithin(key, 9, 1.0)
        await self.admin("/team/delete", {"team_ids": ["red"]})
        await self.assertPriorityWithin(key, 0, 1.0)

    async def test_other_teams_keys_stay_cached(self):
        """
        A team's change drops only its own keys from the cache: a key of
        another team keeps its cached record.
        """
        red = await self.generate(team_id="red")
        blue = await self.generate(team_id="blue")
        for key in (red["key"], blue["key"]):
            await self.priority_seen(key)
        cache = self.gateway.key_store._cache
        self.assertIn(blue["token"], cache)
        await self.admin("/team/new", {"team_id": "red", "priority": 4})
        await wait_until(lambda: red["token"] not in cache)
        self.assertIn(blue["token"], cache)

    async def test_key_value_beats_team_value(self):
        """
        A key's own priority, even 0, beats its team's.
        """
        await self.admin("/team/new", {"team_id": "red", "priority": 6})
        inherits = (await self.generate(team_id="red"))["key"]
        own = (await self.generate(team_id="red", priority=0))["key"]
        self.assertEqual(await self.priority_seen(inherits), 6)
        self.assertEqual(await self.priority_seen(own), 0)

    async def test_queue_orders_by_team_priority(self):
        """
        With the replica held by a call that never answers, a call of team
        C{batch} (priority 5) queues first, one of team C{chat} (priority
        1) next, and one of a C{batch} key with its own priority 0 last;
        when the replica frees up they reach vLLM in priority order 0, 1, 5
        (the queue's depths show those priorities).
        """
        await self.admin("/team/new", {"team_id": "batch", "priority": 5})
        await self.admin("/team/new", {"team_id": "chat", "priority": 1})
        batch = (await self.generate(team_id="batch"))["key"]
        chat = (await self.generate(team_id="chat"))["key"]
        urgent = (await self.generate(team_id="batch", priority=0))["key"]
        hog = await self.raw_connect()
        body = json.dumps(CHAT).encode()
        hog.transport.write(
            b"POST /vllm/v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer %s\r\n"
            b"x-fake-fault: hang\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
            % (MASTER_KEY.encode(), len(body), body)
        )
        await wait_until(lambda: len(self.chats()) == 1)
        flow = self.gateway.passthrough.flow
        calls = []
        for key in (batch, chat, urgent):
            calls.append(ensureDeferred(self.call(b"POST", "/vllm/v1/chat/completions", key=key, body=CHAT)))
            queued = len(calls)
            await wait_until(lambda: sum(flow.depths().values()) == queued)
        self.assertEqual(flow.depths(), {("alpha", 5): 1, ("alpha", 1): 1, ("alpha", 0): 1})
        hog.transport.abortConnection()
        for call in calls:
            status, content = await call
            self.assertEqual(status, 200, content)
        self.assertEqual([r.json.get("priority", 0) for r in self.chats()[1:]], [0, 1, 5])
