"""
Tests for L{dheera_tx.routing.model_choice.MultipartModelWatch}: every
C{model} part of a streamed form is checked against the model authorized.
"""

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from dheera_tx.errors import ProxyError
from dheera_tx.routing.model_choice import MultipartModelWatch
from tests.passthrough_harness import multipart

BOUNDARY = b"xYz"


def _feed(watch: MultipartModelWatch, body: bytes, cuts) -> None:
    points = sorted(set(c % (len(body) + 1) for c in cuts))
    start = 0
    for point in points + [len(body)]:
        watch.feed(body[start:point])
        start = point


class MultipartModelWatchTests(SynchronousTestCase):
    """
    The watch sees model parts wherever they sit and however the body is
    chunked.
    """

    @settings(max_examples=300, deadline=None)
    @given(st.lists(st.integers(0, 5000), max_size=12), st.booleans(), st.sampled_from([b"alpha", b"beta", b""]))
    def test_model_after_file(self, cuts, authorize_first, model):
        """
        A C{model} part after the file part is refused unless it names the
        authorized model, whether it arrived before the authorization or
        after it, whatever the chunk boundaries.
        """
        body = multipart(BOUNDARY, [("file", b"\x01\r\n--x" * 500, "a.wav"), ("model", model, None)])
        watch = MultipartModelWatch(BOUNDARY)
        if authorize_first:
            watch.authorize("alpha")
        try:
            _feed(watch, body, cuts)
            if not authorize_first:
                watch.authorize("alpha")
        except ProxyError as e:
            self.assertNotEqual(model, b"alpha")
            self.assertEqual((e.status, e.param), (400, "model"))
        else:
            self.assertEqual(model, b"alpha")

    def test_no_model_part(self):
        """
        A form without a C{model} part passes, authorized for any model.
        """
        watch = MultipartModelWatch(BOUNDARY)
        watch.authorize("alpha")
        _feed(watch, multipart(BOUNDARY, [("file", b"abc", "a.wav"), ("language", b"en", None)]), [2, 40])

    def test_overlong_model(self):
        """
        A model part longer than any model name never matches.
        """
        watch = MultipartModelWatch(BOUNDARY)
        watch.authorize("a" * 2000)
        self.assertRaises(ProxyError, _feed, watch, multipart(BOUNDARY, [("model", b"a" * 2000, None)]), [100, 900])
