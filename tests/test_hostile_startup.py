"""
How the proxy starts, tried as an attacker on the same machine or network
would (issue 12, items 8 and 9), with real C{twistd -n dheera} processes,
real sockets and a real Redis:

  - C{--workers} on a unix socket: every worker serves it, and the socket
    file outlives a worker's death;
  - a password in C{database_url} is in no worker's C{/proc/PID/cmdline};
  - C{--listen} strings are read by Twisted's parser: an escaped IPv6
    interface binds it, an unescaped one is refused, never 0.0.0.0;
  - the embedded Redis gets a minimal environment, not the master key;
  - the public example master key never listens beyond loopback.
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile

import treq
from twisted.internet import reactor
from twisted.internet.task import deferLater
from twisted.trial.unittest import SynchronousTestCase, TestCase

from dheera_tx.listeners import EXAMPLE_MASTER_KEY, Listener, ListenerError, default_listener, exposure_problem, parse_listener
from dheera_tx.redis.embedded import EmbeddedRedis, find_redis_server
from dheera_tx.workers import open_listening_socket, twistd_command
from tests.fake_vllm import FakeVLLM
from tests.proxy_process import ROOT, ProxyProcess
from tests.redis_server import RedisServer, free_port

MASTER = "sk-hostile-startup-master"


def _config(fake, master=MASTER, **general) -> dict:
    return {
        "model_list": [{"model_name": "m", "dheera_ai_params": {"model": "hosted_vllm/tiny", "api_base": fake.url}}],
        "general_settings": dict({"master_key": master, "graceful_shutdown_timeout": 5}, **general),
    }


def http_get(address, target: str = "/health/liveliness", timeout: float = 5.0) -> dict:
    """
    One blocking HTTP/1.0 GET (the test's own client, run in a thread so
    the reactor keeps turning).

    :param address: a unix socket path, or an C{(IPv6 address, port)}.
    :return: the decoded JSON answer.
    """
    family = socket.AF_UNIX if isinstance(address, str) else socket.AF_INET6
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(address)
        s.sendall(f"GET {target} HTTP/1.0\r\nHost: x\r\n\r\n".encode())
        data = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    return json.loads(data.split(b"\r\n\r\n", 1)[1])


def cmdline(pid: int) -> str:
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        return f.read().replace(b"\0", b" ").decode("utf-8", "replace")


def sleep(seconds: float):
    return deferLater(reactor, seconds, lambda: None)


async def run_twistd(config: dict, *args: str, env=None, timeout: float = 30.0):
    """
    Run C{twistd -n dheera} until it exits (a start-up that must fail).

    :return: C{(exit code, output text)}.
    """
    directory = tempfile.mkdtemp(prefix="dh", dir="/tmp")
    path = os.path.join(directory, "proxy.yaml")
    cleanup = lambda: shutil.rmtree(directory, ignore_errors=True)  # noqa: E731
    with open(path, "w") as f:
        json.dump(config, f)
    environ = dict(os.environ, PYTHONPATH=ROOT, **(env or {}))
    process = subprocess.Popen(
        twistd_command(path, *args), cwd=directory, env=environ, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    for _ in range(int(timeout / 0.1)):
        if process.poll() is not None:
            break
        await sleep(0.1)
    else:
        process.kill()
    output = process.communicate()[0].decode("utf-8", "replace")
    cleanup()
    return process.returncode, output


class UnixWorkersTests(TestCase):
    """
    Two workers on one C{unix:} listener share one socket.
    """

    timeout = 90

    async def setUp(self):
        self.fake = await FakeVLLM(reactor, served_model="tiny").start()
        self.addCleanup(self.fake.stop)
        directory = tempfile.mkdtemp(prefix="du", dir="/tmp")
        self.socket_path = os.path.join(directory, "proxy.sock")
        self.proxy = ProxyProcess(
            reactor, _config(self.fake), directory=directory,
            extra_args=["--workers", "2", "--listen", f"unix:{self.socket_path}:mode=660"],
        )
        self.addCleanup(self.proxy.cleanup)
        await self.proxy.start()

    async def worker_pids(self, tries: int = 100) -> set:
        """
        :return: the pids that answered within C{tries} requests (stopping
            at two) over the loopback TCP listener, which spreads
            connections with SO_REUSEPORT.
        """
        pids: set = set()
        for _ in range(tries):
            response = await treq.get(self.proxy.url + "/health/liveliness", persistent=False)
            pids.add((await response.json())["pid"])
            if len(pids) == 2:
                break
        return pids

    async def test_every_worker_serves_the_unix_socket(self):
        """
        With either worker stopped (SIGSTOP), the other answers on the unix
        socket: every worker accepts from it (before, every request went to
        the last worker, whose bind had replaced the others' path, and
        stopping that one left the socket unanswered).  The socket has the
        mode asked for.
        """
        pids = await self.worker_pids()
        self.assertEqual(len(pids), 2, pids)
        self.assertNotIn(self.proxy.process.pid, pids)
        for stopped in sorted(pids):
            os.kill(stopped, signal.SIGSTOP)
            try:
                answer = await _in_thread(http_get, self.socket_path)
            finally:
                os.kill(stopped, signal.SIGCONT)
            self.assertEqual(answer["pid"], (pids - {stopped}).pop())
        self.assertEqual(os.stat(self.socket_path).st_mode & 0o777, 0o660)

    async def test_socket_outlives_a_worker(self):
        """
        A worker stopped with SIGTERM (it drains and exits cleanly) leaves
        the socket file, its mode and the listening socket in place: the
        other worker answers at once, and so does the replacement when the
        other is stopped (SIGSTOP).
        """
        pids = await self.worker_pids()
        self.assertEqual(len(pids), 2, pids)
        victim, survivor = sorted(pids)
        os.kill(victim, signal.SIGTERM)
        for _ in range(300):
            await sleep(0.1)
            if not os.path.exists(f"/proc/{victim}"):
                break
        self.assertTrue(os.path.exists(self.socket_path))
        self.assertEqual(os.stat(self.socket_path).st_mode & 0o777, 0o660)
        self.assertEqual((await _in_thread(http_get, self.socket_path))["pid"], survivor)
        for _ in range(300):
            now = await self.worker_pids(20)
            if len(now) == 2 and victim not in now:
                break
            await sleep(0.1)
        self.assertEqual(len(now), 2, now)
        self.assertNotIn(victim, now)
        replacement = (now - {survivor}).pop()
        os.kill(survivor, signal.SIGSTOP)
        try:
            answer = await _in_thread(http_get, self.socket_path)
        finally:
            os.kill(survivor, signal.SIGCONT)
        self.assertEqual(answer["pid"], replacement)

    async def test_parent_removes_socket_on_exit(self):
        """
        After SIGTERM the whole proxy exits and the socket file is gone.
        """
        self.proxy.process.send_signal(signal.SIGTERM)
        code = await self.proxy.wait_exit(40)
        self.assertIn(code, (0, -15), self.proxy.log_tail())
        self.assertFalse(os.path.exists(self.socket_path))


async def _in_thread(f, *args):
    from twisted.internet.threads import deferToThread

    return await deferToThread(f, *args)


class WorkerSecretsTests(TestCase):
    """
    Worker processes and the embedded Redis do not carry secrets where
    other users of the machine can read them.
    """

    timeout = 90

    async def test_database_password_not_in_cmdline(self):
        """
        With C{database_url} holding a password, no worker's command line
        (world-readable C{/proc/PID/cmdline}) contains it, and the workers
        still reach Redis with it: a key made through one worker works.
        """
        redis = RedisServer(password="s3cret-redis-pw").start()
        self.addCleanup(redis.cleanup)
        fake = await FakeVLLM(reactor, served_model="tiny").start()
        self.addCleanup(fake.stop)
        proxy = ProxyProcess(reactor, _config(fake, database_url=redis.url), extra_args=["--workers", "2"])
        self.addCleanup(proxy.cleanup)
        await proxy.start()
        pids = set()
        for _ in range(60):
            response = await treq.get(proxy.url + "/health/liveliness", persistent=False)
            pids.add((await response.json())["pid"])
            if len(pids) == 2:
                break
        self.assertEqual(len(pids), 2)
        for pid in pids:
            line = cmdline(pid)
            self.assertIn("--worker-index", line)
            self.assertNotIn("s3cret-redis-pw", line)
        headers = {"Authorization": f"Bearer {MASTER}", "Content-Type": "application/json"}
        response = await treq.post(proxy.url + "/key/generate", b"{}", headers=headers, persistent=False)
        self.assertEqual(response.code, 200, await response.text())

    async def test_embedded_redis_environment(self):
        """
        The embedded C{redis-server} is started with PATH (and the locale,
        time zone and library path if set) only: not the master key, the
        upstream API key or anything else in the proxy's environment.
        """
        directory = tempfile.mkdtemp(prefix="de", dir="/tmp")
        self.addCleanup(shutil.rmtree, directory, True)
        seen = os.path.join(directory, "env.txt")
        wrapper = os.path.join(directory, "redis-wrapper")
        with open(wrapper, "w") as f:
            f.write(f"#!/bin/sh\nenv > {seen}\nexec {find_redis_server()} \"$@\"\n")
        os.chmod(wrapper, 0o755)
        secrets = {"DHEERA_AI_MASTER_KEY": "sk-not-for-redis", "HOSTED_VLLM_API_KEY": "upstream-not-for-redis"}
        self.patch(os, "environ", dict(os.environ, **secrets))
        embedded = EmbeddedRedis(reactor, os.path.join(directory, "data"), redis_server=wrapper)
        embedded.startService()
        self.addCleanup(embedded.stopService)
        await embedded.whenReady()
        with open(seen) as f:
            names = {line.split("=", 1)[0] for line in f.read().splitlines() if "=" in line}
        # The shell adds PWD and SHLVL itself.
        self.assertLessEqual(names - {"PWD", "SHLVL", "_"}, {"PATH", "LD_LIBRARY_PATH", "TZ", "LANG", "LC_ALL"})
        self.assertIn("PATH", names)
        with open(seen) as f:
            text = f.read()
        for value in secrets.values():
            self.assertNotIn(value, text)


class ListenStringTests(TestCase):
    """
    C{--listen} strings are read by Twisted's parser, with and without
    workers.
    """

    timeout = 90

    async def setUp(self):
        self.fake = await FakeVLLM(reactor, served_model="tiny").start()
        self.addCleanup(self.fake.stop)

    async def check_ipv6_loopback(self, *workers: str):
        port = free_port()
        proxy = ProxyProcess(
            reactor, _config(self.fake), extra_args=[*workers, "--listen", f"tcp:{port}:interface=\\:\\:1"]
        )
        self.addCleanup(proxy.cleanup)
        await proxy.start()
        answer = await _in_thread(http_get, ("::1", port))
        self.assertEqual(answer["status"], "alive")
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            self.assertNotEqual(s.connect_ex(("127.0.0.1", port)), 0, "bound beyond ::1")

    async def test_escaped_ipv6_interface(self):
        """
        C{tcp:PORT:interface=\\:\\:1} listens on ::1 only (IPv4 connections
        to the port are refused), in one process.
        """
        await self.check_ipv6_loopback()

    async def test_escaped_ipv6_interface_workers(self):
        """
        The same with C{--workers 2} (before: the escaped form failed to
        start, the unescaped one bound 0.0.0.0).
        """
        await self.check_ipv6_loopback("--workers", "2")

    async def test_unescaped_ipv6_refused(self):
        """
        C{interface=::1} is ambiguous in Twisted's syntax: start-up stops
        with one line showing the escaped form, with or without workers,
        and nothing listens.
        """
        for workers in ([], ["--workers", "2"]):
            port = free_port()
            code, output = await run_twistd(
                _config(self.fake), "--listen", f"tcp:{port}:interface=::1", *workers
            )
            self.assertNotEqual(code, 0, output)
            self.assertIn("interface=\\:\\:1", output)
            self.assertNotIn("Traceback", output)
            self.assertEqual(len(output.strip().splitlines()), 1, output)


class ExampleKeyTests(TestCase):
    """
    The public example master key from conf/proxy.yaml never listens beyond
    loopback unless the operator says so.
    """

    timeout = 90

    async def setUp(self):
        self.fake = await FakeVLLM(reactor, served_model="tiny").start()
        self.addCleanup(self.fake.stop)

    async def test_refused_on_all_interfaces(self):
        """
        With the example key, C{--listen tcp:PORT} (every interface) stops
        start-up with one clear line and binds nothing; so does the same key
        given in C{DHEERA_AI_MASTER_KEY}, and an exposed listener beside a
        loopback one.
        """
        config = _config(self.fake, master=EXAMPLE_MASTER_KEY)
        no_key = _config(self.fake)
        del no_key["general_settings"]["master_key"]
        cases = [
            (config, ["--listen", "tcp:{port}"], None),
            (config, ["--listen", "tcp:{port}", "--workers", "2"], None),
            (config, ["--listen", "tcp:{port}:interface=127.0.0.1", "--listen", "tcp:{other}"], None),
            (no_key, ["--listen", "tcp:{port}"], {"DHEERA_AI_MASTER_KEY": EXAMPLE_MASTER_KEY}),
        ]
        for data, args, env in cases:
            port, other = free_port(), free_port()
            args = [a.format(port=port, other=other) for a in args]
            code, output = await run_twistd(data, *args, env=env)
            self.assertNotEqual(code, 0, output)
            lines = output.strip().splitlines()
            self.assertEqual(len(lines), 1, output)
            self.assertIn("refusing to listen", lines[0])
            self.assertIn("--allow-example-key", lines[0])
            with socket.socket() as s:
                self.assertNotEqual(s.connect_ex(("127.0.0.1", port)), 0)

    async def test_loopback_and_override(self):
        """
        With the example key the proxy starts on a loopback listener, and
        on every interface when started with C{--allow-example-key}.
        """
        config = _config(self.fake, master=EXAMPLE_MASTER_KEY)
        proxy = ProxyProcess(reactor, config)
        self.addCleanup(proxy.cleanup)
        await proxy.start()
        port = free_port()
        exposed = ProxyProcess(reactor, config, extra_args=["--listen", f"tcp:{port}", "--allow-example-key"])
        self.addCleanup(exposed.cleanup)
        await exposed.start()
        response = await treq.get(f"http://127.0.0.1:{port}/health/liveliness", persistent=False)
        self.assertEqual(response.code, 200)


class ExposureRuleTests(SynchronousTestCase):
    """
    L{exposure_problem} and L{default_listener}.
    """

    def test_local_listeners(self):
        """
        Unix sockets and loopback addresses (IPv4, IPv6, mapped, localhost)
        are local; every interface, a LAN address, a host name and an
        inherited systemd socket are not.
        """
        local = [
            Listener("unix:/run/p.sock", "UNIX", path="/run/p.sock"),
            Listener("a", "TCP", port=1, interface="127.0.0.1"),
            Listener("b", "TCP", port=1, interface="127.0.0.2"),
            Listener("c", "TCP", port=1, interface="::1"),
            Listener("d", "TCP6", port=1, interface="::ffff:127.0.0.1"),
            Listener("e", "SSL", port=1, interface="localhost"),
        ]
        exposed = [
            Listener("f", "TCP", port=1, interface=""),
            Listener("g", "TCP", port=1, interface="0.0.0.0"),
            Listener("h", "TCP6", port=1, interface="::"),
            Listener("i", "TCP", port=1, interface="10.0.0.2"),
            Listener("j", "TCP", port=1, interface="proxy.example.com"),
            Listener("k", "SYSTEMD"),
        ]
        self.assertEqual([listener.local for listener in local], [True] * len(local))
        self.assertEqual([listener.local for listener in exposed], [False] * len(exposed))
        self.assertIsNone(exposure_problem(EXAMPLE_MASTER_KEY, local))
        self.assertIsNone(exposure_problem(MASTER, exposed))
        problem = exposure_problem(EXAMPLE_MASTER_KEY, local + exposed[:1])
        self.assertIn("refusing to listen on f:", problem)

    def test_default_listener(self):
        """
        Without C{--listen} the proxy listens on port 4000 of every
        interface, or of 127.0.0.1 only while the master key is the example
        (so C{twistd -n dheera --config conf/proxy.yaml} starts, safely).
        """
        self.assertEqual(default_listener(MASTER), "tcp:4000")
        self.assertEqual(default_listener(None), "tcp:4000")
        self.assertEqual(default_listener(EXAMPLE_MASTER_KEY), "tcp:4000:interface=127.0.0.1")

    def test_shipped_config_uses_the_example_key(self):
        """
        The rule guards the key conf/proxy.yaml really ships.
        """
        import yaml

        with open(os.path.join(ROOT, "conf", "proxy.yaml")) as f:
            shipped = yaml.safe_load(f)
        self.assertEqual(shipped["general_settings"]["master_key"], EXAMPLE_MASTER_KEY)



class SharedUnixSocketTests(SynchronousTestCase):
    """
    The worker parent's unix socket takes over a stale socket file, never a
    live one or a file that is not a socket.
    """

    def setUp(self):
        self.directory = tempfile.mkdtemp(prefix="ds", dir="/tmp")
        self.addCleanup(shutil.rmtree, self.directory, True)
        self.path = os.path.join(self.directory, "p.sock")
        self.listener = Listener("unix:" + self.path, "UNIX", path=self.path, mode=0o600)

    def open(self):
        ws = open_listening_socket(self.listener, reuse_port=False)
        self.addCleanup(ws.socket.close)
        return ws

    def test_stale_socket_replaced(self):
        """
        A socket file nobody listens on (its process died) is replaced; the
        new socket accepts connections and has the mode asked for.
        """
        dead = socket.socket(socket.AF_UNIX)
        dead.bind(self.path)
        dead.close()
        self.open()
        self.assertEqual(os.stat(self.path).st_mode & 0o777, 0o600)
        with socket.socket(socket.AF_UNIX) as client:
            client.connect(self.path)

    def test_live_socket_kept(self):
        """
        A socket another process listens on is not taken over: OSError
        saying it is in use, and the other listener keeps its path.
        """
        live = socket.socket(socket.AF_UNIX)
        self.addCleanup(live.close)
        live.bind(self.path)
        live.listen(1)
        error = self.assertRaises(OSError, self.open)
        self.assertIn("in use", str(error))
        with socket.socket(socket.AF_UNIX) as client:
            client.connect(self.path)

    def test_regular_file_kept(self):
        """
        A file that is not a socket (a typo in --listen) is never deleted:
        binding fails.
        """
        with open(self.path, "w") as f:
            f.write("data")
        self.assertRaises(OSError, self.open)
        with open(self.path) as f:
            self.assertEqual(f.read(), "data")


class ParseListenerTests(SynchronousTestCase):
    """
    L{parse_listener} reads C{--listen} with Twisted's parser.
    """

    def test_fields(self):
        """
        TCP, escaped IPv6, tcp6 and unix strings give their fields; a
        backlog is kept only when the string gives one.
        """
        self.assertEqual(parse_listener(reactor, "tcp:4000"), Listener("tcp:4000", "TCP", port=4000))
        v6 = parse_listener(reactor, "tcp:4000:interface=\\:\\:1:backlog=9")
        self.assertEqual((v6.interface, v6.backlog, v6.local), ("::1", 9, True))
        self.assertEqual(parse_listener(reactor, "tcp6:4000").interface, "::")
        unix = parse_listener(reactor, "unix:/run/p.sock:mode=660")
        self.assertEqual((unix.kind, unix.path, unix.mode), ("UNIX", "/run/p.sock", 0o660))

    def test_errors(self):
        """
        Unusable strings raise L{ListenerError} with one line: an unescaped
        IPv6 interface names the escaped form.
        """
        for description, what in [
            ("tcp:4000:interface=::1", "interface=\\:\\:1"),
            ("tcp:http", "cannot listen on 'tcp:http'"),
            ("carrier-pigeon:1", "Unknown endpoint type"),
            ("ssl:4443:privateKey=/nonexistent.pem", "No such file"),
        ]:
            error = self.assertRaises(ListenerError, parse_listener, reactor, description)
            self.assertIn(what, str(error))
            self.assertNotIn("\n", str(error))
