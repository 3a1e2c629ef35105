"""
Attackers and gauges for the hostile-client tests against a real proxy
process (L{tests.proxy_process.ProxyProcess}).

Everything here is plain blocking (or C{select}-driven) socket code meant
to run in threads (C{deferToThread}), so the test's reactor stays free and
what is measured is the proxy: L{LivenessProbe} asks C{/health/liveliness}
every 50 ms on fresh connections and records the slowest answer (a stalled
proxy reactor answers late), L{rss_bytes} reads the proxy's resident set
from C{/proc}, and L{Attack} writes a request (head, then a body produced
lazily) while reading whatever comes back, never blocking on either.
"""

import select
import socket
import threading
import time
from typing import Callable, Iterator, Optional


def rss_bytes(pid: int) -> int:
    """
    :return: the resident set size of process C{pid}, in bytes.
    """
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


class LivenessProbe:
    """
    Asks C{GET /health/liveliness} every C{interval} seconds, each on a new
    connection, from a thread of its own, and records the slowest answer.

    :ivar worst: the longest seconds one probe took (connect to the end of
        the answer); a probe that got no answer counts as the time it
        waited.
    :ivar answered: probes answered with 200.
    """

    def __init__(self, port: int, interval: float = 0.05, timeout: float = 30.0):
        self._port = port
        self._interval = interval
        self._timeout = timeout
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.worst = 0.0
        self.answered = 0
        self.failed = 0

    def start(self) -> "LivenessProbe":
        self._thread.start()
        return self

    def stop(self) -> float:
        """
        Stop probing (waits for the probe in progress).

        :return: L{worst}.
        """
        self._stop.set()
        self._thread.join(self._timeout + 5)
        return self.worst

    def _run(self) -> None:
        request = b"GET /health/liveliness HTTP/1.1\r\nHost: probe\r\nConnection: close\r\n\r\n"
        while not self._stop.is_set():
            start = time.monotonic()
            ok = False
            try:
                with socket.create_connection(("127.0.0.1", self._port), timeout=self._timeout) as s:
                    s.sendall(request)
                    answer = b""
                    while True:
                        data = s.recv(65536)
                        if not data:
                            break
                        answer += data
                ok = answer.startswith(b"HTTP/1.1 200")
            except OSError:
                pass
            elapsed = time.monotonic() - start
            self.worst = max(self.worst, elapsed)
            if ok:
                self.answered += 1
            else:
                self.failed += 1
            self._stop.wait(self._interval)


class Attack:
    """
    One hostile connection: writes C{head} and then the chunks of C{body}
    as fast as the proxy takes them, while reading what it answers, until
    the proxy closes, C{done(answer)} says enough was read, or C{seconds}
    pass.

    :ivar answer: every byte the proxy sent.
    :ivar sent: body bytes written (the head not counted).
    :ivar closed: the proxy closed the connection (or reset it).
    :ivar seconds: how long the attack ran.
    """

    def __init__(
        self,
        port: int,
        head: bytes,
        body: Iterator[bytes] = iter(()),  # noqa: B008 - empty: sharing it is harmless
        seconds: float = 15.0,
        done: Optional[Callable[[bytes], bool]] = None,
        read: bool = True,
        receive_buffer: Optional[int] = None,
    ):
        self._port = port
        self._head = head
        self._body = body
        self._limit = seconds
        self._done = done or (lambda answer: False)
        self._read = read
        self._receive_buffer = receive_buffer
        self.answer = b""
        self.sent = 0
        self.closed = False
        self.seconds = 0.0

    def run(self) -> "Attack":
        """
        Run the attack (blocking: call it in a thread).
        """
        start = time.monotonic()
        s = socket.socket()
        if self._receive_buffer is not None:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self._receive_buffer)
        s.connect(("127.0.0.1", self._port))
        s.setblocking(False)
        pending = memoryview(self._head)
        head_left = len(self._head)
        try:
            while time.monotonic() - start < self._limit:
                want_write = len(pending) > 0 or self._body is not None
                readers = [s] if self._read else []
                _, writable, _ = select.select(readers, [s] if want_write else [], [], 0.05)
                if self._read:
                    readable, _, _ = select.select([s], [], [], 0)
                    if readable:
                        try:
                            data = s.recv(65536)
                        except (ConnectionResetError, BrokenPipeError):
                            data = b""
                        if not data:
                            self.closed = True
                            break
                        self.answer += data
                        if self._done(self.answer):
                            break
                if writable:
                    if not pending and self._body is not None:
                        chunk = next(self._body, None)
                        if chunk is None:
                            self._body = None
                            continue
                        pending = memoryview(chunk)
                    if pending:
                        try:
                            n = s.send(pending)
                        except BlockingIOError:
                            n = 0
                        except (ConnectionResetError, BrokenPipeError):
                            self.closed = True
                            break
                        if head_left:
                            counted = min(n, head_left)
                            head_left -= counted
                            self.sent += n - counted
                        else:
                            self.sent += n
                        pending = pending[n:]
        finally:
            self.seconds = time.monotonic() - start
            s.close()
        return self


def repeated(chunk: bytes, total: int) -> Iterator[bytes]:
    """
    :return: C{total} bytes made of C{chunk} repeated, produced lazily.
    """
    sent = 0
    while sent < total:
        piece = chunk[: total - sent]
        sent += len(piece)
        yield piece


def chunked(chunks: Iterator[bytes]) -> Iterator[bytes]:
    """
    :return: C{chunks} framed as a chunked body (the last chunk included).
    """
    for chunk in chunks:
        yield b"%x\r\n%s\r\n" % (len(chunk), chunk)
    yield b"0\r\n\r\n"


def answer_complete(answer: bytes) -> bool:
    """
    :return: whether C{answer} holds a whole response head and a
        Content-Length body.
    """
    head, sep, body = answer.partition(b"\r\n\r\n")
    if not sep:
        return False
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return len(body) >= int(value)
    return False


def status_of(answer: bytes) -> Optional[int]:
    """
    :return: the status of the first response in C{answer}, skipping a
        C{100 Continue}.
    """
    while answer.startswith(b"HTTP/1.1 100"):
        answer = answer.partition(b"\r\n\r\n")[2]
    if not answer.startswith(b"HTTP/"):
        return None
    return int(answer.split(b" ", 2)[1])
