"""
Which model a pass-through call names.

In order: the C{model} of a JSON body, the C{x-dheera-model} header, the
C{model} query parameter, the C{model} field of a multipart form when it
comes before the first file part.  JSON bodies are parsed once; the body is
re-encoded only when the proxy must change it.

The model the proxy checks must be the model vLLM uses, so bodies are read
the way vLLM (FastAPI, Starlette, python-multipart) reads them, and what
could be read two ways is refused: a body without a Content-Type is JSON
(FastAPI parses it as JSON), JSON must be UTF-8 and name C{model} once, a
multipart form must name C{model} once (L{MultipartModelWatch} checks the
whole form as it streams) and its parameters are parsed with email's rules.
"""

import json
import re
from email.message import Message
from typing import List, Optional, Tuple
from urllib.parse import parse_qs

from dheera_tx.errors import ProxyError, bad_request

# The most of a multipart body read before the first file part to find the
# model field.
MULTIPART_PEEK_BYTES = 64 * 1024


def media_type(content_type: Optional[bytes]) -> bytes:
    """
    :return: the lower-cased media type of a Content-Type value.
    """
    if not content_type:
        return b""
    return content_type.split(b";", 1)[0].strip().lower()


def is_json(content_type: Optional[bytes]) -> bool:
    """
    :return: whether the body is to be read as JSON: declared as
        C{application/json} or a C{+json} type, or with no Content-Type at
        all (FastAPI, in front of vLLM's routes, parses such a body as
        JSON).
    """
    kind = media_type(content_type)
    return kind == b"" or kind == b"application/json" or kind.endswith(b"+json")


# A JSON body bigger than this is counted before it is parsed: parsing
# costs per value far more than per byte (16 MiB of "{}," takes a second
# and 500 MB to parse, 16 MiB of base64 image 20 ms), and it runs on the
# reactor.
_COUNT_VALUES_OVER = 256 * 1024
# The most values (counted by the commas, brackets and braces that
# separate them) a JSON body the proxy parses may have: parsing this many
# takes about 0.1 s.  Real requests have far fewer, even with long token-id
# prompts.
MAX_JSON_VALUES = 512 * 1024

_DECODER = json.JSONDecoder()
_SCAN_VALUE = _DECODER.scan_once
_SPACE = re.compile(r"[ \t\n\r]*")


def parse_json_body(body: bytes) -> dict:
    """
    Parse a JSON request body that must be an object.

    A body that may name C{model} twice has its top-level members read one
    by one (each value parsed by the C scanner), so a second C{model} is
    seen without parsing the body twice.

    :raise ProxyError: 400 when the body is not UTF-8, not a JSON object,
        or names C{model} twice at its top level (so the model the proxy
        checks is the model vLLM sees); 413 when it holds more than
        L{MAX_JSON_VALUES} values.
    """
    if len(body) > _COUNT_VALUES_OVER:
        values = body.count(b",") + body.count(b"[") + body.count(b"{")
        if values > MAX_JSON_VALUES:
            raise ProxyError(
                413,
                f"The JSON body holds more than {MAX_JSON_VALUES} values.",
                type="invalid_request_error",
                code="request_too_large",
            )
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise bad_request("The request body is not valid JSON (UTF-8).")
    document = None
    if body.count(b'"model"') > 1 or b"\\u" in body:
        # "model" may be a member twice, perhaps spelled with escapes.
        try:
            document = _object_members(text)
        except RecursionError:
            raise bad_request("The request body is nested too deeply.")
        except (ValueError, StopIteration, IndexError):
            pass
    else:
        try:
            document = json.loads(text)
        except RecursionError:
            raise bad_request("The request body is nested too deeply.")
        except ValueError:
            pass
    if not isinstance(document, dict):
        try:
            json.loads(text)
        except (ValueError, RecursionError):
            raise bad_request("The request body is not valid JSON (UTF-8).")
        raise bad_request("The request body must be a JSON object.")
    return document


