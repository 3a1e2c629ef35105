"""
Which replica most likely holds a call's prompt prefix in vLLM's prefix
cache, computed alike in every worker and every proxy process, with no
shared state.

A call's I{affinity key} is a 64-bit hash:

  - of the session header's value (C{router_settings.session_header}), when
    the call carries one;
  - else of its I{affinity prefix}: for chat calls the messages up to and
    including the first user message (a conversation only ever appends, so
    every turn of it has the same one), for other calls the prompt or
    input text; with the model and any C{cache_salt} (vLLM never shares
    cache across salts).

The prefix is cut in L{BLOCK_CHARS}-character blocks, and only the first
M{2^k} blocks are hashed, M{2^k} the largest power of two not above the
number of whole blocks (and at most L{MAX_BLOCKS}).  So two calls agree when
they share that power-of-two prefix: calls of one shared-prefix group whose
common part is at least half of each prompt agree, while a long shared
system prompt followed by longer per-user context still separates users.
The hashed work is bounded (at most C{MAX_BLOCKS * BLOCK_CHARS} characters)
whatever the prompt's size.

L{rendezvous_order} ranks replicas for a key by highest random weight
(rendezvous hashing): each replica's weight is a hash of the key and the
replica's C{api_base}, so adding or removing one replica moves only the keys
it wins or won, about M{1/N} of them, and every process ranks alike.
"""

import hashlib
from typing import List, Optional, Sequence

from dheera_tx.config import Deployment

# About 64 tokens of English text per block: fine enough to separate users
# after a shared system prompt, coarse enough to hash little.
BLOCK_CHARS = 256
MAX_BLOCKS = 64
_MAX_PART_CHARS = BLOCK_CHARS * MAX_BLOCKS
_MASK = (1 << 64) - 1


def _hash64(data: bytes) -> int:
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "big")


def session_key(model: str, session: bytes) -> int:
    """
    :param model: the configured model name the call names.
    :param session: the session header's value.
    :return: the affinity key of a call carrying that session.
    """
    return _hash64(b"s\x00" + model.encode("utf-8", "surrogatepass") + b"\x00" + session)


def prefix_key(document: dict, model: str) -> Optional[int]:
    """
    :param document: the call's parsed JSON body.
    :param model: the configured model name the call names.
    :return: the affinity key of the call's prompt prefix, or L{None} when
        the body holds no prompt (then no replica is more likely to hold it).
    """
    pieces = _affinity_pieces(document)
    if not pieces:
        return None
    total = 0
    for piece in pieces:
        total += len(piece)
    blocks = min(total // BLOCK_CHARS, MAX_BLOCKS)
    budget = (1 << (blocks.bit_length() - 1)) * BLOCK_CHARS if blocks else total
    kept = []
    for piece in pieces:
        if len(piece) >= budget:
            kept.append(piece[:budget])
            break
        kept.append(piece)
        budget -= len(piece)
    salt = document.get("cache_salt")
    head = "p\x00" + model + "\x00" + (salt if isinstance(salt, str) else "") + "\x00"
    return _hash64((head + "".join(kept)).encode("utf-8", "surrogatepass"))


def call_affinity(session_header: Optional[bytes], get_header, route, document: Optional[dict]) -> Optional[int]:
    """
    :param session_header: C{router_settings.session_header}, or L{None}
        when the strategy has no use for affinity.
    :param get_header: the request's C{getHeader}.
    :param route: the call's L{dheera_tx.routing.router.Route}.
    :param document: the call's parsed JSON body, or L{None}.
    :return: the call's affinity key: its session's, else its prompt
        prefix's; L{None} when it has neither, or there is no choice to
        make (one replica).
    """
    if session_header is None or len(route.replicas) < 2:
        return None
    model = route.model_name or ""
    session = get_header(session_header)
    if session:
        return session_key(model, session)
    if document is None:
        return None
    return prefix_key(document, model)


def _affinity_pieces(document: dict) -> List[str]:
    """
    :return: the texts of the call's affinity prefix, in prompt order.
    """
    pieces: List[str] = []
    system = document.get("system")  # Anthropic messages
    if isinstance(system, str):
        pieces.append(system)
    messages = document.get("messages")
    if isinstance(messages, list):
        for message in messages:
            if not isinstance(message, dict):
                continue
            role = message.get("role")
            pieces.append(role if isinstance(role, str) else "?")
            _content_pieces(message.get("content"), pieces)
            if role == "user":
                break
        return pieces
    for field in ("prompt", "input"):
        value = document.get(field)
        if isinstance(value, list) and value:
            # A batch of prompts: the first one; token ids as text.
            value = value[0] if isinstance(value[0], (str, list)) else value
        if isinstance(value, list):
            value = ",".join(str(token) for token in value[: _MAX_PART_CHARS // 4])
        if isinstance(value, str) and value:
            pieces.append(value)
            return pieces
    return pieces


def _content_pieces(content, pieces: List[str]) -> None:
    if isinstance(content, str):
        pieces.append(content)
        return
    if not isinstance(content, list):
        return
    for part in content:
        if not isinstance(part, dict):
            continue
        text = part.get("text")
        if isinstance(text, str):
            pieces.append(text)
            continue
        # An image or audio part: its URL or data, bounded (a data URL may
        # be megabytes, and its first blocks tell images apart well enough).
        for value in part.values():
            if isinstance(value, dict):
                value = value.get("url") or value.get("data")
            if isinstance(value, str):
                pieces.append(value[:_MAX_PART_CHARS])


def replica_weight(deployment: Deployment) -> int:
    """
    :return: the replica's rendezvous seed: a hash of its C{api_base} and
        served name, not of its position in C{model_list}, so that adding or
        removing another entry leaves it unchanged.
    """
    return _hash64(b"r\x00" + deployment.api_base.encode("utf-8") + b"\x00" + (deployment.served_model or "").encode("utf-8"))


def _mix(x: int) -> int:
    # splitmix64's finalizer: a cheap, well-spread 64-bit permutation.
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK
    return x ^ (x >> 31)


def rendezvous_order(key: int, replicas: Sequence[Deployment], seeds: dict) -> List[Deployment]:
    """
    :param key: an affinity key.
    :param seeds: L{replica_weight} of each replica, by deployment id.
    :return: C{replicas} from the most to the least preferred for C{key}.
    """
    return sorted(replicas, key=lambda d: _mix(key ^ seeds[d.id]), reverse=True)
