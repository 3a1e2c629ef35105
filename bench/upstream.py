"""
A small, fast upstream for the benchmark: paced vLLM-shaped SSE streams, a
byte sink for uploads and a zero-filled download, on one asyncio loop
(uvloop when installed).

Non-streaming chat completions are served by nginx (see L{bench.nginx});
this server covers what nginx cannot do:

``POST .../chat/completions`` with ``"stream": true``
    A vLLM-shaped stream: a role chunk at once, then ``max_tokens`` content
    chunks, one every ``bench_interval_ms`` (a body field; default
    ``--interval-ms``), then a finish chunk, a usage chunk and
    ``data: [DONE]``, each event its own write, chunked transfer encoding,
    like vLLM behind uvicorn.  Streams with the same interval share one
    timer, so every tick writes one event to each of them, as vLLM's batched
    decode step does.  Each content chunk's text is ``t<ns>``: the
    ``time.monotonic_ns()`` at which it was written, so a client on the same
    machine measures each chunk's delay end to end.
``POST .../upload``
    Reads and drops the body (Content-Length or chunked), then answers
    ``{"received": N}``.
``GET .../download?bytes=N``
    N zero bytes with a Content-Length, written under flow control.
Anything else
    A fixed non-streaming chat completion.

Run: ``python bench/upstream.py --port P``.  Loopback only.
"""

import argparse
import asyncio
import json
import time
from typing import Dict, Optional, Set
from urllib.parse import parse_qs, urlsplit

COMPLETION = (
    b'{"id":"chatcmpl-bench","object":"chat.completion","created":1700000000,"model":"bench-model",'
    b'"choices":[{"index":0,"message":{"role":"assistant","content":"Hello! How can I help you today?",'
    b'"tool_calls":[]},"logprobs":null,"finish_reason":"stop","stop_reason":null}],'
    b'"usage":{"prompt_tokens":12,"total_tokens":21,"completion_tokens":9,"prompt_tokens_details":null},'
    b'"prompt_logprobs":null,"kv_transfer_params":null}'
)
_ZEROS = bytes(1 << 20)
_MAX_HEAD = 65536


def _chunk(payload: bytes) -> bytes:
    """
    :return: C{payload} as one HTTP/1.1 chunk.
    """
    return b"%x\r\n%s\r\n" % (len(payload), payload)


def _event(model: bytes, delta: bytes, finish: bytes = b"null") -> bytes:
    """
    :return: one SSE event carrying a vLLM chat.completion.chunk.
    """
    return _chunk(
        b'data: {"id":"chatcmpl-bench","object":"chat.completion.chunk","created":1700000000,"model":"'
        + model
        + b'","choices":[{"index":0,"delta":'
        + delta
        + b',"logprobs":null,"finish_reason":'
        + finish
        + b"}]}\n\n"
    )


class Stream:
    """
    One paced SSE answer in progress.
    """

    __slots__ = ("connection", "model", "left", "sent")

    def __init__(self, connection: "Connection", model: bytes, tokens: int):
        self.connection = connection
        self.model = model
        self.left = tokens
        self.sent = 0

    def tick(self) -> bool:
        """
        Write the next event.

        :return: whether the stream is over.
        """
        transport = self.connection.transport
        if transport is None or transport.is_closing():
            return True
        if self.left > 0:
            self.left -= 1
            self.sent += 1
            stamp = b"t%d" % time.monotonic_ns()
            transport.write(_event(self.model, b'{"content":"' + stamp + b'"}'))
            return False
        usage = b'{"prompt_tokens":12,"total_tokens":%d,"completion_tokens":%d}' % (12 + self.sent, self.sent)
        transport.write(_event(self.model, b'{"content":""}', b'"stop"'))
        transport.write(
            _chunk(
                b'data: {"id":"chatcmpl-bench","object":"chat.completion.chunk","created":1700000000,"model":"'
                + self.model
                + b'","choices":[],"usage":'
                + usage
                + b"}\n\n"
            )
        )
        transport.write(_chunk(b"data: [DONE]\n\n"))
        transport.write(b"0\r\n\r\n")
        self.connection.response_done()
        return True


