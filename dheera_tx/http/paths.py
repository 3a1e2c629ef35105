"""
The raw-path check of the pass-through: which request targets may reach vLLM.

The upstream URL is C{api_base} + the raw bytes after C{/vllm}, so anything
that could climb out of C{api_base}, smuggle a second host, or be decoded
differently by vLLM than by the proxy is refused before the request goes
anywhere.  The check runs on the raw bytes of the request target, never on
a decoded path.

The route checks (operator routes, a key's allowed routes) read the raw
path too, so a path must not name a route in a form vLLM would decode to
another: escapes of unreserved characters (C{/sl%65ep} is C{/sleep} to
vLLM) and path parameters (C{;}, which some servers strip) are refused.
"""

import re
from typing import Optional, Tuple

PREFIX = b"/vllm"

# A percent-escape that decodes to "/", "\", or to a control byte.
_FORBIDDEN_ESCAPE = re.compile(rb"%(2f|5c|[01][0-9a-f]|7f)", re.IGNORECASE)
_ESCAPE = re.compile(rb"%([0-9a-fA-F]{2})")
_BAD_ESCAPE = re.compile(rb"%(?![0-9a-fA-F]{2})")
_CONTROL = re.compile(rb"[\x00-\x20\x7f]")
# A percent-escape of an unreserved character (RFC 3986 section 2.3:
# letters, digits, "-", ".", "_", "~"), which no client needs to escape.
_UNRESERVED_ESCAPE = re.compile(rb"%(2d|2e|5f|7e|3[0-9]|4[1-9a-f]|5[0-9a]|6[1-9a-f]|7[0-9a])", re.IGNORECASE)
_PARAMETER = re.compile(rb";|%3b", re.IGNORECASE)
# Targets that pass every check below at a glance (what clients send almost
# always): segments of letters, digits, "_" and "-" with inner dots, and a
# query with no escapes, controls or fragment.
_PLAIN_PATH = re.compile(rb"(?:/[A-Za-z0-9_\-]+(?:\.[A-Za-z0-9_\-]+)*)*/?")
_PLAIN_QUERY = re.compile(rb"(?:\?[A-Za-z0-9_\-.~=&+,:@/!$'()*]*)?")


def is_passthrough(target: bytes) -> bool:
    """
    :param target: the raw request target from the request line.
    :return: whether it addresses the vLLM pass-through (C{/vllm} or below).
    """
    return target.startswith(PREFIX) and target[len(PREFIX):len(PREFIX) + 1] in (b"", b"/", b"?")


def split_target(target: bytes) -> Tuple[bytes, bytes]:
    """
    Split a pass-through target into the upstream path and query.

    :param target: a target for which L{is_passthrough} holds.
    :return: C{(path, query)}: C{path} starts with C{/} (C{/} for a bare
        C{/vllm}), C{query} includes its leading C{?} or is empty.
    """
    rest = target[len(PREFIX):]
    path, sep, query = rest.partition(b"?")
    return (path or b"/"), sep + query


def path_problem(path: bytes, query: bytes = b"") -> Optional[str]:
    """
    Check the upstream path (and query) of a pass-through call.

    :param path: the raw path after C{/vllm}, starting with C{/}.
    :param query: the raw query string with its C{?}, or empty.
    :return: why the target is refused, or L{None} when it may be forwarded.
    """
    if _PLAIN_PATH.fullmatch(path) and _PLAIN_QUERY.fullmatch(query):
        return None
    return full_path_problem(path, query)


def full_path_problem(path: bytes, query: bytes = b"") -> Optional[str]:
    """
    L{path_problem} without its shortcut for plain targets.
    """
    if _CONTROL.search(path) or _CONTROL.search(query):
        return "control characters or spaces in the request target"
    if b"\\" in path:
        return "backslash in the path"
    if b"#" in path or b"#" in query:
        return "fragment in the request target"
    if _BAD_ESCAPE.search(path) or _BAD_ESCAPE.search(query):
        return "malformed percent-escape"
    if _FORBIDDEN_ESCAPE.search(path):
        return "encoded slash, backslash or control byte in the path"
    if _UNRESERVED_ESCAPE.search(path):
        return "percent-encoded letter, digit or -._~ in the path"
    if _PARAMETER.search(path):
        return "path parameter (;) in the path"
    if re.search(rb"%(00|[01][0-9a-f]|7f)", query, re.IGNORECASE):
        return "encoded control byte in the query"
    decoded = _ESCAPE.sub(lambda m: bytes([int(m.group(1), 16)]), path)
    try:
        decoded.decode("utf-8")
    except UnicodeDecodeError:
        return "the path is not valid UTF-8 once decoded"
    segments = path.split(b"/")[1:]
    for i, segment in enumerate(segments):
        if segment == b"":
            if i == len(segments) - 1:
                continue
            return "empty path segment"
        plain = _ESCAPE.sub(lambda m: bytes([int(m.group(1), 16)]), segment)
        # "..;x" is a dot segment to servers that strip path parameters.
        if plain.split(b";", 1)[0] in (b".", b".."):
            return "dot segment in the path"
    return None
