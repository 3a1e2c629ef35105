"""
The control plane: health, metrics, and the mount point of the admin APIs.

A Klein app for the proxy's own routes.  L{ControlRoot} is the Site's root
resource for every path that is not C{/vllm}: it hands C{/key/...} and
C{/end_user/...} to the key API and everything else to L{ControlPlane}.
"""

import datetime
import json
import os
from typing import Awaitable, Callable, Dict, Optional

from klein import Klein
from twisted.logger import Logger
from twisted.web.resource import Resource
from werkzeug.exceptions import HTTPException

from dheera_tx.accounting.spend import GROUPS
from dheera_tx.errors import ProxyError, bad_request, error_body, unauthorized
from dheera_tx.keys.auth import require_master

log = Logger()


def json_answer(request, status: int, document) -> bytes:
    """
    Set C{status} and a JSON content type on C{request}.

    :return: the encoded document, for a Klein handler to return.
    """
    request.setResponseCode(status)
    request.setHeader(b"content-type", b"application/json")
    return json.dumps(document).encode("utf-8")


def error_answer(request, error: ProxyError) -> bytes:
    """
    Answer a L{ProxyError} from a Klein handler.
    """
    request.setResponseCode(error.status)
    request.setHeader(b"content-type", b"application/json")
    for name, value in error.headers.items():
        request.setHeader(name.encode("ascii"), str(value).encode("ascii"))
    return error.body()


class ControlPlane:
    """
    The proxy's own routes.

    :param readiness_probes: named async checks (e.g. C{"redis"}) that must
        all pass for the proxy to be ready.
    :param metrics: the L{dheera_tx.observe.metrics.ProxyMetrics} served on
        C{GET /metrics}, or L{None} (then that route is a 404).
    :param prober: the L{dheera_tx.routing.health.DeploymentProber} behind
        C{GET /health}, or L{None} (then that route is a 404).
    :param authenticator: the L{dheera_tx.keys.auth.Authenticator} that checks the
        master key on C{/health} (and C{/metrics} when it needs auth).
    :param metrics_require_auth: C{general_settings.metrics_require_auth}:
        C{/metrics} needs the master key.
    """

    app = Klein()

    def __init__(
        self,
        readiness_probes: Optional[Dict[str, Callable[[], Awaitable[bool]]]] = None,
        metrics=None,
        prober=None,
        authenticator=None,
        metrics_require_auth: bool = False,
        ledger=None,
        today: Callable[[], datetime.date] = lambda: datetime.datetime.now(datetime.timezone.utc).date(),
    ):
        self._ledger = ledger
        self._today = today
        self._probes = readiness_probes or {}
        self._metrics = metrics
        self._prober = prober
        self._authenticator = authenticator
        self._metrics_require_auth = metrics_require_auth

    async def _require_master(self, request) -> None:
        if self._authenticator is None:
            raise unauthorized()
        require_master(await self._authenticator.authenticate(request.requestHeaders))

    @app.route("/metrics", methods=["GET"])
    async def metrics(self, request):
        """
        The proxy's own metrics, in Prometheus text (the master key is needed
        only with C{metrics_require_auth}).
        """
        if self._metrics_require_auth:
            await self._require_master(request)
        if self._metrics is None:
            raise ProxyError(404, "Metrics are not enabled on this proxy.", type="not_found_error", code="404")
        body, content_type = self._metrics.render()
        request.setResponseCode(200)
        request.setHeader(b"content-type", content_type.encode("ascii"))
        request.setHeader(b"cache-control", b"no-store")
        return body

    @app.route("/health", methods=["GET"])
    async def health(self, request):
        """
        Probe every deployment (master key only) and answer which are
        healthy; never shows a key.
        """
        await self._require_master(request)
        if self._prober is None:
            raise ProxyError(404, "Deployment health checks are not enabled on this proxy.", type="not_found_error", code="404")
        document = await self._prober.probe_all()
        request.setHeader(b"cache-control", b"no-store")
        return json_answer(request, 200, document)

    @app.route("/spend/report", methods=["GET"])
    async def spend_report(self, request):
        """
        Spend grouped by key, user, team, end user or model over a range of
        UTC days (master key only), from the per-day counters:
        C{?group_by=model&start_date=2026-11-01&end_date=2026-11-30}
        (default: the last 30 days, grouped by key).  End users are
        scoped by team: C{group_by=end_user} rows name their C{team_id},
        and C{&team_id=T} keeps only team T's end users.
        """
        await self._require_master(request)
        if self._ledger is None:
            raise ProxyError(404, "Spend tracking needs Redis.", type="not_found_error", code="404")
        group = _arg(request, b"group_by") or "key"
        if group not in GROUPS:
            raise bad_request(f"group_by must be one of {', '.join(GROUPS)}.", param="group_by")
        end = _date(request, b"end_date") or self._today()
        start = _date(request, b"start_date") or end - datetime.timedelta(days=29)
        if start > end or (end - start).days > 366:
            raise bad_request("start_date must not be after end_date, and the range at most 366 days.", param="start_date")
        team_id = _arg(request, b"team_id")
        if team_id is not None and (group != "end_user" or not team_id):
            raise bad_request("team_id is taken with group_by=end_user, and must not be empty.", param="team_id")
        rows = await self._ledger.report(group, start, end, team_id)
        return json_answer(
            request,
            200,
            {"group_by": group, "start_date": start.isoformat(), "end_date": end.isoformat(), "spend": rows},
        )

    @app.route("/health/liveliness", methods=["GET"])
    @app.route("/health/liveness", methods=["GET"])
    def liveliness(self, request):
        """
        The process is alive and serving.
        """
        return json_answer(request, 200, {"status": "alive", "pid": os.getpid()})

    @app.route("/health/readiness", methods=["GET"])
    async def readiness(self, request):
        """
        The config is loaded and every dependency (Redis) answers.
        """
        checks = {}
        for name, probe in self._probes.items():
            try:
                checks[name] = "connected" if await probe() else "unreachable"
            except Exception:
                checks[name] = "unreachable"
        ready = all(value == "connected" for value in checks.values())
        document = {"status": "ready" if ready else "not ready", "config": "loaded", **checks}
        return json_answer(request, 200 if ready else 503, document)

    @app.handle_errors(ProxyError)
    def proxy_error(self, request, failure):
        return error_answer(request, failure.value)

    @app.handle_errors(HTTPException)
    def http_error(self, request, failure):
        e = failure.value
        request.setResponseCode(e.code)
        request.setHeader(b"content-type", b"application/json")
        kind = "not_found_error" if e.code == 404 else "invalid_request_error"
        return error_body(f"{e.name}: no such route or method.", kind, str(e.code))


def _arg(request, name: bytes) -> Optional[str]:
    values = request.args.get(name)
    return values[0].decode("utf-8", "replace") if values else None


def _date(request, name: bytes) -> Optional[datetime.date]:
    value = _arg(request, name)
    if value is None:
        return None
    try:
        return datetime.date.fromisoformat(value)
    except ValueError:
        raise bad_request(f"{name.decode()} must be a date like 2026-11-25.", param=name.decode())


class ControlRoot(Resource):
    """
    The Site's root for every non-C{/vllm} path.

    :param control: the L{ControlPlane}'s resource.
    :param branches: first path segment -> resource (the key API, ...).
    """

    isLeaf = True

    def __init__(self, control: Resource, branches: Optional[Dict[bytes, Resource]] = None):
        super().__init__()
        self._control = control
        self._branches = branches or {}

    def render(self, request):
        first = request.postpath[0] if request.postpath else b""
        return self._branches.get(first, self._control).render(request)
