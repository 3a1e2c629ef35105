"""
Integration tests of SPEC section 5 (limits, spend, end users) in one
process: the proxy from L{dheera_tx.tap.build_gateway} on a real
redis-server, in front of L{tests.fake_vllm.FakeVLLM} over loopback.

The fake's usage is deterministic (prompt tokens = whitespace words of the
prompt, completion tokens = C{max_tokens} or the C{chunks} fault), and the
deployment costs 0.0000002 USD per prompt token and 0.0000006 USD per
completion token, i.e. exactly 200 and 600 nano-USD: every cost below is
exact.
"""

import io
import json
from decimal import Decimal
from typing import Callable, List, Optional

from twisted.internet import reactor
from twisted.internet.defer import ensureDeferred, gatherResults
from twisted.trial.unittest import TestCase

from dheera_tx.accounting.call_accounting import estimate_prompt_tokens
from dheera_tx.config import config_from_dict
from dheera_tx.redis.client import connect
from dheera_tx.tap import build_gateway
from tests.passthrough_harness import MASTER_KEY, ProxyHarness, RawClient, auth, deployment, error_of, sleep
from tests.redis_server import RedisServer

INPUT_NANOS = 200  # input_cost_per_token 0.0000002 USD
OUTPUT_NANOS = 600  # output_cost_per_token 0.0000006 USD
PRICES = {"input_cost_per_token": 0.0000002, "output_cost_per_token": 0.0000006}
PREFIX = "dheera:"
# The delay allowed between an answer's end and its spend being visible.
SETTLE_WITHIN = 0.5


def cost(prompt: int, completion: int) -> int:
    """
    :return: the exact cost of a call in nano-USD at the test prices.
    """
    return prompt * INPUT_NANOS + completion * OUTPUT_NANOS


def header_nanos(value: bytes) -> int:
    """
    :param value: an C{x-dheera-response-cost} value (decimal USD).
    :return: it in nano-USD, checking that it is a whole number of them.
    """
    nanos = Decimal(value.decode("ascii")) * 10**9
    assert nanos == nanos.to_integral_value(), value
    return int(nanos)


def sse_events(body: bytes) -> List[bytes]:
    """
    :return: the events of an SSE body (separated by blank lines).
    """
    return [e for e in body.replace(b"\r\n", b"\n").split(b"\n\n") if e.strip()]


def event_data(event: bytes) -> Optional[bytes]:
    """
    :return: the C{data:} payload of one event, or L{None}.
    """
    lines = [line[5:].strip() for line in event.split(b"\n") if line.startswith(b"data:")]
    return b"\n".join(lines) if lines else None


def content_events(body: bytes) -> int:
    """
    :return: how many chat/completions chunks carry generated text.
    """
    count = 0
    for event in sse_events(body):
        data = event_data(event)
        if not data or data == b"[DONE]":
            continue
        try:
            document = json.loads(data)
        except ValueError:
            continue
        for choice in document.get("choices") or []:
            if (choice.get("delta") or {}).get("content") or choice.get("text"):
                count += 1
    return count


def chat_body(content: str = "hi there", max_tokens: int = 5, **fields) -> dict:
    """
    :return: a chat completion request for model C{alpha}.
    """
    return dict({"model": "alpha", "messages": [{"role": "user", "content": content}], "max_tokens": max_tokens}, **fields)


