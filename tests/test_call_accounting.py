"""
Tests for L{dheera_tx.accounting.call_accounting}: when the proxy asks vLLM
for usage on the client's behalf, and how answers without usage are priced.
"""

from twisted.trial.unittest import SynchronousTestCase

from dheera_tx.accounting.call_accounting import (
    CallAccounting,
    estimate_prompt_tokens,
    needs_usage_injection,
    with_usage_requested,
)
from dheera_tx.accounting.metering import DecodingMeter, SSEUsageMeter, Usage
from dheera_tx.call import Call
from dheera_tx.config import Deployment

CHAT = b"/v1/chat/completions"


def _stream(**options) -> dict:
    document = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": True}
    document.update(options)
    return document


class UsageInjectionTests(SynchronousTestCase):
    """
    vLLM's C{stream_options} semantics: C{StreamOptions.include_usage}
    defaults to true, so an object asks for usage unless it says false.
    """

    def test_vllm_semantics(self):
        """
        No C{stream_options}, C{null}, C{include_usage} false or null (in
        any of pydantic's spellings): the client gets no usage from vLLM,
        so the proxy asks for it.  An empty object, C{include_usage} true,
        or C{continuous_usage_stats} alone: the client asked for usage
        itself and the request goes as written.
        """
        for document in (
            _stream(),
            _stream(stream_options=None),
            _stream(stream_options={"include_usage": False}),
            _stream(stream_options={"include_usage": None}),
            _stream(stream_options={"include_usage": "false", "continuous_usage_stats": True}),
            _stream(stream_options={"include_usage": 0}),
        ):
            self.assertTrue(needs_usage_injection(CHAT, document), document)
        for document in (
            _stream(stream_options={}),
            _stream(stream_options={"include_usage": True}),
            _stream(stream_options={"continuous_usage_stats": True}),
            _stream(stream_options={"include_usage": "yes"}),
        ):
            self.assertFalse(needs_usage_injection(CHAT, document), document)

    def test_malformed_left_to_vllm(self):
        """
        Options vLLM refuses (not an object, a non-boolean include_usage)
        are not rewritten: vLLM's 400 reaches the client.
        """
        for options in ("x", ["include_usage"], {"include_usage": "maybe"}, {"include_usage": [1]}):
            self.assertFalse(needs_usage_injection(CHAT, _stream(stream_options=options)), options)

    def test_routes(self):
        """
        Streamed chat and completions are injected, on their own routes and
        on C{/invocations}; other bodies on C{/invocations}, other routes
        and unstreamed calls are not.
        """
        completion = {"prompt": "x", "stream": True}
        self.assertTrue(needs_usage_injection(b"/v1/completions", completion))
        self.assertTrue(needs_usage_injection(b"/invocations", completion))
        self.assertTrue(needs_usage_injection(b"/invocations", _stream()))
        self.assertFalse(needs_usage_injection(b"/invocations", {"input": "x", "stream": True}))
        self.assertFalse(needs_usage_injection(b"/v1/responses", _stream()))
        self.assertFalse(needs_usage_injection(CHAT, dict(_stream(), stream=False)))

    def test_injected_options(self):
        """
        The options sent upstream ask for usage and drop
        C{continuous_usage_stats} (vLLM ignored it without usage, and only
        the final usage chunk is stripped).
        """
        document = _stream(stream_options={"include_usage": False, "continuous_usage_stats": True})
        self.assertEqual(with_usage_requested(document)["stream_options"], {"include_usage": True})


class SettleTests(SynchronousTestCase):
    """
    Pricing a call at settlement, without Redis.
    """

    deployment = Deployment("m", "m", "http://x", input_cost_per_token=1e-9, output_cost_per_token=2e-9)

    def _settle(self, meter, document, path=CHAT, status=200, bytes_out=0, body_bytes=0) -> Call:
        call = Call(call_id="c", method="POST", path=path.decode(), started_at=0.0)
        call.status = status
        call.bytes_out = bytes_out
        CallAccounting().settle(call, None, self.deployment, meter, document, path, body_bytes)
        return call

    def test_stream_without_output_bills_prompt(self):
        """
        A stream that carried no usage and no generated piece is still
        billed its prompt estimate.
        """
        document = _stream()
        call = self._settle(SSEUsageMeter(), document)
        self.assertEqual((call.prompt_tokens, call.completion_tokens), (estimate_prompt_tokens(document), 0))
        self.assertTrue(call.usage_estimated)
        self.assertEqual(call.cost_nanos, estimate_prompt_tokens(document))

    def test_unreadable_answer_estimated(self):
        """
        A 2xx answer of an inference route with no meter (a binary body)
        or an undecodable encoding is billed an estimate: the request as
        prompt, the answer's bytes over 4 as completion; a 4xx answer, or
        a route that is not billable, is free.
        """
        document = {"model": "m", "input": "x" * 40}
        call = self._settle(None, document, b"/v1/embeddings", bytes_out=100)
        self.assertEqual((call.prompt_tokens, call.completion_tokens), (estimate_prompt_tokens(document), 25))
        self.assertTrue(call.usage_estimated)
        self.assertGreater(call.cost_nanos, 0)
        encoded = CallAccounting.meter_for(b"application/json", 200, False, b"br")
        call = self._settle(encoded, document, bytes_out=8)
        self.assertEqual(call.completion_tokens, 2)
        self.assertEqual(self._settle(None, document, b"/v1/embeddings", status=400, bytes_out=100).cost_nanos, 0)
        self.assertEqual(self._settle(None, document, b"/tokenize", bytes_out=100).cost_nanos, 0)

    def test_meter_choice(self):
        """
        Compressed answers are metered decoded (and a compressed stream is
        never rewritten); a C{metadata} header declares usage for a
        binary answer.
        """
        meter = CallAccounting.meter_for(b"text/event-stream", 200, True, b"gzip")
        self.assertIsInstance(meter, DecodingMeter)
        self.assertIsInstance(CallAccounting.meter_for(b"text/event-stream", 200, True, b"identity"), SSEUsageMeter)
        declared = CallAccounting.meter_for(b"application/octet-stream", 200, False, None, b'{"usage": {"prompt_tokens": 3}}')
        self.assertEqual(declared.usage(), Usage(3, 0))
        self.assertIsNone(CallAccounting.meter_for(b"application/octet-stream", 200, False))
