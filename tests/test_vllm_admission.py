"""
Tests for vLLM's queue caps in the test doubles (L{tests.vllm_admission}):
the fake vLLM (L{tests.fake_vllm}) and the simulated replica
(L{tests.sim_vllm}) refuse what vLLM 0.32 refuses, with its status, body,
content type and C{vllm:admission_rejections_total} counter, over real
loopback sockets.
"""

import json

import treq
from twisted.internet import reactor
from twisted.internet.defer import ensureDeferred
from twisted.trial.unittest import SynchronousTestCase, TestCase

from tests.fake_vllm import FakeVLLM
from tests.sim_vllm import SimSettings, listen
from tests.vllm_admission import AdmissionControl, refusal_body

# What vLLM 0.32 answers (vllm/exceptions.py QueueOverflowError, through
# create_error_response and Starlette's JSONResponse).
BUSY = (
    b'{"error":{"message":"The engine is currently busy and cannot accept new requests. '
    b'Please try again later or on a different instance.","type":"Service Unavailable","param":null,"code":503}}'
)
BACKLOG = (
    b'{"error":{"message":"The engine has reached its prefill token backlog limit. '
    b'Please try again later or on a different instance.","type":"Service Unavailable","param":null,"code":503}}'
)


class AdmissionControlTests(SynchronousTestCase):
    """
    L{AdmissionControl} decides as vLLM's C{check_admission}.
    """

    def test_bodies(self):
        """
        The refusal bodies are vLLM's, byte for byte.
        """
        self.assertEqual(refusal_body("max_num_queued_reqs"), BUSY)
        self.assertEqual(refusal_body("max_num_queued_tokens"), BACKLOG)

    def test_request_cap(self):
        """
        A call is refused when the unfinished requests plus its C{n} would
        exceed the cap; 0 refuses everything; refusals are counted.
        """
        control = AdmissionControl(max_num_queued_reqs=2)
        self.assertIsNone(control.check(1, 0))
        self.assertEqual(control.check(2, 0), "max_num_queued_reqs")
        self.assertEqual(control.check(1, 0, n=2), "max_num_queued_reqs")
        self.assertEqual(AdmissionControl(max_num_queued_reqs=0).check(0, 0), "max_num_queued_reqs")
        self.assertEqual(control.rejections, {"max_num_queued_reqs": 2, "max_num_queued_tokens": 0})

    def test_token_cap(self):
        """
        A call is refused when the tokens in prefill already reach the cap
        (its own prompt is not counted).
        """
        control = AdmissionControl(max_num_queued_tokens=10)
        self.assertIsNone(control.check(5, 9))
        self.assertEqual(control.check(5, 10), "max_num_queued_tokens")

    def test_metrics(self):
        """
        Both reasons are exported, labelled C{model_name} and C{reason}.
        """
        control = AdmissionControl(max_num_queued_reqs=0)
        control.check(0, 0)
        lines = control.metrics_lines("tiny")
        self.assertIn('vllm:admission_rejections_total{model_name="tiny",reason="max_num_queued_reqs"} 1.0', lines)
        self.assertIn('vllm:admission_rejections_total{model_name="tiny",reason="max_num_queued_tokens"} 0.0', lines)


def chat_body(stream: bool = False, content: str = "hi there", **extra) -> bytes:
    return json.dumps(dict({"model": "tiny", "messages": [{"role": "user", "content": content}], "stream": stream},
                           **extra)).encode()


