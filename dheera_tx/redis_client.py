"""
The proxy's connection to Redis: every call bounded in time.

txredisapi does the protocol work; this module adds what the proxy needs on
top of it:

* L{parse_database_url} turns C{general_settings.database_url} into a
  L{RedisAddress}, with errors that never repeat the password.
* L{RedisClient} sends commands over a lazy pool of connections.  Every call
  is bounded by a timeout (1 s by default) and fails with L{RedisUnavailable}
  when Redis is down, slow or unreachable: txredisapi alone would wait
  forever for a connection that is not coming back.  Connections are
  re-established within about a second of Redis returning.
* L{RedisClient.eval} runs Lua scripts with EVALSHA, falling back to EVAL
  when the server does not know the script (after a restart, say).
* L{RedisClient.subscribe} keeps a pub/sub subscription on a connection of
  its own, re-subscribes after an outage, checks the connection with a PING
  twice a second and reports when it goes up or down, so that a cache kept
  consistent by it knows when it cannot be trusted.

Replies are decoded as UTF-8 text (C{charset="utf-8"}), numbers are never
converted (C{convertNumbers=False}): a bulk reply is a L{str}, an integer
reply an L{int}, a nil reply L{None}.  Redis Cluster is not supported.
"""

import hashlib
from typing import Callable, List, Optional, Sequence, Tuple
from urllib.parse import parse_qs, unquote, urlsplit

import attr
import txredisapi
from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import HostnameEndpoint, UNIXClientEndpoint
from twisted.internet.ssl import Certificate, CertificateOptions, optionsForClientTLS
from twisted.logger import Logger

log = Logger()

DEFAULT_TIMEOUT = 1.0
SCHEMES = ("redis", "rediss", "unix", "redis+sentinel")


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


@attr.s(frozen=True, slots=True, auto_attribs=True)
class RedisAddress:
    """
    Where Redis is and how to talk to it, parsed from a database URL.

    :ivar kind: C{"tcp"}, C{"tls"}, C{"unix"} or C{"sentinel"}.
    :ivar host: server host name or address (tcp, tls).
    :ivar port: server port (tcp, tls).
    :ivar path: the unix socket's path (unix).
    :ivar db: the database number to SELECT.
    :ivar username: ACL user name, or L{None}.
    :ivar password: the password, or L{None}; never part of C{repr}.
    :ivar verify_tls: check the server certificate (tls).
    :ivar ca_certs: a PEM file of the CA to trust instead of the system's
        (tls).
    :ivar sentinels: C{(host, port)} of each Sentinel (sentinel).
    :ivar master_name: the name Sentinel knows the master by (sentinel).
    """

    kind: str
    host: Optional[str] = None
    port: Optional[int] = None
    path: Optional[str] = None
    db: int = 0
    username: Optional[str] = None
    password: Optional[str] = attr.ib(default=None, repr=False)
    verify_tls: bool = True
    ca_certs: Optional[str] = None
    sentinels: Tuple[Tuple[str, int], ...] = ()
    master_name: Optional[str] = None


def redact_url(url: str) -> str:
    """
    :return: C{url} with the password (if any) replaced by C{***}.
    """
    scheme, sep, rest = url.partition("://")
    if not sep:
        return "<not a URL>"
    netloc, slash, tail = rest.partition("/")
    userinfo, at, hosts = netloc.rpartition("@")
    if at and ":" in userinfo:
        netloc = userinfo.split(":", 1)[0] + ":***@" + hosts
    return f"{scheme}://{netloc}{slash}{tail}"


