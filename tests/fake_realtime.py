"""
The fake vLLM's realtime endpoint: C{GET /v1/realtime?model=...} upgraded
to a WebSocket, speaking the event shapes of vLLM's realtime transcription
API.

On connect the server sends C{session.created}.  The client appends audio
(C{input_audio_buffer.append} with base64 C{audio}) and commits it
(C{input_audio_buffer.commit}); on a commit with C{final: true} the server
sends C{transcription.delta} and C{transcription.done}, whose C{usage} is
C{prompt_tokens} = audio bytes / 100 (at least 1), C{completion_tokens} 3.
A close frame is answered with a close frame of the same code.
"""

import base64
import json
from typing import Any, Optional
from urllib.parse import parse_qs, urlsplit

from dheera_tx.http.websocket import OP_CLOSE, OP_TEXT, FrameReader, accept_value, frame


class FakeRealtimeSession:
    """
    One realtime session of the fake, on a connection the fake's HTTP
    channel handed over at its first bytes.
    """

    def __init__(self, fake: Any, transport: Any) -> None:
        self.fake = fake
        self.transport = transport
        self._head = b""
        self._frames: Optional[FrameReader] = None
        self._audio = 0
        self._closing = False
        self.record = None

    def dataReceived(self, data: bytes) -> None:
        if self._frames is not None:
            self._frames.feed(data)
            self._answer_close()
            return
        self._head += data
        end = self._head.find(b"\r\n\r\n")
        if end < 0:
            return
        head, rest = self._head[:end], self._head[end + 4 :]
        self._handshake(head)
        if rest and self._frames is not None:
            self._frames.feed(rest)
            self._answer_close()

    def _handshake(self, head: bytes) -> None:
        from tests.fake_vllm import ReceivedRequest

        lines = head.split(b"\r\n")
        method, target, _ = lines[0].split(b" ", 2)
        headers: dict = {}
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            headers.setdefault(name.strip().lower().decode("latin-1"), []).append(value.strip().decode("latin-1"))
        self.record = ReceivedRequest(method=method, uri=target, headers=headers)
        self.record.body_done = True
        self.fake._add_record(self.record)
        self.fake.realtime_sessions += 1
        model = parse_qs(urlsplit(target.decode("latin-1")).query).get("model", [None])[0]
        if self.fake.api_key and headers.get("authorization", [""])[-1] != f"Bearer {self.fake.api_key}":
            return self._refuse(401, "Unauthorized", "Unauthorized")
        if model not in (None, self.fake.served_model):
            return self._refuse(404, f"The model `{model}` does not exist.", "NotFoundError")
        key = headers.get("sec-websocket-key", [""])[-1].encode()
        lines = [
            b"HTTP/1.1 101 Switching Protocols",
            b"Upgrade: websocket",
            b"Connection: Upgrade",
            b"Sec-WebSocket-Accept: " + accept_value(key),
        ]
        protocols = headers.get("sec-websocket-protocol")
        if protocols:
            lines.append(b"Sec-WebSocket-Protocol: " + protocols[-1].split(",")[0].strip().encode())
        self.transport.write(b"\r\n".join(lines) + b"\r\n\r\n")
        self._frames = FrameReader(self._event, max_text=16 * 1024 * 1024)
        self._send({"type": "session.created", "id": "sess_fake"})

    def _refuse(self, status: int, message: str, kind: str) -> None:
        body = json.dumps({"error": {"message": message, "type": kind, "param": "model", "code": status}}).encode()
        reason = {401: b"Unauthorized", 404: b"Not Found"}[status]
        self.transport.write(
            b"HTTP/1.1 %d %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n" % (status, reason, len(body)) + body
        )
        self.transport.loseConnection()

    def _send(self, event: dict) -> None:
        self.transport.write(frame(OP_TEXT, json.dumps(event).encode()))

    def _event(self, message: bytes) -> None:
        event = json.loads(message)
        kind = event.get("type")
        if kind == "input_audio_buffer.append":
            self._audio += len(base64.b64decode(event.get("audio", "")))
        elif kind == "input_audio_buffer.commit" and event.get("final"):
            prompt = max(1, self._audio // 100)
            self._send({"type": "transcription.delta", "delta": "hello"})
            self._send(
                {
                    "type": "transcription.done",
                    "text": "hello there",
                    "usage": {"prompt_tokens": prompt, "completion_tokens": 3, "total_tokens": prompt + 3},
                }
            )
            self._audio = 0

    def _answer_close(self) -> None:
        code = self._frames.close_code
        if code is not None and not self._closing:
            self._closing = True
            self.transport.write(frame(OP_CLOSE, code.to_bytes(2, "big")))
            self.transport.loseConnection()