class GatewayTestCase(ProxyHarness, TestCase):
    """
    A proxy with Redis (C{self.redis_server}) in front of one FakeVLLM
    (C{self.upstream}) serving C{tiny} as model C{alpha}, and as C{beta}
    with a 1-second call timeout.  Call records go to C{self.log_stream}.
    """

    timeout = 30
    # Extra general_settings of the proxy under test (subclasses override).
    general_settings: dict = {}

    def setUp(self):
        self.harness()
        return ensureDeferred(self._start())

    async def _start(self) -> None:
        self.redis_server = RedisServer().start()
        self.addCleanup(self.redis_server.cleanup)
        self.redis = connect(reactor, self.redis_server.url)
        self.addCleanup(self.redis.disconnect)
        self.upstream = await self.fake(served_model="tiny")
        config = config_from_dict(
            {
                "model_list": self.model_list(),
                "general_settings": dict({"master_key": MASTER_KEY}, **self.general_settings),
                "dheera_ai_settings": {"callbacks": ["json_log"]},
            }
        )
        self.log_stream = io.StringIO()
        gateway = build_gateway(reactor, config, self.redis, stdout=self.log_stream)
        self.gateway = gateway
        self.addCleanup(lambda: ensureDeferred(self._stop_gateway(gateway)))
        self.listen(gateway)

    def model_list(self) -> List[dict]:
        """
        :return: the deployments: C{alpha}, and C{beta} with a 1-second
            timeout, both on C{self.upstream}.
        """
        return [
            deployment("alpha", "tiny", self.upstream, **PRICES),
            deployment("beta", "tiny", self.upstream, timeout=1, **PRICES),
        ]

    async def _stop_gateway(self, gateway) -> None:
        # Settlements of the last calls may still be on their way to Redis.
        for _ in range(50):
            if not gateway.passthrough.in_flight and not gateway.ledger.pending:
                break
            await sleep(0.01)
        await sleep(0.05)
        await gateway.key_store.close()
        await gateway.call_log.stop()
        await gateway.prober.stop()

    # -- calls --

    async def post(self, path: str, document: dict, key: str = MASTER_KEY, headers: Optional[dict] = None):
        """
        POST C{document} as JSON to C{/vllm<path>} with C{key}.

        :return: C{(response, body)}.
        """
        h = dict(auth(key), **{"content-type": "application/json"}, **(headers or {}))
        return await self.request(b"POST", "/vllm" + path, h, json.dumps(document).encode("utf-8"))

    async def admin(self, method: str, path: str, document=None):
        """
        Call an admin route with the master key.

        :return: C{(status, decoded JSON answer)}.
        """
        body = None if document is None else json.dumps(document).encode("utf-8")
        response, content = await self.request(
            method.encode("ascii"), path, dict(auth(), **{"content-type": "application/json"}), body
        )
        return response.code, json.loads(content)

    async def new_key(self, **fields):
        """
        Generate a virtual key.

        :return: C{(key, token)}.
        """
        status, answer = await self.admin("POST", "/key/generate", fields)
        self.assertEqual(status, 200, answer)
        return answer["key"], answer["token"]

    async def key_spend(self, token: str) -> int:
        """
        :return: the key's C{spend_nanos} as C{/key/info} shows it (after
            checking C{spend} agrees).
        """
        status, answer = await self.admin("GET", f"/key/info?key={token}")
        self.assertEqual(status, 200, answer)
        info = answer["info"]
        self.assertAlmostEqual(info["spend"], info["spend_nanos"] / 1e9, places=12)
        return info["spend_nanos"]

    def hash(self, name: str) -> dict:
        """
        :return: the Redis hash C{dheera:<name>}, its values as ints where
            they are ints.
        """
        reply = self.redis_server.command("HGETALL", PREFIX + name)
        out = {}
        for field, value in zip(reply[0::2], reply[1::2]):
            try:
                out[field] = int(value)
            except ValueError:
                out[field] = value
        return out

    def parallel_slots(self, token: str) -> int:
        """
        :return: the calls of a key holding a parallel slot now.
        """
        return self.redis_server.command("ZCARD", f"{PREFIX}rl:par:{token}")

    async def wait_for(self, ready: Callable[[], bool], timeout: float = 10.0, what: str = "condition") -> float:
        """
        Poll C{ready} until it holds.

        :return: the seconds it took.
        :raise AssertionError: after C{timeout} seconds.
        """
        started = reactor.seconds()
        while not ready():
            if reactor.seconds() - started > timeout:
                self.fail(f"{what} did not hold within {timeout} s")
            await sleep(0.005)
        return reactor.seconds() - started

    async def settled(self, model: str = "alpha", requests: int = 1, timeout: float = 10.0) -> float:
        """
        Wait until the model's spend hash counts C{requests} calls (all the
        hashes of one call are written by one script, so they are then all
        visible).

        :return: the seconds it took.
        """
        return await self.wait_for(
            lambda: self.hash(f"spend:model:{model}").get("requests", 0) >= requests,
            timeout,
            f"{requests} settled call(s) of {model}",
        )

    def records(self) -> List[dict]:
        """
        :return: the call records the json_log sink wrote.
        """
        return [json.loads(line) for line in self.log_stream.getvalue().splitlines() if line.strip()]

    async def raw_stream(self, document: dict, key: str, fault: str) -> RawClient:
        """
        Start a streamed chat call on a raw connection (to disconnect
        abruptly mid-stream); aborted at cleanup if still open.
        """
        client = await self.raw_connect()
        body = json.dumps(document).encode("utf-8")
        client.transport.write(
            b"POST /vllm/v1/chat/completions HTTP/1.1\r\nHost: proxy\r\n"
            b"Authorization: Bearer " + key.encode("ascii") + b"\r\n"
            b"Content-Type: application/json\r\n"
            b"x-fake-fault: " + fault.encode("ascii") + b"\r\n"
            b"Content-Length: %d\r\n\r\n" % (len(body),) + body
        )
        return client

    def assertLimited(self, response, body: bytes, type: str) -> dict:
        """
        Assert a 429 (Too Many Requests) of C{type} in the OpenAI error
        shape.

        :return: the error object.
        """
        self.assertEqual((response.code, response.phrase), (429, b"Too Many Requests"), body)
        error = error_of(body)
        self.assertEqual(error["type"], type)
        return error

    def retry_after(self, response) -> int:
        """
        :return: the C{Retry-After} seconds, after checking there is one.
        """
        values = response.headers.getRawHeaders(b"retry-after")
        self.assertIsNotNone(values, "no Retry-After")
        return int(values[0])


