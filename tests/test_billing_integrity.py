"""
Integration tests of SPEC section 9's billing integrity (issue 13 items 1-4
and 6): every answer a tenant can get through the proxy is priced, tried as
a tenant holding an ordinary virtual key would, against the fake vLLM over
loopback and a real Redis.

The fake answers with vLLM's field order (C{usage} before
C{prompt_logprobs}), streams reasoning and tool-call deltas on request
(C{reasoning}, C{tool_calls} faults), answers C{encoding_format: "bytes"}
embeddings with a C{metadata} header, reports transcriptions in seconds,
and compresses when asked (C{gzip_if_accepted}).
"""

import gzip
import json
import struct

from dheera_tx.accounting.call_accounting import estimate_prompt_tokens
from tests.passthrough_harness import MASTER_KEY, auth, deployment, error_of, multipart
from tests.test_gateway_spend import (
    PRICES,
    GatewayTestCase,
    chat_body,
    content_events,
    cost,
    event_data,
    header_nanos,
    sse_events,
)

# The audio deployment's price: 0.0001 USD (100000 nano-USD) per second.
SECOND_NANOS = 100_000


class BillingTestCase(GatewayTestCase):
    """
    The gateway of L{GatewayTestCase} plus an C{audio} deployment priced
    by the second (C{input_cost_per_second}).
    """

    def model_list(self):
        return super().model_list() + [
            deployment("audio", "tiny", self.upstream, input_cost_per_second=SECOND_NANOS / 1e9, **PRICES)
        ]

    async def billed(self, token: str, model: str = "alpha") -> dict:
        """
        Wait for one settled call of C{model}.

        :return: its call record, after checking that the key's spend and
            the model's spend hash agree with it.
        """
        await self.settled(model)
        [record] = self.records()
        self.assertEqual(await self.key_spend(token), record["cost_nanos"])
        counters = self.hash(f"spend:model:{model}")
        self.assertEqual(
            (counters["spend_nanos"], counters["prompt_tokens"], counters["completion_tokens"]),
            (record["cost_nanos"], record["prompt_tokens"], record["completion_tokens"]),
        )
        return record


class UsageAnywhereTests(BillingTestCase):
    """
    Item 1: the top-level C{usage} of a JSON answer is read wherever vLLM
    put it.
    """

    async def test_usage_before_prompt_logprobs(self):
        """
        A chat answer with completion C{logprobs} (before C{usage}) and
        C{prompt_logprobs} and C{return_token_ids} for a long prompt (after
        it, as vLLM orders them) has its C{usage} in the middle, more than
        64 KiB from either end of a 300 KB answer: it is billed exactly,
        counts its tokens, and carries C{x-dheera-response-cost}.
        """
        key, token = await self.new_key()
        prompt = " ".join(f"w{i}" for i in range(3000))
        document = chat_body(prompt, 400, logprobs=True, top_logprobs=5, prompt_logprobs=0, return_token_ids=True)
        response, body = await self.post("/v1/chat/completions", document, key)
        self.assertEqual(response.code, 200, body[:200])
        at = body.index(b'"usage"')
        self.assertGreater(min(at, len(body) - at), 64 * 1024)
        self.assertLess(at, body.index(b'"prompt_logprobs"'))
        self.assertEqual(json.loads(body)["usage"]["prompt_tokens"], 3000)
        values = response.headers.getRawHeaders(b"x-dheera-response-cost")
        self.assertIsNotNone(values, "no x-dheera-response-cost")
        self.assertEqual(header_nanos(values[0]), cost(3000, 400))
        record = await self.billed(token)
        self.assertEqual((record["prompt_tokens"], record["completion_tokens"]), (3000, 400))
        self.assertFalse(record["usage_estimated"])
        self.assertEqual(record["cost_nanos"], cost(3000, 400))


