"""
One proxied call, as it is logged, metered and billed.

A L{Call} is filled in as the call goes (auth, routing, upstream answer,
stream end) and handed to the log sinks and the spend ledger when it ends,
whatever way it ends.
"""

import itertools
import os
from typing import Any, Dict, Optional

import attr

_ids: Dict[str, Any] = {"prefix": "", "counter": None}


def _fresh_ids() -> None:
    """
    Draw this process's call id prefix and counter start.
    """
    _ids["prefix"] = os.urandom(8).hex()
    _ids["counter"] = itertools.count(int.from_bytes(os.urandom(4), "big"))


_fresh_ids()
# A forked child (a worker) must not repeat its parent's ids.
os.register_at_fork(after_in_child=_fresh_ids)


def new_call_id() -> str:
    """
    :return: a fresh call id (also sent as C{x-dheera-call-id}): 32 hex
        digits, 64 random bits drawn once per process and a 64-bit counter,
        unique across processes without a system call per call.
    """
    return "%s%016x" % (_ids["prefix"], next(_ids["counter"]))


@attr.s(slots=True, auto_attribs=True)
class Call:
    """
    The record of one call through the proxy.  Times are reactor seconds.
    """

    call_id: str
    method: str
    path: str
    started_at: float
    model_name: Optional[str] = None
    deployment: Optional[str] = None
    routing_reason: Optional[str] = None
    # Milliseconds the call waited in the gateway queue (flow control).
    queued_ms: float = 0.0
    # Upstream requests sent for the call: 2 when it was retried on another
    # replica (one that could not be reached, or vLLM's queue-cap refusal).
    attempts: int = 0
    api_base: Optional[str] = None
    status: Optional[int] = None
    stream: bool = False
    key_hash_prefix: Optional[str] = None
    key_alias: Optional[str] = None
    user_id: Optional[str] = None
    team_id: Optional[str] = None
    end_user: Optional[str] = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    usage_estimated: bool = False
    cost_nanos: int = 0
    upstream_sent_at: Optional[float] = None
    first_byte_at: Optional[float] = None
    ended_at: Optional[float] = None
    bytes_in: int = 0
    bytes_out: int = 0
    error: Optional[str] = None
    close_code: Optional[int] = None

    @property
    def overhead_ms(self) -> float:
        """
        :return: milliseconds spent in the proxy before the upstream request
            left.
        """
        if self.upstream_sent_at is None:
            return 0.0
        return max(0.0, (self.upstream_sent_at - self.started_at) * 1000.0)
