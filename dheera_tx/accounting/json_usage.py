"""
The top-level C{usage} member of a JSON answer, read as the answer streams.

vLLM writes C{usage} wherever its response model declares it: first for
rerank, last for embeddings, and for chat I{before} C{prompt_logprobs},
C{prompt_token_ids} and C{kv_transfer_params}, so a long prompt puts it in
the middle of a large answer.  A client can also make the model write
C{"usage"} anywhere inside the answer (echoed text, tool arguments), so
only the member of the top-level object counts.

A whole answer (held by the relay) is read by L{whole_answer_usage}: the
last C{"usage"} key, checked to be a member of the top-level object by
parsing what follows it (the rest of that object's members, in C) to the
end of the answer; otherwise it is scanned.

L{TopLevelUsageScanner} is an incremental tokenizer of just enough JSON to
know where the top-level object's members start and end: it tracks string
and escape state and nesting depth over chunks of any boundary, and
captures the bytes of the C{usage} member's value only (at most
L{TopLevelUsageScanner.CAPTURE_LIMIT} bytes).  Everything below depth 1 is
skipped by regular expressions, which consume whole strings, runs of plain
text and containers nested up to two levels in one call, so the Python
loop runs once per deeper bracket, not per byte.
"""

import json
import re
from typing import List, Optional

# Inside a string, after its opening quote: everything up to and including
# the closing quote (possessive: no backtracking on a long string).
_STRING_REST = re.compile(rb'[^"\\]*+(?:\\.[^"\\]*+)*+"', re.S)
_STRING = rb'"[^"\\]*+(?:\\.[^"\\]*+)*+"'
_PLAIN = rb'[^"\[\]{}]++'
_LEAF = rb"(?:\{(?:%s|%s)*+\}|\[(?:%s|%s)*+\])" % (_PLAIN, _STRING, _PLAIN, _STRING)
_NEST = rb"(?:\{(?:%s|%s|%s)*+\}|\[(?:%s|%s|%s)*+\])" % ((_PLAIN, _STRING, _LEAF) * 2)
# Below depth 1: plain text, whole strings and containers nested up to two
# levels deep, up to the next bracket or string this chunk cannot close.
_SKIP = re.compile(rb"(?:%s|%s|%s)*+" % (_PLAIN, _STRING, _NEST), re.S)
_SPACE = re.compile(rb"[ \t\r\n]*+")
# A scalar member value (number, true, false, null) runs to its delimiter.
_SCALAR = re.compile(rb"[^,}\] \t\r\n]*+")

# States of the top-level object.
_BEFORE, _KEY, _IN_KEY, _COLON, _VALUE, _IN_VALUE, _COMMA, _DONE = range(8)
_MAX_KEY = 64
_TEXT_COLON = re.compile(r"[ \t\r\n]*:[ \t\r\n]*")
_WS = rb"[ \t\r\n]*+"
# After a key, its colon and a value nested at most two levels deep, or a
# plain one (group 1); or where a deeper value starts (group 2).
_MEMBER_VALUE = re.compile(
    rb'%s:%s(?:(%s|%s|[^,{}\[\]" \t\r\n]++)(?=[ \t\r\n]*[,}])|()[\[{])' % (_WS, _WS, _NEST, _STRING), re.S
)
# The rest of the top-level object after a member's value, when its other
# values are plain or shallow (vLLM's chat tail: prompt_logprobs,
# prompt_token_ids, kv_transfer_params, null or short).
_TAIL = re.compile(
    rb"(?:%s,%s%s%s:%s(?:%s|%s|[^,{}\[\]\" \t\r\n]++))*+%s\}%s" % (_WS, _WS, _STRING, _WS, _WS, _NEST, _STRING, _WS, _WS),
    re.S,
)
# The members before a key, when their values are plain (rerank: id and
# model before usage).
_HEAD = re.compile(
    rb"\{%s(?:%s%s:%s(?:%s|[^,{}\[\]\" \t\r\n]++)%s,%s)*+" % (_WS, _STRING, _WS, _WS, _STRING, _WS, _WS), re.S
)
_NEXT_MEMBER = re.compile(r'[ \t\r\n]*(?:(,)[ \t\r\n]*"|(\})[ \t\r\n]*\Z)')
# The C scanners behind json.loads: one value, one string, from an index.
_scan_value = json.JSONDecoder().scan_once  # type: ignore[attr-defined]
_scan_string = json.decoder.scanstring  # type: ignore[attr-defined]
# Candidate keys tried from the end before scanning the whole answer.
_CANDIDATES = 4


