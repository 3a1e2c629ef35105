"""
Shared pieces of the hostile-input and fault tests: a watch on everything
logged through twisted.logger, trickling raw clients, and waiting helpers.
"""

from typing import Callable, List

from twisted.internet.defer import ensureDeferred
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial.unittest import TestCase

from tests.passthrough_harness import MASTER_KEY, ProxyHarness, error_of, parse_response, sleep
from tests.scripted_upstream import poll


def event_text(event: dict) -> str:
    """
    :return: what a log observer could write of C{event}: the formatted
        message, any failure's traceback, and every text value.
    """
    parts = [formatEvent(event) or ""]
    failure = event.get("log_failure") or event.get("failure")
    if failure is not None:
        parts.append(failure.getTraceback())
    for value in event.values():
        if isinstance(value, (str, bytes)):
            parts.append(value if isinstance(value, str) else value.decode("latin-1"))
    return "\n".join(parts)


class LogWatch:
    """
    A trial TestCase mix-in recording every twisted.logger event of a test.
    """

    def watch_log(self) -> None:
        """
        Start recording (call from C{setUp}); stops at cleanup.
        """
        self.events: List[dict] = []
        observer = self.events.append
        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)

    def logged_text(self) -> str:
        """
        :return: the text of every recorded event.
        """
        return "\n".join(event_text(e) for e in self.events)

    def assertCleanLog(self) -> None:
        """
        Assert that nothing failed in the log: no failure event, no
        traceback, no error-level event.
        """
        for event in self.events:
            text = event_text(event)
            self.assertNotIn("log_failure", event, text)
            self.assertFalse(event.get("isError"), text)
            self.assertNotIn("Traceback", text)


class HostileTestCase(ProxyHarness, LogWatch, TestCase):
    """
    The pass-through harness with a log watch.
    """

    def setUp(self):
        self.harness()
        self.watch_log()

    async def refused(self, raw: bytes, status: int = 400, wait: float = 5.0) -> dict:
        """
        Send C{raw} on a new connection and assert the proxy answers
        C{status}, with its reason phrase, in the OpenAI shape and closes.

        :return: the error object.
        """
        answer = await self.raw(raw, wait)
        code, headers, body = parse_response(answer)
        self.assertEqual(code, status, (raw[:200], answer[:300]))
        # A real reason phrase, not a placeholder.
        phrase = answer.partition(b"\r\n")[0].split(b" ", 2)[2]
        self.assertNotIn(phrase, (b"Error", b"Unknown", b""))
        self.assertEqual(headers.get("content-type"), [b"application/json"])
        return error_of(body)


def request_head(target: bytes, *headers: bytes, method: bytes = b"GET", key: str = MASTER_KEY) -> bytes:
    """
    :return: a raw request head (with C{Connection: close} and the key)
        for C{target}, ending with the empty line.
    """
    lines = [method + b" " + target + b" HTTP/1.1", b"Host: 127.0.0.1"]
    if key:
        lines.append(b"Authorization: Bearer " + key.encode())
    lines.append(b"Connection: close")
    return b"\r\n".join(lines + list(headers)) + b"\r\n\r\n"


def trickle(client, data: bytes, gap: float, size: int = 1):
    """
    Write C{data} to a raw client C{size} bytes every C{gap} seconds until
    it is written or the connection closes.

    :return: a Deferred firing when done.
    """

    async def run():
        for i in range(0, len(data), size):
            if not client.connected:
                return
            client.transport.write(data[i:i + size])
            await sleep(gap)

    return ensureDeferred(run())


async def wait_until(condition: Callable[[], bool], timeout: float = 3.0) -> bool:
    """
    :return: whether C{condition} became true within C{timeout} seconds.
    """
    return await poll(condition, timeout)
