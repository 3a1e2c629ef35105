"""
The console's pages, rendered on the server with C{twisted.web.template}
(every value is escaped by the flattener; no page carries inline script or
style, so the Content-Security-Policy can forbid both).
"""

from typing import Iterable, List, Optional, Sequence

from twisted.web.template import Tag, flattenString, tags

from dheera_tx.accounting.metering import nanos_to_usd
from dheera_tx.keys.records import KeyRecord, iso_time

MASTER_NAV = (
    ("Keys", "/ui/keys"),
    ("Teams", "/ui/teams"),
    ("Spend", "/ui/spend"),
    ("Deployments", "/ui/deployments"),
    ("Live calls", "/ui/calls"),
)
KEY_NAV = (("My key", "/ui/me"),)


def render(tag: Tag):
    """
    :return: a Deferred firing with the page's bytes (HTML5 doctype first).
    """
    return flattenString(None, tag).addCallback(lambda body: b"<!DOCTYPE html>\n" + body)


def csrf_field(csrf: str) -> Tag:
    return tags.input(type="hidden", name="csrf", value=csrf)


def layout(title: str, body, csrf: Optional[str] = None, nav: Sequence = (), active: str = "") -> Tag:
    """
    A page: the header with navigation and sign-out, then C{body}.
    """
    links = [tags.a(name, href=href, **({"aria-current": "page"} if href == active else {})) for name, href in nav]
    header = [tags.strong("dheera_tx"), tags.nav(*links)]
    if csrf is not None:
        header.append(
            tags.form(csrf_field(csrf), tags.button("Sign out", type="submit"), method="post", action="/ui/logout", class_="signout")
        )
    return tags.html(lang="en")(
        tags.head(
            tags.meta(charset="utf-8"),
            tags.meta(name="viewport", content="width=device-width, initial-scale=1"),
            tags.title(f"{title} · dheera_tx"),
            tags.link(rel="stylesheet", href="/ui/static/vendor/uPlot.min.css"),
            tags.link(rel="stylesheet", href="/ui/static/console.css"),
            tags.script(src="/ui/static/vendor/uPlot.iife.min.js", defer="defer"),
            tags.script(src="/ui/static/console.js", defer="defer"),
        ),
        tags.body(tags.header(*header), Tag("main")(tags.h1(title), body)),
    )


def login_page(message: Optional[str] = None) -> Tag:
    form = tags.form(method="post", action="/ui/login", autocomplete="off")(
        tags.label("Key", tags.input(type="password", name="key", required="required", autocomplete="off", id="key")),
        tags.button("Sign in", type="submit"),
    )
    body = [tags.p("Sign in with the master key, or with a virtual key to see its own spend and calls.")]
    if message:
        body.append(tags.p(message, class_="error", role="alert"))
    body.append(form)
    return layout("Sign in", body)


def _money(nanos: int) -> str:
    return f"${nanos_to_usd(nanos):.6f}".rstrip("0").rstrip(".") if nanos else "$0"


def spend_bar(record: KeyRecord) -> Tag:
    """
    Spend against budget: a C{meter} element (no inline style needed).
    """
    if record.max_budget:
        return tags.span(
            tags.meter(value=f"{nanos_to_usd(record.spend_nanos):.9f}", max=f"{record.max_budget:.9f}", title="spend / budget"),
            f" {_money(record.spend_nanos)} of ${record.max_budget:g}",
        )
    return tags.span(_money(record.spend_nanos), " (no budget)")


def _limits(record: KeyRecord) -> str:
    parts = [
        f"{name} {value}"
        for name, value in (("rpm", record.rpm_limit), ("tpm", record.tpm_limit), ("parallel", record.max_parallel_requests))
        if value is not None
    ]
    return ", ".join(parts) or "none"


def _action(token: str, verb: str, csrf: str, label: str, danger: bool = False) -> Tag:
    return tags.form(method="post", action=f"/ui/keys/{token}/{verb}", class_="inline")(
        csrf_field(csrf), tags.button(label, type="submit", **({"class": "danger"} if danger else {}))
    )


