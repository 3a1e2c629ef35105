"""
The dheera_tx benchmark, in one command:

    python bench/run.py            # full run (installs what it needs, ~10 min)
    python bench/run.py --smoke    # seconds: the pipeline works (CI)

Side by side, on one machine and the same upstreams: direct to the
upstream, nginx ``proxy_pass`` (the ceiling), dheera_tx with the master key,
dheera_tx with a virtual key (limits and metering on), dheera_tx with two
workers, and LiteLLM's ``/vllm`` pass-through.  Results go to
``bench/results/`` (``RESULTS.md``, ``results.json``, ``chart.png``,
``profile*.svg``); see ``bench/README.md``.

The proxy under test is pinned to core 0, the load generators and upstreams
to core 1 (when the machine has two cores or more).  Every process started
is stopped at the end, on error and on Ctrl-C.  Loopback only.
"""

import argparse
import datetime
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from processes import Children, free_port, wait_port_file, wait_tcp  # noqa: E402

FULL = {
    "warm_s": 2,
    "latency_s": 10,
    "load_s": 10,
    "sse_small": (100, 100, 20.0),  # streams, chunks each, ms between chunks
    "sse_large": (1000, 40, 100.0),
    "sse_large_runs": 5,  # its p99 swings run to run on a shared VM: the median of 5 runs counts, with the spread
    "sse_rate": (200, 400, 8.0),  # 25,000 chunks/s offered: keeps up with the 20,000 target?
    "sse_saturate": (200, 300, 1.0),
    "sse_timeout": 120.0,
    "transfer_bytes": 2**30,
    "transfer_timeout": 300.0,
    "profile_s": 10,
    "idle_s": 0.5,  # pause between stream runs (sockets in TIME_WAIT, background work)
}
SMOKE = {
    "warm_s": 0,  # no warm-up: the smoke run checks the pipeline, not the numbers
    "latency_s": 1,
    "load_s": 1,
    "sse_small": (10, 5, 5.0),
    "sse_large": (50, 5, 10.0),
    "sse_large_runs": 1,
    "sse_rate": (20, 20, 2.0),
    "sse_saturate": (20, 20, 1.0),
    "sse_timeout": 20.0,
    "transfer_bytes": 8 * 2**20,
    "transfer_timeout": 30.0,
    "profile_s": 0,
    "idle_s": 0.1,
}


