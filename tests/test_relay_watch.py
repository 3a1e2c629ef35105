"""
Tests for L{dheera_tx.http.relay_watch}: the call deadline and the silence limit
of relayed answers, enforced by one timer.
"""

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from dheera_tx.http.relay_watch import RelayWatch


class _Relay:
    def __init__(self, clock, timeout, stream_timeout):
        self.deadline = clock.seconds() + timeout
        self.last_heard = clock.seconds()
        self.stream_timeout = stream_timeout
        self.kinds = []

    def timed_out(self, kind):
        self.kinds.append(kind)


class RelayWatchTests(SynchronousTestCase):
    """
    L{RelayWatch} on a fake clock.
    """

    def setUp(self):
        self.clock = Clock()
        self.watch = RelayWatch(self.clock)

    def test_silence(self):
        """
        An upstream silent for C{stream_timeout} is timed out as
        C{stream_timeout}, at most one tick (an eighth of the limit) late,
        and only once.
        """
        relay = _Relay(self.clock, timeout=600, stream_timeout=1.0)
        self.watch.watch(relay)
        self.clock.advance(0.9)
        self.assertEqual(relay.kinds, [])
        for _ in range(3):
            self.clock.advance(0.125)
        self.assertEqual(relay.kinds, ["stream_timeout"])
        self.clock.advance(5)
        self.assertEqual(relay.kinds, ["stream_timeout"])

    def test_activity_postpones_silence(self):
        """
        Each chunk heard restarts the silence limit: a relay that hears
        something every 0.8 s with a 1 s limit is never timed out.
        """
        relay = _Relay(self.clock, timeout=600, stream_timeout=1.0)
        self.watch.watch(relay)
        for _ in range(20):
            self.clock.advance(0.8)
            relay.last_heard = self.clock.seconds()
        self.assertEqual(relay.kinds, [])

    def test_deadline(self):
        """
        A call past its deadline is timed out as C{upstream_timeout} even
        while chunks keep arriving.
        """
        relay = _Relay(self.clock, timeout=2.0, stream_timeout=60)
        self.watch.watch(relay)
        for _ in range(9):
            self.clock.advance(0.25)
            relay.last_heard = self.clock.seconds()
        self.assertEqual(relay.kinds, ["upstream_timeout"])

    def test_no_timer_after_the_last_relay(self):
        """
        Once the last relay is forgotten no call is pending, and a later
        relay gets a timer again.
        """
        relay = _Relay(self.clock, timeout=600, stream_timeout=60)
        self.watch.watch(relay)
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)
        self.watch.forget(relay)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        other = _Relay(self.clock, timeout=600, stream_timeout=0.4)
        self.watch.watch(other)
        self.clock.advance(0.5)
        self.assertEqual(other.kinds, ["stream_timeout"])
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_shortest_limit_sets_the_tick(self):
        """
        A relay with a short limit among relays with long ones is timed out
        within an eighth of its own limit, not the long ones' tick.
        """
        slow = _Relay(self.clock, timeout=600, stream_timeout=60)
        self.watch.watch(slow)
        quick = _Relay(self.clock, timeout=600, stream_timeout=0.2)
        self.watch.watch(quick)
        self.clock.advance(0.2)
        self.clock.advance(0.025)
        self.assertEqual(quick.kinds, ["stream_timeout"])
        self.assertEqual(slow.kinds, [])
