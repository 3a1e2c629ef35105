"""
Turn a run's raw numbers into ``results.json``, ``RESULTS.md`` (tables
with ratios against direct, LiteLLM and nginx, and the issue's targets
checked) and ``chart.png``.
"""

import json
import os
from typing import List, Optional

ORDER = ["direct", "nginx", "dheera-master", "dheera-vkey", "dheera-vkey-w2", "litellm"]
SHORT = {
    "direct": "direct",
    "nginx": "nginx",
    "dheera-master": "dheera master",
    "dheera-vkey": "dheera vkey",
    "dheera-vkey-w2": "dheera vkey w2",
    "litellm": "LiteLLM",
}
VKEY = "dheera-vkey"


def _get(d, *path):
    for p in path:
        if not isinstance(d, dict) or p not in d:
            return None
        d = d[p]
    return d


def _runs_note(result: dict, direct) -> str:
    """
    :return: "; delay p99 of each run: ..." for a repeated stream run.
    """
    runs = (result or {}).get("runs_delay_p99_ms")
    if not runs:
        return ""
    text = "; delay p99 of each run " + ", ".join(_fmt(r, 2) for r in runs) + " ms"
    direct_runs = (direct or {}).get("runs_delay_p99_ms")
    if direct_runs:
        text += " (direct " + ", ".join(_fmt(r, 2) for r in direct_runs) + " ms)"
    return text


def _source_line(source) -> str:
    """
    :return: which tree was measured: its commit, and whether it had
        uncommitted changes.
    """
    if not source or not source.get("commit"):
        return "Commit: not recorded (not a git checkout, or results from before commits were recorded)."
    state = {True: f"**dirty** ({source.get('changed')} changed files)", False: "clean"}.get(source.get("dirty"), "state unknown")
    return f"Commit {source['commit']}, tree {state} when the run started."


def _spread(result) -> str:
    """
    :return: "lowest–highest" of a repeated run's delay p99, or "–".
    """
    spread = (result or {}).get("runs_delay_p99_spread_ms")
    return f"{_fmt(spread[0], 2)}–{_fmt(spread[1], 2)}" if spread else "–"


def _fmt(value, digits: int = 1) -> str:
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "NO"
    if isinstance(value, float) or isinstance(value, int):
        if abs(value) >= 1000:
            return f"{value:,.0f}"
        return f"{value:.{digits}f}"
    return str(value)


def _ratio(a, b) -> str:
    if a is None or not b:
        return "–"
    return f"{a / b:.2f}x" if a / b < 10 else f"{a / b:.1f}x"


def _ms(us) -> Optional[float]:
    return None if us is None else us / 1000.0


def _sub(a, b) -> Optional[float]:
    return None if a is None or b is None else a - b


def usable(result: dict, tolerance: float = 0.01) -> bool:
    """
    :param tolerance: the share of requests (five times that of streams,
        at most half) that may have failed.
    :return: whether a measurement produced numbers worth reporting: it
        ran, and few enough of its requests or streams failed.  (A strict
        C{ok} also needs zero errors; the report shows both.)
    """
    if result.get("ok"):
        return True
    if "requests" in result and "errors" in result:
        return result["requests"] > 0 and sum(result["errors"].values()) <= tolerance * result["requests"]
    if "streams" in result and "failed" in result:
        return result["failed"] <= min(0.5, 5 * tolerance) * result["streams"] and result.get("content_chunks", 0) > 0
    return False


def _errors(entry: dict) -> str:
    """
    :return: failed requests (non-2xx/3xx answers, socket errors, timeouts)
        over all of a target's wrk runs, out of its requests.
    """
    runs = [entry.get(c) or {} for c in ("c1", "c1_one_core", "c32", "c128") if not (entry.get(c) or {}).get("note")]
    if not any("errors" in r for r in runs):
        return "run failed"
    failed = sum(sum(r.get("errors", {}).values()) for r in runs)
    total = sum(r.get("requests", 0) for r in runs)
    return "0" if failed == 0 else f"{failed} of {total:,}"


def peak_rps(entry: Optional[dict]) -> Optional[float]:
    """
    :return: the better of a target's c=32 and c=128 req/s (L{usable}
        runs only).
    """
    if not entry:
        return None
    values = [_get(entry, c, "req_per_s") for c in ("c32", "c128") if usable(entry.get(c) or {})]
    return max(values) if values else None


