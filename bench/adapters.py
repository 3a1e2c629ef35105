"""
The LoRA benchmark (issue 15, item 5): adapter-aware routing against
adapter-blind routing on 4 simulated vLLM replicas (C{tests/sim_vllm.py},
LoRA slots in C{tests/sim_adapters.py}), in simulated time, so the ratios
hold on a loaded machine.

    python bench/adapters.py [--out bench/results/adapters] [--calls N]

The fleet serves 20 adapters of one base model with C{max_lora} 4 slots per
replica (each load takes C{lora_load_time} of the replica's prefill lane).
C{clients} concurrent clients send streamed chat calls, each naming an
adapter drawn from a Zipf-like popularity (a few hot adapters, a long
tail), each with a prompt of its own.  The same call sequence runs through
the proxy once per configuration: each routing strategy with
C{adapter_aware_routing} on and off, on fresh replicas each time.  The
adapter loads come from the simulator's C{dheera_sim:lora_loads_total}.

Writes C{adapters.json} (every number) and C{ADAPTERS.md} (the table and
the ratios) to the output directory.
"""

import argparse
import json
import os
import random
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import treq  # noqa: E402
import treq.client  # noqa: E402
from twisted.internet import defer, task  # noqa: E402
from twisted.web.client import Agent, HTTPConnectionPool  # noqa: E402

from bench.routing import TOKEN, quantile, text  # noqa: E402
from tests.proxy_process import ProxyProcess  # noqa: E402

MASTER = "sk-bench-adapters"
ADAPTERS = [f"adapter-{i:02d}" for i in range(20)]
REPLICAS = 4
SIM = {"model": "base", "block_size": 16, "max_num_seqs": 8, "prefill_per_token": 0.0001, "prefill_overhead": 0.002,
       "decode_interval": 0.02, "chars_per_token": 4, "max_lora": 4, "lora_adapters": ADAPTERS,
       "lora_load_time": 0.1}
#: (strategy, adapter_aware_routing) per run.
RUNS = [("cache-aware", True), ("cache-aware", False), ("least-busy", True), ("least-busy", False),
        ("simple-shuffle", False)]


def calls(count: int, seed: int = 7) -> list:
    """
    :return: the call sequence: C{(adapter, prompt)}, adapters Zipf-like.
    """
    rng = random.Random(seed)
    weights = [1.0 / (rank + 1) for rank in range(len(ADAPTERS))]
    return [(rng.choices(ADAPTERS, weights)[0], text(f"call{i}", 200)) for i in range(count)]


async def loads(http, replicas) -> list:
    """
    :return: each replica's C{dheera_sim:lora_loads_total}.
    """
    out = []
    for url in replicas:
        body = await (await http.get(url + "/metrics")).text()
        line = next(line for line in body.splitlines() if line.startswith("dheera_sim:lora_loads_total "))
        out.append(float(line.split()[1]))
    return out


async def run(http, base: str, sequence: list, clients: int, max_tokens: int) -> dict:
    """
    Send C{sequence} through the proxy at C{base} from C{clients}
    concurrent clients.
    """
    pending = list(reversed(sequence))
    records = []
    headers = {"Authorization": "Bearer " + MASTER}

    async def client():
        while pending:
            adapter, prompt = pending.pop()
            body = {"model": adapter, "messages": [{"role": "user", "content": prompt}],
                    "max_tokens": max_tokens, "stream": True}
            started = time.monotonic()
            first = []
            tokens = []

            def take(data: bytes, first=first, tokens=tokens):
                found = TOKEN.findall(data)
                if found and not first:
                    first.append(time.monotonic())
                tokens.extend(found)

            response = await http.post(base + "/v1/chat/completions", json=body, headers=headers, unbuffered=True)
            await treq.collect(response, take)
            records.append({"status": response.code, "ttft": first[0] - started if first else None,
                            "tokens": len(tokens)})

    started = time.monotonic()
    await defer.gatherResults([defer.ensureDeferred(client()) for _ in range(clients)])
    wall = time.monotonic() - started
    ttfts = sorted(r["ttft"] for r in records if r["ttft"] is not None)
    return {
        "calls": len(records),
        "failed": sum(1 for r in records if r["status"] != 200),
        "ttft_p50": quantile(ttfts, 0.5),
        "ttft_p90": quantile(ttfts, 0.9),
        "output_tokens_per_s": sum(r["tokens"] for r in records) / wall,
        "wall_s": wall,
    }


def start_replicas() -> tuple:
    process = subprocess.Popen(
        [sys.executable, "-m", "tests.sim_vllm", "--replicas", str(REPLICAS), "--settings", json.dumps(SIM)],
        cwd=ROOT, stdout=subprocess.PIPE, text=True,
    )
    assert process.stdout is not None
    return process, [process.stdout.readline().strip() for _ in range(REPLICAS)]


