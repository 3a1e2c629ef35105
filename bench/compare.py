"""
A/B: the CPU cost per call of two checkouts of dheera_tx, side by side in
one run.

    python bench/compare.py --baseline DIR [--rounds 5] [--seconds 8] [--latency 5]

``DIR`` holds another checkout's ``dheera_tx/`` and ``twisted/plugins/``
(e.g. ``git worktree add /tmp/base <commit>``).  Both proxies run with one
worker on the same upstreams (nginx answering a vLLM-shaped chat
completion, and the paced SSE upstream of ``bench/upstream.py``), pinned to
the same core, with a virtual key that has limits and a budget (so auth,
admission, metering and spend all run).  Rounds alternate A and B so that
drift in the machine's speed falls on both; each round measures
non-streaming calls with wrk at c=32 and a saturating SSE run, and reads the
proxy's and its Redis's CPU time from ``/proc``.  With ``--latency S``, each
round also measures c=1 for S seconds with the virtual key and with the
master key, with the proxy and its Redis moved onto the load core (as
``run.py``'s one-core run), and the upstream alone: the added p50 is the
proxy's minus the upstream's.  The report gives every
round and the median per side, and the ratio B/A of the medians: what
matters on a shared VM is the ratio, not the absolute numbers.

Results go to ``OUT/compare.json`` (default ``bench/results/compare``).
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)

import load  # noqa: E402
import targets  # noqa: E402
from run import SMOKE, Bench  # noqa: E402


def _commit(root: str) -> str:
    try:
        head = subprocess.run(["git", "-C", root, "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", root, "status", "--porcelain"], capture_output=True, text=True, timeout=10).stdout.strip()
    except OSError:
        return "unknown"
    return head + ("-dirty" if dirty else "") if head else "unknown"


def _median(rounds, field):
    values = [r[field] for r in rounds if r.get(field) is not None]
    return round(statistics.median(values), 1) if values else None


FIELDS = ("req_per_s", "cpu_us_per_req", "redis_cpu_us_per_req", "cpu_us_per_chunk", "sse_events_per_s")
LATENCY_FIELDS = ("c1_vkey_added_p50_us", "c1_master_added_p50_us", "c1_vkey_cpu_us_per_req", "c1_vkey_redis_cpu_us_per_req", "c1_master_cpu_us_per_req")


def _latency(bench, direct, vkey, master, seconds: float) -> dict:
    """
    c=1 with everything on the load core: the upstream alone, then the
    virtual key and the master key.

    :return: the added p50 of each key (target minus upstream) and the CPU
        per call of the proxy (and its Redis) at c=1.
    """
    out = {}
    upstream = load.requests(direct, 1, seconds, bench.work)
    base = upstream.get("latency_us", {}).get("p50")
    for name, target in (("vkey", vkey), ("master", master)):
        with load.moved_to(target, bench.load_cores):
            result = load.requests(target, 1, seconds, bench.work)
        p50 = result.get("latency_us", {}).get("p50")
        out[f"c1_{name}_added_p50_us"] = p50 - base if p50 is not None and base is not None else None
        out[f"c1_{name}_cpu_us_per_req"] = result.get("cpu_us_per_req")
        if name == "vkey":
            out["c1_vkey_redis_cpu_us_per_req"] = result.get("redis_cpu_us_per_req")
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="A/B CPU per call of two dheera_tx checkouts")
    parser.add_argument("--baseline", required=True, help="directory of the baseline checkout (side A)")
    parser.add_argument("--candidate", default=ROOT, help="directory of the candidate checkout (side B; default this one)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=8.0, help="wrk duration per round")
    parser.add_argument("--latency", type=float, default=0.0, help="seconds of c=1 per key and round (0: none)")
    parser.add_argument("--out", default=os.path.join(HERE, "results", "compare"))
    args = parser.parse_args(argv)

    bench = Bench(argparse.Namespace(smoke=True, out=args.out, dheera_root=None))
    bench.plan = dict(SMOKE)
    sides = {"A": os.path.abspath(args.baseline), "B": os.path.abspath(args.candidate)}
    results = {
        "sides": {name: {"root": root, "commit": _commit(root)} for name, root in sides.items()},
        "machine": bench.results["machine"],
        "rounds": {"A": [], "B": []},
    }
    try:
        bench.start_upstreams()
        proxies = {}
        masters = {}
        direct = bench.direct()
        for name, root in sides.items():
            bench.say(f"starting side {name}: {root} ({results['sides'][name]['commit']})")
            running = targets.start_dheera(
                bench.children, f"dheera-{name}", os.path.join(bench.work, f"dheera-{name}"), bench.json_port, bench.sse_port, 1, bench.proxy_cores, root,
                widen_routes=False,
            )
            proxies[name] = running.target(f"dheera-{name}", f"side {name}", running.virtual_key)
            masters[name] = running.target(f"dheera-{name}-master", f"side {name}, master key", targets.MASTER_KEY)
            load.requests(proxies[name], 32, 2, bench.work)
        for number in range(args.rounds):
            for name in ("A", "B") if number % 2 == 0 else ("B", "A"):
                target = proxies[name]
                wrk = load.requests(target, 32, args.seconds, bench.work)
                sse = load.streams(target, 200, 1000, 1.0, bench.work, 120.0)
                entry = {
                    "req_per_s": wrk.get("req_per_s"),
                    "cpu_us_per_req": wrk.get("cpu_us_per_req"),
                    "redis_cpu_us_per_req": wrk.get("redis_cpu_us_per_req"),
                    "ok": wrk.get("ok"),
                    "sse_events_per_s": sse.get("events_per_s"),
                    "cpu_us_per_chunk": sse.get("cpu_us_per_chunk"),
                }
                if args.latency:
                    entry.update(_latency(bench, direct, target, masters[name], args.latency))
                results["rounds"][name].append(entry)
                bench.say(f"round {number + 1} side {name}: {entry}")
        summary = {}
        for name in ("A", "B"):
            rounds = results["rounds"][name]
            summary[name] = {field: _median(rounds, field) for field in FIELDS + (LATENCY_FIELDS if args.latency else ())}
        summary["B/A"] = {
            field: round(summary["B"][field] / summary["A"][field], 3) if summary["A"][field] and summary["B"][field] else None
            for field in summary["A"]
        }
        results["median"] = summary
        results["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S")
    finally:
        bench.children.stop_all()
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "compare.json"), "w") as f:
        json.dump(results, f, indent=2)
    print(json.dumps(results["median"], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
