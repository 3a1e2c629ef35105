"""
The flow-control benchmark's numbers and report (L{bench.flow} measures):
a ramp run's summary from the client's tally, the replicas' sampled waiting
queues, the proxy's call log and the spend in Redis; then C{FLOW.md}, the
tables and issue 15's targets, met or missed.

    python bench/flow_report.py [DIR]

redraws C{DIR/FLOW.md} (default C{bench/results/flow}) from C{DIR/flow.json}.
"""

import json
import os
import sys
from collections import Counter
from typing import Optional

# The issue's targets.
TTFT_P99_RATIO = 0.25
JAIN_MIN = 0.95
SHARE_TOLERANCE = 0.2
CPU_RATIO_MAX = 1.05
# A shed call's answer crosses loopback after the proxy's timer fires: the
# client may see it this much later than max_queue_wait.
SHED_SLACK_S = 0.25


def quantile(values, q: float) -> Optional[float]:
    """
    :return: the C{q} quantile (nearest rank) of C{values}, or L{None}.
    """
    values = sorted(v for v in values if v is not None)
    if not values:
        return None
    return values[min(len(values) - 1, int(q * len(values)))]


def _r(value, digits: int = 3):
    return round(value, digits) if value is not None else None


def usage_of(data: bytes):
    """
    :return: the C{usage} of a JSON answer or of an SSE stream's usage chunk.
    """
    if data.startswith(b"{"):
        return json.loads(data).get("usage")
    for line in reversed(data.split(b"\n")):
        if line.startswith(b"data: {") and b'"usage"' in line:
            usage = json.loads(line[6:]).get("usage")
            if usage:
                return usage
    return None


def read_records(path: str):
    """
    :return: the JSON call records in a json_log file.
    """
    out = []
    try:
        with open(path) as f:
            for line in f:
                if line.startswith("{"):
                    out.append(json.loads(line))
    except OSError:
        pass
    return out


def summarize_ramp(calls, series, spend, records, wall: float, router: dict, steps) -> dict:
    """
    :param calls: what the client saw of each call (L{bench.flow.Client.call}).
    :param series: C{[t, waiting of replica 0, waiting of replica 1, ...]}
        samples of the replicas' C{/metrics}.
    :param spend: C{spend_nanos} in Redis, per key alias.
    :param records: the proxy's call log (json_log records).
    """
    kinds = sorted({c["kind"] for c in calls})
    replicas = len(series[0]) - 1 if series else 0
    max_waiting = [max((s[i + 1] or 0) for s in series) for i in range(replicas)] if series else []
    limit = router["max_waiting"] + 1
    over = sum(1 for s in series if any((v or 0) > limit for v in s[1:]))
    per_key = {}
    for kind in kinds:
        mine = [c for c in calls if c["kind"] == kind]
        answered = [c for c in mine if c["status"] == 200]
        shed = [c for c in mine if c["status"] in (429, 503)]
        per_key[kind] = {
            "offered": len(mine),
            "answered": len(answered),
            "shed": len(shed),
            "other_status": dict(Counter(str(c["status"]) for c in mine if c["status"] not in (200, 429, 503))),
            "lost": sum(1 for c in mine if c.get("error")),
            "ttft_p50_s": _r(quantile([c["ttft"] for c in answered], 0.5)),
            "ttft_p99_s": _r(quantile([c["ttft"] for c in answered], 0.99)),
            "latency_p50_s": _r(quantile([c["seconds"] for c in answered], 0.5)),
            "latency_p99_s": _r(quantile([c["seconds"] for c in answered], 0.99)),
            "tokens_served": sum((c["usage"] or {}).get("total_tokens", 0) for c in answered),
            "ttft_p99_by_step_s": [_r(quantile([c["ttft"] for c in answered if c["step"] == i], 0.99))
                                   for i in range(len(steps))],
        }
    shed = [c for c in calls if c["status"] in (429, 503)]
    shedding = {
        "count": len(shed),
        "statuses": dict(Counter(str(c["status"]) for c in shed)),
        "codes": dict(Counter(str(c.get("code")) for c in shed)),
        "with_retry_after": sum(1 for c in shed if c.get("retry_after")),
        "time_to_shed_max_s": _r(max((c["seconds"] for c in shed), default=None)),
        "time_to_shed_p50_s": _r(quantile([c["seconds"] for c in shed], 0.5)),
    }
    return {"summary": _headline(per_key, max_waiting, shedding), "per_key": per_key, "max_waiting_per_replica": max_waiting,
            "samples": len(series), "samples_over_limit": over, "shedding": shedding,
            "accounting": accounting(calls, spend, records, kinds), "wall_s": round(wall, 2),
            "waiting_series": series}


