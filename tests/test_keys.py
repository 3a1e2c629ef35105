"""
Tests for L{dheera_tx.keys.records}: key material, durations, records and request
field validation.
"""

import hashlib
import json
import re

from hypothesis import given
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from dheera_tx.errors import ProxyError
from dheera_tx.keys.fields import GENERATE_FIELDS, UPDATE_FIELDS, end_user_changes, key_changes, validate_end_user_fields, validate_key_fields
from dheera_tx.keys.records import EndUserRecord, KeyRecord, generate_key, hash_key, iso_time, parse_duration, redis_fields, token_of


class GenerateKeyTests(SynchronousTestCase):
    """
    Tests for L{generate_key} and L{token_of}.
    """

    def test_shape(self):
        """
        A key is C{sk-} followed by 43 url-safe characters (32 random bytes).
        """
        key = generate_key()
        self.assertRegex(key, r"^sk-[A-Za-z0-9_-]{43}$")

    def test_unique(self):
        """
        Keys do not repeat.
        """
        keys = {generate_key() for _ in range(1000)}
        self.assertEqual(len(keys), 1000)

    def test_hash(self):
        """
        The token of a key is the SHA-256 hex digest of the whole key.
        """
        key = generate_key()
        self.assertEqual(hash_key(key), hashlib.sha256(key.encode()).hexdigest())

    def test_token_of_key_or_hash(self):
        """
        L{token_of} accepts the key or its hash (any case) and gives the hash.
        """
        key = generate_key()
        token = hash_key(key)
        self.assertEqual(token_of(key), token)
        self.assertEqual(token_of(token), token)
        self.assertEqual(token_of(token.upper()), token)

    def test_token_of_garbage(self):
        """
        Anything else is a 400 naming the field.
        """
        for value in ["abc", "", 12, None, "a" * 63, "g" * 64, "ab" * 32 + "\n"]:
            with self.assertRaises(ProxyError) as e:
                token_of(value, "keys")
            self.assertEqual(e.exception.status, 400)
            self.assertEqual(e.exception.param, "keys")


class ParseDurationTests(SynchronousTestCase):
    """
    Tests for L{parse_duration}.
    """

    def test_units(self):
        """
        Seconds, minutes, hours, days and weeks are understood.
        """
        self.assertEqual(parse_duration("30s"), 30)
        self.assertEqual(parse_duration("10m"), 600)
        self.assertEqual(parse_duration("24h"), 86400)
        self.assertEqual(parse_duration("30d"), 30 * 86400)
        self.assertEqual(parse_duration("2w"), 14 * 86400)

    def test_none(self):
        """
        L{None} means no duration.
        """
        self.assertIsNone(parse_duration(None))

    def test_bad(self):
        """
        Anything else raises L{ValueError}.
        """
        for text in ["", "30", "d", "1.5h", "-1d", "0s", "10 m", "5y", "1D", "36501000d", 30, "3s\n"]:
            with self.assertRaises(ValueError, msg=repr(text)):
                parse_duration(text)


