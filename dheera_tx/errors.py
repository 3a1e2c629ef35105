"""
Errors the proxy answers itself, in the OpenAI error shape.

Every error that dheera_tx produces (as opposed to an upstream error, which
is passed through untouched) is a L{ProxyError}, rendered as::

    {"error": {"message": ..., "type": ..., "param": null, "code": ...}}
"""

import json
from typing import Optional

from twisted.web.http import RESPONSES

# Reason phrases of the status lines the proxy writes: twisted.web's table
# lacks 429 and 431 (and 499, logged only, never sent).
REASON_PHRASES = dict(RESPONSES)
REASON_PHRASES.update({429: b"Too Many Requests", 431: b"Request Header Fields Too Large"})


def reason_phrase(status: int) -> bytes:
    """
    :return: the reason phrase for C{status}.
    """
    return REASON_PHRASES.get(status, b"Unknown")


class ProxyError(Exception):
    """
    An error to answer to the client with C{status} and an OpenAI-shaped body.

    :param status: HTTP status code.
    :param message: human-readable message; never contains a secret.
    :param type: OpenAI error type, e.g. C{invalid_request_error}.
    :param code: short machine-readable code (defaults to the status).
    :param param: the request field at fault, if any.
    :param headers: extra response headers, e.g. C{Retry-After}.
    """

    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        code: Optional[object] = None,
        param: Optional[str] = None,
        headers: Optional[dict] = None,
    ):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.code = str(status) if code is None else code
        self.param = param
        self.headers = headers or {}

    def body(self) -> bytes:
        """
        :return: the JSON body of this error.
        """
        return error_body(self.message, self.type, self.code, self.param)

    def __repr__(self) -> str:
        return f"ProxyError({self.status}, {self.message!r}, type={self.type!r})"


def error_body(message: str, type: str, code: object, param: Optional[str] = None) -> bytes:
    """
    :return: the OpenAI error shape, encoded as JSON bytes.
    """
    return json.dumps(
        {"error": {"message": message, "type": type, "param": param, "code": code}}
    ).encode("utf-8")


# The one body every authentication failure gets, so that a caller cannot tell
# a missing key from an unknown, expired or blocked one.
def unauthorized() -> ProxyError:
    """
    :return: the 401 every failed authentication answers.
    """
    return ProxyError(
        401,
        "Authentication Error: invalid, expired or missing API key.",
        type="authentication_error",
        code="401",
    )


def forbidden(message: str) -> ProxyError:
    """
    :return: a 403 for an authenticated caller that may not do this.
    """
    return ProxyError(403, message, type="permission_error", code="403")


def bad_request(message: str, param: Optional[str] = None) -> ProxyError:
    """
    :return: a 400 C{invalid_request_error}.
    """
    return ProxyError(400, message, type="invalid_request_error", code="400", param=param)


def service_unavailable(message: str) -> ProxyError:
    """
    :return: a 503, e.g. while the key store is unreachable.
    """
    return ProxyError(503, message, type="service_unavailable", code="503")
