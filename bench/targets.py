"""
What the benchmark sends load to: each L{Target} names the URLs to call,
the key to send and the processes whose CPU and memory are charged to it.

L{start_dheera} runs ``twistd -n dheera`` from this checkout (the
repository root on ``PYTHONPATH``, no install needed) with a generated
config, its embedded Redis in a temporary directory, and makes a virtual
key with limits and budget on so metering and limit checks run.
L{start_litellm} runs LiteLLM's proxy from ``bench/.venv-litellm`` with no
database and one worker, its ``/vllm`` pass-through pointed at an upstream
through ``VLLM_API_BASE``.
"""

import json
import os
import sys
import urllib.request
from dataclasses import dataclass, field
from typing import Callable, List, Optional

import yaml
from processes import Child, Children, descendants, free_port, name_of, wait_http

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
# The proxy's own command line (the same for any checkout given as root).
sys.path.insert(0, ROOT)
from dheera_tx.workers import twistd_command  # noqa: E402

MASTER_KEY = "sk-bench-master-key"
LITELLM_VENV = os.path.join(HERE, ".venv-litellm")
# Limits far above what the run sends: checked and counted on every call,
# never hit.
VIRTUAL_KEY_LIMITS = {"rpm_limit": 100000000, "tpm_limit": 1000000000, "max_budget": 1000000, "key_alias": "bench"}


@dataclass
class Target:
    """
    One way to reach the upstreams.

    :ivar key: short identifier (``direct``, ``nginx``, ``dheera-vkey``...).
    :ivar label: for tables and charts.
    :ivar chat_url: the non-streaming chat completions URL.
    :ivar sse_url: the streaming chat completions URL.
    :ivar transfer_base: URL prefix of C{/upload} and C{/download}.
    :ivar auth: the bearer key to send, or C{""}.
    :ivar pids: returns the processes charged to the target (not Redis).
    :ivar redis_pids: returns the target's Redis processes.
    :ivar workers: worker processes serving it.
    """

    key: str
    label: str
    chat_url: str
    sse_url: str
    transfer_base: str
    auth: str = ""
    pids: Callable[[], List[int]] = field(default=lambda: [])
    redis_pids: Callable[[], List[int]] = field(default=lambda: [])
    workers: int = 1
    child: Optional[Child] = None


def tree_pids(child: Child, exclude=("redis-server",)) -> Callable[[], List[int]]:
    """
    :return: a function listing C{child} and its descendants, less those
        whose command name is in C{exclude}.
    """

    def pids() -> List[int]:
        return [p for p in [child.pid] + descendants(child.pid) if name_of(p) not in exclude]

    return pids


def redis_of(child: Child) -> Callable[[], List[int]]:
    """
    :return: a function listing the Redis servers under C{child}.
    """
    return lambda: [p for p in descendants(child.pid) if name_of(p) == "redis-server"]


@dataclass
class Dheera:
    """
    A running dheera_tx and its keys.
    """

    child: Child
    url: str
    workers: int
    virtual_key: str

    def target(self, key: str, label: str, auth: str) -> Target:
        """
        :return: a L{Target} calling this proxy with C{auth}.
        """
        return Target(
            key=key,
            label=label,
            chat_url=f"{self.url}/vllm/v1/chat/completions",
            sse_url=f"{self.url}/vllm/v1/chat/completions",
            transfer_base=f"{self.url}/vllm",
            auth=auth,
            pids=tree_pids(self.child),
            redis_pids=redis_of(self.child),
            workers=self.workers,
            child=self.child,
        )


def dheera_config(directory: str, json_port: int, sse_port: int, widen_routes: bool = True) -> dict:
    """
    :return: the proxy's config: C{bench-model} on the nginx upstream,
        C{bench-sse} and every other call (uploads, downloads) on the
        Python upstream; prices set so spend is computed.
    """

    def deployment(name: str, port: int) -> dict:
        return {
            "model_name": name,
            "dheera_ai_params": {
                "model": f"hosted_vllm/{name}",
                "api_base": f"http://127.0.0.1:{port}",
                "input_cost_per_token": 0.0000002,
                "output_cost_per_token": 0.0000006,
            },
        }

    return {
        "model_list": [deployment("bench-model", json_port), deployment("bench-sse", sse_port)],
        "general_settings": {
            "master_key": MASTER_KEY,
            "data_dir": os.path.join(directory, "dheera_data"),
            "max_request_body_bytes": 4 * 2**30,
            # The transfer runs use the upstream's /upload and /download
            # with the virtual key: routes outside the tenant API, widened
            # here as an operator would.
            **({"tenant_routes": ["upload", "download"]} if widen_routes else {}),
        },
        "router_settings": {"allowed_fails": 1000000, "cooldown_time": 1},
        "dheera_ai_settings": {"callbacks": []},
        "environment_variables": {"HOSTED_VLLM_API_BASE": f"http://127.0.0.1:{sse_port}"},
    }