def parse_database_url(url: str) -> RedisAddress:
    """
    Parse a Redis database URL.  The accepted forms are::

        redis://[[user]:password@]host[:port][/db]     plain TCP (port 6379, db 0)
        rediss://[[user]:password@]host[:port][/db]    TLS; ?ssl_ca_certs=/path/ca.pem
                                                       trusts that CA instead of the
                                                       system's, ?ssl_cert_reqs=none
                                                       skips certificate checks
        unix:///path/to/redis.sock[?db=N]              unix socket
        unix://[user]:password@/path/to/redis.sock[?db=N]
        redis+sentinel://[:password@]host1:port1,host2:port2/<master_name>[/<db>]
                                                       Sentinel (port 26379 by
                                                       default); the password is
                                                       the master's, the
                                                       Sentinels are asked
                                                       without one

    Special characters in a password are percent-encoded (C{%40} for C{@}).

    :param url: the URL.
    :return: the parsed address.
    :raise ValueError: for anything else, with a message that names the
        problem and never contains the password.
    """
    if not isinstance(url, str) or "://" not in url:
        raise ValueError(
            "database_url must look like redis://host:port/db, rediss://..., "
            "unix:///path/to/redis.sock or redis+sentinel://host:port/master_name"
        )
    shown = redact_url(url)
    scheme = url.split("://", 1)[0].lower()
    if scheme not in SCHEMES:
        raise ValueError(
            f"database_url {shown}: unsupported scheme {scheme!r}; use one of "
            + ", ".join(s + "://" for s in SCHEMES)
        )
    try:
        parts = urlsplit(url)
    except ValueError as e:
        raise ValueError(f"database_url {shown}: {e}") from None
    userinfo, at, hostinfo = parts.netloc.rpartition("@")
    username, password = _credentials(userinfo) if at else (None, None)
    query = parse_qs(parts.query, keep_blank_values=True)

    if scheme == "unix":
        if hostinfo:
            raise ValueError(f"database_url {shown}: a unix:// URL has no host; write unix:///path/to/redis.sock")
        path = unquote(parts.path)
        if not path.startswith("/") or path == "/":
            raise ValueError(f"database_url {shown}: the socket path must be absolute")
        db = _db(query.get("db", ["0"])[-1], shown)
        return RedisAddress(kind="unix", path=path, db=db, username=username, password=password)

    if scheme == "redis+sentinel":
        sentinels = tuple(_host_port(h, 26379, shown) for h in hostinfo.split(","))
        segments = [unquote(s) for s in parts.path.split("/")[1:]]
        if segments and segments[-1] == "":
            segments.pop()
        if not segments or not segments[0] or len(segments) > 2:
            raise ValueError(
                f"database_url {shown}: write redis+sentinel://host:port[,host:port...]/<master_name>[/<db>]"
            )
        db = _db(segments[1], shown) if len(segments) == 2 else 0
        return RedisAddress(
            kind="sentinel",
            sentinels=sentinels,
            master_name=segments[0],
            db=db,
            username=username,
            password=password,
        )

    host, port = _host_port(hostinfo, 6379, shown)
    path = parts.path.strip("/")
    db = _db(path, shown) if path else 0
    verify, ca_certs = True, None
    if scheme == "rediss":
        reqs = query.get("ssl_cert_reqs", ["required"])[-1].lower()
        if reqs not in ("required", "none"):
            raise ValueError(f"database_url {shown}: ssl_cert_reqs must be 'required' or 'none'")
        verify = reqs == "required"
        ca_certs = query.get("ssl_ca_certs", [None])[-1] or None
    return RedisAddress(
        kind="tls" if scheme == "rediss" else "tcp",
        host=host,
        port=port,
        db=db,
        username=username,
        password=password,
        verify_tls=verify,
        ca_certs=ca_certs,
    )


def _credentials(userinfo: str) -> Tuple[Optional[str], Optional[str]]:
    # As in redis-py: user@ is a user name alone, :password@ a password.
    user, _, password = userinfo.partition(":")
    return unquote(user) or None, unquote(password) or None


def _host_port(hostinfo: str, default_port: int, shown: str) -> Tuple[str, int]:
    if hostinfo.startswith("["):
        host, bracket, rest = hostinfo[1:].partition("]")
        if not bracket or (rest and not rest.startswith(":")):
            raise ValueError(f"database_url {shown}: bad IPv6 address")
        port_text = rest[1:] if rest else ""
    else:
        host, _, port_text = hostinfo.partition(":")
    if not host:
        raise ValueError(f"database_url {shown}: no host")
    if not port_text:
        return host, default_port
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ValueError(f"database_url {shown}: port must be a number from 1 to 65535")
    return host, int(port_text)


def _db(text: str, shown: str) -> int:
    if not text.isdigit():
        raise ValueError(f"database_url {shown}: the database must be a number (e.g. /0)")
    return int(text)


