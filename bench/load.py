"""
The load generators, run as child processes on the load core, with the
target's CPU time read before and after each run.

* L{requests}: wrk with ``post.lua`` (POST bodies, results as JSON).
* L{streams}: ``sse_client.py`` (N concurrent SSE streams, every chunk timed).
* L{transfer}: ``transfer.py`` (a large upload or download) while the
  target's resident memory is sampled.
"""

import json
import os
import subprocess
import sys
import threading
import time
from typing import List, Optional

from processes import cpu_seconds, status_kb
from targets import Target

HERE = os.path.dirname(os.path.abspath(__file__))


def _cpu(target: Target):
    pids = target.pids()
    redis = target.redis_pids()
    return pids, redis, cpu_seconds(pids), cpu_seconds(redis)


def _charge(result: dict, target: Target, before, units: float, unit: str) -> None:
    pids, redis, cpu0, redis0 = before
    cpu = cpu_seconds(pids) - cpu0
    result["proxy_cpu_s"] = round(cpu, 3)
    if units:
        result[f"cpu_us_per_{unit}"] = round(cpu / units * 1e6, 1) if pids else None
        if redis:
            result[f"redis_cpu_us_per_{unit}"] = round((cpu_seconds(redis) - redis0) / units * 1e6, 1)


def requests(target: Target, connections: int, seconds: float, work_dir: str, threads: int = 1) -> dict:
    """
    Run wrk against C{target.chat_url}.

    :return: wrk's numbers plus C{req_per_s}, C{ok} (no errors) and the
        target's CPU microseconds per request.
    """
    out = os.path.join(work_dir, f"wrk-{target.key}-c{connections}.json")
    if os.path.exists(out):
        os.unlink(out)
    env = dict(os.environ, BENCH_AUTH=target.auth, BENCH_OUT=out)
    args = [
        "wrk",
        f"-t{threads}",
        f"-c{connections}",
        f"-d{max(1, int(round(seconds)))}s",
        "--timeout",
        "10s",
        "--latency",
        "-s",
        os.path.join(HERE, "post.lua"),
        target.chat_url,
    ]
    before = _cpu(target)
    completed = subprocess.run(args, env=env, capture_output=True, text=True, timeout=seconds + 60)
    if completed.returncode != 0 or not os.path.exists(out):
        return {"ok": False, "error": (completed.stderr or completed.stdout)[-500:]}
    with open(out) as f:
        result = json.load(f)
    errors = sum(result["errors"].values())
    result["ok"] = errors == 0 and result["requests"] > 0
    result["req_per_s"] = round(result["requests"] / (result["duration_us"] / 1e6), 1)
    result["connections"] = connections
    _charge(result, target, before, result["requests"], "req")
    return result


def streams(target: Target, count: int, chunks: int, interval_ms: float, work_dir: str, timeout: float, model: str = "bench-sse") -> dict:
    """
    Run C{count} concurrent streams of C{chunks} chunks against
    C{target.sse_url}.

    :return: the client's numbers plus the target's CPU per chunk.
    """
    out = os.path.join(work_dir, f"sse-{target.key}-{count}-{interval_ms}.json")
    args = [
        sys.executable,
        os.path.join(HERE, "sse_client.py"),
        "--url",
        target.sse_url,
        "--model",
        model,
        "--streams",
        str(count),
        "--chunks",
        str(chunks),
        "--interval-ms",
        str(interval_ms),
        "--timeout",
        str(timeout),
        "--out",
        out,
    ]
    if target.auth:
        args += ["--auth", target.auth]
    before = _cpu(target)
    completed = subprocess.run(args, capture_output=True, text=True, timeout=timeout + 60)
    if completed.returncode != 0 or not os.path.exists(out):
        return {"ok": False, "error": (completed.stderr or completed.stdout)[-500:]}
    with open(out) as f:
        result = json.load(f)
    result["ok"] = result["failed"] == 0 and result["content_chunks"] == result["expected_content_chunks"]
    if result.get("events_per_s") is not None:
        result["events_per_s_per_worker"] = round(result["events_per_s"] / max(1, target.workers), 1)
    _charge(result, target, before, result["events"], "chunk")
    return result


