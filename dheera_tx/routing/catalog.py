"""
Model discovery: what C{GET /vllm/v1/models} answers, and the LoRA adapters
the deployments serve.

Clients that start by listing models (the OpenAI SDKs' pickers, Open WebUI,
LangChain) must see the names the proxy routes by, not the names vLLM
serves.  L{ModelCatalog} keeps each deployment's own C{/v1/models} answer
(asked in the background every C{interval} seconds, with the deployment's
api_key, a bounded answer and a timeout) and builds the proxy's answer from
it, per caller:

  - every configured C{model_name} the caller may use, once however many
    replicas serve it, with vLLM's own fields (C{max_model_len}, C{root},
    C{owned_by}, C{created}, C{permission}) from a replica that is not
    cooling down and C{id} set to the public name;
  - every LoRA adapter of those deployments, declared in the config
    (C{lora_adapters}) or found in a replica's answer (an entry whose
    C{parent} is set), with C{parent} set to the base model's public name;
  - the default upstream's own models, when it is a server of its own
    (C{HOSTED_VLLM_API_BASE}), for callers that may use unconfigured names.

Until a deployment has answered, its models are listed from the config
alone (C{max_model_len} L{None}); a deployment that stops answering keeps
its last answer.  Adapters found this way are routable
(L{adapter_replicas}); a found adapter whose name is a configured
C{model_name} is ignored (the config wins).
"""

import json
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import treq
import treq.client
from twisted.internet.defer import CancelledError, Deferred, DeferredList
from twisted.logger import Logger
from twisted.web.client import Agent, HTTPConnectionPool

from dheera_tx.config import Deployment, ProxyConfig
from dheera_tx.upstream.outbound import AnswerTooLarge, Rounds, read_capped

log = Logger()

#: The largest C{/v1/models} answer read from a deployment.
MAX_ANSWER_BYTES = 1024 * 1024
#: The most entries kept from one deployment's answer.
MAX_ENTRIES = 1000
_FIELDS = ("id", "object", "created", "owned_by", "root", "parent", "max_model_len", "permission")


def may_use(principal, name: str) -> bool:
    """
    :return: whether C{principal} may call model C{name}: the master key
        and keys without a model list may call any, others those listed.
    """
    if principal.is_master:
        return True
    models = principal.key.models
    return not models or name in models


def _cards(document) -> List[dict]:
    """
    :return: the model entries of a C{/v1/models} answer, each reduced to
        vLLM's fields; nothing when the answer is not vLLM's list shape.
    """
    data = document.get("data") if isinstance(document, dict) else None
    if not isinstance(data, list):
        return []
    cards = []
    for entry in data[:MAX_ENTRIES]:
        if isinstance(entry, dict) and isinstance(entry.get("id"), str):
            cards.append({field: entry[field] for field in _FIELDS if field in entry})
    return cards


