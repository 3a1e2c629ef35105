"""
Tests for L{dheera_tx.keys.store} and L{dheera_tx.keys.cache}, and the Redis
connection under them (L{dheera_tx.redis.client}, L{dheera_tx.redis.address},
L{dheera_tx.redis.pubsub}), against a real C{redis-server}.
"""

import time
from unittest import SkipTest

from twisted.internet import defer, reactor
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface.verify import verifyObject

from dheera_tx.errors import ProxyError
from dheera_tx.keys.cache import CachedKeyStore
from dheera_tx.keys.fields import validate_end_user_fields, validate_key_fields
from dheera_tx.keys.records import hash_key
from dheera_tx.keys.store import IKeyStore, RedisKeyStore
from dheera_tx.redis.address import RedisAddress, parse_database_url
from dheera_tx.redis.client import RedisCommandError, RedisUnavailable, connect
from tests.memory_key_store import MemoryKeyStore
from tests.redis_server import RedisServer
from tests.scripted_upstream import refused_port, sleep
from tests.tls_upstream import self_signed_certificate

T0 = 1_700_000_000.0


async def eventually(check, timeout: float = 5.0, step: float = 0.01):
    """
    Poll the coroutine function C{check} until it returns true.

    :return: the seconds it took.
    """
    start = time.monotonic()
    while True:
        if await check():
            return time.monotonic() - start
        if time.monotonic() - start > timeout:
            raise AssertionError(f"condition not met within {timeout} s")
        await sleep(step)


class RedisTestMixin:
    """
    A real redis-server for each test (they start in milliseconds).
    """

    def client(self, url=None, **kw):
        """
        A connected client, disconnected at cleanup.
        """
        c = connect(reactor, url or self.server.url, **kw)
        self.addCleanup(c.disconnect)
        return c

    def setUp(self):
        self.server = RedisServer().start()
        self.addCleanup(self.server.cleanup)


