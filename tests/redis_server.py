"""
A real C{redis-server} for tests, on a free loopback port (or a unix socket
in a short temporary directory), with stop/start/kill/pause for outage
tests.

The server runs without persistence (C{--save "" --appendonly no}): a
restart starts empty.  Use L{RedisServer.cleanup} (or C{addCleanup}) so the
process never outlives the test.
"""

import os
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import time
from typing import Optional

from dheera_tx.redis.embedded import find_redis_server


def free_port() -> int:
    """
    :return: a TCP port on 127.0.0.1 that nothing listens on right now.
    """
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class AddressInUse(RuntimeError):
    """
    redis-server could not bind its port: another process took it.
    """


class RedisServer:
    """
    One C{redis-server} child process.

    :param unix: listen on a unix socket (in a fresh short temporary
        directory) instead of TCP.
    :param password: require this password (C{requirepass}).
    :param extra: more command-line options, e.g. C{["--databases", "4"]}.
    :param sentinel_for: C{(master_name, port)}: run a Sentinel (TCP only)
        that monitors the Redis on that loopback port.
    :param tls: C{(certificate file, key file)}: listen with TLS only.
    :param binary: the redis-server to run (default: the one the embedded
        Redis would use).
    """

    def __init__(self, unix: bool = False, password: Optional[str] = None, extra=(), sentinel_for=None, tls=None, binary=None):
        self.binary = binary or find_redis_server()
        self.tls = tls
        self.unix = unix
        self.password = password
        self.extra = list(extra)
        self.sentinel_for = sentinel_for
        self.port = None if unix else free_port()
        self.directory = tempfile.mkdtemp(prefix="dr", dir="/tmp")
        self.socket_path = os.path.join(self.directory, "r.sock") if unix else None
        self.process: Optional[subprocess.Popen] = None
        self._started = False

    @property
    def url(self) -> str:
        """
        The database URL of this server (db 0).
        """
        auth = f":{self.password}@" if self.password else ""
        if self.unix:
            return f"unix://{auth}{self.socket_path}"
        scheme = "rediss" if self.tls else "redis"
        return f"{scheme}://{auth}127.0.0.1:{self.port}/0"

    def everything(self, db: int = 0) -> str:
        """
        :return: every key name and value in C{db}, as one text (what a
            C{redis-cli} dump of it would show), to search for secrets.
        """
        out = []
        for name in self.command("KEYS", "*", db=db):
            kind = self.command("TYPE", name, db=db)
            if kind == "string":
                value = self.command("GET", name, db=db)
            elif kind == "hash":
                value = self.command("HGETALL", name, db=db)
            elif kind == "zset":
                value = self.command("ZRANGE", name, 0, -1, "WITHSCORES", db=db)
            elif kind == "set":
                value = self.command("SMEMBERS", name, db=db)
            elif kind == "list":
                value = self.command("LRANGE", name, 0, -1, db=db)
            elif kind == "stream":
                value = self.command("XRANGE", name, "-", "+", db=db)
            else:
                value = kind
            out.append(f"{name} {value!r}")
        return "\n".join(out)

    def start(self) -> "RedisServer":
        """
        Start the server and wait (at most 10 s) until it answers PING.

        The TCP port is chosen before Redis binds it, so another process
        may take it in between: a first start then moves to another port
        (a restart must keep its port, the clients know it).
        """
        for _ in range(2):
            try:
                return self._start()
            except AddressInUse:
                if self._started or self.unix or self.sentinel_for is not None:
                    raise
                self.port = free_port()
        return self._start()

    def _start(self) -> "RedisServer":
        args = [self.binary, "--save", "", "--appendonly", "no", "--dir", self.directory]
        if self.sentinel_for is not None:
            # Sentinel rewrites its config file, so it needs one of its own.
            config = os.path.join(self.directory, "sentinel.conf")
            if not os.path.exists(config):
                name, port = self.sentinel_for
                with open(config, "w") as f:
                    f.write(f"sentinel monitor {name} 127.0.0.1 {port} 1\n")
            args = [self.binary, config, "--sentinel", "--dir", self.directory]
        if self.unix:
            args += ["--port", "0", "--unixsocket", self.socket_path, "--unixsocketperm", "700"]
        elif self.tls:
            cert, key = self.tls
            args += ["--port", "0", "--tls-port", str(self.port), "--bind", "127.0.0.1"]
            args += ["--tls-cert-file", cert, "--tls-key-file", key, "--tls-auth-clients", "no"]
        else:
            args += ["--port", str(self.port), "--bind", "127.0.0.1"]
        if self.password:
            args += ["--requirepass", self.password]
        args += self.extra
        log = open(os.path.join(self.directory, "redis.log"), "ab")
        self.process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, cwd=self.directory)
        log.close()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                tail = self._log_tail()
                kind = AddressInUse if "Address already in use" in tail else RuntimeError
                raise kind(f"redis-server exited with {self.process.returncode}: {tail}")
            if self.ping() and self._answered_by_ours():
                self._started = True
                return self
            time.sleep(0.02)
        self.kill()
        raise RuntimeError("redis-server did not answer within 10 s")

    def _answered_by_ours(self) -> bool:
        """
        :return: whether the server answering is this process (not another
            one that took the port first).
        """
        try:
            info = self.command("INFO", "server")
        except Exception:
            return False
        return f"process_id:{self.process.pid}" in info

    def _log_tail(self) -> str:
        with open(os.path.join(self.directory, "redis.log"), "rb") as f:
            return f.read()[-500:].decode("utf-8", "replace")

    def _connect(self) -> socket.socket:
        if self.unix:
            s = socket.socket(socket.AF_UNIX)
            s.settimeout(1)
            s.connect(self.socket_path)
        else:
            s = socket.create_connection(("127.0.0.1", self.port), timeout=1)
            if self.tls:
                context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
                context.check_hostname = False
                context.verify_mode = ssl.CERT_NONE
                s = context.wrap_socket(s)
        return s

    def ping(self) -> bool:
        """
        :return: whether the server answers PING right now.
        """
        try:
            s = self._connect()
        except OSError:
            return False
        with s:
            try:
                if self.password:
                    s.sendall(_command("AUTH", self.password))
                    _read_reply(s)
                s.sendall(_command("PING"))
                return _read_reply(s) == "PONG"
            except Exception:
                # Not reachable, or an error reply such as -LOADING while an
                # append-only file is read back: not ready yet.
                return False

    def command(self, *args, db: int = 0):
        """
        Run one command on a connection of its own, as C{redis-cli} would.

        :param db: the database to run it in.
        :return: the reply: L{str}, L{int}, L{None} or a list of them.
        """
        with self._connect() as s:
            s.settimeout(5)
            if self.password:
                s.sendall(_command("AUTH", self.password))
                _read_reply(s)
            if db:
                s.sendall(_command("SELECT", db))
                _read_reply(s)
            s.sendall(_command(*args))
            return _read_reply(s)

    def stop(self):
        """
        Stop the server with SIGTERM and wait until it has exited.
        """
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    def kill(self):
        """
        Kill the server with SIGKILL (no goodbye on its connections' behalf
        beyond what the kernel does).
        """
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGCONT)
            self.process.kill()
            self.process.wait()
        self.process = None

    def pause(self):
        """
        Freeze the server (SIGSTOP): connections stay open, nothing answers.
        """
        self.process.send_signal(signal.SIGSTOP)

    def resume(self):
        """
        Let a paused server go on (SIGCONT).
        """
        self.process.send_signal(signal.SIGCONT)

    def cleanup(self):
        """
        Kill the server if it runs and remove its directory.
        """
        self.kill()
        shutil.rmtree(self.directory, ignore_errors=True)


