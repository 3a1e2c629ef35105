"""
The flow-control benchmark (issue 15): the gateway queue
(C{dheera_tx.routing.flow}) on simulated vLLM replicas (C{tests/sim_vllm.py},
simulated time: timers, not computation, so the ratios hold on a loaded
machine), behind a real proxy process with its embedded Redis, with flow
control on and off (C{router_settings.flow_control}) in one run.

    python bench/flow.py [--out bench/results/flow] [--quick]

Parts:
  - C{capacity}: the fleet's capacity, computed from the simulator's
    settings and measured by saturating the replicas directly;
  - C{ramp}: offered load rising in steps to 2x that capacity (Poisson
    arrivals, the same schedule for both runs) from two virtual keys:
    C{interactive} (priority 0, short streaming chats: TTFT measured) and
    C{batch} (priority 1, long completions).  While it runs, every
    replica's C{/metrics} is read every 50 ms for vLLM's waiting queue.
    Afterwards the client's tally is checked against the proxy's call log
    and the spend in Redis: every call answered or shed, none lost, none
    billed twice, each key's spend the sum of its answered calls' costs;
  - C{fairness}: two equal-weight keys of one priority, one with 10x the
    other's calls outstanding, both backlogged: tokens served per key in
    the backlogged window, Jain's index;
  - C{cpu}: proxy CPU per call on an unsaturated fleet, flow control on vs
    off (two proxies of this checkout, alternating rounds), and the ratio.

Writes C{flow.json} (every number) and C{FLOW.md} (the tables and the
issue's targets, met or missed: L{bench.flow_report}) to the output
directory.
"""

import argparse
import json
import os
import random
import re
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import treq  # noqa: E402
from twisted.internet import defer, task  # noqa: E402
from twisted.web.client import Agent, HTTPConnectionPool  # noqa: E402

from bench.flow_report import read_records, summarize_ramp, usage_of, write_report  # noqa: E402
from bench.processes import cpu_seconds, descendants, name_of  # noqa: E402
from tests.proxy_process import ProxyProcess  # noqa: E402

MASTER = "sk-bench-flow-master"
CHARS_PER_TOKEN = 4
TOKEN = re.compile(rb'"(?:content|text)": "(t\d\d )"')
WAITING = re.compile(rb"^vllm:num_requests_waiting\{[^}]*\} (\S+)$", re.M)
GENERATED = re.compile(rb"^vllm:generation_tokens_total\{[^}]*\} (\S+)$", re.M)
# USD per token: 200 and 1000 nano-USD, so every cost is a whole number of nanos.
INPUT_PRICE = 0.0000002
OUTPUT_PRICE = 0.000001

# The fleet: 2 replicas of 4 sequences each, decode 50 tokens/s per
# sequence, prefill 10k tokens/s (one prompt at a time per replica).
REPLICAS = 2
SIM = {"max_num_seqs": 4, "decode_interval": 0.02, "prefill_per_token": 0.0001, "prefill_overhead": 0.002,
       "chars_per_token": CHARS_PER_TOKEN}
# Call shapes: (prompt tokens, max_tokens).
INTERACTIVE = (30, 8)
BATCH = (400, 40)
FAIR = (100, 16)
ROUTER = {"metrics_interval": 0.25, "max_waiting": 4, "max_queue": 200, "max_queue_wait": 4.0}
# The ramp: offered load in steps, as multiples of the fleet's capacity;
# the interactive key offers this share of it (in sequence-seconds).
STEPS = (0.5, 1.0, 1.5, 2.0)
INTERACTIVE_SHARE = 0.2
PARTS = ("ramp", "fairness", "cpu")


def service_seconds(shape) -> float:
    """
    :return: the sequence-seconds one call of this shape holds a slot on a
        simulated replica (its prefill, then one decode step per token).
    """
    prompt, out = shape
    return SIM["prefill_overhead"] + prompt * SIM["prefill_per_token"] + out * SIM["decode_interval"]


def prompt_text(seed: str, tokens: int) -> str:
    rng = random.Random(seed)
    words = []
    while sum(len(w) + 1 for w in words) < tokens * CHARS_PER_TOKEN:
        words.append(rng.choice(("alpha", "beta", "gamma", "delta", "river", "stone", "cloud", "field")))
    return " ".join(words)[: tokens * CHARS_PER_TOKEN - 1]


def chat_body(seed: str, shape) -> dict:
    # The chat template adds about 5 tokens to the prompt.
    return {"model": "chat", "messages": [{"role": "user", "content": prompt_text(seed, shape[0] - 5)}],
            "max_tokens": shape[1], "stream": True, "stream_options": {"include_usage": True}}