class CostTests(GatewayTestCase):
    """
    Every answer family the fake serves is priced exactly from its usage,
    and the cost lands on the key, its user and team, the end user, the
    model and the per-day report.
    """

    async def assertBilled(self, path: str, document: dict, prompt: int, completion: int, stream: bool = False) -> bytes:
        """
        Make one call with a fresh key (user C{ursula}, team C{teal}) for
        end user C{erin}, and check every place its cost is recorded.

        :return: the answer's body.
        """
        key, token = await self.new_key(user_id="ursula", team_id="teal")
        response, body = await self.post(path, document, key, headers={"x-dheera-end-user": "erin"})
        self.assertEqual(response.code, 200, body)
        expected = cost(prompt, completion)
        self.assertGreater(expected, 0)
        if not stream:
            values = response.headers.getRawHeaders(b"x-dheera-response-cost")
            self.assertIsNotNone(values, "no x-dheera-response-cost")
            self.assertEqual(header_nanos(values[0]), expected)
        await self.settled()
        counters = {"spend_nanos": expected, "prompt_tokens": prompt, "completion_tokens": completion, "requests": 1}
        self.assertEqual(await self.key_spend(token), expected)
        self.assertEqual(self.hash("spend:model:alpha"), counters)
        self.assertEqual(self.hash("spend:user:ursula"), counters)
        self.assertEqual(self.hash("spend:team:teal"), counters)
        status, end_user = await self.admin("GET", "/end_user/info?end_user_id=erin&team_id=teal")
        self.assertEqual(status, 200, end_user)
        self.assertEqual(end_user["spend_nanos"], expected)
        for group, ident in (("key", token), ("user", "ursula"), ("team", "teal"), ("end_user", "erin"), ("model", "alpha")):
            status, report = await self.admin("GET", f"/spend/report?group_by={group}")
            self.assertEqual(status, 200, report)
            rows = [{k: row[k] for k in ("id", *counters)} for row in report["spend"]]
            self.assertEqual(rows, [dict(id=ident, **counters)], group)
        [record] = self.records()
        self.assertEqual(
            (record["prompt_tokens"], record["completion_tokens"], record["cost_nanos"]), (prompt, completion, expected)
        )
        self.assertFalse(record["usage_estimated"])
        return body

    async def test_chat_json(self):
        """
        A chat completion costs prompt and completion tokens at the
        deployment's prices; the answer carries the cost.
        """
        await self.assertBilled("/v1/chat/completions", chat_body("hi there friend", 5), 3, 5)

    async def test_chat_stream(self):
        """
        A streamed chat completion is billed from the usage the proxy asked
        for, which the client does not see.
        """
        body = await self.assertBilled("/v1/chat/completions", chat_body("hi there friend", 5, stream=True), 3, 5, stream=True)
        self.assertNotIn(b'"usage"', body)
        self.assertEqual(sse_events(body)[-1], b"data: [DONE]")

    async def test_completions_json(self):
        """
        A completion is billed from its usage object.
        """
        document = {"model": "alpha", "prompt": "once upon a time", "max_tokens": 6}
        await self.assertBilled("/v1/completions", document, 4, 6)

    async def test_completions_stream(self):
        """
        A streamed completion is billed from the usage chunk the proxy asked
        for (and stripped).
        """
        document = {"model": "alpha", "prompt": "once upon a time", "max_tokens": 6, "stream": True}
        body = await self.assertBilled("/v1/completions", document, 4, 6, stream=True)
        self.assertNotIn(b'"usage"', body)
        self.assertEqual(content_events(body), 6)
        self.assertEqual(sse_events(body)[-1], b"data: [DONE]")

    async def test_embeddings(self):
        """
        Embeddings are billed for their prompt tokens only.
        """
        document = {"model": "alpha", "input": ["one two", "three four five"]}
        await self.assertBilled("/v1/embeddings", document, 5, 0)

    async def test_score(self):
        """
        C{/score} is billed for the tokens of every pair.
        """
        document = {"model": "alpha", "text_1": "a b", "text_2": ["c d e", "f"]}
        await self.assertBilled("/score", document, 8, 0)

    async def test_v1_score(self):
        """
        C{/v1/score} (queries and documents form) is billed like C{/score}.
        """
        document = {"model": "alpha", "queries": "q r s", "documents": ["d1", "d2 d3"]}
        await self.assertBilled("/v1/score", document, 9, 0)

    async def test_rerank(self):
        """
        C{/rerank}, whose usage has prompt and total tokens only and comes
        before the results, is billed for its prompt tokens.
        """
        document = {"model": "alpha", "query": "q w", "documents": ["a b c", "d"]}
        await self.assertBilled("/rerank", document, 8, 0)

    async def test_pooling(self):
        """
        C{/pooling} is billed for its prompt tokens.
        """
        await self.assertBilled("/pooling", {"model": "alpha", "input": "p q r s"}, 4, 0)

    async def test_classify(self):
        """
        C{/classify} is billed for its prompt tokens.
        """
        await self.assertBilled("/classify", {"model": "alpha", "input": ["x y", "z"]}, 3, 0)

    async def test_responses_json(self):
        """
        C{/v1/responses} is billed from C{input_tokens}/C{output_tokens}.
        """
        document = {"model": "alpha", "input": "tell me a story", "max_output_tokens": 7}
        await self.assertBilled("/v1/responses", document, 4, 7)

    async def test_responses_stream(self):
        """
        A streamed C{/v1/responses} is billed from its
        C{response.completed} event, which reaches the client unchanged.
        """
        document = {"model": "alpha", "input": "tell me a story", "max_output_tokens": 7, "stream": True}
        body = await self.assertBilled("/v1/responses", document, 4, 7, stream=True)
        last = sse_events(body)[-1]
        self.assertTrue(last.startswith(b"event: response.completed\n"), last)
        usage = json.loads(event_data(last))["response"]["usage"]
        self.assertEqual((usage["input_tokens"], usage["output_tokens"]), (4, 7))


