"""
Tests for how the twistd service waits on a shutdown step's result.
"""

from twisted.internet.defer import Deferred
from twisted.trial import unittest

from dheera_tx.tap import _as_deferred


class ShutdownStepResultTests(unittest.TestCase):
    """
    L{dheera_tx.tap._as_deferred} turns what a component's C{stop()} or
    C{close()} returns into a L{Deferred} the shutdown waits on.
    """

    def test_coroutine_is_run(self):
        """
        An C{async def stop()} (its coroutine) is run to its end, and the
        Deferred fires with its result only then; before, the coroutine was
        handed back unawaited and the stop never ran.
        """
        ran = []
        gate: Deferred = Deferred()

        async def stop():
            await gate
            ran.append(True)
            return "stopped"

        d = _as_deferred(stop())
        self.assertNoResult(d)
        gate.callback(None)
        self.assertEqual(self.successResultOf(d), "stopped")
        self.assertEqual(ran, [True])

    def test_deferred_and_plain_values(self):
        """
        A Deferred is waited on, and a plain value (or L{None}) is the
        result at once.
        """
        pending: Deferred = Deferred()
        d = _as_deferred(pending)
        self.assertNoResult(d)
        pending.callback(7)
        self.assertEqual(self.successResultOf(d), 7)
        self.assertIsNone(self.successResultOf(_as_deferred(None)))
