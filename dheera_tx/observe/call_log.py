"""
The per-call log (SPEC section 7): one record for every call, handed to the
configured sinks.

L{call_record} turns a finished L{Call} into a JSON-safe dict with every
field of the contract, secrets scrubbed.  L{CallLog} builds that record once
per call and gives it to each sink (L{dheera_tx.observe.log_sinks}: C{json_log},
C{redis_stream}, C{webhook}).  L{build_sinks} reads and checks their
settings.
"""

import datetime
import re
from typing import Any, Dict, List, Optional, Sequence, TextIO
from urllib.parse import urlsplit

from twisted.internet.defer import Deferred, gatherResults
from twisted.logger import Logger

from dheera_tx.accounting.metering import nanos_to_usd
from dheera_tx.call import Call
from dheera_tx.config import ConfigError, ProxyConfig
from dheera_tx.observe.log_sinks import ICallSink, JSONLogSink, RedisStreamSink, WebhookSink

log = Logger()

REDACTED = "[redacted]"

# A secret-bearing query parameter (as in /key/info?key=...), whatever its
# case; the value runs to the next separator.
_SECRET_PARAM = re.compile(
    r"(?i)([?&;](?:key|api_key|api-key|apikey|token|access_token|secret|password|master_key)=)[^&;#\s]*"
)
# Anything shaped like a proxy key (sk-...), wherever it turns up.
_KEY_SHAPE = re.compile(r"sk-[A-Za-z0-9_\-]{6,}")


def scrub(text: Optional[str]) -> Optional[str]:
    """
    Remove secrets from a free-text value: the values of key-like query
    parameters and anything shaped like an C{sk-} key.

    :param text: a path, URL or message, or L{None}.
    :return: the same text with secrets replaced by C{[redacted]}.
    """
    if text is None:
        return None
    text = _SECRET_PARAM.sub(lambda m: m.group(1) + REDACTED, text)
    return _KEY_SHAPE.sub(REDACTED, text)


def _iso(seconds: Optional[float]) -> Optional[str]:
    if seconds is None:
        return None
    try:
        moment = datetime.datetime.fromtimestamp(seconds, tz=datetime.timezone.utc)
    except (OverflowError, OSError, ValueError):
        return None
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _ms(start: Optional[float], end: Optional[float]) -> Optional[float]:
    if start is None or end is None:
        return None
    return round(max(0.0, end - start) * 1000.0, 3)


def call_record(call: Call) -> Dict[str, Any]:
    """
    The log record of one call (SPEC section 7).

    Times C{started_at}, C{first_byte_at} and C{ended_at} are the reactor's
    seconds, which are epoch seconds under the real reactor; C{time} is
    C{started_at} as ISO-8601 UTC.  Every free-text field is passed through
    L{scrub}; the key itself is never part of a L{Call}, only the first
    characters of its SHA-256.

    :param call: a finished call.
    :return: a dict of JSON-safe values.
    """
    return {
        "call_id": call.call_id,
        "time": _iso(call.started_at),
        "method": call.method,
        "path": scrub(call.path),
        "model_name": scrub(call.model_name),
        "deployment": scrub(call.deployment),
        "api_base": scrub(call.api_base),
        "routing_reason": call.routing_reason,
        "queued_ms": round(call.queued_ms, 3),
        "attempts": int(call.attempts),
        "status": call.status,
        "stream": bool(call.stream),
        "key_hash_prefix": call.key_hash_prefix,
        "key_alias": scrub(call.key_alias),
        "user_id": scrub(call.user_id),
        "team_id": scrub(call.team_id),
        "end_user": scrub(call.end_user),
        "prompt_tokens": int(call.prompt_tokens),
        "completion_tokens": int(call.completion_tokens),
        "cached_tokens": int(call.cached_tokens),
        "usage_estimated": bool(call.usage_estimated),
        "cost": nanos_to_usd(call.cost_nanos),
        "cost_nanos": int(call.cost_nanos),
        "started_at": call.started_at,
        "first_byte_at": call.first_byte_at,
        "ended_at": call.ended_at,
        "ttfb_ms": _ms(call.started_at, call.first_byte_at),
        "duration_ms": _ms(call.started_at, call.ended_at),
        "overhead_ms": round(call.overhead_ms, 3),
        "bytes_in": int(call.bytes_in),
        "bytes_out": int(call.bytes_out),
        "error": scrub(call.error),
        "close_code": call.close_code,
    }


# -- configuration -----------------------------------------------------------

_SECTION = "dheera_ai_settings"


def _setting(config: ProxyConfig, name: str, check, default):
    settings = config.dheera_ai_settings or {}
    value = settings.get(name)
    if value is None:
        return default
    try:
        return check(value)
    except ValueError as e:
        raise ConfigError(str(e), path=config.path, where=f"{_SECTION}.{name}") from None


