"""
Virtual keys and end users as values: what they hold, how they look in Redis
and in API answers.  How API request fields are checked is
L{dheera_tx.keys.fields}.

A key is C{sk-} + 32 url-safe random bytes, shown once; at rest only its
SHA-256 hex digest (the I{token}) exists.

In Redis a key is a hash whose fields are the L{KeyRecord} attributes (the
token is the hash's name, not a field).  Values are text: numbers in
decimal, C{models}, C{allowed_routes} and C{metadata} as JSON, C{blocked}
as C{0}/C{1}, times as epoch seconds.  A field that is L{None} is absent.
C{spend_nanos} is an integer so that Lua scripts can C{HINCRBY} it.

A team (L{TeamRecord}) is a hash of its own, and a key names its team by
C{team_id}.  A key's C{priority} and C{weight} are L{None} until set: then
the key inherits its team's (L{KeyRecord.flow_priority},
L{KeyRecord.flow_weight}), else 0 and 1.  The team rides along in a loaded
key record (L{KeyRecord.team}, not a hash field) so that a call needs no
lookup of its own for it.
"""

import json
import re
import secrets
from datetime import datetime, timezone
from typing import Dict, Mapping, Optional, Tuple

import attr

from dheera_tx.accounting.metering import nanos_to_usd
from dheera_tx.errors import bad_request
from dheera_tx.keys.auth import hash_key

__all__ = [
    "generate_key",
    "hash_key",
    "token_of",
    "parse_duration",
    "KeyRecord",
    "TeamRecord",
    "EndUserRecord",
]

_DURATION = re.compile(r"^([0-9]{1,9})([smhdw])$")
_UNIT = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_MAX_DURATION = 100 * 365 * 86400
_TOKEN = re.compile(r"^[0-9a-fA-F]{64}$")
MAX_NAME_LENGTH = 256
# Models or routes on one key: every call loads the key record.
MAX_LIST_LENGTH = 1000


def generate_key() -> str:
    """
    :return: a new virtual key, C{sk-} + 32 url-safe random bytes.
    """
    return "sk-" + secrets.token_urlsafe(32)


def token_of(value: object, param: str = "key") -> str:
    """
    The token (SHA-256 hex) for a key given either as the key itself or as
    its hash, as the admin API accepts both.

    :param value: an C{sk-} key or a 64-digit hex digest.
    :param param: the request field, for the error.
    :raise ProxyError: 400 when C{value} is neither.
    """
    if isinstance(value, str):
        if value.startswith("sk-"):
            return hash_key(value)
        if _TOKEN.fullmatch(value):
            return value.lower()
    raise bad_request(f"{param} must be a key (sk-...) or its SHA-256 hex digest.", param)


def parse_duration(text: Optional[str]) -> Optional[int]:
    """
    :param text: C{"30s"}, C{"10m"}, C{"24h"}, C{"30d"} (or C{"2w"}), or
        L{None}.
    :return: the duration in seconds, or L{None} for L{None}.
    :raise ValueError: for anything else (zero and over 100 years included).
    """
    if text is None:
        return None
    match = _DURATION.fullmatch(text) if isinstance(text, str) else None
    if match is None:
        raise ValueError(f"{text!r} is not a duration like 30s, 10m, 24h or 30d")
    seconds = int(match.group(1)) * _UNIT[match.group(2)]
    if seconds <= 0 or seconds > _MAX_DURATION:
        raise ValueError(f"{text!r} must be more than 0 and at most 100 years")
    return seconds


def iso_time(epoch: Optional[float]) -> Optional[str]:
    """
    :return: C{epoch} as ISO-8601 UTC (C{2025-01-31T12:00:00Z}), or L{None}.
    """
    if epoch is None:
        return None
    text = datetime.fromtimestamp(epoch, timezone.utc).isoformat()
    return text.replace("+00:00", "Z")


def _num(value: Optional[float]) -> Optional[str]:
    return None if value is None else repr(float(value))


def _int(value: Optional[int]) -> Optional[str]:
    return None if value is None else str(int(value))


def _opt_float(mapping: Mapping[str, str], name: str) -> Optional[float]:
    value = mapping.get(name)
    return None if value in (None, "") else float(value)


