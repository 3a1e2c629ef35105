"""
Tests for L{dheera_tx.socket_write.write_now} on every transport the
proxy writes to, over real loopback sockets: TCP and Unix connections
(sent at once), and TLS on either side (the proxy's C{ssl:} listener, an
C{https} upstream, and a connection that started TLS later), where every
byte must go through the encryption.
"""

import os
import select

from twisted.internet import reactor, ssl
from twisted.internet.defer import Deferred
from twisted.internet.protocol import ClientFactory, Factory, Protocol
from twisted.protocols.tls import TLSMemoryBIOFactory, TLSMemoryBIOProtocol
from twisted.trial.unittest import TestCase

from dheera_tx.socket_write import write_now
from dheera_tx.upstream.client import UpstreamPool
from tests.scripted_upstream import read_body, wait_until
from tests.tls_upstream import self_signed_localhost

MARKER = b"PLAINTEXT-MARKER-0123456789abcdef"
# 2 MiB that the kernel does not take in one send; numbered so that a
# reordering or a loss shows.
BIG = b"".join(b"%08d" % i for i in range(262144))


class _Peer(Protocol):
    """
    One end of a test connection: fires C{made} when connected and keeps
    what it receives.
    """

    def __init__(self):
        self.chunks = []
        self.made: Deferred = Deferred()

    def connectionMade(self):
        self.made.callback(self)

    def dataReceived(self, data):
        self.chunks.append(data)

    @property
    def data(self) -> bytes:
        return b"".join(self.chunks)


class _StartTLSPeer(_Peer):
    """
    A server end that switches to TLS as soon as it is connected.
    """

    def __init__(self, options):
        super().__init__()
        self._options = options

    def connectionMade(self):
        self.transport.startTLS(self._options)
        super().connectionMade()


class _RecordingTLS(TLSMemoryBIOProtocol):
    """
    The TLS layer of the reading end, keeping the bytes that came over
    the wire, before decryption.
    """

    def dataReceived(self, data):
        self.factory.raw.append(data)
        super().dataReceived(data)


def _recording_tls_factory(options, is_client: bool, peer: Protocol) -> TLSMemoryBIOFactory:
    """
    :return: a factory of one TLS connection to C{peer}, whose C{raw}
        list keeps the encrypted bytes received.
    """
    inner = (ClientFactory if is_client else Factory).forProtocol(lambda: peer)
    inner.noisy = False
    factory = TLSMemoryBIOFactory(options, is_client, inner)
    factory.protocol = _RecordingTLS
    factory.raw = []
    factory.noisy = False
    return factory


def _client(peer: Protocol) -> ClientFactory:
    """
    :return: a quiet client factory of one connection to C{peer}.
    """
    factory = ClientFactory.forProtocol(lambda: peer)
    factory.noisy = False
    return factory


