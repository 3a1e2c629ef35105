"""
vLLM's realtime WebSocket API through the proxy (L{dheera_tx.realtime}):
real loopback sockets, a real Redis, the fake vLLM's realtime endpoint
(L{tests.fake_realtime}) and a raw WebSocket client.
"""

import base64
import json
import os
from typing import List, Optional

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Protocol
from twisted.trial.unittest import TestCase

from dheera_tx.http.websocket import OP_CLOSE, OP_TEXT, FrameReader, accept_value, frame
from tests.passthrough_harness import MASTER_KEY, error_of
from tests.scripted_upstream import sleep
from tests.test_gateway_keys import ALLOWED, OTHER, GatewayHarness

WS_KEY = b"dGhlIHNhbXBsZSBub25jZQ=="


class WebSocketClient(Protocol):
    """
    A raw client: sends an upgrade request, then reads the answer head and
    the server's text messages.
    """

    def __init__(self):
        self.raw = b""
        self.head: Optional[bytes] = None
        self.messages: List[dict] = []
        self.frames = FrameReader(lambda m: self.messages.append(json.loads(m)))
        self.lost = Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.raw += data
        if self.head is None:
            end = self.raw.find(b"\r\n\r\n")
            if end < 0:
                return
            self.head, rest = self.raw[: end + 4], self.raw[end + 4 :]
            if self.head.startswith(b"HTTP/1.1 101"):
                self.frames.feed(rest)
            return
        if self.head.startswith(b"HTTP/1.1 101"):
            self.frames.feed(data)

    def connectionLost(self, reason=None) -> None:
        self.lost.callback(None)

    def send(self, event: dict) -> None:
        self.transport.write(frame(OP_TEXT, json.dumps(event).encode(), mask=os.urandom(4)))

    def status(self) -> Optional[int]:
        return int(self.head.split(b" ", 2)[1]) if self.head else None

    def header(self, name: bytes) -> Optional[bytes]:
        for line in (self.head or b"").split(b"\r\n")[1:]:
            key, _, value = line.partition(b":")
            if key.strip().lower() == name:
                return value.strip()
        return None