def _opt_int(mapping: Mapping[str, str], name: str) -> Optional[int]:
    value = mapping.get(name)
    return None if value in (None, "") else int(value)


def _json(mapping: Mapping[str, str], name: str, default):
    value = mapping.get(name)
    return default if value in (None, "") else json.loads(value)


def _without_none(fields: Dict[str, Optional[str]]) -> Dict[str, str]:
    return {k: v for k, v in fields.items() if v is not None}


#: The queue priority and weight of a call whose key and team set none.
DEFAULT_PRIORITY = 0
DEFAULT_WEIGHT = 1.0


@attr.s(frozen=True, slots=True, auto_attribs=True)
class TeamRecord:
    """
    A team: the keys whose C{team_id} names it share its queue priority and
    weight where they set none of their own.  A key may name a team that has
    no record; it then has none to inherit.

    :ivar team_id: the team's id (from the hash's name, not a field).
    :ivar priority: the gateway queue priority of the team's keys (lower
        first), or L{None}.
    :ivar weight: their fair-share weight, or L{None}.
    """

    team_id: str
    team_alias: Optional[str] = None
    priority: Optional[int] = None
    weight: Optional[float] = None
    metadata: dict = attr.ib(factory=dict, hash=False)
    created_at: float = 0.0

    def to_redis_hash(self) -> Dict[str, str]:
        """
        :return: the fields of this team's Redis hash (L{None} fields left
            out).
        """
        return _without_none(
            {
                "team_alias": self.team_alias,
                "priority": _int(self.priority),
                "weight": _num(self.weight),
                "metadata": json.dumps(self.metadata, sort_keys=True),
                "created_at": _num(self.created_at),
            }
        )

    @classmethod
    def from_redis_hash(cls, team_id: str, mapping: Mapping[str, str]) -> "TeamRecord":
        """
        :param team_id: the team's id (from the hash's name).
        :param mapping: the hash's fields, as C{HGETALL} returns them.
        """
        return cls(
            team_id=team_id,
            team_alias=mapping.get("team_alias") or None,
            priority=_opt_int(mapping, "priority"),
            weight=_opt_float(mapping, "weight"),
            metadata=_json(mapping, "metadata", {}),
            created_at=_opt_float(mapping, "created_at") or 0.0,
        )

    def to_api(self) -> dict:
        """
        :return: the JSON answer describing this team.
        """
        return {
            "team_id": self.team_id,
            "team_alias": self.team_alias,
            "priority": self.priority,
            "weight": self.weight,
            "metadata": self.metadata,
            "created_at": iso_time(self.created_at),
        }


