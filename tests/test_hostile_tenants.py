"""
A tenant as an attacker (issue 12, item 7): a virtual key tries vLLM's
operator routes and other tenants' requests, over real loopback sockets,
against the whole gateway with a real Redis and the fake vLLM.

Virtual keys may call the tenant API and nothing else; the ids a tenant
names (C{X-Request-Id}, a body's C{request_id} and C{previous_response_id},
a Responses path) only ever reach its own requests.
"""

import json

from twisted.internet import reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.trial.unittest import TestCase

from dheera_tx.keys.tenancy import TENANT_API, request_id_scope
from tests.passthrough_harness import MASTER_KEY, error_of, sleep
from tests.test_gateway_keys import ALLOWED, GatewayHarness
from tests.test_realtime import WS_KEY, WebSocketClient

# Every vLLM route outside the tenant API (VLLM_API.md), some with an id or
# a trailing slash, and one a later vLLM might add.
OPERATOR_CALLS = [
    (b"POST", "/vllm/inference/v1/abort_requests"),
    (b"POST", "/vllm/inference/v1/generate"),
    (b"GET", "/vllm/server_info"),
    (b"GET", "/vllm/is_sleeping"),
    (b"GET", "/vllm/openapi.json"),
    (b"GET", "/vllm/docs"),
    (b"GET", "/vllm/redoc"),
    (b"GET", "/vllm/metrics"),
    (b"GET", "/vllm/version"),
    (b"GET", "/vllm/load"),
    (b"GET", "/vllm/health"),
    (b"POST", "/vllm/ping"),
    (b"POST", "/vllm/sleep?level=1"),
    (b"POST", "/vllm/wake_up"),
    (b"POST", "/vllm/reset_prefix_cache"),
    (b"POST", "/vllm/reset_mm_cache"),
    (b"POST", "/vllm/reset_encoder_cache"),
    (b"POST", "/vllm/collective_rpc"),
    (b"POST", "/vllm/release_kv_cache_memory"),
    (b"POST", "/vllm/pause"),
    (b"POST", "/vllm/resume"),
    (b"GET", "/vllm/is_paused"),
    (b"POST", "/vllm/abort_requests"),
    (b"POST", "/vllm/update_weights"),
    (b"GET", "/vllm/weight_info"),
    (b"GET", "/vllm/get_world_size"),
    (b"POST", "/vllm/start_profile"),
    (b"POST", "/vllm/stop_profile"),
    (b"POST", "/vllm/scale_elastic_ep"),
    (b"POST", "/vllm/is_scaling_elastic_ep"),
    (b"POST", "/vllm/v1/load_lora_adapter"),
    (b"POST", "/vllm/v1/unload_lora_adapter"),
    (b"POST", "/vllm/adapters"),
    (b"DELETE", "/vllm/adapters/some-lora"),
    (b"POST", "/vllm/v1/chat/completions/batch"),
    (b"POST", "/vllm/v1/chat/completions/render"),
    (b"POST", "/vllm/v1/completions/derender"),
    (b"POST", "/vllm/v1/messages/render"),
    (b"POST", "/vllm/v2/embed"),
    (b"POST", "/vllm/cohere/v2/chat"),
    (b"POST", "/vllm/generative_scoring"),
    (b"GET", "/vllm/tokenizer_info"),
    (b"GET", "/vllm/kv_event_sources"),
    (b"POST", "/vllm/v1/systemone"),
    (b"POST", "/vllm/v1/some_route_of_a_later_vllm"),
    (b"POST", "/vllm/v1/chat/completions/"),
    (b"POST", "/vllm/v1/chat"),
    (b"GET", "/vllm"),
    (b"GET", "/vllm/"),
    (b"POST", "/vllm/v1/responses/resp_1/cancel/again"),
]


def _route_path(route: str) -> str:
    return "/vllm/" + route.replace("*", "resp_x")


