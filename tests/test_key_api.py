"""
Tests for L{dheera_tx.keys.api}: the admin API over HTTP on a loopback port,
with a real Redis behind it.
"""

import json
import time

from treq.client import HTTPClient
from twisted.internet import reactor
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial.unittest import TestCase
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.http_headers import Headers
from twisted.web.server import Site

from dheera_tx.errors import ProxyError
from dheera_tx.keys.api import KeyAPI
from dheera_tx.keys.auth import Authenticator
from dheera_tx.keys.cache import CachedKeyStore
from dheera_tx.keys.records import hash_key
from dheera_tx.keys.store import RedisKeyStore
from dheera_tx.redis.client import connect
from tests.redis_server import RedisServer

MASTER = "sk-master-0123456789"
T0 = 1_700_000_000.0

ADMIN_ROUTES = [
    ("POST", "/key/generate"),
    ("POST", "/key/update"),
    ("POST", "/key/delete"),
    ("GET", "/key/list"),
    ("POST", "/key/regenerate"),
    ("POST", "/key/block"),
    ("POST", "/key/unblock"),
    ("POST", "/end_user/new"),
    ("GET", "/end_user/info?end_user_id=x"),
    ("POST", "/end_user/update"),
    ("POST", "/end_user/block"),
    ("POST", "/end_user/unblock"),
    ("POST", "/end_user/delete"),
]


