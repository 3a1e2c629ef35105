"""
The harness of the pass-through integration tests: a proxy Site from
L{dheera_tx.tap.build_gateway} listening on 127.0.0.1 port 0,
L{tests.fake_vllm.FakeVLLM} upstreams, Agent and raw-socket clients, and
cleanup of every port, connection and pool they open.
"""

import json
from typing import List, Optional, Tuple

from twisted.internet import reactor, ssl
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Protocol
from twisted.trial.unittest import TestCase
from twisted.web.client import Agent, BrowserLikePolicyForHTTPS, HTTPConnectionPool, readBody
from twisted.web.http_headers import Headers

from dheera_tx.config import config_from_dict
from dheera_tx.http.server import GatewayConnection
from dheera_tx.tap import build_gateway
from tests.fake_vllm import FakeVLLM
from tests.scripted_upstream import BytesBody, refused_port, sleep

MASTER_KEY = "sk-test-master-key-0123456789"
UPSTREAM_KEY = "upstream-secret-key"


def deployment(name: str, served: str, fake, **params) -> dict:
    """
    :return: one C{model_list} entry routing C{name} to C{fake}.
    """
    return {
        "model_name": name,
        "dheera_ai_params": dict({"model": "hosted_vllm/" + served, "api_base": fake.url}, **params),
    }


class _At:
    """Something with a C{url}, for L{deployment}."""

    def __init__(self, url: str):
        self.url = url


def sim_fleet(case, name: str, count: int, settings) -> list:
    """
    Start C{count} simulated vLLM replicas (L{tests.sim_vllm}) for one test
    (stopped at its end).

    :param settings: their L{tests.sim_vllm.SimSettings}.
    :return: C{(replica, its URL, its model_list entry for name)} for each.
    """
    from twisted.internet import reactor

    from tests.sim_vllm import listen

    fleet = []
    for _ in range(count):
        replica, port = listen(reactor, settings)
        case.addCleanup(port.stopListening)
        case.addCleanup(replica.site.close_connections)
        url = "http://127.0.0.1:%d" % port.getHost().port
        fleet.append((replica, url, deployment(name, settings.model, _At(url))))
    return fleet


def refusing_url() -> str:
    """
    :return: the URL of a loopback port that refuses connections (see
        L{tests.scripted_upstream.refused_port}).
    """
    return f"http://127.0.0.1:{refused_port()}"


def auth(key: str = MASTER_KEY) -> dict:
    """
    :return: headers presenting C{key} as a bearer token.
    """
    return {"authorization": f"Bearer {key}"}


