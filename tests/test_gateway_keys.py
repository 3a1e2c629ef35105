"""
Virtual keys end to end, in process: the gateway from
L{dheera_tx.tap.build_gateway} on a real loopback port, a real
C{redis-server} behind it, and a L{tests.fake_vllm.FakeVLLM} upstream.

Keys are made and changed through the HTTP admin API and then used on
C{/vllm/...}, so each test crosses the key API, the key store and its cache,
the authenticator and the data plane.  Redis outages are real: the server is
stopped, restarted on the same port, and frozen with SIGSTOP.
"""

import io
import json
import time
from typing import Optional

from twisted.internet import reactor
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial.unittest import TestCase

from dheera_tx.config import config_from_dict
from dheera_tx.keys.records import hash_key
from dheera_tx.redis.client import connect
from dheera_tx.tap import build_gateway
from tests.passthrough_harness import MASTER_KEY, ProxyHarness, deployment, error_of, sleep
from tests.redis_server import RedisServer

ALLOWED = "alpha"
OTHER = "beta"

# Every admin route a virtual key must be refused (403) on, with a body that
# would be valid for the master key.
ADMIN_CALLS = [
    (b"POST", "/key/generate", {"key_alias": "sneaky"}),
    (b"POST", "/key/update", {"key": "{victim}", "rpm_limit": 1}),
    (b"POST", "/key/delete", {"keys": ["{victim}"]}),
    (b"GET", "/key/list", None),
    (b"POST", "/key/regenerate", {"key": "{victim}"}),
    (b"POST", "/key/block", {"key": "{victim}"}),
    (b"POST", "/key/unblock", {"key": "{victim}"}),
    (b"GET", "/key/info?key={victim}", None),
    (b"POST", "/end_user/new", {"user_id": "eve"}),
    (b"GET", "/end_user/info?end_user_id=eve", None),
    (b"POST", "/end_user/block", {"user_id": "eve"}),
    (b"POST", "/end_user/delete", {"user_id": "eve"}),
]


