"""
The time limits of relayed answers, checked by one timer.

Every relayed answer has two limits: the whole call must end within its
deployment's C{timeout}, and the upstream may fall silent for at most
C{stream_timeout}.  A pair of DelayedCalls per call, one of them reset on
every chunk, cost more than the relay of a small answer; L{RelayWatch}
keeps the relays in a set instead and looks at them a few times per
shortest limit, so a limit is enforced at most one tick late (a tick is an
eighth of the shortest limit being watched, between 10 ms and 0.5 s).
"""

from typing import Set


class RelayWatch:
    """
    Watches relays for their call deadline and their silence limit.

    :param reactor: an C{IReactorTime}.
    """

    MAX_TICK = 0.5
    MIN_TICK = 0.01

    def __init__(self, reactor):
        self._reactor = reactor
        self._relays: Set = set()
        self._timer = None
        self._tick = self.MAX_TICK

    def watch(self, relay) -> None:
        """
        Start watching C{relay}: it has C{deadline} (reactor time),
        C{last_heard} (reactor time), C{stream_timeout} (seconds) and
        C{timed_out(kind)}.
        """
        self._relays.add(relay)
        shortest = min(relay.stream_timeout, max(relay.deadline - self._reactor.seconds(), 0.0))
        tick = min(self.MAX_TICK, max(shortest / 8, self.MIN_TICK))
        if tick < self._tick:
            self._tick = tick
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
        if self._timer is None:
            self._timer = self._reactor.callLater(self._tick, self._check)

    def forget(self, relay) -> None:
        """
        Stop watching C{relay}.
        """
        self._relays.discard(relay)
        if not self._relays and self._timer is not None:
            # Nothing left to watch: no timer outlives the last relay.
            self._timer.cancel()
            self._timer = None
            self._tick = self.MAX_TICK

    def _check(self) -> None:
        self._timer = None
        now = self._reactor.seconds()
        late = []
        for relay in self._relays:
            if now >= relay.deadline:
                late.append((relay, "upstream_timeout"))
            elif now - relay.last_heard >= relay.stream_timeout:
                late.append((relay, "stream_timeout"))
        for relay, kind in late:
            self._relays.discard(relay)
            relay.timed_out(kind)
        if self._relays:
            self._timer = self._reactor.callLater(self._tick, self._check)
        else:
            self._tick = self.MAX_TICK

    def stop(self) -> None:
        """
        Cancel the timer (shutting down).
        """
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