# Error replies that mean "not now" rather than "wrong command".
_UNAVAILABLE_REPLIES = frozenset({"LOADING", "BUSY", "MASTERDOWN", "TRYAGAIN", "READONLY", "CLUSTERDOWN"})


def _report_connection_errors(factory):
    # txredisapi fails the factory's "connected" Deferred when AUTH or
    # SELECT is refused; nobody waits on it for a lazy pool, so log it here
    # (the message never holds the password) instead of leaving an
    # unhandled error.  Such a pool stops reconnecting: calls then fail
    # with RedisUnavailable.
    def report(failure):
        log.error("Redis refused the connection: {error}", error=failure.getErrorMessage())

    factory.deferred.addErrback(report)
    return factory


class _RedisFactory(txredisapi.RedisFactory):
    # Reconnect quickly: with the default 10 s back-off a Redis restart
    # looks like a ten-second outage.
    initialDelay = 0.1
    maxDelay = 1.0


class _SentinelFactory(txredisapi.SentinelConnectionFactory):
    maxDelay = 1.0


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
        self._shas = {}
        self._waiters: List[Deferred] = []
        self._peeking = False
        self._wake_call = None
        self._next = 0
        self._closed = False
        self._subscriptions: List["Subscription"] = []
        self._sentinel = None
        self._factory = self._start_pool(poolsize)

    def _common(self) -> dict:
        return dict(
            charset="utf-8",
            password=self.address.password,
            username=self.address.username,
            convertNumbers=False,
        )

    def _start_pool(self, poolsize: int):
        if self.address.kind == "sentinel":
            self._sentinel = txredisapi.Sentinel(
                list(self.address.sentinels), charset="utf-8", convertNumbers=False
            )
            handler = self._sentinel.master_for(
                self.address.master_name,
                factory_class=_SentinelFactory,
                dbid=self.address.db,
                poolsize=poolsize,
                isLazy=True,
                replyTimeout=max(5.0, self.timeout * 5),
                **self._common(),
            )
            return _report_connection_errors(handler._factory)
        factory = _RedisFactory(
            None,
            self.address.db,
            poolsize,
            isLazy=True,
            replyTimeout=max(5.0, self.timeout * 5),
            **self._common(),
        )
        _report_connection_errors(factory)
        factory.startConnecting(self._endpoint())
        return factory

    def _endpoint(self):
        a = self.address
        if a.kind == "unix":
            return UNIXClientEndpoint(self._reactor, a.path, timeout=self.timeout)
        endpoint = HostnameEndpoint(self._reactor, a.host, a.port, timeout=self.timeout)
        if a.kind == "tls":
            if not a.verify_tls:
                creator = CertificateOptions(verify=False)
            elif a.ca_certs:
                try:
                    with open(a.ca_certs, "rb") as f:
                        root = Certificate.loadPEM(f.read())
                except Exception as e:
                    raise ValueError(f"database_url: cannot load ssl_ca_certs {a.ca_certs}: {e}") from None
                creator = optionsForClientTLS(a.host, trustRoot=root)
            else:
                creator = optionsForClientTLS(a.host)
            endpoint = txredisapi._TLSEndpoint(endpoint, creator)
        return endpoint

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
        waiter = Deferred(lambda d: self._waiters.remove(d) if d in self._waiters else None)
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
    ) -> "Subscription":
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
        subscription = Subscription(self._reactor, channel, callback, on_state, heartbeat)
        if self.address.kind == "sentinel":
            handler = self._sentinel.master_for(
                self.address.master_name,
                factory_class=_SentinelSubscriberFactory,
                poolsize=1,
                isLazy=True,
                **self._common(),
            )
            factory = _report_connection_errors(handler._factory)
        else:
            factory = _report_connection_errors(_SubscriberFactory(None, None, 1, isLazy=True, **self._common()))
            factory.startConnecting(self._endpoint())
        factory.subscription = subscription
        subscription._factory = factory
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


class _SubscriberProtocol(txredisapi.SubscriberProtocol):
    def messageReceived(self, pattern, channel, message):
        self.factory.subscription._message(message)

    def connectionLost(self, why):
        txredisapi.SubscriberProtocol.connectionLost(self, why)
        self.factory.subscription._lost(self)


