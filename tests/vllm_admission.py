"""
vLLM's own admission control, for the test doubles (L{tests.fake_vllm},
L{tests.sim_vllm}): a server started with C{--max-num-queued-reqs} or
C{--max-num-queued-tokens} refuses a call it cannot queue, before any of
it starts, with HTTP 503.

What vLLM 0.32 does (C{vllm/v1/engine/async_llm.py} C{check_admission},
C{vllm/exceptions.py} C{QueueOverflowError} and C{MaxQueuedTokensError},
both C{GracefulHTTPError}s, turned into an answer by
C{vllm/entrypoints/serve/exception_handling}):

  - C{max_num_queued_reqs}: refused when the unfinished requests (waiting
    and running) plus the call's C{n} would exceed the cap (0 refuses
    every call);
  - C{max_num_queued_tokens}: refused when the prompt tokens of the
    requests still in prefill already reach the cap (the call's own prompt
    is not counted);
  - the answer: C{503}, C{Content-Type: application/json}, a
    Content-Length, no C{Retry-After}, and the body
    C{{"error":{"message":...,"type":"Service Unavailable","param":null,"code":503}}}
    (the type is C{HTTPStatus(503).phrase}, compact JSON as Starlette's
    C{JSONResponse} writes it);
  - the check runs before a streamed answer starts (C{_preflight}), so a
    call with C{stream: true} gets the same JSON 503, never an SSE stream;
  - C{/metrics} counts the refusals in
    C{vllm:admission_rejections_total{model_name,reason}} (no C{engine}
    label), both reasons exported from start-up at 0
    (C{vllm/v1/metrics/loggers.py}).
"""

import json
from typing import Dict, List, Optional

#: vLLM's reasons, as the C{reason} label of C{vllm:admission_rejections}.
REASONS = ("max_num_queued_reqs", "max_num_queued_tokens")

MESSAGES = {
    "max_num_queued_reqs": "The engine is currently busy and cannot accept new requests. "
    "Please try again later or on a different instance.",
    "max_num_queued_tokens": "The engine has reached its prefill token backlog limit. "
    "Please try again later or on a different instance.",
}


def refusal_body(reason: str) -> bytes:
    """
    :param reason: one of L{REASONS}.
    :return: vLLM's 503 answer body for that refusal, byte for byte.
    """
    error = {"message": MESSAGES[reason], "type": "Service Unavailable", "param": None, "code": 503}
    return json.dumps({"error": error}, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


class AdmissionControl:
    """
    One server's queue caps and its refusal counters.

    :param max_num_queued_reqs: vLLM's C{--max-num-queued-reqs}, or L{None}.
    :param max_num_queued_tokens: vLLM's C{--max-num-queued-tokens}, or
        L{None}.
    :ivar rejections: refusals so far, by reason.
    """

    def __init__(self, max_num_queued_reqs: Optional[int] = None, max_num_queued_tokens: Optional[int] = None):
        self.max_num_queued_reqs = max_num_queued_reqs
        self.max_num_queued_tokens = max_num_queued_tokens
        self.rejections: Dict[str, int] = {reason: 0 for reason in REASONS}

    @property
    def capped(self) -> bool:
        """
        :return: whether either cap is set.
        """
        return self.max_num_queued_reqs is not None or self.max_num_queued_tokens is not None

    def check(self, unfinished: int, queued_tokens: int, n: int = 1) -> Optional[str]:
        """
        Decide on one call, as vLLM's C{check_admission} does.

        :param unfinished: the server's requests waiting or running.
        :param queued_tokens: the prompt tokens of its requests in prefill.
        :param n: the sequences the call asks for (its C{n}).
        :return: the reason it is refused (counted), or L{None}.
        """
        reason = None
        if self.max_num_queued_reqs is not None and unfinished + n > self.max_num_queued_reqs:
            reason = "max_num_queued_reqs"
        elif self.max_num_queued_tokens is not None and queued_tokens >= self.max_num_queued_tokens:
            reason = "max_num_queued_tokens"
        if reason is not None:
            self.rejections[reason] += 1
        return reason

    def metrics_lines(self, model: str) -> List[str]:
        """
        :return: C{vllm:admission_rejections_total} in Prometheus text,
            both reasons.
        """
        name = "vllm:admission_rejections"
        lines = [
            f"# HELP {name}_total Number of admission attempts rejected by a queue limit, by reason.",
            f"# TYPE {name}_total counter",
        ]
        for reason in REASONS:
            lines.append(f'{name}_total{{model_name="{model}",reason="{reason}"}} {float(self.rejections[reason])}')
        return lines


def requested_sequences(payload) -> int:
    """
    :return: the sequences a call asks for: its C{n} (chat and
        completions), else 1.
    """
    n = payload.get("n") if isinstance(payload, dict) else None
    return n if isinstance(n, int) and not isinstance(n, bool) and n > 0 else 1