class UsageInjectionTests(GatewayTestCase):
    """
    Streamed chat calls get C{stream_options.include_usage} upstream; the
    usage chunk reaches only clients that asked for it.
    """

    async def test_injected_and_stripped(self):
        """
        A streamed chat call without C{stream_options} is sent upstream with
        C{include_usage: true}; the client's stream has no usage anywhere,
        keeps every content chunk, still ends with C{[DONE]}, and the call
        is billed from the real usage.
        """
        document = chat_body("one two three", 5, stream=True)
        response, body = await self.post("/v1/chat/completions", document)
        self.assertEqual(response.code, 200)
        sent = self.upstream.received[-1].json
        self.assertEqual(sent["stream_options"], {"include_usage": True})
        self.assertEqual(sent["model"], "tiny")
        events = sse_events(body)
        self.assertTrue(all(b'"usage"' not in e for e in events), body)
        self.assertEqual(events[-1], b"data: [DONE]")
        self.assertEqual(content_events(body), 5)
        await self.settled()
        self.assertEqual(self.hash("spend:model:alpha")["spend_nanos"], cost(3, 5))

    async def test_malformed_stream_options_left_to_vllm(self):
        """
        C{stream_options} that is not an object, or whose C{include_usage}
        is not a boolean, goes upstream as the client wrote it (vLLM, not
        the proxy, says what is wrong with it); C{include_usage: false} and
        C{null} options still get usage injected and stripped.
        """
        for options in ("x", ["include_usage"], {"include_usage": "maybe"}):
            await self.post("/v1/chat/completions", chat_body(stream=True, stream_options=options))
            self.assertEqual(self.upstream.received[-1].json["stream_options"], options)
        for options in ({"include_usage": False}, None):
            response, body = await self.post("/v1/chat/completions", chat_body(stream=True, stream_options=options))
            self.assertEqual(response.code, 200)
            self.assertEqual(self.upstream.received[-1].json["stream_options"], {"include_usage": True})
            self.assertTrue(all(b'"usage"' not in e for e in sse_events(body)), body)

    async def test_client_asked_for_usage(self):
        """
        A client that asked for C{include_usage} gets the usage chunk as
        vLLM sent it (C{choices: []}, usage, system_fingerprint), once,
        just before C{[DONE]}; the request goes upstream as the client
        wrote it (apart from the served model name).
        """
        document = chat_body("one two three", 5, stream=True, stream_options={"include_usage": True})
        response, body = await self.post("/v1/chat/completions", document)
        self.assertEqual(response.code, 200)
        self.assertEqual(self.upstream.received[-1].json["stream_options"], {"include_usage": True})
        events = sse_events(body)
        with_usage = [e for e in events if b'"usage"' in e]
        self.assertEqual(len(with_usage), 1)
        self.assertEqual(events[-2:], [with_usage[0], b"data: [DONE]"])
        chunk = json.loads(event_data(with_usage[0]))
        self.assertEqual(chunk["choices"], [])
        self.assertEqual(chunk["usage"], {"prompt_tokens": 3, "total_tokens": 8, "completion_tokens": 5})
        self.assertTrue(chunk["system_fingerprint"].startswith("vllm-"))
        await self.settled()
        self.assertEqual(self.hash("spend:model:alpha")["spend_nanos"], cost(3, 5))

    async def test_continuous_stats_without_usage(self):
        """
        A client that set C{continuous_usage_stats} and not
        C{include_usage} asked vLLM for usage (C{include_usage} defaults to
        true in vLLM's C{StreamOptions}): its options go upstream as
        written and it gets a running usage in every chunk and the usage
        chunk, exactly as vLLM sent them; the call is billed.
        """
        document = chat_body("one two three", 5, stream=True, stream_options={"continuous_usage_stats": True})
        response, body = await self.post("/v1/chat/completions", document)
        self.assertEqual(response.code, 200)
        self.assertEqual(self.upstream.received[-1].json["stream_options"], {"continuous_usage_stats": True})
        chunks = [json.loads(event_data(e)) for e in sse_events(body)[:-1]]
        self.assertTrue(chunks and all("usage" in c for c in chunks), body)
        self.assertEqual(chunks[-1]["choices"], [])
        self.assertEqual(chunks[-1]["usage"]["completion_tokens"], 5)
        self.assertEqual(content_events(body), 5)
        await self.settled()
        self.assertEqual(self.hash("spend:model:alpha")["spend_nanos"], cost(3, 5))