@attr.s(frozen=True, slots=True, auto_attribs=True)
class KeyRecord:
    """
    One virtual key.

    :ivar token: SHA-256 hex of the key.
    :ivar models: allowed model names; empty means all.
    :ivar allowed_routes: allowed /vllm path prefixes; empty means all.
    :ivar max_budget: USD the key may spend (per C{budget_duration}
        window if set), or L{None} for no limit.
    :ivar budget_reset_at: epoch seconds when the budget window resets.
    :ivar expires: epoch seconds after which the key is refused, or L{None}.
    :ivar priority: the key's own gateway queue priority (lower first),
        or L{None} to inherit (L{flow_priority}).
    :ivar weight: the key's own fair-share weight, or L{None} to inherit
        (L{flow_weight}).
    :ivar spend_nanos: spend in nano-USD.  In a cached record this is
        stale: budget checks read Redis.
    :ivar team: the record of the team C{team_id} names, when it has one
        and the record was loaded with the key (not stored in the key's
        hash).
    """

    token: str
    key_alias: Optional[str] = None
    models: Tuple[str, ...] = ()
    allowed_routes: Tuple[str, ...] = ()
    max_budget: Optional[float] = None
    budget_duration: Optional[str] = None
    budget_reset_at: Optional[float] = None
    rpm_limit: Optional[int] = None
    tpm_limit: Optional[int] = None
    max_parallel_requests: Optional[int] = None
    user_id: Optional[str] = None
    team_id: Optional[str] = None
    priority: Optional[int] = None
    weight: Optional[float] = None
    metadata: dict = attr.ib(factory=dict, hash=False)
    blocked: bool = False
    expires: Optional[float] = None
    created_at: float = 0.0
    spend_nanos: int = 0
    team: Optional[TeamRecord] = attr.ib(default=None, hash=False)

    @property
    def spend(self) -> float:
        """
        Spend in USD.
        """
        return nanos_to_usd(self.spend_nanos)

    @property
    def flow_priority(self) -> int:
        """
        The priority the key's calls get in the gateway queue (and as vLLM's
        C{priority} where a deployment forwards it): the key's own when set,
        else its team's, else 0.  A key's own value wins over its team's:
        the master key sets both, so a key set apart inside its team is
        meant.
        """
        if self.priority is not None:
            return self.priority
        team = self.team
        if team is not None and team.priority is not None:
            return team.priority
        return DEFAULT_PRIORITY

    @property
    def flow_weight(self) -> float:
        """
        The key's fair-share weight: its own when set, else its team's,
        else 1.
        """
        if self.weight is not None:
            return self.weight
        team = self.team
        if team is not None and team.weight is not None:
            return team.weight
        return DEFAULT_WEIGHT

    def to_redis_hash(self) -> Dict[str, str]:
        """
        :return: the fields of this key's Redis hash (L{None} fields left
            out).
        """
        return _without_none(
            {
                "key_alias": self.key_alias,
                "models": json.dumps(list(self.models)),
                "allowed_routes": json.dumps(list(self.allowed_routes)),
                "max_budget": _num(self.max_budget),
                "budget_duration": self.budget_duration,
                "budget_reset_at": _num(self.budget_reset_at),
                "rpm_limit": _int(self.rpm_limit),
                "tpm_limit": _int(self.tpm_limit),
                "max_parallel_requests": _int(self.max_parallel_requests),
                "user_id": self.user_id,
                "team_id": self.team_id,
                "priority": _int(self.priority),
                "weight": _num(self.weight),
                "metadata": json.dumps(self.metadata, sort_keys=True),
                "blocked": "1" if self.blocked else "0",
                "expires": _num(self.expires),
                "created_at": _num(self.created_at),
                "spend_nanos": str(int(self.spend_nanos)),
            }
        )

    @classmethod
    def from_redis_hash(cls, token: str, mapping: Mapping[str, str]) -> "KeyRecord":
        """
        :param token: the key's SHA-256 hex (from the hash's name).
        :param mapping: the hash's fields, as C{HGETALL} returns them.
        """
        return cls(
            token=token,
            key_alias=mapping.get("key_alias") or None,
            models=tuple(_json(mapping, "models", [])),
            allowed_routes=tuple(_json(mapping, "allowed_routes", [])),
            max_budget=_opt_float(mapping, "max_budget"),
            budget_duration=mapping.get("budget_duration") or None,
            budget_reset_at=_opt_float(mapping, "budget_reset_at"),
            rpm_limit=_opt_int(mapping, "rpm_limit"),
            tpm_limit=_opt_int(mapping, "tpm_limit"),
            max_parallel_requests=_opt_int(mapping, "max_parallel_requests"),
            user_id=mapping.get("user_id") or None,
            team_id=mapping.get("team_id") or None,
            priority=_opt_int(mapping, "priority"),
            weight=_opt_float(mapping, "weight"),
            metadata=_json(mapping, "metadata", {}),
            blocked=mapping.get("blocked") == "1",
            expires=_opt_float(mapping, "expires"),
            created_at=_opt_float(mapping, "created_at") or 0.0,
            spend_nanos=int(mapping.get("spend_nanos") or 0),
        )

    def to_api(self, key: Optional[str] = None) -> dict:
        """
        :param key: the key itself, only when it is being handed out (by
            /key/generate and /key/regenerate).
        :return: the JSON answer describing this key.
        """
        answer = {"token": self.token}
        if key is not None:
            answer["key"] = key
        answer.update(
            key_alias=self.key_alias,
            models=list(self.models),
            allowed_routes=list(self.allowed_routes),
            max_budget=self.max_budget,
            budget_duration=self.budget_duration,
            budget_reset_at=iso_time(self.budget_reset_at),
            rpm_limit=self.rpm_limit,
            tpm_limit=self.tpm_limit,
            max_parallel_requests=self.max_parallel_requests,
            user_id=self.user_id,
            team_id=self.team_id,
            priority=self.priority,
            weight=self.weight,
            metadata=self.metadata,
            blocked=self.blocked,
            expires=iso_time(self.expires),
            created_at=iso_time(self.created_at),
            spend=self.spend,
            spend_nanos=self.spend_nanos,
        )
        return answer