class TenantRouteTests(GatewayHarness, TestCase):
    """
    Operator routes are master-only by default: an allow-list, not a
    deny-list.
    """

    async def setUp(self):
        await self.start_gateway()

    async def test_operator_routes_refused(self):
        """
        An unrestricted virtual key gets 403 C{permission_error} naming the
        master key on every vLLM route outside the tenant API, and none of
        those calls reaches vLLM; the master key's same calls are all
        forwarded.
        """
        key = (await self.generate())["key"]
        for method, path in OPERATOR_CALLS:
            status, content = await self.call(method, path, key, headers={"x-dheera-model": ALLOWED})
            self.assertEqual((path, status), (path, 403), content)
            self.assertIn("master key", error_of(content)["message"], path)
        self.assertEqual(self.upstream.received, [])
        for n, (method, path) in enumerate(OPERATOR_CALLS, 1):
            status, content = await self.call(method, path, MASTER_KEY, headers={"x-dheera-model": ALLOWED})
            self.assertNotIn(status, (401, 403, 502, 503), (path, content))
            self.assertEqual(len(self.upstream.received), n, path)
            self.assertEqual(self.upstream.received[-1].uri, (path[len("/vllm"):] or "/").encode("ascii"))

    async def test_tenant_api_forwarded(self):
        """
        Every route of the tenant API reaches vLLM with an unrestricted
        virtual key (ids in a route are scoped, so the upstream path is
        compared for the routes without one).
        """
        key = (await self.generate())["key"]
        for route in TENANT_API:
            before = len(self.upstream.received)
            status, content = await self.call(b"POST", _route_path(route), key, headers={"x-dheera-model": ALLOWED})
            self.assertNotIn(status, (401, 403, 502, 503), (route, content))
            self.assertEqual(len(self.upstream.received), before + 1, route)
            if "*" not in route:
                self.assertEqual(self.upstream.received[-1].uri, ("/" + route).encode("ascii"))

    async def test_key_allowed_routes_narrow(self):
        """
        A key's C{allowed_routes} narrows the tenant API (a prefix below
        it: C{/v1/chat} allows chat completions, not tokenize) and cannot
        widen it (C{/sleep} stays master-only even when listed).
        """
        key = (await self.generate(allowed_routes=["/v1/chat", "/sleep"]))["key"]
        await self.assertWorks(key)
        await self.assertForbidden(b"POST", "/vllm/tokenize", key, {"model": ALLOWED, "prompt": "hi"})
        error = await self.assertForbidden(b"POST", "/vllm/sleep", key, headers={"x-dheera-model": ALLOWED})
        self.assertIn("master key", error["message"])


class WidenedTenantRouteTests(GatewayHarness, TestCase):
    """
    C{general_settings.tenant_routes} widens the tenant API, exactly.
    """

    async def setUp(self):
        await self.start_gateway(general={"tenant_routes": ["v1/chat/completions/render", "/vllm/adapters/*"]})

    async def test_widened(self):
        """
        Listed routes (an exact one, one with a C{*} segment) are forwarded
        for a virtual key; a route beside them (C{/adapters} itself, a
        deeper path) stays master-only.
        """
        key = (await self.generate())["key"]
        headers = {"x-dheera-model": ALLOWED}
        await self.assertForwarded(b"POST", "/vllm/v1/chat/completions/render", key, headers=headers)
        await self.assertForwarded(b"DELETE", "/vllm/adapters/my-lora", key, headers=headers)
        await self.assertForbidden(b"POST", "/vllm/adapters", key, headers=headers)
        await self.assertForbidden(b"DELETE", "/vllm/adapters/my-lora/x", key, headers=headers)
        await self.assertWorks(key)


