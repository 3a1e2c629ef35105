"""
The routing benchmark's report: C{ROUTING.md} (tables, targets) and
C{routing.svg} (a chart drawn here, no plotting library needed), from the
results C{bench/routing.py} measured.

    python bench/routing_report.py bench/results/routing   # redraw from routing.json
"""

import json
import os
import sys
from typing import List

CACHE_AWARE = "cache-aware"
CACHE_AWARE_2 = "cache-aware x2 workers"


def _fmt(value, digits=3):
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def targets(results) -> List[tuple]:
    """
    :return: C{(target, measured, met)} of the issue's targets.
    """
    out = []
    runs = results["workloads"].get("multi_turn", {}).get("runs", {})
    if runs:
        ceiling = runs["pinned"]["hit_rate"]
        for name in (CACHE_AWARE, CACHE_AWARE_2):
            if name in runs:
                ratio = runs[name]["hit_rate"] / ceiling if ceiling else 0.0
                out.append((f"multi_turn: {name} hit rate >= 0.95 x pinned", f"{ratio:.3f} x", ratio >= 0.95))
        ratio = runs[CACHE_AWARE]["ttft_p50"] / runs["least-busy"]["ttft_p50"]
        out.append(("multi_turn: cache-aware TTFT p50 <= 0.5 x least-busy", f"{ratio:.3f} x", ratio <= 0.5))
        for name in (CACHE_AWARE, CACHE_AWARE_2):
            if name in runs:
                value = runs[name]["max_over_mean"]
                out.append((f"multi_turn: {name} max/mean calls per replica <= 1.3", f"{value:.3f}", value <= 1.3))
    noisy = results["workloads"].get("noisy_neighbour", {}).get("runs", {})
    if noisy:
        share = noisy[CACHE_AWARE]["share_to_replica0"]
        out.append(("noisy: cache-aware share to the saturated replica <= 1/4 of fair (0.0625)", f"{share:.3f}",
                    share <= 0.0625))
        ratio = noisy[CACHE_AWARE]["ttft_p90"] / noisy["least-busy"]["ttft_p90"]
        out.append(("noisy: cache-aware TTFT p90 <= 0.5 x least-busy", f"{ratio:.3f} x", ratio <= 0.5))
    return out


def markdown(results) -> str:
    lines = ["# Routing benchmark", "",
             "4 simulated vLLM replicas (`tests/sim_vllm.py`), simulated time; "
             "command: `python bench/routing.py`.", "",
             "Settings: `" + json.dumps(results["settings"]) + "`", "", "## Targets", "",
             "| target | measured | met |", "| --- | --- | --- |"]
    for target, measured, met in targets(results):
        lines.append(f"| {target} | {measured} | {'yes' if met else 'NO'} |")
    for workload, data in results["workloads"].items():
        lines += ["", f"## {workload}", "",
                  f"prefix cache per replica: {data['cache_blocks_per_replica']} blocks; "
                  f"working set: {data['working_set_blocks']} blocks", "",
                  "| run | calls | failed | hit rate | TTFT p50 s | TTFT p90 s | output tok/s | calls per replica | "
                  "max/mean | share to replica 0 |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for name, run in data["runs"].items():
            lines.append(
                f"| {name} | {run['calls']} | {run['failed']} | {_fmt(run['hit_rate'])} | {_fmt(run['ttft_p50'])} | "
                f"{_fmt(run['ttft_p90'])} | {_fmt(run['output_tokens_per_s'], 1)} | "
                f"{'/'.join(str(n) for n in run['calls_per_replica'])} | {_fmt(run['max_over_mean'], 2)} | "
                f"{_fmt(run['share_to_replica0'], 3)} |")
    return "\n".join(lines) + "\n"


def svg(results) -> str:
    """
    :return: grouped bars per workload: hit rate and TTFT p50 (relative to
        the largest in the workload), one bar pair per run.
    """
    width, row_h, left = 900, 22, 230
    blocks = []
    y = 40
    parts = ['<text x="10" y="24" font-size="16" font-family="sans-serif">Routing: prefix-cache hit rate (blue) '
             'and TTFT p50 (orange, scaled to the workload\'s largest)</text>']
    for workload, data in results["workloads"].items():
        runs = data["runs"]
        parts.append(f'<text x="10" y="{y + 14}" font-size="14" font-weight="bold" font-family="sans-serif">'
                     f'{workload}</text>')
        y += 24
        worst = max((r["ttft_p50"] or 0) for r in runs.values()) or 1.0
        for name, run in runs.items():
            hit = run["hit_rate"] or 0.0
            ttft = (run["ttft_p50"] or 0.0) / worst
            span = width - left - 120
            parts.append(f'<text x="10" y="{y + 14}" font-size="12" font-family="sans-serif">{name}</text>')
            parts.append(f'<rect x="{left}" y="{y + 2}" width="{hit * span:.1f}" height="8" fill="#3366cc"/>')
            parts.append(f'<rect x="{left}" y="{y + 11}" width="{ttft * span:.1f}" height="8" fill="#ff9933"/>')
            parts.append(f'<text x="{left + span + 8}" y="{y + 14}" font-size="11" font-family="sans-serif">'
                         f'hit {hit:.2f} / ttft {run["ttft_p50"] or 0:.3f}s</text>')
            y += row_h
        y += 10
    blocks.append(f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{y + 10}">')
    blocks.append('<rect width="100%" height="100%" fill="white"/>')
    blocks.extend(parts)
    blocks.append("</svg>")
    return "\n".join(blocks) + "\n"


def write_report(results, out: str) -> None:
    with open(os.path.join(out, "ROUTING.md"), "w") as f:
        f.write(markdown(results))
    with open(os.path.join(out, "routing.svg"), "w") as f:
        f.write(svg(results))


if __name__ == "__main__":
    directory = sys.argv[1] if len(sys.argv) > 1 else os.path.join(os.path.dirname(__file__), "results", "routing")
    with open(os.path.join(directory, "routing.json")) as f:
        write_report(json.load(f), directory)
