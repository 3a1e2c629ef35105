"""
Where each recently seen affinity key lives, and how many keys each replica
holds: the state behind cache-aware routing's key balance.

Rendezvous hashing alone places keys like dice: 16 conversations over 4
replicas often put 6 on one and 2 on another, and the replica with 6 no
longer holds them all in its prefix cache.  L{KeyHomes} lets the router
place a new key on the first replica in its ranking that holds no more than
its share of the recently active keys, and keep it there.  The state is
this process's own and bounded: keys unseen for C{window} seconds stop
counting, and at most C{capacity} keys are kept (about 100 bytes each).

New placements and moves are queued in L{KeyHomes.outbox} for
L{dheera_tx.routing.shared_load} to pass to the other workers and proxies,
which L{learn} them: a conversation placed by one worker finds its home
from any other (whose own key counts may differ).
"""

import collections
from typing import Callable, Dict, List, Optional, Tuple

# Placements waiting to be shared, at most (beyond, they are not shared).
MAX_OUTBOX = 10000


class KeyHomes:
    """
    :param now: a clock returning seconds.
    :param window: seconds after its last call that a key stops counting.
    :param capacity: keys kept at most (the least recently seen go first).
    """

    def __init__(self, now: Callable[[], float], window: float = 120.0, capacity: int = 65536):
        self._now = now
        self.window = window
        self._capacity = capacity
        # key: (deployment id, last seen, process that placed it: "" here)
        self._homes: collections.OrderedDict[int, Tuple[str, float, str]] = collections.OrderedDict()
        self._counts: Dict[str, int] = {}
        self.outbox: List[Tuple[int, str]] = []

    def _drop(self, key: int) -> None:
        deployment_id, _, _ = self._homes.pop(key)
        self._counts[deployment_id] -= 1

    def _expire(self) -> None:
        horizon = self._now() - self.window
        while self._homes:
            key, (_, seen, _) = next(iter(self._homes.items()))
            if seen >= horizon:
                return
            self._drop(key)

    def home(self, key: int) -> Optional[str]:
        """
        :return: the deployment id where the key's calls went, if it was
            seen within the window.
        """
        self._expire()
        entry = self._homes.get(key)
        return entry[0] if entry is not None else None

    def count(self, deployment_id: str) -> int:
        """
        :return: the keys living on the deployment now.
        """
        return self._counts.get(deployment_id, 0)

    def place(self, key: int, deployment_id: str, share: bool = False) -> None:
        """
        Record that the key's call went to the deployment (its home from
        now on).

        :param share: queue the placement for the other processes when it
            is new or a move.
        """
        if share and len(self.outbox) < MAX_OUTBOX:
            previous = self._homes.get(key)
            if previous is None or previous[0] != deployment_id:
                self.outbox.append((key, deployment_id))
        self._set(key, deployment_id, "")

    def learn(self, key: int, deployment_id: str, origin: str, own: str) -> None:
        """
        Take another process's placement of a key.  When two processes
        placed it apart meanwhile, the placement of the process with the
        smaller id wins, in both: they agree on the next call.

        :param origin: the id of the process that placed it.
        :param own: this process's id.
        """
        self._expire()
        current = self._homes.get(key)
        if current is not None and current[0] != deployment_id and (current[2] or own) < origin:
            return
        self._set(key, deployment_id, origin)

    def _set(self, key: int, deployment_id: str, origin: str) -> None:
        if key in self._homes:
            self._drop(key)
        self._homes[key] = (deployment_id, self._now(), origin)
        self._counts[deployment_id] = self._counts.get(deployment_id, 0) + 1
        if len(self._homes) > self._capacity:
            self._drop(next(iter(self._homes)))

    def __len__(self) -> int:
        return len(self._homes)
