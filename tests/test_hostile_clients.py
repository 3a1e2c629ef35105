"""
Hostile clients against a real proxy process (C{twistd -n dheera} on a
loopback port, its embedded Redis, a fake vLLM): nobody without a key can
make it read a body, nobody can make it hold answers nobody reads, bodies
are refused from their headers when the headers decide, and whatever a
client does, the reactor keeps answering (a liveness probe beside every
attack: L{STALL_BOUND}) and the process's memory stays put
(L{RSS_BOUND}).

The bounds leave a loaded 2-core machine its margin and none to the
failures they guard against: before the listener checked keys and caps
when the headers arrive, a 100 MB form to C{/key/generate} stalled the
reactor for 16 s and took 2 GB; unread pipelined answers grew the process
by 5.4 MiB/s; a 100 MB JSON body stalled it 5 s.
"""

import json
import time

import treq
from twisted.internet import reactor
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from tests.fake_vllm import FakeVLLM
from tests.hostile_clients import Attack, LivenessProbe, answer_complete, chunked, repeated, rss_bytes, status_of
from tests.passthrough_harness import MASTER_KEY, error_of, parse_response
from tests.proxy_process import ProxyProcess

MODEL = "alpha"
MiB = 1024 * 1024
# The longest a liveness probe may wait while an attack runs (the failures
# were 1.6 to 16 s).
STALL_BOUND = 1.0
# The most the proxy process may grow during one attack.
RSS_BOUND = 40 * MiB


def head(method: bytes, target: bytes, *headers: bytes, key=MASTER_KEY, version: bytes = b"HTTP/1.1") -> bytes:
    """
    :return: a raw request head for C{target} presenting C{key} (none when
        L{None}).
    """
    lines = [method + b" " + target + b" " + version, b"Host: 127.0.0.1"]
    if key is not None:
        lines.append(b"Authorization: Bearer " + key.encode("ascii"))
    return b"\r\n".join(lines + list(headers)) + b"\r\n\r\n"


class HostileClientHarness:
    """
    One proxy process (master key, embedded Redis, C{alpha} on a fake
    vLLM) per test, with a liveness probe and RSS readings around attacks.
    """

    timeout = 90

    async def setUp(self):
        self.upstream = FakeVLLM(reactor)
        await self.upstream.start()
        self.addCleanup(self.upstream.stop)
        config = {
            "model_list": [
                {"model_name": MODEL, "dheera_ai_params": {"model": "hosted_vllm/tiny", "api_base": self.upstream.url}}
            ],
            "general_settings": {"master_key": MASTER_KEY},
        }
        self.proxy = ProxyProcess(reactor, config)
        self.addCleanup(self.proxy.cleanup)
        await self.proxy.start()

    async def call(self, method: str, path: str, key=MASTER_KEY, body=None) -> tuple:
        """
        :return: C{(status, body)} of one ordinary request.
        """
        headers = {"content-type": "application/json"}
        if key is not None:
            headers["authorization"] = f"Bearer {key}"
        data = None if body is None else json.dumps(body).encode("utf-8")
        response = await treq.request(method, self.proxy.url + path, headers=headers, data=data, persistent=False, timeout=10)
        return response.code, await response.content()

    async def virtual_key(self, **fields) -> str:
        """
        :return: a new virtual key with C{fields}.
        """
        status, content = await self.call("POST", "/key/generate", body=dict({"models": [MODEL]}, **fields))
        self.assertEqual(status, 200, content)
        return json.loads(content)["key"]

    async def attack(self, attack: Attack) -> Attack:
        """
        Run C{attack} with a liveness probe beside it; assert the probe
        never waited over L{STALL_BOUND} and the proxy grew less than
        L{RSS_BOUND}.
        """
        pid = self.proxy.process.pid
        before = rss_bytes(pid)
        probe = LivenessProbe(self.proxy.port).start()
        try:
            await deferToThread(attack.run)
            grown = rss_bytes(pid) - before
        finally:
            worst = await deferToThread(probe.stop)
        figures = f"stall {worst:.3f} s, RSS +{grown / MiB:.1f} MiB, body sent {attack.sent / MiB:.1f} MiB in {attack.seconds:.1f} s"
        print(f"\n{self.id()}: {figures}")
        self.assertGreater(probe.answered, 0, figures)
        self.assertLess(worst, STALL_BOUND, figures)
        self.assertLess(grown, RSS_BOUND, figures)
        return attack

    def assertAnswered(self, attack: Attack, status: int) -> dict:
        """
        Assert C{attack} got a C{status} answer in the OpenAI error shape
        (no C{100 Continue} before it) and the connection closed.

        :return: the error object.
        """
        self.assertEqual(status_of(attack.answer), status, attack.answer[:300])
        self.assertFalse(attack.answer.startswith(b"HTTP/1.1 100"), attack.answer[:300])
        code, headers, body = parse_response(attack.answer)
        self.assertEqual(headers.get("connection"), [b"close"])
        return error_of(body)