class KeyRecordTests(SynchronousTestCase):
    """
    Tests for L{KeyRecord}.
    """

    def full(self):
        """
        A record with every field set.
        """
        return KeyRecord(
            token="ab" * 32,
            key_alias="ci",
            models=("m1", "m2"),
            allowed_routes=("/v1/chat",),
            max_budget=12.5,
            budget_duration="30d",
            budget_reset_at=1_700_000_100.25,
            rpm_limit=10,
            tpm_limit=1000,
            max_parallel_requests=2,
            user_id="u1",
            team_id="t1",
            metadata={"owner": "ops", "n": 1},
            blocked=True,
            expires=1_700_000_000.5,
            created_at=1_600_000_000.125,
            spend_nanos=1_234_567_890,
        )

    def test_round_trip(self):
        """
        A record survives L{KeyRecord.to_redis_hash} and
        L{KeyRecord.from_redis_hash} unchanged.
        """
        record = self.full()
        self.assertEqual(KeyRecord.from_redis_hash(record.token, record.to_redis_hash()), record)
        self.assertEqual(KeyRecord.from_redis_hash(record.token, record.to_redis_hash()).metadata, record.metadata)

    def test_redis_hash_text(self):
        """
        The hash holds readable text: JSON lists, 0/1, integer nano-USD, and
        no field for what is L{None}; the token is not a field.
        """
        mapping = KeyRecord(token="cd" * 32, created_at=5.0).to_redis_hash()
        self.assertEqual(
            mapping,
            {
                "models": "[]",
                "allowed_routes": "[]",
                "metadata": "{}",
                "blocked": "0",
                "created_at": "5.0",
                "spend_nanos": "0",
            },
        )
        self.assertEqual(self.full().to_redis_hash()["spend_nanos"], "1234567890")

    def test_to_api(self):
        """
        The API answer has the token, every field, times as ISO-8601 UTC,
        spend in USD and nano-USD, and the key only when given.
        """
        record = self.full()
        answer = record.to_api()
        self.assertNotIn("key", answer)
        self.assertEqual(answer["token"], record.token)
        self.assertEqual(answer["expires"], "2023-11-14T22:13:20.500000Z")
        self.assertEqual(answer["created_at"], iso_time(record.created_at))
        self.assertEqual(answer["spend"], 1.23456789)
        self.assertEqual(answer["spend_nanos"], 1_234_567_890)
        self.assertEqual(answer["models"], ["m1", "m2"])
        for name in (
            "key_alias", "allowed_routes", "max_budget", "budget_duration", "budget_reset_at", "rpm_limit",
            "tpm_limit", "max_parallel_requests", "user_id", "team_id", "metadata", "blocked",
        ):
            self.assertIn(name, answer)
        self.assertEqual(record.to_api(key="sk-x")["key"], "sk-x")
        json.dumps(answer)

    def test_never_expires(self):
        """
        A key without expiry answers C{expires: null}.
        """
        self.assertIsNone(KeyRecord(token="ef" * 32).to_api()["expires"])

    @given(
        alias=st.one_of(st.none(), st.text(min_size=1, max_size=20)),
        models=st.lists(st.text(min_size=1, max_size=10), max_size=4),
        budget=st.one_of(st.none(), st.floats(min_value=0, max_value=1e9)),
        rpm=st.one_of(st.none(), st.integers(min_value=0, max_value=10**9)),
        metadata=st.dictionaries(st.text(max_size=5), st.one_of(st.integers(), st.text(max_size=5)), max_size=3),
        blocked=st.booleans(),
        expires=st.one_of(st.none(), st.floats(min_value=0, max_value=4e9)),
        spend=st.integers(min_value=0, max_value=10**15),
    )
    def test_round_trip_any(self, alias, models, budget, rpm, metadata, blocked, expires, spend):
        """
        Any record survives the trip through its Redis hash.
        """
        record = KeyRecord(
            token="01" * 32,
            key_alias=alias,
            models=tuple(models),
            max_budget=budget,
            rpm_limit=rpm,
            metadata=metadata,
            blocked=blocked,
            expires=expires,
            created_at=1.5,
            spend_nanos=spend,
        )
        again = KeyRecord.from_redis_hash(record.token, record.to_redis_hash())
        self.assertEqual(again, record)
        self.assertEqual(again.metadata, record.metadata)


class EndUserRecordTests(SynchronousTestCase):
    """
    Tests for L{EndUserRecord}.
    """

    def test_round_trip(self):
        """
        An end user survives the trip through its Redis hash.
        """
        record = EndUserRecord(
            user_id="alice",
            max_budget=3.0,
            budget_duration="1d",
            budget_reset_at=10.0,
            blocked=True,
            spend_nanos=7,
            metadata={"a": 1},
            created_at=2.0,
        )
        self.assertEqual(EndUserRecord.from_redis_hash("alice", record.to_redis_hash()), record)

    def test_traffic_only(self):
        """
        A hash holding only spend (an end user seen in traffic) is an end
        user without creation time.
        """
        record = EndUserRecord.from_redis_hash("bob", {"spend_nanos": "2500000000"})
        self.assertIsNone(record.created_at)
        self.assertEqual(record.to_api()["spend"], 2.5)
        self.assertFalse(record.blocked)