def completion_body(seed: str, shape) -> dict:
    return {"model": "chat", "prompt": prompt_text(seed, shape[0]), "max_tokens": shape[1]}


def sleep(seconds: float):
    from twisted.internet import reactor

    return task.deferLater(reactor, seconds, lambda: None)


def start_replicas(settings: dict, count: int = REPLICAS):
    process = subprocess.Popen(
        [sys.executable, "-m", "tests.sim_vllm", "--replicas", str(count), "--settings", json.dumps(settings)],
        cwd=ROOT, stdout=subprocess.PIPE, text=True,
    )
    return process, [process.stdout.readline().strip() for _ in range(count)]


def stop_replicas(process) -> None:
    process.terminate()
    process.wait(10)


def proxy_config(replicas, flow_control: bool, router=None) -> dict:
    params = {"model": "hosted_vllm/sim", "input_cost_per_token": INPUT_PRICE, "output_cost_per_token": OUTPUT_PRICE}
    return {
        "model_list": [{"model_name": "chat", "dheera_ai_params": dict(params, api_base=url)} for url in replicas],
        "general_settings": {"master_key": MASTER},
        "router_settings": dict(router or ROUTER, flow_control=flow_control),
        "dheera_ai_settings": {"callbacks": ["json_log"], "json_log_path": "calls.jsonl"},
    }


def expected_nanos(usage: dict) -> int:
    return usage.get("prompt_tokens", 0) * 200 + usage.get("completion_tokens", 0) * 1000


def proxy_pids(proxy: ProxyProcess):
    """
    :return: the proxy's processes (its workers too), not its Redis.
    """
    pid = proxy.process.pid
    return [pid] + [p for p in descendants(pid) if "redis" not in name_of(p)]


class Client:
    """
    Calls through the proxy (or straight to a replica) and times them.
    """

    def __init__(self, reactor):
        self.reactor = reactor
        self.pool = HTTPConnectionPool(reactor)
        self.pool.maxPersistentPerHost = 512
        self.http = treq.client.HTTPClient(Agent(reactor, pool=self.pool))

    async def make_key(self, proxy: ProxyProcess, alias: str, **fields) -> str:
        response = await self.http.post(proxy.url + "/key/generate", json=dict(fields, key_alias=alias, models=["chat"]),
                                        headers={"Authorization": "Bearer " + MASTER})
        body = await response.json()
        if response.code != 200:
            raise RuntimeError(f"/key/generate: {response.code} {body}")
        return body["key"]

    async def spend_nanos(self, proxy: ProxyProcess, key: str) -> int:
        response = await self.http.get(proxy.url + "/key/info", params={"key": key},
                                       headers={"Authorization": "Bearer " + MASTER})
        return int((await response.json())["info"]["spend_nanos"])

    async def call(self, url: str, body: dict, key: str) -> dict:
        """
        :return: what the client saw: status, TTFT (first token), total
            time, C{Retry-After}, the call id, usage and the cost it implies.
        """
        started = time.monotonic()
        first = []
        chunks = []

        def take(data: bytes) -> None:
            if not first and TOKEN.search(data):
                first.append(time.monotonic())
            chunks.append(data)

        out = {"status": None, "ttft": None}
        try:
            response = await self.http.post(url, json=body, headers={"Authorization": "Bearer " + key}, unbuffered=True)
            out["status"] = response.code
            out["retry_after"] = (response.headers.getRawHeaders(b"retry-after") or [None])[0]
            call_id = response.headers.getRawHeaders(b"x-dheera-call-id")
            out["call_id"] = call_id[0].decode() if call_id else None
            await treq.collect(response, take)
        except Exception as e:  # a lost call: counted, never hidden
            out["error"] = type(e).__name__
        out["seconds"] = time.monotonic() - started
        if first:
            out["ttft"] = first[0] - started
        data = b"".join(chunks)
        usage = usage_of(data) if out["status"] == 200 else None
        out["usage"] = usage
        out["nanos"] = expected_nanos(usage) if usage else 0
        if out["status"] != 200 and data:
            try:
                out["code"] = json.loads(data)["error"].get("code")
            except (ValueError, KeyError, AttributeError):
                out["code"] = None
        return out