def _ordered(section: dict) -> List[str]:
    return [k for k in ORDER if k in section] + [k for k in section if k not in ORDER]


def targets_check(results: dict) -> List[dict]:
    """
    :return: each issue target with the measured value and whether it is met.
    """
    req, sse, tr = results["requests"], results["streams"], results["transfers"]
    checks = []

    def check(goal, measured, met, detail=""):
        checks.append({"goal": goal, "measured": measured, "met": met, "detail": detail})

    vk, lite, ngx = peak_rps(req.get(VKEY)), peak_rps(req.get("litellm")), peak_rps(req.get("nginx"))
    check(
        ">= 10x LiteLLM req/s (1 worker each, virtual key + metering)",
        _ratio(vk, lite),
        None if vk is None or lite is None else vk >= 10 * lite,
        f"{_fmt(vk)} vs {_fmt(lite)} req/s (best of c=32, c=128)",
    )
    check(
        ">= 1/8 of nginx req/s",
        _ratio(vk, ngx),
        None if vk is None or ngx is None else vk * 8 >= ngx,
        f"{_fmt(vk)} vs {_fmt(ngx)} req/s; 1/8 = 0.125x",
    )
    def added(run: str, q: str):
        return _sub(_get(req, VKEY, run, "latency_us", q), _get(req, "direct", run, "latency_us", q))

    def split_detail(q: str) -> str:
        return (
            f"one core; with proxy and client on separate cores: {_fmt(_ms(added('c1', q)), 3)} ms "
            f"(nginx: {_fmt(_ms(_sub(_get(req, 'nginx', 'c1', 'latency_us', q), _get(req, 'direct', 'c1', 'latency_us', q))), 3)} ms)"
        )

    for q, limit in (("p50", 500), ("p99", 2000)):
        value = added("c1_one_core", q)
        check(
            f"added latency {q} <= {limit / 1000:g} ms at c=1",
            None if value is None else f"{value / 1000:.3f} ms",
            None if value is None else value <= limit,
            split_detail(q),
        )
    paced = _get(sse, VKEY, "sse_rate") or {}
    paced_workers = _get(sse, VKEY, "workers") or 1
    rate = paced.get("events_per_s_per_worker")
    lag = _sub(_get(paced, "chunk_delay_ms", "p99"), _get(sse, "direct", "sse_rate", "chunk_delay_ms", "p99"))
    offered = (paced.get("streams") or 0) * 1000.0 / (paced.get("interval_ms") or 1) / max(1, paced_workers)
    check(
        ">= 20,000 relayed SSE chunks/s per worker",
        None if rate is None else f"{_fmt(rate)} chunks/s, added delay p99 {_fmt(lag, 2)} ms",
        None if rate is None or lag is None else (rate >= 20000 and lag <= 10 and bool(paced.get("ok"))),
        f"{_fmt(offered)} chunks/s offered per worker; met = delivered >= 20,000/s while keeping up (added delay p99 <= 10 ms). "
        f"Saturated (backlog coalesced): {_fmt(_get(sse, VKEY, 'sse_saturate', 'events_per_s_per_worker'))}/s with delay p99 "
        f"{_fmt(_get(sse, VKEY, 'sse_saturate', 'chunk_delay_ms', 'p99'))} ms",
    )
    large = _get(sse, VKEY, "sse_large") or {}
    direct_large = _get(sse, "direct", "sse_large")
    added = _sub(_get(large, "chunk_delay_ms", "p99"), _get(direct_large, "chunk_delay_ms", "p99"))
    runs = len(large.get("runs_delay_p99_ms") or []) or 1
    check(
        f"{large.get('streams', 1000)} concurrent streams on one worker: per-chunk delay p99 minus direct's <= 10 ms"
        + (f" (median of {runs} runs)" if runs > 1 else " (one run)"),
        None if added is None else f"{added:.2f} ms",
        None if added is None else (added <= 10 and bool(large.get("ok"))),
        f"{(large.get('streams') or 0) - (large.get('failed') or 0)} of {large.get('streams')} streams complete; "
        f"delay p99 spread over the runs {_spread(large)} ms (direct {_spread(direct_large)} ms); "
        f"gap p99 {_fmt(_get(large, 'gap_ms', 'p99'), 2)} ms vs direct {_fmt(_get(direct_large, 'gap_ms', 'p99'), 2)} ms"
        + _runs_note(large, direct_large),
    )
    up, down = _get(tr, VKEY, "upload"), _get(tr, VKEY, "download")
    growth = [g for g in (_get(up, "rss_growth_mb"), _get(down, "rss_growth_mb")) if g is not None]
    size = results["plan"]["transfer_bytes"]
    check(
        f"{size / 2**30:g} GiB up and down, RSS growth <= 30 MB",
        f"up {_fmt(_get(up, 'rss_growth_mb'))} MB, down {_fmt(_get(down, 'rss_growth_mb'))} MB" if growth else None,
        None if len(growth) < 2 else (max(growth) <= 30 and bool(_get(up, "ok")) and bool(_get(down, "ok"))),
        f"up {_fmt(_get(up, 'mib_per_s'))} MiB/s, down {_fmt(_get(down, 'mib_per_s'))} MiB/s",
    )
    return checks