def _count(value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError("expected a whole number of at least 1")
    return value


def _seconds(value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 86400:
        raise ValueError("expected a number of seconds greater than 0")
    return float(value)


def _text(value) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValueError("expected a non-empty string")
    return value


def _url(value) -> str:
    if not isinstance(value, str):
        raise ValueError("expected an http:// or https:// URL")
    try:
        parts = urlsplit(value)
        parts.port  # noqa: B018 - reading .port raises ValueError on a bad port
    except ValueError:
        raise ValueError("expected an http:// or https:// URL (it does not parse as one)") from None
    if parts.scheme.lower() not in ("http", "https") or not parts.hostname or any(c.isspace() for c in value):
        raise ValueError("expected an http:// or https:// URL")
    return value


def _headers(value) -> Dict[str, str]:
    if not isinstance(value, dict):
        raise ValueError("expected a mapping of header names to values")
    headers = {}
    for name, text in value.items():
        if not isinstance(name, str) or not re.fullmatch(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+", name):
            raise ValueError("a header name is not a valid HTTP token")
        if isinstance(text, bool) or not isinstance(text, (str, int, float)):
            raise ValueError(f"the value of header {name} must be a string")
        text = str(text)
        if any(c in text for c in "\r\n\x00"):
            raise ValueError(f"the value of header {name} holds a line break")
        headers[name] = text
    return headers


def build_sinks(config: ProxyConfig, reactor, redis_client=None, stdout: Optional[TextIO] = None) -> List[ICallSink]:
    """
    Make the sinks named in C{dheera_ai_settings.callbacks}, checking their
    settings: C{json_log_path}, C{redis_stream_maxlen}, C{webhook_url},
    C{webhook_headers} (a mapping), C{webhook_batch_size},
    C{webhook_flush_interval}, and optionally C{webhook_max_queue},
    C{webhook_max_attempts}, C{webhook_timeout}.

    :param config: the proxy configuration.
    :param reactor: the reactor.
    :param redis_client: the proxy's L{dheera_tx.redis.client.RedisClient}
        (needed by C{redis_stream}).
    :param stdout: where C{json_log} writes without C{json_log_path}
        (default the process's real stdout, C{sys.__stdout__}).
    :raise ConfigError: a setting is wrong (one line; values are never
        quoted, a webhook URL may hold a token).
    """
    sinks: List[ICallSink] = []
    for name in config.callbacks:
        if name == "json_log":
            path = _setting(config, "json_log_path", _text, None)
            try:
                sinks.append(JSONLogSink(stream=stdout, path=path))
            except OSError as e:
                raise ConfigError(
                    f"cannot open the file: {e.strerror or type(e).__name__}", path=config.path, where=f"{_SECTION}.json_log_path"
                ) from None
        elif name == "redis_stream":
            maxlen = _setting(config, "redis_stream_maxlen", _count, 10000)
            if redis_client is None:
                raise ConfigError("the redis_stream log sink needs Redis", path=config.path, where=f"{_SECTION}.callbacks")
            sinks.append(RedisStreamSink(redis_client, config.general.redis_key_prefix, reactor, maxlen=maxlen))
        elif name == "webhook":
            url = _setting(config, "webhook_url", _url, None)
            if url is None:
                raise ConfigError(
                    "missing; the webhook log sink needs the URL to POST records to",
                    path=config.path,
                    where=f"{_SECTION}.webhook_url",
                )
            sinks.append(
                WebhookSink(
                    reactor,
                    url,
                    headers=_setting(config, "webhook_headers", _headers, {}),
                    batch_size=_setting(config, "webhook_batch_size", _count, 100),
                    flush_interval=_setting(config, "webhook_flush_interval", _seconds, 1.0),
                    max_queue=_setting(config, "webhook_max_queue", _count, 10000),
                    max_attempts=_setting(config, "webhook_max_attempts", _count, 5),
                    timeout=_setting(config, "webhook_timeout", _seconds, 10.0),
                )
            )
        else:
            raise ConfigError(f"unknown log sink {name}", path=config.path, where=f"{_SECTION}.callbacks")
    return sinks


class CallLog:
    """
    Hands every finished call to the log sinks and the metrics.

    :param sinks: providers of L{ICallSink}.
    :param metrics: a L{dheera_tx.observe.metrics.ProxyMetrics}, or L{None}; it is
        told about the sinks so that it can export their drop counters.
    """

    def __init__(self, sinks: Sequence[ICallSink] = (), metrics=None):
        self.sinks: List[ICallSink] = list(sinks)
        self._metrics = metrics
        if metrics is not None:
            metrics.add_sinks(self.sinks)

    def emit(self, call: Call) -> None:
        """
        Log one finished call.  Never raises.
        """
        if self._metrics is not None:
            try:
                self._metrics.observe_call(call)
            except Exception:
                log.failure("Metrics failed for call {call_id}", call_id=call.call_id)
        if not self.sinks:
            return
        try:
            record = call_record(call)
        except Exception:
            log.failure("Could not build the log record of call {call_id}", call_id=call.call_id)
            return
        for sink in self.sinks:
            try:
                sink.emit(record)
            except Exception:
                log.failure("Log sink {sink} failed", sink=getattr(sink, "name", repr(sink)))

    __call__ = emit

    def dropped(self) -> Dict[str, int]:
        """
        :return: records dropped so far, by sink name.
        """
        return {sink.name: sink.dropped for sink in self.sinks}

    def stop(self) -> Deferred:
        """
        Flush and stop every sink.

        :return: a Deferred that fires once all are done; never fails.
        """
        ds = []
        for sink in self.sinks:
            try:
                ds.append(Deferred.fromCoroutine(_settle(sink.stop())))
            except Exception:
                log.failure("Log sink {sink} failed to stop", sink=sink.name)
        return gatherResults(ds).addCallback(lambda _: None)


async def _settle(d: Deferred) -> None:
    try:
        await d
    except Exception:
        log.failure("A log sink failed while stopping")