class StoreContractMixin:
    """
    What every L{IKeyStore} does; subclasses set C{self.store} and advance
    C{self.time[0]}.
    """

    def now(self):
        """
        The injected clock.
        """
        return self.time[0]

    async def create(self, **body):
        """
        Create a key from an API body.
        """
        return await self.store.create_key(validate_key_fields(body))

    async def assertProxyError(self, status, coroutine, param=None):
        """
        Assert C{coroutine} fails with a L{ProxyError} of C{status} (and C{param}).
        """
        try:
            await coroutine
        except ProxyError as e:
            self.assertEqual(e.status, status)
            if param is not None:
                self.assertEqual(e.param, param)
            return e
        self.fail(f"no {status}")

    def test_interface(self):
        """
        The store provides L{IKeyStore}.
        """
        self.assertTrue(verifyObject(IKeyStore, self.store))

    async def test_create_and_get(self):
        """
        A created key is found by its token with every field it was made
        with; the key itself is returned once and only its hash is the token.
        """
        key, record = await self.create(
            key_alias="ci", duration="1h", models=["m"], rpm_limit=3, metadata={"a": 1}, user_id="u"
        )
        self.assertTrue(key.startswith("sk-"))
        self.assertEqual(record.token, hash_key(key))
        self.assertEqual(record.expires, T0 + 3600)
        self.assertEqual(record.created_at, T0)
        found = await self.store.get_key(record.token)
        self.assertEqual(found, record)
        self.assertEqual(found.metadata, {"a": 1})
        self.assertEqual(found.models, ("m",))

    async def test_get_unknown(self):
        """
        An unknown token is L{None}.
        """
        self.assertIsNone(await self.store.get_key("0" * 64))

    async def test_alias_unique(self):
        """
        A second key with a taken alias is refused with 400 and not made.
        """
        await self.create(key_alias="dup")
        await self.assertProxyError(400, self.create(key_alias="dup"), "key_alias")
        self.assertEqual((await self.store.list_keys())[1], 1)

    async def test_alias_freed_by_delete(self):
        """
        Deleting a key frees its alias.
        """
        _, record = await self.create(key_alias="a")
        self.assertEqual(await self.store.delete_keys([record.token]), [record.token])
        await self.create(key_alias="a")

    async def test_update(self):
        """
        An update changes the given fields only; C{null} clears a field.
        """
        _, record = await self.create(duration="1d", rpm_limit=1, team_id="t")
        self.time[0] += 10
        updated = await self.store.update_key(record.token, {"rpm_limit": 9, "duration": None, "models": ("x",)})
        self.assertEqual((updated.rpm_limit, updated.expires, updated.models, updated.team_id), (9, None, ("x",), "t"))
        self.assertEqual(await self.store.get_key(record.token), updated)

    async def test_update_unknown(self):
        """
        Updating an unknown key is a 404.
        """
        await self.assertProxyError(404, self.store.update_key("1" * 64, {"rpm_limit": 1}))

    async def test_update_alias(self):
        """
        Renaming frees the old alias; a taken alias is refused; clearing the
        alias frees it.
        """
        _, one = await self.create(key_alias="a")
        _, two = await self.create(key_alias="b")
        await self.store.update_key(one.token, {"key_alias": "c"})
        await self.create(key_alias="a")
        await self.assertProxyError(400, self.store.update_key(two.token, {"key_alias": "c"}), "key_alias")
        same = await self.store.update_key(two.token, {"key_alias": "b"})
        self.assertEqual(same.key_alias, "b")
        cleared = await self.store.update_key(two.token, {"key_alias": None})
        self.assertIsNone(cleared.key_alias)
        await self.create(key_alias="b")

    async def test_delete(self):
        """
        Delete answers which of the given keys existed; they are gone.
        """
        _, one = await self.create()
        _, two = await self.create()
        self.assertEqual(await self.store.delete_keys([one.token, "2" * 64]), [one.token])
        self.assertIsNone(await self.store.get_key(one.token))
        self.assertIsNotNone(await self.store.get_key(two.token))

    async def test_delete_by_alias(self):
        """
        Keys can be deleted by alias.
        """
        _, one = await self.create(key_alias="x")
        _, two = await self.create(key_alias="y")
        self.assertEqual(await self.store.delete_keys_by_alias(["x", "nope"]), [one.token])
        self.assertIsNone(await self.store.get_key(one.token))
        self.assertIsNotNone(await self.store.get_key(two.token))

    async def test_list(self):
        """
        Keys are listed newest first, paged, with the total, and filtered by
        user, team and alias.
        """
        tokens = []
        for i in range(5):
            self.time[0] = T0 + i
            _, record = await self.create(user_id="u%d" % (i % 2), team_id="t" if i < 2 else None, key_alias=f"k{i}")
            tokens.append(record.token)
        page, total = await self.store.list_keys(page=1, size=2)
        self.assertEqual(([r.token for r in page], total), ([tokens[4], tokens[3]], 5))
        page, total = await self.store.list_keys(page=3, size=2)
        self.assertEqual(([r.token for r in page], total), ([tokens[0]], 5))
        page, total = await self.store.list_keys(page=4, size=2)
        self.assertEqual((page, total), ([], 5))
        page, total = await self.store.list_keys(user_id="u0")
        self.assertEqual(([r.token for r in page], total), ([tokens[4], tokens[2], tokens[0]], 3))
        page, total = await self.store.list_keys(user_id="u0", size=1, page=2)
        self.assertEqual(([r.token for r in page], total), ([tokens[2]], 3))
        page, total = await self.store.list_keys(team_id="t", user_id="u1")
        self.assertEqual(([r.token for r in page], total), ([tokens[1]], 1))
        page, total = await self.store.list_keys(key_alias="k3")
        self.assertEqual(([r.token for r in page], total), ([tokens[3]], 1))
        page, total = await self.store.list_keys(key_alias="k3", user_id="u0")
        self.assertEqual((page, total), ([], 0))
        await self.assertProxyError(400, self.store.list_keys(page=0), "page")
        await self.assertProxyError(400, self.store.list_keys(size=101), "size")

    async def test_regenerate(self):
        """
        Regenerating gives a new key with the same fields; the old token is
        gone and the alias follows the new one.
        """
        old_key, old = await self.create(key_alias="r", rpm_limit=4, user_id="u")
        new_key, new = await self.store.regenerate_key(old.token)
        self.assertNotEqual(new_key, old_key)
        self.assertEqual(new.token, hash_key(new_key))
        self.assertEqual((new.key_alias, new.rpm_limit, new.user_id, new.created_at), ("r", 4, "u", old.created_at))
        self.assertIsNone(await self.store.get_key(old.token))
        self.assertEqual(await self.store.get_key(new.token), new)
        self.assertEqual([r.token for r in (await self.store.list_keys())[0]], [new.token])
        self.assertEqual(await self.store.delete_keys_by_alias(["r"]), [new.token])
        await self.assertProxyError(404, self.store.regenerate_key(old.token))

    async def test_block(self):
        """
        Blocking and unblocking flip C{blocked}.
        """
        _, record = await self.create()
        self.assertTrue((await self.store.block_key(record.token)).blocked)
        self.assertTrue((await self.store.get_key(record.token)).blocked)
        self.assertFalse((await self.store.unblock_key(record.token)).blocked)
        self.assertFalse((await self.store.get_key(record.token)).blocked)
        await self.assertProxyError(404, self.store.block_key("3" * 64))

    async def test_end_users(self):
        """
        End users are made once, read, updated, blocked, unblocked and
        deleted.
        """
        made = await self.store.new_end_user(validate_end_user_fields({"user_id": "al", "max_budget": 2, "budget_duration": "1d"}))
        self.assertEqual((made.max_budget, made.budget_reset_at, made.created_at, made.blocked), (2.0, T0 + 86400, T0, False))
        await self.assertProxyError(400, self.store.new_end_user({"user_id": "al"}), "user_id")
        self.assertEqual(await self.store.get_end_user("al"), made)
        updated = await self.store.update_end_user("al", {"max_budget": None, "metadata": {"x": 1}})
        self.assertEqual((updated.max_budget, updated.metadata, updated.budget_duration), (None, {"x": 1}, "1d"))
        self.assertTrue((await self.store.block_end_user("al")).blocked)
        self.assertFalse((await self.store.unblock_end_user("al")).blocked)
        self.assertTrue(await self.store.delete_end_user("al"))
        self.assertFalse(await self.store.delete_end_user("al"))
        self.assertIsNone(await self.store.get_end_user("al"))
        await self.assertProxyError(404, self.store.update_end_user("al", {"blocked": True}))
        await self.assertProxyError(404, self.store.unblock_end_user("al"))

    async def test_end_users_scoped_per_team(self):
        """
        The same end user id in two teams and in the default scope is three
        end users: each is made, read, blocked and deleted on its own, and
        answers name its team.
        """
        red = await self.store.new_end_user({"user_id": "al", "max_budget": 1}, "red")
        self.assertEqual((red.team_id, red.max_budget), ("red", 1.0))
        self.assertIsNone(await self.store.get_end_user("al"))
        self.assertIsNone(await self.store.get_end_user("al", "blue"))
        default = await self.store.new_end_user({"user_id": "al", "max_budget": 2})
        self.assertIsNone(default.team_id)
        self.assertTrue((await self.store.block_end_user("al", "blue")).blocked)
        self.assertFalse((await self.store.get_end_user("al", "red")).blocked)
        updated = await self.store.update_end_user("al", {"max_budget": 3}, "red")
        self.assertEqual((updated.max_budget, (await self.store.get_end_user("al")).max_budget), (3.0, 2.0))
        self.assertTrue(await self.store.delete_end_user("al", "red"))
        self.assertIsNone(await self.store.get_end_user("al", "red"))
        self.assertEqual((await self.store.get_end_user("al")).max_budget, 2.0)
        self.assertEqual(red.to_api()["team_id"], "red")

    async def test_block_unknown_end_user(self):
        """
        Blocking an end user never seen makes it, blocked.
        """
        record = await self.store.block_end_user("stranger")
        self.assertTrue(record.blocked)
        self.assertTrue((await self.store.get_end_user("stranger")).blocked)