class Sampler:
    """
    Reads every replica's C{vllm:num_requests_waiting} every C{interval}.
    """

    def __init__(self, client: Client, replicas, interval: float = 0.05):
        self.client = client
        self.replicas = replicas
        self.interval = interval
        self.series = []
        self._stop = False
        self._done = None

    def start(self) -> None:
        self._started = time.monotonic()
        self._done = defer.ensureDeferred(self._run())

    async def _run(self) -> None:
        while not self._stop:
            values = []
            for url in self.replicas:
                response = await self.client.http.get(url + "/metrics")
                found = WAITING.search(await response.content())
                values.append(float(found.group(1)) if found else None)
            self.series.append([round(time.monotonic() - self._started, 3)] + values)
            await sleep(self.interval)

    async def stop(self):
        self._stop = True
        await self._done
        return self.series


# -- the parts --------------------------------------------------------------


async def measure_capacity(client: Client, seconds: float) -> dict:
    """
    Saturate the replicas directly with batch calls (twice their slots
    outstanding) and count the calls finished per second.
    """
    process, replicas = start_replicas(SIM)
    try:
        stop_at = time.monotonic() + seconds
        slots = REPLICAS * SIM["max_num_seqs"]

        async def caller(i: int):
            n = 0
            while time.monotonic() < stop_at:
                n += 1
                body = dict(completion_body(f"cap{i}.{n}", BATCH), model="sim")
                response = await client.http.post(replicas[i % REPLICAS] + "/v1/completions", json=body)
                await response.content()

        callers = [defer.ensureDeferred(caller(i)) for i in range(2 * slots)]
        # Calls finish in waves (a replica's slots fill together), so count
        # the tokens the replicas generated in the saturated middle of the
        # run (vLLM's counter), in batch calls.
        await sleep(seconds / 4)
        first = (time.monotonic(), await generated(client, replicas))
        await sleep(stop_at - time.monotonic())
        last = (time.monotonic(), await generated(client, replicas))
        await defer.gatherResults(callers)
        measured = (last[1] - first[1]) / (last[0] - first[0]) / BATCH[1]
    finally:
        stop_replicas(process)
    computed = slots / service_seconds(BATCH)
    return {"replicas": REPLICAS, "slots": slots, "batch_service_s": service_seconds(BATCH),
            "interactive_service_s": service_seconds(INTERACTIVE),
            "computed_batch_calls_per_s": round(computed, 3), "measured_batch_calls_per_s": round(measured, 3),
            "measured_over_computed": round(measured / computed, 3)}


async def generated(client: Client, replicas) -> float:
    """
    :return: the tokens the replicas generated so far (their
        C{vllm:generation_tokens_total}).
    """
    total = 0.0
    for url in replicas:
        response = await client.http.get(url + "/metrics")
        found = GENERATED.search(await response.content())
        total += float(found.group(1)) if found else 0.0
    return total


def ramp_schedule(capacity_calls: float, step_seconds: float, seed: int = 15):
    """
    :param capacity_calls: the fleet's batch calls per second.
    :return: C{[(at, kind, seed)]}, Poisson arrivals per step.
    """
    rng = random.Random(seed)
    slot_seconds = capacity_calls * service_seconds(BATCH)
    out = []
    for step, load in enumerate(STEPS):
        begin = step * step_seconds
        for kind, shape, share in (("interactive", INTERACTIVE, INTERACTIVE_SHARE), ("batch", BATCH, 1 - INTERACTIVE_SHARE)):
            rate = load * share * slot_seconds / service_seconds(shape)
            t = begin + rng.expovariate(rate)
            while t < begin + step_seconds:
                out.append((t, kind, f"{kind}{len(out)}"))
                t += rng.expovariate(rate)
    return sorted(out)


