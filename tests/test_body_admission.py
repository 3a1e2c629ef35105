"""
Unit tests of what bounds the work a call body costs before admission:
L{dheera_tx.routing.model_choice.parse_json_body} (the value cap, the
top-level walk that finds a second C{model}) and
L{dheera_tx.accounting.full_windows.FullWindows} (keys over their rate
window refused before their body).
"""

import attr
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from dheera_tx.accounting.full_windows import FullWindows, WindowFull
from dheera_tx.errors import ProxyError
from dheera_tx.routing.model_choice import MAX_JSON_VALUES, parse_json_body


class ParseJSONBodyTests(SynchronousTestCase):
    """
    L{parse_json_body}.
    """

    def assertRefused(self, body: bytes, status: int, words: str) -> None:
        error = self.assertRaises(ProxyError, parse_json_body, body)
        self.assertEqual(error.status, status)
        self.assertIn(words, error.message)

    def test_too_many_values(self):
        """
        A body holding more than L{MAX_JSON_VALUES} values is refused (413)
        without being parsed; one just under is parsed.
        """
        self.assertRefused(b'{"x": [' + b"0," * MAX_JSON_VALUES + b"0]}", 413, str(MAX_JSON_VALUES))
        document = parse_json_body(b'{"x": [' + b"0," * (MAX_JSON_VALUES - 10) + b"0]}")
        self.assertEqual(len(document["x"]), MAX_JSON_VALUES - 9)

    def test_big_strings_are_cheap(self):
        """
        A large body of few values (a base64 image) is not refused.
        """
        body = b'{"model": "m", "image": "' + b"QUJD" * (2 * 1024 * 1024) + b'"}'
        self.assertEqual(parse_json_body(body)["model"], "m")

    def test_model_twice_at_top_level(self):
        """
        C{model} twice at the top level, spelled plainly or with escapes,
        is refused; inside nested values it is data, and allowed.
        """
        self.assertRefused(b'{"model": "a", "model": "b"}', 400, "more than once")
        self.assertRefused(b'{"model": "a", "\\u006dodel": "b"}', 400, "more than once")
        document = parse_json_body(b'{"model": "a", "tools": [{"model": 1, "model": 2}], "t": "\\u00e9"}')
        self.assertEqual(document, {"model": "a", "tools": [{"model": 2}], "t": "\u00e9"})

    def test_not_an_object(self):
        """
        Invalid JSON and JSON that is not an object get their own messages,
        through either parsing path.
        """
        for body in (b"nope", b'{"a": 1,}', b'{"a" 1}', b'{"a": 1} x', b'{"\\u0061": 1', b""):
            self.assertRefused(body, 400, "not valid JSON")
        for body in (b"[1]", b'"\\u0061"', b"3"):
            self.assertRefused(body, 400, "must be a JSON object")

    def test_nested_too_deeply(self):
        """
        Nesting deeper than the parser's recursion limit is a 400, through
        either parsing path.
        """
        deep = b"[" * 100_000 + b"]" * 100_000
        self.assertRefused(b'{"a": ' + deep + b"}", 400, "nested too deeply")
        self.assertRefused(b'{"\\u0061": ' + deep + b"}", 400, "nested too deeply")


@attr.s(frozen=True)
class Record:
    token = attr.ib()


class FullWindowsTests(SynchronousTestCase):
    """
    L{FullWindows}.
    """

    def test_refused_until_window_reopens(self):
        """
        A key whose window was full is refused (429, with the seconds left
        in C{Retry-After}) until it reopens, then let through.
        """
        clock = Clock()
        windows = FullWindows(clock)
        record = Record("t1")
        windows.check(record)
        windows.remember(record, WindowFull("Rate limit exceeded.", 30_000))
        clock.advance(10)
        error = self.assertRaises(WindowFull, windows.check, record)
        self.assertEqual((error.status, error.headers["Retry-After"]), (429, "21"))
        clock.advance(20.5)
        windows.check(record)
        windows.check(record)

    def test_other_record_not_refused(self):
        """
        A new record of the same key (the key was edited: its cached record
        replaced) is not refused on the old record's memo.
        """
        windows = FullWindows(Clock())
        windows.remember(Record("t1"), WindowFull("Rate limit exceeded.", 30_000))
        windows.check(Record("t1"))
        windows.check(Record("t1"))

    def test_bounded(self):
        """
        At most C{max_entries} keys are remembered.
        """
        windows = FullWindows(Clock(), max_entries=3)
        records = [Record(f"t{i}") for i in range(5)]
        for record in records:
            windows.remember(record, WindowFull("Rate limit exceeded.", 30_000))
        windows.check(records[0])
        self.assertRaises(WindowFull, windows.check, records[4])
        self.assertEqual(len(windows._full), 3)