class MemoryKeyStoreTests(StoreContractMixin, TestCase):
    """
    L{MemoryKeyStore} keeps the L{IKeyStore} contract.
    """

    def setUp(self):
        self.time = [T0]
        self.store = MemoryKeyStore(now=self.now)


class RedisKeyStoreTests(RedisTestMixin, StoreContractMixin, TestCase):
    """
    L{RedisKeyStore} keeps the L{IKeyStore} contract and the SPEC's Redis
    layout.
    """

    def setUp(self):
        RedisTestMixin.setUp(self)
        self.time = [T0]
        self.redis = self.client()
        self.store = RedisKeyStore(self.redis, "dheera:", now=self.now)

    async def test_layout(self):
        """
        What redis-cli shows: a hash per key with readable fields and no
        secret, the alias index, and the sorted set scored by creation time.
        """
        key, record = await self.create(key_alias="ci", models=["m"], max_budget=1.5)
        name = f"dheera:key:{record.token}"
        mapping = dict(zip(*[iter(self.server.command("HGETALL", name))] * 2))
        self.assertEqual(
            mapping,
            {
                "key_alias": "ci",
                "models": '["m"]',
                "allowed_routes": "[]",
                "max_budget": "1.5",
                "metadata": "{}",
                "blocked": "0",
                "created_at": repr(T0),
                "spend_nanos": "0",
            },
        )
        self.assertEqual(self.server.command("GET", "dheera:key_alias:ci"), record.token)
        self.assertEqual(float(self.server.command("ZSCORE", "dheera:keys", record.token)), T0)
        self.assertEqual(sorted(self.server.command("KEYS", "*")), sorted([name, "dheera:key_alias:ci", "dheera:keys"]))

    async def test_secret_never_in_redis(self):
        """
        No key, nor its random part, appears anywhere in Redis, through
        create, update, regenerate and end-user writes.
        """
        key, record = await self.create(key_alias="s", metadata={"note": "n"})
        await self.store.update_key(record.token, {"rpm_limit": 5})
        new_key, _ = await self.store.regenerate_key(record.token)
        await self.store.new_end_user({"user_id": "e"})
        dump = self.server.everything()
        self.assertIn(hash_key(new_key), dump)
        for secret in (key, new_key):
            self.assertNotIn(secret[3:], dump)

    async def test_update_keeps_spend(self):
        """
        An update never overwrites spend added meanwhile by HINCRBY.
        """
        _, record = await self.create()
        self.server.command("HINCRBY", f"dheera:key:{record.token}", "spend_nanos", 750)
        updated = await self.store.update_key(record.token, {"tpm_limit": 5})
        self.assertEqual(updated.spend_nanos, 750)

    async def test_regenerate_keeps_spend(self):
        """
        Regenerating moves the spend to the new key.
        """
        _, record = await self.create()
        self.server.command("HINCRBY", f"dheera:key:{record.token}", "spend_nanos", 1_500_000_000)
        _, new = await self.store.regenerate_key(record.token)
        self.assertEqual(new.spend, 1.5)
        self.assertEqual(self.server.command("EXISTS", f"dheera:key:{record.token}"), 0)

    async def test_stub_is_not_a_key(self):
        """
        A hash holding only spend (left by a late HINCRBY after a delete)
        does not bring a deleted key back.
        """
        _, record = await self.create()
        await self.store.delete_keys([record.token])
        self.server.command("HINCRBY", f"dheera:key:{record.token}", "spend_nanos", 5)
        self.assertIsNone(await self.store.get_key(record.token))
        await self.assertProxyError(404, self.store.block_key(record.token))
        await self.assertProxyError(404, self.store.regenerate_key(record.token))

    async def test_end_user_from_traffic(self):
        """
        An end user known only from traffic (spend alone) can be read, and
        made with /end_user/new keeping its spend.
        """
        self.server.command("HINCRBY", "dheera:end_user:t", "spend_nanos", 9)
        seen = await self.store.get_end_user("t")
        self.assertEqual((seen.spend_nanos, seen.created_at), (9, None))
        made = await self.store.new_end_user({"user_id": "t", "max_budget": 1.0})
        self.assertEqual((made.spend_nanos, made.created_at, made.max_budget), (9, T0, 1.0))

    async def test_mutations_published(self):
        """
        Every mutation publishes what it changed on the invalidation channel.
        """
        _, record = await self.create()
        messages = []
        subscription = self.redis.subscribe("dheera:invalidate", messages.append)
        await subscription.whenActive()
        await self.store.update_key(record.token, {"rpm_limit": 1})
        await self.store.block_key(record.token)
        _, new = await self.store.regenerate_key(record.token)
        await self.store.delete_keys([new.token])
        await self.store.block_end_user("eu")
        await eventually(lambda: defer.succeed(len(messages) == 5))
        self.assertEqual(messages, [record.token, record.token, record.token, new.token, "end_user:eu"])

    async def test_scripts_survive_flush(self):
        """
        After SCRIPT FLUSH (as after a Redis restart) scripts still run.
        """
        _, record = await self.create()
        self.server.command("SCRIPT", "FLUSH")
        self.assertTrue((await self.store.block_key(record.token)).blocked)

    async def test_prefix(self):
        """
        Every name starts with the configured prefix.
        """
        store = RedisKeyStore(self.redis, "other:", now=self.now)
        _, record = await store.create_key({"key_alias": "p"})
        await store.new_end_user({"user_id": "u"})
        self.assertEqual(
            sorted(self.server.command("KEYS", "*")),
            sorted([f"other:key:{record.token}", "other:key_alias:p", "other:keys", "other:end_user:u"]),
        )
        self.assertIsNone(await self.store.get_key(record.token))

    async def test_list_many(self):
        """
        Filtering scans past one chunk of keys.
        """
        for i in range(520):
            await self.store.create_key({"user_id": "odd" if i % 2 else "even"})
        page, total = await self.store.list_keys(user_id="odd", size=100, page=3)
        self.assertEqual((len(page), total), (60, 260))
        self.assertTrue(all(r.user_id == "odd" for r in page))