class FakeAdmissionTests(TestCase):
    """
    The fake vLLM started with queue caps.
    """

    async def start(self, **caps) -> FakeVLLM:
        fake = FakeVLLM(reactor, **caps)
        await fake.start()
        self.addCleanup(fake.stop)
        return fake

    async def post(self, fake, body: bytes, headers=None):
        response = await treq.post(fake.url + "/v1/chat/completions", body, persistent=False,
                                   headers=dict({"content-type": "application/json"}, **(headers or {})))
        return response, await response.content()

    async def test_refuses_streaming_and_not(self):
        """
        With C{max_num_queued_reqs: 0} every chat call, streamed or not,
        gets vLLM's 503: its JSON body, C{application/json}, a
        Content-Length, no C{Retry-After}; C{/metrics} counts both.
        """
        fake = await self.start(max_num_queued_reqs=0)
        for stream in (False, True):
            response, body = await self.post(fake, chat_body(stream))
            self.assertEqual(response.code, 503)
            self.assertEqual(body, BUSY)
            self.assertEqual(response.headers.getRawHeaders(b"content-type"), [b"application/json"])
            self.assertEqual(response.length, len(BUSY))  # Agent takes Content-Length out of the headers
            self.assertIsNone(response.headers.getRawHeaders(b"retry-after"))
        metrics = await (await treq.get(fake.url + "/metrics", persistent=False)).text()
        self.assertIn('vllm:admission_rejections_total{model_name="tiny",reason="max_num_queued_reqs"} 2.0', metrics)

    async def test_request_cap_counts_unfinished(self):
        """
        With C{max_num_queued_reqs: 1}, a second call arriving while the
        first is unfinished is refused; once the first has ended, a call
        is served.  Non-engine routes are never refused.
        """
        fake = await self.start(max_num_queued_reqs=1)
        first = ensureDeferred(self.post(fake, chat_body(), {"x-fake-fault": "slow_first_byte=0.3"}))
        await fake.wait_for_requests(1)
        response, body = await self.post(fake, chat_body())
        self.assertEqual((response.code, body), (503, BUSY))
        response, _ = await first
        self.assertEqual(response.code, 200)
        response, _ = await self.post(fake, chat_body())
        self.assertEqual(response.code, 200)
        self.assertEqual(fake.unfinished, 0)
        tokenize = await treq.post(fake.url + "/tokenize", json.dumps({"prompt": "a b"}).encode(), persistent=False,
                                   headers={"content-type": "application/json"})
        self.assertEqual(tokenize.code, 200)
        await tokenize.content()

    async def test_token_cap(self):
        """
        With C{max_num_queued_tokens: 3}, a call arriving while a 4-word
        prompt has not started its answer gets the backlog refusal.
        """
        fake = await self.start(max_num_queued_tokens=3)
        first = ensureDeferred(self.post(fake, chat_body(content="one two three four"),
                                         {"x-fake-fault": "slow_first_byte=0.3"}))
        await fake.wait_for_requests(1)
        response, body = await self.post(fake, chat_body(stream=True))
        self.assertEqual((response.code, body), (503, BACKLOG))
        self.assertEqual((await first)[0].code, 200)
        self.assertEqual(fake.admission.rejections["max_num_queued_tokens"], 1)


class SimAdmissionTests(TestCase):
    """
    The simulated replica started with queue caps.
    """

    async def test_refuses_beyond_its_queue(self):
        """
        With C{max_num_queued_reqs: 1}, a call arriving while another runs
        is refused with vLLM's 503 (streamed or not) and counted in
        C{/metrics}; the running call is served.
        """
        replica, port = listen(reactor, SimSettings(max_num_queued_reqs=1, decode_interval=0.02))
        self.addCleanup(port.stopListening)
        self.addCleanup(replica.site.close_connections)
        url = "http://127.0.0.1:%d" % port.getHost().port
        body = json.dumps({"model": "sim", "prompt": "x", "max_tokens": 10}).encode()
        first = treq.post(url + "/v1/completions", body, persistent=False)
        while not replica.engine.running:
            await treq.get(url + "/health", persistent=False).addCallback(treq.content)
        for stream in (False, True):
            refused = await treq.post(url + "/v1/chat/completions", persistent=False, json={
                "model": "sim", "messages": [{"role": "user", "content": "hi"}], "stream": stream})
            self.assertEqual(refused.code, 503)
            self.assertEqual(await refused.content(), BUSY)
            self.assertEqual(refused.headers.getRawHeaders(b"content-type"), [b"application/json"])
        response = await first
        self.assertEqual(response.code, 200)
        await response.content()
        metrics = await (await treq.get(url + "/metrics", persistent=False)).text()
        self.assertIn('vllm:admission_rejections_total{model_name="sim",reason="max_num_queued_reqs"} 2.0', metrics)
