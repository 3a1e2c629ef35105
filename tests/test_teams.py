"""
Team records as values: what a key inherits from its team (its own
C{priority} and C{weight} win, then the team's, then 0 and 1), how "not set"
survives the trip through a Redis hash, how team fields are checked, and the
Redis names of teams.
"""

from twisted.trial.unittest import SynchronousTestCase

from dheera_tx.accounting.end_users import end_user_name, team_name, team_of_name
from dheera_tx.errors import ProxyError
from dheera_tx.keys.fields import TEAM_NEW_FIELDS, validate_key_fields, validate_team_fields
from dheera_tx.keys.records import KeyRecord, TeamRecord, redis_fields

TOKEN = "ab" * 32


class InheritanceTests(SynchronousTestCase):
    """
    L{KeyRecord.flow_priority} and L{KeyRecord.flow_weight}.
    """

    def test_defaults(self):
        """
        A key that sets nothing and has no team record queues at priority 0
        with weight 1.
        """
        key = KeyRecord(token=TOKEN, team_id="red")
        self.assertEqual((key.flow_priority, key.flow_weight), (0, 1.0))

    def test_team_values_inherited(self):
        """
        A key that sets nothing takes its team's priority and weight.
        """
        key = KeyRecord(token=TOKEN, team_id="red", team=TeamRecord("red", priority=4, weight=2.5))
        self.assertEqual((key.flow_priority, key.flow_weight), (4, 2.5))

    def test_key_values_win(self):
        """
        A key's own priority and weight beat its team's, including an
        explicit 0 priority against a team's 4.
        """
        key = KeyRecord(token=TOKEN, team_id="red", priority=0, weight=0.5, team=TeamRecord("red", priority=4, weight=2.5))
        self.assertEqual((key.flow_priority, key.flow_weight), (0, 0.5))

    def test_each_field_on_its_own(self):
        """
        Priority and weight are inherited separately: a key setting only
        its weight takes its team's priority; a team setting only its
        priority leaves the weight at 1.
        """
        key = KeyRecord(token=TOKEN, team_id="red", weight=3.0, team=TeamRecord("red", priority=-2))
        self.assertEqual((key.flow_priority, key.flow_weight), (-2, 3.0))


class RedisHashTests(SynchronousTestCase):
    """
    Team and key records through their Redis hashes.
    """

    def test_unset_stays_unset(self):
        """
        A key that sets no priority or weight stores neither field, and
        reads back as not set; an explicit 0 and 1 are stored and read back
        as set (so they still beat a team's).
        """
        plain = KeyRecord(token=TOKEN)
        self.assertNotIn("priority", plain.to_redis_hash())
        self.assertNotIn("weight", plain.to_redis_hash())
        self.assertEqual(KeyRecord.from_redis_hash(TOKEN, plain.to_redis_hash()).priority, None)
        explicit = KeyRecord(token=TOKEN, priority=0, weight=1.0)
        back = KeyRecord.from_redis_hash(TOKEN, explicit.to_redis_hash())
        self.assertEqual((back.priority, back.weight), (0, 1.0))

    def test_team_round_trip(self):
        """
        A team record reads back from its hash as it was written; a null
        field is absent.
        """
        team = TeamRecord("red", team_alias="Red", priority=3, weight=0.25, metadata={"a": 1}, created_at=5.0)
        self.assertEqual(TeamRecord.from_redis_hash("red", team.to_redis_hash()), team)
        self.assertNotIn("priority", TeamRecord("blue").to_redis_hash())

    def test_team_changes_clear(self):
        """
        Setting a team's priority to null deletes the field instead of
        writing one.
        """
        to_set, to_delete = redis_fields(TeamRecord, {"priority": None, "weight": 2.0})
        self.assertEqual((to_set, to_delete), ({"weight": "2.0"}, ("priority",)))

    def test_team_not_stored_in_key(self):
        """
        The team riding along in a key record is not a field of the key's
        hash.
        """
        key = KeyRecord(token=TOKEN, team_id="red", team=TeamRecord("red", priority=1))
        self.assertNotIn("team", key.to_redis_hash())

    def test_names(self):
        """
        A team's hash is C{team:<id>} with C{:} and C{%} escaped, so it is
        never the name of an end user of any team, and it reads back.
        """
        self.assertEqual(team_name("a:b%c"), "team:a%3Ab%25c")
        self.assertEqual(team_of_name(team_name("a:b%c")), "a:b%c")
        self.assertIsNone(team_of_name(end_user_name("x", "red")))
        self.assertIsNone(team_of_name("ab" * 32))


class TeamFieldTests(SynchronousTestCase):
    """
    L{validate_team_fields}: the key field checks, reused.
    """

    def assertRefused(self, body, param, **kwargs):
        """
        Assert that C{body} gets a 400 naming C{param}.
        """
        with self.assertRaises(ProxyError) as caught:
            validate_team_fields(body, **kwargs)
        self.assertEqual((caught.exception.status, caught.exception.param), (400, param))

    def test_checks(self):
        """
        Priority must be a whole number, weight from 0.001 to 1000, alias a
        non-empty string, metadata an object; unknown fields are named;
        /team/update needs team_id.
        """
        self.assertRefused({"priority": 1.5}, "priority")
        self.assertRefused({"priority": True}, "priority")
        self.assertRefused({"weight": 0}, "weight")
        self.assertRefused({"weight": 1001}, "weight")
        self.assertRefused({"team_alias": ""}, "team_alias")
        self.assertRefused({"metadata": []}, "metadata")
        self.assertRefused({"models": []}, "models")
        self.assertRefused({"priority": 1}, "team_id", allowed=TEAM_NEW_FIELDS, required=("team_id",))

    def test_null_is_not_set(self):
        """
        C{null} priority and weight mean "not set", for teams and keys
        alike.
        """
        self.assertEqual(validate_team_fields({"priority": None, "weight": None}), {"priority": None, "weight": None})
        self.assertEqual(validate_key_fields({"priority": None}), {"priority": None})

    def test_team_alias_not_a_key_field(self):
        """
        C{team_alias} is a team field only: /key/generate refuses it.
        """
        with self.assertRaises(ProxyError) as caught:
            validate_key_fields({"team_alias": "x"})
        self.assertEqual(caught.exception.param, "team_alias")
