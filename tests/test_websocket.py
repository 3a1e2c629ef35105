"""
The WebSocket pieces the proxy uses to relay and account a session:
handshake helpers and L{dheera_tx.http.websocket.FrameReader}.
"""

import json
import os

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.http_headers import Headers

from dheera_tx.http.websocket import (
    OP_BINARY,
    OP_CLOSE,
    OP_CONTINUATION,
    OP_PING,
    OP_TEXT,
    FrameReader,
    ProtocolViolation,
    accept_value,
    frame,
    is_websocket_upgrade,
    subprotocol_key,
)


def _headers(**values) -> Headers:
    headers = Headers()
    for name, value in values.items():
        headers.addRawHeader(name.replace("_", "-").encode(), value.encode())
    return headers


class HandshakeTests(SynchronousTestCase):
    """
    Reading the upgrade request.
    """

    def test_accept_value(self):
        """
        The accept value is RFC 6455's example answer for its example key.
        """
        self.assertEqual(accept_value(b"dGhlIHNhbXBsZSBub25jZQ=="), b"s3pPLMBiTxaQ9kYGzzhZRbK+xOo=")

    def test_is_upgrade(self):
        """
        An upgrade needs C{Upgrade: websocket} and an C{upgrade} token in
        C{Connection}, in any case and among other tokens.
        """
        self.assertTrue(is_websocket_upgrade(_headers(upgrade="WebSocket", connection="keep-alive, Upgrade")))
        self.assertFalse(is_websocket_upgrade(_headers(upgrade="websocket")))
        self.assertFalse(is_websocket_upgrade(_headers(upgrade="h2c", connection="upgrade")))

    def test_subprotocol_key(self):
        """
        A key carried as C{openai-insecure-api-key.<key>} is found and left
        out of the subprotocols sent on.
        """
        key, others = subprotocol_key(_headers(sec_websocket_protocol="realtime, openai-insecure-api-key.sk-abc, openai-beta.realtime-v1"))
        self.assertEqual(key, "sk-abc")
        self.assertEqual(others, [b"realtime", b"openai-beta.realtime-v1"])
        self.assertEqual(subprotocol_key(_headers()), (None, []))


class FrameReaderTests(SynchronousTestCase):
    """
    Following the frames of one direction.
    """

    def read(self, data: bytes, chunk: int = 0, max_text: int = 1024):
        texts = []
        reader = FrameReader(texts.append, max_text=max_text)
        if chunk:
            for i in range(0, len(data), chunk):
                reader.feed(data[i : i + chunk])
        else:
            reader.feed(data)
        return reader, texts

    def test_texts_masked_and_fragmented(self):
        """
        Masked and unmasked text messages, one fragmented over three frames
        with a ping between, come out whole; binary messages are counted,
        not handed over; the close code is kept.
        """
        mask = os.urandom(4)
        data = (
            frame(OP_TEXT, b'{"a":1}', mask)
            + frame(OP_BINARY, b"\x00" * 70000)
            + frame(OP_TEXT, b"hel", fin=False)
            + frame(OP_PING, b"x")
            + frame(OP_CONTINUATION, b"lo ", mask, fin=False)
            + frame(OP_CONTINUATION, b"world")
            + frame(OP_CLOSE, b"\x03\xe8bye", mask)
        )
        for chunk in (0, 1, 3, 1000):
            reader, texts = self.read(data, chunk)
            self.assertEqual(texts, [b'{"a":1}', b"hello world"])
            self.assertEqual((reader.messages, reader.close_code), (3, 1000))

    def test_large_text_skipped(self):
        """
        A text message over the limit is relayed but not handed over, and
        the messages after it are read again.
        """
        data = frame(OP_TEXT, b"x" * 2000) + frame(OP_TEXT, b"y" * 600, fin=False) + frame(OP_CONTINUATION, b"y" * 600) + frame(OP_TEXT, b"ok")
        reader, texts = self.read(data, 7)
        self.assertEqual(texts, [b"ok"])
        self.assertEqual(reader.messages, 3)

    def test_close_without_code(self):
        """
        A close frame without a status is code 1005 (RFC 6455 7.1.5).
        """
        reader, _ = self.read(frame(OP_CLOSE, b""))
        self.assertEqual(reader.close_code, 1005)

    def test_violations(self):
        """
        Reserved bits, unknown opcodes and long or fragmented control
        frames are refused.
        """
        for data in (b"\xc1\x00", b"\x83\x00", frame(OP_PING, b"x" * 126), frame(OP_PING, b"x", fin=False)):
            with self.assertRaises(ProtocolViolation):
                FrameReader().feed(data)

    @settings(max_examples=200, deadline=None)
    @given(
        st.lists(st.tuples(st.booleans(), st.text(max_size=300)), min_size=1, max_size=8),
        st.integers(min_value=1, max_value=50),
        st.booleans(),
    )
    def test_any_chunking(self, messages, chunk, masked):
        """
        Whatever the messages and however the bytes are split, the reader
        hands over exactly the text messages sent, in order.
        """
        data = b""
        expected = []
        for as_text, text in messages:
            payload = json.dumps(text).encode()
            mask = os.urandom(4) if masked else None
            data += frame(OP_TEXT if as_text else OP_BINARY, payload, mask)
            if as_text:
                expected.append(payload)
        _, texts = self.read(data, chunk, max_text=10**6)
        self.assertEqual(texts, expected)
