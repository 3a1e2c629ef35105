"""
The routing benchmark (issue 14): the strategies of
C{router_settings.routing_strategy} on a fleet of 4 simulated vLLM replicas
(C{tests/sim_vllm.py}), in simulated time, so the ratios hold on a loaded
machine.

    python bench/routing.py [--out bench/results/routing] [--quick]

Workloads:
  - C{multi_turn}: 16 users, a shared system prompt then long per-user
    context, several turns each, users thinking between turns;
  - C{shared_prefix}: groups of calls sharing a long prefix, each with its
    own question (inference-perf's C{shared_prefix} shape), as completions;
  - C{noisy_neighbour}: C{multi_turn} while replica 0 is saturated by
    traffic sent to it directly, bypassing the proxy.

Each workload runs through the proxy for every strategy (and C{cache-aware}
with 2 workers), and directly against the replicas for two references:
users pinned to replicas (the affinity ceiling) and random.  Each replica's
prefix cache holds about a quarter of the workload's working set.

Writes C{routing.json} (every number), C{ROUTING.md} (the table and the
targets) and C{routing.svg} (a chart) to the output directory.
"""

import argparse
import json
import os
import random
import re
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import treq  # noqa: E402
from twisted.internet import defer, task  # noqa: E402
from twisted.web.client import Agent, HTTPConnectionPool  # noqa: E402

from tests.proxy_process import ProxyProcess  # noqa: E402

MASTER = "sk-bench-routing"
CHARS_PER_TOKEN = 4
WORDS = "alpha beta gamma delta epsilon zeta theta kappa lambda sigma omega river stone cloud field".split()
TOKEN = re.compile(rb'"(?:content|text)": "(t\d\d )"')

# Simulated replica (times in seconds): prefill 10k tokens/s, decode 50
# tokens/s per sequence, 8 sequences at once.
SIM = {"block_size": 16, "max_num_seqs": 8, "prefill_per_token": 0.0001, "prefill_overhead": 0.002,
       "decode_interval": 0.02, "chars_per_token": CHARS_PER_TOKEN}
PROXY_CONFIGS = [
    ("cache-aware", 1), ("cache-aware", 2), ("load-aware", 1), ("least-busy", 1), ("simple-shuffle", 1),
]
REFERENCES = ("pinned", "random")


def text(seed: str, tokens: int) -> str:
    rng = random.Random(seed)
    out = []
    size = 0
    while size < tokens * CHARS_PER_TOKEN:
        word = rng.choice(WORDS)
        out.append(word)
        size += len(word) + 1
    return " ".join(out)[: tokens * CHARS_PER_TOKEN]


# -- workloads: each a list of "clients", a client a coroutine factory -------


class MultiTurn:
    name = "multi_turn"
    users = 16
    turns = 4
    system_tokens = 1000
    context_tokens = 2000
    question_tokens = 50
    max_tokens = 16

    def __init__(self, scale: float = 1.0):
        self.turns = max(2, int(self.turns * scale))
        self.system = text("system", self.system_tokens)

    def working_set_blocks(self) -> int:
        per_user = self.context_tokens + self.turns * (self.question_tokens + self.max_tokens + 10)
        return (self.system_tokens + self.users * per_user) // SIM["block_size"]

    def cache_blocks(self) -> int:
        # A quarter of the distinct blocks, plus each replica's own copy of
        # the shared system prompt and 10 %: users pinned 4 per replica fit.
        system = self.system_tokens // SIM["block_size"]
        return int(1.1 * (self.working_set_blocks() + 3 * system) / 4)

    def clients(self, send, replica_for):
        return [self._user(u, send, replica_for) for u in range(self.users)]

    async def _user(self, user: int, send, replica_for):
        rng = random.Random(user)
        await sleep(rng.uniform(0, 1.0))
        messages = [{"role": "system", "content": self.system},
                    {"role": "user", "content": text(f"context{user}", self.context_tokens)}]
        for turn in range(self.turns):
            if turn:
                messages.append({"role": "user", "content": text(f"q{user}.{turn}", self.question_tokens)})
            body = {"model": "chat", "messages": messages, "max_tokens": self.max_tokens, "stream": True}
            answer = await send("/v1/chat/completions", body, replica_for(user), {})
            messages = messages + [{"role": "assistant", "content": answer}]
            await sleep(rng.uniform(0.2, 0.6))