class Pacer:
    """
    Every C{interval} seconds, one event to each of its streams.
    """

    def __init__(self, loop, interval: float):
        self._loop = loop
        self._interval = interval
        self._streams: Set[Stream] = set()
        self._handle = None
        self._next = 0.0

    def add(self, stream: Stream) -> None:
        """
        Pace C{stream} from the next tick on.
        """
        self._streams.add(stream)
        if self._handle is None:
            self._next = self._loop.time() + self._interval
            self._handle = self._loop.call_at(self._next, self._tick)

    def _tick(self) -> None:
        over = [s for s in self._streams if s.tick()]
        for s in over:
            self._streams.discard(s)
        if not self._streams:
            self._handle = None
            return
        self._next += self._interval
        now = self._loop.time()
        if self._next < now:
            # Behind schedule (the consumer is slow): do not burst to catch up.
            self._next = now
        self._handle = self._loop.call_at(self._next, self._tick)


class Connection(asyncio.Protocol):
    """
    One client connection: HTTP/1.1 with keep-alive, requests in turn.
    """

    def __init__(self, server: "Upstream"):
        self.server = server
        self.transport = None
        self._buffer = bytearray()
        self._state = "head"
        self._head = None
        self._body = bytearray()
        self._keep_body = False
        self._remaining = 0
        self._chunked = False
        self._received = 0
        self._paused = False
        self._download_left = 0

    def connection_made(self, transport) -> None:
        self.transport = transport

    def connection_lost(self, exc) -> None:
        self.transport = None

    def pause_writing(self) -> None:
        self._paused = True

    def resume_writing(self) -> None:
        self._paused = False
        if self._download_left:
            self._write_download()

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        self._advance()

    def _advance(self) -> None:
        while self._buffer and self.transport is not None:
            if self._state == "head":
                end = self._buffer.find(b"\r\n\r\n")
                if end < 0:
                    if len(self._buffer) > _MAX_HEAD:
                        self.transport.close()
                    return
                self._start_request(bytes(self._buffer[:end]))
                del self._buffer[: end + 4]
            elif self._state == "body":
                take = min(self._remaining, len(self._buffer))
                self._take(self._buffer[:take])
                del self._buffer[:take]
                self._remaining -= take
                if self._remaining == 0:
                    self._body_done()
            elif self._state == "chunk-size":
                end = self._buffer.find(b"\r\n")
                if end < 0:
                    return
                size = int(bytes(self._buffer[:end]).split(b";")[0], 16)
                del self._buffer[: end + 2]
                if size == 0:
                    self._state = "trailer"
                else:
                    self._remaining = size
                    self._state = "chunk-data"
            elif self._state == "chunk-data":
                take = min(self._remaining, len(self._buffer))
                self._take(self._buffer[:take])
                del self._buffer[:take]
                self._remaining -= take
                if self._remaining == 0:
                    self._state = "chunk-end"
            elif self._state == "chunk-end":
                if len(self._buffer) < 2:
                    return
                del self._buffer[:2]
                self._state = "chunk-size"
            elif self._state == "trailer":
                end = self._buffer.find(b"\r\n")
                if end < 0:
                    return
                del self._buffer[: end + 2]
                if end == 0:
                    self._body_done()
            else:
                # Answering: hold pipelined bytes until the answer is over.
                return
        if self._state == "body" and self._remaining == 0:
            self._body_done()

    def _take(self, data) -> None:
        self._received += len(data)
        if self._keep_body:
            self._body += data

    def _start_request(self, head: bytes) -> None:
        lines = head.split(b"\r\n")
        method, target, _ = lines[0].split(b" ", 2)
        headers: Dict[bytes, bytes] = {}
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            headers[name.strip().lower()] = value.strip()
        self._head = (method, target.decode("latin-1"), headers)
        self._body = bytearray()
        self._received = 0
        self._keep_body = b"upload" not in target
        if b"chunked" in headers.get(b"transfer-encoding", b"").lower():
            self._state = "chunk-size"
        else:
            self._remaining = int(headers.get(b"content-length", b"0"))
            self._state = "body"

    def _body_done(self) -> None:
        self._state = "answering"
        method, target, headers = self._head
        path = urlsplit(target).path
        if "upload" in path:
            self._answer(b"application/json", b'{"received":%d}' % self._received)
        elif "download" in path:
            query = parse_qs(urlsplit(target).query)
            self._download_left = int(query.get("bytes", ["0"])[0])
            self.transport.write(
                b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nContent-Length: %d\r\n\r\n"
                % self._download_left
            )
            self._write_download()
        elif path.endswith("completions") and b'"stream"' in self._body:
            self._start_stream()
        else:
            self._answer(b"application/json", COMPLETION)

    def _start_stream(self) -> None:
        try:
            body = json.loads(bytes(self._body))
        except ValueError:
            body = {}
        if not body.get("stream"):
            self._answer(b"application/json", COMPLETION)
            return
        interval = float(body.get("bench_interval_ms", self.server.interval_ms)) / 1000.0
        model = str(body.get("model", "bench-model")).encode()
        self.transport.write(
            b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream; charset=utf-8\r\n"
            b"transfer-encoding: chunked\r\n\r\n"
        )
        self.transport.write(_event(model, b'{"role":"assistant","content":""}'))
        stream = Stream(self, model, int(body.get("max_tokens") or 16))
        self.server.pacer(interval).add(stream)

    def _write_download(self) -> None:
        while self._download_left and not self._paused and self.transport is not None:
            piece = _ZEROS if self._download_left >= len(_ZEROS) else _ZEROS[: self._download_left]
            self.transport.write(piece)
            self._download_left -= len(piece)
        if self._download_left == 0 and self._state == "answering":
            self.response_done()

    def _answer(self, content_type: bytes, body: bytes) -> None:
        self.transport.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: %s\r\nContent-Length: %d\r\n\r\n%s" % (content_type, len(body), body)
        )
        self.response_done()

    def response_done(self) -> None:
        """
        The answer is written: read the next request.
        """
        self._state = "head"
        self._head = None
        self._body = bytearray()
        if self._buffer:
            self._advance()


