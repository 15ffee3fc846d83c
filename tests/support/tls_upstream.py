"""A local HTTPS provider for the TLS verification tests: a throw-away CA, certificates it signs,
and a tiny aiohttp server on 127.0.0.1 that presents one of them."""

from __future__ import annotations

import datetime
import ipaddress
import ssl
from pathlib import Path

from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tests.support.threaded_server import ThreadedServer



def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


class TestCA:
    """A self-signed CA that issues server certificates for chosen DNS names and IPs."""

    __test__ = False  # not a pytest class

    def __init__(self, folder: Path, name: str = "LMGate Test CA") -> None:
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self.key = _key()
        now = datetime.datetime.now(datetime.timezone.utc)
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        self.cert = (
            x509.CertificateBuilder()
            .subject_name(subject).issuer_name(subject)
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=2))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False,
                                         encipher_only=False, decipher_only=False), critical=True)
            .sign(self.key, hashes.SHA256())
        )
        self.ca_file = folder / "ca.pem"
        self.ca_file.write_bytes(self.cert.public_bytes(serialization.Encoding.PEM))

    def issue(self, label: str, dns: list[str], ips: list[str] = ()) -> tuple[Path, Path]:
        """Write <label>.crt and <label>.key, signed by this CA; return their paths."""
        key = _key()
        now = datetime.datetime.now(datetime.timezone.utc)
        names = [x509.DNSName(d) for d in dns] + [x509.IPAddress(ipaddress.ip_address(i)) for i in ips]
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, dns[0] if dns else ips[0])]))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName(names), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .sign(self.key, hashes.SHA256())
        )
        crt, key_file = self.folder / f"{label}.crt", self.folder / f"{label}.key"
        crt.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        key_file.write_bytes(_pem_key(key))
        return crt, key_file


class TlsUpstream(ThreadedServer):
    """HTTPS on 127.0.0.1:<port>, answering every request with 200 {"tls":"ok"}."""

    runner_options = {}

    def __init__(self, cert: Path, key: Path) -> None:
        super().__init__()
        self.seen: list[str] = []
        self.sni: list[str | None] = []
        self.ssl_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.ssl_context.load_cert_chain(cert, key)
        self.ssl_context.sni_callback = self._on_sni

    def url(self, host: str = "localhost") -> str:
        return f"https://{host}:{self.port}"

    def _on_sni(self, sslobj, server_name, ctx) -> None:
        self.sni.append(server_name)

    async def _handle(self, request: web.Request) -> web.Response:
        await request.read()
        self.seen.append(request.raw_path)
        return web.json_response({"tls": "ok"})
