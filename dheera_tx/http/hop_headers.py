"""
Which headers cross the proxy: hop-by-hop headers (RFC 9110 7.6.1) and
the ones the proxy consumes or sets itself are dropped in each direction,
as are the headers a C{Connection} header names.
"""

from typing import Optional

# Headers that describe one hop, never forwarded in either direction.
HOP_BY_HOP = frozenset(
    [
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"proxy-authenticate",
        b"proxy-authorization",
    ]
)
# Request headers the proxy consumes or sets itself.
NOT_FORWARDED = HOP_BY_HOP | frozenset(
    [b"host", b"authorization", b"x-api-key", b"cookie", b"content-length", b"expect"]
)
NOT_RELAYED = HOP_BY_HOP | frozenset([b"content-length"])


def connection_tokens(headers) -> frozenset:
    """
    :param headers: C{(name, value)} pairs.
    :return: the lower-case header names a Connection header lists.
    """
    tokens = [t.strip().lower() for n, v in headers if n.lower() == b"connection" for t in v.split(b",")]
    return frozenset(t for t in tokens if t)


def first_header(headers, name: bytes) -> Optional[bytes]:
    """
    :return: the first value of header C{name} (lower case) in C{(name,
        value)} pairs, or L{None}.
    """
    for n, v in headers:
        if len(n) == len(name) and n.lower() == name:
            return v
    return None
