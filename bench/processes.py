"""
Child processes of the benchmark and what /proc says about them.

Every process the suite starts is a L{Child}, registered in a L{Children}
set that stops them all (SIGTERM, then SIGKILL after a deadline) when the
run ends, fails or is interrupted.  CPU time and memory are read from
``/proc/<pid>/stat`` and ``/proc/<pid>/status`` for a whole process tree.
"""

import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from typing import Callable, Dict, Iterable, List, Optional, Sequence

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    """
    :return: a TCP port free on 127.0.0.1 just now.
    """
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pinned(cores: Optional[Sequence[int]]) -> Optional[Callable[[], None]]:
    """
    :return: a C{preexec_fn} pinning the child to C{cores} (or L{None}).
    """
    if not cores:
        return None
    wanted = set(cores)
    return lambda: os.sched_setaffinity(0, wanted)


class Child:
    """
    One started process, its output going to a log file.
    """

    def __init__(self, name: str, args: List[str], log_path: str, cwd=None, env=None, cores=None):
        self.name = name
        self.args = args
        self.log_path = log_path
        log = open(log_path, "ab")
        try:
            self.process = subprocess.Popen(
                args,
                cwd=cwd,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                preexec_fn=pinned(cores),
                start_new_session=True,
            )
        finally:
            log.close()
        self.pid = self.process.pid

    def alive(self) -> bool:
        """
        :return: whether the process has not exited.
        """
        return self.process.poll() is None

    def log_tail(self, size: int = 2000) -> str:
        """
        :return: the end of the process's output.
        """
        try:
            with open(self.log_path, "rb") as f:
                f.seek(0, os.SEEK_END)
                f.seek(max(0, f.tell() - size))
                return f.read().decode("utf-8", "replace")
        except OSError:
            return ""

    def stop(self, grace: float = 10.0) -> None:
        """
        SIGTERM the process (its group: nginx workers, twistd workers,
        an embedded Redis), then SIGKILL what is left after C{grace}
        seconds.
        """
        tree = [self.pid] + descendants(self.pid)
        if self.alive():
            try:
                os.killpg(self.pid, signal.SIGTERM)
            except OSError:
                pass
            try:
                self.process.wait(grace)
            except subprocess.TimeoutExpired:
                pass
        for pid in tree:
            # Anything of ours still there (a child that left the group
            # included) is killed by its own id.
            if _exists(pid):
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass
        try:
            os.killpg(self.pid, signal.SIGKILL)
        except OSError:
            pass
        if self.process.poll() is None:
            self.process.wait(5)


class Children:
    """
    Every process the run started, stopped in reverse order.
    """

    def __init__(self):
        self._children: List[Child] = []

    def start(self, name: str, args: List[str], log_dir: str, **kwargs) -> Child:
        """
        Start and register a L{Child}; its log is C{log_dir/name.log}.
        """
        child = Child(name, args, os.path.join(log_dir, f"{name}.log"), **kwargs)
        self._children.append(child)
        return child

    def stop(self, child: Child) -> None:
        """
        Stop one child and forget it.
        """
        child.stop()
        if child in self._children:
            self._children.remove(child)

    def stop_all(self) -> None:
        """
        Stop everything still registered.
        """
        while self._children:
            self.stop(self._children[-1])


def _exists(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][0] != "Z"
    except (OSError, IndexError):
        return False


def _stat(pid: int) -> Optional[list]:
    try:
        with open(f"/proc/{pid}/stat") as f:
            data = f.read()
    except OSError:
        return None
    # The command name may hold spaces or parentheses: split after the last ")".
    name = data[data.index("(") + 1 : data.rindex(")")]
    return [name] + data[data.rindex(")") + 2 :].split()


def descendants(pid: int) -> List[int]:
    """
    :return: the ids of every live descendant of C{pid}.
    """
    parents: Dict[int, List[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            fields = _stat(int(entry))
            if fields is not None:
                parents.setdefault(int(fields[2]), []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        for child in parents.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def name_of(pid: int) -> str:
    """
    :return: the command name of C{pid} (C{""} when gone).
    """
    fields = _stat(pid)
    return fields[0] if fields else ""


def cpu_seconds(pids: Iterable[int]) -> float:
    """
    :return: user + system CPU seconds used so far by C{pids}.
    """
    total = 0
    for pid in pids:
        fields = _stat(pid)
        if fields is not None:
            # After the name: state(0) ppid(1) ... utime(12) stime(13).
            total += int(fields[12]) + int(fields[13])
    return total / CLOCK_TICKS


def status_kb(pid: int, field: str) -> int:
    """
    :return: a C{kB} field of C{/proc/<pid>/status} (C{VmRSS}, C{VmHWM}), or 0.
    """
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def wait_http(url: str, timeout: float, headers: Optional[dict] = None, child: Optional[Child] = None) -> None:
    """
    Poll C{url} until it answers 200.

    :raise RuntimeError: after C{timeout} seconds, or when C{child} exits.
    """
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        if child is not None and not child.alive():
            raise RuntimeError(f"{child.name} exited: {child.log_tail()}")
        try:
            request = urllib.request.Request(url, headers=headers or {})
            with urllib.request.urlopen(request, timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError) as e:
            last = e
        time.sleep(0.2)
    tail = child.log_tail() if child is not None else ""
    raise RuntimeError(f"{url} not ready within {timeout} s ({last}) {tail}")


def wait_port_file(path: str, timeout: float, child: Child) -> None:
    """
    Wait until C{child} has written C{path} (it listens).
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if os.path.exists(path) and os.path.getsize(path):
            return
        if not child.alive():
            raise RuntimeError(f"{child.name} exited: {child.log_tail()}")
        time.sleep(0.05)
    raise RuntimeError(f"{child.name} did not start within {timeout} s")


def wait_tcp(port: int, timeout: float, child: Child) -> None:
    """
    Wait until something accepts on 127.0.0.1:C{port}.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not child.alive():
            raise RuntimeError(f"{child.name} exited: {child.log_tail()}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"{child.name} not listening on {port} within {timeout} s")