class _SentinelSubscriberProtocol(_SubscriberProtocol, txredisapi.SentinelRedisProtocol):
    pass


class _SubscriberMixin:
    subscription = None

    def buildProtocol(self, addr):
        p = super().buildProtocol(addr)
        p.whenConnected().addCallback(self.subscription._ready)
        return p


class _SubscriberFactory(_SubscriberMixin, _RedisFactory):
    protocol = _SubscriberProtocol


class _SentinelSubscriberFactory(_SubscriberMixin, _SentinelFactory):
    protocol = _SentinelSubscriberProtocol


class Subscription:
    """
    A live subscription to one channel, made by L{RedisClient.subscribe}.

    :ivar active: whether the channel is subscribed right now (a message
        published while this is L{False} may be missed).
    """

    def __init__(self, reactor, channel, callback, on_state, heartbeat):
        self._reactor = reactor
        self.channel = channel
        self._callback = callback
        self._on_state = on_state
        self._heartbeat = heartbeat
        self._factory = None
        self._protocol = None
        self._ping_pending = False
        self._timer = None
        self._stopped = False
        self._waiting: List[Deferred] = []
        self.active = False

    def whenActive(self) -> Deferred:
        """
        :return: a Deferred that fires once the channel is subscribed.
        """
        if self.active:
            return defer.succeed(self)
        d = Deferred()
        self._waiting.append(d)
        return d

    def stop(self) -> Deferred:
        """
        Unsubscribe and close the connection for good.
        """
        if self._stopped:
            return defer.succeed(None)
        self._stopped = True
        self._cancel_timer()
        self._set_active(False)
        return self._factory.disconnect()

    def _ready(self, protocol):
        if self._stopped:
            return
        self._protocol = protocol
        d = protocol.subscribe(self.channel)
        d.addCallbacks(lambda _: self._subscribed(protocol), lambda f: self._drop(protocol, f))

    def _subscribed(self, protocol):
        if self._stopped or protocol is not self._protocol:
            return
        self._ping_pending = False
        self._set_active(True)
        self._schedule()
        waiting, self._waiting = self._waiting, []
        for d in waiting:
            d.callback(self)

    def _drop(self, protocol, failure=None):
        if failure is not None:
            log.warn("Redis subscription to {channel} failed: {error}", channel=self.channel, error=failure.getErrorMessage())
        protocol.transport.abortConnection()

    def _schedule(self):
        self._cancel_timer()
        self._timer = self._reactor.callLater(self._heartbeat, self._beat)

    def _cancel_timer(self):
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def _beat(self):
        self._timer = None
        protocol = self._protocol
        if protocol is None or self._stopped:
            return
        if self._ping_pending:
            log.warn("Redis subscription to {channel} stopped answering; reconnecting", channel=self.channel)
            self._set_active(False)
            protocol.transport.abortConnection()
            return
        self._ping_pending = True
        try:
            d = protocol.execute_command("PING", apply_timeout=False)
        except txredisapi.ConnectionError:
            return
        d.addCallbacks(lambda _: self._pong(protocol), lambda f: None)
        self._schedule()

    def _pong(self, protocol):
        if protocol is self._protocol:
            self._ping_pending = False

    def _lost(self, protocol):
        if protocol is self._protocol:
            self._protocol = None
            self._cancel_timer()
            self._set_active(False)

    def _message(self, message):
        try:
            self._callback(message)
        except Exception:
            log.failure("Error handling a message on {channel}", channel=self.channel)

    def _set_active(self, active: bool):
        if active == self.active:
            return
        self.active = active
        if self._on_state is not None:
            try:
                self._on_state(active)
            except Exception:
                log.failure("Error in the state callback of {channel}", channel=self.channel)


def connect(reactor, url: str, timeout: float = DEFAULT_TIMEOUT) -> RedisClient:
    """
    Make a client for the Redis at C{url} (connections are made lazily).

    :param reactor: the reactor.
    :param url: a database URL, see L{parse_database_url}.
    :raise ValueError: for a bad URL.
    """
    return RedisClient(reactor, parse_database_url(url), timeout=timeout)
