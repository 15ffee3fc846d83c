"""Certificates made at test time with the `openssl` command: a throw-away CA (optionally with an
intermediate, so that a server's file holds a chain) and the server certificates it signs. Used by
the TLS front-door tests and by the TLS mock upstream (tests/support/tls_upstream.py)."""

from __future__ import annotations

import hashlib
import secrets
import socket
import ssl
import subprocess
from pathlib import Path

CURVE = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"]


def openssl(*args: str | Path) -> None:
    done = subprocess.run(["openssl", *map(str, args)], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"openssl {' '.join(map(str, args[:2]))} failed: {done.stderr.strip()[-500:]}")


def _sign(folder: Path, label: str, subject: str, issuer: tuple[Path, Path] | None, ext: str,
          days: int) -> tuple[Path, Path]:
    """A key and a certificate for `subject`, signed by `issuer` (cert, key), or self-signed."""
    crt, key = folder / f"{label}.crt", folder / f"{label}.key"
    ext_file = folder / f"{label}.ext"
    ext_file.write_text(ext)
    if issuer is None:
        openssl("req", "-x509", *CURVE, "-keyout", key, "-out", crt, "-days", days, "-subj", subject,
                "-set_serial", f"0x{secrets.token_hex(8)}", "-extensions", "v3", "-config", _req_config(folder, ext))
        return crt, key
    csr = folder / f"{label}.csr"
    openssl("req", "-new", *CURVE, "-keyout", key, "-out", csr, "-subj", subject)
    # -days -1 makes a certificate that has already expired.
    openssl("x509", "-req", "-in", csr, "-CA", issuer[0], "-CAkey", issuer[1], "-out", crt, "-days", days,
            "-set_serial", f"0x{secrets.token_hex(8)}", "-extfile", ext_file)
    return crt, key


def _req_config(folder: Path, ext: str) -> Path:
    path = folder / "req.cnf"
    path.write_text("[req]\ndistinguished_name = dn\n[dn]\n[v3]\n" + ext)
    return path


CA_EXT = ("basicConstraints = critical,CA:TRUE\nkeyUsage = critical,keyCertSign,cRLSign\n"
          "subjectKeyIdentifier = hash\n")


class TestCA:
    """A self-signed CA that issues server certificates for chosen DNS names and IPs. With
    `intermediate`, an intermediate CA signs them and each certificate file holds the chain
    (server certificate, then the intermediate), as certbot's fullchain.pem does."""

    __test__ = False  # not a pytest class

    def __init__(self, folder: Path, name: str = "LMGate Test CA", intermediate: bool = False) -> None:
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self.ca_file, self._ca_key = _sign(folder, "ca", f"/CN={name}", None, CA_EXT, 2)
        self.signer = (self.ca_file, self._ca_key)
        self.chain = b""
        if intermediate:
            self.signer = _sign(folder, "intermediate", f"/CN={name} Intermediate", self.signer,
                                CA_EXT + "authorityKeyIdentifier = keyid\n", 2)
            self.chain = self.signer[0].read_bytes()

    def issue(self, label: str, dns: list[str], ips: list[str] = (), days: int = 1) -> tuple[Path, Path]:
        """Write <label>.crt (with the chain, if any) and <label>.key; return their paths."""
        names = [f"DNS:{d}" for d in dns] + [f"IP:{i}" for i in ips]
        ext = (f"subjectAltName = {','.join(names)}\nbasicConstraints = critical,CA:FALSE\n"
               "extendedKeyUsage = serverAuth\n")
        crt, key = _sign(self.folder, label, f"/CN={dns[0] if dns else ips[0]}", self.signer, ext, days)
        if self.chain:
            crt.write_bytes(crt.read_bytes() + self.chain)
        return crt, key

    def client_context(self) -> ssl.SSLContext:
        """What a client configured to trust this CA uses."""
        return ssl.create_default_context(cafile=str(self.ca_file))


def fingerprint(cert_file: Path) -> str:
    """SHA-256 of the first certificate in a PEM file (the server's own, in a chain file)."""
    pem = cert_file.read_text()
    first = pem[:pem.index("-----END CERTIFICATE-----") + len("-----END CERTIFICATE-----")]
    return hashlib.sha256(ssl.PEM_cert_to_DER_cert(first)).hexdigest()


def served_fingerprint(port: int, context: ssl.SSLContext, host: str = "127.0.0.1") -> str:
    """SHA-256 of the certificate a new TLS connection to host:port is given."""
    with socket.create_connection((host, port), timeout=5) as raw:
        with context.wrap_socket(raw, server_hostname=host) as tls:
            return hashlib.sha256(tls.getpeercert(binary_form=True)).hexdigest()
