"""
The errors an upstream request fails with; L{dheera_tx.upstream.client}
re-exports them.
"""


class UpstreamUnreachable(Exception):
    """
    Nothing reached the server: the connection could not be made (refused,
    timed out, name not found, TLS handshake failed) or the pool is closed.

    :ivar reason: why, in a few words (never a header value).
    """

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class UpstreamFailed(Exception):
    """
    The connection was lost after (part of) the request was written and
    before the response head was complete.

    :ivar reused: whether the connection came from the pool (a keep-alive
        connection the server may have been closing).
    """

    def __init__(self, reused: bool, reason: str = "connection lost"):
        super().__init__(reason)
        self.reused = reused


class UpstreamMalformed(Exception):
    """
    The response could not be parsed, or its header lines are larger than
    allowed.
    """