def _median_run(results: list) -> dict:
    """
    :return: of repeated stream runs, the one with the median chunk delay
        p99 (a failed run counts as the worst), with every run's p99 listed
        under C{runs_delay_p99_ms} and their spread (lowest, highest) under
        C{runs_delay_p99_spread_ms}.
    """
    if len(results) == 1:
        return results[0]

    def p99(result):
        value = (result.get("chunk_delay_ms") or {}).get("p99")
        return float("inf") if value is None or not result.get("ok") or result.get("failed") else value

    ordered = sorted(results, key=p99)
    chosen = dict(ordered[len(ordered) // 2])
    chosen["runs_delay_p99_ms"] = [(r.get("chunk_delay_ms") or {}).get("p99") for r in results]
    measured = [p99(r) for r in results]
    chosen["runs_delay_p99_spread_ms"] = [min(measured), max(measured)] if all(v != float("inf") for v in measured) else None
    return chosen


class Bench:
    """
    One benchmark run: its settings, processes, upstreams and results.
    """

    def __init__(self, args):
        self.args = args
        self.plan = dict(SMOKE if args.smoke else FULL)
        self.children = Children()
        self.work = tempfile.mkdtemp(prefix="dheera-bench-")
        self.logs = os.path.join(self.work, "logs")
        os.makedirs(self.logs)
        self.out = args.out
        os.makedirs(self.out, exist_ok=True)
        cores = sorted(os.sched_getaffinity(0))
        if len(cores) >= 2:
            self.proxy_cores, self.load_cores = [cores[0]], [cores[1]]
            os.sched_setaffinity(0, set(self.load_cores))
        else:
            self.proxy_cores = self.load_cores = None
        self.results = {
            "mode": "smoke" if args.smoke else "full",
            "started": datetime.datetime.now().isoformat(timespec="seconds"),
            "machine": {
                "cpus": os.cpu_count(),
                "python": platform.python_version(),
                "platform": platform.platform(),
                "proxy_cores": self.proxy_cores,
                "load_cores": self.load_cores,
                "loadavg_start": _loadavg(),
            },
            "plan": self.plan,
            "requests": {},
            "streams": {},
            "transfers": {},
            "peak_rss_mb": {},
            "notes": [],
        }

    # -- helpers --

    def note(self, text: str) -> None:
        """
        Record a remark for the report (and say it now).
        """
        print(f"  note: {text}", flush=True)
        self.results["notes"].append(text)

    def say(self, text: str) -> None:
        """
        Progress on stdout.
        """
        print(f"[{time.strftime('%H:%M:%S')}] {text}", flush=True)

    # -- the upstreams --

    def start_upstreams(self) -> None:
        """
        The Python SSE/transfer upstream, the nginx JSON upstream and the
        nginx ceiling proxy.
        """
        import nginx

        self.sse_port = free_port()
        ready = os.path.join(self.work, "upstream.port")
        up = self.children.start(
            "upstream",
            [sys.executable, os.path.join(HERE, "upstream.py"), "--port", str(self.sse_port), "--ready-file", ready],
            self.logs,
            cores=self.load_cores,
        )
        wait_port_file(ready, 15, up)

        self.json_port = free_port()
        prefix = os.path.join(self.work, "nginx-upstream")
        conf = nginx.upstream_config(prefix, self.json_port)
        ngx = self.children.start("nginx-upstream", nginx.command(prefix, conf), self.logs, cores=self.load_cores)
        wait_tcp(self.json_port, 15, ngx)

        self.ceiling_json_port, self.ceiling_sse_port = free_port(), free_port()
        prefix = os.path.join(self.work, "nginx-proxy")
        conf = nginx.proxy_config(prefix, {self.ceiling_json_port: self.json_port, self.ceiling_sse_port: self.sse_port})
        self.ceiling = self.children.start("nginx-proxy", nginx.command(prefix, conf), self.logs, cores=self.proxy_cores)
        wait_tcp(self.ceiling_json_port, 15, self.ceiling)

    def direct(self):
        """
        :return: the target with no proxy.
        """
        from targets import Target

        return Target(
            key="direct",
            label="direct (no proxy)",
            chat_url=f"http://127.0.0.1:{self.json_port}/v1/chat/completions",
            sse_url=f"http://127.0.0.1:{self.sse_port}/v1/chat/completions",
            transfer_base=f"http://127.0.0.1:{self.sse_port}",
        )

    def nginx_target(self):
        """
        :return: the nginx ceiling as a target.
        """
        from targets import Target, tree_pids

        return Target(
            key="nginx",
            label="nginx proxy_pass (1 worker)",
            chat_url=f"http://127.0.0.1:{self.ceiling_json_port}/vllm/v1/chat/completions",
            sse_url=f"http://127.0.0.1:{self.ceiling_sse_port}/vllm/v1/chat/completions",
            transfer_base=f"http://127.0.0.1:{self.ceiling_sse_port}/vllm",
            pids=tree_pids(self.ceiling),
            child=self.ceiling,
        )

    # -- measurements --

    def measure_requests(self, target) -> None:
        """
        Latency at concurrency 1, throughput at 32 and 128.
        """
        import load

        plan = self.plan
        self.say(f"requests: {target.label}")
        if plan["warm_s"]:
            load.requests(target, 32, plan["warm_s"], self.work)
        entry = {"label": target.label, "workers": target.workers}
        for name, connections, seconds in (
            ("c1", 1, plan["latency_s"]),
            ("c1_one_core", 1, plan["latency_s"]),
            ("c32", 32, plan["load_s"]),
            ("c128", 128, plan["load_s"]),
        ):
            if name == "c1_one_core":
                # Everything on the load core: no wake-up of an idle core
                # on each hop (see README).
                if not (self.load_cores and target.pids()):
                    entry[name] = dict(entry["c1"], note="already on one core")
                    continue
                with load.moved_to(target, self.load_cores):
                    result = load.requests(target, connections, seconds, self.work)
            else:
                result = load.requests(target, connections, seconds, self.work)
            entry[name] = result
            if result.get("ok"):
                lat = result["latency_us"]
                print(
                    f"    {name}: {result['req_per_s']:>9.1f} req/s  p50 {lat['p50']} us  p99 {lat['p99']} us"
                    f"  cpu/req {result.get('cpu_us_per_req')} us",
                    flush=True,
                )
            else:
                self.note(f"{target.label} c={connections}: {result.get('error') or result.get('errors')}")
        entry["peak_rss_mb"] = _peak(target)
        self.results["requests"][target.key] = entry

    def measure_streams(self, target) -> None:
        """
        SSE: a small and a large number of paced streams, then a saturating
        run for the relay rate.
        """
        import load

        plan = self.plan
        self.say(f"streams: {target.label}")
        entry = {"label": target.label, "workers": target.workers}
        for name in ("sse_small", "sse_large", "sse_rate", "sse_saturate"):
            count, chunks, interval = plan[name]
            if name == "sse_rate":
                # Each worker is offered the planned rate, so the rate per
                # worker measures what a worker relays (its capacity when
                # it cannot keep up), not the offered rate split in two.
                count *= target.workers
            runs = plan["sse_large_runs"] if name == "sse_large" else 1
            results = []
            for _ in range(runs):
                results.append(load.streams(target, count, chunks, interval, self.work, plan["sse_timeout"]))
                if runs > 1:
                    load.wait_idle(plan["idle_s"])
            result = _median_run(results)
            entry[name] = result
            if "events" in result:
                print(
                    f"    {count} streams x {chunks} @ {interval} ms: ok {result['ok']} ({result['failed']} failed) "
                    f"{result['events_per_s']} ev/s  ttfb p99 {result['ttfb_ms']['p99']} ms  "
                    f"delay p99 {result['chunk_delay_ms']['p99']} ms  cpu/chunk {result.get('cpu_us_per_chunk')} us",
                    flush=True,
                )
            if not result.get("ok"):
                self.note(f"{target.label} {count} streams: {result.get('errors') or result.get('error')}")
            load.wait_idle(plan["idle_s"])
        entry["peak_rss_mb"] = _peak(target)
        self.results["streams"][target.key] = entry

    def measure_transfers(self, target) -> None:
        """
        One upload and one download of C{transfer_bytes}.
        """
        import load

        size = self.plan["transfer_bytes"]
        self.say(f"transfers ({size // 2**20} MiB): {target.label}")
        entry = {"label": target.label}
        for direction in ("download", "upload"):
            result = load.transfer(target, direction, size, self.plan["transfer_timeout"])
            entry[direction] = result
            print(
                f"    {direction}: ok {result.get('ok')} {result.get('mib_per_s')} MiB/s "
                f"rss growth {result.get('rss_growth_mb')} MB",
                flush=True,
            )
            if not result.get("ok"):
                self.note(f"{target.label} {direction}: {result.get('error') or result.get('answer') or result.get('status')}")
        self.results["transfers"][target.key] = entry

    def profile(self, target, name: str, run) -> None:
        """
        Sample C{target}'s process with py-spy while C{run()} loads it.
        """
        import hotspots

        seconds = self.plan["profile_s"]
        if not seconds:
            return
        if not hotspots.available():
            self.note("py-spy is not installed: no profile")
            return
        pid = target.pids()[0]
        raw = os.path.join(self.work, f"{name}.raw")
        svg = os.path.join(self.out, f"{name}.svg")
        self.say(f"profile ({name}): {target.label}, pid {pid}, {seconds} s")
        samplers = hotspots.start(pid, seconds, svg, raw)
        time.sleep(0.5)
        run()
        error = hotspots.finish(samplers, seconds + 60)
        if error or not os.path.exists(raw):
            self.note(f"py-spy failed: {error}")
            return
        self.results.setdefault("profiles", {})[name] = hotspots.top_functions(raw, 10)
        self.results["profiles"][name]["svg"] = os.path.basename(svg)

    # -- the run --

    def run(self) -> None:
        """
        Every phase, in an order that starts each proxy once.
        """
        import load
        import targets

        plan = self.plan
        self.start_upstreams()
        direct, ceiling = self.direct(), self.nginx_target()
        for target in (direct, ceiling):
            self.measure_requests(target)
            self.measure_streams(target)
            self.measure_transfers(target)

        # dheera_tx, one worker: master key, then a virtual key.
        self.say("starting dheera_tx (1 worker)")
        d1 = targets.start_dheera(
            self.children, "dheera-w1", os.path.join(self.work, "dheera-w1"), self.json_port, self.sse_port, 1, self.proxy_cores, self.args.dheera_root
        )
        master = d1.target("dheera-master", "dheera_tx master key (1 worker)", targets.MASTER_KEY)
        vkey = d1.target("dheera-vkey", "dheera_tx virtual key + metering (1 worker)", d1.virtual_key)
        for target in (master, vkey):
            self.measure_requests(target)
            self.measure_streams(target)
        self.profile(vkey, "profile", lambda: load.requests(vkey, 32, plan["profile_s"] + 2, self.work))
        # Saturating streams long enough to cover the sampling window, from
        # the rate just measured.
        streams = plan["sse_saturate"][0]
        rate = self.results["streams"].get("dheera-vkey", {}).get("sse_saturate", {}).get("events_per_s") or 5000
        chunks = int(rate * (plan["profile_s"] + 3) / streams) + 1
        self.profile(vkey, "profile-sse", lambda: load.streams(vkey, streams, chunks, 1.0, self.work, plan["sse_timeout"]))
        self.children.stop(d1.child)

        # A fresh one-worker proxy for the transfers, so its RSS growth is
        # not hidden under a peak from the load runs.
        self.say("starting a fresh dheera_tx (1 worker) for transfers")
        fresh = targets.start_dheera(
            self.children, "dheera-fresh", os.path.join(self.work, "dheera-fresh"), self.json_port, self.sse_port, 1, self.proxy_cores, self.args.dheera_root
        )
        self.measure_transfers(fresh.target("dheera-vkey", "dheera_tx virtual key + metering (1 worker)", fresh.virtual_key))
        self.children.stop(fresh.child)

        # Two workers: both cores (the load generator shares core 1).
        self.say("starting dheera_tx (2 workers)")
        d2 = targets.start_dheera(self.children, "dheera-w2", os.path.join(self.work, "dheera-w2"), self.json_port, self.sse_port, 2, None, self.args.dheera_root)
        w2 = d2.target("dheera-vkey-w2", "dheera_tx virtual key + metering (2 workers)", d2.virtual_key)
        self.measure_requests(w2)
        self.measure_streams(w2)
        self.children.stop(d2.child)

        if self.args.skip_litellm:
            self.note("LiteLLM skipped (--skip-litellm or --smoke)")
        elif not targets.litellm_available():
            self.note(f"LiteLLM is not installed: {self.results.get('install', {}).get('litellm', 'no venv')}")
        else:
            self.measure_litellm()

    def measure_litellm(self) -> None:
        """
        LiteLLM's /vllm pass-through: one instance per upstream (its
        pass-through has one base URL, VLLM_API_BASE).
        """
        import targets

        self.say("starting LiteLLM (JSON upstream)")
        try:
            lite = targets.start_litellm(self.children, "litellm-json", os.path.join(self.work, "litellm-json"), self.json_port, self.proxy_cores)
        except RuntimeError as e:
            self.note(f"LiteLLM did not start: {str(e)[-300:]}")
            return
        self.results["litellm_version"] = targets.litellm_version()
        self.measure_requests(lite)
        self.children.stop(lite.child)
        self.say("starting LiteLLM (SSE upstream)")
        try:
            lite = targets.start_litellm(self.children, "litellm-sse", os.path.join(self.work, "litellm-sse"), self.sse_port, self.proxy_cores)
        except RuntimeError as e:
            self.note(f"LiteLLM did not start: {str(e)[-300:]}")
            return
        self.measure_streams(lite)
        self.measure_transfers(lite)
        self.children.stop(lite.child)

    def close(self) -> None:
        """
        Stop everything; keep the logs next to the results when asked.
        """
        self.children.stop_all()
        if self.args.keep_logs:
            target = os.path.join(self.out, "logs")
            shutil.rmtree(target, ignore_errors=True)
            shutil.copytree(self.logs, target)
            for name in os.listdir(self.work):
                directory = os.path.join(self.work, name)
                if os.path.isdir(directory) and directory != self.logs:
                    for log in os.listdir(directory):
                        if log.endswith(".log"):
                            shutil.copy(os.path.join(directory, log), os.path.join(target, log))
        shutil.rmtree(self.work, ignore_errors=True)


def _loadavg() -> str:
    """
    :return: the 1, 5 and 15 minute load averages (other work on the
        machine skews the numbers).
    """
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def _peak(target):
    import load

    return load.peak_rss_mb(target)


def _source(root: str) -> dict:
    """
    :return: the git commit of the benchmarked tree and whether it had
        changes not committed (tracked or untracked files), at the start of
        the run; L{None}s when it is not a git checkout.
    """

    def git(*args):
        try:
            done = subprocess.run(["git", "-C", root, *args], capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return done.stdout if done.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--", ".")
    return {
        "commit": commit.strip() if commit else None,
        "dirty": None if status is None else bool(status.strip()),
        "changed": None if status is None else len(status.splitlines()),
    }


def _versions() -> dict:
    out = {}
    for name, args in (("wrk", ["wrk", "-v"]), ("nginx", ["nginx", "-v"])):
        try:
            done = subprocess.run(args, capture_output=True, text=True, timeout=10)
            out[name] = (done.stdout + done.stderr).strip().splitlines()[0]
        except (OSError, IndexError, subprocess.TimeoutExpired):
            out[name] = None
    try:
        import twisted

        out["twisted"] = twisted.__version__
    except ImportError:
        pass
    return out


def main(argv=None) -> int:
    """
    Command line entry point.

    :return: 0 when the run completed and its results were written.
    """
    parser = argparse.ArgumentParser(description="dheera_tx benchmark suite")
    parser.add_argument("--smoke", action="store_true", help="seconds-long run for CI: tiny durations, no installs, no LiteLLM, small transfers")
    parser.add_argument("--out", default=None, help="results directory (default bench/results, or bench/results/smoke with --smoke)")
    parser.add_argument("--no-install", action="store_true", help="use what is installed; install nothing")
    parser.add_argument("--skip-litellm", action="store_true", help="leave LiteLLM out")
    parser.add_argument("--keep-logs", action="store_true", help="copy every process's log to OUT/logs")
    parser.add_argument(
        "--dheera-root",
        default=os.path.dirname(HERE),
        help="directory holding dheera_tx/ and twisted/plugins/ to benchmark (default: this checkout)",
    )
    args = parser.parse_args(argv)
    if args.out is None:
        args.out = os.path.join(HERE, "results", "smoke") if args.smoke else os.path.join(HERE, "results")
    args.out = os.path.abspath(args.out)
    if args.smoke:
        args.skip_litellm = True

    install_report = None
    if not (args.smoke or args.no_install):
        import install

        print("installing what the benchmark needs (apt: wrk nginx; pip: uvloop matplotlib py-spy; LiteLLM venv)...", flush=True)
        install_report = install.ensure_all(with_litellm=not args.skip_litellm)
        print(json.dumps(install_report, indent=2), flush=True)
    for command in ("wrk", "nginx"):
        if shutil.which(command) is None:
            print(f"{command} is not installed (apt-get install wrk nginx)", file=sys.stderr)
            return 2

    bench = Bench(args)
    if install_report is not None:
        bench.results["install"] = install_report
    bench.results["versions"] = _versions()
    bench.results["dheera_root"] = os.path.abspath(args.dheera_root)
    bench.results["source"] = _source(os.path.abspath(args.dheera_root))

    def interrupted(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupted)
    started = time.monotonic()
    failed = False
    try:
        bench.run()
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        failed = True
    except Exception:
        traceback.print_exc()
        bench.note("the run stopped early: " + traceback.format_exc().strip().splitlines()[-1])
        failed = True
    finally:
        bench.close()
    bench.results["seconds"] = round(time.monotonic() - started, 1)
    bench.results["machine"]["loadavg_end"] = _loadavg()

    import report

    paths = report.write(bench.results, args.out)
    print(open(paths["markdown"]).read())
    print("written: " + ", ".join(paths.values()), flush=True)
    broken = failures(bench.results, tolerance=0.5)
    if broken and args.smoke:
        print("smoke run: these measurements failed: " + ", ".join(broken), file=sys.stderr)
        return 1
    return 1 if failed else 0


def failures(results: dict, tolerance: float) -> list:
    """
    :param tolerance: the share of failed requests or streams a
        measurement may have and still count as having run (the smoke mode
        checks the pipeline, not the proxy: the report shows every error).
    :return: the names of the measurements that did not run.
    """
    from report import usable

    out = []
    for section in ("requests", "streams", "transfers"):
        for key, entry in results[section].items():
            for name, result in entry.items():
                if isinstance(result, dict) and not usable(result, tolerance):
                    out.append(f"{section}/{key}/{name}")
    return out


if __name__ == "__main__":
    sys.exit(main())
