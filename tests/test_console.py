"""
The console's security over plain HTTP: sessions, cookies, CSRF, the
Content-Security-Policy, what a virtual key may see, and that no key shows
after sign-in.  Real loopback sockets, a real Redis and the fake vLLM.
"""

import hashlib
import io
import json
import re
from typing import Optional
from urllib.parse import urlencode

from twisted.trial.unittest import SynchronousTestCase, TestCase

from dheera_tx.config import config_from_dict
from tests.passthrough_harness import MASTER_KEY, deployment
from tests.scripted_upstream import sleep
from tests.test_gateway_keys import ALLOWED, GatewayHarness


class ConsoleHarness(GatewayHarness):
    """
    The gateway with Redis and the redis_stream sink, and a browser-like
    client that keeps the console's cookie.
    """

    async def setUp(self):
        await self.start_gateway(callbacks=("json_log", "redis_stream"))
        # The same gateway again, with prices, so that calls have a spend.
        data = {
            "model_list": [deployment(ALLOWED, "tiny", self.upstream, input_cost_per_token=0.00001, output_cost_per_token=0.00002)],
            "general_settings": {"master_key": MASTER_KEY, "database_url": self.server.url},
            "dheera_ai_settings": {"callbacks": ["json_log", "redis_stream"]},
        }
        self.json_log = io.StringIO()
        gateway = self.assemble(config_from_dict(data), stdout=self.json_log)
        await gateway.key_store.subscription.whenActive()
        # The deployments page probes the upstream with the prober's pool.
        self.addCleanup(self.gateway.prober.stop)
        self.cookie: Optional[str] = None

    async def ui(self, method: bytes, path: str, form: Optional[dict] = None, headers: Optional[dict] = None, cookie: Optional[str] = None):
        """
        :return: C{(status, headers object, body text)}.
        """
        h = dict(headers or {})
        cookie = cookie if cookie is not None else self.cookie
        if cookie:
            h["cookie"] = f"dheera_console={cookie}"
        body = None
        if form is not None:
            h["content-type"] = "application/x-www-form-urlencoded"
            body = urlencode(form).encode()
        response, content = await self.request(method, path, h, body)
        return response.code, response.headers, content.decode("utf-8")

    async def sign_in(self, key: str) -> str:
        status, headers, _ = await self.ui(b"POST", "/ui/login", {"key": key}, cookie="")
        self.assertEqual(status, 303)
        cookie = headers.getRawHeaders(b"set-cookie")[0].decode()
        self.cookie = re.match(r"dheera_console=([^;]+)", cookie).group(1)
        return cookie

    async def csrf(self, path: str = "/ui/keys") -> str:
        _, _, page = await self.ui(b"GET", path)
        return re.search(r'name="csrf" value="([^"]+)"', page).group(1)


