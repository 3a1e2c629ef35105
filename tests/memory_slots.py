"""
An in-memory provider of the slot claimer's interface
(L{dheera_tx.routing.slots.SlotClaimer}) for unit tests: several claimers
(processes) share one L{SlotLedger}, which applies the claim script's rules
(the cap counts every process's slots; a claim ranked behind another
process's best waiting call is refused).  Replies can be held, to test what
happens while a claim is on its way.
"""

from typing import Dict, List, Optional, Tuple

from twisted.internet.defer import Deferred, succeed

from dheera_tx.config import Deployment
from dheera_tx.routing.slots import Rank


class SlotLedger:
    """
    What Redis holds: slots by deployment id and process, best waiting
    ranks by model and process.
    """

    def __init__(self):
        self.slots: Dict[str, Dict[str, int]] = {}
        self.heads: Dict[str, Dict[str, Rank]] = {}

    def held(self, deployment_id: str) -> int:
        return sum(self.slots.get(deployment_id, {}).values())


class MemoryClaimer:
    """
    One process's claimer over a L{SlotLedger}.

    :ivar claims_sent: every claim asked for, as C{(deployment id, rank)}.
    :ivar hold: when true, claims answer only when L{answer} is called.
    """

    def __init__(self, ledger: SlotLedger, name: str = "me"):
        self.ledger = ledger
        self.name = name
        self.hold = False
        self.claims_sent: List[Tuple[str, Rank]] = []
        self._held: List[Tuple[Deferred, bool]] = []

    @staticmethod
    def claims(deployment: Deployment) -> bool:
        return deployment.max_parallel_requests is not None

    def claim(self, deployment: Deployment, model: Optional[str], rank: Rank, next_rank: Optional[Rank]) -> Deferred:
        self.claims_sent.append((deployment.id, rank))
        heads = self.ledger.heads.setdefault(model or "", {})
        better = any(other != self.name and r < rank for other, r in heads.items())
        cap = deployment.max_parallel_requests
        assert cap is not None
        granted = not better and self.ledger.held(deployment.id) < cap
        if granted:
            slots = self.ledger.slots.setdefault(deployment.id, {})
            slots[self.name] = slots.get(self.name, 0) + 1
            self._head(model, next_rank)
        else:
            self._head(model, rank)
        if not self.hold:
            return succeed(granted)
        d: Deferred = Deferred()
        self._held.append((d, granted))
        return d

    def answer(self) -> None:
        """
        Answer the oldest held claim.
        """
        d, granted = self._held.pop(0)
        d.callback(granted)

    def release(self, deployment: Deployment) -> None:
        slots = self.ledger.slots[deployment.id]
        slots[self.name] -= 1
        if not slots[self.name]:
            del slots[self.name]

    def set_head(self, model: Optional[str], rank: Optional[Rank]) -> None:
        self._head(model, rank)

    def _head(self, model: Optional[str], rank: Optional[Rank]) -> None:
        heads = self.ledger.heads.setdefault(model or "", {})
        if rank is None:
            heads.pop(self.name, None)
        else:
            heads[self.name] = rank
