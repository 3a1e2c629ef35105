"""
Tests for L{dheera_tx.http.paths}: which raw request targets may reach vLLM.
"""

from hypothesis import given
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from dheera_tx.http.paths import full_path_problem, is_passthrough, path_problem, split_target

ESCAPES = [
    b"/../metrics",
    b"/v1/../../admin",
    b"/%2e%2e/x",
    b"/%2E%2e/x",
    b"/.%2e/x",
    b"/%2e/x",
    b"/./x",
    b"/..;/x",
    b"/..%3b/x",
    b"/a/..",
    b"/a%2fb",
    b"/a%2F..%2Fb",
    b"/a%5cb",
    b"/a\\b",
    b"/a%00b",
    b"/a\x00b",
    b"/a\x01b",
    b"/a%0ab",
    b"//evil.example/x",
    b"/a//b",
    b"/%c0%ae%c0%ae/x",
    b"/%c0%af",
    b"/a b",
    b"/x%zz",
    b"/x%2",
    b"/a#frag",
]


class PathProblemTests(SynchronousTestCase):
    """
    Tests for L{path_problem}.
    """

    def test_ordinary_paths_pass(self):
        """
        vLLM's ordinary routes, with trailing slashes, queries and harmless
        escapes, may be forwarded.
        """
        for path, query in [
            (b"/v1/chat/completions", b""),
            (b"/metrics", b""),
            (b"/", b""),
            (b"/v1/models/", b""),
            (b"/sleep", b"?level=1"),
            (b"/v1/responses/resp_1", b"?stream=true"),
            (b"/a%20b", b""),
            (b"/caf%C3%A9", b""),
            (b"/v1/x", b"?a=%2F&b=c"),
            (b"/...", b""),
        ]:
            self.assertIsNone(path_problem(path, query), (path, query))

    def test_escape_corpus_refused(self):
        """
        Every path-escape form of the corpus is refused with a reason.
        """
        for path in ESCAPES:
            self.assertIsInstance(path_problem(path), str, path)

    def test_control_bytes_in_query_refused(self):
        """
        Control bytes in the query, raw or encoded, are refused.
        """
        self.assertIsInstance(path_problem(b"/x", b"?a=\x00"), str)
        self.assertIsInstance(path_problem(b"/x", b"?a=%0d%0aX-Injected:1"), str)

    @given(st.binary(max_size=40))
    def test_refused_or_safe(self, raw):
        """
        For any bytes, a path that passes the check has no dot segment or
        empty segment once decoded and no control byte or backslash, so it
        cannot climb out of the deployment's api_base.
        """
        path = b"/" + raw
        if path_problem(path) is not None:
            return
        from urllib.parse import unquote_to_bytes

        decoded = unquote_to_bytes(path)
        self.assertNotIn(b"\\", decoded)
        self.assertFalse(any(b < 0x20 or b == 0x7F for b in decoded))
        segments = decoded.split(b"/")[1:]
        for segment in segments[:-1]:
            self.assertNotEqual(segment, b"")
        for segment in segments:
            self.assertNotIn(segment.split(b";")[0], (b".", b".."))


    @given(st.text(alphabet="/._-aZ09%;?=&~", max_size=30), st.text(alphabet="?=&%._-a~#", max_size=10))
    def test_fast_path_agrees(self, path, query):
        """
        The shortcut for plain targets gives the full check's verdict: it
        never lets through a target the full check refuses.
        """
        raw, q = ("/" + path).encode(), query.encode()
        self.assertEqual(path_problem(raw, q) is None, full_path_problem(raw, q) is None, (raw, q))


class SplitTargetTests(SynchronousTestCase):
    """
    Tests for L{is_passthrough} and L{split_target}.
    """

    def test_prefix(self):
        """
        Only C{/vllm} itself and targets below it are pass-through calls.
        """
        self.assertTrue(is_passthrough(b"/vllm/v1/models"))
        self.assertTrue(is_passthrough(b"/vllm"))
        self.assertTrue(is_passthrough(b"/vllm?model=x"))
        self.assertFalse(is_passthrough(b"/vllmx/v1"))
        self.assertFalse(is_passthrough(b"/key/generate"))
        self.assertFalse(is_passthrough(b"http://evil/vllm/v1/models"))

    def test_split(self):
        """
        The upstream path keeps its raw bytes; the query keeps its C{?}.
        """
        self.assertEqual(split_target(b"/vllm/v1/chat/completions?x=1"), (b"/v1/chat/completions", b"?x=1"))
        self.assertEqual(split_target(b"/vllm"), (b"/", b""))
        self.assertEqual(split_target(b"/vllm/a%20b"), (b"/a%20b", b""))