def proxy_config(replicas, strategy: str, aware: bool, interval: float) -> dict:
    return {
        "model_list": [{"model_name": "base", "dheera_ai_params": {
            "model": "hosted_vllm/base", "api_base": url, "lora_adapters": ADAPTERS}} for url in replicas],
        "general_settings": {"master_key": MASTER},
        "router_settings": {"routing_strategy": strategy, "metrics_interval": interval,
                            "adapter_aware_routing": aware},
    }


async def main(reactor, args):
    pool = HTTPConnectionPool(reactor)
    pool.maxPersistentPerHost = 128
    http = treq.client.HTTPClient(Agent(reactor, pool=pool))
    sequence = calls(args.calls)
    results = {"settings": {"sim": SIM, "replicas": REPLICAS, "calls": args.calls, "clients": args.clients,
                            "max_tokens": args.max_tokens, "metrics_interval": args.interval}, "runs": {}}
    for strategy, aware in RUNS:
        if args.strategies and strategy not in args.strategies:
            continue
        process, replicas = start_replicas()
        proxy = ProxyProcess(reactor, proxy_config(replicas, strategy, aware, args.interval))
        try:
            await proxy.start(timeout=60)
            await task.deferLater(reactor, 2 * args.interval + 0.5, lambda: None)  # first samples scraped
            row = await run(http, proxy.url + "/vllm", sequence, args.clients, args.max_tokens)
            per_replica = await loads(http, replicas)
            row["adapter_loads"] = sum(per_replica)
            row["loads_per_replica"] = per_replica
            row["loads_per_call"] = row["adapter_loads"] / row["calls"] if row["calls"] else None
            name = f"{strategy} {'adapter-aware' if aware else 'adapter-blind'}"
            results["runs"][name] = row
            print(name, json.dumps(row), flush=True)
        finally:
            proxy.terminate()
            proxy.cleanup()
            process.terminate()
            process.wait(10)
    await pool.closeCachedConnections()
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "adapters.json"), "w") as f:
        json.dump(results, f, indent=2)
    with open(os.path.join(args.out, "ADAPTERS.md"), "w") as f:
        f.write(report(results))


def report(results: dict) -> str:
    """
    :return: C{ADAPTERS.md}: the table and the aware/blind ratios.
    """
    runs = results["runs"]
    lines = ["# LoRA benchmark", "",
             f"{REPLICAS} simulated vLLM replicas (`tests/sim_vllm.py`), 20 adapters, `max_lora` 4, simulated time; "
             "command: `python bench/adapters.py`.", "",
             f"Settings: `{json.dumps(results['settings'])}`", "",
             "| run | calls | failed | adapter loads | loads per call | loads per replica | TTFT p50 s | TTFT p90 s "
             "| output tok/s |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, row in runs.items():
        lines.append(f"| {name} | {row['calls']} | {row['failed']} | {row['adapter_loads']:.0f} | "
                     f"{row['loads_per_call']:.3f} | {'/'.join('%d' % n for n in row['loads_per_replica'])} | "
                     f"{row['ttft_p50']:.3f} | {row['ttft_p90']:.3f} | {row['output_tokens_per_s']:.1f} |")
    lines += ["", "## Ratios (adapter-aware / adapter-blind, same strategy, same run)", "",
              "| strategy | adapter loads | TTFT p50 | TTFT p90 | output tok/s |", "| --- | --- | --- | --- | --- |"]
    for strategy in dict.fromkeys(strategy for strategy, _ in RUNS):
        aware, blind = runs.get(f"{strategy} adapter-aware"), runs.get(f"{strategy} adapter-blind")
        if aware is None or blind is None:
            continue
        ratio = lambda key, a=aware, b=blind: f"{a[key] / b[key]:.2f} x" if b[key] else "-"  # noqa: E731
        lines.append(f"| {strategy} | {ratio('adapter_loads')} | {ratio('ttft_p50')} | {ratio('ttft_p90')} | "
                     f"{ratio('output_tokens_per_s')} |")
    return "\n".join(lines) + "\n"


def cli(argv=None):
    parser = argparse.ArgumentParser(description="Adapter-aware vs adapter-blind routing on simulated replicas.")
    parser.add_argument("--out", default=os.path.join(ROOT, "bench", "results", "adapters"))
    parser.add_argument("--calls", type=int, default=600)
    parser.add_argument("--clients", type=int, default=24)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--interval", type=float, default=0.5, help="router_settings.metrics_interval")
    parser.add_argument("--strategies", nargs="*", help="strategies to run (default: all)")
    args = parser.parse_args(argv)
    task.react(lambda reactor: defer.ensureDeferred(main(reactor, args)))


if __name__ == "__main__":
    cli()
