"""
What the listening side enforces, and how it says no.

L{ListenerLimits} are the limits from C{general_settings} (deadlines, sizes,
counts).  L{BodyPace} watches a request body as it arrives: no silence
longer than C{body_timeout} and at least L{MIN_BODY_BYTES_PER_SECOND}.
L{SINGLE_HEADERS} and L{CHUNKED} are the framing rules for a request head;
L{CLOSE_GRACE} is how long a client sent away may keep its connection.

The errors the listening side answers itself (408, 413, 414, 431, 503) are
made here, in the OpenAI error shape; L{raw_answer} writes one on a
connection that has no request to answer through, as
L{ConnectionLimitReached} does for a connection over C{max_connections}.

L{HeadDeadlines} enforces C{header_timeout} on all of a site's connections
with one timer.  L{dheera_tx.http.server} applies all of these to its
connections and requests.
"""

import re
from typing import Callable, Dict, Optional

from twisted.internet.protocol import Protocol

from dheera_tx.errors import ProxyError, reason_phrase, service_unavailable

# A request body must arrive at no less than this many bytes per second,
# averaged over each window of C{body_timeout} seconds in which the proxy
# was reading it (time in which the upstream held the body back does not
# count).  With C{body_timeout} as the longest silence allowed, a client
# trickling its body (slow POST) holds a connection for at most about two
# C{body_timeout}s.  Apache's mod_reqtimeout uses 500 bytes/s; any real
# upload is far faster.
MIN_BODY_BYTES_PER_SECOND = 1024

# A client sent away (408, 413, 431, ...) whose connection has not closed
# after this many seconds is cut off.
CLOSE_GRACE = 10.0

# Headers that may appear once: of a second copy the proxy could read one
# and vLLM the other (Content-Type decides whether the proxy reads the
# model from the body; the others name the caller, the model or framing).
SINGLE_HEADERS = frozenset(
    [
        b"host",
        b"content-length",
        b"transfer-encoding",
        b"content-type",
        b"authorization",
        b"x-api-key",
        b"x-dheera-model",
        b"x-dheera-end-user",
    ]
)
# The one Transfer-Encoding accepted, as clients write it.
CHUNKED = re.compile(rb" ?chunked", re.IGNORECASE)


def request_timeout(message: str) -> ProxyError:
    """
    :return: the 408 a client gets when its request arrives too slowly.
    """
    return ProxyError(408, message, type="invalid_request_error", code="request_timeout")


def too_large(limit: int) -> ProxyError:
    """
    :return: the 413 for a request body over C{limit} bytes.
    """
    return ProxyError(
        413, f"The request body is larger than {limit} bytes.", type="invalid_request_error", code="request_too_large"
    )


def head_too_large(message: str, status: int = 431) -> ProxyError:
    """
    :return: the 431 (or 414 for the request line) for a request head over
        the limits.
    """
    return ProxyError(status, message, type="invalid_request_error", code="request_header_fields_too_large")


class BodyStalled(ProxyError):
    """
    The client stopped sending its request body, or sent it too slowly.
    """

    def __init__(self, message: str = "The request body arrived too slowly."):
        super().__init__(408, message, type="invalid_request_error", code="request_timeout")


def raw_answer(error: ProxyError) -> bytes:
    """
    :return: a whole HTTP/1.1 response carrying C{error}, with
        C{Connection: close}, to write on a raw connection.
    """
    body = error.body()
    phrase = reason_phrase(error.status)
    return (
        b"HTTP/1.1 %d %s\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
        % (error.status, phrase, len(body), body)
    )


