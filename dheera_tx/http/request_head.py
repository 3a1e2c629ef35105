"""
Reading a request head: the rules the proxy adds to llhttp's.

llhttp (through httptools) already refuses malformed request lines and
headers, Content-Length with Transfer-Encoding, a second Content-Length
and bad chunk framing.  L{RequestHead} collects the target and headers a
parser reports and adds the proxy's own limits and rules: the size of the
request line (414) and of the headers and their number (431), one copy of
each header the proxy and vLLM could read differently, and no
Transfer-Encoding but a plain C{chunked} (400).  L{RequestLine} checks what
llhttp lets through in a request line: runs of spaces between its parts.
L{framing} reads a complete head's body framing.
"""

from typing import List, Optional, Tuple

from dheera_tx.errors import ProxyError, bad_request
from dheera_tx.http.listener_limits import CHUNKED, SINGLE_HEADERS, ListenerLimits, head_too_large

MALFORMED = "The request is malformed (request line, headers or body framing)."

# Headers a Connection header may not name: the proxy reads them (framing,
# the caller, the body's type) and vLLM must see what the proxy read, but
# a header named by Connection is dropped on the way (RFC 9110 7.6.1).
NOT_HOP_BY_HOP = frozenset(
    [b"content-type", b"content-length", b"transfer-encoding", b"host", b"authorization", b"x-forwarded-for"]
)
# Connection tokens that name no header to drop.
_PLAIN_TOKENS = frozenset([b"keep-alive", b"close"])


def request_line_too_long(limit: int) -> ProxyError:
    """
    :return: the 414 for a request line over C{limit} bytes.
    """
    return head_too_large(f"The request line is longer than {limit} bytes.", status=414)


def headers_too_large(limit: int) -> ProxyError:
    """
    :return: the 431 for request headers over C{limit} bytes.
    """
    return head_too_large(f"The request headers are larger than {limit} bytes.")


class RequestHead:
    """
    The target and headers of one request, checked as they arrive.

    :param limits: the listener's limits.
    :ivar connection: the Connection header values, or L{None} when there
        is none.
    """

    __slots__ = ("_limits", "url", "headers", "_header_bytes", "_seen", "connection")

    def __init__(self, limits: ListenerLimits):
        self._limits = limits
        self.url: List[bytes] = []
        self.headers: List[Tuple[bytes, bytes]] = []
        self._header_bytes = 0
        self._seen: set = set()
        # The Connection header values, or None when there is none.
        self.connection: Optional[List[bytes]] = None

    def target(self) -> bytes:
        """
        :return: the request target as the client wrote it.
        :raise ProxyError: 414 when it is over the limit.
        """
        target = b"".join(self.url)
        if len(target) > self._limits.max_header_bytes:
            raise request_line_too_long(self._limits.max_header_bytes)
        return target

    def add_header(self, name: bytes, value: bytes) -> None:
        """
        Take one header.

        :raise ProxyError: 414, 431 or 400 when the head may not go on.
        """
        limits = self._limits
        if not self.headers:
            self.target()
        self._header_bytes += len(name) + len(value) + 4
        if self._header_bytes > limits.max_header_bytes:
            raise headers_too_large(limits.max_header_bytes)
        if len(self.headers) >= limits.max_headers:
            raise head_too_large(f"The request has more than {limits.max_headers} headers.")
        lower = name.lower()
        if lower in SINGLE_HEADERS:
            if lower in self._seen:
                raise bad_request(f"The {name.decode('latin-1')} header appears more than once.")
            self._seen.add(lower)
            if lower == b"transfer-encoding" and not CHUNKED.fullmatch(value):
                raise bad_request("The only Transfer-Encoding accepted is 'chunked'.")
        elif lower == b"connection":
            if self.connection is None:
                self.connection = []
            self.connection.append(value)
        self.headers.append((name, value))

    def connection_tokens(self) -> frozenset:
        """
        :return: the lower-case tokens of the Connection headers.
        """
        if self.connection is None:
            return frozenset()
        return frozenset(t for t in (t.strip().lower() for v in self.connection for t in v.split(b",")) if t)

    def check_connection(self) -> None:
        """
        :raise ProxyError: 400 when the Connection header names a header
            the proxy reads and vLLM must see.
        """
        if self.connection is None:
            return
        named = self.connection_tokens() - _PLAIN_TOKENS
        if named & NOT_HOP_BY_HOP:
            raise bad_request(
                "The Connection header may not name " + ", ".join(sorted(t.decode() for t in named & NOT_HOP_BY_HOP)) + "."
            )

    def upgrade(self, method: bytes) -> bool:
        """
        :return: whether llhttp takes this request as an upgrade (CONNECT,
            or Upgrade with a Connection token C{upgrade}): it then reads
            nothing after the head as this request's body.
        """
        if method == b"CONNECT":
            return True
        if b"upgrade" not in self.connection_tokens():
            return False
        return any(len(n) == 7 and n.lower() == b"upgrade" for n, _ in self.headers)


class RequestLine:
    """
    llhttp accepts runs of spaces between the parts of a request line
    (C{GET /a  HTTP/1.1} is C{/a}); the proxy reads the target as the client
    wrote it, so a request line must have exactly two single spaces.  Fed
    the reads that start a request until its line is complete.

    :param limit: C{max_header_bytes}: a longer line is the 414's business.
    """

    __slots__ = ("_limit", "_pending")

    def __init__(self, limit: int):
        self._limit = limit
        self._pending: Optional[bytes] = None

    @property
    def checking(self) -> bool:
        """
        :return: whether a request line is being checked.
        """
        return self._pending is not None

    def start(self) -> None:
        """
        A request starts with the next read.
        """
        self._pending = b""

    def stop(self) -> None:
        """
        Check no more (a request pipelined in the middle of a read is
        llhttp's alone).
        """
        self._pending = None

    def feed(self, data: bytes) -> bool:
        """
        :return: C{False} when the request line is malformed.
        """
        line = self._pending + data if self._pending else data
        end = line.find(b"\n", 0, self._limit + 2)
        if end < 0:
            self._pending = line if len(line) <= self._limit else None
            return True
        start = 0
        while line.startswith(b"\r\n", start):
            start += 2
        if start:
            end = line.find(b"\n", start)
            if end < 0:
                self._pending = line[start:]
                return True
        self._pending = None
        return line.count(b" ", start, end) == 2


def framing(headers) -> Tuple[Optional[int], bool, bool]:
    """
    :param headers: a complete head's C{(name, value)} pairs (llhttp has
        checked Content-Length and Transfer-Encoding).
    :return: the Content-Length (or L{None}), whether the body is chunked,
        and whether the client expects C{100 Continue}.
    """
    length = None
    chunked = expect = False
    for name, value in headers:
        size = len(name)
        if size == 14 and name.lower() == b"content-length":
            length = int(value)
        elif size == 17 and name.lower() == b"transfer-encoding":
            chunked = True
        elif size == 6 and name.lower() == b"expect" and value.lower() == b"100-continue":
            expect = True
    if chunked:
        length = None
    return length, chunked, expect
