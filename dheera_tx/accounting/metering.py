"""
Reading token usage off vLLM's answers as they are relayed.

A meter sees every chunk the relay writes and must never raise into it nor
buffer a whole stream:

* L{JSONUsageMeter} reads the C{usage} member of the top-level object of a
  JSON answer, wherever it sits (rerank puts it first, embeddings last,
  chat before C{prompt_logprobs}): from the answer the relay holds, or
  scanned as it streams (L{dheera_tx.accounting.json_usage}).  Audio
  transcriptions report C{{"type": "duration", "seconds": N}}.
* L{SSEUsageMeter} splits the event stream on blank lines (C{\\n\\n} or
  C{\\r\\n\\r\\n}, across any chunk boundaries), parses only events that
  mention C{"usage"}, and keeps the last usage seen (chat, completions,
  C{/v1/responses}' C{response.completed}, Anthropic C{message_delta}).
  In stripping mode it also removes the usage-only chunk the proxy asked
  for on the client's behalf, so the client gets exactly what it asked for.
* L{DeclaredUsageMeter} holds usage declared in a response header (binary
  embeddings' C{metadata}); L{DecodingMeter} meters a compressed answer
  (C{Content-Encoding: gzip} or C{deflate}) from its decoded bytes while the
  client gets the bytes as sent.

Cost is computed in integer nano-USD from the deployment's prices.
"""

import json
import math
import re
import zlib
from decimal import Decimal
from typing import List, Optional, Tuple

import attr

from dheera_tx.accounting.json_usage import TopLevelUsageScanner, whole_answer_usage

NANOS_PER_USD = 10**9
_EVENT_END = re.compile(rb"\r\n\r\n|\n\n|\r\r")
# A non-empty piece of generated output in a streamed event, of any kind:
# text (chat "content", completions and Anthropic "text", /v1/responses'
# string "delta"s, which also carry reasoning and tool arguments there),
# reasoning ("reasoning_content", "reasoning", Anthropic "thinking") and
# tool calls ("arguments", Anthropic "partial_json").  Chat's "delta" is an
# object, so it is not counted twice.
_GENERATED = re.compile(
    rb'"(?:content|text|delta|reasoning(?:_content)?|arguments|thinking|partial_json)"[ \t\r\n]*:[ \t\r\n]*"[^"]'
)


@attr.s(frozen=True, slots=True, auto_attribs=True)
class Usage:
    """
    Token counts of one call.

    :ivar estimated: counted from relayed content because the answer carried
        no readable usage (a stream cut short, a body without usage).
    :ivar seconds: audio seconds processed (transcriptions), priced with
        the deployment's C{input_cost_per_second}.
    :ivar cached_tokens: prompt tokens vLLM found in its prefix cache
        (C{prompt_tokens_details.cached_tokens}; 0 when vLLM does not say).
    """

    prompt_tokens: int = 0
    completion_tokens: int = 0
    estimated: bool = False
    seconds: float = 0
    cached_tokens: int = 0


def usage_from_object(usage) -> Optional[Usage]:
    """
    Normalise a usage object of any vLLM answer family.

    :param usage: C{{prompt_tokens, completion_tokens}} (OpenAI, pooling,
        rerank), C{{input_tokens, output_tokens}} (responses, Anthropic),
        C{{type: "duration", seconds}} (transcriptions).
    :return: the usage, or L{None} when the object holds no token counts.
    """
    if not isinstance(usage, dict):
        return None
    if usage.get("type") == "duration":
        seconds = usage.get("seconds")
        if isinstance(seconds, (int, float)) and not isinstance(seconds, bool) and 0 <= seconds < math.inf:
            return Usage(seconds=seconds)
        return None
    prompt = usage.get("prompt_tokens", usage.get("input_tokens"))
    completion = usage.get("completion_tokens", usage.get("output_tokens"))
    if not isinstance(prompt, int) and not isinstance(completion, int):
        return None
    # vLLM says this only with --enable-prompt-tokens-details.
    details = usage.get("prompt_tokens_details", usage.get("input_tokens_details"))
    cached = details.get("cached_tokens") if isinstance(details, dict) else None
    return Usage(
        prompt_tokens=prompt if isinstance(prompt, int) and prompt >= 0 else 0,
        completion_tokens=completion if isinstance(completion, int) and completion >= 0 else 0,
        cached_tokens=cached if isinstance(cached, int) and cached >= 0 else 0,
    )


def cost_nanos(
    usage: Usage, input_cost_per_token: float, output_cost_per_token: float, input_cost_per_second: float = 0.0
) -> int:
    """
    :return: the cost of C{usage} in nano-USD, computed in decimal so that
        C{0.0000002} USD per token is exactly 200 nano-USD per token.
    """
    cost = Decimal(usage.prompt_tokens) * Decimal(repr(input_cost_per_token)) + Decimal(
        usage.completion_tokens
    ) * Decimal(repr(output_cost_per_token))
    if usage.seconds:
        cost += Decimal(repr(usage.seconds)) * Decimal(repr(input_cost_per_second))
    return int((cost * NANOS_PER_USD).to_integral_value())