def _object_members(text: str) -> Optional[dict]:
    """
    :return: the JSON object C{text} holds, or L{None} when it holds
        another JSON value.
    :raise ValueError: (or C{StopIteration}, C{IndexError}) C{text} is not
        JSON.
    :raise ProxyError: C{model} is a member twice.
    """
    at = _SPACE.match(text).end()
    if text[at:at + 1] != "{":
        return None
    members: dict = {}
    at = _SPACE.match(text, at + 1).end()
    if text[at] == "}":
        at += 1
    else:
        while True:
            if text[at] != '"':
                raise ValueError("a member name must be a string")
            name, at = _SCAN_VALUE(text, at)
            at = _SPACE.match(text, at).end()
            if text[at] != ":":
                raise ValueError("':' expected")
            at = _SPACE.match(text, at + 1).end()
            value, at = _SCAN_VALUE(text, at)
            if name == "model" and "model" in members:
                raise bad_request("The request body names 'model' more than once.", param="model")
            members[name] = value
            at = _SPACE.match(text, at).end()
            if text[at] == ",":
                at = _SPACE.match(text, at + 1).end()
                continue
            if text[at] != "}":
                raise ValueError("',' or '}' expected")
            at += 1
            break
    if _SPACE.match(text, at).end() != len(text):
        raise ValueError("extra data")
    return members


def body_model(document: dict) -> Optional[str]:
    """
    :return: the body's C{model} when it is a non-empty string.
    :raise ProxyError: 400 when C{model} is present but not a string.
    """
    model = document.get("model")
    if model is None:
        return None
    if not isinstance(model, str):
        raise bad_request("'model' must be a string.", param="model")
    return model or None


def header_or_query_model(headers, query: bytes) -> Optional[str]:
    """
    :param headers: the request headers.
    :param query: the raw query string, with its C{?} or empty.
    :return: the model named by C{x-dheera-model} or the C{model} query
        parameter.
    """
    named = headers.getRawHeaders(b"x-dheera-model")
    if named and named[0].strip():
        return named[0].strip().decode("utf-8", "replace")
    if b"model=" in query:
        values = parse_qs(query[1:].decode("utf-8", "replace")).get("model")
        if values and values[0]:
            return values[0]
    return None


def _parameters(value: bytes) -> List[Tuple[str, str]]:
    """
    Parse the parameters of a header value (C{type; key=value; ...}) the
    way python-multipart, and so Starlette and vLLM, does: email's rules
    for quoting and RFC 2231, keys lower-cased, every occurrence kept.

    :raise ProxyError: 400 when the value cannot be parsed.
    """
    message = Message()
    try:
        message["content-type"] = value.decode("latin-1")
        params = message.get_params() or []
    except Exception:
        raise bad_request("A multipart header cannot be parsed.")
    out = []
    for key, item in params[1:]:
        if isinstance(item, tuple):
            item = item[-1]
        out.append((key.lower(), item))
    return out


def _one(params: List[Tuple[str, str]], key: str) -> Optional[str]:
    values = [v for k, v in params if k == key]
    if len(values) > 1:
        # The proxy and vLLM might each take a different one.
        raise bad_request(f"The multipart parameter {key!r} appears more than once.")
    return values[0] if values else None


def multipart_boundary(content_type: Optional[bytes]) -> Optional[bytes]:
    """
    :return: the boundary of a C{multipart/form-data} Content-Type, or
        L{None}.
    :raise ProxyError: 400 when the boundary is given more than once.
    """
    if media_type(content_type) != b"multipart/form-data":
        return None
    boundary = _one(_parameters(content_type), "boundary")
    return boundary.encode("latin-1") if boundary else None


def _part_field(head: bytes) -> Tuple[Optional[str], bool]:
    """
    :param head: the header block of one multipart part.
    :return: C{(name, is_file)} from its Content-Disposition (as
        python-multipart reads it: a part is a file when it has a
        C{filename} parameter).
    :raise ProxyError: 400 for a part with two Content-Dispositions or two
        names.
    """
    dispositions = []
    for line in head.split(b"\r\n"):
        name, sep, value = line.partition(b":")
        if sep and name.lower() == b"content-disposition":
            dispositions.append(value.strip())
    if not dispositions:
        return None, False
    if len(dispositions) > 1:
        raise bad_request("A multipart part has more than one Content-Disposition.")
    params = _parameters(dispositions[0])
    return _one(params, "name"), any(k == "filename" for k, _ in params)


def _duplicate_model() -> ProxyError:
    return bad_request("The multipart form names 'model' more than once.", param="model")


def multipart_model(prefix: bytes, boundary: bytes) -> Tuple[bool, Optional[str]]:
    """
    Look for the C{model} field at the start of a multipart body, before
    its first file part.

    :param prefix: the start of the body read so far.
    :return: C{(decided, model)}: C{decided} is true once a file part (or
        the end of the form) came; C{model} is the model field seen so far.
    :raise ProxyError: 400 when C{model} comes twice before the first
        file part.
    """
    # Parts are delimited by CRLF "--" boundary (RFC 2046); the CRLF
    # before the first delimiter is optional.
    parts = (b"\r\n" + prefix).split(b"\r\n--" + boundary)
    model = None
    # parts[0] is the preamble; the last element may be incomplete.
    for index, part in enumerate(parts[1:], start=1):
        if part.startswith(b"--"):
            return True, model
        complete = index < len(parts) - 1
        head, sep, content = part.partition(b"\r\n\r\n")
        if not sep:
            return False, model
        name, is_file = _part_field(head)
        if is_file:
            return True, model
        if name == "model":
            if model is not None:
                raise _duplicate_model()
            if not complete:
                return False, model
            model = content.decode("utf-8", "replace").strip() or None
        elif not complete:
            return False, model
    return False, model