def _post_json(url: str, body: dict, key: str) -> dict:
    request = urllib.request.Request(
        url,
        data=json.dumps(body).encode(),
        headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


def start_dheera(
    children: Children, name: str, directory: str, json_port: int, sse_port: int, workers: int, cores, root: str = ROOT,
    widen_routes: bool = True,
) -> Dheera:
    """
    Start dheera_tx and make a virtual key with limits and budget.

    :param directory: its own directory (config, embedded Redis, log).
    :param cores: CPU cores to pin it (and its Redis) to, or L{None}.
    :param root: the directory holding C{dheera_tx/} and C{twisted/plugins/}
        (default: this checkout).
    :param widen_routes: let the virtual key call C{/upload} and
        C{/download} (C{general_settings.tenant_routes}); off for checkouts
        older than that setting.
    """
    os.makedirs(directory, exist_ok=True)
    config_path = os.path.join(directory, "proxy.yaml")
    with open(config_path, "w") as f:
        yaml.safe_dump(dheera_config(directory, json_port, sse_port, widen_routes), f)
    port = free_port()
    env = dict(os.environ)
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    for variable in ("DATABASE_URL", "DHEERA_AI_MASTER_KEY", "VLLM_API_BASE"):
        env.pop(variable, None)
    args = twistd_command(config_path, "--listen", f"tcp:{port}:interface=127.0.0.1:backlog=4096", "--workers", str(workers))
    child = children.start(name, args, directory, cwd=directory, env=env, cores=cores)
    url = f"http://127.0.0.1:{port}"
    wait_http(url + "/health/readiness", 60, child=child)
    created = _post_json(url + "/key/generate", VIRTUAL_KEY_LIMITS, MASTER_KEY)
    return Dheera(child, url, workers, created["key"])


def litellm_available() -> bool:
    """
    :return: whether the LiteLLM venv has its proxy installed.
    """
    return os.path.exists(os.path.join(LITELLM_VENV, "bin", "litellm"))


def litellm_version() -> Optional[str]:
    """
    :return: the installed LiteLLM version, if any.
    """
    import glob

    found = glob.glob(os.path.join(LITELLM_VENV, "lib", "python*", "site-packages", "litellm-*.dist-info"))
    return os.path.basename(found[0])[len("litellm-") : -len(".dist-info")] if found else None


def start_litellm(children: Children, name: str, directory: str, upstream_port: int, cores) -> Target:
    """
    Start LiteLLM's proxy (no database, one worker) with its C{/vllm}
    pass-through going to C{upstream_port}.
    """
    os.makedirs(directory, exist_ok=True)
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "PYTHONPATH", "LITELLM_MASTER_KEY")}
    env.update(
        {
            "LITELLM_MASTER_KEY": MASTER_KEY,
            "VLLM_API_BASE": f"http://127.0.0.1:{upstream_port}",
            # Use the bundled model price map (no network) and keep logs quiet.
            "LITELLM_LOCAL_MODEL_COST_MAP": "True",
            "LITELLM_LOG": "ERROR",
        }
    )
    args = [
        os.path.join(LITELLM_VENV, "bin", "litellm"),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--num_workers",
        "1",
        "--telemetry",
        "False",
    ]
    child = children.start(name, args, directory, cwd=directory, env=env, cores=cores)
    url = f"http://127.0.0.1:{port}"
    wait_http(url + "/health/liveliness", 120, child=child)
    return Target(
        key="litellm",
        label=f"LiteLLM {litellm_version() or ''} /vllm".strip(),
        chat_url=f"{url}/vllm/v1/chat/completions",
        sse_url=f"{url}/vllm/v1/chat/completions",
        transfer_base=f"{url}/vllm",
        auth=MASTER_KEY,
        pids=tree_pids(child),
        child=child,
    )
