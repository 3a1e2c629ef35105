"""
Several worker processes serving one listening address (C{--workers N}).

The parent never serves a request.  It opens one TCP listening socket per
worker on the same address with C{SO_REUSEPORT} (so the kernel spreads new
connections over the workers) and one unix socket that every worker shares
(a second bind of the path would take it from the first), starts the
embedded Redis if no database is configured, and runs each worker as
C{twistd dheera} child process that adopts its sockets (C{--inherited-fd})
and uses the parent's Redis, whose URL (and password) it gets in its
environment, never on its command line.  A worker that dies is started
again on the same socket, so connections waiting in its backlog are served
by its replacement.  On SIGTERM the parent passes the signal on, waits for the
workers to drain and exit, and stops the embedded Redis last.
"""

import os
import shutil
import socket
import stat
import sys
import tempfile
from typing import Dict, List

from twisted.application import service
from twisted.internet import protocol, tcp, unix
from twisted.internet.defer import Deferred
from twisted.logger import Logger

from dheera_tx.listeners import Listener

log = Logger()

# Where a worker finds the database URL the parent chose.
DATABASE_URL_VARIABLE = "DHEERA_WORKER_DATABASE_URL"


def twistd_command(config_path: str, *arguments: str) -> List[str]:
    """
    :return: the command line that runs C{twistd -n dheera} with this
        Python (no pid file), whether or not a C{twistd} script is on the
        PATH.
    """
    return [
        sys.executable,
        "-c",
        "from twisted.scripts.twistd import run; run()",
        "-n",
        "--pidfile=",
        "dheera",
        "--config",
        config_path,
        *arguments,
    ]


class WorkerSocket:
    """
    One listening socket the parent opens for a worker.
    """

    def __init__(self, family, sock: socket.socket, description: str):
        self.family = family
        self.socket = sock
        self.description = description

    @property
    def fd(self) -> int:
        """
        :return: the socket's file descriptor.
        """
        return self.socket.fileno()


def open_listening_socket(listener: Listener, reuse_port: bool) -> WorkerSocket:
    """
    Open a listening socket for a TCP (C{tcp:}, C{tcp6:}) or unix endpoint.

    :param listener: the parsed endpoint (Twisted's parser read it).
    :raise ValueError: for an endpoint form workers cannot share.
    :raise OSError: the address cannot be bound.
    """
    backlog = listener.backlog or 1024
    if listener.kind in ("TCP", "TCP6"):
        interface = listener.interface
        family = socket.AF_INET6 if ":" in interface or listener.kind == "TCP6" else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((interface, listener.port))
    elif listener.kind == "UNIX" and listener.path is not None:
        family = socket.AF_UNIX
        _remove_stale_socket(listener.path)
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.bind(listener.path)
        os.chmod(listener.path, listener.mode)
    else:
        raise ValueError(f"--workers supports tcp:, tcp6: and unix: endpoints, not {listener.description!r}")
    sock.listen(backlog)
    sock.setblocking(False)
    return WorkerSocket(family, sock, listener.description)


def _remove_stale_socket(path: str) -> None:
    """
    Remove the socket file a dead process left at C{path}; a socket someone
    still listens on is an error, and anything but a socket is left alone
    (bind then fails).
    """
    try:
        if not stat.S_ISSOCK(os.stat(path).st_mode):
            return
    except FileNotFoundError:
        return
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    # A live server with a full backlog would block a connect for good.
    probe.settimeout(1.0)
    try:
        probe.connect(path)
    except ConnectionRefusedError:
        os.unlink(path)
        return
    except OSError:
        pass
    finally:
        probe.close()
    raise OSError(f"{path} is in use by another process")


class _WorkerProcess(protocol.ProcessProtocol):
    def __init__(self, pool: "WorkerPool", index: int):
        self.pool = pool
        self.index = index
        self.ended = Deferred()
        self.pid = None

    def connectionMade(self):
        self.pid = self.transport.pid

    def processEnded(self, reason):
        self.ended.callback(reason.value.exitCode)
        self.pool._worker_ended(self)


