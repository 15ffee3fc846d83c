"""TLS on the front door: the certificate and key files, checked before nginx is given them, and
watched for renewal (certbot, a Kubernetes Secret) so that nginx reloads when they are replaced.

nginx's master process reads the files at start and at each reload, as the user that runs
`lmgate up` / `lmgate nginx` (root included: the workers, `nobody`, never read them); the checks
here run as that same user, so a file they can read, nginx can read.
"""

from __future__ import annotations

import datetime
import logging
import os
import ssl
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization

from lmgate.nginx_conf import RenderError
from lmgate.settings import Settings

log = logging.getLogger("lmgate.tls")

CERT_SETTING = "proxy.tls_cert_path"
KEY_SETTING = "proxy.tls_key_path"
# A replaced pair that does not check out is looked at again this much later before it is
# reported: certbot and editors write the certificate and the key one after the other.
SETTLE_SECONDS = 1.0


class TLSError(RenderError):
    """A certificate or key file that nginx must not be given; one line naming the file and setting."""


@dataclass(frozen=True)
class CertInfo:
    subject: str
    serial: int
    not_before: datetime.datetime
    not_after: datetime.datetime
    sha256: str  # fingerprint of the leaf certificate (DER), as clients show it


def _read(path: Path, setting: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise TLSError(f"{setting}: cannot read {path}: {exc.strerror or exc}") from None


def _leaf(path: Path, data: bytes) -> x509.Certificate:
    try:
        certs = x509.load_pem_x509_certificates(data)
    except ValueError:
        raise TLSError(f"{CERT_SETTING}: {path} holds no PEM certificate (expected -----BEGIN CERTIFICATE-----, "
                       f"the server's certificate first, then its chain)") from None
    return certs[0]


def _info(cert: x509.Certificate) -> CertInfo:
    return CertInfo(subject=cert.subject.rfc4514_string(), serial=cert.serial_number,
                    not_before=cert.not_valid_before_utc, not_after=cert.not_valid_after_utc,
                    sha256=cert.fingerprint(hashes.SHA256()).hex())


def certificate_info(path: Path | str) -> CertInfo:
    """The first (server) certificate of a PEM file; TLSError naming the file if it has none."""
    path = Path(path)
    return _info(_leaf(path, _read(path, CERT_SETTING)))


def certificate_expiry(path: Path | str) -> datetime.datetime:
    """When the server certificate in `path` expires (UTC), for `lmgate doctor` and monitoring."""
    return certificate_info(path).not_after


# `lmgate doctor` calls a certificate that expires sooner than this a problem: certbot renews at
# 30 days left, so 14 means renewal has been failing for two weeks.
EXPIRY_WARNING_DAYS = 14


def certificate_status(settings: Settings, now: datetime.datetime | None = None) -> tuple[bool, str, str]:
    """For `lmgate doctor`: (ok, what, fix) about the certificate nginx is configured with."""
    proxy = settings.proxy
    if not proxy.tls_cert_path:
        return (True, "TLS is off: clients speak plain HTTP to proxy.port (fine on loopback only)",
                "set proxy.tls_cert_path and proxy.tls_key_path (README, TLS) when clients reach it over a network")
    now = now or datetime.datetime.now(datetime.timezone.utc)
    try:
        info = check_pair(proxy.tls_cert_path, proxy.tls_key_path, now)
    except TLSError as exc:
        return False, str(exc), "fix the named file; a running gate keeps serving the certificate it has"
    days = (info.not_after - now).days
    what = f"{proxy.tls_cert_path}: {_describe(info)} ({days} days left)"
    if days < EXPIRY_WARNING_DAYS:
        return False, what, "renew it (certbot renew, or update the Secret); LMGate reloads nginx when the files change"
    return True, what, ""


def check_pair(cert_path: Path | str, key_path: Path | str,
               now: datetime.datetime | None = None) -> CertInfo:
    """Check that nginx can serve this pair: the certificate parses and is valid now, the key is an
    unencrypted PEM key, and it belongs to the certificate. Raise TLSError naming the file."""
    cert_path, key_path = Path(cert_path), Path(key_path)
    cert = _leaf(cert_path, _read(cert_path, CERT_SETTING))
    key_data = _read(key_path, KEY_SETTING)
    try:
        key = serialization.load_pem_private_key(key_data, password=None)
    except TypeError:
        raise TLSError(f"{KEY_SETTING}: {key_path} is encrypted; nginx would ask for a passphrase at every "
                       f"start (decrypt it: openssl pkey -in KEY -out KEY.plain)") from None
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise TLSError(f"{KEY_SETTING}: {key_path} holds no usable PEM private key "
                       f"({type(exc).__name__})") from None
    der = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    if key.public_key().public_bytes(*der) != cert.public_key().public_bytes(*der):
        raise TLSError(f"{KEY_SETTING}: {key_path} is not the key of the certificate in {cert_path} "
                       f"({CERT_SETTING}); the server's certificate must come first in that file")
    # What nginx's OpenSSL will do with them: load the chain and match the key.
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_cert_chain(cert_path, key_path, password=lambda: b"")
    except (ssl.SSLError, OSError) as exc:
        raise TLSError(f"{CERT_SETTING}: OpenSSL refuses {cert_path} with {key_path}: {exc}") from None
    now = now or datetime.datetime.now(datetime.timezone.utc)
    info = _info(cert)
    if now >= info.not_after:
        raise TLSError(f"{CERT_SETTING}: the certificate in {cert_path} expired on {info.not_after:%Y-%m-%d %H:%M} UTC")
    if now < info.not_before:
        raise TLSError(f"{CERT_SETTING}: the certificate in {cert_path} is not valid before "
                       f"{info.not_before:%Y-%m-%d %H:%M} UTC (check this machine's clock)")
    return info


def _describe(info: CertInfo) -> str:
    return f"{info.subject}, serial {info.serial:x}, expires {info.not_after:%Y-%m-%d %H:%M} UTC"


class CertWatcher:
    """Checks the pair at start (TLSError if nginx must not get it), then on `poll()` every
    auth.poll_interval_seconds looks at both files (inode, size and mtime, through symlinks: a
    Kubernetes Secret update swaps a symlink) and, when they changed and check out, calls
    `reload` (which reloads nginx gracefully). A pair that does not check out is logged once, naming
    the file, and nginx keeps serving the previous certificate."""

    def __init__(self, settings: Settings) -> None:
        proxy = settings.proxy
        self.enabled = bool(proxy.tls_cert_path)
        if not self.enabled:
            return
        self.cert, self.key = Path(proxy.tls_cert_path), Path(proxy.tls_key_path)
        self.interval = settings.auth.poll_interval_seconds
        self.info = check_pair(self.cert, self.key)
        log.info("TLS certificate %s (%s)", self.cert, _describe(self.info))
        if os.stat(self.key).st_mode & 0o004:
            log.warning("%s: %s is readable by every user of this machine; make it readable by LMGate's user "
                        "only (chmod o-r)", KEY_SETTING, self.key)
        self._served = self._signature()
        self._pending: tuple | None = None  # a replaced pair that did not check out, looked at again soon
        self._refused: tuple | None = None  # the last pair reported as bad, to report it once
        self._next = time.monotonic() + self.interval

    def _signature(self) -> tuple:
        out = []
        for path in (self.cert, self.key):
            try:
                st = os.stat(path)  # follows symlinks
                out.append((st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns))
            except OSError as exc:
                out.append(exc.errno)
        return tuple(out)

    def poll(self, reload: Callable[[], None]) -> bool:
        """Call `reload` if the files were replaced by a pair that checks out; True if it did."""
        if not self.enabled or time.monotonic() < self._next:
            return False
        self._next = time.monotonic() + self.interval
        signature = self._signature()
        if signature == self._served or signature == self._refused:
            return False
        try:
            info = check_pair(self.cert, self.key)
        except TLSError as exc:
            if signature != self._pending:
                # Maybe half-replaced (certbot writes the certificate, then the key): look again
                # in a moment before reporting it.
                self._pending = signature
                self._next = time.monotonic() + min(SETTLE_SECONDS, self.interval)
                return False
            self._refused = signature
            log.error("%s; nginx keeps serving the previous certificate (%s)", exc, _describe(self.info))
            return False
        self._served, self.info, self._pending, self._refused = signature, info, None, None
        log.info("TLS certificate %s was replaced (%s); reloading nginx", self.cert, _describe(info))
        reload()
        return True