def _headline(per_key, max_waiting, shedding) -> dict:
    interactive = per_key.get("interactive", {})
    return {"max_waiting": max(max_waiting, default=None), "interactive_ttft_p99_s": interactive.get("ttft_p99_s"),
            "answered": {k: v["answered"] for k, v in per_key.items()}, "shed": shedding["count"]}


def accounting(calls, spend, records, kinds) -> dict:
    """
    The client's tally against the call log and Redis: per key, the calls
    and their statuses, the call ids (each answered or shed call logged
    once), and the spend (Redis = log = the costs the client computed from
    the usage it received; shed calls cost nothing).
    """
    out = {}
    ids = Counter(r.get("call_id") for r in records)
    for kind in kinds:
        mine = [c for c in calls if c["kind"] == kind]
        logged = [r for r in records if r.get("key_alias") == kind]
        client_ids = [c.get("call_id") for c in mine]
        out[kind] = {
            "client_calls": len(mine),
            "logged_calls": len(logged),
            "client_statuses": dict(Counter(str(c["status"]) for c in mine)),
            "logged_statuses": dict(Counter(str(r.get("status")) for r in logged)),
            "client_ids_missing_from_log": sum(1 for i in client_ids if i is None or i not in ids),
            "ids_logged_more_than_once": sum(1 for i in client_ids if i is not None and ids[i] > 1),
            "client_nanos": sum(c["nanos"] for c in mine),
            "logged_nanos": sum(int(r.get("cost_nanos") or 0) for r in logged),
            "redis_spend_nanos": spend.get(kind),
            "shed_logged_nanos": sum(int(r.get("cost_nanos") or 0) for r in logged if r.get("status") in (429, 503)),
            # The proxy's own measure of a shed call's wait (queued_ms).
            "shed_queued_ms_max": max((float(r.get("queued_ms") or 0) for r in logged if r.get("status") in (429, 503)),
                                      default=None),
        }
        entry = out[kind]
        entry["ok"] = (entry["client_calls"] == entry["logged_calls"]
                       and entry["client_statuses"] == entry["logged_statuses"]
                       and not entry["client_ids_missing_from_log"] and not entry["ids_logged_more_than_once"]
                       and entry["client_nanos"] == entry["logged_nanos"] == entry["redis_spend_nanos"]
                       and entry["shed_logged_nanos"] == 0 and entry["client_nanos"] > 0)
    return out