class DatabaseURLTests(SynchronousTestCase):
    """
    Tests for L{parse_database_url}.
    """

    def test_tcp(self):
        """
        redis:// gives host, port (6379 by default), db and password.
        """
        self.assertEqual(parse_database_url("redis://h"), RedisAddress(kind="tcp", host="h", port=6379))
        a = parse_database_url("redis://:s%40cret@10.0.0.1:6380/3")
        self.assertEqual((a.kind, a.host, a.port, a.db, a.password, a.username), ("tcp", "10.0.0.1", 6380, 3, "s@cret", None))
        a = parse_database_url("redis://app:pw@[::1]:7000/0")
        self.assertEqual((a.host, a.port, a.username, a.password), ("::1", 7000, "app", "pw"))
        a = parse_database_url("redis://app@h")
        self.assertEqual((a.username, a.password), ("app", None))

    def test_tls(self):
        """
        rediss:// is TLS, verified unless ssl_cert_reqs=none.
        """
        a = parse_database_url("rediss://cache.example:6380")
        self.assertEqual((a.kind, a.verify_tls), ("tls", True))
        self.assertFalse(parse_database_url("rediss://h?ssl_cert_reqs=none").verify_tls)
        self.assertEqual(parse_database_url("rediss://h?ssl_ca_certs=/etc/ca.pem").ca_certs, "/etc/ca.pem")
        self.assertIsNone(parse_database_url("redis://h?ssl_ca_certs=/etc/ca.pem").ca_certs)

    def test_unix(self):
        """
        unix:// takes an absolute path, ?db=N and a password.
        """
        a = parse_database_url("unix:///var/run/redis.sock?db=2")
        self.assertEqual((a.kind, a.path, a.db), ("unix", "/var/run/redis.sock", 2))
        a = parse_database_url("unix://:pw@/tmp/a%20b/r.sock")
        self.assertEqual((a.path, a.password, a.db), ("/tmp/a b/r.sock", "pw", 0))

    def test_sentinel(self):
        """
        redis+sentinel:// lists Sentinels, then the master name and db.
        """
        a = parse_database_url("redis+sentinel://:pw@s1:26379,s2/mymaster/4")
        self.assertEqual(
            (a.kind, a.sentinels, a.master_name, a.db, a.password),
            ("sentinel", (("s1", 26379), ("s2", 26379)), "mymaster", 4, "pw"),
        )
        self.assertEqual(parse_database_url("redis+sentinel://s1:1/m").db, 0)

    def test_password_not_in_repr(self):
        """
        The password is not part of the address's repr.
        """
        self.assertNotIn("hunter2", repr(parse_database_url("redis://:hunter2@h/0")))

    def test_bad(self):
        """
        Bad URLs raise L{ValueError} with a message that names the part at
        fault (the port, the database, ...) and never includes the password.
        """
        for url in [
            "http://:hunter2@h",
            "redis://:hunter2@h:port/0",
            "redis://:hunter2@h:70000",
            "redis://:hunter2@h/zero",
            # Digits int() refuses, or reads though they are not ASCII.
            "redis://:hunter2@h/\u00b2",
            "redis://:hunter2@h:\u00b2/0",
            "redis://:hunter2@h:\uff16\uff13\uff17\uff19/0",
            "redis://:hunter2@/0",
            "unix://:hunter2@relative.sock",
            "unix://:hunter2@/",
            "unix://:hunter2@/tmp/r.sock?db=x",
            "redis+sentinel://:hunter2@s1",
            "redis+sentinel://:hunter2@s1/m/1/2",
            "rediss://:hunter2@h?ssl_cert_reqs=maybe",
            "hunter2",
            None,
        ]:
            with self.assertRaises(ValueError, msg=url) as e:
                parse_database_url(url)
            self.assertNotIn("hunter2", str(e.exception))
            self.assertNotIn("invalid literal", str(e.exception))
            self.assertIn("database_url", str(e.exception))