class NoFreeStreamTests(BillingTestCase):
    """
    Item 2: a stream without usage is estimated from every kind of delta
    it carried, and its prompt is always billed.
    """

    async def assertEstimated(self, document: dict, fault: str, path: str = "/v1/chat/completions") -> dict:
        key, token = await self.new_key()
        response, body = await self.post(path, document, key, headers={"x-fake-fault": fault})
        self.assertEqual(response.code, 200)
        self.assertIn(b"event: error", body)
        record = await self.billed(token)
        self.assertTrue(record["usage_estimated"])
        self.assertEqual(record["prompt_tokens"], estimate_prompt_tokens(document))
        self.assertGreater(record["prompt_tokens"], 0)
        return record

    async def test_reasoning_stream_cut_short(self):
        """
        A reasoning stream (C{reasoning} deltas, no C{content}) reset after
        the role chunk and 6 deltas is billed 6 estimated completion tokens
        and the prompt estimate.
        """
        document = chat_body("think about this", 20, stream=True)
        record = await self.assertEstimated(document, "reasoning,reset_mid_stream=7,chunks=20")
        self.assertEqual(record["completion_tokens"], 6)
        self.assertEqual(record["cost_nanos"], cost(estimate_prompt_tokens(document), 6))

    async def test_tool_call_stream_cut_short(self):
        """
        A tool-call stream (C{arguments} deltas) reset after the role chunk,
        the call's opening delta and 5 argument deltas is billed 5
        estimated completion tokens and the prompt estimate.
        """
        document = chat_body("call a tool", 20, stream=True)
        record = await self.assertEstimated(document, "tool_calls,reset_mid_stream=7,chunks=20")
        self.assertEqual(record["completion_tokens"], 5)

    async def test_prompt_billed_without_output(self):
        """
        A stream cut before any generated piece still bills its prompt
        estimate.
        """
        document = chat_body("nothing came back", 20, stream=True)
        record = await self.assertEstimated(document, "reset_mid_stream=1,chunks=20")
        self.assertEqual(record["completion_tokens"], 0)
        self.assertEqual(record["cost_nanos"], cost(estimate_prompt_tokens(document), 0))

    async def test_invocations_stream_gets_usage(self):
        """
        A streamed chat body on C{/invocations} (SageMaker) gets
        C{include_usage} upstream like C{/v1/chat/completions}: a reasoning
        stream is billed exactly, and the client sees no usage chunk.
        """
        key, token = await self.new_key()
        document = chat_body("one two three", 5, stream=True)
        response, body = await self.post("/invocations", document, key, headers={"x-fake-fault": "reasoning"})
        self.assertEqual(response.code, 200)
        self.assertEqual(self.upstream.received[-1].json["stream_options"], {"include_usage": True})
        self.assertNotIn(b'"usage"', body)
        self.assertEqual(sse_events(body)[-1], b"data: [DONE]")
        record = await self.billed(token)
        self.assertFalse(record["usage_estimated"])
        self.assertEqual(record["cost_nanos"], cost(3, 5))


class StreamOptionsTests(BillingTestCase):
    """
    Item 3: the client gets exactly what vLLM would have sent it.
    """

    async def test_empty_stream_options_means_usage(self):
        """
        C{stream_options: {}} asks vLLM for usage (C{include_usage}
        defaults to true): it goes upstream unchanged and the client gets
        the usage chunk just before C{[DONE]}.
        """
        key, token = await self.new_key()
        document = chat_body("one two three", 5, stream=True, stream_options={})
        response, body = await self.post("/v1/chat/completions", document, key)
        self.assertEqual(response.code, 200)
        self.assertEqual(self.upstream.received[-1].json["stream_options"], {})
        events = sse_events(body)
        self.assertEqual(events[-1], b"data: [DONE]")
        chunk = json.loads(event_data(events[-2]))
        self.assertEqual((chunk["choices"], chunk["usage"]["completion_tokens"]), ([], 5))
        record = await self.billed(token)
        self.assertEqual(record["cost_nanos"], cost(3, 5))

    async def test_null_include_usage_means_none(self):
        """
        C{include_usage: null} is false to vLLM: the proxy asks for usage
        itself and the client's stream has none.
        """
        document = chat_body("one two three", 5, stream=True, stream_options={"include_usage": None})
        response, body = await self.post("/v1/chat/completions", document)
        self.assertEqual(response.code, 200)
        self.assertEqual(self.upstream.received[-1].json["stream_options"], {"include_usage": True})
        self.assertNotIn(b'"usage"', body)
        self.assertEqual(content_events(body), 5)


