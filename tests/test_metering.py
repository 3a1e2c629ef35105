"""
Tests for L{dheera_tx.accounting.metering}: usage read off JSON and SSE answers.
"""

import gzip
import json
import re
import zlib

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from dheera_tx.accounting.json_usage import TopLevelUsageScanner, whole_answer_usage
from dheera_tx.accounting.metering import (
    DeclaredUsageMeter,
    DecodingMeter,
    JSONUsageMeter,
    SSEUsageMeter,
    Usage,
    _last_event_end,
    cost_nanos,
    usage_from_object,
)


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

    def test_estimate_counts_every_delta_kind(self):
        """
        A stream without usage is estimated from every generated piece:
        text, reasoning (C{reasoning_content}, C{reasoning}, Anthropic
        C{thinking}), tool-call C{arguments} and Anthropic C{partial_json};
        empty pieces and the role chunk do not count.
        """
        pieces = [
            {"choices": [{"delta": {"role": "assistant", "content": ""}}]},
            {"choices": [{"delta": {"reasoning_content": "a"}}]},
            {"choices": [{"delta": {"reasoning": "b"}}]},
            {"choices": [{"delta": {"tool_calls": [{"index": 0, "function": {"name": "f", "arguments": ""}}]}}]},
            {"choices": [{"delta": {"tool_calls": [{"index": 0, "function": {"arguments": '{"x"'}}]}}]},
            {"type": "content_block_delta", "delta": {"type": "thinking_delta", "thinking": "c"}},
            {"type": "content_block_delta", "delta": {"type": "input_json_delta", "partial_json": "{"}},
            {"choices": [{"delta": {"content": "d"}}]},
        ]
        meter = SSEUsageMeter()
        meter.feed(b"".join(b"data: " + json.dumps(p).encode() + b"\n\n" for p in pieces))
        self.assertEqual(meter.estimate(), Usage(0, 6, estimated=True))

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


_KEYS = st.sampled_from(["usage", "us\"age", "usage ", "\\", "{", "}", "[", "x\\\"y", "a"]) | st.text(max_size=5)
_SCALARS = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(alphabet=st.sampled_from(list('ab"\\{}[],: \n\u00e9\u2028')), max_size=8)
)
_VALUES = st.recursive(_SCALARS, lambda c: st.lists(c, max_size=4) | st.dictionaries(_KEYS, c, max_size=4), max_leaves=20)
_FORMATS = st.sampled_from([{}, {"indent": 1}, {"separators": (",", ":")}, {"ensure_ascii": False}])


def _scan(data: bytes, cuts) -> TopLevelUsageScanner:
    scanner = TopLevelUsageScanner()
    for piece in _split(data, cuts):
        scanner.feed(piece)
    return scanner