class Upstream:
    """
    The server: its default pacing and one L{Pacer} per interval.
    """

    def __init__(self, loop, interval_ms: float):
        self.loop = loop
        self.interval_ms = interval_ms
        self._pacers: Dict[float, Pacer] = {}

    def pacer(self, interval: float) -> Pacer:
        """
        :return: the shared pacer for C{interval} seconds.
        """
        pacer = self._pacers.get(interval)
        if pacer is None:
            pacer = self._pacers[interval] = Pacer(self.loop, interval)
        return pacer


def install_uvloop() -> Optional[str]:
    """
    Use uvloop when it is installed.

    :return: C{"uvloop"} or C{"asyncio"}.
    """
    try:
        import uvloop
    except ImportError:
        return "asyncio"
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    return "uvloop"


async def serve(port: int, interval_ms: float, ready_file: Optional[str]) -> None:
    """
    Serve on 127.0.0.1:C{port} until killed.
    """
    loop = asyncio.get_running_loop()
    upstream = Upstream(loop, interval_ms)
    server = await loop.create_server(lambda: Connection(upstream), "127.0.0.1", port, backlog=4096)
    if ready_file:
        with open(ready_file, "w") as f:
            f.write(str(server.sockets[0].getsockname()[1]))
    async with server:
        await server.serve_forever()


def main() -> None:
    """
    Command line entry point.
    """
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--interval-ms", type=float, default=20.0)
    parser.add_argument("--ready-file", default=None, help="written with the port once listening")
    args = parser.parse_args()
    install_uvloop()
    try:
        asyncio.run(serve(args.port, args.interval_ms, args.ready_file))
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
