"""
Which model a pass-through call names.

In order: the C{model} of a JSON body, the C{x-dheera-model} header, the
C{model} query parameter, the C{model} field of a multipart form when it
comes before the first file part.  JSON bodies are parsed once; the body is
re-encoded only when the proxy must change it.
"""

import json
import re
from typing import Optional, Tuple
from urllib.parse import parse_qs

from dheera_tx.errors import bad_request

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
    :return: whether the body is declared as JSON (C{application/json} or
        a C{+json} type).
    """
    kind = media_type(content_type)
    return kind == b"application/json" or kind.endswith(b"+json")


def parse_json_body(body: bytes) -> dict:
    """
    Parse a JSON request body that must be an object.

    :raise ProxyError: 400 when the body is not a JSON object or names
        C{model} twice (so the model the proxy checks is the model vLLM
        sees).
    """
    try:
        document = json.loads(body)
    except (ValueError, RecursionError):
        raise bad_request("The request body is not valid JSON.")
    if not isinstance(document, dict):
        raise bad_request("The request body must be a JSON object.")
    if body.count(b'"model"') > 1 or b"\\u" in body:
        _reject_duplicate_model(body)
    return document


def _reject_duplicate_model(body: bytes) -> None:
    def pairs(items):
        names = [k for k, _ in items]
        if names.count("model") > 1:
            raise _DuplicateModel()
        return dict(items)

    try:
        json.loads(body, object_pairs_hook=pairs)
    except _DuplicateModel:
        raise bad_request("The request body names 'model' more than once.", param="model")


class _DuplicateModel(Exception):
    pass


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


_BOUNDARY = re.compile(rb'boundary="?([^";]+)"?', re.IGNORECASE)
_NAME = re.compile(rb'\bname="([^"]*)"', re.IGNORECASE)


def multipart_boundary(content_type: Optional[bytes]) -> Optional[bytes]:
    """
    :return: the boundary of a C{multipart/form-data} Content-Type, or
        L{None}.
    """
    if media_type(content_type) != b"multipart/form-data":
        return None
    match = _BOUNDARY.search(content_type)
    return match.group(1) if match else None


def multipart_model(prefix: bytes, boundary: bytes) -> Tuple[bool, Optional[str]]:
    """
    Look for the C{model} field at the start of a multipart body.

    :param prefix: the start of the body read so far.
    :return: C{(decided, model)}: C{decided} is true once the model field
        was found or a file part (or the end) came first.
    """
    delimiter = b"--" + boundary
    parts = prefix.split(delimiter)
    # parts[0] is the preamble; the last element may be incomplete.
    for index, part in enumerate(parts[1:], start=1):
        if part.startswith(b"--"):
            return True, None
        head, sep, content = part.partition(b"\r\n\r\n")
        if not sep:
            return False, None
        disposition = head.lower()
        if b"filename=" in disposition:
            return True, None
        name = _NAME.search(head)
        complete = index < len(parts) - 1
        if name and name.group(1) == b"model":
            if not complete:
                return False, None
            value = content[:-2] if content.endswith(b"\r\n") else content
            return True, value.decode("utf-8", "replace").strip() or None
        if not complete:
            return False, None
    return False, None


def encode_document(document: dict) -> bytes:
    """
    :return: a JSON body the proxy had to change, encoded compactly.
    """
    return json.dumps(document, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