def deployment_cost_nanos(usage: Usage, deployment, model: Optional[str] = None) -> int:
    """
    :param model: the name the call was routed by (a LoRA adapter may have
        its own token prices).
    :return: the cost of C{usage} at a deployment's prices.
    """
    input_cost, output_cost = deployment.prices_for(model)
    return cost_nanos(usage, input_cost, output_cost, deployment.input_cost_per_second)


def nanos_to_usd(nanos: int) -> float:
    """
    :return: nano-USD as USD.
    """
    return nanos / NANOS_PER_USD


class JSONUsageMeter:
    """
    Reads the top-level C{usage} of a JSON answer.  An answer of up to
    L{KEEP} bytes (the relay holds it anyway, to put the cost in its head)
    is read whole when it ends; past that, or once L{stream} says the
    answer is not held, it is scanned as it streams, keeping at most a
    usage object's bytes.
    """

    KEEP = 8 * 1024 * 1024

    __slots__ = ("_chunks", "_size", "_scanner")

    def __init__(self):
        self._chunks: Optional[List[bytes]] = []
        self._size = 0
        self._scanner: Optional[TopLevelUsageScanner] = None

    def stream(self) -> None:
        """
        The answer is relayed as it arrives, not held: scan it from now on
        instead of keeping it.
        """
        chunks, self._chunks = self._chunks, None
        if chunks is not None:
            self._scanner = scanner = TopLevelUsageScanner()
            for chunk in chunks:
                scanner.feed(chunk)

    def feed(self, data: bytes) -> bytes:
        """
        :return: C{data}, unchanged (JSON answers are never altered).
        """
        self._size += len(data)
        chunks = self._chunks
        if chunks is not None:
            chunks.append(data)
            if self._size > self.KEEP:
                self.stream()
        elif self._scanner is not None:
            self._scanner.feed(data)
        return data

    def usage(self) -> Optional[Usage]:
        """
        :return: the answer's usage, or L{None}.
        """
        if self._scanner is not None:
            return usage_from_object(self._scanner.value)
        try:
            value = whole_answer_usage(b"".join(self._chunks or ()))
        except Exception:
            return None
        return usage_from_object(value)

    def estimate(self) -> Usage:
        """
        :return: for an answer without readable usage, its length in
            tokens of 4 bytes, as completion tokens (an upper bound for
            text; marked as estimated).
        """
        return Usage(completion_tokens=math.ceil(self._size / 4), estimated=True)


class DeclaredUsageMeter:
    """
    An answer whose usage the upstream declared in a header (binary
    embeddings' C{metadata}); the body is relayed untouched.

    :param usage: the declared usage, or L{None} when the header held none.
    """

    __slots__ = ("_usage", "_size")

    def __init__(self, usage: Optional[Usage]):
        self._usage = usage
        self._size = 0

    @classmethod
    def from_metadata(cls, value: bytes) -> "DeclaredUsageMeter":
        """
        :param value: a C{metadata} header: JSON with a top-level C{usage}.
        """
        try:
            document = json.loads(value)
        except (ValueError, RecursionError):
            return cls(None)
        return cls(usage_from_object(document.get("usage")) if isinstance(document, dict) else None)

    def feed(self, data: bytes) -> bytes:
        self._size += len(data)
        return data

    def usage(self) -> Optional[Usage]:
        return self._usage

    def estimate(self) -> Usage:
        """
        :return: the body's length in tokens of 4 bytes, as an estimate.
        """
        return Usage(completion_tokens=math.ceil(self._size / 4), estimated=True)


class DecodingMeter:
    """
    Meters a compressed answer: C{inner} reads the decoded bytes, the
    client gets the bytes as the upstream sent them.  At most
    L{MAX_DECODED} decoded bytes are metered (a compression bomb costs
    no more than that); past it, or on bytes that do not decode, the
    answer has no readable usage.

    :param inner: the meter of the decoded answer (never in stripping mode).
    """

    MAX_DECODED = 32 * 1024 * 1024
    # Decoded per step, so memory stays bounded whatever the ratio.
    STEP = 256 * 1024

    __slots__ = ("_inner", "_decoder", "_decoded", "_failed", "_size")

    def __init__(self, inner):
        self._inner = inner
        self._size = 0
        # 32 + MAX_WBITS: a gzip or zlib header, detected.
        self._decoder = zlib.decompressobj(32 + zlib.MAX_WBITS)
        self._decoded = 0
        self._failed = False

    @staticmethod
    def decodes(encoding: bytes) -> bool:
        """
        :return: whether a C{Content-Encoding} value can be decoded.
        """
        return encoding.strip().lower() in (b"gzip", b"x-gzip", b"deflate")

    def feed(self, data: bytes) -> bytes:
        self._size += len(data)
        if self._failed:
            return data
        try:
            decoder = self._decoder
            pending = data
            while pending and not decoder.eof:
                out = decoder.decompress(pending, self.STEP)
                pending = decoder.unconsumed_tail
                self._decoded += len(out)
                if self._decoded > self.MAX_DECODED:
                    self._failed = True
                    break
                self._inner.feed(out)
        except zlib.error:
            self._failed = True
        return data

    def stream(self) -> None:
        """
        The answer is not held: the inner meter scans instead of keeping.
        """
        if isinstance(self._inner, JSONUsageMeter):
            self._inner.stream()

    def flush(self) -> bytes:
        return b""

    def usage(self) -> Optional[Usage]:
        return None if self._failed else self._inner.usage()

    def estimate(self) -> Optional[Usage]:
        """
        :return: the inner meter's estimate, and for an answer that did not
            decode at least its bytes as sent, in tokens of 4 bytes.
        """
        inner = self._inner.estimate()
        if not self._failed:
            return inner
        relayed = math.ceil(self._size / 4)
        if inner is None or inner.completion_tokens < relayed:
            return Usage(completion_tokens=relayed, estimated=True)
        return inner