class ControlBodyTests(HostileClientHarness, TestCase):
    """
    Control-plane requests: the key is checked when the headers arrive (401
    without reading a byte of body), bodies are capped at
    C{max_control_body_bytes} (1 MiB by default, 413 from the
    Content-Length), forms are not parsed.
    """

    async def test_unauthenticated_form_not_read(self):
        """
        A 100 MB urlencoded POST to C{/key/generate} without a key gets 401
        before its body is read (the client could send no more than socket
        buffers hold), and neither stalls the proxy nor grows it.
        """
        attack = await self.attack(
            Attack(
                self.proxy.port,
                head(b"POST", b"/key/generate", b"Content-Type: application/x-www-form-urlencoded", b"Content-Length: 104857600", key=None),
                repeated(b"a=b&" * 16384, 104857600),
                done=answer_complete,
            )
        )
        error = self.assertAnswered(attack, 401)
        self.assertEqual(error["type"], "authentication_error")
        self.assertLess(attack.sent, 20 * MiB)

    async def test_unauthenticated_chunked_not_read(self):
        """
        A chunked POST without a key is refused (401) when its headers
        arrive, however long its body would be.
        """
        attack = await self.attack(
            Attack(
                self.proxy.port,
                head(b"POST", b"/key/update", b"Transfer-Encoding: chunked", key=None),
                chunked(repeated(b"x" * 65536, 104857600)),
                done=answer_complete,
            )
        )
        self.assertAnswered(attack, 401)
        self.assertLess(attack.sent, 20 * MiB)

    async def test_wrong_key_not_read(self):
        """
        An unknown virtual key on a control route is refused (401) before
        the body, like no key.
        """
        attack = await self.attack(
            Attack(
                self.proxy.port,
                head(b"POST", b"/key/generate", b"Content-Length: 50000000", key="sk-not-a-key"),
                done=answer_complete,
                seconds=10,
            )
        )
        self.assertAnswered(attack, 401)

    async def test_control_body_cap_from_length(self):
        """
        With the master key, a control body declared over 1 MiB gets 413
        from its Content-Length, before any of it is sent.
        """
        attack = await self.attack(
            Attack(
                self.proxy.port,
                head(b"POST", b"/key/generate", b"Content-Type: application/json", b"Content-Length: %d" % (MiB + 1)),
                done=answer_complete,
                seconds=10,
            )
        )
        error = self.assertAnswered(attack, 413)
        self.assertIn(str(MiB), error["message"])

    async def test_control_chunked_body_cap(self):
        """
        With the master key, a chunked control body is refused (413) as soon
        as it grows past 1 MiB.
        """
        attack = await self.attack(
            Attack(
                self.proxy.port,
                head(b"POST", b"/key/generate", b"Content-Type: application/json", b"Transfer-Encoding: chunked"),
                chunked(repeated(b" " * 65536, 104857600)),
                done=answer_complete,
            )
        )
        self.assertAnswered(attack, 413)
        self.assertLess(attack.sent, 20 * MiB)

    async def test_continue_only_after_key(self):
        """
        C{Expect: 100-continue} without a key gets the 401 and no C{100
        Continue}, on the control plane and on the data plane.
        """
        for target in (b"/key/generate", b"/vllm/v1/chat/completions"):
            attack = await deferToThread(
                Attack(
                    self.proxy.port,
                    head(b"POST", target, b"Content-Type: application/json", b"Content-Length: 1000", b"Expect: 100-continue", key=None),
                    done=answer_complete,
                    seconds=10,
                ).run
            )
            self.assertAnswered(attack, 401)

    async def test_public_routes_need_no_key(self):
        """
        C{/health/liveliness}, C{/health/readiness} and C{/metrics} answer
        without a key; other control routes do not, unknown ones included.
        """
        for path in ("/health/liveliness", "/health/readiness", "/metrics"):
            status, content = await self.call("GET", path, key=None)
            self.assertEqual(status, 200, (path, content))
        for path in ("/health", "/key/list", "/no/such/route"):
            status, content = await self.call("GET", path, key=None)
            self.assertEqual(status, 401, (path, content))


