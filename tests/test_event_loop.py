"""
Tests for L{dheera_tx.event_loop}: the epoll reactor that dispatches
socket events without Twisted's per-event log context.
"""

import errno
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

import yaml
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IHalfCloseableDescriptor
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from dheera_tx import event_loop
from dheera_tx.event_loop import GatewayReactor
from dheera_tx.workers import twistd_command

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class _Selectable:
    """
    A selectable that records what the reactor asked of it.
    """

    def __init__(self, fd: int, fail: bool = False, fail_lost: bool = False):
        self._fd = fd
        self._fail = fail
        self._fail_lost = fail_lost
        self.reads = 0
        self.writes = 0
        self.lost = []

    def fileno(self) -> int:
        return self._fd

    def doRead(self):
        self.reads += 1
        if self._fail:
            raise ValueError("handler broke")
        return None

    def doWrite(self):
        self.writes += 1
        return None

    def connectionLost(self, reason):
        self.lost.append(reason)
        if self._fail_lost:
            raise RuntimeError("connectionLost broke")

    def logPrefix(self) -> str:
        if not self._fail_lost:
            raise AssertionError("the reactor must not ask for a log prefix")
        return f"Selectable-{self._fd}"


class _Poller:
    """
    Stands in for the epoll object: answers one scripted poll.
    """

    def __init__(self, events=(), error=None):
        self.events = list(events)
        self.error = error
        self.polled = []

    def poll(self, timeout, maxevents):
        self.polled.append((timeout, maxevents))
        if self.error is not None:
            raise self.error
        return self.events

    def unregister(self, fd):
        pass

    def modify(self, fd, flags):
        pass

    def close(self):
        pass


