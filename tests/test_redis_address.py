"""
Tests for L{dheera_tx.redis.address}'s command encoding: L{FastCommands}
builds exactly the bytes txredisapi would, faster.  (Addresses and URLs
are tested through the key store and process tests.)
"""

import txredisapi
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from dheera_tx.redis.address import FastCommands, QuickReconnectFactory, QuickReconnectSentinelFactory

_ARGUMENTS = st.lists(
    st.one_of(
        st.text(),
        st.binary(),
        st.integers(min_value=-(2**70), max_value=2**70),
        st.floats(allow_nan=False, allow_infinity=False),
        st.booleans(),
        st.none(),
    ),
    min_size=1,
    max_size=40,
)


class FastCommandsTests(SynchronousTestCase):
    """
    L{FastCommands._build_command} against txredisapi's own.
    """

    def setUp(self):
        self.fast = QuickReconnectFactory.protocol(charset="utf-8")
        self.stock = txredisapi.RedisProtocol(charset="utf-8")

    @settings(max_examples=300, deadline=None)
    @given(_ARGUMENTS)
    def test_same_bytes_as_txredisapi(self, arguments):
        """
        For any mix of text (any Unicode), bytes, integers (beyond 64
        bits), floats, booleans and None, the command bytes are identical.
        """
        self.assertEqual(self.fast._build_command(*arguments), self.stock._build_command(*arguments))

    def test_evalsha_batch(self):
        """
        A typical admission batch (script sha, key count, key names, numbers)
        encodes to the RESP array txredisapi writes.
        """
        arguments = ["EVALSHA", "a" * 40, 2, "dheera:rl:k1", "dheera:rl:ké", 1764110000, 100, "12"]
        expected = b"*8\r\n$7\r\nEVALSHA\r\n$40\r\n" + b"a" * 40 + b"\r\n$1\r\n2\r\n$12\r\ndheera:rl:k1\r\n"
        expected += b"$13\r\ndheera:rl:k\xc3\xa9\r\n$10\r\n1764110000\r\n$3\r\n100\r\n$2\r\n12\r\n"
        self.assertEqual(self.fast._build_command(*arguments), expected)

    def test_unencodable_text_fails_as_before(self):
        """
        Text that cannot be encoded (a lone surrogate, which JSON can carry
        in a user id) fails with txredisapi's InvalidData, as it did.
        """
        for protocol in (self.fast, self.stock):
            self.assertRaises(txredisapi.InvalidData, protocol._build_command, "HGETALL", "user:\ud800")

    def test_factories_use_it(self):
        """
        Both the plain and the Sentinel connection factories build protocols
        with the fast encoder.
        """
        for factory in (QuickReconnectFactory, QuickReconnectSentinelFactory):
            self.assertTrue(issubclass(factory.protocol, FastCommands), factory)