class ModelCatalog:
    """
    The models and adapters the deployments serve, as the proxy lists them.

    :param reactor: the reactor (timers and, for the default client,
        connections).
    :param config: the proxy configuration.
    :param http_client: a L{treq.client.HTTPClient}; by default one whose
        connections close after each answer (a round every C{interval}
        seconds needs no idle connections kept open).
    :param interval: seconds between background refreshes.
    :param timeout: seconds one deployment may take to answer.
    """

    def __init__(self, reactor, config: ProxyConfig, http_client=None, interval: float = 30.0, timeout: float = 5.0):
        self._reactor = reactor
        self._config = config
        self._interval = interval
        self._timeout = timeout
        self._pool = None
        if http_client is None:
            self._pool = HTTPConnectionPool(reactor, persistent=False)
            http_client = treq.client.HTTPClient(Agent(reactor, connectTimeout=timeout, pool=self._pool))
        self._client = http_client
        #: deployment id -> the cards of its last good answer.
        self._answers: Dict[str, List[dict]] = {}
        #: adapter name -> replicas serving it, from the config and answers.
        self._adapters: Dict[str, Tuple[Deployment, ...]] = {}
        self._refreshing: Optional[Deferred] = None
        self._waiters: List[Deferred] = []
        self._rounds = Rounds(reactor, self._round, "Model catalog refresh")
        self._started_at = int(reactor.seconds())
        self._rebuild_adapters()

    # -- lifecycle --

    def start(self) -> None:
        """
        Refresh now and every C{interval} seconds.
        """
        self._rounds.start(self._interval)

    async def _round(self) -> None:
        await self.refresh()

    async def stop(self) -> None:
        """
        Stop refreshing and close the connections.
        """
        self._rounds.stop()
        if self._refreshing is not None:
            self._refreshing.cancel()
        if self._pool is not None:
            await self._pool.closeCachedConnections()

    # -- asking the deployments --

    def refresh(self) -> Deferred:
        """
        Ask every deployment for its models (one round at a time).

        :return: a Deferred that fires when the round has ended; it never
            fails.
        """
        if self._refreshing is None:
            asked = DeferredList([self._ask(d) for d in self._config.all_deployments()], consumeErrors=True)
            self._refreshing = asked
            asked.addBoth(self._refreshed)
        waiter: Deferred = Deferred()
        self._waiters.append(waiter)
        return waiter

    def _refreshed(self, _) -> None:
        self._refreshing = None
        self._rebuild_adapters()
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            waiter.callback(None)

    def _ask(self, deployment: Deployment) -> Deferred:
        headers = {b"Accept": [b"application/json"]}
        if deployment.api_key:
            headers[b"Authorization"] = [b"Bearer " + deployment.api_key.encode("utf-8")]
        d = self._client.get(deployment.api_base + "/v1/models", headers=headers, timeout=self._timeout)
        d.addCallback(self._read, deployment)
        d.addCallback(self.update, deployment)
        d.addErrback(self._failed, deployment)
        return d

    def _read(self, response, deployment: Deployment) -> Deferred:
        if response.code != 200:
            response.deliverBody(_Discard())
            raise ValueError(f"HTTP {response.code}")
        d = Deferred.fromCoroutine(read_capped(response, MAX_ANSWER_BYTES))
        d.addCallback(json.loads)
        return d

    def _failed(self, failure, deployment: Deployment) -> None:
        if failure.check(CancelledError):
            return
        # Never the exception's text: it could carry the api_base's query.
        reason = "answer over 1 MiB" if failure.check(AnswerTooLarge) else type(failure.value).__name__
        log.info("Models of {deployment} unknown ({reason}); listing from the config", deployment=deployment.id, reason=reason)

    def update(self, document, deployment: Deployment) -> None:
        """
        Take C{document}, a C{/v1/models} answer of C{deployment}.
        """
        self._answers[deployment.id] = _cards(document)

    # -- adapters --

    def _rebuild_adapters(self) -> None:
        adapters: Dict[str, List[Deployment]] = {}
        names = set(self._config.model_names)
        for deployment in self._config.deployments:
            found = [a[0] for a in deployment.lora_adapters]
            found += [c["id"] for c in self._answers.get(deployment.id, ()) if c.get("parent")]
            for name in found:
                if name in names:
                    continue
                replicas = adapters.setdefault(name, [])
                if deployment not in replicas:
                    replicas.append(deployment)
        self._adapters = {name: tuple(replicas) for name, replicas in adapters.items()}

    def adapter_replicas(self, name: str) -> Tuple[Deployment, ...]:
        """
        :return: the deployments serving the LoRA adapter C{name} (declared
            in the config or found in their answers), empty if none does.
        """
        return self._adapters.get(name, ())

    # -- the proxy's answers --

    def _card_of(self, replicas: Sequence[Deployment], served: Optional[str], cooling_down: Callable[[Deployment], bool]) -> Optional[dict]:
        """
        :return: the entry named C{served} in a replica's answer, from a
            replica that is not cooling down if one has it.
        """
        found = None
        for deployment in replicas:
            for card in self._answers.get(deployment.id, ()):
                if card["id"] == served:
                    if not cooling_down(deployment):
                        return card
                    found = found or card
        return found

    def _configured(self, principal, cooling_down) -> List[dict]:
        cards = []
        listed = set()
        for name in self._config.model_names:
            replicas = self._config.replicas(name)
            if may_use(principal, name):
                card = self._card_of(replicas, replicas[0].served_model, cooling_down)
                cards.append(self._public(card, name, replicas[0].served_model, None))
                listed.add(name)
            for adapter in self._adapter_names(replicas):
                if adapter not in listed and may_use(principal, adapter):
                    card = self._card_of(self.adapter_replicas(adapter), adapter, cooling_down)
                    cards.append(self._public(card, adapter, adapter, name))
                    listed.add(adapter)
        return cards

    def _adapter_names(self, replicas: Sequence[Deployment]) -> List[str]:
        names: List[str] = []
        for adapter, serving in self._adapters.items():
            if adapter not in names and any(d in serving for d in replicas):
                names.append(adapter)
        return names

    def _public(self, card: Optional[dict], name: str, served: Optional[str], parent: Optional[str]) -> dict:
        entry = {
            "id": name,
            "object": "model",
            "created": self._started_at,
            "owned_by": "vllm",
            "root": served,
            "parent": parent,
            "max_model_len": None,
            "permission": [],
        }
        if card is not None:
            entry.update(card)
        entry["id"] = name
        entry["parent"] = parent
        return entry

    def _default_upstream(self, principal, listed: set) -> List[dict]:
        default = self._config.default_deployment
        if default is None or default in self._config.deployments:
            # The only deployment doubles as the default: its served name is
            # an alias of its model_name, not a model of its own.
            return []
        configured = set(self._config.model_names) | set(self._adapters)
        cards = []
        for card in self._answers.get(default.id, ()):
            name = card["id"]
            if name in configured or name in listed:
                continue
            if principal.is_master or not principal.key.models or name in principal.key.models:
                cards.append(dict(card))
        return cards

    async def _fresh(self) -> None:
        """
        Before the first answer of any deployment has come in, wait for the
        round in flight (bounded by the probe timeout).
        """
        if not self._answers and self._config.all_deployments():
            await self.refresh()

    async def listing(self, principal, cooling_down: Callable[[Deployment], bool]) -> dict:
        """
        :return: the C{GET /v1/models} answer for C{principal}, in vLLM's
            list shape.
        """
        await self._fresh()
        cards = self._configured(principal, cooling_down)
        cards += self._default_upstream(principal, {c["id"] for c in cards})
        return {"object": "list", "data": cards}

    async def model(self, principal, name: str, cooling_down: Callable[[Deployment], bool]) -> Optional[dict]:
        """
        :return: the C{GET /v1/models/{name}} answer for C{principal}, or
            L{None} when there is no such model or the caller may not use
            it (the same answer, so a key learns nothing of others' models).
        """
        for card in (await self.listing(principal, cooling_down))["data"]:
            if card["id"] == name:
                return card
        return None


class _Discard:
    """
    A body protocol that drops what it is given (an answer not read).
    """

    def makeConnection(self, transport) -> None:
        pass

    def dataReceived(self, data: bytes) -> None:
        pass

    def connectionLost(self, reason) -> None:
        pass