class UnreadAnswerTests(HostileClientHarness, TestCase):
    """
    A client that pipelines requests and never reads what comes back holds
    at most a bounded amount of the proxy's memory: the proxy stops
    reading while the answers pile up in the socket.
    """

    async def test_unread_pipelining_bounded(self):
        """
        Ten seconds of pipelined C{GET /metrics} and C{GET /vllm/...}
        without a key, never reading, grow the proxy by less than 40 MB and
        do not stall it.
        """
        requests = (head(b"GET", b"/metrics", key=None) + head(b"GET", b"/vllm/v1/models", key=None)) * 64

        def forever():
            while True:
                yield requests

        attack = await self.attack(Attack(self.proxy.port, b"", forever(), seconds=10, read=False, receive_buffer=4096))
        # The proxy stopped reading: far less was taken than ten seconds of
        # loopback could carry.
        self.assertLess(attack.sent, 20 * MiB)


class BodyAdmissionTests(HostileClientHarness, TestCase):
    """
    Data-plane bodies: what the headers decide is refused before the body
    is read, JSON bodies the proxy parses are capped at
    C{max_json_body_bytes} (16 MiB by default) and in the work they cost.
    """

    async def test_json_cap_from_length(self):
        """
        A JSON body declared at 100 MB gets 413 from its Content-Length.
        """
        key = await self.virtual_key()
        attack = await self.attack(
            Attack(
                self.proxy.port,
                head(b"POST", b"/vllm/v1/chat/completions", b"Content-Type: application/json", b"Content-Length: 104857600", key=key),
                done=answer_complete,
                seconds=10,
            )
        )
        error = self.assertAnswered(attack, 413)
        self.assertIn(str(16 * MiB), error["message"])

    async def test_json_growing_past_cap(self):
        """
        A chunked JSON body is refused (413) once it grows past 16 MiB,
        without stalling or growing the proxy.
        """
        key = await self.virtual_key()
        body = iter([b'{"model": "alpha", "messages": [{"role": "user", "content": "'])
        attack = await self.attack(
            Attack(
                self.proxy.port,
                head(b"POST", b"/vllm/v1/chat/completions", b"Content-Type: application/json", b"Transfer-Encoding: chunked", key=key),
                chunked(iter(list(body) + list(repeated(b"a" * 65536, 104857600)))),
                done=answer_complete,
            )
        )
        self.assertAnswered(attack, 413)
        self.assertLess(attack.sent, 40 * MiB)

    async def test_costly_json_refused_quickly(self):
        """
        A JSON body under the byte cap but made of millions of tiny values
        (costly to parse) is refused without stalling the proxy.
        """
        key = await self.virtual_key()
        document = b'{"model": "alpha", "messages": [' + b"{}," * (5 * MiB) + b"{}]}"
        attack = await self.attack(
            Attack(
                self.proxy.port,
                head(b"POST", b"/vllm/v1/chat/completions", b"Content-Type: application/json", b"Content-Length: %d" % len(document), key=key),
                iter([document]),
                done=answer_complete,
            )
        )
        self.assertEqual(status_of(attack.answer), 413, attack.answer[:300])

    async def test_refused_from_headers(self):
        """
        A virtual key calling an operator route, a route outside its
        C{allowed_routes}, or naming a model it may not use in the header
        is refused (403) from the headers, before its 10 MB body.
        """
        key = await self.virtual_key(allowed_routes=["/v1/chat/completions"])
        cases = [
            (b"/vllm/sleep", ()),
            (b"/vllm/v1/embeddings", ()),
            (b"/vllm/v1/chat/completions", (b"x-dheera-model: beta",)),
            (b"/vllm/v1/chat/completions?model=beta", ()),
        ]
        for target, extra in cases:
            attack = await self.attack(
                Attack(
                    self.proxy.port,
                    head(b"POST", target, b"Content-Type: application/json", b"Content-Length: 10000000", *extra, key=key),
                    done=answer_complete,
                    seconds=10,
                )
            )
            self.assertAnswered(attack, 403)

    async def test_over_rpm_refused_from_headers(self):
        """
        Once a key is known to be over its rpm limit, its next call gets
        429 with Retry-After from the headers, before its body.
        """
        key = await self.virtual_key(rpm_limit=1)
        document = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
        status, content = await self.call("POST", "/vllm/v1/chat/completions", key=key, body=document)
        self.assertEqual(status, 200, content)
        status, content = await self.call("POST", "/vllm/v1/chat/completions", key=key, body=document)
        self.assertEqual(status, 429, content)
        attack = await self.attack(
            Attack(
                self.proxy.port,
                head(b"POST", b"/vllm/v1/chat/completions", b"Content-Type: application/json", b"Content-Length: 15000000", key=key),
                done=answer_complete,
                seconds=10,
            )
        )
        self.assertAnswered(attack, 429)
        code, headers, body = parse_response(attack.answer)
        self.assertGreater(int(headers["retry-after"][0]), 0)


