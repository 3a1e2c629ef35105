"""
WebSocket (RFC 6455) as the proxy sees it: the upgrade handshake's headers,
and a reader of the frames it relays.

The proxy relays a WebSocket's bytes unchanged in both directions; it only
reads them to log and bill the session: L{FrameReader} follows the frames
of one direction, unmasks what it needs, hands complete text messages (up to
a size limit) to a callback, and remembers the close code.  Large binary
frames (audio) are skipped over without being kept.
"""

import base64
import hashlib
import struct
from typing import Callable, List, Optional, Tuple

#: The GUID of the handshake (RFC 6455 section 1.3).
_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
#: Text messages larger than this are not handed to the reader's callback
#: (they are relayed, not read).
MAX_TEXT_MESSAGE = 1024 * 1024

OP_CONTINUATION, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0, 1, 2, 8, 9, 10
#: The subprotocol prefix under which OpenAI's browser client sends the key
#: (browsers cannot set an Authorization header on a WebSocket).
KEY_SUBPROTOCOL = "openai-insecure-api-key."


def is_websocket_upgrade(headers) -> bool:
    """
    :param headers: the request's L{twisted.web.http_headers.Headers}.
    :return: whether the request asks to upgrade to a WebSocket.
    """
    upgrade = headers.getRawHeaders(b"upgrade") or []
    connection = b",".join(headers.getRawHeaders(b"connection") or [])
    tokens = {token.strip().lower() for token in connection.split(b",")}
    return any(value.strip().lower() == b"websocket" for value in upgrade) and b"upgrade" in tokens


def accept_value(key: bytes) -> bytes:
    """
    :return: the C{Sec-WebSocket-Accept} answering C{Sec-WebSocket-Key}
        C{key}.
    """
    return base64.b64encode(hashlib.sha1(key.strip() + _GUID).digest())


def subprotocol_key(headers) -> Tuple[Optional[str], List[bytes]]:
    """
    Find a key carried as a subprotocol (C{openai-insecure-api-key.<key>}).

    :return: C{(key or None, the other subprotocols)}: the key's entry is
        never sent upstream.
    """
    key = None
    others = []
    for value in headers.getRawHeaders(b"sec-websocket-protocol") or []:
        for item in value.split(b","):
            item = item.strip()
            if not item:
                continue
            text = item.decode("latin-1")
            if text.startswith(KEY_SUBPROTOCOL) and len(text) > len(KEY_SUBPROTOCOL):
                key = key or text[len(KEY_SUBPROTOCOL) :]
            else:
                others.append(item)
    return key, others


def frame(opcode: int, payload: bytes, mask: Optional[bytes] = None, fin: bool = True) -> bytes:
    """
    :return: one frame (masked with C{mask} when given, as a client sends).
    """
    head = bytes([(0x80 if fin else 0) | opcode])
    length = len(payload)
    bit = 0x80 if mask else 0
    if length < 126:
        head += bytes([bit | length])
    elif length < 65536:
        head += bytes([bit | 126]) + struct.pack("!H", length)
    else:
        head += bytes([bit | 127]) + struct.pack("!Q", length)
    if mask:
        return head + mask + _unmask(payload, mask, 0)
    return head + payload