class GatewayHarness(ProxyHarness):
    """
    The pass-through harness with Redis: a L{RedisServer}, a FakeVLLM
    serving two configured models (and as the default upstream), and the
    whole gateway on a loopback port, its json_log sink writing to
    C{self.json_log}.
    """

    timeout = 30

    async def start_gateway(self, server: Optional[RedisServer] = None, callbacks=("json_log",), general=None):
        """
        Start everything (call from C{setUp}).

        :param server: the Redis to use (default: a new one, removed at
            cleanup).
        :param callbacks: the log sinks.
        :param general: more C{general_settings}.
        """
        self.harness()
        if server is None:
            server = RedisServer().start()
            self.addCleanup(server.cleanup)
        self.server = server
        self.upstream = await self.fake()
        data = {
            "model_list": [deployment(ALLOWED, "tiny", self.upstream), deployment(OTHER, "tiny", self.upstream)],
            "general_settings": dict({"master_key": MASTER_KEY, "database_url": server.url}, **(general or {})),
            "dheera_ai_settings": {"callbacks": list(callbacks)},
        }
        # The fake is also the default upstream, for calls naming no model.
        config = config_from_dict(data, environ={"HOSTED_VLLM_API_BASE": self.upstream.url})
        self.json_log = io.StringIO()
        gateway = self.assemble(config, stdout=self.json_log)
        # Wait for the invalidation subscription: from then on the key cache
        # is in use, so revocations must reach it through pub/sub.
        await gateway.key_store.subscription.whenActive()

    def assemble(self, config, stdout=None):
        """
        Build a gateway for C{config} with a Redis client of its own and
        listen on a loopback port (C{self.base}); everything is closed at
        cleanup.

        :return: the gateway (also C{self.gateway}).
        """
        redis = connect(reactor, config.general.database_url)
        gateway = build_gateway(reactor, config, redis, stdout=stdout)
        self.gateway = gateway
        # Cleanups run last-added first: the ledger writes what it holds
        # while Redis is still connected, and its retry loop is stopped
        # after the Redis client is closed.
        self.addCleanup(self._stop_ledger, gateway.ledger)
        self.addCleanup(redis.disconnect)
        self.addCleanup(gateway.ledger.flush)
        self.addCleanup(gateway.key_store.close)
        self.addCleanup(gateway.call_log.stop)
        self.listen(gateway)
        return gateway

    @staticmethod
    def _stop_ledger(ledger) -> None:
        # Spend that could not be written (during an outage) waits in a
        # backlog retried by a LoopingCall: stop it, or trial finds the
        # reactor dirty.
        ledger.stop()


    async def call(self, method: bytes, path: str, key: Optional[str] = MASTER_KEY, body=None, headers=None):
        """
        One request with C{key} as the bearer token (none if L{None}).

        :param body: a JSON-able document (sent as application/json), or
            L{None}.
        :return: C{(status, body bytes)}.
        """
        h = dict(headers or {})
        if key is not None:
            h["authorization"] = f"Bearer {key}"
        data = None
        if body is not None:
            h["content-type"] = "application/json"
            data = json.dumps(body).encode("utf-8")
        response, content = await self.request(method, path, h, data)
        return response.code, content

    async def admin(self, path: str, body=None, method: bytes = b"POST") -> dict:
        """
        An admin call with the master key that must succeed.

        :return: the decoded answer.
        """
        status, content = await self.call(method, path, body=body)
        self.assertEqual(status, 200, content)
        return json.loads(content)

    async def generate(self, **fields) -> dict:
        """
        C{POST /key/generate}.

        :return: the answer (with C{key} and C{token}).
        """
        return await self.admin("/key/generate", fields)

    async def chat(self, key: Optional[str], model: str = ALLOWED):
        """
        A chat completion naming C{model} with C{key}.

        :return: C{(status, body bytes)}.
        """
        document = {"model": model, "messages": [{"role": "user", "content": "hello there"}]}
        return await self.call(b"POST", "/vllm/v1/chat/completions", key, document)

    async def assertWorks(self, key: str, model: str = ALLOWED) -> None:
        """
        Assert that a chat with C{key} is answered by the upstream.
        """
        before = len(self.upstream.received)
        status, content = await self.chat(key, model)
        self.assertEqual(status, 200, content)
        self.assertEqual(json.loads(content)["object"], "chat.completion")
        self.assertEqual(len(self.upstream.received), before + 1)

    async def unauthorized_body(self) -> bytes:
        """
        :return: the 401 body an unknown key gets (the reference every
            refused key must match).
        """
        status, content = await self.chat("sk-" + "x" * 43)
        self.assertEqual(status, 401)
        return content

    async def assertRefused(self, key: Optional[str], expected_body: bytes) -> None:
        """
        Assert that a chat with C{key} gets 401 with C{expected_body} and
        never reaches the upstream.
        """
        before = len(self.upstream.received)
        status, content = await self.chat(key)
        self.assertEqual(status, 401, content)
        self.assertEqual(content, expected_body)
        self.assertEqual(error_of(content)["type"], "authentication_error")
        self.assertEqual(len(self.upstream.received), before)

    async def assertForbidden(self, method: bytes, path: str, key: str, body=None, headers=None) -> dict:
        """
        Assert a 403 C{permission_error} that did not reach the upstream.

        :return: the error object.
        """
        before = len(self.upstream.received)
        status, content = await self.call(method, path, key, body, headers)
        self.assertEqual(status, 403, content)
        error = error_of(content)
        self.assertEqual(error["type"], "permission_error")
        self.assertEqual(len(self.upstream.received), before)
        return error

    async def assertForwarded(self, method: bytes, path: str, key: str, body=None, headers=None) -> None:
        """
        Assert that the call reached the upstream (with the path after
        C{/vllm}) and its answer came back (not a proxy error).
        """
        before = len(self.upstream.received)
        status, content = await self.call(method, path, key, body, headers)
        self.assertEqual(len(self.upstream.received), before + 1, (status, content))
        self.assertEqual(self.upstream.received[-1].uri, path[len("/vllm"):].encode("ascii"))
        self.assertNotIn(status, (401, 403, 502, 503), content)