def keys_page(
    records: Iterable[KeyRecord], csrf: str, new_key: Optional[str] = None, message: Optional[str] = None, page: int = 1, pages_count: int = 1
) -> Tag:
    body: List = []
    if new_key is not None:
        body.append(
            tags.section(class_="shown-once", role="status")(
                tags.p("The new key, shown this once (copy it now; only its hash is kept):"),
                tags.code(new_key, id="new-key"),
            )
        )
    if message:
        body.append(tags.p(message, class_="error", role="alert"))
    rows = []
    for record in records:
        actions = [
            _action(record.token, "unblock" if record.blocked else "block", csrf, "Unblock" if record.blocked else "Block"),
            _action(record.token, "regenerate", csrf, "Regenerate"),
            _action(record.token, "delete", csrf, "Delete", danger=True),
        ]
        rows.append(
            tags.tr(**{"data-token": record.token[:12]})(
                tags.td(tags.a(record.key_alias or "—", href=f"/ui/keys/{record.token}")),
                tags.td(tags.code(record.token[:12])),
                tags.td(", ".join(record.models) or "all"),
                tags.td(spend_bar(record)),
                tags.td(_limits(record)),
                tags.td(record.team_id or "—"),
                tags.td(iso_time(record.expires) or "never"),
                tags.td("blocked" if record.blocked else "active", class_="blocked" if record.blocked else "active"),
                tags.td(*actions),
            )
        )
    body.append(
        tags.table(id="keys")(
            tags.thead(tags.tr(*[tags.th(h) for h in ("Alias", "Key", "Models", "Spend", "Limits", "Team", "Expires", "State", "")])),
            tags.tbody(*rows),
        )
    )
    if pages_count > 1:
        links = [f"Page {page} of {pages_count}"]
        if page > 1:
            links.append(tags.a("previous", href=f"/ui/keys?page={page - 1}"))
        if page < pages_count:
            links.append(tags.a("next", href=f"/ui/keys?page={page + 1}"))
        body.append(tags.p(*links, class_="pages"))

    def field(label, name, kind="text", hint=""):
        extra = {"step": "any", "min": "0"} if kind == "number" else {}
        return tags.label(label, tags.input(type=kind, name=name, placeholder=hint, **extra))

    body.append(
        tags.form(method="post", action="/ui/keys", class_="create", id="create-key")(
            tags.h2("Create a key"),
            csrf_field(csrf),
            field("Alias", "key_alias"),
            field("Models", "models", hint="comma-separated; empty: all"),
            field("Budget (USD)", "max_budget", "number", "e.g. 5"),
            field("rpm limit", "rpm_limit", "number"),
            field("tpm limit", "tpm_limit", "number"),
            field("Team", "team_id"),
            field("Expires after", "duration", hint="e.g. 30d"),
            tags.button("Create", type="submit"),
        )
    )
    return layout("Keys", body, csrf, MASTER_NAV, "/ui/keys")


def my_key_page(record: KeyRecord, csrf: str, calls: Sequence[dict]) -> Tag:
    body = [
        tags.dl(
            tags.dt("Key"), tags.dd(tags.code(record.token[:12])),
            tags.dt("Alias"), tags.dd(record.key_alias or "—"),
            tags.dt("Models"), tags.dd(", ".join(record.models) or "all"),
            tags.dt("Spend"), tags.dd(spend_bar(record)),
            tags.dt("Limits"), tags.dd(_limits(record)),
            tags.dt("Expires"), tags.dd(iso_time(record.expires) or "never"),
        ),
        tags.h2("Recent calls"),
        calls_table(calls),
    ]
    return layout("My key", body, csrf, KEY_NAV, "/ui/me")


def calls_table(calls: Sequence[dict], live: bool = False) -> Tag:
    columns = ("time", "status", "model_name", "key_alias", "end_user", "prompt_tokens", "completion_tokens", "cost", "duration_ms")
    rows = [
        tags.tr(**{"data-id": call.get("_id", "")})(*[tags.td(str(call.get(c, "")) if call.get(c) is not None else "—") for c in columns])
        for call in calls
    ]
    attributes = {"id": "calls"}
    if live:
        attributes["data-live"] = "/ui/calls.json"
    return tags.table(**attributes)(tags.thead(tags.tr(*[tags.th(c) for c in columns])), tags.tbody(*rows))


def calls_page(calls: Sequence[dict], csrf: str, note: Optional[str]) -> Tag:
    body: List = []
    if note:
        body.append(tags.p(note, class_="note"))
    body.append(
        tags.form(method="get", action="/ui/calls", class_="filters")(
            tags.input(name="model", placeholder="model", id="filter-model"),
            tags.input(name="key", placeholder="key alias", id="filter-key"),
            tags.input(name="status", placeholder="status", id="filter-status"),
            tags.button("Filter", type="submit"),
        )
    )
    body.append(calls_table(calls, live=True))
    return layout("Live calls", body, csrf, MASTER_NAV, "/ui/calls")