class moved_to:
    """
    Context manager: move every thread of the target's processes (its
    Redis too) to C{cores}, and back afterwards.
    """

    def __init__(self, target: Target, cores):
        self._tasks = []
        for pid in target.pids() + target.redis_pids():
            try:
                self._tasks += [int(t) for t in os.listdir(f"/proc/{pid}/task")]
            except OSError:
                pass
        self._cores = set(cores)
        self._saved = {}

    def __enter__(self):
        for tid in self._tasks:
            try:
                self._saved[tid] = os.sched_getaffinity(tid)
                os.sched_setaffinity(tid, self._cores)
            except OSError:
                pass
        return self

    def __exit__(self, *exc):
        for tid, cores in self._saved.items():
            try:
                os.sched_setaffinity(tid, cores)
            except OSError:
                pass
        return False


class MemorySampler:
    """
    Samples the resident memory of a set of processes in a thread.
    """

    def __init__(self, pids: List[int], interval: float = 0.02):
        self._pids = pids
        self._interval = interval
        self._stop = threading.Event()
        self.before_kb = self.rss_kb()
        self.hwm_before_kb = self.hwm_kb()
        self.peak_kb = self.before_kb
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def rss_kb(self) -> int:
        """
        :return: the summed VmRSS now.
        """
        return sum(status_kb(p, "VmRSS") for p in self._pids)

    def hwm_kb(self) -> int:
        """
        :return: the summed VmHWM (peak RSS since each process started).
        """
        return sum(status_kb(p, "VmHWM") for p in self._pids)

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            self.peak_kb = max(self.peak_kb, self.rss_kb())

    def stop(self) -> dict:
        """
        :return: RSS before, the peak seen, and the growth, in MB.
        """
        self._stop.set()
        self._thread.join()
        hwm = self.hwm_kb()
        peak = self.peak_kb
        if hwm > self.hwm_before_kb:
            # The kernel's high-water mark rose during the run: it caught
            # a peak the sampler may have missed.
            peak = max(peak, hwm)
        return {
            "rss_before_mb": round(self.before_kb / 1024, 1),
            "rss_peak_mb": round(peak / 1024, 1),
            "rss_growth_mb": round((peak - self.before_kb) / 1024, 1),
        }


def transfer(target: Target, direction: str, size: int, timeout: float) -> dict:
    """
    Upload or download C{size} bytes through C{target}, sampling its RSS.
    """
    if direction == "upload":
        url = f"{target.transfer_base}/upload"
    else:
        url = f"{target.transfer_base}/download?bytes={size}"
    args = [sys.executable, os.path.join(HERE, "transfer.py"), direction, "--url", url, "--bytes", str(size), "--timeout", str(timeout)]
    if target.auth:
        args += ["--auth", target.auth]
    pids = target.pids()
    sampler = MemorySampler(pids) if pids else None
    before = _cpu(target)
    try:
        completed = subprocess.run(args, capture_output=True, text=True, timeout=timeout + 30)
        result = json.loads(completed.stdout.strip().splitlines()[-1]) if completed.stdout.strip() else {"ok": False, "error": completed.stderr[-500:]}
    except subprocess.TimeoutExpired:
        result = {"ok": False, "error": f"no answer within {timeout + 30} s"}
    if sampler is not None:
        result.update(sampler.stop())
    _charge(result, target, before, 0, "")
    return result


def peak_rss_mb(target: Target) -> Optional[float]:
    """
    :return: the summed VmHWM of the target's processes, in MB.
    """
    pids = target.pids()
    if not pids:
        return None
    return round(sum(status_kb(p, "VmHWM") for p in pids) / 1024, 1)


def wait_idle(seconds: float) -> None:
    """
    Let sockets in TIME_WAIT and background work settle between runs.
    """
    time.sleep(seconds)