class SSEUsageMeter:
    """
    Reads usage from a server-sent event stream.

    :param strip_usage_chunk: remove the usage-only chunk (C{"choices":[]}
        with C{usage}) because the proxy, not the client, asked for it.
    """

    MAX_PENDING = 1024 * 1024

    def __init__(self, strip_usage_chunk: bool = False):
        self._strip = strip_usage_chunk
        self._pending = b""
        self._usage: Optional[Usage] = None
        self.content_events = 0

    def feed(self, data: bytes) -> bytes:
        """
        :return: the bytes to relay now: C{data} itself, or in stripping
            mode the complete events of it minus the usage-only chunk.
        """
        try:
            return self._feed(data)
        except Exception:
            # Metering must never break the relay.
            self._strip = False
            out, self._pending = self._pending + data, b""
            return out

    def _feed(self, data: bytes) -> bytes:
        buffered = self._pending + data if self._pending else data
        end = _last_event_end(buffered)
        if end == 0:
            if len(buffered) > self.MAX_PENDING:
                self._pending = b""
                return buffered if self._strip else data
            self._pending = buffered
            return b"" if self._strip else data
        complete, self._pending = buffered[:end], buffered[end:]
        if b"data:" in complete:
            self.content_events += len(_GENERATED.findall(complete))
        if b'"usage"' not in complete:
            return complete if self._strip else data
        kept: List[bytes] = []
        for event in _split_events(complete):
            payload = _event_data(event)
            if payload is None or b'"usage"' not in payload:
                kept.append(event)
                continue
            document = json.loads(payload)
            usage, usage_only = _stream_usage(document)
            if usage is not None:
                previous = self._usage
                if previous is not None and usage.prompt_tokens == 0:
                    # Anthropic's message_delta carries only output tokens.
                    usage = attr.evolve(usage, prompt_tokens=previous.prompt_tokens)
                self._usage = usage
            if not (self._strip and usage_only):
                kept.append(event)
        return b"".join(kept) if self._strip else data

    def flush(self) -> bytes:
        """
        :return: bytes still held back at the end of the stream.
        """
        pending, self._pending = self._pending, b""
        return pending if self._strip else b""

    def usage(self) -> Optional[Usage]:
        """
        :return: the last usage the stream carried, or L{None}.
        """
        return self._usage

    def estimate(self) -> Optional[Usage]:
        """
        :return: for a stream that carried no usage, the completion tokens
            counted as the generated pieces it relayed, of every kind (text,
            reasoning, tool-call arguments; vLLM sends about one token per
            piece), marked as estimated.
        """
        if self._usage is not None:
            return None
        return Usage(prompt_tokens=0, completion_tokens=self.content_events, estimated=True)


def _last_event_end(data: bytes) -> int:
    if data.endswith(b"\n\n") and data[-3:-2] not in b"\r\n":
        # What vLLM writes: whole events, each ending with a blank line
        # after a line of data (no match can end later or overlap it).
        return len(data)
    end = 0
    for match in _EVENT_END.finditer(data):
        end = match.end()
    return end


def _split_events(block: bytes) -> List[bytes]:
    events = []
    start = 0
    for match in _EVENT_END.finditer(block):
        events.append(block[start:match.end()])
        start = match.end()
    if start < len(block):
        events.append(block[start:])
    return events


def _event_data(event: bytes) -> Optional[bytes]:
    lines = [
        line[5:].lstrip(b" ")
        for line in event.replace(b"\r\n", b"\n").split(b"\n")
        if line.startswith(b"data:")
    ]
    if not lines:
        return None
    payload = b"\n".join(lines)
    if payload.strip() == b"[DONE]":
        return None
    return payload


def _stream_usage(document) -> Tuple[Optional[Usage], bool]:
    """
    :return: the usage an event carries, and whether it is a usage-only
        chunk (C{"choices": []}).
    """
    if not isinstance(document, dict):
        return None, False
    usage = usage_from_object(document.get("usage"))
    if usage is not None:
        return usage, document.get("choices") == []
    for container in ("response", "message"):
        inner = document.get(container)
        if isinstance(inner, dict):
            usage = usage_from_object(inner.get("usage"))
            if usage is not None:
                return usage, False
    return None, False