class TopLevelUsageScannerTests(SynchronousTestCase):
    """
    Tests for L{TopLevelUsageScanner}: the top-level C{usage} member, as
    C{json.loads} reads it, over any chunking.
    """

    @settings(max_examples=600, deadline=None)
    @given(st.dictionaries(_KEYS, _VALUES, max_size=6) | _VALUES, st.lists(st.integers(0, 600), max_size=10), _FORMATS)
    def test_agrees_with_json_loads(self, document, cuts, fmt):
        """
        For random documents (keys and strings full of quotes, escapes,
        brackets and C{"usage"}, nested anywhere), serialised in several
        styles and cut at random points, the value found is the top-level
        C{usage} member C{json.loads} reads, and nothing for any other.
        """
        data = json.dumps(document, **fmt).encode("utf-8")
        expected = document.get("usage") if isinstance(document, dict) else None
        self.assertEqual(_scan(data, cuts).value, expected)

    @settings(max_examples=600, deadline=None)
    @given(st.dictionaries(_KEYS, _VALUES, max_size=6) | _VALUES, _FORMATS)
    def test_whole_answer_agrees_with_json_loads(self, document, fmt):
        """
        The reading of a whole answer (last C{"usage"} keys checked from
        the end, else a scan) agrees with C{json.loads} too.
        """
        data = json.dumps(document, **fmt).encode("utf-8")
        expected = document.get("usage") if isinstance(document, dict) else None
        self.assertEqual(whole_answer_usage(data), expected)

    def test_whole_answer_nested_after_top_level(self):
        """
        A nested C{"usage"} after the top-level one (the last occurrence is
        not a top-level member) does not hide it, nor does an escaped
        quote before a key named C{usage}.
        """
        doc = {"usage": {"prompt_tokens": 1}, "kv_transfer_params": {"usage": {"prompt_tokens": 2}}}
        self.assertEqual(whole_answer_usage(json.dumps(doc).encode()), {"prompt_tokens": 1})
        doc = {'x\\"usage': 5, "y": {"usage": 3}}
        self.assertIsNone(whole_answer_usage(json.dumps(doc).encode()))

    @settings(max_examples=300, deadline=None)
    @given(_VALUES, st.lists(st.integers(0, 300), max_size=10))
    def test_usage_inside_never_taken(self, decoy, cuts):
        """
        A C{"usage"} key inside nested objects, tool schemas or echoed
        text is never taken for the answer's usage.
        """
        document = {
            "choices": [{"message": {"content": '{"usage": {"prompt_tokens": 1}}', "usage": decoy}}],
            "tools": [{"function": {"parameters": {"usage": {"prompt_tokens": 99}}}}],
            "text": 'x", "usage": {"prompt_tokens": 7}',
        }
        self.assertIsNone(_scan(json.dumps(document).encode("utf-8"), cuts).value)

    def test_capture_bounded(self):
        """
        A top-level C{usage} value larger than the capture limit is not
        kept (a usage object is small); the scan still ends cleanly.
        """
        scanner = TopLevelUsageScanner()
        big = {"usage": {"prompt_tokens": 1, "pad": "x" * (TopLevelUsageScanner.CAPTURE_LIMIT + 1)}}
        scanner.feed(json.dumps(big).encode())
        self.assertIsNone(scanner.value)
        self.assertTrue(scanner.done)

    def test_not_an_object(self):
        """
        Garbage, arrays and truncated answers give no usage and never raise.
        """
        for data in (b"\xff\xfe\x00", b'[{"usage": 1}]', b'{"usage": {"prompt_tokens": 3', b'{"a" 1, "usage": 2}'):
            scanner = TopLevelUsageScanner()
            scanner.feed(data)
            self.assertIsNone(scanner.value, data)


class JSONUsageMeterTests(SynchronousTestCase):
    """
    Tests for L{JSONUsageMeter}.
    """

    def _read(self, document, pieces=3, held=True):
        """
        :param held: read the answer whole at its end (as the relay holds
            it), else scan it as it streams.
        """
        data = json.dumps(document).encode()
        meter = JSONUsageMeter()
        if not held:
            meter.stream()
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

    def test_usage_in_the_middle(self):
        """
        vLLM's chat order puts C{usage} after the choices (here 200 KB of
        logprobs) and before C{prompt_logprobs} (200 KB more): it is found
        more than 64 KiB from either end, whatever the chunking.
        """
        entries = [{"token": "t", "logprob": -0.5, "top_logprobs": [{"token": "u", "logprob": -1.0}] * 3}] * 2000
        doc = {
            "id": "c",
            "choices": [{"message": {"content": "x"}, "logprobs": {"content": entries}}],
            "usage": {"prompt_tokens": 3000, "completion_tokens": 400, "total_tokens": 3400},
            "prompt_logprobs": [None] + [{"1": {"logprob": -1.2, "rank": 1, "decoded_token": "w"}}] * 3000,
            "kv_transfer_params": None,
        }
        for pieces in (1, 7, 300):
            for held in (True, False):
                self.assertEqual(self._read(doc, pieces=pieces, held=held), Usage(3000, 400))

    def test_nested_usage_not_taken(self):
        """
        Only the top-level C{usage} counts: a C{"usage"} key the model
        wrote inside a tool call, in a small or a large answer, is not.
        """
        for pad in (0, 100_000):
            doc = {"choices": [{"message": {"tool_calls": [{"function": {"arguments": {"usage": {"prompt_tokens": 1}}}}]}}],
                   "pad": "p" * pad}
            for held in (True, False):
                self.assertIsNone(self._read(doc, held=held))
            doc["usage"] = {"prompt_tokens": 2, "completion_tokens": 3}
            for held in (True, False):
                self.assertEqual(self._read(doc, held=held), Usage(2, 3))

    def test_estimate(self):
        """
        An answer without usage is estimated at its length in tokens of 4
        bytes.
        """
        meter = JSONUsageMeter()
        meter.feed(b'{"text": "abcdefghij"}')
        self.assertIsNone(meter.usage())
        self.assertEqual(meter.estimate(), Usage(0, 6, estimated=True))


