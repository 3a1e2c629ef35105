"""
The call log as the console reads it: the C{redis_stream} sink's stream,
newest first, filtered by model, key and status.
"""

import json
from typing import Callable, List, Optional

#: Call records read from the stream for a page.
CALLS_SHOWN = 200


def call_filter(request) -> Callable[[dict], bool]:
    """
    :return: a predicate on call records from the request's C{model},
        C{key} (alias or hash prefix) and C{status} arguments.
    """

    def arg(name):
        value = (request.args.get(name.encode()) or [b""])[-1].decode("utf-8", "replace").strip()
        return value or None

    model, key, status = arg("model"), arg("key"), arg("status")
    return lambda r: (
        (model is None or r.get("model_name") == model)
        and (key is None or r.get("key_alias") == key or (r.get("key_hash_prefix") or "").startswith(key))
        and (status is None or str(r.get("status")) == status)
    )


class CallFeed:
    """
    Reads call records from the stream.

    :param redis: the Redis client.
    :param stream_key: the stream, or L{None} when the sink is off (then
        there are no records).
    """

    def __init__(self, redis, stream_key: Optional[str]):
        self._redis = redis
        self._stream = stream_key

    async def read(self, keep: Callable[[dict], bool], after: Optional[str] = None) -> List[dict]:
        """
        :param after: a stream id: only records newer than it.
        :return: up to L{CALLS_SHOWN} records that C{keep} accepts, newest
            first, each with its stream id as C{_id}.
        """
        if self._stream is None:
            return []
        if after:
            entries = await self._redis.execute("XRANGE", self._stream, "(" + after, "+", "COUNT", CALLS_SHOWN)
            entries = list(reversed(entries or []))
        else:
            entries = await self._redis.execute("XREVRANGE", self._stream, "+", "-", "COUNT", CALLS_SHOWN)
        calls = []
        for entry_id, fields in entries or ():
            if isinstance(fields, list):
                fields = dict(zip(fields[::2], fields[1::2]))
            try:
                record = json.loads(fields.get("record", ""))
            except ValueError:
                continue
            if keep(record):
                record["_id"] = entry_id
                calls.append(record)
        return calls