class ConsoleSecurityTests(ConsoleHarness, TestCase):
    """
    Sessions and the rules every page follows.
    """

    async def test_sign_in_makes_a_server_side_session(self):
        """
        Signing in with the master key sets an opaque cookie (HttpOnly,
        SameSite=Strict, Path=/ui, expiring; not Secure on plain HTTP) that
        is not the key, and Redis holds the session under the SHA-256 of
        the cookie's value, with an expiry.
        """
        cookie = await self.sign_in(MASTER_KEY)
        for flag in ("HttpOnly", "SameSite=Strict", "Path=/ui", "Max-Age="):
            self.assertIn(flag, cookie)
        self.assertNotIn("Secure", cookie)
        self.assertNotIn(MASTER_KEY, cookie)
        name = "dheera:console:session:" + hashlib.sha256(self.cookie.encode()).hexdigest()
        self.assertEqual(await self.gateway_redis("HGET", name, "kind"), "master")
        self.assertGreater(await self.gateway_redis("TTL", name), 0)

    async def gateway_redis(self, *command):
        from twisted.internet import reactor

        from dheera_tx.redis.client import connect

        redis = connect(reactor, self.server.url)
        try:
            return await redis.execute(*command)
        finally:
            await redis.disconnect()

    async def test_pages_need_a_session(self):
        """
        Every page without a session (or with a made-up one) sends the
        browser to the sign-in page.
        """
        for path in ("/ui/keys", "/ui/spend", "/ui/deployments", "/ui/calls", "/ui/me", "/ui/calls.json", "/ui/spend.csv"):
            for cookie in ("", "made-up-session"):
                status, headers, _ = await self.ui(b"GET", path, cookie=cookie)
                self.assertEqual(status, 303, path)
                self.assertEqual(headers.getRawHeaders(b"location"), [b"/ui/login"])

    async def test_wrong_key_refused(self):
        """
        A wrong key gets the sign-in page again with 401 and no cookie.
        """
        status, headers, page = await self.ui(b"POST", "/ui/login", {"key": "sk-wrong"}, cookie="")
        self.assertEqual(status, 401)
        self.assertIsNone(headers.getRawHeaders(b"set-cookie"))
        self.assertIn("not valid", page)

    async def test_sign_in_rate_limited(self):
        """
        More than 10 sign-in attempts a minute from one address get 429
        with Retry-After, even with the right key.
        """
        for _ in range(10):
            await self.ui(b"POST", "/ui/login", {"key": "sk-wrong"}, cookie="")
        status, headers, _ = await self.ui(b"POST", "/ui/login", {"key": MASTER_KEY}, cookie="")
        self.assertEqual(status, 429)
        self.assertEqual(headers.getRawHeaders(b"retry-after"), [b"60"])

    async def test_csrf_and_origin_checked(self):
        """
        A state-changing form without the session's CSRF token, with a wrong
        one, or from another origin is refused (403) and changes nothing;
        with the token it works.
        """
        await self.sign_in(MASTER_KEY)
        csrf = await self.csrf()
        for form, headers in (
            ({"key_alias": "x1"}, {}),
            ({"key_alias": "x2", "csrf": "wrong"}, {}),
            ({"key_alias": "x3", "csrf": csrf}, {"origin": "http://evil.example"}),
        ):
            status, _, _ = await self.ui(b"POST", "/ui/keys", form, headers)
            self.assertEqual(status, 403)
        listed = await self.admin("/key/list?return_full_object=true", method=b"GET")
        self.assertEqual(listed["total_count"] if "total_count" in listed else len(listed["keys"]), 0)
        status, _, page = await self.ui(b"POST", "/ui/keys", {"key_alias": "ok", "csrf": csrf, "models": ALLOWED})
        self.assertEqual(status, 200)
        self.assertIn('id="new-key"', page)

    async def test_new_key_shown_once_and_no_key_anywhere_else(self):
        """
        A key made in the console is in that one answer; no other page
        holds it, the master key, or anything that looks like a key.
        """
        await self.sign_in(MASTER_KEY)
        _, _, page = await self.ui(b"POST", "/ui/keys", {"key_alias": "once", "csrf": await self.csrf()})
        key = re.search(r'id="new-key">(sk-[^<]+)<', page).group(1)
        await self.assertWorks(key)
        for path in ("/ui/keys", "/ui/spend", "/ui/deployments", "/ui/calls", "/ui/calls.json", "/ui/spend.csv?group_by=key"):
            status, _, body = await self.ui(b"GET", path)
            self.assertEqual(status, 200, path)
            self.assertNotIn(key, body)
            self.assertNotIn(MASTER_KEY, body)
            self.assertIsNone(re.search(r"sk-[A-Za-z0-9_-]{20,}", body), path)

    async def test_security_headers_on_every_answer(self):
        """
        Pages, redirects, static files and refusals carry the strict CSP,
        nosniff, no-referrer, DENY framing and no-store.
        """
        await self.sign_in(MASTER_KEY)
        for method, path in ((b"GET", "/ui/keys"), (b"GET", "/ui/login"), (b"GET", "/ui/static/console.js"), (b"POST", "/ui/keys")):
            _, headers, _ = await self.ui(method, path, {} if method == b"POST" else None)
            csp = headers.getRawHeaders(b"content-security-policy")[0]
            self.assertIn(b"default-src 'none'", csp)
            self.assertIn(b"script-src 'self'", csp)
            self.assertIn(b"frame-ancestors 'none'", csp)
            self.assertEqual(headers.getRawHeaders(b"x-content-type-options"), [b"nosniff"])
            self.assertEqual(headers.getRawHeaders(b"x-frame-options"), [b"DENY"])

    async def test_virtual_key_sees_only_its_own_page(self):
        """
        A virtual key's session lands on its own page (its spend, no other
        key); the admin pages send it back there, and admin forms with its
        own valid CSRF token change nothing.
        """
        mine = await self.generate(key_alias="mine", models=[ALLOWED])
        other = await self.generate(key_alias="other")
        await self.sign_in(mine["key"])
        status, _, page = await self.ui(b"GET", "/ui/me")
        self.assertEqual(status, 200)
        self.assertIn(mine["token"][:12], page)
        self.assertNotIn(other["token"][:12], page)
        csrf = re.search(r'name="csrf" value="([^"]+)"', page).group(1)
        for path in ("/ui/keys", "/ui/spend", "/ui/deployments", "/ui/calls", "/ui/calls.json"):
            status, headers, _ = await self.ui(b"GET", path)
            self.assertEqual((status, headers.getRawHeaders(b"location")), (303, [b"/ui/me"]), path)
        status, _, _ = await self.ui(b"POST", f"/ui/keys/{other['token']}/block", {"csrf": csrf})
        self.assertEqual(status, 303)
        info = await self.admin(f"/key/info?key={other['token']}", method=b"GET")
        self.assertFalse(info["info"]["blocked"])

    async def test_blocking_or_regenerating_ends_sessions(self):
        """
        Blocking a key through the JSON API ends its console sessions at
        once (unblocking does not bring them back); so does regenerating.
        """
        for action in ("block", "regenerate"):
            made = await self.generate(key_alias=f"k-{action}")
            await self.sign_in(made["key"])
            self.assertEqual((await self.ui(b"GET", "/ui/me"))[0], 200)
            await self.admin(f"/key/{action}", {"key": made["token"]})
            if action == "block":
                await self.admin("/key/unblock", {"key": made["token"]})
            status, headers, _ = await self.ui(b"GET", "/ui/me")
            self.assertEqual((status, headers.getRawHeaders(b"location")), (303, [b"/ui/login"]), action)

    async def test_sign_out(self):
        """
        Signing out clears the cookie and deletes the session: the old
        cookie no longer opens any page.
        """
        await self.sign_in(MASTER_KEY)
        old = self.cookie
        status, headers, _ = await self.ui(b"POST", "/ui/logout", {"csrf": await self.csrf()})
        self.assertEqual(status, 303)
        self.assertIn(b"Max-Age=0", headers.getRawHeaders(b"set-cookie")[0])
        status, _, _ = await self.ui(b"GET", "/ui/keys", cookie=old)
        self.assertEqual(status, 303)

    async def test_calls_and_spend(self):
        """
        A call made with a key shows on the live calls page and in its JSON
        feed, and in the spend CSV grouped by model.
        """
        made = await self.generate(key_alias="caller", models=[ALLOWED])
        await self.assertWorks(made["key"])
        await self.sign_in(MASTER_KEY)
        for _ in range(200):
            _, _, feed = await self.ui(b"GET", "/ui/calls.json")
            if json.loads(feed)["calls"]:
                break
            await sleep(0.02)
        calls = json.loads(feed)["calls"]
        self.assertEqual(calls[0]["key_alias"], "caller")
        _, _, page = await self.ui(b"GET", f"/ui/calls?key=caller&model={ALLOWED}")
        self.assertIn("caller", page)
        _, _, after = await self.ui(b"GET", f"/ui/calls.json?after={calls[0]['_id']}")
        self.assertEqual(json.loads(after)["calls"], [])
        _, headers, csv_text = await self.ui(b"GET", "/ui/spend.csv?group_by=model")
        self.assertEqual(headers.getRawHeaders(b"content-type"), [b"text/csv; charset=utf-8"])
        self.assertTrue(csv_text.startswith("model,spend_usd"))

    async def test_edit_key_and_team_pages(self):
        """
        A key's page edits it (with the CSRF token; limits validated as by
        /key/update), and the teams page lists its team with a link to the
        team's end users, who appear with their spend once they called.
        """
        made = await self.generate(key_alias="editable", team_id="red")
        await self.sign_in(MASTER_KEY)
        csrf = await self.csrf(f"/ui/keys/{made['token']}")
        status, _, _ = await self.ui(b"POST", f"/ui/keys/{made['token']}/edit", {"csrf": csrf, "rpm_limit": "7", "models": ALLOWED})
        self.assertEqual(status, 303)
        info = await self.admin(f"/key/info?key={made['token']}", method=b"GET")
        self.assertEqual((info["info"]["rpm_limit"], info["info"]["models"]), (7, [ALLOWED]))
        status, _, page = await self.ui(b"POST", f"/ui/keys/{made['token']}/edit", {"csrf": csrf, "rpm_limit": "-3"})
        self.assertEqual(status, 400)
        self.assertIn('role="alert"', page)
        status, _, _ = await self.ui(b"POST", f"/ui/keys/{made['token']}/edit", {"rpm_limit": "9"})
        self.assertEqual(status, 403)
        await self.call(b"POST", "/vllm/v1/chat/completions", made["key"], {"model": ALLOWED, "user": "alice", "messages": [{"role": "user", "content": "hi"}]})
        _, _, teams = await self.ui(b"GET", "/ui/teams")
        self.assertIn("/ui/teams/red", teams)
        for _ in range(200):
            _, _, team = await self.ui(b"GET", "/ui/teams/red")
            if "alice" in team:
                break
            await sleep(0.02)
        self.assertIn("alice", team)

    async def test_teams_page_shows_team_records(self):
        """
        The teams page shows the alias, priority and weight of a team that
        has a record (also one no key names yet), and dashes for a team
        known only from its keys.
        """
        await self.admin("/team/new", {"team_id": "red", "team_alias": "Red squad", "priority": 3, "weight": 2.5})
        await self.admin("/team/new", {"team_id": "blue", "priority": -1})
        await self.generate(team_id="red")
        await self.generate(team_id="green")
        await self.sign_in(MASTER_KEY)
        _, _, page = await self.ui(b"GET", "/ui/teams")
        cells = {row[0]: row[1:4] for row in _table_rows(page, "teams")}
        self.assertEqual(cells["red"], ["Red squad", "3", "2.5"])
        self.assertEqual(cells["blue"], ["—", "-1", "—"])
        self.assertEqual(cells["green"], ["—", "—", "—"])

    async def test_spend_chart_data_and_vendored_library(self):
        """
        The spend page's chart reads /ui/spend.json (30 days, the total and
        the top ids of the group), and the vendored uPlot is served as
        JavaScript under the same CSP.
        """
        made = await self.generate(key_alias="charted")
        await self.assertWorks(made["key"])
        await self.sign_in(MASTER_KEY)
        for _ in range(200):
            _, _, body = await self.ui(b"GET", "/ui/spend.json?group_by=key")
            data = json.loads(body)
            if data["series"]:
                break
            await sleep(0.02)
        self.assertEqual(len(data["days"]), 30)
        self.assertEqual(list(data["series"]), [made["token"]])
        self.assertGreater(data["total"][-1], 0)
        status, headers, script = await self.ui(b"GET", "/ui/static/vendor/uPlot.iife.min.js")
        self.assertEqual(status, 200)
        self.assertEqual(headers.getRawHeaders(b"content-type"), [b"text/javascript; charset=utf-8"])
        self.assertIn("uPlot", script)
        for bad in ("/ui/static/vendor/README", "/ui/static/..%2Fapp.py", "/ui/static/nope.js"):
            self.assertEqual((await self.ui(b"GET", bad))[0], 404, bad)


