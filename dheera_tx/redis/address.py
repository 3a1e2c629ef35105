"""
Where Redis is and how to reach it.

* L{parse_database_url} turns C{general_settings.database_url} into a
  L{RedisAddress}, with errors that never repeat the password;
  L{redact_url} is the URL as it may be shown.
* L{redis_endpoint} and L{connection_options} are the endpoint and the
  txredisapi connection settings for an address; L{QuickReconnectFactory}
  and L{QuickReconnectSentinelFactory} are txredisapi's factories with a
  back-off short enough that a Redis restart is not a long outage.

Both L{dheera_tx.redis.client.RedisClient}'s pool and its pub/sub
subscriptions (L{dheera_tx.redis.pubsub}) connect through these.
"""

from typing import Any, Callable, Optional, Tuple
from urllib.parse import parse_qs, unquote, urlsplit

import attr
import txredisapi
from twisted.internet.endpoints import HostnameEndpoint, UNIXClientEndpoint
from twisted.internet.ssl import Certificate, CertificateOptions, optionsForClientTLS
from twisted.logger import Logger

log = Logger()

SCHEMES = ("redis", "rediss", "unix", "redis+sentinel")


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
    if not (port_text.isascii() and port_text.isdigit()) or not 0 < int(port_text) < 65536:
        raise ValueError(f"database_url {shown}: port must be a number from 1 to 65535")
    return host, int(port_text)


def _db(text: str, shown: str) -> int:
    if not (text.isascii() and text.isdigit()):
        raise ValueError(f"database_url {shown}: the database must be a number (e.g. /0)")
    return int(text)


# -- connecting ----------------------------------------------------------------


def redis_endpoint(reactor, address: RedisAddress, timeout: float):
    """
    :param reactor: the reactor to connect with.
    :param address: a tcp, tls or unix address (not a Sentinel one).
    :param timeout: seconds a connection attempt may take.
    :return: the client endpoint that reaches C{address}.
    :raise ValueError: C{ssl_ca_certs} cannot be loaded.
    """
    a = address
    if a.kind == "unix":
        return UNIXClientEndpoint(reactor, a.path, timeout=timeout)
    assert a.host is not None and a.port is not None  # parse_redis_url sets both for tcp and tls
    endpoint = HostnameEndpoint(reactor, a.host, a.port, timeout=timeout)
    if a.kind == "tls":
        creator: Any
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


def connection_options(address: RedisAddress) -> dict:
    """
    :return: the keyword arguments every txredisapi connection factory for
        C{address} gets: credentials, UTF-8 text replies, numbers left as
        they are.
    """
    return dict(
        charset="utf-8",
        password=address.password,
        username=address.username,
        convertNumbers=False,
    )


def report_connection_errors(factory):
    """
    Log it when Redis refuses a connection of C{factory} (AUTH or SELECT
    failed).

    :return: C{factory}.
    """
    # txredisapi fails the factory's "connected" Deferred when AUTH or
    # SELECT is refused; nobody waits on it for a lazy pool, so log it here
    # (the message never holds the password) instead of leaving an
    # unhandled error.  Such a pool stops reconnecting: calls then fail
    # with RedisUnavailable.
    def report(failure):
        log.error("Redis refused the connection: {error}", error=failure.getErrorMessage())

    factory.deferred.addErrback(report)
    return factory


class FastCommands:
    """
    Mixed into a txredisapi protocol: builds the RESP bytes of a command
    with one join, formatting C{str}, C{bytes} and C{int} arguments directly
    (txredisapi's C{_build_command} costs about 0.6 us per argument); other
    types are encoded by txredisapi as before.
    """

    # The txredisapi protocol this is mixed into provides these.
    charset: str
    errors: str
    _encode_value: Callable[..., bytes]

    def _build_command(self, *args, **kwargs) -> bytes:
        encode = self._encode_value
        charset, errors = self.charset, self.errors
        parts = [b"*%d\r\n" % len(args)]
        for arg in args:
            kind = type(arg)
            if kind is str and charset is not None:
                try:
                    value = arg.encode(charset, errors)
                except UnicodeError:
                    value = encode(arg)  # raises txredisapi's InvalidData
            elif kind is bytes:
                value = arg
            elif kind is int:
                value = b"%d" % arg
            else:
                value = encode(arg)
            parts.append(b"$%d\r\n%s\r\n" % (len(value), value))
        return b"".join(parts)


class _FastRedisProtocol(FastCommands, txredisapi.RedisProtocol):
    pass


class _FastSentinelRedisProtocol(FastCommands, txredisapi.SentinelRedisProtocol):
    pass


class QuickReconnectFactory(txredisapi.RedisFactory):
    """
    txredisapi's connection factory, reconnecting within a second.
    """

    protocol = _FastRedisProtocol

    # Reconnect quickly: with the default 10 s back-off a Redis restart
    # looks like a ten-second outage.
    initialDelay = 0.1
    maxDelay = 1.0


class QuickReconnectSentinelFactory(txredisapi.SentinelConnectionFactory):
    """
    txredisapi's factory for a Sentinel-managed master, reconnecting within
    a second.
    """

    protocol = _FastSentinelRedisProtocol
    maxDelay = 1.0