class BodyPace:
    """
    Watches a request body as it arrives: no silence longer than C{timeout},
    and at least L{MIN_BODY_BYTES_PER_SECOND} over every C{timeout}-long
    window in which the body was being read.

    :param clock: an C{IReactorTime}.
    :param timeout: C{body_timeout}, in seconds.
    :param too_slow: called once with a message when the body is too slow.
    """

    def __init__(self, clock, timeout: float, too_slow: Callable[[str], None]):
        self._clock = clock
        self._timeout = timeout
        self._too_slow = too_slow
        self._window_start = clock.seconds()
        self._window_bytes = 0
        self._paused_at: Optional[float] = None
        self._stopped = False
        self._timer = clock.callLater(timeout, self._silent)

    def arrived(self, size: int) -> None:
        """
        C{size} bytes of the body arrived.
        """
        if self._stopped:
            return
        self._window_bytes += size
        if self._paused_at is not None:
            return
        self._timer.reset(self._timeout)
        now = self._clock.seconds()
        elapsed = now - self._window_start
        if elapsed >= self._timeout:
            if self._window_bytes < MIN_BODY_BYTES_PER_SECOND * elapsed:
                self._give_up(f"The request body is arriving too slowly (under {MIN_BODY_BYTES_PER_SECOND} bytes/s).")
                return
            self._window_start = now
            self._window_bytes = 0

    def pause(self) -> None:
        """
        The proxy stopped reading the body (the upstream holds it back): the
        clock stops.
        """
        if self._stopped or self._paused_at is not None:
            return
        self._paused_at = self._clock.seconds()
        self._timer.cancel()

    def resume(self) -> None:
        """
        The proxy reads the body again.
        """
        if self._stopped or self._paused_at is None:
            return
        self._window_start += self._clock.seconds() - self._paused_at
        self._paused_at = None
        self._timer = self._clock.callLater(self._timeout, self._silent)

    def stop(self) -> None:
        """
        The body is complete (or failed): stop watching.
        """
        self._stopped = True
        if self._timer.active():
            self._timer.cancel()

    def _silent(self) -> None:
        self._give_up(f"The request body stopped arriving (nothing for {self._timeout:g} s).")

    def _give_up(self, message: str) -> None:
        self.stop()
        self._too_slow(message)


class ListenerLimits:
    """
    The listening side's limits, from C{general_settings}.
    """

    def __init__(self, general):
        self.header_timeout = general.header_timeout
        self.body_timeout = general.body_timeout
        self.max_request_body_bytes = general.max_request_body_bytes
        # A JSON body is parsed whole: it gets the smaller cap of the two.
        self.max_json_body_bytes = min(general.max_json_body_bytes, general.max_request_body_bytes)
        self.max_control_body_bytes = min(general.max_control_body_bytes, general.max_request_body_bytes)
        self.max_header_bytes = general.max_header_bytes
        self.max_headers = general.max_headers
        self.max_connections = general.max_connections


class ConnectionLimitReached(Protocol):
    """
    Answers a connection over C{max_connections}: 503 in the OpenAI shape,
    then close, without reading a request.
    """

    def connectionMade(self) -> None:
        error = service_unavailable("The proxy has too many open connections; try again shortly.")
        self.transport.write(raw_answer(error))
        self.transport.loseConnection()


class HeadDeadlines:
    """
    The deadlines for request heads of all of a site's connections, checked
    by one timer (a connection costs a dict entry, not a DelayedCall).

    :param reactor: an C{IReactorTime}.
    :param timeout: C{header_timeout}, in seconds.
    """

    def __init__(self, reactor, timeout: float):
        self._reactor = reactor
        self._timeout = timeout
        self._tick = min(1.0, max(timeout / 8, 0.01))
        self._due: Dict[object, float] = {}
        self._timer = None

    def watch(self, connection) -> None:
        """
        Start (or restart) C{connection}'s deadline: past it, its
        C{head_too_slow()} is called once.
        """
        self._due[connection] = self._reactor.seconds() + self._timeout
        if self._timer is None:
            self._timer = self._reactor.callLater(self._tick, self._check)

    def forget(self, connection) -> None:
        """
        Stop watching C{connection}.
        """
        self._due.pop(connection, None)

    def _check(self) -> None:
        self._timer = None
        now = self._reactor.seconds()
        late = [c for c, at in self._due.items() if at <= now]
        for connection in late:
            del self._due[connection]
        for connection in late:
            connection.head_too_slow()
        if self._due and self._timer is None:
            self._timer = self._reactor.callLater(self._tick, self._check)

    def stop(self) -> None:
        """
        Cancel the timer (the site stopped).
        """
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
