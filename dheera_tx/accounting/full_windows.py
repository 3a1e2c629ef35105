"""
Keys known to be over their rpm or tpm limit, refused before their body.

Admission runs after a JSON body is read (the end user may be named in
it), so a key over its rate limit would still have every body read and
parsed.  When Redis answers that a key's requests-per-minute or
tokens-per-minute window is full, it also says when the window reopens;
L{FullWindows} remembers that in this process, and until then that key's
calls are refused (429 with C{Retry-After}) as soon as it is
authenticated, with no Redis round trip and no body read.

A memo holds only for the very key record it was made for: an edit of the
key (a raised limit, say) invalidates the record in the key cache, the
next lookup returns a new record, and the memo no longer applies.
"""

from typing import Dict, Tuple

from dheera_tx.errors import ProxyError


class WindowFull(ProxyError):
    """
    429: a key's rpm or tpm window is full for C{retry_ms} more
    milliseconds (raised by admission; see
    L{dheera_tx.accounting.limits.CallLimiter}).
    """

    def __init__(self, message: str, retry_ms: int):
        super().__init__(
            429,
            message,
            type="rate_limit_error",
            code="429",
            headers={"Retry-After": str(max(1, -(-retry_ms // 1000)))},
        )
        self.retry_ms = retry_ms


class FullWindows:
    """
    The keys whose rate window was last seen full, until it reopens.

    :param clock: gives C{seconds()}.
    :param max_entries: the most keys remembered (oldest dropped first).
    """

    def __init__(self, clock, max_entries: int = 10_000):
        self._clock = clock
        self._max_entries = max_entries
        self._full: Dict[str, Tuple[object, float, str]] = {}

    def remember(self, record, refusal: WindowFull) -> None:
        """
        Admission refused C{record}'s call with C{refusal}.
        """
        full = self._full
        if record.token not in full and len(full) >= self._max_entries:
            del full[next(iter(full))]
        full[record.token] = (record, self._clock.seconds() + refusal.retry_ms / 1000.0, refusal.message)

    def check(self, record) -> None:
        """
        :raise WindowFull: C{record}'s window is still full.
        """
        if not self._full:
            return
        entry = self._full.get(record.token)
        if entry is None:
            return
        remembered, until, message = entry
        left = until - self._clock.seconds()
        if remembered is not record or left <= 0:
            del self._full[record.token]
            return
        raise WindowFull(message, int(left * 1000) + 1)
