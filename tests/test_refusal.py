"""
Unit tests of vLLM's queue-cap refusals: telling them apart
(L{dheera_tx.upstream.refusal}), reading and holding their body, and the
refusing replica held saturated by the router (L{Router.refused}) so that
the gateway queue (L{dheera_tx.routing.flow}) holds calls, on a simulated
clock.
"""

from twisted.internet.defer import CancelledError
from twisted.internet.error import ConnectionAborted
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from dheera_tx.config import config_from_dict
from dheera_tx.routing.flow import GatewayQueue
from dheera_tx.routing.router import Router
from dheera_tx.upstream.refusal import REFUSAL_LIMIT, held, may_be_refusal, read_body, refusal_reason
from dheera_tx.upstream.response import UpstreamResponse
from tests.vllm_admission import refusal_body

JSON = [(b"content-type", b"application/json"), (b"content-length", b"187")]


def response(code=503, headers=JSON, length=187, connection=None) -> UpstreamResponse:
    return UpstreamResponse(connection, code, b"Service Unavailable", (1, 1), list(headers), length, 0)


class _Connection:
    """
    What an L{UpstreamResponse} uses of its connection; C{abort} ends the
    body with a failure, as a lost connection does (at once, or later when
    C{later} is set, as a TCP connection does).
    """

    def __init__(self, later: bool = False):
        self.response = None
        self.aborted = False
        self.later = later

    def pause_reading(self):
        pass

    def resume_reading(self):
        pass

    def abort(self):
        self.aborted = True
        if not self.later:
            self.response._end(Failure(ConnectionAborted()))


class RecognitionTests(SynchronousTestCase):
    """
    L{may_be_refusal} and L{refusal_reason}.
    """

    def test_candidates(self):
        """
        Only a 503 with a JSON body of declared length up to
        L{REFUSAL_LIMIT} is looked at.
        """
        self.assertTrue(may_be_refusal(response()))
        self.assertTrue(may_be_refusal(response(headers=[(b"Content-Type", b"application/json; charset=utf-8")])))
        self.assertFalse(may_be_refusal(response(code=500)))
        self.assertFalse(may_be_refusal(response(code=200)))
        self.assertFalse(may_be_refusal(response(headers=[(b"content-type", b"text/html")])))
        self.assertFalse(may_be_refusal(response(headers=[])))
        self.assertFalse(may_be_refusal(response(length=None)))
        self.assertFalse(may_be_refusal(response(length=0)))
        self.assertFalse(may_be_refusal(response(length=REFUSAL_LIMIT + 1)))

    def test_vllm_refusals(self):
        """
        vLLM's two queue-cap refusals are recognised, with their reason.
        """
        self.assertEqual(refusal_reason(refusal_body("max_num_queued_reqs")), "max_num_queued_reqs")
        self.assertEqual(refusal_reason(refusal_body("max_num_queued_tokens")), "max_num_queued_tokens")

    def test_other_503s(self):
        """
        Other 503 bodies are not refusals: vLLM's C{RetryableRequestError}
        (the call had started), an HTML page, other JSON.
        """
        retryable = b'{"error":{"message":"KV load failed","type":"ServiceUnavailableError","param":null,"code":503}}'
        for body in (retryable, b"<html>503</html>", b'{"error":"Service Unavailable"}', b"[]", b'"x"', b"\xff"):
            self.assertIsNone(refusal_reason(body), body)


