"""
Sleep awareness: which replicas are asleep, and vLLM's operator calls that
put them to sleep or wake them.

vLLM (with C{VLLM_SERVER_DEV_MODE=1}) sleeps on C{POST /sleep?level=N} and
wakes on C{POST /wake_up}; a chat call sent to a sleeping server blocks
until it is woken.  So a sleeping replica gets no calls: the router leaves
it out, and when every replica of a model is asleep the calls wait in the
gateway queue (L{dheera_tx.routing.flow}) under the usual bounds.

Two sources say a replica sleeps, and L{SleepMark} and L{is_asleep} combine
them:

  - vLLM's own gauge C{vllm:engine_sleep_state{sleep_state="awake"}} (0 while
    asleep, at any level), read from each scrape
    (L{dheera_tx.routing.signals.LoadSample.asleep});
  - the proxy's own successful (2xx) operator calls through C{/vllm}: a
    C{/sleep} marks the replica asleep at once, a C{/wake_up} without
    C{tags} marks it awake at once, before the next scrape.  A C{/wake_up}
    with C{tags} (C{weights}, C{kv_cache}, C{scheduling}) may leave it only
    partly awake (vLLM resumes scheduling only once every allocation is
    back): it marks the replica asleep, and vLLM's gauge says when it is
    fully awake.

The rules: a mark holds until a sample I{requested after it} reports the
sleep state (taken more than one C{metrics_interval} after the mark: a
scrape is cancelled after half an interval), which then replaces it: vLLM's
word is the newer.  Without a mark, a I{fresh} sample's gauge decides; a
stale sample (or a failed scrape) judges nothing, so a replica whose
samples stop is not kept asleep by its last one (a dead replica is the
health checks' and the cooldown's business).  A server that does not export
the gauge is asleep only by a mark, until the proxy's own C{/wake_up}.

The operator calls themselves are routed by what they do: C{/wake_up}
prefers a sleeping replica, C{/sleep} an awake one (so that repeated calls
put a model's replicas to sleep, or wake them, one by one), C{/is_sleeping}
any; none of them waits in the gateway queue or is kept from a sleeping
replica.
"""

from typing import Optional
from urllib.parse import parse_qs

import attr

from dheera_tx.routing.signals import LoadSample

#: The operator calls that change or read a replica's sleep (L{sleep_operation}).
SLEEP = "sleep"
WAKE_UP = "wake_up"
PARTIAL_WAKE_UP = "wake_up_partial"
IS_SLEEPING = "is_sleeping"


def sleep_operation(method: bytes, path: bytes, query: bytes) -> Optional[str]:
    """
    :param path: the raw upstream path, without the query.
    :param query: the raw query, with its C{?} or empty.
    :return: which sleep operation a call is, or L{None} for any other call.
    """
    if path == b"/sleep":
        return SLEEP if method == b"POST" else None
    if path == b"/wake_up":
        if method != b"POST":
            return None
        fields = parse_qs(query[1:].decode("latin-1"), keep_blank_values=True)
        return PARTIAL_WAKE_UP if "tags" in fields else WAKE_UP
    if path == b"/is_sleeping":
        return IS_SLEEPING
    return None


@attr.s(frozen=True, slots=True, auto_attribs=True)
class SleepMark:
    """
    What the proxy's own operator call left a replica as.

    :ivar asleep: asleep (after C{/sleep} or a partial C{/wake_up}) or awake.
    :ivar at: when the call was answered (reactor seconds).
    """

    asleep: bool
    at: float

    def superseded_by(self, sample: LoadSample, interval: float) -> bool:
        """
        :return: whether C{sample} replaces the mark: it reports the sleep
            state and was requested after the mark was made.
        """
        return sample.asleep is not None and sample.taken_at > self.at + interval

    def shown(self, now: float) -> dict:
        """
        :return: the mark as C{/health} shows it.
        """
        return {"asleep": self.asleep, "age_s": round(max(0.0, now - self.at), 3)}


def mark_after(operation: str, status: int, at: float) -> Optional[SleepMark]:
    """
    :param operation: a L{sleep_operation}.
    :param status: the replica's answer's status.
    :return: the mark the answer leaves, or L{None} when it changes nothing.
    """
    if not 200 <= status < 300:
        return None
    if operation == SLEEP or operation == PARTIAL_WAKE_UP:
        return SleepMark(True, at)
    if operation == WAKE_UP:
        return SleepMark(False, at)
    return None


def is_asleep(mark: Optional[SleepMark], fresh: Optional[LoadSample]) -> bool:
    """
    :param mark: the replica's mark (already dropped when a newer sample
        superseded it), or L{None}.
    :param fresh: the replica's sample if fresh, else L{None}.
    :return: whether the replica is asleep.
    """
    if mark is not None:
        return mark.asleep
    return fresh is not None and fresh.asleep is True
