"""
Model discovery and LoRA adapters: L{dheera_tx.routing.catalog.ModelCatalog}
in memory (answers of the deployments given to it), then through a real
proxy on loopback in front of fake vLLM servers serving LoRA adapters.
"""

import json

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from dheera_tx.config import ConfigError, config_from_dict
from dheera_tx.keys.auth import MASTER, Principal
from dheera_tx.keys.records import KeyRecord
from dheera_tx.routing.catalog import ModelCatalog
from dheera_tx.routing.router import Router
from tests.passthrough_harness import MASTER_KEY, ProxyTestCase, auth, deployment, error_of


def _config(models, environ=None):
    return config_from_dict({"model_list": models, "general_settings": {"master_key": MASTER_KEY}}, environ=environ or {})


def _entry(name, served, url="http://127.0.0.1:9", **params):
    return {"model_name": name, "dheera_ai_params": dict({"model": "hosted_vllm/" + served, "api_base": url}, **params)}


def _vllm_answer(served, max_len=4096, loras=()):
    cards = [{"id": served, "object": "model", "created": 7, "owned_by": "vllm", "root": "/models/" + served,
              "parent": None, "max_model_len": max_len, "permission": [{"id": "perm"}]}]
    cards += [{"id": lora, "object": "model", "created": 7, "owned_by": "vllm", "root": "/loras/" + lora,
               "parent": served, "max_model_len": None, "permission": []} for lora in loras]
    return {"object": "list", "data": cards}


def _key(*models):
    return Principal(is_master=False, key=KeyRecord(token="0" * 64, models=tuple(models)))


def _never_cooling(deployment):
    return False


class CatalogListingTests(SynchronousTestCase):
    """
    What the catalog lists, for whom, from the deployments' answers.
    """

    def setUp(self):
        self.config = _config(
            [
                _entry("chat", "qwen-7b", "http://127.0.0.1:1"),
                _entry("chat", "qwen-7b", "http://127.0.0.1:2"),
                _entry("code", "coder-1b", "http://127.0.0.1:3", lora_adapters=["sql-lora"]),
            ]
        )
        self.catalog = ModelCatalog(Clock(), self.config, http_client=object())
        chat1, chat2, code = self.config.deployments
        self.catalog.update(_vllm_answer("qwen-7b", 4096), chat1)
        self.catalog.update(_vllm_answer("qwen-7b", 4096), chat2)
        self.catalog.update(_vllm_answer("coder-1b", 2048, loras=["sql-lora", "found-lora"]), code)
        self.catalog._refreshed(None)

    def listing(self, principal, cooling_down=_never_cooling):
        return _run(self.catalog.listing(principal, cooling_down))

    def test_public_names_once_with_vllm_fields(self):
        """
        The master key sees each configured model_name once (two replicas of
        C{chat} make one entry), with C{id} the public name and vLLM's
        fields (C{max_model_len}, C{root}, C{owned_by}) from a replica's
        answer; adapters follow their base model with C{parent} set to the
        base model's public name.
        """
        data = self.listing(MASTER)
        self.assertEqual(data["object"], "list")
        ids = [card["id"] for card in data["data"]]
        self.assertEqual(ids, ["chat", "code", "sql-lora", "found-lora"])
        chat = data["data"][0]
        self.assertEqual((chat["max_model_len"], chat["root"], chat["owned_by"], chat["parent"]), (4096, "/models/qwen-7b", "vllm", None))
        sql = data["data"][2]
        self.assertEqual((sql["parent"], sql["root"], sql["max_model_len"]), ("code", "/loras/sql-lora", None))

    def test_restricted_key_sees_its_models_only(self):
        """
        A key restricted to C{code} and C{found-lora} lists exactly those;
        a key with no model list sees everything.
        """
        self.assertEqual([c["id"] for c in self.listing(_key("code", "found-lora"))["data"]], ["code", "found-lora"])
        self.assertEqual(len(self.listing(_key())["data"]), 4)

    def test_one_model(self):
        """
        C{model()} answers one entry the caller may use, and L{None} for one
        it may not use or that does not exist (the same answer).
        """
        self.assertEqual(_run(self.catalog.model(MASTER, "sql-lora", _never_cooling))["parent"], "code")
        self.assertIsNone(_run(self.catalog.model(_key("chat"), "code", _never_cooling)))
        self.assertIsNone(_run(self.catalog.model(MASTER, "nope", _never_cooling)))

    def test_listed_from_config_before_any_answer(self):
        """
        A deployment that has not answered yet is listed from the config:
        its public name, its served name as C{root}, C{max_model_len}
        L{None}; declared adapters too.
        """
        catalog = ModelCatalog(Clock(), self.config, http_client=object())
        catalog.update({"object": "list", "data": []}, self.config.deployments[0])
        data = _run(catalog.listing(MASTER, _never_cooling))["data"]
        self.assertEqual([c["id"] for c in data], ["chat", "code", "sql-lora"])
        self.assertEqual((data[1]["root"], data[1]["max_model_len"]), ("coder-1b", None))

    def test_healthy_replica_preferred(self):
        """
        vLLM's fields come from a replica that is not cooling down when one
        has them.
        """
        chat1, chat2, _ = self.config.deployments
        self.catalog.update(_vllm_answer("qwen-7b", 1111), chat1)
        self.catalog.update(_vllm_answer("qwen-7b", 2222), chat2)
        data = self.listing(MASTER, cooling_down=lambda d: d is chat1)
        self.assertEqual(data["data"][0]["max_model_len"], 2222)
        data = self.listing(MASTER, cooling_down=lambda d: d is chat2)
        self.assertEqual(data["data"][0]["max_model_len"], 1111)

    def test_malformed_answers_ignored(self):
        """
        An answer that is not vLLM's list shape, or entries without a string
        id, leave nothing behind (the config's listing stands).
        """
        chat1, chat2, code = self.config.deployments
        catalog = ModelCatalog(Clock(), self.config, http_client=object())
        catalog.update([1, 2], chat1)
        catalog.update({"data": [{"id": 5}, "x", {"id": "qwen-7b", "max_model_len": 9, "junk": "dropped"}]}, chat2)
        data = _run(catalog.listing(MASTER, _never_cooling))["data"]
        self.assertEqual(data[0]["max_model_len"], 9)
        self.assertNotIn("junk", data[0])

    def test_found_adapters_route(self):
        """
        Adapters declared in the config and adapters found in a replica's
        answer route to the deployments serving them; the router marks the
        route as an adapter's (the body's model is not rewritten).
        """
        router = Router(self.config, now=lambda: 0.0, adapters=self.catalog.adapter_replicas)
        code = self.config.deployments[2]
        for name in ("sql-lora", "found-lora"):
            route = router.route(name)
            self.assertEqual((route.model_name, tuple(route.replicas), route.adapter), (name, (code,), True))
        self.assertFalse(router.route("chat").adapter)

    def test_adapter_named_like_a_model_ignored(self):
        """
        An adapter found in an answer under the name of a configured
        model_name does not take that name over.
        """
        chat1 = self.config.deployments[0]
        self.catalog.update(_vllm_answer("qwen-7b", loras=["code"]), chat1)
        self.catalog._refreshed(None)
        self.assertEqual(self.catalog.adapter_replicas("code"), ())

    def test_default_upstream_listed_for_keys_that_may_use_it(self):
        """
        A default upstream of its own (C{HOSTED_VLLM_API_BASE}) has its
        served models listed under their own names for the master key and
        unrestricted keys, and for restricted keys only the names they list.
        """
        config = _config([_entry("chat", "qwen-7b")], environ={"HOSTED_VLLM_API_BASE": "http://127.0.0.1:5"})
        catalog = ModelCatalog(Clock(), config, http_client=object())
        catalog.update(_vllm_answer("llama-3"), config.default_deployment)
        self.assertEqual([c["id"] for c in _run(catalog.listing(MASTER, _never_cooling))["data"]], ["chat", "llama-3"])
        self.assertEqual([c["id"] for c in _run(catalog.listing(_key(), _never_cooling))["data"]], ["chat", "llama-3"])
        self.assertEqual([c["id"] for c in _run(catalog.listing(_key("chat"), _never_cooling))["data"]], ["chat"])
        self.assertEqual([c["id"] for c in _run(catalog.listing(_key("llama-3"), _never_cooling))["data"]], ["llama-3"])