class SharedPrefix:
    name = "shared_prefix"
    groups = 8
    per_group = 10
    prefix_tokens = 1200
    question_tokens = 300
    concurrency = 16
    max_tokens = 16

    def __init__(self, scale: float = 1.0):
        self.per_group = max(3, int(self.per_group * scale))
        self.prefixes = [text(f"prefix{g}", self.prefix_tokens) for g in range(self.groups)]

    def working_set_blocks(self) -> int:
        return self.groups * self.prefix_tokens // SIM["block_size"]

    def cache_blocks(self) -> int:
        # A quarter of the shared prefixes, plus room for the questions in
        # flight (they are cached too, and evicted first).
        return int(1.2 * self.working_set_blocks() / 4)

    def clients(self, send, replica_for):
        jobs = [(g, i) for g in range(self.groups) for i in range(self.per_group)]
        random.Random(7).shuffle(jobs)

        async def client(c: int):
            await sleep(c * 0.05)
            while jobs:
                group, i = jobs.pop()
                prompt = self.prefixes[group] + " " + text(f"question{group}.{i}", self.question_tokens)
                body = {"model": "chat", "prompt": prompt, "max_tokens": self.max_tokens, "stream": True}
                await send("/v1/completions", body, replica_for(group), {})

        return [client(c) for c in range(self.concurrency)]


class NoisyNeighbour(MultiTurn):
    name = "noisy_neighbour"
    noisy_streams = 24
    noisy_tokens = 600


async def sleep(seconds: float):
    from twisted.internet import reactor

    await task.deferLater(reactor, seconds, lambda: None)


# -- running ----------------------------------------------------------------


class Runner:
    def __init__(self, reactor, pool):
        self.reactor = reactor
        self.http = treq.client.HTTPClient(Agent(reactor, pool=pool))

    async def scrape(self, replicas):
        out = []
        for url in replicas:
            response = await self.http.get(url + "/metrics")
            body = await response.text()
            values = {}
            for line in body.splitlines():
                for name in ("vllm:prefix_cache_queries_total", "vllm:prefix_cache_hits_total",
                             "vllm:generation_tokens_total"):
                    if line.startswith(name + "{"):
                        values[name] = float(line.rsplit(" ", 1)[1])
            out.append(values)
        return out

    async def reset(self, replicas):
        for url in replicas:
            response = await self.http.post(url + "/reset_prefix_cache")
            await response.content()

    async def run(self, workload, replicas, base, headers, pinned: bool, noisy: bool):
        """
        :param base: the proxy's /vllm URL, or None to call replicas directly
            (pinned or random).
        """
        await self.reset(replicas)
        before = await self.scrape(replicas)
        calls = []
        rng = random.Random(11)
        stop = []

        async def send(path, body, pin, extra, record=True):
            if base is not None:
                url = base + path
            elif pinned:
                url = replicas[pin % len(replicas)] + path
            else:
                url = rng.choice(replicas) + path
            body = dict(body, model="chat" if base is not None else "sim")
            started = time.monotonic()
            first = []
            tokens = []

            def take(data: bytes):
                found = TOKEN.findall(data)
                if found and not first:
                    first.append(time.monotonic())
                tokens.extend(found)

            response = await self.http.post(url, json=body, headers=dict(headers, **extra), unbuffered=True)
            replica = (response.headers.getRawHeaders(b"x-sim-replica") or [b"?"])[0].decode()
            await treq.collect(response, take)
            if record:
                calls.append({"status": response.code, "replica": replica,
                              "ttft": (first[0] - started) if first else None, "tokens": len(tokens)})
            return "".join(t.decode() for t in tokens)

        noisy_clients = []
        if noisy:
            async def hog(i: int):
                n = 0
                while not stop:
                    n += 1
                    prompt = text(f"noise{i}.{n}", workload.noisy_tokens)
                    body = {"model": "sim", "prompt": prompt, "max_tokens": 32, "stream": True}
                    response = await self.http.post(replicas[0] + "/v1/completions", json=body, unbuffered=True)
                    await treq.collect(response, lambda data: None)

            noisy_clients = [defer.ensureDeferred(hog(i)) for i in range(workload.noisy_streams)]
            await sleep(1.5)  # saturated, and seen by a scrape, before the measured traffic starts
        started = time.monotonic()
        await defer.gatherResults([defer.ensureDeferred(c) for c in workload.clients(send, lambda k: k)])
        wall = time.monotonic() - started
        stop.append(True)
        if noisy_clients:
            await defer.gatherResults(noisy_clients)
        after = await self.scrape(replicas)
        return summarize(calls, before, after, wall, replicas)