async def run_ramp(client: Client, reactor, flow_control: bool, schedule, step_seconds: float) -> dict:
    process, replicas = start_replicas(SIM)
    proxy = ProxyProcess(reactor, proxy_config(replicas, flow_control))
    try:
        await proxy.start(timeout=60)
        keys = {"interactive": await client.make_key(proxy, "interactive", priority=0),
                "batch": await client.make_key(proxy, "batch", priority=1)}
        await sleep(3 * ROUTER["metrics_interval"])  # first samples scraped
        sampler = Sampler(client, replicas)
        sampler.start()
        began = time.monotonic()
        calls = []

        async def one(at: float, kind: str, seed: str):
            delay = began + at - time.monotonic()
            if delay > 0:
                await sleep(delay)
            if kind == "interactive":
                out = await client.call(proxy.url + "/vllm/v1/chat/completions", chat_body(seed, INTERACTIVE), keys[kind])
            else:
                out = await client.call(proxy.url + "/vllm/v1/completions", completion_body(seed, BATCH), keys[kind])
            out.update(kind=kind, at=at, step=min(int(at // step_seconds), len(STEPS) - 1))
            calls.append(out)

        await defer.gatherResults([defer.ensureDeferred(one(*arrival)) for arrival in schedule])
        wall = time.monotonic() - began
        series = await sampler.stop()
        spend = {}
        # Spend is written in batches: wait for it to settle.
        for kind, key in keys.items():
            want = sum(c["nanos"] for c in calls if c["kind"] == kind)
            deadline = time.monotonic() + 15
            spend[kind] = await client.spend_nanos(proxy, key)
            while spend[kind] != want and time.monotonic() < deadline:
                await sleep(0.2)
                spend[kind] = await client.spend_nanos(proxy, key)
        # The call log is written as calls end: wait until it holds them all.
        path = os.path.join(proxy.directory, "calls.jsonl")
        records = read_records(path)
        deadline = time.monotonic() + 10
        while len(records) < len(calls) and time.monotonic() < deadline:
            await sleep(0.1)
            records = read_records(path)
    finally:
        proxy.cleanup()
        stop_replicas(process)
    return summarize_ramp(calls, series, spend, records, wall, ROUTER, STEPS)


async def run_fairness(client: Client, reactor, seconds: float, light_clients: int) -> dict:
    """
    Two keys of priority 0 and weight 1; C{heavy} keeps 10x as many calls
    outstanding as C{light}, both more than the fleet holds.
    """
    process, replicas = start_replicas(SIM)
    router = dict(ROUTER, max_queue=10000, max_queue_wait=600.0)
    proxy = ProxyProcess(reactor, proxy_config(replicas, True, router))
    pending = set()
    try:
        await proxy.start(timeout=60)
        keys = {"heavy": await client.make_key(proxy, "heavy", weight=1), "light": await client.make_key(proxy, "light", weight=1)}
        await sleep(3 * ROUTER["metrics_interval"])
        done = []
        stop = []
        began = time.monotonic()

        async def caller(kind: str, i: int):
            n = 0
            while not stop:
                n += 1
                d = defer.ensureDeferred(client.call(proxy.url + "/vllm/v1/completions",
                                                     completion_body(f"{kind}{i}.{n}", FAIR), keys[kind]))
                pending.add(d)
                try:
                    out = await d
                except defer.CancelledError:
                    return
                finally:
                    pending.discard(d)
                if stop:
                    return
                out.update(kind=kind, ended=time.monotonic() - began)
                done.append(out)

        callers = [defer.ensureDeferred(caller("light", i)) for i in range(light_clients)]
        callers += [defer.ensureDeferred(caller("heavy", i)) for i in range(10 * light_clients)]
        await sleep(seconds)
        stop.append(True)
        ended = time.monotonic() - began
        for d in list(pending):
            d.cancel()
        await defer.DeferredList(callers)
    finally:
        proxy.cleanup()
        stop_replicas(process)
    warmup = min(2.0, seconds / 4)
    tokens = {kind: sum((c["usage"] or {}).get("total_tokens", 0) for c in done
                        if c["kind"] == kind and warmup <= c["ended"] <= ended) for kind in keys}
    calls = {kind: sum(1 for c in done if c["kind"] == kind and warmup <= c["ended"] <= ended) for kind in keys}
    failed = sum(1 for c in done if c["status"] != 200)
    values = list(tokens.values())
    mean = sum(values) / len(values)
    jain = sum(values) ** 2 / (len(values) * sum(v * v for v in values)) if any(values) else None
    return {"window_s": round(ended - warmup, 2), "clients": {"light": light_clients, "heavy": 10 * light_clients},
            "tokens": tokens, "calls": calls, "failed": failed,
            "share_of_equal": {k: round(v / mean, 3) if mean else None for k, v in tokens.items()},
            "jain_index": round(jain, 4) if jain is not None else None}


async def run_cpu(client: Client, reactor, rounds: int, calls_per_round: int, concurrency: int) -> dict:
    """
    Proxy CPU per call, flow control on and off, on a fleet that is never
    saturated (short calls, many slots): alternating rounds, medians.
    """
    settings = dict(SIM, max_num_seqs=256, decode_interval=0.001)
    process, replicas = start_replicas(settings)
    proxies = {}
    try:
        keys = {}
        for name, on in (("on", True), ("off", False)):
            proxies[name] = ProxyProcess(reactor, proxy_config(replicas, on, dict(ROUTER, metrics_interval=1.0)))
            await proxies[name].start(timeout=60)
            keys[name] = await client.make_key(proxies[name], "cpu-" + name)
        body = completion_body("cpu", (30, 4))
        per_call = {"on": [], "off": []}
        failed = {"on": 0, "off": 0}

        async def burst(name: str, count: int):
            todo = list(range(count))

            async def worker():
                while todo:
                    todo.pop()
                    out = await client.call(proxies[name].url + "/vllm/v1/completions", body, keys[name])
                    failed[name] += out["status"] != 200

            await defer.gatherResults([defer.ensureDeferred(worker()) for _ in range(concurrency)])

        for name in proxies:  # warm-up
            await burst(name, calls_per_round // 4)
        failed = {"on": 0, "off": 0}
        for number in range(rounds):
            for name in ("on", "off") if number % 2 == 0 else ("off", "on"):
                pids = proxy_pids(proxies[name])
                before = cpu_seconds(pids)
                await burst(name, calls_per_round)
                per_call[name].append(round((cpu_seconds(pids) - before) / calls_per_round * 1e6, 1))
    finally:
        for proxy in proxies.values():
            proxy.cleanup()
        stop_replicas(process)
    median = {name: statistics.median(values) for name, values in per_call.items()}
    return {"rounds": rounds, "calls_per_round": calls_per_round, "concurrency": concurrency,
            "cpu_us_per_call": per_call, "median_us": median, "failed": failed,
            "on_over_off": round(median["on"] / median["off"], 3) if median["off"] else None}


async def main(reactor, args):
    client = Client(reactor)
    began = time.monotonic()
    quick = args.quick
    step = 0.75 if quick else args.step_seconds
    results = {"mode": "quick" if quick else "full", "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
               "source": _source(), "settings": {"replicas": REPLICAS, "sim": SIM, "router": ROUTER, "steps": list(STEPS),
                                                 "step_seconds": step, "interactive": INTERACTIVE, "batch": BATCH,
                                                 "interactive_share": INTERACTIVE_SHARE, "fair": FAIR}}
    parts = args.parts or PARTS
    try:
        if "ramp" in parts:
            results["capacity"] = capacity = await measure_capacity(client, 1.5 if quick else 6.0)
            print(f"{time.monotonic() - began:.1f}s capacity", json.dumps(capacity), flush=True)
            schedule = ramp_schedule(capacity["measured_batch_calls_per_s"], step)
            results["ramp"] = {}
            for name, on in (("off", False), ("on", True)):
                results["ramp"][name] = await run_ramp(client, reactor, on, schedule, step)
                print(f"{time.monotonic() - began:.1f}s ramp", name, json.dumps(results["ramp"][name]["summary"]), flush=True)
        if "fairness" in parts:
            # The light key keeps twice what the fleet holds (its slots and
            # each replica's max_waiting) outstanding: it is backlogged too.
            light = 2 * (REPLICAS * SIM["max_num_seqs"] + REPLICAS * int(ROUTER["max_waiting"]))
            results["fairness"] = await run_fairness(client, reactor, 2.5 if quick else args.fair_seconds, light)
            print(f"{time.monotonic() - began:.1f}s fairness", json.dumps(results["fairness"]), flush=True)
        if "cpu" in parts:
            results["cpu"] = await run_cpu(client, reactor, 2 if quick else args.cpu_rounds, 40 if quick else 1500, 8)
            print(f"{time.monotonic() - began:.1f}s cpu", json.dumps(results["cpu"]), flush=True)
    finally:
        await client.pool.closeCachedConnections()
    results["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S")
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "flow.json"), "w") as f:
        json.dump(results, f, indent=1)
    write_report(results, args.out)


def _source() -> dict:
    def git(*argv):
        done = subprocess.run(["git", "-C", ROOT, *argv], capture_output=True, text=True)
        return done.stdout.strip() if done.returncode == 0 else None

    status = git("status", "--porcelain")
    return {"commit": git("rev-parse", "HEAD"), "dirty": bool(status) if status is not None else None}


def cli(argv=None):
    parser = argparse.ArgumentParser(description="Flow control on simulated vLLM replicas, on vs off.")
    parser.add_argument("--out", default=os.path.join(ROOT, "bench", "results", "flow"))
    parser.add_argument("--quick", action="store_true", help="a smoke run of seconds: short steps, few calls")
    parser.add_argument("--step-seconds", type=float, default=8.0, help="length of each load step of the ramp")
    parser.add_argument("--fair-seconds", type=float, default=15.0)
    parser.add_argument("--cpu-rounds", type=int, default=6)
    parser.add_argument("--parts", nargs="*", choices=PARTS, help="parts to run (default: all)")
    args = parser.parse_args(argv)
    task.react(lambda reactor: defer.ensureDeferred(main(reactor, args)))


if __name__ == "__main__":
    cli()
