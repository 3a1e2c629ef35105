"""
Open N concurrent streaming chat completions and time every chunk.

Each stream is one connection sending one ``POST .../chat/completions``
with ``"stream": true``; the answer's chunked framing is decoded, split into
SSE events, and each event is timestamped on arrival.  Content chunks from
L{bench.upstream} carry the monotonic time they were written (``t<ns>``), so
the delay of each chunk (arrival minus write) is measured end to end on one
machine, as well as the gap between consecutive chunks of a stream and the
time to first byte.

Prints (or writes with ``--out``) one JSON object of results.  Every stream
has a deadline (``--timeout``): the run always ends.
"""

import argparse
import asyncio
import json
import sys
import time
from array import array
from typing import List, Optional
from urllib.parse import urlsplit

_MARK = b'"content":"t'


def percentile(values, q: float) -> Optional[float]:
    """
    :return: the C{q}-th percentile (nearest rank) of C{values}, or L{None}.
    """
    if not values:
        return None
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, int(round(q / 100.0 * len(ordered) + 0.5)) - 1))
    return ordered[index]


class Totals:
    """
    What all streams of one run measured (nanoseconds).
    """

    def __init__(self):
        self.delays = array("q")
        self.gaps = array("q")
        self.ttfb = array("q")
        self.events = 0
        self.content = 0
        self.first_event = None
        self.last_event = None
        self.ok = 0
        self.failed = 0
        self.errors: List[str] = []

    def event_at(self, now: int) -> None:
        """
        Count one event arriving at C{now}.
        """
        self.events += 1
        if self.first_event is None or now < self.first_event:
            self.first_event = now
        if self.last_event is None or now > self.last_event:
            self.last_event = now


class StreamProtocol(asyncio.Protocol):
    """
    One streaming request and its answer.
    """

    def __init__(self, request: bytes, totals: Totals, done: asyncio.Future):
        self._request = request
        self._totals = totals
        self._done = done
        self._buf = bytearray()
        self._payload = bytearray()
        self._head_done = False
        self._chunk_left = -1  # -1: reading a size line; -2: reading the CRLF after data
        self._sent_at = 0
        self._last = None
        self.status = None

    def connection_made(self, transport) -> None:
        self.transport = transport
        self._sent_at = time.monotonic_ns()
        transport.write(self._request)

    def connection_lost(self, exc) -> None:
        if not self._done.done():
            self._done.set_result(f"connection lost ({exc or 'closed'}) status {self.status}")

    def data_received(self, data: bytes) -> None:
        now = time.monotonic_ns()
        buf = self._buf
        buf += data
        if not self._head_done:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                return
            head = bytes(buf[:end])
            del buf[: end + 4]
            self._head_done = True
            self._totals.ttfb.append(now - self._sent_at)
            self.status = int(head.split(b" ", 2)[1])
            lower = head.lower()
            if self.status != 200:
                self._finish(f"status {self.status}: {head[:200]!r}")
                return
            self._chunked = b"transfer-encoding: chunked" in lower
        if self._chunked:
            self._dechunk()
        else:
            self._payload += buf
            del buf[:]
        self._events(now)

    def _dechunk(self) -> None:
        buf = self._buf
        while buf:
            if self._chunk_left == -1:
                end = buf.find(b"\r\n")
                if end < 0:
                    return
                size = int(bytes(buf[:end]).split(b";")[0], 16)
                del buf[: end + 2]
                self._chunk_left = size if size else -3
                if size == 0:
                    return
            elif self._chunk_left == -2:
                if len(buf) < 2:
                    return
                del buf[:2]
                self._chunk_left = -1
            elif self._chunk_left == -3:
                return
            else:
                take = min(self._chunk_left, len(buf))
                self._payload += buf[:take]
                del buf[:take]
                self._chunk_left -= take
                if self._chunk_left == 0:
                    self._chunk_left = -2

    def _events(self, now: int) -> None:
        payload = self._payload
        totals = self._totals
        while True:
            end = payload.find(b"\n\n")
            if end < 0:
                # vLLM frames with \n\n; accept \r\n\r\n from other servers.
                end = payload.find(b"\r\n\r\n")
                if end < 0:
                    return
                size = 4
            else:
                size = 2
            event = bytes(payload[:end])
            del payload[: end + size]
            if not event.strip():
                continue
            totals.event_at(now)
            if event.startswith(b"data: [DONE]"):
                self._finish(None)
                return
            mark = event.find(_MARK)
            if mark >= 0:
                start = mark + len(_MARK)
                stamp = int(event[start : event.index(b'"', start)])
                totals.delays.append(now - stamp)
                totals.content += 1
                if self._last is not None:
                    totals.gaps.append(now - self._last)
                self._last = now

    def _finish(self, error: Optional[str]) -> None:
        if not self._done.done():
            self._done.set_result(error)
        self.transport.close()