class CutShortTests(GatewayTestCase):
    """
    Streams that end early are billed for what was delivered.
    """

    async def test_upstream_reset_billed_for_delivered(self):
        """
        A stream the upstream resets after 5 events (the role chunk and 4
        tokens of 20) ends without C{[DONE]}; it is billed as estimated:
        4 completion tokens (the content events relayed) and the prompt
        estimated from the request.
        """
        key, token = await self.new_key(user_id="ursula")
        document = chat_body("hi there", 20, stream=True)
        response, body = await self.post(
            "/v1/chat/completions", document, key, headers={"x-fake-fault": "reset_mid_stream=5,chunks=20"}
        )
        self.assertEqual(response.code, 200)
        self.assertNotIn(b"[DONE]", body)
        self.assertIn(b"event: error", body)
        delivered = content_events(body)
        self.assertEqual(delivered, 4)
        await self.settled()
        prompt = estimate_prompt_tokens(document)
        model = self.hash("spend:model:alpha")
        self.assertEqual((model["prompt_tokens"], model["completion_tokens"]), (prompt, delivered))
        self.assertEqual(await self.key_spend(token), cost(prompt, delivered))
        self.assertEqual(self.hash("spend:user:ursula")["spend_nanos"], cost(prompt, delivered))
        [record] = self.records()
        self.assertTrue(record["usage_estimated"])
        self.assertEqual(record["error"], "upstream_reset")
        self.assertEqual(record["cost_nanos"], cost(prompt, delivered))

    async def test_responses_stream_reset_billed_for_delivered(self):
        """
        A C{/v1/responses} stream reset after its 4th C{output_text.delta}
        event (of 20) is billed as estimated for those 4 tokens (its text
        comes in C{delta} strings, not C{content}/C{text} fields).
        """
        key, token = await self.new_key()
        document = {"model": "alpha", "input": "tell me a story", "max_output_tokens": 20, "stream": True}
        response, body = await self.post("/v1/responses", document, key, headers={"x-fake-fault": "reset_mid_stream=8"})
        self.assertEqual(response.code, 200)
        self.assertIn(b"event: error", body)
        delivered = sum(1 for e in sse_events(body) if e.startswith(b"event: response.output_text.delta\n"))
        self.assertEqual(delivered, 4)
        await self.settled()
        prompt = estimate_prompt_tokens(document)
        model = self.hash("spend:model:alpha")
        self.assertEqual((model["prompt_tokens"], model["completion_tokens"]), (prompt, delivered))
        self.assertEqual(await self.key_spend(token), cost(prompt, delivered))
        [record] = self.records()
        self.assertTrue(record["usage_estimated"])

    async def test_client_disconnect_billed_and_upstream_aborted(self):
        """
        A client that disconnects mid-stream aborts the upstream call at
        once (long before its 20 slow events are done) and is billed for
        the content events relayed, as an estimate.
        """
        key, token = await self.new_key()
        document = chat_body("hi there", 20, stream=True)
        client = await self.raw_stream(document, key, "slow_chunks=0.1,chunks=20")
        await self.wait_for(lambda: content_events(_chunked_text(client.data)) >= 3, 3.0, "three content events")
        seen = content_events(_chunked_text(client.data))
        client.transport.abortConnection()
        await client.closed()
        left = reactor.seconds()
        upstream = self.upstream
        # At once (a few ms), well before the 2 s stream would have ended.
        await self.wait_for(lambda: upstream.requests_running == 0 and upstream.open_connections == 0, 1.5, "upstream aborted")
        self.assertLess(self.upstream.connections_lost[-1] - left, 1.0)
        await self.settled()
        model = self.hash("spend:model:alpha")
        self.assertGreaterEqual(model["completion_tokens"], seen)
        self.assertLessEqual(model["completion_tokens"], seen + 2)
        self.assertLess(model["completion_tokens"], 20)
        prompt = estimate_prompt_tokens(document)
        self.assertEqual(model["prompt_tokens"], prompt)
        self.assertEqual(await self.key_spend(token), cost(prompt, model["completion_tokens"]))
        [record] = self.records()
        self.assertEqual(record["error"], "client_disconnected")
        self.assertTrue(record["usage_estimated"])


