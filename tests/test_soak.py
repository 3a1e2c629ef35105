"""
A short soak of a two-worker proxy (issue 7 item 8): C{twistd -n dheera
--workers 2} sharing one append-only redis-server, over an in-test
L{tests.fake_vllm.FakeVLLM}, under a bounded mixed load of JSON calls, SSE
streams, multipart uploads and bad requests, with Redis restarted once in
the middle.

Afterwards the workers hold no more file descriptors and not much more
memory than after warm-up, and the virtual key's spend is exactly the sum
of the costs of the calls that succeeded: nothing refused while Redis was
away is billed, and nothing settled through the backlog is lost or billed
twice.

The load lasts C{DHEERA_SOAK_SECONDS} seconds (default 40, at least 12).
"""

import json
import os
from decimal import Decimal
from typing import List, Optional

import attr
from twisted.internet import reactor
from twisted.internet.defer import Deferred, ensureDeferred, gatherResults
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.trial.unittest import TestCase
from twisted.web.client import Agent, HTTPConnectionPool, readBody
from twisted.web.http_headers import Headers

from tests.fake_vllm import FakeVLLM
from tests.passthrough_harness import RawClient, error_of, multipart, parse_response, sleep
from tests.proxy_process import ProxyProcess
from tests.redis_server import RedisServer
from tests.scripted_upstream import BytesBody

# At least 12 s: the checks need calls well after the mid-soak restart.
SOAK_SECONDS = max(12.0, float(os.environ.get("DHEERA_SOAK_SECONDS", "40")))
WARMUP_SECONDS = 4.0
LOOPS = 8
MASTER_KEY = "sk-soak-master-0123456789abcdef"
PREFIX = "dheera:"
INPUT_NANOS = 200  # input_cost_per_token 0.0000002 USD
OUTPUT_NANOS = 600  # output_cost_per_token 0.0000006 USD
FD_SLACK = 10
RSS_SLACK_KB = 50 * 1024
# A call that takes longer than this has hung.
CALL_LIMIT = 15.0
# Escape attempts the proxy must refuse with 400 before anything else.
ESCAPE_PATHS = (
    b"/vllm/../key/generate",
    b"/vllm/v1/%2e%2e/%2E%2E/metrics",
    b"/vllm/v1//chat/completions",
    b"/vllm/v1/chat%2Fcompletions",
    b"/vllm/v1/..%5Cadmin",
    b"/vllm/v1\\..\\health",
)
KINDS = ("json", "sse", "upload", "json", "sse", "bad_json", "escape", "unknown_key", "sse", "json")


@attr.s(frozen=True, slots=True, auto_attribs=True)
class Outcome:
    """
    One call of the soak as the client saw it.

    :ivar kind: which of L{KINDS}.
    :ivar code: the HTTP status, or L{None} when no (complete) answer came
        within L{CALL_LIMIT}.
    :ivar billed_nanos: what the call must add to the key's spend if it
        succeeded: the deterministic cost of its usage.
    :ivar header_nanos: the C{x-dheera-response-cost} header (nano-USD), or
        L{None}.
    :ivar complete: the answer was whole (an SSE stream ended with
        C{[DONE]}).
    """

    kind: str
    code: Optional[int]
    started: float
    ended: float
    billed_nanos: int = 0
    header_nanos: Optional[int] = None
    complete: bool = False
    body: bytes = b""


def worker_pids(parent: int) -> List[int]:
    """
    :return: the pids of the processes started with C{--worker-parent
        <parent>}.
    """
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/cmdline", "rb") as f:
                args = f.read().split(b"\0")
        except OSError:
            continue
        for i, arg in enumerate(args[:-1]):
            if arg == b"--worker-parent" and args[i + 1] == str(parent).encode():
                found.append(int(name))
    return sorted(found)


def open_fds(pid: int) -> int:
    """
    :return: how many file descriptors C{pid} holds.
    """
    return len(os.listdir(f"/proc/{pid}/fd"))


def rss_kb(pid: int) -> int:
    """
    :return: the resident set size of C{pid} in kB.
    """
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError(f"no VmRSS for {pid}")