class GatewayReactorTests(SynchronousTestCase):
    """
    L{GatewayReactor.doPoll} hands each ready socket to C{_doReadOrWrite}.
    """

    def setUp(self):
        self.reactor = GatewayReactor()
        real = self.reactor._poller
        self.addCleanup(real.close)
        self.addCleanup(self.reactor.waker.connectionLost, None)

    def _poll(self, selectables, events, error=None, timeout=0.5):
        poller = self.reactor._poller = _Poller(events, error)
        self.reactor._selectables = {s.fileno(): s for s in selectables}
        self.reactor._reads = {s.fileno() for s in selectables}
        self.reactor.doIteration(timeout)
        return poller

    def test_iteration_is_the_lean_poll(self):
        """
        The reactor loop (C{doIteration}) runs L{GatewayReactor.doPoll}, not
        the base class's (which C{EPollReactor} binds at class creation).
        """
        self.assertIs(GatewayReactor.doIteration, GatewayReactor.doPoll)

    def test_read_and_write_events_dispatched(self):
        """
        A readable socket gets C{doRead}, a writable one C{doWrite}; no log
        prefix is asked for; the poll waits the given timeout for at most
        one event per selectable.
        """
        reader, writer = _Selectable(101), _Selectable(102)
        poller = self._poll([reader, writer], [(101, select.EPOLLIN), (102, select.EPOLLOUT)])
        self.assertEqual((reader.reads, reader.writes), (1, 0))
        self.assertEqual((writer.reads, writer.writes), (0, 1))
        self.assertEqual(poller.polled, [(0.5, 2)])

    def test_no_timeout_waits_indefinitely(self):
        """
        A timeout of L{None} polls with -1 (block until an event).
        """
        poller = self._poll([], [], timeout=None)
        self.assertEqual(poller.polled, [(-1, 0)])

    def test_unknown_fd_skipped(self):
        """
        An event for a descriptor removed earlier in the same iteration is
        ignored; the others are still handled.
        """
        known = _Selectable(103)
        self._poll([known], [(999, select.EPOLLIN), (103, select.EPOLLIN)])
        self.assertEqual(known.reads, 1)

    def test_failing_handler_logged_and_disconnected(self):
        """
        A handler that raises is logged and its selectable disconnected,
        and the next ready socket is still served.
        """
        broken, fine = _Selectable(104, fail=True), _Selectable(105)
        self._poll([broken, fine], [(104, select.EPOLLIN), (105, select.EPOLLIN)])
        self.assertEqual(len(self.flushLoggedErrors(ValueError)), 1)
        self.assertEqual(len(broken.lost), 1)
        self.assertEqual(fine.reads, 1)
        self.assertEqual(fine.lost, [])

    def test_failing_disconnect_isolated(self):
        """
        A selectable whose C{connectionLost} raises (which
        C{_doReadOrWrite} does not catch) is logged and taken out of the
        reactor, and the events after it in the same poll batch are still
        served in that iteration, as C{log.callWithLogger} ensures in
        Twisted's own loop.
        """
        first, broken, last = _Selectable(107), _Selectable(108, fail_lost=True), _Selectable(109)
        events = [(107, select.EPOLLIN), (108, select.EPOLLHUP), (109, select.EPOLLIN)]
        logged = []
        globalLogPublisher.addObserver(logged.append)
        self.addCleanup(globalLogPublisher.removeObserver, logged.append)
        self._poll([first, broken, last], events)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        failures = [e for e in logged if "log_failure" in e]
        self.assertEqual([e.get("prefix") for e in failures], ["Selectable-108"])
        self.assertEqual((first.reads, last.reads), (1, 1))
        self.assertEqual(len(broken.lost), 1)
        self.assertNotIn(108, self.reactor._reads)
        self.assertNotIn(108, self.reactor._selectables)

    def test_failing_half_close_dropped(self):
        """
        A half-closeable selectable whose C{readConnectionLost} raises at
        the end of its input (C{_disconnectSelectable} has removed it as a
        reader only) is taken out of the reactor as a writer too, so that
        it is not polled again.
        """

        @implementer(IHalfCloseableDescriptor)
        class HalfCloseable(_Selectable):
            def readConnectionLost(self, reason):
                raise RuntimeError("readConnectionLost broke")

        broken = HalfCloseable(112)
        self.reactor._selectables = {112: broken}
        self.reactor._reads = {112}
        self.reactor._writes = {112}
        self.reactor._poller = _Poller([(112, select.EPOLLHUP)])
        self.reactor.doIteration(0)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.assertNotIn(112, self.reactor._reads)
        self.assertNotIn(112, self.reactor._writes)
        self.assertNotIn(112, self.reactor._selectables)

    def test_failing_handler_and_disconnect_isolated(self):
        """
        A handler that raises and whose C{connectionLost} raises too is
        logged once per error and does not cut the batch short.
        """
        broken, fine = _Selectable(110, fail=True, fail_lost=True), _Selectable(111)
        self._poll([broken, fine], [(110, select.EPOLLIN), (111, select.EPOLLIN)])
        self.assertEqual(len(self.flushLoggedErrors(ValueError)), 1)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.assertEqual(fine.reads, 1)

    def test_hangup_reported_as_connection_done(self):
        """
        A hang-up without data on a reading socket ends it cleanly.
        """
        closed = _Selectable(106)
        self._poll([closed], [(106, select.EPOLLHUP)])
        self.assertEqual(closed.reads, 0)
        self.assertEqual(len(closed.lost), 1)
        closed.lost[0].trap(ConnectionDone)

    def test_interrupted_poll_returns(self):
        """
        A poll interrupted by a signal (EINTR) ends the iteration quietly;
        any other poll error is raised.
        """
        self._poll([], [], error=OSError(errno.EINTR, "interrupted"))
        self.assertRaises(OSError, self._poll, [], [], OSError(errno.EBADF, "bad"))

    def test_real_socket_round_trip(self):
        """
        On real sockets, a readable socket's C{doRead} runs when the
        reactor iterates.
        """
        left, right = socket.socketpair()
        self.addCleanup(left.close)
        self.addCleanup(right.close)
        reactor = GatewayReactor()
        self.addCleanup(reactor._poller.close)
        self.addCleanup(reactor.waker.connectionLost, None)
        got = []

        class Reader(_Selectable):
            def doRead(self):
                got.append(right.recv(100))

        reader = Reader(right.fileno())
        reactor.addReader(reader)
        left.send(b"ping")
        reactor.doIteration(1)
        self.assertEqual(got, [b"ping"])
        reactor.removeReader(reader)