def targets(results) -> list:
    """
    :return: C{(target, measured, met)} rows for issue 15's benchmark items.
    """
    rows = []
    ramp = results.get("ramp", {})
    on, off = ramp.get("on"), ramp.get("off")
    router = results["settings"]["router"]
    if on and off:
        limit = router["max_waiting"] + 1
        rows.append((f"vLLM waiting queue <= max_waiting + 1 = {limit:g} on every replica (flow control on)",
                     f"max {on['summary']['max_waiting']:g} (per replica {_list(on['max_waiting_per_replica'])}); "
                     f"off: {off['summary']['max_waiting']:g}",
                     on["summary"]["max_waiting"] <= limit))
        p99_on = on["per_key"]["interactive"]["ttft_p99_s"]
        p99_off = off["per_key"]["interactive"]["ttft_p99_s"]
        ratio = p99_on / p99_off if p99_on is not None and p99_off else None
        rows.append((f"interactive TTFT p99 <= {TTFT_P99_RATIO} x without flow control",
                     f"{_s(p99_on)} vs {_s(p99_off)}: {_x(ratio)}", ratio is not None and ratio <= TTFT_P99_RATIO))
        shed = on["shedding"]
        bound = router["max_queue_wait"] + SHED_SLACK_S
        statuses = set(shed["statuses"])
        queued = [a["shed_queued_ms_max"] for a in on["accounting"].values() if a.get("shed_queued_ms_max") is not None]
        rows.append((f"shed calls get 429 + Retry-After within max_queue_wait ({router['max_queue_wait']:g} s; "
                     f"the client's time allowed {SHED_SLACK_S:g} s more for the answer to travel)",
                     f"{shed['count']} shed, statuses {shed['statuses']}, codes {shed['codes']}, Retry-After on "
                     f"{shed['with_retry_after']}, time to shed max {_s(shed['time_to_shed_max_s'])} at the client, "
                     f"queued_ms max {max(queued, default=0):.1f} in the call log",
                     shed["count"] > 0 and statuses == {"429"} and shed["with_retry_after"] == shed["count"]
                     and shed["time_to_shed_max_s"] <= bound))
        lost = sum(k["lost"] for run in (on, off) for k in run["per_key"].values())
        books = all(entry["ok"] for run in (on, off) for entry in run["accounting"].values())
        rows.append(("no call lost or billed twice (client = call log = Redis spend, per key; shed cost 0)",
                     f"lost {lost}; books {'balance' if books else 'DO NOT balance'} in both runs", lost == 0 and books))
    fair = results.get("fairness")
    if fair:
        shares = fair["share_of_equal"]
        within = all(v is not None and abs(v - 1) <= SHARE_TOLERANCE for v in shares.values())
        rows.append((f"two equal keys, one offering 10x: tokens within {SHARE_TOLERANCE:.0%} of equal shares, "
                     f"Jain's index >= {JAIN_MIN}",
                     f"shares {shares}, Jain {fair['jain_index']}",
                     within and fair["jain_index"] is not None and fair["jain_index"] >= JAIN_MIN))
    cpu = results.get("cpu")
    if cpu:
        rows.append((f"CPU per call, unsaturated, flow control on <= {CPU_RATIO_MAX} x off",
                     f"{cpu['median_us']['on']:.0f} vs {cpu['median_us']['off']:.0f} us: {_x(cpu['on_over_off'])}",
                     cpu["on_over_off"] is not None and cpu["on_over_off"] <= CPU_RATIO_MAX))
    return rows


def _s(value) -> str:
    return "-" if value is None else f"{value:.3f} s"


def _x(value) -> str:
    return "-" if value is None else f"{value:.3f} x"


def _list(values) -> str:
    return ", ".join(f"{v:g}" for v in values)


