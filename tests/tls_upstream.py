"""
TLS for tests: self-signed certificates for C{localhost}, made at run time
(for the TLS upstream, the proxy's TLS listener and a rediss:// Redis), and
a loopback TLS server that answers every request with a fixed response.
"""

import datetime
import os
from typing import List, Tuple

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from twisted.internet import ssl
from twisted.internet.protocol import Factory, Protocol


def _localhost_certificate():
    """
    :return: C{(certificate PEM, private key)} of a fresh self-signed
        certificate for C{localhost} that is its own CA.
    """
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    return certificate.public_bytes(serialization.Encoding.PEM), key


def _key_pem(key, form) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, form, serialization.NoEncryption())


def self_signed_localhost(directory: str) -> str:
    """
    Write a self-signed certificate and key for C{localhost} (its own CA)
    under C{directory}, in one file.

    :return: the path of the PEM file holding both.
    """
    certificate, key = _localhost_certificate()
    path = os.path.join(directory, "localhost.pem")
    with open(path, "wb") as f:
        f.write(certificate + _key_pem(key, serialization.PrivateFormat.PKCS8))
    return path


def self_signed_certificate(directory: str) -> Tuple[str, str]:
    """
    Write a self-signed certificate for C{localhost} and its key (OpenSSL's
    traditional form, as redis-server reads it) in two files.

    :return: C{(certificate path, key path)}.
    """
    certificate, key = _localhost_certificate()
    cert_path, key_path = os.path.join(directory, "cert.pem"), os.path.join(directory, "key.pem")
    with open(cert_path, "wb") as f:
        f.write(certificate)
    with open(key_path, "wb") as f:
        f.write(_key_pem(key, serialization.PrivateFormat.TraditionalOpenSSL))
    return cert_path, key_path


class _Answer(Protocol):
    def dataReceived(self, data: bytes) -> None:
        self.factory.received.append(data)
        if b"\r\n\r\n" in b"".join(self.factory.received):
            self.transport.write(self.factory.answer)


class TLSUpstream:
    """
    A TLS server on 127.0.0.1 with the certificate in C{pem_path}.

    :ivar received: the request bytes it decrypted.
    """

    def __init__(self, reactor, pem_path: str, answer: bytes):
        with open(pem_path, "rb") as f:
            certificate = ssl.PrivateCertificate.loadPEM(f.read())
        self.factory = Factory.forProtocol(_Answer)
        self.factory.received: List[bytes] = []
        self.factory.answer = answer
        self.port = reactor.listenSSL(0, self.factory, certificate.options(), interface="127.0.0.1")

    @property
    def received(self) -> List[bytes]:
        return self.factory.received

    @property
    def number(self) -> int:
        return self.port.getHost().port

    def stop(self):
        return self.port.stopListening()