def spend_page(group: str, rows: Sequence[dict], days: Sequence[dict], csrf: str, groups: Sequence[str]) -> Tag:
    choice = tags.form(method="get", action="/ui/spend", class_="filters")(
        tags.select(name="group_by")(*[tags.option(g, value=g, **({"selected": "selected"} if g == group else {})) for g in groups]),
        tags.button("Show", type="submit"),
        tags.a("CSV", href=f"/ui/spend.csv?group_by={group}"),
    )
    top = max((r["spend_nanos"] for r in rows), default=0) or 1
    table = tags.table(id="spend")(
        tags.thead(tags.tr(*[tags.th(h) for h in (group, "spend", "", "requests", "prompt tokens", "completion tokens")])),
        tags.tbody(
            *[
                tags.tr(
                    tags.td(r["id"]),
                    tags.td(_money(r["spend_nanos"])),
                    tags.td(tags.meter(value=str(r["spend_nanos"]), max=str(top))),
                    tags.td(str(r["requests"])),
                    tags.td(str(r["prompt_tokens"])),
                    tags.td(str(r["completion_tokens"])),
                )
                for r in rows
            ]
        ),
    )
    daily = tags.table(id="daily")(
        tags.thead(tags.tr(tags.th("day"), tags.th("spend"), tags.th(""))),
        tags.tbody(
            *[
                tags.tr(
                    tags.td(d["day"]),
                    tags.td(_money(d["spend_nanos"])),
                    tags.td(tags.meter(value=str(d["spend_nanos"]), max=str(max(x["spend_nanos"] for x in days) or 1))),
                )
                for d in days
            ]
        ),
    )
    chart = tags.div(id="spend-chart", **{"data-source": f"/ui/spend.json?group_by={group}"})
    body = [choice, chart, tags.h2(f"Last 30 days by {group}"), table, tags.h2("Per day"), daily]
    return layout("Spend", body, csrf, MASTER_NAV, "/ui/spend")


def _signals(endpoint: dict) -> List[Tag]:
    """
    The routing signals of a deployment's health entry: calls in flight,
    vLLM's waiting queue, KV-cache use and prefix-cache hit rate from the
    last scraped sample (with its age), and saturation.
    """
    sample = endpoint.get("load_sample") or {}
    waiting = sample.get("num_requests_waiting")
    kv = sample.get("kv_cache_usage_perc")
    queries, hits = sample.get("prefix_cache_queries"), sample.get("prefix_cache_hits")
    rate = f"{hits / queries:.0%}" if queries and hits is not None else "—"
    age = "—" if not sample else f"{sample.get('age_s', 0):g} s" + (" (stale)" if sample.get("stale") else "")
    saturated = endpoint.get("saturated")
    return [
        tags.td(str(endpoint.get("in_flight", "—"))),
        tags.td("—" if waiting is None else f"{waiting:g}"),
        tags.td("—" if kv is None else f"{kv:.0%}"),
        tags.td(rate),
        tags.td(age),
        tags.td("—" if saturated is None else ("yes" if saturated else "no"), class_="unhealthy" if saturated else ""),
    ]


def deployments_page(health: dict, csrf: str) -> Tag:
    rows = []
    for state, endpoints in (("healthy", health.get("healthy_endpoints", [])), ("unhealthy", health.get("unhealthy_endpoints", []))):
        for endpoint in endpoints:
            rows.append(
                tags.tr(
                    tags.td(endpoint.get("model_name") or "(default upstream)"),
                    tags.td(endpoint.get("deployment") or ""),
                    tags.td(endpoint.get("api_base") or ""),
                    tags.td(state, class_=state),
                    tags.td(str(endpoint.get("latency_ms", "—"))),
                    *_signals(endpoint),
                    tags.td(endpoint.get("error") or endpoint.get("metrics_error") or ""),
                )
            )
    headings = (
        "Model", "Deployment", "API base", "State", "Latency (ms)", "In flight", "vLLM queue", "KV cache", "Prefix hits",
        "Sample age", "Saturated", "Error",
    )
    table = tags.table(id="deployments")(
        tags.thead(tags.tr(*[tags.th(h) for h in headings])),
        tags.tbody(*rows),
    )
    note = tags.p(
        "Queue, KV-cache use and prefix-cache hits come from each replica's /metrics, scraped for models with several "
        "replicas or a parallel cap (router_settings.metrics_interval).",
        class_="note",
    )
    return layout("Deployments", [table, note], csrf, MASTER_NAV, "/ui/deployments")


