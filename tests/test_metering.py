"""
Tests for L{dheera_tx.accounting.metering}: usage read off JSON and SSE answers.
"""

import json
import re

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from dheera_tx.accounting.metering import JSONUsageMeter, SSEUsageMeter, Usage, _last_event_end, cost_nanos


def _chat_stream(tokens, include_usage, newline=b"\n\n", prompt=9):
    events = [{"id": "c", "object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]}]
    for i in range(tokens):
        events.append({"id": "c", "object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {"content": f"tok{i} "}}]})
    events.append({"id": "c", "choices": [{"index": 0, "delta": {"content": ""}, "finish_reason": "length"}]})
    if include_usage:
        events.append({"id": "c", "choices": [], "usage": {"prompt_tokens": prompt, "total_tokens": prompt + tokens, "completion_tokens": tokens}, "system_fingerprint": "vllm"})
    body = b"".join(b"data: " + json.dumps(e).encode() + newline for e in events)
    return body + b"data: [DONE]" + newline


def _split(data, cuts):
    points = sorted(set(c % (len(data) + 1) for c in cuts))
    pieces, start = [], 0
    for p in points:
        pieces.append(data[start:p])
        start = p
    pieces.append(data[start:])
    return pieces


class SSEUsageMeterTests(SynchronousTestCase):
    """
    Tests for L{SSEUsageMeter}.
    """

    def test_final_usage_chunk(self):
        """
        The usage of the final chunk of a chat stream is read; the relayed
        bytes are unchanged when not stripping.
        """
        body = _chat_stream(3, include_usage=True)
        meter = SSEUsageMeter()
        self.assertEqual(meter.feed(body), body)
        self.assertEqual(meter.usage(), Usage(9, 3))

    def test_strip_usage_chunk(self):
        """
        In stripping mode the usage-only chunk is removed and everything
        else, C{[DONE]} included, passes in order.
        """
        with_usage = _chat_stream(3, include_usage=True)
        without = _chat_stream(3, include_usage=False)
        meter = SSEUsageMeter(strip_usage_chunk=True)
        out = meter.feed(with_usage) + meter.flush()
        self.assertEqual(out, without)
        self.assertEqual(meter.usage(), Usage(9, 3))

    @settings(max_examples=200, deadline=None)
    @given(
        st.lists(st.integers(min_value=0, max_value=5000), max_size=30),
        st.sampled_from([b"\n\n", b"\r\n\r\n"]),
        st.booleans(),
        st.integers(min_value=0, max_value=20),
    )
    def test_any_chunk_boundaries(self, cuts, newline, strip, tokens):
        """
        Whatever the chunk boundaries and event separator, the usage is
        found, and the relayed bytes are the stream (minus the usage chunk
        when stripping).
        """
        body = _chat_stream(tokens, include_usage=True, newline=newline)
        meter = SSEUsageMeter(strip_usage_chunk=strip)
        out = b"".join(meter.feed(piece) for piece in _split(body, cuts)) + meter.flush()
        self.assertEqual(meter.usage(), Usage(9, tokens))
        expected = _chat_stream(tokens, include_usage=False, newline=newline) if strip else body
        self.assertEqual(out, expected)

    def test_garbage_never_raises(self):
        """
        Bytes that are not SSE, or events with broken JSON that mention
        usage, are relayed and never raise.
        """
        meter = SSEUsageMeter(strip_usage_chunk=True)
        out = meter.feed(b'data: {"usage": broken\n\n') + meter.feed(b"\xff\xfe garbage") + meter.flush()
        self.assertEqual(out, b'data: {"usage": broken\n\n\xff\xfe garbage')
        self.assertIsNone(meter.usage())

    def test_estimate_when_cut_short(self):
        """
        A stream cut before its usage chunk is estimated from the content
        events relayed, and marked as estimated.
        """
        body = _chat_stream(5, include_usage=False)
        meter = SSEUsageMeter()
        meter.feed(body[: body.index(b"finish_reason")])
        self.assertIsNone(meter.usage())
        self.assertEqual(meter.estimate(), Usage(0, 5, estimated=True))

    def test_responses_api(self):
        """
        The usage of C{/v1/responses}' C{response.completed} event, in
        input/output tokens, is read.
        """
        body = (
            b'event: response.created\ndata: {"type":"response.created","response":{"usage":null}}\n\n'
            b'event: response.output_text.delta\ndata: {"type":"response.output_text.delta","delta":"hi"}\n\n'
            b'event: response.completed\ndata: {"type":"response.completed","response":{"usage":{"input_tokens":7,"output_tokens":2,"total_tokens":9}}}\n\n'
        )
        meter = SSEUsageMeter()
        meter.feed(body)
        self.assertEqual(meter.usage(), Usage(7, 2))

    def test_anthropic_messages(self):
        """
        Anthropic streams: input tokens from message_start survive the
        output-only usage of message_delta.
        """
        body = (
            b'event: message_start\ndata: {"type":"message_start","message":{"usage":{"input_tokens":11,"output_tokens":0}}}\n\n'
            b'event: message_delta\ndata: {"type":"message_delta","usage":{"output_tokens":4}}\n\n'
            b'event: message_stop\ndata: {"type":"message_stop"}\n\n'
        )
        meter = SSEUsageMeter()
        meter.feed(body)
        self.assertEqual(meter.usage(), Usage(11, 4))


class JSONUsageMeterTests(SynchronousTestCase):
    """
    Tests for L{JSONUsageMeter}.
    """

    def _read(self, document, pieces=3):
        data = json.dumps(document).encode()
        meter = JSONUsageMeter()
        step = max(1, len(data) // pieces)
        for i in range(0, len(data), step):
            self.assertEqual(meter.feed(data[i : i + step]), data[i : i + step])
        return meter.usage()

    def test_chat(self):
        """
        A chat answer's usage is read.
        """
        doc = {"id": "x", "choices": [{"message": {"content": 'the "usage": is 5'}}], "usage": {"prompt_tokens": 4, "completion_tokens": 6, "total_tokens": 10, "prompt_tokens_details": None}}
        self.assertEqual(self._read(doc), Usage(4, 6))

    def test_rerank_usage_first_in_big_body(self):
        """
        Rerank puts usage before a long result list; it is still found in a
        body much larger than the meter keeps.
        """
        doc = {"id": "r", "model": "m", "usage": {"prompt_tokens": 33, "total_tokens": 33}, "results": [{"index": i, "document": {"text": "x" * 100}, "relevance_score": 0.5} for i in range(3000)]}
        self.assertEqual(self._read(doc, pieces=50), Usage(33, 0))

    def test_embeddings_usage_last_in_big_body(self):
        """
        Embeddings put usage after a large data array; it is found.
        """
        doc = {"object": "list", "data": [{"index": i, "embedding": [0.1] * 100} for i in range(500)], "usage": {"prompt_tokens": 12, "total_tokens": 12, "completion_tokens": 0}}
        self.assertEqual(self._read(doc, pieces=40), Usage(12, 0))

    def test_no_usage(self):
        """
        An answer with no usage gives L{None}.
        """
        self.assertIsNone(self._read({"count": 3, "tokens": [1, 2, 3]}))


class CostTests(SynchronousTestCase):
    """
    Tests for L{cost_nanos}.
    """

    def test_exact_nanos(self):
        """
        Cost is exact in nano-USD: no float drift.
        """
        self.assertEqual(cost_nanos(Usage(1000, 500), 0.0000002, 0.0000006), 200_000 + 300_000)
        self.assertEqual(cost_nanos(Usage(3, 7), 1e-9, 3e-9), 3 + 21)
        self.assertEqual(cost_nanos(Usage(0, 0), 0.1, 0.1), 0)


class EventEndTests(SynchronousTestCase):
    """
    The end of the last complete SSE event in a buffer, with its shortcut
    for the common case (a buffer ending in a blank line after data).
    """

    @settings(max_examples=3000)
    @given(st.binary(max_size=16).map(lambda b: bytes(b"ab\r\n:"[x % 5] for x in b)))
    def test_shortcut_agrees_with_the_scan(self, data):
        """
        For any mix of CR, LF and other bytes, the end found equals the end
        of the last event delimiter a left-to-right scan finds.
        """
        scan = 0
        for match in re.finditer(rb"\r\n\r\n|\n\n|\r\r", data):
            scan = match.end()
        self.assertEqual(_last_event_end(data), scan)

    def test_common_case(self):
        """
        Two whole vLLM events: the end is the end of the buffer; a partial
        event after them is not included.
        """
        events = b'data: {"a":1}\n\ndata: {"b":2}\n\n'
        self.assertEqual(_last_event_end(events), len(events))
        self.assertEqual(_last_event_end(events + b"data: {"), len(events))
