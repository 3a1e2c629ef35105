"""
Waiting in real time in integration tests, without depending on timing
luck: wait for a condition (with a generous deadline) instead of sleeping
for a guessed time, and check that a value stays bounded instead of frozen.

Every helper polls on the global reactor, so the reactor keeps running the
code under test while the test waits.  Deadlines are generous on purpose:
they only decide how long a broken build takes to fail, never whether a
working one passes, so they must hold on a loaded 2-core machine.
"""

from collections.abc import Callable
from typing import TypeVar

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater

T = TypeVar("T")


def sleep(seconds: float) -> Deferred:
    """
    :return: a Deferred firing after C{seconds} of real time.
    """
    return deferLater(reactor, seconds, lambda: None)


async def poll(condition: Callable[[], bool], timeout: float = 5.0, interval: float = 0.01) -> bool:
    """
    Check C{condition} every C{interval} seconds of real time for up to
    C{timeout} seconds.

    :return: whether it came true.
    """
    deadline = reactor.seconds() + timeout
    while not condition():
        if reactor.seconds() > deadline:
            return False
        await sleep(interval)
    return True


async def wait_until(ready: Callable[[], bool], timeout: float = 5.0, interval: float = 0.01) -> None:
    """
    Poll C{ready} until it is true; fail after C{timeout} seconds.
    """
    if not await poll(ready, timeout, interval):
        raise AssertionError(f"condition not reached within {timeout:g} s")


async def settled(read: Callable[[], T], quiet: float = 0.3, timeout: float = 20.0, interval: float = 0.02) -> T:
    """
    Wait until C{read()} has not changed for C{quiet} seconds (a producer
    that came to rest, a counter that stopped moving); fail after
    C{timeout} seconds.

    :return: the settled value.
    """
    value = read()
    since = started = reactor.seconds()
    while reactor.seconds() - since < quiet:
        if reactor.seconds() - started > timeout:
            raise AssertionError(f"value still changing after {timeout:g} s: {value!r}")
        await sleep(interval)
        now = read()
        if now != value:
            value, since = now, reactor.seconds()
    return value


async def stays_below(read: Callable[[], float], bound: float, seconds: float, interval: float = 0.02) -> float:
    """
    Sample C{read()} for C{seconds} of real time and fail as soon as it
    reaches C{bound}: what a paused producer has written may still grow a
    little (the kernel takes another piece as its buffers drain) but must
    stay bounded.

    :return: the largest value seen.
    """
    largest = read()
    deadline = reactor.seconds() + seconds
    while True:
        if largest >= bound:
            raise AssertionError(f"{largest!r} reached the bound {bound!r}")
        if reactor.seconds() > deadline:
            return largest
        await sleep(interval)
        largest = max(largest, read())
