"""
The proxy's connection to Redis: every call bounded in time.

txredisapi does the protocol work; this module adds what the proxy needs on
top of it:

* L{RedisClient} sends commands over a lazy pool of connections.  Every call
  is bounded by a timeout (1 s by default) and fails with L{RedisUnavailable}
  when Redis is down, slow or unreachable: txredisapi alone would wait
  forever for a connection that is not coming back.  Connections are
  re-established within about a second of Redis returning.
* L{RedisClient.eval} runs Lua scripts with EVALSHA, falling back to EVAL
  when the server does not know the script (after a restart, say).
* L{RedisClient.subscribe} keeps a pub/sub subscription on a connection of
  its own (the machinery is in L{dheera_tx.redis.pubsub}).

Where Redis is (the database URL) and how a connection reaches it are in
L{dheera_tx.redis.address}.

Replies are decoded as UTF-8 text (C{charset="utf-8"}), numbers are never
converted (C{convertNumbers=False}): a bulk reply is a L{str}, an integer
reply an L{int}, a nil reply L{None}.  Redis Cluster is not supported.
"""

import hashlib
from typing import Any, Callable, Dict, List, Optional, Sequence

import txredisapi
from twisted.internet import defer
from twisted.internet.defer import Deferred

from dheera_tx.redis.address import (
    QuickReconnectFactory,
    QuickReconnectSentinelFactory,
    RedisAddress,
    connection_options,
    parse_database_url,
    redis_endpoint,
    report_connection_errors,
)
from dheera_tx.redis.pubsub import Subscription, open_subscription

DEFAULT_TIMEOUT = 1.0


class RedisError(Exception):
    """
    Base class of the errors this module raises.
    """


class RedisUnavailable(RedisError):
    """
    Redis could not be reached, or did not answer in time.
    """


class RedisCommandError(RedisError):
    """
    Redis answered with an error reply (a wrong type, a failing script, ...).
    """


# Error replies that mean "not now" rather than "wrong command".
_UNAVAILABLE_REPLIES = frozenset({"LOADING", "BUSY", "MASTERDOWN", "TRYAGAIN", "READONLY", "CLUSTERDOWN"})