class RequestIdTests(GatewayHarness, TestCase):
    """
    Request ids a tenant chooses are put into its own namespace before
    vLLM sees them.
    """

    async def setUp(self):
        await self.start_gateway()
        self.alice = await self.generate(key_alias="alice")
        self.bob = await self.generate(key_alias="bob")

    def scope(self, who: dict) -> str:
        return request_id_scope(who["token"])

    async def chat_with_id(self, key: str, header=None, body_id=None):
        document = {"model": ALLOWED, "messages": [{"role": "user", "content": "hi"}]}
        if body_id is not None:
            document["request_id"] = body_id
        headers = {} if header is None else {"x-request-id": header}
        status, content = await self.call(b"POST", "/vllm/v1/chat/completions", key, document, headers)
        self.assertEqual(status, 200, content)
        received = self.upstream.received[-1]
        return json.loads(content), received.header("x-request-id"), json.loads(received.body).get("request_id")

    async def test_same_header_id_differs_upstream(self):
        """
        Two tenants sending the same C{X-Request-Id} reach vLLM with two
        different ids, each its own scope plus the id; vLLM's answer id
        carries it (C{chatcmpl-<scope>same}).  The master key's id is
        forwarded unchanged.
        """
        a, a_upstream, _ = await self.chat_with_id(self.alice["key"], header="same")
        b, b_upstream, _ = await self.chat_with_id(self.bob["key"], header="same")
        self.assertEqual(a_upstream, self.scope(self.alice) + "same")
        self.assertEqual(b_upstream, self.scope(self.bob) + "same")
        self.assertNotEqual(a_upstream, b_upstream)
        self.assertEqual(a["id"], "chatcmpl-" + self.scope(self.alice) + "same")
        _, master_upstream, _ = await self.chat_with_id(MASTER_KEY, header="same")
        self.assertEqual(master_upstream, "same")

    async def test_cannot_name_another_tenants_id(self):
        """
        Bob sending Alice's scoped id (header or body) gets it inside his
        own scope; Alice sending her own scoped id back keeps it as is.
        """
        alice_id = self.scope(self.alice) + "x1"
        _, header_id, _ = await self.chat_with_id(self.bob["key"], header=alice_id)
        self.assertEqual(header_id, self.scope(self.bob) + alice_id)
        _, _, body_id = await self.chat_with_id(self.bob["key"], body_id=alice_id)
        self.assertEqual(body_id, self.scope(self.bob) + alice_id)
        _, header_id, body_id = await self.chat_with_id(self.alice["key"], header=alice_id, body_id=alice_id)
        self.assertEqual((header_id, body_id), (alice_id, alice_id))

    async def test_body_request_id_scoped(self):
        """
        A body's C{request_id} is scoped (the body is re-encoded only then);
        a body without one is forwarded byte for byte.
        """
        _, _, body_id = await self.chat_with_id(self.alice["key"], body_id="mine")
        self.assertEqual(body_id, self.scope(self.alice) + "mine")
        document = {"model": "tiny", "prompt": "Hello   world"}
        raw = json.dumps(document, indent=3).encode()
        response, _ = await self.request(
            b"POST", "/vllm/tokenize", {"authorization": f"Bearer {self.alice['key']}", "content-type": "application/json"}, raw
        )
        self.assertEqual(response.code, 200)
        self.assertEqual(self.upstream.received[-1].body, raw)

    async def test_engine_steering_fenced(self):
        """
        A virtual key's C{kv_transfer_params}, C{ec_transfer_params} and
        C{vllm_xargs} body fields (where disaggregated vLLM fetches KV
        blocks from, the operator's logits-processor arguments) and its
        C{X-data-parallel-rank} header (a rank pin) never reach vLLM; the
        rest of the body does.  The master key's are forwarded (a
        disaggregation router in front of the proxy uses them).
        """
        steering = {
            "kv_transfer_params": {"remote_host": "10.9.9.9", "remote_port": 5555, "remote_block_ids": [1, 2]},
            "ec_transfer_params": {"remote_host": "10.9.9.9"},
            "vllm_xargs": {"processor": "x"},
        }
        document = dict({"model": ALLOWED, "messages": [{"role": "user", "content": "hi"}], "temperature": 0.5}, **steering)
        rank = {"x-data-parallel-rank": "3"}
        status, content = await self.call(b"POST", "/vllm/v1/chat/completions", self.alice["key"], document, rank)
        self.assertEqual(status, 200, content)
        received = self.upstream.received[-1]
        sent = json.loads(received.body)
        self.assertEqual(set(sent) & set(steering), set())
        self.assertEqual((sent["temperature"], sent["messages"]), (0.5, document["messages"]))
        self.assertIsNone(received.header("x-data-parallel-rank"))
        status, content = await self.call(b"POST", "/vllm/v1/chat/completions", MASTER_KEY, document, rank)
        self.assertEqual(status, 200, content)
        received = self.upstream.received[-1]
        self.assertEqual({k: json.loads(received.body)[k] for k in steering}, steering)
        self.assertEqual(received.header("x-data-parallel-rank"), "3")

    async def responses(self, who: dict, path="/vllm/v1/responses", method=b"POST", **fields):
        body = dict({"model": ALLOWED, "input": "secret of " + who["key_alias"]}, **fields) if method == b"POST" and path == "/vllm/v1/responses" else None
        status, content = await self.call(method, path, who["key"], body, {"x-dheera-model": ALLOWED})
        return status, json.loads(content)

    async def test_responses_fenced(self):
        """
        Alice stores a response under her chosen id C{shared}; Bob storing
        one under the same id does not overwrite it, and Bob cannot
        retrieve, cancel or continue from Alice's (404, as for an unknown
        id: he cannot even tell it exists), by her chosen id or by the id
        vLLM returned to her.  Alice retrieves hers by either.
        """
        status, created = await self.responses(self.alice, request_id="shared")
        self.assertEqual(status, 200, created)
        alice_id = created["id"]
        self.assertEqual(alice_id, self.scope(self.alice) + "shared")
        status, bobs = await self.responses(self.bob, request_id="shared")
        self.assertEqual(status, 200, bobs)
        self.assertNotEqual(bobs["id"], alice_id)
        for name in ("shared", alice_id):
            status, found = await self.responses(self.alice, f"/vllm/v1/responses/{name}", b"GET")
            self.assertEqual((status, found["id"]), (200, alice_id))
            self.assertEqual(found["output"], created["output"])
            status, error = await self.responses(self.bob, f"/vllm/v1/responses/{alice_id}", b"GET")
            self.assertEqual(status, 404, error)
            status, error = await self.responses(self.bob, f"/vllm/v1/responses/{alice_id}/cancel", b"POST")
            self.assertEqual(status, 404, error)
        # vLLM's render route sits where a response id would: a tenant only
        # reaches a response of its own by that name.
        status, error = await self.responses(self.bob, "/vllm/v1/responses/render", b"POST")
        self.assertEqual(status, 404, error)
        self.assertEqual(self.upstream.received[-1].uri, ("/v1/responses/" + self.scope(self.bob) + "render").encode())
        status, error = await self.responses(self.bob, previous_response_id=alice_id)
        self.assertEqual(status, 404, error)
        status, follow = await self.responses(self.alice, previous_response_id=alice_id)
        self.assertEqual(status, 200, follow)
        self.assertEqual(follow["previous_response_id"], alice_id)

    async def test_response_without_id_is_retrievable(self):
        """
        A response created without C{request_id} gets an id in its owner's
        scope, which its owner can retrieve and nobody else can.
        """
        status, created = await self.responses(self.alice)
        self.assertEqual(status, 200, created)
        self.assertTrue(created["id"].startswith(self.scope(self.alice) + "resp_"), created["id"])
        status, found = await self.responses(self.alice, "/vllm/v1/responses/" + created["id"], b"GET")
        self.assertEqual(status, 200, found)
        status, error = await self.responses(self.bob, "/vllm/v1/responses/" + created["id"], b"GET")
        self.assertEqual(status, 404, error)
        self.assertIn("not found", error_of(json.dumps(error).encode())["message"])

    async def test_realtime_upgrade_id_scoped(self):
        """
        A virtual key's C{X-Request-Id} on a realtime WebSocket upgrade
        reaches the replica in the key's scope, as on any other call; the
        master key's is forwarded unchanged.
        """
        for who, expected in ((self.alice, self.scope(self.alice) + "ws-1"), ({"key": MASTER_KEY}, "ws-1")):
            client = WebSocketClient()
            await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", self.port), client)
            client.transport.write(
                b"GET /vllm/v1/realtime?model=" + ALLOWED.encode() + b" HTTP/1.1\r\nHost: localhost\r\n"
                b"Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
                b"Sec-WebSocket-Key: " + WS_KEY + b"\r\nAuthorization: Bearer " + who["key"].encode()
                + b"\r\nX-Request-Id: ws-1\r\n\r\n"
            )
            for _ in range(1000):
                if client.messages or client.status() not in (None, 101):
                    break
                await sleep(0.01)
            self.assertEqual(client.status(), 101)
            self.assertEqual(self.upstream.received[-1].headers["x-request-id"], [expected])
            client.transport.abortConnection()
            await client.lost