class WriteNowTests(TestCase):
    """
    L{write_now} delivers every byte, in order, on each transport; on a
    plain connection it sends without waiting for the reactor; under TLS
    nothing goes out unencrypted.
    """

    timeout = 30

    def setUp(self):
        directory = self.mktemp()
        os.makedirs(directory)
        self.pem_path = self_signed_localhost(directory)
        with open(self.pem_path, "rb") as f:
            pem = f.read()
        self.server_options = ssl.PrivateCertificate.loadPEM(pem).options()
        self.client_options = ssl.optionsForClientTLS("localhost", trustRoot=ssl.Certificate.loadPEM(pem))

    def _listen(self, listen, factory_of):
        """
        Listen with C{listen(factory)}, stopped in cleanup.
        """
        factory = Factory.forProtocol(factory_of)
        factory.noisy = False
        port = listen(factory)
        self.addCleanup(port.stopListening)
        return port

    def _close(self, *peers):
        def close():
            for peer in peers:
                if peer.transport is not None:
                    peer.transport.abortConnection()

        self.addCleanup(close)

    async def _plain(self, kind: str):
        """
        :return: C{(writer, reader)}, the server and client ends of a plain
            TCP or Unix connection.
        """
        writer, reader = _Peer(), _Peer()
        if kind == "tcp":
            port = self._listen(lambda f: reactor.listenTCP(0, f, interface="127.0.0.1"), lambda: writer)
            reactor.connectTCP("127.0.0.1", port.getHost().port, _client(reader))
        else:
            path = os.path.join(self.mktemp())
            os.makedirs(path)
            path = os.path.join(path, "s")
            self._listen(lambda f: reactor.listenUNIX(path, f), lambda: writer)
            reactor.connectUNIX(path, _client(reader))
        self._close(writer, reader)
        await writer.made
        await reader.made
        return writer, reader

    async def _tls(self, kind: str):
        """
        :return: C{(writer, reader, raw)}: the TLS end under test, its peer
            and the list of encrypted bytes the peer received.
        """
        writer, reader = _Peer(), _Peer()
        if kind == "listener":
            # What an ssl: --listen endpoint does.
            port = self._listen(
                lambda f: reactor.listenSSL(0, f, self.server_options, interface="127.0.0.1"), lambda: writer
            )
            client = _recording_tls_factory(self.client_options, True, reader)
            reactor.connectTCP("127.0.0.1", port.getHost().port, client)
            raw = client.raw
        elif kind == "upstream":
            # What the upstream pool does for an https api_base.
            server = _recording_tls_factory(self.server_options, False, reader)
            port = reactor.listenTCP(0, server, interface="127.0.0.1")
            self.addCleanup(port.stopListening)
            reactor.connectSSL("127.0.0.1", port.getHost().port, _client(writer), self.client_options)
            raw = server.raw
        else:
            writer = _StartTLSPeer(self.server_options)
            port = self._listen(lambda f: reactor.listenTCP(0, f, interface="127.0.0.1"), lambda: writer)
            client = _recording_tls_factory(self.client_options, True, reader)
            reactor.connectTCP("127.0.0.1", port.getHost().port, client)
            raw = client.raw
        self._close(writer, reader)
        await writer.made
        await reader.made
        return writer, reader, raw

    async def _write_everything(self, writer, reader) -> None:
        """
        Write with L{write_now} a small piece, a piece larger than the
        kernel takes at once, a piece through C{transport.write} (queued)
        and one more small piece; the reader must get them whole and in
        order.
        """
        transport = writer.transport
        write_now(transport, MARKER + b"|")
        write_now(transport, BIG)
        transport.write(b"|queued|")
        write_now(transport, b"last")
        expected = MARKER + b"|" + BIG + b"|queued|last"
        await wait_until(lambda: len(reader.data) >= len(expected), timeout=20)
        self.assertEqual(len(reader.data), len(expected))
        self.assertTrue(reader.data == expected, "the bytes arrived changed or out of order")

    def _assert_sent_at_once(self, writer, reader) -> None:
        """
        A small L{write_now} with nothing queued is in the reader's socket
        before the reactor runs again.
        """
        write_now(writer.transport, b"now")
        readable, _, _ = select.select([reader.transport.socket], [], [], 5.0)
        self.assertEqual(readable, [reader.transport.socket])

    async def test_tcp(self):
        """
        On TCP, a write is sent at once, and a mix of small, large and
        queued writes arrives intact and in order.
        """
        writer, reader = await self._plain("tcp")
        self._assert_sent_at_once(writer, reader)
        await wait_until(lambda: reader.data == b"now")
        reader.chunks.clear()
        await self._write_everything(writer, reader)

    async def test_unix(self):
        """
        On a Unix socket, the same.
        """
        writer, reader = await self._plain("unix")
        self._assert_sent_at_once(writer, reader)
        await wait_until(lambda: reader.data == b"now")
        reader.chunks.clear()
        await self._write_everything(writer, reader)

    async def _assert_encrypted(self, kind: str) -> None:
        writer, reader, raw = await self._tls(kind)
        await self._write_everything(writer, reader)
        wire = b"".join(raw)
        self.assertGreater(len(wire), len(BIG))
        self.assertNotIn(MARKER, wire)
        self.assertNotIn(BIG[:64], wire)
        self.assertNotIn(b"queued", wire)

    async def test_tls_listener(self):
        """
        On the server end of a TLS listener (the proxy's C{ssl:} endpoint),
        everything arrives intact and nothing crosses the wire in clear.
        """
        await self._assert_encrypted("listener")

    async def test_tls_upstream(self):
        """
        On the client end of a TLS connection (an C{https} upstream), the
        same.
        """
        await self._assert_encrypted("upstream")

    async def test_started_tls(self):
        """
        On a TCP connection that switched to TLS (C{startTLS}: the
        transport is still the TCP connection), the same.
        """
        await self._assert_encrypted("starttls")

    async def test_upstream_pool_over_tls(self):
        """
        The upstream pool's request to an C{https} upstream (written with
        L{write_now}) reaches the server encrypted: the server decrypts the
        request line and body, and neither is on the wire.
        """
        old = os.environ.get("SSL_CERT_FILE")
        os.environ["SSL_CERT_FILE"] = self.pem_path
        self.addCleanup(lambda: os.environ.pop("SSL_CERT_FILE") if old is None else os.environ.update(SSL_CERT_FILE=old))

        class Answer(_Peer):
            def dataReceived(self, data):
                super().dataReceived(data)
                if self.data.endswith(MARKER):
                    self.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")

        answer = Answer()
        server = _recording_tls_factory(self.server_options, False, answer)
        port = reactor.listenTCP(0, server, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        pool = UpstreamPool(reactor)
        self.addCleanup(pool.close)
        response = await pool.request(
            "localhost", port.getHost().port, 5.0, b"POST", b"/v1/secret-path", [], MARKER, tls=True
        )
        sink = await read_body(response)
        self.assertEqual(sink.body, b"ok")
        self.assertIn(b"POST /v1/secret-path HTTP/1.1\r\n", answer.data)
        self.assertTrue(answer.data.endswith(MARKER))
        wire = b"".join(server.raw)
        self.assertNotIn(b"secret-path", wire)
        self.assertNotIn(MARKER, wire)