def _unmask(data: bytes, mask: bytes, offset: int) -> bytes:
    if not data:
        return data
    # One XOR of big integers instead of a loop over bytes.
    rotated = mask[offset % 4 :] + mask[: offset % 4]
    key = (rotated * (len(data) // 4 + 1))[: len(data)]
    return (int.from_bytes(data, "big") ^ int.from_bytes(key, "big")).to_bytes(len(data), "big")


class ProtocolViolation(Exception):
    """
    The bytes are not WebSocket frames (reserved bits, unknown opcode,
    oversized control frame, 64-bit length with the top bit set).
    """


class FrameReader:
    """
    Follows the frames of one direction of a WebSocket.

    :param on_text: called with each complete text message (bytes, UTF-8 as
        sent) of at most C{max_text} bytes.
    :ivar close_code: the status code of the close frame seen, if any
        (1005 when it carried none).
    :ivar messages: data messages seen (text and binary).
    """

    def __init__(self, on_text: Optional[Callable[[bytes], None]] = None, max_text: int = MAX_TEXT_MESSAGE):
        self._on_text = on_text
        self._max_text = max_text
        self._buffer = b""
        # The frame being read: its opcode, mask, bytes left and read.
        self._opcode: Optional[int] = None
        self._mask: Optional[bytes] = None
        self._left = 0
        self._offset = 0
        self._keep = False
        self._fin = True
        self._payload: List[bytes] = []
        # The message being assembled from frames.
        self._message_opcode: Optional[int] = None
        self._message: Optional[List[bytes]] = []
        self._message_size = 0
        self.close_code: Optional[int] = None
        self.messages = 0

    def feed(self, data: bytes) -> None:
        """
        Read C{data}, the next bytes of this direction.

        :raise ProtocolViolation: the bytes are not frames.
        """
        while data:
            if self._opcode is None:
                self._buffer += data
                data = b""
                if not self._read_head():
                    return
                data, self._buffer = self._buffer, b""
                if self._left == 0:
                    self._frame_done()
                continue
            piece, data = data[: self._left], data[self._left :]
            if self._keep:
                self._payload.append(_unmask(piece, self._mask, self._offset) if self._mask else piece)
            self._offset += len(piece)
            self._left -= len(piece)
            if self._left == 0:
                self._frame_done()

    def _read_head(self) -> bool:
        buffer = self._buffer
        if len(buffer) < 2:
            return False
        first, second = buffer[0], buffer[1]
        if first & 0x70:
            raise ProtocolViolation("reserved bits set (no extension was negotiated)")
        opcode = first & 0x0F
        if opcode not in (OP_CONTINUATION, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG):
            raise ProtocolViolation(f"unknown opcode {opcode}")
        length = second & 0x7F
        at = 2
        if length == 126:
            if len(buffer) < 4:
                return False
            length = struct.unpack_from("!H", buffer, 2)[0]
            at = 4
        elif length == 127:
            if len(buffer) < 10:
                return False
            length = struct.unpack_from("!Q", buffer, 2)[0]
            if length >> 63:
                raise ProtocolViolation("frame length with the top bit set")
            at = 10
        if opcode >= OP_CLOSE and (length > 125 or not first & 0x80):
            raise ProtocolViolation("control frames are short and not fragmented")
        mask = None
        if second & 0x80:
            if len(buffer) < at + 4:
                return False
            mask = buffer[at : at + 4]
            at += 4
        self._buffer = buffer[at:]
        self._opcode, self._mask, self._left, self._offset = opcode, mask, length, 0
        self._fin = bool(first & 0x80)
        self._payload = []
        if opcode >= OP_CLOSE:
            self._keep = opcode == OP_CLOSE
        else:
            if opcode != OP_CONTINUATION:
                self._message_opcode, self._message, self._message_size = opcode, [], 0
            self._keep = (
                self._message_opcode == OP_TEXT
                and self._message is not None
                and self._message_size + length <= self._max_text
            )
        return True

    def _frame_done(self) -> None:
        opcode, payload = self._opcode, b"".join(self._payload)
        self._opcode, self._payload = None, []
        assert opcode is not None
        if opcode == OP_CLOSE:
            self.close_code = struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else 1005
            return
        if opcode >= OP_CLOSE:
            return
        self._message_size += self._offset
        if self._keep and self._message is not None:
            self._message.append(payload)
        else:
            self._message = None
        if self._fin:
            self.messages += 1
            if self._message_opcode == OP_TEXT and self._message is not None and self._on_text is not None:
                self._on_text(b"".join(self._message))
            self._message_opcode, self._message, self._message_size = None, [], 0