class KeyLifecycleTests(GatewayHarness, TestCase):
    """
    A key made, blocked, unblocked, regenerated and deleted through the
    admin API works, and stops working, on the data plane at once.
    """

    async def setUp(self):
        await self.start_gateway()

    async def test_lifecycle(self):
        """
        generate -> the key works on /vllm/v1/chat/completions; block -> 401
        (the same body as an unknown key); unblock -> works; regenerate ->
        the old key 401, the new key works; delete -> 401.  Every refusal
        happens on the very next call after the admin answer.
        """
        refused = await self.unauthorized_body()
        answer = await self.generate(key_alias="life")
        key = answer["key"]
        self.assertTrue(key.startswith("sk-"))
        self.assertEqual(answer["token"], hash_key(key))
        await self.assertWorks(key)
        # The client's key is not sent upstream.
        self.assertIsNone(self.upstream.received[-1].header("authorization"))

        blocked = await self.admin("/key/block", {"key": key})
        self.assertTrue(blocked["blocked"])
        await self.assertRefused(key, refused)

        await self.admin("/key/unblock", {"key": answer["token"]})
        await self.assertWorks(key)

        regenerated = await self.admin("/key/regenerate", {"key": key})
        new_key = regenerated["key"]
        self.assertNotEqual(new_key, key)
        self.assertEqual(regenerated["key_alias"], "life")
        await self.assertRefused(key, refused)
        await self.assertWorks(new_key)

        deleted = await self.admin("/key/delete", {"keys": [new_key]})
        self.assertEqual(deleted["deleted_keys"], [hash_key(new_key)])
        await self.assertRefused(new_key, refused)
        await self.assertRefused(key, refused)

    async def test_expiry(self):
        """
        A key made with C{duration: "1s"} works at first and gets the
        unknown-key 401 once its second is over.
        """
        refused = await self.unauthorized_body()
        answer = await self.generate(duration="1s")
        self.assertIsNotNone(answer["expires"])
        made = time.time()
        await self.assertWorks(answer["key"])
        await sleep(max(0.0, made + 1.2 - time.time()))
        await self.assertRefused(answer["key"], refused)

    async def test_no_key(self):
        """
        Without a key, /vllm and the admin API answer 401, with the same body
        as an unknown key; nothing is created or forwarded.
        """
        refused = await self.unauthorized_body()
        await self.assertRefused(None, refused)
        status, content = await self.call(b"POST", "/key/generate", None, {})
        self.assertEqual((status, content), (401, refused))
        status, content = await self.call(b"GET", "/key/list", None)
        self.assertEqual(status, 401)
        listed = await self.admin("/key/list", method=b"GET")
        self.assertEqual(listed["total_count"], 0)

    async def test_virtual_key_not_admin(self):
        """
        A virtual key gets 403 on every admin route (generate, update,
        delete, list, regenerate, block, unblock, another key's info, end
        users), and none of them has any effect; it may read its own info.
        """
        victim = await self.generate(key_alias="victim")
        caller = await self.generate(key_alias="caller")
        for method, path, body in ADMIN_CALLS:
            path = path.replace("{victim}", victim["token"])
            if body is not None:
                body = json.loads(json.dumps(body).replace("{victim}", victim["token"]))
            status, content = await self.call(method, path, caller["key"], body)
            self.assertEqual(status, 403, (path, content))
            self.assertEqual(error_of(content)["type"], "permission_error")
        listed = await self.admin("/key/list?return_full_object=true", method=b"GET")
        self.assertEqual(listed["total_count"], 2)
        after = {k["token"]: k for k in listed["keys"]}[victim["token"]]
        self.assertFalse(after["blocked"])
        self.assertIsNone(after["rpm_limit"])
        status, _ = await self.call(b"GET", "/end_user/info?end_user_id=eve")
        self.assertEqual(status, 404)
        await self.assertWorks(victim["key"])
        status, content = await self.call(b"GET", "/key/info", caller["key"])
        self.assertEqual(status, 200, content)
        self.assertEqual(json.loads(content)["key"], caller["token"])