def _command(*args) -> bytes:
    out = [b"*%d\r\n" % len(args)]
    for a in args:
        b = a if isinstance(a, bytes) else str(a).encode("utf-8")
        out.append(b"$%d\r\n%s\r\n" % (len(b), b))
    return b"".join(out)


def _read_reply(s: socket.socket):
    reader = s.makefile("rb")
    try:
        return _parse(reader)
    finally:
        reader.close()


def _parse(reader):
    line = reader.readline()
    if not line:
        raise OSError("connection closed")
    kind, rest = line[:1], line[1:-2]
    if kind == b"+":
        return rest.decode()
    if kind == b"-":
        raise RuntimeError(rest.decode())
    if kind == b":":
        return int(rest)
    if kind == b"$":
        n = int(rest)
        if n < 0:
            return None
        data = reader.read(n + 2)[:-2]
        return data.decode("utf-8", "surrogateescape")
    if kind == b"*":
        n = int(rest)
        if n < 0:
            return None
        return [_parse(reader) for _ in range(n)]
    raise OSError(f"unexpected reply {line!r}")


def redis_for(case):
    """
    Start a redis-server and connect the proxy's client to it for one test
    (both go at the test's end).

    :param case: the test case (its C{addCleanup} is used).
    :return: C{(server, client)}.
    """
    from twisted.internet import reactor

    from dheera_tx.redis.client import connect

    server = RedisServer().start()
    case.addCleanup(server.cleanup)
    client = connect(reactor, server.url)
    case.addCleanup(client.disconnect)
    return server, client