class KeyAPITests(TestCase):
    """
    The /key/ and /end_user/ routes, end to end.
    """

    def setUp(self):
        self.server = RedisServer().start()
        self.addCleanup(self.server.cleanup)
        self.time = [T0]
        now = lambda: self.time[0]  # noqa: E731
        self.redis = connect(reactor, self.server.url)
        self.addCleanup(self.redis.disconnect)
        self.store = CachedKeyStore(RedisKeyStore(self.redis, "dheera:", now=now), self.redis, reactor)
        self.addCleanup(self.store.close)
        self.auth = Authenticator(MASTER, key_store=self.store, now=now)
        site = Site(KeyAPI(self.auth, self.store, now=now).app.resource())
        # The access log is the site's business (the lead's), not this API's.
        site.log = lambda request: None
        self.port = reactor.listenTCP(0, site, interface="127.0.0.1")
        self.addCleanup(self.port.stopListening)
        pool = HTTPConnectionPool(reactor, persistent=False)
        self.addCleanup(pool.closeCachedConnections)
        self.http = HTTPClient(Agent(reactor, pool=pool))
        self.logged = []
        observer = lambda event: self.logged.append(formatEvent(event) or "")  # noqa: E731
        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)

    async def call(self, method, path, body=None, key=MASTER, raw=None):
        """
        Make one request.

        :return: C{(status, decoded JSON answer)}.
        """
        headers = {b"content-type": [b"application/json"]}
        if key is not None:
            headers[b"authorization"] = [b"Bearer " + key.encode()]
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        url = f"http://127.0.0.1:{self.port.getHost().port}{path}"
        response = await self.http.request(method, url, data=data, headers=headers)
        content = await response.content()
        self.assertEqual(response.headers.getRawHeaders(b"content-type"), [b"application/json"])
        return response.code, json.loads(content)

    async def generate(self, **body):
        """
        POST /key/generate with the master key; assert 200.

        :return: the answer.
        """
        status, answer = await self.call("POST", "/key/generate", body)
        self.assertEqual(status, 200, answer)
        return answer

    async def authenticate(self, key):
        """
        Authenticate C{key} as the data plane would.
        """
        return await self.auth.authenticate(Headers({b"authorization": [b"Bearer " + key.encode()]}))

    async def assertRefused(self, key):
        """
        Assert C{key} no longer authenticates (401).
        """
        try:
            await self.authenticate(key)
        except ProxyError as e:
            self.assertEqual(e.status, 401)
        else:
            self.fail("key still accepted")

    def assertError(self, result, status, param=None, type=None):
        """
        Assert an OpenAI-shaped error of C{status}.

        :return: its message.
        """
        code, answer = result
        self.assertEqual(code, status, answer)
        self.assertEqual(set(answer), {"error"})
        self.assertEqual(set(answer["error"]), {"message", "type", "param", "code"})
        if param is not None:
            self.assertEqual(answer["error"]["param"], param)
        if type is not None:
            self.assertEqual(answer["error"]["type"], type)
        return answer["error"]["message"]

    async def test_generate(self):
        """
        /key/generate answers the key (once), its hash as C{token},
        C{expires} and every field; the key then authenticates.
        """
        answer = await self.generate(
            key_alias="ci", duration="30d", models=["m"], max_budget=2.5, rpm_limit=5, metadata={"team": "x"}
        )
        key = answer["key"]
        self.assertRegex(key, r"^sk-[A-Za-z0-9_-]{43}$")
        self.assertEqual(answer["token"], hash_key(key))
        self.assertEqual(answer["expires"], "2023-12-14T22:13:20Z")
        self.assertEqual(
            {k: answer[k] for k in ("key_alias", "models", "max_budget", "rpm_limit", "metadata", "spend", "spend_nanos", "blocked")},
            {"key_alias": "ci", "models": ["m"], "max_budget": 2.5, "rpm_limit": 5, "metadata": {"team": "x"}, "spend": 0.0, "spend_nanos": 0, "blocked": False},
        )
        for name in ("allowed_routes", "budget_duration", "tpm_limit", "max_parallel_requests", "user_id", "team_id", "created_at"):
            self.assertIn(name, answer)
        principal = await self.authenticate(key)
        self.assertEqual(principal.token, answer["token"])

    async def test_generate_defaults(self):
        """
        An empty body makes a key that never expires and may use anything.
        """
        answer = await self.generate()
        self.assertEqual((answer["expires"], answer["models"], answer["key_alias"]), (None, [], None))

    async def test_expired(self):
        """
        A key is refused once its duration has passed.
        """
        key = (await self.generate(duration="30s"))["key"]
        await self.authenticate(key)
        self.time[0] += 31
        await self.assertRefused(key)

    async def test_validation(self):
        """
        Unknown fields, wrong types, bad durations, bad JSON and non-object
        bodies are 400s naming what is wrong, and make no key.
        """
        message = self.assertError(await self.call("POST", "/key/generate", {"models": [], "colour": 1}), 400, "colour", "invalid_request_error")
        self.assertIn("colour", message)
        self.assertError(await self.call("POST", "/key/generate", {"rpm_limit": "10"}), 400, "rpm_limit")
        self.assertError(await self.call("POST", "/key/generate", {"models": "m"}), 400, "models")
        self.assertError(await self.call("POST", "/key/generate", {"duration": "1 year"}), 400, "duration")
        self.assertError(await self.call("POST", "/key/generate", raw=b"{not json"), 400)
        self.assertError(await self.call("POST", "/key/generate", raw=b"[1]"), 400)
        self.assertEqual(self.server.command("KEYS", "*"), [])

    async def test_alias_unique(self):
        """
        A taken alias is a 400 naming C{key_alias}.
        """
        await self.generate(key_alias="one")
        self.assertError(await self.call("POST", "/key/generate", {"key_alias": "one"}), 400, "key_alias")

    async def test_authentication(self):
        """
        No key or an unknown key is a 401 (the same answer); a virtual key
        is a 403 on every admin route.
        """
        missing = await self.call("POST", "/key/generate", {}, key=None)
        unknown = await self.call("POST", "/key/generate", {}, key="sk-unknown")
        self.assertError(missing, 401, type="authentication_error")
        self.assertEqual(missing, unknown)
        key = (await self.generate())["key"]
        for method, path in ADMIN_ROUTES:
            self.assertError(await self.call(method, path, {}, key=key), 403, type="permission_error")

    async def test_info(self):
        """
        The master key reads any key's info by key or hash; a virtual key
        reads only its own; info never shows the key.
        """
        answer = await self.generate(key_alias="i")
        key, token = answer["key"], answer["token"]
        for given in (key, token):
            status, info = await self.call("GET", f"/key/info?key={given}")
            self.assertEqual(status, 200)
            self.assertEqual(info["key"], token)
            self.assertEqual(info["info"]["key_alias"], "i")
            self.assertNotIn(key, json.dumps(info))
        status, own = await self.call("GET", "/key/info", key=key)
        self.assertEqual((status, own["key"]), (200, token))
        status, own = await self.call("GET", f"/key/info?key={token}", key=key)
        self.assertEqual(status, 200)
        other = (await self.generate())["token"]
        self.assertError(await self.call("GET", f"/key/info?key={other}", key=key), 403)
        self.assertError(await self.call("GET", "/key/info?key=" + "5" * 64), 404)
        self.assertError(await self.call("GET", "/key/info"), 400, "key")
        self.assertError(await self.call("GET", "/key/info?key=nonsense"), 400, "key")

    async def test_update(self):
        """
        /key/update changes the given fields of the key named by key or hash.
        """
        answer = await self.generate(key_alias="before", models=["a"])
        status, updated = await self.call("POST", "/key/update", {"key": answer["key"], "key_alias": "after", "tpm_limit": 7})
        self.assertEqual(status, 200)
        self.assertEqual((updated["key_alias"], updated["models"], updated["tpm_limit"]), ("after", ["a"], 7))
        self.assertNotIn("key", updated)
        status, updated = await self.call("POST", "/key/update", {"key": answer["token"], "models": None})
        self.assertEqual(updated["models"], [])
        self.assertError(await self.call("POST", "/key/update", {"key": "6" * 64, "tpm_limit": 1}), 404)
        self.assertError(await self.call("POST", "/key/update", {"tpm_limit": 1}), 400, "key")
        self.assertError(await self.call("POST", "/key/update", {"key": answer["token"], "spend": 0}), 400, "spend")

    async def test_delete(self):
        """
        Keys are deleted by key, hash or alias and stop working; deleting
        nothing is a 404; the body names keys or aliases, not both.
        """
        one, two, three = [await self.generate(key_alias=a) for a in ("a1", "a2", "a3")]
        status, answer = await self.call("POST", "/key/delete", {"keys": [one["key"], two["token"]]})
        self.assertEqual((status, sorted(answer["deleted_keys"])), (200, sorted([one["token"], two["token"]])))
        await self.assertRefused(one["key"])
        await self.assertRefused(two["key"])
        status, answer = await self.call("POST", "/key/delete", {"key_aliases": ["a3"]})
        self.assertEqual((status, answer), (200, {"deleted_keys": [three["token"]]}))
        await self.assertRefused(three["key"])
        self.assertError(await self.call("POST", "/key/delete", {"keys": [one["token"]]}), 404)
        self.assertError(await self.call("POST", "/key/delete", {"keys": [], "key_aliases": []}), 400)
        self.assertError(await self.call("POST", "/key/delete", {"keys": []}), 400, "keys")
        self.assertError(await self.call("POST", "/key/delete", {"keys": ["bad"]}), 400, "keys")

    async def test_list(self):
        """
        /key/list pages hashes newest first, filters by user, team and
        alias, and gives records with return_full_object=true; a page or
        size out of range is a 400.
        """
        tokens = []
        for i in range(5):
            self.time[0] = T0 + i
            tokens.append((await self.generate(user_id=f"u{i % 2}", team_id="t" if i == 4 else None, key_alias=f"l{i}"))["token"])
        status, answer = await self.call("GET", "/key/list?page=2&size=2")
        self.assertEqual(
            (status, answer),
            (200, {"keys": [tokens[2], tokens[1]], "total_count": 5, "current_page": 2, "total_pages": 3}),
        )
        status, answer = await self.call("GET", "/key/list?user_id=u1")
        self.assertEqual((answer["keys"], answer["total_count"]), ([tokens[3], tokens[1]], 2))
        status, answer = await self.call("GET", "/key/list?team_id=t&return_full_object=true")
        self.assertEqual([k["token"] for k in answer["keys"]], [tokens[4]])
        self.assertNotIn("key", answer["keys"][0])
        status, answer = await self.call("GET", "/key/list?key_alias=l0")
        self.assertEqual(answer["keys"], [tokens[0]])
        self.assertError(await self.call("GET", "/key/list?page=x"), 400, "page")
        # Beyond Redis's 64-bit offsets (it was a 500), and a digit that is
        # not an ASCII one (int() refuses it).
        self.assertError(await self.call("GET", "/key/list?page=99999999999999999999"), 400, "page")
        self.assertError(await self.call("GET", "/key/list?page=%C2%B2"), 400, "page")
        status, answer = await self.call("GET", "/key/list?page=1000000000")
        self.assertEqual((status, answer["keys"]), (200, []))
        self.assertError(await self.call("GET", "/key/list?size=0"), 400, "size")
        self.assertError(await self.call("GET", "/key/list?size=101"), 400, "size")
        self.assertError(await self.call("GET", "/key/list?return_full_object=maybe"), 400, "return_full_object")

    async def test_regenerate(self):
        """
        /key/regenerate hands out a new key with the same fields and spend;
        the old key stops working.
        """
        old = await self.generate(key_alias="re", rpm_limit=2)
        self.server.command("HINCRBY", f"dheera:key:{old['token']}", "spend_nanos", 250_000_000)
        status, new = await self.call("POST", "/key/regenerate", {"key": old["key"]})
        self.assertEqual(status, 200)
        self.assertNotEqual(new["key"], old["key"])
        self.assertEqual(new["token"], hash_key(new["key"]))
        self.assertEqual((new["key_alias"], new["rpm_limit"], new["spend"]), ("re", 2, 0.25))
        await self.assertRefused(old["key"])
        self.assertEqual((await self.authenticate(new["key"])).token, new["token"])
        self.assertError(await self.call("POST", "/key/regenerate", {"key": old["token"]}), 404)
        self.assertError(await self.call("POST", "/key/regenerate", {"key": new["key"], "x": 1}), 400, "x")

    async def test_block(self):
        """
        A blocked key is refused at once; unblocked, it works again.
        """
        answer = await self.generate()
        await self.authenticate(answer["key"])
        status, blocked = await self.call("POST", "/key/block", {"key": answer["key"]})
        self.assertEqual((status, blocked["blocked"]), (200, True))
        await self.assertRefused(answer["key"])
        status, unblocked = await self.call("POST", "/key/unblock", {"key": answer["token"]})
        self.assertEqual((status, unblocked["blocked"]), (200, False))
        await self.authenticate(answer["key"])
        self.assertError(await self.call("POST", "/key/block", {}), 400, "key")

    async def test_end_users(self):
        """
        End users are made, read, updated, blocked, unblocked and deleted.
        """
        status, made = await self.call("POST", "/end_user/new", {"user_id": "eve", "max_budget": 3})
        self.assertEqual((status, made["user_id"], made["max_budget"], made["spend"], made["blocked"]), (200, "eve", 3.0, 0.0, False))
        self.assertError(await self.call("POST", "/end_user/new", {"user_id": "eve"}), 400, "user_id")
        self.assertError(await self.call("POST", "/end_user/new", {"user_id": "x", "models": []}), 400, "models")
        status, info = await self.call("GET", "/end_user/info?end_user_id=eve")
        self.assertEqual((status, info), (200, made))
        status, updated = await self.call("POST", "/end_user/update", {"user_id": "eve", "budget_duration": "1d"})
        self.assertEqual((updated["budget_duration"], updated["max_budget"]), ("1d", 3.0))
        self.assertError(await self.call("POST", "/end_user/update", {"user_id": "nobody", "blocked": True}), 404)
        status, answer = await self.call("POST", "/end_user/block", {"user_ids": ["eve", "mallory"]})
        self.assertEqual((status, answer), (200, {"blocked_users": ["eve", "mallory"]}))
        self.assertTrue((await self.call("GET", "/end_user/info?end_user_id=mallory"))[1]["blocked"])
        status, answer = await self.call("POST", "/end_user/unblock", {"user_id": "eve"})
        self.assertEqual(answer, {"unblocked_users": ["eve"]})
        self.assertFalse((await self.call("GET", "/end_user/info?end_user_id=eve"))[1]["blocked"])
        status, answer = await self.call("POST", "/end_user/delete", {"user_ids": ["eve", "nobody"]})
        self.assertEqual((status, answer), (200, {"deleted_end_users": ["eve"]}))
        self.assertError(await self.call("GET", "/end_user/info?end_user_id=eve"), 404)
        self.assertError(await self.call("POST", "/end_user/delete", {"user_id": "eve"}), 404)
        self.assertError(await self.call("GET", "/end_user/info"), 400, "end_user_id")
        self.assertError(await self.call("POST", "/end_user/block", {"user_ids": "eve"}), 400, "user_ids")

    async def test_end_user_team_id(self):
        """
        /end_user/* take a C{team_id} naming the end user's scope; a
        C{team_id} that is not a non-empty string is a 400 naming it.
        """
        status, made = await self.call("POST", "/end_user/new", {"user_id": "eve", "team_id": "red"})
        self.assertEqual((status, made["team_id"]), (200, "red"))
        self.assertError(await self.call("GET", "/end_user/info?end_user_id=eve"), 404)
        status, info = await self.call("GET", "/end_user/info?end_user_id=eve&team_id=red")
        self.assertEqual((status, info), (200, made))
        status, answer = await self.call("POST", "/end_user/block", {"user_id": "eve", "team_id": "red"})
        self.assertEqual((status, answer), (200, {"blocked_users": ["eve"]}))
        self.assertTrue((await self.call("GET", "/end_user/info?end_user_id=eve&team_id=red"))[1]["blocked"])
        for body in ({"user_id": "eve", "team_id": ""}, {"user_id": "eve", "team_id": 5}):
            self.assertError(await self.call("POST", "/end_user/new", body), 400, "team_id")
            self.assertError(await self.call("POST", "/end_user/delete", body), 400, "team_id")
        self.assertError(await self.call("GET", "/end_user/info?end_user_id=eve&team_id="), 400, "team_id")
        status, answer = await self.call("POST", "/end_user/delete", {"user_ids": ["eve"], "team_id": "red"})
        self.assertEqual((status, answer), (200, {"deleted_end_users": ["eve"]}))

    async def test_lone_surrogate_refused(self):
        """
        A body whose JSON escapes a lone surrogate (valid JSON, not Unicode
        text: no Redis key or field can hold it) is refused with 400 by
        every route that reads a body, and nothing is stored.
        """
        for path, document in (
            ("/key/generate", {"user_id": "\ud800"}),
            ("/key/generate", {"key_alias": "a\udc00b"}),
            ("/end_user/new", {"user_id": "x\ud800"}),
            ("/end_user/block", {"user_ids": ["\udfff"]}),
        ):
            code, answer = await self.call("POST", path, document)
            self.assertError((code, answer), 400)
            self.assertIn("surrogate", answer["error"]["message"])
        status, listed = await self.call("GET", "/key/list")
        self.assertEqual(status, 200, listed)
        self.assertEqual(listed["total_count"], 0)
        # Escapes of real characters (a surrogate pair included) are fine.
        answer = await self.generate(user_id="\u00e9\U0001F600")
        self.assertEqual(answer["user_id"], "\u00e9\U0001F600")

    async def test_secret_nowhere(self):
        """
        After a key's whole life the key appears nowhere in Redis (what
        redis-cli shows) nor in any log line; its hash holds no secret.
        """
        answer = await self.generate(key_alias="s")
        key = answer["key"]
        await self.call("GET", f"/key/info?key={key}")
        await self.call("POST", "/key/update", {"key": key, "rpm_limit": 1})
        await self.call("POST", "/key/block", {"key": key})
        mapping = self.server.command("HGETALL", f"dheera:key:{answer['token']}")
        self.assertNotIn(key[3:], " ".join(mapping))
        regenerated = (await self.call("POST", "/key/regenerate", {"key": key}))[1]["key"]
        await self.call("POST", "/key/delete", {"keys": [regenerated]})
        dump = self.server.everything()
        logs = "\n".join(self.logged)
        self.assertIn(answer["token"][:12], logs)
        for secret in (key, regenerated):
            self.assertNotIn(secret[3:], dump)
            self.assertNotIn(secret[3:], logs)

    async def test_redis_down(self):
        """
        With Redis down, admin calls answer 503 within 1.5 s (and virtual
        keys are refused with 503); when it is back, the API works again.
        """
        key = (await self.generate())["key"]
        self.server.stop()
        start = time.monotonic()
        self.assertError(await self.call("POST", "/key/generate", {}), 503, type="service_unavailable")
        self.assertError(await self.call("GET", "/key/info", key=key), 503)
        self.assertLess(time.monotonic() - start, 3.0)
        self.server.start()
        deadline = time.monotonic() + 5
        while (await self.call("POST", "/key/generate", {}))[0] != 200:
            self.assertLess(time.monotonic(), deadline)

    async def test_unknown_route(self):
        """
        Unknown paths and wrong methods get JSON errors.
        """
        self.assertError(await self.call("GET", "/key/nope"), 404)
        self.assertError(await self.call("GET", "/key/generate"), 405)
