"""
Where the proxy listens: C{--listen} endpoint strings, read by Twisted's own
parser, which of them only this machine can reach, the default listener,
and the rule that the shipped example master key never listens beyond it.

Twisted's endpoint syntax separates fields with colons, so an IPv6 address
is written with escaped colons (C{tcp:4000:interface=\\:\\:1}); an
unescaped one (C{interface=::1}) is an error, never a silent bind to every
interface.
"""

import ipaddress
import sys
from typing import Iterable, List, Optional

import attr
from twisted.internet import endpoints

# The master key in the shipped conf/proxy.yaml: public, so a proxy using it
# must not be reachable from other machines.
EXAMPLE_MASTER_KEY = "sk-dheera-change-me"
DEFAULT_PORT = 4000
ALLOW_EXAMPLE_KEY_OPTION = "--allow-example-key"


class ListenerError(Exception):
    """
    A C{--listen} string cannot be used; C{str()} is one line.
    """


@attr.s(frozen=True, slots=True, auto_attribs=True)
class Listener:
    """
    One parsed C{--listen} endpoint.

    :ivar description: the endpoint string as given.
    :ivar kind: C{TCP}, C{SSL}, C{UNIX}, C{TCP6}, or another endpoint
        plugin's prefix in capitals.
    :ivar port: the TCP port, or L{None}.
    :ivar interface: the address bound (empty: every IPv4 interface).
    :ivar path: the unix socket path, or L{None}.
    :ivar mode: the unix socket's permission bits.
    :ivar backlog: the listen queue length if the string gives one, else
        L{None}.
    """

    description: str
    kind: str
    port: Optional[int] = None
    interface: str = ""
    path: Optional[str] = None
    mode: int = 0o666
    backlog: Optional[int] = None

    @property
    def local(self) -> bool:
        """
        Whether only this machine can connect: a unix socket, or TCP bound
        to a loopback address.  Every other endpoint (all interfaces, a
        host name, an inherited systemd socket) counts as exposed.
        """
        if self.kind == "UNIX":
            return True
        if self.kind not in ("TCP", "SSL", "TCP6"):
            return False
        if self.interface == "localhost":
            return True
        try:
            address = ipaddress.ip_address(self.interface.split("%", 1)[0])
        except ValueError:
            return False
        mapped = getattr(address, "ipv4_mapped", None)
        return address.is_loopback or (mapped is not None and mapped.is_loopback)


def parse_listener(reactor, description: str) -> Listener:
    """
    Read a C{--listen} string with Twisted's parser (the one
    C{serverFromString} uses, so what is checked here is what listens).

    :raise ListenerError: the string is not a usable endpoint.
    """
    try:
        endpoints.serverFromString(reactor, description)
        # Private, but the only way to read the parsed fields back: the
        # public API returns an endpoint whose fields are private too.
        kind, args, options = endpoints._parseServer(description, None)
        given = endpoints._parse(description)[1]
    except TypeError:
        raise ListenerError(
            f"cannot listen on {description!r}: unknown or repeated option (a colon inside a value, "
            "as in an IPv6 address, must be escaped: tcp:4000:interface=\\:\\:1)"
        ) from None
    except Exception as e:
        raise ListenerError(f"cannot listen on {description!r}: {e}") from None
    backlog = int(given["backlog"]) if "backlog" in given else None
    if kind in ("TCP", "SSL"):
        return Listener(description, kind, port=args[0], interface=options["interface"], backlog=backlog)
    if kind == "UNIX":
        return Listener(description, kind, path=args[0], mode=options["mode"], backlog=backlog)
    prefix = getattr(kind, "prefix", "?").upper()
    if prefix == "TCP6":
        return Listener(description, prefix, port=int(args[0]), interface=given.get("interface", "::"), backlog=backlog)
    return Listener(description, prefix, backlog=backlog)


def default_listener(master_key: Optional[str]) -> str:
    """
    :return: the endpoint used without C{--listen}: port 4000 on every
        interface, or on loopback only while the master key is the shipped
        example (so the README's first command works, and is safe, as is).
    """
    if master_key == EXAMPLE_MASTER_KEY:
        return f"tcp:{DEFAULT_PORT}:interface=127.0.0.1"
    return f"tcp:{DEFAULT_PORT}"


def exposure_problem(master_key: Optional[str], listeners: Iterable[Listener]) -> Optional[str]:
    """
    :return: why the proxy must not start (one line), or L{None}: the
        master key is the shipped example and a listener is reachable from
        other machines.
    """
    if master_key != EXAMPLE_MASTER_KEY:
        return None
    exposed = [listener.description for listener in listeners if not listener.local]
    if not exposed:
        return None
    return (
        f"refusing to listen on {', '.join(exposed)}: the master key is the public example "
        f"{EXAMPLE_MASTER_KEY} from conf/proxy.yaml; set general_settings.master_key (or "
        f"DHEERA_AI_MASTER_KEY) to a secret of your own, listen on 127.0.0.1 or a unix socket, "
        f"or pass {ALLOW_EXAMPLE_KEY_OPTION} to expose it anyway"
    )


def checked_listeners(reactor, descriptions: List[str], master_key: Optional[str], allow_example_key: bool) -> List[Listener]:
    """
    Parse every C{--listen} string and apply the example-key rule; stop
    start-up with one line on a problem.

    :return: the parsed listeners.
    """
    try:
        listeners = [parse_listener(reactor, d) for d in descriptions]
    except ListenerError as e:
        sys.exit(str(e))
    problem = None if allow_example_key else exposure_problem(master_key, listeners)
    if problem is not None:
        sys.exit(problem)
    return listeners
