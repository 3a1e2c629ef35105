"""
Accounting of pass-through calls: who the end user is, whether the call is
admitted, how its usage is read, and what it costs.

The data plane calls L{CallAccounting} at three points: L{admit} before the
upstream is called (one Redis round trip, only when a limit applies),
L{meter_for} when the answer's headers arrive, and L{settle} when the call
has ended, however it ended, so a cancelled or failed call still releases
its parallel slot and is billed for what was delivered.
"""

import json
import math
from typing import Optional, Union

import attr
from twisted.logger import Logger

from dheera_tx.accounting.limits import Admission
from dheera_tx.accounting.metering import (
    DeclaredUsageMeter,
    DecodingMeter,
    JSONUsageMeter,
    SSEUsageMeter,
    Usage,
    deployment_cost_nanos,
)
from dheera_tx.accounting.reservation import NO_RESERVATION, worst_case
from dheera_tx.accounting.spend import Settlement
from dheera_tx.call import Call
from dheera_tx.config import Deployment
from dheera_tx.errors import ProxyError, bad_request

log = Logger()

# Streamed answers of these routes get stream_options.include_usage;
# /invocations (SageMaker) serves a chat or completions body as those routes
# do, stream included.
USAGE_INJECTABLE = frozenset([b"/v1/chat/completions", b"/v1/completions", b"/invocations"])
# vLLM's inference routes: a 2xx answer of one of these is priced, from its
# usage or, when it carries none the meter can read, from an estimate.
BILLABLE = frozenset(
    [
        b"/v1/chat/completions", b"/v1/completions", b"/v1/responses", b"/v1/messages", b"/v1/embeddings",
        b"/v2/embed", b"/pooling", b"/classify", b"/score", b"/v1/score", b"/rerank", b"/v1/rerank",
        b"/v2/rerank", b"/v1/audio/transcriptions", b"/v1/audio/translations", b"/invocations",
        b"/v1/chat/completions/batch", b"/generative_scoring", b"/cohere/v2/chat", b"/inference/v1/generate",
    ]
)
# The audio bytes taken as one second when a transcription or translation
# without usage is estimated: 128 kbit/s, more than most compressed speech
# and half of 16 kHz 16-bit PCM.
AUDIO_BYTES_PER_SECOND = 16000
_AUDIO = frozenset([b"/v1/audio/transcriptions", b"/v1/audio/translations"])
# pydantic's lax booleans, as vLLM's request models read them.
_TRUE = frozenset([True, 1, "true", "t", "yes", "y", "on", "1"])
_FALSE = frozenset([False, 0, "false", "f", "no", "n", "off", "0"])
MAX_END_USER_LENGTH = 256


def end_user_of(headers, document) -> Optional[str]:
    """
    :return: the end user a call is made for: the C{x-dheera-end-user}
        header, else the JSON body's C{user} field.
    :raise ProxyError: 400 for an end user id that is too long or not
        Unicode text.
    """
    named = headers.getRawHeaders(b"x-dheera-end-user")
    if named and named[0].strip():
        user = named[0].strip().decode("utf-8", "replace")
    elif document is not None and isinstance(document.get("user"), str) and document["user"]:
        user = document["user"]
    else:
        return None
    if len(user) > MAX_END_USER_LENGTH:
        raise bad_request(f"The end user id is longer than {MAX_END_USER_LENGTH} characters.", param="user")
    try:
        user.encode("utf-8")
    except UnicodeEncodeError:
        # A lone surrogate escape from JSON: no Redis key can name it, and it
        # would fail the whole admission batch it joined.
        raise bad_request("The end user id is not Unicode text (a lone surrogate escape).", param="user") from None
    return user


def needs_usage_injection(path: bytes, document) -> bool:
    """
    :return: whether a streamed chat/completions call did not ask for usage,
        so the proxy asks for it upstream and strips it from the answer
        (not when C{stream_options} is malformed: vLLM refuses that).

    vLLM's semantics (C{StreamOptions} in its protocol, read by
    C{should_include_usage}): no C{stream_options} means no usage; an
    object means usage unless its C{include_usage} is false or null
    (C{include_usage} defaults to true), and C{continuous_usage_stats}
    counts only with it.
    """
    if document is None or path not in USAGE_INJECTABLE or document.get("stream") is not True:
        return False
    if path == b"/invocations" and "messages" not in document and "prompt" not in document:
        return False
    options = document.get("stream_options")
    if options is None:
        return True
    if not isinstance(options, dict):
        # Malformed: vLLM answers it with its own 400, which rewriting the
        # field would hide.
        return False
    include = options.get("include_usage", True)
    if include is None:
        return True
    if isinstance(include, str):
        include = include.lower()
    try:
        if include in _FALSE:
            return True
        if include in _TRUE:
            return False
    except TypeError:
        pass
    # Not a boolean vLLM accepts: its 400, not the proxy's rewrite.
    return False