def markdown(results) -> str:
    settings = results["settings"]
    source = results.get("source") or {}
    lines = [
        "# Flow control benchmark (issue 15)",
        "",
        f"`python bench/flow.py{' --quick' if results['mode'] == 'quick' else ''}`, {results['mode']} run, "
        f"{results['started']} to {results.get('finished')}. Commit {source.get('commit')}, tree "
        f"{'dirty' if source.get('dirty') else 'clean'} at the start.",
        "",
        f"{settings['replicas']} simulated vLLM replicas (`tests/sim_vllm.py`: `max_num_seqs` "
        f"{settings['sim']['max_num_seqs']}, decode {settings['sim']['decode_interval'] * 1000:g} ms per token, "
        f"prefill {1 / settings['sim']['prefill_per_token']:g} tokens/s, FIFO waiting queue, simulated time) behind "
        f"one proxy process with its embedded Redis; `router_settings`: {json.dumps(settings['router'])}, "
        "`flow_control` true or false. Not vLLM: the ratios are the point.",
        "",
        "## Targets",
        "",
        "| target | measured | met |",
        "| --- | --- | --- |",
    ]
    for target, measured, met in targets(results):
        lines.append(f"| {target} | {measured} | {'yes' if met else '**no**'} |")
    cap = results.get("capacity")
    if cap:
        lines += ["", "## Capacity", "",
                  f"{cap['slots']} sequence slots; a batch call ({settings['batch'][0]} prompt tokens, "
                  f"{settings['batch'][1]} out) holds one {cap['batch_service_s']:.3f} s, an interactive call "
                  f"({settings['interactive'][0]}, {settings['interactive'][1]}) {cap['interactive_service_s']:.3f} s. "
                  f"Computed {cap['computed_batch_calls_per_s']} batch calls/s; measured (twice the slots outstanding, "
                  f"straight to the replicas) {cap['measured_batch_calls_per_s']} "
                  f"({cap['measured_over_computed']} x). The ramp is scaled on the measured figure."]
    ramp = results.get("ramp")
    if ramp:
        lines += ["", "## Saturation ramp", "",
                  f"Offered load in steps of {settings['step_seconds']:g} s: "
                  f"{', '.join(f'{s:g}x' for s in settings['steps'])} of capacity, "
                  f"{settings['interactive_share']:.0%} of it (in sequence-seconds) from `interactive` (priority 0, "
                  "streaming chats), the rest from `batch` (priority 1, completions); Poisson arrivals, the same "
                  "schedule for both runs.", "",
                  "| flow control | key | offered | answered | shed | lost | TTFT p50 | TTFT p99 | TTFT p99 per step "
                  "| latency p50 | tokens served |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for name in ("off", "on"):
            for kind, k in ramp.get(name, {}).get("per_key", {}).items():
                steps = " / ".join("-" if v is None else f"{v:.2f}" for v in k["ttft_p99_by_step_s"])
                lines.append(f"| {name} | {kind} | {k['offered']} | {k['answered']} | {k['shed']} | {k['lost']} | "
                             f"{_s(k['ttft_p50_s'])} | {_s(k['ttft_p99_s'])} | {steps} | {_s(k['latency_p50_s'])} | "
                             f"{k['tokens_served']} |")
        lines += ["", "| flow control | max waiting per replica | samples over max_waiting + 1 | shed (status, code) "
                  "| time to shed max | books |", "| --- | --- | --- | --- | --- | --- |"]
        for name in ("off", "on"):
            run = ramp.get(name)
            if run:
                shed = run["shedding"]
                books = "; ".join(f"{kind}: {a['redis_spend_nanos']} nanos in Redis, {a['logged_nanos']} logged, "
                                  f"{a['client_nanos']} by the client ({'ok' if a['ok'] else 'MISMATCH'})"
                                  for kind, a in run["accounting"].items())
                lines.append(f"| {name} | {_list(run['max_waiting_per_replica'])} | {run['samples_over_limit']} of "
                             f"{run['samples']} | {shed['count']} {shed['statuses']} {shed['codes']} | "
                             f"{_s(shed['time_to_shed_max_s'])} | {books} |")
    fair = results.get("fairness")
    if fair:
        lines += ["", "## Fair share", "",
                  f"Keys `light` ({fair['clients']['light']} calls outstanding) and `heavy` "
                  f"({fair['clients']['heavy']}), both priority 0 and weight 1, completions of "
                  f"{settings['fair'][0]} prompt tokens and {settings['fair'][1]} out; counted over "
                  f"{fair['window_s']} s after a warm-up.", "",
                  "| key | calls | tokens served | share of an equal split |", "| --- | --- | --- | --- |"]
        for kind in fair["tokens"]:
            lines.append(f"| {kind} | {fair['calls'][kind]} | {fair['tokens'][kind]} | {fair['share_of_equal'][kind]} |")
        lines.append(f"\nJain's index {fair['jain_index']}; failed calls {fair['failed']}.")
    cpu = results.get("cpu")
    if cpu:
        lines += ["", "## CPU per call, unsaturated", "",
                  f"Two proxies of this checkout (flow control on, off) on replicas that are never saturated "
                  f"({cpu['calls_per_round']} calls per round at concurrency {cpu['concurrency']}, a virtual key), "
                  f"alternating rounds; the proxy's own CPU time (not its Redis) from `/proc`.", "",
                  "| flow control | per round (us per call) | median |", "| --- | --- | --- |"]
        for name in ("on", "off"):
            lines.append(f"| {name} | {', '.join(f'{v:g}' for v in cpu['cpu_us_per_call'][name])} | "
                         f"{cpu['median_us'][name]:g} |")
        lines.append(f"\nRatio on / off: {_x(cpu['on_over_off'])}.")
    return "\n".join(lines) + "\n"


def write_report(results, out: str) -> None:
    with open(os.path.join(out, "FLOW.md"), "w") as f:
        f.write(markdown(results))


if __name__ == "__main__":
    directory = sys.argv[1] if len(sys.argv) > 1 else os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "flow")
    with open(os.path.join(directory, "flow.json")) as f:
        write_report(json.load(f), directory)