def build_request(url: str, auth: Optional[str], model: str, chunks: int, interval_ms: float) -> bytes:
    """
    :return: the raw HTTP/1.1 request for one stream.
    """
    parts = urlsplit(url)
    body = json.dumps(
        {
            "model": model,
            "messages": [{"role": "user", "content": "Count to a thousand."}],
            "stream": True,
            "max_tokens": chunks,
            "bench_interval_ms": interval_ms,
        }
    ).encode()
    head = [
        f"POST {parts.path or '/'} HTTP/1.1",
        f"Host: {parts.netloc}",
        "Content-Type: application/json",
        "Accept: text/event-stream",
        f"Content-Length: {len(body)}",
    ]
    if auth:
        head.append(f"Authorization: Bearer {auth}")
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


async def one_stream(loop, host: str, port: int, request: bytes, totals: Totals, timeout: float) -> None:
    """
    Run one stream to its end, its failure or its deadline.
    """
    done = loop.create_future()
    transport = None
    try:
        transport, _ = await asyncio.wait_for(
            loop.create_connection(lambda: StreamProtocol(request, totals, done), host, port), timeout
        )
        error = await asyncio.wait_for(done, timeout)
    except asyncio.TimeoutError:
        error = "timeout"
    except OSError as e:
        error = f"connect: {e}"
    finally:
        if transport is not None:
            transport.close()
    if error is None:
        totals.ok += 1
    else:
        totals.failed += 1
        if len(totals.errors) < 5:
            totals.errors.append(error)


def _ms(ns: Optional[float]) -> Optional[float]:
    return None if ns is None else round(ns / 1e6, 3)


async def run(args) -> dict:
    """
    :return: the results of C{args.streams} concurrent streams.
    """
    loop = asyncio.get_running_loop()
    parts = urlsplit(args.url)
    request = build_request(args.url, args.auth, args.model, args.chunks, args.interval_ms)
    totals = Totals()
    started = time.monotonic_ns()
    await asyncio.gather(
        *[one_stream(loop, parts.hostname, parts.port or 80, request, totals, args.timeout) for _ in range(args.streams)]
    )
    ended = time.monotonic_ns()
    span = (totals.last_event - totals.first_event) if totals.events > 1 else 0
    return {
        "streams": args.streams,
        "chunks_per_stream": args.chunks,
        "interval_ms": args.interval_ms,
        "ok": totals.ok,
        "failed": totals.failed,
        "errors": totals.errors,
        "events": totals.events,
        "content_chunks": totals.content,
        "expected_content_chunks": args.streams * args.chunks,
        "wall_s": round((ended - started) / 1e9, 3),
        "events_per_s": round(totals.events / (span / 1e9), 1) if span else None,
        "ttfb_ms": {"p50": _ms(percentile(totals.ttfb, 50)), "p99": _ms(percentile(totals.ttfb, 99)), "max": _ms(max(totals.ttfb, default=None))},
        "chunk_delay_ms": {
            "p50": _ms(percentile(totals.delays, 50)),
            "p99": _ms(percentile(totals.delays, 99)),
            "max": _ms(max(totals.delays, default=None)),
        },
        "gap_ms": {"p50": _ms(percentile(totals.gaps, 50)), "p99": _ms(percentile(totals.gaps, 99))},
    }


def main(argv=None) -> int:
    """
    Command line entry point.
    """
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", required=True, help="http://127.0.0.1:PORT/.../chat/completions")
    parser.add_argument("--auth", default=None, help="bearer key")
    parser.add_argument("--model", default="bench-sse")
    parser.add_argument("--streams", type=int, default=100)
    parser.add_argument("--chunks", type=int, default=100, help="content chunks per stream")
    parser.add_argument("--interval-ms", type=float, default=20.0)
    parser.add_argument("--timeout", type=float, default=120.0, help="deadline per stream, seconds")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    if urlsplit(args.url).hostname not in ("127.0.0.1", "localhost", "::1"):
        sys.exit("loopback URLs only")
    sys.path.insert(0, __file__.rsplit("/", 1)[0])
    from upstream import install_uvloop

    result = {"loop": install_uvloop()}
    result.update(asyncio.run(run(args)))
    text = json.dumps(result)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