class RealtimeTests(GatewayHarness, TestCase):
    """
    Realtime sessions: authenticated, routed, relayed, logged and billed.
    """

    async def setUp(self):
        await self.start_gateway()

    async def connect(self, query: str, headers: dict) -> WebSocketClient:
        client = WebSocketClient()
        await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", self.port), client)
        self.addCleanup(lambda: client.transport.abortConnection() if client.transport.connected else None)
        lines = [
            b"GET /vllm/v1/realtime" + query.encode() + b" HTTP/1.1",
            b"Host: localhost",
            b"Upgrade: websocket",
            b"Connection: Upgrade",
            b"Sec-WebSocket-Version: 13",
            b"Sec-WebSocket-Key: " + WS_KEY,
            b"Sec-WebSocket-Extensions: permessage-deflate",
        ] + [name.encode() + b": " + value.encode() for name, value in headers.items()]
        client.transport.write(b"\r\n".join(lines) + b"\r\n\r\n")
        return client

    async def until(self, predicate, timeout: float = 10.0) -> None:
        for _ in range(int(timeout / 0.01)):
            if predicate():
                return
            await sleep(0.01)
        self.fail("condition not reached")

    async def records(self, path="/vllm/v1/realtime"):
        await self.until(lambda: path in self.json_log.getvalue())
        return [json.loads(line) for line in self.json_log.getvalue().splitlines() if path in line]

    async def test_session_relayed_logged_and_billed(self):
        """
        A virtual key sent as OpenAI's browser subprotocol opens a session
        on the model it may use: the client gets the replica's 101 (the
        accept value for its own key, the chosen subprotocol), events flow
        both ways, the close code is relayed; the replica saw the
        deployment's served model name, no client key and no compression
        offer; the call record has status 101, the bytes, the close code
        and the usage the server reported, and the key's spend is that
        usage times the prices.
        """
        key = (await self.generate(models=[ALLOWED]))["key"]
        client = await self.connect(
            f"?model={ALLOWED}", {"Sec-WebSocket-Protocol": f"realtime, openai-insecure-api-key.{key}"}
        )
        await self.until(lambda: client.messages)
        self.assertEqual(client.status(), 101)
        self.assertEqual(client.header(b"sec-websocket-accept"), accept_value(WS_KEY))
        self.assertEqual(client.header(b"sec-websocket-protocol"), b"realtime")
        self.assertEqual(client.messages[0]["type"], "session.created")
        client.send({"type": "input_audio_buffer.append", "audio": base64.b64encode(b"\x00" * 1000).decode()})
        client.send({"type": "input_audio_buffer.commit", "final": True})
        await self.until(lambda: len(client.messages) >= 3)
        done = client.messages[2]
        self.assertEqual((done["type"], done["usage"]["prompt_tokens"]), ("transcription.done", 10))
        client.transport.write(frame(OP_CLOSE, (1000).to_bytes(2, "big"), mask=os.urandom(4)))
        await client.lost
        [record] = await self.records()
        self.assertEqual((record["status"], record["close_code"], record["model_name"]), (101, 1000, ALLOWED))
        self.assertEqual((record["prompt_tokens"], record["completion_tokens"]), (10, 3))
        self.assertGreater(record["bytes_in"], 1000)
        self.assertGreater(record["bytes_out"], 100)
        upstream = self.upstream.received[-1]
        self.assertEqual(upstream.uri, b"/v1/realtime?model=tiny")
        self.assertNotIn(key, json.dumps(upstream.headers))
        self.assertNotIn("sec-websocket-extensions", upstream.headers)
        self.assertEqual(upstream.headers["sec-websocket-protocol"], ["realtime"])
        info = await self.admin(f"/key/info?key={key}", method=b"GET")
        self.assertEqual(info["info"]["spend_nanos"], record["cost_nanos"])

    async def test_refused_before_any_replica(self):
        """
        No key gets 401, a key restricted to another model 403, both in the
        OpenAI error shape, and no replica is asked.
        """
        key = (await self.generate(models=[OTHER]))["key"]
        before = self.upstream.realtime_sessions
        for headers, status in (({}, 401), ({"Authorization": f"Bearer {key}"}, 403)):
            client = await self.connect(f"?model={ALLOWED}", headers)
            await client.lost
            self.assertEqual(client.status(), status)
            self.assertIn("message", error_of(client.raw.split(b"\r\n\r\n", 1)[1]))
        self.assertEqual(self.upstream.realtime_sessions, before)

    async def test_replica_refusal_relayed(self):
        """
        A replica that does not switch protocols (it does not know the
        model) has its answer relayed as a plain answer, and the
        connection closes.
        """
        client = await self.connect("?model=unknown-to-everyone", {"Authorization": f"Bearer {MASTER_KEY}"})
        await client.lost
        self.assertEqual(client.status(), 404)
        self.assertIn(b"does not exist", client.raw)

    async def test_client_leaving_closes_the_replica(self):
        """
        A client that drops its connection mid-session makes the proxy
        close the replica's connection, and the call is logged.
        """
        client = await self.connect(f"?model={ALLOWED}", {"Authorization": f"Bearer {MASTER_KEY}"})
        await self.until(lambda: client.messages)
        opened = len(self.upstream.connections_lost)
        client.transport.abortConnection()
        await self.until(lambda: len(self.upstream.connections_lost) > opened)
        [record] = await self.records()
        self.assertEqual(record["status"], 101)

    async def test_silent_session_cut(self):
        """
        A session silent for the deployment's C{stream_timeout} is cut on
        both sides and logged as C{stream_timeout}.
        """
        from dheera_tx.config import config_from_dict
        from tests.passthrough_harness import deployment

        data = {
            "model_list": [deployment("quiet", "tiny", self.upstream, stream_timeout=0.5)],
            "general_settings": {"master_key": MASTER_KEY, "database_url": self.server.url},
            "dheera_ai_settings": {"callbacks": ["json_log"]},
        }
        self.json_log = __import__("io").StringIO()
        self.assemble(config_from_dict(data), stdout=self.json_log)
        client = await self.connect("?model=quiet", {"Authorization": f"Bearer {MASTER_KEY}"})
        await self.until(lambda: client.messages)
        await client.lost
        [record] = await self.records()
        self.assertEqual(record["error"], "stream_timeout")