class MultipartModelWatch:
    """
    Watches a multipart body as it streams to the upstream, for C{model}
    parts anywhere in it (vLLM's form parser takes the last one; the proxy
    decided before reading past the first file part): feed it every chunk
    before forwarding that chunk.  A second C{model} part is refused; once
    L{authorize} has named the model the call was authorized for, every
    C{model} part, seen or still to come, must name that model.

    :param boundary: the form's boundary.
    """

    # A part head longer than this is refused.
    MAX_PART_HEAD = 16 * 1024
    # A model name longer than this cannot be the authorized one.
    MAX_MODEL = 1024

    def __init__(self, boundary: bytes):
        self._delimiter = b"\r\n--" + boundary
        self._pending = b"\r\n"
        self.models = 0
        self._values: List[Optional[str]] = []
        # The model part being read: its bytes so far, and where its
        # content starts in the pending buffer.
        self._value: Optional[List[bytes]] = None
        self._value_at = 0
        self._value_size = 0
        self._authorized = False
        self._model: Optional[str] = None

    def authorize(self, model: Optional[str]) -> None:
        """
        The call was authorized for C{model}: check the model parts seen so
        far, and those to come as they arrive.

        :raise ProxyError: 400 when a model part names another model.
        """
        self._authorized = True
        self._model = model
        for value in self._values:
            self._check(value)

    def _check(self, value: Optional[str]) -> None:
        if self._authorized and value != self._model:
            raise bad_request(
                "The form's 'model' part names another model than the one this call was authorized for.",
                param="model",
            )

    def _value_ended(self, tail: bytes) -> None:
        parts, self._value = self._value, None
        size = self._value_size + len(tail)
        if parts is None:
            return
        if size > self.MAX_MODEL:
            value: Optional[str] = "\x00overlong"
        else:
            value = (b"".join(parts) + tail).decode("utf-8", "replace").strip() or None
        self._values.append(value)
        self._check(value)

    def feed(self, data: bytes) -> None:
        """
        Take the next chunk of the body.

        :raise ProxyError: 400 once a second C{model} part has arrived, a
            model part names another model than the authorized one, or for
            a part head over L{MAX_PART_HEAD}.
        """
        buffer = self._pending + data
        start = 0
        while True:
            at = buffer.find(self._delimiter, start)
            if at < 0:
                break
            if self._value is not None:
                self._value_ended(buffer[self._value_at:at] if at > self._value_at else b"")
            head_start = at + len(self._delimiter)
            if buffer[head_start:head_start + 2] == b"--":
                start = head_start
                continue
            end = buffer.find(b"\r\n\r\n", head_start)
            if end < 0:
                if len(buffer) - head_start > self.MAX_PART_HEAD:
                    raise bad_request("A multipart part head is too long.")
                self._pending = buffer[at:]
                return
            name, _ = _part_field(buffer[head_start:end])
            if name == "model":
                self.models += 1
                if self.models > 1:
                    raise _duplicate_model()
                self._value = []
                self._value_at = end + 4
                self._value_size = 0
            start = end + 2
        keep = max(start, len(buffer) - len(self._delimiter) + 1)
        if self._value is not None:
            if self._value_at < keep:
                piece = buffer[self._value_at:keep]
                self._value_size += len(piece)
                if self._value_size <= self.MAX_MODEL:
                    self._value.append(piece)
                self._value_at = 0
            else:
                self._value_at -= keep
        self._pending = buffer[keep:]


def encode_document(document: dict) -> bytes:
    """
    :return: a JSON body the proxy had to change, encoded compactly.
    :raise ProxyError: 400 for a document too deeply nested to encode.
    """
    try:
        text = json.dumps(document, ensure_ascii=False, separators=(",", ":"))
    except RecursionError:
        raise bad_request("The request body is nested too deeply.")
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:
        # A lone surrogate from a "\ud800" escape: keep it escaped.
        return json.dumps(document, separators=(",", ":")).encode("ascii")