class ValidateKeyFieldsTests(SynchronousTestCase):
    """
    Tests for L{validate_key_fields}.
    """

    def assertBadRequest(self, body, param, allowed=GENERATE_FIELDS):
        """
        Assert C{body} is a 400 naming C{param}; return the message.
        """
        with self.assertRaises(ProxyError) as e:
            validate_key_fields(body, allowed=allowed)
        self.assertEqual(e.exception.status, 400)
        self.assertEqual(e.exception.param, param)
        return e.exception.message

    def test_all_fields(self):
        """
        Every generate field is accepted with its type, and lists come back
        as tuples.
        """
        body = {
            "key_alias": "a",
            "duration": "30d",
            "models": ["m"],
            "allowed_routes": ["/v1"],
            "max_budget": 1,
            "budget_duration": "1d",
            "rpm_limit": 5,
            "tpm_limit": 6,
            "max_parallel_requests": 7,
            "user_id": "u",
            "team_id": "t",
            "metadata": {"x": [1]},
            "blocked": False,
        }
        fields = validate_key_fields(body)
        self.assertEqual(fields["models"], ("m",))
        self.assertEqual(fields["max_budget"], 1.0)
        self.assertEqual(set(fields), set(body))

    def test_longest_lists(self):
        """
        1,000 models of 256 characters each are accepted.
        """
        models = ["%03d" % i + "m" * 253 for i in range(1000)]
        self.assertEqual(validate_key_fields({"models": models})["models"], tuple(models))

    def test_nulls(self):
        """
        C{null} lists become empty, C{null} metadata empty, C{null} blocked
        false.
        """
        fields = validate_key_fields({"models": None, "metadata": None, "blocked": None, "duration": None})
        self.assertEqual(fields, {"models": (), "metadata": {}, "blocked": False, "duration": None})

    def test_unknown_fields(self):
        """
        Unknown fields are a 400 that names all of them.
        """
        message = self.assertBadRequest({"models": [], "colour": 1, "api_base": "x"}, "api_base")
        self.assertIn("api_base", message)
        self.assertIn("colour", message)

    def test_wrong_types(self):
        """
        A wrong type, or a value out of range (a model name over 256
        characters, more than 1,000 models), is a 400 naming the field.
        """
        cases = [
            ({"models": "m"}, "models"),
            ({"models": [1]}, "models"),
            ({"allowed_routes": {"a": 1}}, "allowed_routes"),
            ({"max_budget": "10"}, "max_budget"),
            ({"max_budget": -1}, "max_budget"),
            ({"max_budget": True}, "max_budget"),
            ({"rpm_limit": 1.5}, "rpm_limit"),
            ({"tpm_limit": True}, "tpm_limit"),
            ({"max_parallel_requests": -2}, "max_parallel_requests"),
            ({"user_id": 5}, "user_id"),
            ({"team_id": ""}, "team_id"),
            ({"key_alias": "x" * 300}, "key_alias"),
            ({"metadata": []}, "metadata"),
            ({"models": ["m" * 257]}, "models"),
            ({"models": ["m"] * 1001}, "models"),
            ({"allowed_routes": ["r" * 300]}, "allowed_routes"),
            # Python's JSON reads these; no other JSON client could read them back.
            ({"metadata": {"a": float("nan")}}, "metadata"),
            ({"metadata": {"b": [float("inf")]}}, "metadata"),
            ({"blocked": "yes"}, "blocked"),
        ]
        for body, param in cases:
            self.assertBadRequest(body, param)

    def test_bad_duration(self):
        """
        A duration that is not like C{30d} is a 400 naming the field.
        """
        self.assertBadRequest({"duration": "forever"}, "duration")
        self.assertBadRequest({"budget_duration": 30}, "budget_duration")

    def test_update_needs_key(self):
        """
        /key/update bodies need C{key}, which comes back as a token.
        """
        self.assertBadRequest({"models": []}, "key", allowed=UPDATE_FIELDS)
        key = generate_key()
        self.assertEqual(validate_key_fields({"key": key}, allowed=UPDATE_FIELDS), {"key": hash_key(key)})

    def test_not_an_object(self):
        """
        A body that is not a JSON object is a 400.
        """
        self.assertBadRequest([1, 2], None)

    def test_end_user_fields(self):
        """
        End-user bodies need C{user_id} and refuse key-only fields.
        """
        self.assertEqual(validate_end_user_fields({"user_id": "u", "max_budget": 2})["max_budget"], 2.0)
        with self.assertRaises(ProxyError) as e:
            validate_end_user_fields({"max_budget": 2})
        self.assertEqual(e.exception.param, "user_id")
        with self.assertRaises(ProxyError) as e:
            validate_end_user_fields({"user_id": "u", "models": []})
        self.assertEqual(e.exception.param, "models")
        with self.assertRaises(ProxyError) as e:
            validate_end_user_fields({"user_id": "u", "metadata": {"x": float("-inf")}})
        self.assertEqual(e.exception.param, "metadata")


class ChangesTests(SynchronousTestCase):
    """
    Tests for L{key_changes}, L{end_user_changes} and L{redis_fields}.
    """

    def test_duration_sets_expiry(self):
        """
        C{duration} becomes C{expires}, counted from now; C{null} clears it.
        """
        self.assertEqual(key_changes({"duration": "10m"}, 1000.0), {"expires": 1600.0})
        self.assertEqual(key_changes({"duration": None}, 1000.0), {"expires": None})

    def test_budget_window(self):
        """
        C{budget_duration} also sets when the window resets.
        """
        changes = key_changes({"budget_duration": "1h", "max_budget": 5.0}, 100.0)
        self.assertEqual(changes, {"budget_duration": "1h", "budget_reset_at": 3700.0, "max_budget": 5.0})
        self.assertEqual(end_user_changes({"budget_duration": None}, 1.0), {"budget_duration": None, "budget_reset_at": None})

    def test_redis_fields(self):
        """
        Changes split into hash fields to set and fields to delete (those
        set to L{None}); untouched fields appear in neither.
        """
        to_set, to_delete = redis_fields(KeyRecord, {"rpm_limit": 3, "expires": None, "models": ("a",)})
        self.assertEqual(to_set, {"rpm_limit": "3", "models": '["a"]'})
        self.assertEqual(to_delete, ("expires",))

    def test_iso_time(self):
        """
        Times are ISO-8601 in UTC with a Z.
        """
        self.assertEqual(iso_time(0), "1970-01-01T00:00:00Z")
        self.assertTrue(re.match(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d", iso_time(1.7e9)))