@attr.s(frozen=True, slots=True, auto_attribs=True)
class EndUserRecord:
    """
    An end user (the C{x-dheera-end-user} header or the body's C{user}).

    :ivar created_at: when the admin API made it, or L{None} for an end user
        known only from traffic (a hash holding spend alone, which expires
        C{general_settings.end_user_ttl_days} after its last call).
    :ivar team_id: the team whose keys it is the end user of, or L{None}
        for the default scope (not a hash field: the hash's name says it).
    """

    user_id: str
    max_budget: Optional[float] = None
    budget_duration: Optional[str] = None
    budget_reset_at: Optional[float] = None
    blocked: bool = False
    spend_nanos: int = 0
    metadata: dict = attr.ib(factory=dict, hash=False)
    created_at: Optional[float] = None
    team_id: Optional[str] = None

    @property
    def spend(self) -> float:
        """
        Spend in USD.
        """
        return nanos_to_usd(self.spend_nanos)

    def to_redis_hash(self) -> Dict[str, str]:
        """
        :return: the fields of this end user's Redis hash.
        """
        return _without_none(
            {
                "max_budget": _num(self.max_budget),
                "budget_duration": self.budget_duration,
                "budget_reset_at": _num(self.budget_reset_at),
                "blocked": "1" if self.blocked else "0",
                "spend_nanos": str(int(self.spend_nanos)),
                "metadata": json.dumps(self.metadata, sort_keys=True),
                "created_at": _num(self.created_at),
            }
        )

    @classmethod
    def from_redis_hash(cls, user_id: str, mapping: Mapping[str, str], team_id: Optional[str] = None) -> "EndUserRecord":
        """
        :param user_id: the end user's id (from the hash's name).
        :param mapping: the hash's fields.
        :param team_id: its scope (from the hash's name).
        """
        return cls(
            user_id=user_id,
            team_id=team_id,
            max_budget=_opt_float(mapping, "max_budget"),
            budget_duration=mapping.get("budget_duration") or None,
            budget_reset_at=_opt_float(mapping, "budget_reset_at"),
            blocked=mapping.get("blocked") == "1",
            spend_nanos=int(mapping.get("spend_nanos") or 0),
            metadata=_json(mapping, "metadata", {}),
            created_at=_opt_float(mapping, "created_at"),
        )

    def to_api(self) -> dict:
        """
        :return: the JSON answer describing this end user.
        """
        return {
            "user_id": self.user_id,
            "team_id": self.team_id,
            "max_budget": self.max_budget,
            "budget_duration": self.budget_duration,
            "budget_reset_at": iso_time(self.budget_reset_at),
            "blocked": self.blocked,
            "metadata": self.metadata,
            "created_at": iso_time(self.created_at),
            "spend": self.spend,
            "spend_nanos": self.spend_nanos,
        }


def redis_fields(record_class, changes: dict) -> Tuple[Dict[str, str], Tuple[str, ...]]:
    """
    Encode attribute changes as Redis hash fields to set and to delete.

    :param record_class: L{KeyRecord}, L{TeamRecord} or L{EndUserRecord}.
    :param changes: attribute name -> value, as from L{key_changes}.
    :return: C{(fields to set, fields to delete)}.
    """
    placeholder = "0" * 64 if record_class is KeyRecord else ""
    first = {KeyRecord: "token", TeamRecord: "team_id", EndUserRecord: "user_id"}[record_class]
    encoded = record_class(**{first: placeholder, **changes}).to_redis_hash()
    set_fields = {name: encoded[name] for name in changes if name in encoded}
    deleted = tuple(name for name in changes if name not in encoded)
    return set_fields, deleted