class InstallTests(SynchronousTestCase):
    """
    L{event_loop.install} never replaces a reactor already installed.
    """

    def test_leaves_installed_reactor(self):
        """
        With a reactor installed (trial's), L{install} does nothing and says
        so.
        """
        from twisted.internet import reactor

        before = sys.modules["twisted.internet.reactor"]
        self.assertIs(before, reactor)
        self.assertFalse(event_loop.install())
        self.assertIs(sys.modules["twisted.internet.reactor"], before)

    def test_installs_when_none_is(self):
        """
        In a fresh process L{install} installs L{GatewayReactor}, and the
        global reactor imported afterwards is it.
        """
        code = (
            "from dheera_tx import event_loop; print(event_loop.install()); "
            "from twisted.internet import reactor; print(type(reactor).__name__)"
        )
        out = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT, timeout=30
        ).stdout.split()
        self.assertEqual(out, ["True", "GatewayReactor"])

    def test_tap_import_leaves_reactor_choice(self):
        """
        Importing L{dheera_tx.tap} (what twistd does to read the plugin's
        options) neither installs nor imports a reactor: the choice is
        made in C{makeService}.
        """
        code = "import sys, dheera_tx.tap; print('twisted.internet.reactor' in sys.modules)"
        out = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT, timeout=30
        ).stdout.split()
        self.assertEqual(out, ["False"])


class ReactorLogTests(SynchronousTestCase):
    """
    L{event_loop.log_reactor} says which reactor runs and why.
    """

    def setUp(self):
        self.logged = []
        globalLogPublisher.addObserver(self.logged.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.logged.append)

    def _lines(self):
        from twisted.logger import formatEvent

        return [(e["log_level"].name, formatEvent(e)) for e in self.logged if e.get("log_namespace") == "dheera_tx.event_loop"]

    def test_gateway_reactor(self):
        """
        On L{GatewayReactor}: one info line naming it.
        """
        reactor = GatewayReactor()
        self.addCleanup(reactor._poller.close)
        self.addCleanup(reactor.waker.connectionLost, None)
        event_loop.log_reactor(reactor, None)
        self.assertEqual(
            self._lines(), [("info", "Event loop: dheera_tx.event_loop.GatewayReactor (installed by the dheera plugin)")]
        )

    def test_chosen_reactor(self):
        """
        On a reactor chosen with C{--reactor}: an info line naming it and
        the choice.
        """
        from twisted.internet.testing import MemoryReactor

        event_loop.log_reactor(MemoryReactor(), "epoll")
        self.assertEqual(
            self._lines(), [("info", "Event loop: twisted.internet.testing.MemoryReactor, chosen with --reactor=epoll")]
        )

    def test_unasked_reactor_warned(self):
        """
        On another reactor nobody chose: a warning naming it.
        """
        from twisted.internet.testing import MemoryReactor

        event_loop.log_reactor(MemoryReactor(), None)
        [(level, text)] = self._lines()
        self.assertEqual(level, "warn")
        self.assertIn("Event loop: twisted.internet.testing.MemoryReactor, not dheera_tx.event_loop.GatewayReactor", text)
        self.assertIn("imported twisted.internet.reactor first", text)

    def test_chosen_name(self):
        """
        The chosen name is read from the runner's options: twistd's
        C{reactor} key, C{twist}'s C{reactorName} (whose default is no
        choice); plugin options without a parent chose nothing.
        """

        class Options(dict):
            pass

        plugin = Options()
        self.assertIsNone(event_loop.chosen_reactor(plugin))
        for parent, name in [
            ({"reactor": None}, None),
            ({"reactor": "epoll"}, "epoll"),
            ({"reactorName": "default", "reactor": object()}, None),
            ({"reactorName": "poll", "reactor": object()}, "poll"),
        ]:
            plugin.parent = parent
            self.assertEqual(event_loop.chosen_reactor(plugin), name)