def whole_answer_usage(data: bytes):
    """
    :param data: a complete JSON answer.
    :return: the value of its top-level C{usage} member, or L{None}.
    """
    found, value = _last_usage_member(data)
    if found:
        return value
    scanner = TopLevelUsageScanner()
    scanner.feed(data)
    return scanner.value


def _last_usage_member(data: bytes):
    """
    The fast way: try the last C{"usage"} keys.  A key preceded only by
    members with plain values since the opening brace, or whose value is
    followed by members and a closing brace that end the answer, is a
    member of the top-level object (nested deeper, its object would close
    before the end).

    :return: C{(True, value)} when decided (C{value} L{None}: no usage),
        C{(False, None)} when the answer must be scanned.
    """
    if data[:1] != b"{":
        return False, None
    at = len(data)
    for _ in range(_CANDIDATES):
        at = data.rfind(b'"usage"', 0, at)
        if at < 0:
            # No key spells it plainly; one might with escapes.
            return (b"\\u" not in data), None
        if data[at - 1] == 0x5C and _odd_backslashes(data[max(0, at - 64):at]):
            continue
        member = _MEMBER_VALUE.match(data, at + 7)
        if member is None:
            continue
        start, stop = member.span(1)
        try:
            if start >= 0 and _top_level_member(data, at, stop):
                return True, _scan_value(data[start:stop].decode("utf-8"), 0)[0]
            if start < 0:
                start = member.start(2)
            # Deeper values or tail members: parse what follows in C.
            text = data[start:].decode("utf-8")
            found, end = _scan_value(text, 0)
            if _rest_of_top_level(text, end):
                return True, found
        except (ValueError, StopIteration, RecursionError):
            return False, None
    return False, None


def _top_level_member(data: bytes, at: int, stop: int) -> bool:
    """
    :param at: where a key starts.
    :param stop: where its value ends.
    :return: whether the members before the key, or those after its value,
        show that it is a member of the top-level object (the cheaper side
        first).
    """
    if at > len(data) // 2:
        return _TAIL.fullmatch(data, stop) is not None or _HEAD.match(data).end() == at  # type: ignore[union-attr]
    return _HEAD.match(data).end() == at or _TAIL.fullmatch(data, stop) is not None  # type: ignore[union-attr]


def _rest_of_top_level(text: str, pos: int) -> bool:
    """
    :return: whether C{text[pos:]} is the rest of an object's members and
        its closing brace, then the end.
    """
    while True:
        match = _NEXT_MEMBER.match(text, pos)
        if match is None:
            return False
        if match.group(2):
            return True
        _, pos = _scan_string(text, match.end())
        colon = _TEXT_COLON.match(text, pos)
        if colon is None:
            return False
        _, pos = _scan_value(text, colon.end())