class DurationTests(SynchronousTestCase):
    """
    Transcriptions report usage in seconds of audio.
    """

    def test_duration_usage(self):
        """
        C{{"type": "duration", "seconds": N}} is N seconds, priced with
        C{input_cost_per_second} (exactly, in nano-USD).
        """
        usage = usage_from_object({"type": "duration", "seconds": 7})
        self.assertEqual(usage, Usage(seconds=7))
        self.assertEqual(cost_nanos(usage, 0.0000002, 0.0000006, 0.0001), 700_000)
        self.assertIsNone(usage_from_object({"type": "duration", "seconds": "7"}))
        self.assertIsNone(usage_from_object({"type": "duration", "seconds": -1}))


class EncodedAnswerTests(SynchronousTestCase):
    """
    Compressed answers and usage declared in headers.
    """

    def test_gzip_answer(self):
        """
        A gzip answer relays its bytes unchanged and is metered from the
        decoded JSON, whatever the chunking.
        """
        body = gzip.compress(json.dumps({"usage": {"prompt_tokens": 4, "completion_tokens": 2}}).encode())
        for step in (1, 5, len(body)):
            meter = DecodingMeter(JSONUsageMeter())
            out = b"".join(meter.feed(body[i : i + step]) for i in range(0, len(body), step))
            self.assertEqual(out, body)
            self.assertEqual(meter.usage(), Usage(4, 2))

    def test_bomb_bounded(self):
        """
        A compression bomb is decoded at most L{DecodingMeter.MAX_DECODED}
        bytes deep, after which the answer has no readable usage.
        """
        bomb = zlib.compress(b"{" + b" " * (DecodingMeter.MAX_DECODED + 10), 9)
        meter = DecodingMeter(JSONUsageMeter())
        meter.feed(bomb)
        self.assertIsNone(meter.usage())

    def test_garbage(self):
        """
        Bytes that do not decode leave no usage and are relayed as they
        came.
        """
        meter = DecodingMeter(JSONUsageMeter())
        self.assertEqual(meter.feed(b"not gzip at all"), b"not gzip at all")
        self.assertIsNone(meter.usage())
        self.assertEqual(meter.estimate(), Usage(0, 4, estimated=True))

    def test_metadata_header(self):
        """
        Binary embeddings' C{metadata} header declares the usage; a header
        that is not JSON, or has no usage, declares none.
        """
        header = json.dumps({"id": "e", "data": [], "usage": {"prompt_tokens": 5, "total_tokens": 5}}).encode()
        self.assertEqual(DeclaredUsageMeter.from_metadata(header).usage(), Usage(5, 0))
        self.assertIsNone(DeclaredUsageMeter.from_metadata(b"{oops").usage())
        self.assertIsNone(DeclaredUsageMeter.from_metadata(b'{"data": []}').usage())


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
