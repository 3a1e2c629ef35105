"""
The fields of key, team and end-user API bodies: each is checked and
normalized before anything is stored, and turned into L{KeyRecord},
L{TeamRecord} and L{EndUserRecord} attribute changes.  A team's fields are
checked by the same checks as a key's fields of the same name.

C{priority} and C{weight} given as C{null} mean I{not set}: a key then
inherits its team's, a team leaves its keys at the defaults (0 and 1).
"""

import json
import math

from dheera_tx.errors import bad_request
from dheera_tx.keys.records import MAX_LIST_LENGTH, MAX_NAME_LENGTH, parse_duration, token_of

__all__ = [
    "validate_key_fields",
    "validate_end_user_fields",
    "validate_team_fields",
    "key_changes",
    "team_changes",
    "end_user_changes",
    "GENERATE_FIELDS",
    "UPDATE_FIELDS",
    "END_USER_FIELDS",
    "TEAM_NEW_FIELDS",
    "TEAM_UPDATE_FIELDS",
]


def _name(value, field):
    if value is None:
        return None
    if not isinstance(value, str) or not value or len(value) > MAX_NAME_LENGTH:
        raise bad_request(f"{field} must be a non-empty string of at most {MAX_NAME_LENGTH} characters, or null.", field)
    return value


def _string_list(value, field):
    if value is None:
        return ()
    if (
        not isinstance(value, list)
        or len(value) > MAX_LIST_LENGTH
        or not all(isinstance(v, str) and v and len(v) <= MAX_NAME_LENGTH for v in value)
    ):
        raise bad_request(
            f"{field} must be a list of at most {MAX_LIST_LENGTH} non-empty strings of at most "
            f"{MAX_NAME_LENGTH} characters.",
            field,
        )
    return tuple(value)


def _money(value, field):
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise bad_request(f"{field} must be a number of USD, 0 or more, or null.", field)
    return float(value)


def _count(value, field):
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise bad_request(f"{field} must be a whole number, 0 or more, or null.", field)
    return value


def _priority(value, field):
    # vLLM's priority field: any integer, lower is served first.  None is
    # "not set" (inherited from the team, else 0), not 0 itself.
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or abs(value) > 2**31:
        raise bad_request(f"{field} must be a whole number (lower is served first), or null.", field)
    return value


def _weight(value, field):
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or not 0.001 <= value <= 1000:
        raise bad_request(f"{field} must be a number from 0.001 to 1000, or null.", field)
    return float(value)


def _duration(value, field):
    if value is None:
        return None
    try:
        parse_duration(value)
    except ValueError:
        raise bad_request(f"{field} must be a duration like \"30s\", \"10m\", \"24h\" or \"30d\", or null.", field) from None
    return value


def _metadata(value, field):
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise bad_request(f"{field} must be a JSON object.", field)
    try:
        # Python's JSON reads NaN and Infinity; answers holding them would
        # not be JSON to any other client.
        json.dumps(value, allow_nan=False)
    except ValueError:
        raise bad_request(f"{field} must not hold NaN or Infinity.", field) from None
    return value


def _flag(value, field):
    if value is None:
        return False
    if not isinstance(value, bool):
        raise bad_request(f"{field} must be true or false.", field)
    return value


def _key_ref(value, field):
    return token_of(value, field)


_CHECKS = {
    "key": _key_ref,
    "key_alias": _name,
    "duration": _duration,
    "models": _string_list,
    "allowed_routes": _string_list,
    "max_budget": _money,
    "budget_duration": _duration,
    "rpm_limit": _count,
    "tpm_limit": _count,
    "max_parallel_requests": _count,
    "user_id": _name,
    "team_id": _name,
    "team_alias": _name,
    "priority": _priority,
    "weight": _weight,
    "metadata": _metadata,
    "blocked": _flag,
}