class RedisClientTests(RedisTestMixin, TestCase):
    """
    L{dheera_tx.redis.client.RedisClient} against a real server: calls,
    scripts, and what happens when Redis goes away and comes back.
    """

    async def test_commands(self):
        """
        Replies are text, integers and None; numbers are never converted.
        """
        c = self.client()
        self.assertEqual(await c.execute("SET", "n", "00123"), "OK")
        self.assertEqual(await c.execute("GET", "n"), "00123")
        self.assertEqual(await c.execute("INCR", "i"), 1)
        self.assertIsNone(await c.execute("GET", "missing"))
        self.assertEqual(await c.pipeline([("SET", "a", "é"), ("GET", "a"), ("HGETALL", "h")]), ["OK", "é", []])

    async def test_command_error(self):
        """
        An error reply is a L{RedisCommandError}, also inside a pipeline.
        """
        c = self.client()
        await c.execute("HSET", "h", "f", "v")
        with self.assertRaises(RedisCommandError):
            await c.execute("INCR", "h")
        with self.assertRaises(RedisCommandError):
            await c.pipeline([("GET", "x"), ("INCR", "h")])
        self.assertEqual(await c.execute("HGET", "h", "f"), "v")

    async def test_eval(self):
        """
        Scripts run by EVALSHA, and again after the server forgot them.
        """
        c = self.client()
        script = "return {KEYS[1], ARGV[1], redis.call('INCR', KEYS[1])}"
        self.assertEqual(await c.eval(script, ["k"], ["a"]), ["k", "a", 1])
        self.server.command("SCRIPT", "FLUSH")
        self.assertEqual(await c.eval(script, ["k"], ["a"]), ["k", "a", 2])

    async def test_database_and_password(self):
        """
        The URL's password and database number are used.
        """
        server = RedisServer(password="pw@x").start()
        self.addCleanup(server.cleanup)
        c = self.client(f"redis://:pw%40x@127.0.0.1:{server.port}/2")
        await c.execute("SET", "where", "here")
        self.assertEqual(server.command("GET", "where", db=2), "here")
        self.assertIsNone(server.command("GET", "where"))

    async def test_wrong_password(self):
        """
        A wrong password makes calls fail with L{RedisUnavailable}, in time.
        """
        server = RedisServer(password="right").start()
        self.addCleanup(server.cleanup)
        c = self.client(f"redis://:wrong@127.0.0.1:{server.port}/0")
        start = time.monotonic()
        with self.assertRaises(RedisUnavailable):
            await c.execute("PING")
        self.assertLess(time.monotonic() - start, 1.5)

    async def test_unix_socket(self):
        """
        unix:// URLs work, with a password too.
        """
        server = RedisServer(unix=True, password="pw").start()
        self.addCleanup(server.cleanup)
        c = self.client(server.url)
        self.assertEqual(await c.execute("PING"), "PONG")

    async def test_nothing_listening(self):
        """
        With no server at all, a call fails with L{RedisUnavailable} within
        the timeout.
        """
        c = self.client(f"redis://127.0.0.1:{refused_port()}/0")
        start = time.monotonic()
        with self.assertRaises(RedisUnavailable):
            await c.execute("PING")
        self.assertLess(time.monotonic() - start, 1.5)

    async def outage(self, stop):
        """
        Take the server away with C{stop}; calls must fail in time.

        :return: the client.
        """
        c = self.client()
        await c.execute("SET", "k", "v")
        stop()
        start = time.monotonic()
        with self.assertRaises(RedisUnavailable):
            await c.execute("GET", "k")
        self.assertLess(time.monotonic() - start, 1.5)
        with self.assertRaises(RedisUnavailable):
            await c.eval("return 1")
        self.assertLess(time.monotonic() - start, 3.0)
        return c

    async def recovers(self, c):
        """
        Assert C{c} works again within 3 s, without being recreated.
        """
        async def works():
            try:
                return await c.execute("SET", "k", "again") == "OK"
            except RedisUnavailable:
                return False

        elapsed = await eventually(works, timeout=5)
        self.assertLess(elapsed, 3.0)

    async def test_server_stopped(self):
        """
        While the server is stopped calls fail within 1.5 s, and once it is
        back the same client works again within a few seconds.
        """
        c = await self.outage(self.server.stop)
        await sleep(1.5)
        self.server.start()
        await self.recovers(c)

    async def test_server_killed(self):
        """
        SIGKILL: calls fail within 1.5 s; the client recovers after a
        restart.
        """
        c = await self.outage(self.server.kill)
        self.server.start()
        await self.recovers(c)

    async def test_server_frozen(self):
        """
        A server that stops answering (SIGSTOP) makes calls fail within
        1.5 s instead of hanging; when it resumes, calls work again.
        """
        c = await self.outage(self.server.pause)
        self.server.resume()
        await self.recovers(c)
        self.assertEqual(await c.execute("GET", "k"), "again")

    async def test_subscription_reconnects(self):
        """
        A subscription reports going down and up across a restart and gets
        messages published after it.
        """
        c = self.client()
        messages, states = [], []
        subscription = c.subscribe("ch", messages.append, states.append)
        await subscription.whenActive()
        await c.execute("PUBLISH", "ch", "one")
        self.server.stop()
        await eventually(lambda: defer.succeed(not subscription.active))
        self.server.start()
        await subscription.whenActive()
        await c.execute("PUBLISH", "ch", "two")
        await eventually(lambda: defer.succeed(messages == ["one", "two"]))
        self.assertEqual(states, [True, False, True])

    async def test_subscription_heartbeat(self):
        """
        A subscription whose server stops answering is reported down within
        about a second.
        """
        c = self.client()
        subscription = c.subscribe("ch", lambda m: None)
        await subscription.whenActive()
        self.server.pause()
        try:
            elapsed = await eventually(lambda: defer.succeed(not subscription.active), timeout=3)
        finally:
            self.server.resume()
        self.assertLess(elapsed, 1.5)
        await subscription.whenActive()

    def tls_server(self):
        """
        A TLS-only redis-server with a fresh self-signed certificate for
        localhost, or skip when no redis-server here speaks TLS.

        :return: C{(server, certificate path)}.
        """
        cert, key = self_signed_certificate(self.server.directory)
        for binary in (self.server.binary, "/usr/bin/redis-server"):
            server = RedisServer(tls=(cert, key), binary=binary)
            self.addCleanup(server.cleanup)
            try:
                return server.start(), cert
            except (RuntimeError, OSError):
                continue
        raise SkipTest("no redis-server with TLS support")

    async def test_tls(self):
        """
        rediss:// talks TLS: the server certificate is checked against the
        system's CAs (a self-signed one is refused), against
        C{ssl_ca_certs} when given, or not at all with
        C{ssl_cert_reqs=none}.
        """
        server, cert = self.tls_server()
        base = f"rediss://localhost:{server.port}/0"
        self.assertEqual(await self.client(base + "?ssl_cert_reqs=none").execute("PING"), "PONG")
        self.assertEqual(await self.client(f"{base}?ssl_ca_certs={cert}").execute("PING"), "PONG")
        with self.assertRaises(RedisUnavailable):
            await self.client(base).execute("PING")
        self.flushLoggedErrors()

    async def test_sentinel(self):
        """
        redis+sentinel:// finds the master through Sentinel and uses it,
        subscriptions included.
        """
        sentinel = RedisServer(sentinel_for=("mymaster", self.server.port)).start()
        self.addCleanup(sentinel.cleanup)
        c = self.client(f"redis+sentinel://127.0.0.1:{sentinel.port}/mymaster/1", timeout=3.0)
        await c.execute("SET", "via", "sentinel")
        self.assertEqual(self.server.command("GET", "via", db=1), "sentinel")
        messages = []
        subscription = c.subscribe("ch", messages.append)
        await subscription.whenActive()
        await c.execute("PUBLISH", "ch", "hi")
        await eventually(lambda: defer.succeed(messages == ["hi"]))