class AdapterConfigTests(SynchronousTestCase):
    """
    C{lora_adapters} in a deployment's params.
    """

    def test_names_and_prices(self):
        """
        Adapters are names or mappings with their own prices; an adapter
        without prices is priced as its base model.
        """
        config = _config(
            [
                _entry(
                    "code", "coder", input_cost_per_token=1e-6, output_cost_per_token=2e-6,
                    lora_adapters=["plain", {"name": "dear", "output_cost_per_token": 5e-6}],
                )
            ]
        )
        code = config.deployments[0]
        self.assertEqual(code.prices_for("plain"), (1e-6, 2e-6))
        self.assertEqual(code.prices_for("dear"), (1e-6, 5e-6))
        self.assertEqual(code.prices_for("code"), (1e-6, 2e-6))
        self.assertEqual(config.adapter_replicas("dear"), (code,))

    def test_refused(self):
        """
        An adapter under a configured model_name, a name twice, an empty
        name and unknown fields stop start-up with a line naming the field.
        """
        for adapters, words in (
            (["chat"], "name of a configured model_name"),
            (["a", "a"], "listed twice"),
            ([""], "non-empty strings"),
            ([{"name": "a", "price": 1}], "unknown adapter field price"),
            ("a", "expected a list"),
        ):
            with self.assertRaises(ConfigError) as raised:
                _config([_entry("chat", "qwen"), _entry("code", "coder", lora_adapters=adapters)])
            self.assertIn("lora_adapters", str(raised.exception))
            self.assertIn(words, str(raised.exception))


def _run(coroutine):
    """
    Run a coroutine that never waits (the catalog's answers are in memory)
    and return its result.
    """
    try:
        coroutine.send(None)
    except StopIteration as done:
        return done.value
    raise AssertionError("the coroutine waited")