class UnreadableAnswerTests(BillingTestCase):
    """
    Item 4: answers whose usage is compressed, in a header, in seconds, or
    missing are priced, never free.
    """

    async def test_gzip_answer_billed(self):
        """
        A client asking for gzip through an upstream that compresses gets
        the compressed answer as sent, and the call is billed exactly from
        the decoded usage, with the cost header.
        """
        key, token = await self.new_key()
        response, body = await self.post(
            "/v1/chat/completions",
            chat_body("hi there friend", 5),
            key,
            headers={"accept-encoding": "gzip", "x-fake-fault": "gzip_if_accepted"},
        )
        self.assertEqual(response.code, 200)
        self.assertEqual(response.headers.getRawHeaders(b"content-encoding"), [b"gzip"])
        self.assertEqual(json.loads(gzip.decompress(body))["usage"]["completion_tokens"], 5)
        self.assertEqual(header_nanos(response.headers.getRawHeaders(b"x-dheera-response-cost")[0]), cost(3, 5))
        record = await self.billed(token)
        self.assertFalse(record["usage_estimated"])
        self.assertEqual(record["cost_nanos"], cost(3, 5))

    async def test_gzip_stream_with_usage_injected(self):
        """
        A streamed call whose usage chunk the proxy strips asks upstream
        for an uncompressed answer (it is rewritten): billed exactly, no
        usage reaches the client.
        """
        key, token = await self.new_key()
        response, body = await self.post(
            "/v1/chat/completions",
            chat_body("hi there friend", 5, stream=True),
            key,
            headers={"accept-encoding": "gzip"},
        )
        self.assertEqual(response.code, 200)
        self.assertEqual(self.upstream.received[-1].headers["accept-encoding"], ["identity"])
        self.assertNotIn(b'"usage"', body)
        record = await self.billed(token)
        self.assertEqual(record["cost_nanos"], cost(3, 5))

    async def test_bytes_embeddings_billed_from_metadata(self):
        """
        C{encoding_format: "bytes"} embeddings (a binary body, usage in the
        C{metadata} header) are billed from that header, which reaches the
        client with the body unchanged.
        """
        key, token = await self.new_key()
        document = {"model": "alpha", "input": ["one two", "three four five"], "encoding_format": "bytes"}
        response, body = await self.post("/v1/embeddings", document, key)
        self.assertEqual(response.code, 200)
        self.assertEqual(len(body), 2 * 8 * 4)
        struct.unpack("<16f", body)
        metadata = json.loads(response.headers.getRawHeaders(b"metadata")[0])
        self.assertEqual(metadata["usage"]["prompt_tokens"], 5)
        self.assertEqual(header_nanos(response.headers.getRawHeaders(b"x-dheera-response-cost")[0]), cost(5, 0))
        record = await self.billed(token)
        self.assertFalse(record["usage_estimated"])
        self.assertEqual(record["cost_nanos"], cost(5, 0))

    async def test_bytes_only_embeddings_estimated(self):
        """
        C{bytes_only} embeddings carry no usage at all: the call is billed
        a non-zero estimate, flagged.
        """
        key, token = await self.new_key()
        document = {"model": "alpha", "input": ["one two"], "encoding_format": "bytes_only"}
        response, _ = await self.post("/v1/embeddings", document, key)
        self.assertEqual(response.code, 200)
        self.assertIsNone(response.headers.getRawHeaders(b"metadata"))
        record = await self.billed(token)
        self.assertTrue(record["usage_estimated"])
        self.assertEqual(record["prompt_tokens"], estimate_prompt_tokens(document))
        self.assertEqual(record["completion_tokens"], 8)
        self.assertGreater(record["cost_nanos"], 0)

    async def upload(self, path: str, key: str, audio_bytes: int, *fields):
        boundary = b"audio-boundary"
        body = multipart(boundary, [("file", b"\x01" * audio_bytes, "a.wav"), ("language", b"en", None), *fields])
        headers = dict(auth(key), **{"content-type": "multipart/form-data; boundary=" + boundary.decode()})
        headers["x-dheera-model"] = "audio"
        response, answer = await self.request(b"POST", "/vllm" + path, headers, body)
        return response, answer, len(body)

    async def test_transcription_priced_by_the_second(self):
        """
        A transcription reports C{{"type": "duration", "seconds": N}}: it
        costs N times the deployment's C{input_cost_per_second}, shown in
        the cost header.
        """
        key, token = await self.new_key()
        response, answer, _ = await self.upload("/v1/audio/transcriptions", key, 96_000)
        self.assertEqual(response.code, 200, answer)
        self.assertEqual(json.loads(answer)["usage"], {"type": "duration", "seconds": 3})
        self.assertEqual(header_nanos(response.headers.getRawHeaders(b"x-dheera-response-cost")[0]), 3 * SECOND_NANOS)
        record = await self.billed(token, "audio")
        self.assertFalse(record["usage_estimated"])
        self.assertEqual(record["cost_nanos"], 3 * SECOND_NANOS)

    async def test_streamed_transcription_seconds_estimated(self):
        """
        A streamed transcription's usage is in tokens (vLLM reports seconds
        only for a whole one): on a deployment priced by the second, the
        tokens are billed and the seconds estimated from the upload (16000
        bytes a second), flagged.
        """
        key, token = await self.new_key()
        response, answer, sent = await self.upload(
            "/v1/audio/transcriptions", key, 96_000, ("stream", b"true", None), ("stream_include_usage", b"true", None)
        )
        self.assertEqual(response.code, 200, answer)
        usage = json.loads(event_data(sse_events(answer)[-2]))["usage"]
        record = await self.billed(token, "audio")
        self.assertTrue(record["usage_estimated"])
        self.assertEqual((record["prompt_tokens"], record["completion_tokens"]), (usage["prompt_tokens"], 8))
        seconds = -(-sent // 16000)
        self.assertEqual(record["cost_nanos"], seconds * SECOND_NANOS + cost(usage["prompt_tokens"], 8))

    async def test_translation_without_usage_estimated(self):
        """
        A translation answer has no usage (vLLM's C{TranslationResponse}):
        it is billed an estimate, flagged: on a deployment priced by the
        second, the upload's seconds at 16000 bytes a second (not its bytes
        as prompt tokens), and the answer as completion.
        """
        key, token = await self.new_key()
        response, answer, sent = await self.upload("/v1/audio/translations", key, 96_000)
        self.assertEqual(response.code, 200, answer)
        self.assertNotIn("usage", json.loads(answer))
        record = await self.billed(token, "audio")
        self.assertTrue(record["usage_estimated"])
        seconds = -(-sent // 16000)
        completion = -(-len(answer) // 4)
        self.assertEqual((record["prompt_tokens"], record["completion_tokens"]), (0, completion))
        self.assertEqual(record["cost_nanos"], seconds * SECOND_NANOS + cost(0, completion))


class MultipartModelTests(BillingTestCase):
    """
    Item 6: a form's C{model} part anywhere must be the model authorized.
    """

    BOUNDARY = b"model-after-file"

    def form(self, audio_bytes: int, model: bytes) -> bytes:
        return multipart(self.BOUNDARY, [("file", b"\x01" * audio_bytes, "a.wav"), ("model", model, None)])

    async def send(self, key: str, body: bytes):
        headers = dict(auth(key), **{"content-type": "multipart/form-data; boundary=" + self.BOUNDARY.decode()})
        headers["x-dheera-model"] = "alpha"
        return await self.request(b"POST", "/vllm/v1/audio/transcriptions", headers, body)

    async def test_model_after_file_must_match(self):
        """
        A key restricted to C{alpha} sending the file first and
        C{model=tiny} after it, with C{x-dheera-model: alpha}, gets 400
        naming C{model}, and the upstream never gets the whole form:
        whether the part arrived before forwarding began (small form) or
        after (a 2 MB upload already streaming upstream).
        """
        key, _ = await self.new_key(models=["alpha"])
        for size in (1000, 2 * 1024 * 1024):
            response, answer = await self.send(key, self.form(size, b"tiny"))
            self.assertEqual(response.code, 400, answer)
            self.assertEqual(error_of(answer)["param"], "model")
        self.assertFalse(any(r.body_done for r in self.upstream.received))
        self.assertEqual(self.records()[0]["status"], 400)

    async def test_matching_model_after_file_forwarded(self):
        """
        A form whose C{model} part, after the file, names the model the
        call was authorized for is forwarded whole (the fake serves
        C{tiny}, so it answers the form's C{alpha} with its own 404).
        """
        response, answer = await self.send(MASTER_KEY, self.form(1000, b"alpha"))
        self.assertEqual(response.code, 404, answer)
        self.assertEqual(error_of(answer)["param"], "model")
        self.assertTrue(self.upstream.received[-1].body_done)