def _chunked_text(raw: bytes) -> bytes:
    """
    :return: the body part of a raw HTTP response, chunk-size lines and all
        (good enough to count SSE events in).
    """
    return raw.partition(b"\r\n\r\n")[2].replace(b"\r\n", b"\n")


class EndUserTests(GatewayTestCase):
    """
    End users: who they are, their budgets, blocking.
    """

    async def test_header_then_body_user(self):
        """
        The C{x-dheera-end-user} header names the end user even when the
        body has C{user}; without the header, the body's C{user} does.
        """
        key, _ = await self.new_key()
        response, _ = await self.post(
            "/v1/chat/completions", chat_body(user="from-body"), key, headers={"x-dheera-end-user": "from-header"}
        )
        self.assertEqual(response.code, 200)
        await self.settled()
        self.assertEqual(self.hash("end_user:from-header")["spend_nanos"], cost(2, 5))
        status, _ = await self.admin("GET", "/end_user/info?end_user_id=from-body")
        self.assertEqual(status, 404)
        response, _ = await self.post("/v1/chat/completions", chat_body(user="from-body", max_tokens=3), key)
        self.assertEqual(response.code, 200)
        await self.settled(requests=2)
        status, info = await self.admin("GET", "/end_user/info?end_user_id=from-body")
        self.assertEqual((status, info["spend_nanos"]), (200, cost(2, 3)))
        # The upstream still gets the body's user field.
        self.assertEqual(self.upstream.received[-1].json["user"], "from-body")

    async def test_unencodable_end_user_refused_alone(self):
        """
        An end user id that is not Unicode text (a lone surrogate escape in
        the body's C{user}) is refused with 400 naming C{user}, and a call
        admitted at the same moment with a good end user is unaffected
        (admissions of one reactor turn share one Redis script).
        """
        key, _ = await self.new_key()
        bad = ensureDeferred(self.post("/v1/chat/completions", chat_body(user="\ud800x"), key))
        good = ensureDeferred(self.post("/v1/chat/completions", chat_body(user="fine"), key))
        (bad_response, bad_body), (good_response, _) = await gatherResults([bad, good])
        self.assertEqual(bad_response.code, 400, bad_body)
        self.assertEqual(error_of(bad_body)["param"], "user")
        self.assertEqual(good_response.code, 200)
        self.assertEqual(len(self.upstream.received), 1)

    async def test_end_user_budget(self):
        """
        An end user over its max_budget gets 429 C{budget_exceeded} (named
        by header or by body), and the upstream is not called.
        """
        status, answer = await self.admin("POST", "/end_user/new", {"user_id": "frugal", "max_budget": 0.000001})
        self.assertEqual(status, 200, answer)
        key, _ = await self.new_key()
        response, _ = await self.post("/v1/chat/completions", chat_body(), key, headers={"x-dheera-end-user": "frugal"})
        self.assertEqual(response.code, 200)
        await self.settled()
        called = len(self.upstream.received)
        response, body = await self.post("/v1/chat/completions", chat_body(), key, headers={"x-dheera-end-user": "frugal"})
        self.assertLimited(response, body, "budget_exceeded")
        response, body = await self.post("/v1/chat/completions", chat_body(user="frugal"), MASTER_KEY)
        self.assertLimited(response, body, "budget_exceeded")
        self.assertEqual(len(self.upstream.received), called)
        # Another end user of the same key is not affected.
        response, _ = await self.post("/v1/chat/completions", chat_body(), key, headers={"x-dheera-end-user": "other"})
        self.assertEqual(response.code, 200)

    async def test_blocked_end_user(self):
        """
        A blocked end user gets 403 whoever's key it comes with and however
        it is named, and the upstream is not called.
        """
        status, answer = await self.admin("POST", "/end_user/block", {"user_ids": ["mallory"]})
        self.assertEqual(status, 200, answer)
        key, _ = await self.new_key()
        for k, headers, document in (
            (key, {"x-dheera-end-user": "mallory"}, chat_body()),
            (key, {}, chat_body(user="mallory")),
            (MASTER_KEY, {"x-dheera-end-user": "mallory"}, chat_body()),
        ):
            response, body = await self.post("/v1/chat/completions", document, k, headers=headers)
            self.assertEqual(response.code, 403, body)
            error_of(body)
        self.assertEqual(self.upstream.received, [])