class ModelDiscoveryTests(ProxyTestCase):
    """
    C{GET /vllm/v1/models} through a real proxy, in front of fake vLLM
    servers that serve LoRA adapters.
    """

    async def setUp(self):
        super().setUp()
        self.chat = await self.fake(served_model="qwen-7b")
        self.code = await self.fake(
            served_model="coder-1b", lora_modules={"found-lora": "/loras/found", "undeclared-lora": "/loras/undeclared"}
        )
        self.proxy(
            [
                deployment("chat", "qwen-7b", self.chat),
                deployment("code", "coder-1b", self.code, input_cost_per_token=1e-6, output_cost_per_token=1e-6,
                           lora_adapters=[{"name": "found-lora", "output_cost_per_token": 1e-3}]),
            ]
        )

    async def get_json(self, path, key=MASTER_KEY):
        response, body = await self.request(b"GET", path, auth(key))
        return response.code, json.loads(body)

    async def test_master_key_lists_public_names(self):
        """
        The master key's list holds the public names, once each, with the
        served model's C{max_model_len} from the replica's own answer, and
        the adapter with its base model's public name as C{parent}; no
        upstream is asked for the list itself (only the catalog's own
        C{/v1/models} round).
        """
        code, answer = await self.get_json("/vllm/v1/models")
        self.assertEqual(code, 200)
        self.assertEqual([m["id"] for m in answer["data"]], ["chat", "code", "found-lora", "undeclared-lora"])
        self.assertEqual(answer["data"][0]["max_model_len"], 512)
        self.assertEqual(answer["data"][2]["parent"], "code")
        for fake in (self.chat, self.code):
            self.assertEqual([r.uri for r in fake.received], [b"/v1/models"])

    async def test_retrieve_one(self):
        """
        C{GET /vllm/v1/models/{name}} answers that entry, and 404
        C{model_not_found} in the OpenAI error shape for an unknown name.
        """
        code, answer = await self.get_json("/vllm/v1/models/found-lora")
        self.assertEqual((code, answer["id"], answer["parent"]), (200, "found-lora", "code"))
        response, body = await self.request(b"GET", "/vllm/v1/models/nope", auth())
        self.assertEqual(response.code, 404)
        self.assertEqual(error_of(body)["code"], "model_not_found")

    async def test_model_named_passes_through(self):
        """
        C{?model=} still passes the call through to that deployment
        untouched: the answer is vLLM's own (served names).
        """
        code, answer = await self.get_json("/vllm/v1/models?model=code")
        self.assertEqual(code, 200)
        self.assertEqual([m["id"] for m in answer["data"]], ["coder-1b", "found-lora", "undeclared-lora"])
        self.assertEqual(self.code.received[-1].uri, b"/v1/models?model=code")

    async def test_adapter_routed_and_priced(self):
        """
        A chat call naming the adapter goes to the deployment serving it
        with the body's model unchanged (vLLM serves the adapter under that
        name), and its cost uses the adapter's own output price.
        """
        response, body = await self.chat_call("found-lora")
        self.assertEqual(response.code, 200)
        sent = json.loads(self.code.received[-1].body)
        self.assertEqual(sent["model"], "found-lora")
        usage = json.loads(body)["usage"]
        expected = usage["prompt_tokens"] * 1e-6 + usage["completion_tokens"] * 1e-3
        cost = float(response.headers.getRawHeaders(b"x-dheera-response-cost")[0])
        self.assertAlmostEqual(cost, expected, places=9)

    async def chat_call(self, model):
        return await self.request(
            b"POST",
            "/vllm/v1/chat/completions",
            dict(auth(), **{"content-type": "application/json"}),
            json.dumps({"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}).encode(),
        )

    async def test_found_adapter_routed_after_a_round(self):
        """
        An adapter the config does not declare is routable once a round of
        the catalog has seen it in the deployment's answer (the service
        runs a round every 30 s; here one is run by hand), priced as its
        base model.
        """
        response, _ = await self.chat_call("undeclared-lora")
        self.assertEqual(response.code, 404)
        await self.gateway.catalog.refresh()
        response, body = await self.chat_call("undeclared-lora")
        self.assertEqual(response.code, 200, body)
        self.assertEqual(json.loads(self.code.received[-1].body)["model"], "undeclared-lora")
        usage = json.loads(body)["usage"]
        cost = float(response.headers.getRawHeaders(b"x-dheera-response-cost")[0])
        self.assertAlmostEqual(cost, (usage["prompt_tokens"] + usage["completion_tokens"]) * 1e-6, places=9)

    async def test_oversized_answer_ignored(self):
        """
        A deployment whose C{/v1/models} answer is over 1 MiB is not read
        whole: its models are listed from the config.
        """
        self.code.lora_modules = {f"lora-{i:06d}": "/" + "p" * 64 for i in range(20000)}
        code, answer = await self.get_json("/vllm/v1/models")
        self.assertEqual(code, 200)
        self.assertEqual([m["id"] for m in answer["data"]], ["chat", "code", "found-lora"])
        self.assertIsNone(answer["data"][1]["max_model_len"])
