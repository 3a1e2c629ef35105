"""
A team change across real proxy processes: proxy A (one process) and proxy
B (C{--workers 2}) share one C{redis-server}; a team's priority changed
through A's API reaches the calls B's workers make with a key they have
cached, within a second (their cache would otherwise trust the old record
for 10 s).  The deployment sets C{forward_priority}, so the fake vLLM sees
each call's effective priority.
"""

import time

from twisted.internet.defer import Deferred, DeferredList
from twisted.trial.unittest import TestCase

from tests.passthrough_harness import sleep
from tests.proxy_process import ProxyProcess
from tests.redis_server import RedisServer
from tests.test_gateway_processes import MODEL, ProcessHarness

# Calls through B that must all see a change: with two workers, the chance
# that they all reach the same one is 1 in 2**(CALLS - 1).
CALLS = 8


class FleetTeamTests(ProcessHarness, TestCase):
    """
    A team's priority, changed through one proxy, applied by every worker
    of another.
    """

    async def setUp(self):
        await self.start_upstream()
        self.server = RedisServer().start()
        self.addCleanup(self.server.cleanup)
        config = self.proxy_config(self.server.url)
        config["model_list"][0]["dheera_ai_params"]["forward_priority"] = True
        starting = [
            Deferred.fromCoroutine(self.start_proxy(config)),
            Deferred.fromCoroutine(self.start_proxy(config, extra_args=["--workers", "2"])),
        ]
        started = await DeferredList(starting, consumeErrors=True)
        for ok, result in started:
            if not ok:
                result.raiseException()
        (_, self.a), (_, self.b) = started

    async def priority_seen(self, proxy: ProxyProcess, key: str) -> int:
        """
        One chat call with C{key} through C{proxy} (a new connection each
        time, so it may reach either worker).

        :return: the C{priority} vLLM received (0 when absent: vLLM's
            default, which the proxy does not write).
        """
        document = {"model": MODEL, "messages": [{"role": "user", "content": "hello"}]}
        status, content = await self.call(proxy, "POST", "/vllm/v1/chat/completions", key, document)
        self.assertEqual(status, 200, content)
        chats = [r for r in self.upstream.received if r.uri.startswith(b"/v1/chat/completions")]
        return chats[-1].json.get("priority", 0)

    async def test_team_update_reaches_every_worker(self):
        """
        After B's workers served (and cached) a key of team C{red} at the
        team's priority 2, the team is set to priority 8 through A: every
        call through B that starts more than 1 s later carries 8, and
        C{CALLS} calls in a row through B all do.
        """
        await self.admin(self.a, "/team/new", {"team_id": "red", "priority": 2})
        key = (await self.admin(self.a, "/key/generate", {"team_id": "red"}))["key"]
        for _ in range(CALLS):
            self.assertEqual(await self.priority_seen(self.b, key), 2)
        await self.admin(self.a, "/team/update", {"team_id": "red", "priority": 8})
        changed = time.monotonic()
        while True:
            started = time.monotonic() - changed
            seen = await self.priority_seen(self.b, key)
            if seen == 8:
                break
            self.assertEqual(seen, 2)
            if started > 1.0:
                self.fail(f"a call made {started:.2f} s after the team update still had priority {seen}")
            await sleep(0.05)
        self.assertEqual([await self.priority_seen(self.b, key) for _ in range(CALLS)], [8] * CALLS)
