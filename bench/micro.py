"""
Microbenchmarks of per-call routing helpers that unit tests must not time:
the affinity key of a chat call (L{dheera_tx.routing.affinity.prefix_key})
and the gateway queue's admit check on the common path (room now, nobody
waiting: L{dheera_tx.routing.flow.GatewayQueue.admit}).

    python bench/micro.py

Prints microseconds per call, the best of 5 repeats.
"""

import os
import sys
import timeit

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from twisted.internet.task import Clock  # noqa: E402

from dheera_tx.config import config_from_dict  # noqa: E402
from dheera_tx.routing.affinity import prefix_key  # noqa: E402
from dheera_tx.routing.flow import GatewayQueue  # noqa: E402
from dheera_tx.routing.router import Router  # noqa: E402


def per_call(function, runs: int) -> float:
    """
    :return: seconds per call of C{function}, the best of 5 repeats.
    """
    return min(timeit.repeat(function, number=runs, repeat=5)) / runs


def conversation(turns: int) -> dict:
    messages = [{"role": "system", "content": "You are a helpful assistant. " * 20}]
    for i in range(turns):
        messages.append({"role": "user", "content": f"Question {i}: " + "tell me more " * 30})
        messages.append({"role": "assistant", "content": f"Answer {i}: " + "here is more " * 40})
    return {"model": "m", "messages": messages}


def admit_check(replicas: int, cap) -> float:
    params = {"model": "hosted_vllm/m"}
    if cap is not None:
        params["max_parallel_requests"] = cap
    config = config_from_dict({
        "model_list": [
            {"model_name": "m", "dheera_ai_params": dict(params, api_base=f"http://127.0.0.1:{9000 + i}")}
            for i in range(replicas)
        ],
    })
    clock = Clock()
    router = Router(config, now=clock.seconds)
    queue = GatewayQueue(clock, router, config.router.max_queue, config.router.max_queue_wait)
    route = router.route("m")
    return per_call(lambda: queue.admit(route, "a"), 20000)


def main() -> None:
    typical = conversation(3)
    large = {"model": "m", "messages": [{"role": "user", "content": "y" * 100_000}]}
    print("prefix_key, 3-turn chat:     %6.1f us" % (per_call(lambda: prefix_key(typical, "m"), 2000) * 1e6))
    print("prefix_key, 100 KB prompt:   %6.1f us" % (per_call(lambda: prefix_key(large, "m"), 2000) * 1e6))
    print("admit, 4 replicas, no cap:   %6.2f us" % (admit_check(4, None) * 1e6))
    print("admit, 4 replicas, cap 100:  %6.2f us" % (admit_check(4, 100) * 1e6))


if __name__ == "__main__":
    main()