def markdown(results: dict) -> str:
    """
    :return: RESULTS.md.
    """
    req, sse, tr = results["requests"], results["streams"], results["transfers"]
    m = results["machine"]
    lines = [
        "# dheera_tx benchmark results",
        "",
        f"Mode **{results['mode']}**, started {results['started']}, took {results.get('seconds', '?')} s. "
        f"{m['cpus']} CPUs, Python {m['python']}, {m['platform']}. "
        f"Proxy pinned to cores {m['proxy_cores']}, load generators and upstreams to {m['load_cores']} "
        "(the 2-worker proxy is not pinned and shares the load core). "
        f"Load average at start {m.get('loadavg_start')}, at end {m.get('loadavg_end')} "
        "(anything else running on the machine skews the numbers, c=1 p99 first).",
        "Versions: " + ", ".join(f"{k} {v}" for k, v in sorted((results.get("versions") or {}).items()) if v)
        + (f", LiteLLM {results['litellm_version']}" if results.get("litellm_version") else "")
        + ".",
        _source_line(results.get("source")),
        "",
    ]
    if results["mode"] == "smoke":
        lines += ["> Smoke run: durations of about a second, small N. The numbers only show that the pipeline works.", ""]

    lines += ["## Issue 6 targets", "", "| target | measured | met | detail |", "| --- | --- | --- | --- |"]
    for c in targets_check(results):
        met = "n/a" if c["met"] is None else ("**yes**" if c["met"] else "**no**")
        lines.append(f"| {c['goal']} | {c['measured'] or '–'} | {met} | {c['detail']} |")

    plan = results["plan"]
    lines += [
        "",
        "## Non-streaming requests",
        "",
        f"`POST /v1/chat/completions` (small JSON body, vLLM-shaped answer from nginx `return 200`), wrk with a Lua "
        f"script, 1 thread on the load core. c=1 for {plan['latency_s']} s twice: with the proxy on its own core "
        "(split) and with the proxy moved onto the load core for the run (one core). On this VM a request that hops "
        "between cores waits for the idle core to wake (milliseconds at p99, for nginx too), so the one-core run is "
        f"the measure of the proxy's own added latency. c=32 and c=128 for {plan['load_s']} s each (split). "
        "Added latency is the target's minus direct's. CPU per request is the proxy processes' utime+stime over the "
        "c=32 run divided by its requests (Redis separately). Ratios use each target's best of c=32 and c=128.",
        "",
        "| target | c=1 one core p50 ms | p99 ms | added p50 ms | added p99 ms | c=1 split p50 ms | p99 ms | added p50 ms | "
        "added p99 ms | c=32 req/s | c=32 p99 ms | c=128 req/s | c=128 p99 ms | errors | CPU us/req | Redis us/req | "
        "peak RSS MB | vs direct | vs LiteLLM | vs nginx |",
        "| --- | " + " | ".join(["---:"] * 19) + " |",
    ]
    lite, ngx, direct = peak_rps(req.get("litellm")), peak_rps(req.get("nginx")), peak_rps(req.get("direct"))
    for key in _ordered(req):
        e = req[key]
        best = peak_rps(e)
        cells = [e["label"]]
        for run in ("c1_one_core", "c1"):
            p50, p99 = _get(e, run, "latency_us", "p50"), _get(e, run, "latency_us", "p99")
            cells += [
                _fmt(_ms(p50), 3),
                _fmt(_ms(p99), 3),
                "–" if key == "direct" else _fmt(_ms(_sub(p50, _get(req, "direct", run, "latency_us", "p50"))), 3),
                "–" if key == "direct" else _fmt(_ms(_sub(p99, _get(req, "direct", run, "latency_us", "p99"))), 3),
            ]
        cells += [
            _fmt(_get(e, "c32", "req_per_s")),
            _fmt(_ms(_get(e, "c32", "latency_us", "p99")), 2),
            _fmt(_get(e, "c128", "req_per_s")),
            _fmt(_ms(_get(e, "c128", "latency_us", "p99")), 2),
            _errors(e),
            _fmt(_get(e, "c32", "cpu_us_per_req")),
            _fmt(_get(e, "c32", "redis_cpu_us_per_req")),
            _fmt(e.get("peak_rss_mb")),
            _ratio(best, direct),
            _ratio(best, lite),
            _ratio(best, ngx),
        ]
        lines.append("| " + " | ".join(cells) + " |")

    small, large, paced, sat = plan["sse_small"], plan["sse_large"], plan["sse_rate"], plan["sse_saturate"]
    lines += [
        "",
        "## Streaming (SSE)",
        "",
        f"Paced vLLM-shaped streams from `bench/upstream.py` (one event per write; streams on one interval share a "
        f"tick, like a batched decode step). Small: {small[0]} streams x {small[1]} chunks every {small[2]:g} ms. "
        f"Large: {large[0]} streams x {large[1]} chunks every {large[2]:g} ms "
        f"({large[0] * 1000 / large[2]:,.0f} chunks/s offered"
        + (
            f"; run {plan['sse_large_runs']} times per target, the run with the median delay p99 is shown with the "
            "spread (lowest–highest p99) of all runs, since that p99 swings from run to run on a shared VM). "
            if plan.get("sse_large_runs", 1) > 1
            else "). "
        )
        +
        f"Rate: {paced[0]} streams x {paced[1]} chunks every "
        f"{paced[2]:g} ms per worker ({paced[0] * 1000 / paced[2]:,.0f} chunks/s offered to each worker: a "
        "2-worker target gets twice the streams): the delivered rate per worker, and whether the proxy keeps up "
        "(added delay). A worker that keeps up delivers what it is offered, so its rate is a lower bound of its "
        "capacity; one that falls behind shows its capacity. "
        f"Saturated: {sat[0]} streams x {sat[1]} chunks every {sat[2]:g} ms, offered "
        "faster than any proxy relays: a proxy that falls behind reads several queued events at once and relays "
        "them in one write, so this rate counts coalesced events and its delay shows the backlog. "
        "Chunk delay = arrival time minus the time the upstream wrote the chunk (same monotonic clock); "
        "added = target minus direct. TTFB = request sent to first response byte. CPU per chunk from the rate run; "
        "the ratios compare it (LiteLLM's or nginx's CPU per chunk over the target's: above 1x the target relays a "
        "chunk with less CPU). Saturated rates are not compared: they count coalesced backlog.",
        "",
        f"| target | {small[0]}: TTFB p50 ms | {small[0]}: TTFB p99 ms | {small[0]}: delay p99 ms | {small[0]}: added p99 ms | "
        f"{large[0]}: complete | {large[0]}: TTFB p99 ms | {large[0]}: delay p99 ms | {large[0]}: delay p99 spread ms | "
        f"{large[0]}: delay p99 minus direct's ms | "
        f"{large[0]}: gap p99 ms | rate: chunks/s per worker | rate: added p99 ms | rate: CPU us/chunk | "
        "saturated: chunks/s per worker | saturated: delay p99 ms | CPU/chunk vs LiteLLM | CPU/chunk vs nginx |",
        "| --- | " + " | ".join(["---:"] * 17) + " |",
    ]
    ds_small = _get(sse, "direct", "sse_small", "chunk_delay_ms", "p99")
    ds_large = _get(sse, "direct", "sse_large", "chunk_delay_ms", "p99")
    ds_rate = _get(sse, "direct", "sse_rate", "chunk_delay_ms", "p99")
    lite_cpu = _get(sse, "litellm", "sse_rate", "cpu_us_per_chunk")
    ngx_cpu = _get(sse, "nginx", "sse_rate", "cpu_us_per_chunk")
    for key in _ordered(sse):
        e = sse[key]
        s_, l_, r_, t_ = (e.get(n) or {} for n in ("sse_small", "sse_large", "sse_rate", "sse_saturate"))
        saturated = t_.get("events_per_s_per_worker")
        cells = [
            e["label"],
            _fmt(_get(s_, "ttfb_ms", "p50"), 2),
            _fmt(_get(s_, "ttfb_ms", "p99"), 2),
            _fmt(_get(s_, "chunk_delay_ms", "p99"), 2),
            "–" if key == "direct" else _fmt(_sub(_get(s_, "chunk_delay_ms", "p99"), ds_small), 2),
            f"{l_.get('streams', 0) - l_.get('failed', 0)}/{l_.get('streams', 0)}" if l_.get("streams") else "–",
            _fmt(_get(l_, "ttfb_ms", "p99"), 2),
            _fmt(_get(l_, "chunk_delay_ms", "p99"), 2),
            _spread(l_),
            "–" if key == "direct" else _fmt(_sub(_get(l_, "chunk_delay_ms", "p99"), ds_large), 2),
            _fmt(_get(l_, "gap_ms", "p99"), 2),
            _fmt(r_.get("events_per_s_per_worker")),
            "–" if key == "direct" else _fmt(_sub(_get(r_, "chunk_delay_ms", "p99"), ds_rate), 2),
            _fmt(r_.get("cpu_us_per_chunk")),
            _fmt(saturated),
            _fmt(_get(t_, "chunk_delay_ms", "p99"), 1),
            "–" if key == "direct" else _ratio(lite_cpu, r_.get("cpu_us_per_chunk")),
            "–" if key == "direct" else _ratio(ngx_cpu, r_.get("cpu_us_per_chunk")),
        ]
        lines.append("| " + " | ".join(cells) + " |")

    size = plan["transfer_bytes"]
    lines += [
        "",
        f"## {size / 2**20:g} MiB transfers",
        "",
        "One upload (`POST /upload`, Content-Length, to a sink that counts the bytes) and one download "
        "(`GET /download`, zero bytes with a Content-Length) through each target, from `bench/upstream.py`. "
        "RSS growth = the proxy processes' peak RSS during the transfer (sampled every 20 ms, and VmHWM) minus "
        "their RSS before it; dheera_tx runs on a freshly started process for this.",
        "",
        "| target | download ok | download MiB/s | download RSS growth MB | upload ok | upload MiB/s | upload RSS growth MB |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for key in _ordered(tr):
        e = tr[key]
        cells = [e["label"]]
        for direction in ("download", "upload"):
            r = e.get(direction) or {}
            cells += [_fmt(r.get("ok")), _fmt(r.get("mib_per_s")), _fmt(r.get("rss_growth_mb"))]
        lines.append("| " + " | ".join(cells) + " |")

    for name, profile in sorted((results.get("profiles") or {}).items()):
        what = "non-streaming requests at c=32" if name == "profile" else "saturating SSE streams"
        lines += [
            "",
            f"## Profile: dheera_tx virtual key, {what}",
            "",
            f"py-spy, {profile['samples']} samples of the one worker (idle excluded); flame graph "
            f"[{profile['svg']}]({profile['svg']}). Self = samples with the function on top of the stack; "
            "total = samples with it anywhere on the stack (reactor-loop and twistd frames left out). "
            "py-spy samples Python frames only: time in a C call or a system call (socket send/recv) is charged to "
            "the Python function making it (`untilConcludes` is Twisted's wrapper around `socket.send`).",
            "",
            "| # | self % | function (self) | total % | function (total) |",
            "| ---: | ---: | --- | ---: | --- |",
        ]
        totals = [t for t in profile["total"]]
        for i, own in enumerate(profile["self"]):
            tot = totals[i] if i < len(totals) else {"function": "", "percent": None}
            lines.append(f"| {i + 1} | {own['percent']} | `{own['function']}` | {_fmt(tot['percent'])} | `{tot['function']}` |")

    if results.get("install"):
        lines += ["", "## Installation", "", "```", json.dumps(results["install"], indent=2), "```"]
    if results["notes"]:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in results["notes"]]
    lines.append("")
    return "\n".join(lines)