#: The fields of a /team/new body (C{team_id} optional: one is made up).
TEAM_NEW_FIELDS = frozenset({"team_id", "team_alias", "priority", "weight", "metadata"})
#: The fields of a /team/update body (C{team_id} is required).
TEAM_UPDATE_FIELDS = TEAM_NEW_FIELDS
#: The fields of a /key/generate body.
GENERATE_FIELDS = frozenset(_CHECKS) - {"key", "team_alias"}
#: The fields of a /key/update body (C{key} is required).
UPDATE_FIELDS = GENERATE_FIELDS | {"key"}
#: The fields of /end_user/new and /end_user/update bodies.
#: C{team_id} names the end user's scope (the team of the keys it is the end
#: user of); without it, the default scope of keys without a team.
END_USER_FIELDS = frozenset({"user_id", "team_id", "max_budget", "budget_duration", "blocked", "metadata"})


def _validate(body, allowed, required=()) -> dict:
    if not isinstance(body, dict):
        raise bad_request("The request body must be a JSON object.")
    unknown = sorted(set(body) - set(allowed))
    if unknown:
        raise bad_request("Unknown field(s): " + ", ".join(unknown) + ".", unknown[0])
    for name in required:
        if body.get(name) is None:
            raise bad_request(f"{name} is required.", name)
    return {name: _CHECKS[name](value, name) for name, value in body.items()}


def validate_key_fields(body: object, *, allowed=GENERATE_FIELDS) -> dict:
    """
    Check the fields of a /key/generate or /key/update body.

    :param body: the decoded JSON body.
    :param allowed: the field names this route takes; C{key}, if allowed,
        is required and comes back as a token.
    :return: the fields with normalized values (lists as tuples, C{None}
        lists as empty ones, C{key} as a token).
    :raise ProxyError: 400 naming the unknown fields, a missing C{key}, or
        the field with a wrong type or value.
    """
    return _validate(body, allowed, required=("key",) if "key" in allowed else ())


def validate_end_user_fields(body: object, *, allowed=END_USER_FIELDS) -> dict:
    """
    Check the fields of an /end_user/new or /end_user/update body
    (C{user_id} is required).

    :raise ProxyError: 400, as L{validate_key_fields}.
    """
    return _validate(body, allowed, required=("user_id",))


def validate_team_fields(body: object, *, allowed=TEAM_NEW_FIELDS, required=()) -> dict:
    """
    Check the fields of a /team/new or /team/update body.

    :param allowed: the field names this route takes.
    :param required: the fields that must be given (and not null):
        C{("team_id",)} for /team/update.
    :raise ProxyError: 400, as L{validate_key_fields}.
    """
    return _validate(body, allowed, required=required)


def team_changes(fields: dict) -> dict:
    """
    Turn validated team fields into L{TeamRecord} attribute values.

    :param fields: the result of L{validate_team_fields} (C{team_id}
        ignored).
    :return: attribute name -> new value (L{None} clears).
    """
    return {name: fields[name] for name in ("team_alias", "priority", "weight", "metadata") if name in fields}


def _window(fields: dict, now: float) -> dict:
    changes = {}
    if "max_budget" in fields:
        changes["max_budget"] = fields["max_budget"]
    if "budget_duration" in fields:
        window = parse_duration(fields["budget_duration"])
        changes["budget_duration"] = fields["budget_duration"]
        changes["budget_reset_at"] = None if window is None else now + window
    if "metadata" in fields:
        changes["metadata"] = fields["metadata"]
    if "blocked" in fields:
        changes["blocked"] = fields["blocked"]
    return changes


def key_changes(fields: dict, now: float) -> dict:
    """
    Turn validated key fields into L{KeyRecord} attribute values:
    C{duration} becomes C{expires} (counted from C{now}), C{budget_duration}
    sets C{budget_reset_at}.

    :param fields: the result of L{validate_key_fields} (C{key} ignored).
    :param now: epoch seconds.
    :return: attribute name -> new value (L{None} clears).
    """
    changes = _window(fields, now)
    for name in ("key_alias", "models", "allowed_routes", "rpm_limit", "tpm_limit", "max_parallel_requests", "user_id", "team_id",
                 "priority", "weight"):
        if name in fields:
            changes[name] = fields[name]
    if "duration" in fields:
        seconds = parse_duration(fields["duration"])
        changes["expires"] = None if seconds is None else now + seconds
    return changes


def end_user_changes(fields: dict, now: float) -> dict:
    """
    Turn validated end-user fields into L{EndUserRecord} attribute values.

    :param fields: the result of L{validate_end_user_fields} (C{user_id}
        ignored).
    :param now: epoch seconds.
    """
    return _window(fields, now)