class DeploymentsPageTests(SynchronousTestCase):
    """
    The deployments page shows each deployment's routing signals.
    """

    def test_signals_shown(self):
        """
        A deployment's last scraped sample shows as its vLLM queue, KV-cache
        use, prefix-cache hit rate and the sample's age; saturation and
        calls in flight show too; a deployment never scraped shows dashes.
        """
        from dheera_tx.console.pages import deployments_page, render

        sample = {
            "age_s": 0.4, "num_requests_waiting": 3, "kv_cache_usage_perc": 0.42,
            "prefix_cache_queries": 200, "prefix_cache_hits": 146, "stale": True,
        }
        health = {
            "healthy_endpoints": [
                {"model_name": "m", "deployment": "m#0", "api_base": "http://a", "latency_ms": 3, "in_flight": 2, "saturated": True, "load_sample": sample},
                {"model_name": "m", "deployment": "m#1", "api_base": "http://b", "latency_ms": 4, "in_flight": 0, "saturated": False, "load_sample": None},
            ],
            "unhealthy_endpoints": [],
        }
        page = self.successResultOf(render(deployments_page(health, "csrf"))).decode()
        rows = page.split("<tr>")[2:]
        for shown in ("<td>2</td>", "<td>3</td>", "<td>42%</td>", "<td>73%</td>", "0.4 s (stale)", ">yes<"):
            self.assertIn(shown, rows[0])
        self.assertEqual(rows[1].count("<td>—</td>"), 4)


def _table_rows(page: str, table_id: str) -> list:
    """
    :return: the text of the body cells of table C{table_id} in C{page},
        one list per row.
    """
    table = page.split(f'id="{table_id}"', 1)[1].split("</table>", 1)[0]
    body = table.split("<tbody>", 1)[1]
    return [
        [re.sub(r"<[^>]+>", "", cell) for cell in re.findall(r"<td>(.*?)</td>", row, re.S)]
        for row in re.findall(r"<tr>(.*?)</tr>", body, re.S)
    ]