class PipelinedUpgradeTests(HostileClientHarness, TestCase):
    """
    Upgrade and CONNECT requests pipelined by the thousand in one read are
    answered in a loop, not by recursion.
    """

    async def test_thousands_of_upgrades_in_one_read(self):
        """
        3000 pipelined C{Upgrade} requests, as short as they come (about
        1,300 in one 64 KiB read), in one write are all answered (each a
        401: upgrades are served as plain requests) and nothing about
        recursion is logged.
        """
        one = b"GET /vllm/ HTTP/1.1\r\nUpgrade:a\r\nConnection:upgrade\r\n\r\n"
        count = 3000
        start = time.monotonic()
        attack = await self.attack(
            Attack(
                self.proxy.port,
                one * count,
                done=lambda answer: answer.count(b"HTTP/1.1 401") >= count,
                seconds=30,
            )
        )
        self.assertEqual(attack.answer.count(b"HTTP/1.1 401"), count, f"{time.monotonic() - start:.1f} s")
        log = self.proxy.log_text()
        self.assertNotIn("RecursionError", log)
        self.assertNotIn("Traceback", log)

    async def test_connect_refused(self):
        """
        A CONNECT request is refused (400: its target is not a path) and the connection closed, with
        nothing logged as a failure.
        """
        attack = await deferToThread(
            Attack(self.proxy.port, b"CONNECT 127.0.0.1:22 HTTP/1.1\r\nHost: 127.0.0.1:22\r\n\r\n" * 1500, done=answer_complete, seconds=10).run
        )
        self.assertEqual(status_of(attack.answer), 400, attack.answer[:300])
        self.assertNotIn("Traceback", self.proxy.log_text())


class FramingTests(HostileClientHarness, TestCase):
    """
    Request framing details over a real socket: trailers never reach vLLM,
    HTTP/1.0 with Transfer-Encoding closes, a Connection header may not
    strip what the proxy read.
    """

    def chat_body(self) -> bytes:
        return json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}).encode()

    async def test_trailers_not_forwarded(self):
        """
        Trailer fields of a chunked call body are not sent upstream as
        headers.
        """
        body = self.chat_body()
        attack = await deferToThread(
            Attack(
                self.proxy.port,
                head(b"POST", b"/vllm/v1/chat/completions", b"Content-Type: application/json", b"Transfer-Encoding: chunked"),
                iter([b"%x\r\n%s\r\n0\r\nX-Evil: 1\r\nX-Forwarded-For: 6.6.6.6\r\n\r\n" % (len(body), body)]),
                done=lambda answer: status_of(answer) is not None and answer.endswith(b"0\r\n\r\n") or answer_complete(answer),
                seconds=10,
            ).run
        )
        self.assertEqual(status_of(attack.answer), 200, attack.answer[:300])
        [received] = [r for r in self.upstream.received if r.uri == b"/v1/chat/completions"]
        self.assertIsNone(received.header("x-evil"))
        self.assertNotIn("6.6.6.6", received.header("x-forwarded-for") or "")

    async def test_http10_chunked_closes(self):
        """
        An HTTP/1.0 call with Transfer-Encoding is answered and its
        connection closed, even with keep-alive asked for.
        """
        body = self.chat_body()
        attack = await deferToThread(
            Attack(
                self.proxy.port,
                head(b"POST", b"/vllm/v1/chat/completions", b"Content-Type: application/json", b"Connection: keep-alive",
                     b"Transfer-Encoding: chunked", version=b"HTTP/1.0"),
                iter([b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body)]),
                seconds=10,
            ).run
        )
        self.assertTrue(attack.closed, attack.answer[:300])
        self.assertTrue(attack.answer.startswith(b"HTTP/1.0 200"), attack.answer[:300])

    async def test_connection_may_not_name_content_type(self):
        """
        C{Connection: content-type} is refused (400): the proxy reads the
        body as JSON by its Content-Type, vLLM would not see it.
        """
        body = self.chat_body()
        attack = await deferToThread(
            Attack(
                self.proxy.port,
                head(b"POST", b"/vllm/v1/chat/completions", b"Content-Type: application/json", b"Connection: content-type",
                     b"Content-Length: %d" % len(body)),
                iter([body]),
                done=answer_complete,
                seconds=10,
            ).run
        )
        error = self.assertAnswered(attack, 400)
        self.assertIn("content-type", error["message"])
        self.assertEqual([r for r in self.upstream.received if r.uri == b"/v1/chat/completions"], [])