class ReadTests(SynchronousTestCase):
    """
    L{read_body} and L{held}.
    """

    def test_read_and_held(self):
        """
        The body is read whole; the held copy has the same head and
        delivers the same bytes, then ends.
        """
        answer = response()
        body = refusal_body("max_num_queued_reqs")
        answer._hold(body[:50])
        d = read_body(Clock(), answer, 5.0)
        self.assertNoResult(d)
        answer._hold(body[50:])
        answer._end(None)
        self.assertEqual(self.successResultOf(d), body)
        copy = held(answer, body)
        self.assertEqual((copy.code, copy.headers, copy.length), (503, answer.headers, answer.length))
        got, ended = [], []
        sink = type("Sink", (), {"data_received": lambda s, data: got.append(data),
                                 "body_ended": lambda s, reason: ended.append(reason)})()
        copy.deliver(sink)
        self.assertEqual((b"".join(got), ended), (body, [None]))

    def test_timeout_aborts(self):
        """
        A body that does not end within the timeout has its connection
        aborted, and the read fails.
        """
        clock = Clock()
        connection = _Connection()
        answer = connection.response = response(connection=connection)
        d = read_body(clock, answer, 5.0)
        clock.advance(4.9)
        self.assertNoResult(d)
        clock.advance(0.2)
        self.assertTrue(connection.aborted)
        self.failureResultOf(d, ConnectionAborted)

    def test_cancel_aborts(self):
        """
        Cancelling the read (the client left) aborts the connection and
        stops the timer; the connection's loss, reported later, is
        absorbed.
        """
        clock = Clock()
        connection = _Connection(later=True)
        answer = connection.response = response(connection=connection)
        d = read_body(clock, answer, 5.0)
        d.cancel()
        self.assertTrue(connection.aborted)
        self.failureResultOf(d, CancelledError)
        self.assertEqual(clock.getDelayedCalls(), [])
        answer._end(Failure(ConnectionAborted()))


def _router(replicas=2, interval=1.0):
    config = config_from_dict({
        "model_list": [
            {"model_name": "m", "dheera_ai_params": {"model": "hosted_vllm/m", "api_base": f"http://127.0.0.1:{9000 + i}"}}
            for i in range(replicas)
        ],
        "router_settings": {"metrics_interval": interval, "routing_strategy": "least-busy"},
    })
    clock = Clock()
    return clock, Router(config, now=clock.seconds), config


IDLE = b"vllm:num_requests_running 0\nvllm:num_requests_waiting 0\n"


class RefusedTests(SynchronousTestCase):
    """
    L{Router.refused}: saturated until a later sample, or a short hold.
    """

    def test_until_a_later_sample(self):
        """
        A refusing replica is saturated; a sample taken before the refusal
        does not end that, one taken after does.
        """
        clock, router, _ = _router()
        replica = router.route("m").replicas[0]
        router.record_metrics(replica, IDLE, clock.seconds())
        clock.advance(0.1)
        router.refused(replica)
        self.assertTrue(router.saturated(replica))
        self.assertFalse(router.saturated(router.route("m").replicas[1]))
        clock.advance(0.5)
        self.assertTrue(router.saturated(replica))
        router.record_metrics(replica, IDLE, clock.seconds())
        self.assertFalse(router.saturated(replica))

    def test_hold_without_samples(self):
        """
        Without samples (a model that is not scraped), the refusal holds
        for 3 scrape intervals.
        """
        clock, router, _ = _router(replicas=1, interval=0.5)
        replica = router.route("m").replicas[0]
        router.refused(replica)
        clock.advance(1.49)
        self.assertTrue(router.saturated(replica))
        clock.advance(0.02)
        self.assertFalse(router.saturated(replica))

    def test_choice_avoids_refusing_replica(self):
        """
        Under flow control, a new call goes to the replica that did not
        refuse, though the refusing one is less busy.
        """
        clock, router, config = _router()
        GatewayQueue(clock, router, 10, 30.0)
        route = router.route("m")
        first, second = route.replicas
        router.started(second)
        router.refused(first)
        self.assertEqual(router.pick(route), second)

    def test_gateway_queue_holds_calls(self):
        """
        When the only replica refused, the next call waits in the gateway
        queue instead of being sent, and goes when the hold ends.
        """
        clock, router, config = _router(replicas=1, interval=1.0)
        queue = GatewayQueue(clock, router, 10, 30.0, poll_interval=0.2)
        route = router.route("m")
        router.refused(route.replicas[0])
        d = queue.admit(route, "a")
        self.assertIsNotNone(d)
        clock.advance(2.8)
        self.assertNoResult(d)
        clock.advance(0.4)
        self.assertIsNone(self.successResultOf(d))
