"""
Tests for L{dheera_tx.routing.affinity}: affinity keys of prompts and
sessions, and rendezvous ranking of replicas.
"""

import random

from twisted.trial.unittest import SynchronousTestCase

from dheera_tx.config import Deployment
from dheera_tx.routing.affinity import (
    BLOCK_CHARS,
    MAX_BLOCKS,
    prefix_key,
    rendezvous_order,
    replica_weight,
    session_key,
)


def _words(seed: str, chars: int) -> str:
    rng = random.Random(seed)
    return " ".join(rng.choice(["alpha", "beta", "gamma", "delta", "omega"]) for _ in range(chars // 5))[:chars]


def _replicas(n: int, start: int = 0):
    return [Deployment("m", "qwen", f"http://10.0.0.{i}:8000", index=i) for i in range(start, start + n)]


class PrefixKeyTests(SynchronousTestCase):
    """
    Tests for L{prefix_key} and L{session_key}.
    """

    system = _words("system", 3000)

    def conversation(self, user: int, turns: int) -> dict:
        messages = [{"role": "system", "content": self.system},
                    {"role": "user", "content": _words(f"context{user}", 6000)}]
        for turn in range(1, turns):
            messages.append({"role": "assistant", "content": _words(f"a{user}.{turn}", 200)})
            messages.append({"role": "user", "content": _words(f"q{user}.{turn}", 200)})
        return {"model": "m", "messages": messages}

    def test_turns_of_a_conversation_agree(self):
        """
        Every turn of a conversation has the same key: the affinity prefix
        ends with the first user message, which later turns keep.
        """
        keys = {prefix_key(self.conversation(1, turns), "m") for turns in range(1, 6)}
        self.assertEqual(len(keys), 1)

    def test_shared_system_prompt_still_separates_users(self):
        """
        Users sharing a long system prompt, each with longer context of
        their own, get different keys.
        """
        keys = {prefix_key(self.conversation(user, 1), "m") for user in range(20)}
        self.assertEqual(len(keys), 20)

    def test_shared_prefix_group_agrees(self):
        """
        Completions sharing a prefix that is most of each prompt agree;
        another group's prefix gives another key.
        """
        prefix = _words("group", 4800)
        keys = {prefix_key({"prompt": prefix + " " + _words(f"q{i}", 1600)}, "m") for i in range(10)}
        self.assertEqual(len(keys), 1)
        other = prefix_key({"prompt": _words("group2", 4800) + " " + _words("q0", 1600)}, "m")
        self.assertNotIn(other, keys)

    def test_model_and_salt_separate(self):
        """
        The model and C{cache_salt} are part of the key: vLLM shares no
        cache across salts.
        """
        document = {"prompt": "hello world"}
        self.assertNotEqual(prefix_key(document, "a"), prefix_key(document, "b"))
        self.assertNotEqual(prefix_key(document, "a"), prefix_key(dict(document, cache_salt="s1"), "a"))

    def test_no_prompt_no_key(self):
        """
        A body without messages, prompt or input has no key.
        """
        self.assertIsNone(prefix_key({"model": "m"}, "m"))
        self.assertIsNone(prefix_key({"messages": "nope"}, "m"))
        self.assertIsNone(prefix_key({"prompt": ""}, "m"))

    def test_odd_shapes(self):
        """
        Content parts, token-id prompts, batches, images and lone surrogates
        give keys without errors; text parts count like plain content.
        """
        parts = {"messages": [{"role": "user", "content": [{"type": "text", "text": "hi there"}]}]}
        plain = {"messages": [{"role": "user", "content": "hi there"}]}
        self.assertEqual(prefix_key(parts, "m"), prefix_key(plain, "m"))
        image = {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:" + "A" * 10**6}}]}]}
        for document in (image, {"prompt": [1, 2, 3]}, {"prompt": [[1, 2], [3]]}, {"prompt": ["a", "b"]},
                         {"input": "\ud800 lone"}, {"messages": [None, {"role": 3, "content": 5}]}):
            self.assertIsInstance(prefix_key(document, "m"), int)

    def test_bounded_work(self):
        """
        Only the first C{MAX_BLOCKS} blocks are hashed: prompts that differ
        only after them have the same key.
        """
        head = "x" * (BLOCK_CHARS * MAX_BLOCKS)
        self.assertEqual(prefix_key({"prompt": head + "a" * 10**5}, "m"), prefix_key({"prompt": head + "b" * 10**5}, "m"))

    def test_session_key(self):
        """
        A session's key depends on the model and the header's value only.
        """
        self.assertEqual(session_key("m", b"abc"), session_key("m", b"abc"))
        self.assertNotEqual(session_key("m", b"abc"), session_key("m", b"abd"))
        self.assertNotEqual(session_key("m", b"abc"), session_key("n", b"abc"))


class RendezvousTests(SynchronousTestCase):
    """
    Tests for L{rendezvous_order}.
    """

    def seeds(self, replicas):
        return {d.id: replica_weight(d) for d in replicas}

    def firsts(self, replicas, keys):
        seeds = self.seeds(replicas)
        return [rendezvous_order(k, replicas, seeds)[0].api_base for k in keys]

    def test_ranks_every_replica(self):
        """
        The ranking is a permutation of the replicas, the same every time.
        """
        replicas = _replicas(4)
        order = rendezvous_order(42, replicas, self.seeds(replicas))
        self.assertEqual(sorted(d.api_base for d in order), sorted(d.api_base for d in replicas))
        self.assertEqual(order, rendezvous_order(42, list(reversed(replicas)), self.seeds(replicas)))

    def test_spreads_keys(self):
        """
        Many keys spread about evenly over the replicas.
        """
        keys = [random.Random(i).getrandbits(64) for i in range(8000)]
        firsts = self.firsts(_replicas(4), keys)
        for base in set(firsts):
            self.assertTrue(1700 < firsts.count(base) < 2300, firsts.count(base))

    def test_removing_a_replica_moves_only_its_keys(self):
        """
        Removing one of 5 replicas moves only the keys it held, about 1/5;
        the others stay, though the entries after it change index.
        """
        keys = [random.Random(i).getrandbits(64) for i in range(5000)]
        five = _replicas(5)
        before = self.firsts(five, keys)
        removed = five[2].api_base
        four = [Deployment(d.model_name, d.served_model, d.api_base, index=i) for i, d in enumerate(five[:2] + five[3:])]
        after = self.firsts(four, keys)
        moved = [b for b, a in zip(before, after, strict=True) if b != a]
        self.assertEqual(set(moved), {removed})
        self.assertTrue(0.15 < len(moved) / len(keys) < 0.25, len(moved))

    def test_adding_a_replica_moves_about_1_over_n(self):
        """
        Adding a fifth replica moves about 1/5 of the keys, all to it.
        """
        keys = [random.Random(i).getrandbits(64) for i in range(5000)]
        before = self.firsts(_replicas(4), keys)
        after = self.firsts(_replicas(5), keys)
        moved = [(b, a) for b, a in zip(before, after, strict=True) if b != a]
        self.assertEqual({a for _, a in moved}, {"http://10.0.0.4:8000"})
        self.assertTrue(0.15 < len(moved) / len(keys) < 0.25, len(moved))