class TopLevelUsageScanner:
    """
    Finds the value of the C{usage} member of the top-level JSON object in
    a byte stream fed in chunks; never raises, never holds more than
    L{CAPTURE_LIMIT} bytes (plus one key of at most 64 bytes).

    :ivar value: the decoded value of the last top-level C{usage} member
        seen so far, or L{None}.
    """

    CAPTURE_LIMIT = 64 * 1024

    __slots__ = (
        "value", "_state", "_nest", "_in_string", "_escaped", "_scalar", "_key", "_capture", "_captured",
    )

    def __init__(self):
        self.value = None
        self._state = _BEFORE
        # Depth inside the member value being skipped (0: a string or
        # scalar value, or not yet started).
        self._nest = 0
        self._in_string = False
        self._escaped = False
        self._scalar = False
        self._key: List[bytes] = []
        self._capture: Optional[List[bytes]] = None
        self._captured = 0

    @property
    def done(self) -> bool:
        """
        Whether the top-level value has ended (or cannot be an object).
        """
        return self._state == _DONE

    def feed(self, data: bytes) -> None:
        """
        Scan the next chunk of the answer.
        """
        try:
            self._feed(data)
        except Exception:
            self._state = _DONE
            self._capture = None

    def _feed(self, data: bytes) -> None:
        pos = 0
        end = len(data)
        while pos < end:
            state = self._state
            if state == _IN_VALUE:
                pos = self._skip_value(data, pos, end)
                continue
            if state == _DONE:
                return
            if state == _IN_KEY:
                pos = self._read_key(data, pos, end)
                continue
            pos = _SPACE.match(data, pos).end()  # type: ignore[union-attr]  # a starred pattern always matches
            if pos >= end:
                return
            c = data[pos]
            if state == _KEY:
                if c == 0x22:  # "
                    self._key = []
                    self._state = _IN_KEY
                    pos += 1
                elif c == 0x7D:  # }
                    self._state = _DONE
                else:
                    self._state = _DONE
            elif state == _COLON:
                self._state = _VALUE if c == 0x3A else _DONE
                pos += 1
            elif state == _VALUE:
                pos = self._start_value(data, pos)
            elif state == _COMMA:
                self._state = _KEY if c == 0x2C else _DONE
                pos += 1
            else:  # _BEFORE
                self._state = _KEY if c == 0x7B else _DONE
                pos += 1

    def _read_key(self, data: bytes, pos: int, end: int) -> int:
        key = self._key
        if self._escaped:
            key.append(data[pos:pos + 1])
            self._escaped = False
            pos += 1
            if pos >= end:
                return pos
        match = _STRING_REST.match(data, pos)
        if match is None:
            tail = data[pos:]
            key.append(tail)
            self._escaped = _odd_backslashes(tail)
            if sum(len(piece) for piece in key) > _MAX_KEY:
                # Too long to be "usage": keep its length, not its text.
                self._key = [b"\x00" * (_MAX_KEY + 1)]
            return end
        key.append(data[pos:match.end() - 1])
        self._state = _COLON
        return match.end()

    def _start_value(self, data: bytes, pos: int) -> int:
        raw = b"".join(self._key)
        self._key = []
        if raw == b"usage" or (b"\\" in raw and len(raw) <= _MAX_KEY and _decoded_key(raw) == "usage"):
            self._capture = []
            self._captured = 0
            # The last member of a name counts, as for json.loads.
            self.value = None
        c = data[pos]
        self._nest = 0
        self._scalar = False
        if c == 0x22:
            self._in_string = True
            self._append(data, pos, pos + 1)
            pos += 1
        elif c == 0x7B or c == 0x5B:
            self._nest = 1
            self._append(data, pos, pos + 1)
            pos += 1
        else:
            self._scalar = True
        self._state = _IN_VALUE
        return pos

    def _skip_value(self, data: bytes, pos: int, end: int) -> int:
        if self._in_string:
            start = pos
            if self._escaped:
                self._escaped = False
                pos += 1
                if pos >= end:
                    self._append(data, start, pos)
                    return pos
            match = _STRING_REST.match(data, pos)
            if match is None:
                self._escaped = _odd_backslashes(data[pos:]) if data[end - 1] == 0x5C else False
                self._append(data, start, end)
                return end
            pos = match.end()
            self._append(data, start, pos)
            self._in_string = False
            if self._nest == 0:
                self._value_ended()
            return pos
        if self._scalar:
            stop = _SCALAR.match(data, pos).end()  # type: ignore[union-attr]  # always matches
            self._append(data, pos, stop)
            if stop < end:
                self._value_ended()
            return stop
        start = pos
        pos = _SKIP.match(data, pos).end()  # type: ignore[union-attr]  # always matches
        if pos < end:
            c = data[pos]
            pos += 1
            if c == 0x22:
                self._in_string = True
            elif c == 0x7B or c == 0x5B:
                self._nest += 1
            else:
                self._nest -= 1
        self._append(data, start, pos)
        if self._nest == 0 and not self._in_string:
            self._value_ended()
        return pos

    def _append(self, data: bytes, start: int, stop: int) -> None:
        capture = self._capture
        if capture is None or stop <= start:
            return
        self._captured += stop - start
        if self._captured > self.CAPTURE_LIMIT:
            # A usage object is a few hundred bytes; this is not one.
            self._capture = None
            return
        capture.append(data[start:stop])

    def _value_ended(self) -> None:
        self._state = _COMMA
        self._scalar = False
        capture, self._capture = self._capture, None
        if capture is not None:
            try:
                self.value = json.loads(b"".join(capture))
            except (ValueError, RecursionError):
                self.value = None


def _odd_backslashes(text: bytes) -> bool:
    """
    :return: whether C{text} ends with an odd run of backslashes (so the
        next byte is escaped).
    """
    return (len(text) - len(text.rstrip(b"\\"))) % 2 == 1


def _decoded_key(raw: bytes) -> Optional[str]:
    try:
        return json.loads(b'"' + raw + b'"')
    except ValueError:
        return None