def with_usage_requested(document: dict) -> dict:
    """
    :return: a copy of C{document} whose C{stream_options} ask for usage.
    """
    changed = dict(document)
    options = changed.get("stream_options")
    options = dict(options) if isinstance(options, dict) else {}
    options["include_usage"] = True
    # Without include_usage, vLLM ignores continuous_usage_stats; with the
    # usage the proxy injects it would put usage in every chunk, and only
    # the usage-only chunk is stripped: the client would see usage it did
    # not get from vLLM.
    options.pop("continuous_usage_stats", None)
    changed["stream_options"] = options
    return changed


def estimate_prompt_tokens(document, body_bytes: int = 0) -> int:
    """
    :param document: the JSON request body, or L{None}.
    :param body_bytes: the request body's length, for a body that is not
        JSON.
    :return: a conservative prompt size for a call whose answer carried no
        usage: the whole request (every field: messages, tools, schemas,
        inputs) at 4 characters a token.
    """
    if isinstance(document, dict):
        try:
            text = len(json.dumps(document, ensure_ascii=False, separators=(",", ":")))
        except (ValueError, TypeError, RecursionError):
            text = 0
        return math.ceil(text / 4)
    return math.ceil(body_bytes / 4)


class CallAccounting:
    """
    Admission, metering and settlement of calls.

    :param limiter: a L{dheera_tx.accounting.limits.CallLimiter}, or L{None} (no
        Redis: nothing is limited or recorded).
    :param ledger: a L{dheera_tx.accounting.spend.SpendLedger}, or L{None}.
    :param now: epoch seconds, for settlement dates.
    :param default_max_tokens: completion tokens reserved at admission for
        a generating call that names no C{max_tokens}
        (C{general_settings.default_max_tokens_reservation}).
    """

    def __init__(self, limiter=None, ledger=None, now=None, default_max_tokens: int = 4096):
        self._limiter = limiter
        self._ledger = ledger
        self._now = now
        self._default_max_tokens = default_max_tokens

    async def admit(
        self, principal, end_user: Optional[str], call: Call, path: bytes = b"", document=None, body_bytes: int = 0, replicas=()
    ) -> Optional[Admission]:
        """
        :param path: the call's path after C{/vllm}; with C{document} (its
            JSON body), C{body_bytes} (that body's length) and C{replicas}
            (where it may go), what its worst case is reckoned from.
        :return: the admission to settle later, or L{None} when nothing is
            tracked.
        :raise ProxyError: over a limit or budget, end user blocked, or
            Redis unreachable for a virtual key.
        """
        if self._limiter is None:
            return None
        reservation = NO_RESERVATION
        if self._limiter.may_reserve(principal, end_user):
            reservation = worst_case(path, document, body_bytes, replicas, self._default_max_tokens)
        try:
            return await self._limiter.admit(principal, end_user, call.call_id, reservation)
        except ProxyError as e:
            if e.status == 503 and self._ledger is not None:
                # The script may have run and taken a parallel slot and
                # reservations although its reply was lost: give them back.
                self._ledger.release_lost_slot(self._limiter.admission_of(principal, end_user, call.call_id, reservation))
            raise

    @staticmethod
    def meter_for(
        content_type: bytes, status: int, strip_usage_chunk: bool, encoding: Optional[bytes] = None, metadata=None
    ):
        """
        :param encoding: the answer's C{Content-Encoding}, if any.
        :param metadata: the answer's C{metadata} header (binary embeddings
            declare their usage there), if any.
        :return: the meter for an answer, or L{None} for answers that carry
            no usage (errors, binary bodies, Prometheus text).
        """
        kind = content_type.split(b";", 1)[0].strip().lower()
        if metadata is not None and status < 300:
            return DeclaredUsageMeter.from_metadata(metadata)
        encoded = encoding is not None and encoding.strip().lower() not in (b"", b"identity")
        meter: Union[SSEUsageMeter, JSONUsageMeter]
        if kind == b"text/event-stream":
            # A compressed stream cannot be rewritten: it is relayed as is.
            meter = SSEUsageMeter(strip_usage_chunk and not encoded)
        elif status < 400 and (kind == b"application/json" or kind.endswith(b"+json")):
            meter = JSONUsageMeter()
        else:
            return None
        if encoded:
            # Unreadable encodings (br, zstd) leave the answer without
            # usage: it is estimated, never free.
            return DecodingMeter(meter) if DecodingMeter.decodes(encoding or b"") else _Unreadable()
        return meter

    def settle(
        self,
        call: Call,
        admission: Optional[Admission],
        deployment: Optional[Deployment],
        meter,
        document,
        path: bytes = b"",
        body_bytes: int = 0,
    ) -> None:
        """
        Price the call from what its meter read and add it to the ledger.
        Never raises.

        :param path: the upstream path: a 2xx answer of one of vLLM's
            inference routes (L{BILLABLE}) with no usage the meter could
            read is billed an estimate, flagged C{usage_estimated}.
        :param body_bytes: the request body's length (estimates of bodies
            that are not JSON).
        """
        try:
            usage = self._usage(meter, document, body_bytes)
            if usage is None and path in BILLABLE and call.status is not None and 200 <= call.status < 300:
                usage = self._unread(meter, document, call, body_bytes)
            if (
                usage is not None
                and not usage.seconds
                and path in _AUDIO
                and deployment is not None
                and deployment.input_cost_per_second
            ):
                # vLLM reports seconds only for a whole transcription (a
                # stream's usage is in tokens, a translation has none): the
                # upload's length stands for them, and an estimated prompt
                # (the upload's bytes as tokens) gives way to them.
                usage = attr.evolve(
                    usage,
                    seconds=math.ceil(body_bytes / AUDIO_BYTES_PER_SECOND),
                    prompt_tokens=0 if usage.estimated else usage.prompt_tokens,
                    estimated=True,
                )
            if usage is not None:
                call.prompt_tokens = usage.prompt_tokens
                call.completion_tokens = usage.completion_tokens
                call.cached_tokens = usage.cached_tokens
                call.usage_estimated = usage.estimated
                if deployment is not None:
                    call.cost_nanos = deployment_cost_nanos(usage, deployment, call.model_name)
            if admission is not None and self._ledger is not None:
                self._ledger.settle(
                    Settlement(
                        admission,
                        call.cost_nanos,
                        call.prompt_tokens,
                        call.completion_tokens,
                        call.user_id,
                        call.team_id,
                        call.model_name,
                        self._now() if self._now else call.started_at,
                    )
                )
        except Exception:
            log.failure("Settling call {call_id} failed", call_id=call.call_id)

    @staticmethod
    def _usage(meter, document, body_bytes: int = 0) -> Optional[Usage]:
        if meter is None:
            return None
        usage = meter.usage()
        if usage is not None:
            return usage
        if isinstance(meter, SSEUsageMeter):
            # A stream that carried no usage (cut short, or usage not
            # asked for): what it generated, and always the prompt.
            estimate = meter.estimate()
            completion = estimate.completion_tokens if estimate is not None else 0
            return Usage(estimate_prompt_tokens(document, body_bytes), completion, estimated=True)
        return None

    @staticmethod
    def _unread(meter, document, call: Call, body_bytes: int) -> Usage:
        """
        :return: the estimate of a 2xx answer whose usage could not be read:
            the whole request as prompt, the answer's length in tokens of 4
            bytes as completion.
        """
        estimate = meter.estimate() if meter is not None else None
        completion = estimate.completion_tokens if estimate is not None else math.ceil(call.bytes_out / 4)
        return Usage(estimate_prompt_tokens(document, body_bytes), completion, estimated=True)


class _Unreadable:
    """
    A meter for an answer in an encoding the proxy cannot decode: it has
    no readable usage.
    """

    __slots__ = ()

    def feed(self, data: bytes) -> bytes:
        return data

    def usage(self) -> None:
        return None

    def estimate(self) -> None:
        return None