def key_page(record: KeyRecord, csrf: str, calls: Sequence[dict], message: Optional[str] = None) -> Tag:
    """
    One key: its numbers, an edit form, and its recent calls.
    """

    def field(label, name, value, kind="text", hint=""):
        extra = {"step": "any", "min": "0"} if kind == "number" else {}
        shown = "" if value is None else str(value)
        return tags.label(label, tags.input(type=kind, name=name, value=shown, placeholder=hint, **extra))

    body: List = []
    if message:
        body.append(tags.p(message, class_="error", role="alert"))
    body += [
        tags.dl(
            tags.dt("Key"), tags.dd(tags.code(record.token[:12])),
            tags.dt("Spend"), tags.dd(spend_bar(record)),
            tags.dt("State"), tags.dd("blocked" if record.blocked else "active"),
            tags.dt("Expires"), tags.dd(iso_time(record.expires) or "never"),
        ),
        tags.form(method="post", action=f"/ui/keys/{record.token}/edit", class_="create", id="edit-key")(
            tags.h2("Edit"),
            csrf_field(csrf),
            field("Alias", "key_alias", record.key_alias),
            field("Models", "models", ", ".join(record.models), hint="comma-separated; empty: all"),
            field("Budget (USD)", "max_budget", record.max_budget, "number"),
            field("Budget window", "budget_duration", record.budget_duration, hint="e.g. 30d"),
            field("rpm limit", "rpm_limit", record.rpm_limit, "number"),
            field("tpm limit", "tpm_limit", record.tpm_limit, "number"),
            field("Parallel", "max_parallel_requests", record.max_parallel_requests, "number"),
            field("Team", "team_id", record.team_id),
            tags.button("Save", type="submit"),
        ),
        tags.h2("Recent calls"),
        calls_table(calls),
    ]
    return layout(f"Key {record.key_alias or record.token[:12]}", body, csrf, MASTER_NAV, "/ui/keys")


def _team_settings(record) -> list:
    # A team without a record (only named by keys) shows dashes: its keys
    # inherit nothing.
    if record is None:
        return [tags.td("—"), tags.td("—"), tags.td("—")]
    return [
        tags.td(record.team_alias or "—"),
        tags.td("—" if record.priority is None else str(record.priority)),
        tags.td("—" if record.weight is None else f"{record.weight:g}"),
    ]


def teams_page(rows: Sequence[dict], keys_per_team: dict, records: dict, csrf: str) -> Tag:
    """
    :param rows: spend per team (30 days), one per team.
    :param records: team id -> L{dheera_tx.keys.records.TeamRecord}, for
        the teams that have one (alias, priority and weight).
    """
    table = tags.table(id="teams")(
        tags.thead(tags.tr(*[tags.th(h) for h in ("Team", "Alias", "Priority", "Weight", "Keys", "Spend (30 days)", "Requests", "")]))
    )(
        tags.tbody(
            *[
                tags.tr(
                    tags.td(r["id"]),
                    *_team_settings(records.get(r["id"])),
                    tags.td(str(keys_per_team.get(r["id"], 0))),
                    tags.td(_money(r["spend_nanos"])),
                    tags.td(str(r["requests"])),
                    tags.td(tags.a("End users", href=f"/ui/teams/{r['id']}")),
                )
                for r in rows
            ],
            tags.tr(tags.td("(no team)"), *[tags.td("—") for _ in range(6)], tags.td(tags.a("End users", href="/ui/teams/-"))),
        )
    )
    return layout("Teams", [table], csrf, MASTER_NAV, "/ui/teams")


def team_page(team: str, users: Sequence, csrf: str) -> Tag:
    rows = []
    for row, record in users:
        budget = "—"
        state = "—"
        if record is not None:
            budget = f"${record.max_budget:g}" if record.max_budget is not None else "none"
            state = "blocked" if record.blocked else "active"
        rows.append(
            tags.tr(
                tags.td(row["id"]),
                tags.td(_money(row["spend_nanos"])),
                tags.td(budget),
                tags.td(state, class_=state if state != "—" else ""),
                tags.td(str(row["requests"])),
            )
        )
    table = tags.table(id="end-users")(
        tags.thead(tags.tr(*[tags.th(h) for h in ("End user", "Spend (30 days)", "Budget", "State", "Requests")])),
        tags.tbody(*rows),
    )
    return layout(f"End users of {team}", [table], csrf, MASTER_NAV, "/ui/teams")
