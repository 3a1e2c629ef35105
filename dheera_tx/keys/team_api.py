"""
The admin API for team records, a Klein app in the shape of LiteLLM's::

    POST /team/new       {"team_id" (optional), "team_alias", "priority", "weight", "metadata"}
    POST /team/update    {"team_id", ...fields}   (null clears a field)
    GET  /team/info?team_id=ID   -> {"team_id", "team_info", "keys"}
    GET  /team/list              -> [team, ...]
    POST /team/delete    {"team_ids": [...]}

Every route takes the master key only.  Fields are checked by the same
checks as the key fields of the same name
(L{dheera_tx.keys.fields.validate_team_fields}); errors are in the OpenAI
shape.  The records are kept by L{dheera_tx.keys.team_store.RedisTeamStore};
a key names its team with its own C{team_id}, and a key may name a team
that has no record.
"""

from klein import Klein
from twisted.logger import Logger
from werkzeug.exceptions import MethodNotAllowed, NotFound

from dheera_tx.errors import bad_request
from dheera_tx.keys.api import (
    json_body,
    json_route,
    method_not_allowed_answer,
    name_list,
    not_found_answer,
    only_fields,
    query_arg,
    team_arg,
)
from dheera_tx.keys.auth import require_master
from dheera_tx.keys.fields import TEAM_NEW_FIELDS, TEAM_UPDATE_FIELDS, validate_team_fields
from dheera_tx.keys.store import MAX_PAGE_SIZE, not_found

log = Logger()


class TeamAPI:
    """
    The /team/ routes.  Mount C{TeamAPI(...).app.resource()}.

    :param authenticator: a L{dheera_tx.keys.auth.Authenticator}.
    :param team_store: a L{dheera_tx.keys.team_store.RedisTeamStore}.
    :param key_store: the key store, to list a team's keys in /team/info.
    """

    app = Klein()

    def __init__(self, authenticator, team_store, key_store):
        self._authenticator = authenticator
        self._teams = team_store
        self._keys = key_store

    @app.route("/team/new", methods=["POST"])
    @json_route
    async def new(self, request, principal):
        """
        Make a team record (400 if the id has one).
        """
        require_master(principal)
        fields = validate_team_fields(json_body(request), allowed=TEAM_NEW_FIELDS)
        record = await self._teams.new_team(fields)
        log.info("Team {team!r} made", team=record.team_id)
        return record.to_api()

    @app.route("/team/update", methods=["POST"])
    @json_route
    async def update(self, request, principal):
        """
        Change some fields of a team record; its keys' cached records are
        dropped in every process.
        """
        require_master(principal)
        fields = validate_team_fields(json_body(request), allowed=TEAM_UPDATE_FIELDS, required=("team_id",))
        team_id = fields.pop("team_id")
        record = await self._teams.update_team(team_id, fields)
        log.info("Team {team!r} updated ({fields})", team=team_id, fields=", ".join(sorted(fields)))
        return record.to_api()

    @app.route("/team/info", methods=["GET"])
    @json_route
    async def info(self, request, principal):
        """
        Describe a team record, with the tokens of (up to 100 of) its keys.
        """
        require_master(principal)
        team_id = team_arg(query_arg(request, "team_id"))
        if team_id is None:
            raise bad_request("team_id is required.", "team_id")
        record = await self._teams.get_team(team_id)
        if record is None:
            raise not_found("Team")
        keys, total = await self._keys.list_keys(page=1, size=MAX_PAGE_SIZE, team_id=team_id)
        return {"team_id": team_id, "team_info": record.to_api(), "keys": [k.token for k in keys], "key_count": total}

    @app.route("/team/list", methods=["GET"])
    @json_route
    async def list_teams(self, request, principal):
        """
        Every team record, oldest first.
        """
        require_master(principal)
        return [record.to_api() for record in await self._teams.list_teams()]

    @app.route("/team/delete", methods=["POST"])
    @json_route
    async def delete(self, request, principal):
        """
        Delete team records (404 if none existed); their keys keep working
        with nothing to inherit.
        """
        require_master(principal)
        body = json_body(request)
        only_fields(body, ("team_ids",))
        deleted = await self._teams.delete_teams(name_list(body, "team_ids"))
        if not deleted:
            raise not_found("Team")
        log.info("Deleted {n} team(s)", n=len(deleted))
        return {"deleted_teams": deleted}

    @app.handle_errors(NotFound)
    def _not_found(self, request, failure):
        """
        Unknown paths under /team/ get a JSON 404.
        """
        return not_found_answer(request, failure)

    @app.handle_errors(MethodNotAllowed)
    def _method_not_allowed(self, request, failure):
        """
        A known path with the wrong method gets a JSON 405.
        """
        return method_not_allowed_answer(request, failure)
