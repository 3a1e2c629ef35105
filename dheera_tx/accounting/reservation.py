"""
A call's worst case, reserved at admission on its key and end user so that
concurrent calls cannot overrun a budget or a tpm limit (see
L{dheera_tx.accounting.limits}).

The worst case is computed from what the proxy knows before the upstream
is called, without parsing more than it already did:

* prompt tokens: the JSON body's length in bytes divided by 3, rounded up.
  A token is about 4 bytes of English text and rarely under 2 bytes of any
  text (non-ASCII text sent JSON-escaped is 6 bytes a character), and the
  JSON around the text outweighs a chat template's tokens, so this is
  rarely under the truth.  A body that is not JSON (a multipart upload)
  counts 0: its prompt is audio, billed by its usage afterwards.
* completion tokens: the call's C{max_tokens} (or C{max_completion_tokens},
  C{max_output_tokens}) times its C{n} / C{best_of}; on a route that
  generates text and names no limit, C{general_settings.
  default_max_tokens_reservation}; none on a route that never generates
  (embeddings, pooling, score, rerank, classify, tokenize, ...).
* price: both at the highest per-token price (input or output) of any
  replica the call may go to.

A call that generates more than it reserved (no C{max_tokens} and a longer
answer than the default) can make concurrent calls overrun a budget by its
excess; the README says so.
"""

import math
from typing import Optional, Sequence

import attr

# Routes on which vLLM generates tokens (paths after /vllm): a call on them
# naming no max_tokens reserves the configured default.
GENERATING_ROUTES = frozenset(
    [
        b"/v1/chat/completions",
        b"/v1/completions",
        b"/v1/responses",
        b"/v1/messages",
        b"/v1/audio/transcriptions",
        b"/v1/audio/translations",
        b"/v1/realtime",
        b"/invocations",
    ]
)
_MAX_TOKEN_FIELDS = ("max_tokens", "max_completion_tokens", "max_output_tokens")
# Bytes of JSON body counted as one prompt token (see the module docstring).
BYTES_PER_PROMPT_TOKEN = 3
# Absurd requests (n = 10**9) still give numbers that Lua's doubles hold
# exactly: far over any budget or tpm limit either way.
_MAX_TOKENS = 10**12
_MAX_NANOS = 10**15


@attr.s(frozen=True, slots=True, auto_attribs=True)
class Reservation:
    """
    What one call holds while in flight.

    :ivar nanos: nano-USD held against budgets.
    :ivar tokens: tokens held against tpm limits.
    """

    nanos: int = 0
    tokens: int = 0


NO_RESERVATION = Reservation()


def _whole(value) -> Optional[int]:
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    return None


def completion_tokens(path: bytes, document, default: int) -> int:
    """
    :return: the most completion tokens a call may generate, as far as its
        request says.
    """
    limit = None
    choices = 1
    if isinstance(document, dict):
        for field in _MAX_TOKEN_FIELDS:
            limit = _whole(document.get(field))
            if limit is not None:
                break
        choices = max(_whole(document.get("n")) or 1, _whole(document.get("best_of")) or 1)
    if limit is None:
        if path not in GENERATING_ROUTES:
            return 0
        limit = default
    return limit * choices


def worst_case(path: bytes, document, body_bytes: int, replicas: Sequence, default_max_tokens: int) -> Reservation:
    """
    :param path: the call's path after C{/vllm}, query excluded.
    :param document: the JSON body, or L{None}.
    :param body_bytes: the JSON body's length (0 for other bodies).
    :param replicas: the L{dheera_tx.config.Deployment}s it may go to.
    :param default_max_tokens: completion tokens reserved for a generating
        call that names no limit.
    :return: the call's worst case.
    """
    tokens = math.ceil(body_bytes / BYTES_PER_PROMPT_TOKEN) + completion_tokens(path, document, default_max_tokens)
    tokens = min(tokens, _MAX_TOKENS)
    price = max((max(d.input_cost_per_token, d.output_cost_per_token) for d in replicas), default=0.0)
    return Reservation(min(math.ceil(tokens * price * 1e9), _MAX_NANOS), tokens)
