"""
A deployment's C{max_parallel_requests} across worker processes: a real
proxy (C{twistd -n dheera --workers 2}) over a real Redis and a fake vLLM
that records the most requests it ever ran at once.  The cap holds across
the workers, a worker SIGKILLed while it holds the slot and has calls
queued leaves no slot, capacity or (past their crash expiry) reservation
held, and a graceful shutdown sheds queued calls at once with 503.
"""

import json
import os
import signal
import time

import treq
from twisted.internet import reactor
from twisted.internet.defer import DeferredList, ensureDeferred
from twisted.trial.unittest import TestCase

from dheera_tx.accounting.limits import CallLimiter
from dheera_tx.keys.auth import Principal
from dheera_tx.keys.store import RedisKeyStore
from dheera_tx.redis.client import connect
from dheera_tx.routing.slots import DEAD_AFTER
from tests.fake_vllm import FakeVLLM
from tests.passthrough_harness import MASTER_KEY
from tests.proxy_process import ProxyProcess
from tests.redis_server import RedisServer
from tests.waiting import poll, settled, sleep, wait_until

MODEL = "alpha"
PREFIX = "dheera:"
INTERVAL = 0.5
# A crashed proxy's reservations lapse after the longest call timeout
# (600 s by default) plus a minute (see tap.build_gateway).
STALE_AFTER = 660.0


