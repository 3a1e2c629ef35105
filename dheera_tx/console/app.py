"""
The operator console at C{/ui}: a Klein app on the control plane.

Pages are rendered on the server (L{dheera_tx.console.pages}) from the same
services the JSON APIs use: the key store and its field checks behind
C{/key/...}, the spend ledger behind C{/spend/report}, the prober behind
C{/health}, and the C{redis_stream} call log.  A key is typed once, at
sign-in, and becomes a server-side session (L{dheera_tx.console.sessions});
after that no page, URL, log line or browser storage holds a key (a key
made or regenerated is shown once, in the answer to that form).

Every answer carries a strict Content-Security-Policy (scripts, styles and
forms from this origin only, no framing), C{no-store} and C{nosniff}.
Every state-changing form carries the session's CSRF token and, when the
browser sends one, an C{Origin} of this host; sign-in attempts are limited
per client address.  A virtual key's session sees only its own page.
"""

import csv
import datetime
import hmac
import io
import json
import os
from typing import Optional
from urllib.parse import parse_qs

from klein import Klein
from twisted.logger import Logger
from twisted.web.http_headers import Headers

from dheera_tx.accounting.spend import GROUPS
from dheera_tx.console import pages
from dheera_tx.console.call_feed import CallFeed, call_filter
from dheera_tx.console.sessions import SESSION_SECONDS, ConsoleSessions, Session
from dheera_tx.errors import ProxyError
from dheera_tx.keys.fields import GENERATE_FIELDS, UPDATE_FIELDS, validate_key_fields

log = Logger()

