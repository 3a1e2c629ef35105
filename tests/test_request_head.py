"""
Unit tests for L{dheera_tx.http.request_head} and L{dheera_tx.http.listener_limits.HeadDeadlines}.
"""

import attr
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from dheera_tx.config import GeneralSettings
from dheera_tx.errors import ProxyError
from dheera_tx.http.listener_limits import HeadDeadlines, ListenerLimits
from dheera_tx.http.request_head import RequestHead, RequestLine, framing


def _limits(**settings) -> ListenerLimits:
    return ListenerLimits(attr.evolve(GeneralSettings(), **settings))


class RequestHeadTests(SynchronousTestCase):
    """
    The proxy's own rules on a request head.
    """

    def _refused(self, head: RequestHead, *headers) -> ProxyError:
        with self.assertRaises(ProxyError) as caught:
            for name, value in headers:
                head.add_header(name, value)
        return caught.exception

    def test_limits(self):
        """
        A target over C{max_header_bytes} is 414; headers over it in total,
        or more than C{max_headers} of them, are 431.
        """
        head = RequestHead(_limits(max_header_bytes=100, max_headers=3))
        head.url = [b"/" + b"a" * 100]
        self.assertEqual(self._refused(head, (b"Host", b"x")).status, 414)
        head = RequestHead(_limits(max_header_bytes=100, max_headers=3))
        head.url = [b"/a"]
        self.assertEqual(self._refused(head, (b"X-A", b"b" * 60), (b"X-B", b"c" * 60)).status, 431)
        head = RequestHead(_limits(max_header_bytes=1000, max_headers=3))
        head.url = [b"/a"]
        self.assertEqual(self._refused(head, *[(b"X-%d" % i, b"v") for i in range(4)]).status, 431)

    def test_single_headers_and_chunked(self):
        """
        A second Authorization (any case) and a Transfer-Encoding other
        than plain C{chunked} are 400; repeated ordinary headers are kept
        in order.
        """
        head = RequestHead(_limits())
        self.assertEqual(self._refused(head, (b"Authorization", b"a"), (b"authorization", b"b")).status, 400)
        head = RequestHead(_limits())
        self.assertEqual(self._refused(head, (b"Transfer-Encoding", b"gzip, chunked")).status, 400)
        head = RequestHead(_limits())
        head.add_header(b"X-A", b"1")
        head.add_header(b"x-a", b"2")
        head.add_header(b"Transfer-Encoding", b"chunked")
        self.assertEqual(head.headers, [(b"X-A", b"1"), (b"x-a", b"2"), (b"Transfer-Encoding", b"chunked")])

    def test_framing(self):
        """
        Content-Length, chunked (which wins) and Expect: 100-continue are
        read from a complete head.
        """
        self.assertEqual(framing([(b"Content-Length", b"12")]), (12, False, False))
        self.assertEqual(framing([(b"transfer-encoding", b"chunked"), (b"Expect", b"100-Continue")]), (None, True, True))
        self.assertEqual(framing([]), (None, False, False))


class RequestLineTests(SynchronousTestCase):
    """
    L{RequestLine}: exactly two single spaces, however the line is split.
    """

    def test_spaces(self):
        """
        One space between the parts passes; two spaces anywhere, or a
        space in the target, do not; leading empty lines are skipped.
        """
        for line, ok in [
            (b"GET /a HTTP/1.1\r\n", True),
            (b"\r\n\r\nGET /a HTTP/1.1\r\nHost: a b\r\n", True),
            (b"GET /a  HTTP/1.1\r\n", False),
            (b"GET  /a HTTP/1.1\r\n", False),
            (b"GET /a b HTTP/1.1\r\n", False),
        ]:
            check = RequestLine(100)
            check.start()
            self.assertEqual(check.feed(line), ok, line)
            self.assertFalse(check.checking)

    def test_split_across_reads(self):
        """
        A line arriving a byte at a time is judged when it is complete.
        """
        check = RequestLine(100)
        check.start()
        for byte in b"GET /a  HTTP/1.1":
            self.assertTrue(check.feed(bytes([byte])))
            self.assertTrue(check.checking)
        self.assertFalse(check.feed(b"\r\n"))


class HeadDeadlinesTests(SynchronousTestCase):
    """
    L{HeadDeadlines} on a fake clock.
    """

    def test_late_connection_called_once(self):
        """
        A connection still watched when its deadline passes is told once,
        at most one tick late; a forgotten one is not; no timer is left
        when nothing is watched.
        """
        clock = Clock()
        deadlines = HeadDeadlines(clock, 1.0)
        told = []

        class Connection:
            def __init__(self, name):
                self.name = name

            def head_too_slow(self):
                told.append(self.name)

        slow, quick = Connection("slow"), Connection("quick")
        deadlines.watch(slow)
        deadlines.watch(quick)
        clock.advance(0.5)
        deadlines.forget(quick)
        clock.advance(0.5)
        clock.advance(0.125)
        self.assertEqual(told, ["slow"])
        clock.advance(5)
        self.assertEqual(told, ["slow"])
        self.assertEqual(clock.getDelayedCalls(), [])