def chart(results: dict, path: str) -> Optional[str]:
    """
    Draw the chart.

    :return: an error message when matplotlib is missing, else L{None}.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed: no chart"
    req, sse, tr = results["requests"], results["streams"], results["transfers"]
    fig, axes = plt.subplots(2, 2, figsize=(14, 9))
    fig.suptitle(f"dheera_tx benchmark ({results['mode']} run, {results['started']})")

    def bars(ax, keys, series, title, ylabel, log=False, floor=None):
        width = 0.8 / max(1, len(series))
        for i, (name, values) in enumerate(series):
            xs = [k + (i - (len(series) - 1) / 2) * width for k in range(len(keys))]
            heights = [0 if v is None else (max(v, floor) if floor is not None else v) for v in values]
            drawn = ax.bar(xs, heights, width, label=name)
            for rect, v in zip(drawn, values):
                if v is not None:
                    ax.annotate(_fmt(v, 2), (rect.get_x() + rect.get_width() / 2, rect.get_height()), ha="center", va="bottom", fontsize=7)
        ax.set_xticks(range(len(keys)))
        ax.set_xticklabels([SHORT.get(k, k) for k in keys], rotation=20, fontsize=8)
        ax.set_title(title, fontsize=10)
        ax.set_ylabel(ylabel)
        if log:
            ax.set_yscale("log")
        if len(series) > 1:
            ax.legend(fontsize=8)

    keys = _ordered(req)
    bars(
        axes[0][0],
        keys,
        [(f"c={c[1:]}", [_get(req, k, c, "req_per_s") if usable(_get(req, k, c) or {}) else None for k in keys]) for c in ("c32", "c128")],
        "Non-streaming throughput (higher is better)",
        "requests/s (log)",
        log=True,
    )
    bars(
        axes[0][1],
        keys,
        [
            (f"{p} {label}", [_ms(_get(req, k, run, "latency_us", p)) if usable(_get(req, k, run) or {}) else None for k in keys])
            for run, label in (("c1_one_core", "one core"), ("c1", "split cores"))
            for p in ("p50", "p99")
        ],
        "Latency at concurrency 1 (lower is better)",
        "ms (log)",
        log=True,
    )
    keys = [k for k in _ordered(sse) if k != "direct"]
    plan = results["plan"]

    def added_delay(key, run):
        return _sub(_get(sse, key, run, "chunk_delay_ms", "p99"), _get(sse, "direct", run, "chunk_delay_ms", "p99"))

    bars(
        axes[1][0],
        keys,
        [
            (f"{plan['sse_small'][0]} streams", [added_delay(k, "sse_small") for k in keys]),
            (f"{plan['sse_large'][0]} streams", [added_delay(k, "sse_large") for k in keys]),
            (f"{plan['sse_rate'][0] * 1000 / plan['sse_rate'][2]:,.0f} chunks/s", [added_delay(k, "sse_rate") for k in keys]),
        ],
        "SSE added per-chunk delay p99 vs direct (lower is better)",
        "ms (log; <= 0 drawn at 0.01)",
        log=True,
        floor=0.01,
    )
    keys = _ordered(tr)
    bars(
        axes[1][1],
        keys,
        [(d, [_get(tr, k, d, "rss_growth_mb") for k in keys]) for d in ("download", "upload")],
        f"RSS growth, {results['plan']['transfer_bytes'] / 2**20:g} MiB transfers (lower is better)",
        "MB",
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


def write(results: dict, out: str) -> dict:
    """
    Write results.json, RESULTS.md and chart.png into C{out}.

    :return: name -> path of what was written.
    """
    os.makedirs(out, exist_ok=True)
    paths = {}
    chart_path = os.path.join(out, "chart.png")
    problem = chart(results, chart_path)
    if problem:
        results["notes"].append(problem)
    else:
        paths["chart"] = chart_path
    results["targets"] = targets_check(results)
    paths["json"] = os.path.join(out, "results.json")
    with open(paths["json"], "w") as f:
        json.dump(results, f, indent=2)
    paths["markdown"] = os.path.join(out, "RESULTS.md")
    with open(paths["markdown"], "w") as f:
        f.write(markdown(results))
    return paths
