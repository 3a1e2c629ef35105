"""
Where the proxy spends its CPU under load: py-spy samples one process
(``--nonblocking``: the target is never paused) into a flame graph SVG and,
over the same window, into collapsed stacks, from which L{top_functions}
ranks functions by the share of samples spent in them (self) and under
them (total).
"""

import os
import shutil
import subprocess
from collections import Counter
from typing import List, Optional


def available() -> bool:
    """
    :return: whether py-spy is on C{PATH}.
    """
    return shutil.which("py-spy") is not None


def start(pid: int, seconds: int, svg_path: Optional[str], raw_path: str, rate: int = 250) -> List[subprocess.Popen]:
    """
    Start sampling C{pid} for C{seconds}; wait on the returned processes.
    """
    base = ["py-spy", "record", "--pid", str(pid), "--duration", str(seconds), "--rate", str(rate), "--nonblocking"]
    started = [subprocess.Popen(base + ["--format", "raw", "-o", raw_path], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)]
    if svg_path:
        started.append(subprocess.Popen(base + ["-o", svg_path], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE))
    return started


def finish(samplers: List[subprocess.Popen], timeout: float) -> Optional[str]:
    """
    Wait for the samplers.

    :return: an error message, or L{None} when all succeeded.
    """
    errors = []
    for sampler in samplers:
        try:
            _, err = sampler.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            sampler.kill()
            _, err = sampler.communicate()
            errors.append("py-spy did not finish")
            continue
        if sampler.returncode != 0:
            errors.append(err.decode("utf-8", "replace")[-300:])
    return "; ".join(errors) or None


def _function(frame: str) -> str:
    """
    ``name (path/to/file.py:123)`` -> ``name (file.py)`` with the path
    shortened to its package-relative part.
    """
    name, _, where = frame.partition(" (")
    where = where.rstrip(")")
    path = where.rsplit(":", 1)[0]
    for marker in ("site-packages/", "/lib/python3", "/work/main/"):
        if marker in path:
            path = path.split(marker, 1)[1]
            if marker == "/lib/python3":
                path = "stdlib/" + path.split("/", 1)[-1]
            break
    return f"{name} ({os.path.normpath(path)})"


def top_functions(raw_path: str, count: int = 10) -> dict:
    """
    Rank functions in py-spy's collapsed stacks.

    :return: C{{"samples": N, "self": [...], "total": [...]}}, each list
        of C{{"function", "percent"}}, the largest first.
    """
    own: Counter = Counter()
    under: Counter = Counter()
    samples = 0
    with open(raw_path) as f:
        for line in f:
            line = line.rstrip("\n")
            if not line:
                continue
            stack, _, n = line.rpartition(" ")
            n = int(n)
            samples += n
            frames = [_function(fr) for fr in stack.split(";") if fr]
            if not frames:
                continue
            own[frames[-1]] += n
            for name in set(frames):
                under[name] += n

    def ranked(counter: Counter) -> list:
        return [{"function": name, "percent": round(100.0 * n / samples, 1)} for name, n in counter.most_common(count)]

    # The reactor loop, twistd's start-up frames and the generic dispatch
    # helpers are under nearly every sample: they say nothing about where
    # the time goes.
    below = Counter({name: n for name, n in under.items() if n <= 0.9 * samples and not _plumbing(name)})
    return {"samples": samples, "self": ranked(own), "total": ranked(below)}


_PLUMBING_FILES = ("twisted/scripts/", "twisted/application/app.py", "<string>")
_PLUMBING_NAMES = frozenset(
    ["run", "mainLoop", "runUntilCurrent", "doPoll", "_doReadOrWrite", "callWithLogger", "callWithContext"]
)


def _plumbing(name: str) -> bool:
    function, _, where = name.partition(" (")
    return any(f in where for f in _PLUMBING_FILES) or function.rsplit(".", 1)[-1] in _PLUMBING_NAMES
