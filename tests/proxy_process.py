"""
A real proxy process for tests: C{twistd -n dheera} started as a child
process on a free loopback port, with its config written to a temporary
directory.  The port is chosen before the process binds it, so another
process may take it in between: then the proxy exits at start-up saying the
address is in use, and L{ProxyProcess.start} tries again on another port.

Several of them sharing one Redis stand for a fleet of proxies; SIGTERM and
SIGKILL test shutdown and crashes.  The repository root is put on
C{PYTHONPATH}, so the plugin is found whether or not the package is
installed.
"""

import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from typing import Optional

import treq
import yaml
from twisted.internet.defer import ensureDeferred
from twisted.internet.task import deferLater

from dheera_tx.workers import twistd_command
from tests.redis_server import free_port

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIND_ATTEMPTS = 3
# What a proxy prints when its port was taken between free_port() and bind.
ADDRESS_IN_USE = ("Address already in use", "CannotListenError")


class ProxyProcess:
    """
    One C{twistd -n dheera} child process.

    :param config: the YAML config as a dict (written to C{proxy.yaml}).
    :param directory: the working directory (default: a new temporary
        one); the embedded Redis keeps its data under it.
    :param extra_args: more arguments after C{dheera}, e.g.
        C{["--workers", "2"]}.
    :param env: extra environment variables.
    """

    def __init__(self, reactor, config: dict, directory: Optional[str] = None, extra_args=(), env=None):
        self.reactor = reactor
        self.config = config
        self._own_directory = directory is None
        self.directory = directory or tempfile.mkdtemp(prefix="dp", dir="/tmp")
        self.extra_args = list(extra_args)
        self.env = dict(env or {})
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process: Optional[subprocess.Popen] = None
        self.log_path = os.path.join(self.directory, "proxy.log")

    def write_config(self) -> str:
        """
        :return: the path of the written config file.
        """
        path = os.path.join(self.directory, "proxy.yaml")
        with open(path, "w") as f:
            yaml.safe_dump(self.config, f)
        return path

    async def start(self, timeout: float = 20.0) -> "ProxyProcess":
        """
        Start the process and wait until it answers
        C{/health/readiness} with 200; on another port if the chosen one
        was taken meanwhile.
        """
        for _ in range(BIND_ATTEMPTS - 1):
            seen = len(self.log_tail(10**9))
            try:
                return await self._start(timeout)
            except RuntimeError:
                if not any(sign in self.log_tail(10**9)[seen:] for sign in ADDRESS_IN_USE):
                    raise
            self.port = free_port()
            self.url = f"http://127.0.0.1:{self.port}"
        return await self._start(timeout)

    async def _start(self, timeout: float) -> "ProxyProcess":
        config_path = self.write_config()
        env = dict(os.environ)
        env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
        env.update(self.env)
        args = twistd_command(config_path, "--listen", f"tcp:{self.port}:interface=127.0.0.1", *self.extra_args)
        log = open(self.log_path, "ab")
        # A session of its own: cleanup kills the whole group (workers too).
        self.process = subprocess.Popen(
            args, cwd=self.directory, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"proxy exited with {self.process.returncode}: {self.log_tail()}")
            try:
                response = await treq.get(self.url + "/health/readiness", timeout=1, persistent=False)
                await response.content()
                if response.code == 200:
                    return self
            except Exception:
                pass
            await deferLater(self.reactor, 0.1, lambda: None)
        self.kill()
        raise RuntimeError(f"proxy not ready within {timeout} s: {self.log_tail()}")

    def log_tail(self, size: int = 3000) -> str:
        """
        :return: the end of the process's output.
        """
        try:
            with open(self.log_path, "rb") as f:
                return f.read()[-size:].decode("utf-8", "replace")
        except OSError:
            return ""

    def log_text(self) -> str:
        """
        :return: everything the process printed.
        """
        with open(self.log_path, "rb") as f:
            return f.read().decode("utf-8", "replace")

    def records(self):
        """
        :return: the JSON call records the process printed (json_log sink).
        """
        out = []
        for line in self.log_text().splitlines():
            if line.startswith("{") and '"call_id"' in line:
                out.append(json.loads(line))
        return out

    def terminate(self, timeout: float = 15.0) -> int:
        """
        SIGTERM and wait for the exit.

        :return: the exit code.
        """
        if self.process is None or self.process.poll() is not None:
            return self.process.returncode if self.process else 0
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise

    async def wait_exit(self, timeout: float = 15.0) -> Optional[int]:
        """
        Wait (without blocking the reactor) for the process to exit.

        :return: the exit code, or L{None} on timeout.
        """
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            code = self.process.poll()
            if code is not None:
                return code
            await deferLater(self.reactor, 0.05, lambda: None)
        return None

    def kill(self) -> None:
        """
        SIGKILL the process (a crash).
        """
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)

    def kill_group(self) -> None:
        """
        SIGKILL every process of the proxy's session (parent and workers).
        """
        if self.process is not None:
            try:
                os.killpg(self.process.pid, signal.SIGKILL)
            except OSError:
                pass
            if self.process.poll() is None:
                self.process.wait(10)

    def cleanup(self) -> None:
        """
        Make sure nothing outlives the test, workers and embedded Redis
        included.
        """
        self.kill_group()
        pidfile = os.path.join(self.directory, self.config.get("general_settings", {}).get("data_dir", "dheera_data"), "redis.pid")
        try:
            with open(pidfile) as f:
                os.kill(int(f.read().strip()), signal.SIGKILL)
        except (OSError, ValueError):
            pass
        if self._own_directory:
            shutil.rmtree(self.directory, ignore_errors=True)


def start_proxy(reactor, config: dict, **kwargs):
    """
    :return: a Deferred firing with a started L{ProxyProcess}.
    """
    return ensureDeferred(ProxyProcess(reactor, config, **kwargs).start())
