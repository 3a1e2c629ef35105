"""
Install what the benchmark needs, each step reporting what it did rather
than failing the run when an optional piece cannot be had.

* apt: ``wrk`` and ``nginx`` (services are kept from starting: the suite
  runs its own nginx with its own config).
* pip, into this Python: ``uvloop`` (fast harness), ``matplotlib`` (the
  chart), ``py-spy`` (the profile), ``pyyaml``, at the versions pinned in
  the repository's ``constraints.txt``.
* LiteLLM in its own venv, ``bench/.venv-litellm``: ``litellm[proxy]`` at
  L{LITELLM} (its own dependencies are resolved by pip, unpinned: they
  clash with the proxy's pins and never share a process with it).
"""

import os
import shutil
import subprocess
import sys
from typing import Dict, List

HERE = os.path.dirname(os.path.abspath(__file__))
LITELLM_VENV = os.path.join(HERE, ".venv-litellm")
CONSTRAINTS = os.path.join(os.path.dirname(HERE), "constraints.txt")
LITELLM = "litellm[proxy]==1.106.12"
_POLICY = "/usr/sbin/policy-rc.d"


def _run(args: List[str], timeout: float, env=None) -> subprocess.CompletedProcess:
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout, env=env)


def ensure_apt(commands: Dict[str, str]) -> Dict[str, str]:
    """
    Install the Debian packages of the missing commands.

    :param commands: command -> package.
    :return: command -> what happened.
    """
    missing = {c: p for c, p in commands.items() if shutil.which(c) is None}
    report = {c: "present" for c in commands if c not in missing}
    if not missing:
        return report
    if shutil.which("apt-get") is None or os.geteuid() != 0:
        report.update({c: "missing (needs root and apt-get)" for c in missing})
        return report
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    # Keep the packages' init scripts from starting a system nginx.
    made_policy = False
    if not os.path.exists(_POLICY):
        with open(_POLICY, "w") as f:
            f.write("#!/bin/sh\nexit 101\n")
        os.chmod(_POLICY, 0o755)
        made_policy = True
    try:
        _run(["apt-get", "update", "-qq"], 600, env)
        done = _run(["apt-get", "install", "-y", "-qq", *sorted(set(missing.values()))], 900, env)
    finally:
        if made_policy:
            os.unlink(_POLICY)
    for command in missing:
        report[command] = "installed" if shutil.which(command) else f"install failed: {done.stderr[-300:]}"
    return report


def ensure_pip(modules: Dict[str, str]) -> Dict[str, str]:
    """
    pip-install the missing modules into this Python.

    :param modules: import name -> pip requirement.
    :return: import name -> what happened.
    """
    report = {}
    missing = []
    for module, requirement in modules.items():
        if module == "py-spy":
            present = shutil.which("py-spy") is not None
        else:
            present = _run([sys.executable, "-c", f"import {module}"], 60).returncode == 0
        if present:
            report[module] = "present"
        else:
            missing.append((module, requirement))
    if missing:
        pip = [sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check", "-c", CONSTRAINTS]
        done = _run([*pip, *[r for _, r in missing]], 900)
        for module, _ in missing:
            ok = done.returncode == 0
            report[module] = "installed" if ok else f"install failed: {done.stderr[-300:]}"
    return report


def ensure_litellm(timeout: float = 1200) -> str:
    """
    Make C{bench/.venv-litellm} with C{litellm[proxy]}.

    :return: what happened (C{"present"}, C{"installed"}, or why not).
    """
    litellm = os.path.join(LITELLM_VENV, "bin", "litellm")
    if os.path.exists(litellm):
        return "present"
    try:
        if not os.path.exists(os.path.join(LITELLM_VENV, "bin", "python")):
            made = _run([sys.executable, "-m", "venv", LITELLM_VENV], 300)
            if made.returncode != 0:
                return f"venv failed: {made.stderr[-300:]}"
        pip = os.path.join(LITELLM_VENV, "bin", "pip")
        done = _run([pip, "install", "-q", "--disable-pip-version-check", LITELLM], timeout)
    except subprocess.TimeoutExpired:
        return f"pip install '{LITELLM}' did not finish within {timeout} s"
    if done.returncode != 0 or not os.path.exists(litellm):
        return f"pip install '{LITELLM}' failed: {done.stderr[-400:]}"
    return "installed"


def ensure_all(with_litellm: bool) -> dict:
    """
    Install everything a full run uses.

    :return: a report of each piece.
    """
    report = {"apt": ensure_apt({"wrk": "wrk", "nginx": "nginx"})}
    report["pip"] = ensure_pip({"uvloop": "uvloop", "matplotlib": "matplotlib", "py-spy": "py-spy", "yaml": "pyyaml"})
    report["litellm"] = ensure_litellm() if with_litellm else "skipped"
    return report