class KeyPermissionTests(GatewayHarness, TestCase):
    """
    A key's C{models} and C{allowed_routes}, and the operator routes, hold
    on every /vllm call.
    """

    async def setUp(self):
        await self.start_gateway()

    async def test_models_allow_list(self):
        """
        A key restricted to one model may call it (body model, the
        C{x-dheera-model} header or C{?model=}); another configured model, an
        unconfigured one (which would go to the default upstream) and a call
        naming no model at all get 403 and reach no upstream.
        """
        key = (await self.generate(models=[ALLOWED]))["key"]
        await self.assertWorks(key, ALLOWED)
        error = await self.assertForbidden(
            b"POST", "/vllm/v1/chat/completions", key, {"model": OTHER, "messages": [{"role": "user", "content": "x"}]}
        )
        self.assertIn(OTHER, error["message"])
        await self.assertForbidden(
            b"POST", "/vllm/v1/chat/completions", key, {"model": "tiny", "messages": [{"role": "user", "content": "x"}]}
        )
        self.assertEqual(await self.listed(key), [ALLOWED])
        await self.assertForbidden(b"GET", "/vllm/v1/models", key, headers={"x-dheera-model": OTHER})
        await self.assertForbidden(b"GET", f"/vllm/v1/models?model={OTHER}", key)
        await self.assertForwarded(b"GET", "/vllm/v1/models", key, headers={"x-dheera-model": ALLOWED})
        await self.assertForwarded(b"GET", f"/vllm/v1/models?model={ALLOWED}", key)
        # An unrestricted key may call anything, model or not, and lists
        # every configured model and the default upstream's own ("tiny").
        free = (await self.generate())["key"]
        await self.assertWorks(free, OTHER)
        self.assertEqual(sorted(await self.listed(free)), sorted([ALLOWED, OTHER, "tiny"]))

    async def listed(self, key: str) -> list:
        """
        :return: the ids of C{GET /vllm/v1/models} for C{key}, asserting
            that the proxy answered it and no upstream saw the call (only
            the catalog's own C{/v1/models} rounds, which carry no client
            key).
        """
        status, content = await self.call(b"GET", "/vllm/v1/models", key)
        self.assertEqual(status, 200, content)
        for received in self.upstream.received:
            self.assertNotIn(key, json.dumps(received.headers))
        return [model["id"] for model in json.loads(content)["data"]]

    async def test_allowed_routes(self):
        """
        A key with C{allowed_routes: ["/v1/chat"]} may call
        /vllm/v1/chat/completions; /vllm/tokenize and a path that merely
        starts with the same letters (/vllm/v1/chatter) get 403.
        """
        key = (await self.generate(allowed_routes=["/v1/chat"]))["key"]
        await self.assertWorks(key)
        await self.assertForbidden(b"POST", "/vllm/tokenize", key, {"model": ALLOWED, "prompt": "hello"})
        await self.assertForbidden(b"POST", "/vllm/v1/chatter", key, {"model": ALLOWED})
        # The same calls with the master key are forwarded.
        await self.assertForwarded(b"POST", "/vllm/tokenize", MASTER_KEY, {"model": ALLOWED, "prompt": "hello"})

    async def test_operator_routes(self):
        """
        vLLM's operator routes (sleep, wake_up, the LoRA adapter routes,
        reset_prefix_cache, collective_rpc) get 403 for a virtual key, even
        an unrestricted one, and never reach the GPU server; the master key
        is forwarded.
        """
        key = (await self.generate())["key"]
        routes = [
            "/vllm/sleep?level=1",
            "/vllm/wake_up",
            "/vllm/v1/load_lora_adapter",
            "/vllm/v1/unload_lora_adapter",
            "/vllm/reset_prefix_cache",
            "/vllm/collective_rpc",
        ]
        for path in routes:
            error = await self.assertForbidden(b"POST", path, key, headers={"x-dheera-model": ALLOWED})
            self.assertIn("master key", error["message"])
        self.assertFalse(self.upstream.sleeping)
        for path in routes:
            await self.assertForwarded(b"POST", path, MASTER_KEY)
        self.assertFalse(self.upstream.sleeping)  # wake_up came after sleep
        self.assertEqual(self.upstream.received[0].uri, b"/sleep?level=1")

    async def test_no_default_upstream_still_403(self):
        """
        A restricted key naming a model it may not use gets 403, not the
        404 C{model_not_found} that tells it which models this proxy serves,
        even when the proxy has no default upstream.
        """
        # A second gateway on the same Redis, without a default upstream.
        data = {
            "model_list": [deployment(ALLOWED, "tiny", self.upstream), deployment(OTHER, "tiny", self.upstream)],
            "general_settings": {"master_key": MASTER_KEY, "database_url": self.server.url},
        }
        self.assemble(config_from_dict(data))
        key = (await self.generate(models=[ALLOWED]))["key"]
        await self.assertForbidden(b"POST", "/vllm/v1/chat/completions", key, {"model": "unlisted"})
        # Its model list names only what it may use.
        self.assertEqual(await self.listed(key), [ALLOWED])