def error_of(body: bytes) -> dict:
    """
    :return: the C{error} object of an OpenAI-shaped error body, after
        checking its shape.
    """
    document = json.loads(body)
    assert set(document) == {"error"}, document
    error = document["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    return error


class RawClient(Protocol):
    """
    A client that writes raw bytes and records what comes back, with the
    reactor time of each chunk.
    """

    def __init__(self):
        self.chunks: List[Tuple[float, bytes]] = []
        self.connected = False
        self._waiters: List[Deferred] = []
        self._lost = False

    def connectionMade(self):
        self.connected = True

    def dataReceived(self, data: bytes) -> None:
        self.chunks.append((reactor.seconds(), data))

    def connectionLost(self, reason) -> None:
        self.connected = False
        self._lost = True
        waiters, self._waiters = self._waiters, []
        for d in waiters:
            d.callback(self.data)

    def closed(self, timeout: float = 5.0) -> Deferred:
        """
        :return: a Deferred firing with everything received once the
            connection is closed, failing after C{timeout} seconds.
        """
        if self._lost:
            d = Deferred()
            d.callback(self.data)
            return d
        d = Deferred(lambda d: self._waiters.remove(d))
        self._waiters.append(d)
        return d.addTimeout(timeout, reactor)

    @property
    def data(self) -> bytes:
        """
        :return: everything received so far.
        """
        return b"".join(data for _, data in self.chunks)


def parse_response(raw: bytes) -> Tuple[int, dict, bytes]:
    """
    Parse one HTTP/1.1 response (Content-Length, chunked, or until close).

    :return: C{(status, headers, body)}; header names lower-cased, each
        mapped to the list of its values.
    """
    head, _, rest = raw.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    status = int(lines[0].split(b" ")[1])
    headers: dict = {}
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        headers.setdefault(name.strip().lower().decode("latin-1"), []).append(value.strip())
    if headers.get("transfer-encoding") == [b"chunked"]:
        body = b""
        while rest:
            size_line, _, rest = rest.partition(b"\r\n")
            size = int(size_line.split(b";")[0], 16)
            if size == 0:
                break
            body += rest[:size]
            rest = rest[size + 2:]
        return status, headers, body
    if "content-length" in headers:
        return status, headers, rest[: int(headers["content-length"][0])]
    return status, headers, rest


class ProxyHarness:
    """
    Starts fake upstreams and a proxy for a trial C{TestCase}, and cleans
    them all up: ports, proxy connections on both sides, pools.
    """

    timeout = 30

    def harness(self) -> None:
        """
        Prepare the bookkeeping; call from C{setUp}.
        """
        self.client_pool = HTTPConnectionPool(reactor, persistent=False)
        self.agent = Agent(reactor, pool=self.client_pool)
        self.addCleanup(self.client_pool.closeCachedConnections)

    async def fake(self, **kwargs) -> FakeVLLM:
        """
        :return: a started L{FakeVLLM}, stopped at cleanup.
        """
        fake = FakeVLLM(reactor, **kwargs)
        await fake.start()
        self.addCleanup(fake.stop)
        return fake

    def proxy(self, models=(), general=None, router=None, environ=None, tls_pem=None):
        """
        Start the proxy on 127.0.0.1, port 0.

        :param models: the C{model_list}.
        :param general: extra C{general_settings}.
        :param router: C{router_settings}.
        :param environ: the environment the config reads.
        :param tls_pem: serve TLS (see L{listen}).
        :return: the proxy's Site (also C{self.site}, its config
            C{self.config}); its URL is C{self.base}.
        """
        data = {"model_list": list(models), "general_settings": dict({"master_key": MASTER_KEY}, **(general or {}))}
        if router:
            data["router_settings"] = router
        config = config_from_dict(data, environ=environ or {})
        gateway = build_gateway(reactor, config)
        site, pool = gateway.site, gateway.pool
        self.config = config
        self.gateway = gateway
        self.site = site
        self.upstream_pool = pool
        self.listen(gateway, tls_pem)
        return site

    def listen(self, gateway, tls_pem: Optional[str] = None) -> None:
        """
        Serve C{gateway}'s Site on a loopback port (C{self.port},
        C{self.base}); cleanup stops it, closes its connections (forcing
        the ones still open) and its upstream pool.

        :param tls_pem: serve TLS with this certificate and key (for
            C{localhost}); C{self.agent} then trusts that certificate and
            C{self.base} is C{https://localhost:PORT}.
        """
        open_channels = set()
        self.proxy_channels = open_channels

        class TrackedChannel(GatewayConnection):
            """
            The proxy's channel, remembered while open so cleanup can wait
            for (or force) its close.
            """

            def connectionMade(self):
                open_channels.add(self)
                super().connectionMade()

            def connectionLost(self, reason):
                open_channels.discard(self)
                super().connectionLost(reason)

        gateway.site.protocol = TrackedChannel
        if tls_pem is None:
            port = reactor.listenTCP(0, gateway.site, interface="127.0.0.1")
            self.port = port.getHost().port
            self.base = f"http://127.0.0.1:{self.port}"
        else:
            with open(tls_pem, "rb") as f:
                pem = f.read()
            options = ssl.PrivateCertificate.loadPEM(pem).options()
            port = reactor.listenSSL(0, gateway.site, options, interface="127.0.0.1")
            self.port = port.getHost().port
            self.base = f"https://localhost:{self.port}"
            policy = BrowserLikePolicyForHTTPS(trustRoot=ssl.Certificate.loadPEM(pem))
            self.agent = Agent(reactor, contextFactory=policy, pool=self.client_pool)
        self.addCleanup(lambda: ensureDeferred(gateway.catalog.stop()))
        self.addCleanup(self._close_proxy, port, gateway.pool, open_channels)

    async def _close_proxy_async(self, port, pool, open_channels) -> None:
        await port.stopListening()
        await self.client_pool.closeCachedConnections()
        for _ in range(50):
            if not open_channels:
                break
            await sleep(0.01)
        for channel in list(open_channels):
            if channel.transport is not None:
                channel.transport.abortConnection()
        while open_channels:
            await sleep(0.01)
        await pool.close()
        # Let the upstream side see its connections close.
        await sleep(0)

    def _close_proxy(self, port, pool, open_channels) -> Deferred:
        return ensureDeferred(self._close_proxy_async(port, pool, open_channels))

    async def request(self, method: bytes, path: str, headers: Optional[dict] = None, body=None):
        """
        Make one call through the proxy with Agent (no decoding, no cookies).

        :param path: the target below the proxy root, e.g. C{/vllm/v1/models}.
        :param headers: name -> value (a str, or a list of str).
        :param body: bytes, or an C{IBodyProducer}, or L{None}.
        :return: C{(response, body bytes)}.
        """
        h = Headers()
        for name, value in (headers or {}).items():
            h.setRawHeaders(name, value if isinstance(value, list) else [value])
        if isinstance(body, bytes):
            body = BytesBody(body)
        response = await self.agent.request(method, (self.base + path).encode("ascii"), h, body)
        return response, await readBody(response)

    async def chat(self, model: str = "alpha", headers: Optional[dict] = None, **fields):
        """
        POST a chat completion naming C{model} with the master key.
        """
        document = dict({"model": model, "messages": [{"role": "user", "content": "hi there"}]}, **fields)
        return await self.request(
            b"POST",
            "/vllm/v1/chat/completions",
            dict(auth(), **{"content-type": "application/json"}, **(headers or {})),
            json.dumps(document).encode("utf-8"),
        )

    async def raw_connect(self) -> RawClient:
        """
        :return: a L{RawClient} connected to the proxy (aborted at cleanup).
        """
        client = await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", self.port), RawClient())

        async def close():
            if client.connected:
                client.transport.abortConnection()
                await client.closed()

        self.addCleanup(lambda: ensureDeferred(close()))
        return client

    async def raw(self, data: bytes, wait: float = 5.0) -> bytes:
        """
        Send raw bytes on a new connection and wait for the proxy to close
        it (send C{Connection: close}).

        :return: everything the proxy sent.
        """
        client = await self.raw_connect()
        client.transport.write(data)
        return await client.closed(wait)


class ProxyTestCase(ProxyHarness, TestCase):
    """
    A trial TestCase with the harness set up (no tests of its own).
    """

    def setUp(self):
        self.harness()


def multipart(boundary: bytes, fields: List[Tuple[str, bytes, Optional[str]]]) -> bytes:
    """
    :param fields: C{(name, content, filename or None)} in order.
    :return: a multipart/form-data body.
    """
    out = b""
    for name, content, filename in fields:
        out += b"--" + boundary + b"\r\n"
        if filename is None:
            out += b'Content-Disposition: form-data; name="%s"\r\n\r\n' % name.encode()
        else:
            out += b'Content-Disposition: form-data; name="%s"; filename="%s"\r\n' % (name.encode(), filename.encode())
            out += b"Content-Type: audio/wav\r\n\r\n"
        out += content + b"\r\n"
    return out + b"--" + boundary + b"--\r\n"


class CannedUpstream(Protocol):
    """
    A one-shot upstream that records the raw request and answers with
    canned bytes (for response headers FakeVLLM cannot produce).
    """

    def __init__(self, answer: bytes, log: list):
        self._answer = answer
        self._log = log
        self._buffer = b""

    def dataReceived(self, data: bytes) -> None:
        self._buffer += data
        if b"\r\n\r\n" in self._buffer:
            self._log.append(self._buffer)
            self.transport.write(self._answer)
            self.transport.loseConnection()