class TwistdReactorTests(SynchronousTestCase):
    """
    C{twistd dheera} in a real process: the plugin installs
    L{GatewayReactor} unless a reactor was chosen or already installed,
    and logs which one runs.
    """

    def _twistd(self, prelude: str = "", twistd_options=()):
        """
        Start C{twistd -n [twistd_options] dheera} after running
        C{prelude}, wait until it logged its event loop, and stop it.

        :return: its output.
        """
        directory = tempfile.mkdtemp(prefix="dr", dir="/tmp")
        self.addCleanup(shutil.rmtree, directory, True)
        config = os.path.join(directory, "proxy.yaml")
        with open(config, "w") as f:
            yaml.safe_dump(
                {
                    "model_list": [{"model_name": "m", "dheera_ai_params": {"model": "hosted_vllm/x", "api_base": "http://127.0.0.1:9"}}],
                    "general_settings": {"master_key": "sk-test-master"},
                },
                f,
            )
        command = twistd_command(config, "--listen", "tcp:0:interface=127.0.0.1")
        # [python, -c, code, -n, --pidfile=, dheera, ...]
        command[2] = prelude + command[2]
        command[5:5] = list(twistd_options)
        log_path = os.path.join(directory, "out.log")
        env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
        with open(log_path, "wb") as log:
            process = subprocess.Popen(command, cwd=directory, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.addCleanup(_kill_group, process)
        deadline = time.monotonic() + 60
        text = ""
        while time.monotonic() < deadline and process.poll() is None:
            with open(log_path, "rb") as f:
                text = f.read().decode("utf-8", "replace")
            if "Event loop:" in text and "reactor class:" in text:
                break
            time.sleep(0.05)
        process.send_signal(signal.SIGTERM)
        process.wait(30)
        with open(log_path, "rb") as f:
            return f.read().decode("utf-8", "replace")

    def test_plugin_installs_gateway_reactor(self):
        """
        Without C{--reactor}, the plugin installs L{GatewayReactor} and says
        so.
        """
        text = self._twistd()
        self.assertIn("reactor class: dheera_tx.event_loop.GatewayReactor", text)
        self.assertIn("Event loop: dheera_tx.event_loop.GatewayReactor (installed by the dheera plugin)", text)
        self.assertNotIn("[-] Event loop", text.replace("[dheera_tx.event_loop#info] Event loop", ""))

    def test_explicit_reactor_kept(self):
        """
        C{twistd -r epoll dheera} runs on Twisted's epoll reactor, logged as
        a choice, not as a warning.
        """
        text = self._twistd(twistd_options=["-r", "epoll"])
        self.assertIn("reactor class: twisted.internet.epollreactor.EPollReactor", text)
        self.assertIn("[dheera_tx.event_loop#info] Event loop: twisted.internet.epollreactor.EPollReactor, chosen with --reactor=epoll", text)
        self.assertNotIn("dheera_tx.event_loop#warn", text)

    def test_reactor_imported_first_warned(self):
        """
        When something imported the global reactor before the plugin ran,
        the proxy runs on that reactor and warns, naming it.
        """
        text = self._twistd(prelude="import twisted.internet.reactor; ")
        self.assertIn("reactor class: twisted.internet.epollreactor.EPollReactor", text)
        self.assertIn(
            "[dheera_tx.event_loop#warn] Event loop: twisted.internet.epollreactor.EPollReactor, "
            "not dheera_tx.event_loop.GatewayReactor",
            text,
        )


def _kill_group(process) -> None:
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except OSError:
        pass
    process.wait(10)
