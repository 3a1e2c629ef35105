"""
End users and their scope: an end user (the C{x-dheera-end-user} header, else
the body's C{user}) belongs to the team of the key that calls for it, so the
same id in two teams is two end users.  Their Redis names and report ids,
shared by the admission and settlement scripts and by the key store.
"""

from typing import Optional, Tuple

#: The end user that ids seen in traffic are counted under once a team has
#: seen C{general_settings.max_new_end_users_per_day} new ones that day.
OVERFLOW_END_USER = "__overflow__"


def _escape_team(team_id: str) -> str:
    # A team id may hold ":", which would make "team:a:b:end_user:c" read
    # two ways; "%" is escaped first so that the escape reads back.
    return team_id.replace("%", "%25").replace(":", "%3A")


def _unescape_team(text: str) -> str:
    return text.replace("%3A", ":").replace("%25", "%")


def team_name(team_id: str) -> str:
    """
    The name (under the Redis prefix) of a team's own hash,
    C{team:<team>} (C{%} and C{:} escaped as for end users, so that it is
    never the name of one of the team's end users).
    """
    return "team:" + _escape_team(team_id)


def team_of_name(name: str) -> Optional[str]:
    """
    The inverse of L{team_name}.

    :return: the team id, or L{None} when C{name} is not a team's hash name.
    """
    if not name.startswith("team:") or ":" in name[5:]:
        return None
    return _unescape_team(name[5:])


def end_user_name(user_id: str, team_id: Optional[str]) -> str:
    """
    The name (under the Redis prefix) of an end user's hash.  End users are
    scoped to the team of the key that calls for them: C{end_user:<id>} in
    the default scope (keys without a team, the master key, and every end
    user written by versions before scoping), C{team:<team>:end_user:<id>}
    in a team's, with C{%} and C{:} of the team id written C{%25} and
    C{%3A}.

    :param team_id: the scope, or L{None} for the default one.
    """
    if team_id is None:
        return "end_user:" + user_id
    return f"team:{_escape_team(team_id)}:end_user:{user_id}"


def end_user_report_id(user_id: str, team_id: Optional[str]) -> str:
    """
    :return: the C{<group>:<id>} an end user's per-day report counters are
        named by: C{end_user:<id>} in the default scope (as before
        scoping), C{team_end_user:<team>:<id>} in a team's.
    """
    if team_id is None:
        return "end_user:" + user_id
    return f"team_end_user:{_escape_team(team_id)}:{user_id}"


def parse_end_user_report_id(group: str, ident: str) -> Tuple[Optional[str], str]:
    """
    The inverse of L{end_user_report_id}.

    :param group: C{end_user} or C{team_end_user}.
    :param ident: what follows C{<group>:} in the counter's name.
    :return: C{(team_id or None, user_id)}.
    """
    if group == "end_user":
        return None, ident
    team, _, user_id = ident.partition(":")
    return _unescape_team(team), user_id