class FleetCapTests(TestCase):
    """
    Two workers of one proxy share a deployment capped at one call.
    """

    timeout = 180

    async def start(self, workers: int = 2, **router) -> ProxyProcess:
        self.redis_server = RedisServer().start()
        self.addCleanup(self.redis_server.cleanup)
        self.upstream = FakeVLLM(reactor)
        await self.upstream.start()
        self.addCleanup(self.upstream.stop)
        router.setdefault("metrics_interval", INTERVAL)
        config = {
            "model_list": [{"model_name": MODEL, "dheera_ai_params": {
                "model": "hosted_vllm/tiny", "api_base": self.upstream.url, "max_parallel_requests": 1}}],
            "general_settings": {"master_key": MASTER_KEY, "database_url": self.redis_server.url},
            "router_settings": router,
        }
        proxy = ProxyProcess(reactor, config, extra_args=["--workers", str(workers)])
        self.addCleanup(proxy.cleanup)
        await proxy.start(timeout=60)
        # Both workers live (each heartbeats under its own process id).
        await wait_until(lambda: len(self.claimers()) == workers, timeout=30)
        return proxy

    def chats(self) -> list:
        return [r for r in self.upstream.received if r.method == b"POST"]

    def claimers(self) -> list:
        return self.redis_server.command("ZRANGE", PREFIX + "routing:claimers", "0", "-1") or []

    def slots(self) -> dict:
        pairs = self.redis_server.command("HGETALL", f"{PREFIX}routing:slots:{self.deployment_id()}") or []
        return {_text(pairs[i]): int(pairs[i + 1]) for i in range(0, len(pairs), 2)}

    def waiting(self) -> dict:
        pairs = self.redis_server.command("HGETALL", f"{PREFIX}routing:waiting:{MODEL}") or []
        return {_text(pairs[i]): _text(pairs[i + 1]) for i in range(0, len(pairs), 2)}

    def deployment_id(self) -> str:
        keys = self.redis_server.command("KEYS", PREFIX + "routing:slots:*") or []
        if keys:
            return _text(keys[0])[len(PREFIX + "routing:slots:"):]
        return "alpha#0"

    async def chat(self, proxy: ProxyProcess, key: str = MASTER_KEY, fault: str = "slow_first_byte=0.2", timeout=120):
        body = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5})
        response = await treq.post(proxy.url + "/vllm/v1/chat/completions", body.encode(), persistent=False,
                                   headers={"authorization": f"Bearer {key}", "content-type": "application/json",
                                            "x-fake-fault": fault}, timeout=timeout)
        return response.code, await response.content(), response.headers

    async def test_cap_holds_across_workers(self):
        """
        Cap 1, two workers, six calls at once, three rounds: vLLM never runs
        more than one call at a time, every call is served, and no slot is
        left held in Redis afterwards.
        """
        proxy = await self.start()
        for round_ in range(3):
            calls = [ensureDeferred(self.chat(proxy)) for _ in range(6)]
            results = await DeferredList(calls, fireOnOneErrback=True, consumeErrors=True)
            self.assertEqual([r[1][0] for r in results], [200] * 6, [r[1][1] for r in results])
            self.assertEqual(self.upstream.most_running, 1, f"round {round_}")
        self.assertEqual(len(self.chats()), 18)
        await wait_until(lambda: self.slots() == {}, timeout=10)

    async def test_killed_worker_leaves_nothing_held(self):
        """
        A worker SIGKILLed while it holds the only slot and has calls
        queued: within the dead-process bound (L{DEAD_AFTER} heartbeats)
        plus a margin, new calls are served (capacity back), no slot and no
        waiting rank of the dead worker remains in Redis, and its budget
        reservations are bounded by their crash expiry (and lapse then).
        """
        proxy = await self.start()
        status, content, _ = await self.call_admin(proxy, "/key/generate", {"max_budget": 100.0})
        token = json.loads(content)["key"]
        key_hash = json.loads(content)["token"]
        holder_call = ensureDeferred(self.chat(proxy, token, fault="slow_first_byte=100"))
        holder_call.addErrback(lambda f: None)
        await wait_until(lambda: len(self.slots()) == 1 and self.upstream.posts_running == 1, timeout=20)
        (holder,) = self.slots()
        # More calls until the holder has some queued (the kernel spreads
        # connections over the two workers).
        others = []
        for _ in range(40):
            call = ensureDeferred(self.chat(proxy, token))
            call.addErrback(lambda f: None)
            others.append(call)
            if await poll(lambda: holder in self.waiting(), timeout=0.5):
                break
        self.assertIn(holder, self.waiting(), "no call queued in the holding worker")
        self.assertEqual(self.upstream.most_running, 1)
        os.kill(_pid_of(holder), signal.SIGKILL)
        killed_at = time.time()
        # Capacity comes back: a new call is served within the bound.
        status, _, _ = await self.chat(proxy, token, timeout=60)
        self.assertEqual(status, 200)
        self.assertLess(time.time() - killed_at, DEAD_AFTER * INTERVAL + 15)
        for call in others:
            await call
        self.assertEqual(self.upstream.most_running, 1)
        await wait_until(lambda: self.slots() == {}, timeout=20)
        self.assertNotIn(holder, self.waiting())
        # The dead worker's reservations: never settled, held until their
        # crash expiry, then dropped by the next admission.
        name = f"{PREFIX}reserved:key:{key_hash}"
        left = await settled(lambda: self._reservations(name), quiet=1.5)
        self.assertTrue(left, "the dead worker held reservations")
        latest = max(left.values())
        self.assertLessEqual(latest, killed_at + STALE_AFTER + 1)
        ttl = self.redis_server.command("TTL", name)
        self.assertTrue(0 < ttl <= STALE_AFTER, ttl)
        redis = connect(reactor, self.redis_server.url)
        self.addCleanup(redis.disconnect)
        record = await RedisKeyStore(redis, PREFIX).get_key(key_hash)
        limiter = CallLimiter(redis, PREFIX, lambda: latest + 1, stale_after=STALE_AFTER, reactor=reactor)
        await limiter.admit(Principal(False, record), None, "probe")
        self.assertEqual(self._reservations(name), {})
        self.assertEqual(int(float(self.redis_server.command("HGET", name, "nanos") or 0)), 0)

    def _reservations(self, name: str) -> dict:
        """
        :return: the reservations held (member: deadline), sums and
            C{due} left out.
        """
        pairs = self.redis_server.command("HGETALL", name) or []
        return {_text(pairs[i]): float(pairs[i + 1]) for i in range(0, len(pairs), 2)
                if _text(pairs[i]) not in ("nanos", "tokens", "due")}

    async def metrics(self, proxy: ProxyProcess) -> bytes:
        response = await treq.get(proxy.url + "/metrics", persistent=False, timeout=10)
        return await response.content()

    async def call_admin(self, proxy: ProxyProcess, path: str, body: dict):
        response = await treq.post(proxy.url + path, json.dumps(body).encode(), persistent=False, timeout=10,
                                   headers={"authorization": f"Bearer {MASTER_KEY}", "content-type": "application/json"})
        return response.code, await response.content(), response.headers

    async def test_shutdown_sheds_queued_calls(self):
        """
        SIGTERM while calls are queued behind a long call: the queued calls
        get 503 C{service_unavailable} with C{Retry-After} at once (long
        before C{max_queue_wait} and the drain's grace period), in the
        OpenAI error shape; their reservations are released (not billed).
        """
        proxy = await self.start(workers=1, max_queue_wait=60)
        status, content, _ = await self.call_admin(proxy, "/key/generate", {"max_budget": 100.0})
        token, key_hash = json.loads(content)["key"], json.loads(content)["token"]
        long_call = ensureDeferred(self.chat(proxy, token, fault="slow_first_byte=3"))
        await wait_until(lambda: self.upstream.posts_running == 1, timeout=20)
        queued = [ensureDeferred(self.chat(proxy, token)) for _ in range(3)]
        while b'dheera_queue_depth{model="alpha",priority="0"} 3.0' not in await self.metrics(proxy):
            await sleep(0.05)
        started = time.time()
        proxy.process.send_signal(signal.SIGTERM)
        for call in queued:
            status, body, headers = await call
            self.assertEqual(status, 503, body)
            error = json.loads(body)["error"]
            self.assertEqual((error["type"], error["code"]), ("service_unavailable", "shutting_down"))
            self.assertEqual(set(error), {"message", "type", "param", "code"})
            self.assertTrue(headers.getRawHeaders(b"retry-after"))
        self.assertLess(time.time() - started, 2.5)
        status, _, _ = await long_call
        self.assertEqual(status, 200)
        self.assertEqual(len(self.chats()), 1)
        self.assertIsNotNone(await proxy.wait_exit(30))
        self.assertEqual(self._reservations(f"{PREFIX}reserved:key:{key_hash}"), {})


def _pid_of(process_id: str) -> int:
    """
    :return: the pid in a process id C{<host>:<pid>:<random>}.
    """
    return int(process_id.rsplit(":", 2)[1])


def _text(value) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)
