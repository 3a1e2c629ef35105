"""
vLLM's queue-cap refusals, told apart from every other answer.

A vLLM server started with C{--max-num-queued-reqs} or
C{--max-num-queued-tokens} refuses a call it cannot queue before any of it
starts (its C{check_admission} runs before a streamed answer begins): HTTP
503, C{Content-Type: application/json}, a Content-Length, and
C{{"error":{"message":...,"type":"Service Unavailable","param":null,"code":503}}}
(C{QueueOverflowError} or C{MaxQueuedTokensError}, vLLM's
C{GracefulHTTPError}s, whose type is C{HTTPStatus(503).phrase}).  The call
never started there, so the data plane may send it to another replica
(L{dheera_tx.forwarding}).

Why the body is read and not the status alone: other 503s mean other
things.  vLLM's C{RetryableRequestError} (type C{ServiceUnavailableError})
comes from a call that had started (a KV-cache transfer failed); a proxy
or load balancer in front of vLLM answers 503 in HTML; a server shutting
down may too.  Only the GracefulHTTPError shape says the call was not
admitted; in vLLM 0.32 only the two queue caps raise it with 503.  So an
answer is looked at only when it can be that refusal (L{may_be_refusal}:
503, JSON, a Content-Length of at most L{REFUSAL_LIMIT} bytes: no other
answer costs anything), then read whole (L{read_body}; being complete, its
connection goes back to the pool as any finished answer's does) and
judged (L{refusal_reason}).  Whatever the verdict, the bytes read are
still the client's to get: L{held} makes a response that delivers them.
"""

import json
from typing import List, Optional

from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

from dheera_tx.upstream.response import UpstreamResponse

#: The largest answer looked at (vLLM's refusal is under 200 bytes).
REFUSAL_LIMIT = 4096

# vLLM's error type for a GracefulHTTPError answered with 503.
_GRACEFUL_503 = "Service Unavailable"


def may_be_refusal(response: UpstreamResponse) -> bool:
    """
    :return: whether C{response} can be vLLM's queue-cap refusal: 503, a
        JSON body of a declared length up to L{REFUSAL_LIMIT}.
    """
    if response.code != 503 or response.length is None or not 0 < response.length <= REFUSAL_LIMIT:
        return False
    for name, value in response.headers:
        if name.lower() == b"content-type":
            return value.lower().startswith(b"application/json")
    return False


def refusal_reason(body: bytes) -> Optional[str]:
    """
    :return: vLLM's reason (the C{reason} label of its
        C{vllm:admission_rejections}: C{max_num_queued_reqs} or
        C{max_num_queued_tokens}) when C{body} is its queue-cap refusal,
        else L{None}.
    """
    try:
        document = json.loads(body)
    except ValueError:
        return None
    error = document.get("error") if isinstance(document, dict) else None
    if not isinstance(error, dict) or error.get("type") != _GRACEFUL_503:
        return None
    message = error.get("message")
    if isinstance(message, str) and "token" in message:
        return "max_num_queued_tokens"
    return "max_num_queued_reqs"


class _Collector:
    """
    A sink gathering a small body whole.
    """

    __slots__ = ("parts", "done")

    def __init__(self, done: Deferred):
        self.parts: List[bytes] = []
        self.done = done

    def data_received(self, data: bytes) -> None:
        self.parts.append(data)

    def body_ended(self, reason: Optional[Failure]) -> None:
        if self.done.called:
            # Cancelled: the abort that followed ends here.
            return
        if reason is None:
            self.done.callback(b"".join(self.parts))
        else:
            self.done.errback(reason)


def read_body(reactor, response: UpstreamResponse, timeout: float) -> "Deferred[bytes]":
    """
    Read the whole body of a small answer.

    :param timeout: seconds the body may take; then its connection is
        aborted and the Deferred fails.
    :return: a Deferred firing with the body, failing (with a
        L{Failure} of the connection's loss) if the body does not end
        complete; cancelling it aborts the connection.
    """
    done: Deferred[bytes] = Deferred(lambda d: response.stopProducing())
    timer = reactor.callLater(timeout, response.stopProducing)

    def over(result):
        if timer.active():
            timer.cancel()
        return result

    done.addBoth(over)
    response.deliver(_Collector(done))
    return done


def held(response: UpstreamResponse, body: bytes) -> UpstreamResponse:
    """
    :return: a response with C{response}'s head that delivers C{body}, read
        already, then ends.
    """
    copy = UpstreamResponse(
        None, response.code, response.phrase, response.version, response.headers, response.length, response.head_bytes
    )
    copy._hold(body)
    copy._end(None)
    return copy