class KeyBudgetTests(GatewayTestCase):
    """
    Budgets of virtual keys.
    """

    async def test_budget_reached(self):
        """
        A key whose spend reaches its max_budget exactly (15400 nano-USD,
        a budget whose float value times 1e9 is a hair above 15400) is
        refused with 429 C{budget_exceeded} within 0.5 s of its last
        answer's end, and the upstream is not called.
        """
        key, token = await self.new_key(max_budget=0.0000154)
        response, _ = await self.post("/v1/chat/completions", chat_body("hi there", 25), key)
        self.assertEqual(response.code, 200)
        self.assertEqual(header_nanos(response.headers.getRawHeaders(b"x-dheera-response-cost")[0]), 15400)
        await self.wait_for(lambda: self.hash(f"key:{token}").get("spend_nanos") == 15400, SETTLE_WITHIN, "spend visible")
        called = len(self.upstream.received)
        response, body = await self.post("/v1/chat/completions", chat_body(), key)
        self.assertLimited(response, body, "budget_exceeded")
        self.assertEqual(len(self.upstream.received), called)
        self.assertEqual(await self.key_spend(token), 15400)

    async def test_budget_over(self):
        """
        A key that went over its max_budget is refused from then on; the
        refused calls cost nothing.
        """
        key, token = await self.new_key(max_budget=0.000005)
        # 3400 nano-USD each: the first leaves the key under its 5000, the
        # second takes it over.
        for n in (1, 2):
            response, _ = await self.post("/v1/chat/completions", chat_body(), key)
            self.assertEqual(response.code, 200)
            await self.wait_for(lambda: self.hash(f"key:{token}").get("spend_nanos", 0) == n * cost(2, 5), SETTLE_WITHIN)
        called = len(self.upstream.received)
        for _ in range(3):
            response, body = await self.post("/v1/chat/completions", chat_body(), key)
            self.assertLimited(response, body, "budget_exceeded")
        self.assertEqual(len(self.upstream.received), called)
        self.assertEqual(await self.key_spend(token), 2 * cost(2, 5))

    async def test_budget_window_resets(self):
        """
        With C{budget_duration} "2s", a key over budget is refused until
        its window ends, then admitted again (the budgeted spend resets;
        the key's total spend does not).
        """
        created = reactor.seconds()
        key, token = await self.new_key(max_budget=0.000001, budget_duration="2s")
        response, _ = await self.post("/v1/chat/completions", chat_body(), key)
        self.assertEqual(response.code, 200)
        await self.settled()
        response, body = await self.post("/v1/chat/completions", chat_body(), key)
        self.assertLimited(response, body, "budget_exceeded")
        self.assertLess(reactor.seconds() - created, 2.0, "too slow to see the window")
        await sleep(created + 2.2 - reactor.seconds())
        response, body = await self.post("/v1/chat/completions", chat_body(), key)
        self.assertEqual(response.code, 200, body)
        await self.settled(requests=2)
        response, body = await self.post("/v1/chat/completions", chat_body(), key)
        self.assertLimited(response, body, "budget_exceeded")
        self.assertEqual(len(self.upstream.received), 2)
        self.assertEqual(await self.key_spend(token), 2 * cost(2, 5))