class SoakLoad:
    """
    The soak's client: a bounded number of loops, each making one call after
    another over new connections, cycling through L{KINDS}.

    :param test: the test case whose cleanup closes the pool.
    :param proxy: the proxy process to call.
    :param key: the virtual key the calls use.
    """

    def __init__(self, test: TestCase, proxy: ProxyProcess, key: str):
        self.proxy = proxy
        self.key = key
        self.pool = HTTPConnectionPool(reactor, persistent=False)
        test.addCleanup(self.pool.closeCachedConnections)
        self.agent = Agent(reactor, pool=self.pool)
        self.outcomes: List[Outcome] = []
        self.raw_clients = set()
        test.addCleanup(self._abort_raw_clients)
        self._count = 0
        self._stopping = False

    def _abort_raw_clients(self) -> Deferred:
        async def abort():
            for client in list(self.raw_clients):
                if client.connected:
                    client.transport.abortConnection()
                    await client.closed()

        return ensureDeferred(abort())

    async def run(self, seconds: float, loops: int = LOOPS) -> None:
        """
        Run C{loops} loops for C{seconds} seconds.
        """
        self._stopping = False
        runs = [ensureDeferred(self._loop()) for _ in range(loops)]
        await sleep(seconds)
        self._stopping = True
        await gatherResults(runs)

    def start(self, loops: int = LOOPS) -> Deferred:
        """
        Start C{loops} loops; L{stop} ends them.

        :return: a Deferred firing once every loop has ended.
        """
        self._stopping = False
        return gatherResults([ensureDeferred(self._loop()) for _ in range(loops)])

    def stop(self) -> None:
        """
        Let every loop end after its current call.
        """
        self._stopping = True

    async def _loop(self) -> None:
        while not self._stopping:
            i = self._count
            self._count += 1
            kind = KINDS[i % len(KINDS)]
            self.outcomes.append(await getattr(self, "_" + kind)(i))

    async def _http(self, kind: str, method: bytes, path: str, headers: dict, body: Optional[bytes], **extra) -> tuple:
        h = Headers({name.encode("ascii"): [value.encode("latin-1")] for name, value in headers.items()})
        started = reactor.seconds()

        async def exchange():
            response = await self.agent.request(
                method, (self.proxy.url + path).encode("ascii"), h, None if body is None else BytesBody(body)
            )
            return response, await readBody(response)

        d = Deferred.fromCoroutine(exchange())
        d.addTimeout(CALL_LIMIT, reactor)
        try:
            response, content = await d
        except Exception as e:
            return None, Outcome(kind, None, started, reactor.seconds(), body=repr(e).encode())
        header = response.headers.getRawHeaders(b"x-dheera-response-cost")
        header_nanos = int(Decimal(header[0].decode("ascii")) * 10**9) if header else None
        outcome = Outcome(kind, response.code, started, reactor.seconds(), header_nanos=header_nanos, body=content, **extra)
        return response, outcome

    def _auth(self, key: Optional[str] = None) -> dict:
        return {"authorization": f"Bearer {key or self.key}", "content-type": "application/json"}

    async def _json(self, i: int) -> Outcome:
        words, tokens = i % 5 + 1, i % 7 + 1
        document = {"model": "tiny", "messages": [{"role": "user", "content": " ".join(["w"] * words)}], "max_tokens": tokens}
        _, outcome = await self._http(
            "json", b"POST", "/vllm/v1/chat/completions", self._auth(), json.dumps(document).encode(),
            billed_nanos=words * INPUT_NANOS + tokens * OUTPUT_NANOS,
        )
        return attr.evolve(outcome, complete=outcome.code == 200 and b'"usage"' in outcome.body)

    async def _sse(self, i: int) -> Outcome:
        words, tokens = i % 4 + 1, i % 6 + 1
        document = {
            "model": "tiny",
            "stream": True,
            "messages": [{"role": "user", "content": " ".join(["s"] * words)}],
            "max_tokens": tokens,
        }
        headers = self._auth()
        if i % 3 == 0:
            headers["x-fake-fault"] = "slow_chunks=0.05"
        _, outcome = await self._http(
            "sse", b"POST", "/vllm/v1/chat/completions", headers, json.dumps(document).encode(),
            billed_nanos=words * INPUT_NANOS + tokens * OUTPUT_NANOS,
        )
        return attr.evolve(outcome, complete=outcome.code == 200 and outcome.body.endswith(b"data: [DONE]\n\n"))

    async def straddle(self, i: int) -> Outcome:
        """
        One slow SSE stream (10 events 0.1 s apart) for the test to start
        just before Redis goes away, so that it ends, and is settled, while
        Redis is down.
        """
        document = {"model": "tiny", "stream": True, "messages": [{"role": "user", "content": "a b c"}], "max_tokens": 6}
        headers = dict(self._auth(), **{"x-fake-fault": "slow_chunks=0.1"})
        _, outcome = await self._http(
            "sse", b"POST", "/vllm/v1/chat/completions", headers, json.dumps(document).encode(),
            billed_nanos=3 * INPUT_NANOS + 6 * OUTPUT_NANOS,
        )
        outcome = attr.evolve(outcome, complete=outcome.code == 200 and outcome.body.endswith(b"data: [DONE]\n\n"))
        self.outcomes.append(outcome)
        return outcome

    async def _upload(self, i: int) -> Outcome:
        boundary = b"soak%d" % (i,)
        body = multipart(boundary, [("model", b"tiny", None), ("file", b"\x01\x02" * (8000 + i % 1000), "a.wav")])
        headers = {"authorization": f"Bearer {self.key}", "content-type": "multipart/form-data; boundary=" + boundary.decode()}
        _, outcome = await self._http("upload", b"POST", "/vllm/v1/audio/transcriptions", headers, body)
        return attr.evolve(outcome, complete=outcome.code == 200 and b'"text"' in outcome.body)

    async def _bad_json(self, i: int) -> Outcome:
        _, outcome = await self._http(
            "bad_json", b"POST", "/vllm/v1/chat/completions", self._auth(), b'{"model": "tiny", "messages": [' + b"x" * (i % 50)
        )
        return outcome

    async def _unknown_key(self, i: int) -> Outcome:
        document = {"model": "tiny", "messages": [{"role": "user", "content": "who"}], "max_tokens": 1}
        key = "sk-soak-unknown-%032d" % (i,)
        _, outcome = await self._http("unknown_key", b"POST", "/vllm/v1/chat/completions", self._auth(key), json.dumps(document).encode())
        return outcome

    async def _escape(self, i: int) -> Outcome:
        path = ESCAPE_PATHS[i % len(ESCAPE_PATHS)]
        started = reactor.seconds()
        request = b"GET %s HTTP/1.1\r\nHost: proxy\r\nAuthorization: Bearer %s\r\nConnection: close\r\n\r\n" % (
            path,
            self.key.encode("ascii"),
        )
        client = await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", self.proxy.port), RawClient())
        self.raw_clients.add(client)
        try:
            client.transport.write(request)
            raw = await client.closed(CALL_LIMIT)
        except Exception as e:
            client.transport.abortConnection()
            await client.closed()
            return Outcome("escape", None, started, reactor.seconds(), body=repr(e).encode() + b" " + path)
        finally:
            self.raw_clients.discard(client)
        status, _, body = parse_response(raw)
        return Outcome("escape", status, started, reactor.seconds(), body=body + b" " + path)


