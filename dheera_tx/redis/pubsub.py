"""
Redis pub/sub: a subscription to one channel, kept up across outages.

L{open_subscription} (behind L{dheera_tx.redis.client.RedisClient.subscribe})
subscribes on a connection of its own, re-subscribes after an outage,
checks the connection with a PING twice a second and reports when it goes
up or down, so that a cache kept consistent by it
(L{dheera_tx.keys.cache.CachedKeyStore}) knows when it cannot be trusted.
"""

from typing import Any, Callable, List, Optional

import txredisapi
from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.logger import Logger

from dheera_tx.redis.address import (
    QuickReconnectFactory,
    QuickReconnectSentinelFactory,
    RedisAddress,
    connection_options,
    redis_endpoint,
    report_connection_errors,
)

log = Logger()


def open_subscription(
    reactor,
    address: RedisAddress,
    sentinel: Optional[txredisapi.Sentinel],
    timeout: float,
    channel: str,
    callback: Callable[[str], None],
    on_state: Optional[Callable[[bool], None]] = None,
    heartbeat: float = 0.5,
) -> "Subscription":
    """
    Subscribe to C{channel} on a connection of its own (see
    L{dheera_tx.redis.client.RedisClient.subscribe}).

    :param reactor: the reactor.
    :param address: where Redis is.
    :param sentinel: the client's C{txredisapi.Sentinel} for a Sentinel
        address, else L{None}.
    :param timeout: seconds a connection attempt may take.
    :param channel: the channel.
    :param callback: called with each message (a L{str}).
    :param on_state: called with L{True} each time the subscription is
        (re-)established and L{False} each time it is lost.
    :param heartbeat: seconds between PINGs.
    :return: the subscription; call C{stop()} to end it.
    """
    subscription = Subscription(reactor, channel, callback, on_state, heartbeat)
    if address.kind == "sentinel":
        assert sentinel is not None  # the client makes one for a Sentinel address
        handler = sentinel.master_for(
            address.master_name,
            factory_class=_SentinelSubscriberFactory,
            poolsize=1,
            isLazy=True,
            **connection_options(address),
        )
        factory = report_connection_errors(handler._factory)
    else:
        factory = report_connection_errors(_SubscriberFactory(None, None, 1, isLazy=True, **connection_options(address)))
        factory.startConnecting(redis_endpoint(reactor, address, timeout))
    factory.subscription = subscription
    subscription._factory = factory
    return subscription


class _SubscriberProtocol(txredisapi.SubscriberProtocol):
    def messageReceived(self, pattern, channel, message):
        self.factory.subscription._message(message)

    def connectionLost(self, why):
        txredisapi.SubscriberProtocol.connectionLost(self, why)
        self.factory.subscription._lost(self)


class _SentinelSubscriberProtocol(_SubscriberProtocol, txredisapi.SentinelRedisProtocol):
    pass


class _SubscriberMixin:
    # Set on the factory before it connects.
    subscription: Any = None

    def buildProtocol(self, addr):
        p = super().buildProtocol(addr)  # type: ignore[misc]  # a mixin: the factory class comes after it
        p.whenConnected().addCallback(self.subscription._ready)
        return p


class _SubscriberFactory(_SubscriberMixin, QuickReconnectFactory):
    protocol = _SubscriberProtocol


class _SentinelSubscriberFactory(_SubscriberMixin, QuickReconnectSentinelFactory):
    protocol = _SentinelSubscriberProtocol


class Subscription:
    """
    A live subscription to one channel, made by L{open_subscription}
    (through L{dheera_tx.redis.client.RedisClient.subscribe}).

    :ivar active: whether the channel is subscribed right now (a message
        published while this is L{False} may be missed).
    """

    def __init__(self, reactor, channel, callback, on_state, heartbeat):
        self._reactor = reactor
        self.channel = channel
        self._callback = callback
        self._on_state = on_state
        self._heartbeat = heartbeat
        self._factory: Any = None
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
        d: Deferred = Deferred()
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
