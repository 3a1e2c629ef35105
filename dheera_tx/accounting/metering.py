"""
Reading token usage off vLLM's answers as they are relayed.

A meter sees every chunk the relay writes and must never raise into it nor
buffer a whole stream:

* L{JSONUsageMeter} keeps the head and the tail of a JSON answer and reads
  the C{usage} object from whichever holds it (rerank puts it first, chat
  and embeddings last).
* L{SSEUsageMeter} splits the event stream on blank lines (C{\\n\\n} or
  C{\\r\\n\\r\\n}, across any chunk boundaries), parses only events that
  mention C{"usage"}, and keeps the last usage seen (chat, completions,
  C{/v1/responses}' C{response.completed}, Anthropic C{message_delta}).
  In stripping mode it also removes the usage-only chunk the proxy asked
  for on the client's behalf, so the client gets exactly what it asked for.

Cost is computed in integer nano-USD from the deployment's prices.
"""

import json
import re
from decimal import Decimal
from typing import List, Optional, Tuple

import attr

NANOS_PER_USD = 10**9
_USAGE_KEY = re.compile(rb'"usage"\s*:\s*')
_EVENT_END = re.compile(rb"\r\n\r\n|\n\n|\r\r")
# A non-empty piece of generated text in a streamed event.  /v1/responses
# streams their text as string-valued "delta" fields (chat's "delta" is an
# object, so it is not counted twice); without them a cut-short responses
# stream was estimated at 0 completion tokens and billed nothing.
_CONTENT = re.compile(rb'"(?:content|text|delta)"\s*:\s*"[^"]')
_decoder = json.JSONDecoder()


@attr.s(frozen=True, slots=True, auto_attribs=True)
class Usage:
    """
    Token counts of one call.

    :ivar estimated: counted from relayed content because the answer carried
        no usage (a stream cut short).
    :ivar cached_tokens: prompt tokens vLLM found in its prefix cache
        (C{prompt_tokens_details.cached_tokens}; 0 when vLLM does not say).
    """

    prompt_tokens: int = 0
    completion_tokens: int = 0
    estimated: bool = False
    cached_tokens: int = 0


def usage_from_object(usage) -> Optional[Usage]:
    """
    Normalise a usage object of any vLLM answer family.

    :param usage: C{{prompt_tokens, completion_tokens}} (OpenAI, pooling,
        rerank), C{{input_tokens, output_tokens}} (responses, Anthropic).
    :return: the usage, or L{None} when the object holds no token counts.
    """
    if not isinstance(usage, dict):
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


def cost_nanos(usage: Usage, input_cost_per_token: float, output_cost_per_token: float) -> int:
    """
    :return: the cost of C{usage} in nano-USD, computed in decimal so that
        C{0.0000002} USD per token is exactly 200 nano-USD per token.
    """
    cost = Decimal(usage.prompt_tokens) * Decimal(repr(input_cost_per_token)) + Decimal(
        usage.completion_tokens
    ) * Decimal(repr(output_cost_per_token))
    return int((cost * NANOS_PER_USD).to_integral_value())


def nanos_to_usd(nanos: int) -> float:
    """
    :return: nano-USD as USD.
    """
    return nanos / NANOS_PER_USD


def _usage_at(text: bytes, start: int) -> Optional[Usage]:
    try:
        value, _ = _decoder.raw_decode(text[start:].decode("utf-8", "replace"))
    except ValueError:
        return None
    return usage_from_object(value)


class JSONUsageMeter:
    """
    Reads C{usage} from a JSON answer, keeping at most C{2 * WINDOW} bytes.
    """

    WINDOW = 64 * 1024

    def __init__(self):
        self._head = b""
        self._tail = b""
        self._size = 0

    def feed(self, data: bytes) -> bytes:
        """
        :return: C{data}, unchanged (JSON answers are never altered).
        """
        self._size += len(data)
        if len(self._head) < self.WINDOW:
            room = self.WINDOW - len(self._head)
            self._head += data[:room]
        tail = self._tail + data
        self._tail = tail[-self.WINDOW:] if len(tail) > self.WINDOW else tail
        return data

    def usage(self) -> Optional[Usage]:
        """
        :return: the answer's usage, or L{None}.
        """
        try:
            if self._size <= self.WINDOW:
                return self._find(self._head, last=True)
            return self._find(self._tail, last=True) or self._find(self._head, last=False)
        except Exception:
            return None

    @staticmethod
    def _find(text: bytes, last: bool) -> Optional[Usage]:
        matches = list(_USAGE_KEY.finditer(text))
        for match in reversed(matches) if last else matches:
            found = _usage_at(text, match.end())
            if found is not None:
                return found
        return None

    def estimate(self) -> Optional[Usage]:
        """
        JSON answers are either whole or failed: nothing to estimate.
        """
        return None


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
            self.content_events += len(_CONTENT.findall(complete))
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
        :return: for a stream cut short without usage, the completion tokens
            counted as content-bearing events (vLLM sends about one token
            per event), marked as estimated.
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