COOKIE = b"dheera_console"
_STATIC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "static")
_STATIC_TYPES = {".css": b"text/css; charset=utf-8", ".js": b"text/javascript; charset=utf-8"}
CSP = (
    b"default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
    b"form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)
#: Keys listed per page.
KEYS_PER_PAGE = 50


class _Redirect(Exception):
    def __init__(self, location: bytes):
        self.location = location


class Console:
    """
    The C{/ui} routes.  Mount C{Console(...).app.resource()} under C{/ui}.

    :param authenticator: checks the key typed at sign-in.
    :param sessions: the L{ConsoleSessions}.
    :param key_store: the Redis key store (a L{RevokingKeyStore}).
    :param ledger: the spend ledger (reports).
    :param prober: the deployment prober (health).
    :param redis: the Redis client (the call log stream).
    :param stream_key: the C{redis_stream} sink's stream, or L{None} when
        that sink is off (then live calls cannot be shown).
    """

    app = Klein()

    def __init__(self, authenticator, sessions: ConsoleSessions, key_store, ledger, prober, redis, stream_key: Optional[str], today=None,
                 teams=None):
        self._auth = authenticator
        self._teams = teams
        self._sessions = sessions
        self._store = key_store
        self._ledger = ledger
        self._prober = prober
        self._stream = stream_key
        self._feed = CallFeed(redis, stream_key)
        self._today = today or (lambda: datetime.datetime.now(datetime.timezone.utc).date())

    # -- plumbing --

    @staticmethod
    def _secure(request) -> None:
        request.setHeader(b"content-security-policy", CSP)
        request.setHeader(b"x-content-type-options", b"nosniff")
        request.setHeader(b"referrer-policy", b"same-origin")
        request.setHeader(b"x-frame-options", b"DENY")
        request.setHeader(b"cache-control", b"no-store")

    async def _session(self, request) -> Optional[Session]:
        session = await self._sessions.get((request.getCookie(COOKIE) or b"").decode("ascii", "replace"))
        if session is None or session.is_master:
            return session
        record = await self._store.get_key(session.token)
        if record is None or record.blocked or (record.expires is not None and record.expires <= datetime.datetime.now().timestamp()):
            await self._sessions.revoke(session)
            return None
        return session

    async def _page_session(self, request, master: bool = True) -> Session:
        session = await self._session(request)
        if session is None:
            raise _Redirect(b"/ui/login")
        if master and not session.is_master:
            raise _Redirect(b"/ui/me")
        return session

    @staticmethod
    def _form(request) -> dict:
        raw = request.content.read() if request.content is not None else b""
        try:
            parsed = parse_qs(raw.decode("utf-8"), keep_blank_values=True, max_num_fields=50)
        except (UnicodeDecodeError, ValueError):
            return {}
        return {name: values[-1] for name, values in parsed.items()}

    @staticmethod
    def _same_origin(request) -> bool:
        # Browsers send Origin on POSTs (our Referrer-Policy, same-origin,
        # keeps it a real origin rather than "null"); scripts may not.
        origin = request.getHeader(b"origin")
        if origin is None:
            return True
        host = request.getHeader(b"host") or b""
        return origin.split(b"://", 1)[-1] == host

    async def _posted(self, request, master: bool = True):
        """
        :return: C{(session, form)} of a state-changing request whose CSRF
            token and origin check out.
        """
        session = await self._page_session(request, master)
        form = self._form(request)
        if not self._same_origin(request) or not hmac.compare_digest(form.get("csrf", ""), session.csrf):
            raise ProxyError(403, "The form's CSRF token is missing or wrong; reload the page.", type="permission_error", code="403")
        return session, form

    @staticmethod
    async def _send(request, tag) -> bytes:
        request.setHeader(b"content-type", b"text/html; charset=utf-8")
        return await pages.render(tag)

    @app.handle_errors(_Redirect)
    def _redirect(self, request, failure):
        self._secure(request)
        request.setResponseCode(303)
        request.setHeader(b"location", failure.value.location)
        return b""

    @app.handle_errors(ProxyError)
    def _refused(self, request, failure):
        self._secure(request)
        request.setResponseCode(failure.value.status)
        request.setHeader(b"content-type", b"application/json")
        return failure.value.body()

    # -- sign-in --

    @app.route("/ui", methods=["GET"])
    @app.route("/ui/", methods=["GET"])
    async def home(self, request):
        self._secure(request)
        session = await self._session(request)
        raise _Redirect(b"/ui/login" if session is None else b"/ui/keys" if session.is_master else b"/ui/me")

    @app.route("/ui/login", methods=["GET"])
    async def login_form(self, request):
        self._secure(request)
        return await self._send(request, pages.login_page())

    @app.route("/ui/login", methods=["POST"])
    async def login(self, request):
        self._secure(request)
        address = getattr(request.getClientAddress(), "host", "") or ""
        if not await self._sessions.attempt(address):
            request.setResponseCode(429)
            request.setHeader(b"retry-after", b"60")
            return await self._send(request, pages.login_page("Too many sign-in attempts; wait a minute."))
        if not self._same_origin(request):
            raise ProxyError(403, "Sign-in from another site.", type="permission_error", code="403")
        key = self._form(request).get("key", "").strip()
        headers = Headers({b"authorization": [b"Bearer " + key.encode("utf-8", "surrogateescape")]})
        try:
            principal = await self._auth.authenticate(headers)
        except ProxyError as e:
            if e.status != 401:
                raise
            request.setResponseCode(401)
            return await self._send(request, pages.login_page("That key is not valid."))
        session_id, _ = await self._sessions.create(principal.is_master, principal.token)
        cookie = COOKIE + b"=" + session_id.encode("ascii") + b"; Path=/ui; HttpOnly; SameSite=Strict; Max-Age=%d" % SESSION_SECONDS
        if request.isSecure():
            cookie += b"; Secure"
        request.responseHeaders.addRawHeader(b"set-cookie", cookie)
        log.info("Console sign-in ({who})", who="master key" if principal.is_master else f"key {principal.token[:12]}...")
        raise _Redirect(b"/ui/keys" if principal.is_master else b"/ui/me")

    @app.route("/ui/logout", methods=["POST"])
    async def logout(self, request):
        self._secure(request)
        session, _ = await self._posted(request, master=False)
        await self._sessions.revoke(session)
        request.responseHeaders.addRawHeader(b"set-cookie", COOKIE + b"=; Path=/ui; HttpOnly; SameSite=Strict; Max-Age=0")
        raise _Redirect(b"/ui/login")

    # -- keys --

    @app.route("/ui/keys", methods=["GET"])
    async def keys(self, request, new_key: Optional[str] = None, message: Optional[str] = None, session=None):
        self._secure(request)
        session = session or await self._page_session(request)
        text = (request.args.get(b"page") or [b"1"])[-1]
        page = int(text) if text.isdigit() and 0 < len(text) < 7 else 1
        records, total = await self._store.list_keys(page=page, size=KEYS_PER_PAGE)
        pages_count = max(1, -(-total // KEYS_PER_PAGE))
        return await self._send(request, pages.keys_page(records, session.csrf, new_key, message, page, pages_count))

    @app.route("/ui/keys", methods=["POST"])
    async def create_key(self, request):
        self._secure(request)
        session, form = await self._posted(request)
        fields = {}
        for name in ("key_alias", "team_id", "duration"):
            if form.get(name, "").strip():
                fields[name] = form[name].strip()
        if form.get("models", "").strip():
            fields["models"] = [m.strip() for m in form["models"].split(",") if m.strip()]
        try:
            for name, kind in (("max_budget", float), ("rpm_limit", int), ("tpm_limit", int)):
                if form.get(name, "").strip():
                    fields[name] = kind(form[name])
            key, record = await self._store.create_key(validate_key_fields(fields, allowed=GENERATE_FIELDS))
        except (ValueError, ProxyError) as e:
            message = e.message if isinstance(e, ProxyError) else "Budget and limits must be numbers."
            request.setResponseCode(400)
            return await self.keys(request, message=message, session=session)
        log.info("Key {token}... generated in the console (alias {alias!r})", token=record.token[:12], alias=record.key_alias)
        return await self.keys(request, new_key=key, session=session)

    @app.route("/ui/keys/<token>/<verb>", methods=["POST"])
    async def key_action(self, request, token: str, verb: str):
        self._secure(request)
        session, _ = await self._posted(request)
        if verb == "block":
            await self._store.block_key(token)
        elif verb == "unblock":
            await self._store.unblock_key(token)
        elif verb == "delete":
            await self._store.delete_keys([token])
        elif verb == "regenerate":
            key, _ = await self._store.regenerate_key(token)
            return await self.keys(request, new_key=key, session=session)
        else:
            raise ProxyError(404, "No such action.", type="not_found_error", code="404")
        raise _Redirect(b"/ui/keys")

    @app.route("/ui/me", methods=["GET"])
    async def me(self, request):
        self._secure(request)
        session = await self._page_session(request, master=False)
        if session.is_master:
            raise _Redirect(b"/ui/keys")
        record = await self._store.get_key(session.token)
        calls = await self._feed.read(lambda r: r.get("key_hash_prefix") == session.token[:12])
        return await self._send(request, pages.my_key_page(record, session.csrf, calls))

    # -- spend, deployments, calls --

    @app.route("/ui/spend", methods=["GET"])
    async def spend(self, request):
        self._secure(request)
        session = await self._page_session(request)
        group = self._group(request)
        end = self._today()
        start = end - datetime.timedelta(days=29)
        rows = await self._ledger.report(group, start, end)
        days = []
        for offset in range(30):
            day = start + datetime.timedelta(days=offset)
            total = sum(r["spend_nanos"] for r in await self._ledger.report("model", day, day))
            days.append({"day": day.isoformat(), "spend_nanos": total})
        return await self._send(request, pages.spend_page(group, rows, days, session.csrf, GROUPS))

    @app.route("/ui/spend.csv", methods=["GET"])
    async def spend_csv(self, request):
        self._secure(request)
        await self._page_session(request)
        group = self._group(request)
        end = self._today()
        rows = await self._ledger.report(group, end - datetime.timedelta(days=29), end)
        out = io.StringIO()
        writer = csv.writer(out)
        writer.writerow([group, "spend_usd", "spend_nanos", "requests", "prompt_tokens", "completion_tokens"])
        for r in rows:
            # A leading =, +, - or @ would be a formula in a spreadsheet.
            ident = "'" + r["id"] if r["id"][:1] in ("=", "+", "-", "@") else r["id"]
            writer.writerow([ident, r["spend"], r["spend_nanos"], r["requests"], r["prompt_tokens"], r["completion_tokens"]])
        request.setHeader(b"content-type", b"text/csv; charset=utf-8")
        request.setHeader(b"content-disposition", f'attachment; filename="spend-by-{group}.csv"'.encode())
        return out.getvalue().encode("utf-8")

    @staticmethod
    def _group(request) -> str:
        group = (request.args.get(b"group_by") or [b"key"])[-1].decode("utf-8", "replace")
        return group if group in GROUPS else "key"

    @app.route("/ui/deployments", methods=["GET"])
    async def deployments(self, request):
        self._secure(request)
        session = await self._page_session(request)
        return await self._send(request, pages.deployments_page(await self._prober.probe_all(), session.csrf))

    @app.route("/ui/calls", methods=["GET"])
    async def calls(self, request):
        self._secure(request)
        session = await self._page_session(request)
        note = None if self._stream else "Live calls need the redis_stream log sink (dheera_ai_settings.callbacks)."
        return await self._send(request, pages.calls_page(await self._feed.read(call_filter(request)), session.csrf, note))

    @app.route("/ui/calls.json", methods=["GET"])
    async def calls_json(self, request):
        """
        Calls logged after C{?after=<stream id>} (newest first), for the live
        page's script.
        """
        self._secure(request)
        await self._page_session(request)
        after = (request.args.get(b"after") or [b""])[-1].decode("ascii", "replace") or None
        if after is not None and not all(c.isdigit() or c == "-" for c in after):
            after = None
        calls = await self._feed.read(call_filter(request), after)
        request.setHeader(b"content-type", b"application/json")
        return json.dumps({"calls": calls}).encode("utf-8")

    @app.route("/ui/keys/<token>", methods=["GET"])
    async def key_page(self, request, token: str, message: Optional[str] = None, session=None):
        self._secure(request)
        session = session or await self._page_session(request)
        record = await self._store.get_key(token)
        if record is None:
            raise _Redirect(b"/ui/keys")
        calls = await self._feed.read(lambda r: r.get("key_hash_prefix") == token[:12])
        return await self._send(request, pages.key_page(record, session.csrf, calls, message))

    @app.route("/ui/keys/<token>/edit", methods=["POST"])
    async def edit_key(self, request, token: str):
        self._secure(request)
        session, form = await self._posted(request)
        fields: dict = {"key": token}
        for name in ("key_alias", "team_id", "budget_duration"):
            if name in form:
                fields[name] = form[name].strip() or None
        if "models" in form:
            fields["models"] = [m.strip() for m in form["models"].split(",") if m.strip()]
        try:
            for name, kind in (("max_budget", float), ("rpm_limit", int), ("tpm_limit", int), ("max_parallel_requests", int)):
                if name in form:
                    fields[name] = kind(form[name]) if form[name].strip() else None
            checked = validate_key_fields(fields, allowed=UPDATE_FIELDS)
            checked.pop("key", None)
            await self._store.update_key(token, checked)
        except (ValueError, ProxyError) as e:
            request.setResponseCode(400)
            message = e.message if isinstance(e, ProxyError) else "Budget and limits must be numbers."
            return await self.key_page(request, token, message=message, session=session)
        raise _Redirect(b"/ui/keys/" + token.encode("ascii"))

    @app.route("/ui/teams", methods=["GET"])
    async def teams(self, request):
        self._secure(request)
        session = await self._page_session(request)
        end = self._today()
        rows = await self._ledger.report("team", end - datetime.timedelta(days=29), end)
        keys_per_team: dict = {}
        page, total = 1, 1
        while (page - 1) * 100 < total and page <= 100:
            records, total = await self._store.list_keys(page=page, size=100)
            for record in records:
                if record.team_id:
                    keys_per_team[record.team_id] = keys_per_team.get(record.team_id, 0) + 1
            page += 1
        records = {r.team_id: r for r in await self._teams.list_teams()} if self._teams is not None else {}
        known = {r["id"] for r in rows}
        rows += [{"id": team, "spend_nanos": 0, "requests": 0, "prompt_tokens": 0, "completion_tokens": 0}
                 for team in sorted(set(keys_per_team) | set(records)) if team not in known]
        return await self._send(request, pages.teams_page(rows, keys_per_team, records, session.csrf))

    @app.route("/ui/teams/<team>", methods=["GET"])
    async def team(self, request, team: str):
        """
        A team's end users (C{-} is the default scope of keys without a
        team): spend over 30 days, budget and state.
        """
        self._secure(request)
        session = await self._page_session(request)
        scope = None if team == "-" else team
        end = self._today()
        rows = await self._ledger.report("end_user", end - datetime.timedelta(days=29), end, team_id=scope)
        users = []
        for row in rows[:200]:
            if scope is None and row.get("team_id") is not None:
                continue
            record = await self._store.get_end_user(row["id"], team_id=scope)
            users.append((row, record))
        return await self._send(request, pages.team_page(team if scope else "(no team)", users, session.csrf))

    @app.route("/ui/spend.json", methods=["GET"])
    async def spend_json(self, request):
        """
        Spend per day over 30 days: the total, and the five largest ids of
        C{group_by} (for the spend page's chart).
        """
        self._secure(request)
        await self._page_session(request)
        group = self._group(request)
        end = self._today()
        start = end - datetime.timedelta(days=29)
        top = [r["id"] for r in (await self._ledger.report(group, start, end))[:5]]
        days, total, series = [], [], {ident: [] for ident in top}
        for offset in range(30):
            day = start + datetime.timedelta(days=offset)
            rows = {r["id"]: r["spend_nanos"] for r in await self._ledger.report(group, day, day)}
            days.append(day.isoformat())
            model_rows = await self._ledger.report("model", day, day)
            total.append(sum(r["spend_nanos"] for r in model_rows) / 1e9)
            for ident in top:
                series[ident].append(rows.get(ident, 0) / 1e9)
        request.setHeader(b"content-type", b"application/json")
        return json.dumps({"group_by": group, "days": days, "total": total, "series": series}).encode("utf-8")

    @app.route("/ui/static/vendor/<name>", methods=["GET"])
    def vendor(self, request, name: str):
        return self._file(request, os.path.join(_STATIC, "vendor"), name)

    @app.route("/ui/static/<name>", methods=["GET"])
    def static(self, request, name: str):
        return self._file(request, _STATIC, name)

    def _file(self, request, folder: str, name: str):
        self._secure(request)
        kind = _STATIC_TYPES.get(os.path.splitext(name)[1])
        path = os.path.join(folder, name)
        if kind is None or "/" in name or name.startswith(".") or not os.path.isfile(path):
            raise ProxyError(404, "No such file.", type="not_found_error", code="404")
        with open(path, "rb") as f:
            body = f.read()
        request.setHeader(b"content-type", kind)
        request.setHeader(b"cache-control", b"max-age=300")
        return body