def summarize(calls, before, after, wall, replicas):
    queries = sum(a.get("vllm:prefix_cache_queries_total", 0) - b.get("vllm:prefix_cache_queries_total", 0)
                  for a, b in zip(after, before, strict=True))
    hits = sum(a.get("vllm:prefix_cache_hits_total", 0) - b.get("vllm:prefix_cache_hits_total", 0)
               for a, b in zip(after, before, strict=True))
    ports = [url.rsplit(":", 1)[1] for url in replicas]
    per_replica = [sum(1 for c in calls if c["replica"] == p) for p in ports]
    ttfts = sorted(c["ttft"] for c in calls if c["ttft"] is not None)
    failed = sum(1 for c in calls if c["status"] != 200)
    mean = sum(per_replica) / len(per_replica)
    return {
        "calls": len(calls),
        "failed": failed,
        "hit_rate": hits / queries if queries else 0.0,
        "ttft_p50": quantile(ttfts, 0.5),
        "ttft_p90": quantile(ttfts, 0.9),
        "output_tokens_per_s": sum(c["tokens"] for c in calls) / wall,
        "calls_per_replica": per_replica,
        "max_over_mean": max(per_replica) / mean if mean else None,
        "share_to_replica0": per_replica[0] / len(calls) if calls else None,
        "wall_s": wall,
    }


def quantile(values, q):
    if not values:
        return None
    return values[min(len(values) - 1, int(q * len(values)))]


def proxy_config(replicas, strategy: str, interval: float) -> dict:
    return {
        "model_list": [{"model_name": "chat", "dheera_ai_params": {"model": "hosted_vllm/sim", "api_base": url}}
                       for url in replicas],
        "general_settings": {"master_key": MASTER},
        "router_settings": {"routing_strategy": strategy, "metrics_interval": interval},
    }


def start_replicas(workload) -> tuple:
    cache_blocks = workload.cache_blocks()
    settings = dict(SIM, cache_blocks=cache_blocks)
    process = subprocess.Popen(
        [sys.executable, "-m", "tests.sim_vllm", "--replicas", "4", "--settings", json.dumps(settings)],
        cwd=ROOT, stdout=subprocess.PIPE, text=True,
    )
    urls = [process.stdout.readline().strip() for _ in range(4)]
    return process, urls, cache_blocks


async def main(reactor, args):
    pool = HTTPConnectionPool(reactor)
    pool.maxPersistentPerHost = 128
    runner = Runner(reactor, pool)
    workloads = [w(args.scale) for w in (MultiTurn, SharedPrefix, NoisyNeighbour) if not args.only or w.name in args.only]
    results = {"settings": {"sim": SIM, "metrics_interval": args.interval, "scale": args.scale}, "workloads": {}}
    headers = {"Authorization": "Bearer " + MASTER}
    for workload in workloads:
        process, replicas, cache_blocks = start_replicas(workload)
        rows = results["workloads"][workload.name] = {
            "cache_blocks_per_replica": cache_blocks, "working_set_blocks": workload.working_set_blocks(), "runs": {}}
        noisy = isinstance(workload, NoisyNeighbour)
        try:
            for reference in REFERENCES if not args.strategies else ():
                rows["runs"][reference] = await runner.run(workload, replicas, None, {}, reference == "pinned", noisy)
                print(workload.name, reference, json.dumps(rows["runs"][reference]), flush=True)
            for strategy, workers in PROXY_CONFIGS:
                if args.strategies and strategy not in args.strategies:
                    continue
                proxy = ProxyProcess(reactor, proxy_config(replicas, strategy, args.interval),
                                     extra_args=["--workers", str(workers)] if workers > 1 else [])
                try:
                    await proxy.start(timeout=60)
                    await sleep(2 * args.interval + 0.5)  # first samples scraped
                    name = strategy if workers == 1 else f"{strategy} x{workers} workers"
                    rows["runs"][name] = await runner.run(workload, replicas, proxy.url + "/vllm", headers, False, noisy)
                    print(workload.name, name, json.dumps(rows["runs"][name]), flush=True)
                finally:
                    proxy.terminate()
                    proxy.cleanup()
        finally:
            process.terminate()
            process.wait(10)
    await pool.closeCachedConnections()
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "routing.json"), "w") as f:
        json.dump(results, f, indent=2)
    from bench.routing_report import write_report

    write_report(results, args.out)


def cli(argv=None):
    parser = argparse.ArgumentParser(description="Routing strategies on 4 simulated vLLM replicas.")
    parser.add_argument("--out", default=os.path.join(ROOT, "bench", "results", "routing"))
    parser.add_argument("--interval", type=float, default=0.5, help="router_settings.metrics_interval")
    parser.add_argument("--scale", type=float, default=1.0, help="fewer turns / calls with < 1")
    parser.add_argument("--only", nargs="*", help="workloads to run (default: all)")
    parser.add_argument("--strategies", nargs="*", help="strategies to run, no references (default: all)")
    args = parser.parse_args(argv)
    task.react(lambda reactor: defer.ensureDeferred(main(reactor, args)))


if __name__ == "__main__":
    cli()