class CachedKeyStoreTests(RedisTestMixin, TestCase):
    """
    L{CachedKeyStore}: two processes (two clients, two caches) over one
    Redis.
    """

    def process(self, reactor_=reactor, ttl=30.0):
        """
        One "process": a client of its own and a cache over it.
        """
        client = self.client()
        store = CachedKeyStore(RedisKeyStore(client, "dheera:"), client, reactor_, ttl=ttl)
        self.addCleanup(store.close)
        return store

    async def two(self):
        """
        Two processes with live subscriptions.
        """
        a, b = self.process(), self.process()
        await a.subscription.whenActive()
        await b.subscription.whenActive()
        return a, b

    async def test_revocation_everywhere(self):
        """
        A key blocked in one process is refused (read as blocked) by the
        other, which had it cached, within 1 s; deletion and regeneration
        likewise.
        """
        a, b = await self.two()
        _, record = await a.create_key({})
        self.assertFalse((await b.get_key(record.token)).blocked)
        await a.block_key(record.token)

        async def blocked():
            return (await b.get_key(record.token)).blocked

        self.assertLess(await eventually(blocked, timeout=2), 1.0)
        _, new = await a.regenerate_key(record.token)

        async def gone():
            return await b.get_key(record.token) is None

        self.assertLess(await eventually(gone, timeout=2), 1.0)
        self.assertIsNotNone(await b.get_key(new.token))
        await a.delete_keys([new.token])

        async def deleted():
            return await b.get_key(new.token) is None

        self.assertLess(await eventually(deleted, timeout=2), 1.0)

    async def test_cache_used(self):
        """
        A cached record is served without reading Redis (an edit made
        behind the proxy's back is not seen) until its token is published.
        """
        a = self.process()
        await a.subscription.whenActive()
        _, record = await a.create_key({})
        await a.get_key(record.token)
        self.server.command("HSET", f"dheera:key:{record.token}", "blocked", "1")
        self.assertFalse((await a.get_key(record.token)).blocked)
        self.server.command("PUBLISH", "dheera:invalidate", record.token)

        async def blocked():
            return (await a.get_key(record.token)).blocked

        await eventually(blocked, timeout=2)

    async def test_flush_all(self):
        """
        Publishing C{*} empties the cache.
        """
        a = self.process()
        await a.subscription.whenActive()
        _, record = await a.create_key({})
        await a.get_key(record.token)
        self.server.command("HSET", f"dheera:key:{record.token}", "rpm_limit", "7")
        self.server.command("PUBLISH", "dheera:invalidate", "*")

        async def seen():
            return (await a.get_key(record.token)).rpm_limit == 7

        await eventually(seen, timeout=2)

    async def test_no_negative_caching(self):
        """
        A key made by another process works at once, even where it was just
        looked up as unknown.
        """
        a, b = await self.two()
        self.assertIsNone(await b.get_key("4" * 64))
        _, record = await a.create_key({})
        self.assertIsNotNone(await b.get_key(record.token))

    async def test_not_trusted_during_outage(self):
        """
        While Redis is down the cache is not used: lookups fail with
        L{RedisUnavailable} (fail closed) instead of answering from memory;
        when Redis is back the cache works again.
        """
        a = self.process()
        await a.subscription.whenActive()
        _, record = await a.create_key({})
        await a.get_key(record.token)
        self.server.stop()
        await eventually(lambda: defer.succeed(not a.trusted))
        with self.assertRaises(RedisUnavailable):
            await a.get_key(record.token)
        self.server.start()
        await a.subscription.whenActive()
        # The restarted server has no persistence: the key is gone, and the
        # cache must not pretend otherwise.
        self.assertIsNone(await a.get_key(record.token))

    async def test_ttl(self):
        """
        Entries are trusted for C{ttl} seconds at most.
        """
        clock = Clock()
        a = self.process(reactor_=clock, ttl=5)
        await a.subscription.whenActive()
        _, record = await a.create_key({})
        await a.get_key(record.token)
        self.server.command("HSET", f"dheera:key:{record.token}", "rpm_limit", "3")
        clock.advance(4)
        self.assertIsNone((await a.get_key(record.token)).rpm_limit)
        clock.advance(2)
        self.assertEqual((await a.get_key(record.token)).rpm_limit, 3)

    async def test_concurrent_misses_share_one_read(self):
        """
        Fifty lookups of one uncached token made at the same time read
        Redis once and all get the record; a lookup made after an
        invalidation does not share the read that started before it.
        """
        client = self.client()
        inner = RedisKeyStore(client, "dheera:")
        _, record = await inner.create_key({})
        gate = defer.Deferred()
        reads = []

        class GatedStore:
            invalidation_channel = inner.invalidation_channel

            async def get_key(self, token):
                reads.append(token)
                found = await inner.get_key(token)
                if len(reads) == 1:
                    await gate
                return found

        cached = CachedKeyStore(GatedStore(), client, reactor)
        self.addCleanup(cached.close)
        await cached.subscription.whenActive()
        lookups = [defer.Deferred.fromCoroutine(cached.get_key(record.token)) for _ in range(50)]
        await sleep(0.05)
        self.assertEqual(len(reads), 1)
        cached._forget(record.token)
        after = defer.Deferred.fromCoroutine(cached.get_key(record.token))
        self.assertEqual((await after).token, record.token)
        self.assertEqual(len(reads), 2)
        gate.callback(None)
        found = await defer.gatherResults(lookups)
        self.assertEqual({r.token for r in found}, {record.token})

    async def test_shared_read_failure_reaches_every_lookup(self):
        """
        When the one shared read fails (Redis unavailable), every lookup
        that waited for it fails the same way, and the next lookup reads
        again.
        """
        client = self.client()
        inner = RedisKeyStore(client, "dheera:")
        _, record = await inner.create_key({})
        gate = defer.Deferred()
        reads = []

        class FailingStore:
            invalidation_channel = inner.invalidation_channel

            async def get_key(self, token):
                reads.append(token)
                if len(reads) == 1:
                    await gate
                    raise RedisUnavailable("down")
                return await inner.get_key(token)

        cached = CachedKeyStore(FailingStore(), client, reactor)
        self.addCleanup(cached.close)
        await cached.subscription.whenActive()
        lookups = [defer.Deferred.fromCoroutine(cached.get_key(record.token)) for _ in range(10)]
        gate.callback(None)
        for lookup in lookups:
            with self.assertRaises(RedisUnavailable):
                await lookup
        self.assertEqual(len(reads), 1)
        self.assertEqual((await cached.get_key(record.token)).token, record.token)
        self.assertEqual(len(reads), 2)

    async def test_invalidation_during_lookup(self):
        """
        A record read before an invalidation arrived is not cached when the
        read finishes after it.
        """
        client = self.client()
        inner = RedisKeyStore(client, "dheera:")
        _, record = await inner.create_key({})
        gate = defer.Deferred()
        read = defer.Deferred()
        reads = []

        class SlowStore:
            invalidation_channel = inner.invalidation_channel

            async def get_key(self, token):
                reads.append(token)
                found = await inner.get_key(token)
                if not read.called:
                    read.callback(None)
                await gate
                return found

        cached = CachedKeyStore(SlowStore(), client, reactor)
        self.addCleanup(cached.close)
        await cached.subscription.whenActive()
        before = cached._generation
        pending = defer.Deferred.fromCoroutine(cached.get_key(record.token))
        # The record is read (not blocked yet) before the block, whose
        # invalidation arrives while the lookup is still on its way.
        await read
        await inner.block_key(record.token)
        await eventually(lambda: defer.succeed(cached._generation > before))
        gate.callback(None)
        self.assertFalse((await pending).blocked)
        self.assertTrue((await cached.get_key(record.token)).blocked)
        self.assertEqual(len(reads), 2)