class RedisClient:
    """
    Commands to one Redis server (or Sentinel-managed master), each bounded
    by C{timeout}.

    :param reactor: the reactor that times calls out.
    :param address: where Redis is.
    :param timeout: seconds a call may take, waiting for a connection
        included, before it fails with L{RedisUnavailable}.
    :param poolsize: connections in the pool; each carries pipelined calls.
    """

    def __init__(self, reactor, address: RedisAddress, timeout: float = DEFAULT_TIMEOUT, poolsize: int = 4):
        self._reactor = reactor
        self.address = address
        self.timeout = timeout
        self._shas: Dict[str, str] = {}
        self._waiters: List[Deferred] = []
        self._peeking = False
        self._wake_call = None
        self._next = 0
        self._closed = False
        self._subscriptions: List[Subscription] = []
        self._sentinel: Any = None
        self._factory = self._start_pool(poolsize)

    def _start_pool(self, poolsize: int):
        if self.address.kind == "sentinel":
            self._sentinel = txredisapi.Sentinel(
                list(self.address.sentinels), charset="utf-8", convertNumbers=False
            )
            handler = self._sentinel.master_for(
                self.address.master_name,
                factory_class=QuickReconnectSentinelFactory,
                dbid=self.address.db,
                poolsize=poolsize,
                isLazy=True,
                replyTimeout=max(5.0, self.timeout * 5),
                **connection_options(self.address),
            )
            return report_connection_errors(handler._factory)
        factory = QuickReconnectFactory(
            None,
            self.address.db,
            poolsize,
            isLazy=True,
            replyTimeout=max(5.0, self.timeout * 5),
            **connection_options(self.address),
        )
        report_connection_errors(factory)
        factory.startConnecting(redis_endpoint(self._reactor, self.address, self.timeout))
        return factory

    @property
    def connected(self) -> bool:
        """
        Whether at least one connection is up right now.
        """
        return any(c.connected for c in self._factory.pool)

    # -- calls -------------------------------------------------------------

    async def execute(self, *args):
        """
        Run one command, e.g. C{await client.execute("HGETALL", name)}.

        :return: the reply.
        :raise RedisUnavailable: Redis is down or did not answer in time.
        :raise RedisCommandError: Redis answered with an error.
        """
        return await self._bounded(self._on_connection(lambda conn: conn.execute_command(*args)))

    async def eval(self, script: str, keys: Sequence = (), args: Sequence = ()):
        """
        Run a Lua script: EVALSHA, or EVAL when the server does not have it.

        :param script: the script's source; its SHA-1 is computed once.
        :return: the script's reply.
        """
        sha = self._shas.get(script)
        if sha is None:
            sha = self._shas[script] = hashlib.sha1(script.encode("utf-8")).hexdigest()
        keys, args = tuple(keys), tuple(args)

        async def run(conn):
            try:
                return await conn.execute_command("EVALSHA", sha, len(keys), *keys, *args)
            except txredisapi.ResponseError as e:
                if not str(e).startswith("NOSCRIPT"):
                    raise
            return await conn.execute_command("EVAL", script, len(keys), *keys, *args)

        return await self._bounded(self._on_connection(run))

    async def pipeline(self, commands: Sequence[Sequence]) -> list:
        """
        Send several commands at once on one connection (not a transaction).

        :param commands: e.g. C{[("HGETALL", a), ("HGETALL", b)]}.
        :return: the replies, in order.
        :raise RedisCommandError: the first error reply, if any.
        """
        commands = [tuple(c) for c in commands]
        if not commands:
            return []

        async def run(conn):
            ds = [conn.execute_command(*c) for c in commands]
            try:
                return await defer.gatherResults(ds, consumeErrors=True)
            except defer.FirstError as e:
                e.subFailure.raiseException()

        return await self._bounded(self._on_connection(run))

    async def _on_connection(self, operation):
        conn = await self._connection()
        try:
            result = operation(conn)
            if isinstance(result, Deferred) or hasattr(result, "__await__"):
                result = await result
            return result
        except txredisapi.ConnectionError as e:
            raise RedisUnavailable(f"Redis connection failed: {e}") from None
        except txredisapi.ResponseError as e:
            if str(e).split(" ", 1)[0] in _UNAVAILABLE_REPLIES:
                raise RedisUnavailable(f"Redis cannot serve now: {e}") from None
            raise RedisCommandError(str(e)) from None

    async def _bounded(self, coroutine):
        d = Deferred.fromCoroutine(coroutine)
        timed_out = []

        def on_timeout(result, timeout):
            timed_out.append(True)
            return result

        d.addTimeout(self.timeout, self._reactor, onTimeoutCancel=on_timeout)
        try:
            return await d
        except defer.CancelledError:
            if timed_out:
                raise RedisUnavailable(f"Redis did not answer within {self.timeout:g} s") from None
            raise

    # -- the pool ----------------------------------------------------------

    def _pick(self):
        queue = self._factory.connectionQueue
        if len(queue.pending) > 2 * self._factory.poolsize:
            # txredisapi queues every new connection and nothing here takes
            # them out: drop the dead ones so reconnections do not pile up.
            queue.pending[:] = [c for c in queue.pending if c.connected]
        live = [c for c in self._factory.pool if c.connected]
        if not live:
            return None
        self._next = (self._next + 1) % len(live)
        return live[self._next]

    def _connection(self) -> Deferred:
        if self._closed:
            return defer.fail(RedisUnavailable("The Redis client is closed"))
        conn = self._pick()
        if conn is not None:
            return defer.succeed(conn)
        waiter: Deferred = Deferred(lambda d: self._waiters.remove(d) if d in self._waiters else None)
        self._waiters.append(waiter)
        self._peek()
        return waiter

    def _peek(self):
        # One outstanding peek on txredisapi's connection queue wakes every
        # waiter; a queue peek cannot be cancelled, so there is never more
        # than one.  Dead connections are pruned first, or peek would hand
        # one of them out at once.
        if self._peeking:
            return
        queue = self._factory.connectionQueue
        queue.pending[:] = [c for c in queue.pending if c.connected]
        self._peeking = True
        queue.peek().addCallback(self._connection_arrived)

    def _connection_arrived(self, conn):
        # The queue calls peekers from inside put(), before the connection
        # is in the pool and while it iterates its peekers: wake the
        # waiters on the next turn, when the pool is consistent again.
        self._peeking = False
        if not self._closed and (self._wake_call is None or not self._wake_call.active()):
            self._wake_call = self._reactor.callLater(0, self._wake)

    def _wake(self):
        self._wake_call = None
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            conn = self._pick()
            if conn is None:
                self._waiters.append(waiter)
            else:
                waiter.callback(conn)
        if self._waiters and not self._closed:
            self._peek()

    # -- pub/sub -----------------------------------------------------------

    def subscribe(
        self,
        channel: str,
        callback: Callable[[str], None],
        on_state: Optional[Callable[[bool], None]] = None,
        heartbeat: float = 0.5,
    ) -> Subscription:
        """
        Subscribe to C{channel} on a connection of its own, kept up across
        outages.

        :param callback: called with each message (a L{str}).
        :param on_state: called with L{True} each time the subscription is
            (re-)established and L{False} each time it is lost; messages
            published in between are missed.
        :param heartbeat: seconds between PINGs; a connection that leaves a
            PING unanswered for this long is dropped (reported as lost) and
            re-established.
        :return: the subscription; call C{stop()} to end it.
        """
        subscription = open_subscription(
            self._reactor, self.address, self._sentinel, self.timeout, channel, callback, on_state, heartbeat
        )
        self._subscriptions.append(subscription)
        return subscription

    def disconnect(self) -> Deferred:
        """
        Close every connection (subscriptions included); calls waiting for a
        connection fail with L{RedisUnavailable}.

        :return: a Deferred that fires once all connections are closed.
        """
        self._closed = True
        if self._wake_call is not None and self._wake_call.active():
            self._wake_call.cancel()
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            waiter.errback(RedisUnavailable("The Redis client is closed"))
        ds = [s.stop() for s in self._subscriptions]
        ds.append(self._factory.disconnect())
        if self._sentinel is not None:
            ds.append(self._sentinel.disconnect())
        return defer.gatherResults(ds, consumeErrors=True).addCallback(lambda _: None)


def connect(reactor, url: str, timeout: float = DEFAULT_TIMEOUT) -> RedisClient:
    """
    Make a client for the Redis at C{url} (connections are made lazily).

    :param reactor: the reactor.
    :param url: a database URL, see
        L{dheera_tx.redis.address.parse_database_url}.
    :raise ValueError: for a bad URL.
    """
    return RedisClient(reactor, parse_database_url(url), timeout=timeout)
