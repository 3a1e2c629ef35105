"""
Accounting of pass-through calls: who the end user is, whether the call is
admitted, how its usage is read, and what it costs.

The data plane calls L{CallAccounting} at three points: L{admit} before the
upstream is called (one Redis round trip, only when a limit applies),
L{meter_for} when the answer's headers arrive, and L{settle} when the call
has ended, however it ended, so a cancelled or failed call still releases
its parallel slot and is billed for what was delivered.
"""

import math
from typing import Optional

from twisted.logger import Logger

from dheera_tx.accounting.limits import Admission
from dheera_tx.accounting.metering import JSONUsageMeter, SSEUsageMeter, Usage, cost_nanos
from dheera_tx.accounting.spend import Settlement
from dheera_tx.call import Call
from dheera_tx.config import Deployment
from dheera_tx.errors import ProxyError, bad_request

log = Logger()

# Streamed answers of these routes get stream_options.include_usage.
USAGE_INJECTABLE = frozenset([b"/v1/chat/completions", b"/v1/completions"])
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
    """
    if document is None or path not in USAGE_INJECTABLE or document.get("stream") is not True:
        return False
    options = document.get("stream_options")
    if options is None:
        return True
    if not isinstance(options, dict):
        # Malformed: vLLM answers it with its own 400, which rewriting the
        # field would hide.
        return False
    return options.get("include_usage") in (None, False)


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


def estimate_prompt_tokens(document) -> int:
    """
    :return: a rough prompt size (4 characters a token) for a call whose
        answer carried no usage.
    """
    if not isinstance(document, dict):
        return 0
    text = 0
    for field in ("messages", "prompt", "input"):
        value = document.get(field)
        if value is not None:
            text += len(str(value))
    return math.ceil(text / 4)


class CallAccounting:
    """
    Admission, metering and settlement of calls.

    :param limiter: a L{dheera_tx.accounting.limits.CallLimiter}, or L{None} (no
        Redis: nothing is limited or recorded).
    :param ledger: a L{dheera_tx.accounting.spend.SpendLedger}, or L{None}.
    :param now: epoch seconds, for settlement dates.
    """

    def __init__(self, limiter=None, ledger=None, now=None):
        self._limiter = limiter
        self._ledger = ledger
        self._now = now

    async def admit(self, principal, end_user: Optional[str], call: Call) -> Optional[Admission]:
        """
        :return: the admission to settle later, or L{None} when nothing is
            tracked.
        :raise ProxyError: over a limit or budget, end user blocked, or
            Redis unreachable for a virtual key.
        """
        if self._limiter is None:
            return None
        try:
            return await self._limiter.admit(principal, end_user, call.call_id)
        except ProxyError as e:
            if e.status == 503 and self._ledger is not None:
                # The script may have run and taken a parallel slot although
                # its reply was lost: give the slot back.
                self._ledger.release_lost_slot(self._limiter.admission_of(principal, end_user, call.call_id))
            raise

    @staticmethod
    def meter_for(content_type: bytes, status: int, strip_usage_chunk: bool):
        """
        :return: the meter for an answer, or L{None} for answers that carry
            no usage (errors, binary bodies, Prometheus text).
        """
        kind = content_type.split(b";", 1)[0].strip().lower()
        if kind == b"text/event-stream":
            return SSEUsageMeter(strip_usage_chunk)
        if status < 400 and (kind == b"application/json" or kind.endswith(b"+json")):
            return JSONUsageMeter()
        return None

    def settle(self, call: Call, admission: Optional[Admission], deployment: Optional[Deployment], meter, document) -> None:
        """
        Price the call from what its meter read and add it to the ledger.
        Never raises.
        """
        try:
            usage = self._usage(meter, document)
            if usage is not None:
                call.prompt_tokens = usage.prompt_tokens
                call.completion_tokens = usage.completion_tokens
                call.cached_tokens = usage.cached_tokens
                call.usage_estimated = usage.estimated
                if deployment is not None:
                    call.cost_nanos = cost_nanos(usage, *deployment.prices_for(call.model_name))
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
    def _usage(meter, document) -> Optional[Usage]:
        if meter is None:
            return None
        usage = meter.usage()
        if usage is not None:
            return usage
        estimate = meter.estimate()
        if estimate is not None and estimate.completion_tokens:
            return Usage(estimate_prompt_tokens(document), estimate.completion_tokens, estimated=True)
        return None