class SoakTests(TestCase):
    """
    Two workers, one append-only Redis restarted mid-soak, one upstream.
    """

    timeout = SOAK_SECONDS + 80

    async def setUp(self):
        self.redis_server = RedisServer(extra=["--appendonly", "yes", "--appendfsync", "always"]).start()
        self.addCleanup(self.redis_server.cleanup)
        self.upstream = await FakeVLLM(reactor, served_model="tiny").start()
        self.addCleanup(self.upstream.stop)
        config = {
            "model_list": [
                {
                    "model_name": "tiny",
                    "dheera_ai_params": {
                        "model": "hosted_vllm/tiny",
                        "api_base": self.upstream.url,
                        "input_cost_per_token": 0.0000002,
                        "output_cost_per_token": 0.0000006,
                    },
                }
            ],
            "general_settings": {"master_key": MASTER_KEY, "database_url": self.redis_server.url},
        }
        self.proxy = ProxyProcess(reactor, config, extra_args=["--workers", "2"])
        self.addCleanup(self.proxy.cleanup)
        await self.proxy.start()

    async def workers(self) -> List[int]:
        """
        :return: the two worker pids, once both run and answer.
        """
        for _ in range(100):
            pids = worker_pids(self.proxy.process.pid)
            if len(pids) == 2:
                return pids
            await sleep(0.1)
        self.fail(f"expected 2 workers, found {worker_pids(self.proxy.process.pid)}")

    def key_spend(self, token: str) -> int:
        """
        :return: the key's C{spend_nanos} in Redis.
        """
        return int(self.redis_server.command("HGET", f"{PREFIX}key:{token}", "spend_nanos") or 0)

    async def settled_spend(self, token: str, quiet: float = 3.0, limit: float = 30.0) -> int:
        """
        :return: the key's spend once it has not changed for C{quiet}
            seconds (the backlog is retried every second).
        """
        value, since, started = self.key_spend(token), reactor.seconds(), reactor.seconds()
        while reactor.seconds() - since < quiet:
            self.assertLess(reactor.seconds() - started, limit, "the key's spend never settled")
            await sleep(0.2)
            now = self.key_spend(token)
            if now != value:
                value, since = now, reactor.seconds()
        return value

    async def test_soak(self):
        """
        A two-worker proxy under a mixed load (JSON chat calls, SSE streams,
        some slow, multipart uploads, bad JSON, path escapes over raw
        sockets, unknown keys) with one virtual key, Redis stopped for a
        second and started again mid-soak: every call is answered in time
        with the status its kind calls for (503 only around the restart);
        streams admitted just before the stop and ended while Redis was
        down are whole, and billed once Redis is back;
        the workers are the same processes at the end, hold at most
        C{FD_SLACK} more file descriptors and C{RSS_SLACK_KB} more memory
        than after warm-up; the key's spend is exactly the sum of the costs
        of the calls that succeeded, and the model's request count is the
        number of calls that reached the upstream and succeeded; the proxy
        printed no traceback.
        """
        pool = HTTPConnectionPool(reactor, persistent=False)
        self.addCleanup(pool.closeCachedConnections)
        response = await Agent(reactor, pool=pool).request(
            b"POST",
            (self.proxy.url + "/key/generate").encode(),
            Headers({b"authorization": [b"Bearer " + MASTER_KEY.encode()]}),
            BytesBody(b"{}"),
        )
        generated = json.loads(await readBody(response))
        self.assertEqual(response.code, 200, generated)
        load = SoakLoad(self, self.proxy, generated["key"])

        pids = await self.workers()
        await load.run(WARMUP_SECONDS)
        await sleep(1.0)
        fds_before = {pid: open_fds(pid) for pid in pids}
        rss_before = {pid: rss_kb(pid) for pid in pids}
        warm_calls = len(load.outcomes)

        running = load.start()
        await sleep(SOAK_SECONDS / 2 - 0.3)
        straddling = gatherResults([ensureDeferred(load.straddle(i)) for i in range(4)])
        await sleep(0.3)
        stopped_at = reactor.seconds()
        self.redis_server.stop()
        await sleep(1.0)
        self.redis_server.start()
        restarted_at = reactor.seconds()
        straddled = await straddling
        await sleep(SOAK_SECONDS / 2)
        load.stop()
        await running

        spend = await self.settled_spend(generated["token"])
        await sleep(1.0)
        fds_after = {pid: open_fds(pid) for pid in pids}
        rss_after = {pid: rss_kb(pid) for pid in pids}

        outcomes = load.outcomes
        soak = outcomes[warm_calls:]
        self.assertGreater(len(soak), SOAK_SECONDS * 10, "the soak made too few calls")

        def near_restart(o: Outcome) -> bool:
            return o.ended >= stopped_at - 0.1 and o.started <= restarted_at + 5.0

        expected = {"json": 200, "sse": 200, "upload": 200, "bad_json": 400, "escape": 400, "unknown_key": 401}
        for o in outcomes:
            self.assertIsNotNone(o.code, o)
            if o.code == 503 and o.kind != "escape":
                self.assertTrue(near_restart(o), o)
                self.assertEqual(error_of(o.body)["type"], "service_unavailable", o)
            else:
                self.assertEqual(o.code, expected[o.kind], o)
            if o.code == 200:
                self.assertTrue(o.complete, o)
            if o.kind == "json" and o.code == 200:
                self.assertEqual(o.header_nanos, o.billed_nanos, o)
        for kind in expected:
            self.assertTrue([o for o in soak if o.kind == kind and o.code == expected[kind]], kind)
        for o in straddled:
            self.assertEqual((o.code, o.complete), (200, True), o)
        # At least one of them ended (and was settled) while Redis was down:
        # its spend went through the backlog.
        self.assertTrue([o for o in straddled if stopped_at < o.ended < restarted_at], (stopped_at, restarted_at, straddled))
        after_restart = [o for o in soak if o.started > restarted_at + 5.0 and o.kind in ("json", "sse")]
        self.assertTrue(after_restart)
        self.assertEqual({o.code for o in after_restart}, {200})

        succeeded = [o for o in outcomes if o.code == 200]
        self.assertEqual(spend, sum(o.billed_nanos for o in succeeded))
        model = self.redis_server.command("HGETALL", f"{PREFIX}spend:model:tiny")
        model = dict(zip(model[::2], model[1::2]))
        self.assertEqual(int(model["spend_nanos"]), spend)
        self.assertEqual(int(model["requests"]), len(succeeded))

        self.assertEqual(await self.workers(), pids)
        for pid in pids:
            self.assertLessEqual(fds_after[pid], fds_before[pid] + FD_SLACK, (pid, fds_before, fds_after))
            self.assertLessEqual(rss_after[pid], rss_before[pid] + RSS_SLACK_KB, (pid, rss_before, rss_after))
        text = self.proxy.log_text()
        self.assertNotIn("Traceback", text, text[-4000:])
        self.assertNotIn("Unhandled error", text, text[-4000:])