class KeySecrecyTests(GatewayHarness, TestCase):
    """
    A key's secret is shown once, by /key/generate, and never again: not in
    a log line, a call record, or Redis.
    """

    async def setUp(self):
        self.logged = []

        def observe(event):
            self.logged.append(formatEvent(event) or "")
            self.logged.extend(repr(v) for v in event.values() if isinstance(v, (str, bytes)))

        globalLogPublisher.addObserver(observe)
        self.addCleanup(globalLogPublisher.removeObserver, observe)
        await self.start_gateway(callbacks=("json_log", "redis_stream"))

    async def test_info_by_key_not_logged(self):
        """
        C{/key/info?key=<the key>} answers for the key (master key, and the
        key itself) without ever showing it; after generate, info, a call,
        regenerate and a refused call, no log event and no json_log record
        contains a secret (nor C{sk-} at all).
        """
        answer = await self.generate(key_alias="secret-holder", models=[ALLOWED])
        key = answer["key"]
        info = await self.admin(f"/key/info?key={key}", method=b"GET")
        self.assertEqual(info["key"], answer["token"])
        self.assertEqual(info["info"]["key_alias"], "secret-holder")
        self.assertNotIn(key, json.dumps(info))
        status, content = await self.call(b"GET", f"/key/info?key={key}", key)
        self.assertEqual(status, 200, content)
        self.assertNotIn(key.encode(), content)
        await self.assertWorks(key)
        await self.assertForbidden(b"GET", f"/vllm/v1/models?model={OTHER}&key={key}", key)
        new_key = (await self.admin("/key/regenerate", {"key": key}))["key"]
        status, _ = await self.call(b"GET", f"/vllm/v1/models?key={key}", key)
        self.assertEqual(status, 401)
        await self.gateway.call_log.stop()

        records = [json.loads(line) for line in self.json_log.getvalue().splitlines()]
        self.assertGreaterEqual(len(records), 3)
        self.assertIn(answer["token"][:12], {r.get("key_hash_prefix") for r in records})
        everything = self.json_log.getvalue() + "\n".join(self.logged)
        for secret in (key, new_key, MASTER_KEY):
            self.assertNotIn(secret, everything)
        self.assertNotIn("sk-", everything)

    async def test_redis_holds_no_secret(self):
        """
        After generate, what redis-cli shows: C{HGETALL dheera:key:<sha256>}
        has the key's fields, C{dheera:keys} holds the hash, the alias index
        names it; after calls, a block, a regenerate and a failed login, no
        name or value anywhere in Redis (SCAN over everything, every value
        dumped, the call-record stream included) contains a key's secret or
        the master key.
        """
        answer = await self.generate(
            key_alias="inspect", models=[ALLOWED], rpm_limit=100, max_budget=5.0, metadata={"team": "a"}
        )
        key, token = answer["key"], answer["token"]
        self.assertEqual(token, hash_key(key))
        fields = _pairs(self.server.command("HGETALL", f"dheera:key:{token}"))
        self.assertEqual(fields["key_alias"], "inspect")
        self.assertEqual(json.loads(fields["models"]), [ALLOWED])
        self.assertEqual(fields["rpm_limit"], "100")
        self.assertEqual(fields["blocked"], "0")
        self.assertEqual(fields["spend_nanos"], "0")
        for name in ("max_budget", "created_at", "metadata", "allowed_routes"):
            self.assertIn(name, fields)
        self.assertIsNotNone(self.server.command("ZSCORE", "dheera:keys", token))
        self.assertEqual(self.server.command("GET", "dheera:key_alias:inspect"), token)

        await self.assertWorks(key)
        await self.admin("/key/block", {"key": key})
        await self.admin("/key/unblock", {"key": key})
        new_key = (await self.admin("/key/regenerate", {"key": key}))["key"]
        await self.assertWorks(new_key)
        await self.chat(key)
        self.assertEqual(self.server.command("GET", "dheera:key_alias:inspect"), hash_key(new_key))
        self.assertEqual(self.server.command("EXISTS", f"dheera:key:{token}"), 0)

        # Send the call records to the dheera:log stream, to search them too.
        await self.gateway.call_log.stop()
        self.assertGreaterEqual(self.server.command("XLEN", "dheera:log"), 3)
        dump = _scan_everything(self.server)
        self.assertIn(hash_key(new_key), dump)
        for secret in (key, new_key, MASTER_KEY, key[3:], new_key[3:]):
            self.assertNotIn(secret, dump)
        self.assertNotIn("sk-", dump)