class WorkerPool(service.Service):
    """
    Runs and restarts the worker processes.

    :param reactor: the reactor (spawns processes, times restarts).
    :param config_path: the config file the workers load.
    :param endpoints: the parsed endpoints to serve.
    :param workers: how many worker processes.
    :param database_url: a callable giving the Redis URL the workers use
        (the embedded Redis's is known only once it is configured).
    :param grace: seconds the workers may take to drain on shutdown.
    """

    RESTART_DELAY = 1.0

    def __init__(self, reactor, config_path: str, endpoints: List[Listener], workers: int, database_url, grace: float):
        self._reactor = reactor
        self._config_path = os.path.abspath(config_path)
        self._endpoints = endpoints
        self._count = workers
        self._database_url = database_url
        self._grace = grace
        self._sockets: List[List[WorkerSocket]] = []
        self._running: Dict[int, _WorkerProcess] = {}
        self._stopping = False
        self.restarts = 0
        # Every worker's Prometheus values, aggregated by whichever worker a
        # scrape reaches.
        self.metrics_dir = tempfile.mkdtemp(prefix="dheera-metrics-")

    def open_sockets(self) -> None:
        """
        Open every worker's listening sockets (before privileges drop and
        before workers start, so a busy port fails start-up at once).
        """
        shared = {listener: open_listening_socket(listener, reuse_port=False)
                  for listener in self._endpoints if listener.kind == "UNIX"}
        for _ in range(self._count):
            self._sockets.append([shared.get(e) or open_listening_socket(e, reuse_port=True) for e in self._endpoints])

    def startService(self):
        service.Service.startService(self)
        if not self._sockets:
            self.open_sockets()
        for index in range(self._count):
            self._spawn(index)

    def _spawn(self, index: int) -> None:
        sockets = self._sockets[index]
        args = twistd_command(
            self._config_path,
            "--worker-index",
            str(index),
            "--worker-parent",
            str(os.getpid()),
        )
        child_fds = {0: "w", 1: 1, 2: 2}
        for n, ws in enumerate(sockets):
            child_fd = 3 + n
            child_fds[child_fd] = ws.fd
            family = {socket.AF_INET: "INET", socket.AF_INET6: "INET6", socket.AF_UNIX: "UNIX"}[ws.family]
            args += ["--inherited-fd", f"{child_fd}:{family}"]
        worker = _WorkerProcess(self, index)
        env = dict(os.environ, PROMETHEUS_MULTIPROC_DIR=self.metrics_dir)
        env[DATABASE_URL_VARIABLE] = self._database_url()
        self._reactor.spawnProcess(worker, sys.executable, args, env=env, childFDs=child_fds)
        self._running[index] = worker
        log.info("Started worker {index} (pid {pid})", index=index, pid=worker.transport.pid)

    def _worker_ended(self, worker: _WorkerProcess) -> None:
        if worker.pid is not None:
            from prometheus_client import multiprocess

            multiprocess.mark_process_dead(worker.pid, self.metrics_dir)
        if self._running.get(worker.index) is worker:
            del self._running[worker.index]
        if self._stopping or not self.running:
            return
        log.warn("Worker {index} exited; starting it again", index=worker.index)
        self.restarts += 1
        self._reactor.callLater(self.RESTART_DELAY, self._respawn, worker.index)

    def _respawn(self, index: int) -> None:
        if not self._stopping and self.running and index not in self._running:
            self._spawn(index)

    def stopService(self):
        service.Service.stopService(self)
        self._stopping = True
        waiting = []
        for worker in list(self._running.values()):
            waiting.append(worker.ended)
            try:
                worker.transport.signalProcess("TERM")
            except Exception:
                pass
        d = _all_or_timeout(self._reactor, waiting, self._grace + 10, self._kill_remaining)
        d.addBoth(self._close_sockets)
        return d

    def _kill_remaining(self) -> None:
        for worker in list(self._running.values()):
            log.warn("Worker {index} did not exit in time; killing it", index=worker.index)
            try:
                worker.transport.signalProcess("KILL")
            except Exception:
                pass

    def _close_sockets(self, result):
        closed = set()
        for sockets in self._sockets:
            for ws in sockets:
                if id(ws) in closed:
                    continue
                closed.add(id(ws))
                if ws.family == socket.AF_UNIX:
                    # The workers leave the shared path alone: its owner
                    # removes it.
                    try:
                        os.unlink(ws.socket.getsockname())
                    except OSError:
                        pass
                ws.socket.close()
        shutil.rmtree(self.metrics_dir, ignore_errors=True)
        return None


def _all_or_timeout(reactor, deferreds: List[Deferred], timeout: float, on_timeout) -> Deferred:
    """
    :return: a Deferred firing once all of C{deferreds} fired, calling
        C{on_timeout} (and still waiting) if that takes over C{timeout}.
    """
    from twisted.internet.defer import DeferredList

    done = DeferredList(deferreds, consumeErrors=True)
    timer = reactor.callLater(timeout, on_timeout)

    def finished(result):
        if timer.active():
            timer.cancel()
        return result

    return done.addBoth(finished)


def die_with_parent(parent_pid: int) -> None:
    """
    In a worker: have the kernel send SIGTERM when the parent dies (Linux
    C{PR_SET_PDEATHSIG}), so a crashed parent leaves no orphan serving on
    its port.  Exits at once if the parent is already gone.
    """
    try:
        import ctypes
        import signal as signals

        libc = ctypes.CDLL(None, use_errno=True)
        PR_SET_PDEATHSIG = 1
        libc.prctl(PR_SET_PDEATHSIG, signals.SIGTERM)
    except (OSError, AttributeError):
        log.warn("Cannot ask to be stopped with the worker parent on this platform")
    if os.getppid() != parent_pid:
        sys.exit("the worker parent is gone")


def adopt_sockets(reactor, inherited: List[str], factory) -> List:
    """
    In a worker: serve C{factory} on the listening sockets the parent
    passed as C{FD:FAMILY}.

    :return: the adopted ports.
    """
    ports = []
    for spec in inherited:
        fd, _, family = spec.partition(":")
        family = {"INET": socket.AF_INET, "INET6": socket.AF_INET6, "UNIX": socket.AF_UNIX}[family or "INET"]
        if family == socket.AF_UNIX:
            port = _SharedUNIXPort._fromListeningDescriptor(reactor, int(fd), factory)
            port.startListening()
        else:
            # Twisted's TCP port never shuts an adopted socket down, so the
            # parent's copy stays good for this worker's replacement.
            port = reactor.adoptStreamPort(int(fd), family, factory)
        ports.append(port)
        os.close(int(fd))
    return ports


class _SharedUNIXPort(unix.Port):
    """
    A worker's share of the parent's unix listening socket.  Twisted's unix
    port sets the socket file's mode when it starts and removes the file
    when it stops; on a shared socket the first would undo the mode the
    parent set and the second would take the path from every other worker,
    so this port keeps the file as it is (the parent removes it).  Nor
    does it shut the socket down when it stops, which would stop it for
    every worker: it only closes its own descriptor, as Twisted's TCP port
    does for an adopted socket.
    """

    _shouldShutdown = False

    def startListening(self):
        path = self._bindPath
        if path[:1] not in ("\0", b"\0"):
            self.mode = stat.S_IMODE(os.stat(path).st_mode)
        super().startListening()

    def connectionLost(self, reason):
        tcp.Port.connectionLost(self, reason)