class RateLimitTests(GatewayTestCase):
    """
    rpm, tpm and parallel limits of virtual keys.
    """

    async def test_rpm(self):
        """
        A key with rpm_limit 2 gets two calls through, then 429 with a
        Retry-After of at most a minute, and the upstream sees two calls.
        """
        key, _ = await self.new_key(rpm_limit=2)
        for _ in range(2):
            response, _ = await self.post("/v1/chat/completions", chat_body(), key)
            self.assertEqual(response.code, 200)
        response, body = await self.post("/v1/chat/completions", chat_body(), key)
        self.assertLimited(response, body, "rate_limit_error")
        self.assertTrue(1 <= self.retry_after(response) <= 60)
        self.assertEqual(len(self.upstream.received), 2)

    async def test_tpm(self):
        """
        A key with tpm_limit 5 whose first call used 7 tokens gets 429
        with Retry-After for the next one; the upstream is not called.
        """
        key, token = await self.new_key(tpm_limit=5)
        response, _ = await self.post("/v1/chat/completions", chat_body("hi there", 5), key)
        self.assertEqual(response.code, 200)
        counted = lambda: self.redis_server.command("GET", f"{PREFIX}rl:tpm:{token}") == "7"  # noqa: E731
        await self.wait_for(counted, SETTLE_WITHIN, "tokens counted")
        response, body = await self.post("/v1/chat/completions", chat_body(), key)
        self.assertLimited(response, body, "rate_limit_error")
        self.assertTrue(1 <= self.retry_after(response) <= 60)
        self.assertEqual(len(self.upstream.received), 1)

    async def test_parallel(self):
        """
        With max_parallel_requests 1, a second call while a stream is in
        flight gets 429 with Retry-After and never reaches the upstream;
        once the stream is done, a call is admitted again.
        """
        key, token = await self.new_key(max_parallel_requests=1)
        client = await self.raw_stream(chat_body(stream=True), key, "slow_chunks=0.1,chunks=5")
        await self.upstream.wait_for_requests(1)
        response, body = await self.post("/v1/chat/completions", chat_body(), key)
        self.assertLimited(response, body, "rate_limit_error")
        self.assertGreaterEqual(self.retry_after(response), 1)
        self.assertEqual(len(self.upstream.received), 1)
        await self.wait_for(lambda: b"[DONE]" in client.data, 5.0, "first stream done")
        await self.wait_for(lambda: self.parallel_slots(token) == 0, SETTLE_WITHIN, "slot released")
        response, _ = await self.post("/v1/chat/completions", chat_body(), key)
        self.assertEqual(response.code, 200)

    async def assertSlotReleased(self, token: str, key: str) -> None:
        """
        Assert the key's parallel slot is free within 0.5 s and a new call
        is then admitted and answered.
        """
        await self.wait_for(lambda: self.parallel_slots(token) == 0, SETTLE_WITHIN, "slot released")
        response, body = await self.post("/v1/chat/completions", chat_body(), key)
        self.assertEqual(response.code, 200, body)

    async def test_slot_released_after_client_disconnect(self):
        """
        A client that disconnects mid-stream frees its parallel slot.
        """
        key, token = await self.new_key(max_parallel_requests=1)
        client = await self.raw_stream(chat_body(stream=True), key, "slow_chunks=0.2,chunks=20")
        await self.wait_for(lambda: b"tok0" in client.data, 3.0, "first token")
        self.assertEqual(self.parallel_slots(token), 1)
        client.transport.abortConnection()
        await client.closed()
        await self.assertSlotReleased(token, key)

    async def test_slot_released_after_disconnect_before_answer(self):
        """
        A client that leaves while the upstream has not answered yet frees
        its parallel slot too.
        """
        key, token = await self.new_key(max_parallel_requests=1)
        client = await self.raw_stream(chat_body(stream=True), key, "slow_first_byte=3")
        await self.upstream.wait_for_bodies(1)
        self.assertEqual(self.parallel_slots(token), 1)
        client.transport.abortConnection()
        await client.closed()
        await self.assertSlotReleased(token, key)

    async def test_slot_released_after_upstream_error(self):
        """
        An upstream error answer (500, passed through) frees the slot.
        """
        key, token = await self.new_key(max_parallel_requests=1)
        response, _ = await self.post("/v1/chat/completions", chat_body(), key, headers={"x-fake-fault": "status=500"})
        self.assertEqual(response.code, 500)
        await self.assertSlotReleased(token, key)

    async def test_slot_released_after_reset(self):
        """
        A stream the upstream resets frees the slot.
        """
        key, token = await self.new_key(max_parallel_requests=1)
        response, body = await self.post(
            "/v1/chat/completions", chat_body(stream=True), key, headers={"x-fake-fault": "reset_mid_stream=2"}
        )
        self.assertIn(b"event: error", body)
        await self.assertSlotReleased(token, key)

    async def test_slot_released_after_timeout(self):
        """
        An upstream that never answers times out (504 after the
        deployment's 1 s) and frees the slot.
        """
        key, token = await self.new_key(max_parallel_requests=1)
        response, _ = await self.post("/v1/chat/completions", chat_body(model="beta"), key, headers={"x-fake-fault": "hang"})
        self.assertEqual(response.code, 504)
        await self.assertSlotReleased(token, key)