class RedisOutageTests(GatewayHarness, TestCase):
    """
    Redis stopped, restarted or frozen under a running gateway: virtual
    keys fail closed with a quick 503, the master key keeps working, and
    everything recovers without a restart of the proxy.
    """

    async def setUp(self):
        # Append-only on, so the key survives the restart of this server.
        server = RedisServer(extra=["--appendonly", "yes"]).start()
        self.addCleanup(server.cleanup)
        await self.start_gateway(server)

    async def timed_chat(self, key: str):
        """
        :return: C{(status, body, seconds it took)}.
        """
        start = time.monotonic()
        status, content = await self.chat(key)
        return status, content, time.monotonic() - start

    async def readiness(self) -> int:
        """
        :return: the status of C{GET /health/readiness}.
        """
        status, _ = await self.call(b"GET", "/health/readiness", None)
        return status

    async def assertRecovers(self, key: str, within: float = 6.0) -> None:
        """
        Assert that, within C{within} seconds, C{key} works again and the
        proxy is ready.
        """
        deadline = time.monotonic() + within
        while True:
            status, content = await self.chat(key)
            if status == 200 and await self.readiness() == 200:
                return
            if time.monotonic() > deadline:
                self.fail(f"not recovered within {within} s: {status} {content!r}")
            await sleep(0.1)

    async def test_stopped_and_restarted(self):
        """
        With Redis stopped, a virtual-key call answers 503 in the OpenAI
        shape in under 1.5 s, the master key still works on /vllm, and
        /health/readiness is 503; once Redis is started again on the same
        port, the key works and readiness is 200 within a few seconds, with
        no restart of the proxy.
        """
        key = (await self.generate())["key"]
        await self.assertWorks(key)
        self.server.stop()

        status, content, took = await self.timed_chat(key)
        self.assertEqual(status, 503, content)
        error = error_of(content)
        self.assertEqual(error["code"], "503")
        self.assertLess(took, 1.5)
        await self.assertWorks(MASTER_KEY)
        self.assertEqual(await self.readiness(), 503)

        restart(self.server)
        await self.assertRecovers(key)

    async def test_frozen(self):
        """
        With Redis frozen (SIGSTOP: connections open, nothing answers), no
        call hangs: within about a second virtual-key calls answer 503, each
        in bounded time; the master key keeps working and readiness is 503;
        after SIGCONT the key works again.
        """
        key = (await self.generate())["key"]
        await self.assertWorks(key)
        self.server.pause()
        paused = time.monotonic()
        statuses = []
        while True:
            status, content, took = await self.timed_chat(key)
            statuses.append(status)
            self.assertLess(took, 1.6, statuses)
            self.assertIn(status, (200, 503), content)
            if status == 503:
                self.assertEqual(error_of(content)["code"], "503")
                break
            self.assertLess(time.monotonic() - paused, 2.0, statuses)
            await sleep(0.1)
        # The first refusal came at most ~1 s (the subscription's heartbeat)
        # plus one Redis timeout after the freeze.
        self.assertLess(time.monotonic() - paused, 2.7)
        await self.assertWorks(MASTER_KEY)
        self.assertEqual(await self.readiness(), 503)
        self.server.resume()
        await self.assertRecovers(key)


def restart(server: RedisServer) -> None:
    """
    Start C{server} again, waiting while it loads its append-only file
    (L{RedisServer.start} takes the C{-LOADING} reply to PING for an error).
    """
    try:
        server.start()
    except RuntimeError as e:
        if "LOADING" not in str(e):
            raise
    deadline = time.monotonic() + 10
    while True:
        try:
            if server.command("PING") == "PONG":
                return
        except (RuntimeError, OSError):
            if time.monotonic() > deadline:
                raise
        time.sleep(0.02)


def _pairs(reply) -> dict:
    return dict(zip(reply[0::2], reply[1::2]))


def _scan_everything(server: RedisServer) -> str:
    """
    :return: every key name in db 0 with its whole value, as one text,
        walking the keyspace with SCAN as an operator would.
    """
    out = []
    cursor = "0"
    names = []
    while True:
        cursor, batch = server.command("SCAN", cursor, "COUNT", 1000)
        names.extend(batch)
        if cursor == "0":
            break
    dumpers = {
        "string": lambda n: server.command("GET", n),
        "hash": lambda n: server.command("HGETALL", n),
        "zset": lambda n: server.command("ZRANGE", n, 0, -1, "WITHSCORES"),
        "set": lambda n: server.command("SMEMBERS", n),
        "list": lambda n: server.command("LRANGE", n, 0, -1),
        "stream": lambda n: server.command("XRANGE", n, "-", "+"),
    }
    for name in names:
        kind = server.command("TYPE", name)
        value = dumpers[kind](name) if kind in dumpers else kind
        out.append(f"{name} {kind} {value!r}")
    return "\n".join(out)
